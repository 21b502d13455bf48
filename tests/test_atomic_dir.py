"""fxconvert.atomic_dir: the one protocol behind a conversion's output, a checkpoint and run/hf.

The writers' own tests (test_destination.py, test_checkpoint.py, test_export.py) cover each one's
names and messages; these cover the helper's promises: marked from the start, never over what
appeared, the replaced directory marked before it is moved, and a cleanup that removes only
marked real directories.
"""

import errno
import os
import re

import pytest

from fxconvert import atomic_dir


@pytest.fixture(params=["renameat2", "two-renames"])
def renames(request, monkeypatch):
    if request.param == "two-renames":
        monkeypatch.setattr(atomic_dir, "_renameat2", lambda src, dst, flags: False)
    return request.param


def test_a_temporary_is_marked_from_the_start(tmp_path):
    tmp = atomic_dir.make_temp(tmp_path, ".out.", ".tmp", files=["a"])
    assert re.fullmatch(r"\.out\.[0-9a-f]{8}\.tmp", tmp.name) and os.listdir(tmp) == [atomic_dir.MARKER]
    record = atomic_dir.read_marker(tmp)
    assert record["files"] == ["a"] and record["pid"] == os.getpid() and record["run"] == atomic_dir.RUN


def test_a_named_temporary_never_takes_a_name_in_use(tmp_path, renames):
    (tmp_path / ".hf.tmp").mkdir()
    with pytest.raises(FileExistsError):
        atomic_dir.make_named_temp(tmp_path / ".hf.tmp")
    assert sorted(os.listdir(tmp_path)) == [".hf.tmp"] and os.listdir(tmp_path / ".hf.tmp") == []
    made = atomic_dir.make_named_temp(tmp_path / ".hf2.tmp")
    assert atomic_dir.is_marked(made) and sorted(os.listdir(tmp_path)) == [".hf.tmp", ".hf2.tmp"]


def test_put_in_place_never_over_what_appeared(tmp_path, renames):
    tmp = atomic_dir.make_temp(tmp_path, ".out.", ".tmp")
    (tmp_path / "out").mkdir()
    with pytest.raises(OSError) as e:
        atomic_dir.put_in_place(tmp, tmp_path / "out")
    assert e.value.errno == errno.EEXIST
    assert os.listdir(tmp_path / "out") == [] and atomic_dir.is_marked(tmp)


def test_replacing_marks_the_old_directory_before_it_moves(tmp_path, renames):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    tmp = atomic_dir.make_temp(tmp_path, ".out.", ".tmp")
    (tmp / "new.txt").write_text("new")
    old = atomic_dir.put_in_place(tmp, out, replace=True)
    assert sorted(os.listdir(out)) == [atomic_dir.MARKER, "new.txt"]
    assert atomic_dir.is_marked(old) and (old / "old.txt").read_text() == "old"  # a kill now leaves it cleanable
    assert atomic_dir.remove_old(old) is None and sorted(os.listdir(tmp_path)) == ["out"]


def test_a_failed_swap_puts_the_old_directory_back_unmarked(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic_dir, "_renameat2", lambda src, dst, flags: False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    tmp = atomic_dir.make_temp(tmp_path, ".out.", ".tmp")
    real_rename = os.rename

    def rename(src, dst):
        if src == tmp:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="No space left"):
        atomic_dir.put_in_place(tmp, out, replace=True, aside=tmp_path / ".out.old")
    assert os.listdir(out) == ["old.txt"] and sorted(os.listdir(tmp_path)) == [tmp.name, "out"]


def test_commit_can_drop_the_marker(tmp_path):
    tmp = atomic_dir.make_temp(tmp_path, ".step_1.tmp.")
    (tmp / "COMPLETE").write_text("")
    assert atomic_dir.commit(tmp, tmp_path / "step_1", keep_marker=False) is None
    assert os.listdir(tmp_path / "step_1") == ["COMPLETE"]


def test_cleanup_removes_only_marked_real_directories(tmp_path):
    names = re.compile(r"\.out\.[0-9a-z]{8}\.tmp")
    precious = tmp_path / "precious"
    precious.mkdir()
    atomic_dir.mark(precious)  # a marker behind a symlink is not followed
    killed = atomic_dir.make_temp(tmp_path, ".out.", ".tmp")
    (killed / "model.py").write_text("partial")
    (tmp_path / ".out.aaaaaaaa.tmp").mkdir()  # a user's, of that name, without the marker
    (tmp_path / ".out.bbbbbbbb.tmp").symlink_to(precious)
    (tmp_path / ".out.cccccccc.tmp").write_text("a user's file")
    kept = atomic_dir.make_temp(tmp_path, ".out.", ".tmp", keep=True)
    (tmp_path / ".out.dddddddd.tmp").mkdir()
    (tmp_path / ".out.dddddddd.tmp" / atomic_dir.MARKER).write_text("fxconvert\n")  # not fxconvert's record
    removed = atomic_dir.remove_leftovers(tmp_path, names, keep=lambda path, record: record.get("keep", False))
    assert removed == [killed]
    assert sorted(os.listdir(tmp_path)) == sorted([".out.aaaaaaaa.tmp", ".out.bbbbbbbb.tmp", ".out.cccccccc.tmp",
                                                   ".out.dddddddd.tmp", kept.name, "precious"])
    assert os.listdir(precious) == [atomic_dir.MARKER]
