"""Errors raised by fxconvert. Each one reads as a single line: the problem, then the fix."""


class FxConvertError(Exception):
    """Base class of every error fxconvert raises on purpose."""


# C0 and C1 control characters and DEL, and the Unicode line separators and bidirectional
# overrides: printed raw, they can move the cursor, colour text or fake a line.
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}
_ESCAPES.update({c: f"\\u{c:04x}" for c in (0x200E, 0x200F, 0x2028, 0x2029, *range(0x202A, 0x202F),
                                             *range(0x2066, 0x206A))})


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def with_article(noun) -> str:
    """`noun` with its indefinite article, for messages that name a type: "an int", "a list"."""
    noun = str(noun)
    vowel = noun[:1].lower() in ("a", "e", "i", "o", "u") and not noun.lower().startswith(("uni", "use", "usa", "eu",
                                                                                            "one"))
    return f"{'an' if vowel else 'a'} {noun}"


def printable(text) -> str:
    """`text` with control characters escaped (ESC as `\\x1b`), for anything fxconvert prints.

    Messages quote config values, names and paths, which a hostile checkpoint controls.
    """
    return str(text).translate(_ESCAPES)


class TraceError(FxConvertError):
    """The model (or one construct in it) could not be traced."""


class PassError(FxConvertError):
    """A graph pass met a node it cannot handle."""


class ModelResolutionError(FxConvertError):
    """A model name, path or config could not be turned into a model."""


class RandomWeightsRefused(ModelResolutionError):
    """A name resolved to no weights and random ones were not allowed; `why` says why, for another hint."""

    def __init__(self, why: str, message: str):
        super().__init__(message)
        self.why = why


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
