"""Validation compares outputs and every gradient with eager, in eval and train mode, and catches breakage."""

import copy

import pytest
import torch
import torch.nn.functional as F

from fxconvert import convert
from fxconvert.errors import ValidationError
from fxconvert.validate import MODES, SHAPES, validate

import helpers


@pytest.mark.parametrize("cls_name, variant, attn", [
    ("T5ForConditionalGeneration", "original", "sdpa"),
    ("MT5Model", "v1_1", "eager"),
    ("UMT5EncoderModel", "v1_1", "sdpa"),
])
def test_a_faithful_conversion_passes(cls_name, variant, attn):
    model = helpers.build(cls_name, variant=variant, attn=attn)
    conversion = convert(model)
    result = validate(conversion)
    assert result.passed and result.skipped is None, result.failures
    n_params = len(dict(model.named_parameters()))
    runs = {c.run for c in result.checks}
    assert len(runs) == len(SHAPES) * len(MODES)
    assert len(result.checks) == len(runs) * (1 + n_params)  # the output and every parameter's gradient, per run
    assert all(c.max_diff is not None and c.max_diff <= result.atol for c in result.checks)
    assert model.training is False and all(p.grad is None for p in model.parameters())  # left as found
    result.raise_if_failed()


def test_a_corrupted_weight_fails():
    conversion = convert(helpers.build())
    # Leaf modules are shared with the eager model; give the graph its own, slightly different, copy.
    attention = conversion.graph_module.get_submodule("encoder.block.0.layer.0.SelfAttention")
    attention.q = copy.deepcopy(attention.q)
    with torch.no_grad():
        attention.q.weight.add_(0.01)
    result = validate(conversion)
    assert not result.passed
    failed = {c.tensor for c in result.failures}
    assert "param graph_module.encoder.block.0.layer.0.SelfAttention.q.weight" in failed
    assert "output loss" in failed
    with pytest.raises(ValidationError, match=r"validation failed: \d+ of \d+ checked tensors exceed the tolerance "
                                              r"\(float32: atol 1e-05, rtol 1.3e-06\)"):
        result.raise_if_failed()


def test_a_wrong_dropout_rate_fails_in_train_mode_only():
    conversion = convert(helpers.build())
    node = next(n for n in conversion.graph_module.graph.nodes if n.target is F.dropout)
    node.update_kwarg("p", 0.5)
    conversion.graph_module.recompile()
    result = validate(conversion)
    assert not result.passed
    assert {c.run.split()[0] for c in result.failures} == {"train"}


def test_the_tolerance_decides():
    conversion = convert(helpers.build())
    node = next(n for n in conversion.graph_module.graph.nodes if n.target is torch.rsqrt)
    with conversion.graph_module.graph.inserting_after(node):
        nudged = conversion.graph_module.graph.call_function(torch.mul, (node, 1 + 1e-3))
    node.replace_all_uses_with(nudged, delete_user_cb=lambda user: user is not nudged)
    conversion.graph_module.recompile()
    loose, tight = validate(conversion, atol=1.0), validate(conversion, atol=1e-5)
    assert loose.passed and not tight.passed
    assert 0 < tight.max_diff <= 1.0


def test_meta_models_are_skipped():
    with torch.device("meta"):
        model = helpers.build()
    result = validate(convert(model))
    assert result.skipped and "meta" in result.skipped
    assert not result.passed and result.checks == []


def test_the_callers_gradients_and_random_state_are_left_as_found():
    model = helpers.build()
    conversion = convert(model)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)  # gradients the caller accumulated
    torch.manual_seed(1234)
    expected_next = torch.rand(3)
    torch.manual_seed(1234)
    assert validate(conversion).passed
    torch.testing.assert_close(torch.rand(3), expected_next)  # the global RNG continues where it was
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
