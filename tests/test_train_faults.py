"""Launches of `fxconvert.train` beyond one clean torchrun: two machines, a killed rank, --resume.

All runs train the same 2-stage conversion with AdamW (optimizer state matters for a resume)
for STEPS steps, checkpointing every 2, and are compared with one uninterrupted run:
- two torchrun invocations (`--nnodes 2`, c10d rendezvous on 127.0.0.1) give the same losses
  and the same RUN/hf bit for bit;
- a run whose rank 1 is SIGKILLed after a checkpoint fails on every rank with one line naming
  rank 1, leaves only complete checkpoints, and `--resume` gives the uninterrupted run's
  losses and RUN/hf bit for bit (float32 on CPU).
"""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import checkpoints
import train_runs as tr
from fxconvert.training.checkpoint import COMPLETE, latest_checkpoint
from fxconvert.training.run_lock import LOCK
from fxconvert.train import main
from fxconvert.training.faults import Signals

pytestmark = pytest.mark.xdist_group("ranks")  # torchrun runs: one at a time (tests/conftest.py)

STEPS, TIMEOUT = 30, 20
HANG_GUARD = TIMEOUT + 60  # torchrun gives its workers 30 s between SIGTERM and SIGKILL


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-faults")
    tr.write_checkpoint(root / "ckpt")
    tr.write_jsonl(root / "train.jsonl")
    proc = subprocess.run([sys.executable, "-m", "fxconvert", str(root / "ckpt"), "--stages", "2", "--out",
                           str(root / "conv"), "--no-validate", "-q"], cwd=tr.REPO, env=tr.env(), capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    return root


def _args(root, out, *extra):
    return [root / "conv", "--data", root / "train.jsonl", "--out", out, "--steps", STEPS, "--batch", 4,
            "--microbatches", 2, "--schedule", "1f1b", "--optimizer", "adamw", "--lr", 1e-2, "--save-every", 2,
            "--timeout", TIMEOUT, *extra]


@pytest.fixture(scope="module")
def reference(setup):
    out = setup / "uninterrupted"
    proc = tr.torchrun(2, *_args(setup, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _same_result(out, reference):
    assert [m["loss"] for m in tr.metrics(out)] == [m["loss"] for m in tr.metrics(reference)]
    assert [m["step"] for m in tr.metrics(out)] == list(range(1, STEPS + 1))
    a, b = tr.hf_files(out), tr.hf_files(reference)
    assert set(a) == set(b)
    assert all(a[k].equal(b[k]) for k in a)


def test_two_machines_give_the_result_of_one(setup, reference):
    out, port = setup / "two-nodes", tr.free_port()
    procs = []
    for node in (0, 1):
        extra = ["--nnodes", "2", "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint",
                 f"127.0.0.1:{port}", "--rdzv-id", "fxconvert-test", "--local-addr", "127.0.0.1"]
        command = tr.torchrun_command(1, *_args(setup, out), extra=extra)
        procs.append(subprocess.Popen(command, cwd=tr.REPO, env=tr.env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    _same_result(out, reference)


def _workers(launcher_pid) -> dict[int, int]:
    """RANK -> pid of torchrun's worker processes (read from their environment)."""
    found = {}
    children = subprocess.run(["pgrep", "-P", str(launcher_pid)], capture_output=True, text=True).stdout.split()
    for pid in children:
        try:
            environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        for item in environ:
            if item.startswith(b"RANK="):
                found[int(item[5:])] = int(pid)
    return found


def test_a_killed_rank_stops_the_run_and_resume_finishes_it(setup, reference, monkeypatch, capsys):
    out = setup / "killed"
    proc = subprocess.Popen(tr.torchrun_command(2, *_args(setup, out)), cwd=tr.REPO, env=tr.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not (out / "checkpoints" / "step_2" / COMPLETE).exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        os.kill(_workers(proc.pid)[1], signal.SIGKILL)
        _, err = proc.communicate(timeout=HANG_GUARD)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    lines = [line for line in err.splitlines() if line.startswith("fxconvert.train: error: ")]
    assert len(lines) == 1, err[-3000:]  # rank 0's line; rank 1 was killed and says nothing
    assert lines[0].startswith("fxconvert.train: error: rank 0 (stage 0, replica 0): rank 1 (stage 1, replica 0) "
                               "failed: stopped responding"), lines
    steps = [p for p in (out / "checkpoints").iterdir() if p.name.startswith("step_")]
    assert steps and all((p / COMPLETE).is_file() for p in steps)  # nothing that looks complete is half-written
    last = latest_checkpoint(out)
    assert int(last.name.removeprefix("step_")) < STEPS  # it was killed before the end
    assert not (out / "hf").exists()
    assert (out / LOCK).is_file()  # the killed run's lock file, which nobody holds, does not block a resume

    resumed = tr.torchrun(2, *_args(setup, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _same_result(out, reference)

    # a checkpoint past --steps is refused before anything is touched
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = [str(a) for a in _args(setup, out, "--resume")]
    argv[argv.index("--steps") + 1] = "4"
    before = checkpoints.leftovers(out)
    assert main(argv) == 2
    assert f"step_{STEPS} is step {STEPS}, past --steps 4" in capsys.readouterr().err
    assert checkpoints.leftovers(out) == before


def test_a_rank_that_raises_is_named_with_its_message(setup, tmp_path):
    """Stage 1's code raises: rank 1 prints its own line, rank 0 names rank 1 and its message."""
    conv = tmp_path / "conv"
    shutil.copytree(setup / "conv", conv)
    text = (conv / "stage_1.py").read_text()
    head = "class Stage(nn.Module):"
    assert text.count(head) == 1
    text = text.replace(head, "class Stage(nn.Module):\n    def __call__(self, *args, **kwargs):\n"
                              "        if kwargs['attention_mask'].shape[1] > 3:\n"
                              "            raise RuntimeError('stage 1 refuses inputs over 3 tokens')\n"
                              "        return super().__call__(*args, **kwargs)\n")
    (conv / "stage_1.py").write_text(text)
    proc = tr.torchrun(2, conv, *_args(setup, tmp_path / "run")[1:], timeout=HANG_GUARD + 60)
    assert proc.returncode != 0
    lines = sorted(line for line in proc.stderr.splitlines() if line.startswith("fxconvert.train: error: "))
    assert lines == [
        "fxconvert.train: error: rank 0 (stage 0, replica 0): rank 1 (stage 1, replica 0) failed: "
        + lines[0].split(" failed: ", 1)[1],
        "fxconvert.train: error: rank 1 (stage 1, replica 0): stage 1 refuses inputs over 3 tokens",
    ], proc.stderr[-3000:]
    assert lines[0].split(" failed: ", 1)[1].startswith("stage 1 refuses inputs over 3 tokens (here: ")
    assert not (tmp_path / "run" / "hf").exists()


def _stop_pids(pid_dir) -> None:
    """Teardown: a worker the test stopped (or that outlived its launcher) is killed, then continued.

    SIGKILL first: a stopped process dies of it at once. Continued first, the worker would act on
    the launcher's pending SIGTERM and print a line of its own before the kill lands."""
    for path in pid_dir.glob("*.pid"):
        pid = int(path.read_text())
        for sig in (signal.SIGKILL, signal.SIGCONT):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break


@pytest.fixture(scope="module")
def one_stage(setup):
    """The checkpoint converted into one stage, for two replicas of it (--dp 2)."""
    proc = subprocess.run([sys.executable, "-m", "fxconvert", str(setup / "ckpt"), "--stages", "1", "--out",
                           str(setup / "conv1"), "--no-validate", "-q"], cwd=tr.REPO, env=tr.env(),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return setup / "conv1"


@pytest.mark.parametrize("layout", ["tied", "dp"])
def test_a_stopped_rank_fails_the_run_after_timeout_not_half_an_hour(setup, one_stage, tmp_path, layout):
    """Rank 1 SIGSTOPs itself before its third gradient sync: rank 0 waits in the tied-weight
    all-reduce (2 stages) or the replica all-reduce (--dp 2), whose groups once had torch's
    30-minute default; with --timeout it fails with one line naming rank 1."""
    source, extra = (setup / "conv", []) if layout == "tied" else (one_stage, ["--dp", 2])
    args = _args(setup, tmp_path / "run", *extra)
    args[0] = source
    args[args.index("--save-every"):args.index("--save-every") + 2] = []
    exits = tmp_path / "exits"
    exits.mkdir()
    env = tr.env()
    env.update(HOOK_PID_DIR=str(tmp_path), HOOK_STOP_RANK="1", HOOK_STOP_AT_SYNC="3", HOOK_EXIT_DIR=str(exits))
    with open(tmp_path / "err", "w") as err_file:
        proc = subprocess.Popen(tr.hooked_command(2, *args), cwd=tr.REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=err_file, text=True)
    try:
        guard = time.monotonic() + 240  # torch's default group timeout would be 1800 s
        while proc.poll() is None and not (exits / "0.exit").exists() and time.monotonic() < guard:
            time.sleep(0.05)
        # Rank 0 has said its line and exited: the stopped rank 1 is killed now, as torchrun would do
        # 30 s after its SIGTERM (which a stopped process does not act on).
        _stop_pids(tmp_path)
        proc.wait(timeout=240)
    finally:
        proc.kill()
        _stop_pids(tmp_path)
    err = (tmp_path / "err").read_text()
    assert proc.returncode != 0
    lines = [line for line in err.splitlines() if line.startswith("fxconvert.train: error: ")]
    assert len(lines) == 1, err[-3000:]
    where = "stage 1, replica 0" if layout == "tied" else "stage 0, replica 1"
    assert lines[0].startswith(f"fxconvert.train: error: rank 0 (stage 0, replica 0): rank 1 ({where}) failed: "
                               f"stopped responding"), lines
    assert not (tmp_path / "run" / "hf").exists()


def test_a_second_run_into_a_busy_out_is_refused(setup, reference, tmp_path, monkeypatch, capsys):
    """While a run trains (held before step 3's gradient sync), a second run into its --out, new or
    --resume, stops in one line (exit 2) before touching anything; the first one ends as if alone."""
    out, release = setup / "busy", tmp_path / "release"
    env = tr.env()
    env.update(HOOK_PID_DIR=str(tmp_path), HOOK_PAUSE_AT_SYNC="3", HOOK_PAUSE_UNTIL=str(release))
    proc = subprocess.Popen(tr.hooked_command(2, *_args(setup, out)), cwd=tr.REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not (out / "checkpoints" / "step_2" / COMPLETE).exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("LOCAL_RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.delenv("MASTER_ADDR", raising=False)
        before = checkpoints.leftovers(out)
        for extra in ([], ["--resume"]):
            assert main([str(a) for a in _args(setup, out, *extra)]) == 2
            err = capsys.readouterr().err.strip()
            assert err == f"fxconvert.train: error: --out {out} is in use by another training run; wait for it to " \
                          f"end, or choose another --out", err
        assert checkpoints.leftovers(out) == before
        release.touch()
        _, err = proc.communicate(timeout=600)
    finally:
        release.touch()
        if proc.poll() is None:
            proc.kill()
        _stop_pids(tmp_path)
    assert proc.returncode == 0, err[-3000:]
    _same_result(out, reference)


def _gone(pid: int) -> bool:
    """Whether process `pid` has exited (a zombie left for its new parent to reap counts as exited)."""
    try:
        status = open(f"/proc/{pid}/status").read()
    except OSError:
        return True
    return "\nState:\tZ" in status


def test_workers_stop_when_torchrun_is_killed(setup, tmp_path):
    """SIGKILL of torchrun while its workers train: they stop (one quiet line each, no stack traces) and
    write nothing more: no later checkpoint, no RUN/hf."""
    out, release = tmp_path / "run", tmp_path / "release"
    env = tr.env()
    env.update(HOOK_PID_DIR=str(tmp_path), HOOK_PAUSE_AT_SYNC="3", HOOK_PAUSE_UNTIL=str(release))
    proc = subprocess.Popen(tr.hooked_command(2, *_args(setup, out)), cwd=tr.REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not ((out / "checkpoints" / "step_2" / COMPLETE).exists() and len(list(tmp_path.glob("*.pid"))) == 2):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        pids = [int(p.read_text()) for p in tmp_path.glob("*.pid")]
        proc.kill()
        proc.wait()
        release.touch()  # a worker that outlived its launcher would train on from here
        _, err = proc.communicate(timeout=HANG_GUARD)  # the workers hold torchrun's stderr until they exit
        deadline = time.monotonic() + HANG_GUARD
        while not all(_gone(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(_gone(pid) for pid in pids), err[-3000:]
    finally:
        release.touch()
        _stop_pids(tmp_path)
    assert not (out / "hf").exists()
    assert latest_checkpoint(out).name == "step_2"
    assert "Traceback" not in err and "frame #" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("step ", "saved checkpoint", "recompute ", "reading data: "))]
    assert sorted(lines) == [f"fxconvert.train: error: rank {rank} (stage {rank}, replica 0): {Signals.LAUNCHER_GONE}"
                             for rank in (0, 1)], err[-3000:]


def test_ctrl_c_to_the_whole_launch_is_one_line_per_rank(setup, tmp_path):
    """Ctrl-C reaches a worker more than once: from the terminal when it shares its process group (other
    launchers), then from torchrun, which forwards SIGINT (and SIGTERM when interrupted again while
    stopping them). Here each worker gets SIGINT, then torchrun's group gets SIGINT twice, three times
    over. The second signal used to land in the reporting of the first (a traceback in 2 of 5 tries).
    Each worker's own stderr (torchrun's --redirects; torchrun prints a traceback of its own on a second
    SIGINT) holds one line, no traceback, and it exits 130."""
    for attempt in range(3):
        run, release = tmp_path / str(attempt), tmp_path / str(attempt) / "release"
        run.mkdir()
        env = tr.env()
        env.update(HOOK_PID_DIR=str(run), HOOK_EXIT_DIR=str(run), HOOK_PAUSE_AT_SYNC="3",
                   HOOK_PAUSE_UNTIL=str(release))
        args = _args(setup, run / "out")
        command = tr.hooked_command(2, *args, extra=["--redirects", "2", "--log-dir", str(run / "logs")])
        proc = subprocess.Popen(command, cwd=tr.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        try:
            while not ((run / "out" / "checkpoints" / "step_2" / COMPLETE).exists()
                       and len(list(run.glob("*.pid"))) == 2):
                assert proc.poll() is None, proc.communicate()[1][-3000:]
                time.sleep(0.05)
            for pid in run.glob("*.pid"):
                os.kill(int(pid.read_text()), signal.SIGINT)
            os.killpg(proc.pid, signal.SIGINT)
            os.killpg(proc.pid, signal.SIGINT)
            proc.communicate(timeout=HANG_GUARD)
        finally:
            release.touch()
            if proc.poll() is None:
                proc.kill()
            _stop_pids(run)
        logs = sorted((run / "logs").rglob("stderr.log"), key=lambda p: p.parent.name)
        assert [p.parent.name for p in logs] == ["0", "1"]
        for rank, log in enumerate(logs):
            text = log.read_text()
            lines = [line for line in text.splitlines() if line.strip() and not line.startswith(("step ", "saved ", "recompute ", "reading data: "))]
            assert lines == [f"fxconvert.train: error: rank {rank} (stage {rank}, replica 0): interrupted"], text
            assert (run / f"{rank}.exit").read_text() == "130"
        assert not (run / "out" / "hf").exists()


def test_a_worker_whose_launcher_store_is_gone_stops_itself(monkeypatch, capfd):
    """A worker on another machine than torchrun's store (its own launcher alive): when the store goes,
    the heartbeat stops beating and sends its process SIGTERM, after one failed store call (torch logs
    each failed call with a C++ stack trace), not hundreds."""
    import threading
    from datetime import timedelta

    import torch.distributed as dist

    from fxconvert.training.heartbeat import Heartbeat, prefix

    port = tr.free_port()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    store = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=5))
    stopped = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    try:
        beat = Heartbeat(0, 2)
        deadline = time.monotonic() + 120
        while not dist.PrefixStore(prefix(), store).check(["beat/0"]):  # it beats
            assert time.monotonic() < deadline
            time.sleep(0.05)
        del store  # the launcher's store shuts down
        assert stopped.wait(120)
        assert beat.lost
        beat.thread.join(60)
        assert not beat.thread.is_alive()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert capfd.readouterr().err.count("TCPStore.cpp") <= 1


def _one_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("fxconvert.train: error: ")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def test_a_nan_gradient_stops_every_rank_before_the_update(setup, tmp_path):
    """Rank 1's gradient turns nan at step 3, after the step 2 checkpoint: the run stops at step 3 with
    one line, the step 2 checkpoint is the last, step 3 is not in the metrics, no RUN/hf."""
    out = tmp_path / "run"
    env = tr.env()
    env.update(HOOK_NAN_RANK="1", HOOK_NAN_AT_SYNC="3")
    proc = subprocess.run(tr.hooked_command(2, *_args(setup, out)), cwd=tr.REPO, env=env, capture_output=True,
                          text=True, timeout=HANG_GUARD + 240)
    assert proc.returncode != 0
    line = _one_error(proc.stderr)
    assert line.startswith("fxconvert.train: error: step 3: the gradient is not finite (nan or inf), so the run "
                           "stopped before any weight took it;"), line
    assert latest_checkpoint(out).name == "step_2"
    assert [m["step"] for m in tr.metrics(out)] == [1, 2]
    assert not (out / "hf").exists()


def test_nan_weights_stop_the_run_at_step_1(setup, tmp_path):
    """A checkpoint with a nan weight: the loss is nan at step 1; one line, exit 1, nothing saved."""
    import torch
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "ckpt"
    shutil.copytree(setup / "ckpt", ckpt)
    weights = load_file(str(ckpt / "model.safetensors"))
    name = next(k for k in sorted(weights) if k.startswith("encoder.block.0.") and k.endswith(".weight"))
    weights[name].view(-1)[0] = torch.nan
    save_file(weights, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    proc = subprocess.run([sys.executable, "-m", "fxconvert", str(ckpt), "--stages", "2", "--out", str(tmp_path / "conv"),
                           "--no-validate", "-q"], cwd=tr.REPO, env=tr.env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    args = _args(setup, tmp_path / "run")
    args[0] = tmp_path / "conv"
    proc = tr.torchrun(2, *args, timeout=HANG_GUARD + 240)
    assert proc.returncode != 0
    assert _one_error(proc.stderr).startswith("fxconvert.train: error: step 1: the loss and gradient are not finite")
    assert latest_checkpoint(tmp_path / "run") is None
    assert not (tmp_path / "run" / "hf").exists()


def test_a_rank_still_preparing_is_named_by_the_one_that_waited(setup, tmp_path):
    """Rank 0 is slow to prepare (a huge data file: here it waits after its checks); rank 1 waits for it
    in the rendezvous until --timeout and names rank 0, not itself."""
    args = _args(setup, tmp_path / "run")
    args[args.index("--timeout") + 1] = 5
    proc = _run_with_rank_0_slow(args, tmp_path)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("fxconvert.train: error: rank 1 ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("fxconvert.train: error: rank 1 (stage 1, replica 0): rank 0 (stage 0, replica 0) "
                               "failed: was still preparing (its checks, stages or data: raise --timeout"), lines
    # rank 0, stopped by torchrun while preparing, says only that, as before any process group
    assert [line for line in proc.stderr.splitlines() if line.startswith("fxconvert.train: error: ")
            and line not in lines] in ([], ["fxconvert.train: error: stopped by the launcher (another rank failed, "
                                            "or the run was interrupted)"]), proc.stderr[-3000:]


def _run_with_rank_0_slow(args, tmp_path, *, before_checks: bool = False) -> subprocess.CompletedProcess:
    """Two ranks of `args`, rank 0 held in its preparation (after its checks, or before them) for good."""
    env = tr.env()
    env.update(HOOK_PID_DIR=str(tmp_path), HOOK_SLOW_RANK="0", HOOK_SLOW_PREPARE_FILE=str(tmp_path / "never"),
               HOOK_SLOW_BEFORE_CHECKS="1" if before_checks else "0")
    try:
        return subprocess.run(tr.hooked_command(2, *args), cwd=tr.REPO, env=env, capture_output=True, text=True,
                              timeout=HANG_GUARD + 240)
    finally:
        _stop_pids(tmp_path)


def test_a_problem_one_rank_reports_before_training_is_one_line_however_slow_the_others(setup, tmp_path):
    """Rank 1 finds a bad data line while local rank 0 has not even started its checks (a loaded machine):
    rank 1 says it, and rank 0, stopped by the launcher meanwhile, stays quiet. The line used to go to
    local rank 0 after a 2-second grace, and a slower machine printed two lines."""
    data = tmp_path / "bad.jsonl"
    data.write_text((setup / "train.jsonl").read_text() + "not json\n")
    args = _args(setup, tmp_path / "run")
    args[args.index("--data") + 1] = data
    proc = _run_with_rank_0_slow(args, tmp_path, before_checks=True)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("fxconvert.train:")]
    assert len(lines) == 1 and lines[0].startswith(f"fxconvert.train: error: {data}:"), proc.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def test_a_swallowed_interrupt_still_ends_the_guarded_work():
    """Code inside the guarded work that catches every Exception (transformers and torch have such places)
    swallows the `Terminated` of a Ctrl-C: the guard raises it again when the work returns, and every
    later guard raises at once (one swallowed Ctrl-C used to disable Ctrl-C and SIGTERM for the run)."""
    from fxconvert.training.faults import Terminated

    signals, swallowed, ran = Signals(), [], []

    def work():
        try:
            os.kill(os.getpid(), signal.SIGINT)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:  # the handler raises in here
                time.sleep(0.01)
        except Exception as e:  # noqa: BLE001 - what the libraries do
            swallowed.append(e)
        return "trained on"

    try:
        with pytest.raises(Terminated, match="^interrupted$"):
            signals.guard(work)
        assert [type(e) for e in swallowed] == [Terminated]
        with pytest.raises(Terminated, match="^interrupted$"):
            signals.guard(lambda: ran.append(1))
        assert ran == []
    finally:
        signals.restore()


def test_a_failure_before_a_torchrun_restart_is_not_named_after_it(monkeypatch):
    """torchrun --max-restarts restarts the workers with the same store: what attempt 0 registered
    (rank 1 failed; every rank ready) must not be read in attempt 1, where rank 1 is not ready yet,
    then beats, and rank 0's own failure is its own."""
    from datetime import timedelta

    import torch.distributed as dist

    from fxconvert.training.heartbeat import Heartbeat

    port = tr.free_port()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    store = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=30))
    beats = []
    try:
        monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
        beats += [Heartbeat(0, 2), Heartbeat(1, 2)]
        beats[1].record_failure("an earlier attempt's failure")
        assert beats[0].culprit() == (1, "an earlier attempt's failure")
        for beat in beats:
            beat.stop()
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
        beats.append(Heartbeat(0, 2))
        late = beats[-1].culprit()
        assert late is not None and late[0] == 1 and late[1].startswith("was still preparing"), late
        beats.append(Heartbeat(1, 2))
        assert beats[-2].culprit() is None
    finally:
        for beat in beats:
            beat.stop()
            beat.thread.join(60)
        del store


def test_a_busy_out_is_one_line_however_many_ranks(setup, tmp_path):
    """Another run takes --out's lock while rank 0 prepares (after its check), and rank 1 already waits for
    rank 0 in the rendezvous: rank 0 refuses the busy --out in one line; rank 1, stopped by torchrun, says
    nothing (it used to blame rank 0 as "still preparing" and tell the user to raise --timeout)."""
    import fcntl
    from datetime import timedelta

    import torch.distributed as dist

    from fxconvert.training.heartbeat import prefix

    out, port, go = tmp_path / "run", tr.free_port(), tmp_path / "go"
    env = tr.env()
    env.update(HOOK_PID_DIR=str(tmp_path), HOOK_SLOW_RANK="0", HOOK_SLOW_PREPARE_FILE=str(go))
    proc = subprocess.Popen(tr.hooked_command(2, *_args(setup, out), port=port), cwd=tr.REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = None
    try:
        store = None
        while store is None:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            try:
                store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=5))
            except Exception:  # torchrun's store is not up yet
                time.sleep(0.1)
        while not dist.PrefixStore(prefix(), store).check(["ready/1"]):  # rank 1 waits for rank 0
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        out.mkdir(exist_ok=True)
        lock = os.open(out / LOCK, os.O_RDONLY | os.O_CREAT, 0o644)
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another run, started meanwhile
        go.touch()
        _, err = proc.communicate(timeout=HANG_GUARD + 240)
    finally:
        go.touch()
        if proc.poll() is None:
            proc.kill()
        if lock is not None:
            os.close(lock)
        _stop_pids(tmp_path)
    assert proc.returncode != 0
    assert "still preparing" not in err, err[-3000:]
    assert [line for line in err.splitlines() if line.startswith("fxconvert.train: error: ")] == [
        f"fxconvert.train: error: --out {out} is in use by another training run; wait for it to end, or choose "
        f"another --out"], err[-3000:]
