"""Llama, Qwen2 and Mistral: decoder-only, rotary positions, grouped-query attention.

One stack of blocks (`model.layers.N` under a ForCausalLM, `layers.N` in the bare Model).
Every input spans the one (input) sequence; the causal-LM loss shifts the labels inside the
model. Rotary cos/sin are computed in the graph from the `inv_freq` buffer; SDPA and eager
attention get a causal mask from a runtime leaf (a sliding-window one where the config
asks for it: Mistral's `sliding_window`, Qwen2's with `use_sliding_window=True` on the
layers its `layer_types` mark). Llama and Mistral publish an untied LM head; small Qwen2
models tie it to the token embedding (one `shared_embed_weight` after conversion).
"""

import math

from fxconvert.families import ONE_SEQUENCE_LENGTHS, MAX_SIZE, Family, block_regex, check_activation, is_int
from fxconvert.objectives import CAUSAL_LM

_PREFIX = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}

# Published config.json values (the architecture fields; dtype and transformers_version left
# out, so a random-weight build is fp32 like the T5 presets).
_LLAMA_2_7B = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000, hidden_size=4096,
    intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
    hidden_act="silu", max_position_embeddings=4096, rms_norm_eps=1e-05, rope_theta=10000.0,
    initializer_range=0.02, pretraining_tp=1, rope_scaling=None, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2, use_cache=False,
)
_TINYLLAMA = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000, hidden_size=2048,
    intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
    hidden_act="silu", max_position_embeddings=2048, rms_norm_eps=1e-05, rope_theta=10000.0,
    initializer_range=0.02, pretraining_tp=1, rope_scaling=None, attention_bias=False, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2, use_cache=False,
)
_QWEN2_0_5B = dict(
    architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=151936, hidden_size=896,
    intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
    hidden_act="silu", max_position_embeddings=131072, max_window_layers=24, rms_norm_eps=1e-06,
    rope_theta=1000000.0, sliding_window=131072, use_sliding_window=False, attention_dropout=0.0,
    initializer_range=0.02, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151643, use_cache=False,
)
_MISTRAL_7B = dict(
    architectures=["MistralForCausalLM"], model_type="mistral", vocab_size=32000, hidden_size=4096,
    intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-05, rope_theta=10000.0,
    sliding_window=4096, initializer_range=0.02, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    use_cache=False,
)


# Rope types whose frequencies transformers recomputes from the sequence length at run time
# (`dynamic_rope_update`): Python control flow on a size, which a traced graph cannot hold.
DYNAMIC_ROPE = ("dynamic", "longrope")


# The window is compared with token positions as an int64: far longer than any sequence.
MAX_WINDOW = MAX_SIZE


def _is_positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf


