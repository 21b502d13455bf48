"""SparsifySharedLookupsPass: lookups of a lifted weight give sparse row gradients exactly when the
final graph keeps a dense use of that weight, so the weight's gradient is always dense and eager's."""

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from helpers import output_sum
from fxconvert.graph_info import graph_info
from fxconvert.passes import KeepSingleOutputPass, LiftSharedWeightsPass, SparsifySharedLookupsPass

from .common import LABELS, as_eager, check, nodes_calling, symbolic_trace, t5_inputs, traced_t5, untie_lm_head

NAME = "shared_embed_weight"


def flags(gm):
    return [n.kwargs["sparse"] for n in nodes_calling(gm, F.embedding)]


def gradient(gm, model, inputs, **graph_kwargs):
    """The gradient reaching the lifted weight for backward of output_sum."""
    w = model.shared.weight.detach().clone().requires_grad_()
    out = gm(**inputs, **{NAME: w}, **graph_kwargs)
    output_sum(out if isinstance(out, dict) else {"out": out}).backward()
    return w.grad


def eager_gradient(reference, inputs, output=None):
    reference.zero_grad(set_to_none=True)
    out = as_eager(reference)(**inputs)
    output_sum(out if output is None else {output: out[output]}).backward()
    return reference.shared.weight.grad


def test_a_weight_with_a_dense_use_gets_sparse_lookups_and_a_dense_gradient():
    """Tied LM head: the lookups' rows are added into the head's dense gradient."""
    model, reference, gm = traced_t5(input_names=LABELS)
    gm = LiftSharedWeightsPass()(gm).graph_module
    inputs = t5_inputs(LABELS)
    gm = check(gm, SparsifySharedLookupsPass(), 0, kwargs={**inputs, NAME: model.shared.weight},
               eager=lambda shared_embed_weight, **kw: as_eager(reference)(**kw))
    assert flags(gm) == [True, True]
    got = gradient(gm, model, inputs)
    assert got.layout == torch.strided and not got.is_sparse
    torch.testing.assert_close(got, eager_gradient(reference, inputs))


def test_without_a_dense_use_lookups_stay_dense():
    """Untied head, or T5Model with no head: a sparse lookup would leave a sparse gradient, which
    optimizers and all-reduce do not take."""
    for prepare, cls_name, names in ((untie_lm_head, "T5ForConditionalGeneration", LABELS),
                                     (None, "T5Model", None)):
        model, reference, gm = traced_t5(cls_name, input_names=names, prepare=prepare)
        gm = LiftSharedWeightsPass()(gm).graph_module
        gm = check(gm, SparsifySharedLookupsPass(), 0)
        assert flags(gm) == [False, False]
        assert not gradient(gm, model, t5_inputs(graph_info(gm).input_names)).is_sparse


def test_choosing_an_output_without_the_head_keeps_the_gradient_dense():
    """The encoder output drops the tied head, the weight's only dense use: decided after that,
    the remaining lookup is dense, and its gradient is eager's."""
    model, reference, gm = traced_t5(input_names=LABELS)
    kept = "encoder_last_hidden_state"
    for p in (LiftSharedWeightsPass(), KeepSingleOutputPass(kept)):
        gm = p(gm).graph_module
    gm = check(gm, SparsifySharedLookupsPass(), 0)
    assert flags(gm) == [False]
    inputs = t5_inputs(LABELS)
    got = gradient(gm, model, {k: inputs[k] for k in graph_info(gm).input_names})
    assert got.layout == torch.strided
    torch.testing.assert_close(got, eager_gradient(reference, inputs, kept))


class Lookup(nn.Module):
    def forward(self, ids, weight):
        return F.embedding(ids, weight, sparse=True)


def test_a_sparse_lookup_without_a_dense_use_is_made_dense():
    """The decision goes both ways: whatever set the flag before, the graph as it is decides."""
    gm = symbolic_trace(Lookup(), lifted_weights={"weight": None})
    ids, weight = torch.randint(0, 5, (3,)), torch.randn(5, 2, requires_grad=True)
    gm = check(gm, SparsifySharedLookupsPass(), 0, eager=lambda ids, weight: F.embedding(ids, weight),
               args=(ids, weight))
    assert flags(gm) == [False]
    gm(ids, weight).sum().backward()
    assert not weight.grad.is_sparse


def test_weights_that_were_not_lifted_are_left_alone():
    gm = symbolic_trace(Lookup(), lifted_weights={})
    result = SparsifySharedLookupsPass()(gm)
    assert not result.modified and flags(result.graph_module) == [True]
