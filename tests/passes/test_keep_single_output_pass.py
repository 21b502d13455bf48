"""KeepSingleOutputPass: the graph returns one tensor (loss, else logits, else last_hidden_state, or a
named output), and whatever only fed the dropped outputs is removed."""

import pytest
import torch
import torch.fx
from torch import nn

from fxconvert.errors import UsageError
from fxconvert.passes import KeepSingleOutputPass, LiftSharedWeightsPass, LiftTrainingFlagPass

from .common import LABELS, NO_LABELS, as_eager, check, t5_inputs, traced_t5


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
    gm = torch.fx.symbolic_trace(module)
    kept = output or module.names[0]
    gm = check(gm, KeepSingleOutputPass(output), delta, eager=lambda x: module(x)[kept], args=(x,))
    assert gm.meta["output_name"] == kept
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
    gm = torch.fx.symbolic_trace(Heads(names))
    assert KeepSingleOutputPass()(gm).graph_module.meta["output_name"] == kept


def test_unknown_name_lists_the_available_ones():
    with pytest.raises(UsageError, match=r"'nope'.*logits, hidden"):
        KeepSingleOutputPass("nope")(torch.fx.symbolic_trace(Heads()))


@pytest.mark.parametrize("cls_name,input_names,kept", [
    ("T5ForConditionalGeneration", LABELS, "loss"),
    ("T5ForConditionalGeneration", NO_LABELS, "logits"),
    ("MT5Model", None, "last_hidden_state"),
    ("UMT5EncoderModel", None, "last_hidden_state"),
])
def test_t5_default_output(cls_name, input_names, kept):
    _, reference, gm = traced_t5(cls_name, input_names=input_names)
    inputs = t5_inputs(gm.meta["input_names"])
    # every other output feeds the kept one, so no node goes
    gm = check(gm, KeepSingleOutputPass(), 0, eager=lambda **kw: as_eager(reference)(**kw)[kept], kwargs=inputs)
    assert gm.meta["output_name"] == kept
    assert isinstance(gm(**inputs), torch.Tensor)


def test_t5_picking_the_encoder_output_drops_the_decoder():
    model, reference, gm = traced_t5(input_names=LABELS)
    for p in (LiftTrainingFlagPass(), LiftSharedWeightsPass()):
        gm = p(gm).graph_module
    assert any(n.meta.get("module_path", "").startswith("decoder") for n in gm.graph.nodes)
    before = len(gm.graph.nodes)
    inputs = t5_inputs(LABELS)
    kept = "encoder_last_hidden_state"
    gm = check(gm, KeepSingleOutputPass(kept), None, kwargs={**inputs, "shared_embed_weight": model.shared.weight},
               eager=lambda shared_embed_weight, **kw: as_eager(reference)(**kw)[kept])
    assert len(gm.graph.nodes) < before
    decoder = ("decoder", "lm_head")
    assert not [n for n in gm.graph.nodes if n.meta.get("module_path", "").startswith(decoder)]
    assert not [n for n in gm.graph.nodes if n.op in ("call_module", "get_attr") and n.target.startswith(decoder)]
    assert not [name for name, _ in gm.named_modules() if name.startswith(decoder)]
    unused = [n.target for n in gm.graph.nodes if n.op == "placeholder" and not n.users]
    assert unused == ["decoder_input_ids", "labels"]


def test_t5_unknown_name_lists_the_available_ones():
    _, _, gm = traced_t5(input_names=LABELS)
    with pytest.raises(UsageError, match=r"'logit'.*loss, logits, encoder_last_hidden_state"):
        KeepSingleOutputPass("logit")(gm)
