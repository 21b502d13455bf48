"""Trace transformers 5 models of the supported families (`fxconvert.families`) into torch.fx GraphModules.

`torch.fx.symbolic_trace` cannot trace them under transformers 5: forwards take `**kwargs`
behind decorators, layer norms branch on `weight.dtype`, attention unpacks shapes into
new shapes, and masks come from helpers that inspect config and cache objects. This
tracer handles each of those without touching transformers' source:

- Every traced value carries a meta-device twin in `node.meta["val"]`, computed as the
  node is recorded. Static facts (dtype, rank) are answered from it; sizes stay symbolic
  (`x.shape` is a node whose items are nodes), so the graph is shape-generic. Each
  distinct op on distinct argument metadata runs on meta tensors once: repeated layers
  hit a cache, so tracing stays linear in depth and cheap.
- The root's signature is built from `input_names`; the model is called by keyword with
  `use_cache=False`, and its ModelOutput becomes a dict of its non-None tensors.
- Within the modeling modules' namespaces, and only while tracing, the mask helpers are
  replaced by calls of `fxconvert.runtime` leaf functions, the SDPA attention function by
  a traceable equivalent, and `isinstance` by one that answers for a traced value from the
  tensor it stands for (so T5's fp32 `wo` guard works in fp16 models). Modules built on
  the fly (a loss) are traced through.
- A submodule whose Python decides on traced values (an expert loop over `nonzero`, a table
  grown when a length exceeds it) becomes one `call_module` leaf that runs its eager code,
  as HFTracer did: its partial trace is rolled back and the call recorded instead, the
  smallest enclosing submodule first. Its output metadata comes from running it on meta
  tensors, or, where an op has no meta kernel for data-dependent sizes, on zeros of the
  same shapes (its weights expanded from one zero, so no memory; real zeros, one leaf's
  weights, for an op that wants them dense, such as grouped_mm). `TraceResult.leaves` names
  each leaf's path and the source line that forced it. A leaf may not hold a shared weight.
  A function of the model's own modeling module that decides on traced values (LongT5's
  `_split_into_blocks`) is recorded as one `call_function` leaf running transformers'
  function, before its enclosing module is tried; `TraceResult.leaves` names it `module.function()`.
- Anything else that cannot be traced (or anything at all, with `leaves=False`) raises
  `TraceError` naming the module path and the source line.
"""

import collections
import contextlib
import copy
import dataclasses
import functools
import inspect
import operator
import os
import sys
import time
import weakref
from dataclasses import dataclass

import torch
import torch.fx
from torch.fx._lazy_graph_module import _LazyGraphModule
from torch.fx.node import map_arg
from torch.fx.proxy import Attribute, Proxy

from fxconvert import families, runtime
from fxconvert.errors import FxConvertError, InputNameError, TraceError, with_article
from fxconvert.graph_info import GraphInfo, set_graph_info
from fxconvert.inputs import SIZE_PROBES, build_inputs, config_sizes
from fxconvert.graph_utils import (bind_containers, eager_outputs, eliminate_dead_code, gc_paused, is_impure,
                                   leaf_outputs)

SUPPORTED_ATTENTION = ("sdpa", "eager")

_EXAMPLE_SIZES = SIZE_PROBES[0]  # only feed meta tensors; the graph does not depend on them

_HERE = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
_SKIP_FILES = (_HERE + os.sep, _TORCH_DIR + os.sep, contextlib.__file__, functools.__file__)
_SKIP_CODE: dict = {}  # code object -> whether its frames are tracer plumbing


def trace(model: torch.nn.Module, input_names=None, *, leaves: bool = True) -> torch.fx.GraphModule:
    """Trace a model of a supported family into a GraphModule whose forward takes exactly `input_names`.

    The GraphModule returns a dict of the model's non-None output tensors keyed by their
    ModelOutput field names (e.g. `loss`, `logits`, `encoder_last_hidden_state`). It
    works at any batch size and sequence lengths, and for models on the meta device.
    """
    return trace_with_stats(model, input_names, leaves=leaves).graph_module


@dataclass
class TraceResult:
    graph_module: torch.fx.GraphModule
    seconds: float
    leaves: dict[str, str] = dataclasses.field(default_factory=dict)  # leaf module path -> the source line


@functools.cache
def require_transformers() -> None:
    """Refuse a transformers release outside the range fxconvert declares (and is tested on).

    pip enforces the range on install, but not in an environment where transformers was
    installed first and fxconvert without its dependencies; there an older release fails
    deep inside a trace. The range is read from the installed package's metadata, so
    pyproject.toml stays its one source.
    """
    import importlib.metadata

    import transformers
    from packaging.requirements import Requirement

    try:
        requires = importlib.metadata.requires("fxconvert") or []
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return
    for line in requires:
        req = Requirement(line)
        if req.name == "transformers" and req.marker is None:
            if not req.specifier.contains(transformers.__version__, prereleases=True):
                raise FxConvertError(f"transformers {transformers.__version__} is installed, but fxconvert "
                                     f"needs transformers{req.specifier}; install it with pip install "
                                     f"'transformers{req.specifier}'")


