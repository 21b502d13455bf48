"""GPT-2: decoder-only, learned absolute positions, Conv1D projections, LM head tied to `wte`.

The one sequence is the input: `input_ids`, `attention_mask` and `labels` all span it, and
the LM loss shifts the labels inside the model (labels = input_ids). Positions come from an
arange over the sequence (`wpe`), attention is causal (the runtime causal mask, padding
folded in). transformers' `Conv1D` stores its weight (in, out) and computes `x @ W + b`.
"""

from fxconvert.families import ONE_SEQUENCE_LENGTHS, MAX_SIZE, Family, block_regex, check_activation, is_int
from fxconvert.objectives import CAUSAL_LM

# Published config.json values (openai-community/<name>); each size: (n_embd, n_head, n_layer).
_SIZES = {
    "gpt2": (768, 12, 12),
    "gpt2-medium": (1024, 16, 24),
    "gpt2-large": (1280, 20, 36),
    "gpt2-xl": (1600, 25, 48),
}


def _preset(n_embd, n_head, n_layer) -> dict:
    return dict(
        architectures=["GPT2LMHeadModel"], model_type="gpt2", activation_function="gelu_new",
        vocab_size=50257, n_positions=1024, n_ctx=1024, n_embd=n_embd, n_head=n_head, n_layer=n_layer,
        attn_pdrop=0.1, embd_pdrop=0.1, resid_pdrop=0.1, layer_norm_epsilon=1e-5, initializer_range=0.02,
        bos_token_id=50256, eos_token_id=50256, use_cache=False,
    )


def check_config(config: dict, refuse) -> None:
    """GPT-2's own structural fields; `refuse(key, rule)` raises the one-line error."""
    if config.get("n_inner") is not None and not (is_int(config["n_inner"]) and 0 < config["n_inner"] <= MAX_SIZE):
        refuse("n_inner", f"a positive integer up to {MAX_SIZE} (or null for 4 * n_embd)")
    embd, head = config.get("n_embd", 768), config.get("n_head", 12)
    if is_int(embd) and is_int(head) and embd > 0 and head > 0 and embd % head:
        refuse("n_embd", f"a multiple of n_head ({head})")
    if config.get("add_cross_attention"):  # its cross-attention weights would be held but never used
        refuse("add_cross_attention", "false: fxconvert converts GPT-2 as a decoder-only model (no "
                                      "encoder_hidden_states input)")
    check_activation(config, "activation_function", refuse,
                     "an activation such as gelu_new, gelu or relu (GPT-2 uses 'gelu_new')")


def check_trace(config, training: bool, dtype: str) -> str | None:
    """What GPT-2's forward builds in a way a graph cannot record."""
    if getattr(config, "reorder_and_upcast_attn", False) and getattr(config, "_attn_implementation", None) == "eager":
        # its eager path preallocates the scores with torch.empty over sizes read from the inputs
        return ("reorder_and_upcast_attn=True with eager attention allocates the attention scores from the "
                "input's sizes in Python, which a graph cannot record; convert with sdpa attention (which "
                "transformers runs without the reordering) or set reorder_and_upcast_attn=false in the config")
    return None


FAMILY = Family(
    name="gpt2",
    title="GPT-2",
    tiny=dict(
        n_embd=32, n_head=4, n_layer=2, n_positions=64, vocab_size=97, bos_token_id=0, eos_token_id=0,
        use_cache=False
    ),
    model_types={"gpt2": ("GPT2Config", "GPT2LMHeadModel")},
    classes=("GPT2Model", "GPT2LMHeadModel"),
    inputs={
        "input_ids": ("ids", "encoder"),
        "attention_mask": ("mask", "encoder"),
        "token_type_ids": ("ids", "encoder"),  # GPT-2 looks them up in wte: token ids
        "inputs_embeds": ("embeds", "encoder"),
        "labels": ("ids", "encoder"),
    },
    default_inputs=(
        ("LMHeadModel", ("input_ids", "attention_mask", "labels")),
        ("Model", ("input_ids", "attention_mask")),
    ),
    train_inputs=("input_ids", "attention_mask", "labels"),
    hidden_field="n_embd",
    # GPT2LMHeadModel holds the blocks under transformer.h, the bare GPT2Model under h
    blocks=(block_regex(r"(?:transformer\.)?h"),),
    presets={name: _preset(*size) for name, size in _SIZES.items()},
    aliases={f"openai-community/{n}": n for n in _SIZES},
    config_fields=("n_embd", "n_head", "n_layer", "n_inner", "n_positions", "vocab_size", "activation_function",
                   "tie_word_embeddings"),
    check_config=check_config,
    check_trace=check_trace,
    max_layers_fields=("n_layer",),
    positive_int_fields=("vocab_size", "n_embd", "n_head", "n_layer", "n_positions"),
    rate_fields=("attn_pdrop", "embd_pdrop", "resid_pdrop"),
    token_id_fields=("pad_token_id",),
    max_length="n_positions",  # learned positions (wpe): each sequence at most this long
    objective=CAUSAL_LM,
    notes="decoder-only: learned absolute positions (wpe), Conv1D projections (weight (in, out)), causal mask; "
          "the LM head is tied to wte and the loss shifts labels inside the model",
    sequence_lengths=ONE_SEQUENCE_LENGTHS,  # one sequence: not an encoder's
)
