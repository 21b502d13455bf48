"""Python source for GraphModules: the forward with the imports it needs, and importable modules.

`GraphModule.code` is only the body of `forward`; the functions it calls live in its
globals. `forward_source` writes those globals out as import statements, so the text
runs in a fresh namespace (or a file) given nothing but torch and `fxconvert.runtime`.

`module_source` is the one template behind `model.py` and every `stage_<i>.py`: a table of
the graph's `torch.nn` leaf modules (with their constructor arguments) and directly-held
tensors, the class that rebuilds that structure, the generated `forward`, a wrapper that
owns the shared weight(s), `build()` and `load()`.

Generated code never carries user text (paths, config values, names from a model) except
as a `repr()` literal of a plain str, int, float, bool or None, or of a tuple, list or dict
of them, whose repr is exactly Python source for the value. Names that must appear bare
(in a signature, an attribute path, a docstring) are checked to be Python identifiers or
plain words; what fx itself writes is checked node by node, since fx writes a module
path that is not an identifier as `getattr(self, "<path>")` without escaping it. Anything
else raises `CodegenError` naming what and where.
"""

import ast
import builtins
import copy
import importlib
import inspect
import json
import keyword
import math
import pprint
import re
import textwrap
import threading
import types

import torch
import torch.fx
from torch.fx.node import map_aggregate

from fxconvert.errors import FxConvertError, describe_node, printable, with_article
from fxconvert.graph_utils import BoundContainer


class CodegenError(FxConvertError):
    """The graph or a name in it cannot be written as safe, importable Python source."""


# Code generation is not thread-safe in two places, so it runs one thread at a time:
# - CPython 3.11 keeps one AST recursion counter per interpreter, not per thread: two threads
#   in ast.parse at once (a switch can happen when a collection runs a finalizer mid-parse)
#   fail with SystemError "AST constructor recursion depth mismatch". Every parse of
#   generated code goes through `_parse`.
# - fx's `Graph.python_code` names the nodes by swapping each node's repr function for one
#   of its own namespace while it writes, and puts the old one back afterwards. Two threads
#   writing the same graph (two saves of one conversion) mix their names, and the code one
#   of them writes can pass a value under another node's name.
_LOCK = threading.RLock()


def _parse(text: str, filename: str = "<unknown>") -> ast.Module:
    with _LOCK:
        return ast.parse(text, filename)


def forward_source(gm: torch.fx.GraphModule, functions: dict | None = None) -> str:
    """Imports plus `def forward(self, ...)`, exactly as `gm` runs it.

    With `functions` (a dict), the function leaves of transformers the graph calls are put there
    (global name -> (module, name)) instead of imported: `module_source` imports them when a module is built.
    """
    for node in gm.graph.nodes:
        _check_node(node)
    with _LOCK:
        code = gm.graph.python_code(root_module="self")
    used = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", code.src))  # fx lists globals the code may not use
    globals_ = {name: obj for name, obj in code.globals.items() if name in used}
    if functions is not None:
        for name, obj in list(globals_.items()):
            if _is_transformers_function(obj):
                functions[check_names("the function leaf", [name])[0]] = _function_path(obj)
                del globals_[name]
    imports = sorted({_import_line(name, obj) for name, obj in globals_.items()} - {None})
    return "\n".join(imports) + "\n\n" + code.src.strip("\n") + "\n"


# -- what fx writes bare ------------------------------------------------------------------------

# Types whose repr() is Python source for the value (fx writes constants with repr()).
_LITERAL_TYPES = (type(None), bool, int, float, str, type(Ellipsis))
_TORCH_CONSTANTS = (torch.dtype, torch.device, torch.memory_format, torch.layout)
_DIGITS = re.compile(r"[0-9]+")


def _check_node(node: torch.fx.Node) -> None:
    """Refuse a node whose name, target or constants fx would write as anything but safe source."""
    if not is_identifier(node.name):
        raise CodegenError(f"cannot write the graph as source: node name {node.name!r} is not a Python identifier")
    if node.op == "placeholder" and not is_identifier(node.target):
        raise CodegenError(f"cannot write the graph as source: input {node.target!r} is not a Python identifier")
    if node.op in ("get_attr", "call_module"):
        for part in node.target.split("."):
            if not (is_identifier(part) or _DIGITS.fullmatch(part)):  # fx writes getattr(x, "<part>") unescaped
                raise CodegenError(f"cannot write the graph as source: module path {node.target!r} has the part "
                                   f"{part!r}, which is neither an identifier nor a number ({describe_node(node)})")
    if node.op == "call_method" and not is_identifier(node.target):
        raise CodegenError(f"cannot write the graph as source: method {node.target!r} is not a Python identifier "
                           f"({describe_node(node)})")
    map_aggregate((node.args, node.kwargs), lambda value: _check_constant(node, value))


