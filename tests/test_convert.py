"""Tests of `fxconvert.convert`: the pre-partitioning GraphModule, the ConvertedModule that owns the
shared weights, the pass records, and end-to-end agreement with the eager transformers model (outputs,
every gradient, an optimizer step) for every class and config variant, in eval and train mode."""

import copy

import pytest
import torch
import transformers

from fxconvert import Conversion, ConvertedModule, convert
from fxconvert.errors import InputNameError, ModelResolutionError, TraceError, UsageError
from fxconvert.trace import trace

from helpers import CLASSES, VARIANTS, build, eager_outputs, random_inputs
from passes.common import untie_lm_head

PIPELINE = ["RemoveNoneChecksPass", "LiftTrainingFlagPass", "LiftSharedWeightsPass", "KeepSingleOutputPass",
            "SparsifySharedLookupsPass"]
DEFAULT_INPUTS = {
    "ForConditionalGeneration": ["input_ids", "attention_mask", "decoder_input_ids", "labels"],
    "EncoderModel": ["input_ids", "attention_mask"],
    "Model": ["input_ids", "attention_mask", "decoder_input_ids"],
}
# (batch, encoder length, decoder length): length 1, and lengths past relative_attention_max_distance (16)
# on either side, with encoder and decoder lengths that differ.
SHAPES = [(1, 1, 1), (2, 19, 4), (2, 5, 23)]


def default_inputs(cls_name):
    return next(names for suffix, names in DEFAULT_INPUTS.items() if cls_name.endswith(suffix))


def placeholders(gm):
    return [n.target for n in gm.graph.nodes if n.op == "placeholder"]


def eager_names(model):
    """Tensor identity -> the name eager's (deduplicated) named_parameters gives it."""
    return {id(p): name for name, p in model.named_parameters()}


def eager_name_map(conversion, model):
    """Converted parameter name -> eager parameter name: lifted weights by `shared_weights`, the rest by
    tensor identity (the graph module holds the model's own leaf modules)."""
    by_id = eager_names(model)
    eager = set(by_id.values())
    names = {}
    for name, p in conversion.module.named_parameters():
        if name in conversion.shared_weights:
            (names[name],) = [n for n in conversion.shared_weights[name] if n in eager]
        else:
            names[name] = by_id[id(p)]
    assert len(set(names.values())) == len(names)
    return names


def registrations(model):
    return [(n, id(p), p.detach().clone()) for n, p in model.named_parameters(remove_duplicate=False)]


def kept_output(conversion, outputs):
    return outputs[conversion.output_name]


# -- structure ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls_name", CLASSES)
def test_conversion_structure(cls_name):
    model = build(cls_name)
    before = registrations(model)
    c = convert(model)
    assert isinstance(c, Conversion) and isinstance(c.module, ConvertedModule)

    inputs = default_inputs(cls_name)
    shared = list(c.shared_weights)
    assert c.input_names == inputs
    assert placeholders(c.graph_module) == [*inputs, *shared, "training"]
    if not cls_name.endswith("EncoderModel"):  # the encoder and decoder embeddings (and the head) are tied
        assert shared == ["shared_embed_weight"]
        assert c.shared_weights["shared_embed_weight"][:3] == [
            "shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"]

    # the module owns each lifted weight as a Parameter, and lists every weight exactly once
    for name in shared:
        weight = c.module._parameters[name]
        assert isinstance(weight, torch.nn.Parameter) and torch.equal(weight, model.shared.weight)
        assert not any(p is weight for p in c.graph_module.parameters())
    params = list(c.module.named_parameters())
    assert len({id(p) for _, p in params}) == len(params) == len(list(model.parameters()))
    assert sum(p.numel() for _, p in params) == sum(p.numel() for p in model.parameters())
    eager_name_map(c, model)

    # converting does not mutate the source model
    after = registrations(model)
    assert [(n, i) for n, i, _ in after] == [(n, i) for n, i, _ in before]
    assert all(torch.equal(a, b) for (_, _, a), (_, _, b) in zip(before, after))

    x = random_inputs(inputs, 2, 6, 3)
    out = c.module(**x)
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(c.module(*x.values()), out)
    torch.testing.assert_close(out, kept_output(c, eager_outputs(model, x)))


