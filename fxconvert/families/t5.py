"""T5, mT5 and umT5: encoder-decoder, relative position bias, shared embedding.

The LM head is tied to the shared embedding in the original T5 and untied in v1.1, flan
and mT5 (transformers 5 ties it at construction whatever the config says and unties it
when a checkpoint holds a distinct head; a random-weight build mirrors the published
checkpoints). SDPA attention always receives the position bias as a float mask.
"""

from fxconvert.families import ENCODER_DECODER_INPUTS, Family, block_regex
from fxconvert.objectives import SEQ2SEQ

# Published hyperparameters. Each line fixes the vocabulary, feed-forward and tying; each
# size: (d_model, d_ff, d_kv, num_heads, num_layers).
_LINES = {
    "t5": dict(model_type="t5", vocab_size=32128, feed_forward_proj="relu", tie_word_embeddings=True),
    "t5-v1_1": dict(model_type="t5", vocab_size=32128, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "mt5": dict(model_type="mt5", vocab_size=250112, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}
_SIZES = {
    "t5-small": ("t5", 512, 2048, 64, 8, 6),
    "t5-base": ("t5", 768, 3072, 64, 12, 12),
    "t5-large": ("t5", 1024, 4096, 64, 16, 24),
    "t5-3b": ("t5", 1024, 16384, 128, 32, 24),
    "t5-11b": ("t5", 1024, 65536, 128, 128, 24),
    "google/t5-v1_1-small": ("t5-v1_1", 512, 1024, 64, 6, 8),
    "google/t5-v1_1-base": ("t5-v1_1", 768, 2048, 64, 12, 12),
    "google/t5-v1_1-large": ("t5-v1_1", 1024, 2816, 64, 16, 24),
    "google/t5-v1_1-xl": ("t5-v1_1", 2048, 5120, 64, 32, 24),
    "google/t5-v1_1-xxl": ("t5-v1_1", 4096, 10240, 64, 64, 24),
    "google/flan-t5-small": ("t5-v1_1", 512, 1024, 64, 6, 8),
    "google/flan-t5-base": ("t5-v1_1", 768, 2048, 64, 12, 12),
    "google/flan-t5-large": ("t5-v1_1", 1024, 2816, 64, 16, 24),
    "google/flan-t5-xl": ("t5-v1_1", 2048, 5120, 64, 32, 24),
    "google/flan-t5-xxl": ("t5-v1_1", 4096, 10240, 64, 64, 24),
    "google/mt5-small": ("mt5", 512, 1024, 64, 6, 8),
    "google/mt5-base": ("mt5", 768, 2048, 64, 12, 12),
    "google/mt5-large": ("mt5", 1024, 2816, 64, 16, 24),
    "google/mt5-xl": ("mt5", 2048, 5120, 64, 32, 24),
    "google/mt5-xxl": ("mt5", 4096, 10240, 64, 64, 24),
}
_PREFIX = {"t5": "T5", "mt5": "MT5", "umt5": "UMT5"}


def _preset(line, d_model, d_ff, d_kv, num_heads, num_layers) -> dict:
    config = dict(_LINES[line], d_model=d_model, d_ff=d_ff, d_kv=d_kv, num_heads=num_heads,
                  num_layers=num_layers, num_decoder_layers=num_layers)
    config.update(decoder_start_token_id=0, pad_token_id=0, use_cache=False)
    config["architectures"] = [f"{_PREFIX[config['model_type']]}ForConditionalGeneration"]
    return config


# Relative-position buckets: the encoder's bidirectional bucketing halves the count twice and
# divides by the result, so fewer than 4 buckets divide by zero; a max distance not above
# half the buckets gives negative bucket indices (both measured against transformers' T5).
MIN_BUCKETS = 4


def check_config(config: dict, refuse) -> None:
    """T5's own structural fields; `refuse(key, rule, tail=...)` raises the one-line error."""
    buckets = config.get("relative_attention_num_buckets")
    is_int = isinstance(buckets, int) and not isinstance(buckets, bool)
    if "relative_attention_num_buckets" in config and not (is_int and buckets >= MIN_BUCKETS):
        refuse("relative_attention_num_buckets", f"an integer of at least {MIN_BUCKETS} (T5 uses 32)")
    if "relative_attention_max_distance" in config:
        least = (buckets if is_int else 32) // 2 + 1
        distance = config["relative_attention_max_distance"]
        if not (isinstance(distance, int) and not isinstance(distance, bool) and distance >= least):
            refuse("relative_attention_max_distance", f"an integer of at least {least}, more than half the "
                                                      f"relative_attention_num_buckets (T5 uses 128)")
    if "feed_forward_proj" in config:
        from transformers.activations import ACT2FN

        value = config["feed_forward_proj"]
        parts = value.split("-") if isinstance(value, str) else []
        act = parts[-1] if len(parts) == 1 or (len(parts) == 2 and parts[0] == "gated") else None
        if value == "gated-gelu":  # T5Config's name for gated gelu_new
            act = "gelu_new"
        if act not in ACT2FN:
            refuse("feed_forward_proj", "'ACT' or 'gated-ACT' with ACT an activation such as relu or gelu_new "
                                        "(T5 uses 'relu', T5 v1.1 'gated-gelu')", tail="")


FAMILY = Family(
    name="t5",
    title="T5 (T5, mT5, umT5)",
    tiny=dict(
        d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, vocab_size=97,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.1,
        feed_forward_proj="relu", tie_word_embeddings=True, decoder_start_token_id=0, pad_token_id=0,
        use_cache=False
    ),
    model_types={t: (f"{p}Config", f"{p}ForConditionalGeneration") for t, p in _PREFIX.items()},
    classes=tuple(f"{p}{s}" for p in _PREFIX.values() for s in ("Model", "ForConditionalGeneration", "EncoderModel")),
    inputs=ENCODER_DECODER_INPUTS,
    default_inputs=(
        ("EncoderModel", ("input_ids", "attention_mask")),
        ("ForConditionalGeneration", ("input_ids", "attention_mask", "decoder_input_ids", "labels")),
        ("Model", ("input_ids", "attention_mask", "decoder_input_ids")),
    ),
    train_inputs=("input_ids", "attention_mask", "decoder_input_ids", "labels"),
    hidden_field="d_model",
    blocks=(block_regex(r"encoder\.block"), block_regex(r"decoder\.block")),
    presets={name: _preset(*size) for name, size in _SIZES.items()},
    aliases={f"google-t5/{n}": n for n in _SIZES if n.startswith("t5-")},
    config_fields=("d_model", "d_ff", "d_kv", "num_heads", "num_layers", "num_decoder_layers", "vocab_size",
                   "feed_forward_proj", "tie_word_embeddings", "scale_decoder_outputs"),
    check_config=check_config,
    max_layers_fields=("num_layers", "num_decoder_layers"),
    layers_field_hints={"num_decoder_layers": " (or remove it to use num_layers)"},
    positive_int_fields=("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers"),
    rate_fields=("dropout_rate", "classifier_dropout"),
    token_id_fields=("pad_token_id", "decoder_start_token_id"),
    objective=SEQ2SEQ,
    notes="relative position bias instead of positions; the LM head is tied in T5 and untied in v1.1, flan and mT5",
    ties_head_regardless=True,  # transformers 5 ties T5's head even with tie_word_embeddings=False
)
