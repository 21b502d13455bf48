"""Write a conversion to a directory: model.py, weights.safetensors, report.md, report.json.

- model.py is the GraphModule as source (`fxconvert.codegen.module_source`, the template the
  stage files share): a table of its torch.nn leaf modules (with their constructor
  arguments) and directly-held tensors, the class that rebuilds that structure, the
  generated `forward`, a wrapper that owns the shared weight(s) like
  `fxconvert.ConvertedModule`, and `build()` / `load()`. It imports torch, safetensors and
  `fxconvert.runtime`, and transformers only for a conversion with leaves, to rebuild them
  (its docstring then says which version and which leaves). User text (the source path) is
  only in the repr() literal SOURCE.
- weights.safetensors is the state dict of `Conversion.module`: each shared weight once,
  under its placeholder name, the rest under `graph_module.<eager name>`. A model on the
  meta device has no weights, so the file is not written.

Every output holds a marker file, `.fxconvert`: one JSON line naming the producer and the files
written. It is how `force` knows a directory is fxconvert's to replace (any other non-empty
directory is refused, as is the directory that holds the source checkpoint), and how a later
run knows the hidden temporary directories of a killed run for its own.

The write follows `fxconvert.atomic_dir`, so that a failure, Ctrl-C or SIGTERM leaves either
the old destination or the complete new one, and the message can say which:
1. write everything into `.<name>.XXXXXXXX.tmp` beside the destination (marker first);
2. commit: rename it into place, never over a directory that appeared since the check
   (renameat2 RENAME_NOREPLACE), or, with `force`, swap it with the old output in one step
   (RENAME_EXCHANGE; two renames where the system has no renameat2);
3. remove the old output.
Signals wait while step 2 and 3 run. A run killed outright (SIGKILL, power loss) leaves a
hidden directory that the next run to the same destination removes (only one whose writer is
no longer running and that holds nothing fxconvert did not write).
"""

import contextlib
import errno
import os
import re
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import fxconvert
from fxconvert import atomic_dir
from fxconvert.codegen import check_names, module_source, requirements
from fxconvert.errors import FxConvertError, UsageError
from fxconvert.report import render
from fxconvert.signals import deferred

MODEL_FILE, WEIGHTS_FILE, REPORT_MD, REPORT_JSON = "model.py", "weights.safetensors", "report.md", "report.json"
MARKER = atomic_dir.MARKER


class SaveError(FxConvertError):
    """The output could not be written (or rebuilt from model.py)."""


@dataclass
class Saved:
    out_dir: Path
    files: list[str]
    report: object = None  # the fxconvert.report.Report written, if any
    notes: list[str] = field(default_factory=list)  # what went wrong after the output was complete


