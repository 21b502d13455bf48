"""The GPT-2 family (GPT2Model, GPT2LMHeadModel): its quirks, beyond what every family must do.

(Trace, convert, stages and the CLI of the default inputs: tests/test_family_conformance.py; pipeline
training of GPT-2 against eager transformers: tests/test_train_families.py.) Here: other inputs (no
mask, token types, embeddings), small configurations, refusals, the split's length bound, the presets.

Every numerical check compares with the eager transformers model in fp32: outputs at 1e-5 and
every parameter gradient. Train mode runs with dropout on (0.1, GPT-2's published rates) and
compares under the same seed: the traced graph draws its dropout masks in eager's order.
"""

import functools
import json
import math

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from fxconvert import convert
from fxconvert.families import family_of_class
from fxconvert.load import RandomWeightsWarning, load
from fxconvert.stages import split_stages
from fxconvert.trace import trace

from helpers import assert_grads_match, assert_outputs_match, grads_of, input_names_of

FAMILY = family_of_class("GPT2LMHeadModel")
VOCAB = FAMILY.tiny["vocab_size"]
POSITIONS = FAMILY.tiny["n_positions"]
ATTNS = ("sdpa", "eager")


def tiny_config(attn="sdpa", **overrides):
    """The record's tiny GPT-2 (dropouts: GPT2Config's defaults, 0.1 each) with the test's overrides."""
    kwargs = {**FAMILY.tiny, **overrides}
    config = transformers.GPT2Config(**kwargs)
    config._attn_implementation = attn
    return config


def build(cls_name, attn="sdpa", seed=0, **overrides):
    torch.manual_seed(seed)
    return getattr(transformers, cls_name)._from_config(tiny_config(attn, **overrides), attn_implementation=attn).eval()


