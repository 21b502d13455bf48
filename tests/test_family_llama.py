"""The Llama-style family (Llama, Qwen2, Mistral) against eager transformers.

Tiny configs (hidden 32, 2 layers, vocab 97) cover: an untied head with grouped-query attention
(Llama, 4 query heads on 2 kv heads), full multi-head attention with biases (Llama), a tied head
(Qwen2, the `shared_embed_weight` placeholder), Qwen2 with sliding-window layers
(use_sliding_window=True from layer 1), and Mistral's sliding window with one kv head. Windows
are 4 tokens, so the 40-token sequences run far past them. Every numerical check compares
outputs and every parameter gradient with the eager transformers model at 1e-5 in fp32; train
mode runs attention dropout 0.1 under the same seed in both.
"""

import copy
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from fxconvert import families
from fxconvert import convert
from fxconvert.errors import TraceError
from fxconvert.families import llama as llama_family
from fxconvert.trace import trace

from helpers import NO_TRANSFORMERS, assert_grads_match, assert_outputs_match, cli_convert, grads_of

REPO = Path(__file__).resolve().parent.parent
FAMILY = llama_family.FAMILY
VOCAB = FAMILY.tiny["vocab_size"]
CONFIGS = {"Llama": transformers.LlamaConfig, "Qwen2": transformers.Qwen2Config, "Mistral": transformers.MistralConfig}

# name -> (class prefix, overrides of the tiny config)
VARIANTS = {
    "llama_gqa": ("Llama", dict()),
    "llama_mha_bias": ("Llama", dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True)),
    "qwen2_tied": ("Qwen2", dict(tie_word_embeddings=True)),
    "qwen2_sliding": ("Qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "mistral_window": ("Mistral", dict(sliding_window=4, num_key_value_heads=1)),
}
SUFFIXES = ("Model", "ForCausalLM")


def tiny_config(prefix, attn="sdpa", **overrides):
    """The record's tiny Llama-style config (untied, 4 query heads on 2 kv heads, attention dropout 0.1) with
    the test's overrides, as `prefix`'s config class."""
    kwargs = {**FAMILY.tiny, **overrides}
    config = CONFIGS[prefix](**kwargs)
    config._attn_implementation = attn
    return config


