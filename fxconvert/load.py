"""Turn a name into a model of a supported family: a checkpoint directory, a Hub id, a config file or a preset.

`load(name)` tries, in order:

1. a local directory with `config.json` (and its weights, if it has any);
2. a Hub id whose files are in the local Hugging Face cache;
3. a Hub id downloaded from the Hub, when it is reachable (probed with a 2 s connect,
   not transformers' retry loop) and neither `offline=True` nor `HF_HUB_OFFLINE` is set;
4. a built-in preset (`PRESETS`, from the family records in `fxconvert.families` and, for
   types with no hand-written record, `fxconvert.families.checkpoints`): a published
   architecture, with random weights.

A path to a `.json` file is read as a config (an architecture without weights). Without
weights a model gets random weights, but only when the caller opts in with
`allow_random=True`: a name that silently became random weights (a Hub id with the Hub
unreachable, a directory without its weights file) would convert into a model that
computes nothing useful. Without the opt-in such a load raises `ModelResolutionError`
naming it; with it, the fallback is said in `ModelSource.notes` and warned through
`warnings.warn` (`RandomWeightsWarning`) and the `fxconvert` logger. `meta=True` asks
for the architecture alone and needs no opt-in. Random weights are drawn fast: each
Linear uniform with std `in_features**-0.5`, each embedding std 1, norms 1. The model is
built on the meta device, moved with `to_empty` and filled in place: about 0.3 s for
t5-small, where transformers' own initialisation takes about 4 s. This is not
transformers' initialisation; it only has to be numerically sane for validation.

Models built from a config that would not fit in memory (over `META_THRESHOLD`
parameters), or any model with `meta=True`, are built on the meta device: they trace and
convert, but carry no weights.

A config's structural fields (sizes, layer counts, rates, token ids) are checked before
anything is built (`check_config`): a zero head count or a negative layer count is one
line naming the field, its value and the fix, not an arithmetic error deep inside
transformers or a silently empty encoder.

transformers is imported only when a model is built, so `import fxconvert.load` is cheap.
"""

import contextlib
import json
import logging
import math
import os
import re
import socket
import sys
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fxconvert.errors import ModelResolutionError, RandomWeightsRefused, UsageError, first_line
from fxconvert import families
from fxconvert.trace import SUPPORTED_ATTENTION, require_transformers

# Preset name -> config.json dict, and other names of presets, from the family records and the
# presets of types whose record is derived.
PRESETS = {**{name: config for name, (_, config) in families.presets().items()}, **families.derived_presets()}
ALIASES = families.aliases()

# Random-weight models above this many parameters are built on the meta device.
META_THRESHOLD = 2_000_000_000
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
HUB_PROBE_TIMEOUT = 2.0
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

logger = logging.getLogger(__name__)
logging.getLogger("fxconvert").addHandler(logging.NullHandler())  # a library leaves output to the application


class RandomWeightsWarning(UserWarning):
    """A model was built with random weights because its name resolved to no weights (`allow_random=True`)."""


@dataclass
class ModelSource:
    """Where a model came from, as plain data for the report."""

    name: str  # what was asked for
    origin: str  # "local directory", "Hugging Face cache", "Hugging Face Hub", "config file", "preset"
    location: str  # a path or a Hub id
    weights: str  # "checkpoint", "random" or "none (meta device)"
    device: str  # "cpu" or "meta"
    notes: list[str] = field(default_factory=list)  # what a user must not miss (random weights, meta)

    @property
    def random_weights(self) -> bool:
        return self.weights == "random"



@dataclass
class LoadedModel:
    model: torch.nn.Module
    source: ModelSource