def trace_with_stats(model: torch.nn.Module, input_names=None, *, leaves: bool = True) -> TraceResult:
    start = time.perf_counter()
    require_transformers()
    cls_name = supported_class(model).__name__
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl not in SUPPORTED_ATTENTION:
        raise TraceError(
            f"attention implementation '{impl}' is not supported; load the model with "
            f"attn_implementation='sdpa' or 'eager'"
        )
    _check_family_limits(model, cls_name)
    input_names = input_name_list(input_names) if input_names is not None else default_input_names(model)
    _check_input_names(model, input_names)

    tracer = TransformersTracer(input_names, leaves=leaves)
    with gc_paused(), _leaf_replacements(model, tracer):
        try:
            graph = tracer.trace(model)
        except TraceError:
            raise
        except Exception as e:
            raise TraceError(_explain_failure(e, cls_name)) from e
    # A lazy GraphModule generates its code on first use, not at every pass's recompile().
    gm = _LazyGraphModule(model, graph, class_name=f"{cls_name}Traced")
    bind_containers(gm)
    eliminate_dead_code(gm.graph)
    gm.recompile()
    # Attention modules keep their configured dropout rate; an eval-mode trace records 0.0.
    rates = {path: rate for path, m in model.named_modules() if (rate := attention_dropout_rate(m)) is not None}
    set_graph_info(gm, GraphInfo(model_class=cls_name, input_names=tuple(input_names),
                                 traced_training=model.training, dropout_rates=rates))
    return TraceResult(gm, time.perf_counter() - start, dict(tracer.leaves))


def attention_dropout_rate(module) -> float | None:
    """The dropout rate a module passes to its attention function when training, or None.

    T5 holds it as a float `dropout`; BERT as an `nn.Dropout` whose `p` it passes, GPT-2 as
    one named `attn_dropout` (0.0 in eval mode, so an eval-mode trace records 0.0 and the
    rate must come from here); the Llama-style attentions as a float `attention_dropout`.
    Only attention modules (every supported family names their classes `...Attention`):
    a BART layer's float `dropout` is its hidden-state rate, and the pass would otherwise give
    it to the layer's activation dropout, whose rate 0.0 is the configured one, not an eval trace's.
    """
    if "Attention" not in type(module).__name__:
        return None
    for name in ("dropout", "attn_dropout", "attention_dropout"):
        rate = getattr(module, name, None)
        if isinstance(rate, torch.nn.Dropout) and not isinstance(module, torch.nn.Dropout):
            rate = rate.p
        if isinstance(rate, float):
            return float(rate)
    return None


def _check_family_limits(model, cls_name: str) -> None:
    """Refuse what the family record says a graph cannot record for this model (`Family.check_trace`)."""
    check = family_of(model).check_trace
    if check is None:
        return
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    why = check(model.config, model.training, str(dtype).removeprefix("torch."))
    if why:
        raise TraceError(f"cannot trace {cls_name}: {why}")


def supported_class(model) -> type:
    """The transformers class of a family record that `model` is, or is a subclass of.

    The tracer knows the supported classes' forward (its mask helpers, attention, output
    type), so a subclass is accepted only when it keeps that forward; one that overrides
    it computes something the trace would not reproduce.
    """
    cls = type(model)
    supported = families.supported_classes()
    base = next((c for c in cls.__mro__ if c.__name__ in supported
                 and c.__module__.startswith("transformers.")), None)
    if base is None:
        base = _derived_class(model)
    if base is None:
        raise TraceError(f"{cls.__name__!r} is not supported; fxconvert traces {families.describe_supported()}, "
                         f"any other transformers model that takes input_ids, and their subclasses that keep forward")
    if cls.forward is not base.forward:
        owner = next(c for c in cls.__mro__ if "forward" in vars(c))
        raise TraceError(f"{cls.__name__!r} is {with_article(base.__name__)} whose forward is overridden (by "
                         f"{owner.__name__!r}), which fxconvert cannot know it reproduces; keep "
                         f"{base.__name__}.forward and put the change in a submodule, or convert the "
                         f"{base.__name__} itself")
    return base


def _derived_class(model) -> type | None:
    """The transformers class of a model that no hand-written record lists, its record derived from its
    declarations (`fxconvert.families.derived`, carrying over the rules of its type's hand-written record,
    if any) and registered; None for a model that is not one."""
    if "transformers" not in sys.modules:
        return None
    from fxconvert.families import derived

    base = next((c for c in type(model).__mro__ if c.__module__.startswith("transformers.")), None)
    if base is None or not derived.derivable(base):
        return None
    record = families.family_of_class(base.__name__)
    if record is None or record.derived_from and _DERIVED_FOR.get(model) is not record:
        _DERIVED_FOR[model] = derived.derive(base, model.config, model)  # its blocks are this model's
    return base


# The record derived for each model object, so that it is derived once per model, not per question.
_DERIVED_FOR = weakref.WeakKeyDictionary()


def family_of(model) -> families.Family:
    """The family record of a supported model (see `supported_class`)."""
    return families.family_of_class(supported_class(model).__name__)


def default_input_names(model) -> list[str]:
    return family_of(model).default_input_names(supported_class(model).__name__)


def forward_parameters(model):
    """The parameters of the model's undecorated forward."""
    return inspect.signature(inspect.unwrap(type(model).forward)).parameters


def accepted_input_names(model) -> list[str]:
    params = forward_parameters(model)
    return [n for n in family_of(model).inputs if n in params]


def input_name_list(input_names) -> list[str]:
    """`input_names` as a list, refusing a bare string (list("input_ids") would be its letters)."""
    if isinstance(input_names, (str, bytes)):
        raise InputNameError(f"input_names is the string {input_names!r}; give a list of names, "
                             f"e.g. [{input_names!r}]")
    if not isinstance(input_names, (list, tuple)):  # a set or dict has no order to give the inputs
        raise InputNameError(f"input_names is {with_article(type(input_names).__name__)}; give a list of names in the "
                             f"order the module takes them")
    odd = [n for n in input_names if not isinstance(n, str)]
    if odd:
        raise InputNameError(f"input names must be strings, got {odd[0]!r}; give a list of names such as "
                             f"['input_ids', 'attention_mask']")
    return list(input_names)


