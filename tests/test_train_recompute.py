"""`torchrun -m fxconvert.train --recompute`: recomputed runs equal the run that keeps every activation.

A tiny T5 with dropout 0.1, written by save_pretrained and converted with 2 and 3 stages, trains
3 SGD steps with 2 stages under gpipe (`--recompute none` and `full`) and 3 stages under 1f1b
(`none` and `auto`, from a pipeline.json whose plan names each stage's first block: every stage
recomputes, and one runs a recomputed block beside one that keeps its activations). The per-step losses and every
weight of RUN/hf equal the `none` run's bit for bit (CPU float32: the checkpoint restores the random
state, so dropout draws the same masks in the recompute, and the backward runs the same operations).

A second check against transformers' own recompute: the same T5 with dropout 0, given by its
checkpoint directory (converted and split on every rank), trained with `--recompute full`, equals
eager T5ForConditionalGeneration with `activation_checkpointing_enable()` (transformers 5's name
for `gradient_checkpointing_enable()`) within 1e-5 (the tolerance
of `test_train_eager`: the pipeline sums microbatch gradients in another order).
"""

import json
import subprocess
import sys

import pytest
import torch
import transformers

import helpers
import train_runs as tr

pytestmark = pytest.mark.xdist_group("ranks")  # torchrun runs: one at a time (tests/conftest.py)

STEPS, BATCH, LR = 3, 4, 0.5
# id -> (stages, schedule, microbatches)
LAYOUTS = {"2-gpipe": (2, "gpipe", 2), "3-1f1b": (3, "1f1b", 4)}


def _convert(root, stages):
    out = root / f"conv-{stages}"
    proc = subprocess.run([sys.executable, "-m", "fxconvert", str(root / "ckpt"), "--stages", str(stages), "--out",
                           str(out), "--no-validate", "-q"], cwd=tr.REPO, env=tr.env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return out


def _plan_blocks(conversion) -> list[str]:
    """Write a plan that recomputes each stage's first block; return them."""
    path = conversion / "pipeline.json"
    record = json.loads(path.read_text())
    chosen = [stage["blocks"][0] for stage in record["stages"]]
    assert any(len(stage["blocks"]) > 1 for stage in record["stages"])  # one recomputed beside one that is not
    record["plan"]["recompute"] = chosen
    path.write_text(json.dumps(record))
    return chosen


def _train(source, out, stages, *options):
    proc = tr.torchrun(stages, source, "--data", out.parent / "train.jsonl", "--out", out, "--steps", STEPS,
                       "--batch", BATCH, "--optimizer", "sgd", "--lr", LR, *options)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [m["loss"] for m in tr.metrics(out)], tr.hf_files(out), proc.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(layout, mode) -> (losses, RUN/hf tensors, stderr), and the blocks the 3-stage plan names."""
    root = tmp_path_factory.mktemp("recompute")
    helpers.build(dropout_rate=0.1).save_pretrained(root / "ckpt")
    tr.write_jsonl(root / "train.jsonl")
    out, planned = {}, None
    for layout, (stages, schedule, microbatches) in LAYOUTS.items():
        conversion = _convert(root, stages)
        modes = ("none", "full")
        if stages == 3:  # a plan's blocks: recompute on each stage, and beside a block that keeps its activations
            planned, modes = _plan_blocks(conversion), ("none", "auto")
        for mode in modes:
            out[layout, mode] = _train(conversion, root / f"run-{layout}-{mode}", stages, "--schedule", schedule,
                                       "--microbatches", microbatches, "--recompute", mode)
    return out, planned


@pytest.mark.parametrize("layout,mode", [("2-gpipe", "full"), ("3-1f1b", "auto")])
def test_recomputed_runs_equal_the_run_that_keeps_every_activation(runs, layout, mode):
    results, _ = runs
    want_losses, want_weights, _ = results[layout, "none"]
    losses, weights, _ = results[layout, mode]
    assert len(losses) == STEPS and losses == want_losses
    assert weights.keys() == want_weights.keys()
    assert [k for k in want_weights if not torch.equal(weights[k], want_weights[k])] == []


def test_the_first_status_line_names_the_recomputed_blocks(runs):
    results, planned = runs
    first = lambda layout, mode: results[layout, mode][2].splitlines()[0]  # noqa: E731
    assert first("2-gpipe", "full") == "recompute full: stage 0 encoder.block.0; stage 1 encoder.block.1, " \
                                       "decoder.block.0-1"
    assert first("3-1f1b", "auto") == f"recompute auto (the plan in pipeline.json): stage 0 {planned[0]}; " \
                                      f"stage 1 {planned[1]}; stage 2 {planned[2]}"
    assert not any(line.startswith("recompute") for line in results["3-1f1b", "none"][2].splitlines())


def _train_eager_checkpointed(checkpoint, rows, *, microbatches):
    """`train_runs.train_eager` with transformers' own recompute (non-reentrant) on: its
    `gradient_checkpointing_enable()`, which transformers 5 deprecates for `activation_checkpointing_enable()`."""
    model = transformers.T5ForConditionalGeneration.from_pretrained(checkpoint).train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_activation_checkpointing
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        optimizer.zero_grad()
        chunks = {k: torch.tensor_split(v, microbatches) for k, v in tr.eager_batch(rows, BATCH, step).items()}
        total = 0.0
        for i in range(microbatches):
            loss = model(**{k: v[i] for k, v in chunks.items()}, use_cache=False).loss
            (loss / microbatches).backward()
            total += loss.item() / microbatches
        optimizer.step()
        losses.append(total)
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_full_recompute_equals_eager_activation_checkpointing(tmp_path):
    tr.write_checkpoint(tmp_path / "ckpt")  # dropout 0: eager draws its masks in another order
    rows = tr.write_jsonl(tmp_path / "train.jsonl")
    losses, _, err = _train(tmp_path / "ckpt", tmp_path / "run", 2, "--schedule", "1f1b", "--microbatches", 2,
                            "--recompute", "full")
    assert [line for line in err.splitlines() if not line.startswith("reading data: ")][0].startswith(
        "recompute full: stage 0 ")
    want_losses, want_weights = _train_eager_checkpointed(tmp_path / "ckpt", rows, microbatches=2)
    assert max(abs(a - b) for a, b in zip(losses, want_losses)) < 1e-5, (losses, want_losses)
    assert tr.max_weight_diff(tr.weights_of(tmp_path / "run" / "hf"), want_weights) < 1e-5