def gpt2_inputs(names, batch, length, seed=0, pad="right"):
    """Token inputs over the one sequence; `pad` pads the first row's last ("right") or first ("left") tokens.

    labels are the input ids (the model shifts them), with one ignored label in the last row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if pad == "right" and length > 2:
        mask[0, -2:] = 0
    elif pad == "left" and length > 2:
        mask[0, :2] = 0
    labels = ids.clone()
    if length > 2:
        labels[-1, 1] = -100
    pool = {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "token_type_ids": torch.randint(0, VOCAB, (batch, length), generator=g),
            "inputs_embeds": torch.randn(batch, length, 32, generator=g)}
    return {n: pool[n] for n in names}


def eager(model, inputs):
    out = model(**inputs, use_cache=False)
    return {k: v for k, v in out.items() if v is not None}


# case -> (class, input names or None for the family's default)
CASES = {
    "Model": ("GPT2Model", None),
    "LM": ("GPT2LMHeadModel", None),
    "LM_no_labels": ("GPT2LMHeadModel", ["input_ids", "attention_mask"]),
    "LM_ids_labels": ("GPT2LMHeadModel", ["input_ids", "labels"]),  # no mask: causal only
    "LM_token_types": ("GPT2LMHeadModel", ["input_ids", "attention_mask", "token_type_ids", "labels"]),
    "LM_embeds": ("GPT2LMHeadModel", ["inputs_embeds", "attention_mask", "labels"]),  # n_embd-wide vectors
}
# The default inputs of GPT2Model and GPT2LMHeadModel: tests/test_family_conformance.py
MATRIX = [(case, attn) for case in CASES if case not in ("Model", "LM") for attn in ATTNS]
IDS = [f"{c}-{a}" for c, a in MATRIX]
# (batch, length, padding): batch 1, length 1, a long sequence (60 of 64 positions), both paddings, none
SHAPES = [(1, 1, None), (1, 9, "right"), (3, 60, "right"), (2, 17, "left"), (2, 5, None)]


@functools.lru_cache(maxsize=None)
def traced(case, attn, mode="eval"):
    cls_name, names = CASES[case]
    model = build(cls_name, attn).train(mode == "train")
    return model, trace(model, names)


# -- trace: outputs and gradients against eager, eval and train mode ---------------------------

def test_record_defaults():
    family = family_of_class("GPT2LMHeadModel")
    assert family.default_input_names("GPT2LMHeadModel") == ["input_ids", "attention_mask", "labels"]
    assert family.default_input_names("GPT2Model") == ["input_ids", "attention_mask"]
    assert family.block_of("transformer.h.3.attn.c_attn") == (0, 3, "transformer.h.3")
    assert family.block_of("h.11.mlp") == (0, 11, "h.11")
    assert family.block_of("transformer.wte") is None and family.block_of("hx.1") is None


@pytest.mark.parametrize("case,attn", MATRIX, ids=IDS)
def test_outputs_match_eager(case, attn):
    model, gm = traced(case, attn)
    names = input_names_of(gm)
    assert names == (CASES[case][1] or family_of_class(CASES[case][0]).default_input_names(CASES[case][0]))
    for batch, length, pad in SHAPES:
        inputs = gpt2_inputs(names, batch, length, seed=length, pad=pad)
        with torch.no_grad():
            assert_outputs_match(eager(model, inputs), gm(**inputs))
    gm.graph.lint()


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("case,attn", MATRIX, ids=IDS)
def test_gradients_match_eager(case, attn, mode):
    model, gm = traced(case, attn, mode)
    assert model.training == (mode == "train") and model.config.attn_pdrop > 0
    for batch, length, pad in [(3, 11, "right"), (2, 40, "left")]:
        inputs = gpt2_inputs(input_names_of(gm), batch, length, seed=length, pad=pad)

        def seeded(fn):
            def run():
                torch.manual_seed(1234)  # train mode: the same dropout masks
                return fn()
            return run

        eager_run, graph_run = seeded(lambda: eager(model, inputs)), seeded(lambda: gm(**inputs))
        with torch.no_grad():
            expected, actual = eager_run(), graph_run()
            assert_outputs_match(expected, actual)
            if mode == "train":  # dropout is really on: another seed gives other outputs
                torch.manual_seed(99)
                first = next(iter(actual))
                assert not torch.equal(gm(**inputs)[first], actual[first])
        assert_grads_match(grads_of(model, eager_run), grads_of(model, graph_run), model)


@settings(max_examples=8, deadline=None)
@given(
    heads=st.sampled_from([1, 2, 4]), head_dim=st.sampled_from([4, 8]), layers=st.integers(1, 3),
    inner=st.sampled_from([None, 24]), act=st.sampled_from(["gelu_new", "relu", "gelu"]),
    inverse_layer=st.booleans(), tie=st.booleans(), attn=st.sampled_from(ATTNS),
    batch=st.integers(1, 3), length=st.integers(1, 20), pad=st.sampled_from([None, "right", "left"]),
)
def test_small_configs_match_eager(heads, head_dim, layers, inner, act, inverse_layer, tie, attn, batch, length, pad):
    model = build("GPT2LMHeadModel", attn, n_embd=heads * head_dim, n_head=heads, n_layer=layers, n_inner=inner,
                  activation_function=act, scale_attn_by_inverse_layer_idx=inverse_layer, tie_word_embeddings=tie)
    assert (model.lm_head.weight is model.transformer.wte.weight) == tie
    gm = trace(model)
    inputs = gpt2_inputs(input_names_of(gm), batch, length, seed=length, pad=pad)
    with torch.no_grad():
        assert_outputs_match(eager(model, inputs), gm(**inputs))
    if length > 1:  # a single token has no shifted label: the loss is 0/0 and its gradients NaN in both
        assert_grads_match(grads_of(model, lambda: eager(model, inputs)), grads_of(model, lambda: gm(**inputs)),
                           model)


def test_reorder_and_upcast_attn_is_refused_with_eager_attention_and_matches_with_sdpa():
    """transformers runs reorder_and_upcast_attn only in eager attention, where it preallocates the scores
    with torch.empty over the input's sizes: refused in one line naming the fix. SDPA ignores the option
    (in transformers too) and matches eager."""
    from fxconvert.errors import TraceError

    with pytest.raises(TraceError) as info:
        trace(build("GPT2LMHeadModel", "eager", reorder_and_upcast_attn=True))
    assert str(info.value) == (
        "cannot trace GPT2LMHeadModel: reorder_and_upcast_attn=True with eager attention allocates the attention "
        "scores from the input's sizes in Python, which a graph cannot record; convert with sdpa attention (which "
        "transformers runs without the reordering) or set reorder_and_upcast_attn=false in the config")
    model = build("GPT2LMHeadModel", "sdpa", reorder_and_upcast_attn=True, scale_attn_by_inverse_layer_idx=True)
    gm = trace(model)
    inputs = gpt2_inputs(input_names_of(gm), 2, 17, seed=4, pad="left")
    with torch.no_grad():
        assert_outputs_match(eager(model, inputs), gm(**inputs))
    assert_grads_match(grads_of(model, lambda: eager(model, inputs)), grads_of(model, lambda: gm(**inputs)), model)


@pytest.mark.parametrize("attn", ATTNS)
def test_unscaled_attention_matches_eager(attn):
    """scale_attn_weights=False: GPT-2 attends without the 1/sqrt(head_dim) factor."""
    model = build("GPT2LMHeadModel", attn, scale_attn_weights=False)
    gm = trace(model)
    inputs = gpt2_inputs(input_names_of(gm), 2, 17, seed=5)
    with torch.no_grad():
        assert_outputs_match(eager(model, inputs), gm(**inputs))
    assert_grads_match(grads_of(model, lambda: eager(model, inputs)), grads_of(model, lambda: gm(**inputs)), model)


# -- convert -----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def converted(case, tie=True):
    cls_name, names = CASES[case]
    model = build(cls_name, tie_word_embeddings=tie)
    return model, convert(model, input_names=names)


# The tied LM and the bare model: tests/test_family_conformance.py
@pytest.mark.parametrize("case,tie", [("LM", False), ("LM_token_types", True)])
def test_convert_matches_eager(case, tie):
    model, conv = converted(case, tie)
    names = conv.input_names
    placeholders = [n.target for n in conv.graph_module.graph.nodes if n.op == "placeholder"]
    owners = ["transformer.wte.weight", "lm_head.weight"]
    if CASES[case][0] == "GPT2LMHeadModel" and tie:
        # the tied weight is one placeholder, feeding the stateless lookup(s) and the head
        assert conv.shared_weights == {"shared_embed_weight": owners}
        assert placeholders == [*names, "shared_embed_weight", "training"]
        assert conv.module.shared_embed_weight is model.transformer.wte.weight
        assert "transformer.wte.weight" not in dict(conv.graph_module.named_parameters())
    else:  # an untied head (and the bare model's embedding) stays an ordinary parameter
        assert conv.shared_weights == {} and placeholders == [*names, "training"]
        if tie is False:
            assert any(p is model.lm_head.weight for p in conv.graph_module.parameters())
    assert {id(p) for p in conv.module.parameters()} == {id(p) for p in model.parameters()}
    for mode in ("eval", "train"):
        model.train(mode == "train")
        conv.module.train(mode == "train")
        try:
            for batch, length, pad in [(3, 11, "right"), (2, 30, "left"), (1, 1, None)]:
                inputs = gpt2_inputs(names, batch, length, seed=length, pad=pad)

                def run_eager():
                    torch.manual_seed(7)
                    return {conv.output_name: eager(model, inputs)[conv.output_name]}

                def run_converted():
                    torch.manual_seed(7)
                    return {conv.output_name: conv.module(**inputs)}

                with torch.no_grad():
                    assert_outputs_match(run_eager(), run_converted())
                if length > 1 or conv.output_name != "loss":
                    assert_grads_match(grads_of(model, run_eager), grads_of(model, run_converted), model)
        finally:
            model.eval()
            conv.module.eval()


# -- stages ------------------------------------------------------------------------------------

# Stages composing to the converted module: tests/test_family_conformance.py


def test_split_sizes_respect_n_positions():
    """Positions are looked up in wpe (n_positions rows): the split is judged at most at n_positions tokens,
    and a longer length is refused in one line, as for the other families with learned positions."""
    from fxconvert.stages import SplitError

    _, conv = converted("LM")
    assert split_stages(conv, 2).plan.sizes.encoder_length == POSITIONS
    with pytest.raises(SplitError, match=rf"^encoder_length 100 is longer than the model's n_positions "
                                         rf"\({POSITIONS}\); give a length of at most {POSITIONS}$"):
        split_stages(conv, 2, encoder_length=100)


@pytest.mark.parametrize("num_stages", [2, 3])
def test_stage_modules_as_the_pipeline_runs_them(num_stages):
    """Each stage on its own sends tensors only: the output shape GPT-2 computes before the first block and
    uses after the last is rebuilt by the last stage from input_ids' size, not sent. Summed over the
    copies, the shared weight's gradient is the converted module's; every other gradient matches as is."""
    conv = converted("LM")[1] if num_stages == 2 else convert(build("GPT2LMHeadModel", n_layer=3))
    stages = split_stages(conv, num_stages)
    modules = [stages.stage_module(i).train() for i in range(num_stages)]
    conv.module.train()
    try:
        inputs = gpt2_inputs(conv.input_names, 3, 13, seed=3)
        conv.module.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        expected = conv.module(**inputs)
        expected.backward()
        expected_grads = {n: p.grad.clone() for n, p in conv.module.named_parameters()}
        conv.module.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        values = ()
        for spec, module in zip(stages.specs, modules):
            values = module(*values, **{n: inputs[n] for n in spec.inputs})
            if spec.sent:
                assert all(isinstance(v, torch.Tensor) for v in values), spec.sent
        assert "input_ids" in stages.specs[-1].inputs  # for the output shape
        torch.testing.assert_close(values, expected, rtol=0, atol=1e-6)
        values.backward()
    finally:
        conv.module.eval()
    for name in expected_grads:
        copies = [dict(m.named_parameters())[name] for m in modules if name in dict(m.named_parameters())]
        # a shared weight has a copy in each stage that uses it, every other parameter lives in one stage
        assert len(copies) == (2 if name in conv.shared_weights else 1), name
        torch.testing.assert_close(sum(c.grad for c in copies), expected_grads[name], rtol=1e-5, atol=1e-6)


# The command line, and model.py and the stage files without transformers: tests/test_family_conformance.py


# -- presets -------------------------------------------------------------------------------------

def _published_parameters(n_embd, n_layer, vocab=50257, positions=1024):
    """GPT-2's parameter count: embeddings, per block two layer norms, c_attn, c_proj, c_fc, c_proj; ln_f."""
    block = 2 * 2 * n_embd + (3 * n_embd * n_embd + 3 * n_embd) + (n_embd * n_embd + n_embd) \
        + (4 * n_embd * n_embd + 4 * n_embd) + (4 * n_embd * n_embd + n_embd)
    return vocab * n_embd + positions * n_embd + n_layer * block + 2 * n_embd


