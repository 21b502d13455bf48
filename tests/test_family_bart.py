"""BART (BartModel, BartForConditionalGeneration) against eager transformers: its quirks, beyond what
every family must do (trace, convert, two stages and the CLI of each class with its default inputs:
tests/test_family_conformance.py). Here: other inputs, dropout mixes, the scaled shared embedding,
more stages, the presets, LayerDrop and float16 refusals, config checks.

Every numerical check compares outputs and every parameter gradient with the eager model at 1e-5
in fp32. Train mode keeps dropout on (0.1 everywhere) and runs eager and converted code under the
same seed: both draw the same dropout masks in the same order, so they agree exactly; a check
that the masks acted (train differs from eval) guards against dropout silently switched off.
The tiny model scales its embeddings (`scale_embedding=True`, sqrt(32)), so a lifted lookup that
lost `BartScaledWordEmbedding`'s scale would fail every comparison.
"""

import operator

import pytest
import torch
import torch.nn.functional as F
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from fxconvert import convert
from fxconvert.errors import TraceError
from fxconvert.families import family_of_class, presets
from fxconvert.graph_info import graph_info
from fxconvert.stages import split_stages
from fxconvert.trace import trace

import helpers
from fxconvert.families.bart import _draws_layerdrop_at_zero
from helpers import assert_grads_match, assert_outputs_match, eager_outputs, output_sum

OLD_TRANSFORMERS = _draws_layerdrop_at_zero()
# On transformers before 5.23 fxconvert refuses BART (see the refusal test), so the rest has nothing to run.
SUPPORTED = pytest.mark.skipif(OLD_TRANSFORMERS, reason=f"transformers {transformers.__version__} < 5.23: "
                                "BART is refused there (a LayerDrop draw per layer a graph cannot reproduce)")

FAMILY = family_of_class("BartForConditionalGeneration")
VOCAB = FAMILY.tiny["vocab_size"]
PAD = FAMILY.tiny["pad_token_id"]  # BART's pad id (1); the random inputs contain it too


def tiny_config(attn="sdpa", **overrides):
    """The record's tiny BART (dropout 0.1 everywhere, scaled embeddings) with the test's overrides."""
    kwargs = {**FAMILY.tiny, **overrides}
    config = transformers.BartConfig(**kwargs)
    config._attn_implementation = attn
    return config


def build(cls_name="BartForConditionalGeneration", attn="sdpa", seed=0, untie_head=False, **overrides):
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)._from_config(tiny_config(attn, **overrides), attn_implementation=attn)
    with torch.no_grad():  # transformers initialises it to zeros: make it matter
        if hasattr(model, "final_logits_bias"):
            model.final_logits_bias.normal_()
    if untie_head:
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    return model.eval()


def inputs_for(names, shape, pad=True, seed=0):
    batch, enc, dec = shape
    return helpers.random_inputs(names, batch, enc, dec, vocab=VOCAB, seed=seed, pad=pad)


def run(fn, model, inputs, mode, seed=0):
    """Outputs and every parameter gradient (by name) of backward of their sum, in `mode`."""
    model.train(mode == "train")
    model.zero_grad(set_to_none=True)
    try:
        torch.manual_seed(seed)
        out = fn(inputs)
        output_sum(out).backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        return {k: v.detach() for k, v in out.items()}, grads
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


# -- trace: class x case x attention x mode x shape ------------------------------------------------

CASES = {
    "Model": ("BartModel", None),
    "CG_labels": ("BartForConditionalGeneration", None),
    "CG_no_labels": ("BartForConditionalGeneration", ["input_ids", "attention_mask", "decoder_input_ids"]),
    "CG_shift_right": ("BartForConditionalGeneration", ["input_ids", "labels"]),  # shift_tokens_right traced
    "CG_decoder_mask": ("BartForConditionalGeneration", ["input_ids", "attention_mask", "decoder_input_ids",
                                                         "decoder_attention_mask", "labels"]),
}
# (batch, encoder length, decoder length): length 1, longer than the 7/5 the trace saw, uneven both ways
SHAPES = [(1, 1, 1), (3, 40, 33), (2, 9, 3), (2, 3, 12)]


_TRACED = {}


def traced(case, attn, mode):
    key = (case, attn, mode)
    if key not in _TRACED:
        cls_name, names = CASES[case]
        model = build(cls_name, attn)
        model.train(mode == "train")
        _TRACED[key] = (model, trace(model, names))
        model.eval()
    return _TRACED[key]


