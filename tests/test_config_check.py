"""Bad configs are refused before anything is built: one line naming the field, its value and the fix."""

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import helpers
from fxconvert import cli
from fxconvert.families.bart import _draws_layerdrop_at_zero
from fxconvert.errors import ModelResolutionError
from fxconvert.load import RandomWeightsWarning, load

from checkpoints import edit_config, leftovers, write_checkpoint

REPO = Path(__file__).resolve().parents[1]

# (config change, the message after "invalid config in DIR: ")
BAD = [
    (dict(num_heads=0), "num_heads is 0; set it to a positive integer in the config"),
    (dict(d_kv=0), "d_kv is 0; set it to a positive integer in the config"),
    (dict(num_layers=-1), "num_layers is -1; set it to a positive integer in the config"),
    (dict(num_layers=10**9), "num_layers is 1000000000; set it to at most 1024 in the config"),
    (dict(num_decoder_layers=0), "num_decoder_layers is 0; set it to a positive integer up to 1024 (or remove it "
                                 "to use num_layers) in the config"),
    (dict(d_model=32.0), "d_model is 32.0; set it to a positive integer in the config"),
    (dict(d_ff=None), "d_ff is None; set it to a positive integer in the config"),
    (dict(vocab_size=True), "vocab_size is True; set it to a positive integer in the config"),
    (dict(dropout_rate=1.0), "dropout_rate is 1.0; set it to a number in [0, 1) in the config"),
    (dict(dropout_rate=-0.1), "dropout_rate is -0.1; set it to a number in [0, 1) in the config"),
    (dict(dropout_rate=math.nan), "dropout_rate is nan; set it to a number in [0, 1) in the config"),
    (dict(dropout_rate="x"), "dropout_rate is 'x'; set it to a number in [0, 1) in the config"),
    (dict(layer_norm_epsilon=0), "layer_norm_epsilon is 0; set it to a small positive number such as 1e-6 in the "
                                 "config"),
    (dict(relative_attention_num_buckets=3), "relative_attention_num_buckets is 3; set it to an integer of at "
                                             "least 4 (T5 uses 32) in the config"),
    (dict(relative_attention_num_buckets=8, relative_attention_max_distance=4),
     "relative_attention_max_distance is 4; set it to an integer of at least 5, more than half the "
     "relative_attention_num_buckets (T5 uses 128) in the config"),
    (dict(pad_token_id=97), "pad_token_id is 97; set it to a token id in [0, 97) in the config"),
    (dict(decoder_start_token_id=-1), "decoder_start_token_id is -1; set it to a token id in [0, 97) in the config"),
    (dict(feed_forward_proj="gated-foo"), "feed_forward_proj is 'gated-foo'; set it to 'ACT' or 'gated-ACT' with ACT "
                                          "an activation such as relu or gelu_new (T5 uses 'relu', T5 v1.1 "
                                          "'gated-gelu')"),
    # fields only transformers' own validation checks: its two-line message as one line
    (dict(initializer_factor="x"), "field 'initializer_factor': Field 'initializer_factor' expected float, got str "
                                   "(value: 'x'); correct that field in the config"),
    (dict(use_cache=3), "field 'use_cache': Field 'use_cache' expected bool, got int (value: 3); correct that field "
                        "in the config"),
]
IDS = [",".join(f"{k}={v!r}"[:30] for k, v in change.items()) for change, _ in BAD]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "ckpt"
    write_checkpoint(path)
    return path


def bad_checkpoint(tiny_dir, tmp_path, change, weights=True):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in tiny_dir.iterdir():
        if weights or f.name == "config.json":
            (ckpt / f.name).write_bytes(f.read_bytes())
    edit_config(ckpt, **change)
    return ckpt


