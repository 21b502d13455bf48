"""Read-only facts about a GraphModule. Nothing here edits a graph.

Nodes are compared by kind (op and target), never by name: names change when a node is
retargeted, kinds do not. `node_kind` spells a kind the way a person reads it.
"""

import collections
import operator
from dataclasses import dataclass

import torch
import torch.fx

from fxconvert.graph_info import graph_info, has_graph_info


def node_kind(node: torch.fx.Node, gm: torch.nn.Module | None = None) -> str:
    """`op target` with a readable target: a function's qualified name, a method's name or a module's class."""
    if node.op == "call_module" and gm is not None:
        try:
            return f"call_module {type(gm.get_submodule(node.target)).__name__}"
        except AttributeError:
            return f"call_module {node.target}"
    if node.op == "call_function":
        return f"call_function {qualified_name(node.target)}"
    if node.op == "call_method":
        return f"call_method {node.target}"
    return node.op


def qualified_name(fn) -> str:
    if getattr(operator, getattr(fn, "__name__", ""), None) is fn:
        return f"operator.{fn.__name__}"
    module = getattr(fn, "__module__", None) or ""
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", repr(fn))
    if module == "torch._C._nn":
        module = "torch.nn.functional"
    elif module.startswith("torch._C"):
        module = "torch"
    return f"{module}.{name}" if module else name


def count_kinds(gm: torch.fx.GraphModule, cache: dict | None = None) -> collections.Counter:
    """How many nodes of each kind. `cache` ((op, target) -> kind) may be shared by calls
    on one graph module whose module paths keep their module types."""
    if cache is None:
        return collections.Counter(node_kind(n, gm) for n in gm.graph.nodes)
    counts = collections.Counter()
    for n in gm.graph.nodes:
        key = (n.op, n.target)
        kind = cache.get(key)
        if kind is None:
            kind = cache[key] = node_kind(n, gm)
        counts[kind] += 1
    return counts


def placeholder_names(gm: torch.fx.GraphModule) -> list[str]:
    return [n.target for n in gm.graph.nodes if n.op == "placeholder"]


def output_names(gm: torch.fx.GraphModule) -> list[str]:
    """Keys of a dict output, or the single output's recorded name."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    value = out.args[0]
    if isinstance(value, dict):
        return list(value)
    kept = graph_info(gm).output_name if has_graph_info(gm) else None
    return [kept or "output"]


@dataclass(frozen=True)
class SharedParameter:
    """A parameter registered under several names in a module (HF weight tying)."""

    names: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def find_shared_parameters(module: torch.nn.Module) -> list[tuple[SharedParameter, torch.nn.Parameter]]:
    """Parameters reachable under more than one qualified name, found by tensor identity."""
    by_id: dict[int, list[str]] = collections.defaultdict(list)
    tensors: dict[int, torch.nn.Parameter] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        by_id[id(p)].append(name)
        tensors[id(p)] = p
    shared = []
    for key, names in by_id.items():
        if len(names) > 1:
            p = tensors[key]
            shared.append((SharedParameter(tuple(names), tuple(p.shape), p.dtype), p))
    return shared
