"""`fxconvert.files.read_copyable` against a directory that changes between the check and the read.

Whoever controls a source checkpoint can swap its files while fxconvert copies them: the
bytes read must be those of the file that was checked, or the copy is refused; never a
file outside the directory.
"""

import os
from pathlib import Path

import pytest

from fxconvert.files import read_copyable

INSIDE, SECRET = b"the merges\n", b"the secret key\n"


@pytest.fixture
def layout(tmp_path):
    """ckpt/merges.txt -> ckpt/blob.txt (inside, allowed), and a secret outside ckpt."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "blob.txt").write_bytes(INSIDE)
    (ckpt / "merges.txt").symlink_to(ckpt / "blob.txt")
    (tmp_path / "secret").write_bytes(SECRET)
    return ckpt


def _after_first_resolve(monkeypatch, link: Path, swap):
    """Run `swap()` once, right after `link` is first resolved (the check looked at the file)."""
    real_resolve, done = Path.resolve, []

    def resolve(self, *args, **kwargs):
        result = real_resolve(self, *args, **kwargs)
        if self == link and not done:
            done.append(True)
            swap()
        return result

    monkeypatch.setattr(Path, "resolve", resolve)
    return done


def _repoint_link(ckpt):
    (ckpt / "merges.txt").unlink()
    (ckpt / "merges.txt").symlink_to(ckpt.parent / "secret")


def _blob_becomes_link(ckpt):
    (ckpt / "blob.txt").unlink()
    (ckpt / "blob.txt").symlink_to(ckpt.parent / "secret")


@pytest.mark.parametrize("swap", [_repoint_link, _blob_becomes_link])
def test_a_symlink_swapped_in_after_the_check_is_never_read(layout, monkeypatch, swap):
    done = _after_first_resolve(monkeypatch, layout / "merges.txt", lambda: swap(layout))
    try:
        data = read_copyable(layout / "merges.txt", [layout.resolve()])
    except ValueError as e:
        data = str(e)
    assert done, "the swap never ran"
    assert data != SECRET
    assert data in (INSIDE, "not a regular file", "replaced while it was read"), data


def test_a_file_replaced_between_the_check_and_the_open_is_refused(layout, monkeypatch):
    """What is opened must be the file that was checked (same device and inode)."""
    real_open, blob = os.open, (layout / "blob.txt").resolve()
    (layout / "other.txt").write_bytes(b"another file\n")

    def open_(path, *args, **kwargs):
        if Path(path) == blob:
            os.replace(layout / "other.txt", blob)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    with pytest.raises(ValueError, match="replaced while it was read"):
        read_copyable(layout / "merges.txt", [layout.resolve()])


def test_an_unchanged_file_is_read(layout):
    assert read_copyable(layout / "merges.txt", [layout.resolve()]) == INSIDE