# The default inputs (Model, CG_labels), and the meta device: tests/test_family_conformance.py
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("case", [c for c in CASES if c not in ("Model", "CG_labels")])
def test_trace_matches_eager(case, attn, mode):
    model, gm = traced(case, attn, mode)
    names = list(graph_info(gm).input_names)
    assert names == (CASES[case][1] or family_of_class(CASES[case][0]).default_input_names(CASES[case][0]))
    for shape in SHAPES:
        for pad in (True, False):
            inputs = inputs_for(names, shape, pad)
            expected, expected_grads = run(lambda i: eager_outputs(model, i), model, inputs, mode)
            actual, actual_grads = run(lambda i: gm(**i), model, inputs, mode)
            assert_outputs_match(expected, actual)
            assert_grads_match(expected_grads, actual_grads, model)
    if mode == "train":  # the masks acted
        eval_out = eager_outputs(model.eval(), inputs_for(names, SHAPES[1]))
        train_out, _ = run(lambda i: gm(**i), model, inputs_for(names, SHAPES[1]), mode)
        assert not torch.allclose(next(iter(eval_out.values())), next(iter(train_out.values())))


# -- hypothesis: small configurations ----------------------------------------------------------------

@settings(max_examples=6, deadline=None)
@given(
    cls_name=st.sampled_from(["BartModel", "BartForConditionalGeneration"]),
    attn=st.sampled_from(["sdpa", "eager"]),
    heads=st.sampled_from([1, 2, 4]),
    layers=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    ffn=st.sampled_from([8, 48]),
    activation=st.sampled_from(["gelu", "relu", "silu", "gelu_new"]),
    scale=st.booleans(),
    shape=st.tuples(st.integers(1, 3), st.integers(1, 10), st.integers(1, 10)),
)
def test_small_configurations_match_eager(cls_name, attn, heads, layers, ffn, activation, scale, shape):
    model = build(cls_name, attn, encoder_attention_heads=heads, decoder_attention_heads=heads,
                  encoder_layers=layers[0], decoder_layers=layers[1], encoder_ffn_dim=ffn, decoder_ffn_dim=ffn,
                  activation_function=activation, scale_embedding=scale)
    for mode in ("eval", "train"):
        model.train(mode == "train")
        gm = trace(model)  # a raw trace is of one mode (convert lifts the flag)
        inputs = inputs_for(list(graph_info(gm).input_names), shape)
        expected, expected_grads = run(lambda i: eager_outputs(model, i), model, inputs, mode)
        actual, actual_grads = run(lambda i: gm(**i), model, inputs, mode)
        assert_outputs_match(expected, actual)
        assert_grads_match(expected_grads, actual_grads, model)


# -- convert: passes, the lifted shared weight, the untied head -----------------------------------

CONVERSIONS = {
    "tied": ("BartForConditionalGeneration", None, False),
    "untied_head": ("BartForConditionalGeneration", None, True),
    "shift_right": ("BartForConditionalGeneration", ["input_ids", "labels"], False),
    "model": ("BartModel", None, False),
}
_CONVERTED = {}


def conversion(case):
    if case not in _CONVERTED:
        cls_name, names, untie = CONVERSIONS[case]
        model = build(cls_name, untie_head=untie)
        _CONVERTED[case] = (model, convert(model, input_names=names))
    return _CONVERTED[case]


def _eager_output(model, conv, inputs):
    return {conv.output_name: eager_outputs(model, inputs)[conv.output_name]}


# The tied BartForConditionalGeneration and BartModel: tests/test_family_conformance.py
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("case", ["untied_head", "shift_right"])
def test_converted_module_matches_eager(case, mode):
    model, conv = conversion(case)
    module = conv.module
    for shape in SHAPES[:3]:
        inputs = inputs_for(conv.input_names, shape)
        expected, expected_grads = run(lambda i: _eager_output(model, conv, i), model, inputs, mode)
        module.train(mode == "train")
        try:
            actual, actual_grads = run(lambda i: {conv.output_name: module(**i)}, model, inputs, mode)
        finally:
            module.eval()
        assert_outputs_match(expected, actual)
        assert_grads_match(expected_grads, actual_grads, model)