def _check_constant(node, value):
    if isinstance(value, torch.fx.Node) or type(value) in _LITERAL_TYPES or isinstance(value, _TORCH_CONSTANTS):
        return value
    raise CodegenError(f"cannot write the graph as source: {describe_node(node)} holds a constant of type "
                       f"{type(value).__module__}.{type(value).__qualname__}, whose repr() is not known to be source")


def _import_line(name: str, obj) -> str | None:
    if not is_identifier(name):
        raise CodegenError(f"cannot write an import for the global {name!r}: not a Python identifier")
    if getattr(builtins, name, None) is obj:
        return None
    if isinstance(obj, float) and (math.isinf(obj) or math.isnan(obj)):
        return f"from math import {name}"
    if isinstance(obj, types.ModuleType):
        if not _is_dotted(obj.__name__):
            raise CodegenError(f"cannot write an import of module {obj.__name__!r}: not a dotted Python name")
        return f"import {obj.__name__}" if obj.__name__ == name else f"import {obj.__name__} as {name}"
    if obj is type(None):
        return f"{name} = type(None)"
    if isinstance(obj, torch.device):
        return f"{name} = torch.device({str(obj)!r})"
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if isinstance(module, str) and isinstance(qualname, str) and _is_dotted(module) and is_identifier(qualname):
        if module.startswith("torch._C") and hasattr(torch, qualname) and getattr(torch, qualname) is obj:
            module = "torch"
        return f"from {module} import {qualname} as {name}" if qualname != name else f"from {module} import {name}"
    raise CodegenError(f"cannot write an import for global {name!r} ({type(obj).__name__}) of the generated code")


def is_identifier(name) -> bool:
    """A Python identifier that is not a keyword: safe bare in code and in a docstring."""
    return isinstance(name, str) and name.isidentifier() and not keyword.iskeyword(name)


def _is_dotted(name: str) -> bool:
    return all(is_identifier(part) for part in name.split("."))


def is_literal(value) -> bool:
    """A value whose repr() is Python source for it (exact builtin types only: a subclass may lie)."""
    if type(value) in (tuple, list):
        return all(is_literal(v) for v in value)
    if type(value) is dict:
        return all(is_literal(k) and is_literal(v) for k, v in value.items())
    if type(value) is float:
        return math.isfinite(value)
    return type(value) in (type(None), bool, int, str)


def check_names(what: str, names) -> list[str]:
    """`names`, each checked to be a Python identifier (it is written bare into code)."""
    names = list(names)
    for name in names:
        if not is_identifier(name):
            raise CodegenError(f"cannot write {what} {name!r} into generated code: it is not a Python identifier")
    return names


# -- importable modules: model.py and stage_<i>.py ------------------------------------------------

