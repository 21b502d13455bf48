"""`fxconvert.atomic_dir`: a directory that appears whole or not at all, and the cleanup of what a killed writer left.

Three things fxconvert writes are directories that must never be seen half written: a
conversion's output (`fxconvert.save`), a training checkpoint `run/checkpoints/step_<k>`
(`fxconvert.training.checkpoint`) and the exported `run/hf` (`fxconvert.export`). They share
one protocol, so that a failure, Ctrl-C, SIGTERM or SIGKILL leaves either the old directory or
the complete new one, and a later run can tell what was its own:

1. `make_temp`: a new directory beside the destination, under a random name, holding the
   marker `.fxconvert` from the start (one JSON line: producer, pid, host, the writing
   process's `RUN`, time, and what the caller adds). A writer killed at any later point
   leaves a directory that says it is fxconvert's. `make_named_temp` then renames it to a
   fixed name, for writers whose ranks must all find the same directory.
2. The caller writes its files into it.
3. `commit` (or `put_in_place` inside the caller's own `deferred()` block): fsync, then
   rename it into place, never over a directory that appeared meanwhile (renameat2
   RENAME_NOREPLACE), or, when replacing is allowed, swap it with the old directory in one
   step (RENAME_EXCHANGE; two renames where the system has no renameat2) and remove the old
   one, marker last. Signals wait while this runs (`fxconvert.signals.deferred`).
4. `remove_leftovers`: remove what a killed writer left beside the destination: only real
   directories (never a symlink, never through one) with the caller's names that hold the
   marker. A destructive operation touches only what fxconvert itself wrote.
"""

import contextlib
import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Callable

from fxconvert.files import fsync_path, open_regular
from fxconvert.signals import deferred

MARKER = ".fxconvert"
RUN = secrets.token_hex(8)  # names this process in the markers it writes


# -- the marker ----------------------------------------------------------------------------------


def mark(directory: Path, **fields) -> None:
    """Write the marker into `directory`: the producer, the writing process, and the caller's `fields`."""
    record = {"producer": "fxconvert", **fields, "pid": os.getpid(), "host": socket.gethostname(), "run": RUN,
              "time": time.time()}
    (Path(directory) / MARKER).write_text(json.dumps(record) + "\n", encoding="utf-8")


def read_marker(directory) -> dict | None:
    """The marker's record when `directory` is a real directory holding fxconvert's marker, else None.

    Neither the directory nor the marker is followed through a symlink, and a FIFO is not waited on.
    """
    try:
        if Path(directory).is_symlink():
            return None
        fd = open_regular(Path(directory) / MARKER, os.O_RDONLY)
        with os.fdopen(fd, "rb") as f:
            record = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("producer") == "fxconvert" else None


def is_marked(directory) -> bool:
    return read_marker(directory) is not None


def writer_alive(record: dict) -> bool:
    """Whether the process that wrote `record` may still be writing (True when it cannot be told)."""
    pid = record.get("pid")
    if record.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return True
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass
    return True


# -- the temporary directory ---------------------------------------------------------------------


def make_temp(parent, prefix: str, suffix: str = "", **fields) -> Path:
    """A new directory `<parent>/<prefix><8 hex><suffix>`, already marked (`fields` go into the marker).

    Its mode is the umask's, as the result's should be. If marking fails it is removed again:
    it was made just now, under a name nobody else uses.
    """
    parent = Path(parent)
    while True:
        path = parent / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            os.mkdir(path)
        except FileExistsError:
            continue
        break
    try:
        mark(path, **fields)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    return path


def make_named_temp(path, **fields) -> Path:
    """Create the marked directory `path` (a name every rank knows): made by `make_temp` as `<path>.<8 hex>`, then
    renamed. FileExistsError when something is at `path` already; a kill before the rename leaves only the
    random name, which blocks no later run."""
    path = Path(path)
    staging = make_temp(path.parent, f"{path.name}.", **fields)
    try:
        _rename_noreplace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


# -- putting it in place -------------------------------------------------------------------------


