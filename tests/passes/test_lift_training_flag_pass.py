"""LiftTrainingFlagPass: every train/eval constant tracing froze comes from one `training` placeholder,
so one GraphModule reproduces eager eval mode (training=False) and train mode (training=True, same seed)."""

import operator

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fxconvert.graph_info import graph_info
from fxconvert.passes import LiftTrainingFlagPass

from .common import (LABELS, as_eager, assert_same, check, nodes_calling, placeholders, symbolic_trace, t5_inputs,
                     traced_t5, with_graph_info)

DROPOUT_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout)


def assert_both_modes(gm, eager, *args, seed=0, **kwargs):
    """gm(training=False) is eager in eval mode; gm(training=True) is eager in train mode under the same seed."""
    for training in (False, True):
        eager.train(training)
        torch.manual_seed(seed)
        expected = eager(*args, **kwargs)
        torch.manual_seed(seed)
        actual = gm(*args, **kwargs, training=training)
        assert_same(actual, expected)
        if training and isinstance(expected, torch.Tensor):
            assert not torch.equal(expected, eager.eval()(*args, **kwargs)), "train mode must really drop out"


def assert_flag_drives_everything(gm):
    names = placeholders(gm)
    assert names.count("training") == 1 and names[-1] == "training"
    flag = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.target == "training")
    assert flag.args == (False,), "training defaults to False"
    assert not [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(
        gm.get_submodule(n.target), nn.modules.dropout._DropoutNd)]
    for node in gm.graph.nodes:
        assert not isinstance(node.kwargs.get("training"), bool), node.format_node()
        if node.target in DROPOUT_FUNCTIONS:
            assert flag in node.all_input_nodes, node.format_node()
    return flag


@pytest.mark.parametrize("cls,shape", [
    (nn.Dropout, (4, 8)),
    (nn.Dropout1d, (2, 8, 5)),
    (nn.Dropout2d, (2, 8, 3, 3)),
    (nn.Dropout3d, (2, 8, 2, 2, 2)),
    (nn.AlphaDropout, (4, 8)),
    (nn.FeatureAlphaDropout, (2, 8, 3, 3)),
], ids=lambda v: getattr(v, "__name__", None))
def test_dropout_modules_become_flag_driven_calls(cls, shape):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = cls(0.3)

        def forward(self, x):
            return self.drop(x) * 2

    module = M().eval()
    gm = check(symbolic_trace(module), LiftTrainingFlagPass(), 1, eager=module, args=(torch.randn(shape),))
    assert_flag_drives_everything(gm)
    assert_both_modes(gm, module, torch.randn(shape))


class FunctionalDropout(nn.Module):
    def forward(self, x):
        return F.dropout(x, 0.3, self.training) + F.dropout(x, p=0.4, training=self.training)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_functional_dropout_traced_in_either_mode(mode):
    module = getattr(FunctionalDropout(), mode)()
    gm = symbolic_trace(module)
    assert [n.kwargs["training"] for n in nodes_calling(gm, F.dropout)] == [mode == "train"] * 2
    gm = check(gm, LiftTrainingFlagPass(), 1)
    assert [n.kwargs["p"] for n in nodes_calling(gm, F.dropout)] == [0.3, 0.4]
    assert_flag_drives_everything(gm)
    assert_both_modes(gm, module, torch.randn(4, 8))


def test_positional_training_argument():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(F.dropout, (x, 0.3, False)))
    gm = check(with_graph_info(torch.fx.GraphModule(nn.Module(), graph)), LiftTrainingFlagPass(), 1)
    assert_flag_drives_everything(gm)
    assert_both_modes(gm, FunctionalDropout1(), torch.randn(4, 8))


class FunctionalDropout1(nn.Module):
    def forward(self, x):
        return F.dropout(x, 0.3, self.training)


class Attention(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.2 if self.training else 0.0)


def test_sdpa_dropout_traced_in_train_mode():
    module = Attention().train()
    q, k, v = torch.randn(3, 2, 2, 5, 4).unbind(0)
    gm = check(symbolic_trace(module), LiftTrainingFlagPass(), 2)  # the flag and training * rate
    flag = assert_flag_drives_everything(gm)
    (sdpa,) = nodes_calling(gm, F.scaled_dot_product_attention)
    p = sdpa.kwargs["dropout_p"]
    assert p.target is operator.mul and set(p.args) == {flag, 0.2}
    assert_both_modes(gm, module, q, k, v)


@pytest.mark.parametrize("cls_name,attn,mode", [
    ("T5ForConditionalGeneration", "sdpa", "eval"),
    ("T5ForConditionalGeneration", "sdpa", "train"),
    ("T5ForConditionalGeneration", "eager", "eval"),
    ("T5ForConditionalGeneration", "eager", "train"),
    ("UMT5ForConditionalGeneration", "sdpa", "eval"),
    ("MT5EncoderModel", "eager", "eval"),
])
def test_t5_graph_reproduces_eager_in_both_modes(cls_name, attn, mode):
    """Traced in eval mode, transformers passes dropout=0.0; training=True must still use the configured rate."""
    model, reference, gm = traced_t5(cls_name, attn=attn, mode=mode)
    sdpa = nodes_calling(gm, F.scaled_dot_product_attention)
    assert bool(sdpa) == (attn == "sdpa")
    gm = check(gm, LiftTrainingFlagPass(), 1 + len(sdpa))
    flag = assert_flag_drives_everything(gm)
    rate = model.config.dropout_rate
    assert {n.kwargs["p"] for n in nodes_calling(gm, F.dropout)} == {rate}
    for node in nodes_calling(gm, F.scaled_dot_product_attention):
        p = node.kwargs["dropout_p"]
        assert p.target is operator.mul and set(p.args) == {flag, rate}

    names = LABELS if cls_name.endswith("Generation") else graph_info(gm).input_names
    inputs = t5_inputs(names)
    for training in (False, True):
        expected_fn = as_eager(reference, "train" if training else "eval")
        torch.manual_seed(1)
        expected = expected_fn(**inputs)
        torch.manual_seed(1)
        assert_same(gm(**inputs, training=training), expected)
