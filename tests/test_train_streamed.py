"""Streamed data under torchrun, on 3 stages: the first and last ranks read their batches' lines as they train, the
middle rank (its stage reads only the attention mask) never opens the file, the losses are eager transformers', and
a line appended to the file while the run is held between steps stops it at the next read, in one line.

One run (`tests/train_hooked.py`): held before step 3's gradient sync, a line is appended, and step 4's batch
read finds the file changed.
"""

import subprocess
import sys
import time

import pytest

import train_runs as tr

pytestmark = pytest.mark.xdist_group("ranks")  # torchrun runs: one at a time (tests/conftest.py)

STEPS, BATCH, MICROBATCHES, LR, TOL = 4, 4, 4, 0.5, 1e-5
WAIT = 600  # seconds: a loaded machine starts three ranks slowly; nothing here is timed


@pytest.fixture(scope="module")
def held_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("streamed")
    tr.write_checkpoint(root / "ckpt")
    rows = tr.write_jsonl(root / "train.jsonl")
    conv = root / "conv"
    proc = subprocess.run([sys.executable, "-m", "fxconvert", str(root / "ckpt"), "--stages", "3", "--out", str(conv),
                           "--no-validate", "-q"], cwd=tr.REPO, env=tr.env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for name in ("paused", "opens", "exits"):
        (root / name).mkdir()
    env = tr.env()
    env.update(HOOK_PAUSE_AT_SYNC="3", HOOK_PAUSE_UNTIL=str(root / "go"), HOOK_PAUSED_DIR=str(root / "paused"),
               HOOK_OPENS_DIR=str(root / "opens"), HOOK_EXIT_DIR=str(root / "exits"))
    command = tr.hooked_command(3, conv, "--data", root / "train.jsonl", "--out", root / "run", "--steps", STEPS,
                                "--batch", BATCH, "--microbatches", MICROBATCHES, "--schedule", "1f1b",
                                "--optimizer", "sgd", "--lr", LR)
    run = subprocess.Popen(command, cwd=tr.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + WAIT
        while len(list((root / "paused").iterdir())) < 3:
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()[1][-3000:]
            time.sleep(0.05)
        with open(root / "train.jsonl", "a") as f:  # every rank is held between steps 3's batch and step 4's
            f.write('{"input_ids": [5], "labels": [6]}\n')
        (root / "go").touch()
        _, err = run.communicate(timeout=WAIT)
    finally:
        (root / "go").touch()
        if run.poll() is None:
            run.kill()
            run.communicate()
    return root, rows, err


def test_a_file_changed_between_steps_stops_the_run_in_one_line(held_run):
    root, _, err = held_run
    frames = [line for line in err.splitlines() if line.strip().startswith("File ")]
    assert not [f for f in frames if "fxconvert" in f], err[-3000:]  # torchrun's own ChildFailedError aside
    data = root / "train.jsonl"
    said = f"{data} changed while the run was using it (its size or modification time is not what it was when it " \
           f"was read); put the original back and pass --resume, or train on a copy that stays unchanged"
    lines = [line for line in err.splitlines() if line.startswith("fxconvert.train: error: ")]
    assert len(lines) == 3 and all(said in line for line in lines), err[-3000:]  # one a rank
    assert any(line.startswith("fxconvert.train: error: rank 0 (stage 0, replica 0): ") or
               line.startswith("fxconvert.train: error: rank 2 (stage 2, replica 0): ") for line in lines), lines
    exits = {p.stem: p.read_text() for p in (root / "exits").iterdir()}
    assert exits.get("0") == "2" or exits.get("2") == "2", exits  # a usage problem: exit 2 where it was found
    assert not (root / "run" / "hf").exists()


def test_steps_before_the_change_equal_eager_transformers(held_run):
    root, rows, _ = held_run
    losses, _ = tr.train_eager(root / "ckpt", rows, steps=3, batch=BATCH, microbatches=MICROBATCHES, lr=LR)
    got = [m["loss"] for m in tr.metrics(root / "run") if "loss" in m]
    assert len(got) == 3 and max(abs(a - b) for a, b in zip(got, losses)) <= TOL, (got, losses)


def test_only_the_first_and_last_ranks_read_the_file_while_training(held_run):
    root, _, _ = held_run
    opens = {r: (root / "opens" / f"{r}.opens").read_text().splitlines() for r in range(3)}
    assert opens[1] == [], opens  # the middle stage reads the attention mask alone: lengths, no line
    assert len(opens[0]) == len(opens[2]) == STEPS, opens  # each step's batch, read when it is needed
