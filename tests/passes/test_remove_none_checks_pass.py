"""RemoveNoneChecksPass: `operator.is_` / `is_not` nodes and FTPipe's `is_None` / `is_not_None` helpers
fold to constants where decidable, the code that only fed them goes, and undecidable checks raise
a PassError naming the node."""

import operator

import pytest
import torch
import torch.fx
from torch import nn

from fxconvert.errors import PassError
from fxconvert.graph_info import graph_info
from fxconvert.passes import RemoveNoneChecksPass

from .common import as_eager, check, t5_inputs, traced_t5


# FTPipe's way: helpers defined at module level and kept as leaves with torch.fx.wrap.
def is_None(x):
    return x is None


def is_not_None(x):
    return x is not None


torch.fx.wrap("is_None")
torch.fx.wrap("is_not_None")

CHECKS = (operator.is_, operator.is_not)


def none_checks(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and (
        n.target in CHECKS or getattr(n.target, "__name__", None) in ("is_None", "is_not_None"))]


def run(module, delta, *args):
    gm = torch.fx.symbolic_trace(module)
    assert none_checks(gm), "the traced module must really contain a None check"
    gm = check(gm, RemoveNoneChecksPass(), delta, eager=module, args=args)
    assert not none_checks(gm)
    return gm


class CheckOnModuleOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.gate = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x) * is_not_None(self.gate(x))


class CheckOnFunction(nn.Module):
    def forward(self, x):
        return x + is_None(torch.relu(x))


class CheckOnMethodAndParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return x * is_not_None(x.view(-1, 4)) + is_None(self.weight)


class CheckIsTheOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return is_None(self.lin(x))


class CheckOnInput(nn.Module):
    def forward(self, x, mask):
        return x * is_None(mask)


class CheckOnMissingWeights(nn.Module):
    """nn.MultiheadAttention(need_weights=False) returns (output, None)."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 1, batch_first=True)

    def forward(self, x):
        out, weights = self.attn(x, x, x, need_weights=False)
        return out * is_None(weights)


def test_check_on_a_module_output_folds_and_its_producer_goes():
    gm = run(CheckOnModuleOutput(), -2, torch.randn(3, 4))  # the check and `gate`
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["lin"]


def test_check_on_a_torch_function_folds():
    run(CheckOnFunction(), -2, torch.randn(3, 4))  # the check and relu


def test_checks_on_a_method_and_a_parameter_fold():
    run(CheckOnMethodAndParameter(), -4, torch.randn(3, 4))  # two checks, the view, the get_attr


def test_check_that_is_the_output_folds_to_a_constant():
    gm = run(CheckIsTheOutput(), -2, torch.randn(3, 4))
    assert gm(torch.randn(3, 4)) is False


def hand_built(check_fn, none_first, meta=None):
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    y = graph.call_function(torch.relu, (x,))
    if meta is not None:
        y.meta["val"] = meta
    c = graph.call_function(check_fn, (None, y) if none_first else (y, None))
    graph.output(graph.call_function(operator.add, (x, c)))
    return torch.fx.GraphModule(nn.Module(), graph)


@pytest.mark.parametrize("none_first", [False, True], ids=["x_none", "none_x"])
@pytest.mark.parametrize("check_fn", CHECKS, ids=["is_", "is_not"])
def test_hand_built_identity_check_folds(check_fn, none_first):
    def eager(x):
        y = torch.relu(x)
        return x + (check_fn(None, y) if none_first else check_fn(y, None))

    gm = check(hand_built(check_fn, none_first), RemoveNoneChecksPass(), -2, eager=eager, args=(torch.randn(5),))
    assert not none_checks(gm)


@pytest.mark.parametrize("check_fn", CHECKS, ids=["is_", "is_not"])
def test_placeholders_with_tensor_or_none_meta_fold(check_fn):
    """What the fxconvert tracer records in meta["val"] decides a check on a graph input."""
    graph = torch.fx.Graph()
    x, mask = graph.placeholder("x"), graph.placeholder("mask")
    x.meta["val"] = torch.empty(5, device="meta")
    mask.meta["val"] = None
    on_x = graph.call_function(check_fn, (x, None))
    on_mask = graph.call_function(check_fn, (mask, None))
    graph.output(graph.call_function(operator.add, (graph.call_function(operator.mul, (x, on_x)), on_mask)))
    gm = torch.fx.GraphModule(nn.Module(), graph)

    def eager(x, mask):
        return x * check_fn(x, None) + check_fn(mask, None)

    check(gm, RemoveNoneChecksPass(), -2, eager=eager, args=(torch.randn(5), None))


def test_check_on_a_bare_input_raises_naming_the_node():
    gm = torch.fx.symbolic_trace(CheckOnInput())
    with pytest.raises(PassError, match=r"is_None.*mask"):
        RemoveNoneChecksPass()(gm)


def test_undecidable_check_names_its_source_line():
    graph = torch.fx.Graph()
    mask = graph.placeholder("mask")
    c = graph.call_function(operator.is_not, (mask, None))
    c.meta["source"] = "modeling_toy.py:42"
    graph.output(c)
    with pytest.raises(PassError, match=r"is_not.*modeling_toy\.py:42"):
        RemoveNoneChecksPass()(torch.fx.GraphModule(nn.Module(), graph))


def test_check_on_an_element_of_a_module_output_is_not_assumed_a_tensor():
    """`weights` is None here, which nothing in an untyped graph says: the check is undecidable.

    (Folding it as "a tensor, so not None" makes the graph return zeros where eager does not.)
    """
    module = CheckOnMissingWeights().eval()
    gm = torch.fx.symbolic_trace(module)
    assert none_checks(gm)
    with pytest.raises(PassError, match="is_None"):
        RemoveNoneChecksPass()(gm)


@pytest.mark.parametrize("cls_name,attn", [
    ("T5ForConditionalGeneration", "sdpa"),
    ("T5ForConditionalGeneration", "eager"),
    ("MT5Model", "sdpa"),
    ("UMT5EncoderModel", "eager"),
])
def test_traced_t5_graphs_hold_no_checks_and_are_left_alone(cls_name, attn):
    _, reference, gm = traced_t5(cls_name, attn=attn)
    assert not none_checks(gm)
    inputs = t5_inputs(graph_info(gm).input_names)
    gm = check(gm, RemoveNoneChecksPass(), 0, eager=as_eager(reference), kwargs=inputs)
    assert not none_checks(gm)


def test_check_on_a_mask_that_may_be_none_at_run_time_raises():
    """runtime.padding_mask is None at run time when nothing is padded, although its traced
    value is a tensor: folding `mask is None` to False would be wrong for unpadded batches."""
    import fxconvert.runtime as runtime

    _, _, gm = traced_t5("T5EncoderModel")
    mask = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is runtime.padding_mask)
    unpadded = {"input_ids": torch.randint(0, 50, (2, 5)), "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    assert runtime.padding_mask(unpadded["attention_mask"]) is None  # the stated fact
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        check_node = gm.graph.call_function(operator.is_, (mask, None))
    out.args = ({**out.args[0], "mask_is_none": check_node},)
    gm.recompile()
    with pytest.raises(PassError, match=r"cannot decide the None check .*padding_mask"):
        RemoveNoneChecksPass()(gm)
