"""Return one tensor instead of a dict: FTPipe partitions graphs with a single output.

By default the kept output is `loss` when the graph computes one (labels among the
inputs), otherwise `logits`, otherwise `last_hidden_state`; any output can be chosen by
name. Everything that only fed the dropped outputs is removed. The kept name is recorded
in the graph's `GraphInfo.output_name` (`fxconvert.graph_info`).

That includes graph inputs: a model input (`GraphInfo.input_names`) or lifted shared
weight (`GraphInfo.lifted_weights`) that the kept output does not read loses its
placeholder, so a caller is not asked for `decoder_input_ids` and `labels` to compute
`encoder_last_hidden_state`. The names dropped are appended to `GraphInfo.dropped_inputs`
and removed from the other two records. Other placeholders (the `training` flag) stay.
"""

import torch.fx
from torch.fx.passes.infra.pass_base import PassResult

from fxconvert.errors import PassError, UsageError
from fxconvert.graph_info import graph_info, update_graph_info
from fxconvert.graph_utils import delete_unused_submodules, eliminate_dead_code
from fxconvert.passes.contract import GraphPass

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


class KeepSingleOutputPass(GraphPass):
    required = ("input_names",)
    ensured = ("output_name",)

    def __init__(self, output: str | None = None):
        self.output = output

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        out = next(n for n in reversed(graph.nodes) if n.op == "output")
        value = out.args[0]
        if not isinstance(value, dict):
            kept = graph_info(graph_module).output_name
            if kept is None:
                raise PassError("KeepSingleOutputPass found a graph that returns one value which GraphInfo.output_name "
                                "does not name; give it a graph fxconvert.trace made (it returns a dict of outputs)")
            if self.output is not None and self.output != kept:
                raise UsageError(f"unknown output '{self.output}'; this graph already returns only '{kept}'")
            return PassResult(graph_module, False)
        name = choose_output(list(value), self.output)
        out.args = (value[name],)
        update_graph_info(graph_module, output_name=name)
        eliminate_dead_code(graph)
        _drop_unused_inputs(graph_module)
        delete_unused_submodules(graph_module)
        graph_module.recompile()
        return PassResult(graph_module, True)


def _drop_unused_inputs(gm: torch.fx.GraphModule) -> None:
    info = graph_info(gm)
    inputs = list(info.input_names)
    lifted = dict(info.lifted_weights or {})
    dropped = []
    for node in list(gm.graph.find_nodes(op="placeholder")):
        if not node.users and (node.target in inputs or node.target in lifted):
            dropped.append(node.target)
            gm.graph.erase_node(node)
    if not dropped:
        return
    update_graph_info(gm, input_names=tuple(n for n in inputs if n not in dropped),
                      lifted_weights=None if info.lifted_weights is None else
                      {n: w for n, w in lifted.items() if n not in dropped},
                      dropped_inputs=(*info.dropped_inputs, *dropped))
