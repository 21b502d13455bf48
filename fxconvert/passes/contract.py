"""What each pass needs from a graph's `GraphInfo` and what it records there.

torch's `PassBase.__call__` runs `requires(gm)`, then `call(gm)`, then `ensures(gm)`. A
`GraphPass` fills the two checks from two class attributes: `required`, the `GraphInfo`
fields that must be set before it runs, and `ensured`, the fields it sets. A pass with
either needs the record itself. A graph that lacks one is refused in one line naming the
pass, the field and what sets it, instead of the pass silently doing less (no lifted
weights to sparsify, attention dropout left at an eval trace's 0.0).
"""

import torch.fx
from torch.fx.passes.infra.pass_base import PassBase

from fxconvert.errors import PassError
from fxconvert.graph_info import FIELDS, GRAPH_INFO, GraphInfo

# Field -> what sets it, for the error's fix.
_SET_BY = {
    "model_class": "the tracer (fxconvert.trace)",
    "input_names": "the tracer (fxconvert.trace)",
    "traced_training": "the tracer (fxconvert.trace)",
    "dropout_rates": "the tracer (fxconvert.trace)",
    "lifted_weights": "LiftSharedWeightsPass",
    "output_name": "KeepSingleOutputPass",
    "dropped_inputs": "KeepSingleOutputPass",
}


class GraphPass(PassBase):
    required: tuple[str, ...] = ()
    ensured: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        unknown = [f for f in (*cls.required, *cls.ensured) if f not in FIELDS]
        if unknown:
            raise TypeError(f"{cls.__name__} names {unknown[0]!r}, which is not a GraphInfo field")

    def requires(self, graph_module: torch.fx.GraphModule) -> None:
        if not (self.required or self.ensured):
            return
        name = type(self).__name__
        info = getattr(graph_module, "meta", {}).get(GRAPH_INFO)
        if not isinstance(info, GraphInfo):
            what = ", ".join(self.required) or ", ".join(self.ensured)
            raise PassError(f"{name} needs the graph's GraphInfo (gm.meta[{GRAPH_INFO!r}], for {what}), which this "
                            f"graph lacks; trace the model with fxconvert.trace, which records it, or attach one with "
                            f"fxconvert.graph_info.set_graph_info")
        for field in self.required:
            if getattr(info, field) is None:
                raise PassError(f"{name} needs GraphInfo.{field}, which this graph's record does not set; run "
                                f"{_SET_BY[field]} before {name}")

    def ensures(self, graph_module: torch.fx.GraphModule) -> None:
        info = getattr(graph_module, "meta", {}).get(GRAPH_INFO)
        for field in self.ensured:
            if not isinstance(info, GraphInfo) or getattr(info, field) is None:
                raise PassError(f"{type(self).__name__} did not record GraphInfo.{field}; this is a bug in "
                                f"{type(self).__name__}, please report it with the model that shows it")
