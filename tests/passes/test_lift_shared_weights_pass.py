"""LiftSharedWeightsPass: a parameter registered under several names (HF weight tying) becomes one
placeholder feeding F.embedding / F.linear, is no longer held by the graph module, and receives
eager's gradient summed over all its uses; the source model is left untouched."""

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from helpers import output_sum
from fxconvert.errors import PassError
from fxconvert.graph_info import graph_info
from fxconvert.passes import LiftSharedWeightsPass, LiftTrainingFlagPass

from .common import (LABELS, as_eager, check, nodes_calling, placeholders, symbolic_trace, t5_inputs, traced_t5,
                     untie_lm_head)

NAME = "shared_embed_weight"


class TiedToy(nn.Module):
    """HF-style tying: one tensor is shared.weight, embed_tokens.weight and lm_head.weight."""

    def __init__(self, bias=False, read_weight=False):
        super().__init__()
        self.shared = nn.Embedding(11, 4)
        self.embed_tokens = nn.Embedding(11, 4)
        self.embed_tokens.weight = self.shared.weight
        self.lm_head = nn.Linear(4, 11, bias=bias)
        self.lm_head.weight = self.shared.weight
        self.read_weight = read_weight

    def forward(self, ids):
        h = self.embed_tokens(ids)
        out = self.lm_head(torch.tanh(h)) + self.shared(ids).sum(-1, keepdim=True)
        if self.read_weight:
            out = out + self.shared.weight.mean()
        return out


def registrations(model):
    """(name, tensor identity, value) of every registration, duplicates included."""
    return [(n, id(p), p.detach().clone()) for n, p in model.named_parameters(remove_duplicate=False)]


def assert_unchanged(model, before):
    after = registrations(model)
    assert [(n, i) for n, i, _ in after] == [(n, i) for n, i, _ in before]
    for (name, _, old), (_, _, new) in zip(before, after):
        assert torch.equal(old, new), name


def assert_lifted(gm, weight, embeddings, linears):
    flag = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.target == NAME)
    assert [n.args[1] for n in nodes_calling(gm, F.embedding)].count(flag) == embeddings
    assert [n.args[1] for n in nodes_calling(gm, F.linear)].count(flag) == linears
    assert not any(p is weight for _, p in gm.named_parameters(remove_duplicate=False)), "still registered"
    assert graph_info(gm).lifted_weights[NAME] is weight
    return flag


@pytest.mark.parametrize("bias,read_weight,delta", [
    (False, False, 1),  # three module calls become three function calls, plus the placeholder
    (True, False, 2),  # ... plus a get_attr of the head's bias
    (False, True, 0),  # ... and the get_attr reading the weight itself is replaced by the placeholder
])
def test_tied_toy(bias, read_weight, delta):
    module = TiedToy(bias, read_weight)
    before = registrations(module)
    ids = torch.randint(0, 11, (3, 5))
    weight = module.shared.weight
    gm = check(symbolic_trace(module), LiftSharedWeightsPass(), delta,
               eager=lambda ids, w: module(ids), args=(ids, weight))
    assert placeholders(gm) == ["ids", NAME]
    assert not [n for n in gm.graph.nodes if n.op == "call_module"]
    assert_lifted(gm, weight, embeddings=2, linears=1)
    assert_unchanged(module, before)

    w = weight.detach().clone().requires_grad_()
    gm(ids, w).sum().backward()
    module.zero_grad(set_to_none=True)
    module(ids).sum().backward()
    torch.testing.assert_close(w.grad, weight.grad)
    if bias:
        assert any(p is module.lm_head.bias for p in gm.parameters())


def test_untied_weights_are_left_alone():
    module = TiedToy()
    module.lm_head.weight = nn.Parameter(torch.randn(11, 4))
    module.embed_tokens = nn.Embedding(11, 4)
    ids = torch.randint(0, 11, (3, 5))
    check(symbolic_trace(module), LiftSharedWeightsPass(), 0, eager=module, args=(ids,))


