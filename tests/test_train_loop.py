"""The step loop's learning-rate schedules, gradient accumulation, --epochs and grad_norm, against eager transformers.

Each run trains a one-stage conversion of a tiny T5 (dropout 0) in a world of one, in this
process (`python -m fxconvert.train` without a launcher), with AdamW. The eager reference
is T5ForConditionalGeneration with transformers' own schedule functions
(`get_linear_schedule_with_warmup`, `get_cosine_with_min_lr_schedule_with_warmup`): losses,
exported weights and gradient norms within 1e-5, and the `lr` of each metrics line equal to
the rate eager's optimizer held at that step. Runs are made once per module (`runs`).
"""

import contextlib
import io
import shutil

import pytest
import torch
import transformers

import train_runs as tr
from fxconvert.errors import UsageError
from fxconvert.train import main
from fxconvert.training.config import Launch, check_options
from fxconvert.training.options import parse

STEPS, BATCH, MICRO, LR, TOL = 5, 4, 2, 1e-2, 1e-5
LINEAR = ["--lr-schedule", "linear", "--warmup-steps", 3, "--steps", STEPS, "--save-every", 2]
RUNS = {
    "linear": LINEAR,
    "cosine": ["--lr-schedule", "cosine", "--warmup-ratio", 0.2, "--min-lr", 1e-3, "--steps", STEPS],
    # 2 epochs of 24 lines, 2 batches of 4 per step: 6 steps, equal to batches of 8 (microbatches of 2 rows in both)
    "accum": ["--epochs", 2, "--grad-accum", 2],
    "batch8": ["--steps", 6, "--batch", 8, "--microbatches", 4],
}


def _world_of_one(monkeypatch) -> None:
    for name in ("RANK", "LOCAL_RANK"):
        monkeypatch.setenv(name, "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    for name in ("MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)


def _argv(root, out, *options) -> list[str]:
    return [str(a) for a in [root / "conv1", "--data", root / "train.jsonl", "--out", out, "--batch", BATCH,
                             "--microbatches", MICRO, "--schedule", "gpipe", "--optimizer", "adamw", "--lr", LR,
                             *options]]


def _train(monkeypatch, root, out, *options) -> str:
    """`python -m fxconvert.train` in a world of one, here; returns its stderr."""
    _world_of_one(monkeypatch)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(_argv(root, out, *options))
    assert code == 0, err.getvalue()[-3000:]
    return err.getvalue()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from fxconvert.cli import main as convert_main

    root = tmp_path_factory.mktemp("train-loop")
    tr.write_checkpoint(root / "ckpt")
    rows = tr.write_jsonl(root / "train.jsonl", n=24)
    assert convert_main([str(root / "ckpt"), "--stages", "1", "--out", str(root / "conv1"), "-q", "--no-validate"]) == 0
    return root, rows


@pytest.fixture(scope="module")
def runs(setup):
    """name -> (run directory, stderr), each trained once, when a test first asks for it."""
    root, _ = setup
    cache = {}

    def get(name):
        if name not in cache:
            with pytest.MonkeyPatch.context() as monkeypatch:
                out = root / f"run-{name}"
                cache[name] = out, _train(monkeypatch, root, out, *RUNS[name])
        return cache[name]

    return get


def _eager(setup, scheduler=None, **kwargs):
    root, rows = setup
    seen = []
    options = dict(steps=STEPS, batch=BATCH, microbatches=MICRO, lr=LR, optimizer="adamw") | kwargs
    losses, weights = tr.train_eager(root / "ckpt", rows, scheduler=scheduler, seen=seen, **options)
    return losses, weights, seen


def _assert_equal_to_eager(out, losses, weights, seen, tol=TOL):
    got = tr.metrics(out)
    assert [m["step"] for m in got] == list(range(1, len(losses) + 1))
    assert max(abs(m["loss"] - x) for m, x in zip(got, losses, strict=True)) <= tol, ([m["loss"] for m in got], losses)
    assert [m["lr"] for m in got] == pytest.approx([s["lr"] for s in seen], rel=1e-12, abs=0)
    assert [m["grad_norm"] for m in got] == pytest.approx([s["grad_norm"] for s in seen], rel=tol, abs=tol)
    assert tr.max_weight_diff(tr.weights_of(out / "hf"), weights) <= tol


