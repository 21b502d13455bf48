"""Family records derived from what transformers declares about a model class.

Most transformers model types share one skeleton: the mask helpers of `masking_utils`,
the attention functions of `ALL_ATTENTION_FUNCTIONS`, and repeated blocks that each class
names in `_no_split_modules` (what accelerate's `device_map` cuts a model at). A record
per type would not scale; for a transformers class with no hand-written record (those
stay, and win, for what needs more: T5's untying, BART's LayerDrop refusal) this module
builds one from the class and its config:

- blocks: the `nn.ModuleList`s whose elements are all `_no_split_modules` classes, found
  on the model (or on a meta-device instance), each as an exact module-path pattern, in
  the order the model registers them (an encoder before its decoder);
- inputs: forward's parameters that are known input names, with their kinds and sequences;
- sizes: the names under which the text config (`config.get_text_config()`) and its
  `attribute_map` give the hidden size, the vocabulary, the position table and the layer counts,
  and the padding offset of positions numbered from pad_token_id + 1 (RoBERTa's, `_position_offset`);
- objective: from transformers' auto mappings (causal LM, seq2seq LM, masked LM, sequence
  classification; None for any other head, which converts but does not train); a
  sequence-classification head's labels are one class id per row (kind "class");
- tiny: a config of the type with its defaults shrunk (two layers, width 32, vocabulary 97),
  for the conformance tests and the census.

A class of a type that has a hand-written record, but that the record does not list
(`BartForCausalLM`, `BertLMHeadModel`, `*ForSequenceClassification`), gets a derived record
that carries over the hand-written one's config rules and checks (`check_config`,
`check_trace`, the size, rate and token-id fields, `tiny`): the type's constraints hold
whatever head sits on it.

A derived record is registered (`fxconvert.families.register_derived`) so that everything
that asks for a class's record later in the process (stages, the report, pipeline.json)
finds it by class name. It is made where transformers is already imported (loading,
tracing); this module imports transformers only inside its functions.
"""

import inspect
import re

from dataclasses import replace

from fxconvert.families import (ENCODER_DECODER_LENGTHS, ONE_SEQUENCE_LENGTHS, Family, block_regex, model_types,
                                register_derived)
from fxconvert import objectives
from fxconvert.objectives import CAUSAL_LM, MASKED_LM, SEQ2SEQ

# Input name -> kind (`fxconvert.families.KINDS`); the sequence is the decoder's for `decoder_*`
# names and, in an encoder-decoder model, for labels.
KNOWN_INPUTS = {
    "input_ids": "ids",
    "attention_mask": "mask",
    "token_type_ids": "type_ids",
    "decoder_input_ids": "ids",
    "decoder_attention_mask": "mask",
    "labels": "ids",
    "inputs_embeds": "embeds",
    "decoder_inputs_embeds": "embeds",
}
# What a derived record feeds by default, of what forward takes. token_type_ids is accepted
# but not fed: several types declare one segment (RoBERTa's type_vocab_size is 1).
DEFAULT_INPUTS = ("input_ids", "attention_mask", "decoder_input_ids", "labels")
# transformers' auto mapping -> the objective of its classes, first match wins.
OBJECTIVES = (
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", CAUSAL_LM),
    ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", SEQ2SEQ),
    ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", MASKED_LM),
)
# The hand-written record's fields a derived record of another class of its type carries over: what
# the type's config must satisfy and what its graph cannot record, whatever head sits on it.
CARRIED = ("config_fields", "check_config", "max_layers_fields", "layers_field_hints", "positive_int_fields",
           "rate_fields", "token_id_fields", "max_length", "hidden_field", "check_trace", "tiny",
           "ties_head_regardless")
# The auto mapping whose classes take one class id per row as labels (kind "class").
CLASSIFICATION = "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"
# Config fields that count a stack's layers (capped at load like a hand-written record's).
LAYER_FIELDS = ("num_hidden_layers", "encoder_layers", "decoder_layers", "num_decoder_layers", "num_layers")
# A tiny model of any type: each field the type's config has (by name or through its
# attribute_map) is set to this value when the config is built.
SHRINK = dict(
    hidden_size=32, intermediate_size=64, ffn_dim=64, encoder_ffn_dim=64, decoder_ffn_dim=64, d_ff=64, n_inner=64,
    num_hidden_layers=2, encoder_layers=2, decoder_layers=2, num_decoder_layers=2,
    num_attention_heads=4, encoder_attention_heads=4, decoder_attention_heads=4, num_key_value_heads=2,
    head_dim=8, d_kv=8, rotary_dim=8, embedding_size=32, vocab_size=97, decoder_vocab_size=97, max_position_embeddings=128,
    num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
    shared_expert_intermediate_size=32, use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    decoder_start_token_id=0, sep_token_id=2, cls_token_id=1,
)