_TEMPLATE = '''"""{doc}
"""

import os

import torch
from torch import nn

{forward_imports}

{constants}

# The graph's leaf modules: qualified name -> (torch.nn class, constructor arguments).
LEAF_MODULES = {leaf_rows}
# Tensors the graph reads directly (parameters unless marked as buffers): name -> (shape, dtype, is_parameter).
TENSORS = {tensor_rows}
# Tensors the trace built from constants (fx's `_tensor_constant<i>`), rebuilt as non-persistent buffers:
# name -> (shape, dtype, its values, or the key of the weights file that holds them).
TENSOR_CONSTANTS = {constant_rows}
{transformers_rows}{function_rows}# The shared weight(s) {wrapper} owns and passes to the graph, in the graph's order.
SHARED_WEIGHTS = {shared_names}
SHARED_WEIGHT_TENSORS = {shared_rows}
# What load() reads: state-dict name -> key in the weights file.
PARAMETERS = {parameter_rows}


def _owner(root: nn.Module, qualified_name: str):
    """The module that holds `qualified_name` (plain containers are created on the way) and the last name."""
    *path, name = qualified_name.split(".")
    owner = root
    for part in path:
        if part not in owner._modules:
            owner.add_module(part, nn.Module())
        owner = owner._modules[part]
    return owner, name


class Graph(nn.Module):
    """The graph: {graph_doc}, then the shared weight(s), then `training`."""

    def __init__(self):
        super().__init__()
        for name, (cls, kwargs) in LEAF_MODULES.items():
            owner, attr = _owner(self, name)
            owner.add_module(attr, getattr(nn, cls)(**kwargs))
{transformers_init}        for name, (shape, dtype, is_parameter) in TENSORS.items():
            owner, attr = _owner(self, name)
            tensor = torch.empty(shape, dtype=getattr(torch, dtype))
            if is_parameter:
                owner.register_parameter(attr, nn.Parameter(tensor))
            else:
                owner.register_buffer(attr, tensor)
        for name in TENSOR_CONSTANTS:
            self.register_buffer(name, _constant(name), persistent=False)
{functions_init}
{forward}

class {wrapper}(nn.Module):
    """{wrapper_doc}"""

    def __init__(self):
        super().__init__()
        self.graph_module = Graph()
        for name in SHARED_WEIGHTS:
            shape, dtype = SHARED_WEIGHT_TENSORS[name]
            self.register_parameter(name, nn.Parameter(torch.empty(shape, dtype=getattr(torch, dtype))))

    def forward({parameters}):
        return {wrap_open}self.graph_module({call_args}){wrap_close}
{extra}

def build(device="meta") -> {wrapper}:
    """The module without weights (uninitialised memory unless on the meta device)."""
    with torch.device(device):
        return {wrapper}()


def load(weights=None, device="cpu") -> {wrapper}:
    """The module with its tensors from `weights` (default: {weights_default} beside this file), in eval mode.

    Reads only the tensors named in PARAMETERS, one by one (safetensors.safe_open), never
    the whole file.
    """
    from safetensors import safe_open

    path = weights or os.path.join(os.path.dirname(os.path.abspath(__file__)), WEIGHTS)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{{path}} not found{missing_hint}")
    module = build("meta")
    with safe_open(path, framework="pt", device=str(device)) as f:
        available = set(f.keys())
        keys = [*PARAMETERS.values(), *(row[2] for row in TENSOR_CONSTANTS.values() if isinstance(row[2], str))]
        missing = [key for key in keys if key not in available]
        if missing:
            raise KeyError(f"{{path}} has no tensor {{missing[0]}} ({{len(missing)}} missing); "
                           f"it was not written with this file")
        state = {{name: f.get_tensor(key) for name, key in PARAMETERS.items()}}
        with torch.device(device):
            constants = {{name: _constant(name, f) for name in TENSOR_CONSTANTS}}
    module.load_state_dict(state, assign=True)
    module.graph_module._buffers.update(constants)
{transformers_load}    return module.eval()


def _constant(name, f=None):
    """TENSOR_CONSTANTS' tensor `name`: from its values, or read from the weights file `f` (empty without one)."""
    shape, dtype, value = TENSOR_CONSTANTS[name]
    dtype = getattr(torch, dtype)
    if not isinstance(value, str):
        return torch.tensor(value, dtype=dtype).reshape(shape)
    tensor = torch.empty(shape, dtype=dtype) if f is None else f.get_tensor(value)
    if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
        raise RuntimeError(f"{{value}} is {{tuple(tensor.shape)}} {{tensor.dtype}} in the weights file but "
                           f"{{tuple(shape)}} {{dtype}} in this file")
    return tensor
{transformers_functions}{function_defs}'''

# The names the template itself binds at module level; the forward's imports must not rebind them.
_TEMPLATE_NAMES = {"os", "torch", "nn", "LEAF_MODULES", "TENSORS", "SHARED_WEIGHTS", "SHARED_WEIGHT_TENSORS",
                   "PARAMETERS", "WEIGHTS", "_owner", "Graph", "build", "load", "TRANSFORMERS_LEAVES",
                   "TRANSFORMERS_VERSION", "LEAF_CONFIG", "_transformers_leaf", "_transformers_class",
                   "_computed_buffers", "TENSOR_CONSTANTS", "_constant", "TRANSFORMERS_FUNCTIONS",
                   "_transformers_function", "_transformers_attribute", "_FUNCTIONS"}
_DOC_SAFE = re.compile(r"[^\\\"\n]*")  # no backslash, no quote: nothing can end or escape the docstring


