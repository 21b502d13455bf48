"""Tiny T5-family models and comparisons against eager transformers, shared by the tests."""

import torch
import transformers

FAMILIES = {"T5": transformers.T5Config, "MT5": transformers.MT5Config, "UMT5": transformers.UMT5Config}

# Config variants named in the tracer issue. Each is a set of overrides on a tiny config.
VARIANTS = {
    # original T5: relu FF, LM head tied to the shared embedding, d_model**-0.5 rescale
    "original": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    # v1.1 / flan: gated-gelu, untied LM head
    "v1_1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "uneven_layers": dict(feed_forward_proj="relu", tie_word_embeddings=True, num_layers=2, num_decoder_layers=1),
    "narrow_heads": dict(feed_forward_proj="relu", tie_word_embeddings=True, num_heads=3, d_kv=8),  # 24 != 32
}

CLASSES = [f"{family}{suffix}" for family in FAMILIES for suffix in ("Model", "ForConditionalGeneration", "EncoderModel")]

VOCAB = 97


def tiny_config(family="T5", variant="original", attn="sdpa", **overrides):
    kwargs = dict(
        d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, vocab_size=VOCAB,
        relative_attention_num_buckets=8, relative_attention_max_distance=16,
        dropout_rate=0.1, decoder_start_token_id=0, pad_token_id=0, use_cache=False,
    )
    kwargs.update(VARIANTS[variant])
    kwargs.update(overrides)
    config = FAMILIES[family](**kwargs)
    config._attn_implementation = attn
    return config


def build(cls_name="T5ForConditionalGeneration", variant="original", attn="sdpa", seed=0, **overrides):
    family = cls_name.split("For")[0].replace("EncoderModel", "").replace("Model", "")
    config = tiny_config(family, variant, attn, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)._from_config(config, attn_implementation=attn)
    return model.eval()


def random_inputs(names, batch, enc_len, dec_len, vocab=VOCAB, seed=0, pad=True):
    """Random token inputs; the attention masks pad the tail of the first sequence."""
    g = torch.Generator().manual_seed(seed)
    enc_mask = torch.ones(batch, enc_len, dtype=torch.long)
    dec_mask = torch.ones(batch, dec_len, dtype=torch.long)
    if pad and enc_len > 2:
        enc_mask[0, -2:] = 0
    if pad and dec_len > 2:
        dec_mask[0, -1:] = 0
    labels = torch.randint(0, vocab, (batch, dec_len), generator=g)
    if dec_len > 1:
        labels[-1, -1] = -100  # an ignored label
    pool = {
        "input_ids": torch.randint(0, vocab, (batch, enc_len), generator=g),
        "attention_mask": enc_mask,
        "decoder_input_ids": torch.randint(0, vocab, (batch, dec_len), generator=g),
        "decoder_attention_mask": dec_mask,
        "labels": labels,
    }
    return {n: pool[n] for n in names}


def eager_outputs(model, inputs):
    kwargs = dict(inputs)
    if "use_cache" in model.forward.__code__.co_varnames or not type(model).__name__.endswith("EncoderModel"):
        kwargs["use_cache"] = False
    out = model(**kwargs)
    return {k: v for k, v in out.items() if v is not None}


def max_diff(a: dict, b: dict) -> dict:
    assert set(a) == set(b), (sorted(a), sorted(b))
    return {k: (a[k].detach().float() - b[k].detach().float()).abs().max().item() for k in a}


def grads(module) -> dict:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
