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


@pytest.mark.parametrize("weights", [True, False], ids=["weights", "random"])
@pytest.mark.parametrize("change, message", BAD, ids=IDS)
def test_bad_fields_are_named_with_their_value_and_fix(change, message, weights, tiny_dir, tmp_path):
    ckpt = bad_checkpoint(tiny_dir, tmp_path, change, weights)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a refusal leaks no warning
        with pytest.raises(ModelResolutionError) as info:
            load(ckpt, allow_random=True)
    assert str(info.value) == f"invalid config in {ckpt}: {message}"


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
