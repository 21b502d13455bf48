"""Model resolution: directory, Hub cache, Hub, preset; config files; the meta device; the errors."""

import json
import socket

import pytest
import torch

import fxconvert.load as load_module
from fxconvert.errors import ModelResolutionError
from fxconvert.load import PRESETS, load

from checkpoints import checkpoint_tensors, edit_config, fake_hub_cache, write_checkpoint


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
    loaded = load(tmp_path / "ckpt")
    assert type(loaded.model).__name__ == "MT5EncoderModel"
    assert loaded.source.random_weights
    assert any("RANDOM WEIGHTS" in n for n in loaded.source.notes)
    assert all(torch.isfinite(p).all() for p in loaded.model.parameters())


def test_config_file_is_an_architecture(tmp_path, no_network):
    write_checkpoint(tmp_path / "ckpt", "UMT5ForConditionalGeneration", variant="v1_1")
    config = tmp_path / "arch.json"
    config.write_text((tmp_path / "ckpt" / "config.json").read_text())
    loaded = load(config, seed=3)
    assert type(loaded.model).__name__ == "UMT5ForConditionalGeneration"
    assert (loaded.source.origin, loaded.source.weights) == ("config file", "random")
    again = load(config, seed=3)  # the seed makes random weights reproducible
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
    loaded = load("google/flan-t5-small", offline=True)
    model = loaded.model
    assert model.lm_head.weight is not model.shared.weight
    from fxconvert.convert import convert

    conversion = convert(model)
    assert conversion.shared_weights == {"shared_embed_weight": ["shared.weight", "encoder.embed_tokens.weight",
                                                                 "decoder.embed_tokens.weight"]}
    assert any(p is model.lm_head.weight for p in conversion.module.parameters())


def test_large_presets_go_to_the_meta_device_by_themselves(no_network):
    loaded = load("t5-3b", offline=True)
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
    ("bert", r"model_type 'bert'.*not supported.*T5ForConditionalGeneration"),
    ("unsupported_class", r"T5ForSequenceClassification, which is not supported"),
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
            (ckpt / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
        elif setup == "unsupported_class":
            edit_config(ckpt, architectures=["T5ForSequenceClassification"])
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
    assert set(PRESETS) == expected
