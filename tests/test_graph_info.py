"""The typed record a traced graph carries (`fxconvert.graph_info`): what the tracer and the passes
write, one accessor with a one-line error, and a record that travels with the graph as gm.meta did."""

import copy

import pytest
import torch
import torch.fx
from torch.fx._lazy_graph_module import _LazyGraphModule

from helpers import build, random_inputs

from fxconvert.workflow import convert
from fxconvert.errors import UsageError
from fxconvert.graph_info import GRAPH_INFO, GraphInfo, graph_info, set_graph_info, update_graph_info
from fxconvert.trace import trace


def test_the_tracer_records_the_model():
    model = build("T5ForConditionalGeneration").train()
    gm = trace(model, ["input_ids", "attention_mask", "decoder_input_ids", "labels"])
    info = graph_info(gm)
    assert list(gm.meta) == [GRAPH_INFO]
    assert info.model_class == "T5ForConditionalGeneration"
    assert info.input_names == ("input_ids", "attention_mask", "decoder_input_ids", "labels")
    assert info.traced_training is True
    # every T5 attention module (and the layers around them), at the configured rate
    attentions = {p for p, m in model.named_modules() if type(m).__name__ == "T5Attention"}
    assert attentions and attentions <= set(info.dropout_rates)
    assert set(info.dropout_rates.values()) == {model.config.dropout_rate}
    assert (info.lifted_weights, info.output_name, info.dropped_inputs) == (None, None, ())


def test_the_passes_record_what_they_chose():
    conversion = convert(build("T5ForConditionalGeneration"), input_names=["input_ids", "attention_mask",
                                                                            "decoder_input_ids", "labels"],
                         output="encoder_last_hidden_state")
    info = graph_info(conversion.graph_module)
    assert info.output_name == "encoder_last_hidden_state" == conversion.output_name
    assert info.input_names == ("input_ids", "attention_mask") == tuple(conversion.input_names)
    assert info.dropped_inputs == ("decoder_input_ids", "labels") == tuple(conversion.dropped_inputs)
    assert list(info.lifted_weights) == ["shared_embed_weight"]
    assert info.lifted_weights["shared_embed_weight"] is conversion.module.shared_embed_weight


def test_a_graph_fxconvert_did_not_trace_has_no_record_and_the_error_says_so():
    gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    with pytest.raises(UsageError) as caught:
        graph_info(gm)
    message = str(caught.value)
    assert len(message.splitlines()) == 1
    assert "no fxconvert GraphInfo" in message and "trace the model with fxconvert.trace" in message


def test_a_record_is_replaced_not_edited():
    gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    first = set_graph_info(gm, GraphInfo(model_class="Linear", input_names=("input",), traced_training=False,
                                         dropout_rates={}))
    with pytest.raises(AttributeError):
        first.output_name = "x"
    second = update_graph_info(gm, output_name="logits")
    assert graph_info(gm) is second and second.output_name == "logits" and first.output_name is None
    with pytest.raises(UsageError, match="set_graph_info takes a GraphInfo, got dict"):
        set_graph_info(gm, {"output_name": "logits"})


def test_the_record_travels_with_the_graph():
    """As the string-keyed gm.meta did: deepcopy copies it (tensors too), copy shares it, recompile keeps it."""
    conversion = convert(build("T5ForConditionalGeneration"))
    gm = conversion.graph_module
    info = graph_info(gm)

    gm.recompile()
    _LazyGraphModule.force_recompile(gm)
    assert graph_info(gm) is info

    assert graph_info(copy.copy(gm)) is info

    copied = copy.deepcopy(gm)
    twin = graph_info(copied)
    assert twin is not info
    for name in ("model_class", "input_names", "traced_training", "dropout_rates", "output_name", "dropped_inputs"):
        assert getattr(twin, name) == getattr(info, name), name
    assert list(twin.lifted_weights) == list(info.lifted_weights)
    for name, weight in info.lifted_weights.items():
        assert twin.lifted_weights[name] is not weight
        torch.testing.assert_close(twin.lifted_weights[name], weight)

    # and a deep copy still computes what the original does
    inputs = random_inputs(conversion.input_names, 2, 5, 3)
    shared = [getattr(conversion.module, n) for n in conversion.module.shared_names]
    expected = gm(*(inputs[n] for n in conversion.input_names), *shared, False)
    torch.testing.assert_close(copied(*(inputs[n] for n in conversion.input_names), *shared, False), expected)
