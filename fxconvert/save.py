"""Write a conversion to a directory: model.py, weights.safetensors, report.md, report.json.

- model.py is the GraphModule as source: a table of its torch.nn leaf modules (with their
  constructor arguments) and directly-held tensors, the class that rebuilds that structure,
  the generated `forward` (`fxconvert.codegen.forward_source`), a wrapper that owns the
  shared weight(s) like `fxconvert.ConvertedModule`, and `build()` / `load()`. It imports
  torch, safetensors and `fxconvert.runtime`, never transformers.
- weights.safetensors is the state dict of `Conversion.module`: each shared weight once,
  under its placeholder name, the rest under `graph_module.<eager name>`. A model on the
  meta device has no weights, so the file is not written.

Everything is written into a temporary directory beside the destination and renamed into
place at the end, so a failure or Ctrl-C leaves the destination as it was.
"""

import inspect
import math
import os
import shutil
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fxconvert.codegen import forward_source
from fxconvert.errors import FxConvertError, UsageError
from fxconvert.graph_utils import BoundContainer

MODEL_FILE, WEIGHTS_FILE, REPORT_MD, REPORT_JSON = "model.py", "weights.safetensors", "report.md", "report.json"


class SaveError(FxConvertError):
    """The output could not be written (or rebuilt from model.py)."""


@dataclass
class Saved:
    out_dir: Path
    files: list[str]
    report: object = None  # the fxconvert.report.Report written, if any


