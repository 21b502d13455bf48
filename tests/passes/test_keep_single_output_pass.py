"""KeepSingleOutputPass: the graph returns one tensor (loss, else logits, else last_hidden_state, or a
named output), and whatever only fed the dropped outputs is removed."""

import pytest
import torch
import torch.fx
from torch import nn

from fxconvert.errors import UsageError
from fxconvert.graph_info import graph_info
from fxconvert.passes import KeepSingleOutputPass, LiftSharedWeightsPass, LiftTrainingFlagPass

from .common import LABELS, NO_LABELS, as_eager, check, placeholders, symbolic_trace, t5_inputs, traced_t5


class Heads(nn.Module):
    """Two heads on one body, returned as a dict the way a traced model returns its outputs."""

    def __init__(self, names=("logits", "hidden")):
        super().__init__()
        self.names = names
        self.body, self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3), nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.body(x))
        first, second = self.names
        return {first: self.a(h), second: self.b(h) * 2}


def run(module, output, delta):
    x = torch.randn(5, 4)
    gm = symbolic_trace(module)
    kept = output or module.names[0]
    gm = check(gm, KeepSingleOutputPass(output), delta, eager=lambda x: module(x)[kept], args=(x,))
    assert graph_info(gm).output_name == kept
    return gm


def test_default_prefers_logits():
    gm = run(Heads(), None, -2)  # head b and its * 2
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["body", "a"]


def test_output_picked_by_name():
    gm = run(Heads(), "hidden", -1)  # head a
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["body", "b"]


@pytest.mark.parametrize("names,kept", [
    (("logits", "loss"), "loss"),
    (("last_hidden_state", "logits"), "logits"),
    (("other", "last_hidden_state"), "last_hidden_state"),
])
def test_default_preference(names, kept):
    gm = symbolic_trace(Heads(names))
    assert graph_info(KeepSingleOutputPass()(gm).graph_module).output_name == kept


def test_unknown_name_lists_the_available_ones():
    with pytest.raises(UsageError, match=r"'nope'.*logits, hidden"):
        KeepSingleOutputPass("nope")(symbolic_trace(Heads()))


@pytest.mark.parametrize("cls_name,input_names,kept", [
    ("T5ForConditionalGeneration", LABELS, "loss"),
    ("T5ForConditionalGeneration", NO_LABELS, "logits"),
    ("MT5Model", None, "last_hidden_state"),
    ("UMT5EncoderModel", None, "last_hidden_state"),
])
def test_t5_default_output(cls_name, input_names, kept):
    _, reference, gm = traced_t5(cls_name, input_names=input_names)
    inputs = t5_inputs(graph_info(gm).input_names)
    # every other output feeds the kept one, so no node goes
    gm = check(gm, KeepSingleOutputPass(), 0, eager=lambda **kw: as_eager(reference)(**kw)[kept], kwargs=inputs)
    assert graph_info(gm).output_name == kept
    assert isinstance(gm(**inputs), torch.Tensor)


def test_t5_picking_the_encoder_output_drops_the_decoder_and_its_inputs():
    model, reference, gm = traced_t5(input_names=LABELS)
    for p in (LiftTrainingFlagPass(), LiftSharedWeightsPass()):
        gm = p(gm).graph_module
    assert any(n.meta.get("module_path", "").startswith("decoder") for n in gm.graph.nodes)
    before = len(gm.graph.nodes)
    inputs = t5_inputs(LABELS)
    kept = "encoder_last_hidden_state"
    read = {k: inputs[k] for k in ("input_ids", "attention_mask")}
    gm = check(gm, KeepSingleOutputPass(kept), None, kwargs={**read, "shared_embed_weight": model.shared.weight},
               eager=lambda shared_embed_weight, **kw: as_eager(reference)(**kw, **{
                   k: inputs[k] for k in ("decoder_input_ids", "labels")})[kept])
    assert len(gm.graph.nodes) < before
    decoder = ("decoder", "lm_head")
    assert not [n for n in gm.graph.nodes if n.meta.get("module_path", "").startswith(decoder)]
    assert not [n for n in gm.graph.nodes if n.op in ("call_module", "get_attr") and n.target.startswith(decoder)]
    assert not [name for name, _ in gm.named_modules() if name.startswith(decoder)]
    # the inputs only the decoder read are gone from the graph and from its records
    assert placeholders(gm) == ["input_ids", "attention_mask", "shared_embed_weight", "training"]
    assert graph_info(gm).input_names == ("input_ids", "attention_mask")
    assert graph_info(gm).dropped_inputs == ("decoder_input_ids", "labels")
    assert list(graph_info(gm).lifted_weights) == ["shared_embed_weight"]


def test_t5_an_unread_shared_weight_is_dropped_too():
    """Encoder output from inputs_embeds: the decoder's lookup and the tied head were the shared
    embedding's only uses, so the lifted weight is no input either (eager gives it no gradient)."""
    names = ["inputs_embeds", "attention_mask", "decoder_input_ids"]
    model, reference, gm = traced_t5(input_names=names)
    gm = LiftSharedWeightsPass()(gm).graph_module
    assert "shared_embed_weight" in placeholders(gm)
    embeds = torch.randn(2, 6, model.config.d_model)
    mask = torch.ones(2, 6, dtype=torch.long)
    ids = torch.randint(0, model.config.vocab_size, (2, 3))
    gm = check(gm, KeepSingleOutputPass("encoder_last_hidden_state"), None,
               kwargs={"inputs_embeds": embeds, "attention_mask": mask},
               eager=lambda **kw: as_eager(reference)(**kw, decoder_input_ids=ids)["encoder_last_hidden_state"])
    assert placeholders(gm) == ["inputs_embeds", "attention_mask"]
    assert graph_info(gm).dropped_inputs == ("decoder_input_ids", "shared_embed_weight")
    assert graph_info(gm).lifted_weights == {}


def test_placeholders_outside_the_records_stay():
    """Placeholders the records do not name as model inputs (none here) stay, used or not."""
    class TwoInputs(nn.Module):
        def forward(self, x, y):
            return {"logits": x * 2, "other": y + 1}

    gm = check(symbolic_trace(TwoInputs(), input_names=()), KeepSingleOutputPass(), -1,  # y + 1
               eager=lambda x, y: x * 2, args=(torch.randn(3), torch.randn(3)))
    assert placeholders(gm) == ["x", "y"]


def test_t5_unknown_name_lists_the_available_ones():
    _, _, gm = traced_t5(input_names=LABELS)
    with pytest.raises(UsageError, match=r"'logit'.*loss, logits, encoder_last_hidden_state"):
        KeepSingleOutputPass("logit")(gm)
