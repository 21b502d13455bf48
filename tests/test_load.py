"""Model resolution: directory, Hub cache, Hub, preset; config files; the meta device; the errors."""

import json
import logging
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import fxconvert.load as load_module
from fxconvert.errors import ModelResolutionError
from fxconvert.load import PRESETS, RandomWeightsWarning, load

from checkpoints import checkpoint_tensors, edit_config, fake_hub_cache, write_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access: {args}")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(load_module, "hub_reachable", lambda *a, **k: refuse("hub_reachable"))


def test_local_directory_loads_its_weights(tmp_path, no_network):
    model = write_checkpoint(tmp_path / "ckpt")
    loaded = load(tmp_path / "ckpt")
    assert type(loaded.model).__name__ == "T5ForConditionalGeneration" and not loaded.model.training
    assert (loaded.source.origin, loaded.source.weights, loaded.source.device) == ("local directory", "checkpoint",
                                                                                  "cpu")
    assert loaded.source.notes == []
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    assert loaded.model.lm_head.weight is loaded.model.shared.weight  # tying survives loading


def test_directory_without_weights_gets_random_weights_and_says_so(tmp_path, no_network):
    write_checkpoint(tmp_path / "ckpt", "MT5EncoderModel")
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    with pytest.warns(RandomWeightsWarning, match="has no weights"):
        loaded = load(tmp_path / "ckpt", allow_random=True)
    assert type(loaded.model).__name__ == "MT5EncoderModel"
    assert loaded.source.random_weights
    assert any("RANDOM WEIGHTS" in n for n in loaded.source.notes)
    assert all(torch.isfinite(p).all() for p in loaded.model.parameters())


def test_config_file_is_an_architecture(tmp_path, no_network):
    write_checkpoint(tmp_path / "ckpt", "UMT5ForConditionalGeneration", variant="v1_1")
    config = tmp_path / "arch.json"
    config.write_text((tmp_path / "ckpt" / "config.json").read_text())
    with pytest.warns(RandomWeightsWarning):
        loaded = load(config, seed=3, allow_random=True)
        again = load(config, seed=3, allow_random=True)  # the seed makes random weights reproducible
    assert type(loaded.model).__name__ == "UMT5ForConditionalGeneration"
    assert (loaded.source.origin, loaded.source.weights) == ("config file", "random")
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.parameters(), again.model.parameters()))


@pytest.mark.parametrize("name, cls, facts, params", [
    # published sizes: t5-small has 60.5M parameters, t5-11b 11.3B. transformers 5 ties every T5 LM head and
    # keeps the published tie_word_embeddings=False of v1.1 / mT5 as scale_decoder_outputs=False.
    ("t5-small", "T5ForConditionalGeneration",
     dict(d_model=512, d_ff=2048, d_kv=64, num_heads=8, num_layers=6, vocab_size=32128, feed_forward_proj="relu",
          scale_decoder_outputs=True), 60_506_624),
    ("google-t5/t5-11b", "T5ForConditionalGeneration",
     dict(d_model=1024, d_ff=65536, d_kv=128, num_heads=128, num_layers=24, scale_decoder_outputs=True),
     11_307_321_344),
    ("google/flan-t5-base", "T5ForConditionalGeneration",
     dict(d_model=768, d_ff=2048, num_heads=12, num_layers=12, feed_forward_proj="gated-gelu",
          scale_decoder_outputs=False), None),
    ("google/mt5-small", "MT5ForConditionalGeneration",
     dict(d_model=512, d_ff=1024, num_heads=6, num_layers=8, vocab_size=250112, feed_forward_proj="gated-gelu"),
     None),
])
def test_presets_offline_are_published_architectures(name, cls, facts, params, no_network):
    loaded = load(name, offline=True, meta=True)
    model = loaded.model
    assert type(model).__name__ == cls
    for key, value in facts.items():
        assert getattr(model.config, key) == value, key
    assert (model.config.decoder_start_token_id, model.config.use_cache) == (0, False)
    assert loaded.source.origin == "preset" and loaded.source.device == "meta"
    assert any("offline" in n for n in loaded.source.notes)
    if params is not None:
        assert sum(p.numel() for p in model.parameters()) == params
    # original T5 ties its LM head to the shared embedding; v1.1, flan and mT5 checkpoints hold their own head
    assert (model.lm_head.weight is model.shared.weight) == (cls.startswith("T5") and "flan" not in name)


