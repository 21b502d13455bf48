"""`fxconvert.files`: copying a file out of a directory whose author fxconvert does not trust.

A checkpoint downloaded or unpacked from elsewhere may hold a `merges.txt` that is a
symlink to `/etc/passwd` or to a key, or a FIFO that blocks whoever reads it. fxconvert
copies files from such directories into its outputs (the tokenizer files into a
conversion, and from there into `run/hf`), so it copies only what `why_not_copyable`
accepts: a regular file whose real path, symlinks resolved, lies inside one of the
directory's roots (`roots_of`). The Hugging Face cache is the one layout where the files
of a directory are symlinks that point out of it: a snapshot's files point into its
repository's `blobs/` folder, which is therefore a root of a snapshot too.
"""

import os
import stat
from pathlib import Path


def roots_of(directory) -> list[Path]:
    """Where the files of `directory` may really lie: inside it, and for a Hugging Face cache
    snapshot (`models--<name>/snapshots/<revision>/`) inside its repository's `blobs/`."""
    directory = Path(directory)
    roots = [directory.resolve()]
    if directory.parent.name == "snapshots" and directory.parent.parent.name.startswith("models--"):
        roots.append((directory.parent.parent / "blobs").resolve())
    return roots


def why_not_copyable(path, roots) -> str | None:
    """Why the file at `path` must not be copied (a phrase for a message), or None when it may."""
    return _check(path, roots)[0]


def _check(path, roots) -> tuple[str | None, Path | None, os.stat_result | None]:
    """(why not, None, None), or (None, the real path, its stat) of a file that may be copied.

    The real path is resolved once; its stat does not follow a symlink, so a link put at the
    real path after it was resolved is "not a regular file" rather than followed.
    """
    path = Path(path)
    try:
        real = path.resolve(strict=True)
        checked = os.stat(real, follow_symlinks=False)
    except (OSError, RuntimeError):  # a broken or looping symlink, or unreadable
        return ("a broken symlink" if path.is_symlink() else "unreadable"), None, None
    if not any(real.is_relative_to(root) for root in roots):
        return "a symlink to a file outside it", None, None
    if not stat.S_ISREG(checked.st_mode):
        return "not a regular file", None, None
    return None, real, checked


def read_copyable(path, roots) -> bytes:
    """The bytes of `path` when `why_not_copyable` accepts it; ValueError(why) when not.

    The path is resolved once: the real path that was checked is the one opened, without
    following a symlink and without blocking, and what was opened must be the very file
    that was checked (same device and inode). A symlink swapped in between the check and
    the open, or a FIFO put in the file's place, is refused rather than read or waited on.
    """
    why, real, checked = _check(path, roots)
    if why is not None:
        raise ValueError(why)
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError:  # ELOOP: a symlink now stands at the real path
        raise ValueError("replaced while it was read") from None
    with os.fdopen(fd, "rb") as f:
        opened = os.fstat(f.fileno())
        if not stat.S_ISREG(opened.st_mode):
            raise ValueError("not a regular file")
        if (opened.st_dev, opened.st_ino) != (checked.st_dev, checked.st_ino):
            raise ValueError("replaced while it was read")
        return f.read()


def open_regular(path, flags: int, mode: int = 0o644) -> int:
    """A descriptor of `path` opened without following a symlink or waiting on a FIFO (`flags` are added
    to those); ValueError("not a regular file") when what was opened is anything else (OSError as os.open)."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError("not a regular file")
    return fd


__all__ = ["open_regular", "roots_of", "why_not_copyable", "read_copyable"]


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a rename is durable only once its directory is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
