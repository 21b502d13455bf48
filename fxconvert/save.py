"""Write a conversion to a directory: model.py, weights.safetensors, report.md, report.json.

- model.py is the GraphModule as source (`fxconvert.codegen.module_source`, the template the
  stage files share): a table of its torch.nn leaf modules (with their constructor
  arguments) and directly-held tensors, the class that rebuilds that structure, the
  generated `forward`, a wrapper that owns the shared weight(s) like
  `fxconvert.ConvertedModule`, and `build()` / `load()`. It imports torch, safetensors and
  `fxconvert.runtime`, never transformers. User text (the source path) is only in the
  repr() literal SOURCE.
- weights.safetensors is the state dict of `Conversion.module`: each shared weight once,
  under its placeholder name, the rest under `graph_module.<eager name>`. A model on the
  meta device has no weights, so the file is not written.

Everything is written into a temporary directory beside the destination and renamed into
place at the end, so a failure or Ctrl-C leaves the destination as it was.
"""

import os
import shutil
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fxconvert.codegen import check_names, module_source
from fxconvert.errors import FxConvertError, UsageError

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
    `extra_files` maps more file names to their text (e.g. `stage_<i>.py`), or to bytes
    for files copied as they are (tokenizer files).
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
        for name, content in (extra_files or {}).items():
            if isinstance(content, bytes):  # copied files (a tokenizer's), byte for byte
                (tmp / name).write_bytes(content)
            else:
                (tmp / name).write_text(content, encoding="utf-8")
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

_DOC = """{model_class} in FTPipe's pre-partitioning form, written by fxconvert {version}.

{summary}

SOURCE says where the model and its weights came from.

    import model  # this file
    m = model.load()  # the weights in weights.safetensors beside this file
    {output} = m({call})

`build()` gives the same module without weights (on the meta device), which is all a
partitioner needs. Needs torch, safetensors and fxconvert.runtime; not transformers.
"""


def model_source(conversion) -> str:
    """The text of model.py for `conversion` (see the module docstring).

    User text (the source path or Hub id, above all) is written only as repr() literals
    in SOURCE; the docstring holds fixed text and identifiers (`fxconvert.codegen`).
    """
    import fxconvert

    shared = {name: getattr(conversion.module, name) for name in conversion.module.shared_names}
    names = check_names("the input name", conversion.input_names)
    (model_class,) = check_names("the model class name", [conversion.model_class or "Model"])
    (output,) = check_names("the output name", [conversion.output_name])
    source = conversion.source
    doc = _DOC.format(
        model_class=model_class,
        version=fxconvert.__version__,
        summary=textwrap.fill(f"The graph takes {', '.join(names)}, then the shared weight(s) "
                              f"{', '.join(shared) or '(none)'}, then `training`; it returns `{output}`.", width=92),
        output=output,
        call=", ".join(f"{n}={n}" for n in names),
    )
    constants = {
        "INPUT_NAMES": tuple(names),
        "OUTPUT_NAME": output,
        "SOURCE": None if source is None else {"name": os.fspath(source.name), "origin": source.origin,
                                               "location": os.fspath(source.location), "weights": source.weights},
    }
    state = conversion.module.state_dict()
    return module_source(
        conversion.graph_module, filename=MODEL_FILE, doc=doc, constants=constants, wrapper="Converted",
        wrapper_doc="Owns the shared weight(s) and passes them, with `self.training`, to the graph.",
        graph_doc="the model inputs", signature=names, shared=shared, parameters={k: k for k in state},
        weights=WEIGHTS_FILE, on_meta=_on_meta(conversion.module),
    )