def module_source(gm: torch.fx.GraphModule, *, filename: str, doc: str, constants: dict, wrapper: str,
                  wrapper_doc: str, graph_doc: str, signature: list[str], shared: dict, parameters: dict,
                  weights: str, on_meta: bool, extra: str = "", wrap: str = "", config=None) -> str:
    """The text of an importable module for `gm` (see the module docstring).

    `doc`, `wrapper_doc` and `graph_doc` are fixed text and identifiers only; `constants`
    (name -> literal value) are written as repr() literals; `signature` is the wrapper's
    forward parameters, passed on to the graph, then `shared` (name -> tensor, the
    shared weights the wrapper owns) and `self.training`. `parameters` maps the wrapper's
    state-dict names to keys in the weights file `weights`. `wrap` names a function in
    `extra` that the wrapper's result passes through. `config` is the model's transformers config,
    which a graph with transformers leaves needs (`transformers_leaves`); `doc` should end with
    `requirements(gm)`.
    """
    leaves, tensors, foreign = _structure(gm)
    rows = transformers_leaves(gm, foreign, config, filename)
    functions = {}
    forward = forward_source(gm, functions)
    parameters = dict(parameters)
    constant_rows = {name: _constant_row(name, t, parameters) for name, t in tensor_constants(gm).items()}
    head, _, body = forward.partition("\ndef forward(")
    lines = [line for line in head.splitlines() if line.strip() and line != "import torch"]
    imports = [line for line in lines if line.startswith(("import ", "from "))]
    imports += [line for line in lines if line not in imports]  # assignments such as NoneType = type(None)
    constants = {"WEIGHTS": weights, **constants}
    bound = _bound_names(imports)
    reserved = _TEMPLATE_NAMES | set(constants) | {wrapper} | set(re.findall(r"^def (\w+)", extra, re.M))
    bound |= set(functions)
    if bound & reserved:
        raise CodegenError(f"cannot write {filename}: the graph's global {sorted(bound & reserved)[0]!r} would "
                           f"clash with a name the file defines")
    check_names(f"{filename}'s input", signature)
    check_names(f"{filename}'s shared weight", shared)
    for text in (doc, wrapper_doc, graph_doc):
        if not _DOC_SAFE.fullmatch(text.replace("\n", "")) or not text.replace("\n", "").isprintable():
            raise CodegenError(f"cannot write {filename}: its docstring would hold a quote, a backslash or a "
                               f"control character")
    text = _TEMPLATE.format(
        doc=doc.strip("\n"),
        forward_imports="\n".join(imports),
        constants="\n".join(f"{name} = {_literal(value, f'{filename}: {name}')}" for name, value in constants.items()),
        leaf_rows=_literal(leaves, f"{filename}: LEAF_MODULES"),
        tensor_rows=_literal(tensors, f"{filename}: TENSORS"),
        constant_rows=_literal(constant_rows, f"{filename}: TENSOR_CONSTANTS"),
        shared_names=_literal(list(shared), f"{filename}: SHARED_WEIGHTS"),
        shared_rows=_literal({n: (tuple(p.shape), _dtype(p)) for n, p in shared.items()}, f"{filename}: shared"),
        parameter_rows=_literal(parameters, f"{filename}: PARAMETERS"),
        graph_doc=graph_doc,
        forward=_indent("def forward(" + body.strip("\n")),
        wrapper=wrapper,
        wrapper_doc=wrapper_doc,
        parameters=", ".join(["self", *signature]),
        call_args=", ".join([*signature, *(f"self.{n}" for n in shared), "self.training"]),
        wrap_open=f"{wrap}(" if wrap else "",
        wrap_close=")" if wrap else "",
        extra=("\n" + extra.strip("\n") + "\n") if extra else "",
        weights_default=weights if _DOC_SAFE.fullmatch(weights) and weights.isprintable() else "WEIGHTS",
        missing_hint="" if not on_meta else
        ": this conversion was made on the meta device, so no weights were written; use build()",
        **_transformers_parts(rows, functions, filename),
    )
    _check_module(text, filename)
    return text


def _literal(value, where: str) -> str:
    """repr() of a literal value; a dict one row per line, for a readable table."""
    if not is_literal(value):
        raise CodegenError(f"cannot write {where}: a value is not a plain literal")
    if type(value) is dict and value:
        return "{\n" + "".join(f"    {k!r}: {v!r},\n" for k, v in value.items()) + "}"
    return repr(value)


def _bound_names(lines) -> set:
    names = set()
    for stmt in _parse("\n".join(lines)).body:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in stmt.names}
        elif isinstance(stmt, ast.Assign):
            names |= {t.id for t in stmt.targets if isinstance(t, ast.Name)}
    return names


def _check_module(text: str, filename: str) -> None:
    """The generated module compiles, and at module level only imports, definitions and literals run.

    This states the injection rule as a check: text that escaped a string or a comment
    would show up as another kind of statement (or a syntax error).
    """
    try:
        tree = _parse(text, filename)
        with _LOCK:
            compile(tree, filename, "exec")
    except SyntaxError as e:
        raise CodegenError(f"generated {filename} does not compile: {e.msg} at line {e.lineno}") from e
    for i, stmt in enumerate(tree.body):
        if i == 0 and isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            continue  # the docstring
        if isinstance(stmt, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef)):
            continue
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            value = stmt.value
            if _is_literal_node(value) or (  # or what forward_source writes: NoneType = type(None), a device
                    isinstance(value, ast.Call) and ast.unparse(value.func) in ("type", "torch.device")
                    and len(value.args) == 1 and not value.keywords and _is_literal_node(value.args[0])):
                continue
        raise CodegenError(f"generated {filename} has an unexpected statement at line {stmt.lineno}")


def _is_literal_node(node) -> bool:
    try:
        ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False
    return True


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _indent(code: str) -> str:
    return "\n".join(("    " + line) if line.strip() else "" for line in code.splitlines()) + "\n"


# fx's name for a tensor the trace built from constants (`Tracer.create_arg`), held by the graph's root.
_TENSOR_CONSTANT = re.compile(r"_tensor_constant[0-9]+")
_LITERAL_ELEMENTS = 64  # a constant of at most this many elements is written as its values, a bigger one is read


