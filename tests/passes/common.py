"""The one `check` helper every pass test calls, and the tiny fixtures the pass tests share.

`check` follows torch.fx's `test/fx/test_cse_pass.py`: it runs a pass on a GraphModule and
asserts the node-count change, that `modified` is honest (True exactly when the graph
changed), that the result lints, that a second run changes nothing and reports
modified=False, and that the result computes what the eager model computes.
"""

import copy
import dataclasses

import torch
import torch.fx

from helpers import build, eager_outputs, random_inputs

from fxconvert.graph_info import GraphInfo, set_graph_info
from fxconvert.trace import trace


def graph_text(gm: torch.fx.GraphModule) -> str:
    """Everything that decides what the graph computes: its nodes and its generated code."""
    return str(gm.graph) + gm.code


def check(gm, pass_, delta, *, eager=None, args=(), kwargs=None, graph_kwargs=None, seed=0):
    """Run `pass_` on `gm` and return the resulting GraphModule.

    - `delta`: the expected change in node count (None: the caller asserts what changed);
    - `eager`: a callable computing the expected result from `args`/`kwargs`; the pass's
      result is called with the same arguments plus `graph_kwargs` (e.g. `training=True`),
      both under `torch.manual_seed(seed)`, so results with dropout are compared too.
    """
    before_text, before_count = graph_text(gm), len(gm.graph.nodes)
    result = pass_(gm)
    new = result.graph_module
    after_text, after_count = graph_text(new), len(new.graph.nodes)
    assert isinstance(result.modified, bool)
    assert result.modified == (after_text != before_text), f"modified={result.modified} is not honest"
    if delta is not None:
        assert after_count - before_count == delta, (after_count, before_count)
    new.graph.lint()

    again = pass_(new)
    assert again.modified is False, "a second run reported a change"
    assert graph_text(again.graph_module) == after_text, "a second run changed the graph"

    if eager is not None:
        kwargs = kwargs or {}
        torch.manual_seed(seed)
        expected = eager(*args, **kwargs)
        torch.manual_seed(seed)
        actual = again.graph_module(*args, **kwargs, **(graph_kwargs or {}))
        assert_same(actual, expected)
    return again.graph_module


def assert_same(actual, expected):
    """Equal results, tensor by tensor, for a tensor or a dict of them."""
    if isinstance(expected, dict):
        assert list(actual) == list(expected), (list(actual), list(expected))
        for name in expected:
            torch.testing.assert_close(actual[name], expected[name], msg=lambda m, name=name: f"{name}: {m}")
    else:
        torch.testing.assert_close(actual, expected)


def nodes_calling(gm, *targets):
    return [n for n in gm.graph.nodes if n.op in ("call_function", "call_method") and n.target in targets]


def placeholders(gm):
    return [n.target for n in gm.graph.nodes if n.op == "placeholder"]


def with_graph_info(gm, **fields):
    """`gm` with the `GraphInfo` fxconvert's tracer records (every placeholder a model input, no
    attention dropout rates), `fields` replaced: what a pass needs of a toy graph."""
    info = GraphInfo(model_class=type(gm).__name__, input_names=tuple(placeholders(gm)),
                     traced_training=gm.training, dropout_rates={})
    set_graph_info(gm, dataclasses.replace(info, **fields))
    return gm


def symbolic_trace(module, **fields):
    """`torch.fx.symbolic_trace(module)` with a `GraphInfo` (`with_graph_info`)."""
    return with_graph_info(torch.fx.symbolic_trace(module), **fields)


# -- T5 fixtures ---------------------------------------------------------------------------------

LABELS = ["input_ids", "attention_mask", "decoder_input_ids", "labels"]
NO_LABELS = ["input_ids", "attention_mask", "decoder_input_ids"]


def traced_t5(cls_name="T5ForConditionalGeneration", *, variant="original", attn="sdpa", mode="eval",
              input_names=None, prepare=None):
    """(model, eager reference copy, fresh GraphModule traced from `model` in `mode`).

    The GraphModule shares the traced model's parameters, so eager results come from the copy.
    `prepare(model)` edits the model before it is copied and traced.
    """
    model = build(cls_name, variant, attn)
    getattr(model, mode)()
    if prepare is not None:
        prepare(model)
    reference = copy.deepcopy(model)
    return model, reference, trace(model, input_names)


def t5_inputs(names, batch=2, enc_len=19, dec_len=4):
    """Token inputs with an encoder longer than relative_attention_max_distance (16)."""
    return random_inputs(names, batch, enc_len, dec_len)


def as_eager(reference, mode="eval"):
    """The eager model as a callable returning the dict a traced graph returns."""
    getattr(reference, mode)()
    return lambda **inputs: eager_outputs(reference, inputs)


def untie_lm_head(model):
    """Give `model.lm_head` its own weight (transformers 5 always ties T5's head, even for v1.1)."""
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() * 2)
    assert model.lm_head.weight is not model.shared.weight
    return model
