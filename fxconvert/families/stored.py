"""family.json: what a training rank needs of a derived record, written beside pipeline.json.

A derived record (`fxconvert.families.derived`) is made from transformers' declarations in
the process that converts; a training rank imports no transformers and cannot make it again.
A conversion with stages whose record was derived therefore writes its plain-data part here,
and a rank rebuilds the record from it (`read_family`) and registers it by class name, as
`derive` does:

- `model_class`: the class the record is for (pipeline.json's, checked against it);
- `inputs`: input name -> [kind, sequence] (`KINDS`, `SEQUENCES`), in forward's order;
- `train_inputs`: what fxconvert.train feeds the first stage, of `inputs` and of the objective's
  batches (`Objective.batch_keys`);
- `objective`: the objective's name (`fxconvert.objectives`), or null for a head that does not train;
  "classification" exactly where the labels are class ids (kind "class"), one per row;
- `sequence_lengths`: sequence -> the name of its length;
- `max_length`, `hidden_field`: config field names ("" for none);
- `position_offset`: the config field (pad_token_id) after which the learned positions start, "" where
  they start at 0 (`Family.max_positions`: the data check's bound);
- `positive_int_fields`, `max_layers_fields`: config field names.

The rank reads a file a user may have edited: anything that is not exactly this shape, with
short names, is refused in one line naming the field (a rebuilt record only names config
fields and inputs, so a name outside these rules could only mislead).
"""

import json
import os
import re
from pathlib import Path

from fxconvert.errors import UsageError, printable
from fxconvert.families import KINDS, ONE_SEQUENCE_LENGTHS, SEQUENCES, Family
from fxconvert.manifest import text
from fxconvert.objectives import CLASSIFICATION, OBJECTIVES

FILE = "family.json"
MAX_BYTES = 64 * 1024  # a record is a few hundred bytes; a larger file is not one fxconvert wrote
MAX_NAMES = 64  # inputs or field names in one list
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}")  # an input, config field or class name
_FIX = "convert again with --stages N"
_LISTS = ("train_inputs", "positive_int_fields", "max_layers_fields")
_FIELDS = ("model_class", "inputs", "objective", "sequence_lengths", "max_length", "position_offset", "hidden_field",
           *_LISTS)


def family_data(family: Family) -> dict:
    """The plain data of `family` that a rank reads (the module docstring)."""
    return {
        "model_class": family.classes[0],
        "inputs": {name: list(spec) for name, spec in family.inputs.items()},
        "train_inputs": list(family.train_inputs),
        "objective": family.objective.name if family.objective is not None else None,
        "sequence_lengths": dict(family.sequence_lengths),
        "max_length": family.max_length,
        "position_offset": family.position_offset,
        "hidden_field": family.hidden_field,
        "positive_int_fields": list(family.positive_int_fields),
        "max_layers_fields": list(family.max_layers_fields),
    }


def family_text(family: Family) -> str:
    """family.json's text, written only once it reads back as the same data."""
    data = family_data(family)
    assert _checked(data, "family.json") == data
    return text(data)


def read_family(directory, model_class: str, model_type: str) -> Family:
    """The record of `model_class` (of `model_type`) rebuilt from `directory`/family.json; UsageError, one line."""
    path = Path(directory) / FILE
    where = printable(path)
    try:
        if path.exists() and not path.is_file():
            raise UsageError(f"{where} is not a regular file; {_FIX}")
        if not path.is_file():
            raise UsageError(f"{printable(directory)}{os.sep} has no {FILE} (the record {printable(model_class)} was "
                             f"converted with, derived from transformers' declarations); {_FIX}")
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise UsageError(f"cannot read {where}: {e.strerror or e}; {_FIX}") from e
    if len(raw) > MAX_BYTES:
        raise UsageError(f"{where} is larger than {MAX_BYTES} bytes, which no record is; {_FIX}")
    try:
        data = _checked(json.loads(raw.decode("utf-8")), where)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise UsageError(f"cannot read {where}: malformed JSON ({printable(str(e))[:200]}); {_FIX}") from None
    if data["model_class"] != model_class:
        raise UsageError(f"{where} is the record of {data['model_class']}, but the stages are a "
                         f"{printable(model_class)}; {_FIX}")
    objective = {o.name: o for o in OBJECTIVES}.get(data["objective"])
    return Family(
        name=model_type, title=f"{model_type} (derived)", model_types={model_type: ("", model_class)},
        classes=(model_class,), inputs={n: tuple(s) for n, s in data["inputs"].items()},
        default_inputs=(("", tuple(data["train_inputs"])),), train_inputs=tuple(data["train_inputs"]),
        hidden_field=data["hidden_field"], blocks=(), max_length=data["max_length"],
        position_offset=data["position_offset"], objective=objective,
        sequence_lengths=data["sequence_lengths"], positive_int_fields=tuple(data["positive_int_fields"]),
        max_layers_fields=tuple(data["max_layers_fields"]), derived_from=model_class)


