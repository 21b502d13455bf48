"""Tests of `fxconvert.balance` through `split_stages`: the chosen split is the best contiguous one (brute force
over every grouping), a memory cap is obeyed or refused in one line, and the predicted memory and traffic of a
stage are those of the stage as it runs (its own copies of the shared weight, the tensors it really sends)."""

import functools
import itertools
import random

import pytest
import torch

from fxconvert.families import input_specs
from fxconvert.balance import best_groups, in_flight, measure_stage_seconds, real_inputs
from fxconvert import convert
from fxconvert.stages import MemoryPlanError, SplitError, split_stages

from helpers import build, random_inputs

SIZES = dict(batch=3, encoder_length=12, decoder_length=4)


@functools.lru_cache(maxsize=None)
def conversion():
    return convert(build("T5ForConditionalGeneration", num_layers=3))  # 3 encoder + 3 decoder blocks


def groupings(count, parts):
    for cuts in itertools.combinations(range(1, count), parts - 1):
        bounds = (0, *cuts, count)
        yield list(zip(bounds, bounds[1:]))


def brute_force(costs, parts, fits=None):
    """The smallest largest group sum over every contiguous grouping (within `fits`), or None."""
    values = [max(sum(costs[j:i]) for j, i in ranges) for ranges in groupings(len(costs), parts)
              if fits is None or all(fits(j, i, k) for k, (j, i) in enumerate(ranges))]
    return min(values, default=None)


def largest(costs, group):
    return max(sum(c for c, g in zip(costs, group) if g == s) for s in set(group))


@pytest.mark.parametrize("seed", range(40))
def test_best_groups_is_optimal(seed):
    rng = random.Random(seed)
    count = rng.randint(1, 8)
    parts = rng.randint(1, count)
    costs = [rng.choice([0, rng.random(), rng.randint(1, 9)]) for _ in range(count)]
    cap = rng.uniform(0, sum(costs)) if seed % 2 else None
    fits = None if cap is None else (lambda j, i, k: sum(costs[j:i]) * (k + 1) <= cap)  # depends on the stage index

    group = best_groups(count, parts, lambda j, i: sum(costs[j:i]), fits)
    best = brute_force(costs, parts, fits)
    if best is None:
        assert group is None
        return
    assert sorted(set(group)) == list(range(parts)) and group == sorted(group)  # contiguous, nonempty, in order
    assert largest(costs, group) == pytest.approx(best)
    if fits is not None:
        for k in range(parts):
            members = [u for u, g in enumerate(group) if g == k]
            assert fits(members[0], members[-1] + 1, k)


def per_block_seconds(conv, **sizes):
    """Predicted seconds of each block (with its attached nodes): a one-block-per-stage split."""
    stages = split_stages(conv, 6, **sizes)
    return [s.seconds for s in stages.plan.stages]


@pytest.mark.parametrize("num_stages", [2, 3, 4])
@pytest.mark.parametrize("lengths", [(12, 4), (4, 24)], ids=["long-encoder", "long-decoder"])
def test_time_balance_is_the_best_contiguous_split(num_stages, lengths):
    conv = conversion()
    sizes = dict(batch=3, encoder_length=lengths[0], decoder_length=lengths[1])
    blocks = per_block_seconds(conv, **sizes)
    stages = split_stages(conv, num_stages, balance="time", **sizes)
    got = max(s.seconds for s in stages.plan.stages)
    assert got == pytest.approx(brute_force(blocks, num_stages), rel=1e-9)
    assert sum(s.seconds for s in stages.plan.stages) == pytest.approx(sum(blocks), rel=1e-9)


def test_time_and_params_disagree_when_the_encoder_is_long():
    """The encoder blocks cost more than their parameters say when encoder inputs are long: the time balance
    gives the encoder more stages than the parameter balance does."""
    conv = conversion()
    by_time = split_stages(conv, 3, balance="time", batch=8, encoder_length=512, decoder_length=2)
    by_params = split_stages(conv, 3, balance="params", batch=8, encoder_length=512, decoder_length=2)

    def encoder_stages(stages):
        return sum(any(b.startswith("encoder") for b in s.blocks) for s in stages.specs)

    assert encoder_stages(by_time) > encoder_stages(by_params)
    assert by_time.plan.stages[by_time.plan.bottleneck].seconds < by_params.plan.stages[by_params.plan.bottleneck].seconds


