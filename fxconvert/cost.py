"""`fxconvert.cost`: what each node of a converted graph costs at the sizes a user trains at.

The graph is shape-generic, but `node.meta["val"]` holds values at the traced example sizes
(batch 2, encoder 7, decoder 5 tokens). `analyze(conversion, sizes=Sizes(...))` runs the graph
once more on meta tensors (shapes, dtypes and autograd, no data; parameters get meta twins)
at the sizes given, forward and then backward, in training mode, and records per node:

- forward and backward FLOPs, by torch's own rules (`torch.utils.flop_counter.flop_registry`,
  plus the same SDPA formulas for the CPU attention kernels the registry lacks); an op
  without a rule (elementwise, gathers, reductions) counts 0 FLOPs;
- the bytes its ops read and write (views move nothing), so that memory-bound ops (norms,
  softmax, dropout, the loss over a vocabulary) are priced too;
- the predicted seconds of its forward and of its backward: each op costs
  `max(flops / flops_per_s, bytes / bytes_per_s) + per-op overhead` (a roofline, `Roofline`);
- the storages its ops save for backward (`torch.autograd.graph.saved_tensors_hooks`),
  parameters excepted, keyed by storage: two nodes saving one storage hold it once.

Backward ops are attributed to the node whose forward created their autograd node: after
each node runs, the autograd nodes reachable from its outputs that no earlier node created
get a pre-hook naming it.

This is an analysis: it reads the graph and never edits it (see STYLE.md). The pipeline
sums it per stage (`fxconvert.balance`).
"""

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

from fxconvert.errors import UsageError, describe_node
from fxconvert.graph_utils import run_leaf_on_meta
from fxconvert.passes.lift_training_flag_pass import PLACEHOLDER as TRAINING
from fxconvert import families


