"""Remove `operator.is_` / `operator.is_not` nodes and FTPipe-style `is_None(x)` / `is_not_None(x)` calls.

FTPipe rewrote every `x is None` in the model source so that tracing would not record
identity checks. Here each check left in a graph is folded to a constant where it can be
decided — the literal None against a node that produces a tensor, or two constants — and
the code that only fed it is removed. A check that cannot be decided (None against a
graph input that may itself be None, say) raises a PassError naming the node and the
source line it came from.
"""

import operator

import torch
import torch.fx
from torch.fx.node import map_arg
from torch.fx.passes.infra.pass_base import PassResult

from fxconvert.errors import PassError, describe_node
from fxconvert.graph_utils import eliminate_dead_code
from fxconvert.passes.contract import GraphPass
from fxconvert.runtime import MAY_RETURN_NONE

# FTPipe's helpers, matched by name since they are defined in user code.
_NAMED_CHECKS = {"is_None": True, "is_not_None": False}


def _check_kind(node: torch.fx.Node):
    """(is_identity, negate) for a None check, else None."""
    if node.op != "call_function":
        return None
    if node.target is operator.is_:
        return "binary", False
    if node.target is operator.is_not:
        return "binary", True
    name = getattr(node.target, "__name__", None)
    if name in _NAMED_CHECKS:
        return "unary", not _NAMED_CHECKS[name]
    return None


def _is_none_value(arg, gm: torch.fx.GraphModule) -> bool | None:
    """True/False when `arg` is decidably None / not None, else None (undecidable).

    A node's recorded meta value decides. Without one, only nodes that cannot produce
    None count as "not None": parameter reads, tensor methods, torch functions and torch.nn
    leaf modules. An item of a tuple (`operator.getitem`) or a graph input may be None.
    """
    if arg is None:
        return True
    if not isinstance(arg, torch.fx.Node):
        return False
    if arg.op == "call_function" and arg.target in MAY_RETURN_NONE:
        return None  # e.g. a padding mask: None at run time when nothing is padded
    if "val" in arg.meta:
        return arg.meta["val"] is None
    if arg.op in ("get_attr", "call_method"):
        return False
    if arg.op == "call_module":
        module = gm.get_submodule(arg.target)
        return False if type(module).__module__.startswith("torch.nn") else None
    if arg.op == "call_function":
        module = getattr(arg.target, "__module__", "") or ""
        if module.startswith("torch"):
            return False
    return None


def _replace_with_constant(node: torch.fx.Node, value) -> None:
    for user in list(node.users):
        user.args = map_arg(user.args, lambda n: value if n is node else n)
        user.kwargs = map_arg(user.kwargs, lambda n: value if n is node else n)


class RemoveNoneChecksPass(GraphPass):  # needs no GraphInfo: it works on any graph
    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        modified = False
        for node in list(graph.nodes):
            kind = _check_kind(node)
            if kind is None:
                continue
            arity, negate = kind
            if arity == "unary":
                operands = [node.args[0] if node.args else node.kwargs.get("x")]
                decided = _is_none_value(operands[0], graph_module)
                value = decided
            else:
                left, right = node.args[:2]
                lv, rv = _is_none_value(left, graph_module), _is_none_value(right, graph_module)
                if left is None or right is None:
                    other = rv if left is None else lv
                    value = other
                elif not isinstance(left, torch.fx.Node) and not isinstance(right, torch.fx.Node):
                    value = left is right
                else:
                    value = None
            if value is None:
                raise PassError(
                    f"cannot decide the None check {describe_node(node)}; give that input a tensor "
                    f"(or drop it from the input names) so the check folds"
                )
            result = (not value) if negate else value
            _replace_with_constant(node, result)
            graph.erase_node(node)
            modified = True
        if modified:
            eliminate_dead_code(graph)
            graph_module.recompile()
        return PassResult(graph_module, modified)