def test_untied_preset_converts_with_the_head_as_its_own_parameter(no_network):
    with pytest.warns(RandomWeightsWarning):
        loaded = load("google/flan-t5-small", offline=True, allow_random=True)
    model = loaded.model
    assert model.lm_head.weight is not model.shared.weight
    from fxconvert import convert

    conversion = convert(model)
    assert conversion.shared_weights == {"shared_embed_weight": ["shared.weight", "encoder.embed_tokens.weight",
                                                                 "decoder.embed_tokens.weight"]}
    assert any(p is model.lm_head.weight for p in conversion.module.parameters())


def test_large_presets_go_to_the_meta_device_by_themselves(no_network):
    with pytest.warns(RandomWeightsWarning, match="meta device"):
        loaded = load("t5-3b", offline=True, allow_random=True)
    assert loaded.source.device == "meta" and loaded.source.weights == "none (meta device)"
    assert all(p.device.type == "meta" for p in loaded.model.parameters())
    assert any("meta device" in n for n in loaded.source.notes)


def test_hf_hub_offline_env_never_touches_the_network(monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert load("google/t5-v1_1-small", meta=True).source.origin == "preset"


def test_unreachable_hub_falls_back_to_the_preset(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    probes = []
    monkeypatch.setattr(load_module, "hub_reachable", lambda *a, **k: probes.append(1) or False)
    loaded = load("t5-base", meta=True)
    assert probes and loaded.source.origin == "preset"
    assert any("Hub is unreachable" in n for n in loaded.source.notes)


def test_hub_probe_is_a_short_connect(monkeypatch):
    calls = []

    def create_connection(address, timeout=None):
        calls.append((address, timeout))
        raise OSError("unreachable")

    monkeypatch.setattr(socket, "create_connection", create_connection)
    assert load_module.hub_reachable() is False
    assert calls == [(("huggingface.co", 443), load_module.HUB_PROBE_TIMEOUT)]


def test_hub_id_in_the_local_cache(tmp_path, monkeypatch, no_network):
    import huggingface_hub.constants

    model = write_checkpoint(tmp_path / "ckpt", "T5EncoderModel")
    fake_hub_cache(tmp_path / "cache", "someone/tiny-t5", tmp_path / "ckpt")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    loaded = load("someone/tiny-t5", offline=True)
    assert (loaded.source.origin, loaded.source.weights) == ("Hugging Face cache", "checkpoint")
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name


@pytest.mark.parametrize("setup, message", [
    ("unknown", r"unknown model 'no-such-model'.*presets: t5-small"),
    ("bert", r"model_type 'vit'.*not supported.*T5ForConditionalGeneration.*any other transformers model "
             r"that takes input_ids"),
    ("unsupported_class", r"ViTModel, which is not supported"),
    ("malformed", r"malformed .*config.json: Expecting"),
    ("mismatch", r"do not match its config.json: .*DenseReluDense.wi.weight is \(48, 32\) in the weights "
                 r"but \(64, 32\) by the config"),
    ("missing_key", r"do not match its config.json: the weights lack encoder.final_layer_norm.weight"),
    ("no_config", r"has no config.json"),
])
def test_errors_name_the_problem(setup, message, tmp_path, no_network):
    ckpt = tmp_path / "ckpt"
    if setup == "unknown":
        name = "no-such-model"
    else:
        name = ckpt
        if setup == "mismatch":
            write_checkpoint(ckpt, d_ff=48)
            edit_config(ckpt, d_ff=64)
        else:
            write_checkpoint(ckpt)
        if setup == "bert":
            (ckpt / "config.json").write_text(json.dumps({"model_type": "vit", "architectures": ["ViTModel"]}))
        elif setup == "unsupported_class":
            edit_config(ckpt, architectures=["ViTModel"])  # a class of no family that takes no input_ids
        elif setup == "malformed":
            (ckpt / "config.json").write_text('{"model_type": "t5" "d_model": 32}')
        elif setup == "missing_key":
            from safetensors.torch import save_file

            tensors = checkpoint_tensors(ckpt)
            del tensors["encoder.final_layer_norm.weight"]
            save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
        elif setup == "no_config":
            (ckpt / "config.json").unlink()
    with pytest.raises(ModelResolutionError, match=message) as info:
        load(name, offline=True)
    assert "\n" not in str(info.value)


def test_presets_cover_the_public_family():
    expected = {"t5-small", "t5-base", "t5-large", "t5-3b", "t5-11b"}
    expected |= {f"google/{f}-{s}" for f in ("t5-v1_1", "flan-t5", "mt5") for s in ("small", "base", "large", "xl",
                                                                                        "xxl")}
    assert {name for name, config in PRESETS.items() if config["model_type"] in ("t5", "mt5")} == expected


# -- random weights are an opt-in -------------------------------------------------------------


def _no_weights(kind, tmp_path, monkeypatch):
    """A name that resolves to an architecture without weights, by each way a name can."""
    if kind == "preset, Hub unreachable":
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(load_module, "hub_reachable", lambda *a, **k: False)
        return "google/flan-t5-small", "Hub is unreachable"
    if kind == "preset, offline":
        return "t5-small", r"not in the Hugging Face cache \(offline\)"
    write_checkpoint(tmp_path / "ckpt", "T5EncoderModel")
    if kind == "directory without weights":
        (tmp_path / "ckpt" / "model.safetensors").unlink()
        return tmp_path / "ckpt", "has no weights"
    if kind == "config file":
        (tmp_path / "arch.json").write_text((tmp_path / "ckpt" / "config.json").read_text())
        return tmp_path / "arch.json", "is a config file, an architecture without weights"
    import huggingface_hub.constants

    fake_hub_cache(tmp_path / "cache", "someone/tiny-t5", tmp_path / "ckpt", files=("config.json",))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    return "someone/tiny-t5", "are not in the Hugging Face cache"


NO_WEIGHTS = ["preset, Hub unreachable", "preset, offline", "directory without weights", "config file",
              "cache entry without weights"]


@pytest.mark.parametrize("kind", NO_WEIGHTS)
def test_random_weights_are_refused_without_the_opt_in(kind, tmp_path, monkeypatch):
    name, why = _no_weights(kind, tmp_path, monkeypatch)
    from fxconvert import convert

    for call in (load, convert):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # refused, not warned and built
            with pytest.raises(ModelResolutionError, match=why + r".*: pass allow_random=True to build it with "
                                                                  r"random weights, or meta=True") as info:
                call(name, offline=kind == "preset, offline")
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("kind", NO_WEIGHTS)
def test_random_weights_with_the_opt_in_are_warned_and_logged(kind, tmp_path, monkeypatch, caplog):
    name, why = _no_weights(kind, tmp_path, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="fxconvert"), pytest.warns(RandomWeightsWarning) as warned:
        loaded = load(name, offline=kind == "preset, offline", allow_random=True)
    assert loaded.source.random_weights
    (warning,) = [w for w in warned if w.category is RandomWeightsWarning]
    assert str(warning.message).startswith(f"{name}: ") and "RANDOM WEIGHTS" in str(warning.message)
    assert warning.filename == __file__  # the caller's line, where the opt-in was written
    (record,) = [r for r in caplog.records if r.name.startswith("fxconvert")]
    assert record.levelno == logging.WARNING and record.getMessage() == str(warning.message)


def test_the_meta_device_needs_no_opt_in_and_warns_nothing(no_network):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load("google/flan-t5-small", offline=True, meta=True)
    assert loaded.source.weights == "none (meta device)"


def test_a_checkpoint_needs_no_opt_in_and_warns_nothing(tmp_path, no_network):
    write_checkpoint(tmp_path / "ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load(tmp_path / "ckpt").source.weights == "checkpoint"


def test_a_library_user_sees_the_warning_once(tmp_path):
    """As a script run by a user sees it: the warning on stderr once, not a second time through Python's
    last-resort logging handler, and nothing else."""
    write_checkpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    script = f"from fxconvert.load import load\nload({str(tmp_path / 'ckpt')!r}, allow_random=True)\n"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "default"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=600)
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("RANDOM WEIGHTS") == 1, run.stderr
    assert f"RandomWeightsWarning: {tmp_path / 'ckpt'}: {tmp_path / 'ckpt'} has no weights" in run.stderr


def test_a_transformers_outside_the_declared_range_is_refused_in_one_line(monkeypatch, tmp_path, capsys):
    """An environment where fxconvert was installed without its dependencies: an old transformers
    fails with one line naming the range, not deep inside a trace."""
    from fxconvert import cli
    from fxconvert.errors import FxConvertError
    from fxconvert.trace import require_transformers, trace

    import helpers

    model = helpers.build("T5Model")
    monkeypatch.setattr("transformers.__version__", "4.57.0")  # below every range fxconvert declared
    require_transformers.cache_clear()
    try:
        for call in (lambda: load("t5-small", offline=True, meta=True), lambda: trace(model)):
            with pytest.raises(FxConvertError, match=r"^transformers 4.57.0 is installed, but fxconvert needs "
                                                     r"transformers.*; install it with pip install 'transformers"):
                call()
        assert cli.main(["t5-small", "--meta", "--out", str(tmp_path / "out")]) == 1
        assert capsys.readouterr().err.startswith("fxconvert: error: transformers 4.57.0 is installed")
    finally:
        require_transformers.cache_clear()


# config.json dicts with tie_word_embeddings false, one per family with an LM head
UNTIED_CONFIGS = {
    "t5": dict(model_type="t5", architectures=["T5ForConditionalGeneration"], vocab_size=32, d_model=8, d_ff=16,
               d_kv=4, num_heads=2, num_layers=1),
    "bart": dict(model_type="bart", architectures=["BartForConditionalGeneration"], vocab_size=32, d_model=8,
                 encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                 encoder_ffn_dim=16, decoder_ffn_dim=16),
    "gpt2": dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=32, n_embd=8, n_layer=1, n_head=2,
                 bos_token_id=0, eos_token_id=0),
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=32, hidden_size=8,
                  intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1),
}


@pytest.mark.parametrize("name", UNTIED_CONFIGS)
def test_only_a_family_whose_record_says_so_has_its_head_untied(name):
    """The untie rule is the record's: T5's head (which transformers ties whatever the config says)
    gets its own weight; every other family's head is left exactly as transformers built it."""
    import transformers

    from fxconvert import families

    config = dict(UNTIED_CONFIGS[name], tie_word_embeddings=False)
    cls = getattr(transformers, config["architectures"][0])
    with torch.device("meta"):
        model = cls(cls.config_class(**config))
    family = families.family_of_model_type(config["model_type"])
    embedding, head = model.get_input_embeddings().weight, model.lm_head.weight
    # the record states what transformers does
    assert (head is embedding) == family.ties_head_regardless == (name == "t5")
    load_module._untie_head(model, config)
    if family.ties_head_regardless:
        assert model.lm_head.weight is not embedding and model.lm_head.weight.shape == embedding.shape
    else:
        assert model.lm_head.weight is head
    tied = dict(config, tie_word_embeddings=True)
    assert not family.unties_head(tied) and family.unties_head(config) == (name == "t5")
