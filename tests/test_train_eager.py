"""`torchrun -m fxconvert.train` against eager transformers trained in one process.

A tiny T5 written by save_pretrained (dropout 0) and a pre-tokenized JSONL whose lines have
different lengths (every batch has its own shape). Each configuration trains with SGD and
must give eager T5ForConditionalGeneration's loss at every step within 1e-5 and, in
RUN/hf, its weights within 1e-5.

SOURCE is the checkpoint converted with `python -m fxconvert CKPT --stages N` (each rank
loads its stage file), except "2-gpipe-name", which gives the checkpoint directory itself
(converted and split on every rank). The matrix: 2, 3 and 4 stages with gpipe and 1f1b,
interleaved-1f1b, zb-interleaved and dualpipev on 2 ranks x 2 virtual stages, --dp 2 x 2 stages
(zbv: `test_zbv_resumed_with_recompute_equals_eager_transformers`). A launch takes about
25 s on 2 cores; 3- and 4-stage gpipe are marked slow (gpipe is covered at 2 stages, and
1f1b at 3 and 4 stages crosses the same boundaries).

With --dp 2 x 2 stages, Adafactor and clipped AdamW are compared with eager the same way, and
--zero (optimizer state sharded over the replicas) with the unsharded runs at 1e-6, through a
checkpoint and a resume: four runs, six launches of 4 processes in all, each made once (`dp_runs`).
"""

import json
import subprocess
import sys

import pytest
import torch

import train_runs as tr

pytestmark = pytest.mark.xdist_group("ranks")  # torchrun runs: one at a time (tests/conftest.py)

STEPS, BATCH, LR, TOL = 3, 4, 0.5, 1e-5

# id -> (processes, train options, microbatches, dp, SOURCE: stages of the conversion or "name")
CONFIGS = {
    "2-gpipe-name": (2, ["--schedule", "gpipe"], 2, 1, "name"),
    "2-1f1b": (2, ["--schedule", "1f1b"], 2, 1, 2),
    "3-gpipe": (3, ["--schedule", "gpipe"], 4, 1, 3),
    "3-1f1b": (3, ["--schedule", "1f1b"], 4, 1, 3),
    "4-gpipe": (4, ["--schedule", "gpipe"], 4, 1, 4),
    "4-1f1b": (4, ["--schedule", "1f1b"], 4, 1, 4),
    "2x2-interleaved": (2, ["--schedule", "interleaved-1f1b", "--virtual-stages", "2"], 4, 1, 4),
    "2x2-zb-interleaved": (2, ["--schedule", "zb-interleaved", "--virtual-stages", "2"], 4, 1, 4),
    "2x2-dualpipev": (2, ["--schedule", "dualpipev", "--virtual-stages", "2"], 4, 1, 4),
    "dp2x2-1f1b": (4, ["--schedule", "1f1b", "--dp", "2"], 2, 2, 2),
}
SLOW = {"3-gpipe", "4-gpipe"}


def convert(root, stages):
    out = root / f"conv-{stages}"
    if not out.exists():
        proc = subprocess.run([sys.executable, "-m", "fxconvert", str(root / "ckpt"), "--stages", str(stages), "--out",
                               str(out), "--no-validate", "-q"], cwd=tr.REPO, env=tr.env(), capture_output=True,
                              text=True)
        assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-eager")
    tr.write_checkpoint(root / "ckpt")
    rows = tr.write_jsonl(root / "train.jsonl")
    return root, rows


@pytest.fixture(scope="module")
def eager(setup):
    root, rows = setup
    cache = {}

    def get(microbatches, dp):
        if (microbatches, dp) not in cache:
            cache[microbatches, dp] = tr.train_eager(root / "ckpt", rows, steps=STEPS, batch=BATCH,
                                                     microbatches=microbatches, dp=dp, lr=LR)
        return cache[microbatches, dp]

    return get


def _train(root, name, nproc, options, microbatches, source=None):
    out = root / f"run-{name}"
    proc = tr.torchrun(nproc, source or root / "ckpt", "--data", root / "train.jsonl", "--out", out,
                       "--steps", STEPS, "--batch", BATCH, "--microbatches", microbatches, "--optimizer", "sgd",
                       "--lr", LR, *options)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in CONFIGS])