@pytest.mark.parametrize("cls_name", ["T5ForConditionalGeneration", "UMT5Model", "MT5EncoderModel"])
def test_pass_records_are_consistent(cls_name):
    model = build(cls_name)
    traced = trace(model)
    c = convert(model)
    records = c.passes
    assert [r.name for r in records] == PIPELINE
    assert records[0].nodes_before == len(traced.graph.nodes)
    assert records[0].placeholders_before == placeholders(traced) == c.input_names
    eager_keys = list(eager_outputs(model, random_inputs(c.input_names, 2, 6, 3)))
    assert records[0].outputs_before == eager_keys
    assert records[-1].nodes_after == len(c.graph_module.graph.nodes)
    assert records[-1].placeholders_after == placeholders(c.graph_module)
    assert records[-1].outputs_after == [c.output_name]
    for r, after in zip(records, records[1:]):
        assert (r.nodes_after, r.placeholders_after, r.outputs_after) == (
            after.nodes_before, after.placeholders_before, after.outputs_before)
    for r in records:
        assert r.nodes_after - r.nodes_before == sum(r.added.values()) - sum(r.removed.values()), r
        assert not set(r.added) & set(r.removed), r
        assert all(v > 0 for v in [*r.added.values(), *r.removed.values()]), r
        added_placeholders = r.added.get("placeholder", 0) - r.removed.get("placeholder", 0)
        assert len(r.placeholders_after) - len(r.placeholders_before) == added_placeholders, r
        assert isinstance(r.seconds, float) and r.seconds >= 0
        if not r.modified:
            assert (r.added, r.removed, r.nodes_before, r.placeholders_before, r.outputs_before) == (
                {}, {}, r.nodes_after, r.placeholders_after, r.outputs_after), r
    by_name = {r.name: r for r in records}
    assert not by_name["RemoveNoneChecksPass"].modified  # traced T5 graphs hold no None checks
    assert by_name["LiftTrainingFlagPass"].placeholders_after[-1] == "training"
    assert by_name["KeepSingleOutputPass"].modified

    # Stated facts of the T5 stack (2 encoder + 2 decoder layers here): each stack applies its dropout
    # module twice (embeddings, final norm); an encoder layer has 3 dropout sites (self-attention, FF,
    # inside the FF), a decoder layer 4 (plus cross-attention); every attention gets one SDPA dropout rate.
    enc, dec = 2, (0 if cls_name.endswith("EncoderModel") else 2)
    dropouts = 2 + 3 * enc + (2 + 4 * dec if dec else 0)
    training = by_name["LiftTrainingFlagPass"]
    assert training.removed == {"call_module Dropout": dropouts}
    assert training.added == {"call_function torch.nn.functional.dropout": dropouts,
                              "call_function operator.mul": enc + 2 * dec, "placeholder": 1}
    # the tied embedding: two lookups (encoder, decoder) and the LM head; an encoder alone uses it once
    shared = by_name["LiftSharedWeightsPass"]
    expected_removed = {"T5ForConditionalGeneration": {"call_module Embedding": 2, "call_module Linear": 1},
                        "UMT5Model": {"call_module Embedding": 2}, "MT5EncoderModel": {}}[cls_name]
    assert shared.removed == expected_removed and shared.modified == bool(expected_removed)


def test_input_names_and_output_options():
    model = build("T5Model")
    c = convert(model, input_names=["input_ids", "decoder_input_ids"], output="encoder_last_hidden_state")
    # the encoder output does not read decoder_input_ids: it is no input of the graph
    assert placeholders(c.graph_module) == ["input_ids", "shared_embed_weight", "training"]
    assert c.input_names == ["input_ids"] and c.dropped_inputs == ["decoder_input_ids"]
    assert c.output_name == "encoder_last_hidden_state"
    x = random_inputs(["input_ids", "decoder_input_ids"], 2, 6, 3)
    torch.testing.assert_close(c.module(input_ids=x["input_ids"]), eager_outputs(model, x)["encoder_last_hidden_state"])
    with pytest.raises(UsageError, match=r"'logits'.*last_hidden_state, encoder_last_hidden_state"):
        convert(model, output="logits")


def test_untied_lm_head_stays_a_parameter_of_the_module():
    """transformers 5 ties T5's head even for v1.1 configs, so the head is untied by hand."""
    model = untie_lm_head(build("T5ForConditionalGeneration", "v1_1"))
    c = convert(model)
    assert c.shared_weights == {"shared_embed_weight": ["shared.weight", "encoder.embed_tokens.weight",
                                                        "decoder.embed_tokens.weight"]}
    assert any(p is model.lm_head.weight for p in c.graph_module.parameters())
    assert len(list(c.module.parameters())) == len(list(model.parameters()))
    x = random_inputs(c.input_names, 2, 6, 3)
    torch.testing.assert_close(c.module(**x), eager_outputs(model, x)["loss"])