def test_linear_warmup_and_decay_equal_transformers(setup, runs):
    out, _ = runs("linear")
    losses, weights, seen = _eager(setup, lambda o: transformers.get_linear_schedule_with_warmup(o, 3, STEPS))
    assert [s["lr"] for s in seen] == pytest.approx([0.0, LR / 3, 2 * LR / 3, LR, LR / 2])  # warmup, then decay
    _assert_equal_to_eager(out, losses, weights, seen)
    _, constant, _ = _eager(setup)
    assert tr.max_weight_diff(weights, constant) > 1e-3  # a constant rate would not pass


def test_cosine_with_min_lr_and_warmup_ratio_equals_transformers(setup, runs):
    out, _ = runs("cosine")
    losses, weights, seen = _eager(setup, lambda o: transformers.get_cosine_with_min_lr_schedule_with_warmup(
        o, 1, STEPS, min_lr=1e-3))  # --warmup-ratio 0.2 of 5 steps: 1
    assert seen[-1]["lr"] > 1e-3 and seen[1]["lr"] == LR
    _assert_equal_to_eager(out, losses, weights, seen)


def test_grad_accum_equals_one_batch_k_times_as_big(setup, runs):
    """--batch 4 --grad-accum 2 is --batch 8 in one step: eager's (1e-5), and the pipeline's own run (1e-6)."""
    out, err = runs("accum")
    losses, weights, seen = _eager(setup, steps=6, batch=8, microbatches=4)
    _assert_equal_to_eager(out, losses, weights, seen)
    big, _ = runs("batch8")
    a, b = tr.metrics(out), tr.metrics(big)
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b, strict=True)) <= 1e-6
    assert max(abs(x["grad_norm"] - y["grad_norm"]) for x, y in zip(a, b, strict=True)) <= 1e-6
    assert tr.max_weight_diff(tr.weights_of(out / "hf"), tr.weights_of(big / "hf")) <= 1e-6
    # tokens/s counts both batches of a step: the same tokens as the batch of 8
    assert [x["tokens_per_s"] * x["seconds"] for x in a] == pytest.approx([y["tokens_per_s"] * y["seconds"] for y in b])


def test_epochs_train_through_the_file_and_say_so(runs):
    """--epochs 2 of 24 lines at 8 examples a step: 6 steps, a line when each epoch is done."""
    out, err = runs("accum")
    assert len(tr.metrics(out)) == 6
    lines = [line for line in err.splitlines() if line.startswith("epoch ")]
    assert lines == ["epoch 1/2 done at step 3/6", "epoch 2/2 done at step 6/6"]


def test_a_resume_in_the_middle_of_the_warmup_is_the_uninterrupted_run(setup, runs, tmp_path, monkeypatch, capsys):
    """The linear run resumed from its step-2 checkpoint (warmup 3): the same rates, losses and weights, bit for bit."""
    root, _ = setup
    whole, _ = runs("linear")
    out = tmp_path / "run"
    shutil.copytree(whole, out)
    for name in ("checkpoints/step_4", "checkpoints/step_5", "hf"):
        shutil.rmtree(out / name)
    _train(monkeypatch, root, out, *LINEAR, "--resume")
    def decided(run):  # what the step computed (not its timing)
        return [{k: m[k] for k in ("step", "loss", "lr", "grad_norm")} for m in tr.metrics(run)]

    assert decided(out) == decided(whole)
    assert tr.max_weight_diff(tr.weights_of(out / "hf"), tr.weights_of(whole / "hf")) == 0.0


