"""The memory plan of a split (`split_stages(..., optimizer=, recompute=, max_memory=)`): each memory term against
what the stage modules really hold and what torch's optimizers really allocate, recompute lowering the activations
saved, the choice of recompute under a memory target, the refusal naming a memory that then fits, and the plan's
round trip through pipeline.json."""

import functools
import re

import pytest
import torch

from fxconvert import convert, manifest
import fxconvert.stages as st
from fxconvert.cost import Sizes, analyze
from fxconvert.stages import MemoryPlanError, SplitError, split_plan, split_stages

from helpers import build

SIZES = dict(batch=3, encoder_length=12, decoder_length=4)


@functools.lru_cache(maxsize=None)
def conversion():
    return convert(build("T5ForConditionalGeneration", num_layers=3))  # 3 encoder + 3 decoder blocks


@functools.lru_cache(maxsize=None)
def units():
    conv = conversion()
    gm = conv.graph_module
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    block_of = st._block_of_nodes(nodes, st.default_block_rule(conv.model_class))
    blocks = st.stage_blocks(gm, 1, conv.model_class)
    unit = st._attach_to_blocks(nodes, block_of, blocks)
    costs, params = [0] * len(blocks), [[] for _ in blocks]
    for node, param in st._owned_parameters(gm, nodes):
        costs[unit[node]] += param.numel() * param.element_size()
        params[unit[node]].append(param)
    return st._unit_costs(conv, analyze(conv, sizes=Sizes(**SIZES)), nodes, unit, costs, params=params,
                          blocks=blocks)


def least(num_stages, recompute, microbatches=4):
    """The least max_memory any split into `num_stages` fits, with every block recomputed or none."""
    return st._least_memory(units(), num_stages, "1f1b", microbatches, recompute)


def state_after_a_step(name, params):
    """Bytes of the state torch's optimizer keeps after one step (the fact the plan must match)."""
    params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    optimizer = {"adamw": torch.optim.AdamW, "adafactor": torch.optim.Adafactor, "sgd": torch.optim.SGD}[name](
        params, lr=1e-3)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    return sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
               if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor", "sgd"])
def test_parameters_gradients_and_optimizer_state_are_what_the_stage_holds(optimizer):
    """Per stage: parameters and gradients are the bytes of the stage module's parameters (its own copy of the
    shared weight included), optimizer state the bytes torch's optimizer allocates for them in a step."""
    stages = split_stages(conversion(), 2, optimizer=optimizer, **SIZES)
    for spec, predicted in zip(stages.specs, stages.plan.stages):
        params = list(stages.stage_module(spec.index).parameters())
        by_hand = sum(p.numel() * p.element_size() for p in params)
        assert predicted.parameter_bytes == predicted.gradient_bytes == by_hand
        assert predicted.optimizer_bytes == state_after_a_step(optimizer, params)
        # the peak holds these and more: backward's working set and the receive buffers (tests/test_memory.py)
        assert predicted.peak_bytes > (2 * by_hand + predicted.optimizer_bytes
                                       + predicted.in_flight * predicted.activation_bytes)


def test_adafactor_keeps_less_state_than_adamw():
    adamw, adafactor = (split_stages(conversion(), 2, optimizer=o, **SIZES).plan for o in ("adamw", "adafactor"))
    assert sum(s.optimizer_bytes for s in adafactor.stages) < sum(s.optimizer_bytes for s in adamw.stages) / 4
    assert all(a.peak_bytes > b.peak_bytes for a, b in zip(adamw.stages, adafactor.stages))


def test_recompute_lowers_the_activations_saved_and_costs_a_forward():
    none = split_stages(conversion(), 2, balance="params", recompute="none", **SIZES)
    full = split_stages(conversion(), 2, balance="params", recompute="full", **SIZES)
    assert [s.blocks for s in none.specs] == [s.blocks for s in full.specs]  # the same split, by parameters
    for n, f, spec in zip(none.plan.stages, full.plan.stages, full.specs):
        assert f.activation_bytes < n.activation_bytes / 2
        assert 0 < f.recomputed_bytes <= n.activation_bytes
        assert f.recompute == tuple(spec.blocks) and n.recompute == ()
        assert f.recompute_seconds > 0 and f.seconds == pytest.approx(n.seconds + f.recompute_seconds)
        assert f.peak_bytes < n.peak_bytes
    assert full.plan.recompute == tuple(b for s in full.specs for b in s.blocks)


