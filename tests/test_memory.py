"""`--measure-memory` (fxconvert.training.memory): one step's peak of torch-allocated memory per rank.

The CPU method is checked first against allocations whose peak is known by construction;
then three tiny torchrun runs (batch 2 and batch 8, and batch 8 with --recompute full; 2
stages) share every assertion on the records they write: one per rank, at least the bytes
that persist through a step, growing with the batch, beside the plan's own prediction, the
saved activations a part of the peak that recompute shrinks.
"""

import json
import subprocess
import sys

import pytest
import torch

import helpers
import train_runs as tr

from fxconvert import manifest
from fxconvert.training import memory

pytestmark = pytest.mark.xdist_group("ranks")  # torchrun runs: one at a time (tests/conftest.py)

SOURCE, TARGET = 12, 6  # every example has these lengths: no batch is padded differently


def profiled_peak(work) -> int:
    """`work()`'s peak above its start, as the trainer reads it from torch.profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        work()
    return memory.peak_of(prof.profiler.kineto_results.events())


def test_profiler_peak_is_the_largest_running_sum():
    mib = 2 ** 20

    def work():
        a = torch.empty(4 * mib, dtype=torch.uint8)
        b = torch.empty(8 * mib, dtype=torch.uint8)  # 12 MiB live: the peak
        del a
        c = torch.empty(2 * mib, dtype=torch.uint8)  # 10 MiB live
        del b, c

    assert profiled_peak(work) == 12 * mib


def test_profiler_peak_ignores_frees_of_older_blocks():
    """A block from before the profiler: its free is not reported, so it cannot lower the peak."""
    old = torch.empty(2 ** 20, dtype=torch.uint8)

    def work():
        nonlocal old
        new = torch.empty(3 * 2 ** 20, dtype=torch.uint8)
        old = None
        del new

    assert profiled_peak(work) == 3 * 2 ** 20


def test_storage_bytes_counts_each_storage_once():
    t = torch.zeros(10, 10)
    assert memory.storage_bytes([t, t, t[2:], t.view(100), torch.zeros(3)]) == 400 + 12


def test_one_step_is_measured_so_it_needs_two(tmp_path):
    (tmp_path / "data.jsonl").write_text(json.dumps({"input_ids": [1, 2], "labels": [3]}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "fxconvert.train", "t5-small", "--data", str(tmp_path / "data.jsonl"),
                           "--out", str(tmp_path / "run"), "--steps", "1", "--measure-memory"],
                          cwd=tr.REPO, env=tr.env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "--measure-memory" in proc.stderr and "--steps 2" in proc.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per batch size (and "full": batch 8 with --recompute full): (metrics records, pipeline.json) of 2 ranks x
    2 AdamW steps with --measure-memory."""
    tmp = tmp_path_factory.mktemp("memory")
    helpers.build(dropout_rate=0.1).save_pretrained(tmp / "ckpt")
    g = torch.Generator().manual_seed(0)
    lines = [{"input_ids": torch.randint(1, tr.VOCAB, (SOURCE,), generator=g).tolist(),
              "labels": torch.randint(1, tr.VOCAB, (TARGET,), generator=g).tolist()} for _ in range(16)]
    (tmp / "data.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    for name, extra in (("conv", ("--schedule", "1f1b")), ("conv_gpipe_full", ("--schedule", "gpipe",
                                                                                 "--recompute", "full"))):
        convert = subprocess.run([sys.executable, "-m", "fxconvert", str(tmp / "ckpt"), "--stages", "2", "--out",
                                  str(tmp / name), "--offline", "--no-validate", "-q", "--seq-lengths",
                                  f"{SOURCE},{TARGET}", "--batch", "1", "--microbatches", "2", *extra],
                                 cwd=tr.REPO, env=tr.env(), capture_output=True, text=True, timeout=300)
        assert convert.returncode == 0, convert.stderr
    out = {}
    # the plan of "conv" is for the batch-2 run, that of "conv_gpipe_full" for the "gpipe-full" run
    for key, batch, recompute, schedule, conv in ((2, 2, "none", "1f1b", "conv"), (8, 8, "none", "1f1b", "conv"),
                                                  ("full", 8, "full", "1f1b", "conv"),
                                                  ("gpipe-full", 2, "full", "gpipe", "conv_gpipe_full")):
        proc = tr.torchrun(2, tmp / conv, "--data", tmp / "data.jsonl", "--out", tmp / f"run{key}", "--steps", 2,
                           "--batch", batch, "--microbatches", 2, "--schedule", schedule, "--optimizer", "adamw",
                           "--device", "cpu", "--no-export", "--measure-memory", "--recompute", recompute,
                           timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[key] = tr.metrics(tmp / f"run{key}")
    return out, manifest.read(tmp / "conv")


def memory_records(records) -> dict:
    return {r["rank"]: r for r in records if r.get("record") == "memory"}


def test_one_record_per_rank_for_the_second_step(runs):
    by_batch, _ = runs
    for records in by_batch.values():
        steps = [r for r in records if r.get("record") is None]
        assert [r["step"] for r in steps] == [1, 2]  # the step lines are unchanged
        mem = memory_records(records)
        assert sorted(mem) == [0, 1] and [mem[r]["stages"] for r in (0, 1)] == [[0], [1]]
        assert all(r["step"] == 2 and r["device"] == "cpu" and r["method"] == "torch.profiler" for r in mem.values())


def test_peak_holds_what_persists_through_a_step(runs):
    """Weights, their gradients and AdamW's two moments are all live when the optimizer steps."""
    by_batch, plan = runs
    for records in by_batch.values():
        for rank, r in memory_records(records).items():
            stage = plan.stages[rank]
            assert r["parameter_bytes"] >= stage.parameter_bytes > 0
            assert r["gradient_bytes"] == r["parameter_bytes"]
            assert r["optimizer_bytes"] >= 2 * r["parameter_bytes"]
            assert r["peak_bytes"] >= r["parameter_bytes"] + r["gradient_bytes"] + r["optimizer_bytes"]
            assert r["activation_bytes"] == (r["peak_bytes"] - r["parameter_bytes"] - r["gradient_bytes"]
                                             - r["optimizer_bytes"]) > 0


def test_peak_grows_with_the_batch(runs):
    by_batch, _ = runs
    small, large = memory_records(by_batch[2]), memory_records(by_batch[8])
    for rank in (0, 1):
        assert large[rank]["activation_bytes"] > small[rank]["activation_bytes"]
        assert large[rank]["peak_bytes"] > small[rank]["peak_bytes"]
        assert large[rank]["parameter_bytes"] == small[rank]["parameter_bytes"]


def test_record_carries_the_plans_prediction(runs):
    by_batch, plan = runs
    for rank, r in memory_records(by_batch[2]).items():
        assert r["predicted_peak_bytes"] == plan.plan.peak_bytes[rank]
        assert r["plan"]["batch"] == 1 and r["plan"]["schedule"] == plan.plan.schedule


@pytest.mark.parametrize("run", [2, "gpipe-full"], ids=["1f1b-none", "gpipe-full"])
def test_prediction_is_within_a_tenth_of_the_measured_peak(runs, run):
    """Each plan was made for its run's shapes (microbatches of 1, 2 of them; 1F1B keeping every activation, or
    GPipe recomputing every block): its prediction must hold the step's real peak, within 10% either way, on every
    stage."""
    by_batch, _ = runs
    assert memory_records(by_batch[run])
    for rank, r in memory_records(by_batch[run]).items():
        error = (r["predicted_peak_bytes"] - r["peak_bytes"]) / r["peak_bytes"]
        assert abs(error) <= 0.10, (rank, r["predicted_peak_bytes"], r["peak_bytes"], error)


def test_saved_activations_are_a_part_of_the_peak(runs):
    """The moment the first backward begins is one moment of the step: what was live at the start plus what
    the forwards left is at most the peak. (Not necessarily within `activation_bytes`: that one subtracts all
    the gradients, and none exists yet when backward begins.)"""
    by_batch, _ = runs
    for records in by_batch.values():
        for r in memory_records(records).values():
            assert 0 < r["saved_activation_bytes"] <= r["peak_bytes"] - r["live_at_start_bytes"], r


def test_saved_activations_grow_with_the_batch(runs):
    by_batch, _ = runs
    small, large = memory_records(by_batch[2]), memory_records(by_batch[8])
    for rank in (0, 1):
        assert large[rank]["saved_activation_bytes"] > small[rank]["saved_activation_bytes"]


def test_full_recompute_saves_less(runs):
    """Under --recompute full a stage keeps only its blocks' inputs (and outputs) from forward; the weights,
    their gradients and the optimizer state are the same."""
    by_batch, _ = runs
    none, full = memory_records(by_batch[8]), memory_records(by_batch["full"])
    for rank in (0, 1):
        assert full[rank]["saved_activation_bytes"] < none[rank]["saved_activation_bytes"]
        for key in ("parameter_bytes", "gradient_bytes", "optimizer_bytes"):
            assert full[rank][key] == none[rank][key]