# (dropout, attention_dropout, activation_dropout): bart-large-cnn publishes 0.1, 0.0, 0.0
DROPOUT_MIXES = [(0.1, 0.0, 0.0), (0.1, 0.1, 0.0), (0.1, 0.0, 0.1), (0.0, 0.1, 0.0)]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("rates", DROPOUT_MIXES, ids=["-".join(map(str, r)) for r in DROPOUT_MIXES])
def test_a_zero_dropout_rate_stays_zero_in_training(rates, attn):
    """Converted in eval mode, trained in train mode: each dropout keeps its own configured rate. A layer's
    activation dropout of 0.0 must not take the layer's hidden-state rate (`dropout`)."""
    dropout, attention_dropout, activation_dropout = rates
    model = build(attn=attn, dropout=dropout, attention_dropout=attention_dropout,
                  activation_dropout=activation_dropout)
    conv = convert(model)
    for mode in ("train", "eval"):
        for shape in SHAPES[1:3]:
            inputs = inputs_for(conv.input_names, shape)
            expected, expected_grads = run(lambda i: _eager_output(model, conv, i), model, inputs, mode)
            conv.module.train(mode == "train")
            try:
                actual, actual_grads = run(lambda i: {conv.output_name: conv.module(**i)}, model, inputs, mode)
            finally:
                conv.module.eval()
            assert_outputs_match(expected, actual)
            assert_grads_match(expected_grads, actual_grads, model)


@pytest.mark.parametrize("case", list(CONVERSIONS))
def test_the_tied_embedding_is_one_placeholder_feeding_lookups_and_head(case):
    model, conv = conversion(case)
    graph = conv.graph_module.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    weight = next(n for n in placeholders if n.target == "shared_embed_weight")
    assert [n.target for n in placeholders].count("shared_embed_weight") == 1
    assert placeholders[-1].target == "training" and placeholders[-2] is weight
    lookups = [u for u in weight.users if u.target is F.embedding]
    # the encoder looks up input_ids; the decoder decoder_input_ids (or the labels shifted right)
    assert len(lookups) == 2 and all(u.kwargs["padding_idx"] == PAD for u in lookups)
    # each lookup is scaled by sqrt(d_model) (BartScaledWordEmbedding), not dropped with the module
    for lookup in lookups:
        assert any(u.target in (torch.mul, operator.mul) and 32 ** 0.5 in u.args for u in lookup.users)
    heads = [u for u in weight.users if u.target is F.linear]
    tied_head = CONVERSIONS[case][0].endswith("ForConditionalGeneration") and not CONVERSIONS[case][2]
    assert len(heads) == (1 if tied_head else 0)
    names = dict(conv.module.named_parameters())
    assert names["shared_embed_weight"] is model.get_input_embeddings().weight
    if CONVERSIONS[case][2]:  # the untied head stays an ordinary parameter of the graph
        head = [n for n, p in names.items() if p is model.lm_head.weight]
        assert head and head[0].startswith("graph_module.")
    # the logits bias stays a buffer, read once
    if CONVERSIONS[case][0].endswith("ForConditionalGeneration"):
        assert [n.target for n in graph.nodes if n.op == "get_attr" and "final_logits_bias" in n.target] == [
            "final_logits_bias"]


# -- stages ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["eval", "train"])
# Two stages of each class: tests/test_family_conformance.py
@pytest.mark.parametrize("case,num_stages", [("tied", 3), ("untied_head", 4), ("model", 3)])
def test_stages_cut_at_the_layers_and_compose(case, num_stages, mode):
    model, conv = conversion(case)
    stages = split_stages(conv, num_stages)
    prefix = "model." if CONVERSIONS[case][0].endswith("ForConditionalGeneration") else ""
    assert [b for s in stages.specs for b in s.blocks] == [f"{prefix}encoder.layers.{i}" for i in range(2)] + [
        f"{prefix}decoder.layers.{i}" for i in range(2)]
    whole = conv.module
    names = {id(p): n for n, p in whole.named_parameters()}
    assert sorted(id(p) for p in stages.parameters()) == sorted(names)
    inputs = inputs_for(conv.input_names, (3, 6, 4))
    results = []
    for module in (whole, stages):
        module.train(mode == "train")
        module.zero_grad(set_to_none=True)
        try:
            torch.manual_seed(0)
            out = module(**inputs)
            out.float().sum().backward()
            results.append((out.detach(), {id(p): p.grad.to_dense().clone() for p in module.parameters()
                                           if p.grad is not None}))
        finally:
            module.zero_grad(set_to_none=True)
            module.eval()
    (expected, expected_grads), (actual, actual_grads) = results
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)
    assert set(actual_grads) == set(expected_grads) == set(names)
    for key in expected_grads:
        torch.testing.assert_close(actual_grads[key], expected_grads[key], rtol=0, atol=1e-6,
                                   msg=lambda m, k=key: f"{names[k]}: {m}")