def build(variant, suffix="ForCausalLM", attn="sdpa", seed=0, **overrides):
    prefix, variant_overrides = VARIANTS[variant]
    config = tiny_config(prefix, attn, **{**variant_overrides, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, prefix + suffix)._from_config(config, attn_implementation=attn)
    with torch.no_grad():  # transformers' init leaves norms at 1 and biases at 0: vary them
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def inputs_for(names, batch, length, seed=0, pad=True):
    """Random inputs; the mask pads the tail of the first sequence (pad="left": its head, as for
    generation, so the padded queries attend nothing), labels ignore one position."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if pad == "left" and length > 3:
        mask[0, :3] = 0
    elif pad and length > 2:
        mask[0, -2:] = 0
    labels = torch.randint(0, VOCAB, (batch, length), generator=g)
    if length > 1:
        labels[-1, 0] = -100
    pool = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return {n: pool[n] for n in names}


def eager(model, inputs):
    out = model(**inputs, use_cache=False)
    return {k: v for k, v in out.items() if v is not None and isinstance(v, torch.Tensor)}


def names_of(gm):
    return [n.target for n in gm.graph.nodes if n.op == "placeholder"]


# llama_gqa is the record's tiny config: tests/test_family_conformance.py traces, converts, splits and runs the
# command line on it (and on Qwen2's and Mistral's); here, the other variants.
OTHERS = [v for v in VARIANTS if v != "llama_gqa"]
MATRIX = [(v, s, a) for v in OTHERS for s in SUFFIXES for a in ("sdpa", "eager")]
IDS = ["-".join(row) for row in MATRIX]
# (batch, length, padding): one token, a sequence 10x the window, no padding, left padding
SHAPES = [(1, 1, False), (1, 7, True), (3, 40, True), (2, 9, False), (2, 9, "left")]


@functools.lru_cache(maxsize=None)
def traced(variant, suffix, attn):
    model = build(variant, suffix, attn)
    return model, trace(model)


# -- trace: outputs and gradients ------------------------------------------------------------------

@pytest.mark.parametrize("variant,suffix,attn", MATRIX, ids=IDS)
def test_trace_matches_eager(variant, suffix, attn):
    model, gm = traced(variant, suffix, attn)
    assert names_of(gm) == FAMILY.default_input_names(type(model).__name__)
    gm.graph.lint()
    for i, (batch, length, pad) in enumerate(SHAPES):
        inputs = inputs_for(names_of(gm), batch, length, seed=i, pad=pad)
        with torch.no_grad():
            assert_outputs_match(eager(model, inputs), gm(**inputs))
    for batch, length in [(3, 11), (2, 40)]:
        inputs = inputs_for(names_of(gm), batch, length, seed=length)
        expected = grads_of(model, lambda: eager(model, inputs))
        actual = grads_of(model, lambda: gm(**inputs))
        assert_grads_match(expected, actual, model)
    # the graph computes the rotary cos/sin from the buffer: no transformers function is called
    assert not [n for n in gm.graph.nodes if n.op == "call_function"
                and getattr(n.target, "__module__", "").startswith("transformers")]


@pytest.mark.parametrize("variant,attn", [(v, a) for v in OTHERS for a in ("sdpa", "eager")],
                         ids=[f"{v}-{a}" for v in OTHERS for a in ("sdpa", "eager")])
def test_train_mode_matches_eager_under_the_same_seed(variant, attn):
    model = build(variant, "ForCausalLM", attn).train()
    gm = trace(model)
    inputs = inputs_for(names_of(gm), 3, 11, seed=4)

    def seeded(fn):
        def run():
            torch.manual_seed(1234)
            return fn()
        return run

    with torch.no_grad():
        expected = seeded(lambda: eager(model, inputs))()
        actual = seeded(lambda: gm(**inputs))()
        torch.manual_seed(99)
        other = gm(**inputs)
    assert_outputs_match(expected, actual)
    assert not torch.equal(other["logits"], actual["logits"])  # attention dropout is really on
    assert_grads_match(grads_of(model, seeded(lambda: eager(model, inputs))),
                       grads_of(model, seeded(lambda: gm(**inputs))), model)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_inputs_embeds_instead_of_ids(attn):
    model = build("mistral_window", "ForCausalLM", attn)
    gm = trace(model, ["inputs_embeds", "attention_mask", "labels"])
    ids = inputs_for(["input_ids", "attention_mask", "labels"], 2, 13, seed=6)
    inputs = {"inputs_embeds": model.get_input_embeddings()(ids.pop("input_ids")).detach(), **ids}
    with torch.no_grad():
        assert_outputs_match(eager(model, inputs), gm(**inputs))
    expected = grads_of(model, lambda: eager(model, inputs))
    actual = grads_of(model, lambda: gm(**inputs))
    # every parameter but the (unused) token embedding gets a gradient, in both
    assert set(expected) == set(actual) == {n for n, _ in model.named_parameters()} - {"model.embed_tokens.weight"}
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


ROPE_SCALING = {
    "llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16),
    "linear": dict(rope_type="linear", factor=2.0),
    "yarn": dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=16),
}


@pytest.mark.parametrize("rope", list(ROPE_SCALING))
def test_scaled_rope_matches_eager(rope):
    """Rope scalings computed once at construction (Llama 3's among them) are in the inv_freq buffer."""
    model = build("llama_gqa", rope_scaling=dict(ROPE_SCALING[rope], rope_theta=1000.0))
    gm = trace(model)
    inputs = inputs_for(names_of(gm), 2, 40, seed=8)
    with torch.no_grad():
        assert_outputs_match(eager(model, inputs), gm(**inputs))
    assert_grads_match(grads_of(model, lambda: eager(model, inputs)), grads_of(model, lambda: gm(**inputs)), model)


@pytest.mark.parametrize("rope_type", llama_family.DYNAMIC_ROPE)
def test_dynamic_rope_is_refused_naming_the_fix(rope_type):
    """Built in Python (no config.json for the config check to read): the trace refuses it in one line."""
    rope = dict(rope_type=rope_type, factor=2.0, rope_theta=1000.0)
    if rope_type == "longrope":
        rope.update(short_factor=[1.0] * 4, long_factor=[2.0] * 4, original_max_position_embeddings=64)
    model = build("llama_gqa", rope_scaling=rope)
    with pytest.raises(TraceError) as info:
        trace(model)
    assert str(info.value) == (
        f"cannot trace LlamaForCausalLM: rope_type {rope_type!r} recomputes the rotary frequencies from each "
        f"input's length, which a graph cannot record; use a rope_type computed once, such as 'linear', 'yarn' "
        f"or 'llama3' (or no scaling)")


def test_sliding_window_masks_what_transformers_masks():
    """Past the window, Mistral differs from full causal attention (so the window is really applied)."""
    model, gm = traced("mistral_window", "Model", "sdpa")
    full = build("mistral_window", "Model", "sdpa", sliding_window=None)
    inputs = inputs_for(["input_ids", "attention_mask"], 2, 12, seed=3)
    with torch.no_grad():
        windowed = gm(**inputs)["last_hidden_state"]
        unwindowed = eager(full, inputs)["last_hidden_state"]
    torch.testing.assert_close(windowed[:, :4], unwindowed[:, :4], rtol=0, atol=1e-5)  # inside the window
    assert not torch.allclose(windowed[:, 4:], unwindowed[:, 4:], atol=1e-3)


def test_meta_device_mistral_7b_traces_without_weights():
    config = CONFIGS["Mistral"].from_dict(dict(FAMILY.presets["mistralai/Mistral-7B-v0.1"]))
    with torch.device("meta"):
        model = transformers.MistralForCausalLM(config).eval()
    gm = trace(model)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert names_of(gm) == ["input_ids", "attention_mask", "labels"]
    leaves = [n for n in gm.graph.nodes if n.op == "call_function" and n.target.__module__ == "fxconvert.runtime"]
    assert {n.target.__name__ for n in leaves} == {"sliding_window_causal_mask", "nothing_padded", "causal_attention"}
    assert leaves[0].kwargs["window"] == 4096
    assert {n.kwargs["window"] for n in leaves if n.target.__name__ == "causal_attention"} == {4096}


# -- a sweep of small configurations --------------------------------------------------------------

@st.composite
def small_configs(draw):
    prefix = draw(st.sampled_from(sorted(CONFIGS)))
    kv_heads = draw(st.sampled_from([1, 2]))
    heads = kv_heads * draw(st.sampled_from([1, 2, 3]))
    head_dim = draw(st.sampled_from([2, 4, 8]))
    overrides = dict(num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                     hidden_size=4 * heads * draw(st.integers(1, 2)), intermediate_size=draw(st.sampled_from([8, 24])),
                     num_hidden_layers=draw(st.integers(1, 2)), tie_word_embeddings=draw(st.booleans()),
                     hidden_act=draw(st.sampled_from(["silu", "gelu"])))
    if prefix == "Mistral":
        overrides["sliding_window"] = draw(st.sampled_from([None, 1, 3, 16]))
    if prefix == "Qwen2" and draw(st.booleans()):
        overrides.update(use_sliding_window=True, sliding_window=draw(st.integers(1, 5)), max_window_layers=0)
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 12)))
    return prefix, overrides, draw(st.sampled_from(["sdpa", "eager"])), shape, draw(st.booleans())


