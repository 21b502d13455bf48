"""Small graph-editing helpers shared by the tracer and the passes."""

import contextlib
import gc
import operator

import torch
import torch.fx


@contextlib.contextmanager
def gc_paused():
    """Pause the cyclic garbage collector: tracing makes tens of thousands of short-lived
    objects, and the collections they trigger cost about 5% of a conversion."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


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
    """Dead-code elimination that keeps in-place method calls and `operator.setitem`.

    (`Graph.eliminate_dead_code` would also lint the whole graph first, each time.)
    """
    changed = False
    for node in reversed(graph.nodes):
        if not node.users and not is_impure(node):
            graph.erase_node(node)
            changed = True
    return changed


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
        atoms = name.split(".")
        if any(".".join(atoms[:i]) in deleted for i in range(1, len(atoms))):
            continue
        parent, _, child = name.rpartition(".")
        owner = gm.get_submodule(parent) if parent else gm
        delattr(owner, child)
        deleted.add(name)
    return bool(deleted)


class BoundContainer(torch.nn.Module):
    """A container module whose children are also plain instance attributes.

    Generated code reaches a leaf as `getattr(getattr(self.encoder.block, "0").layer, "0")...`;
    for ordinary modules every step is a `Module.__getattr__` call, a measurable share of a
    small model's forward. Here each step is a plain attribute lookup. Adding, replacing or
    deleting a child keeps the attribute in step with `_modules`.
    """

    def __setattr__(self, name, value):
        torch.nn.Module.__setattr__(self, name, value)
        if name in self._modules:
            self.__dict__[name] = self._modules[name]

    def __delattr__(self, name):
        if name in self._modules:
            self.__dict__.pop(name, None)
        torch.nn.Module.__delattr__(self, name)

    def add_module(self, name, module):
        torch.nn.Module.add_module(self, name, module)
        self.__dict__[name] = module

    register_module = add_module


_BOUND_METHODS = ("__setattr__", "__delattr__", "add_module", "register_module")


def bind_containers(gm: torch.fx.GraphModule) -> None:
    """Give `gm` and the plain containers fx made for it `BoundContainer`'s behaviour.

    The model's own modules (the leaves, shared with the traced model) are left alone.
    `gm`'s class is its own (GraphModule makes one class per instance), so the methods are
    set on that class.
    """
    for module in gm.modules():
        if type(module) is torch.nn.Module:
            module.__class__ = BoundContainer
            module.__dict__.update(module._modules)
    cls = type(gm)
    if cls.__qualname__.endswith("GraphModuleImpl"):  # its own class; `class_name` renames only __name__
        for name in _BOUND_METHODS:
            setattr(cls, name, getattr(BoundContainer, name))
        gm.__dict__.update(gm._modules)