def _check_input_names(model, input_names):
    accepted = accepted_input_names(model)
    unknown = [n for n in input_names if n not in accepted]
    if unknown:
        raise InputNameError(
            f"unknown input name(s) {', '.join(unknown)} for {supported_class(model).__name__}; "
            f"choose from {', '.join(accepted)}"
        )
    if len(set(input_names)) != len(input_names):
        raise InputNameError(f"input names repeat: {', '.join(input_names)}; give each once")
    if not any(n in input_names for n in ("input_ids", "inputs_embeds")):
        raise InputNameError("the inputs need 'input_ids' (or 'inputs_embeds'); add it to the input names")


class _TracedValue:
    """Behaviour shared by every proxy the tracer hands to model code."""

    def _meta(self):
        return self.node.meta.get("val")

    @property
    def dtype(self):
        meta = self._meta()
        if isinstance(meta, torch.Tensor):
            return meta.dtype
        return Attribute(self, "dtype")

    @property
    def ndim(self):
        meta = self._meta()
        if isinstance(meta, torch.Tensor):
            return meta.ndim
        return Attribute(self, "ndim")

    def dim(self):
        meta = self._meta()
        if isinstance(meta, torch.Tensor):
            return meta.dim()
        return self.tracer.create_proxy("call_method", "dim", (self,), {})

    def is_floating_point(self):
        return self._meta().is_floating_point()

    def __len__(self):
        meta = self._meta()
        if isinstance(meta, (tuple, list)):  # a shape: its length is the rank, a static fact
            return len(meta)
        raise self.tracer.untraceable("len() of a tensor would freeze its first dimension")

    def __iter__(self):
        return self.tracer.iter(self)

    def __setitem__(self, key, value):
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})

    def __getattr__(self, name):
        return _TracedAttribute(self, name)


def _in_place(method: str):
    """`t op= x` on a traced tensor: the in-place method, as on the tensor itself (Switch Transformers'
    router scales its caller's hidden states by `hidden_states *= noise`); a traced size rebinds instead."""
    def augmented(self, other):
        if not isinstance(self._meta(), torch.Tensor):
            return NotImplemented
        return self.tracer.create_proxy("call_method", method, (self, other), {})
    return augmented


for _op, _method in (("iadd", "add_"), ("isub", "sub_"), ("imul", "mul_"), ("itruediv", "div_")):
    setattr(_TracedValue, f"__{_op}__", _in_place(_method))


class _TracedProxy(_TracedValue, Proxy):
    pass


class _TracedAttribute(_TracedValue, Attribute):
    pass