def test_params_without_sizes_predicts_nothing():
    stages = split_stages(conversion(), 2, balance="params")
    assert stages.plan is None and all(s.flops is None and s.peak_bytes is None for s in stages.specs)
    with_sizes = split_stages(conversion(), 2, balance="params", batch=2)
    assert [s.blocks for s in with_sizes.specs] == [s.blocks for s in stages.specs]  # sizes only add predictions
    assert all(s.flops > 0 and s.peak_bytes > 0 for s in with_sizes.specs)


def test_profile_balance_measures_the_blocks():
    conv = conversion()
    stages = split_stages(conv, 2, balance="profile", **SIZES)
    assert stages.plan.balance == "profile" and all(s.seconds > 0 for s in stages.plan.stages)
    assert all(p.grad is None for p in conv.module.parameters())  # profiling leaves no gradients behind


def test_shared_weight_counts_on_every_stage_that_holds_a_copy():
    """Parameter bytes predicted per stage equal those of the stage module the pipeline runs, which owns a copy
    of each shared weight it uses; the shared weight is therefore counted more than once in total."""
    conv = conversion()
    stages = split_stages(conv, 3, **SIZES)
    for spec, predicted in zip(stages.specs, stages.plan.stages):
        module = stages.stage_module(spec.index)
        assert predicted.parameter_bytes == sum(p.numel() * p.element_size() for p in module.parameters())
    whole = sum(p.numel() * p.element_size() for p in conv.module.parameters())
    copies = sum(bool(s.shared_weights) for s in stages.specs)
    shared = conv.module.shared_embed_weight
    assert copies >= 2
    assert sum(s.parameter_bytes for s in stages.plan.stages) == whole + (copies - 1) * shared.numel() * 4


def test_sent_bytes_are_what_the_stages_send():
    conv = conversion()
    stages = split_stages(conv, 3, **SIZES)
    inputs = random_inputs(conv.input_names, SIZES["batch"], SIZES["encoder_length"], SIZES["decoder_length"])
    values = ()
    for spec, module, predicted in zip(stages.specs, [stages.stage_module(i) for i in range(3)], stages.plan.stages):
        values = module(*values, **{n: inputs[n] for n in spec.inputs})
        sent = sum(v.numel() * v.element_size() for v in values) if spec.sent else 0
        assert predicted.sent_bytes == sent


def test_bytes_across_every_possible_cut():
    """The cost model's bytes across each cut between blocks equal what the stages cut there send."""
    conv = conversion()
    per_block = split_stages(conv, 6, **SIZES)
    assert [s.sent_bytes for s in per_block.plan.stages[:-1]] == cut_bytes(conv)
    for num_stages in (2, 3, 4):
        stages = split_stages(conv, num_stages, balance="params", **SIZES)  # sizes only for the predictions
        plan = stages.plan
        ends = [sum(len(s.blocks) for s in stages.specs[:i + 1]) for i in range(len(stages.specs) - 1)]
        assert [s.sent_bytes for s in plan.stages[:-1]] == [cut_bytes(conv)[e - 1] for e in ends]


def cut_bytes(conv):
    import fxconvert.stages as st
    from fxconvert.cost import Sizes, analyze

    gm = conv.graph_module
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    block_of = st._block_of_nodes(nodes, st.default_block_rule(conv.model_class))
    blocks = st.stage_blocks(gm, 1, conv.model_class)
    unit = st._attach_to_blocks(nodes, block_of, blocks)
    costs = [0] * len(blocks)
    units = st._unit_costs(conv, analyze(conv, sizes=Sizes(**SIZES)), nodes, unit, costs)
    return units.cut_bytes


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_peak_memory_follows_the_schedule(schedule):
    """GPipe holds every microbatch's activations on every stage; 1F1B holds at most S - s on stage s."""
    conv = conversion()
    stages = split_stages(conv, 3, schedule=schedule, microbatches=5, **SIZES)
    flights = [s.in_flight for s in stages.plan.stages]
    assert flights == ([5, 5, 5] if schedule == "gpipe" else [3, 2, 1])
    for s in stages.plan.stages:  # weights, AdamW's two moments (and a step) per weight, in-flight activations
        assert 2 * s.parameter_bytes < s.optimizer_bytes < 2.01 * s.parameter_bytes
        assert s.peak_bytes >= s.parameter_bytes + s.optimizer_bytes + s.in_flight * s.activation_bytes
        assert s.peak_bytes >= s.parameter_bytes + s.gradient_bytes + s.optimizer_bytes  # at the optimizer step
        assert s.recompute == () and s.recomputed_bytes == 0  # no memory target: nothing recomputed
    assert in_flight("1f1b", 0, 4, 2) == 2  # never more microbatches than there are


