"""Where a save may write, and what it may delete: only what fxconvert itself wrote.

Hostile cases: a user's directory, the source checkpoint, a symlink, a directory that appears
while the write runs (another run), read-only leftovers, and the hidden directories of a run
that was killed.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from fxconvert import atomic_dir
from fxconvert import convert
from fxconvert.errors import UsageError
from fxconvert.report import build_report
from fxconvert.save import MARKER, MODEL_FILE, REPORT_JSON, REPORT_MD, WEIGHTS_FILE, SaveError, save

import helpers
from checkpoints import leftovers, write_checkpoint

REPO = Path(__file__).resolve().parent.parent
OUTPUT = sorted([MARKER, MODEL_FILE, WEIGHTS_FILE, REPORT_MD, REPORT_JSON])


@pytest.fixture(scope="module")
def conversion():
    return convert(helpers.build())


def write(conversion, out, **kwargs):
    return conversion.save(out, **kwargs)


def hidden(directory) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.startswith("."))


def test_force_replaces_only_a_directory_fxconvert_wrote(conversion, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    for force in (False, True):
        with pytest.raises(UsageError, match=r"mine is not empty and was not written by fxconvert \(it has no "
                                             r"\.fxconvert marker\); choose another output directory"):
            write(conversion, mine, force=force)
    assert leftovers(tmp_path) == ["mine", "mine/thesis.tex"]

    out = tmp_path / "out"
    write(conversion, out)
    assert sorted(os.listdir(out)) == OUTPUT
    with pytest.raises(UsageError, match=r"out already exists; pass force=True to replace it"):  # Python's spelling
        write(conversion, out)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match=r"holds files fxconvert did not write \(notes.txt\)"):
        write(conversion, out, force=True)
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    (out / "__pycache__").mkdir()  # what `import model` leaves: still fxconvert's to replace
    (out / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"")
    write(conversion, out, force=True)
    assert sorted(os.listdir(out)) == OUTPUT and hidden(tmp_path) == []


def test_force_replaces_with_two_renames_where_renameat2_is_missing(conversion, tmp_path, monkeypatch):
    monkeypatch.setattr(atomic_dir, "_renameat2", lambda src, dst, flags: False)
    out = tmp_path / "out"
    write(conversion, out)
    (out / REPORT_MD).write_text("old")
    write(conversion, out, force=True)
    assert sorted(os.listdir(out)) == OUTPUT and (out / REPORT_MD).read_text() != "old"
    assert hidden(tmp_path) == []


def test_the_source_checkpoint_or_a_directory_holding_it_is_never_the_destination(tmp_path):
    write_checkpoint(tmp_path / "models" / "ckpt")
    conversion = convert(tmp_path / "models" / "ckpt")
    for out in (tmp_path / "models" / "ckpt", tmp_path / "models", tmp_path):
        with pytest.raises(UsageError, match=rf"would replace the source {tmp_path / 'models' / 'ckpt'}"):
            write(conversion, out, force=True)
    assert sorted(os.listdir(tmp_path / "models" / "ckpt")) == ["config.json", "generation_config.json",
                                                                "model.safetensors"]
    write(conversion, tmp_path / "models" / "ckpt" / "converted")  # inside the source is fine
    assert sorted(os.listdir(tmp_path / "models" / "ckpt" / "converted")) == OUTPUT


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "two-renames"])
@pytest.mark.parametrize("existing", ["absent", "empty"])
def test_concurrent_saves_to_one_directory_one_wins(existing, renameat2, conversion, tmp_path, monkeypatch):
    """Both runs pass the check before either commits (a barrier); exactly one output lands, whole."""
    if not renameat2:
        monkeypatch.setattr(atomic_dir, "_renameat2", lambda src, dst, flags: False)
    out = tmp_path / "out"
    if existing == "empty":
        out.mkdir()
    barrier = threading.Barrier(2)
    results = [None, None]

    def run(i):
        def make_report():
            barrier.wait(timeout=120)
            return build_report(conversion)

        try:
            results[i] = save(conversion, out, make_report=make_report)
        except Exception as e:  # noqa: BLE001 - the outcome is the test's to check
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [r for r in results if not isinstance(r, Exception)]
    lost = [r for r in results if isinstance(r, Exception)]
    assert len(won) == 1 and len(lost) == 1, results
    assert isinstance(lost[0], SaveError) and "appeared while this run was writing it" in str(lost[0])
    assert sorted(os.listdir(out)) == OUTPUT and hidden(tmp_path) == []


class _Cycle:
    """Garbage with a finalizer: a collection that runs it can switch threads in the middle of a parse."""

    def __init__(self):
        self.me = self

    def __del__(self):
        sum(range(50))


def test_threads_saving_at_once_all_succeed(conversion, tmp_path):
    """Eight threads generate and save at once, with finalizers running mid-parse; every save lands whole.

    CPython 3.11 shares one AST recursion counter between threads; two unserialized parses
    failed here with SystemError "AST constructor recursion depth mismatch".
    """
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    barrier = threading.Barrier(8)
    results = [None] * 8

    def run(i):
        try:
            barrier.wait(timeout=120)
            for round_ in range(3):
                for _ in range(200):
                    _Cycle()
                results[i] = save(conversion, tmp_path / f"out{i}_{round_}")
        except Exception as e:  # noqa: BLE001 - the outcome is the test's to check
            results[i] = e

    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert [r for r in results if isinstance(r, Exception)] == []
    alone = (save(conversion, tmp_path / "alone").out_dir / MODEL_FILE).read_text()  # one thread, nothing beside it
    model_py = {(tmp_path / f"out{i}_2" / MODEL_FILE).read_text() for i in range(8)}
    assert model_py == {alone} and sorted(os.listdir(tmp_path / "out0_2")) == sorted([MARKER, MODEL_FILE, WEIGHTS_FILE])


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "two-renames"])
@pytest.mark.parametrize("appears", ["empty directory", "user's directory"])
def test_a_directory_that_appears_during_the_write_is_left_alone(appears, renameat2, conversion, tmp_path,
                                                                monkeypatch):
    if not renameat2:
        monkeypatch.setattr(atomic_dir, "_renameat2", lambda src, dst, flags: False)
    out = tmp_path / "out"

    def make_report():
        out.mkdir()
        if appears == "user's directory":
            (out / "data.csv").write_text("1,2")
        return build_report(conversion)

    with pytest.raises(SaveError, match="appeared while this run was writing it"):
        save(conversion, out, make_report=make_report)
    assert leftovers(tmp_path) == ["out"] + (["out/data.csv"] if appears == "user's directory" else [])


@pytest.mark.parametrize("target_exists", [False, True])
def test_a_symlinked_destination_writes_into_its_target(target_exists, conversion, tmp_path):
    target, link = tmp_path / "disk" / "target", tmp_path / "link"
    target.parent.mkdir()
    if target_exists:
        write(conversion, target)
    link.symlink_to(target, target_is_directory=True)
    saved = write(conversion, link, force=target_exists)
    assert link.is_symlink() and saved.out_dir == target
    assert sorted(os.listdir(target)) == OUTPUT
    assert hidden(tmp_path) == [] and hidden(target.parent) == []


def test_force_removes_an_old_output_with_a_read_only_subdirectory(conversion, shared_tmp):
    """As an ordinary user (root ignores permissions, so a root run drops to nobody in a child)."""
    base = shared_tmp
    write(conversion, shared_tmp / "warm-up")  # imports all a save needs: nobody cannot read /root's packages
    shutil.rmtree(shared_tmp / "warm-up")

    def scenario():
        out = base / "out"
        write(conversion, out)
        (out / "__pycache__").mkdir()
        (out / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"")
        os.chmod(out / "__pycache__", 0o555)
        write(conversion, out, force=True)
        return sorted(os.listdir(out)), hidden(base)

    assert as_unprivileged(scenario) == (OUTPUT, [])


@pytest.fixture
def shared_tmp():
    """A directory that any user may write (tmp_path's parents are private to the user running the tests)."""
    path = Path(tempfile.mkdtemp(prefix="fxconvert-test-"))
    os.chmod(path, 0o777)
    yield path
    shutil.rmtree(path)


def as_unprivileged(fn):
    """`fn()` as a user that permissions apply to: here, or as nobody in a forked child when running as root."""
    if os.geteuid() != 0:
        return fn()
    read, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            os.write(write_end, json.dumps(fn()).encode())
            code = 0
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            os.write(write_end, json.dumps({"error": repr(e)}).encode())
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read) as f:
        result = json.loads(f.read())
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, result
    return tuple(result)