def refusal(path) -> str:
    """The error that loading `path` (random weights allowed) raises; a refusal leaks no warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ModelResolutionError) as info:
            load(path, allow_random=True)
    return str(info.value)


@pytest.mark.parametrize("weights", [True, False], ids=["weights", "random"])
@pytest.mark.parametrize("change, message", BAD, ids=IDS)
def test_bad_fields_are_named_with_their_value_and_fix(change, message, weights, tiny_dir, tmp_path):
    ckpt = bad_checkpoint(tiny_dir, tmp_path, change, weights)
    assert refusal(ckpt) == f"invalid config in {ckpt}: {message}"


def test_control_characters_in_a_value_are_escaped(tiny_dir, tmp_path):
    ckpt = bad_checkpoint(tiny_dir, tmp_path, dict(feed_forward_proj="gated-\x1b[2J\nrelu"))
    with pytest.raises(ModelResolutionError) as info:
        load(ckpt)
    assert "\n" not in str(info.value) and "\x1b" not in str(info.value)
    assert "feed_forward_proj is 'gated-\\x1b[2J\\nrelu'" in str(info.value)


def test_an_encoder_ignores_the_decoder_layer_count(tmp_path):
    write_checkpoint(tmp_path / "ckpt", "T5EncoderModel")
    edit_config(tmp_path / "ckpt", num_decoder_layers=0)
    assert load(tmp_path / "ckpt").source.weights == "checkpoint"


def test_the_smallest_accepted_buckets_and_distance_build_a_working_model(tiny_dir, tmp_path):
    """The bucket rules are transformers' own limits: one below them its T5 fails, at them it works."""
    ids, dec = torch.randint(0, 97, (2, 30)), torch.randint(0, 97, (2, 30))
    with pytest.raises(ZeroDivisionError):
        helpers.build("T5Model", relative_attention_num_buckets=3)(input_ids=ids, decoder_input_ids=dec)
    with pytest.raises(IndexError):
        helpers.build("T5Model", relative_attention_num_buckets=4,
                      relative_attention_max_distance=2)(input_ids=ids, decoder_input_ids=dec)
    ckpt = bad_checkpoint(tiny_dir, tmp_path, dict(relative_attention_num_buckets=4,
                                                   relative_attention_max_distance=3), weights=False)
    with pytest.warns(RandomWeightsWarning):
        model = load(ckpt, allow_random=True).model
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids, decoder_input_ids=dec).logits).all()


