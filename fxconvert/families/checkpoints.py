"""Presets of the most used checkpoints of model types with no hand-written record.

A preset is the architecture of a published checkpoint, built with random weights (or on
the meta device) when its name is neither a directory nor in the Hugging Face cache nor on
a reachable Hub, as the hand-written records' presets are (`fxconvert.load`). The record
of such a type is derived from the class when the preset is built
(`fxconvert.families.derived`), so a preset here is a config.json dict and nothing else.

Each dict holds the architecture fields of the checkpoint's published config.json, as
given by the source named beside it; dropout, dtype, generation and tokenizer fields are
left out, so that a random-weight build is fp32 with transformers' defaults. `use_cache`
is off, as in the hand-written presets. This module imports neither transformers nor
torch.
"""

# FacebookAI/roberta-base and -large: config.json as printed by RobertaConfig.from_pretrained.
_ROBERTA = dict(architectures=["RobertaForMaskedLM"], model_type="roberta", vocab_size=50265,
                max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-05, hidden_act="gelu",
                pad_token_id=1, bos_token_id=0, eos_token_id=2)
# facebook/opt-*: config.json (the 350m has a 512-wide embedding projected in and out, and post-LN layers).
_OPT = dict(architectures=["OPTForCausalLM"], model_type="opt", vocab_size=50272, max_position_embeddings=2048,
            activation_function="relu", do_layer_norm_before=True, enable_bias=True, pad_token_id=1,
            bos_token_id=2, eos_token_id=2, use_cache=False)

