"""Return one tensor instead of a dict: FTPipe partitions graphs with a single output.

By default the kept output is `loss` when the graph computes one (labels among the
inputs), otherwise `logits`, otherwise `last_hidden_state`; any output can be chosen by
name. Everything that only fed the dropped outputs is removed. The kept name is recorded
in `gm.meta["output_name"]`.
"""

import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxconvert.errors import UsageError
from fxconvert.graph_utils import delete_unused_submodules, eliminate_dead_code

PREFERENCE = ("loss", "logits", "last_hidden_state")


def choose_output(available, requested=None) -> str:
    if requested is not None:
        if requested not in available:
            raise UsageError(f"unknown output '{requested}'; this model returns {', '.join(available)}")
        return requested
    for name in PREFERENCE:
        if name in available:
            return name
    return available[0]


class KeepSingleOutputPass(PassBase):
    def __init__(self, output: str | None = None):
        self.output = output

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        out = next(n for n in reversed(graph.nodes) if n.op == "output")
        value = out.args[0]
        if not isinstance(value, dict):
            kept = graph_module.meta.get("output_name")
            if self.output is not None and self.output != kept:
                raise UsageError(f"unknown output '{self.output}'; this graph already returns only '{kept}'")
            return PassResult(graph_module, False)
        name = choose_output(list(value), self.output)
        out.args = (value[name],)
        graph_module.meta["output_name"] = name
        eliminate_dead_code(graph)
        delete_unused_submodules(graph_module)
        graph_module.recompile()
        return PassResult(graph_module, True)
