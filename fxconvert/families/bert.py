"""BERT: encoder-only, absolute positions, segment (token type) embeddings, a tied MLM head.

`BertForMaskedLM`'s decoder weight is the word embedding and its bias is registered twice
(`cls.predictions.bias` and `cls.predictions.decoder.bias`); both become shared weights
(`shared_embed_weight`, `shared_cls_predictions_bias`). With `tie_word_embeddings=False`
neither is tied. Positions come from the `position_ids` buffer sliced to the length, and a
missing `token_type_ids` from a buffer of zeros: both buffers are graph tensors, written
with the weights. Sequences are at most `max_position_embeddings` long.
"""

import functools

from fxconvert.families import ONE_SEQUENCE_LENGTHS, Family, block_regex, check_activation, is_int
from fxconvert.objectives import MASKED_LM

# Published config.json values (bert-base-uncased, bert-large-uncased, bert-base-cased).
_COMMON = dict(
    model_type="bert", architectures=["BertForMaskedLM"], hidden_act="gelu", hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1, initializer_range=0.02, layer_norm_eps=1e-12, max_position_embeddings=512,
    type_vocab_size=2, pad_token_id=0, position_embedding_type="absolute", use_cache=True,
)
# name: (vocab_size, hidden_size, intermediate_size, num_attention_heads, num_hidden_layers)
_SIZES = {
    "bert-base-uncased": (30522, 768, 3072, 12, 12),
    "bert-large-uncased": (30522, 1024, 4096, 16, 24),
    "bert-base-cased": (28996, 768, 3072, 12, 12),
}


def _preset(vocab_size, hidden_size, intermediate_size, num_attention_heads, num_hidden_layers) -> dict:
    return dict(_COMMON, vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                num_attention_heads=num_attention_heads, num_hidden_layers=num_hidden_layers)


def check_config(config: dict, refuse) -> None:
    """BERT's own structural fields; `refuse(key, rule)` raises the one-line error."""
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    ints = all(is_int(v) and v > 0 for v in (hidden, heads))
    if ints and hidden % heads:
        refuse("hidden_size", f"a multiple of num_attention_heads ({heads}); BERT splits the hidden size "
                              f"evenly between heads (bert-base uses 768 and 12)")
    if config.get("position_embedding_type", "absolute") != "absolute" and honours_position_embedding_type():
        refuse("position_embedding_type", "'absolute': fxconvert converts BERT with absolute positions only "
                                          "(use a checkpoint trained with absolute positions)")
    # is_decoder=True makes the self-attention causal; the conversion keeps that, as eager does.
    if config.get("add_cross_attention"):
        refuse("add_cross_attention", "false: fxconvert converts BERT as an encoder without cross-attention")
    check_activation(config, "hidden_act", refuse, "an activation name such as 'gelu' (BERT uses 'gelu')")


@functools.cache
def honours_position_embedding_type() -> bool:
    """Whether the installed transformers builds relative positions (distance embeddings) for BERT.

    transformers 5 dropped relative_key(_query): its BERT ignores the field (a checkpoint's
    distance embeddings are then unexpected keys, refused at load), so the conversion equals
    eager and is accepted. A transformers that honours it would compute what the trace does
    not record, and the field is refused there.
    """
    import torch
    import transformers

    config = transformers.BertConfig(vocab_size=8, hidden_size=4, num_hidden_layers=1, num_attention_heads=1,
                                     intermediate_size=4, position_embedding_type="relative_key")
    with torch.device("meta"):
        model = transformers.BertModel(config)
    return any("distance_embedding" in name for name, _ in model.named_modules())


FAMILY = Family(
    name="bert",
    title="BERT",
    tiny=dict(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=512, type_vocab_size=2, pad_token_id=0, hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1
    ),
    model_types={"bert": ("BertConfig", "BertForMaskedLM")},
    classes=("BertModel", "BertForMaskedLM"),
    inputs={
        "input_ids": ("ids", "encoder"),
        "attention_mask": ("mask", "encoder"),
        "token_type_ids": ("type_ids", "encoder"),
        "labels": ("ids", "encoder"),
        "inputs_embeds": ("embeds", "encoder"),
    },
    default_inputs=(
        ("ForMaskedLM", ("input_ids", "attention_mask", "token_type_ids", "labels")),
        ("Model", ("input_ids", "attention_mask", "token_type_ids")),
    ),
    train_inputs=("input_ids", "attention_mask", "token_type_ids", "labels"),
    hidden_field="hidden_size",
    # BertForMaskedLM: bert.encoder.layer.N; BertModel (no prefix): encoder.layer.N
    blocks=(block_regex(r"(?:bert\.)?encoder\.layer"),),
    presets={name: _preset(*size) for name, size in _SIZES.items()},
    aliases={f"google-bert/{n}": n for n in _SIZES},
    config_fields=("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size",
                   "type_vocab_size", "max_position_embeddings", "hidden_act", "tie_word_embeddings"),
    check_config=check_config,
    max_layers_fields=("num_hidden_layers",),
    positive_int_fields=("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                         "num_hidden_layers", "max_position_embeddings", "type_vocab_size"),
    rate_fields=("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"),
    token_id_fields=("pad_token_id",),
    max_length="max_position_embeddings",
    objective=MASKED_LM,  # pre-tokenized lines, labels aligned with input_ids
    notes="encoder-only with absolute positions (at most max_position_embeddings tokens) and token_type_ids; "
          "the MLM head's weight and bias are tied to the word embedding and cls.predictions.bias",
    sequence_lengths=ONE_SEQUENCE_LENGTHS,  # one sequence: not an encoder's
)