def load(name: str | os.PathLike, *, offline: bool = False, meta: bool = False, attn: str = "sdpa",
         seed: int = 0, dtype: "str | torch.dtype | None" = None, allow_random: bool = False) -> LoadedModel:
    """Resolve `name` to a model of a supported family in eval mode (see the module docstring for the order).

    `dtype` ("float32", "bfloat16", "float16" or the torch dtype) loads the model in that
    dtype as transformers does: a checkpoint through `from_pretrained(dtype=...)`, a build
    from a config cast after construction; either way fp16 keeps the modules the class lists
    in `_keep_in_fp32_modules` (T5's `wo`) in fp32. By default a checkpoint keeps its own
    dtype and a config its `dtype` entry.

    A name that resolves to no weights (a config file, a directory without its weights, a
    Hub id neither cached nor downloadable) raises `ModelResolutionError` unless
    `allow_random=True` (random weights, warned) or `meta=True` (no weights at all).
    """
    if attn not in SUPPORTED_ATTENTION:
        raise UsageError(f"unknown attention '{attn}'; choose {' or '.join(SUPPORTED_ATTENTION)}")
    dtype = resolve_dtype(dtype)
    require_transformers()
    name = os.fspath(name)
    path = Path(name).expanduser()
    build = _Build(meta=meta, attn=attn, seed=seed, dtype=dtype, allow_random=allow_random)
    if path.is_file() and path.suffix == ".json":
        config = read_config(path)
        source = ModelSource(name, "config file", str(path), "random", "cpu")
        return _from_config(config, source, build, why=f"{name} is a config file, an architecture without weights")
    if path.is_dir():
        return _from_directory(name, path, build)
    if path.exists():
        raise ModelResolutionError(f"'{name}' is a file, not a checkpoint directory; for an architecture use "
                                   f"--config FILE.json")
    return _from_hub_or_preset(name, build, offline=offline or offline_env())


def resolve_dtype(dtype) -> "torch.dtype | None":
    """The torch dtype for a `dtype` option (None stays None), or a UsageError listing the choices."""
    if dtype is None or dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise UsageError(f"unknown dtype {dtype!r}; choose {', '.join(DTYPES)}")


def short_name(name: str | os.PathLike) -> str:
    """A directory name for a model's outputs: the last component of its name, without `.json`."""
    last = Path(os.fspath(name).rstrip("/\\")).name
    return last.removesuffix(".json") or "model"


def offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def read_config(path: Path) -> dict:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ModelResolutionError(f"cannot read {path}: {e.strerror or e}") from e
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelResolutionError(f"malformed {path}: {e.msg} at line {e.lineno} column {e.colno}") from e
    if not isinstance(config, dict):
        raise ModelResolutionError(f"malformed {path}: expected a JSON object, got {type(config).__name__}")
    return config


def model_class_name(config: dict, where: str) -> str:
    """The transformers class to build for a config dict, or a ModelResolutionError saying what is supported."""
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    family = families.family_of_model_type(model_type) if isinstance(model_type, str) else None
    if family is None or family.derived_from:  # a derived record is made anew for each config's class
        family = _derived_record(config)
    if family is None:
        what = f"model_type {model_type!r}" if model_type else "a config without model_type"
        if architectures:
            what += f" ({', '.join(map(str, architectures))})"
        raise ModelResolutionError(
            f"{where} describes {what}, which is not supported; fxconvert converts "
            f"{families.describe_supported()}, and any other transformers model that takes input_ids"
        )
    if not architectures:
        return family.model_types[model_type][1]
    cls_name = architectures[0]
    if cls_name not in family.classes and not family.derived_from:  # another class of a hand-written type
        family = _derived_record(config) or family
    if cls_name not in family.classes:
        raise ModelResolutionError(
            f"{where} describes {cls_name}, which is not supported; fxconvert converts {', '.join(family.classes)}"
        )
    return cls_name


def _derived_record(config: dict):
    """The record derived for a config of a type with no hand-written record (`fxconvert.families.derived`)."""
    from fxconvert.families import derived  # imports transformers, as every config that reaches here is built

    return derived.derive_for_config(config)


