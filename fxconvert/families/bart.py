"""BART: encoder-decoder with learned positions and one shared, scaled embedding.

One `shared` embedding is tied to the encoder's and decoder's `embed_tokens` and to the LM
head. The token embeddings are `BartScaledWordEmbedding`, an `nn.Embedding` whose forward
multiplies by `embed_scale` (sqrt(d_model) when `scale_embedding`, else 1): the tracer
goes through it, so the lookup is an `F.embedding` of the lifted weight followed by the
multiplication. Positions are learned (`BartLearnedPositionalEmbedding`, ids offset by 2),
`BartForConditionalGeneration` adds the `final_logits_bias` buffer to the logits, and with
labels but no decoder inputs it shifts the labels right itself.
"""

from fxconvert.families import ENCODER_DECODER_INPUTS, Family, block_regex, check_activation, is_int
from fxconvert.objectives import SEQ2SEQ

# Published config.json values (facebook/bart-base, facebook/bart-large). Both publish
# `architectures: ["BartModel"]`; the presets build the LM-head class, which holds the same
# weights plus the tied head and `final_logits_bias`, so that a preset can be trained.
_COMMON = dict(
    model_type="bart", architectures=["BartForConditionalGeneration"], vocab_size=50265,
    max_position_embeddings=1024, activation_function="gelu", dropout=0.1, attention_dropout=0.1,
    activation_dropout=0.1, classifier_dropout=0.0, encoder_layerdrop=0.0, decoder_layerdrop=0.0,
    init_std=0.02, scale_embedding=False, is_encoder_decoder=True, bos_token_id=0, pad_token_id=1,
    eos_token_id=2, decoder_start_token_id=2, use_cache=False,
)
_SIZES = {  # name: (d_model, ffn_dim, attention_heads, layers) of each stack
    "facebook/bart-base": (768, 3072, 12, 6),
    "facebook/bart-large": (1024, 4096, 16, 12),
}


def _preset(d_model, ffn_dim, heads, layers) -> dict:
    return dict(_COMMON, d_model=d_model, encoder_ffn_dim=ffn_dim, decoder_ffn_dim=ffn_dim,
                encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_layers=layers,
                decoder_layers=layers, num_hidden_layers=layers)


# Fields of early BART configs (still in the published config.json files, with these values)
# that transformers 5's BART never reads: it always computes as these values say.
IGNORED_FIELDS = {"normalize_before": False, "add_final_layer_norm": False, "normalize_embedding": True,
                  "static_position_embeddings": False, "add_bias_logits": False}


def check_config(config: dict, refuse) -> None:
    """BART's own structural fields; `refuse(key, rule)` raises the one-line error."""
    for key, value in IGNORED_FIELDS.items():
        if key in config and config[key] is not value:
            refuse(key, f"{str(value).lower()} in the config: transformers 5's BART ignores {key} and computes as "
                        f"if it were {str(value).lower()}, so a model trained otherwise (mBART-style, say) would "
                        f"convert wrongly", tail="")
    d_model = config.get("d_model", 1024)
    for key in ("encoder_attention_heads", "decoder_attention_heads"):
        heads = config.get(key)
        if is_int(heads) and heads > 0 and is_int(d_model) and d_model % heads:
            refuse(key, f"a divisor of d_model ({d_model})")
    check_activation(config, "activation_function", refuse, "an activation such as 'gelu' or 'relu' (BART uses 'gelu')")


def _draws_layerdrop_at_zero() -> bool:
    """Whether this transformers' BART draws `torch.rand([])` per layer in training whatever the rate.

    Releases before 5.23 do (`if self.training:`); 5.23 draws only when LayerDrop is above 0.
    The draw happens in Python at trace time, so the graph lacks it and every dropout mask
    after it comes from another point of the random stream than eager's.
    """
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__) < Version("5.23")


def check_trace(config, training: bool, dtype: str) -> str | None:
    """What BART's forward decides in Python from values a graph does not hold."""
    # In either mode: a graph traced in eval mode runs in training too (LiftTrainingFlagPass), where
    # eager BART would drop layers.
    for key in ("encoder_layerdrop", "decoder_layerdrop"):
        rate = getattr(config, key, 0.0) or 0.0
        if rate > 0:
            return (f"{key} is {rate!r}: in training LayerDrop skips layers by a random draw made in Python, "
                    f"which a graph cannot record; set {key}=0 in the config (the published BART checkpoints "
                    f"use 0)")
    if _draws_layerdrop_at_zero():
        import transformers

        return (f"transformers {transformers.__version__} draws a LayerDrop random number in every BART layer "
                f"in training even when LayerDrop is 0, which a graph cannot reproduce (its dropout would not "
                f"match); install transformers>=5.23 (pip install 'transformers>=5.23,<6')")
    if dtype == "float16":
        return ("in float16 each encoder layer clamps its output only when it holds inf or nan, a Python "
                "decision on values that a graph cannot record; convert in float32 or bfloat16")
    return None


FAMILY = Family(
    name="bart",
    title="BART",
    tiny=dict(
        vocab_size=97, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        dropout=0.1, attention_dropout=0.1, activation_dropout=0.1, scale_embedding=True, pad_token_id=1,
        bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, use_cache=False
    ),
    model_types={"bart": ("BartConfig", "BartForConditionalGeneration")},
    classes=("BartModel", "BartForConditionalGeneration"),
    inputs=ENCODER_DECODER_INPUTS,
    default_inputs=(
        ("ForConditionalGeneration", ("input_ids", "attention_mask", "decoder_input_ids", "labels")),
        ("Model", ("input_ids", "attention_mask", "decoder_input_ids")),
    ),
    train_inputs=("input_ids", "attention_mask", "decoder_input_ids", "labels"),
    hidden_field="d_model",
    # BartForConditionalGeneration holds the stacks under `model.`, BartModel at the top.
    blocks=(block_regex(r"(?:model\.)?encoder\.layers"), block_regex(r"(?:model\.)?decoder\.layers")),
    presets={name: _preset(*size) for name, size in _SIZES.items()},
    config_fields=("d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
                   "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "vocab_size",
                   "max_position_embeddings", "activation_function", "scale_embedding", "tie_word_embeddings"),
    check_config=check_config,
    check_trace=check_trace,
    max_layers_fields=("encoder_layers", "decoder_layers"),
    positive_int_fields=("vocab_size", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
                         "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "max_position_embeddings"),
    rate_fields=("dropout", "attention_dropout", "activation_dropout", "classifier_dropout", "encoder_layerdrop",
                 "decoder_layerdrop"),
    token_id_fields=("pad_token_id", "decoder_start_token_id"),
    max_length="max_position_embeddings",  # learned positions: each sequence at most this long
    objective=SEQ2SEQ,
    notes="learned positions (offset 2, at most max_position_embeddings tokens); one scaled shared embedding "
          "tied to the LM head; logits add final_logits_bias",
)
