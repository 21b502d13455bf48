"""Each pass checks, before it runs, that the graph's GraphInfo holds what it reads, and fails in one
line naming itself and the missing field, instead of silently doing less."""

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fxconvert.errors import PassError
from fxconvert.passes import (KeepSingleOutputPass, LiftSharedWeightsPass, LiftTrainingFlagPass, RemoveNoneChecksPass,
                              SparsifySharedLookupsPass, default_passes)

from .common import LABELS, traced_t5


class Toy(nn.Module):
    """Tied embedding and head, dropout, and a dict of outputs: something for every pass to do."""

    def __init__(self):
        super().__init__()
        self.embed, self.head, self.drop = nn.Embedding(7, 4), nn.Linear(4, 7, bias=False), nn.Dropout(0.1)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        h = self.drop(self.embed(ids))
        return {"logits": self.head(h), "hidden": h}


NEEDS_THE_RECORD = [LiftTrainingFlagPass, LiftSharedWeightsPass, KeepSingleOutputPass, SparsifySharedLookupsPass]


@pytest.mark.parametrize("pass_cls", NEEDS_THE_RECORD, ids=lambda c: c.__name__)
def test_a_pass_refuses_a_graph_without_graph_info(pass_cls):
    gm = torch.fx.symbolic_trace(Toy())
    with pytest.raises(PassError) as caught:
        pass_cls()(gm)
    message = str(caught.value)
    assert len(message.splitlines()) == 1
    assert message.startswith(f"{pass_cls.__name__} needs the graph's GraphInfo")
    assert "fxconvert.trace" in message


def test_an_eval_trace_that_lost_its_record_does_not_train_without_attention_dropout():
    """An eval-mode trace records dropout_p=0.0; only the record knows the configured rate, so a
    graph without it is refused rather than given a `training` flag that drives no attention dropout."""
    _, _, gm = traced_t5(attn="sdpa", mode="eval", input_names=LABELS)
    gm.meta.clear()
    with pytest.raises(PassError, match=r"^LiftTrainingFlagPass needs the graph's GraphInfo \(.*dropout_rates"):
        LiftTrainingFlagPass()(gm)


def test_lookups_are_not_sparsified_before_the_weights_are_lifted():
    from fxconvert.graph_info import graph_info

    _, _, gm = traced_t5(input_names=LABELS)
    assert graph_info(gm).lifted_weights is None
    with pytest.raises(PassError, match=r"^SparsifySharedLookupsPass needs GraphInfo.lifted_weights, which this "
                                        r"graph's record does not set; run LiftSharedWeightsPass before "
                                        r"SparsifySharedLookupsPass$"):
        SparsifySharedLookupsPass()(gm)


def test_keep_single_output_needs_input_names():
    from fxconvert.graph_info import update_graph_info

    _, _, gm = traced_t5(input_names=LABELS)
    update_graph_info(gm, input_names=None)
    with pytest.raises(PassError, match=r"^KeepSingleOutputPass needs GraphInfo.input_names, .*run the tracer "
                                        r"\(fxconvert.trace\) before KeepSingleOutputPass$"):
        KeepSingleOutputPass()(gm)


def test_a_single_output_that_the_record_does_not_name_is_refused():
    class One(nn.Module):
        def forward(self, x):
            return x * 2

    from .common import symbolic_trace

    with pytest.raises(PassError, match=r"^KeepSingleOutputPass found a graph that returns one value"):
        KeepSingleOutputPass()(symbolic_trace(One()))


def test_remove_none_checks_needs_no_record():
    class Check(nn.Module):
        def forward(self, x):
            return x + 1 if F.relu(x) is not None else x

    assert not RemoveNoneChecksPass()(torch.fx.symbolic_trace(Check())).modified


def test_the_default_order_meets_every_requirement():
    """What the tracer records, then what each pass records, covers what every later pass needs."""
    available = {"model_class", "input_names", "traced_training", "dropout_rates"}
    for p in default_passes():
        assert set(p.required) <= available, (type(p).__name__, set(p.required) - available)
        available |= set(p.ensured)
    assert {"lifted_weights", "output_name"} <= available


def test_a_pass_naming_an_unknown_field_is_refused_where_it_is_declared():
    from fxconvert.passes import GraphPass

    with pytest.raises(TypeError, match="^Typo names 'output', which is not a GraphInfo field$"):
        type("Typo", (GraphPass,), {"required": ("output",)})
