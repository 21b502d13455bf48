"""One line per rank, whoever launches: `python -m fxconvert.train --nproc-per-node P` and torchrun.

- A user error (a launch of the wrong size, a bad data line, an --out in the way) is one line
  (one per machine: every rank finds the same), no Python traceback; exit 2 under
  --nproc-per-node, where the launch's own checks run before any rank starts.
- Ctrl-C (SIGINT to the launcher's process group, as a terminal sends it) in the middle of a step
  (one rank held before its gradient sync, the others waiting for it inside a collective) and
  during a checkpoint write (rank 0 held with COMPLETE written in the temporary directory, the
  others in the last barrier), on 2 and 4 ranks: each rank says `interrupted` once and exits 130
  (the launcher too under --nproc-per-node), and the checkpoint being written does not appear.
- kill -9 of one rank: every other rank says one line naming it; the launcher adds the killed
  rank's line (exit 1).

Under torchrun, torchrun's own report (a `ChildFailedError` or `SignalException` traceback from
torch/distributed/run.py) follows the ranks' lines; no frame of fxconvert's (or a stage file's)
may appear in it. Every wait is on a file or a process exit.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import train_runs as tr
from fxconvert.train import main
from fxconvert.training import launcher
from fxconvert.training.checkpoint import COMPLETE, latest_checkpoint

STEPS, TIMEOUT = 8, 20
HANG_GUARD = TIMEOUT + 240  # torchrun gives its workers 30 s between SIGTERM and SIGKILL; a loaded machine more
HOOKED = Path(__file__).with_name("train_hooked.py")
OURS = re.compile(r'File "[^"]*(?:[/\\]fxconvert[/\\]|train_hooked\.py|[/\\]stage_\d+\.py)')
ERROR = "fxconvert.train: error: "

ranks = pytest.mark.xdist_group("ranks")  # one launch at a time (tests/conftest.py)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-launcher")
    tr.write_checkpoint(root / "ckpt")
    tr.write_jsonl(root / "train.jsonl")
    for stages in (2, 4):
        proc = subprocess.run([sys.executable, "-m", "fxconvert", str(root / "ckpt"), "--stages", str(stages), "--out",
                               str(root / f"conv{stages}"), "--no-validate", "-q"], cwd=tr.REPO, env=tr.env(),
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    return root


def _args(root, out, nproc, *extra):
    return [root / f"conv{nproc}", "--data", root / "train.jsonl", "--out", out, "--steps", STEPS, "--batch", 4,
            "--microbatches", nproc, "--schedule", "1f1b", "--optimizer", "adamw", "--lr", 1e-2, "--save-every", 2,
            "--timeout", TIMEOUT, *extra]


def _command(launcher: str, nproc: int, args) -> list[str]:
    """`launcher` starting `nproc` ranks of `tests/train_hooked.py` (fxconvert.train, faults from HOOK_*)."""
    if launcher == "torchrun":
        return tr.hooked_command(nproc, *args)
    return [sys.executable, str(HOOKED), "--nproc-per-node", str(nproc), *map(str, args)]


def _errors(err: str) -> list[str]:
    return sorted(line for line in err.splitlines() if line.startswith(ERROR))


def _no_traceback_of_ours(launcher: str, err: str) -> None:
    if launcher == "nproc":
        assert "Traceback" not in err, err[-3000:]
    assert not OURS.search(err), err[-3000:]
    assert not [line for line in err.splitlines() if ERROR in line and not line.startswith(ERROR)], err[-3000:]


def _stop_pids(pid_dir) -> None:
    for path in Path(pid_dir).glob("*.pid"):
        try:
            os.kill(int(path.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass


# -- user errors ----------------------------------------------------------------------------------


def _bad_data(root, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text((root / "train.jsonl").read_text() + "not json\n")
    lines = len(data.read_text().splitlines())
    return 2, {"--data": data}, f"{ERROR}{data}:{lines}: invalid JSON"


def _out_in_the_way(root, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    return 2, {}, f"{ERROR}--out {out} exists and is not empty; pass --resume to continue it, or choose another --out"


def _wrong_size(root, tmp_path):
    return 3, {}, f"{ERROR}{root / 'conv2'} has 2 stages, but 3 processes with --dp 1"


@ranks
@pytest.mark.parametrize("launcher", ["nproc", "torchrun"])
@pytest.mark.parametrize("error", [_bad_data, _out_in_the_way, _wrong_size], ids=["data", "out", "size"])
def test_a_user_error_is_one_line_and_no_traceback(setup, tmp_path, launcher, error):
    nproc, changes, expected = error(setup, tmp_path)
    args = _args(setup, tmp_path / "run", 2)
    for option, value in changes.items():
        args[args.index(option) + 1] = value
    env = tr.env()
    env.update(HOOK_PID_DIR=str(tmp_path), HOOK_EXIT_DIR=str(tmp_path))
    try:
        proc = subprocess.run(_command(launcher, nproc, args), cwd=tr.REPO, env=env, capture_output=True, text=True,
                              timeout=HANG_GUARD)
    finally:
        _stop_pids(tmp_path)
    lines = _errors(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith(expected), proc.stderr[-3000:]
    _no_traceback_of_ours(launcher, proc.stderr)
    assert proc.returncode == 2 if launcher == "nproc" else proc.returncode != 0
    if launcher == "nproc" and error is _wrong_size:  # refused by the launch's own checks: no rank started
        assert not list(tmp_path.glob("*.pid")) and (tmp_path / "launcher.exit").read_text() == "2"
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_nproc_per_node_is_refused_where_it_cannot_launch(setup, tmp_path, monkeypatch, capsys):
    """Refused before anything starts, in one line (exit 2): under torchrun, and a count under 1."""
    argv = [str(a) for a in _args(setup, tmp_path / "run", 2)]
    assert main([*argv, "--nproc-per-node", "0"]) == 2
    assert capsys.readouterr().err == f"{ERROR}--nproc-per-node must be at least 1, got 0\n"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "elsewhere")
    assert main([*argv, "--nproc-per-node", "2"]) == 2
    assert capsys.readouterr().err.startswith(f"{ERROR}--nproc-per-node starts the ranks itself, but this process is "
                                              f"already one of torchrun's")
    assert not (tmp_path / "run").exists()


# `python -m fxconvert.train ARGS`, with SIGINT sent to itself the moment it starts importing torch
_INTERRUPTED_IN_IMPORT = """
import os, runpy, signal, sys

class InterruptTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, InterruptTorch())
sys.argv = ["fxconvert.train", *sys.argv[1:]]
runpy.run_module("fxconvert.train", run_name="__main__", alter_sys=True)
"""


def test_ctrl_c_while_torch_loads_is_held_until_the_run_reports_it(setup, tmp_path):
    """A Ctrl-C that lands while the entry point imports torch (seconds, before the run's handlers exist) ended
    each rank with a KeyboardInterrupt traceback through the imports; it is held, and the run stops at once with
    one line and exit 130, having touched nothing."""
    env = {k: v for k, v in tr.env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-c", _INTERRUPTED_IN_IMPORT,
                           *map(str, _args(setup, tmp_path / "run", 2))], cwd=tr.REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.stderr == f"{ERROR}interrupted\n" and proc.returncode == 130, proc.stderr[-3000:]
    assert not (tmp_path / "run").exists()


# -- Ctrl-C and a killed rank ---------------------------------------------------------------------


def _held_run(launcher: str, nproc: int, root, tmp_path, *, hold: dict, held_rank: int):
    """Start a run whose `held_rank` waits where `hold` says; return (process, out) once it waits there."""
    out = tmp_path / "out"
    env = tr.env()
    env.update(HOOK_PID_DIR=str(tmp_path), HOOK_EXIT_DIR=str(tmp_path), HOOK_PAUSE_UNTIL=str(tmp_path / "release"),
               HOOK_PAUSE_RANK=str(held_rank), **hold)
    proc = subprocess.Popen(_command(launcher, nproc, _args(root, out, nproc)), cwd=tr.REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    while not ((tmp_path / f"{held_rank}.paused").exists() and len(list(tmp_path.glob("*.pid"))) == nproc):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    return proc, out


def _finish(proc, tmp_path) -> str:
    try:
        _, err = proc.communicate(timeout=HANG_GUARD)
    finally:
        (tmp_path / "release").touch()
        if proc.poll() is None:
            proc.kill()
        _stop_pids(tmp_path)
    return err


MID_STEP = {"HOOK_PAUSE_AT_SYNC": "3"}  # after step 2's checkpoint
IN_SAVE = {"HOOK_PAUSE_IN_SAVE": "4"}  # step 4's checkpoint, with step 2's complete


@ranks
@pytest.mark.parametrize("launcher, nproc, where", [
    ("nproc", 2, "step"), ("nproc", 4, "step"), ("nproc", 2, "save"), ("nproc", 4, "save"),
    ("torchrun", 4, "step"), ("torchrun", 2, "save")])
def test_ctrl_c_is_one_line_per_rank_and_exit_130(setup, tmp_path, launcher, nproc, where):
    hold, held_rank = (MID_STEP, nproc - 1) if where == "step" else (IN_SAVE, 0)
    proc, out = _held_run(launcher, nproc, setup, tmp_path, hold=hold, held_rank=held_rank)
    os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: the launcher's group (the ranks have their own)
    err = _finish(proc, tmp_path)
    assert _errors(err) == [f"{ERROR}rank {r} (stage {r}, replica 0): interrupted" for r in range(nproc)], err[-3000:]
    _no_traceback_of_ours(launcher, err)
    assert {r: (tmp_path / f"{r}.exit").read_text() for r in range(nproc)} == {r: "130" for r in range(nproc)}
    if launcher == "nproc":
        assert proc.returncode == 130
    steps = sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith("."))
    assert steps == ["step_2"] and latest_checkpoint(out) == out / "checkpoints" / "step_2"
    assert (out / "checkpoints" / "step_2" / COMPLETE).is_file()
    assert not (out / "checkpoints" / ".step_4.tmp").exists()  # the interrupted write, COMPLETE and all, is gone
    assert not (out / "hf").exists()


@ranks
def test_a_killed_rank_is_named_by_every_other_rank(setup, tmp_path):
    """kill -9 of rank 1 of 4 while the others wait for it in a collective: ranks 0, 2 and 3 each say one line
    naming rank 1, the launcher says what killed it, exit 1."""
    proc, out = _held_run("nproc", 4, setup, tmp_path, hold=MID_STEP, held_rank=1)
    os.kill(int((tmp_path / "1.pid").read_text()), signal.SIGKILL)
    err = _finish(proc, tmp_path)
    killed = f"{ERROR}rank 1 was killed by SIGKILL (by hand, or out of memory); --resume continues from the last " \
             f"checkpoint"
    lines = _errors(err)
    assert killed in lines, err[-3000:]
    lines.remove(killed)
    for line, rank in zip(lines, (0, 2, 3), strict=True):
        assert line.startswith(f"{ERROR}rank {rank} (stage {rank}, replica 0): rank 1 (stage 1, replica 0) failed: "
                               f"stopped responding"), err[-3000:]
    _no_traceback_of_ours("nproc", err)
    assert proc.returncode == 1
    assert latest_checkpoint(out).name == "step_2" and not (out / "hf").exists()


@pytest.mark.parametrize("count", [10**9, 1025])
def test_a_huge_nproc_per_node_is_refused_before_any_process_starts(tmp_path, monkeypatch, capsys, count):
    """A checkpoint that is converted as the ranks start has no stage count to check the launch against, and
    gpipe takes fewer microbatches than stages: no other check stops --nproc-per-node 1000000000 from starting
    (or trying to) a billion processes. Refused in one line, exit 2, and the launcher is never called."""
    tr.write_checkpoint(tmp_path / "ckpt")
    tr.write_jsonl(tmp_path / "train.jsonl")
    started = []
    monkeypatch.setattr(launcher, "_run", lambda *a: started.append(a) or 0)
    argv = [tmp_path / "ckpt", "--data", tmp_path / "train.jsonl", "--out", tmp_path / "run", "--batch", 4,
            "--microbatches", 1, "--schedule", "gpipe", "--nproc-per-node", count]
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    assert capsys.readouterr().err == (f"{ERROR}--nproc-per-node must be at most {launcher.MAX_NPROC} (the ranks of "
                                       f"one machine; torchrun starts more over several machines), got {count}\n")
    assert started == [] and not (tmp_path / "run").exists()


@pytest.mark.parametrize("number", [signal.SIGKILL, signal.SIGRTMIN + 6])
def test_a_rank_killed_by_any_signal_gets_one_line(capsys, number):
    """A rank killed by a real-time signal (SIGRTMIN+1 .. SIGRTMAX-1 are no member of Python's signal.Signals) is
    named like any other: one line, exit 1, not a ValueError traceback from the launcher."""
    assert launcher._failed({0: -signal.SIGTERM, 1: -number}) == 1
    name = signal.Signals(number).name if number == signal.SIGKILL else f"signal {number}"
    assert capsys.readouterr().err == (f"{ERROR}rank 1 was killed by {name} (by hand, or out of memory); --resume "
                                       f"continues from the last checkpoint\n")
