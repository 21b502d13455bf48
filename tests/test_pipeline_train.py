"""The self-check `python -m fxconvert.train --self-check` (fxconvert.training.self_check): the trainer's loop.

One run in a subprocess: 2 processes (gloo), GPipe and 1F1B, 2 microbatches, 2 SGD steps, plus the
control run without the tied-gradient all-reduce. The self-check compares with eager transformers
itself; the per-rank results are checked here against single-process training of the unsplit
converted module, and its first loss against eager transformers.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_runs as tr

from fxconvert.errors import UsageError
from fxconvert.stages import SplitError
from fxconvert.workflow import convert
from fxconvert.training.self_check import RunConfig, batches, build_model, check, make_optimizer, run as run_pipeline

pytestmark = pytest.mark.xdist_group("ranks")  # torchrun runs: one at a time (tests/conftest.py)


REPO = Path(__file__).resolve().parent.parent
CFG = RunConfig(stages=2, schedules=("gpipe", "1f1b"), steps=2, microbatches=2, batch=4, control=True)
TOL = 1e-5
INPUT_NAMES = CFG.record.train_inputs  # what the trainer feeds (the family record's)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    command = [sys.executable, "-m", "fxconvert.train", "--self-check", "--stages", "2", "--steps", "2",
               "--microbatches", "2", "--batch", "4", "--schedule", "gpipe", "1f1b", "--control",
               "--out", str(out / "ranks"), "--json", str(out / "results.json")]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads((out / "results.json").read_text())
    ranks = {}
    for r in report["results"]:
        stem = r["schedule"] + ("" if r["tied_sync"] else "-unsynced")
        ranks[r["schedule"], r["tied_sync"]] = [torch.load(out / "ranks" / f"{stem}_rank{i}.pt") for i in range(2)]
    return report, ranks, proc.stdout


def train_reference(cfg: RunConfig):
    """Train the unsplit converted module as the pipeline does: (losses per step, initial, final weights)."""
    module = convert(build_model(cfg), input_names=INPUT_NAMES).module.train()
    initial = {name: p.detach().clone() for name, p in module.named_parameters()}
    optimizer = make_optimizer(cfg, module.parameters())
    losses = []
    for batch in batches(cfg):
        optimizer.zero_grad()
        chunks = {k: torch.tensor_split(v, cfg.microbatches) for k, v in batch.items()}
        step = []
        for i in range(cfg.microbatches):
            loss = module(**{k: v[i] for k, v in chunks.items()})
            loss.backward()
            step.append(loss.detach())
        for p in module.parameters():
            if p.grad is not None:
                p.grad.div_(cfg.microbatches)
        optimizer.step()
        losses.append(torch.stack(step).mean().item())
    return losses, initial, {name: p.detach().clone() for name, p in module.named_parameters()}


@pytest.fixture(scope="module")
def reference():
    return train_reference(CFG)


def test_the_run_reports_agreement(run):
    report, _, stdout = run
    assert report["config"]["stages"] == 2 and report["config"]["microbatches"] == 2
    synced = [r for r in report["results"] if r["tied_sync"]]
    assert [r["schedule"] for r in synced] == ["gpipe", "1f1b"]
    for r in synced:
        assert r["ok"], r
        assert r["shared_copies"] == {"shared_embed_weight": [0, 1]}  # encoder embedding | decoder embedding + head
        assert r["max_shared_copy_diff"] == 0.0
    assert "gpipe: OK" in stdout and "1f1b: OK" in stdout


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_distributed_training_equals_single_process_training(run, reference, schedule):
    _, ranks, _ = run
    losses, initial, final = reference
    first, last = ranks[(schedule, True)]
    assert first["losses"] == [] and len(last["losses"]) == CFG.steps
    assert max(abs(a - b) for a, b in zip(last["losses"], losses)) <= TOL
    weights = {}
    for rank in (first, last):
        for name, value in rank["weights"].items():
            weights.setdefault(name, []).append(value)
    assert set(weights) == set(final)
    for name, copies in weights.items():
        for value in copies:
            torch.testing.assert_close(value, final[name], rtol=0, atol=TOL, msg=lambda m, n=name: f"{n}: {m}")
        assert all(torch.equal(value, copies[0]) for value in copies)  # copies of the shared weight are identical
    assert [n for n, c in weights.items() if len(c) > 1] == ["shared_embed_weight"]
    assert max((final[n] - initial[n]).abs().max().item() for n in final) > 1e-2  # the weights did move


def test_without_the_all_reduce_the_copies_diverge(run, reference):
    """What torch.distributed.pipelining does with a weight used by several stages: one copy per stage,
    gradients never reconciled."""
    _, ranks, _ = run
    _, _, final = reference
    first, last = ranks[("gpipe", False)]
    a, b = first["weights"]["shared_embed_weight"], last["weights"]["shared_embed_weight"]
    assert (a - b).abs().max().item() > 1e-3
    assert max((c - final["shared_embed_weight"]).abs().max().item() for c in (a, b)) > 1e-3


def test_the_reference_loss_is_eager_transformers_loss(run, reference):
    """Step 0 (before any update): the mean over microbatches of eager transformers' loss."""
    _, ranks, _ = run
    model = build_model(CFG)
    batch = batches(CFG)[0]
    chunks = {k: torch.tensor_split(batch[k], CFG.microbatches) for k in INPUT_NAMES}
    with torch.no_grad():
        eager = [model(**{k: v[i] for k, v in chunks.items()}, use_cache=False).loss for i in range(CFG.microbatches)]
    expected = torch.stack(eager).mean().item()
    assert abs(reference[0][0] - expected) <= TOL
    assert abs(ranks[("1f1b", True)][1]["losses"][0] - expected) <= TOL


def test_the_self_check_needs_no_port_picked_ahead(tmp_path):
    """The self-check's ranks meet in a store its own process listens on, at a port chosen as it is bound.
    Rank 0 used to bind a port picked earlier, and the run failed when another program took it in between."""
    proc = tr.train_with_ports_taken("--self-check", "--stages", "2", "--steps", "1", "--microbatches", "2",
                                     "--batch", "4", "--schedule", "gpipe", "--json", tmp_path / "results.json",
                                     timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert [r["schedule"] for r in json.loads((tmp_path / "results.json").read_text())["results"]] == ["gpipe"]


def test_bad_configurations_are_usage_errors():
    with pytest.raises(UsageError, match="at least as many microbatches as stages"):
        check(RunConfig(stages=4, microbatches=2, layers=2))
    with pytest.raises(SplitError, match="the graph has 2 blocks"):  # before any process is started
        run_pipeline(RunConfig(stages=3, layers=1, schedules=("gpipe",)))


@pytest.mark.parametrize("model_type", ["gpt2", "bert", "qwen2"])
def test_the_self_check_of_every_family_matches_eager(model_type, tmp_path):
    """`--family` takes any model_type that trains: each family's tiny model, trained by the real loop in two
    stages, gives eager transformers' losses and weights (T5 is the run above, BART test_family_bart's, and
    Qwen2 stands for the Llama-style record). Dropout the tiny config leaves to transformers' default
    (GPT-2's) is off too, and a config without pad_token_id pads with eos."""
    cfg = RunConfig(family=model_type, stages=2, schedules=("gpipe",), steps=1, microbatches=2, batch=4)
    (result,) = run_pipeline(cfg, out_dir=str(tmp_path))
    assert result.ok, result
    assert result.max_loss_diff <= TOL and result.max_weight_diff <= TOL and result.max_weight_update > 10 * TOL
