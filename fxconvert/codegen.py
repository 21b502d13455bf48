"""Python source for GraphModules: the forward with the imports it needs, runnable anywhere.

`GraphModule.code` is only the body of `forward`; the functions it calls live in its
globals. `forward_source` writes those globals out as import statements, so the text
runs in a fresh namespace (or a file) given nothing but torch and `fxconvert.runtime`.
"""

import builtins
import math
import re
import types

import torch
import torch.fx


def forward_source(gm: torch.fx.GraphModule) -> str:
    """Imports plus `def forward(self, ...)`, exactly as `gm` runs it."""
    code = gm.graph.python_code(root_module="self")
    used = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", code.src))  # fx lists globals the code may not use
    imports = sorted({_import_line(name, obj) for name, obj in code.globals.items() if name in used} - {None})
    return "\n".join(imports) + "\n\n" + code.src.strip("\n") + "\n"


def _import_line(name: str, obj) -> str | None:
    if getattr(builtins, name, None) is obj:
        return None
    if isinstance(obj, float) and (math.isinf(obj) or math.isnan(obj)):
        return f"from math import {name}"
    if isinstance(obj, types.ModuleType):
        return f"import {obj.__name__}" if obj.__name__ == name else f"import {obj.__name__} as {name}"
    if obj is type(None):
        return f"{name} = type(None)"
    if isinstance(obj, torch.device):
        return f"{name} = torch.device({str(obj)!r})"
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if module and qualname and "." not in qualname and "<" not in qualname:
        if module.startswith("torch._C") and hasattr(torch, qualname) and getattr(torch, qualname) is obj:
            module = "torch"
        return f"from {module} import {qualname} as {name}" if qualname != name else f"from {module} import {name}"
    raise ValueError(f"cannot write an import for global {name!r} ({obj!r}) of the generated code")