def _checked(data, where: str) -> dict:
    """`data` when it has family.json's shape (the module docstring); UsageError naming the first field that has not."""
    def fail(field: str, rule: str):
        raise UsageError(f"{where}: {field} must be {rule}; {_FIX}")

    def name(value) -> bool:
        return isinstance(value, str) and _NAME.fullmatch(value) is not None

    if not isinstance(data, dict):
        raise UsageError(f"{where} does not hold a JSON object; {_FIX}")
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown or len(data) != len(_FIELDS):
        missing = [f for f in _FIELDS if f not in data]
        raise UsageError(f"{where} has " + (f"no {', '.join(missing)}" if missing else
                                            f"unknown fields ({printable(', '.join(unknown)[:200])})") + f"; {_FIX}")
    if not name(data["model_class"]):
        fail("model_class", "a class name")
    inputs = data["inputs"]
    if not (isinstance(inputs, dict) and 0 < len(inputs) <= MAX_NAMES and all(map(name, inputs))):
        fail("inputs", f"an object of 1 to {MAX_NAMES} input names")
    if not all(isinstance(s, list) and len(s) == 2 and s[0] in KINDS and s[1] in SEQUENCES for s in inputs.values()):
        fail("inputs", f"[kind, sequence] per input, a kind of {', '.join(KINDS)} and a sequence of "
                       f"{', '.join(SEQUENCES)}")
    if any(kind == "class" and n != "labels" for n, (kind, _) in inputs.items()):
        fail("inputs", 'of kind "class" only for labels (a sequence classifier\'s one class id per row)')
    for field in _LISTS:
        if not (isinstance(data[field], list) and len(data[field]) <= MAX_NAMES and all(map(name, data[field]))):
            fail(field, f"a list of at most {MAX_NAMES} names")
    if not data["train_inputs"] or not set(data["train_inputs"]) <= set(inputs):
        fail("train_inputs", "a list of names among inputs")
    if data["objective"] is not None and data["objective"] not in [o.name for o in OBJECTIVES]:  # a list is unhashable
        fail("objective", f"one of {', '.join(o.name for o in OBJECTIVES)} or null")
    if (data["objective"] == CLASSIFICATION.name) != (inputs.get("labels", [None])[0] == "class"):
        fail("objective", f'"{CLASSIFICATION.name}" exactly where the labels are of kind "class" (one class id '
                          f'per row)')
    objective = {o.name: o for o in OBJECTIVES}.get(data["objective"])
    extra = [n for n in data["train_inputs"] if objective is not None and n not in objective.batch_keys]
    if extra:  # the rank would feed the first stage an input no batch holds
        fail("train_inputs", f"names the {objective.name} objective's batches hold "
                             f"({', '.join(objective.batch_keys)}), not {', '.join(extra)[:200]}")
    lengths = data["sequence_lengths"]
    used = {s for _, s in inputs.values()}
    if not (isinstance(lengths, dict) and set(lengths) <= set(SEQUENCES) and used <= set(lengths)
            and all(map(name, lengths.values()))):
        fail("sequence_lengths", f"an object naming the length of each sequence of inputs (like "
                                 f"{json.dumps(ONE_SEQUENCE_LENGTHS)})")
    for field in ("max_length", "position_offset", "hidden_field"):
        if not (data[field] == "" or name(data[field])):
            fail(field, "a config field name or \"\"")
    return data