def test_pipeline_training_equals_eager_transformers(setup, eager, name):
    root, _ = setup
    nproc, options, microbatches, dp, stages = CONFIGS[name]
    source = root / "ckpt" if stages == "name" else convert(root, stages)
    out, _ = _train(root, name, nproc, options, microbatches, source=source)
    losses, weights = eager(microbatches, dp)
    got = [m["loss"] for m in tr.metrics(out)]
    assert [m["step"] for m in tr.metrics(out)] == [1, 2, 3]
    assert max(abs(a - b) for a, b in zip(got, losses, strict=True)) <= TOL, (got, losses)
    trained = tr.weights_of(out / "hf")
    assert tr.max_weight_diff(trained, weights) <= TOL
    initial = tr.weights_of(root / "ckpt")
    assert tr.max_weight_diff(initial, weights) > 1e-2  # the weights did move


def test_zbv_resumed_with_recompute_equals_eager_transformers(setup, eager):
    """zbv (2 ranks x 2 stages in a V: rank 0 holds stages 0 and 3, so T5's shared embedding is summed over
    three copies on two ranks) with every block recomputed, checkpointed at step 2 and resumed: eager's losses
    and weights. Its split backward differentiates recomputed blocks twice, once per half."""
    root, _ = setup
    conv = convert(root, 4)
    options = ["--schedule", "zbv", "--virtual-stages", 2, "--recompute", "full", "--save-every", 2]
    out = root / "run-2x2-zbv"
    first = tr.torchrun(2, conv, "--data", root / "train.jsonl", "--out", out, "--steps", 2, "--batch", BATCH,
                        "--microbatches", 4, "--optimizer", "sgd", "--lr", LR, *options)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    _train(root, "2x2-zbv", 2, [*options, "--resume"], 4, source=conv)
    losses, weights = eager(4, 1)
    got = tr.metrics(out)
    assert [m["step"] for m in got] == [1, 2, 3]
    assert max(abs(m["loss"] - b) for m, b in zip(got, losses, strict=True)) <= TOL, (got, losses)
    assert tr.max_weight_diff(tr.weights_of(out / "hf"), weights) <= TOL
    assert tr.max_weight_diff(tr.weights_of(root / "ckpt"), weights) > 1e-2


def _per_stage_clip(manifest, max_norm):
    """What a per-stage clip_grad_norm_ does, in eager: each stage's parameters clipped by their own norm
    (the shared weight once, with the lowest stage holding it)."""
    groups = [[p["hf_name"] for p in stage["parameters"]] for stage in manifest["stages"]]
    for info in manifest["shared_weights"].values():
        groups[min(info["stages"])].append(info["hf_names"][0])

    def clip(model):
        params = dict(model.named_parameters())
        for names in groups:
            torch.nn.utils.clip_grad_norm_([params[n] for n in names if n in params], max_norm)

    return clip


def test_max_grad_norm_clips_by_the_global_norm(setup):
    """--max-grad-norm equals eager clip_grad_norm_ over the whole model; a per-stage clip does not."""
    root, rows = setup
    conv = convert(root, 2)
    norm = 0.5
    out, _ = _train(root, "clip", 2, ["--schedule", "1f1b", "--max-grad-norm", norm], 2, source=conv)
    losses, weights = tr.train_eager(root / "ckpt", rows, steps=STEPS, batch=BATCH, microbatches=2, lr=LR,
                                     max_grad_norm=norm)
    _, unclipped = tr.train_eager(root / "ckpt", rows, steps=STEPS, batch=BATCH, microbatches=2, lr=LR)
    manifest = json.loads((conv / "pipeline.json").read_text())
    _, per_stage = tr.train_eager(root / "ckpt", rows, steps=STEPS, batch=BATCH, microbatches=2, lr=LR,
                                  clip=_per_stage_clip(manifest, norm))
    got = [m["loss"] for m in tr.metrics(out)]
    assert max(abs(a - b) for a, b in zip(got, losses, strict=True)) <= TOL
    trained = tr.weights_of(out / "hf")
    assert tr.max_weight_diff(trained, weights) <= TOL
    assert tr.max_weight_diff(weights, unclipped) > 1e-2  # the clip is active
    assert tr.max_weight_diff(trained, per_stage) > 1e-3  # and it is not the per-stage clip


def test_bfloat16_autocast_keeps_float32_weights(setup):
    """bf16 autocast: losses near eager's float32 ones, weights and optimizer state float32."""
    root, rows = setup
    conv = convert(root, 2)
    out, _ = _train(root, "bf16", 2, ["--schedule", "1f1b", "--dtype", "bfloat16", "--save-every", STEPS], 2,
                    source=conv)
    losses, _ = tr.train_eager(root / "ckpt", rows, steps=STEPS, batch=BATCH, microbatches=2, lr=LR)
    got = [m["loss"] for m in tr.metrics(out)]
    assert got != losses  # bf16 arithmetic did run
    assert max(abs(a - b) for a, b in zip(got, losses, strict=True)) <= 5e-2 * max(losses)
    assert {v.dtype for v in tr.hf_files(out).values()} == {torch.float32}
    for i in range(2):
        state = torch.load(out / "checkpoints" / f"step_{STEPS}" / f"stage_{i}.pt", weights_only=True)
        assert {v.dtype for v in state["model"].values()} == {torch.float32}


