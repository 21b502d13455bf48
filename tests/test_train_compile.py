"""`python -m fxconvert.train --compile`: compiled stages train as eager transformers does, and what cannot run
compiled stages is refused in one line before anything starts.

One launch: 2 ranks, 2 stages, gpipe, 2 steps of the tiny T5 (batches of different shapes, so
the second step compiles again), each stage `torch.compile(fullgraph=True)`; its losses and
weights against eager transformers' (`train_runs.train_eager`) at 1e-5, like the uncompiled
runs of tests/test_train_eager.py. Compiling takes most of the launch (about a minute on two
busy cores); the refusals run in this process, before any process group.
"""

import inspect

import pytest
from torch.distributed.pipelining import schedules as torch_schedules

import train_runs as tr
from fxconvert.train import main
from fxconvert.training import compiled

STEPS, BATCH, MICROBATCHES, LR = 2, 4, 2, 0.5


@pytest.fixture(scope="module")
def compiled_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile")
    tr.write_checkpoint(root / "ckpt")  # dropout 0
    rows = tr.write_jsonl(root / "train.jsonl")
    proc = tr.torchrun(2, root / "ckpt", "--data", root / "train.jsonl", "--out", root / "run", "--steps", STEPS,
                       "--batch", BATCH, "--microbatches", MICROBATCHES, "--schedule", "gpipe", "--optimizer", "sgd",
                       "--lr", LR, "--device", "cpu", "--compile")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, rows, proc


@pytest.mark.xdist_group("ranks")
def test_compiled_stages_train_as_eager_transformers(compiled_run):
    root, rows, _ = compiled_run
    want_losses, want_weights = tr.train_eager(root / "ckpt", rows, steps=STEPS, batch=BATCH,
                                               microbatches=MICROBATCHES, lr=LR)
    losses = [r["loss"] for r in tr.metrics(root / "run")]
    assert max(abs(a - b) for a, b in zip(losses, want_losses, strict=True)) < 1e-5, (losses, want_losses)
    assert tr.max_weight_diff(tr.weights_of(root / "run" / "hf"), want_weights) < 1e-5


@pytest.mark.xdist_group("ranks")
def test_the_steps_that_compiled_say_how_long_it_took(compiled_run):
    root, _, proc = compiled_run
    records = tr.metrics(root / "run")
    assert records[0]["compile_s"] > 0  # the first step compiles forward and backward of the last stage
    progress = [line for line in proc.stderr.splitlines() if line.startswith("step 1/")]
    assert len(progress) == 1 and f"(compiling {records[0]['compile_s']:.1f} s)" in progress[0], proc.stderr


def test_split_backward_is_what_torch_refuses_compiled_stages_in():
    """The schedules `compiled.check` refuses are exactly torch's that check for an OptimizedModule."""
    refusing = {name for name, cls in vars(torch_schedules).items()
                if inspect.isclass(cls) and issubclass(cls, torch_schedules._PipelineSchedule)
                and "_check_torch_compile_compatibility" in inspect.getsource(cls.__init__)}
    assert {torch_schedules.get_schedule_class(n).__name__ for n in compiled.SPLIT_BACKWARD} == refusing


def _fails(capsys, monkeypatch, argv):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("fxconvert.train: error: --compile cannot ")
    return err


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile-refused")
    tr.write_checkpoint(root / "ckpt")
    tr.write_jsonl(root / "train.jsonl")
    return root


def _argv(root, out, *extra):
    return [root / "ckpt", "--data", root / "train.jsonl", "--out", out, "--steps", 2, "--batch", 4, "--compile",
            *extra]


def test_compile_is_refused_with_a_schedule_that_splits_the_backward(source, tmp_path, capsys, monkeypatch):
    err = _fails(capsys, monkeypatch, _argv(source, tmp_path / "run", "--schedule", "zbv", "--virtual-stages", "2"))
    assert "--schedule zbv" in err and "drop --compile" in err
    assert not (tmp_path / "run").exists()


def test_compile_is_refused_with_full_recompute(source, tmp_path, capsys, monkeypatch):
    err = _fails(capsys, monkeypatch, _argv(source, tmp_path / "run", "--recompute", "full"))
    assert "--recompute full" in err and "--recompute none" in err
    assert not (tmp_path / "run").exists()