# -- end to end --------------------------------------------------------------------------------------

def _matrix():
    """Every class x every variant with "sdpa"; every class once with "eager", the variants taking turns."""
    variants = list(VARIANTS)
    rows = [(cls, variant, "sdpa") for cls in CLASSES for variant in variants]
    rows += [(cls, variants[i % len(variants)], "eager") for i, cls in enumerate(CLASSES)]
    return rows


def output_and_grads(module, run, seed):
    """The output of `run()` under `seed`, and the gradients its sum leaves on `module`'s parameters."""
    module.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = run()
    out.float().sum().backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    return out.detach(), grads


@pytest.mark.parametrize("cls_name,variant,attn", _matrix(), ids=lambda v: v)
def test_matches_eager(cls_name, variant, attn):
    model = build(cls_name, variant, attn)
    reference = copy.deepcopy(model)
    c = convert(model)
    names = eager_name_map(c, model)
    module = c.module
    eval_outputs = []
    for mode in ("eval", "train"):
        module.train(mode == "train")
        reference.train(mode == "train")
        for i, (batch, enc, dec) in enumerate(SHAPES):
            where = f"{mode} {batch}x{enc}x{dec}"
            inputs = random_inputs(c.input_names, batch, enc, dec, seed=i)
            got, got_grads = output_and_grads(module, lambda: module(**inputs), seed=i)
            want, want_grads = output_and_grads(
                reference, lambda: kept_output(c, eager_outputs(reference, inputs)), seed=i)
            torch.testing.assert_close(got, want, msg=lambda m: f"{where}: {m}")
            assert sorted(names[n] for n in got_grads) == sorted(want_grads), where
            for n, g in got_grads.items():
                torch.testing.assert_close(g, want_grads[names[n]], msg=lambda m, n=n: f"{where} {n}: {m}")
            if mode == "eval":
                eval_outputs.append(got)
            else:
                assert not torch.equal(got, eval_outputs[i]), f"{where}: train mode must really drop out"


@pytest.mark.parametrize("cls_name,variant", [("T5ForConditionalGeneration", "original"), ("UMT5Model", "v1_1")])
def test_optimizer_step_matches_eager(cls_name, variant):
    model = build(cls_name, variant).train()
    reference = copy.deepcopy(model)
    c = convert(model)
    names = eager_name_map(c, model)
    initial = {n: p.detach().clone() for n, p in reference.named_parameters()}
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (c.module, reference)]
    for step in range(2):
        inputs = random_inputs(c.input_names, 2, 19, 4, seed=step)
        torch.manual_seed(step)
        c.module(**inputs).float().sum().backward()
        torch.manual_seed(step)
        kept_output(c, eager_outputs(reference, inputs)).float().sum().backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
    updated = dict(reference.named_parameters())
    for n, p in c.module.named_parameters():
        torch.testing.assert_close(p, updated[names[n]], msg=lambda m, n=n: f"{n}: {m}")
    assert not torch.equal(updated["shared.weight"], initial["shared.weight"])


# -- argument checks ---------------------------------------------------------------------------------

@pytest.mark.parametrize("names, message", [
    ("input_ids", r"input_names is the string 'input_ids'; give a list of names, e.g. \['input_ids'\]"),
    ({"input_ids", "attention_mask"}, r"input_names is a set; give a list of names in the order"),
    (7, r"input_names is an int; give a list of names in the order"),
    (object(), r"input_names is an object; give a list of names in the order"),
    (["input_ids", 7], r"input names must be strings, got 7; give a list of names"),
])
def test_input_names_must_be_a_list_of_names(names, message):
    """A bare string used to be split into its letters ("i", "n", ...) and refused as unknown names."""
    model = build("T5Model")
    for call in (trace, convert):
        with pytest.raises(InputNameError, match=message) as info:
            call(model, input_names=names)
        assert isinstance(info.value, UsageError) and "\n" not in str(info.value)


def test_input_names_are_checked_before_a_name_is_loaded(tmp_path):
    # a name that does not exist would raise ModelResolutionError if it were loaded first
    with pytest.raises(InputNameError, match="input_names is the string"):
        convert(str(tmp_path / "nothing-here"), input_names="input_ids")


def test_a_tuple_of_names_is_a_list_of_names():
    model = build("T5EncoderModel")
    c = convert(model, input_names=("input_ids",))
    x = random_inputs(["input_ids"], 2, 6, 3)
    torch.testing.assert_close(c.module(**x), eager_outputs(model, x)["last_hidden_state"])