class TransformersTracer(torch.fx.Tracer):
    """A torch.fx Tracer for the transformers models of every family in `fxconvert.families`: it
    propagates meta tensors and builds the root from `input_names`."""

    # A buffer read in a forward (BERT's `position_ids`) is a get_attr node, so slicing it by
    # a traced length stays in the graph; the graph module registers it as a persistent buffer.
    proxy_buffer_attributes = True

    def __init__(self, input_names, leaves: bool = True):
        super().__init__()
        self.allow_leaves = leaves
        self.leaves: dict[str, str] = {}  # module path -> the source line that made it a leaf
        self._attr_proxies = None  # fx's parameter proxy cache, pruned when a partial trace is rolled back
        self._shared_ids: set = set()
        self._leaf_functions: set = set()  # the model functions recorded as call_function leaves
        self._restore_names = contextlib.nullcontext  # set by _leaf_replacements
        self.input_names = list(input_names)
        self._meta_params: dict[str, torch.Tensor] = {}
        self._meta_modules: dict[str, torch.nn.Module] = {}
        self._meta_cache: dict = {}
        self._module_keys: dict = {}
        self._stack_snapshot = None
        self._path_stack: list[str] = []

    # -- root ---------------------------------------------------------------------------
    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        model = self.root
        names = self.input_names
        # Looked up before fx patches Module.__getattr__ (this runs ahead of tracing).
        self._modules = dict(model.named_modules(remove_duplicate=False))
        tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
        self._attributes = dict(tensors)
        seen = set()
        for _, value in model.named_parameters(remove_duplicate=False):
            (self._shared_ids if id(value) in seen else seen).add(id(value))
        # First registered name of each parameter/buffer, as fx's own lookup finds it, but O(1).
        self._attribute_names = {}
        for name, value in tensors:
            self._attribute_names.setdefault(id(value), name)
        example = _example_inputs(model, names)
        placeholders = []
        for name in names:
            proxy = self.create_proxy("placeholder", name, (), {})
            proxy.node.meta["val"] = example[name]
            placeholders.append(proxy)
        extra = {}
        if "use_cache" in forward_parameters(model):
            extra["use_cache"] = False

        def root(self_, *args):
            output = root_fn(self_, **dict(zip(names, args)), **extra, return_dict=True)
            # its tensors: T5Gemma returns its decoder's last hidden state again as a tuple, without
            # output_hidden_states, which no caller of a graph asks for
            return {k: v for k, v in output.items() if v is not None and type(v) not in (tuple, list)}

        root.__signature__ = inspect.Signature(
            [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
            + [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
        )
        return root, [model, *placeholders]

    # -- proxies and meta propagation ---------------------------------------------------
    def create_arg(self, a):
        """Fast path for what model code passes most: proxies, plain constants and flat tuples.

        (fx's own fast path matches the exact Proxy class only; this tracer's proxies are a
        subclass, which would walk every generic check first.)
        """
        if isinstance(a, Proxy):
            return a.node
        kind = type(a)
        if kind in _PLAIN_ARGS:
            return a
        if kind is tuple or kind is list:
            return kind(self.create_arg(x) for x in a)
        node = super().create_arg(a)
        if isinstance(a, torch.Tensor) and isinstance(node, torch.fx.Node) and "val" not in node.meta:
            # a tensor the forward built from constants (T5Gemma's `torch.tensor(hidden_size**0.5)`), kept as a
            # get_attr of the root: its metadata is its own
            node.meta["val"] = _to_meta(a)
        return node

    def proxy(self, node):
        return _TracedProxy(node, self)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        """fx copies the module stack into every node's meta["nn_module_stack"]; nodes made
        in the same module call share one copy here (a call's key, path@n, names its chain)."""
        stack = self.module_stack
        if not stack:
            return super().create_node(kind, target, args, kwargs, name, type_expr)
        snapshot = self._stack_snapshot
        if snapshot is None or len(snapshot) != len(stack) or next(reversed(snapshot)) != next(reversed(stack)):
            snapshot = self._stack_snapshot = copy.copy(stack)
        self.module_stack = _NO_STACK
        try:
            node = super().create_node(kind, target, args, kwargs, name, type_expr)
        finally:
            self.module_stack = stack
        node.meta["nn_module_stack"] = snapshot
        return node

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        node = proxy.node
        if self._path_stack:
            node.meta["module_path"] = self._path_stack[-1]
        node.meta["source"] = _user_source()
        if kind != "placeholder":
            try:
                node.meta["val"] = self._compute_meta(node)
            except TraceError:
                raise
            except Exception as e:
                raise self.untraceable(
                    f"could not compute {node.format_node()} on meta tensors ({type(e).__name__}: {e})"
                ) from e
        return proxy

    def _compute_meta(self, node):
        if node.op == "get_attr":
            if node.target not in self._meta_params:
                self._meta_params[node.target] = _to_meta(self._attributes[node.target])
            return self._meta_params[node.target]

        def val(n):
            return n.meta["val"]

        args = map_arg(node.args, val)
        kwargs = map_arg(node.kwargs, val)
        # Repeated layers repeat the same ops on the same metadata: compute each once.
        key = None
        if not is_impure(node):
            try:
                target = self._module_key(node.target) if node.op == "call_module" else node.target
                key = (node.op, target, _meta_key(args), _meta_key(kwargs))
                hit = self._meta_cache.get(key)
            except (_Unkeyable, TypeError):
                key = hit = None
            if hit is not None:
                return _fresh_meta(hit)
        result = self._run_meta(node, args, kwargs)
        if key is not None:
            self._meta_cache[key] = result
        return result

    def _module_key(self, target):
        """What a leaf module's output metadata can depend on besides its arguments: its class,
        its configuration (`extra_repr`) and its parameters' and buffers' metadata."""
        key = self._module_keys.get(target)
        if key is None:
            module = self._modules[target]
            tensors = (*module._parameters.values(), *module._buffers.values())
            if target in self.leaves:  # its eager code: every tensor below it, and its settings (`is_decoder`)
                tensors = (*module.parameters(), *module.buffers())
                settings = tuple((k, v) for m in module.modules() for k, v in vars(m).items()
                                 if type(v) in _SCALARS and not k.startswith("_"))
                key = (type(module), module.extra_repr(), settings, tuple(_meta_key(t) for t in tensors))
            else:
                key = (type(module), module.extra_repr(), tuple(_meta_key(t) for t in tensors))
            self._module_keys[target] = key
        return key

    def _run_meta(self, node, args, kwargs):
        if node.op == "call_function" and node.target in self._leaf_functions:
            return self._eager_meta(lambda state, a, k: node.target(*a, **k), {}, args, kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "call_module" and node.target in self.leaves:
            return self._run_leaf(node.target, args, kwargs)
        if node.op == "call_module":
            twin = self._meta_modules.get(node.target)
            if twin is None:
                twin = self._meta_modules[node.target] = _meta_twin(self._modules[node.target])
            return type(twin).forward(twin, *args, **kwargs)
        raise AssertionError(node.op)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        """A parameter (or buffer) read inside a traced forward becomes one shared get_attr node."""
        self._attr_proxies = parameter_proxy_cache
        if isinstance(attr_val, torch.nn.Parameter) or (
            self.proxy_buffer_attributes and isinstance(attr_val, torch.Tensor)
        ):
            name = self._reader_name(attr, attr_val)
            if name is not None:
                if name not in parameter_proxy_cache:
                    parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
                return parameter_proxy_cache[name]
        return attr_val

    def _reader_name(self, attr, tensor):
        """The name a parameter read is recorded under: the reading module's own name for it.

        A tied weight read inside traced-through modules (BART's scaled token embeddings,
        `self.weight` in the encoder's and the decoder's `embed_tokens`) keeps one name per
        reader, as leaf calls of those modules would, so the graph module registers it
        under each and the sharing stays visible (`analysis.find_shared_parameters`).
        Otherwise (a read of another module's tensor, or by a leaf module, such as its
        `extra_repr` when the tracer keys its metadata), its first registered name.
        """
        if self._path_stack:
            path = self._path_stack[-1]
            name = f"{path}.{attr}"
            if self._attributes.get(name) is tensor and not self.is_leaf_module(self._modules[path], path):
                return name
        return self._attribute_names.get(id(tensor))

    # -- control flow and iteration ------------------------------------------------------
    def to_bool(self, obj):
        raise self.untraceable(
            f"the value of {obj.node.format_node()} decides Python control flow, which a graph cannot record"
        )

    def iter(self, obj):
        meta = obj.node.meta.get("val")
        if isinstance(meta, (tuple, list)):
            return iter([obj[i] for i in range(len(meta))])
        raise self.untraceable(f"iterating over {obj.node.format_node()} would freeze its size into the graph")

    def untraceable(self, why: str) -> TraceError:
        where = _user_source()
        path = self._path_stack[-1] if self._path_stack else "<root>"
        error = TraceError(f"cannot trace module '{path}' at {where}: {why}")
        error._fxconvert_leaf_where = where  # a leaf can run it
        return error

    # -- modules ---------------------------------------------------------------------------
    def call_module(self, m, forward, args, kwargs):
        path = self.submodule_paths.get(m) if self.submodule_paths else None
        if path is None:  # built on the fly inside a forward (e.g. CrossEntropyLoss): trace through it
            return forward(*args, **kwargs)
        self._path_stack.append(path)
        mark, stack, calls = self.mark()
        try:
            return super().call_module(m, forward, args, kwargs)
        except TraceError as e:
            if not hasattr(e, "_fxconvert_leaf_where"):
                raise
            return self._as_leaf(e, e._fxconvert_leaf_where, m, path, forward, args, kwargs, (mark, stack, calls))
        except Exception as e:
            if not hasattr(e, "_fxconvert_where"):
                e._fxconvert_where = (path, _user_source(e.__traceback__))
            return self._as_leaf(e, e._fxconvert_where[1], m, path, forward, args, kwargs, (mark, stack, calls))
        finally:
            self._path_stack.pop()

    # -- leaves ----------------------------------------------------------------------------
    def is_leaf_module(self, m, module_qualified_name):
        return module_qualified_name in self.leaves or super().is_leaf_module(m, module_qualified_name)

    def _as_leaf(self, error, where, m, path, forward, args, kwargs, state):
        """Record the call of module `path` as one leaf in place of its failed partial trace, or re-raise
        `error` (for the enclosing module to try) where it cannot be one."""
        if not self.allow_leaves or path in self.leaves:
            raise error
        self._roll_back(*state)
        self.leaves[path] = where
        try:
            out = super().call_module(m, forward, args, kwargs)
        except Exception:
            del self.leaves[path]
            self._roll_back(*state)
            raise error from None
        shared = next((name for name, p in m.named_parameters(remove_duplicate=False)
                       if id(p) in self._shared_ids), None)
        if shared is not None:  # checked once it runs as a leaf: an error it raises anyway is the one to show
            raise TraceError(f"cannot trace module '{path}': it must run as a leaf ({where} decides on traced "
                             f"values), but it holds the shared weight '{path}.{shared}', which a leaf cannot "
                             f"share; untie it, or convert with leaves=False (--no-leaves) to see the refusal"
                             ) from error
        return out

    def _roll_back(self, mark, stack, calls):
        """Erase the nodes recorded after `mark` and restore the module stack as it was there."""
        erased = set()
        while self.graph._root.prev is not mark:
            node = self.graph._root.prev  # only nodes recorded later use it, and they go first
            erased.add(node)
            self.graph.erase_node(node)
        if self._attr_proxies:
            for name in [k for k, v in self._attr_proxies.items() if v.node in erased]:
                del self._attr_proxies[name]
        self.module_stack.clear()
        self.module_stack.update(stack)
        self.num_calls.clear()
        self.num_calls.update(calls)
        self._stack_snapshot = None

    def function_leaf(self, error, where, fn, args, kwargs, mark):
        """Record the call of a module-level model function as one `call_function` leaf running its eager
        code, in place of its failed partial trace (LongT5's `_split_into_blocks` pads `if x.shape[dim] %
        block_len != 0`), or re-raise `error` for the enclosing module where it cannot be one: its arguments
        must be traced values and plain constants, which a graph holds."""
        if not self.allow_leaves or not _recordable((args, kwargs)):
            raise error
        self._roll_back(*mark)
        self._leaf_functions.add(fn)
        name = f"{fn.__module__}.{fn.__qualname__}()"
        try:
            out = self.create_proxy("call_function", fn, args, kwargs)
        except Exception:
            self._roll_back(*mark)
            raise error from None
        self.leaves.setdefault(name, where)
        return out

    def mark(self):
        """The state `_roll_back` returns to: the last node, the module stack and the module call counts."""
        return self.graph._root.prev, copy.copy(self.module_stack), dict(self.num_calls)

    def _run_leaf(self, path, args, kwargs):
        """A leaf module's output metadata, from its eager code (`graph_utils.leaf_outputs`), outside the
        trace's patches."""
        with self._restore_names(), _fx_patches_undone():
            return leaf_outputs(self._modules[path], args, kwargs)

    def _eager_meta(self, run, state, args, kwargs):
        """A function leaf's output metadata, from its eager code (`graph_utils.eager_outputs`), outside the
        trace's patches."""
        with self._restore_names(), _fx_patches_undone():
            return eager_outputs(run, state, args, kwargs)


def _recordable(value) -> bool:
    """Whether a function leaf's arguments are what a graph holds: traced values, plain constants, and
    tuples, lists, dicts and slices of them (not a module, a config or a concrete tensor)."""
    if isinstance(value, Proxy) or type(value) in _PLAIN_ARGS:
        return True
    if type(value) in (tuple, list):
        return all(_recordable(v) for v in value)
    if type(value) is dict:
        return all(type(k) is str and _recordable(v) for k, v in value.items())
    if type(value) is slice:
        return all(_recordable(v) for v in (value.start, value.stop, value.step))
    return False


def _function_leaf_wrapper(fn, tracer):
    """`fn` for model code while tracing: its Python traced through, or, where it decides on traced values,
    one call_function leaf (`TransformersTracer.function_leaf`), the innermost such function first."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        mark = tracer.mark()
        try:
            return fn(*args, **kwargs)
        except TraceError as e:
            where = getattr(e, "_fxconvert_leaf_where", None)
            if where is None:
                raise
            return tracer.function_leaf(e, where, fn, args, kwargs, mark)
    call.__wrapped_for_leaves__ = fn
    return call


class _Unkeyable(Exception):
    pass


@contextlib.contextmanager
def _fx_patches_undone():
    """Module calls and attribute reads as outside a trace, while a leaf's eager code computes metadata."""
    from torch.fx import _symbolic_trace as fx_trace

    patched = torch.nn.Module.__call__, torch.nn.Module.__getattr__
    torch.nn.Module.__call__, torch.nn.Module.__getattr__ = fx_trace._orig_module_call, fx_trace._orig_module_getattr
    try:
        yield
    finally:
        torch.nn.Module.__call__, torch.nn.Module.__getattr__ = patched


_SCALARS = (bool, int, float, str, torch.dtype, torch.device, torch.memory_format, torch.layout)
_NO_STACK = collections.OrderedDict()
_PLAIN_ARGS = frozenset((*_SCALARS, type(None), type(Ellipsis)))


def _meta_key(value):
    """A hashable account of everything about `value` that an op's output metadata can depend on."""
    if isinstance(value, torch.Tensor):
        return ("T", tuple(value.shape), value.stride(), value.storage_offset(), value.dtype, value.device.type,
                value.requires_grad)
    if value is None or value is Ellipsis:
        return value
    if isinstance(value, _SCALARS):
        return (type(value), value)
    if isinstance(value, (tuple, list)):
        return (type(value),) + tuple(_meta_key(v) for v in value)
    if isinstance(value, dict):
        return (dict,) + tuple((k, _meta_key(v)) for k, v in value.items())
    if isinstance(value, slice):
        return (slice, _meta_key(value.start), _meta_key(value.stop), _meta_key(value.step))
    raise _Unkeyable


def _fresh_meta(value):
    """A new meta tensor (or structure of them) like `value`, so no two nodes share one."""
    if isinstance(value, torch.Tensor):
        fresh = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=value.device)
        return fresh.requires_grad_() if value.requires_grad else fresh
    if isinstance(value, (tuple, list)) and not isinstance(value, torch.Size):
        items = [_fresh_meta(v) for v in value]
        if hasattr(value, "_fields") and not hasattr(value, "n_fields"):  # a namedtuple (not a structseq)
            return type(value)(*items)
        return type(value)(items)
    return value


def _meta_twin(module: torch.nn.Module) -> torch.nn.Module:
    """A shallow copy of a leaf module whose parameters and buffers are meta tensors.

    They are plain instance attributes, so its forward reads them without going through
    `Module.__getattr__`, which fx patches while tracing.
    """
    twin = copy.copy(module)
    for table in (module._parameters, module._buffers):
        for k, v in table.items():
            twin.__dict__[k] = None if v is None else _to_meta(v)
    return twin


def _to_meta(value):
    if isinstance(value, torch.Tensor):
        if value.device.type == "meta":
            return value.detach() if value.requires_grad else value
        return torch.empty_like(value, device="meta")
    return value


def _example_inputs(model, names):
    family = family_of(model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return build_inputs(family.inputs, names, batch=_EXAMPLE_SIZES["batch"], lengths=_EXAMPLE_SIZES,
                        dtype=dtype, meta=True, **config_sizes(model.config, family))


def _user_source(tb=None) -> str:
    """file:line and code of the innermost model-code frame (outside torch and fxconvert)."""
    frames = []
    if tb is not None:
        while tb is not None:
            frames.append((tb.tb_frame.f_code.co_filename, tb.tb_lineno))
            tb = tb.tb_next
        frames.reverse()
    else:
        frame = sys._getframe(1)
        while frame is not None:
            code = frame.f_code
            skip = _SKIP_CODE.get(code)
            if skip is None:
                skip = _SKIP_CODE[code] = code.co_filename.startswith(_SKIP_FILES) or code.co_filename.startswith("<")
            if not skip:
                return f"{_short_path(code.co_filename)}:{frame.f_lineno}"
            frame = frame.f_back
    for filename, lineno in frames:
        if filename.startswith(_SKIP_FILES) or filename.startswith("<"):
            continue
        return f"{_short_path(filename)}:{lineno}"
    return "<unknown>"


def _short_path(filename: str) -> str:
    marker = os.sep + "site-packages" + os.sep
    if marker in filename:
        return filename.split(marker, 1)[1]
    return filename


def _explain_failure(e: Exception, cls_name: str) -> str:
    path, where = getattr(e, "_fxconvert_where", ("<root>", _user_source(e.__traceback__)))
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"cannot trace {cls_name}: module '{path}' at {where}: {type(e).__name__}: {message}"


# -- leaf replacements ---------------------------------------------------------------------
# While tracing, these names are rebound in the namespaces of the modeling modules that
# define the traced classes. Each replacement records a runtime leaf call (or traceable
# torch code) with tensor and constant arguments only.


def _mask_dtype(config, tensor):
    """None (boolean mask) for SDPA; the embeddings' dtype (additive mask) for eager."""
    return None if config._attn_implementation == "sdpa" else tensor.dtype


class _MaskReplacements:
    """Mask helpers that record runtime leaves; SDPA's causal masks also record whether nothing is padded.

    `unpadded` maps each causal mask node to its `runtime.nothing_padded` proxy (or True
    without a padding mask), which `sdpa_attention` hands to `runtime.causal_attention`: one
    check per forward, from the model input, decides SDPA's fast path at run time.
    """

    def __init__(self, tracer):
        self.tracer = tracer
        self.unpadded = {}

    def create_causal_mask(self, config, inputs_embeds, attention_mask=None, cache=None, **kwargs):
        dtype = _mask_dtype(config, inputs_embeds)
        if dtype is None and attention_mask is None:  # SDPA applies causality itself, as in transformers
            return None
        return self._causal(runtime.causal_mask, inputs_embeds, attention_mask, {"dtype": dtype})

    def create_bidirectional_mask(self, config, inputs_embeds, attention_mask=None, encoder_hidden_states=None, **kwargs):
        if attention_mask is None:  # no padding: no mask, as transformers does
            return None
        embeds = encoder_hidden_states if encoder_hidden_states is not None else inputs_embeds
        return self.tracer.create_proxy(
            "call_function", runtime.padding_mask, (attention_mask,), {"dtype": _mask_dtype(config, embeds)}
        )

    def create_sliding_window_causal_mask(self, config, inputs_embeds, attention_mask=None, cache=None, **kwargs):
        window = getattr(config, "sliding_window", None)
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            layer_types = getattr(config, "layer_types", None)
            if isinstance(layer_types, (list, tuple)) and "sliding_attention" not in layer_types:
                # built for no layer (Qwen2-MoE builds both masks whatever its layers are, and sets the
                # window to 0 without use_sliding_window): a causal mask in its place, which no node reads
                return self.create_causal_mask(config, inputs_embeds, attention_mask, cache)
            raise TraceError(f"a sliding-window mask needs config.sliding_window, a positive integer, not "
                             f"{window!r}; set it in the config (Mistral uses 4096)")
        return self._causal(runtime.sliding_window_causal_mask, inputs_embeds, attention_mask,
                            {"window": window, "dtype": _mask_dtype(config, inputs_embeds)})

    def create_bidirectional_sliding_window_mask(self, config, inputs_embeds, attention_mask=None,
                                                 encoder_hidden_states=None, cache=None, or_mask_function=None,
                                                 and_mask_function=None, position_ids=None, **kwargs):
        if or_mask_function is not None or and_mask_function is not None:
            raise self.tracer.untraceable("a sliding-window mask with an or/and mask function is not recorded")
        if attention_mask is None and (encoder_hidden_states is not None or position_ids is not None):
            # transformers sizes it from the encoder states, or finds packed sequences in the position values
            raise self.tracer.untraceable("a sliding-window mask without attention_mask is not recorded here")
        window = getattr(config, "sliding_window", None)
        if not isinstance(window, int) or isinstance(window, bool) or window < 0:
            raise TraceError(f"a sliding-window mask needs config.sliding_window, a non-negative integer, not "
                             f"{window!r}; set it in the config")
        embeds = encoder_hidden_states if encoder_hidden_states is not None else inputs_embeds
        return self.tracer.create_proxy("call_function", runtime.sliding_window_padding_mask,
                                        (inputs_embeds, attention_mask),
                                        {"window": window, "dtype": _mask_dtype(config, embeds)})

    def create_recurrent_attention_mask(self, config, inputs_embeds, attention_mask=None, cache=None, **kwargs):
        if attention_mask is None or attention_mask.ndim != 2:  # rank: a static fact of the traced value
            return None
        return self.tracer.create_proxy("call_function", runtime.recurrent_padding_mask,
                                        (inputs_embeds, attention_mask), {})

    def _causal(self, leaf, inputs_embeds, attention_mask, kwargs):
        mask = self.tracer.create_proxy("call_function", leaf, (inputs_embeds, attention_mask), kwargs)
        if kwargs["dtype"] is None:
            self.unpadded[mask.node] = True if attention_mask is None else self.tracer.create_proxy(
                "call_function", runtime.nothing_padded, (attention_mask,), {})
        return mask


def sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                   position_bias=None, *, unpadded=None, **kwargs):
    """Traceable equivalent of transformers' `sdpa_attention_forward`.

    T5 always passes a position bias, so transformers folds the mask into one additive
    float mask and calls SDPA with `is_causal=False`; the recorded ops are the same (its
    decoder without a padding mask gets no mask: the leaf masks the future in the bias).
    Causal attention without a position bias (GPT-2, BART's decoder, Llama-style) records one
    `runtime.causal_attention` call, which takes transformers' run-time choices: no mask and
    `is_causal=True` where nothing is padded (`unpadded`, the mask's `runtime.nothing_padded`
    check), grouped key/value heads repeated or not. Other attention (BART's encoder and
    cross-attention) passes the mask from the runtime leaf (padding alone, None when nothing
    is padded) as is, with `is_causal=False`.
    """
    mask = attention_mask
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if position_bias is None and causal:
        leaf = mask.node if isinstance(mask, Proxy) else None
        flag = True if mask is None else (unpadded or {}).get(leaf, False)
        window = leaf.kwargs["window"] if leaf is not None and leaf.target is runtime.sliding_window_causal_mask else None
        groups = getattr(module, "num_key_value_groups", 1)
        out = query.tracer.create_proxy("call_function", runtime.causal_attention, (query, key, value, mask), {
            "unpadded": flag, "window": window, "groups": groups if isinstance(groups, int) else 1,
            "dropout_p": dropout, "scale": scaling})
        return out.transpose(1, 2).contiguous(), None
    key, value = _repeat_kv(module, key, value)
    if position_bias is not None:
        if mask is not None or causal:  # a leaf call: whether the mask is None at run time is decided at run time
            mask = position_bias.tracer.create_proxy(
                "call_function", runtime.position_bias_mask, (position_bias, mask), dict(causal=True) if causal else {}
            )
        else:
            mask = position_bias
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling, is_causal=False
    )
    return out.transpose(1, 2).contiguous(), None


def _repeat_kv(module, key, value):
    """Grouped-query attention: each key/value head serves `module.num_key_value_groups` query heads.

    transformers' SDPA path repeats them (`repeat_kv`) whenever a mask is passed, as here
    (`enable_gqa` only without a mask); the recorded ops are the same, free of sizes.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    if not isinstance(groups, int) or groups == 1:
        return key, value
    return runtime.repeat_kv(key, value, groups)


class _AttentionFunctions:
    """Stands in for transformers' ALL_ATTENTION_FUNCTIONS while tracing."""

    def __init__(self, masks: _MaskReplacements):
        self.masks = masks

    def get_interface(self, implementation, default):
        if implementation == "eager":
            return default
        if implementation == "sdpa":
            return functools.partial(sdpa_attention, unpadded=self.masks.unpadded)
        raise TraceError(
            f"attention implementation '{implementation}' is not supported; use 'sdpa' or 'eager'"
        )


def traced_isinstance(obj, classinfo) -> bool:
    """`isinstance` for model code while tracing: a traced value answers as the value it stands for.

    transformers keeps T5's `wo` in fp32 when a model loads in fp16 (`_keep_in_fp32_modules`)
    and its feed-forward casts to the weight's dtype behind a guard:
    `isinstance(self.wo.weight, torch.Tensor) and hidden_states.dtype != self.wo.weight.dtype
    and self.wo.weight.dtype != torch.int8`. While tracing, `self.wo.weight` is a proxy, which
    the builtin says is no tensor, so the cast would be skipped and the fp32 Linear would get
    fp16 input. The answer is a static fact: a parameter read answers from the parameter
    itself, any other traced tensor from its meta value (the dtype comparisons that follow
    are answered from meta values already, see `_TracedValue.dtype`). A proxy still counts as
    a Proxy, so fx's own checks keep working.
    """
    if isinstance(obj, classinfo):
        return True
    if isinstance(obj, _TracedValue):
        node = obj.node
        value = obj.tracer._attributes.get(node.target) if node.op == "get_attr" else node.meta.get("val")
        return isinstance(value, torch.Tensor) and isinstance(value, classinfo)
    return False


def traced_is_compiling() -> bool:
    """`is_torchdynamo_compiling` for model code while tracing: a trace is a compilation.

    Model code uses it to skip Python-level work a compiler cannot follow. BART's decoder
    builds an all-ones mask from traced sizes when none is given (`torch.ones(b, n)`, a
    factory call fx cannot record) unless compiling; without it the causal mask alone is
    the same mask.
    """
    return True


@contextlib.contextmanager
def _leaf_replacements(model, tracer):
    masks = _MaskReplacements(tracer)
    replacements = {
        "create_causal_mask": masks.create_causal_mask,
        "create_bidirectional_mask": masks.create_bidirectional_mask,
        "create_sliding_window_causal_mask": masks.create_sliding_window_causal_mask,
        "create_bidirectional_sliding_window_mask": masks.create_bidirectional_sliding_window_mask,
        "create_recurrent_attention_mask": masks.create_recurrent_attention_mask,
        "ALL_ATTENTION_FUNCTIONS": _AttentionFunctions(masks),
        "is_torchdynamo_compiling": traced_is_compiling,
    }
    # Builtins are not in a module's namespace: they are added to the modeling modules' (not
    # torch's, whose leaf modules run on meta tensors) and removed afterwards.
    builtins = {"isinstance": traced_isinstance}
    namespaces = {id(sys.modules[type(m).__module__].__dict__): sys.modules[type(m).__module__].__dict__
                  for m in model.modules() if type(m).__module__ in sys.modules}
    saved, added = [], []  # (namespace, name, original, replacement); (namespace, name, replacement)

    @contextlib.contextmanager
    def restore_names():  # while a leaf's eager code runs
        for ns, name, original, _ in saved:
            ns[name] = original
        popped = [(ns, name, replacement) for ns, name, replacement in added if ns.pop(name, None) is not None]
        try:
            yield
        finally:
            for ns, name, replacement in popped:
                ns[name] = replacement
            for ns, name, _, replacement in saved:
                ns[name] = replacement

    tracer._restore_names = restore_names
    try:
        for ns in namespaces.values():
            for name, replacement in replacements.items():
                if name in ns:
                    saved.append((ns, name, ns[name], replacement))
                    ns[name] = replacement
            module_name = ns.get("__name__", "")
            if module_name.startswith("torch"):
                continue
            for name, value in list(ns.items()):  # the module's own functions: leaves where they must be
                if inspect.isfunction(value) and value.__module__ == module_name and name not in replacements:
                    wrapper = _function_leaf_wrapper(value, tracer)
                    saved.append((ns, name, value, wrapper))
                    ns[name] = wrapper
            for name, replacement in builtins.items():
                if name in ns:
                    saved.append((ns, name, ns[name], replacement))
                else:
                    added.append((ns, name, replacement))
                ns[name] = replacement
        yield
    finally:
        for ns, name, _ in added:
            ns.pop(name, None)
        for ns, name, original, _ in reversed(saved):
            ns[name] = original


__all__ = ["trace", "trace_with_stats", "TransformersTracer", "TraceResult", "supported_class", "family_of",
           "input_name_list", "require_transformers", "default_input_names", "accepted_input_names",
           "forward_parameters"]