def test_a_resume_with_another_lr_and_schedule_names_them_and_follows_them(setup, runs, tmp_path, monkeypatch):
    """The linear run resumed from step 2 with --lr 2e-2, cosine, 2 warmup steps and 6 steps: each change named in a
    line, and from step 3 on the new curve of the new rate: eager transformers switching from the linear
    schedule to the cosine one (both transformers' own) at step 2."""
    root, _ = setup
    whole, _ = runs("linear")
    out = tmp_path / "run"
    shutil.copytree(whole, out)
    for name in ("checkpoints/step_4", "checkpoints/step_5", "hf"):
        shutil.rmtree(out / name)
    err = _train(monkeypatch, root, out, *LINEAR, "--lr", 2e-2, "--lr-schedule", "cosine", "--warmup-steps", 2,
                 "--steps", STEPS + 1, "--resume")
    lines = err.splitlines()
    assert f"resuming from {out / 'checkpoints' / 'step_2'} (step 2 of {STEPS + 1})" in lines, err
    assert [line for line in lines if " changed from " in line] == [
        "--lr changed from 0.01 to 0.02 since the checkpoint",
        "--lr-schedule changed from linear to cosine since the checkpoint",
        "--warmup-steps changed from 3 to 2 since the checkpoint",
        f"--steps changed from {STEPS} to {STEPS + 1} since the checkpoint"]

    probe = torch.optim.SGD([torch.zeros(1)], lr=1.0)
    linear = transformers.get_linear_schedule_with_warmup(probe, 3, STEPS).lr_lambdas[0]
    cosine = transformers.get_cosine_schedule_with_warmup(probe, 2, STEPS + 1).lr_lambdas[0]
    switched = lambda o: torch.optim.lr_scheduler.LambdaLR(  # noqa: E731
        o, lambda s: linear(s) if s < 2 else 2e-2 / LR * cosine(s))
    losses, weights, seen = _eager(setup, switched, steps=STEPS + 1)
    assert [s["lr"] for s in seen][2:] == pytest.approx([2e-2 * cosine(s) for s in range(2, STEPS + 1)])
    _assert_equal_to_eager(out, losses, weights, seen)


HOSTILE = [
    (["--warmup-steps", "-1"], "--warmup-steps must be 0 or more, got -1"),
    (["--steps", "5", "--warmup-steps", "6"], "--warmup-steps 6 is more than the run's 5 steps"),
    (["--warmup-ratio", "nan"], "--warmup-ratio must be a number from 0 to 1"),
    (["--warmup-ratio", "1.5"], "--warmup-ratio must be a number from 0 to 1"),
    (["--warmup-ratio", "-0.1"], "--warmup-ratio must be a number from 0 to 1"),
    (["--warmup-steps", "1", "--warmup-ratio", "0.1"], "both set the warmup; give one"),
    (["--lr-schedule", "linear", "--min-lr=-1e-3"], "--min-lr must be a non-negative number, got -0.001"),
    (["--lr-schedule", "linear", "--min-lr", "inf"], "--min-lr must be a non-negative number, got inf"),
    (["--lr-schedule", "cosine", "--min-lr", "1"], "--min-lr 1 is above --lr 0.01"),
    (["--min-lr", "1e-3"], "--lr-schedule constant does not decay"),
    (["--grad-accum", "0"], "--grad-accum must be at least 1, got 0"),
    (["--grad-accum", "-2"], "--grad-accum must be at least 1, got -2"),
    (["--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["--epochs", "2", "--steps", "5"], "--epochs 2 and --steps 5 both say how long to train; give one"),
]


@pytest.mark.parametrize("options,message", HOSTILE, ids=[" ".join(map(str, o)) for o, _ in HOSTILE])
def test_hostile_schedule_options_are_one_line(options, message):
    argv = ["conv", "--data", "d.jsonl", "--out", "run", "--lr", "1e-2", *options]
    with pytest.raises(UsageError) as e:
        check_options(parse(argv), Launch(0, 1, 0))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_epochs_shorter_than_the_warmup_is_refused(setup, tmp_path, monkeypatch, capsys):
    """--epochs makes its steps from the data: a warmup above them is refused once the file is read."""
    root, _ = setup
    _world_of_one(monkeypatch)
    capsys.readouterr()
    assert main(_argv(root, tmp_path / "run", "--batch", 8, "--epochs", 1, "--warmup-steps", 4)) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--warmup-steps 4 is more than the run's 3 steps" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.xdist_group("ranks")  # a torchrun run (tests/conftest.py)
def test_grad_accum_with_dp_takes_the_batches_of_the_readme(setup):
    """--dp 2 --grad-accum 2: replica r takes batches (s*2 + j)*2 + r, so step s is global batches 4s .. 4s+3,
    eager's 4 batches of one step (each loss / 4), with AdamW and a linear schedule."""
    root, rows = setup
    out = root / "run-dp-accum"
    proc = tr.torchrun(2, root / "conv1", "--data", root / "train.jsonl", "--out", out, "--batch", 2,
                       "--microbatches", 1, "--dp", 2, "--grad-accum", 2, "--steps", 3, "--optimizer", "adamw",
                       "--lr", LR, "--lr-schedule", "linear", "--warmup-steps", 1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses, weights, seen = _eager(setup, lambda o: transformers.get_linear_schedule_with_warmup(o, 1, 3),
                                   steps=3, batch=2, microbatches=1, dp=4)
    _assert_equal_to_eager(out, losses, weights, seen)