def check_config(config: dict, refuse) -> None:
    """Head counts that split evenly, an even rotary width, rope computed once, a usable sliding window."""
    heads, kv_heads = config.get("num_attention_heads"), config.get("num_key_value_heads")
    hidden, head_dim = config.get("hidden_size"), config.get("head_dim")
    if is_int(heads) and heads > 0:  # otherwise refused as a positive integer field, or transformers' default
        if kv_heads is not None and not (is_int(kv_heads) and 0 < kv_heads <= heads and heads % kv_heads == 0):
            refuse("num_key_value_heads", f"a positive divisor of num_attention_heads ({heads})")
        if is_int(hidden) and hidden % heads:  # transformers refuses it even with head_dim set
            refuse("num_attention_heads", f"a divisor of hidden_size ({hidden})")
        if head_dim is None and is_int(hidden) and (hidden // heads) % 2:
            refuse("num_attention_heads", f"a count that leaves an even head width (hidden_size {hidden} / "
                                          f"{heads} heads is odd; rotary embeddings rotate pairs of features)")
    if head_dim is not None and not (is_int(head_dim) and 0 < head_dim <= MAX_SIZE and head_dim % 2 == 0):
        refuse("head_dim", f"a positive even integer up to {MAX_SIZE} (rotary embeddings rotate pairs of features)")
    if "rope_theta" in config and not _is_positive_number(config["rope_theta"]):
        refuse("rope_theta", "a positive number, the rotary base (Llama 2 uses 10000.0)")
    for key in ("rope_scaling", "rope_parameters"):
        rope = config.get(key)
        if not isinstance(rope, dict):
            continue
        kind = rope.get("rope_type") or rope.get("type")
        if kind in DYNAMIC_ROPE:
            refuse(key, "a rope_type computed once, such as 'linear', 'yarn' or 'llama3' (or no scaling): "
                        f"{'/'.join(DYNAMIC_ROPE)} rope recomputes its frequencies from each input's length, "
                        f"which a graph cannot record")
        if kind is not None:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            known = ["default", *(k for k in ROPE_INIT_FUNCTIONS if k not in DYNAMIC_ROPE)]
            if kind not in known:
                refuse(key, f"a dict whose rope_type is one of {', '.join(map(repr, known))} (its rope_type is "
                            f"{kind!r})")
        for name in ("rope_theta", "factor"):  # a base or factor <= 0 gives NaN or inf rotary frequencies
            if name in rope and not _is_positive_number(rope[name]):
                refuse(key, f"a dict whose {name} is a positive number (its {name} is {rope[name]!r})")
    check_activation(config, "hidden_act", refuse, "an activation such as 'silu' (Llama, Qwen2 and Mistral use "
                                                   "'silu')")
    window = config.get("sliding_window")
    uses_window = config.get("model_type") == "mistral" or config.get("use_sliding_window") is True
    if window is not None and uses_window and not (is_int(window) and 0 < window <= MAX_WINDOW):
        refuse("sliding_window", f"a positive integer up to {MAX_WINDOW}, or null for full causal attention")
    layer_types = config.get("layer_types")
    if config.get("model_type") == "qwen2" and isinstance(layer_types, list) and "sliding_attention" in layer_types \
            and (config.get("use_sliding_window") is not True or ("sliding_window" in config and window is None)):
        # Qwen2 drops its window without use_sliding_window, and its forward then fails on such a layer
        # (Llama and Mistral read no layer_types)
        refuse("layer_types", "'full_attention' for every layer, or set use_sliding_window to true and "
                              "sliding_window to the window of the 'sliding_attention' layers", tail="")


def check_trace(config, training: bool, dtype: str) -> str | None:
    """A model built in Python (not from a config.json, which check_config reads) with dynamic rope."""
    rope = getattr(config, "rope_parameters", None)
    ropes = [rope] if isinstance(rope, dict) and "rope_type" in rope else \
        [r for r in rope.values() if isinstance(r, dict)] if isinstance(rope, dict) else []
    kind = next((r.get("rope_type") for r in ropes if r.get("rope_type") in DYNAMIC_ROPE), None)
    if kind is not None:
        return (f"rope_type {kind!r} recomputes the rotary frequencies from each input's length, which a graph "
                f"cannot record; use a rope_type computed once, such as 'linear', 'yarn' or 'llama3' (or no "
                f"scaling)")
    return None


FAMILY = Family(
    name="llama",
    title="Llama-style (Llama, Qwen2, Mistral)",
    tiny=dict(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        vocab_size=97, max_position_embeddings=128, attention_dropout=0.1, rope_theta=1000.0, use_cache=False,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2
    ),
    model_types={t: (f"{p}Config", f"{p}ForCausalLM") for t, p in _PREFIX.items()},
    classes=tuple(f"{p}{s}" for p in _PREFIX.values() for s in ("Model", "ForCausalLM")),
    inputs={
        "input_ids": ("ids", "encoder"),
        "attention_mask": ("mask", "encoder"),
        "labels": ("ids", "encoder"),
        "inputs_embeds": ("embeds", "encoder"),
    },
    default_inputs=(
        ("ForCausalLM", ("input_ids", "attention_mask", "labels")),
        ("Model", ("input_ids", "attention_mask")),
    ),
    train_inputs=("input_ids", "attention_mask", "labels"),
    hidden_field="hidden_size",
    blocks=(block_regex(r"(?:model\.)?layers"),),
    presets={
        "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T": _TINYLLAMA,
        "meta-llama/Llama-2-7b-hf": _LLAMA_2_7B,
        "Qwen/Qwen2-0.5B": _QWEN2_0_5B,
        "mistralai/Mistral-7B-v0.1": _MISTRAL_7B,
    },
    aliases={"TinyLlama/TinyLlama_v1.1": "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T"},
    config_fields=("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                   "num_hidden_layers", "vocab_size", "hidden_act", "rope_theta", "sliding_window",
                   "use_sliding_window", "tie_word_embeddings"),
    check_config=check_config,
    check_trace=check_trace,
    max_layers_fields=("num_hidden_layers",),
    positive_int_fields=("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                         "num_hidden_layers", "num_key_value_heads", "max_position_embeddings"),
    rate_fields=("attention_dropout",),
    token_id_fields=("pad_token_id",),
    objective=CAUSAL_LM,
    notes="decoder-only with rotary positions (computed in the graph) and grouped-query attention; Mistral "
          "(and Qwen2 with use_sliding_window) masks a sliding window; small Qwen2 ties the LM head",
    sequence_lengths=ONE_SEQUENCE_LENGTHS,  # one sequence: not an encoder's
)