def tensor_constants(gm: torch.fx.GraphModule) -> dict:
    """The tensors the trace built from constants (`_tensor_constant<i>` of the root): name -> tensor. They are
    none of the model's tensors, so the written files rebuild them (TENSOR_CONSTANTS) and pipeline.json leaves
    them out."""
    return {name: t for name, t in gm._buffers.items() if _TENSOR_CONSTANT.fullmatch(name) and t is not None}


def _constant_row(name: str, t: torch.Tensor, parameters: dict) -> tuple:
    """(shape, dtype, values) of tensor constant `name`, or the weights file's key instead of the values for a
    big one (or one whose values have no literal); it leaves `parameters`, which load_state_dict reads."""
    key = f"graph_module.{name}"
    stored = parameters.pop(key, None)
    if t.numel() <= _LITERAL_ELEMENTS and t.device.type != "meta":
        values = t.detach().cpu().tolist()
        if is_literal(values):
            return tuple(t.shape), _dtype(t), values
    return tuple(t.shape), _dtype(t), stored or key


def _structure(gm: torch.fx.GraphModule):
    """torch.nn leaf modules with constructor arguments, tensors held by plain container modules, and the
    leaves of other classes (path -> module)."""
    leaves, tensors, foreign = {}, {}, {}  # foreign: leaves of other libraries' classes (transformers')
    leaf_prefixes = []
    for name, module in gm.named_modules():
        if any(name.startswith(p) for p in leaf_prefixes):
            continue
        if module is gm or type(module) in (torch.nn.Module, BoundContainer):
            constants = tensor_constants(gm) if module is gm else {}
            for attr, t in module._parameters.items():
                if t is not None:
                    tensors[f"{name}.{attr}" if name else attr] = (tuple(t.shape), _dtype(t), True)
            for attr, t in module._buffers.items():
                if t is not None and attr not in constants:
                    if attr in module._non_persistent_buffers_set:
                        raise CodegenError(f"generated code cannot restore the non-persistent buffer {name}.{attr}")
                    tensors[f"{name}.{attr}" if name else attr] = (tuple(t.shape), _dtype(t), False)
            continue
        if getattr(torch.nn, type(module).__name__, None) is type(module):
            leaves[name] = (type(module).__name__, _constructor_args(name, module))
        else:
            foreign[name] = module
        leaf_prefixes.append(name + ".")
    return leaves, tensors, foreign


def _constructor_args(name: str, module: torch.nn.Module) -> dict:
    """Arguments that rebuild `module`, read from its attributes; checked by rebuilding it on meta."""
    cls = type(module)
    if getattr(torch.nn, cls.__name__, None) is not cls:
        raise CodegenError(f"generated code can only rebuild torch.nn modules; '{name}' is "
                           f"{with_article(cls.__module__ + '.' + cls.__name__)}")
    args = {}
    for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in ("device", "dtype") or p.name.startswith("_"):
            continue
        if not hasattr(module, p.name):
            if p.default is p.empty:
                raise CodegenError(f"cannot rebuild '{name}' ({cls.__name__}): no attribute holds its argument "
                                   f"{p.name}")
            continue
        value = getattr(module, p.name)
        if isinstance(p.default, bool) and (value is None or isinstance(value, torch.Tensor)):
            value = value is not None  # e.g. Linear(bias=...) holds the bias tensor or None
        if p.default is not p.empty and type(value) is type(p.default) and value == p.default:
            continue  # defaults stay implicit, for a readable table
        if not is_literal(value):
            raise CodegenError(f"cannot rebuild '{name}' ({cls.__name__}): argument {p.name} is {type(value).__name__}")
        args[p.name] = value
    with torch.device("meta"):
        rebuilt = cls(**args)
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    if {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} != expected:
        raise CodegenError(f"cannot rebuild '{name}' ({cls.__name__}) from {args}: its tensors differ")
    return args


# -- leaves that run transformers' own code --------------------------------------------------------
# A leaf (`fxconvert.trace`) is one of the model's own transformers modules. A written file rebuilds
# it as transformers does when it loads a checkpoint: its class, imported by name, built from the
# model's config; then load() assigns its tensors from the weights file, and copies in the buffers its
# constructor computes (a position table), which a checkpoint does not hold either. The class's module
# and name and the config are repr() literals; the class must be transformers' own.

_VERSION = re.compile(r"[0-9A-Za-z.+]+")
_IMPLEMENTATION = re.compile(r"_[a-z]+_implementation_internal")