def test_options_of_a_name_are_refused_for_a_built_model():
    model = build("T5Model")
    with pytest.raises(UsageError, match="allow_random and dtype apply to a model given by name"):
        convert(model, allow_random=True)
    with pytest.raises(UsageError, match="output is an int; give one output name"):
        convert(model, output=3)


def test_a_name_without_weights_needs_allow_random(tmp_path):
    from checkpoints import write_checkpoint

    model = write_checkpoint(tmp_path / "ckpt", "T5EncoderModel")
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    with pytest.raises(ModelResolutionError, match="has no weights.*pass allow_random=True"):
        convert(tmp_path / "ckpt")
    from fxconvert.load import RandomWeightsWarning

    with pytest.warns(RandomWeightsWarning, match="RANDOM WEIGHTS"):
        c = convert(tmp_path / "ckpt", allow_random=True)
    assert c.source.random_weights and type(c.model) is type(model)


# -- subclasses of supported classes -----------------------------------------------------------------

class TaggedT5(transformers.T5ForConditionalGeneration):
    """A subclass that adds a method and keeps forward, as a user's wrapper class does."""

    def describe(self):
        return f"{self.config.num_layers} layers"


class TaggedAgain(TaggedT5):
    pass


class ScaledT5(transformers.T5Model):
    """A subclass whose forward computes something else: the trace of T5Model's forward would not be it."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.last_hidden_state = out.last_hidden_state * 2
        return out


class ScaledAgain(ScaledT5):
    pass


def as_subclass(cls, variant="original"):
    """An instance of `cls` holding the weights of the tiny model of its supported base class."""
    base = next(c for c in cls.__mro__ if c.__module__.startswith("transformers."))
    model = cls(build(base.__name__, variant).config).eval()
    model.load_state_dict(build(base.__name__, variant).state_dict())
    return model


@pytest.mark.parametrize("cls", [TaggedT5, TaggedAgain])
def test_a_subclass_that_keeps_forward_converts_and_matches_eager(cls):
    model = as_subclass(cls)
    reference = copy.deepcopy(model)
    c = convert(model)
    assert c.model_class == "T5ForConditionalGeneration"  # the traced class: what model.py reproduces
    assert c.input_names == default_inputs("T5ForConditionalGeneration")
    names = eager_name_map(c, model)
    for mode in ("eval", "train"):
        c.module.train(mode == "train")
        reference.train(mode == "train")
        inputs = random_inputs(c.input_names, 2, 19, 4)
        got, got_grads = output_and_grads(c.module, lambda: c.module(**inputs), seed=1)
        want, want_grads = output_and_grads(reference, lambda: kept_output(c, eager_outputs(reference, inputs)),
                                            seed=1)
        torch.testing.assert_close(got, want, msg=lambda m: f"{mode}: {m}")
        assert sorted(names[n] for n in got_grads) == sorted(want_grads)
        for n, g in got_grads.items():
            torch.testing.assert_close(g, want_grads[names[n]], msg=lambda m, n=n: f"{mode} {n}: {m}")


@pytest.mark.parametrize("cls, owner", [(ScaledT5, "ScaledT5"), (ScaledAgain, "ScaledT5")])
def test_a_subclass_that_overrides_forward_is_refused_saying_why(cls, owner):
    model = as_subclass(cls)
    for call in (trace, convert):
        with pytest.raises(TraceError) as info:
            call(model)
        assert str(info.value) == (
            f"'{cls.__name__}' is a T5Model whose forward is overridden (by '{owner}'), which fxconvert cannot know "
            f"it reproduces; keep T5Model.forward and put the change in a submodule, or convert the T5Model itself")


def test_a_class_named_like_a_supported_one_is_not_one():
    impostor = type("T5Model", (torch.nn.Module,), {"forward": lambda self, input_ids: input_ids})()
    with pytest.raises(TraceError, match=r"'T5Model' is not supported; fxconvert traces .*T5Model, .* and their "
                                         r"subclasses that keep forward"):
        trace(impostor)


def test_a_hostile_subclass_name_reaches_no_generated_code(tmp_path):
    """Class names are arbitrary strings; the conversion names the supported class it traced."""
    cls = type('Evil"""\nraise SystemExit(3)\n"""', (transformers.T5EncoderModel,), {})
    model = cls(build("T5EncoderModel").config).eval()
    c = convert(model)
    assert c.model_class == "T5EncoderModel"
    c.save(tmp_path / "out")
    for path in (tmp_path / "out").iterdir():
        if path.suffix in (".py", ".md", ".json"):
            assert "SystemExit" not in path.read_text(), path.name