def check_destination(out_dir, *, force: bool = False, keep=(), force_name: str = "force=True") -> Path:
    """The directory to write (a symlink resolved to its target); fails early, before any work, if it may not be.

    Refused: a non-empty directory unless `force` and fxconvert wrote it (see the module
    docstring); a path in `keep` (the source) or a directory that contains one; an unwritable
    parent. `force_name` is how the message names the option (`--force` on the command line).
    """
    try:
        out = Path(out_dir).resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise UsageError(f"cannot use {out_dir} as the output directory: {e}") from e
    for path in keep:
        source = Path(path).resolve()
        if out == source or out in source.parents:
            raise UsageError(f"the output directory {out} would replace the source {path}; choose an output "
                             f"directory that does not contain it")
    try:
        if out.exists() and not out.is_dir():
            raise UsageError(f"{out} exists and is not a directory; choose another output directory")
        if out.exists() and any(out.iterdir()):
            foreign = _not_written_by_fxconvert(out)
            if foreign:
                raise UsageError(f"{out} is not empty and {foreign}; choose another output directory")
            if not force:
                raise UsageError(f"{out} already exists; pass {force_name} to replace it, or choose another "
                                 f"output directory")
    except OSError as e:
        raise SaveError(f"cannot write to {out}: {e.strerror or e}") from e
    parent = _existing_parent(out.parent)
    if not parent.is_dir():
        raise SaveError(f"cannot write to {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SaveError(f"cannot write to {out}: {parent} is not writable")
    return out


def save(conversion, out_dir, *, force: bool = False, make_report=None, extra_files=None,
         force_name: str = "force=True") -> Saved:
    """Write the conversion's files into `out_dir` atomically (see the module docstring).

    `make_report()`, called after model.py and the weights are written (so that the
    report can include the write time, recorded in `conversion.timings["write"]`),
    returns the `fxconvert.report.Report` to write as report.md and report.json.
    `extra_files` maps more file names to their text (e.g. `stage_<i>.py`), or to bytes
    for files copied as they are (tokenizer files).
    A KeyboardInterrupt leaves `out_dir` as it was, or, once the commit began, complete
    (`is_own_output` tells which).
    """
    source = conversion.source
    keep = [source.location] if source is not None and os.path.exists(source.location) else []
    out = check_destination(out_dir, force=force, keep=keep, force_name=force_name)
    found = "absent" if not out.exists() else "output" if any(out.iterdir()) else "empty"
    _remove_stale(out)
    start = time.perf_counter()
    text = model_source(conversion)
    weights = not _on_meta(conversion.module)
    files = [MODEL_FILE, *(extra_files or {})] + [WEIGHTS_FILE] * weights + [REPORT_MD, REPORT_JSON] * bool(
        make_report)
    created, tmp = _missing_parents(out.parent), None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # marked first: a killed run's directory is recognisable from the start
        tmp = atomic_dir.make_temp(out.parent, f".{out.name}.", ".tmp", version=fxconvert.__version__, files=files)
        (tmp / MODEL_FILE).write_text(text, encoding="utf-8")
        for name, content in (extra_files or {}).items():
            if isinstance(content, bytes):  # copied files (a tokenizer's), byte for byte
                (tmp / name).write_bytes(content)
            else:
                (tmp / name).write_text(content, encoding="utf-8")
        if weights:
            save_weights(conversion.module, tmp / WEIGHTS_FILE)
        conversion.timings["write"] = time.perf_counter() - start
        report = None
        if make_report is not None:
            report = make_report()
            (tmp / REPORT_MD).write_text(render(report, "markdown"), encoding="utf-8")
            (tmp / REPORT_JSON).write_text(render(report, "json"), encoding="utf-8")
        for name in [MARKER, *files]:
            os.chmod(tmp / name, 0o666 & ~_umask())
        with deferred():
            old = _commit(tmp, out, found)
            tmp = None
            note = None if old is None else atomic_dir.remove_old(old)
            notes = [] if note is None else [note]
    except OSError as e:
        raise SaveError(f"cannot write to {out}: {e.strerror or e}") from e
    finally:
        if tmp is not None:
            with deferred():
                with contextlib.suppress(OSError):
                    atomic_dir.rmtree(tmp)
                _remove_empty(created)
    return Saved(out, files, report, notes)


def save_weights(module: torch.nn.Module, path) -> None:
    """The module's state dict as safetensors; tensors that share storage are refused, not duplicated."""
    from safetensors.torch import save_file

    state = {name: t.detach().contiguous() for name, t in module.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt", "producer": f"fxconvert {fxconvert.__version__}"})


# -- the marker ----------------------------------------------------------------------------------


def is_own_output(out_dir, *, since: float = 0.0) -> bool:
    """Whether `out_dir` holds an output this process began writing at `time.time()` >= `since`.

    Such an output is complete, since only a finished one is put in place.
    """
    record = _read_marker(Path(out_dir))
    return record is not None and record.get("run") == atomic_dir.RUN and record.get("time", 0) >= since


def _read_marker(directory: Path) -> dict | None:
    """The marker of a conversion output (or its temporary): fxconvert's, listing the files written."""
    record = atomic_dir.read_marker(directory)
    return record if record is not None and isinstance(record.get("files"), list) else None


def _not_written_by_fxconvert(directory: Path) -> str:
    """Why fxconvert may not delete `directory`, or "" if it wrote everything there.

    Its own files are those the marker lists, plus the `__pycache__` of `import model`.
    """
    record = _read_marker(directory)
    if record is None:
        return f"was not written by fxconvert (it has no {MARKER} marker)"
    ours = {MARKER, *record["files"]}
    foreign = sorted(e.name for e in os.scandir(directory) if e.name not in ours and not _is_pycache(e))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        return f"holds files fxconvert did not write ({shown})"
    return ""


def _is_pycache(entry: os.DirEntry) -> bool:
    try:
        return (entry.name == "__pycache__" and entry.is_dir(follow_symlinks=False)
                and all(name.endswith(".pyc") for name in os.listdir(entry.path)))
    except OSError:
        return False


# -- the write's steps ---------------------------------------------------------------------------


def _commit(tmp: Path, out: Path, found: str) -> Path | None:
    """Put `tmp` in place of `out`; returns the directory now holding the old output, if any, to remove.

    `found` is what the check found at `out`: "absent", "empty", or an "output" of fxconvert's
    to replace. Only that is replaced, and an output only while it is still fxconvert's; a
    directory that appeared since (another run writing the same destination) is left alone.
    """
    replace = found == "output" and out.exists()
    if replace:
        foreign = _not_written_by_fxconvert(out)
        if foreign:
            raise SaveError(f"{out} changed while this run was writing: it {foreign}; nothing was written, "
                            f"choose another output directory")
    try:
        return atomic_dir.put_in_place(tmp, out, replace=replace, onto_empty=found == "empty")
    except OSError as e:
        if replace or e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        raise SaveError(f"{out} appeared while this run was writing it (another run writing there?); "
                        f"nothing was written: choose another output directory, or rerun") from e


def _remove_stale(out: Path) -> None:
    """Remove `.<name>.*.tmp` and `.<name>.*.old` beside `out` left by a run that was killed.

    Only directories with fxconvert's own names and marker, whose writer is no longer running
    on this host, and that hold nothing fxconvert did not write.
    """
    def keep(path: Path, record: dict) -> bool:
        return _read_marker(path) is None or bool(_not_written_by_fxconvert(path)) or atomic_dir.writer_alive(record)

    atomic_dir.remove_leftovers(out.parent, re.compile(rf"\.{re.escape(out.name)}\.[a-z0-9_]{{8}}\.(tmp|old)"),
                                keep=keep)


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
partitioner needs.
{needs}
"""


def model_source(conversion) -> str:
    """The text of model.py for `conversion` (see the module docstring).

    User text (the source path or Hub id, above all) is written only as repr() literals
    in SOURCE; the docstring holds fixed text and identifiers (`fxconvert.codegen`).
    """
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
        needs=requirements(conversion.graph_module),
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
        weights=WEIGHTS_FILE, on_meta=_on_meta(conversion.module), config=getattr(conversion.model, "config", None),
    )