def test_bubble_fraction():
    """Equal stages: the textbook (S - 1) / (M + S - 1); a slower stage only adds idle time."""
    conv = conversion()
    plan = split_stages(conv, 3, microbatches=6, **SIZES).plan
    times = [s.seconds for s in plan.stages]
    assert plan.step_seconds == pytest.approx(sum(times) + 5 * max(times))
    for s in plan.stages:
        s.forward_seconds, s.backward_seconds = 1.0, 1.0
    assert plan.bubble_fraction == pytest.approx(2 / (6 + 2))
    plan.stages[1].forward_seconds = 3.0
    assert plan.bubble_fraction > 2 / 8 and plan.bottleneck == 1


def test_memory_cap_is_obeyed():
    conv = conversion()
    free = split_stages(conv, 3, **SIZES)
    peaks = [s.peak_bytes for s in free.plan.stages]
    cap = max(peaks) - 1  # the unconstrained best no longer fits
    capped = split_stages(conv, 3, max_stage_bytes=cap, recompute="none", **SIZES)
    assert all(s.peak_bytes <= cap for s in capped.plan.stages)
    assert [s.blocks for s in capped.specs] != [s.blocks for s in free.specs]


def test_memory_cap_that_nothing_fits_is_refused_in_one_line():
    with pytest.raises(MemoryPlanError) as info:
        split_stages(conversion(), 3, max_stage_bytes=1000, **SIZES)
    message = str(info.value)
    assert "\n" not in message and "max_memory=1,000 bytes" in message and "raise it to at least" in message


@pytest.mark.parametrize("bad,match", [
    (dict(balance="flops"), "unknown balance 'flops'; use one of time, params, profile"),
    (dict(balance=None), "unknown balance None"),
    (dict(schedule="zb"), "unknown schedule 'zb'"),
    (dict(microbatches=0), "microbatches must be a positive integer"),
    (dict(microbatches=True), "microbatches must be a positive integer"),
    (dict(max_stage_bytes="1e9"), "max_stage_bytes must be a positive integer"),
    (dict(max_stage_bytes=-1), "max_stage_bytes must be a positive integer"),
    (dict(batch=0), "batch must be a positive integer"),
    (dict(encoder_length=10**0 - 1), "encoder_length must be a positive integer"),
    (dict(decoder_length="128"), "decoder_length must be a positive integer"),
])
def test_bad_options_are_usage_errors(bad, match):
    with pytest.raises(SplitError, match=match):
        split_stages(conversion(), 2, **bad)


def test_measured_stage_times_leave_the_callers_state_alone():
    conv = conversion()
    stages = split_stages(conv, 2, **SIZES)
    inputs = real_inputs(conv.input_names, stages.plan.sizes, vocab_size=97, specs=input_specs(conv.model_class))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    seconds = measure_stage_seconds(stages, inputs, repeats=1)
    assert torch.equal(torch.rand(3), expected)  # the random stream is the caller's
    assert len(seconds) == 2 and all(s > 0 for s in seconds)
    assert all(p.grad is None for p in conv.module.parameters())


def test_report_shows_a_bar_per_stage():
    """The terminal report draws one bar per stage, the longest for the bottleneck; files get the table."""
    from rich.console import Console

    from fxconvert.report import Report, print_rich, render, stage_plan_section
    from fxconvert.stages import stage_plan, stage_table

    stages = split_stages(conversion(), 3, **SIZES)
    section = stage_plan_section(stage_table(stages), stage_plan(stages))
    console = Console(record=True, width=120, color_system=None)
    print_rich(Report("t", "ok", sections=[section]), console)
    bars = [line for line in console.export_text().splitlines() if "█" in line]
    assert [line.split()[:2] for line in bars] == [["stage", "0"], ["stage", "1"], ["stage", "2"]]
    lengths = [line.count("█") for line in bars]
    assert lengths.index(max(lengths)) == stages.plan.bottleneck and max(lengths) == 40
    markdown = render(Report("t", "ok", sections=[section]), "markdown")
    assert "fwd+bwd FLOPs" in markdown and f"stage {stages.plan.bottleneck}" in markdown


def test_a_meta_device_model_is_balanced_by_prediction_not_by_profile():
    """A model without weights (built on the meta device) can be costed, not run."""
    import transformers

    from helpers import tiny_config

    with torch.device("meta"):
        model = transformers.T5ForConditionalGeneration(tiny_config()).eval()
    conv = convert(model)
    stages = split_stages(conv, 2, **SIZES)
    assert all(s.flops > 0 for s in stages.specs)
    with pytest.raises(SplitError, match="balance='profile' runs the blocks and needs real weights"):
        split_stages(conv, 2, balance="profile", **SIZES)
