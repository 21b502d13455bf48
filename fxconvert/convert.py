"""`fxconvert.convert`: trace a model, run the FTPipe passes, and wrap the result for training.

The result is a `Conversion`:

- `graph_module`: the pre-partitioning GraphModule. Its placeholders are the model
  inputs, then the shared weight(s), then `training`; it returns one tensor.
- `module`: a `ConvertedModule` that owns the shared weight(s) as Parameters and calls
  `graph_module`; `.train()` / `.eval()` drive the `training` placeholder. It is a
  drop-in for fine-tuning.
- `passes`: one `PassRecord` per pass, plain data for the report.
- `model` and `source`: the traced model (it shares its parameters with `module`) and,
  when `convert` was given a name, where that model came from (`fxconvert.load`).

`convert` takes a model or a name (checkpoint directory, Hub id, config file or preset,
resolved by `fxconvert.load.load`); `Conversion.save(dir)` writes model.py,
weights.safetensors and the reports (`fxconvert.save`).
"""

import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.fx
from torch.fx._lazy_graph_module import _LazyGraphModule

from fxconvert.analysis import count_kinds, output_names, placeholder_names
from fxconvert.errors import UsageError, with_article
from fxconvert.graph_info import graph_info
from fxconvert.graph_utils import gc_paused
from fxconvert.passes import default_passes
from fxconvert.trace import TraceResult, input_name_list, trace_with_stats


@dataclass
class PassRecord:
    """What one pass did, as plain data: nodes are compared by kind (op and target)."""

    name: str
    modified: bool
    nodes_before: int
    nodes_after: int
    added: dict[str, int]
    removed: dict[str, int]
    placeholders_before: list[str]
    placeholders_after: list[str]
    outputs_before: list[str]
    outputs_after: list[str]
    seconds: float


if TYPE_CHECKING:
    from fxconvert.load import ModelSource


@dataclass
class Conversion:
    graph_module: torch.fx.GraphModule
    module: "ConvertedModule"
    passes: list[PassRecord]
    traced_code: str | None  # the code before the passes, kept when asked (for a diff)
    input_names: list[str]
    output_name: str
    shared_weights: dict[str, list[str]]
    timings: dict[str, float] = field(default_factory=dict)
    model_class: str = ""
    model: torch.nn.Module | None = None
    source: "ModelSource | None" = None
    dropped_inputs: list[str] = field(default_factory=list)  # traced inputs the kept output does not read

    @property
    def code(self) -> str:
        return self.graph_module.code

    def save(self, out_dir, *, force: bool = False, validation=None, diff: bool = False, stages=None):
        """Write model.py, weights.safetensors, report.md and report.json to `out_dir`, atomically.

        An existing directory is refused unless `force`. `validation` (a
        `fxconvert.validate.ValidationResult`) and `diff` add those sections to the reports.
        `stages` (a number of stages, or `fxconvert.stages.Stages` split from this conversion)
        also writes what `--stages` does: stage files, pipeline.json, config.json and the
        tokenizer files (`fxconvert.pipeline`), and a stage table in the reports.
        Returns the `fxconvert.save.Saved` record (paths and the report written).
        """
        from fxconvert.report import build_report, diff_section

        if diff and self.traced_code is None:
            raise UsageError("this conversion kept no traced code to diff; convert with keep_traced_code=True")
        from fxconvert.save import save

        extra, extra_files = [diff_section(self)] if diff else [], {}
        if stages is not None:
            from fxconvert.pipeline import pipeline_output

            output = pipeline_output(self, stages)
            extra.append(output.section)
            extra_files = output.files
        return save(self, out_dir, force=force, extra_files=extra_files,
                    make_report=lambda: build_report(self, validation=validation, extra=extra))


class ConvertedModule(torch.nn.Module):
    """Owns the lifted shared weights and feeds them, with `self.training`, to the graph."""

    def __init__(self, graph_module: torch.fx.GraphModule, shared: dict[str, torch.nn.Parameter], input_names):
        super().__init__()
        # Generate the code now: torch.compile cannot trace a lazy GraphModule's first call.
        _LazyGraphModule.force_recompile(graph_module)
        self.graph_module = graph_module
        self.input_names = tuple(input_names)
        self.shared_names = tuple(shared)
        for name, param in shared.items():
            self.register_parameter(name, param)

    def forward(self, *args, **kwargs):
        if len(args) > len(self.input_names):
            raise TypeError(f"expected at most {len(self.input_names)} inputs ({', '.join(self.input_names)})")
        values = dict(zip(self.input_names, args))
        for key, value in kwargs.items():
            if key not in self.input_names or key in values:
                raise TypeError(f"unexpected or repeated input '{key}'; inputs are {', '.join(self.input_names)}")
            values[key] = value
        missing = [n for n in self.input_names if n not in values]
        if missing:
            raise TypeError(f"missing input(s) {', '.join(missing)}")
        inputs = [values[n] for n in self.input_names]
        weights = [getattr(self, n) for n in self.shared_names]
        return self.graph_module(*inputs, *weights, self.training)


