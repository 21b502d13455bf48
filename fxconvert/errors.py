"""Errors raised by fxconvert. Each one reads as a single line: the problem, then the fix."""


class FxConvertError(Exception):
    """Base class of every error fxconvert raises on purpose."""


class TraceError(FxConvertError):
    """The model (or one construct in it) could not be traced."""


class PassError(FxConvertError):
    """A graph pass met a node it cannot handle."""


class ModelResolutionError(FxConvertError):
    """A model name, path or config could not be turned into a model."""


class ValidationError(FxConvertError):
    """The converted module disagrees with the reference model."""


class UsageError(FxConvertError):
    """An option or argument is wrong (bad input or output name, bad combination of flags)."""


class InputNameError(TraceError, UsageError):
    """The input names asked for do not fit the model (unknown, repeated, or no input ids)."""


def describe_node(node) -> str:
    """One-line description of an fx node: its format, module path and the source line it came from."""
    where = node.meta.get("source")
    path = node.meta.get("module_path")
    parts = [node.format_node()]
    if path:
        parts.append(f"in module '{path}'")
    if where:
        parts.append(f"at {where}")
    return " ".join(parts)