# Fields a config computes from the layer count: left to the part's constructor when a part is shrunk.
COMPUTED = ("layer_types",)


def objective_of(cls_name: str):
    """The training objective of a transformers class, from the auto mappings (None for other heads). A
    sequence classifier's is classification (not in `OBJECTIVES`, which also choose a config's default class)."""
    trained = (*OBJECTIVES, (CLASSIFICATION, objectives.CLASSIFICATION))
    return next((objective for mapping, objective in trained if _in_mapping(cls_name, mapping)), None)


def _in_mapping(cls_name: str, mapping: str) -> bool:
    """Whether transformers' auto mapping `mapping` (a name in `modeling_auto`) lists `cls_name`."""
    from transformers.models.auto import modeling_auto

    return any(cls_name in (names if isinstance(names, tuple) else (names,))
               for names in getattr(modeling_auto, mapping, {}).values())


def default_class(model_type: str) -> str | None:
    """The class a config.json of `model_type` without `architectures` builds: its LM head, else its base model."""
    from transformers.models.auto import modeling_auto

    for mapping, _ in (*OBJECTIVES, ("MODEL_MAPPING_NAMES", None)):
        name = getattr(modeling_auto, mapping, {}).get(model_type)
        if name:
            return name if isinstance(name, str) else name[0]
    return None


def model_class(name: str):
    """The transformers model class called `name`, or None when transformers has no such model class."""
    import transformers

    try:
        cls = getattr(transformers, name, None)
    except Exception:  # a lazy import whose optional dependency is missing
        return None
    ok = isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)
    return cls if ok and cls.__module__.startswith("transformers.") else None


def derivable(cls) -> bool:
    """Whether a record can be derived for `cls`: a transformers model class that takes token ids."""
    return model_class(cls.__name__) is cls and "input_ids" in _forward_parameters(cls)


def tiny_config(model_type: str, **overrides):
    """A transformers config of `model_type` with its defaults shrunk (`SHRINK`), `overrides` on top.

    The values go through the config's constructor, so fields computed from them
    (Gemma 3's per-layer `layer_types`) follow."""
    from transformers import AutoConfig

    fields = tiny_fields(model_type)
    try:
        return AutoConfig.for_model(model_type, **fields, **overrides)
    except Exception:  # a field derived from the defaults disagrees (GPT-Neo's attention_types count 24 layers)
        config = AutoConfig.for_model(model_type, **overrides)
        for key, value in fields.items():
            if key not in overrides and not isinstance(value, dict):
                setattr(config, key, value)
        return config


def tiny_fields(model_type: str) -> dict:
    """The fields `tiny_config` sets: those of `SHRINK` that the type's config has."""
    from transformers import AutoConfig

    return _shrunk(AutoConfig.for_model(model_type))


def _shrunk(config) -> dict:
    """The `SHRINK` fields `config` has; a composite config's parts (T5Gemma's encoder and decoder) shrunk too."""
    names = set(vars(config)) | set(getattr(config, "attribute_map", {}) or {})
    fields = {k: v for k, v in SHRINK.items() if k in names}
    for name in getattr(config, "sub_configs", None) or {}:
        part = getattr(config, name, None)
        if hasattr(part, "to_dict"):
            kept = {k: v for k, v in part.to_dict().items() if k not in COMPUTED}
            fields[name] = {**kept, **_shrunk(part)}
    return fields