@settings(max_examples=10, deadline=None)
@given(small_configs())
def test_small_configs_match_eager(case):
    prefix, overrides, attn, (batch, length), pad = case
    config = tiny_config(prefix, attn, **overrides)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()
    gm = trace(model)
    inputs = inputs_for(names_of(gm), batch, length, seed=length, pad=pad)
    with torch.no_grad():
        assert_outputs_match(eager(model, inputs), gm(**inputs))
    assert_grads_match(grads_of(model, lambda: eager(model, inputs)), grads_of(model, lambda: gm(**inputs)), model)


# -- convert --------------------------------------------------------------------------------------

def output_and_grads(module, run, seed):
    module.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = run()
    out.float().sum().backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    return out.detach(), grads


@pytest.mark.parametrize("variant", OTHERS)
def test_convert_matches_eager(variant):
    model = build(variant)
    reference = copy.deepcopy(model)
    c = convert(model, input_names=["input_ids", "attention_mask", "labels"])
    tied = model.config.tie_word_embeddings
    placeholders = [n.target for n in c.graph_module.graph.nodes if n.op == "placeholder"]
    if tied:
        assert c.shared_weights == {"shared_embed_weight": ["model.embed_tokens.weight", "lm_head.weight"]}
        assert placeholders == ["input_ids", "attention_mask", "labels", "shared_embed_weight", "training"]
    else:
        assert c.shared_weights == {}
        assert placeholders == ["input_ids", "attention_mask", "labels", "training"]
        assert dict(c.module.named_parameters())["graph_module.lm_head.weight"] is model.lm_head.weight
    assert c.output_name == "loss"
    by_id = {id(p): n for n, p in model.named_parameters()}
    names = {n: ("model.embed_tokens.weight" if n == "shared_embed_weight" else by_id[id(p)])
             for n, p in c.module.named_parameters()}
    eval_losses = []
    for mode in ("eval", "train"):
        c.module.train(mode == "train")
        reference.train(mode == "train")
        for i, (batch, length, pad) in enumerate(SHAPES):
            inputs = inputs_for(c.input_names, batch, length, seed=i, pad=pad)
            got, got_grads = output_and_grads(c.module, lambda: c.module(**inputs), seed=i)
            want, want_grads = output_and_grads(reference, lambda: eager(reference, inputs)["loss"], seed=i)
            where = f"{mode} {batch}x{length}"
            # one token leaves no label after the shift: the loss is NaN in both (mean over nothing)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5, equal_nan=True, msg=lambda m: f"{where}: {m}")
            if mode == "eval":
                eval_losses.append(got)
            elif length > 1:  # an eval-mode trace still drops out in training (the flag and the rate are lifted)
                assert not torch.equal(got, eval_losses[i]), where
            assert sorted(names[n] for n in got_grads) == sorted(want_grads), where
            for n, g in got_grads.items():
                torch.testing.assert_close(g, want_grads[names[n]], atol=1e-5, rtol=1e-4, equal_nan=True,
                                           msg=lambda m, n=n: f"{where} {n}: {m}")