def preset_config(name: str) -> dict:
    return dict(PRESETS[ALIASES.get(name, name)])


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT) -> bool:
    """Whether the Hub endpoint accepts a TCP connection within `timeout` seconds (DNS included)."""
    from urllib.parse import urlsplit

    endpoint = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    result = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)  # getaddrinfo ignores socket timeouts
    thread.start()
    thread.join(timeout)
    return bool(result)


def quiet_transformers() -> None:
    """Silence transformers' info logging and progress bars (the CLI shows its own)."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


# -- the config check ------------------------------------------------------------------------

# Layers are built one by one, even on the meta device: a hostile count would build for hours.
# The largest published stacks of the supported families have fewer than 100 layers.
MAX_LAYERS = 1024
MAX_SIZE = families.MAX_SIZE
# The shortest learned position table (`Family.max_length`) accepted: the trace's example inputs,
# validation and the pipeline's stage probes run sequences of up to 13 tokens.
MIN_POSITIONS = 16


def check_config(config: dict, where: str) -> None:
    """Refuse a config whose structural fields cannot build a working model, in one line naming the field.

    Only fields present in the config are checked; absent ones take transformers' defaults.
    Which fields are sizes, layer counts, rates and token ids is the family record's to say
    (`Family.positive_int_fields` ...); `Family.check_config` adds the family's own rules.
    """
    cls_name = model_class_name(config, where)
    family = families.family_of_class(cls_name)
    config, written_as = _resolve_aliases(config, family, where)

    def refuse(key, rule, tail=" in the config"):
        raise ModelResolutionError(f"invalid config in {where}: {written_as.get(key, key)} is {_value(config[key])}; "
                                   f"set it to {rule}{tail}")

    def is_int(value):
        return isinstance(value, int) and not isinstance(value, bool)

    def is_number(value):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    for key in family.positive_int_fields:
        if key in config and not (is_int(config[key]) and config[key] > 0):
            refuse(key, "a positive integer")
        if key in config and key not in family.max_layers_fields and config[key] > MAX_SIZE:
            refuse(key, f"a positive integer up to {MAX_SIZE}")
    limit = config.get(family.max_length) if family.max_length else None
    bound, held = family.max_positions(config) if is_int(limit) and limit > 0 else (None, MIN_POSITIONS)
    if held < MIN_POSITIONS and bound == family.max_length:
        refuse(family.max_length, f"at least {MIN_POSITIONS}: fxconvert traces, validates and probes the stages "
                                  f"with sequences of up to 13 tokens, which a shorter position table cannot hold")
    if held < MIN_POSITIONS:  # positions start after position_offset (RoBERTa's pad_token_id)
        offset = limit - held - 1
        refuse(family.max_length, f"at least {MIN_POSITIONS + offset + 1} in the config, or lower "
                                  f"{family.position_offset} ({offset}): the table holds {bound} = {held} positions, "
                                  f"and fxconvert traces, validates and probes the stages with sequences of up to 13 "
                                  f"tokens", tail="")
    for key in family.max_layers_fields:
        value = config.get(key)
        if value is None or (key.startswith("num_decoder") and cls_name.endswith("EncoderModel")):
            continue  # None means "as many as the encoder"; an encoder-only model builds no decoder
        if key in family.positive_int_fields:  # checked positive above
            if value > MAX_LAYERS:
                refuse(key, f"at most {MAX_LAYERS}")
        elif not (is_int(value) and 0 < value <= MAX_LAYERS):
            refuse(key, f"a positive integer up to {MAX_LAYERS}" + family.layers_field_hints.get(key, ""))
    for key in family.rate_fields:
        if config.get(key) is not None and not (is_number(config[key]) and 0 <= config[key] < 1):
            refuse(key, "a number in [0, 1)")
    for key in ("layer_norm_epsilon", "layer_norm_eps", "rms_norm_eps"):
        if key in config and not (is_number(config[key]) and config[key] > 0):
            refuse(key, "a small positive number such as 1e-6")
    vocab = family.vocab(config)
    for key in family.token_id_fields:
        value = config.get(key)
        if value is not None and not (is_int(value) and 0 <= value and (not is_int(vocab) or value < vocab)):
            refuse(key, f"a token id in [0, {vocab})" if is_int(vocab) else "a token id (a non-negative integer)")
    if family.check_config is not None:
        family.check_config(config, refuse)


def check_model_config(model) -> None:
    """`check_config` for a model built in Python (`convert(model)`), as a config.json is checked at load.

    A model of no supported family is left to the trace, which says what is supported.
    """
    config = getattr(model, "config", None)
    family = families.family_of_model_type(getattr(config, "model_type", None))
    if family is None or not hasattr(config, "to_dict"):
        return
    cls_name = type(model).__name__
    fields = {**config.to_dict(), "architectures": [cls_name] if cls_name in family.classes else None}
    check_config(fields, f"the {cls_name}'s config")


def _resolve_aliases(config: dict, family, where: str) -> tuple[dict, dict]:
    """The config as transformers reads it, and the name each field was written under.

    A config class's `attribute_map` makes other names set its fields (GPT-2's
    `num_hidden_layers` is `n_layer`, BART's `hidden_size` is `d_model`), and the other name
    wins: the checks must see its value, or a hostile alias would bypass them.
    """
    import transformers

    config_cls = getattr(transformers, family.model_types[config["model_type"]][0], None)
    resolved, written_as = dict(config), {}
    for alias, field_name in (getattr(config_cls, "attribute_map", None) or {}).items():
        if alias not in config:
            continue
        if field_name in config and config[field_name] != config[alias]:
            raise ModelResolutionError(
                f"invalid config in {where}: {alias} is {_value(config[alias])} but {field_name} is "
                f"{_value(config[field_name])}, and transformers reads {alias} as {field_name}; remove {alias} or "
                f"give both the same value in the config")
        resolved[field_name] = config[alias]
        written_as[field_name] = alias
    return resolved, written_as


def _value(value) -> str:
    """A config value for a message: repr (quotes strings, escapes control characters), kept short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- the four sources -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Build:
    """How to build a model, as asked by the caller of `load`."""

    meta: bool
    attn: str
    seed: int
    dtype: "torch.dtype | None"
    allow_random: bool


