"""The presets of types with no hand-written record (`fxconvert.families.checkpoints`).

Each builds on the meta device from its name alone (offline), as the class its config names,
with a record derived from that class, and has the published parameter count where one is
published: KerasHub's preset metadata (`keras_hub/src/models/<model>/<model>_presets.py`,
"params", which counts the backbone: transformers' `base_model`, or the whole model where
the backbone holds an untied head), a model card, or a paper. Where none is published the
count is the one transformers 5.25 reports for the config, so a changed field still fails.
"""

import json

import pytest
import torch

from fxconvert import families
from fxconvert.families import checkpoints
from fxconvert.load import PRESETS, RandomWeightsWarning, load
from fxconvert.workflow import convert

# name -> (count, what it counts, relative tolerance, source). KerasHub's position tables lack the
# two offset rows of OPT's and RoBERTa's (and RoBERTa's one segment row): hence 0.1%, not exact.
PUBLISHED = {
    "roberta-base": (124_052_736, "base", 1e-3, "KerasHub roberta_base_en"),
    "roberta-large": (354_307_072, "base", 1e-3, "KerasHub roberta_large_en"),
    "distilbert-base-uncased": (66_362_880, "base", 0, "KerasHub distil_bert_base_en_uncased"),
    "facebook/opt-125m": (125_237_760, "base", 1e-3, "KerasHub opt_125m_en"),
    "facebook/opt-350m": (331_196_416, "model", 0, "transformers' count"),
    "facebook/opt-1.3b": (1_315_753_984, "base", 1e-3, "KerasHub opt_1.3b_en"),
    "EleutherAI/gpt-neo-125m": (125e6, "model", 1e-2, "the model card's 125M"),
    "bigscience/bloom-560m": (559_214_592, "base", 0, "KerasHub bloom_560m_multi"),
    "microsoft/phi-2": (2.78e9, "model", 5e-3, "the Hub's 2.78B safetensors parameters"),
    "Qwen/Qwen3-0.6B": (596_049_920, "base", 0, "KerasHub qwen3_0.6b_en"),
    "google/gemma-2-2b": (2_614_341_888, "base", 0, "KerasHub gemma2_2b_en"),
    "mistralai/Mixtral-8x7B-v0.1": (46_702_792_704, "model", 0, "KerasHub mixtral_8_7b_en"),
    "Helsinki-NLP/opus-mt-en-de": (74_410_496, "model", 0, "transformers' count"),
    "facebook/mbart-large-cc25": (610_851_840, "model", 0, "transformers' count"),
    "google/pegasus-large": (568e6, "model", 1e-2, "the PEGASUS paper's 568M"),
}


def test_every_preset_has_a_stated_parameter_count():
    assert set(PUBLISHED) == set(checkpoints.PRESETS)


@pytest.mark.parametrize("name", list(checkpoints.PRESETS))
def test_a_preset_builds_on_the_meta_device_with_the_published_parameter_count(name):
    config = checkpoints.PRESETS[name]
    loaded = load(name, meta=True, offline=True)
    model, cls_name = loaded.model, config["architectures"][0]
    assert type(model).__name__ == cls_name and config["model_type"] not in families.model_types()
    assert (loaded.source.origin, loaded.source.device) == ("preset", "meta")
    assert families.family_of_class(cls_name).derived_from == cls_name
    expected, what, tolerance, source = PUBLISHED[name]
    counted = model.base_model if what == "base" else model
    n = sum(p.numel() for p in counted.parameters())
    assert abs(n - expected) <= tolerance * expected, f"{n:,} parameters, {source} says {expected:,.0f}"


@pytest.mark.parametrize("alias,name", list(checkpoints.ALIASES.items()))
def test_an_alias_builds_its_preset(alias, name):
    loaded = load(alias, meta=True, offline=True)
    assert loaded.source.location == name and type(loaded.model).__name__ == PRESETS[name]["architectures"][0]


def test_a_class_without_sdpa_is_built_with_eager_attention_and_says_so(tmp_path):
    """GPT-Neo and BLOOM have no SDPA attention: transformers refuses to build them when asked for it by name,
    and builds them with eager attention when asked for none."""
    (tmp_path / "neo.json").write_text(json.dumps(dict(
        model_type="gpt_neo", architectures=["GPTNeoForCausalLM"], hidden_size=32, num_layers=2, num_heads=4,
        attention_types=[[["global", "local"], 1]], vocab_size=97, max_position_embeddings=128)))
    for name in (tmp_path / "neo.json", "EleutherAI/gpt-neo-125m", "bigscience/bloom-560m"):
        loaded = load(name, meta=True, offline=True)
        assert loaded.model.config._attn_implementation == "eager"
        assert f"{type(loaded.model).__name__} has no SDPA attention: built with eager attention" in \
            loaded.source.notes
    assert load("facebook/opt-125m", meta=True, offline=True).model.config._attn_implementation == "sdpa"


def test_a_small_preset_builds_with_random_weights_warns_and_converts():
    with pytest.warns(RandomWeightsWarning, match="RANDOM WEIGHTS"):
        loaded = load("distilbert-base-uncased", offline=True, allow_random=True)
    assert loaded.source.random_weights and loaded.source.device == "cpu"
    assert all(p.device.type == "cpu" and torch.isfinite(p).all() for p in loaded.model.parameters())
    conversion = convert(loaded.model)
    assert conversion.output_name == "loss" and families.family_of_class("DistilBertForMaskedLM").derived_from
