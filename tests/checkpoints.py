"""Tiny checkpoints on disk (written with save_pretrained) for the load, save and CLI tests."""

import json
import shutil
from pathlib import Path

from safetensors.torch import load_file

import helpers


def write_checkpoint(directory, cls_name="T5ForConditionalGeneration", variant="original", **overrides):
    """A tiny model saved to `directory`; returns the model (eval mode) whose tensors are in the files."""
    model = helpers.build(cls_name, variant=variant, **overrides)
    model.save_pretrained(directory)
    return model


def checkpoint_tensors(directory) -> dict:
    return load_file(str(Path(directory) / "model.safetensors"))


def edit_config(directory, **changes) -> None:
    path = Path(directory) / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def fake_hub_cache(cache, repo_id, checkpoint_dir, files=("config.json", "model.safetensors")) -> None:
    """Lay out `checkpoint_dir`'s files in `cache` the way huggingface_hub stores a downloaded repo."""
    repo = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    revision = "0" * 40
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    for name in files:
        shutil.copy(Path(checkpoint_dir) / name, snapshot / name)


def leftovers(directory) -> list[str]:
    """Everything under `directory`, for checking that a failure wrote nothing."""
    return sorted(str(p.relative_to(directory)) for p in Path(directory).rglob("*"))
