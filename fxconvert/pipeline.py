"""`fxconvert.pipeline`: the directory `fxconvert NAME --stages N` writes, and reading it back.

Besides model.py, weights.safetensors and the reports, a conversion split into stages holds
what a pipeline runtime needs to fine-tune the model and hand back a transformers checkpoint:

- `stage_<i>.py`: one importable module per stage (`fxconvert.stages.stage_sources`), whose
  `load()` reads only that stage's tensors from weights.safetensors;
- `pipeline.json`: the stages, their parameters under their transformers names, the shared
  weights and the values that cross each boundary (`fxconvert.stages.pipeline_manifest`);
- `config.json` (and `generation_config.json` when the model has one): the transformers
  config, so the trained weights can be saved as a checkpoint again;
- the tokenizer files found beside the source checkpoint, copied byte for byte.

`pipeline_files(stages, conversion)` gives all of these as {name: text or bytes} for
`fxconvert.save.save(extra_files=...)`. `load_pipeline(directory)` reads pipeline.json back,
checks it, and imports a stage file by index only: a manifest cannot name another file.
"""

import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from fxconvert.errors import UsageError

# Files a tokenizer's save_pretrained writes (fast and slow T5, mT5, umT5 and the common formats).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "spiece.model", "sentencepiece.bpe.model", "vocab.json", "vocab.txt", "merges.txt",
                   "chat_template.jinja", "chat_template.json")
PIPELINE_FORMAT, PIPELINE_VERSION = "fxconvert-pipeline", 1
GENERATION_CONFIG_FILE = "generation_config.json"


class PipelineError(UsageError):
    """A directory is not (or no longer) a readable pipeline conversion."""


def source_directory(source) -> Path | None:
    """The directory the converted checkpoint was read from (a local directory or its Hub cache snapshot)."""
    if source is None:
        return None
    if source.origin == "local directory":
        return Path(source.location)
    if source.origin in ("Hugging Face cache", "Hugging Face Hub"):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source.location, "config.json")
        return Path(cached).parent if isinstance(cached, str) else None
    return None


def tokenizer_sources(source) -> dict[str, Path]:
    """Tokenizer file name -> its path beside the source checkpoint, for the files that exist there."""
    directory = source_directory(source)
    if directory is None:
        return {}
    return {name: directory / name for name in TOKENIZER_FILES if (directory / name).is_file()}


def pipeline_files(stages, conversion) -> dict[str, str | bytes]:
    """Everything --stages adds to the output directory (see the module docstring)."""
    from fxconvert.stages import CONFIG_FILE, PIPELINE_FILE, pipeline_manifest, stage_sources

    model = conversion.model
    if model is None or getattr(model, "config", None) is None:
        raise UsageError("this conversion holds no transformers model, so config.json cannot be written; "
                         "convert the model with fxconvert.convert")
    files: dict[str, str | bytes] = dict(stage_sources(stages))
    config = json.loads(model.config.to_json_string(use_diff=False))
    config.pop("_name_or_path", None)  # where this process loaded it from, not part of the model
    config["architectures"] = [conversion.model_class]
    files[CONFIG_FILE] = json.dumps(config, indent=2, sort_keys=True) + "\n"
    generation = getattr(model, "generation_config", None) if model.can_generate() else None
    if generation is not None:
        files[GENERATION_CONFIG_FILE] = generation.to_json_string(use_diff=True)
    for name, path in tokenizer_sources(conversion.source).items():
        try:
            files[name] = path.read_bytes()
        except OSError as e:
            raise PipelineError(f"cannot copy the tokenizer file {path}: {e.strerror or e}") from e
    files[PIPELINE_FILE] = manifest_text(pipeline_manifest(stages, conversion))
    return files


def manifest_text(manifest: dict) -> str:
    """pipeline.json's text: indented, with lists of plain values (shapes, names) on one line."""
    text = json.dumps(manifest, indent=2)
    # A newline never occurs inside a JSON string, so this joins only the layout of innermost lists.
    text = re.sub(r"\[\n\s*([^\[\]{}]*?)\n\s*\]", lambda m: "[" + re.sub(r",\n\s*", ", ", m.group(1)) + "]", text)
    assert json.loads(text) == manifest
    return text + "\n"


@dataclass
class Pipeline:
    """A conversion written with --stages, as pipeline.json describes it (see `pipeline_manifest`)."""

    directory: Path
    model_class: str
    model_type: str | None
    num_stages: int
    input_names: list[str]
    output_name: str
    weights: str
    config: str
    tokenizer_files: list[str]
    shared_weights: dict
    stages: list[dict]

    def stage_file(self, index: int) -> Path:
        if not (isinstance(index, int) and 0 <= index < self.num_stages):
            raise PipelineError(f"{self.directory} has stages 0..{self.num_stages - 1}; there is no stage {index!r}")
        return self.directory / f"stage_{index}.py"

    def import_stage(self, index: int):
        """stage_<index>.py as a Python module (its build(), load() and constants)."""
        path = self.stage_file(index)
        if not path.is_file():
            raise PipelineError(f"{path} is missing; convert again with --stages {self.num_stages}")
        spec = importlib.util.spec_from_file_location(f"fxconvert_stage_{index}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if (getattr(module, "STAGE", None), getattr(module, "NUM_STAGES", None)) != (index, self.num_stages):
            raise PipelineError(f"{path} is not stage {index} of {self.num_stages}; convert again with "
                                f"--stages {self.num_stages}")
        return module

    def load_stage(self, index: int, device="cpu") -> torch.nn.Module:
        """Stage `index` with only its own tensors read from the weights file, in eval mode."""
        module = self.import_stage(index)
        return module.load(str(self.directory / self.weights), device=device)


def load_pipeline(directory) -> Pipeline:
    """Read and check `directory`/pipeline.json; one-line errors name the fix."""
    from fxconvert.stages import PIPELINE_FILE

    directory = Path(directory)
    path = directory / PIPELINE_FILE
    if not path.is_file():
        raise PipelineError(f"{directory}{os.sep} has no {PIPELINE_FILE}; convert with --stages N")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise PipelineError(f"cannot read {path}: {e.strerror or e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PipelineError(f"malformed {path}: {e}; convert again with --stages N") from e
    if not isinstance(manifest, dict) or manifest.get("format") != PIPELINE_FORMAT:
        raise PipelineError(f"{path} is not an fxconvert pipeline manifest; convert with --stages N")
    if manifest.get("version") != PIPELINE_VERSION:
        raise PipelineError(f"{path} has version {manifest.get('version')!r}, this fxconvert reads version "
                            f"{PIPELINE_VERSION}; convert again with this fxconvert")
    fields = {name: manifest.get(name) for name in Pipeline.__dataclass_fields__ if name != "directory"}
    num_stages, stages = fields["num_stages"], fields["stages"]
    if not (isinstance(num_stages, int) and num_stages >= 1 and isinstance(stages, list)
            and [s.get("index") if isinstance(s, dict) else None for s in stages] == list(range(num_stages))):
        raise PipelineError(f"{path} lists its stages inconsistently; convert again with --stages N")
    for name in ("weights", "config"):
        value = fields[name]
        if not isinstance(value, str) or not value or os.path.basename(value) != value or value in (".", ".."):
            raise PipelineError(f"{path}: '{name}' must be a file name in {directory}, got {value!r}")
    return Pipeline(directory=directory, **fields)


__all__ = ["Pipeline", "PipelineError", "load_pipeline", "pipeline_files", "tokenizer_sources", "TOKENIZER_FILES"]
