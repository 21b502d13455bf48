"""Small graph-editing helpers shared by the tracer and the passes, and how a leaf runs on meta tensors."""

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


# -- leaves on meta tensors --------------------------------------------------------------------


def leaf_outputs(module: torch.nn.Module, args, kwargs):
    """What leaf `module` returns for `args` and `kwargs` (meta tensors), as meta tensors, without its weights
    (see `eager_outputs`)."""
    state = dict(module.named_parameters(remove_duplicate=False))
    state.update(module.named_buffers(remove_duplicate=False))
    return eager_outputs(lambda weights, a, k: torch.func.functional_call(module, weights, a, k), state, args, kwargs)


def eager_outputs(run, state: dict, args, kwargs):
    """What eager code `run(state, args, kwargs)` returns for meta `args` and `kwargs`, as meta tensors.

    It runs on meta copies of the tensors in `state`; where an op cannot size its output on meta
    tensors (`nonzero`, or `grouped_mm`, whose meta kernel wants bf16), on zeros of the same
    shapes (the weights expanded from one zero, so no memory), and for an op that wants dense
    weights, on real zeros (one leaf's worth). No gradient is recorded.
    """
    with torch.no_grad():
        try:
            meta = {k: torch.empty_like(v, device="meta") for k, v in state.items()}
            out = run(meta, args, kwargs)
        except Exception:
            real = torch.utils._pytree.tree_map_only(
                torch.Tensor, lambda t: torch.zeros(t.shape, dtype=t.dtype), (args, kwargs))
            try:
                zeros = {k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in state.items()}
                out = run(zeros, real[0], real[1])
            except Exception:
                zeros = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in state.items()}
                out = run(zeros, real[0], real[1])
    return torch.utils._pytree.tree_map_only(
        torch.Tensor, lambda t: t.detach() if t.device.type == "meta" else torch.empty_like(t, device="meta"), out)


class _LeafOnMeta(torch.autograd.Function):
    """A leaf's meta outputs, joined to its tensor inputs for autograd (their gradients are zeros), so a
    backward on meta tensors still reaches the nodes before the leaf."""

    @staticmethod
    def forward(ctx, outputs, *inputs):
        ctx.inputs = [(t.shape, t.dtype) if t.is_floating_point() else None for t in inputs]
        return tuple(t.clone() for t in outputs)

    @staticmethod
    def backward(ctx, *grads):
        return (None, *(None if s is None else torch.zeros(s[0], dtype=s[1], device="meta") for s in ctx.inputs))


def run_leaf_on_meta(module: torch.nn.Module, args, kwargs=None):
    """Leaf `module` called on meta `args`: its outputs as `leaf_outputs` computes them, with a gradient path
    back to the inputs that need one (a meta backward then prices everything before the leaf)."""
    kwargs = kwargs or {}
    out = leaf_outputs(module, args, kwargs)
    inputs = [t for t in torch.utils._pytree.tree_leaves((args, kwargs))
              if isinstance(t, torch.Tensor) and t.requires_grad]
    if not inputs or not torch.is_grad_enabled():
        return out
    flat, spec = torch.utils._pytree.tree_flatten(out)
    tensors = [i for i, t in enumerate(flat) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    joined = _LeafOnMeta.apply([flat[i] for i in tensors], *inputs)
    for i, t in zip(tensors, joined):
        flat[i] = t
    return torch.utils._pytree.tree_unflatten(flat, spec)


class MetaLeaf(torch.nn.Module):
    """Stands in for a leaf in a copy of a graph run on meta tensors (`run_leaf_on_meta`)."""

    def __init__(self, leaf: torch.nn.Module):
        super().__init__()
        self.leaf = leaf

    def forward(self, *args, **kwargs):
        return run_leaf_on_meta(self.leaf, args, kwargs)


def leaves_on_meta(gm: torch.nn.Module, paths) -> None:
    """Replace the leaves at `paths` in `gm` (a copy about to run on meta tensors) by `MetaLeaf`s."""
    for path in paths:
        try:
            leaf = gm.get_submodule(path)
        except AttributeError:
            continue  # not in this stage
        parent, _, name = path.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, name, MetaLeaf(leaf))