def check_destination(out_dir, *, force: bool = False) -> Path:
    """Fail early, before any work, if `out_dir` cannot be (re)placed: refused without `force`, or unwritable."""
    out = Path(out_dir)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise UsageError(f"--out {out} exists and is not a directory; choose another path")
        if not force and any(out.iterdir()):
            raise UsageError(f"{out} already exists; pass --force to replace it, or choose another --out")
    parent = _existing_parent(out.parent)
    if not parent.is_dir():
        raise SaveError(f"cannot write to {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SaveError(f"cannot write to {out}: {parent} is not writable")
    return out


def save(conversion, out_dir, *, force: bool = False, make_report=None, extra_files=None) -> Saved:
    """Write the conversion's files into `out_dir` atomically (see the module docstring).

    `make_report()`, called after model.py and the weights are written (so that the
    report can include the write time, recorded in `conversion.timings["write"]`),
    returns the `fxconvert.report.Report` to write as report.md and report.json.
    `extra_files` maps more file names to their text (e.g. `stage_<i>.py`).
    """
    out = check_destination(out_dir, force=force)
    start = time.perf_counter()
    source = model_source(conversion)
    created, tmp, done = _missing_parents(out.parent), None, False
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result should not be
        (tmp / MODEL_FILE).write_text(source, encoding="utf-8")
        files = [MODEL_FILE]
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
            files.append(name)
        if not _on_meta(conversion.module):
            save_weights(conversion.module, tmp / WEIGHTS_FILE)
            files.append(WEIGHTS_FILE)
        conversion.timings["write"] = time.perf_counter() - start
        report = None
        if make_report is not None:
            from fxconvert.report import render

            report = make_report()
            (tmp / REPORT_MD).write_text(render(report, "markdown"), encoding="utf-8")
            (tmp / REPORT_JSON).write_text(render(report, "json"), encoding="utf-8")
            files += [REPORT_MD, REPORT_JSON]
        for name in files:
            os.chmod(tmp / name, 0o666 & ~_umask())
        _replace(tmp, out)
        done = True
    except OSError as e:
        raise SaveError(f"cannot write to {out}: {e.strerror or e}") from e
    finally:
        if not done:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            _remove_empty(created)
    return Saved(out, files, report)


def save_weights(module: torch.nn.Module, path) -> None:
    """The module's state dict as safetensors; tensors that share storage are refused, not duplicated."""
    from safetensors.torch import save_file

    import fxconvert

    state = {name: t.detach().contiguous() for name, t in module.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt", "producer": f"fxconvert {fxconvert.__version__}"})


def _replace(tmp: Path, out: Path) -> None:
    """Move `tmp` to `out`; an existing `out` is moved aside first and put back if that fails."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        old.rmdir()
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _missing_parents(parent: Path) -> list[Path]:
    """The directories that writing into `parent` creates, deepest first, to remove again on failure."""
    missing = []
    p = parent.absolute()
    while not p.exists():
        missing.append(p)
        p = p.parent
    return missing


def _remove_empty(dirs) -> None:
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            return


def _on_meta(module: torch.nn.Module) -> bool:
    return any(t.device.type == "meta" for t in module.state_dict().values())


# -- model.py ----------------------------------------------------------------------------------

_HEADER = '''"""{model_class} in FTPipe's pre-partitioning form, written by fxconvert {version}.

{summary}

    import model  # this file
    m = model.load()  # the weights in weights.safetensors beside this file
    {output} = m({call})

`build()` gives the same module without weights (on the meta device), which is all a
partitioner needs. Needs torch, safetensors and fxconvert.runtime; not transformers.
"""

import os

import torch
from torch import nn

{forward_imports}

INPUT_NAMES = {input_names!r}
OUTPUT_NAME = {output!r}
WEIGHTS = {weights!r}

# The graph's leaf modules: qualified name -> (torch.nn class, constructor arguments).
LEAF_MODULES = {{
{leaf_rows}
}}
# Tensors the graph reads directly (parameters unless marked as buffers): name -> (shape, dtype, is_parameter).
TENSORS = {{
{tensor_rows}
}}
# Shared weights, owned by the wrapper and passed to the graph: name -> (shape, dtype).
SHARED_WEIGHTS = {{
{shared_rows}
}}


def _owner(root: nn.Module, qualified_name: str):
    """The module that holds `qualified_name` (plain containers are created on the way) and the last name."""
    *path, name = qualified_name.split(".")
    owner = root
    for part in path:
        if part not in owner._modules:
            owner.add_module(part, nn.Module())
        owner = owner._modules[part]
    return owner, name


class {graph_class}(nn.Module):
    """The pre-partitioning graph: inputs, then the shared weight(s), then `training`."""

    def __init__(self):
        super().__init__()
        for name, (cls, kwargs) in LEAF_MODULES.items():
            owner, attr = _owner(self, name)
            owner.add_module(attr, getattr(nn, cls)(**kwargs))
        for name, (shape, dtype, is_parameter) in TENSORS.items():
            owner, attr = _owner(self, name)
            tensor = torch.empty(shape, dtype=dtype)
            if is_parameter:
                owner.register_parameter(attr, nn.Parameter(tensor))
            else:
                owner.register_buffer(attr, tensor)

{forward}

class Converted(nn.Module):
    """Owns the shared weight(s) and passes them, with `self.training`, to the graph."""

    def __init__(self):
        super().__init__()
        self.graph_module = {graph_class}()
        for name, (shape, dtype) in SHARED_WEIGHTS.items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape, dtype=dtype)))

    def forward(self, {signature}):
        return self.graph_module({signature}, {shared_args}self.training)


def build(device="meta") -> Converted:
    """The module without weights (uninitialised memory unless on the meta device)."""
    with torch.device(device):
        return Converted()


def load(weights=None, device="cpu") -> Converted:
    """The module with the weights of `weights` (default: weights.safetensors beside this file), in eval mode."""
    from safetensors.torch import load_file

    path = weights or os.path.join(os.path.dirname(os.path.abspath(__file__)), WEIGHTS)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{{path}} not found{missing_hint}")
    module = build("meta")
    module.load_state_dict(load_file(path, device=str(device)), assign=True)
    return module.eval()
'''


def model_source(conversion) -> str:
    """The text of model.py for `conversion` (see the module docstring)."""
    import fxconvert

    gm = conversion.graph_module
    leaves, tensors = _structure(gm)
    forward = forward_source(gm)
    head, _, body = forward.partition("\ndef forward(")
    lines = [line for line in head.splitlines() if line.strip() and line != "import torch"]
    imports = [line for line in lines if line.startswith(("import ", "from "))]
    imports += [line for line in lines if line not in imports]  # assignments such as NoneType = type(None)
    shared = {name: getattr(conversion.module, name) for name in conversion.module.shared_names}
    names = list(conversion.input_names)
    source = conversion.source
    text = _HEADER.format(
        model_class=conversion.model_class,
        version=fxconvert.__version__,
        summary=textwrap.fill(
            (f"Source: {source.origin} {source.location}, weights: {source.weights}. " if source else "")
            + f"The graph takes {', '.join(names)}, then the shared weight(s) {', '.join(shared) or '(none)'}, "
            f"then `training`; it returns `{conversion.output_name}`.", width=92),
        output=conversion.output_name,
        call=", ".join(f"{n}={n}" for n in names),
        forward_imports="\n".join(imports),
        input_names=tuple(names),
        weights=WEIGHTS_FILE,
        leaf_rows="\n".join(f"    {name!r}: ({cls!r}, {kwargs!r})," for name, (cls, kwargs) in leaves.items()),
        tensor_rows="\n".join(f"    {name!r}: ({tuple(t.shape)!r}, {t.dtype}, {is_param!r}),"
                              for name, (t, is_param) in tensors.items()),
        shared_rows="\n".join(f"    {name!r}: ({tuple(p.shape)!r}, {p.dtype})," for name, p in shared.items()),
        graph_class=type(gm).__name__,
        forward=_indent("def forward(" + body.strip("\n")),
        signature=", ".join(names),
        shared_args="".join(f"self.{n}, " for n in shared),
        missing_hint="" if not _on_meta(conversion.module) else
        ": this conversion was made on the meta device, so no weights were written; use build()",
    )
    compile(text, MODEL_FILE, "exec")
    return text


def _structure(gm: torch.fx.GraphModule):
    """Leaf modules with constructor arguments, and tensors held by plain container modules."""
    leaves, tensors = {}, {}
    leaf_prefixes = []
    for name, module in gm.named_modules():
        if any(name.startswith(p) for p in leaf_prefixes):
            continue
        if module is gm or type(module) in (torch.nn.Module, BoundContainer):
            for attr, t in module._parameters.items():
                if t is not None:
                    tensors[f"{name}.{attr}" if name else attr] = (t, True)
            for attr, t in module._buffers.items():
                if t is not None:
                    if attr in module._non_persistent_buffers_set:
                        raise SaveError(f"model.py cannot restore the non-persistent buffer {name}.{attr}")
                    tensors[f"{name}.{attr}" if name else attr] = (t, False)
            continue
        leaves[name] = (type(module).__name__, _constructor_args(name, module))
        leaf_prefixes.append(name + ".")
    return leaves, tensors


def _constructor_args(name: str, module: torch.nn.Module) -> dict:
    """Arguments that rebuild `module`, read from its attributes; checked by rebuilding it on meta."""
    cls = type(module)
    if getattr(torch.nn, cls.__name__, None) is not cls:
        raise SaveError(f"model.py can only rebuild torch.nn modules; '{name}' is a {cls.__module__}.{cls.__name__}")
    args = {}
    for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in ("device", "dtype") or p.name.startswith("_"):
            continue
        if not hasattr(module, p.name):
            if p.default is p.empty:
                raise SaveError(f"cannot rebuild '{name}' ({cls.__name__}): no attribute holds its argument {p.name}")
            continue
        value = getattr(module, p.name)
        if isinstance(p.default, bool) and (value is None or isinstance(value, torch.Tensor)):
            value = value is not None  # e.g. Linear(bias=...) holds the bias tensor or None
        if p.default is not p.empty and type(value) is type(p.default) and value == p.default:
            continue  # defaults stay implicit, for a readable table
        if not _is_literal(value):
            raise SaveError(f"cannot rebuild '{name}' ({cls.__name__}): argument {p.name} is {type(value).__name__}")
        args[p.name] = value
    with torch.device("meta"):
        rebuilt = cls(**args)
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    if {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} != expected:
        raise SaveError(f"cannot rebuild '{name}' ({cls.__name__}) from {args}: its tensors differ")
    return args


def _is_literal(value) -> bool:
    """A value whose repr() is Python source for it."""
    if isinstance(value, (tuple, list)):
        return all(_is_literal(v) for v in value)
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or isinstance(value, (bool, int, str))


def _indent(code: str) -> str:
    return "\n".join(("    " + line) if line.strip() else "" for line in code.splitlines()) + "\n"
