"""Tests of `fxconvert.stages`: the stages of a converted T5 compose to the unsplit converted module
(output and every gradient, shared weight included, in eval and train mode with dropout), each stage
on its own (`stage_module`, as the pipeline runs it) does too once the gradients of the shared-weight
copies are summed, and the split, its report and its generated sources say what the graph holds."""

import functools
import itertools
import math

import pytest
import torch
import transformers

from fxconvert import convert
from fxconvert.convert import convert_traced
from fxconvert.errors import ModelResolutionError, UsageError
from fxconvert.pipeline import write_stage_sources
from fxconvert.stages import SplitError, Stages, split_stages, stage_table
from fxconvert.trace import trace_with_stats

from helpers import build, random_inputs
from passes.common import untie_lm_head

# name -> (class, input names or None for the default, make the LM head its own weight)
CASES = {
    "tied": ("T5ForConditionalGeneration", None, False),
    "untied_head": ("T5ForConditionalGeneration", None, True),
    "shift_right": ("T5ForConditionalGeneration", ["input_ids", "labels"], False),  # setitem in the graph
    "umt5": ("UMT5ForConditionalGeneration", None, False),  # a position bias per layer
    "model": ("T5Model", None, False),
    "encoder": ("T5EncoderModel", None, False),
}
BLOCKS = {"encoder": 2}  # the others have 2 encoder + 2 decoder blocks


@functools.lru_cache(maxsize=None)
def conversion(case):
    cls_name, names, untie = CASES[case]
    model = build(cls_name)
    if untie:
        untie_lm_head(model)
    return convert(model, input_names=names)


def inputs_for(conv, pad=True):
    return random_inputs(conv.input_names, 3, 6, 4, pad=pad)


def run_with_grads(module, inputs, seed=0):
    """Output and {parameter: gradient} (keyed by tensor identity) of backward of the output's sum."""
    module.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = module(**inputs)
    out.float().sum().backward()
    grads = {id(p): p.grad.detach().clone() for p in module.parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    return out.detach(), grads


def assert_same_grads(expected: dict, actual: dict, names: dict):
    assert set(actual) == set(expected), sorted(names[k] for k in set(actual) ^ set(expected))
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-6,
                                   msg=lambda m, k=key: f"{names[k]}: {m}")


COMPOSITION = [(case, n) for case in CASES for n in (2, 3, 4) if n <= BLOCKS.get(case, 4)]


# -- composition: the stages in order are the converted module --------------------------------

@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("case,num_stages", COMPOSITION, ids=[f"{c}-{n}" for c, n in COMPOSITION])
def test_stages_compose_to_the_converted_module(case, num_stages, mode):
    conv = conversion(case)
    stages = split_stages(conv, num_stages)
    whole = conv.module
    names = {id(p): n for n, p in whole.named_parameters()}
    # the stages hold every parameter of the converted module, each once, and no other
    assert sorted(id(p) for p in stages.parameters()) == sorted(names)
    for module in (whole, stages):
        getattr(module, mode)()
    try:
        inputs = inputs_for(conv)
        expected, expected_grads = run_with_grads(whole, inputs)
        actual, actual_grads = run_with_grads(stages, inputs)
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)
        assert_same_grads(expected_grads, actual_grads, names)
        if mode == "train":  # dropout acted (so equal masks were drawn), and the training flag reached it
            whole.eval()
            assert not torch.allclose(whole(**inputs), expected)
    finally:
        whole.eval()


# Every way of choosing the cuts; sizes with a long encoder, so that "time" and "params" cut differently.
BALANCES = {"params": dict(balance="params"),
            "time": dict(balance="time", batch=3, encoder_length=48, decoder_length=4),
            "profile": dict(balance="profile", batch=3, encoder_length=48, decoder_length=4)}


@pytest.mark.parametrize("balance", list(BALANCES))
@pytest.mark.parametrize("case", ["tied", "untied_head", "umt5"])
def test_stages_compose_for_every_balance(case, balance):
    conv = conversion(case)
    stages = split_stages(conv, 3, **BALANCES[balance])
    whole = conv.module
    names = {id(p): n for n, p in whole.named_parameters()}
    for module in (whole, stages):
        module.train()
    try:
        inputs = inputs_for(conv)
        expected, expected_grads = run_with_grads(whole, inputs)
        actual, actual_grads = run_with_grads(stages, inputs)
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)
        assert_same_grads(expected_grads, actual_grads, names)
    finally:
        whole.eval()


