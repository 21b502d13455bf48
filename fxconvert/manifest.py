"""`fxconvert.manifest`: pipeline.json as typed, frozen records, and the one place that reads and writes it.

pipeline.json describes a conversion split into stages (`fxconvert NAME --stages N`): per
stage its blocks, the model inputs it reads, the values it receives and sends (with
symbolic shapes), its parameters under their transformers names, the shared weights, and
the plan the split was chosen by. The converter writes it (`fxconvert.pipeline`), and a
rank that trains reads it back (`fxconvert.stage_files`), as the export does
(`fxconvert.export`); all of them go through `Manifest.to_json` / `Manifest.from_json`, so
the layout is stated once, here.

`from_json` checks every field, so a truncated or tampered file is one line naming the
field and the fix, not a TypeError at some later use; a file of another `"format"` or
`"version"` is refused whole. The version changes whenever the layout does; an older
file is converted again rather than read half right.

Sizes that follow the batch or a sequence length are written as names: "batch", and the
model family's names of its sequences' lengths (`Family.sequence_lengths`), which the
manifest lists in `sequence_lengths`: "encoder_length" and "decoder_length" for an
encoder-decoder model, "sequence_length" for a decoder-only or encoder-only one.

Imports nothing but the standard library and fxconvert.errors: a rank that loads stage
files needs neither torch's tracer nor transformers to read it.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from fxconvert.errors import UsageError, printable

FILE, FORMAT, VERSION = "pipeline.json", "fxconvert-pipeline", 3
TOKEN_IDS = ("pad_token_id",)  # config.json's token ids a graph may bake in, recorded as converted (`token_ids`)
BALANCES = ("time", "params", "profile")
_FIX = "convert again with --stages N"


class ManifestError(UsageError):
    """pipeline.json is missing, unreadable, of another format or version, or has a field of the wrong kind."""


# -- the records ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Parameter:
    """One tensor a stage holds: its name in the stage (and weights file), its transformers name(s), its size."""

    name: str
    weights_key: str
    hf_name: str
    shape: tuple[int, ...]
    dtype: str
    bytes: int
    tied_hf_names: tuple[str, ...] = ()  # other names the eager model ties the same tensor under
    # False for a buffer the eager model does not save (RoBERTa's non-persistent token_type_ids): a stage reads
    # it, the export leaves it out as save_pretrained does. Written only when False.
    persistent: bool = True

    def to_json(self) -> dict:
        return {"name": self.name, "weights_key": self.weights_key, "hf_name": self.hf_name,
                "shape": list(self.shape), "dtype": self.dtype, "bytes": self.bytes,
                **({"tied_hf_names": list(self.tied_hf_names)} if self.tied_hf_names else {}),
                **({"persistent": False} if not self.persistent else {})}


@dataclass(frozen=True)
class Boundary:
    """A value that crosses from one stage to the next; each size an int or the name of the size it follows."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class SharedWeight:
    """A weight transformers ties under several names; each stage in `stages` holds its own copy."""

    hf_names: tuple[str, ...]
    stages: tuple[int, ...]

    def to_json(self) -> dict:
        return {"hf_names": list(self.hf_names), "stages": list(self.stages)}


@dataclass(frozen=True)
class Stage:
    """One stage: the file that builds it, what it runs, reads, receives, sends and holds."""

    index: int
    file: str
    blocks: tuple[str, ...]
    inputs: tuple[str, ...]
    received: tuple[Boundary, ...]
    sent: tuple[Boundary, ...]
    shared_weights: tuple[str, ...]
    parameters: tuple[Parameter, ...]
    parameter_bytes: int
    flops: int | None = None  # predicted forward + backward FLOPs at the plan's sizes (None: no prediction)
    peak_bytes: int | None = None  # predicted peak memory under the plan's schedule

    def to_json(self) -> dict:
        return {"index": self.index, "file": self.file, "blocks": list(self.blocks), "inputs": list(self.inputs),
                "received": [v.to_json() for v in self.received], "sent": [v.to_json() for v in self.sent],
                "shared_weights": list(self.shared_weights), "parameters": [p.to_json() for p in self.parameters],
                "parameter_bytes": self.parameter_bytes, "flops": self.flops, "peak_bytes": self.peak_bytes}