def test_an_old_output_that_cannot_be_removed_is_reported_not_hidden(conversion, tmp_path, monkeypatch):
    out = tmp_path / "out"
    write(conversion, out)
    monkeypatch.setattr(atomic_dir, "rmtree", lambda path: (_ for _ in ()).throw(PermissionError(13, "denied")))
    saved = write(conversion, out, force=True)
    (left,) = hidden(tmp_path)
    assert saved.notes == [f"the previous output could not be removed from {tmp_path / left}: denied; remove it "
                           f"yourself"]
    assert sorted(os.listdir(out)) == OUTPUT


def test_removal_deletes_the_marker_last(conversion, tmp_path, monkeypatch):
    """A run killed while removing its own directory leaves one the next run still recognises."""
    out = tmp_path / "out"
    write(conversion, out)
    removed = []
    unlink = Path.unlink
    monkeypatch.setattr(Path, "unlink", lambda self, *args, **kwargs: (removed.append(self.name),
                                                                        unlink(self, *args, **kwargs)))
    atomic_dir.rmtree(out)
    assert not out.exists() and sorted(removed) == OUTPUT and removed[-1] == MARKER


# A run killed outright (SIGKILL) while writing: what it leaves is its hidden temporary directory.
KILLED_RUN = r"""
import os, signal, sys
sys.path.insert(0, sys.argv[2])
import helpers
import fxconvert.save
from fxconvert import convert

conversion = convert(helpers.build())
fxconvert.save.save_weights = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
conversion.save(sys.argv[1])
"""


def test_the_next_run_removes_what_a_killed_run_left_and_nothing_else(conversion, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, str(out), str(REPO / "tests")], env=env,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr
    (stale,) = hidden(tmp_path)
    assert stale.startswith(".out.") and stale.endswith(".tmp")
    assert sorted(os.listdir(tmp_path / stale)) == [MARKER, MODEL_FILE]
    # lookalikes that are not a dead run's: no marker; a file fxconvert did not write; a live writer
    (tmp_path / ".out.abcdefgh.tmp").mkdir()
    (tmp_path / ".out.abcdefgh.tmp" / "keep").write_text("")
    foreign = tmp_path / ".out.ijklmnop.old"
    foreign.mkdir()
    (foreign / MARKER).write_text((tmp_path / stale / MARKER).read_text())
    (foreign / "keep").write_text("")
    live = tmp_path / ".out.qrstuvwx.tmp"
    live.mkdir()
    record = json.loads((tmp_path / stale / MARKER).read_text())
    (live / MARKER).write_text(json.dumps({**record, "pid": os.getpid()}))
    write(conversion, out)
    assert hidden(tmp_path) == [".out.abcdefgh.tmp", ".out.ijklmnop.old", ".out.qrstuvwx.tmp"]
    assert sorted(os.listdir(out)) == OUTPUT