def put_in_place(tmp: Path, out: Path, *, replace: bool = False, onto_empty: bool = False,
                 aside: Path | None = None) -> Path | None:
    """Sync `tmp` and rename it to `out`; returns the directory now holding the replaced one (to remove), or None.

    Run it inside `deferred()`, with the removal of what it returns. With `replace` and a
    directory at `out`, the two are swapped (RENAME_EXCHANGE, or two renames via `aside`, a
    fresh `.<out>.<8 hex>.old` when None, the old one put back if the second fails); the old
    one is marked first, so that a kill before its removal leaves a directory the next run
    takes for fxconvert's. With `onto_empty`, a plain rename, which replaces a directory only
    while it is empty. Otherwise never over anything: FileExistsError when `out` exists.
    """
    sync(tmp)
    old = None
    if replace and out.is_dir() and not out.is_symlink():
        added = not is_marked(out)
        if added:
            mark(out)
        try:
            if _renameat2(tmp, out, _RENAME_EXCHANGE):
                old = tmp  # the old directory, under the temporary name
            else:
                old = aside if aside is not None else out.parent / f".{out.name}.{secrets.token_hex(4)}.old"
                os.rename(out, old)
                try:
                    os.rename(tmp, out)
                except BaseException:
                    os.rename(old, out)
                    raise
        except BaseException:
            if added:
                with contextlib.suppress(OSError):
                    (out / MARKER).unlink()
            raise
    elif onto_empty and out.is_dir() and not out.is_symlink():
        os.rename(tmp, out)
    else:
        _rename_noreplace(tmp, out)
    _sync_directory(out.parent)
    return old


def commit(tmp: Path, out: Path, *, replace: bool = False, aside: Path | None = None,
           keep_marker: bool = True) -> str | None:
    """`put_in_place` and the removal of the replaced directory, with signals deferred; returns a note (a phrase)
    when the old directory could not be removed (it stays marked: the next run's `remove_leftovers` takes it).

    Without `keep_marker` the marker is removed from `out` once it is in place (a checkpoint holds
    exactly its own layout).
    """
    with deferred():
        old = put_in_place(tmp, out, replace=replace, aside=aside)
        if not keep_marker:
            (out / MARKER).unlink()
        return None if old is None else remove_old(old)


def remove_old(old: Path) -> str | None:
    try:
        rmtree(old)
    except OSError as e:
        return f"the previous output could not be removed from {old}: {e.strerror or e}; remove it yourself"
    return None


def sync(directory: Path) -> None:
    """fsync the regular files directly in `directory` and the directory itself, before it is renamed into place."""
    with os.scandir(directory) as entries:
        files = [e.path for e in entries if e.is_file(follow_symlinks=False)]
    for path in files:
        fsync_path(Path(path))
    _sync_directory(directory)


def _sync_directory(directory: Path) -> None:
    """fsync a directory, where the file system can (some refuse it for directories: EINVAL)."""
    try:
        fsync_path(directory)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise


# -- cleanup -------------------------------------------------------------------------------------


def remove_leftovers(parent, names: re.Pattern, *, keep: Callable[[Path, dict], bool] | None = None) -> list[Path]:
    """Remove the directories in `parent` whose whole name matches `names` and that hold the marker; return them.

    Never a symlink (nor anything it points to), never an unmarked directory, never one for
    which `keep(path, record)` is true (a writer still alive, files fxconvert did not write).
    Call it only while no write of the caller's is in flight.
    """
    try:
        with os.scandir(parent) as it:
            entries = sorted(e.path for e in it if names.fullmatch(e.name) and e.is_dir(follow_symlinks=False))
    except OSError:
        return []
    removed = []
    for entry in entries:
        path = Path(entry)
        record = read_marker(path)
        if record is None or (keep is not None and keep(path, record)):
            continue
        with deferred(), contextlib.suppress(OSError):
            rmtree(path)
            removed.append(path)
    return removed


def remove_if_marked(path: Path) -> bool:
    """Remove `path` when it is a directory fxconvert marked (a failed write's temporary); whatever else holds
    the name stays. Whether it was removed."""
    if not is_marked(path):
        return False
    rmtree(path)
    return True


def rmtree(path: Path) -> None:
    """Remove one of fxconvert's own directories, its marker last, so that if this process is killed
    meanwhile the next run still knows the rest for fxconvert's. A read-only subdirectory (a
    chmod-ed `__pycache__`) is made writable; nothing outside `path` is touched."""
    path = Path(path)
    for attempt in (1, 2):
        try:
            for name in sorted(os.listdir(path), key=lambda name: name == MARKER):
                entry = path / name
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except PermissionError:
            if attempt == 2:
                raise
            os.chmod(path, 0o700)
            for parent, dirs, _ in os.walk(path):
                for name in dirs:
                    if not os.path.islink(os.path.join(parent, name)):
                        os.chmod(os.path.join(parent, name), 0o700)


# -- renameat2 -----------------------------------------------------------------------------------

_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename, never over anything at `dst` (FileExistsError); the fallback's check and rename are two steps."""
    if not _renameat2(src, dst, _RENAME_NOREPLACE):
        if dst.exists() or dst.is_symlink():
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
        os.rename(src, dst)


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2(2); False where the C library or the file system lacks it (the caller falls back)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):  # not Linux, or an old C library
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), ctypes.c_uint(flags)) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


__all__ = ["MARKER", "RUN", "mark", "read_marker", "is_marked", "writer_alive", "make_temp", "make_named_temp",
           "put_in_place", "commit", "remove_old", "sync", "remove_leftovers", "rmtree"]
