"""One training run per run directory: an exclusive `flock` on `RUN/.fxconvert-lock`.

Two runs into the same `--out` (two launches at once, or two `--resume`s) would both pass
the checks before either wrote anything, then overwrite each other's metrics, checkpoints
and export. Global rank 0 therefore `check`s the lock among its first checks (a busy
directory is named as such, not as "not empty"), and `take`s it when every check has
passed, before any process group or file of the run exists; it holds it until its
process ends (the kernel releases it then, however the process ends). A second run is
refused in one line. The file stays behind: a lock file nobody holds is no lock, so a finished or
killed run never blocks a `--resume`. It is opened without following a symlink and never
written, so it cannot be used to touch another file; anything but a regular file there (a FIFO,
a device) is refused rather than waited on.
"""

import fcntl
import os
from pathlib import Path

from fxconvert.errors import UsageError
from fxconvert.files import open_regular

LOCK = ".fxconvert-lock"


def take(run_dir: Path, *, shown: str, create: bool) -> int | None:
    """The open descriptor holding the lock (keep it open), or None if there is no lock file and not `create`.

    `shown` is the directory as the user wrote it (`--out`), for the message.
    """
    path = Path(run_dir) / LOCK
    if not create and not os.path.lexists(path):
        return None
    if create:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    try:  # a FIFO in its place is opened at once and refused, never waited on
        fd = open_regular(path, os.O_RDONLY | (os.O_CREAT if create else 0))
    except OSError as e:
        raise UsageError(f"--out {shown}: cannot open its lock file {LOCK} ({e.strerror}); remove it if it is not "
                         f"a plain file, or choose another --out") from None
    except ValueError:
        raise UsageError(f"--out {shown}: its lock file {LOCK} is not a plain file; remove it, or choose another "
                         f"--out") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise UsageError(f"--out {shown} is in use by another training run; wait for it to end, or choose another "
                         f"--out") from None
    return fd


def check(run_dir: Path, *, shown: str) -> None:
    """Refuse a run directory another run holds (`take` still decides: another run may start in between)."""
    fd = take(run_dir, shown=shown, create=False)
    if fd is not None:
        os.close(fd)


__all__ = ["LOCK", "take", "check"]