def test_convert_bare_model_keeps_the_hidden_state():
    model = build("qwen2_tied", "Model")
    c = convert(model)
    assert c.input_names == ["input_ids", "attention_mask"] and c.output_name == "last_hidden_state"
    assert c.shared_weights == {}  # a bare model holds the embedding once
    inputs = inputs_for(c.input_names, 2, 9)
    with torch.no_grad():
        torch.testing.assert_close(c.module(**inputs), eager(model, inputs)["last_hidden_state"], rtol=0, atol=1e-5)


# -- model.py without transformers ----------------------------------------------------------------

RUNNER = r"""
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("model", sys.argv[1] + "/model.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
cases = torch.load(sys.argv[1] + "/../cases.pt")
model = module.load()
inputs = cases["inputs"]
with torch.no_grad():
    out = model(**inputs)
    values = ()
    for i in range(2):  # the stage files, chained as the pipeline runs them
        spec = importlib.util.spec_from_file_location(f"stage_{i}", f"{sys.argv[1]}/stage_{i}.py")
        stage_module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(stage_module)
        stage = stage_module.load()
        values = (stage(*values, *(inputs[k] for k in stage_module.INPUTS)) if i == 0 else
                  stage(*values, **{k: inputs[k] for k in stage_module.INPUTS}))
assert "transformers" not in sys.modules
print(max(abs(out - cases["expected"]).max().item(), abs(values - cases["expected"]).max().item()))
"""