@dataclass(frozen=True)
class Sizes:
    """The sizes the stages run at: sequences per microbatch, encoder and decoder tokens."""

    batch: int = 8
    encoder_length: int = 512
    decoder_length: int = 128

    def __post_init__(self):
        for name in ("batch", "encoder_length", "decoder_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UsageError(f"{name} must be a positive integer, got {value!r}")

    def length(self, which: str) -> int:
        return self.encoder_length if which == "encoder" else self.decoder_length


@dataclass(frozen=True)
class Roofline:
    """Seconds of one op: the slower of its arithmetic and its memory traffic, plus dispatch.

    The defaults were measured on a 2-core x86 CPU, one torch thread (fp32 GEMM about
    80 GFLOP/s, a large elementwise add about 20 GB/s, a small op about 5 us). Only their
    ratios matter for a balance; `balance="profile"` measures instead of predicting.
    """

    flops_per_s: float = 80e9
    bytes_per_s: float = 20e9
    op_overhead_s: float = 5e-6

    def seconds(self, flops: int, moved: int) -> float:
        return max(flops / self.flops_per_s, moved / self.bytes_per_s) + self.op_overhead_s


@dataclass
class NodeCost:
    """One node's cost at the analysed sizes (bytes moved: read plus written by its ops)."""

    forward_flops: int = 0
    backward_flops: int = 0
    forward_bytes: int = 0
    backward_bytes: int = 0
    forward_seconds: float = 0.0
    backward_seconds: float = 0.0
    saved: dict = field(default_factory=dict)  # storage key -> bytes of that storage, saved for backward
    backward_written: int = 0  # bytes its backward ops create (gradients of its inputs and weights)
    weights: dict = field(default_factory=dict)  # storage key -> bytes of each weight it reads

    @property
    def flops(self) -> int:
        return self.forward_flops + self.backward_flops

    @property
    def seconds(self) -> float:
        return self.forward_seconds + self.backward_seconds


@dataclass
class GraphCost:
    """Per-node costs of a graph at `sizes`, and the value each node computes there (fake tensors)."""

    sizes: Sizes
    roofline: Roofline
    nodes: dict  # torch.fx.Node -> NodeCost
    values: dict  # torch.fx.Node -> its value at `sizes` (a meta tensor, or a container of them)

    def value_bytes(self, node: torch.fx.Node) -> int:
        """Bytes of the tensors a node's value holds at the analysed sizes (what sending it costs)."""
        return sum(t.numel() * t.element_size() for t in pytree.tree_leaves(self.values.get(node))
                   if isinstance(t, torch.Tensor))

    def saved_bytes(self, nodes) -> int:
        """Bytes saved for backward by `nodes` together: each storage once."""
        storages = {}
        for node in nodes:
            storages.update(self.nodes[node].saved)
        return sum(storages.values())

    def backward_bytes(self, nodes) -> tuple[int, int]:
        """What backward through `nodes` (in graph order) holds at its worst, activations included:
        (in a step's first backward, in a later one).

        Backward runs the nodes last to first and frees each node's saved tensors after it. While
        node n's backward runs, what is still saved is what n and the nodes before it saved; beside it
        live the gradient arriving for n's output and what n's backward creates (the gradients of its
        inputs and of its weights). In a step's first backward the weights' gradients appear node by
        node (those of n and the nodes after it exist); in a later one they all exist already (the
        caller counts them), and n's are fresh tensors, added into `.grad` and freed.
        """
        nodes = list(nodes)
        storages, saved, prefix = {}, 0, []
        for node in nodes:
            for key, size in self.nodes[node].saved.items():
                if key not in storages:
                    storages[key] = size
                    saved += size
            prefix.append(saved)
        seen, grads, first, later = set(), 0, 0, 0
        for k in reversed(range(len(nodes))):
            cost = self.nodes[nodes[k]]
            new = sum(size for key, size in cost.weights.items() if key not in seen)
            seen.update(cost.weights)
            grads += new
            arriving = sum(t.numel() * t.element_size() for t in pytree.tree_leaves(self.values.get(nodes[k]))
                           if isinstance(t, torch.Tensor) and t.requires_grad)
            work = prefix[k] + arriving + cost.backward_written
            first, later = max(first, work + grads - new), max(later, work)
        return first, later


# -- FLOP rules ------------------------------------------------------------------------------

def _cpu_sdpa(query, key, value, *args, out_val=None, **kwargs) -> int:
    return sdpa_flop_count(query.shape, key.shape, value.shape)


def _cpu_sdpa_backward(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


# torch's registry, plus its SDPA formulas for the CPU flash-attention kernels it does not list
FLOP_RULES = {
    **flop_registry,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward,
}


def op_flops(func, args, kwargs, out) -> int:
    """FLOPs of one aten op call by `FLOP_RULES` (0 for an op without a rule)."""
    rule = FLOP_RULES.get(func.overloadpacket)
    return int(rule(*args, **kwargs, out_val=out)) if rule is not None else 0


def op_bytes(func, args, kwargs, out) -> int:
    """Bytes one aten op reads and writes: its tensor arguments and results (a view moves nothing;
    a lookup reads only the rows it writes, not its whole table)."""
    if func.is_view or func.overloadpacket in _FREE:
        return 0
    if func.overloadpacket is torch.ops.aten.embedding:
        indices = args[1]
        return indices.numel() * indices.element_size() + 2 * out.numel() * out.element_size()
    return sum(t.numel() * t.element_size() for t in pytree.tree_leaves((args, kwargs, out))
               if isinstance(t, torch.Tensor))


_FREE = {torch.ops.aten.detach, torch.ops.aten.lift_fresh, torch.ops.aten.empty, torch.ops.aten.empty_strided}


class _OpCounter(TorchDispatchMode):
    """Adds each aten op's FLOPs, bytes and roofline seconds to the node that is running."""

    def __init__(self, roofline: Roofline):
        super().__init__()
        self.roofline = roofline
        self.current: NodeCost | None = None
        self.backward = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        cost = self.current
        if cost is not None:
            flops, moved = op_flops(func, args, kwargs, out), op_bytes(func, args, kwargs, out)
            seconds = self.roofline.seconds(flops, moved) if moved or flops else 0.0
            if self.backward:
                cost.backward_flops += flops
                cost.backward_bytes += moved
                cost.backward_seconds += seconds
                if not func.is_view:
                    cost.backward_written += sum(t.numel() * t.element_size() for t in pytree.tree_leaves(out)
                                                 if isinstance(t, torch.Tensor))
            else:
                cost.forward_flops += flops
                cost.forward_bytes += moved
                cost.forward_seconds += seconds
        return out


class _CostInterpreter(torch.fx.Interpreter):
    """Runs the graph on meta tensors, naming the running node for the op counter and the saved-tensor hook.

    Leaf modules and attributes are read through meta twins: one meta leaf tensor (requiring
    grad as the parameter does) per parameter, so a parameter used twice stays one tensor. A
    leaf that runs transformers' code (`fxconvert.trace`) and cannot run on meta tensors is
    priced by a run on zeros of the same shapes (`graph_utils.run_leaf_on_meta`), its backward
    as free.
    """

    def __init__(self, gm, counter: _OpCounter):
        super().__init__(gm, garbage_collect_values=False)
        self.counter = counter
        self.costs: dict = {}
        self.values: dict = {}
        self._owner: dict = {}  # autograd node -> NodeCost of the fx node that created it
        self._meta: dict = {}  # id(tensor) -> its meta twin
        self._twins: dict = {}  # module path -> meta twin of that leaf module
        self._reads: dict = {}  # module path -> what that module reads: its tensors' twins (and other attributes)
        self.weights: set = set()  # storages of the twins: parameters are not activations

    def meta(self, value):
        if not isinstance(value, torch.Tensor):
            return value
        twin = self._meta.get(id(value))
        if twin is None:
            twin = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
            twin = self._meta[id(value)] = twin.requires_grad_(value.requires_grad)
            self.weights.add(twin.untyped_storage()._cdata)
        return twin

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        if next(iter(module.children()), None) is not None:  # a leaf of transformers' own, with submodules
            return self._call_leaf(module, target, args, kwargs)
        twin = self._twins.get(target)
        if twin is None:
            twin = self._twins[target] = copy.copy(module)
            for table in (module._parameters, module._buffers):
                for name, value in table.items():  # instance attributes shadow the module's tables
                    twin.__dict__[name] = self.meta(value)
            self._reads[target] = list(twin.__dict__.values())
        try:
            return twin(*args, **kwargs)
        except Exception:  # a leaf whose eager code cannot run on meta tensors (an expert loop's grouped_mm)
            return run_leaf_on_meta(module, args, kwargs)

    def _call_leaf(self, module, target, args, kwargs):
        """A module with submodules: every tensor below it as its meta twin (a shallow twin would share the
        submodules' real tensors); where its code cannot run on meta tensors, `run_leaf_on_meta`."""
        state = dict(module.named_parameters(remove_duplicate=False))
        state.update(module.named_buffers(remove_duplicate=False))
        state = {name: self.meta(t) for name, t in state.items()}
        self._reads[target] = list(state.values())
        try:
            return torch.func.functional_call(module, state, args, kwargs)
        except Exception:  # noqa: BLE001 - an op without a meta kernel for data-dependent sizes
            return run_leaf_on_meta(module, args, kwargs)

    def call_function(self, target, args, kwargs):
        if target is torch.nn.functional.embedding and kwargs.get("sparse"):
            # Sparse gradients have no meta kernels; a pipeline stage whose only use of the shared
            # weight is a lookup gets a dense one back anyway (`stages._build`).
            kwargs = {**kwargs, "sparse": False}
        return super().call_function(target, args, kwargs)

    def get_attr(self, target, args, kwargs):
        return self.meta(super().get_attr(target, args, kwargs))

    def run_node(self, n):
        cost = self.costs[n] = NodeCost()
        self.counter.current = cost
        try:
            value = super().run_node(n)
        except Exception as e:
            raise RuntimeError(f"cost analysis could not run {describe_node(n)}: {type(e).__name__}: {e}") from e
        finally:
            self.counter.current = None
        self.values[n] = value
        self._claim(value, cost)
        reads = [self.values.get(a) for a in n.all_input_nodes]
        reads += [value] if n.op == "get_attr" else self._reads[n.target] if n.op == "call_module" else []
        for t in pytree.tree_leaves(reads):
            if isinstance(t, torch.Tensor) and t.requires_grad and t.untyped_storage()._cdata in self.weights:
                cost.weights[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return value

    def _claim(self, value, cost):
        todo = [t.grad_fn for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        while todo:
            fn = todo.pop()
            if fn is None or fn in self._owner:
                continue
            self._owner[fn] = cost
            fn.register_prehook(self._prehook(cost))
            todo.extend(next_fn for next_fn, _ in fn.next_functions)

    def _prehook(self, cost):
        def hook(grad_outputs):
            self.counter.current = cost
        return hook

    def pack(self, tensor):
        cost = self.counter.current
        storage = tensor.untyped_storage()
        if cost is not None and storage._cdata not in self.weights:  # parameters (and views of them) apart
            cost.saved[storage._cdata] = storage.nbytes()
        return tensor


def analyze(conversion, *, sizes: Sizes = Sizes(), roofline: Roofline = Roofline()) -> GraphCost:
    """Cost of every node of `conversion.graph_module` at `sizes`, in training mode (see the module docstring)."""
    gm = conversion.graph_module
    module = conversion.module
    args, weights = [], []
    for p in gm.graph.find_nodes(op="placeholder"):
        if p.target == TRAINING:
            args.append(True)
        elif p.target in module.shared_names:
            weight = getattr(module, p.target)
            weights.append(torch.empty(weight.shape, dtype=weight.dtype, device="meta").requires_grad_())
            args.append(weights[-1])
        else:
            args.append(_input_at(p, sizes, families.input_specs(conversion.model_class)))
    return run_costs(gm, args, sizes=sizes, roofline=roofline, weights=weights)


def run_costs(gm: torch.fx.GraphModule, args, *, sizes: Sizes | None = None, roofline: Roofline = Roofline(),
              weights=()) -> GraphCost:
    """Run `gm` on `args` (meta tensors; the module's own parameters get meta twins), forward then backward of
    every output that requires grad (with gradients of ones), and record each node's cost.

    `weights`: tensors among `args` that are parameters (their storages are not activations).
    """
    counter = _OpCounter(roofline)
    interpreter = _CostInterpreter(gm, counter)
    interpreter.weights.update(w.untyped_storage()._cdata for w in weights)
    with counter, torch.autograd.graph.saved_tensors_hooks(interpreter.pack, lambda t: t):
        out = interpreter.run(*args)
        counter.backward = True
        tensors = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
        if tensors:
            torch.autograd.backward(tensors, [torch.ones_like(t) for t in tensors])
    return GraphCost(sizes, roofline, interpreter.costs, interpreter.values)


def _input_at(placeholder: torch.fx.Node, sizes: Sizes, specs) -> torch.Tensor:
    """A model input at `sizes`: batch first, then the encoder or decoder length (the family's input specs)."""
    val = placeholder.meta.get("val")
    if placeholder.target not in specs or not isinstance(val, torch.Tensor):
        raise UsageError(f"cannot size the input '{placeholder.target}' for a cost analysis; "
                         f"known inputs are {', '.join(specs)}")
    kind, which = specs[placeholder.target]
    # A meta attention mask reads as padded (`runtime.padding_mask`): the dearer case is priced.
    # a class id per row (a classifier's labels), else a value per position
    shape = (sizes.batch,) if kind == "class" else (sizes.batch, sizes.length(which), *val.shape[2:])
    return torch.empty(shape, dtype=val.dtype, device="meta")


def parameter_bytes(tensors) -> int:
    """Bytes of distinct tensors (a tensor listed twice counts once)."""
    seen = {id(t): t for t in tensors}
    return sum(t.numel() * t.element_size() for t in seen.values())


def flops_text(flops: float) -> str:
    """FLOPs as a person reads them: 1.23 GFLOP."""
    if not flops:
        return "0"
    units = ["", "k", "M", "G", "T", "P"]
    power = min(int(math.log10(abs(flops)) // 3), len(units) - 1)
    return f"{flops / 1000 ** power:.3g} {units[power]}FLOP"


__all__ = ["Sizes", "Roofline", "NodeCost", "GraphCost", "analyze", "run_costs", "op_flops", "op_bytes", "FLOP_RULES",
           "parameter_bytes", "flops_text"]
