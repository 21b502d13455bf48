"""fxconvert: Hugging Face T5-family models as clean torch.fx graphs, ready for pipeline partitioning.

The data path reads as the package: load -> trace -> passes -> convert -> codegen/save -> report.
Attributes are imported lazily, so `import fxconvert.runtime` (what generated code needs)
does not import transformers.
"""

import importlib

_EXPORTS = {
    "trace": "fxconvert.trace",
    "convert": "fxconvert.convert",
    "Conversion": "fxconvert.convert",
    "ConvertedModule": "fxconvert.convert",
    "PassRecord": "fxconvert.convert",
    "FxConvertError": "fxconvert.errors",
    "TraceError": "fxconvert.errors",
    "PassError": "fxconvert.errors",
}

__version__ = "0.1.0"
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fxconvert' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
