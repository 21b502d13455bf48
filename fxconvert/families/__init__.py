"""One record per model family: everything fxconvert knows about a family's transformers classes.

Loading, tracing, validation, stages, the report and the training launcher read these
records and nothing else about a family. Adding a family is one file here (a module-level
`FAMILY = Family(...)`, listed in `_MODULES`) plus its tests.

A record is plain data (and, where a family needs one, a small function, and its training
objective from `fxconvert.objectives`): it imports neither transformers nor torch, so
`import fxconvert.families` stays cheap.
"""

import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache

from fxconvert.objectives import SEQ2SEQ, Objective

# What an input holds, for building example and random inputs:
#   ids        token ids in [0, vocab_size)
#   mask       1 for real tokens, 0 for padding
#   type_ids   segment ids in [0, type_vocab_size)
#   embeds     float vectors of the family's hidden size
#   class      one class id per row in [0, num_labels) (a sequence classifier's labels): no sequence dimension
# and which sequence it spans: "encoder" (the input sequence; the only one of a decoder-only
# or encoder-only model) or "decoder" (the target sequence of an encoder-decoder model).
KINDS = ("ids", "mask", "type_ids", "embeds", "class")
SEQUENCES = ("encoder", "decoder")
# The inputs of an encoder-decoder model (T5, BART), in forward's order.
ENCODER_DECODER_INPUTS = {
    "input_ids": ("ids", "encoder"),
    "attention_mask": ("mask", "encoder"),
    "decoder_input_ids": ("ids", "decoder"),
    "decoder_attention_mask": ("mask", "decoder"),
    "labels": ("ids", "decoder"),
    "inputs_embeds": ("embeds", "encoder"),
    "decoder_inputs_embeds": ("embeds", "decoder"),
}
# What a user reads each sequence's length called (pipeline.json's symbolic shapes, the split's
# plan, the report): an encoder-decoder model has two sequences, any other model one.
ENCODER_DECODER_LENGTHS = {"encoder": "encoder_length", "decoder": "decoder_length"}
ONE_SEQUENCE_LENGTHS = {"encoder": "sequence_length"}
# The largest size field (width, vocabulary, position table) a config may give: past int64 a tensor
# cannot even be built on the meta device, and no supported family publishes one near 2**31.
MAX_SIZE = 2**31 - 1


