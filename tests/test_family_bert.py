"""The BERT family (BertModel, BertForMaskedLM): its quirks, beyond what every family must do.

(Trace, convert, stages, the CLI and the written files of each class: tests/test_family_conformance.py.)
Here: inputs without token types or with embeddings, the pooler, the tied bias, three stages, config
checks, half precision, the presets.

Every numerical check compares with the eager transformers model at 1e-5 in fp32: outputs and
every parameter's gradient. Train mode keeps BERT's dropout (0.1 everywhere) and runs the
graph and eager under the same seed, so both draw the same masks (the graph records eager's
ops in eager's order). Shapes: batch 1 x length 1, a padded batch, a long sequence (40) and
an unpadded batch; sdpa and eager attention.
"""

import copy
import json
import warnings

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from fxconvert.analysis import find_shared_parameters
from fxconvert import convert
from fxconvert.families import family_of_class
from fxconvert.stages import SplitError, split_stages
from fxconvert.trace import trace

import helpers

VOCAB = family_of_class("BertForMaskedLM").tiny["vocab_size"]
CLASSES = ("BertModel", "BertForMaskedLM")
ATTN = ("sdpa", "eager")
# (batch, length, padded): length 1, a padded batch, a long sequence, nothing padded
SHAPES = [(1, 1, False), (2, 7, True), (3, 40, True), (2, 20, False)]
NAMES = {
    "BertModel": ["input_ids", "attention_mask", "token_type_ids"],
    "BertForMaskedLM": ["input_ids", "attention_mask", "token_type_ids", "labels"],
}


def bert_config(attn="sdpa", **overrides):
    """The record's tiny BERT (dropout 0.1 everywhere) with the test's overrides."""
    kwargs = {**family_of_class("BertForMaskedLM").tiny, **overrides}
    config = transformers.BertConfig(**kwargs)
    config._attn_implementation = attn
    return config


def build(cls_name="BertForMaskedLM", attn="sdpa", seed=0, **overrides):
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)._from_config(bert_config(attn, **overrides), attn_implementation=attn)
    with torch.no_grad():  # transformers initialises the MLM bias to zeros; make it matter
        for p in model.parameters():
            if p.dim() == 1 and not p.any():
                p.normal_()
    return model.eval()