def test_a_target_that_needs_some_recompute_gets_a_subset():
    full, none = least(2, "full"), least(2, "none")
    assert full < none
    target = (full + none) // 2
    stages = split_stages(conversion(), 2, max_memory=target, **SIZES)
    chosen = stages.plan.recompute
    assert 0 < len(chosen) < 6 and all(s.peak_bytes <= target for s in stages.plan.stages)
    assert stages.plan.max_memory == target
    with pytest.raises(MemoryPlanError):
        split_stages(conversion(), 2, max_memory=target, recompute="none", **SIZES)
    # room for the best-balanced split without recompute: that split, nothing recomputed (recompute only adds time)
    balanced = split_stages(conversion(), 2, **SIZES)
    room = max(s.peak_bytes for s in balanced.plan.stages)
    roomy = split_stages(conversion(), 2, max_memory=room, **SIZES)
    assert roomy.plan.recompute == () and [s.blocks for s in roomy.specs] == [s.blocks for s in balanced.specs]


def test_the_choice_is_the_fastest_fit_then_the_least_recompute():
    """Among the splits that fit (each stage recomputing the least it needs), the smallest bottleneck, recompute
    included; among those, the least recompute seconds (brute force over every cut)."""
    target = (least(2, "full") + least(2, "none")) // 2
    plan = split_stages(conversion(), 2, max_memory=target, **SIZES).plan
    u = units()
    best = None
    for cut in range(1, 6):
        options = []
        for k, (j, i) in enumerate(((0, cut), (cut, 6))):
            fits = [o for o in u.stage_options(j, i, "auto")
                    if u.peak_bytes(j, i, k, 2, "1f1b", 4, o) <= target]
            options.append(fits[0] if fits else None)
        if None not in options:
            recompute = sum(o.seconds for o in options)
            bottleneck = max(sum(u.forward[j:i]) + sum(u.backward[j:i]) + o.seconds
                             for o, (j, i) in zip(options, ((0, cut), (cut, 6))))
            best = min(best or (bottleneck, recompute), (bottleneck, recompute))
    assert max(s.seconds for s in plan.stages) == pytest.approx(best[0])
    assert sum(s.recompute_seconds for s in plan.stages) == pytest.approx(best[1])


def test_a_target_too_small_names_one_that_fits():
    target = least(2, "full") - 1
    with pytest.raises(MemoryPlanError) as info:
        split_stages(conversion(), 2, max_memory=target, **SIZES)
    message = str(info.value)
    assert "\n" not in message and not isinstance(info.value, SplitError)  # a failure (exit 1), not a usage error
    named = int(re.search(r"raise it to at least ([\d,]+) bytes", message).group(1).replace(",", ""))
    assert named == target + 1
    stages = split_stages(conversion(), 2, max_memory=named, **SIZES)
    assert all(s.peak_bytes <= named for s in stages.plan.stages)
    more = int(re.search(r"or split into (\d+) stages", message).group(1))
    assert more > 2 and split_stages(conversion(), more, max_memory=target, **SIZES).plan is not None


def test_a_target_no_stage_count_fits_says_so():
    with pytest.raises(MemoryPlanError, match=r"no split into up to 6 stages \(one block each\) fits"):
        split_stages(conversion(), 2, max_memory=1000, **SIZES)


@pytest.mark.parametrize("bad,match", [
    (dict(max_memory=0), "max_memory must be a positive integer, got 0"),
    (dict(max_memory=-5), "max_memory must be a positive integer, got -5"),
    (dict(max_memory="11GiB"), "max_memory must be a positive integer"),
    (dict(recompute="some"), "unknown recompute 'some'; use one of none, full, auto"),
    (dict(optimizer="adam"), "unknown optimizer 'adam'; use one of sgd, adamw, adafactor"),
    (dict(max_memory=10**9, max_stage_bytes=10**8), "disagree; give max_memory alone"),
])
def test_bad_plan_options_are_usage_errors(bad, match):
    with pytest.raises(SplitError, match=match):
        split_stages(conversion(), 2, **bad)


def test_the_plan_round_trips_through_pipeline_json():
    target = (least(2, "full") + least(2, "none")) // 2
    stages = split_stages(conversion(), 2, max_memory=target, **SIZES)
    plan = split_plan(stages)
    assert (plan.optimizer, plan.max_memory) == ("adamw", target)
    assert plan.recompute == stages.plan.recompute and plan.recompute
    assert set(plan.recompute) <= {b for s in stages.specs for b in s.blocks}
    reader = manifest._Reader("pipeline.json")
    lengths = tuple(k for k in plan.to_json() if k.endswith("_length"))
    assert reader.plan(plan.to_json(), 2, lengths) == plan