# The CLI on a checkpoint, and model.py without transformers: tests/test_family_conformance.py


# -- presets -------------------------------------------------------------------------------------------

def test_presets_are_the_published_architectures():
    bart = {name: config for name, (family, config) in presets().items() if family.name == "bart"}
    assert set(bart) == {"facebook/bart-base", "facebook/bart-large"}
    # transformers' BartConfig defaults are bart-large's published hyperparameters
    defaults = transformers.BartConfig().to_dict()
    structural = ("d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads", "decoder_attention_heads",
                  "encoder_ffn_dim", "decoder_ffn_dim", "vocab_size", "max_position_embeddings", "activation_function",
                  "scale_embedding", "pad_token_id", "decoder_start_token_id")
    assert {k: bart["facebook/bart-large"][k] for k in structural} == {k: defaults[k] for k in structural}
    base = bart["facebook/bart-base"]
    assert (base["d_model"], base["encoder_layers"], base["encoder_attention_heads"], base["encoder_ffn_dim"]) == (
        768, 6, 12, 3072)
    for config in bart.values():
        assert config["model_type"] == "bart" and config["architectures"] == ["BartForConditionalGeneration"]


def test_preset_loads_with_random_weights_and_warns():
    from fxconvert.load import RandomWeightsWarning, load

    with pytest.warns(RandomWeightsWarning, match="RANDOM WEIGHTS"):
        loaded = load("facebook/bart-base", offline=True, allow_random=True)
    model = loaded.model
    assert type(model).__name__ == "BartForConditionalGeneration" and loaded.source.random_weights
    assert model.lm_head.weight is model.model.shared.weight is model.model.encoder.embed_tokens.weight
    # bart-base publishes 139.4M parameters (the tied head counted once)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 139.4
    assert all(torch.isfinite(p).all() for p in model.parameters())
    meta = load("facebook/bart-large", offline=True, meta=True).model
    assert round(sum(p.numel() for p in meta.parameters()) / 1e6, 1) == 406.3


# -- pipeline training ---------------------------------------------------------------------------------

@pytest.mark.xdist_group("ranks")
@pytest.mark.slow
def test_pipeline_training_equals_single_process_training():
    """Two stage processes (gloo), 1F1B, two SGD steps: losses and weights equal training the unsplit
    converted module in one process, whose first loss is eager transformers' loss. (`torchrun -m
    fxconvert.train` on a BART checkpoint against eager training: tests/test_train_families.py.)"""
    from fxconvert.training import self_check as pipeline_check

    cfg = pipeline_check.RunConfig(family="BART", stages=2, schedules=("1f1b",), steps=2, microbatches=2, batch=4)
    results = pipeline_check.run(cfg)
    assert [r.schedule for r in results] == ["1f1b"]
    for r in results:
        assert r.ok, r
        assert r.shared_copies == {"shared_embed_weight": [0, 1]}  # encoder lookup | decoder lookup + head
    model = pipeline_check.build_model(cfg)
    batch = pipeline_check.batches(cfg)[0]  # the first step's loss: the mean of its microbatches' losses
    chunks = [{k: v[i] for k, v in batch.items()}
              for batch in [{k: torch.tensor_split(v, cfg.microbatches) for k, v in batch.items()}]
              for i in range(cfg.microbatches)]
    eager = sum(model(**chunk, use_cache=False).loss.item() for chunk in chunks) / cfg.microbatches
    assert abs(results[0].reference_losses[0] - eager) <= 1e-5


# -- what a graph cannot record: refused in one line naming the fix ---------------------------------

@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("key", ["encoder_layerdrop", "decoder_layerdrop"])
def test_layerdrop_is_refused(key, mode):
    model = build(**{key: 0.2}).train(mode == "train")
    with pytest.raises(TraceError, match=rf"^cannot trace BartForConditionalGeneration: {key} is 0.2: .*set {key}=0"):
        trace(model)