def _from_directory(name, path: Path, build: _Build) -> LoadedModel:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelResolutionError(f"directory '{name}' has no config.json; give a checkpoint directory "
                                   f"(as written by save_pretrained) or --config FILE.json")
    config = read_config(config_file)
    has_weights = any((path / f).is_file() for f in WEIGHT_FILES)
    source = ModelSource(name, "local directory", str(path), "checkpoint" if has_weights else "random", "cpu")
    why = f"{path} has no weights ({' or '.join(WEIGHT_FILES[::2])})"
    if not has_weights and not build.meta:
        source.notes.append(why)
    if not has_weights or build.meta:
        return _from_config(config, source, build, why=why)
    return _from_checkpoint(str(path), config, source, build, local_files_only=True)


def _from_hub_or_preset(name, build: _Build, *, offline) -> LoadedModel:
    cached = _cached_config(name)
    if cached is not None:
        config = read_config(cached)
        source = ModelSource(name, "Hugging Face cache", name, "checkpoint", "cpu")
        if build.meta:
            return _from_config(config, source, build, why="")
        try:
            return _from_checkpoint(name, config, source, build, local_files_only=True)
        except _WeightsUnavailable:
            loaded = _download(name, build) if not offline and hub_reachable() else None
            if loaded is not None:
                return loaded
            why = f"the weights of '{name}' are not in the Hugging Face cache"
            source.notes.append(why)
            return _from_config(config, source, build, why=why)
    if offline:
        why = "not in the Hugging Face cache (offline)"
    elif not hub_reachable():
        why = "not in the Hugging Face cache, the Hub is unreachable"
    else:
        loaded = _download(name, build)
        if loaded is not None:
            return loaded
        why = "not in the Hugging Face cache nor on the Hub"
    key = ALIASES.get(name, name)
    if key in PRESETS:
        source = ModelSource(name, "preset", key, "random", "cpu")
        source.notes.append(f"'{name}' is {why}: using the built-in {key} architecture")
        return _from_config(preset_config(key), source, build, why=f"'{name}' is {why}")
    raise ModelResolutionError(
        f"unknown model '{name}': not a local directory, {why}, and not a built-in preset "
        f"(presets: {', '.join(PRESETS)}; use --config FILE.json for another architecture)"
    )


