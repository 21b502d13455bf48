"""Validation compares outputs and every gradient with eager, in eval and train mode, and catches breakage."""

import copy

import pytest
import torch
import torch.nn.functional as F

from fxconvert import convert
from fxconvert.errors import ValidationError
from fxconvert.validate import MODES, SHAPES, _random_inputs, model_dtype, validate

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


# -- an output that drops the tied head --------------------------------------------------------


def test_an_output_without_the_tied_head_keeps_every_gradient_dense_and_drops_unread_inputs():
    """The encoder output drops the tied LM head, the shared embedding's only dense use: its
    gradient stays dense and equal to eager's, AdamW and clip_grad_norm_ take it, and the
    decoder's inputs are no inputs of the graph (eager is still given them)."""
    model = helpers.build()
    reference = copy.deepcopy(model)
    conversion = convert(model, output="encoder_last_hidden_state")
    assert conversion.input_names == ["input_ids", "attention_mask"]
    assert conversion.dropped_inputs == ["decoder_input_ids", "labels"]
    result = validate(conversion)
    assert result.passed, result.failures
    inputs = helpers.random_inputs(["input_ids", "attention_mask", "decoder_input_ids", "labels"], 2, 6, 4)
    out = conversion.module(**{k: inputs[k] for k in conversion.input_names})
    expected = helpers.eager_outputs(reference, inputs)["encoder_last_hidden_state"]
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    expected.sum().backward()
    grads = {n: p.grad for n, p in conversion.module.named_parameters() if p.grad is not None}
    assert grads and all(g.layout == torch.strided for g in grads.values())
    torch.testing.assert_close(conversion.module.shared_embed_weight.grad, reference.shared.weight.grad)
    torch.nn.utils.clip_grad_norm_(conversion.module.parameters(), 1.0)
    torch.optim.AdamW(conversion.module.parameters()).step()


def test_a_sparse_gradient_where_eager_has_a_dense_one_fails():
    conversion = convert(helpers.build(), output="encoder_last_hidden_state")
    lookup = next(n for n in conversion.graph_module.graph.nodes if n.target is F.embedding)
    lookup.update_kwarg("sparse", True)  # what the lookup was before the head's removal was considered
    conversion.graph_module.recompile()
    result = validate(conversion)
    failed = {(c.tensor, c.note) for c in result.failures}
    assert failed == {("grad shared.weight", "layout torch.sparse_coo, eager torch.strided")}


# -- tolerances by dtype ---------------------------------------------------------------------


def test_the_default_tolerance_follows_the_dtype_and_is_stated():
    """bf16 eager and bf16 converted differ by rounding only (the tied gradient's rows are added in
    another order), which torch.testing's bf16 defaults accept; the rule is in the result."""
    model = helpers.build().to(torch.bfloat16)
    conversion = convert(model)
    result = validate(conversion)
    assert result.passed, result.failures
    assert (result.dtype, result.atol, result.rtol) == ("bfloat16", 1e-5, 1.6e-2)
    assert "atol 1e-05, rtol 0.016 (the bfloat16 defaults)" in result.rule
    assert "max|eager| per tensor for gradients" in result.rule
    assert result.max_diff > 0  # there is a rounding difference to tolerate
    strict = validate(conversion, rtol=0)
    assert not strict.passed and {c.tensor for c in strict.failures} == {"grad shared.weight"}
    assert "rtol given, otherwise the bfloat16 defaults" in strict.rule


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_dtype_tolerance_still_catches_a_wrong_weight(dtype):
    model = helpers.build().to(dtype)
    conversion = convert(model)
    attention = conversion.graph_module.get_submodule("encoder.block.0.layer.0.SelfAttention")
    attention.q = copy.deepcopy(attention.q)
    with torch.no_grad():
        attention.q.weight.mul_(1.1)
    result = validate(conversion)
    assert not result.passed  # the gradients show it, where the scalar loss moves less than bf16's 1.6%
    assert "grad encoder.block.0.layer.0.SelfAttention.k.weight" in {c.tensor for c in result.failures}


def test_the_least_precise_parameter_dtype_decides():
    model = helpers.build().half()
    for name, module in model.named_modules():
        if name.endswith(".wo"):
            module.float()  # as transformers loads T5 in fp16
    assert model_dtype(model) == torch.float16
    assert model_dtype(helpers.build()) == torch.float32


# -- non-finite values -------------------------------------------------------------------------


def test_nan_weights_fail_and_the_message_names_the_cause():
    model = helpers.build()
    with torch.no_grad():
        model.encoder.block[0].layer[0].SelfAttention.q.weight[0, 0] = float("nan")
    result = validate(convert(model))
    assert not result.passed and all(not c.finite for c in result.failures)
    first = result.failures[0]
    assert (first.run, first.tensor) == ("eval 2x7/5", "output loss")
    assert first.note == "not finite in the converted module (NaN at 1 of 1 elements); eager is not finite there too"
    with pytest.raises(ValidationError) as error:
        result.raise_if_failed()
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("validation failed: output loss in run 'eval 2x7/5' is not finite in the converted "
                              "module (NaN at 1 of 1 elements); eager is not finite there too")
    assert "NaN or inf weights in the checkpoint are the usual cause" in message


def test_a_nan_only_the_conversion_makes_says_eager_is_finite():
    conversion = convert(helpers.build())
    graph = conversion.graph_module.graph
    node = next(n for n in graph.nodes if n.target is torch.rsqrt)
    with graph.inserting_after(node):
        poisoned = graph.call_function(torch.mul, (node, float("inf")))
    node.replace_all_uses_with(poisoned, delete_user_cb=lambda user: user is not poisoned)
    conversion.graph_module.recompile()
    result = validate(conversion)
    first = result.failures[0]
    assert first.tensor == "output loss" and not first.finite
    assert first.note.endswith("; eager is finite there")


def test_validation_inputs_never_make_eager_compute_a_nan():
    """Labels are never all ignored (the loss would be 0/0), masks never hide a whole row; checked
    on the eager model at every size down to 1."""
    model = helpers.build()
    names = ["input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask", "labels"]
    for batch, enc, dec in [(1, 1, 1), (1, 2, 1), (2, 1, 2), (1, 3, 2), *SHAPES]:
        inputs = _random_inputs(names, model, batch, enc, dec, seed=0)
        assert (inputs["labels"] != -100).any(dim=1).all()
        assert inputs["attention_mask"].any(dim=1).all() and inputs["decoder_attention_mask"].any(dim=1).all()
        with torch.no_grad():
            out = helpers.eager_outputs(model, inputs)
        assert all(torch.isfinite(v).all() for v in out.values()), (batch, enc, dec)
