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


def sliding_window_padding_mask(inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                                window: int, dtype: torch.dtype | None = None):
    """Bidirectional sliding-window mask of shape (batch, 1, q, kv): a query at q sees a key at kv when
    |q - kv| <= window (transformers' `create_bidirectional_sliding_window_mask`), and the key is not padding.

    Boolean (True = attend) when `dtype` is None, else additive in `dtype`. Like transformers' SDPA
    masks, the boolean form is None when nothing is padded and the window spans every key (kv < window),
    decided at run time as `padding_mask` does.
    """
    q = inputs_embeds.shape[1]
    kv = attention_mask.shape[-1] if attention_mask is not None else q
    if dtype is None and kv < window and (attention_mask is None or _nothing_padded(attention_mask)):
        return None
    device = inputs_embeds.device
    offset = torch.arange(q, device=device)[:, None] - torch.arange(kv, device=device)[None, :]
    mask = (offset.abs() <= window)[None, None, :, :]
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, :].to(device=device, dtype=torch.bool)
    return _finish(mask, dtype)


def recurrent_padding_mask(inputs_embeds: torch.Tensor, attention_mask: torch.Tensor):
    """The 2-D padding mask a recurrent (Mamba, convolution) layer multiplies its states by, cut to the
    last `inputs_embeds.shape[1]` positions (transformers' `create_recurrent_attention_mask`).

    Where transformers returns None (one position, or nothing padded), its layers skip the multiply; a
    mask of ones makes the same multiply exact (x * 1 == x, and so is its gradient), so the graph keeps
    one path and the choice stays a run-time one.
    """
    mask = attention_mask[:, -inputs_embeds.shape[1]:].contiguous()
    return torch.ones_like(mask) if inputs_embeds.shape[1] == 1 else mask


def _nothing_padded(attention_mask: torch.Tensor) -> bool:
    if torch.compiler.is_compiling() or attention_mask.device.type == "meta":
        return False
    return bool(attention_mask.all())


def nothing_padded(attention_mask: torch.Tensor) -> bool:
    """Whether a 2-D padding mask attends every position (False on meta tensors and under torch.compile).

    Computed once per forward from the model input (a pipeline stage recomputes it rather than
    receiving it), it tells `causal_attention` whether the causal mask is plain causality,
    which SDPA applies itself. Like transformers, it reads the mask's values, so a compiled
    graph cannot depend on it and keeps the explicit mask.
    """
    return _nothing_padded(attention_mask)


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None, *,
                     unpadded: bool = False, window: int | None = None, groups: int = 1, dropout_p: float = 0.0,
                     scale: float | None = None):
    """SDPA for causal self-attention, called with the arguments transformers' SDPA path gives it.

    Without padding (`unpadded`, from `nothing_padded`) transformers passes no mask and
    `is_causal=True`, which lets SDPA pick its fused kernels; so does this, at run time. The
    mask stays where transformers keeps it (`_ignore_causal_mask_sdpa`, `sdpa_attention_forward`):
    with padding, and with a sliding window that the keys reach (`window <= kv length`). A
    single query sees every key, so it gets neither mask nor `is_causal`. Grouped key/value
    heads use SDPA's `enable_gqa` without a mask (head size up to 256) and are repeated with one.
    """
    if unpadded and (window is None or key.shape[2] < window):
        attn_mask = None
    is_causal = query.shape[2] > 1 and attn_mask is None
    gqa = groups > 1 and attn_mask is None and key.shape[-1] == value.shape[-1] <= 256
    if groups > 1 and not gqa:
        key, value = repeat_kv(key, value, groups)
    extra = {"enable_gqa": True} if gqa else {}
    return torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale, is_causal=is_causal, **extra)


def repeat_kv(key: torch.Tensor, value: torch.Tensor, groups: int):
    """Grouped-query attention's key/value heads, each repeated for the `groups` query heads it serves."""
    return (key[:, :, None].expand(-1, -1, groups, -1, -1).flatten(1, 2),
            value[:, :, None].expand(-1, -1, groups, -1, -1).flatten(1, 2))


def position_bias_mask(position_bias: torch.Tensor, mask: torch.Tensor | None, causal: bool = False):
    """T5's SDPA attention mask: the position bias, with masked positions at the dtype's minimum.

    Without a mask, a causal attention masks the future itself, as transformers'
    `create_position_bias_mask` does where SDPA would otherwise be told `is_causal`.
    """
    if mask is None:
        if not causal:
            return position_bias
        q, kv = position_bias.shape[-2:]
        positions = torch.arange(max(q, kv), device=position_bias.device)
        mask = (positions[:q, None] >= positions[None, :kv])[None, None]
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
MAY_RETURN_NONE = frozenset({padding_mask, sliding_window_padding_mask})

