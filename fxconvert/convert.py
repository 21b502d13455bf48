"""`fxconvert.convert`: run the FTPipe passes on a traced model and wrap the result for training.

`convert_traced(model, traced)` takes what `fxconvert.trace.trace_with_stats` returned and
gives a `ConvertedGraph`, the data every later phase reads (the split, validation, the
writers and the report):

- `graph_module`: the pre-partitioning GraphModule. Its placeholders are the model
  inputs, then the shared weight(s), then `training`; it returns one tensor.
- `module`: a `ConvertedModule` that owns the shared weight(s) as Parameters and calls
  `graph_module`; `.train()` / `.eval()` drive the `training` placeholder. It is a
  drop-in for fine-tuning.
- `passes`: one `PassRecord` per pass, plain data for the report.
- `model` and `source`: the traced model (it shares its parameters with `module`) and,
  when it was loaded by name, where it came from (`fxconvert.load`).
- `leaves`: the modules that run their eager code as one `call_module` node (path -> the
  source line that forced it; `fxconvert.trace`). The files written for such a graph
  import transformers to rebuild them (`fxconvert.codegen`).

The public `fxconvert.convert(model)` and `Conversion.save(dir)` live a layer up, in
`fxconvert.workflow`, which runs load -> trace -> passes -> validate -> split -> save.
"""

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.fx
from torch.fx._lazy_graph_module import _LazyGraphModule

from fxconvert.analysis import count_kinds, find_shared_parameters, output_names, placeholder_names
from fxconvert.graph_info import graph_info
from fxconvert.passes import default_passes
from fxconvert.trace import TraceResult


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
class ConvertedGraph:
    """A model after the passes: its graph, the module that runs it, and the names both use."""

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
    leaves: dict[str, str] = field(default_factory=dict)  # module path -> the source line that made it a leaf

    @property
    def code(self) -> str:
        return self.graph_module.code


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


def convert_traced(model: torch.nn.Module, traced: TraceResult, *, output: str | None = None,
                   source=None, keep_traced_code: bool = False) -> ConvertedGraph:
    """The passes and the wrapping, for a model already traced by `trace_with_stats`."""
    gm = traced.graph_module
    traced_code = gm.graph.python_code(root_module="self").src if keep_traced_code else None
    start = time.perf_counter()
    records = run_passes(gm, default_passes(output=output))
    passes_seconds = time.perf_counter() - start
    recorded = graph_info(gm)
    shared = dict(recorded.lifted_weights or {})  # placeholder -> the model's own Parameter
    shared_names = {}
    for info, param in find_shared_parameters(model):
        for name, p in shared.items():
            if p is param:
                shared_names[name] = list(info.names)
    module = ConvertedModule(gm, shared, recorded.input_names)
    module.train(model.training)
    return ConvertedGraph(
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
        leaves=dict(traced.leaves),
    )