# -- Adafactor, AdamW and --zero: --dp 2 x 2 stages ------------------------------------------------------------
# Each optimizer trains unsharded for 3 steps (a checkpoint at step 2), and with --zero for 2 steps (a checkpoint
# at step 2), resumed to step 3: Adafactor's resume drops --zero (a --zero checkpoint is the same file as an
# unsharded one), AdamW's keeps it. AdamW also clips (--max-grad-norm): clipping sees the whole gradient.
OPT_LR, CLIP, ZERO_TOL = 1e-2, 0.5, 1e-6
SHARDED = {"adafactor": ([], []), "adamw": (["--max-grad-norm", CLIP], ["--zero"])}  # (options, resume's extra)


@pytest.fixture(scope="module")
def dp_runs(setup):
    """name -> run directory: `adafactor`, `adamw` (unsharded) and `adafactor-zero`, `adamw-zero`; each launched
    once, when a test first asks for it."""
    root, _ = setup
    conv, cache = convert(root, 2), {}

    def launch(out, *options):
        proc = tr.torchrun(4, conv, "--data", root / "train.jsonl", "--out", out, "--batch", BATCH,
                           "--microbatches", 2, "--dp", 2, "--lr", OPT_LR, "--save-every", 2, *options)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    def get(name):
        if name not in cache:
            optimizer, zero = name.removesuffix("-zero"), name.endswith("-zero")
            options, resume = SHARDED[optimizer]
            out = root / f"run-dp-{name}"
            launch(out, "--optimizer", optimizer, *options, "--steps", 2 if zero else STEPS,
                   *(["--zero"] if zero else []))
            if zero:
                launch(out, "--optimizer", optimizer, *options, "--steps", STEPS, "--resume", *resume)
            cache[name] = out
        return cache[name]

    return get


def test_adafactor_equals_eager_transformers(setup, dp_runs):
    """--optimizer adafactor is torch.optim.Adafactor with its defaults and --lr: eager's losses and weights."""
    root, rows = setup
    out = dp_runs("adafactor")
    losses, weights = tr.train_eager(root / "ckpt", rows, steps=STEPS, batch=BATCH, microbatches=2, dp=2, lr=OPT_LR,
                                     optimizer="adafactor")
    got = [m["loss"] for m in tr.metrics(out)]
    assert max(abs(a - b) for a, b in zip(got, losses, strict=True)) <= TOL, (got, losses)
    assert tr.max_weight_diff(tr.weights_of(out / "hf"), weights) <= TOL
    _, adamw = tr.train_eager(root / "ckpt", rows, steps=STEPS, batch=BATCH, microbatches=2, dp=2, lr=OPT_LR,
                              optimizer="adamw")
    assert tr.max_weight_diff(weights, adamw) > 1e-3  # another optimizer would not pass
    state = torch.load(out / "checkpoints" / "step_2" / "stage_0.pt", weights_only=True)["optimizer"]
    assert any("row_var" in s for s in state["state"].values())  # Adafactor's factored state, checkpointed


def test_adamw_clipped_equals_eager_transformers(setup, dp_runs):
    """The unsharded AdamW run that --zero must equal is itself eager's, clip included (and the clip acts)."""
    root, rows = setup
    out = dp_runs("adamw")
    losses, weights = tr.train_eager(root / "ckpt", rows, steps=STEPS, batch=BATCH, microbatches=2, dp=2, lr=OPT_LR,
                                     optimizer="adamw", max_grad_norm=CLIP)
    _, unclipped = tr.train_eager(root / "ckpt", rows, steps=STEPS, batch=BATCH, microbatches=2, dp=2, lr=OPT_LR,
                                  optimizer="adamw")
    got = [m["loss"] for m in tr.metrics(out)]
    assert max(abs(a - b) for a, b in zip(got, losses, strict=True)) <= TOL, (got, losses)
    assert tr.max_weight_diff(tr.weights_of(out / "hf"), weights) <= TOL
    assert tr.max_weight_diff(weights, unclipped) > 1e-4