def derive(cls, config, model=None, *, blocks: bool = True) -> Family:
    """The record of transformers class `cls` from its declarations, registered under its name.

    `model` (an instance, e.g. the one being converted) gives the blocks; without one they
    are found on an instance built from `config` on the meta device, and with
    `blocks=False` none are looked for, not even on `model` (a record made from a config.json before its sizes
    are checked, which the trace derives again from the model).
    """
    import torch

    text = config.get_text_config()
    params = _forward_parameters(cls)
    # The class, not the config, says whether there is a decoder sequence: BartForCausalLM's config is
    # an encoder-decoder's, its forward a decoder-only model's.
    encoder_decoder = "decoder_input_ids" in params
    classifies = _in_mapping(cls.__name__, CLASSIFICATION)
    inputs = {n: ("class" if n == "labels" and classifies else KNOWN_INPUTS[n], _sequence(n, encoder_decoder))
              for n in params if n in KNOWN_INPUTS}
    names = tuple(n for n in DEFAULT_INPUTS if n in inputs)
    if model is None and blocks:
        with torch.device("meta"):
            model = cls._from_config(config)
    paths = _block_paths(model) if model is not None and blocks else []
    aliases = getattr(type(text), "attribute_map", {}) or {}
    field_of = lambda name: aliases.get(name, name)  # noqa: E731 -- the name a field is stored under
    has = lambda name: hasattr(text, name)  # noqa: E731
    model_type = getattr(config, "model_type", "") or cls.__name__
    family = Family(
        name=model_type,
        title=f"{model_type} (derived)",
        model_types={model_type: (type(config).__name__, cls.__name__)},
        classes=(cls.__name__,),
        inputs=inputs,
        default_inputs=(("", names),),
        train_inputs=names,
        hidden_field=field_of("hidden_size"),
        blocks=tuple(block_regex(re.escape(path)) for path in paths),
        max_layers_fields=tuple(dict.fromkeys(field_of(f) for f in LAYER_FIELDS if has(f))),
        positive_int_fields=tuple(field_of(f) for f in ("vocab_size", "hidden_size") if has(f)),
        max_length=field_of("max_position_embeddings") if has("max_position_embeddings") else "",
        position_offset=_position_offset(model, text, field_of) if model is not None else "",
        objective=objective_of(cls.__name__),
        sequence_lengths=ENCODER_DECODER_LENGTHS if encoder_decoder else ONE_SEQUENCE_LENGTHS,
        tiny=_tiny_or_none(model_type),
        notes="blocks from _no_split_modules, inputs from forward, sizes from the config",
        derived_from=cls.__name__,
    )
    written = model_types().get(model_type)  # a hand-written record of the type, which lists other classes
    if written is not None:
        family = replace(family, title=f"{written.title} (derived for {cls.__name__})",
                         **{name: getattr(written, name) for name in CARRIED})
    family = replace(family, check_trace=_checks(family.check_trace, check_training_draws))
    if classifies and _pools_last_token(cls):
        family = replace(family, check_trace=_checks(family.check_trace, check_pad_token))
    register_derived(family)
    return family


# Config fields of random draws a forward makes only `if self.training`, a Python branch: LayerDrop skips
# layers by `torch.rand` drawn at trace time, a router's jitter scales its input by noise. A graph records
# one mode's branch for both (a graph traced in eval mode trains too, `LiftTrainingFlagPass`), so they are
# refused in either mode, as BART's hand-written record refuses LayerDrop.
TRAINING_DRAWS = {"layerdrop": "LayerDrop skips layers by a random draw", "encoder_layerdrop": "LayerDrop skips "
                  "layers by a random draw", "decoder_layerdrop": "LayerDrop skips layers by a random draw",
                  "router_jitter_noise": "the router scales its input by random noise",
                  "input_jitter_noise": "the router scales its input by random noise"}


def check_training_draws(config, training: bool, dtype: str) -> str | None:
    """A derived record's `Family.check_trace`: a nonzero rate of a draw made only in training (`TRAINING_DRAWS`)."""
    for part in (config, *(getattr(config, name, None) for name in getattr(config, "sub_configs", None) or {})):
        for key, what in TRAINING_DRAWS.items():
            rate = getattr(part, key, None)
            if isinstance(rate, (int, float)) and not isinstance(rate, bool) and rate > 0:
                return (f"{key} is {rate!r}: in training {what} behind `if self.training`, which one graph cannot "
                        f"record for both modes; set {key}=0 in the config")
    return None


def check_pad_token(config, training: bool, dtype: str) -> str | None:
    """A decoder-only classifier's `Family.check_trace`: without pad_token_id its forward decides on the batch size."""
    if getattr(config.get_text_config(), "pad_token_id", None) is None:
        return ("it classifies each row by its last token that is not pad_token_id, which the config does not set "
                "(eager then accepts only a batch of one); set pad_token_id in the config")
    return None