@pytest.mark.parametrize("variant", ["qwen2_tied", "mistral_window"])
def test_written_model_and_stages_run_without_transformers(variant, tmp_path):
    model = build(variant)
    c = convert(model)
    c.save(tmp_path / "out", stages=2)
    inputs = inputs_for(c.input_names, 2, 13)
    with torch.no_grad():
        torch.save({"inputs": inputs, "expected": eager(model, inputs)["loss"]}, tmp_path / "cases.pt")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", NO_TRANSFORMERS + RUNNER, str(tmp_path / "out")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.strip().splitlines()[-1]) <= 1e-5


# -- the record -----------------------------------------------------------------------------------

def test_record_is_registered():
    assert families.family_of_class("MistralForCausalLM") is FAMILY
    assert families.family_of_model_type("qwen2") is FAMILY
    assert set(FAMILY.classes) == {p + s for p in CONFIGS for s in SUFFIXES}
    for path, block in [("model.layers.3.mlp.up_proj", "model.layers.3"), ("layers.0", "layers.0"),
                        ("layers.12.self_attn", "layers.12")]:
        assert FAMILY.block_of(path) == (0, int(block.rsplit(".", 1)[1]), block)
    for path in ("model.norm", "lm_head", "model.embed_tokens", "model.layers", "xlayers.1"):
        assert FAMILY.block_of(path) is None


# Published parameter counts of the presets (their model cards), to 1%.
PRESET_PARAMS = {"TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T": 1.100e9, "meta-llama/Llama-2-7b-hf": 6.738e9,
                 "Qwen/Qwen2-0.5B": 0.494e9, "mistralai/Mistral-7B-v0.1": 7.242e9}


@pytest.mark.parametrize("name", list(PRESET_PARAMS))
def test_preset_architectures(name):
    config_dict = dict(FAMILY.presets[name])
    prefix = llama_family._PREFIX[config_dict["model_type"]]
    config = CONFIGS[prefix].from_dict(config_dict)
    with torch.device("meta"):
        model = getattr(transformers, config_dict["architectures"][0])(config)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - PRESET_PARAMS[name]) / PRESET_PARAMS[name] < 0.01, n
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == config_dict["tie_word_embeddings"]
    gm = trace(model.eval())  # every preset traces on the meta device, without weights
    assert names_of(gm) == ["input_ids", "attention_mask", "labels"]
    assert sum(n.op == "call_module" and n.target.endswith("self_attn.o_proj") for n in gm.graph.nodes) == \
        config_dict["num_hidden_layers"]


# -- stages ---------------------------------------------------------------------------------------

def run_with_grads(module, inputs, seed=0):
    module.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = module(**inputs)
    out.float().sum().backward()
    grads = {id(p): p.grad.detach().clone() for p in module.parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    return out.detach(), grads


@functools.lru_cache(maxsize=None)
def conversion(variant, suffix="ForCausalLM"):
    return convert(build(variant, suffix, num_hidden_layers=4))


STAGE_CASES = [("llama_gqa", "ForCausalLM", 2), ("qwen2_tied", "ForCausalLM", 3), ("mistral_window", "ForCausalLM", 4),
               ("qwen2_tied", "Model", 2)]


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("variant,suffix,num_stages", STAGE_CASES, ids=["-".join(map(str, c)) for c in STAGE_CASES])
def test_stages_cut_at_the_layers_and_compose_to_the_converted_module(variant, suffix, num_stages, mode):
    from fxconvert.stages import split_stages, stage_table

    conv = conversion(variant, suffix)
    stages = split_stages(conv, num_stages, balance="params")
    prefix = "model.layers" if suffix == "ForCausalLM" else "layers"
    blocks = [b for row in stage_table(stages) for b in row["blocks"]]
    assert blocks == [f"{prefix}.{i}" for i in range(4)]
    whole = conv.module
    names = {id(p): n for n, p in whole.named_parameters()}
    assert sorted(id(p) for p in stages.parameters()) == sorted(names)
    for module in (whole, stages):
        module.train(mode == "train")
    try:
        inputs = inputs_for(conv.input_names, 3, 11, seed=2)
        expected, expected_grads = run_with_grads(whole, inputs)
        actual, actual_grads = run_with_grads(stages, inputs)
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)
        assert set(actual_grads) == set(expected_grads)
        for key, grad in expected_grads.items():
            torch.testing.assert_close(actual_grads[key], grad, rtol=0, atol=1e-6, msg=lambda m, k=key: f"{names[k]}: {m}")
    finally:
        whole.eval()


