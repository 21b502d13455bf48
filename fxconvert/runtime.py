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
    batch, length = inputs_embeds.shape[0], inputs_embeds.shape[1]
    positions = torch.arange(length, device=inputs_embeds.device)
    mask = (positions[None, :] <= positions[:, None])[None, None, :, :]
    mask = mask.expand(batch, 1, length, length)
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, :length].to(device=inputs_embeds.device, dtype=torch.bool)
    return _finish(mask, dtype)


def padding_mask(attention_mask: torch.Tensor, dtype: torch.dtype | None = None):
    """Bidirectional padding mask of shape (batch, 1, 1, kv), broadcast over queries.

    Boolean (True = attend) when `dtype` is None, else additive in `dtype`.
    """
    mask = attention_mask[:, None, None, :].to(dtype=torch.bool)
    return _finish(mask, dtype)


def _finish(mask: torch.Tensor, dtype: torch.dtype | None):
    if dtype is None:
        return mask
    zero = torch.zeros((), device=mask.device, dtype=dtype)
    return torch.where(mask, zero, torch.finfo(dtype).min)
