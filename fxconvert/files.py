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
    path = Path(path)
    try:
        real = path.resolve(strict=True)
        mode = real.stat().st_mode
    except (OSError, RuntimeError):  # a broken or looping symlink, or unreadable
        return "a broken symlink" if path.is_symlink() else "unreadable"
    if not any(real.is_relative_to(root) for root in roots):
        return "a symlink to a file outside it"
    if not stat.S_ISREG(mode):
        return "not a regular file"
    return None


def read_copyable(path, roots) -> bytes:
    """The bytes of `path` when `why_not_copyable` accepts it; ValueError(why) when not.

    The file is opened without blocking and checked again once open, so a FIFO put in its
    place after the check is refused rather than waited on.
    """
    why = why_not_copyable(path, roots)
    if why is not None:
        raise ValueError(why)
    fd = os.open(Path(path).resolve(strict=True), os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ValueError("not a regular file")
        return f.read()


__all__ = ["roots_of", "why_not_copyable", "read_copyable"]
