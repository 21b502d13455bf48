"""Replace every train/eval constant that tracing froze with one boolean placeholder, `training`.

Tracing evaluates `self.training` once, so a graph records `training=False` (or True) and,
in transformers' attention, `dropout=0.0 if not self.training else rate`. This pass adds
a `training` placeholder (default False) as the graph's last input and rewires:

- dropout modules (`nn.Dropout` and its variants) -> `F.dropout(x, p, training)`;
- any call with a constant `training=` argument (`F.dropout`, ...) -> the placeholder;
- `F.scaled_dot_product_attention(dropout_p=c)` (and `runtime.causal_attention`) -> `dropout_p = training * rate`.

The rate used when training is the configured one even for an eval-mode trace, where
transformers passes 0.0: the tracer records each attention module's rate in
`GraphInfo.dropout_rates` (`fxconvert.graph_info`), keyed by module path, and nodes carry their module path.
"""

import operator

import torch
import torch.fx
import torch.nn.functional as F
from torch.fx.passes.infra.pass_base import PassResult

from fxconvert import runtime
from fxconvert.graph_info import graph_info
from fxconvert.passes.contract import GraphPass

PLACEHOLDER = "training"

_DROPOUT_MODULES = {
    torch.nn.Dropout: F.dropout,
    torch.nn.Dropout1d: F.dropout1d,
    torch.nn.Dropout2d: F.dropout2d,
    torch.nn.Dropout3d: F.dropout3d,
    torch.nn.AlphaDropout: F.alpha_dropout,
    torch.nn.FeatureAlphaDropout: F.feature_alpha_dropout,
}
_DROPOUT_FUNCTIONS = set(_DROPOUT_MODULES.values())
# Positional index of `training` in the functional signatures above: f(input, p, training, inplace).
_TRAINING_INDEX = 2
_P_INDEX = 1
# Attention calls with a `dropout_p` (the runtime leaf takes it by keyword only).
_ATTENTION_FUNCTIONS = {F.scaled_dot_product_attention, runtime.causal_attention}


def _training_placeholder(graph: torch.fx.Graph) -> tuple[torch.fx.Node, bool]:
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for n in placeholders:
        if n.target == PLACEHOLDER:
            return n, False
    with graph.inserting_after(placeholders[-1]) if placeholders else graph.inserting_before():
        node = graph.placeholder(PLACEHOLDER, type_expr=bool, default_value=False)
    return node, True


def _configured_rate(gm, node, recorded):
    rates = graph_info(gm).dropout_rates
    if recorded == 0.0 and node.meta.get("module_path") in rates:
        return rates[node.meta["module_path"]]
    return recorded


class LiftTrainingFlagPass(GraphPass):
    required = ("dropout_rates",)  # without them an eval-mode trace's attention dropout would stay 0.0

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        training, modified = _training_placeholder(graph)
        for node in list(graph.nodes):
            if node.op == "call_module":
                module = graph_module.get_submodule(node.target)
                fn = _DROPOUT_MODULES.get(type(module))
                if fn is None:
                    continue
                with graph.inserting_before(node):
                    new = graph.call_function(fn, (node.args[0],), {"p": module.p, "training": training,
                                                                    "inplace": module.inplace})
                new.meta = dict(node.meta)
                node.replace_all_uses_with(new)
                graph.erase_node(node)
                modified = True
            elif node.op == "call_function" and node.target in _ATTENTION_FUNCTIONS:
                p = node.kwargs.get("dropout_p", node.args[4] if len(node.args) > 4 else 0.0)
                if isinstance(p, torch.fx.Node):
                    continue  # already driven by the flag
                rate = _configured_rate(graph_module, node, p)
                if rate == 0.0:
                    continue
                with graph.inserting_before(node):
                    p_node = graph.call_function(operator.mul, (training, rate))
                p_node.meta["module_path"] = node.meta.get("module_path")
                args = tuple(node.args[:4])
                kwargs = dict(node.kwargs)
                if len(node.args) > 4:
                    kwargs.update(zip(("dropout_p", "is_causal", "scale"), node.args[4:]))
                kwargs["dropout_p"] = p_node
                node.args, node.kwargs = args, kwargs
                modified = True
            elif node.op in ("call_function", "call_method"):
                modified |= self._rewire_training_argument(graph_module, node, training)
        if modified:
            graph_module.recompile()
        return PassResult(graph_module, modified)

    @staticmethod
    def _rewire_training_argument(gm, node, training) -> bool:
        changed = False
        if isinstance(node.kwargs.get("training"), bool):
            node.update_kwarg("training", training)
            changed = True
        elif node.target in _DROPOUT_FUNCTIONS and len(node.args) > _TRAINING_INDEX and isinstance(
            node.args[_TRAINING_INDEX], bool
        ):
            node.update_arg(_TRAINING_INDEX, training)
            changed = True
        if changed and node.target in _DROPOUT_FUNCTIONS:
            p = node.kwargs.get("p", node.args[_P_INDEX] if len(node.args) > _P_INDEX else 0.5)
            rate = _configured_rate(gm, node, p)
            if rate != p:
                if "p" in node.kwargs:
                    node.update_kwarg("p", rate)
                else:
                    node.update_arg(_P_INDEX, rate)
        return changed