@pytest.mark.parametrize("name,n_embd,n_head,n_layer", [
    ("gpt2", 768, 12, 12), ("openai-community/gpt2-medium", 1024, 16, 24), ("gpt2-large", 1280, 20, 36),
    ("openai-community/gpt2-xl", 1600, 25, 48),
])
def test_presets_are_the_published_architectures(name, n_embd, n_head, n_layer):
    loaded = load(name, offline=True, meta=True)
    model = loaded.model
    assert type(model).__name__ == "GPT2LMHeadModel" and loaded.source.origin == "preset"
    assert (model.config.n_embd, model.config.n_head, model.config.n_layer) == (n_embd, n_head, n_layer)
    assert (model.config.vocab_size, model.config.n_positions, model.config.activation_function) == (
        50257, 1024, "gelu_new")
    assert model.lm_head.weight is model.transformer.wte.weight
    assert sum(p.numel() for p in model.parameters()) == _published_parameters(n_embd, n_layer)


def test_preset_random_weights_warn_and_are_scaled_by_fan_in():
    with pytest.warns(RandomWeightsWarning, match="RANDOM WEIGHTS"):
        loaded = load("openai-community/gpt2", offline=True, allow_random=True)
    model = loaded.model
    assert loaded.source.random_weights and model.lm_head.weight is model.transformer.wte.weight
    block = model.transformer.h[0]
    # Conv1D stores (in, out): c_fc reads 768 features, the MLP's c_proj 3072
    for conv1d, fan_in in [(block.attn.c_attn, 768), (block.mlp.c_fc, 768), (block.mlp.c_proj, 3072)]:
        assert conv1d.weight.shape[0] == fan_in
        assert math.isclose(conv1d.weight.std().item(), fan_in ** -0.5, rel_tol=0.05)
    with torch.no_grad():
        out = model(input_ids=torch.arange(8)[None], use_cache=False).logits
    assert torch.isfinite(out).all()


# -- the config check ------------------------------------------------------------------------------

@pytest.mark.parametrize("key,value,rule", [
    ("n_embd", 30, "a multiple of n_head"),
    ("n_head", 0, "a positive integer"),
    ("n_layer", -1, "a positive integer"),
    ("n_inner", 0, "a positive integer up to 2147483647 (or null"),
    ("activation_function", "swishy", "an activation such as gelu_new"),
    ("attn_pdrop", 1.0, "a number in [0, 1)"),
    ("n_positions", 0, "a positive integer"),
    ("add_cross_attention", True, "false: fxconvert converts GPT-2 as a decoder-only model"),
])
def test_config_check_names_the_field(tmp_path, key, value, rule):
    from fxconvert.errors import ModelResolutionError

    config = tiny_config().to_dict()
    config.update({key: value, "architectures": ["GPT2LMHeadModel"]})
    path = tmp_path / "arch.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ModelResolutionError) as error:
        load(path, meta=True)
    message = str(error.value)
    assert f"{key} is {value!r}" in message and rule in message and "\n" not in message