def test_the_command_line_says_one_line_and_writes_nothing(tiny_dir, tmp_path, capsys):
    ckpt = bad_checkpoint(tiny_dir, tmp_path, dict(num_layers=-1))
    code = cli.main([str(ckpt), "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert err.splitlines() == [f"fxconvert: error: invalid config in {ckpt}: num_layers is -1; set it to a positive "
                                f"integer in the config"]
    assert not (tmp_path / "out").exists()


def test_the_program_leaks_no_warning(tiny_dir, tmp_path):
    """As a user runs it: `num_heads=0` on a config without weights (where transformers warns about
    zero-element tensors) is one line on stderr and exit 1."""
    (tmp_path / "arch.json").write_text(json.dumps({**json.loads((tiny_dir / "config.json").read_text()),
                                                    "num_heads": 0}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "default"}
    run = subprocess.run([sys.executable, "-m", "fxconvert", "--config", str(tmp_path / "arch.json"), "--out",
                          str(tmp_path / "out")], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.splitlines() == [f"fxconvert: error: invalid config in {tmp_path / 'arch.json'}: num_heads is "
                                       f"0; set it to a positive integer in the config"]
    assert leftovers(tmp_path) == ["arch.json"]


# -- the other families: sizes, positions, windows and rope bases from a hostile config.json --------

TINY = {
    "gpt2": dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_embd=32, n_head=4, n_layer=2, n_positions=64,
                 vocab_size=97, bos_token_id=0, eos_token_id=0),
    "bert": dict(model_type="bert", architectures=["BertForMaskedLM"], hidden_size=32, num_attention_heads=4,
                 num_hidden_layers=2, intermediate_size=64, max_position_embeddings=64, vocab_size=97, pad_token_id=0),
    "bart": dict(model_type="bart", architectures=["BartForConditionalGeneration"], vocab_size=97, d_model=32,
                 encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                 encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=1, bos_token_id=0,
                 eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2),
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=32, intermediate_size=64,
                  num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, vocab_size=97,
                  max_position_embeddings=128),
    "mistral": dict(model_type="mistral", architectures=["MistralForCausalLM"], hidden_size=32, intermediate_size=64,
                    num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, vocab_size=97,
                    max_position_embeddings=128, sliding_window=4),
}
HUGE = 10**30  # past int64: torch cannot build it even on the meta device
UP_TO = "set it to a positive integer up to 2147483647 in the config"
FAMILY_BAD = [
    ("gpt2", dict(n_positions=HUGE), f"n_positions is {HUGE}; {UP_TO}"),
    ("gpt2", dict(n_positions=-1), "n_positions is -1; set it to a positive integer in the config"),
    ("gpt2", dict(vocab_size=2**31), f"vocab_size is {2**31}; {UP_TO}"),
    ("gpt2", dict(n_inner=HUGE), f"n_inner is {HUGE}; set it to a positive integer up to 2147483647 (or null for "
                                 f"4 * n_embd) in the config"),
    ("gpt2", dict(n_layer=HUGE), f"n_layer is {HUGE}; set it to at most 1024 in the config"),
    ("bert", dict(max_position_embeddings=HUGE), f"max_position_embeddings is {HUGE}; {UP_TO}"),
    ("bert", dict(max_position_embeddings=0), "max_position_embeddings is 0; set it to a positive integer in the "
                                              "config"),
    ("bert", dict(type_vocab_size=HUGE), f"type_vocab_size is {HUGE}; {UP_TO}"),
    ("bert", dict(max_position_embeddings=8), "max_position_embeddings is 8; set it to at least 16: fxconvert "
                                              "traces, validates and probes the stages with sequences of up to 13 "
                                              "tokens, which a shorter position table cannot hold in the config"),
    ("gpt2", dict(n_positions=4), "n_positions is 4; set it to at least 16: fxconvert traces, validates and probes "
                                  "the stages with sequences of up to 13 tokens, which a shorter position table "
                                  "cannot hold in the config"),
    ("bart", dict(max_position_embeddings=2), "max_position_embeddings is 2; set it to at least 16: fxconvert "
                                              "traces, validates and probes the stages with sequences of up to 13 "
                                              "tokens, which a shorter position table cannot hold in the config"),
    ("bert", dict(type_vocab_size=-2), "type_vocab_size is -2; set it to a positive integer in the config"),
    ("bart", dict(max_position_embeddings=HUGE), f"max_position_embeddings is {HUGE}; {UP_TO}"),
    ("bart", dict(encoder_ffn_dim=HUGE), f"encoder_ffn_dim is {HUGE}; {UP_TO}"),
    ("llama", dict(intermediate_size=HUGE), f"intermediate_size is {HUGE}; {UP_TO}"),
    ("llama", dict(num_key_value_heads=10**9), "num_key_value_heads is 1000000000; set it to a positive divisor of "
                                               "num_attention_heads (4) in the config"),
    ("llama", dict(num_key_value_heads=-2), "num_key_value_heads is -2; set it to a positive integer in the config"),
    ("llama", dict(head_dim=HUGE), f"head_dim is {HUGE}; set it to a positive even integer up to 2147483647 (rotary "
                                   f"embeddings rotate pairs of features) in the config"),
    ("llama", dict(rope_theta=0), "rope_theta is 0; set it to a positive number, the rotary base (Llama 2 uses "
                                  "10000.0) in the config"),
    ("mistral", dict(sliding_window=-4), "sliding_window is -4; set it to a positive integer up to 2147483647, or "
                                         "null for full causal attention in the config"),
    ("mistral", dict(sliding_window=HUGE), f"sliding_window is {HUGE}; set it to a positive integer up to "
                                           f"2147483647, or null for full causal attention in the config"),
]


@pytest.mark.parametrize("family, change, message", FAMILY_BAD,
                         ids=[f"{f}-" + ",".join(f"{k}={v!r}"[:24] for k, v in c.items()) for f, c, _ in FAMILY_BAD])
def test_other_families_bad_fields_are_one_line_before_anything_is_built(family, change, message, tmp_path):
    path = tmp_path / "arch.json"
    path.write_text(json.dumps({**TINY[family], **change}))
    assert refusal(path) == f"invalid config in {path}: {message}"


def test_a_position_table_that_pad_token_id_leaves_too_short_is_one_line(tmp_path):
    """RoBERTa numbers positions from pad_token_id + 1 (`Family.max_positions`): 24 rows hold 16 positions with
    pad_token_id 7, but 3 with pad_token_id 20, fewer than the trace's 13 tokens (an IndexError mid-trace before)."""
    config = dict(model_type="roberta", architectures=["RobertaForMaskedLM"], hidden_size=32, num_attention_heads=4,
                  num_hidden_layers=2, intermediate_size=64, max_position_embeddings=24, vocab_size=97)
    path = tmp_path / "arch.json"
    path.write_text(json.dumps({**config, "pad_token_id": 7}))
    assert load(path, meta=True).model.config.pad_token_id == 7
    path.write_text(json.dumps({**config, "pad_token_id": 20}))
    assert refusal(path) == (f"invalid config in {path}: max_position_embeddings is 24; set it to at least 37 in the "
                             f"config, or lower pad_token_id (20): the table holds max_position_embeddings - "
                             f"pad_token_id - 1 = 3 positions, and fxconvert traces, validates and probes the stages "
                             f"with sequences of up to 13 tokens")


def test_a_type_whose_defaults_do_not_shrink_still_loads(tmp_path, monkeypatch):
    """The config check's record builds a tiny model of the type to find a position offset; a type whose
    defaults do not shrink (DBRX's tiny config misses `rope_theta` on transformers 5.25) is checked without
    one, not treated as a type transformers does not know."""
    from fxconvert.families import derived

    def no_tiny(model_type, **overrides):
        raise AttributeError("'DbrxAttentionConfig' object has no attribute 'rope_theta'")

    monkeypatch.setattr(derived, "tiny_config", no_tiny)
    path = tmp_path / "arch.json"
    path.write_text(json.dumps(dict(model_type="opt", architectures=["OPTForCausalLM"], hidden_size=32,
                                    ffn_dim=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=97,
                                    max_position_embeddings=64, word_embed_proj_dim=32)))
    assert type(load(path, meta=True).model).__name__ == "OPTForCausalLM"


def test_buffers_count_towards_building_on_the_meta_device(tmp_path, monkeypatch):
    """BERT holds position_ids and token_type_ids (int64) over max_position_embeddings: with 1.5e9 positions
    and a width of 1 the parameters (1.5e9) are below the 2e9 meta threshold, the buffers add 3e9 values
    (24 GB). Scaled down 10**4 here (threshold 2e5), so that a regression cannot exhaust the memory."""
    import fxconvert.load as load_module

    monkeypatch.setattr(load_module, "META_THRESHOLD", 200_000)
    path = tmp_path / "arch.json"
    path.write_text(json.dumps({**TINY["bert"], "hidden_size": 1, "num_attention_heads": 1, "vocab_size": 2,
                                "max_position_embeddings": 150_000}))
    with pytest.warns(RandomWeightsWarning, match="0.0B parameters and buffer values are too many to build in "
                                                  "memory"):
        loaded = load(path, allow_random=True)
    assert loaded.source.device == "meta"
    assert sum(p.numel() for p in loaded.model.parameters()) < 200_000 < sum(
        b.numel() for b in loaded.model.buffers())


def test_torch_frames_are_cut_from_a_build_error():
    from fxconvert.load import _summary

    error = RuntimeError('empty(): argument \'size\' failed to unpack the object at pos 1 with error "Overflow when '
                         'unpacking long long\nException raised from THPUtils_unpackLong at python_numbers.h:79 (most '
                         'recent call first):\nframe #0: c10::Error::Error(c10::SourceLocation) + 0x9d')
    assert _summary(error) == ("empty(): argument 'size' failed to unpack the object at pos 1 with error \"Overflow "
                               "when unpacking long long")


# Names a config class maps onto its fields (`attribute_map`): transformers reads the other name into
# the field, so the checks see its value and name it as written. The field itself is left out of the
# config, except where both are given and differ.
ALIASED = [
    ("gpt2", dict(num_hidden_layers=10**9), "num_hidden_layers is 1000000000; set it to at most 1024 in the config"),
    ("gpt2", dict(max_position_embeddings=HUGE), f"max_position_embeddings is {HUGE}; {UP_TO}"),
    ("gpt2", dict(num_attention_heads=0), "num_attention_heads is 0; set it to a positive integer in the config"),
    ("bart", dict(hidden_size=-1), "hidden_size is -1; set it to a positive integer in the config"),
    ("bart", dict(num_hidden_layers=10**9, encoder_layers=2),
     "num_hidden_layers is 1000000000 but encoder_layers is 2, and transformers reads num_hidden_layers as "
     "encoder_layers; remove num_hidden_layers or give both the same value in the config"),
]


@pytest.mark.parametrize("family, change, message", ALIASED,
                         ids=[f"{f}-" + ",".join(f"{k}={v!r}"[:24] for k, v in c.items()) for f, c, _ in ALIASED])
def test_other_names_of_a_field_are_checked_as_that_field(family, change, message, tmp_path):
    import transformers

    config_cls = getattr(transformers, {"gpt2": "GPT2Config", "bart": "BartConfig"}[family])
    aliases = {k: config_cls.attribute_map[k] for k in change if k in config_cls.attribute_map}
    config = {k: v for k, v in TINY[family].items() if k not in aliases.values()}
    config.update(change)
    for key, field in aliases.items():  # transformers itself lets the other name win
        assert getattr(config_cls.from_dict(dict(config)), field) == change[key]
    path = tmp_path / "arch.json"
    path.write_text(json.dumps(config))
    assert refusal(path) == f"invalid config in {path}: {message}"


def test_an_other_name_equal_to_its_field_is_accepted(tmp_path):
    """Published BART configs carry num_hidden_layers equal to encoder_layers."""
    path = tmp_path / "arch.json"
    path.write_text(json.dumps({**TINY["bart"], "num_hidden_layers": TINY["bart"]["encoder_layers"]}))
    assert load(path, meta=True).model.config.encoder_layers == 2


@pytest.mark.parametrize("family, field", [
    ("gpt2", "n_positions"), ("bert", "max_position_embeddings"),
    pytest.param("bart", "max_position_embeddings", marks=pytest.mark.skipif(
        _draws_layerdrop_at_zero(), reason="transformers < 5.23: BART is refused there (tests/test_family_bart.py)")),
])
def test_the_shortest_accepted_position_table_converts_and_validates(family, field, tmp_path, capsys):
    """At 16 positions the trace, validation (against eager) and the 2-stage probes all fit."""
    from helpers import cli_convert

    import transformers

    config = {**TINY[family], field: 16}
    config_obj = transformers.AutoConfig.for_model(**{k: v for k, v in config.items() if k != "architectures"})
    torch.manual_seed(0)
    model = getattr(transformers, config["architectures"][0])(config_obj)
    report = cli_convert(model, tmp_path, capsys, "--stages", 2)
    assert report["model"]["config"][field] == 16