_LEAF_ROWS = '''# Leaves that run transformers' own code, rebuilt as transformers builds them from LEAF_CONFIG:
# module path -> (module, class, its config argument or None, the config's attribute path, other
# arguments, whether its constructor computes buffers the weights file does not hold).
TRANSFORMERS_LEAVES = {rows}
# The model's config: (module, class, its to_dict() without the path it was loaded from, and the
# implementations the model chose, which to_dict() leaves out: config path -> attribute -> value).
LEAF_CONFIG = {config}
'''

_LEAF_INIT = '''        for name in TRANSFORMERS_LEAVES:
            owner, attr = _owner(self, name)
            owner.add_module(attr, _transformers_leaf(name))
'''

_LEAF_LOAD = '''    for name, row in TRANSFORMERS_LEAVES.items():
        if row[5]:
            with torch.device(device):
                _computed_buffers(module.graph_module.get_submodule(name), _transformers_leaf(name))
'''

_VERSION_ROW = '''TRANSFORMERS_VERSION = {version}
'''

_FUNCTION_ROWS = '''# Functions of transformers the graph calls as leaves (their code decides on traced values), imported
# when the module is built: the name the forward calls -> (module, function).
TRANSFORMERS_FUNCTIONS = {rows}
'''

_FUNCTION_INIT = '''        for name in TRANSFORMERS_FUNCTIONS:
            _transformers_function(name)  # imported now: one that cannot be fails when the module is built
'''

_IMPORT_FUNCTION = '''

def _transformers_attribute(module_name, name, leaf):
    """transformers' `module_name.name`; one line naming leaf `leaf` and the fix if it cannot be imported."""
    import importlib

    where = f"{module_name}.{name}"
    if module_name != "transformers" and not module_name.startswith("transformers."):
        raise ImportError(f"the leaf {leaf} names {where}, which is not transformers' own; this file was "
                          f"altered: convert again")
    try:
        found = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise ImportError(f"the leaf {leaf} needs transformers {TRANSFORMERS_VERSION}'s {where}, which cannot be "
                          f"imported ({type(e).__name__}: {first}); install transformers {TRANSFORMERS_VERSION}"
                          ) from None
    own = getattr(found, "__module__", None)  # a name transformers imported from elsewhere (shutil.copyfile)
    if not isinstance(own, str) or (own != "transformers" and not own.startswith("transformers.")):
        raise ImportError(f"the leaf {leaf} names {where}, which is not transformers' own; this file was "
                          f"altered: convert again")
    return found
'''

_FUNCTION_DEFS = '''

_FUNCTIONS = {}  # TRANSFORMERS_FUNCTIONS, once imported


def _transformers_function(name):
    """The function leaf `name` of TRANSFORMERS_FUNCTIONS, imported from transformers once."""
    if name not in _FUNCTIONS:
        import types

        module_name, function_name = TRANSFORMERS_FUNCTIONS[name]
        function = _transformers_attribute(module_name, function_name, f"function {name}")
        if not isinstance(function, types.FunctionType):
            raise ImportError(f"the leaf function {name} names {module_name}.{function_name}, which is not a "
                              f"function; this file was altered: convert again")
        _FUNCTIONS[name] = function
    return _FUNCTIONS[name]
'''

_FUNCTION_STUB = '''

def {name}(*args, **kwargs):
    """The function leaf {name} (TRANSFORMERS_FUNCTIONS), run as transformers' own code."""
    return _transformers_function({name!r})(*args, **kwargs)
'''

_LEAF_FUNCTIONS = '''

def _transformers_class(module_name, class_name, leaf):
    """transformers' class `module_name.class_name`; one line naming leaf `leaf` and the fix if it cannot be."""
    where = f"{module_name}.{class_name}"
    cls = _transformers_attribute(module_name, class_name, leaf)
    if not isinstance(cls, type):
        raise ImportError(f"the leaf {leaf} names {where}, which is not a class; this file was altered: "
                          f"convert again")
    return cls


def _transformers_leaf(name):
    """Leaf `name`, built by its transformers class from LEAF_CONFIG (its tensors are load()'s)."""
    if name not in TRANSFORMERS_LEAVES:
        raise KeyError(f"{name} is not a leaf of this file")
    module_name, class_name, config_argument, config_path, kwargs, _ = TRANSFORMERS_LEAVES[name]
    cls = _transformers_class(module_name, class_name, name)
    if not issubclass(cls, nn.Module):
        raise ImportError(f"the leaf {name} names {module_name}.{class_name}, which is not a module; this file "
                          f"was altered: convert again")
    if config_argument is not None:
        import copy

        import transformers

        config_class = _transformers_class(LEAF_CONFIG[0], LEAF_CONFIG[1], name)
        if not issubclass(config_class, transformers.PretrainedConfig):
            raise ImportError(f"the leaf {name}'s config names {LEAF_CONFIG[0]}.{LEAF_CONFIG[1]}, which is not a "
                              f"config; this file was altered: convert again")
        config = config_class.from_dict(copy.deepcopy(LEAF_CONFIG[2]))
        for path, chosen in LEAF_CONFIG[3].items():
            part = config
            for attr in path:
                part = getattr(part, attr)
            for attr, value in chosen.items():
                setattr(part, attr, value)
        for attr in config_path:
            config = getattr(config, attr)
        kwargs = {**kwargs, config_argument: config}
    return cls(**kwargs)


def _computed_buffers(leaf, fresh):
    """The buffers `fresh`'s constructor computed and no weights file holds, put into `leaf`."""
    modules = dict(leaf.named_modules())
    for path, module in fresh.named_modules():
        for buffer in module._non_persistent_buffers_set:
            if module._buffers.get(buffer) is not None:
                modules[path]._buffers[buffer] = module._buffers[buffer]
'''


