"""fxconvert: Hugging Face models (T5, BART, GPT-2, BERT, Llama-style) as clean torch.fx graphs, ready for pipeline partitioning.

The data path reads as the package: load -> trace -> passes -> convert -> stages -> codegen/save/pipeline
-> report, run in that order by one workflow (`fxconvert.workflow`: `convert`, `Conversion.save`, and the
command line all go through it). Each module imports only modules below it (tests/test_layers.py).
The public names, and the submodules as attributes (`fxconvert.codegen.forward_source`),
load on first use (PEP 562), so `import fxconvert` imports neither torch nor transformers: the command line starts at once and handles a Ctrl-C during its imports,
and generated code that needs `fxconvert.runtime` runs where transformers is not installed.
"""

import importlib
import importlib.util
import sys
import types

from fxconvert.errors import FxConvertError, PassError, TraceError

__version__ = "0.1.0"

# Each public name and the module that defines it.
_PUBLIC = {"trace": "fxconvert.trace", "convert": "fxconvert.workflow", "Conversion": "fxconvert.workflow",
           "ConvertedModule": "fxconvert.convert", "PassRecord": "fxconvert.convert",
           "split_stages": "fxconvert.stages", "Stages": "fxconvert.stages", "SplitError": "fxconvert.stages"}
__all__ = [*_PUBLIC, "FxConvertError", "TraceError", "PassError"]


class _Package(types.ModuleType):
    def __getattr__(self, name):
        if name in _PUBLIC:
            value = getattr(importlib.import_module(_PUBLIC[name]), name)
            super().__setattr__(name, value)
            return value
        if name.isidentifier() and not name.startswith("_") and importlib.util.find_spec(f"fxconvert.{name}"):
            return importlib.import_module(f"fxconvert.{name}")  # a submodule: fxconvert.codegen, .pipeline, ...
        raise AttributeError(f"module 'fxconvert' has no attribute '{name}'")

    def __setattr__(self, name, value):
        # Importing the submodule fxconvert.trace (or .convert) sets the package attribute of
        # that name to the module; the function keeps the name, as an eager import left it.
        if name in _PUBLIC and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)

    def __dir__(self):
        return sorted({*super().__dir__(), *_PUBLIC})


sys.modules[__name__].__class__ = _Package