def _cached_config(name) -> Path | None:
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = try_to_load_from_cache(name, "config.json")
    except HFValidationError:
        return None  # not a Hub id at all
    return Path(cached) if isinstance(cached, str) else None


def _download(name, build: _Build) -> LoadedModel | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, RepositoryNotFoundError

    try:
        config_file = hf_hub_download(name, "config.json")
    except (RepositoryNotFoundError, EntryNotFoundError, HFValidationError):
        return None
    except Exception as e:  # network errors, gated repos: say what happened
        raise ModelResolutionError(f"cannot download '{name}' from the Hub: {first_line(e)}") from e
    config = read_config(Path(config_file))
    source = ModelSource(name, "Hugging Face Hub", name, "checkpoint", "cpu")
    if build.meta:
        return _from_config(config, source, build, why="")
    return _from_checkpoint(name, config, source, build, local_files_only=False)


def _attention(cls, build: _Build, source: ModelSource) -> str:
    """The attention to build `cls` with: the one asked, but eager for SDPA where the class has none (GPT-Neo,
    BLOOM), as transformers itself builds such a class when asked for no attention; said in the notes."""
    if build.attn == "sdpa" and getattr(cls, "_supports_sdpa", True) is False:
        source.notes.append(f"{cls.__name__} has no SDPA attention: built with eager attention")
        return "eager"
    return build.attn


class _WeightsUnavailable(Exception):
    pass


def _from_checkpoint(location, config: dict, source: ModelSource, build: _Build, *, local_files_only) -> LoadedModel:
    import transformers

    cls = getattr(transformers, model_class_name(config, source.location))
    config_obj = _config_object(config, source.location)
    try:
        with _held_warnings():
            model, info = cls.from_pretrained(location, config=config_obj, attn_implementation=_attention(cls, build,
                                                                                                          source),
                                              output_loading_info=True, ignore_mismatched_sizes=True,
                                              local_files_only=local_files_only,
                                              **({} if build.dtype is None else {"dtype": build.dtype}))
    except OSError as e:
        if local_files_only and source.origin == "Hugging Face cache":
            raise _WeightsUnavailable() from e
        raise ModelResolutionError(f"cannot load the weights of {source.location}: {_summary(e)}") from e
    except Exception as e:
        raise ModelResolutionError(f"cannot load the weights of {source.location}: {_summary(e)}") from e
    _check_loading_info(info, source.location)
    return LoadedModel(model.eval(), source)


def _check_loading_info(info, where) -> None:
    problems = []
    for key, shape_file, shape_model in sorted(info.get("mismatched_keys") or ()):
        problems.append(f"{key} is {tuple(shape_file)} in the weights but {tuple(shape_model)} by the config")
    missing, unexpected = sorted(info.get("missing_keys") or ()), sorted(info.get("unexpected_keys") or ())
    if missing:
        problems.append(f"the weights lack {missing[0]}{_more(len(missing) - 1, 'key')}")
    if unexpected:
        problems.append(f"the weights have {unexpected[0]}, which the model does not"
                        f"{_more(len(unexpected) - 1, 'key')}")
    if problems:
        raise ModelResolutionError(f"the weights in {where} do not match its config.json: "
                                   f"{problems[0]}{_more(len(problems) - 1, 'problem')}")


def _more(n: int, noun: str) -> str:
    return f" (and {n} more {noun}{'s' if n > 1 else ''})" if n > 0 else ""