def requirements(gm: torch.fx.GraphModule) -> str:
    """The sentence a written file's docstring ends with: what it needs to run, transformers only for leaves."""
    foreign = [*_structure(gm)[2], *dict.fromkeys(
        f"{module}.{name}()" for module, name in map(_function_path, _transformers_functions(gm)))]
    if not foreign:
        return "Needs torch, safetensors and fxconvert.runtime; not transformers."
    import transformers

    if not _VERSION.fullmatch(transformers.__version__):
        raise CodegenError(f"cannot write transformers' version {transformers.__version__!r} into a docstring")
    return textwrap.fill(f"Needs torch, safetensors and fxconvert.runtime, and needs transformers "
                         f"{transformers.__version__} for the leaves: {', '.join(foreign)}.", width=92)


def transformers_leaves(gm: torch.fx.GraphModule, foreign: dict, config, filename: str) -> dict:
    """Per leaf of a transformers class in `gm` (`foreign`), its TRANSFORMERS_LEAVES row, checked by
    rebuilding it on the meta device from the config as the file will (see the comment above)."""
    if not foreign:
        return {}
    import transformers

    path = next(iter(foreign))
    if config is None or not isinstance(config, transformers.PretrainedConfig):
        raise CodegenError(f"cannot write {filename}: the leaf '{path}' is rebuilt from the model's transformers "
                           f"config, and this conversion holds none")
    config_class = type(config)
    values = json.loads(config.to_json_string(use_diff=False))
    values.pop("_name_or_path", None)  # where this process loaded it from, not part of the model
    if not is_literal(values):
        raise CodegenError(f"cannot write {filename}: the config of the leaf '{path}' has a value that is not a "
                           f"plain literal")
    rebuilt_config = config_class.from_dict(copy.deepcopy(values))
    chosen = {}  # the implementations the model chose (attention, experts): to_dict() leaves them out
    for config_path in _config_paths(config):
        part = _follow(config, config_path)
        found = {k: v for k, v in vars(part).items() if _IMPLEMENTATION.fullmatch(k) and is_literal(v)}
        if found:
            chosen[config_path] = found
            for k, v in found.items():
                setattr(_follow(rebuilt_config, config_path), k, v)
    rows = {}
    for name, module in foreign.items():
        rows[name] = _leaf_row(name, module, config, rebuilt_config)
    return {"rows": rows, "version": transformers.__version__,
            "config": (_class_path(config_class, path)[0], config_class.__qualname__, values, chosen)}


def _class_path(cls, leaf: str) -> tuple[str, str]:
    """The module and name of transformers' class `cls`, checked to import back as `cls`."""
    module_name, name = cls.__module__, cls.__qualname__
    if not (isinstance(module_name, str) and (module_name == "transformers" or module_name.startswith(
            "transformers.")) and _is_dotted(module_name) and is_identifier(name)):
        raise CodegenError(f"cannot write the leaf '{leaf}': its class {module_name}.{name} is not transformers' "
                           f"own, which a written file can rebuild; convert with leaves=False (--no-leaves) to see "
                           f"why it is a leaf")
    if getattr(importlib.import_module(module_name), name, None) is not cls:
        raise CodegenError(f"cannot write the leaf '{leaf}': its class {module_name}.{name} does not import back "
                           f"under that name")
    return module_name, name


