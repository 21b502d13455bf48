"""`fxconvert.stage_files`: read a conversion written with --stages back, as a rank that trains it does.

`load_pipeline(directory)` reads pipeline.json (`fxconvert.manifest`) and checks all of
it, including what an export will copy and name (`fxconvert.export.plan_from_manifest`),
so a trainer refuses a tampered manifest before it trains. `Pipeline.load_stage(i)`
imports `stage_<i>.py` and reads only that stage's tensors from the weights file; a stage
file is imported by index only: a manifest cannot name another file.

This is the rank's side of the data path, so it imports neither the converter (tracer,
passes, stage splitting) nor transformers: the stage files need torch, safetensors and
`fxconvert.runtime`, and a stage with leaves imports transformers when it is loaded, to
rebuild them (`fxconvert.codegen`). The converter's side, which writes these files, is
`fxconvert.pipeline`.
"""

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from fxconvert import manifest as manifests
from fxconvert.errors import UsageError, first_line, printable
from fxconvert.export import ExportError, plan_from_manifest


class PipelineError(UsageError):
    """A directory is not (or no longer) a readable pipeline conversion."""


@dataclass(frozen=True)
class Pipeline:
    """A conversion written with --stages: its directory and what its pipeline.json says."""

    directory: Path
    manifest: manifests.Manifest

    # pipeline.json's top-level fields, as earlier readers named them
    model_class = property(lambda self: self.manifest.model_class)
    model_type = property(lambda self: self.manifest.model_type)
    num_stages = property(lambda self: self.manifest.num_stages)
    output_name = property(lambda self: self.manifest.output_name)
    weights = property(lambda self: self.manifest.weights)
    config = property(lambda self: self.manifest.config)
    input_names = property(lambda self: list(self.manifest.input_names))
    tokenizer_files = property(lambda self: list(self.manifest.tokenizer_files))
    shared_weights = property(lambda self: dict(self.manifest.shared_weights))
    stages = property(lambda self: list(self.manifest.stages))

    def stage_file(self, index: int) -> Path:
        if not (isinstance(index, int) and 0 <= index < self.num_stages):
            raise PipelineError(f"{self.directory} has stages 0..{self.num_stages - 1}; there is no stage {index!r}")
        return self.directory / f"stage_{index}.py"

    def import_stage(self, index: int):
        """stage_<index>.py as a Python module (its build(), load() and constants).

        Whatever a truncated, garbled or foreign stage file raises while it runs (a
        SyntaxError, a NameError, even SystemExit) is one PipelineError naming the file;
        only Ctrl-C goes through.
        """
        path = self.stage_file(index)
        if not path.is_file():
            raise PipelineError(f"{path} is missing; convert again with --stages {self.num_stages}")
        spec = importlib.util.spec_from_file_location(f"fxconvert_stage_{index}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # noqa: BLE001 - a broken file may raise anything, SystemExit included
            raise PipelineError(f"cannot import {path} ({_described(e)}); it is damaged or not a stage file: "
                                f"convert again with --stages {self.num_stages}") from e
        found = (getattr(module, "STAGE", None), getattr(module, "NUM_STAGES", None))
        if found != (index, self.num_stages):
            raise PipelineError(f"{path} is not stage {index} of {self.num_stages} (it says STAGE {found[0]!r} of "
                                f"NUM_STAGES {found[1]!r}); convert again with --stages {self.num_stages}")
        if not callable(getattr(module, "load", None)):
            raise PipelineError(f"{path} has no load(); convert again with --stages {self.num_stages}")
        return module

    def load_stage(self, index: int, device="cpu") -> torch.nn.Module:
        """Stage `index` with only its own tensors read from the weights file, in eval mode.

        A weights file that is missing, truncated, empty, not safetensors, or written with
        other stage files (a name or a shape differs) is one PipelineError naming both files
        and what does not fit.
        """
        module = self.import_stage(index)
        path, weights = self.stage_file(index), self.directory / self.weights
        try:
            return module.load(str(weights), device=device)
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # noqa: BLE001 - safetensors, torch and the file itself raise many kinds
            if isinstance(e, ImportError):  # a leaf's transformers class (the message names it and the fix)
                raise PipelineError(f"stage {index}: {printable(first_line(e))}") from e
            if isinstance(e, FileNotFoundError) and not weights.exists():
                problem = str(e) if "meta device" in str(e) else f"{weights} is missing"
            elif isinstance(e, (KeyError, RuntimeError)) and _mismatch(e, weights.name, path.name):
                problem = f"{weights} and {path.name} were not written together " \
                          f"({_mismatch(e, weights.name, path.name)})"
            else:
                problem = f"cannot load {weights} with {path.name} ({_described(e)})"
            raise PipelineError(f"stage {index}: {problem}; convert again with --stages {self.num_stages}") from e


def _described(error: BaseException) -> str:
    """`Type: first line` of an error, control characters escaped (a message may quote the file)."""
    if isinstance(error, SystemExit):
        return f"it called sys.exit({error.code!r})"
    return printable(f"{type(error).__name__}: {first_line(error)}")


def _mismatch(error: BaseException, weights: str, stage: str) -> str | None:
    """What a stage file and a weights file disagree on: load()'s missing tensor, or load_state_dict's
    first complaint (its message is a header line, then one tab-indented line per problem)."""
    text = str(error.args[0] if isinstance(error, KeyError) and error.args else error)
    if isinstance(error, KeyError) and "has no tensor" in text:
        return printable(text.split("; ")[0])
    lines = [line.strip() for line in text.splitlines()[1:] if line.strip()]
    if not text.startswith("Error(s) in loading state_dict") or not lines:
        return None
    first = re.sub(r"^size mismatch for (\S+): copying a param with shape torch\.Size\((\[.*?\])\) from checkpoint, "
                   r"the shape in current model is torch\.Size\((\[.*?\])\)\.?$",
                   lambda m: f"{m[1]} is {m[2]} in {weights} but {m[3]} in {stage}", lines[0])
    more = len(lines) - 1
    return printable(first.rstrip(".") + (f", and {more} more" if more else ""))


def load_pipeline(directory) -> Pipeline:
    """Read and check `directory`/pipeline.json, and what an export will copy and name; one-line errors name
    the fix."""
    directory = Path(directory)
    try:
        manifest = manifests.read(directory)
        plan_from_manifest(manifest, directory)  # refused now, not after the training
    except (manifests.ManifestError, ExportError) as e:
        raise PipelineError(str(e)) from None
    return Pipeline(directory, manifest)


__all__ = ["Pipeline", "PipelineError", "load_pipeline"]