@dataclass(frozen=True)
class Plan:
    """How the split was chosen and what it predicts, per microbatch (`fxconvert.stages.split_stages`).

    `lengths` maps each sequence length's name (the family's, see the module docstring) to
    the tokens the split was judged at; they stand beside `batch` in the JSON object.
    """

    balance: str
    batch: int
    lengths: dict[str, int]
    schedule: str
    microbatches: int
    bottleneck: int
    bubble_fraction: float
    step_seconds: float
    seconds: tuple[float, ...]
    time_share: tuple[float, ...]
    flops: tuple[int | None, ...]
    peak_bytes: tuple[int | None, ...]
    # the memory plan: the optimizer whose state `peak_bytes` counts, the per-rank memory target in bytes
    # (None: none was given), and the blocks whose activations are recomputed in backward
    optimizer: str = "adamw"
    max_memory: int | None = None
    recompute: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {"balance": self.balance, "batch": self.batch, **self.lengths, "schedule": self.schedule,
                "microbatches": self.microbatches, "bottleneck": self.bottleneck,
                "bubble_fraction": self.bubble_fraction, "step_seconds": self.step_seconds,
                "seconds": list(self.seconds), "time_share": list(self.time_share), "flops": list(self.flops),
                "peak_bytes": list(self.peak_bytes), "optimizer": self.optimizer, "max_memory": self.max_memory,
                "recompute": list(self.recompute)}


@dataclass(frozen=True)
class Manifest:
    """pipeline.json: the whole conversion's stages (see the module docstring)."""

    model_class: str
    model_type: str | None
    num_stages: int
    input_names: tuple[str, ...]
    output_name: str
    weights: str
    config: str
    tokenizer_files: tuple[str, ...]
    sequence_lengths: tuple[str, ...]
    shared_weights: dict[str, SharedWeight]
    plan: Plan | None
    stages: tuple[Stage, ...]
    # The config's token ids the graph was traced with (`TOKEN_IDS`: RoBERTa's positions and a decoder-only
    # classifier's pooled token treat pad_token_id as padding), which a rank's batching must use too; empty in a
    # file of an fxconvert that did not record them.
    token_ids: dict[str, int | None] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "model_class": self.model_class, "model_type": self.model_type,
                "num_stages": self.num_stages, "input_names": list(self.input_names), "output_name": self.output_name,
                "weights": self.weights, "config": self.config, "tokenizer_files": list(self.tokenizer_files),
                "sequence_lengths": list(self.sequence_lengths),
                "shared_weights": {name: w.to_json() for name, w in self.shared_weights.items()},
                "plan": self.plan.to_json() if self.plan is not None else None,
                "stages": [s.to_json() for s in self.stages],
                **({"token_ids": dict(self.token_ids)} if self.token_ids else {})}

    def text(self) -> str:
        """pipeline.json's text: indented, with lists of plain values (shapes, names) on one line."""
        return text(self.to_json())

    @classmethod
    def from_json(cls, obj, where) -> "Manifest":
        """The manifest in `obj` (pipeline.json's parsed JSON); `where` names the file in errors."""
        return _Reader(str(where)).manifest(obj)


def text(obj: dict) -> str:
    """JSON text, indented, with lists of plain values (shapes, names) joined on one line."""
    import re

    out = json.dumps(obj, indent=2)
    # A newline never occurs inside a JSON string, so this joins only the layout of innermost lists.
    out = re.sub(r"\[\n\s*([^\[\]{}]*?)\n\s*\]", lambda m: "[" + re.sub(r",\n\s*", ", ", m.group(1)) + "]", out)
    return out + "\n"