def test_float16_is_refused_and_bfloat16_matches_eager():
    with pytest.raises(TraceError, match="float16 .*convert in float32 or bfloat16$"):
        trace(build().half())
    model = build().to(torch.bfloat16)
    gm = trace(model)
    inputs = inputs_for(list(graph_info(gm).input_names), (2, 6, 4))
    expected, actual = eager_outputs(model, inputs), gm(**inputs)
    for name in expected:  # the same ops in the same order: equal in bfloat16 too
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0)


# -- config checks ------------------------------------------------------------------------------------

@pytest.mark.parametrize("key, value, rule", [
    ("encoder_attention_heads", 5, "a divisor of d_model"),
    ("decoder_attention_heads", 0, "a positive integer"),
    ("encoder_layers", 0, "a positive integer"),
    ("decoder_layers", 100000, "at most"),
    ("max_position_embeddings", -1, "a positive integer"),
    ("activation_function", "nope", "an activation such as 'gelu'"),
    ("attention_dropout", 1.0, r"a number in \[0, 1\)"),
    ("decoder_start_token_id", VOCAB, rf"a token id in \[0, {VOCAB}\)"),
])
def test_a_bad_config_field_is_refused_in_one_line(key, value, rule):
    from fxconvert.load import ModelResolutionError, check_config

    config = dict(tiny_config().to_dict(), architectures=["BartForConditionalGeneration"], **{key: value})
    check_config(dict(config, **{key: tiny_config().to_dict()[key]}), "config.json")  # the tiny config passes
    with pytest.raises(ModelResolutionError, match=rf"^invalid config in config.json: {key} is .*set it to {rule}"):
        check_config(config, "config.json")


@pytest.mark.parametrize("key", ["normalize_before", "add_final_layer_norm", "normalize_embedding",
                                 "static_position_embeddings", "add_bias_logits"])
def test_fields_transformers_ignores_are_refused_unless_at_the_value_it_computes(key):
    """Published BART configs still carry these fields, at the values transformers 5 always computes with
    (those pass); another value would be silently ignored by eager transformers too, so it is refused."""
    from fxconvert.families.bart import IGNORED_FIELDS
    from fxconvert.load import ModelResolutionError, check_config

    published = dict(presets()["facebook/bart-base"][1], **IGNORED_FIELDS)
    check_config(published, "config.json")
    flipped = not IGNORED_FIELDS[key]
    with pytest.raises(ModelResolutionError) as info:
        check_config(dict(published, **{key: flipped}), "config.json")
    expected = str(IGNORED_FIELDS[key]).lower()
    assert str(info.value) == (f"invalid config in config.json: {key} is {flipped}; set it to {expected} in the "
                               f"config: transformers 5's BART ignores {key} and computes as if it were {expected}, "
                               f"so a model trained otherwise (mBART-style, say) would convert wrongly")
    # eager transformers computes the same with either value: the field is ignored
    model, other = build(), build(**{key: flipped})
    inputs = inputs_for(family_of_class("BartForConditionalGeneration").default_input_names(
        "BartForConditionalGeneration"), (2, 6, 4))
    with torch.no_grad():
        assert_outputs_match(eager_outputs(model, inputs), eager_outputs(other, inputs), atol=0)


@pytest.mark.skipif(not OLD_TRANSFORMERS, reason="transformers >= 5.23 draws LayerDrop only above 0: BART is supported")
def test_a_transformers_that_draws_layerdrop_at_zero_is_refused_in_one_line():
    """Releases before 5.23 call torch.rand([]) in every layer in training even at LayerDrop 0; a graph
    cannot hold that draw, so its dropout masks would come from elsewhere in the random stream."""
    model = transformers.BartForConditionalGeneration(transformers.BartConfig(
        d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=50, max_position_embeddings=32))
    with pytest.raises(TraceError, match=r"draws a LayerDrop random number .* install transformers>=5.23") as info:
        trace(model.eval())
    assert "\n" not in str(info.value)


# Every other test needs a transformers whose BART fxconvert supports.
for _name, _test in list(globals().items()):
    if _name.startswith("test_") and _name != "test_a_transformers_that_draws_layerdrop_at_zero_is_refused_in_one_line":
        globals()[_name] = SUPPORTED(_test)