def _config_object(config: dict, where: str):
    import transformers

    check_config(config, where)
    config_cls = getattr(transformers, families.family_of_model_type(config["model_type"]).model_types[
        config["model_type"]][0])
    try:
        with _held_warnings():
            return config_cls.from_dict(dict(config))
    except Exception as e:
        raise ModelResolutionError(f"invalid config in {where}: {_summary(e)}; correct that field in the "
                                   f"config") from e


def _from_config(config: dict, source: ModelSource, build: _Build, *, why: str) -> LoadedModel:
    """Build from a config: on the meta device when asked or too large, else with fast random weights.

    `why` says why there are no weights; random weights need `allow_random`, checked
    before anything is built.
    """
    import transformers

    cls = getattr(transformers, model_class_name(config, source.location))
    config_obj = _config_object(config, source.location)
    meta = build.meta
    kwargs = {"attn_implementation": _attention(cls, build, source),
              **({} if build.dtype is None else {"dtype": build.dtype})}
    if not meta and not build.allow_random:
        raise RandomWeightsRefused(why, f"{why}: pass allow_random=True to build it with random weights, or "
                                        f"meta=True for the architecture alone")
    try:
        with _held_warnings(), torch.device("meta"):
            model = cls._from_config(config_obj, **kwargs)
        _keep_in_fp32(model)
    except Exception as e:
        raise ModelResolutionError(f"cannot build {cls.__name__} from {source.location}: {_summary(e)}") from e
    # buffers count too: BERT's position_ids and token_type_ids span max_position_embeddings in int64
    n_params = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    if not meta and n_params > META_THRESHOLD:
        meta = True
        source.notes.append(f"{n_params / 1e9:.1f}B parameters and buffer values are too many to build in memory: "
                            f"built on the meta device (pass a checkpoint directory to convert real weights)")
    if meta:
        _untie_head(model, config)
        source.device, source.weights = "meta", "none (meta device)"
        source.notes.append("built on the meta device: no weights are written and validation is skipped")
        if not build.meta:
            _warn_no_weights(source)
        return LoadedModel(model.eval(), source)
    if not _fast_init(model, config, build.seed):  # buffers hold values a random init cannot invent
        torch.manual_seed(build.seed)
        with _held_warnings():
            model = cls._from_config(config_obj, **kwargs)
        _keep_in_fp32(model)
        _untie_head(model, config, init=True)
    source.weights = "random"
    source.notes.append("RANDOM WEIGHTS: the converted model computes nothing useful until real weights "
                        "are loaded")
    _warn_no_weights(source)
    return LoadedModel(model.eval(), source)


def _fast_init(model: torch.nn.Module, config: dict, seed: int) -> bool:
    """Give a meta-built model fast random weights on the CPU; False when it cannot (the caller then
    builds the model anew with transformers' initialisation).

    Buffers are computed values (rotary inverse frequencies), not weights: a module that holds
    float buffers and no parameters of its own gets them from the model's own `_init_weights`,
    which recomputes them; if that leaves any unset (NaN-filled first), or a module holds
    buffers next to parameters, the caller builds the model with transformers' initialisation.
    """
    owners = [m for m in model.modules() if any(b is not None for b in m._buffers.values())]
    if any(any(p is not None for p in m._parameters.values()) or
           any(b is not None and not b.is_floating_point() for b in m._buffers.values()) for m in owners):
        return False
    if owners and not hasattr(model, "_init_weights"):
        return False
    model.to_empty(device="cpu")
    with torch.no_grad():
        for m in owners:
            for b in m._buffers.values():
                if b is not None:
                    b.fill_(float("nan"))
            model._init_weights(m)
    if any(b is not None and b.isnan().any() for m in owners for b in m._buffers.values()):
        return False
    model.tie_weights()
    _untie_head(model, config)
    _random_init(model, seed)
    return True