@dataclass(frozen=True)
class Family:
    name: str  # short name: "t5", "gpt2", ...
    title: str  # for people: "T5 (T5, mT5, umT5)"
    model_types: Mapping[str, tuple[str, str]]  # config.json model_type -> (config class, default model class)
    classes: tuple[str, ...]  # the transformers classes fxconvert traces
    inputs: Mapping[str, tuple[str, str]]  # input name -> (kind, sequence), in forward's order
    default_inputs: tuple[tuple[str, tuple[str, ...]], ...]  # (class-name suffix, input names): first match
    train_inputs: tuple[str, ...]  # what fxconvert.train feeds the first stage; the loss comes from labels
    hidden_field: str  # config attribute: the width of inputs_embeds (read with `input_sizes`)
    blocks: tuple[str, ...]  # per stack, in run order: a regex matching a block's module path
    presets: Mapping[str, dict] = field(default_factory=dict)  # name -> config.json dict (random weights)
    aliases: Mapping[str, str] = field(default_factory=dict)  # other name -> preset name
    config_fields: tuple[str, ...] = ()  # shown in the report's model section
    # family-specific structural checks: (config.json dict, refuse) -> None; refuse(key, rule) raises
    check_config: Callable[[dict, Callable], None] | None = None
    max_layers_fields: tuple[str, ...] = ()  # config fields that count layers (capped by load.MAX_LAYERS)
    # what the error about a layer-count field adds (T5's num_decoder_layers can be left to follow num_layers)
    layers_field_hints: Mapping[str, str] = field(default_factory=dict)
    positive_int_fields: tuple[str, ...] = ()  # fields that must be positive integers
    rate_fields: tuple[str, ...] = ()  # dropout probabilities in [0, 1)
    token_id_fields: tuple[str, ...] = ()  # token ids in [0, vocab_size)
    max_length: str = ""  # config attribute bounding every sequence's length (absolute positions); "" for none
    # config attribute whose value + 1 positions of that table come before the first token's: RoBERTa-style
    # embeddings number positions from pad_token_id + 1 (fairseq's), "" for none (`max_positions`)
    position_offset: str = ""
    notes: str = ""  # one line on what differs, shown in the report's model section
    # What fxconvert.train trains with (`fxconvert.objectives`): SEQ2SEQ (input -> target, decoder
    # inputs are the labels shifted right), CAUSAL_LM (input + target as one sequence, loss on the
    # target, the model shifts), MASKED_LM (pre-tokenized, labels aligned with the input), or None
    # (no training data format for this family). The objective collates the batches and holds
    # the length rule and the pad policy.
    objective: Objective | None = SEQ2SEQ
    # (config, training, dtype name such as "float16") -> why the model cannot be traced as it is
    # (a one-line reason naming the fix), or None. For what a graph cannot record in some settings.
    check_trace: Callable[[object, bool, str], str | None] | None = None
    # sequence (SEQUENCES) -> the name of its length where a user reads it; every sequence of `inputs`
    sequence_lengths: Mapping[str, str] = field(default_factory=lambda: dict(ENCODER_DECODER_LENGTHS))
    # config.json fields (model_type and architectures aside) of a tiny random model of this
    # family: two layers, width 32, vocabulary 97, dropout on. For the tests and --self-check.
    tiny: Mapping[str, object] = field(default_factory=dict)
    # Whether transformers ties this family's LM head (`lm_head`) to the input embedding at
    # construction whatever `tie_word_embeddings` says (T5 in transformers 5). Such a head is
    # untied at load when the config says false (`unties_head`), as the published checkpoints
    # hold it; every other family's transformers class already honours the field.
    ties_head_regardless: bool = False
    # The transformers class a record was derived from (`fxconvert.families.derived`); "" for a
    # hand-written record.
    derived_from: str = ""

    def unties_head(self, config: Mapping) -> bool:
        """Whether a model built from `config` (a config.json dict) needs its LM head untied at load."""
        return self.ties_head_regardless and config.get("tie_word_embeddings") is False

    # The readers of a config's sizes. Code outside this package asks them, never the config by
    # attribute name: the names differ by family (T5's d_model is GPT-2's n_embd). `config` is a
    # transformers config or a config.json dict.

    def input_sizes(self, config) -> dict:
        """The sizes inputs are built from (`fxconvert.inputs.build_inputs`' keywords): `hidden`, the
        width of inputs_embeds (None when unknown); `vocab`, `type_vocab` and `classes`, the bounds of token
        ids, segment ids and class ids (2 when the config gives none; a config.json counts its id2label)."""
        labels = _read(config, "id2label", None)
        classes = _read(config, "num_labels", len(labels) if isinstance(labels, Mapping) and labels else 2)
        return {"hidden": _read(config, self.hidden_field, None), "vocab": _read(config, "vocab_size", 2),
                "type_vocab": _read(config, "type_vocab_size", 2) or 2, "classes": classes}

    def max_positions(self, config) -> tuple[str, int] | None:
        """(what a user reads the bound called, the longest sequence the position table holds) for `config`
        (object or config.json dict), or None for no bound: `max_length`, less `position_offset` + 1 where
        positions start after the padding index (RoBERTa's 514 positions hold 512 tokens)."""
        limit = _read(config, self.max_length, None) if self.max_length else None
        if not is_int(limit):
            return None
        offset = _read(config, self.position_offset, None) if self.position_offset else None
        if not is_int(offset) or offset < 0:
            return self.max_length, limit
        return f"{self.max_length} - {self.position_offset} - 1", limit - offset - 1

    def vocab(self, config) -> int | None:
        """The vocabulary size the config gives, or None."""
        return vocabulary(config)

    def default_input_names(self, cls_name: str) -> list[str]:
        for suffix, names in self.default_inputs:
            if cls_name.endswith(suffix):
                return list(names)
        raise KeyError(cls_name)

    def tiny_config(self, model_type: str | None = None, **overrides) -> dict:
        """config.json of a tiny random model of `model_type` (the family's first by default), for the tests and
        --self-check; `overrides` replace fields. Build it with transformers' `AutoConfig.for_model(**config)`."""
        model_type = model_type or next(iter(self.model_types))
        if model_type not in self.model_types:
            raise KeyError(f"{self.name} has no model_type {model_type!r}; choose {', '.join(self.model_types)}")
        architectures = [self.model_types[model_type][1]]
        return {"model_type": model_type, "architectures": architectures, **self.tiny, **overrides}

    def block_patterns(self) -> tuple[re.Pattern, ...]:
        return _compiled(self.blocks)

    def block_of(self, module_path: str) -> tuple[int, int, str] | None:
        """(stack, index, block path) of the block that `module_path` lies in, or None."""
        for stack, pattern in enumerate(self.block_patterns()):
            match = pattern.match(module_path)
            if match:
                return stack, int(match.group("index")), match.group("block")
        return None