def bert_inputs(names, batch, length, *, padded=True, seed=0, type_vocab=2, vocab=VOCAB):
    """Random inputs: the mask pads the tail of the first row, labels ignore (-100) some positions."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.long)
    if padded and length > 2:
        mask[0, -2:] = 0
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    if length > 1:
        labels[-1, -1] = -100
        labels[0, 0] = -100
    pool = {
        "input_ids": torch.randint(0, vocab, (batch, length), generator=g),
        "attention_mask": mask,
        "token_type_ids": torch.randint(0, type_vocab, (batch, length), generator=g),
        "labels": labels,
    }
    return {n: pool[n] for n in names}


def eager(model, inputs):
    return {k: v for k, v in model(**inputs).items() if v is not None}


def seeded(fn, seed):
    torch.manual_seed(seed)
    return fn()


def output_and_grads(module, run, seed=0):
    """Outputs (a dict, or one tensor) under `seed` and the gradients of their sum, by parameter identity."""
    module.zero_grad(set_to_none=True)
    out = seeded(run, seed)
    total = sum(v.float().sum() for v in out.values()) if isinstance(out, dict) else out.float().sum()
    total.backward()
    grads = {id(p): p.grad.detach().clone() for p in module.parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    detached = {k: v.detach() for k, v in out.items()} if isinstance(out, dict) else out.detach()
    return detached, grads


def assert_close(actual, expected, where=""):
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5, msg=lambda m: f"{where}: {m}")


def assert_grads(actual: dict, expected: dict, names: dict, where=""):
    assert set(actual) == set(expected), sorted(names.get(k, "?") for k in set(actual) ^ set(expected))
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-4, atol=1e-5,
                                   msg=lambda m, k=key: f"{where} {names.get(k)}: {m}")


def used_parameters(model) -> set:
    """Every parameter but the MLM bias registration that forward never reads when the head is untied."""
    return {id(p) for n, p in model.named_parameters() if n != "cls.predictions.bias" or _bias_tied(model)}


def _bias_tied(model):
    return model.cls.predictions.bias is model.cls.predictions.decoder.bias


# -- the record ---------------------------------------------------------------------------------------

def test_record():
    family = family_of_class("BertForMaskedLM")
    assert family is family_of_class("BertModel") and family.name == "bert"
    assert family.default_input_names("BertModel") == NAMES["BertModel"]
    assert family.default_input_names("BertForMaskedLM") == NAMES["BertForMaskedLM"]
    assert {n: family.inputs[n][1] for n in family.inputs} == dict.fromkeys(family.inputs, "encoder")
    assert family.inputs["token_type_ids"] == ("type_ids", "encoder")
    assert family.block_of("bert.encoder.layer.3.attention.self") == (0, 3, "bert.encoder.layer.3")
    assert family.block_of("encoder.layer.11") == (0, 11, "encoder.layer.11")
    assert family.block_of("bert.embeddings.word_embeddings") is None
    assert family.block_of("cls.predictions.decoder") is None
    assert family.max_length == "max_position_embeddings"
    assert family.objective.name == "masked"  # fxconvert.train: pre-tokenized lines, labels aligned (test_train_families)


# -- trace ------------------------------------------------------------------------------------------
# Every class with its default inputs, both attentions, eval and train, on the meta device:
# tests/test_family_conformance.py

@pytest.mark.parametrize("attn", ATTN)
def test_trace_without_token_type_ids_reads_the_zeros_buffer(attn):
    """Without token_type_ids BERT gathers its buffer of zeros at the positions: the graph does too."""
    model = build("BertForMaskedLM", attn)
    names = ["input_ids", "attention_mask", "labels"]
    gm = trace(model, names)
    assert "bert.embeddings.token_type_ids" in dict(gm.named_buffers())
    params = {id(p): n for n, p in model.named_parameters()}
    for batch, length, padded in SHAPES:
        inputs = bert_inputs(names, batch, length, padded=padded)
        want, want_grads = output_and_grads(model, lambda: eager(model, inputs))
        got, got_grads = output_and_grads(model, lambda: gm(**inputs))
        for k in want:
            assert_close(got[k], want[k], f"{batch}x{length} {k}")
        assert set(want_grads) == used_parameters(model)  # the zeros' row of token_type_embeddings too
        assert_grads(got_grads, want_grads, params, f"{batch}x{length}")


@pytest.mark.parametrize("attn", ATTN)
def test_trace_with_inputs_embeds(attn):
    model = build("BertModel", attn)
    gm = trace(model, ["inputs_embeds", "attention_mask", "token_type_ids"])
    for i, (batch, length, padded) in enumerate(SHAPES):
        inputs = bert_inputs(["attention_mask", "token_type_ids"], batch, length, padded=padded, seed=i)
        inputs = {"inputs_embeds": torch.randn(batch, length, 32, generator=torch.Generator().manual_seed(i)), **inputs}
        names = {id(p): n for n, p in model.named_parameters()}
        want, want_grads = output_and_grads(model, lambda: eager(model, inputs))
        got, got_grads = output_and_grads(model, lambda: gm(**inputs))
        for k in want:
            assert_close(got[k], want[k], f"{batch}x{length} {k}")
        assert_grads(got_grads, want_grads, names, f"{batch}x{length}")


# -- a sweep of small configurations ---------------------------------------------------------------

@settings(max_examples=6, deadline=None, derandomize=True)
@given(
    layers=st.integers(1, 3), heads=st.sampled_from([1, 2, 4]), head_dim=st.sampled_from([4, 8]),
    ff=st.sampled_from([8, 48]), type_vocab=st.integers(1, 3), act=st.sampled_from(["gelu", "relu", "gelu_new"]),
    tie=st.booleans(), attn=st.sampled_from(ATTN), cls_name=st.sampled_from(CLASSES),
    batch=st.integers(1, 3), length=st.integers(1, 12), padded=st.booleans(),
)
def test_sweep_of_small_configs(layers, heads, head_dim, ff, type_vocab, act, tie, attn, cls_name, batch, length,
                                padded):
    model = build(cls_name, attn, num_hidden_layers=layers, num_attention_heads=heads, hidden_size=heads * head_dim,
                  intermediate_size=ff, type_vocab_size=type_vocab, hidden_act=act, tie_word_embeddings=tie,
                  max_position_embeddings=16)
    c = convert(model, input_names=NAMES[cls_name])
    inputs = bert_inputs(NAMES[cls_name], batch, length, padded=padded, type_vocab=type_vocab)
    names = {id(p): n for n, p in model.named_parameters()}
    for mode in ("eval", "train"):
        model.train(mode == "train")
        c.module.train(mode == "train")
        want, want_grads = output_and_grads(model, lambda: eager(model, inputs)[c.output_name])
        got, got_grads = output_and_grads(c.module, lambda: c.module(**inputs))
        assert_close(got, want, mode)
        assert_grads(got_grads, want_grads, names, mode)


# -- convert ---------------------------------------------------------------------------------------
# Every class, both attentions, eval and train: tests/test_family_conformance.py

def test_pooler_output_can_be_the_kept_output():
    model = build("BertModel")
    c = convert(model, output="pooler_output")
    assert c.output_name == "pooler_output"
    names = {id(p): n for n, p in model.named_parameters()}
    for mode in ("eval", "train"):
        c.module.train(mode == "train")
        model.train(mode == "train")
        inputs = bert_inputs(c.input_names, 3, 11)
        got, got_grads = output_and_grads(c.module, lambda: c.module(**inputs))
        want, want_grads = output_and_grads(model, lambda: eager(model, inputs)["pooler_output"])
        assert_close(got, want, mode)
        assert_grads(got_grads, want_grads, names, mode)
        assert id(model.pooler.dense.weight) in got_grads


def test_tied_weight_and_bias_are_shared_placeholders():
    model = build("BertForMaskedLM")
    c = convert(model)
    placeholders = [n.target for n in c.graph_module.graph.nodes if n.op == "placeholder"]
    assert placeholders == [*NAMES["BertForMaskedLM"], "shared_embed_weight", "shared_cls_predictions_bias",
                            "training"]
    assert c.shared_weights == {
        "shared_embed_weight": ["bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight"],
        "shared_cls_predictions_bias": ["cls.predictions.bias", "cls.predictions.decoder.bias"],
    }
    assert c.module.shared_embed_weight is model.bert.embeddings.word_embeddings.weight
    assert c.module.shared_cls_predictions_bias is model.cls.predictions.bias
    # the lookup and the head read the one placeholder; the lookup is sparse, the head's use is dense
    weight = next(n for n in c.graph_module.graph.nodes if n.target == "shared_embed_weight")
    kinds = sorted(u.target.__name__ for u in weight.users)
    assert kinds == ["embedding", "linear"]
    # every parameter of the converted module is held once
    assert len(list(c.module.parameters())) == len(list(model.parameters()))


def test_untied_head_stays_a_parameter():
    model = build("BertForMaskedLM", tie_word_embeddings=False)
    assert find_shared_parameters(model) == []
    c = convert(model)
    assert c.shared_weights == {}
    held = {id(p) for p in c.module.parameters()}
    assert id(model.cls.predictions.decoder.weight) in held and id(model.cls.predictions.decoder.bias) in held
    inputs = bert_inputs(c.input_names, 2, 9)
    with torch.no_grad():
        assert_close(c.module(**inputs), eager(model, inputs)["loss"])


def test_head_weight_untied_by_hand_keeps_the_shared_bias():
    """A head whose weight was untied but whose bias is still `cls.predictions.bias`: only the bias is lifted."""
    model = build("BertForMaskedLM")
    decoder = model.cls.predictions.decoder
    decoder.weight = torch.nn.Parameter(decoder.weight.detach().clone() + 0.5)
    reference = copy.deepcopy(model)
    c = convert(model)
    assert list(c.shared_weights) == ["shared_cls_predictions_bias"]
    by_id = {id(p): n for n, p in model.named_parameters()}
    ref_params = dict(reference.named_parameters())
    for mode in ("eval", "train"):
        c.module.train(mode == "train")
        reference.train(mode == "train")
        inputs = bert_inputs(c.input_names, 2, 9)
        got, got_grads = output_and_grads(c.module, lambda: c.module(**inputs))
        want, want_grads = output_and_grads(reference, lambda: eager(reference, inputs)["loss"])
        assert_close(got, want, mode)
        want_by_name = {n: want_grads[id(p)] for n, p in ref_params.items() if id(p) in want_grads}
        assert {by_id[k] for k in got_grads} == set(want_by_name)
        for k, g in got_grads.items():
            torch.testing.assert_close(g, want_by_name[by_id[k]], rtol=1e-4, atol=1e-5)


# -- stages ----------------------------------------------------------------------------------------

# Three layers, split unevenly and evenly (two layers in two stages: tests/test_family_conformance.py)
STAGE_CASES = [("BertForMaskedLM", 2), ("BertForMaskedLM", 3), ("BertModel", 2)]


@pytest.mark.parametrize("cls_name,num_stages", STAGE_CASES, ids=[f"{c}-{n}" for c, n in STAGE_CASES])
def test_stages_cut_at_layers_and_equal_the_converted_module(cls_name, num_stages):
    model = build(cls_name, num_hidden_layers=3)
    c = convert(model, input_names=NAMES[cls_name])
    stages = split_stages(c, num_stages)
    prefix = "bert." if cls_name == "BertForMaskedLM" else ""
    blocks = [b for spec in stages.specs for b in spec.blocks]
    assert blocks == [f"{prefix}encoder.layer.{i}" for i in range(3)]
    names = {id(p): n for n, p in c.module.named_parameters()}
    assert sorted(id(p) for p in stages.parameters()) == sorted(names)
    for mode in ("eval", "train"):
        for module in (c.module, stages):
            module.train(mode == "train")
        for i, (batch, length, padded) in enumerate(SHAPES[1:3]):
            inputs = bert_inputs(c.input_names, batch, length, padded=padded, seed=i)
            want, want_grads = output_and_grads(c.module, lambda: c.module(**inputs), seed=i)
            got, got_grads = output_and_grads(stages, lambda: stages(**inputs), seed=i)
            assert_close(got, want, mode)
            assert_grads(got_grads, want_grads, names, mode)


def test_split_sizes_respect_max_position_embeddings():
    """The split is judged at 512 tokens by default: a model with fewer positions is judged at its own limit,
    and a longer length is refused in one line."""
    c = convert(build("BertForMaskedLM", max_position_embeddings=64))
    stages = split_stages(c, 2)
    assert stages.plan.sizes.encoder_length == 64
    with pytest.raises(SplitError, match=r"^encoder_length 100 is longer than the model's max_position_embeddings "
                                         r"\(64\); give a length of at most 64$"):
        split_stages(c, 2, encoder_length=100)


def test_stage_modules_as_the_pipeline_runs_them():
    """Each stage on its own with its own copies of the shared weights (what a pipeline rank holds): summed
    over the copies, the shared gradients are the converted module's; the loss and every other gradient match."""
    c = convert(build("BertForMaskedLM", num_hidden_layers=3))
    stages = split_stages(c, 3)
    modules = [stages.stage_module(i).train() for i in range(3)]
    assert [sorted(spec.shared_weights) for spec in stages.specs] == [
        ["shared_embed_weight"], [], ["shared_cls_predictions_bias", "shared_embed_weight"]]
    c.module.train()
    inputs = bert_inputs(c.input_names, 3, 11)
    expected, expected_grads = output_and_grads(c.module, lambda: c.module(**inputs))
    torch.manual_seed(0)
    values = ()
    for spec, module in zip(stages.specs, modules):
        values = module(*values, **{n: inputs[n] for n in spec.inputs})
    assert_close(values, expected)
    values.backward()
    for name, param in c.module.named_parameters():
        copies = [dict(m.named_parameters())[name] for m in modules if name in dict(m.named_parameters())]
        assert len(copies) == (2 if name == "shared_embed_weight" else 1), name
        grad = sum(twin.grad for twin in copies)
        torch.testing.assert_close(grad, expected_grads[id(param)], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


# -- the command line and the written files --------------------------------------------------------
# model.py and the stage files without transformers: tests/test_family_conformance.py

@pytest.mark.parametrize("changes,message", [
    (dict(hidden_size=30), r"hidden_size.*a multiple of num_attention_heads \(4\)"),
    (dict(num_attention_heads=0), r"num_attention_heads"),
    (dict(type_vocab_size=0), r"type_vocab_size"),
    (dict(attention_probs_dropout_prob=1.5), r"attention_probs_dropout_prob"),
    (dict(hidden_act="nope"), r"hidden_act.*'gelu'"),
    (dict(add_cross_attention=True), r"add_cross_attention.*without cross-attention"),
])
def test_config_checks_refuse_in_one_line(tmp_path, changes, message):
    from fxconvert.errors import ModelResolutionError
    from fxconvert.load import load

    config = {**bert_config().to_dict(), "architectures": ["BertForMaskedLM"], **changes}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelResolutionError, match=message) as info:
        load(tmp_path / "config.json", meta=True)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("attn", ATTN)