def _warn_no_weights(source: ModelSource) -> None:
    """Say, through both channels a library has, that the model holds no checkpoint's weights."""
    message = f"{source.name}: {'; '.join(source.notes)}"
    logger.warning("%s", message)
    # attributed to the caller's line (load() or convert() in the user's code), not fxconvert's
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, RandomWeightsWarning, stacklevel=level)


@contextlib.contextmanager
def _held_warnings():
    """Hold back the warnings raised while building a model.

    When the build fails they are dropped: the error says what went wrong, and warnings
    about the same bad value (e.g. "Initializing zero-element tensors") only bury it.
    When it succeeds they are re-emitted, so a caller sees what transformers said.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


def _keep_in_fp32(model: torch.nn.Module) -> None:
    """Cast the parameters that transformers keeps in fp32 when it loads a checkpoint in fp16
    (`_keep_in_fp32_modules`; `_keep_in_fp32_modules_strict` in bf16 too), matched the way
    `from_pretrained` matches them: each pattern searched in the parameter's name.
    `_from_config` does not do this, `from_pretrained` does."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    patterns = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ()) if dtype in (
        torch.float16, torch.bfloat16) else set()
    if dtype == torch.float16:
        patterns |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    if not patterns:
        return
    regex = re.compile("|".join(p.replace("*", ".*") for p in sorted(patterns)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if regex.search(name):
                p.data = p.data.to(torch.float32)


def _untie_head(model: torch.nn.Module, config: dict, *, init: bool = False) -> None:
    """Give the LM head its own weight when the family's record says a model built from `config` needs
    it (`Family.unties_head`: T5 v1.1, flan, mT5).

    transformers 5 ties T5's head at construction whatever the config says and unties it
    only when a checkpoint holds a distinct head; a random-weight build mirrors the
    published checkpoints instead. Other families' heads are left as transformers built them.
    """
    family = families.family_of_class(type(model).__name__)
    head = getattr(model, "lm_head", None)
    if family is not None and family.unties_head(config) and head is not None:
        head.weight = torch.nn.Parameter(torch.empty_like(head.weight))
        if init and head.weight.device.type != "meta":
            torch.nn.init.normal_(head.weight, std=head.in_features ** -0.5)


@torch.no_grad()
def _random_init(model: torch.nn.Module, seed: int) -> None:
    """Fast, numerically sane random weights (not transformers' initialisation)."""
    generator = torch.Generator().manual_seed(seed)
    done = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in done:
                continue
            done.add(id(p))
            if p.dim() < 2:
                p.fill_(1.0 if name == "weight" else 0.0)  # norm scales 1, biases 0
            else:
                fan_in = _fan_in(module, p)
                std = fan_in ** -0.5 if fan_in else 1.0
                p.uniform_(-math.sqrt(3) * std, math.sqrt(3) * std, generator=generator)


def _fan_in(module: torch.nn.Module, p: torch.Tensor) -> int | None:
    """The input width of a projection's weight `p` (None for an embedding table or anything else).

    `nn.Linear` stores its weight (out, in); transformers' `Conv1D` (GPT-2) stores it (in, out)
    and computes `x @ weight`.
    """
    if isinstance(module, torch.nn.Linear):
        return module.in_features
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    if conv1d is not None and isinstance(module, conv1d) and p is module.weight:
        return p.shape[0]
    return None


def _summary(e: BaseException) -> str:
    """A multi-line error as one line that keeps its reason.

    huggingface_hub's config validation puts only the field on the first line
    ("Validation error for field 'dropout_rate':") and the reason on the next; the
    lines are joined and that form is read as "field 'F': reason".
    """
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    if not text:
        return type(e).__name__
    text = re.sub(r"<class '([\w.]+)'>", r"\1", text)
    text = re.sub(r"\s*Exception raised from .*", "", text)  # torch's C++ frames: no reason, only noise
    match = re.fullmatch(r"Validation error for field '([^']*)':\s*(?:\w+: )?(.*)", text)
    if match:
        field_name, reason = match.groups()
        text = f"field '{field_name}': {reason or 'invalid value'}"
    return text