def vocabulary(config) -> int | None:
    """The vocabulary size a config (object or config.json dict) of any family gives, or None: every
    transformers config names it alike, so this also serves a model of no family."""
    return _read(config, "vocab_size", None)


def _read(config, key: str, default):
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


@cache
def _compiled(patterns: tuple[str, ...]) -> tuple[re.Pattern, ...]:
    return tuple(re.compile(p) for p in patterns)


def is_int(value) -> bool:
    """An int that is not a bool (JSON true is a Python int)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_activation(config: dict, key: str, refuse, rule: str) -> None:
    """Refuse `config[key]` unless it names one of transformers' activations (`ACT2FN`)."""
    if key in config:
        from transformers.activations import ACT2FN

        if not (isinstance(config[key], str) and config[key] in ACT2FN):
            refuse(key, rule)


def block_regex(prefix: str) -> str:
    """A block pattern for module paths `<prefix>.<i>` (prefix a regex without groups)."""
    return rf"^(?P<block>{prefix}\.(?P<index>\d+))(?:\.|$)"


_MODULES = ("t5", "bert", "gpt2", "bart", "llama")


@cache
def all_families() -> tuple[Family, ...]:
    return tuple(importlib.import_module(f"fxconvert.families.{m}").FAMILY for m in _MODULES)


def supported_classes() -> tuple[str, ...]:
    return tuple(c for f in all_families() for c in f.classes)


def model_types() -> dict[str, Family]:
    return {t: f for f in all_families() for t in f.model_types}


# Records derived in this process (`fxconvert.families.derived`), by class name: a hand-written
# record wins over them. Empty in a process that converted nothing (a training rank).
_DERIVED: dict[str, Family] = {}


def register_derived(family: Family) -> None:
    """Make a derived record findable by its class name (and model type) for the rest of the process."""
    for cls_name in family.classes:
        _DERIVED[cls_name] = family


def family_of_class(cls_name: str) -> Family | None:
    return next((f for f in all_families() if cls_name in f.classes), None) or _DERIVED.get(cls_name)


def family_of_model_type(model_type) -> Family | None:
    return model_types().get(model_type) or next(
        (f for f in reversed(_DERIVED.values()) if model_type in f.model_types), None)


def sequence_lengths(model_class: str) -> Mapping[str, str]:
    """Sequence -> the name of its length, for `model_class` (an encoder-decoder's names for no family)."""
    family = family_of_class(model_class)
    return family.sequence_lengths if family is not None else ENCODER_DECODER_LENGTHS


def presets() -> dict[str, tuple[Family, dict]]:
    """The hand-written records' presets: name -> (record, config.json dict)."""
    return {name: (f, config) for f in all_families() for name, config in f.presets.items()}


def derived_presets() -> dict[str, dict]:
    """The presets of types with no hand-written record (`fxconvert.families.checkpoints`): name -> config.json
    dict. Their record is derived when one is built."""
    from fxconvert.families import checkpoints

    return dict(checkpoints.PRESETS)


def aliases() -> dict[str, str]:
    """Other name -> preset name, for every preset."""
    from fxconvert.families import checkpoints

    return {**{a: p for f in all_families() for a, p in f.aliases.items()}, **checkpoints.ALIASES}


def input_specs(cls_name: str) -> Mapping[str, tuple[str, str]]:
    family = family_of_class(cls_name)
    if family is None:
        raise KeyError(cls_name)
    return family.inputs


def describe_supported() -> str:
    """One phrase naming every family and class, for 'not supported' messages."""
    return "; ".join(f"{f.title}: {', '.join(f.classes)}" for f in all_families())
