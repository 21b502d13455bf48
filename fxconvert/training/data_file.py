"""The data file's bytes: one pass over its lines that records where each begins, and reading lines back by offset.

A rank keeps where each line begins (an `array('q')`: 8 bytes a line), not the lines: a 20 GB
file is not 20 GB per rank. `Lines` is the one pass (`fxconvert.training.data.load_jsonl`
checks each line it yields); `read_lines` reads the lines of a batch back when the batch is
needed. Lines end at b"\\n" (a "\\r" before it is JSON whitespace); a UTF-8 byte-order mark at
the very start of the file is not part of line 1.

The lines read back must be the lines checked, and the file's sha256 (of the bytes the pass
read) is what checkpoints record of the data: so the file must not change while the run
trains. Its `Stamp` (size, modification time, inode) is taken when the pass opens it, and
compared when the pass ends and whenever the file is opened again: a file appended to,
edited or replaced stops the run in one line (`changed`).
"""

import hashlib
import os
from array import array
from dataclasses import dataclass

from fxconvert.errors import UsageError

BOM = b"\xef\xbb\xbf"


class DataError(UsageError):
    """A data file or one of its lines is unusable; the message names the file and line."""


@dataclass(frozen=True)
class Stamp:
    """What tells a file changed without reading it: its size, modification time and identity."""

    size: int
    mtime_ns: int
    inode: int
    device: int

    @classmethod
    def of(cls, fd: int) -> "Stamp":
        st = os.fstat(fd)
        return cls(st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


def changed(shown: str) -> DataError:
    return DataError(f"{shown} changed while the run was using it (its size or modification time is not what it was "
                     f"when it was read); put the original back and pass --resume, or train on a copy that stays "
                     f"unchanged")


class Lines:
    """One pass over the lines of `file` (open, binary): `(number, bytes)` for each line, 1-based, without its
    newline, and after the pass `sha256` (of every byte read), `offsets` (with `offsets=True`: where each line
    begins, then the end of the last) and `count`."""

    def __init__(self, file, shown: str, *, offsets: bool = True):
        self.file, self.shown = file, shown
        self.stamp = Stamp.of(file.fileno())
        self.offsets = array("q") if offsets else None
        self.sha256, self.count = None, 0

    def __iter__(self):
        digest, position, offsets = hashlib.sha256(), 0, self.offsets
        for number, raw in enumerate(self.file, 1):
            digest.update(raw)
            start, position = position, position + len(raw)
            if number == 1 and raw.startswith(BOM):
                raw, start = raw[len(BOM):], len(BOM)
            if offsets is not None:
                offsets.append(start)
            self.count = number
            yield number, raw[:-1] if raw.endswith(b"\n") else raw
        if offsets is not None:
            offsets.append(position)
        if Stamp.of(self.file.fileno()) != self.stamp or position != self.stamp.size:
            raise changed(self.shown)
        self.sha256 = digest.hexdigest()


def read_lines(path, shown: str, stamp: Stamp, offsets: array, indices) -> dict[int, bytes]:
    """Lines `indices` (0-based) of the file `Lines` read with `stamp` and `offsets`, each without its newline."""
    try:
        file = open(path, "rb")
    except OSError as e:
        raise DataError(f"{shown} cannot be read any more ({e.strerror}); put it back and pass --resume") from None
    with file:
        if Stamp.of(file.fileno()) != stamp:
            raise changed(shown)
        out = {}
        for i in sorted(set(indices)):
            file.seek(offsets[i])
            raw = file.read(offsets[i + 1] - offsets[i])
            out[i] = raw[:-1] if raw.endswith(b"\n") else raw
    return out