PRESETS = {
    "roberta-base": dict(_ROBERTA, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                         num_hidden_layers=12),
    "roberta-large": dict(_ROBERTA, hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                          num_hidden_layers=24),
    # distilbert/distilbert-base-uncased: DistilBertConfig's defaults, which its docstring says are this checkpoint's.
    "distilbert-base-uncased": dict(
        architectures=["DistilBertForMaskedLM"], model_type="distilbert", vocab_size=30522, dim=768, hidden_dim=3072,
        n_heads=12, n_layers=6, max_position_embeddings=512, sinusoidal_pos_embds=False, activation="gelu",
        pad_token_id=0, tie_word_embeddings=True),
    "facebook/opt-125m": dict(_OPT, hidden_size=768, ffn_dim=3072, num_attention_heads=12, num_hidden_layers=12,
                              word_embed_proj_dim=768),
    "facebook/opt-350m": dict(_OPT, hidden_size=1024, ffn_dim=4096, num_attention_heads=16, num_hidden_layers=24,
                              word_embed_proj_dim=512, do_layer_norm_before=False),
    "facebook/opt-1.3b": dict(_OPT, hidden_size=2048, ffn_dim=8192, num_attention_heads=32, num_hidden_layers=24,
                              word_embed_proj_dim=2048),
    # EleutherAI/gpt-neo-125m: config.json; local attention (window 256) on every other layer.
    "EleutherAI/gpt-neo-125m": dict(
        architectures=["GPTNeoForCausalLM"], model_type="gpt_neo", vocab_size=50257, hidden_size=768, num_layers=12,
        num_heads=12, attention_types=[[["global", "local"], 6]], window_size=256, max_position_embeddings=2048,
        activation_function="gelu_new", layer_norm_epsilon=1e-05, bos_token_id=50256, eos_token_id=50256,
        use_cache=False),
    # bigscience/bloom-560m: config.json (ALiBi positions, a LayerNorm after the embedding).
    "bigscience/bloom-560m": dict(
        architectures=["BloomForCausalLM"], model_type="bloom", vocab_size=250880, hidden_size=1024, n_layer=24,
        n_head=16, layer_norm_epsilon=1e-05, apply_residual_connection_post_layernorm=False, bos_token_id=1,
        eos_token_id=2, pad_token_id=3, use_cache=False),
    # microsoft/phi-2: config.json (rotary on 40% of each head, parallel attention and MLP, untied head with a bias).
    "microsoft/phi-2": dict(
        architectures=["PhiForCausalLM"], model_type="phi", vocab_size=51200, hidden_size=2560,
        intermediate_size=10240, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
        partial_rotary_factor=0.4, max_position_embeddings=2048, rope_theta=10000.0, hidden_act="gelu_new",
        layer_norm_eps=1e-05, qk_layernorm=False, tie_word_embeddings=False, bos_token_id=50256,
        eos_token_id=50256, use_cache=False),
    # Qwen/Qwen3-0.6B: config.json (grouped-query attention with RMS-normed queries and keys, tied head).
    "Qwen/Qwen3-0.6B": dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_size=1024,
        intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=40960, max_window_layers=28, rms_norm_eps=1e-06, rope_theta=1000000.0,
        hidden_act="silu", attention_bias=False, use_sliding_window=False, sliding_window=None,
        tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645, use_cache=False),
    # google/gemma-2-2b: Gemma2Config's defaults, which are this checkpoint's shape (logit soft-capping,
    # a 4096-token sliding window on every other layer).
    "google/gemma-2-2b": dict(
        architectures=["Gemma2ForCausalLM"], model_type="gemma2", vocab_size=256000, hidden_size=2304,
        intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
        hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192, rms_norm_eps=1e-06,
        rope_theta=10000.0, query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0, pad_token_id=0, bos_token_id=2, eos_token_id=1, use_cache=False),
    # mistralai/Mixtral-8x7B-v0.1: MixtralConfig's defaults (its docstring's checkpoint), with the checkpoint's
    # 32k position table and rope_theta. 46.7B parameters: built on the meta device.
    "mistralai/Mixtral-8x7B-v0.1": dict(
        architectures=["MixtralForCausalLM"], model_type="mixtral", vocab_size=32000, hidden_size=4096,
        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768, rope_theta=1000000.0,
        rms_norm_eps=1e-05, hidden_act="silu", sliding_window=None, router_jitter_noise=0.0,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, use_cache=False),
    # Helsinki-NLP/opus-mt-en-de: config.json (sinusoidal positions, one embedding shared by both stacks).
    "Helsinki-NLP/opus-mt-en-de": dict(
        architectures=["MarianMTModel"], model_type="marian", vocab_size=58101, decoder_vocab_size=58101,
        d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8, decoder_attention_heads=8,
        encoder_ffn_dim=2048, decoder_ffn_dim=2048, max_position_embeddings=512, activation_function="swish",
        scale_embedding=True, share_encoder_decoder_embeddings=True, pad_token_id=58100, bos_token_id=0,
        eos_token_id=0, decoder_start_token_id=58100, use_cache=False),
    # facebook/mbart-large-cc25: config.json.
    "facebook/mbart-large-cc25": dict(
        architectures=["MBartForConditionalGeneration"], model_type="mbart", vocab_size=250027, d_model=1024,
        encoder_layers=12, decoder_layers=12, encoder_attention_heads=16, decoder_attention_heads=16,
        encoder_ffn_dim=4096, decoder_ffn_dim=4096, max_position_embeddings=1024, activation_function="gelu",
        scale_embedding=True, pad_token_id=1, bos_token_id=0, eos_token_id=2, use_cache=False),
    # google/pegasus-large: config.json (sinusoidal positions, pre-LN layers).
    "google/pegasus-large": dict(
        architectures=["PegasusForConditionalGeneration"], model_type="pegasus", vocab_size=96103, d_model=1024,
        encoder_layers=16, decoder_layers=16, encoder_attention_heads=16, decoder_attention_heads=16,
        encoder_ffn_dim=4096, decoder_ffn_dim=4096, max_position_embeddings=1024, activation_function="relu",
        scale_embedding=True, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, use_cache=False),
}

# Other names of the presets: the Hub ids the checkpoints moved to, and their lower-case spellings.
ALIASES = {
    "FacebookAI/roberta-base": "roberta-base",
    "FacebookAI/roberta-large": "roberta-large",
    "distilbert/distilbert-base-uncased": "distilbert-base-uncased",
    "EleutherAI/gpt-neo-125M": "EleutherAI/gpt-neo-125m",
}
