"""Leaf functions that traced graphs call at run time.

The tracer records these as single `call_function` nodes in place of transformers'
mask helpers (`transformers.masking_utils`), which do Python-level work on config and
cache objects. Their arguments are tensors and plain constants only, and this module
imports nothing but torch, so generated code that calls them runs without transformers.
"""

import torch


def causal_mask(inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None, dtype: torch.dtype | None = None):
    """Causal mask of shape (batch, 1, q, q) combined with an optional 2-D padding mask.

    Returns a boolean mask (True = attend) when `dtype` is None (for SDPA), else an additive
    mask of `dtype` holding 0 where attention is allowed and the dtype's minimum elsewhere.
    """
    length = inputs_embeds.shape[1]
    positions = torch.arange(length, device=inputs_embeds.device)
    mask = (positions[None, :] <= positions[:, None])[None, None, :, :]  # (1, 1, q, q): broadcast over batch
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, :length].to(device=inputs_embeds.device, dtype=torch.bool)
    return _finish(mask, dtype)


def sliding_window_causal_mask(inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                               window: int, dtype: torch.dtype | None = None):
    """`causal_mask` where each query also sees only the last `window` positions (itself included).

    transformers' sliding window (Mistral, Qwen2 with use_sliding_window): a query at q
    attends a key at kv when q - window < kv <= q.
    """
    length = inputs_embeds.shape[1]
    positions = torch.arange(length, device=inputs_embeds.device)
    offset = positions[:, None] - positions[None, :]  # q - kv
    mask = ((offset >= 0) & (offset < window))[None, None, :, :]
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, :length].to(device=inputs_embeds.device, dtype=torch.bool)
    return _finish(mask, dtype)


def padding_mask(attention_mask: torch.Tensor, dtype: torch.dtype | None = None):
    """Bidirectional padding mask of shape (batch, 1, 1, kv), broadcast over queries.

    Boolean (True = attend) when `dtype` is None, else additive in `dtype`. Like
    transformers' SDPA masks, the boolean form is None when nothing is padded (checked at
    run time, except under torch.compile), so attention skips the masking work.
    """
    if dtype is None and _nothing_padded(attention_mask):
        return None
    mask = attention_mask[:, None, None, :].to(dtype=torch.bool)
    return _finish(mask, dtype)


def _nothing_padded(attention_mask: torch.Tensor) -> bool:
    if torch.compiler.is_compiling() or attention_mask.device.type == "meta":
        return False
    return bool(attention_mask.all())


def position_bias_mask(position_bias: torch.Tensor, mask: torch.Tensor | None):
    """T5's SDPA attention mask: the position bias, with masked positions at the dtype's minimum."""
    if mask is None:
        return position_bias
    if mask.dtype == torch.bool:
        return torch.where(mask, position_bias, torch.finfo(position_bias.dtype).min).contiguous()
    return (position_bias + mask).contiguous()


def _finish(mask: torch.Tensor, dtype: torch.dtype | None):
    if dtype is None:
        return mask
    zero = torch.zeros((), device=mask.device, dtype=dtype)
    return torch.where(mask, zero, torch.finfo(dtype).min)


# Leaf functions whose result may be None at run time although their traced (meta) value is
# a tensor: a None check on them cannot be decided from the graph.
MAY_RETURN_NONE = frozenset({padding_mask})