def _stage_state(run, stage):
    return torch.load(run / "checkpoints" / "step_2" / f"stage_{stage}.pt", weights_only=True)


def _max_state_diff(a, b) -> float:
    """The largest difference between two nested states of tensors and numbers (which must have the same keys)."""
    if isinstance(a, dict):
        assert set(a) == set(b), sorted(set(a) ^ set(b), key=str)
        return max((_max_state_diff(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        return max((_max_state_diff(x, y) for x, y in zip(a, b)), default=0.0)
    if isinstance(a, torch.Tensor):
        return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    assert a == b, (a, b)
    return 0.0


@pytest.mark.parametrize("optimizer", sorted(SHARDED))
def test_zero_equals_the_unsharded_run(dp_runs, optimizer):
    """--zero: per-step losses, the step-2 checkpoint (weights and the consolidated optimizer state) and the
    weights after resuming to step 3 equal the unsharded run; each replica holds part of the state."""
    plain, zero = dp_runs(optimizer), dp_runs(f"{optimizer}-zero")
    got, expected = tr.metrics(zero), tr.metrics(plain)
    assert [m["step"] for m in got] == [1, 2, 3]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(got, expected, strict=True)) <= ZERO_TOL
    for stage in range(2):
        a, b = _stage_state(zero, stage), _stage_state(plain, stage)
        assert a["optimizer"]["state"] and _max_state_diff(a, b) <= ZERO_TOL
    assert tr.max_weight_diff(tr.weights_of(zero / "hf"), tr.weights_of(plain / "hf")) <= ZERO_TOL
    # global rank p * dp + r holds pipeline rank p of replica r: each stage's state split over its 2 replicas
    sharded, whole = got[0]["optimizer_state_bytes"], expected[0]["optimizer_state_bytes"]
    assert whole[0] == whole[1] > 0 and whole[2] == whole[3] > 0
    for p in range(2):
        assert sharded[2 * p] + sharded[2 * p + 1] == whole[2 * p]
        assert max(sharded[2 * p], sharded[2 * p + 1]) < whole[2 * p]


def test_resume_with_another_optimizer_is_refused(setup, dp_runs, monkeypatch, capsys):
    """An Adafactor checkpoint resumed without --optimizer (the plan's AdamW) names both optimizers."""
    from fxconvert.train import main

    root, _ = setup
    out = dp_runs("adafactor")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    argv = [convert(root, 2), "--data", root / "train.jsonl", "--out", out, "--batch", BATCH, "--microbatches", 2,
            "--dp", 2, "--steps", STEPS + 1, "--resume"]
    assert main([str(a) for a in argv]) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert "optimizer differs (checkpoint 'adafactor', this run 'adamw'; set by --optimizer)" in err


def test_the_optimizer_defaults_to_the_plans(setup, tmp_path):
    """No --optimizer: the one the conversion's plan counted, else AdamW; another one is a warning, not an error,
    when the plan was made for a memory target (without one the plan promised nothing)."""
    from fxconvert.errors import UsageError
    from fxconvert.training import optim
    from fxconvert.training.config import TrainConfig

    root, _ = setup
    record = json.loads((convert(root, 2) / "pipeline.json").read_text())

    def choose(plan_optimizer, optimizer=None, warned=None, max_memory=2**30):
        if plan_optimizer is None:
            record["plan"] = None
        else:
            record["plan"] = {**record["plan"], "optimizer": plan_optimizer, "max_memory": max_memory}
        (tmp_path / "pipeline.json").write_text(json.dumps(record))
        cfg = TrainConfig(source=str(tmp_path), data="train.jsonl", out="run", optimizer=optimizer)
        return optim.choose(cfg, warn=(warned if warned is not None else []).append)

    warned = []
    assert choose("adafactor", warned=warned) == "adafactor" and choose("sgd", "sgd", warned) == "sgd"
    assert warned == []
    assert choose("adafactor", "adamw", warned) == "adamw"
    (line,) = warned
    assert "--optimizer adamw" in line and "plan counted adafactor's state" in line
    assert choose("adafactor", "adamw", warned, max_memory=None) == "adamw" and len(warned) == 1  # no target
    with pytest.raises(UsageError, match="plan counts optimizer 'lion'.*pass --optimizer"):
        choose("lion")
    assert choose("lion", "sgd") == "sgd"
    assert choose(None) == "adamw"
    cfg = TrainConfig(source=str(root / "ckpt"), data="train.jsonl", out="run")
    assert optim.choose(cfg, warn=warned.append) == "adamw" and len(warned) == 1  # a checkpoint: no plan