def test_tied_weight_reaches_the_first_and_last_stage():
    from fxconvert.stages import split_stages, stage_table

    rows = stage_table(split_stages(conversion("qwen2_tied"), 3, balance="params"))
    assert rows[0]["receives_shared_weight"] and rows[-1]["receives_shared_weight"]
    assert not rows[1]["receives_shared_weight"]
    untied = stage_table(split_stages(conversion("llama_gqa"), 2, balance="params"))
    assert not any(r["receives_shared_weight"] for r in untied)


# -- load and the command line --------------------------------------------------------------------

def test_presets_load_on_the_meta_device_and_the_large_ones_by_themselves():
    from fxconvert.load import RandomWeightsWarning, load

    for name in ("TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T", "TinyLlama/TinyLlama_v1.1", "Qwen/Qwen2-0.5B"):
        loaded = load(name, meta=True, offline=True)
        assert loaded.source.origin == "preset" and loaded.source.device == "meta"
    for name, cls in (("meta-llama/Llama-2-7b-hf", "LlamaForCausalLM"), ("mistralai/Mistral-7B-v0.1", "MistralForCausalLM")):
        with pytest.warns(RandomWeightsWarning, match="meta device"):
            loaded = load(name, offline=True, allow_random=True)  # over META_THRESHOLD: no weights in memory
        assert type(loaded.model).__name__ == cls and loaded.source.device == "meta"


def test_random_weights_recompute_the_rotary_frequencies(tmp_path):
    """A config file builds with fast random weights; the rotary buffer is transformers' own value."""
    from fxconvert.load import RandomWeightsWarning, load

    reference = build("qwen2_tied", rope_theta=500.0)
    path = tmp_path / "arch.json"
    path.write_text(reference.config.to_json_string())
    with pytest.warns(RandomWeightsWarning, match="RANDOM WEIGHTS"):
        loaded = load(path, allow_random=True)
    model = loaded.model
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq, rtol=0, atol=0)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not any(p.isnan().any() for p in model.parameters())


@pytest.mark.parametrize("variant", ["qwen2_tied", "mistral_window"])
def test_cli_converts_a_checkpoint_splits_and_validates(variant, tmp_path, capsys):
    model = build(variant)
    out = tmp_path / "out"
    report = cli_convert(model, tmp_path, capsys, "--stages", 2)
    assert [b for r in report["stages"] for b in r["blocks"]] == ["model.layers.0", "model.layers.1"]
    inputs = [i["name"] for i in report["io"]["inputs"]]
    tied = model.config.tie_word_embeddings
    assert inputs == ["input_ids", "attention_mask", "labels"] + (["shared_embed_weight"] if tied else []) + ["training"]
    assert {"model.py", "weights.safetensors", "stage_0.py", "stage_1.py"} <= set(os.listdir(out))


# -- pipeline training (torchrun) -----------------------------------------------------------------

def causal_batch(rows, batch_size, k, pad_token_id):
    """Batch k of a decoder-only run, from the training contract: lines k*B .. k*B+B-1 (wrapping), each its
    input followed by its target as one sequence, right-padded (pad_token_id, mask 0); labels are the
    sequence with the input's positions and the padding at -100 (the model shifts them itself)."""
    picked = [rows[i % len(rows)] for i in range(k * batch_size, k * batch_size + batch_size)]
    width = max(len(r["input_ids"]) + len(r["labels"]) for r in picked)
    input_ids = torch.full((len(picked), width), pad_token_id)
    mask = torch.zeros((len(picked), width), dtype=torch.long)
    labels = torch.full((len(picked), width), -100)
    for i, r in enumerate(picked):
        n, m = len(r["input_ids"]), len(r["labels"])
        input_ids[i, :n + m] = torch.tensor(r["input_ids"] + r["labels"])
        mask[i, :n + m] = 1
        labels[i, n:n + m] = torch.tensor(r["labels"])
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