def read(directory) -> Manifest:
    """`directory`/pipeline.json, read and checked whole; ManifestError (one line) when it cannot be."""
    directory = Path(directory)
    path = directory / FILE
    if not path.is_file():
        raise ManifestError(f"{printable(directory)}{os.sep} has no {FILE}; convert with --stages N")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ManifestError(f"cannot read {printable(path)}: {e.strerror or e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"cannot read {printable(path)}: malformed JSON ({e}); {_FIX}") from e
    return Manifest.from_json(obj, printable(path))


# -- checking what a file says --------------------------------------------------------------------

def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return _is_int(value) or isinstance(value, float)


def _is_count_or_none(value) -> bool:
    return value is None or (_is_int(value) and value >= 0)


def _is_name(value) -> bool:
    return isinstance(value, str) and bool(value)


def _is_file_name(value) -> bool:
    return _is_name(value) and os.path.basename(value) == value and value not in (".", "..") and "\\" not in value


class _Reader:
    """Builds the records from parsed JSON, refusing the first field that is not what the writer writes."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, problem: str, fix: str = _FIX):
        raise ManifestError(f"{self.where}: {problem}; {fix}")

    def fields(self, obj: dict, what: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
        for key in required:
            if key not in obj:
                raise ManifestError(f"{self.where} is malformed (KeyError: {what}{key!r} is missing); {_FIX}")
        unknown = [k for k in obj if k not in required and k not in optional]
        if unknown:
            self.fail(f"{what}{printable(repr(unknown[0]))} is not a field of format {FORMAT} version {VERSION}")

    def names(self, value, problem: str, check=_is_name) -> tuple[str, ...]:
        if not (isinstance(value, list) and all(check(v) for v in value)):
            self.fail(problem)
        return tuple(value)

    def count(self, value, problem: str, least: int = 0, none: bool = False) -> int | None:
        if none and value is None:
            return None
        if not (_is_int(value) and value >= least):
            self.fail(problem)
        return value

    def manifest(self, obj) -> Manifest:
        if not isinstance(obj, dict):
            raise ManifestError(f"{self.where} does not hold a JSON object; {_FIX}")
        if "format" in obj and obj["format"] != FORMAT:
            raise ManifestError(f"{self.where} is not an fxconvert pipeline manifest; convert with --stages N")
        if "version" in obj and obj["version"] != VERSION:
            raise ManifestError(f"{self.where} has version {printable(repr(obj['version']))}, this fxconvert "
                                f"reads version {VERSION}; convert again with this fxconvert")
        if "num_stages" in obj and "stages" in obj:
            self.stage_count(obj["num_stages"], obj["stages"])
        self.fields(obj, "", ("format", "version", "model_class", "model_type", "num_stages", "input_names",
                              "output_name", "weights", "config", "tokenizer_files", "sequence_lengths",
                              "shared_weights", "plan", "stages"), ("token_ids",))
        num_stages, rows = obj["num_stages"], obj["stages"]
        if not _is_name(obj["model_class"]):
            self.fail("'model_class' must be a class name")
        if not (obj["model_type"] is None or isinstance(obj["model_type"], str)):
            self.fail("'model_type' must be a string")
        input_names = self.names(obj["input_names"], "'input_names' must be a list of names")
        if not _is_name(obj["output_name"]):
            self.fail("'output_name' must be a name")
        for key in ("weights", "config"):
            if not _is_file_name(obj[key]):
                self.fail(f"'{key}' must be a file name in its directory, got {printable(repr(obj[key]))}")
        tokenizer_files = self.names(obj["tokenizer_files"], "'tokenizer_files' must be a list of file names")
        lengths = self.names(obj["sequence_lengths"], "'sequence_lengths' must be a list of names ending in "
                             "'_length'", check=lambda v: _is_name(v) and v.endswith("_length") and v != "batch")
        shared = self.shared_weights(obj["shared_weights"], num_stages)
        plan = self.plan(obj["plan"], num_stages, lengths)
        symbols = {"batch", *lengths}
        stages = tuple(self.stage(row, symbols, shared) for row in rows)
        for stage in stages[1:]:
            if stage.received != stages[stage.index - 1].sent:
                self.fail(f"stage {stage.index}'s 'received' must be what stage {stage.index - 1} sends")
        if stages[0].received or stages[-1].sent:
            self.fail("the first stage receives nothing and the last sends nothing")
        for name, weight in shared.items():
            holders = tuple(s.index for s in stages if name in s.shared_weights)
            if weight.stages != holders:
                self.fail(f"shared weight {printable(repr(name))} must list the stages that hold it, {list(holders)}")
        return Manifest(model_class=obj["model_class"], model_type=obj["model_type"], num_stages=num_stages,
                        input_names=input_names, output_name=obj["output_name"], weights=obj["weights"],
                        config=obj["config"], tokenizer_files=tokenizer_files, sequence_lengths=lengths,
                        shared_weights=shared, plan=plan, stages=stages, token_ids=self.token_ids(obj))

    def token_ids(self, obj: dict) -> dict[str, int | None]:
        if "token_ids" not in obj:  # written by an fxconvert that did not record them: nothing to check against
            return {}
        value = obj["token_ids"]
        if not (isinstance(value, dict) and value and set(value) <= set(TOKEN_IDS)
                and all(v is None or (_is_int(v) and v >= 0) for v in value.values())):
            self.fail(f"'token_ids' must be an object of {', '.join(TOKEN_IDS)}, each a token id or null")
        return dict(value)

    def stage_count(self, num_stages, rows) -> None:
        indices = [r.get("index") if isinstance(r, dict) else None for r in rows] if isinstance(rows, list) else rows
        if not (_is_int(num_stages) and num_stages >= 1 and indices == list(range(num_stages))):
            raise ManifestError(f"{self.where} lists stages {printable(repr(indices))} for num_stages "
                                f"{printable(repr(num_stages))}, inconsistently; {_FIX}")

    def shared_weights(self, value, num_stages: int) -> dict[str, SharedWeight]:
        if not isinstance(value, dict):
            self.fail("'shared_weights' must be an object")
        out = {}
        for name, info in value.items():
            stages = info.get("stages") if isinstance(info, dict) else None
            if not (_is_name(name) and isinstance(info, dict) and set(info) == {"hf_names", "stages"}
                    and isinstance(stages, list) and all(_is_int(i) and 0 <= i < num_stages for i in stages)
                    and isinstance(info["hf_names"], list) and all(_is_name(n) for n in info["hf_names"])):
                self.fail(f"shared weight {printable(repr(name))} must list its stages (0..{num_stages - 1}) "
                          f"and hf_names")
            out[name] = SharedWeight(tuple(info["hf_names"]), tuple(stages))
        return out

    def plan(self, value, num_stages: int, lengths: tuple[str, ...]) -> Plan | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            self.fail("'plan' must be an object or null")
        keys = ("balance", "batch", *lengths, "schedule", "microbatches", "bottleneck", "bubble_fraction",
                "step_seconds", "seconds", "time_share", "flops", "peak_bytes", "optimizer", "max_memory", "recompute")
        self.fields(value, "plan ", keys)
        if not _is_name(value["optimizer"]):
            self.fail("the plan's 'optimizer' must be an optimizer name")
        self.count(value["max_memory"], "the plan's 'max_memory' must be a positive integer or null", least=1,
                   none=True)
        recompute = self.names(value["recompute"], "the plan's 'recompute' must list block names")
        if value["balance"] not in BALANCES:
            self.fail(f"the plan's 'balance' must be one of {', '.join(BALANCES)}")
        if not _is_name(value["schedule"]):
            self.fail("the plan's 'schedule' must be a schedule name")
        for key in ("batch", *lengths, "microbatches"):
            self.count(value[key], f"the plan's {key!r} must be a positive integer", least=1)
        if not (_is_int(value["bottleneck"]) and 0 <= value["bottleneck"] < num_stages):
            self.fail(f"the plan's 'bottleneck' must be a stage (0..{num_stages - 1})")
        for key in ("bubble_fraction", "step_seconds"):
            if not _is_number(value[key]):
                self.fail(f"the plan's {key!r} must be a number")
        per_stage = {}
        for key, ok, what in (("seconds", _is_number, "number"), ("time_share", _is_number, "number"),
                              ("flops", _is_count_or_none, "count or null"),
                              ("peak_bytes", _is_count_or_none, "count or null")):
            items = value[key]
            if not (isinstance(items, list) and len(items) == num_stages and all(ok(v) for v in items)):
                self.fail(f"the plan's {key!r} must list one {what} per stage")
            per_stage[key] = tuple(items)
        return Plan(balance=value["balance"], batch=value["batch"], lengths={k: value[k] for k in lengths},
                    schedule=value["schedule"], microbatches=value["microbatches"], bottleneck=value["bottleneck"],
                    bubble_fraction=value["bubble_fraction"], step_seconds=value["step_seconds"], **per_stage,
                    optimizer=value["optimizer"], max_memory=value["max_memory"], recompute=recompute)

    def stage(self, row: dict, symbols: set, shared: dict) -> Stage:
        i = row["index"]
        what = f"stage {i}'s "
        self.fields(row, what, ("index", "file", "blocks", "inputs", "received", "sent", "shared_weights",
                                "parameters", "parameter_bytes", "flops", "peak_bytes"))
        if row["file"] != f"stage_{i}.py":
            self.fail(f"{what}'file' must be stage_{i}.py")
        blocks = self.names(row["blocks"], f"{what}'blocks' must be a list of module paths")
        inputs = self.names(row["inputs"], f"{what}'inputs' must be a list of names")
        received = self.boundaries(row["received"], f"{what}'received'", symbols)
        sent = self.boundaries(row["sent"], f"{what}'sent'", symbols)
        shared_names = self.names(row["shared_weights"], f"{what}'shared_weights' must be a list of the "
                                  f"manifest's shared weights", check=lambda v: isinstance(v, str) and v in shared)
        if not isinstance(row["parameters"], list):
            self.fail(f"{what}'parameters' must be a list")
        parameters = tuple(self.parameter(p, i, n) for n, p in enumerate(row["parameters"]))
        total = self.count(row["parameter_bytes"], f"{what}'parameter_bytes' must be a byte count")
        if total != sum(p.bytes for p in parameters):
            self.fail(f"{what}'parameter_bytes' must be the sum of its parameters' bytes")
        flops = self.count(row["flops"], f"{what}'flops' must be a count or null", none=True)
        peak = self.count(row["peak_bytes"], f"{what}'peak_bytes' must be a byte count or null", none=True)
        return Stage(index=i, file=row["file"], blocks=blocks, inputs=inputs, received=received, sent=sent,
                     shared_weights=shared_names, parameters=parameters, parameter_bytes=total, flops=flops,
                     peak_bytes=peak)

    def boundaries(self, value, what: str, symbols: set) -> tuple[Boundary, ...]:
        problem = (f"{what} must be a list of values, each with a name, a dtype and a shape of sizes or of "
                   f"{', '.join(map(repr, sorted(symbols)))}")
        if not isinstance(value, list):
            self.fail(problem)
        out = []
        for v in value:
            if not (isinstance(v, dict) and set(v) == {"name", "dtype", "shape"} and _is_name(v["name"])
                    and _is_name(v["dtype"]) and isinstance(v["shape"], list)
                    and all((_is_int(d) and d >= 0) or d in symbols for d in v["shape"])):
                self.fail(problem)
            out.append(Boundary(v["name"], v["dtype"], tuple(v["shape"])))
        return tuple(out)

    def parameter(self, p, stage: int, n: int) -> Parameter:
        what = f"stage {stage}'s parameter {n} "
        if not isinstance(p, dict):
            self.fail(f"{what}must be an object")
        self.fields(p, what, ("name", "weights_key", "hf_name", "shape", "dtype", "bytes"),
                    ("tied_hf_names", "persistent"))
        if not _is_name(p["name"]):
            self.fail(f"{what}'name' must be a name")
        if not _is_name(p["weights_key"]):
            self.fail(f"{what}'weights_key' must be a tensor name in the weights file")
        if not _is_name(p["hf_name"]):
            self.fail(f"stage {stage} parameter {printable(repr(p['name']))} has no transformers name ('hf_name')")
        if not (isinstance(p["shape"], list) and all(_is_int(d) and d >= 0 for d in p["shape"])):
            self.fail(f"{what}'shape' must be a list of sizes")
        if not _is_name(p["dtype"]):
            self.fail(f"{what}'dtype' must be a dtype name")
        self.count(p["bytes"], f"{what}'bytes' must be a byte count")
        tied = self.names(p.get("tied_hf_names", []), f"{what}'tied_hf_names' must be a list of names")
        if "tied_hf_names" in p and not tied:
            self.fail(f"{what}'tied_hf_names' is written only when it names something")
        if "persistent" in p and p["persistent"] is not False:
            self.fail(f"{what}'persistent' is written only as false (a buffer the eager model does not save)")
        return Parameter(p["name"], p["weights_key"], p["hf_name"], tuple(p["shape"]), p["dtype"], p["bytes"], tied,
                         persistent="persistent" not in p)


__all__ = ["Manifest", "Stage", "Parameter", "Boundary", "SharedWeight", "Plan", "ManifestError", "read", "text",
           "FILE", "FORMAT", "VERSION"]
