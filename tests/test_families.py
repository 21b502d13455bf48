"""Every family record is consistent with itself, with the other records and with transformers.

The records are plain data that every module trusts; a typo in one (an input kind no builder
knows, a class transformers does not have, a preset of another family's type) would surface
far from its cause, so each fact is checked here against transformers or the other records.
"""

import inspect
import re

import pytest
import torch
import transformers

from fxconvert import families
from fxconvert.families import checkpoints
from fxconvert.objectives import OBJECTIVES

FAMILIES = families.all_families()


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_a_record_names_what_transformers_has(family):
    for model_type, (config_cls, model_cls) in family.model_types.items():
        config = getattr(transformers, config_cls)()
        assert config.model_type == model_type
        assert model_cls in family.classes
        assert hasattr(config, family.hidden_field), family.hidden_field
        if family.max_length:
            assert hasattr(config, family.max_length), family.max_length
    for cls_name in family.classes:
        forward = inspect.signature(inspect.unwrap(getattr(transformers, cls_name).forward)).parameters
        names = family.default_input_names(cls_name)  # every class has default inputs
        assert set(names) <= set(forward), (cls_name, set(names) - set(forward))


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_a_record_uses_only_known_kinds_sequences_and_objectives(family):
    assert all(kind in families.KINDS and seq in families.SEQUENCES for kind, seq in family.inputs.values())
    assert set(family.train_inputs) <= set(family.inputs) and "labels" in family.train_inputs
    assert all(set(names) <= set(family.inputs) for _, names in family.default_inputs)
    assert family.objective is None or family.objective in OBJECTIVES
    for pattern in family.blocks:
        assert {"block", "index"} <= set(re.compile(pattern).groupindex), pattern


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_presets_belong_to_their_family(family):
    for name, config in family.presets.items():
        assert config["model_type"] in family.model_types, name
        assert config["architectures"][0] in family.classes, name
    assert set(family.aliases.values()) <= set(family.presets)


def test_no_class_model_type_or_preset_name_belongs_to_two_families():
    for attribute in ("classes", "model_types", "presets"):
        names = [n for f in FAMILIES for n in getattr(f, attribute)]
        assert len(names) == len(set(names)), attribute
    every_name = [n for f in FAMILIES for n in (*f.presets, *f.aliases)]
    every_name += [*checkpoints.PRESETS, *checkpoints.ALIASES]  # the presets of types with a derived record
    assert len(every_name) == len(set(every_name))


def test_a_derived_records_preset_is_of_a_type_with_no_hand_written_record():
    """A hand-written record's type keeps its presets in its record, where its checks see them."""
    for name, config in checkpoints.PRESETS.items():
        assert config["model_type"] not in families.model_types(), name
        assert isinstance(config["architectures"], list) and len(config["architectures"]) == 1, name
    assert set(checkpoints.ALIASES.values()) <= set(checkpoints.PRESETS)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_a_records_tiny_config_builds_a_tiny_model_of_each_type_that_the_loader_accepts(family):
    from fxconvert.load import check_config

    for model_type, (config_cls, model_cls) in family.model_types.items():
        config = family.tiny_config(model_type)
        assert config["architectures"] == [model_cls] and config["model_type"] == model_type
        check_config(config, "config.json")  # the loader's structural checks pass
        built = transformers.AutoConfig.for_model(**config)
        assert type(built).__name__ == config_cls
        assert getattr(built, family.hidden_field) == 32 and built.vocab_size == 97  # the fields took effect
        with torch.device("meta"):
            model = getattr(transformers, model_cls)(built)
        assert sum(p.numel() for p in model.parameters()) < 100_000
    assert family.tiny_config(dropout_marker=1)["dropout_marker"] == 1  # overrides replace fields
    with pytest.raises(KeyError, match="no model_type"):
        family.tiny_config("not-a-type")