def test_shared_weight_of_a_module_without_a_stateless_form_raises():
    class TiedNorms(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.LayerNorm(4), nn.LayerNorm(4)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    with pytest.raises(PassError, match=r"LayerNorm.*call_module"):
        LiftSharedWeightsPass()(symbolic_trace(TiedNorms()))


def without_weight(reference):
    """The eager model as a callable that takes (and ignores) the lifted weight, as the graph does."""
    return lambda shared_embed_weight, **inputs: as_eager(reference)(**inputs)


def grads_through_placeholder(gm, model, reference, inputs):
    """(gradient reaching the placeholder, eager gradient of the tied parameter) for the same loss."""
    w = model.shared.weight.detach().clone().requires_grad_()
    output_sum(gm(**inputs, **{NAME: w})).backward()
    model.zero_grad(set_to_none=True)
    output_sum(as_eager(reference)(**inputs)).backward()
    return w.grad, reference.shared.weight.grad


@pytest.mark.parametrize("cls_name,attn,embeddings,linears", [
    ("T5ForConditionalGeneration", "sdpa", 2, 1),
    ("UMT5ForConditionalGeneration", "eager", 2, 1),
    ("T5Model", "eager", 2, 0),
])
def test_t5_tied_embedding_becomes_one_placeholder(cls_name, attn, embeddings, linears):
    model, reference, gm = traced_t5(cls_name, attn=attn)
    before = registrations(model)
    assert model.encoder.embed_tokens.weight is model.shared.weight
    gm = LiftTrainingFlagPass()(gm).graph_module
    inputs = t5_inputs(graph_info(gm).input_names)
    gm = check(gm, LiftSharedWeightsPass(), 1, eager=without_weight(reference),
               kwargs={**inputs, NAME: model.shared.weight})
    assert placeholders(gm) == [*graph_info(gm).input_names, NAME, "training"]
    assert_lifted(gm, model.shared.weight, embeddings, linears)
    assert not [n for n in gm.graph.nodes if n.op == "call_module" and n.target.endswith(("embed_tokens", "shared"))]
    assert_unchanged(model, before)

    got, want = grads_through_placeholder(gm, model, reference, inputs)
    torch.testing.assert_close(got, want)


def test_t5_lifts_without_a_training_placeholder():
    model, reference, gm = traced_t5(input_names=LABELS)
    gm = check(gm, LiftSharedWeightsPass(), 1)
    assert placeholders(gm) == [*LABELS, NAME]
    assert_lifted(gm, model.shared.weight, 2, 1)


def test_t5_untied_lm_head_stays_a_parameter():
    """transformers 5 ties T5's head even for v1.1 configs, so the head is untied by hand."""
    model, reference, gm = traced_t5(variant="v1_1", input_names=LABELS, prepare=untie_lm_head)
    inputs = t5_inputs(LABELS)
    gm = check(gm, LiftSharedWeightsPass(), 1, eager=without_weight(reference),
               kwargs={**inputs, NAME: model.shared.weight})
    assert_lifted(gm, model.shared.weight, embeddings=2, linears=0)
    assert not nodes_calling(gm, F.linear)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module" and n.target == "lm_head"] == ["lm_head"]
    assert gm.get_submodule("lm_head").weight is model.lm_head.weight
    assert any(p is model.lm_head.weight for p in gm.parameters())

    w = model.shared.weight.detach().clone().requires_grad_()
    output_sum(gm(**inputs, **{NAME: w})).backward()
    output_sum(as_eager(reference)(**inputs)).backward()
    torch.testing.assert_close(w.grad, reference.shared.weight.grad)
    torch.testing.assert_close(model.lm_head.weight.grad, reference.lm_head.weight.grad)


def test_lookups_keep_the_embedding_own_flag():
    """Whether a lookup may give sparse row gradients is decided last, on the final graph
    (SparsifySharedLookupsPass); lifting keeps nn.Embedding's own (dense) flag."""
    model, reference, gm = traced_t5(input_names=LABELS)
    gm = LiftSharedWeightsPass()(gm).graph_module
    assert [n.kwargs["sparse"] for n in nodes_calling(gm, F.embedding)] == [False, False]