@pytest.mark.xdist_group("ranks")
def test_pipeline_training_matches_eager_training(tmp_path):
    """2 ranks x 2 stages, 1f1b, 2 microbatches, 3 SGD steps of a tied Qwen2 (dropout 0) against eager
    Qwen2ForCausalLM trained in one process on the same batches: the loss at every step and the exported
    weights within 1e-5."""
    import train_runs as tr

    model = build("qwen2_tied", attention_dropout=0.0, pad_token_id=0)
    model.save_pretrained(tmp_path / "ckpt")
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(12):
        source, target = int(torch.randint(1, 8, (1,), generator=g)), int(torch.randint(1, 6, (1,), generator=g))
        rows.append({"input_ids": torch.randint(1, VOCAB, (source,), generator=g).tolist(),
                     "labels": torch.randint(1, VOCAB, (target,), generator=g).tolist()})
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    steps, batch, microbatches, lr = 3, 4, 2, 0.5
    proc = tr.torchrun(2, tmp_path / "ckpt", "--data", tmp_path / "train.jsonl", "--out", tmp_path / "run",
                       "--steps", steps, "--batch", batch, "--microbatches", microbatches, "--optimizer", "sgd",
                       "--lr", lr, "--schedule", "1f1b", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    eager_model = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "ckpt").train()
    optimizer = torch.optim.SGD(eager_model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        optimizer.zero_grad()
        b = causal_batch(rows, batch, step, pad_token_id=0)
        total = 0.0
        for i in range(microbatches):
            loss = eager_model(**{k: torch.tensor_split(v, microbatches)[i] for k, v in b.items()}, use_cache=False).loss
            (loss / microbatches).backward()
            total += loss.item() / microbatches
        optimizer.step()
        losses.append(total)
    got = [m["loss"] for m in tr.metrics(tmp_path / "run")]
    assert got == pytest.approx(losses, abs=1e-5)
    trained = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "run" / "hf")
    assert trained.lm_head.weight is trained.model.embed_tokens.weight
    want = eager_model.state_dict()
    for name, t in trained.state_dict().items():
        torch.testing.assert_close(t, want[name], rtol=0, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("changes,message", [
    (dict(num_key_value_heads=3), r"num_key_value_heads is 3; set it to a positive divisor of num_attention_heads \(4\)"),
    (dict(num_attention_heads=5), r"num_attention_heads is 5; set it to a divisor of hidden_size \(32\)"),
    (dict(head_dim=7), r"head_dim is 7; set it to a positive even integer"),
    (dict(hidden_size=36, num_attention_heads=4, num_key_value_heads=4, head_dim=None), r"num_attention_heads is 4; .* is odd"),
    (dict(sliding_window=0), r"sliding_window is 0; set it to a positive integer up to 2147483647, or null"),
    (dict(sliding_window=10**30), r"sliding_window is 10{30}; set it to a positive integer up to 2147483647, or "
                                  r"null for full causal attention in the config$"),
    (dict(rope_theta=0), r"rope_theta is 0; set it to a positive number, the rotary base \(Llama 2 uses 10000.0\) "
                         r"in the config$"),
    (dict(rope_theta=-1.0), r"rope_theta is -1.0; set it to a positive number"),
    (dict(rope_theta="x"), r"rope_theta is 'x'; set it to a positive number"),
    (dict(rope_theta=float("inf")), r"rope_theta is inf; set it to a positive number"),
    (dict(rope_parameters=dict(rope_type="default", rope_theta=-3.0)),
     r"rope_parameters is \{'rope_type': 'default', 'rope_theta': -3.0\}; set it to a dict whose rope_theta is a "
     r"positive number \(its rope_theta is -3.0\) in the config$"),
    (dict(rope_scaling=dict(rope_type="nonexistent", factor=2.0)),
     r"rope_scaling is .*; set it to a dict whose rope_type is one of 'default', 'linear', 'yarn', 'llama3'.* \(its "
     r"rope_type is 'nonexistent'\) in the config$"),
    (dict(rope_scaling=dict(rope_type="linear", factor=0)),
     r"rope_scaling is .*; set it to a dict whose factor is a positive number \(its factor is 0\)"),
    (dict(num_hidden_layers=0), r"num_hidden_layers is 0; set it to a positive integer"),
    (dict(attention_dropout=1.5), r"attention_dropout is 1.5; set it to a number in \[0, 1\)"),
    (dict(hidden_act="swishy"), r"hidden_act is 'swishy'; set it to an activation such as 'silu' \(Llama, Qwen2 and "
                                r"Mistral use 'silu'\) in the config$"),
    (dict(rope_scaling=dict(rope_type="dynamic", factor=2.0)),
     r"rope_scaling is .*; set it to a rope_type computed once, such as 'linear'.*dynamic/longrope rope recomputes"),
])
def test_config_check_names_the_field_and_the_fix(changes, message, tmp_path):
    from fxconvert.errors import ModelResolutionError
    from fxconvert.load import load

    config = json.loads(build("mistral_window").config.to_json_string())
    config.update(changes)
    (tmp_path / "arch.json").write_text(json.dumps(config))
    with pytest.raises(ModelResolutionError, match=message) as raised:
        load(tmp_path / "arch.json", allow_random=True)
    assert "\n" not in str(raised.value)


def test_sliding_layers_without_a_window_are_refused_as_transformers_cannot_run_them(tmp_path):
    """Qwen2 drops its window unless use_sliding_window is true: layers marked 'sliding_attention' then
    have none, and eager transformers fails on them. The config check names layer_types and the fix."""
    from fxconvert.errors import ModelResolutionError
    from fxconvert.load import load

    layer_types = ["sliding_attention", "full_attention"]
    model = build("qwen2_tied", layer_types=layer_types, sliding_window=4)
    with pytest.raises(ValueError, match="sliding_window"):
        eager(model, inputs_for(["input_ids"], 1, 9))
    config = json.loads(model.config.to_json_string())
    for use, window in ((False, 4), (True, None)):
        config.update(use_sliding_window=use, sliding_window=window, layer_types=layer_types)
        (tmp_path / "arch.json").write_text(json.dumps(config))
        with pytest.raises(ModelResolutionError) as raised:
            load(tmp_path / "arch.json", allow_random=True)
        assert str(raised.value) == (
            f"invalid config in {tmp_path / 'arch.json'}: layer_types is ['sliding_attention', 'full_attention']; "
            f"set it to 'full_attention' for every layer, or set use_sliding_window to true and sliding_window to "
            f"the window of the 'sliding_attention' layers")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_explicit_layer_types_match_eager(attn):
    """layer_types given in the config (a sliding layer before a full one, the reverse of max_window_layers')."""
    model = build("qwen2_sliding", attn=attn, layer_types=["sliding_attention", "full_attention"])
    gm = trace(model)
    inputs = inputs_for(names_of(gm), 2, 40, seed=9)
    with torch.no_grad():
        assert_outputs_match(eager(model, inputs), gm(**inputs))
    assert_grads_match(grads_of(model, lambda: eager(model, inputs)), grads_of(model, lambda: gm(**inputs)), model)


@pytest.mark.parametrize("dtype,attn", [("bfloat16", "sdpa"), ("float16", "eager")])
def test_cli_validates_half_precision(dtype, attn, tmp_path, capsys):
    """Rotary cos/sin are computed in float32 and cast, as transformers does; validation at the dtype's tolerance."""
    cli_convert(build("mistral_window"), tmp_path, capsys, "--dtype", dtype, "--attn", attn)


def test_mistral_ignores_layer_types_so_they_are_not_refused(tmp_path):
    """MistralConfig reads no layer_types (transformers only warns): the window alone decides."""
    from fxconvert.load import load

    config = json.loads(build("mistral_window", sliding_window=None).config.to_json_string())
    config.update(layer_types=["sliding_attention", "full_attention"], sliding_window=None)
    (tmp_path / "arch.json").write_text(json.dumps(config))
    assert load(tmp_path / "arch.json", meta=True).model.config.sliding_window is None