def test_time_balance_cuts_differently_from_params():
    """So that the balance modes above test different splits."""
    conv = conversion("tied")
    blocks = {b: [s.blocks for s in split_stages(conv, 3, **kw).specs] for b, kw in BALANCES.items() if b != "profile"}
    assert blocks["time"] != blocks["params"]


@pytest.mark.parametrize("balance", list(BALANCES))
@pytest.mark.parametrize("pad", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("num_stages", [2, 3, 4])
def test_stage_modules_as_the_pipeline_runs_them(num_stages, pad, balance):
    """Each stage on its own, with its own copy of the shared weight: positional = received values, keywords =
    model inputs. Summed over the copies, the shared weight's gradient is the converted module's (what the
    pipeline's all-reduce does); every other gradient and the loss match as they are."""
    conv = conversion("tied")
    stages = split_stages(conv, num_stages, **BALANCES[balance])
    modules = [stages.stage_module(i).train() for i in range(num_stages)]
    conv.module.train()
    try:
        inputs = inputs_for(conv, pad=pad)
        expected, expected_grads = run_with_grads(conv.module, inputs)
        torch.manual_seed(0)
        values = ()
        for spec, module in zip(stages.specs, modules):
            values = module(*values, **{n: inputs[n] for n in spec.inputs})
            if spec.sent:  # point-to-point communication needs contiguous tensors
                assert all(v.is_contiguous() for v in values)
        torch.testing.assert_close(values, expected, rtol=0, atol=1e-6)
        values.backward()
    finally:
        conv.module.eval()
    by_name = {n: p for n, p in conv.module.named_parameters()}
    for name, param in by_name.items():
        copies = [m for m in modules if name in dict(m.named_parameters())]
        if name in conv.shared_weights:
            assert [spec.index for spec in stages.specs if name in spec.shared_weights] == [
                i for i, m in enumerate(modules) if m in copies]
            grad = sum(dict(m.named_parameters())[name].grad for m in copies)
        else:
            (module,) = copies  # every other parameter lives in exactly one stage
            grad = dict(module.named_parameters())[name].grad
            assert dict(module.named_parameters())[name] is not param  # a copy, not the conversion's own
        torch.testing.assert_close(grad, expected_grads[id(param)], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")


# -- structure ----------------------------------------------------------------------------------

@pytest.mark.parametrize("case,num_stages", COMPOSITION, ids=[f"{c}-{n}" for c, n in COMPOSITION])
def test_stage_graphs_keep_the_node_order_and_the_calling_convention(case, num_stages):
    conv = conversion(case)
    stages = split_stages(conv, num_stages)
    assert isinstance(stages, Stages) and len(stages.stages) == num_stages
    original = [(n.op, n.target, n.name) for n in conv.graph_module.graph.nodes
                if n.op not in ("placeholder", "output")]
    copied, blocks = [], []
    for spec, gm in zip(stages.specs, stages.stages):
        gm.graph.lint()
        placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
        assert placeholders == [*spec.received, *spec.inputs, *spec.shared_weights, "training"]
        assert spec.received == (stages.specs[spec.index - 1].sent if spec.index else [])
        out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        if spec.index < num_stages - 1:
            assert [n.name for n in out] == spec.sent and spec.sent
        else:
            assert isinstance(out, torch.fx.Node) and not spec.sent
        body = [(n.op, n.target, n.name) for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
        copied += body[len(spec.recomputed):]  # recomputed values come first
        blocks += spec.blocks
    assert copied == original  # every node once, in the converted graph's order: stages run the graph in order
    stacks = ["encoder"] + (["decoder"] if conv.model_class != "T5EncoderModel" else [])
    assert blocks == [f"{s}.block.{i}" for s in stacks for i in range(2)]


def test_shared_weight_and_training_reach_the_stages_that_use_them():
    """Tied T5 in four stages, one block each: the encoder embedding (stage 0), the decoder embedding
    (stage 2) and the tied LM head (stage 3) read the shared weight; encoder block 1 does not."""
    tied = split_stages(conversion("tied"), 4)
    assert [bool(s.shared_weights) for s in tied.specs] == [True, False, True, True]
    untied = split_stages(conversion("untied_head"), 4)
    assert [bool(s.shared_weights) for s in untied.specs] == [True, False, True, False]
    assert all(s.uses_training for s in tied.specs)  # every block holds a dropout
    # the labels reach only the stage of the loss; the encoder padding mask is recomputed, never sent
    assert [("labels" in s.inputs) for s in tied.specs] == [False, False, False, True]
    assert all("padding_mask" not in s.sent for s in tied.specs)
    assert "padding_mask" in tied.specs[1].recomputed


def test_balance_by_params_minimises_the_largest_stage():
    """Per-block parameter bytes from a one-block-per-stage split; every contiguous grouping is tried."""
    conv = conversion("tied")
    per_block = [row["parameter_bytes"] for row in stage_table(split_stages(conv, 4, balance="params"))]
    for num_stages in (2, 3):
        rows = stage_table(split_stages(conv, num_stages, balance="params"))
        best = min(
            max(sum(per_block[a:b]) for a, b in zip((0, *cuts), (*cuts, 4)))
            for cuts in itertools.combinations(range(1, 4), num_stages - 1)
        )
        assert max(r["parameter_bytes"] for r in rows) == best
    assert [r["blocks"] for r in stage_table(split_stages(conv, 2, balance="params"))] == [
        ["encoder.block.0", "encoder.block.1"], ["decoder.block.0", "decoder.block.1"]]


def test_stage_table():
    conv = conversion("tied")
    stages = split_stages(conv, 3, balance="params")  # the encoder's two blocks on stage 0
    rows = stage_table(stages)
    whole = [p for n, p in conv.module.named_parameters() if n not in conv.shared_weights]
    assert sum(r["parameters"] for r in rows) == sum(p.numel() for p in whole)
    assert sum(r["parameter_bytes"] for r in rows) == sum(p.numel() * p.element_size() for p in whole)
    for row, spec in zip(rows, stages.specs):
        assert row["stage"] == spec.index and row["blocks"] == spec.blocks
        assert row["receives_shared_weight"] == ("shared_embed_weight" in spec.shared_weights)
        assert [v["name"] for v in row["sent"]] == spec.sent
        for value in row["sent"]:
            # sizes at the traced example shapes: batch 2, encoder 7, decoder 5 tokens
            assert value["bytes"] == math.prod(value["shape"]) * getattr(torch, value["dtype"]).itemsize
        assert row["sent_bytes"] == sum(v["bytes"] for v in row["sent"])
    encoder_out = {v["name"]: v for v in rows[0]["sent"]}
    assert len(encoder_out) == 1 and next(iter(encoder_out.values()))["shape"] == [2, 7, 32]
    assert next(iter(encoder_out.values()))["bytes"] == 2 * 7 * 32 * 4  # fp32 hidden states at the traced shape
    sent = {v["name"]: v for v in rows[1]["sent"]}
    # decoder block 0 computes the self-attention position bias that block 1 reuses: (1, heads, 5, 5)
    assert [2, 7, 32] in [v["shape"] for v in sent.values()] and [1, 4, 5, 5] in [v["shape"] for v in sent.values()]


def test_written_stage_sources_run_like_the_stages(tmp_path):
    conv = conversion("tied")
    stages = split_stages(conv, 3)
    paths = write_stage_sources(stages, tmp_path / "stages")
    assert [p.name for p in paths] == ["stage_0.py", "stage_1.py", "stage_2.py"]
    inputs = inputs_for(conv)
    values = ()
    for spec, gm, path in zip(stages.specs, stages.stages, paths):
        namespace = {}
        exec(compile(path.read_text(), str(path), "exec"), namespace)
        args = (*values, *(inputs[n] for n in spec.inputs), *(getattr(stages, w) for w in spec.shared_weights), False)
        expected = gm(*args)
        values = namespace["Graph"].forward(gm, *args)  # the file's forward, with the stage's modules as `self`
        torch.testing.assert_close(values, expected, rtol=0, atol=0)
    torch.testing.assert_close(values, conv.module(**inputs), rtol=0, atol=0)


# -- errors ---------------------------------------------------------------------------------------

def test_too_many_stages_names_the_limit():
    with pytest.raises(SplitError, match=r"3 stages: the graph has 2 blocks .* at most 2"):
        split_stages(conversion("encoder"), 3)
    with pytest.raises(SplitError, match="positive integer"):
        split_stages(conversion("encoder"), 0)
    assert issubclass(SplitError, UsageError)


def test_a_graph_without_blocks_cannot_be_split():
    config = transformers.T5Config(d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=0, vocab_size=97)
    model = transformers.T5EncoderModel(config).eval()
    # convert() refuses num_layers=0, as the command line does; the graph is made without that check
    with pytest.raises(ModelResolutionError, match="num_layers is 0; set it to a positive integer"):
        convert(model)
    conv = convert_traced(model, trace_with_stats(model, None))
    assert not any("block" in (n.meta.get("module_path") or "") for n in conv.graph_module.graph.nodes)
    with pytest.raises(SplitError, match="no block boundaries"):
        split_stages(conv, 1)
