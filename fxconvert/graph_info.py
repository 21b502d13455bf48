"""What fxconvert knows about a traced graph beside its nodes: one typed record in `gm.meta`.

The tracer writes a `GraphInfo` under `gm.meta[GRAPH_INFO]` (the model's class, the input
names forward takes, the mode it was traced in, each attention module's dropout rate), and
the passes update it (the shared weights they lift, the output they keep, the inputs that
output no longer reads). A record is frozen: a pass replaces it (`update_graph_info`), so a
reader never sees half an update. `gm.meta` is copied by `copy.deepcopy(gm)` and shared by
`copy.copy(gm)`; `recompile()` leaves it alone, and so the record travels as the graph does.

Node-level facts stay in `node.meta` under torch.fx's own keys: `"val"` (the meta-device
twin of a value), `"nn_module_stack"`, and fxconvert's `"module_path"` and `"source"` (the
module and the source line a node came from, for error messages).

A pass says which fields it needs and which it records (`fxconvert.passes.contract`); a
graph that lacks them is refused in one line naming the pass and the field.
"""

import dataclasses
from dataclasses import dataclass, field

import torch.fx

from fxconvert.errors import UsageError

GRAPH_INFO = "graph_info"  # the gm.meta key


@dataclass(frozen=True, eq=False)  # eq=False: comparing lifted tensors has no single truth value
class GraphInfo:
    model_class: str  # the transformers class traced, e.g. "T5ForConditionalGeneration"
    input_names: tuple[str, ...]  # the model inputs forward takes, in order (not shared weights or `training`)
    traced_training: bool  # the mode the model was traced in
    dropout_rates: dict[str, float]  # attention module path -> its configured dropout rate
    # Set by the passes; None until the pass that records it has run.
    lifted_weights: dict[str, torch.Tensor] | None = None  # placeholder -> the shared parameter it stands for
    output_name: str | None = None  # the one output kept
    dropped_inputs: tuple[str, ...] = field(default=())  # inputs the kept output does not read


FIELDS = tuple(f.name for f in dataclasses.fields(GraphInfo))


def missing_info_message(gm_name: str = "this GraphModule") -> str:
    return (f"{gm_name} carries no fxconvert GraphInfo (gm.meta[{GRAPH_INFO!r}]); trace the model with "
            f"fxconvert.trace, which records it, or attach one with fxconvert.graph_info.set_graph_info")


def graph_info(gm: torch.fx.GraphModule) -> GraphInfo:
    """The graph's record; a graph fxconvert did not trace has none, and that is one line naming the fix."""
    info = getattr(gm, "meta", {}).get(GRAPH_INFO)
    if not isinstance(info, GraphInfo):
        raise UsageError(missing_info_message())
    return info


def has_graph_info(gm: torch.fx.GraphModule) -> bool:
    return isinstance(getattr(gm, "meta", {}).get(GRAPH_INFO), GraphInfo)


def set_graph_info(gm: torch.fx.GraphModule, info: GraphInfo) -> GraphInfo:
    if not isinstance(info, GraphInfo):
        raise UsageError(f"set_graph_info takes a GraphInfo, got {type(info).__name__}; build one with "
                         f"fxconvert.graph_info.GraphInfo(...)")
    gm.meta[GRAPH_INFO] = info
    return info


def update_graph_info(gm: torch.fx.GraphModule, **changes) -> GraphInfo:
    """Replace the graph's record by a copy with `changes` (field names of `GraphInfo`)."""
    return set_graph_info(gm, dataclasses.replace(graph_info(gm), **changes))


__all__ = ["GRAPH_INFO", "FIELDS", "GraphInfo", "graph_info", "has_graph_info", "set_graph_info",
           "update_graph_info"]