def _pools_last_token(cls) -> bool:
    """Whether a classifier's forward pools each row's last non-pad token (the decoder-only ones) rather
    than a first token (BERT's [CLS]), as its source says."""
    try:
        return "pad_token_id" in inspect.getsource(inspect.unwrap(cls.forward))
    except (OSError, TypeError):  # no source to read: assume it may, and let the check ask for pad_token_id
        return True


def _checks(*checks):
    """One `Family.check_trace` that runs `checks` (None ones skipped) in order, the first reason winning."""
    def check(config, training: bool, dtype: str) -> str | None:
        return next((why for c in checks if c is not None and (why := c(config, training, dtype))), None)
    return check


def derive_for_config(config: dict) -> Family | None:
    """The record for a config.json dict of a type with no hand-written record, or None when
    transformers knows no such type or class. The record has no blocks (nothing of the config's sizes is
    built before they are checked; a tiny model of the type on the meta device says where its positions start,
    for the check's bound); the trace derives it again from the model."""
    from transformers import AutoConfig

    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    name = architectures[0] if architectures and isinstance(architectures[0], str) else (
        default_class(model_type) if isinstance(model_type, str) else None)
    cls = model_class(name) if isinstance(name, str) else None
    if cls is None or not derivable(cls):
        return None
    import torch

    try:
        config_obj = AutoConfig.for_model(model_type)
    except Exception:  # an unknown model_type
        return None
    try:  # the type's modules, tiny and on the meta device: where its positions start (`_position_offset`)
        tiny = tiny_config(model_type)
        with torch.device("meta"):
            model = cls._from_config(tiny)
        config_obj = tiny
    except Exception:  # a type whose defaults do not shrink: the check goes on without the offset, and
        model = None   # the trace derives the record again from the model
    return derive(cls, config_obj, model, blocks=False)


def _position_offset(model, text, field_of) -> str:
    """The config field (pad_token_id) after which the model's learned positions start, or "" when they start at 0.

    RoBERTa-style embeddings (RoBERTa, XLM-RoBERTa, CamemBERT, ...: a module with fairseq's
    `create_position_ids_from_input_ids`, a method or the modeling module's function, as ESM's and
    Longformer's) number a row's tokens from `padding_idx` + 1, so a table of
    max_position_embeddings rows holds max_position_embeddings - pad_token_id - 1 tokens. Found on the built
    module, whose table and padding index must be the config's fields for a rank to compute the bound again."""
    import torch

    table, pad = getattr(text, "max_position_embeddings", None), getattr(text, "pad_token_id", None)
    for module in model.modules():
        positions = getattr(module, "position_embeddings", None)
        if (_numbers_from_padding(type(module)) and isinstance(positions, torch.nn.Embedding)
                and positions.num_embeddings == table
                and pad is not None and getattr(module, "padding_idx", None) == pad):
            return field_of("pad_token_id")
    return ""


def _numbers_from_padding(cls) -> bool:
    """Whether an embeddings class numbers positions from its padding index (fairseq's
    `create_position_ids_from_input_ids`), as its forward's source says."""
    if callable(getattr(cls, "create_position_ids_from_input_ids", None)):
        return True
    try:
        return "create_position_ids_from_input_ids(" in inspect.getsource(inspect.unwrap(cls.forward))
    except (OSError, TypeError):  # no source to read
        return False


def _tiny_or_none(model_type: str) -> dict:
    try:
        return tiny_fields(model_type)
    except Exception:  # a type transformers cannot build by name
        return {}


def _sequence(name: str, encoder_decoder: bool) -> str:
    if name.startswith("decoder_") or (name == "labels" and encoder_decoder):
        return "decoder"
    return "encoder"


def _forward_parameters(cls):
    return inspect.signature(inspect.unwrap(cls.forward)).parameters


def _block_paths(model) -> list[str]:
    """The paths of the ModuleLists whose every element is one of the model's `_no_split_modules` classes.

    A class that declares none (DistilBERT, Marian) gets the outermost ModuleLists whose elements
    are all of one class: its repeated layers, as a model without the declaration still builds them.
    """
    import torch

    declared = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():  # a composite model's parts declare their own
        declared |= set(getattr(module, "_no_split_modules", None) or ())
    lists = [(path, m) for path, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if declared:
        return [path for path, m in lists if all(type(child).__name__ in declared for child in m)]
    uniform = [path for path, m in lists if len({type(child) for child in m}) == 1]
    return [path for path in uniform if not any(path.startswith(f"{outer}.") for outer in uniform)]
