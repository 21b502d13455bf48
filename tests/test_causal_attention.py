"""SDPA's causal fast path: the converted decoder-only modules call SDPA as eager transformers does.

Eager transformers, seeing no padding, passes SDPA no mask and `is_causal=True` (its fused
kernels need that); with padding, or a sliding window that the keys reach, it passes the mask;
a single query gets neither. The converted module decides the same at run time
(`runtime.nothing_padded`, `runtime.causal_attention`). Here, for GPT-2, Llama (grouped kv
heads) and Mistral (a sliding window of 4), with and without padding, at batch 1 and at length 1:
every SDPA call's mask-or-not, `is_causal` and `enable_gqa` equal eager's, recorded in both by a
`TorchFunctionMode` that sees each call of `torch.nn.functional.scaled_dot_product_attention`; outputs and every gradient equal
eager at 1e-5; and a split into two stages, whose second stage recomputes the padding check
rather than receiving it (only tensors cross), calls SDPA the same way and composes to the
converted module.
"""

import contextlib
import functools

import pytest
import torch
import transformers
from torch.overrides import TorchFunctionMode

from fxconvert import runtime
from fxconvert.families import family_of_class
from fxconvert.stages import split_stages
from fxconvert.workflow import convert

# name -> (class, overrides of the record's tiny config)
MODELS = {
    "gpt2": ("GPT2LMHeadModel", {}),
    "llama": ("LlamaForCausalLM", {}),  # 4 query heads on 2 kv heads
    "mistral": ("MistralForCausalLM", {"sliding_window": 4}),
}
# (batch, length, padding of the first row): unpadded, padded on the right and on the left, batch 1,
# length 1, and 3 tokens (inside Mistral's window of 4: the fast path there too)
SHAPES = [(2, 9, None), (2, 9, "right"), (2, 9, "left"), (1, 7, None), (1, 1, None), (2, 3, None)]
NAMES = {"with_mask": ["input_ids", "attention_mask", "labels"], "no_mask": ["input_ids", "labels"]}


@functools.cache
def model_and_conversion(name, names="with_mask"):
    cls_name, overrides = MODELS[name]
    family = family_of_class(cls_name)
    model_type = next(t for t, (config_cls, _) in family.model_types.items()
                      if cls_name.startswith(config_cls.removesuffix("Config")))
    config = transformers.AutoConfig.for_model(**{**family.tiny_config(model_type), **overrides})
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)._from_config(config, attn_implementation="sdpa").eval()
    return model, convert(model, input_names=NAMES[names])


def inputs_for(model, names, shape, seed=0):
    batch, length, pad = shape
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if pad == "right" and length > 2:
        mask[0, -2:] = 0
    elif pad == "left" and length > 2:
        mask[0, :2] = 0
    labels = ids.clone()
    if length > 1:
        labels[-1, -1] = -100
    pool = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return {n: pool[n] for n in NAMES[names]}


