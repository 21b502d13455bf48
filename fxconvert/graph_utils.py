"""Small graph-editing helpers shared by the tracer and the passes."""

import operator

import torch
import torch.fx


def is_impure(node: torch.fx.Node) -> bool:
    """Nodes dead-code elimination must keep: inputs, output, in-place methods and setitem."""
    if node.op in ("placeholder", "output"):
        return True
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op == "call_function":
        return node.target in (operator.setitem, torch._assert)
    return False


def eliminate_dead_code(graph: torch.fx.Graph) -> bool:
    """Dead-code elimination that keeps in-place method calls and `operator.setitem`."""
    return graph.eliminate_dead_code(is_impure_node=is_impure)


def delete_unused_submodules(gm: torch.fx.GraphModule) -> bool:
    """Delete submodules no node refers to; linear in the module count.

    (`GraphModule.delete_all_unused_submodules` tests membership in a list, which is
    quadratic and shows at 48 layers.)
    """
    used = set()
    for node in gm.graph.nodes:
        if node.op in ("call_module", "get_attr"):
            atoms = node.target.split(".")
            used.update(".".join(atoms[: i + 1]) for i in range(len(atoms)))
            if node.op == "call_module":
                for name, _ in gm.get_submodule(node.target).named_modules(prefix=node.target):
                    used.add(name)
    unused = [name for name, _ in gm.named_modules() if name and name not in used]
    # Delete the outermost unused modules only; their children go with them.
    deleted = set()
    for name in unused:
        if any(name.startswith(d + ".") for d in deleted):
            continue
        parent, _, child = name.rpartition(".")
        owner = gm.get_submodule(parent) if parent else gm
        delattr(owner, child)
        deleted.add(name)
    return bool(deleted)