def run_passes(gm: torch.fx.GraphModule, passes) -> list[PassRecord]:
    records = []
    kind_cache = {}  # passes retarget by making new nodes, so (op, target) keeps its kind
    kinds_before = count_kinds(gm, kind_cache)
    for p in passes:
        ph_before, out_before = placeholder_names(gm), output_names(gm)
        start = time.perf_counter()
        result = p(gm)
        seconds = time.perf_counter() - start
        gm = result.graph_module
        kinds_after = count_kinds(gm, kind_cache) if result.modified else kinds_before
        records.append(
            PassRecord(
                name=type(p).__name__,
                modified=bool(result.modified),
                nodes_before=sum(kinds_before.values()),
                nodes_after=sum(kinds_after.values()),
                added=dict(sorted((kinds_after - kinds_before).items())),
                removed=dict(sorted((kinds_before - kinds_after).items())),
                placeholders_before=ph_before,
                placeholders_after=placeholder_names(gm),
                outputs_before=out_before,
                outputs_after=output_names(gm),
                seconds=seconds,
            )
        )
        kinds_before = kinds_after
    return records


def convert(model: "torch.nn.Module | str | os.PathLike", *, input_names=None, output: str | None = None,
            offline: bool = False, meta: bool = False, attn: str = "sdpa", seed: int = 0,
            dtype=None, allow_random: bool = False, keep_traced_code: bool = False) -> Conversion:
    """Trace `model` and turn it into FTPipe's pre-partitioning form.

    `model` is a module, or a name that `fxconvert.load.load` resolves (a checkpoint
    directory, a Hub id, a config .json file or a preset such as "t5-small"); `offline`,
    `meta`, `attn`, `seed` (of random weights), `dtype` and `allow_random` apply to names only.
    A name that resolves to no weights raises `ModelResolutionError` unless
    `allow_random=True` (random weights, with a `RandomWeightsWarning`) or `meta=True`.
    `input_names` is a list of names (a bare string is refused, not split into letters).
    `keep_traced_code` keeps the code as traced, before the passes, in
    `Conversion.traced_code` (for a diff; generating it costs a tenth of a conversion).
    """
    if output is not None and not isinstance(output, str):
        raise UsageError(f"output is {with_article(type(output).__name__)}; give one output name such as 'loss'")
    if input_names is not None:  # before a name is loaded: a bad list should not cost a load
        input_names = input_name_list(input_names)
    source, timings = None, {}
    if isinstance(model, (str, os.PathLike)):
        from fxconvert.load import load

        start = time.perf_counter()
        loaded = load(model, offline=offline, meta=meta, attn=attn, seed=seed, dtype=dtype,
                      allow_random=allow_random)
        model, source = loaded.model, loaded.source
        timings["load"] = time.perf_counter() - start
    elif not isinstance(model, torch.nn.Module):
        raise UsageError(f"convert() takes a model (torch.nn.Module) or a name, got {type(model).__name__}")
    elif (offline, meta, attn, seed, dtype, allow_random) != (False, False, "sdpa", 0, None, False):
        raise UsageError("offline, meta, attn, seed, allow_random and dtype apply to a model given by name; this "
                         "one is built already")
    else:  # the checks a name gets at load, so that the API and the command line accept the same models
        from fxconvert.load import check_model_config

        check_model_config(model)
    with gc_paused():
        conversion = convert_traced(model, trace_with_stats(model, input_names), output=output, source=source,
                                    keep_traced_code=keep_traced_code)
    conversion.timings = {**timings, **conversion.timings}
    return conversion


def convert_traced(model: torch.nn.Module, traced: TraceResult, *, output: str | None = None,
                   source=None, keep_traced_code: bool = False) -> Conversion:
    """The passes and the wrapping of `convert`, for a model already traced by `trace_with_stats`."""
    gm = traced.graph_module
    traced_code = gm.graph.python_code(root_module="self").src if keep_traced_code else None
    start = time.perf_counter()
    records = run_passes(gm, default_passes(output=output))
    passes_seconds = time.perf_counter() - start
    recorded = graph_info(gm)
    shared = dict(recorded.lifted_weights or {})  # placeholder -> the model's own Parameter
    shared_names = {}
    from fxconvert.analysis import find_shared_parameters

    for info, param in find_shared_parameters(model):
        for name, p in shared.items():
            if p is param:
                shared_names[name] = list(info.names)
    module = ConvertedModule(gm, shared, recorded.input_names)
    module.train(model.training)
    return Conversion(
        graph_module=gm,
        module=module,
        passes=records,
        traced_code=traced_code,
        input_names=list(recorded.input_names),
        output_name=recorded.output_name,
        shared_weights=shared_names,
        timings={"trace": traced.seconds, "passes": passes_seconds},
        model_class=recorded.model_class,
        model=model,
        source=source,
        dropped_inputs=list(recorded.dropped_inputs),
    )