def test_relative_position_types_are_ignored_by_transformers_so_accepted(attn, tmp_path):
    """Why relative_key is accepted: eager transformers 5 computes absolute positions whatever the field says
    (same outputs and gradients as 'absolute', and no distance embedding), so the conversion is the model
    transformers runs; a checkpoint trained with relative positions holds distance embeddings, which the
    load refuses as weights the model does not have. A transformers that builds them refuses the field."""
    from fxconvert.errors import ModelResolutionError
    from fxconvert.families.bert import honours_position_embedding_type
    from fxconvert.load import load
    from safetensors.torch import load_file, save_file

    config = {**bert_config().to_dict(), "architectures": ["BertForMaskedLM"],
              "position_embedding_type": "relative_key"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    if honours_position_embedding_type():
        with pytest.raises(ModelResolutionError, match="position_embedding_type is 'relative_key'; set it to "
                                                       "'absolute'"):
            load(tmp_path / "config.json", meta=True)
        return
    relative, absolute = build(attn=attn, position_embedding_type="relative_key"), build(attn=attn)
    assert not any("distance_embedding" in n for n, _ in relative.named_parameters())
    inputs = bert_inputs(NAMES["BertForMaskedLM"], 2, 9)
    want, want_grads = output_and_grads(absolute, lambda: eager(absolute, inputs))
    got, got_grads = output_and_grads(relative, lambda: eager(relative, inputs))
    for k in want:
        assert_close(got[k], want[k], k)
    assert [g for g in got_grads.values()] and all(torch.equal(a, b) for a, b in zip(got_grads.values(),
                                                                                     want_grads.values()))
    assert type(load(tmp_path / "config.json", meta=True).model).__name__ == "BertForMaskedLM"
    relative.save_pretrained(tmp_path / "trained")  # as trained with relative positions: distance embeddings
    weights = load_file(tmp_path / "trained" / "model.safetensors")
    weights["bert.encoder.layer.0.attention.self.distance_embedding.weight"] = torch.zeros(1023, 8)
    save_file(weights, tmp_path / "trained" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelResolutionError, match="the weights have bert.encoder.layer.0.attention.self."
                                                   "distance_embedding.weight, which the model does not"):
        load(tmp_path / "trained", offline=True)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cli_validates_half_precision_and_eager_attention(tmp_path, capsys, dtype):
    report = helpers.cli_convert(build("BertForMaskedLM"), tmp_path, capsys, "--dtype", dtype, "--attn", "eager")
    assert report["model"]["attention"] == "eager"


# -- presets ---------------------------------------------------------------------------------------

PUBLISHED = {  # (vocab_size, hidden_size, intermediate_size, num_attention_heads, num_hidden_layers)
    "bert-base-uncased": (30522, 768, 3072, 12, 12),
    "bert-large-uncased": (30522, 1024, 4096, 16, 24),
    "bert-base-cased": (28996, 768, 3072, 12, 12),
}


def _sizes(config):
    return (config.vocab_size, config.hidden_size, config.intermediate_size, config.num_attention_heads,
            config.num_hidden_layers)


@pytest.mark.parametrize("name", [*PUBLISHED, *(f"google-bert/{n}" for n in PUBLISHED)])
def test_presets_describe_the_published_architectures(name):
    from fxconvert.load import load

    loaded = load(name, meta=True)
    assert type(loaded.model).__name__ == "BertForMaskedLM"
    assert _sizes(loaded.model.config) == PUBLISHED[name.removeprefix("google-bert/")]
    assert loaded.model.config.max_position_embeddings == 512 and loaded.model.config.type_vocab_size == 2


def test_preset_loads_with_random_weights_and_warns():
    from fxconvert.load import RandomWeightsWarning, load

    with pytest.warns(RandomWeightsWarning, match="RANDOM WEIGHTS"):
        loaded = load("bert-base-uncased", allow_random=True)
    model = loaded.model
    assert loaded.source.random_weights and loaded.source.origin == "preset"
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert torch.equal(model.bert.embeddings.position_ids[0, :5], torch.arange(5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = convert(model)
    assert "shared_embed_weight" in c.shared_weights

# Pipeline training through fxconvert.train (masked-LM data): tests/test_train_families.py.


# Config fields the API and the command line once judged differently. Accepted: is_decoder (the
# self-attention turns causal, in eager and in the graph alike) and position_embedding_type where
# the installed transformers ignores it (transformers 5). Refused by both: cross-attention.
SAME_OUTCOME = [
    ("BertModel", dict(is_decoder=True)),
    ("BertForMaskedLM", dict(is_decoder=True)),
    ("BertModel", dict(position_embedding_type="relative_key")),
    ("BertForMaskedLM", dict(position_embedding_type="relative_key_query")),
    ("BertModel", dict(is_decoder=True, add_cross_attention=True)),
]


@pytest.mark.parametrize("cls_name,fields", SAME_OUTCOME, ids=lambda v: v if isinstance(v, str) else
                         "-".join(f"{k}={w}" for k, w in v.items()))
def test_the_api_and_the_command_line_judge_a_config_alike(cls_name, fields, tmp_path, capsys):
    from fxconvert.cli import main
    from fxconvert.errors import ModelResolutionError
    from fxconvert.families.bert import honours_position_embedding_type

    refused = "add_cross_attention" in fields or (
        "position_embedding_type" in fields and honours_position_embedding_type())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' note that BertForMaskedLM is bidirectional
        model = build(cls_name, **fields)
    model.save_pretrained(tmp_path / "ckpt")
    code = main([str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"), "--format", "json", "--offline"])
    stdout, err = capsys.readouterr()
    reference = copy.deepcopy(model)
    if refused:
        field = next(k for k in ("add_cross_attention", "position_embedding_type") if k in fields)
        assert code == 1 and f"{field} is " in err, err
        with pytest.raises(ModelResolutionError, match=f"invalid config in the {cls_name}'s config: {field} is "):
            convert(model, input_names=NAMES[cls_name])
        return
    assert code == 0, err
    assert json.loads(stdout)["validation"]["passed"] is True  # the command line's check against eager
    c = convert(model, input_names=NAMES[cls_name])
    output = "loss" if cls_name == "BertForMaskedLM" else "last_hidden_state"
    for mode in ("eval", "train"):
        c.module.train(mode == "train")
        reference.train(mode == "train")
        for i, (batch, length, padded) in enumerate(SHAPES):
            inputs = bert_inputs(c.input_names, batch, length, padded=padded, seed=i)
            torch.manual_seed(i)
            got = c.module(**inputs)
            torch.manual_seed(i)
            assert_close(got, eager(reference, inputs)[output], f"{mode} {batch}x{length}")
