"""Emit sparse row gradients from the lookups of a shared weight that also has a dense use.

With a tied LM head, T5's shared weight is read by two embedding lookups and one
`F.linear`. A dense lookup's backward builds a zero-filled gradient the size of the whole
vocabulary and adds it in; with `sparse=True` autograd adds the lookup's rows into the
head's dense gradient instead (for t5-small, two 32128x512 fills and two adds per step
saved: about a tenth of a training step). The weight's gradient stays dense and equal to
eager's, because the dense use contributes a dense gradient that the rows are added into.

Without a dense use the same trick would leave the weight with a *sparse* gradient, which
AdamW, `clip_grad_norm_` and all-reduce do not take. Whether a dense use exists is a
property of the final graph: choosing an output (`KeepSingleOutputPass`) can remove the
head. So this pass runs last and decides from the graph as it is, lookup by lookup, both
ways: a lookup becomes sparse exactly when its weight keeps a use that is not a lookup.
Pipeline stages apply the same rule to each stage graph (`sparse_embedding_gradients`).
"""

import torch
import torch.fx
import torch.nn.functional as F
from torch.fx.passes.infra.pass_base import PassResult

from fxconvert.graph_info import graph_info
from fxconvert.passes.contract import GraphPass


def sparse_embedding_gradients(graph: torch.fx.Graph, names) -> bool:
    """Make `F.embedding` lookups of the placeholders `names` sparse exactly when that
    placeholder also has a dense (non-lookup) use, so its gradient is dense either way.
    Returns whether any lookup changed."""
    changed = False
    for node in graph.find_nodes(op="placeholder"):
        if node.target not in names:
            continue
        lookups = [u for u in node.users if u.op == "call_function" and u.target is F.embedding and u.args[1] is node]
        dense_use = len(lookups) < len(node.users)
        for lookup in lookups:
            if lookup.kwargs.get("sparse", False) != dense_use:
                lookup.update_kwarg("sparse", dense_use)
                changed = True
    return changed


class SparsifySharedLookupsPass(GraphPass):
    """Applies `sparse_embedding_gradients` to the weights `LiftSharedWeightsPass` lifted."""

    required = ("lifted_weights",)

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        lifted = graph_info(graph_module).lifted_weights
        modified = sparse_embedding_gradients(graph_module.graph, set(lifted))
        if modified:
            graph_module.recompile()
        return PassResult(graph_module, modified)