def _leaf_row(path: str, module: torch.nn.Module, config, rebuilt_config) -> tuple:
    """(module, class, config argument, config path, other arguments, computes buffers) for leaf `path`."""
    cls = type(module)
    module_name, class_name = _class_path(cls, path)
    config_argument, kwargs = None, {}
    for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in ("device", "dtype"):
            continue
        if p.name == "config":
            config_argument = p.name
        elif hasattr(module, p.name) and is_literal(getattr(module, p.name)):
            kwargs[p.name] = getattr(module, p.name)
        elif p.default is p.empty:
            raise CodegenError(f"cannot rebuild the leaf '{path}' ({class_name}): no attribute holds its argument "
                               f"{p.name}")
    # The config the model built it from: the model's, or one of its parts (a text or encoder config).
    paths = _config_paths(config)
    if config_argument is not None and isinstance(getattr(module, "config", None), _config_base()):
        paths = [p for p in paths if _follow(config, p) is module.config]
    for config_path in paths if config_argument is not None else [()]:
        arguments = {**kwargs, **({config_argument: _follow(rebuilt_config, config_path)} if config_argument else {})}
        try:
            with torch.device("meta"):
                rebuilt = cls(**arguments)
        except Exception:  # noqa: BLE001 - a config part it was not built from
            continue
        if _same_build(module, rebuilt):
            computes = any(m._non_persistent_buffers_set for m in module.modules())
            return module_name, class_name, config_argument, config_path, kwargs, computes
    raise CodegenError(f"cannot rebuild the leaf '{path}' ({class_name}) from the model's config: what it builds "
                       f"differs from the model's module")


def _config_base():
    import transformers

    return transformers.PretrainedConfig


def _config_paths(config) -> list[tuple]:
    """The model's config and its parts (a text, encoder or decoder config), as attribute paths."""
    return [()] + [(k,) for k, v in vars(config).items() if isinstance(v, _config_base()) and is_identifier(k)]


def _follow(config, path: tuple):
    for attr in path:
        config = getattr(config, attr)
    return config


def _same_build(module: torch.nn.Module, rebuilt: torch.nn.Module) -> bool:
    """The same tensors (names and shapes) and the same plain settings (attributes that are literals)."""
    if {k: tuple(v.shape) for k, v in module.state_dict().items()} != \
            {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}:
        return False
    for (_, a), (_, b) in zip(module.named_modules(), rebuilt.named_modules()):
        settings = {k: v for k, v in vars(a).items() if not k.startswith("_") and k != "training" and is_literal(v)}
        if settings != {k: v for k, v in vars(b).items() if k in settings}:
            return False
    return True


def _transformers_parts(leaves: dict, functions: dict, filename: str) -> dict:
    """The template's pieces for transformers leaves, modules and functions (all empty without them)."""
    parts = dict.fromkeys(("transformers_rows", "transformers_init", "transformers_load", "transformers_functions",
                           "function_rows", "functions_init", "function_defs"), "")
    if not leaves and not functions:
        return parts
    import transformers

    version = leaves["version"] if leaves else transformers.__version__
    if not _VERSION.fullmatch(version):
        raise CodegenError(f"cannot write transformers' version {version!r} into {filename}")
    parts["transformers_rows"] = _VERSION_ROW.format(version=repr(version))
    parts["transformers_functions"] = _IMPORT_FUNCTION
    if leaves:
        parts["transformers_rows"] += _LEAF_ROWS.format(
            rows=_literal(leaves["rows"], f"{filename}: TRANSFORMERS_LEAVES"),
            config=_literal_block(leaves["config"], f"{filename}: LEAF_CONFIG"))
        parts.update(transformers_init=_LEAF_INIT, transformers_load=_LEAF_LOAD)
        parts["transformers_functions"] += _LEAF_FUNCTIONS
    if functions:
        parts.update(function_rows=_FUNCTION_ROWS.format(rows=_literal(functions, f"{filename}: "
                                                                                   f"TRANSFORMERS_FUNCTIONS")),
                     functions_init=_FUNCTION_INIT,
                     function_defs=_FUNCTION_DEFS + "".join(_FUNCTION_STUB.format(name=n) for n in functions))
    return parts


def _is_transformers_function(obj) -> bool:
    """A plain function of transformers' own modules: what the graph calls as a function leaf (`fxconvert.trace`)."""
    module = getattr(obj, "__module__", None)
    return isinstance(obj, types.FunctionType) and isinstance(module, str) and (
        module == "transformers" or module.startswith("transformers."))


def _transformers_functions(gm: torch.fx.GraphModule) -> list:
    """The function leaves `gm` calls, in graph order, each once."""
    return list(dict.fromkeys(n.target for n in gm.graph.nodes
                              if n.op == "call_function" and _is_transformers_function(n.target)))


def _function_path(function) -> tuple[str, str]:
    """The module and name of transformers' function leaf `function`, checked to import back as it."""
    module_name, name = function.__module__, function.__qualname__
    if not (_is_dotted(module_name) and is_identifier(name)) or \
            getattr(importlib.import_module(module_name), name, None) is not function:
        raise CodegenError(f"cannot write the function leaf {printable(module_name)}.{printable(name)}(): it does "
                           f"not import back under that name")
    return module_name, name


def _literal_block(value, where: str) -> str:
    """repr() of a literal, laid out over lines (pprint), for a long value such as a config."""
    if not is_literal(value):
        raise CodegenError(f"cannot write {where}: a value is not a plain literal")
    return pprint.pformat(value, width=110, sort_dicts=False)