class _SDPACalls(TorchFunctionMode):
    """Records (mask passed?, is_causal, enable_gqa) of every SDPA call, however the caller holds the function."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            named = dict(zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal"), args), **kwargs)
            self.calls.append((named.get("attn_mask") is not None, bool(named.get("is_causal", False)),
                               bool(named.get("enable_gqa", False))))
        return func(*args, **kwargs)


@contextlib.contextmanager
def sdpa_calls():
    with _SDPACalls() as mode:
        yield mode.calls


def eager_loss(model, inputs):
    return model(**inputs, use_cache=False).loss


def loss_and_grads(module, run):
    module.zero_grad(set_to_none=True)
    try:
        loss = run()
        torch.nan_to_num(loss).backward()  # one token: no label to predict, the loss is NaN in both
        return loss.detach(), {id(p): p.grad.detach().to_dense().clone() for p in module.parameters()
                               if p.grad is not None}
    finally:
        module.zero_grad(set_to_none=True)


CASES = [(m, n, s) for m in MODELS for n in NAMES for s in SHAPES if n == "with_mask" or s[2] is None]
IDS = [f"{m}-{n}-{b}x{l}-{p or 'unpadded'}" for m, n, (b, l, p) in CASES]


@pytest.mark.parametrize("name,names,shape", CASES, ids=IDS)
def test_sdpa_gets_is_causal_and_no_mask_exactly_when_eager_does(name, names, shape):
    model, conv = model_and_conversion(name, names)
    inputs = inputs_for(model, names, shape)
    with torch.no_grad(), sdpa_calls() as eager_calls:
        eager_loss(model, inputs)
    with torch.no_grad(), sdpa_calls() as converted_calls:
        conv.module(**inputs)
    assert len(eager_calls) == model.config.num_hidden_layers
    assert converted_calls == eager_calls
    batch, length, pad = shape
    window = getattr(model.config, "sliding_window", None)
    fast = pad is None and length > 1 and (window is None or length < window)
    assert eager_calls[0][:2] == ((False, True) if fast else (length > 1 or pad is not None, False))  # the rule


@pytest.mark.parametrize("name,names,shape", CASES, ids=IDS)
def test_outputs_and_gradients_equal_eager(name, names, shape):
    model, conv = model_and_conversion(name, names)
    inputs = inputs_for(model, names, shape, seed=1)
    by_id = {id(p): n for n, p in model.named_parameters()}
    for mode in ("eval", "train"):  # train: attention dropout under the same seed in both
        model.train(mode == "train")
        conv.module.train(mode == "train")
        try:
            expected, expected_grads = loss_and_grads(model, lambda: (torch.manual_seed(2), eager_loss(model, inputs))[1])
            actual, actual_grads = loss_and_grads(conv.module, lambda: (torch.manual_seed(2), conv.module(**inputs))[1])
        finally:
            model.eval()
            conv.module.eval()
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5, equal_nan=True)
        assert set(actual_grads) == set(expected_grads) and expected_grads
        for key, grad in expected_grads.items():
            torch.testing.assert_close(actual_grads[key], grad, rtol=1e-4, atol=1e-5,
                                       msg=lambda m, key=key: f"{mode} {by_id[key]}: {m}")


@pytest.mark.parametrize("pad", [None, "right"])
@pytest.mark.parametrize("name", list(MODELS))
def test_a_later_stage_recomputes_the_padding_check_and_takes_the_same_path(name, pad):
    model, conv = model_and_conversion(name)
    stages = split_stages(conv, 2, balance="params")
    assert not any("nothing_padded" in s for spec in stages.specs for s in spec.sent)  # a bool cannot be sent
    assert any("nothing_padded" in s for s in stages.specs[1].recomputed)
    inputs = inputs_for(model, "with_mask", (2, 3 if name == "mistral" else 9, pad), seed=3)
    with torch.no_grad(), sdpa_calls() as eager_calls:
        eager_loss(model, inputs)
    results = []
    for module in (conv.module, stages):
        with sdpa_calls() as calls:
            results.append(loss_and_grads(module, lambda: module(**inputs)))
        assert calls == eager_calls
    (expected, expected_grads), (actual, actual_grads) = results
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)
    assert set(actual_grads) == set(expected_grads)
    for key, grad in expected_grads.items():
        torch.testing.assert_close(actual_grads[key], grad, rtol=0, atol=1e-6)


def test_the_fast_path_rule_on_its_own():
    """`causal_attention` against SDPA called as transformers calls it, for the choices it makes."""
    torch.manual_seed(0)
    query, key, value = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()[None, None].expand(2, 1, 6, 6)
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True)
    for unpadded, window, calls in [(True, None, [(False, True, True)]), (False, None, [(True, False, False)]),
                                    (True, 7, [(False, True, True)]), (True, 6, [(True, False, False)])]:
        with sdpa_calls() as recorded:
            out = runtime.causal_attention(query, key, value, causal, unpadded=unpadded, window=window, groups=2)
        assert recorded == calls
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert not runtime.nothing_padded(torch.ones(2, 3, device="meta"))  # a meta mask reads as padded
    assert runtime.nothing_padded(torch.ones(2, 3, dtype=torch.long))
    assert not runtime.nothing_padded(torch.tensor([[1, 1, 0]]))
