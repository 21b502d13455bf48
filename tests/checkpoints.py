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


def fake_hub_cache(cache, repo_id, checkpoint_dir, files=("config.json", "model.safetensors"), links=False) -> None:
    """Lay out `checkpoint_dir`'s files in `cache` the way huggingface_hub stores a downloaded repo.

    With `links`, as huggingface_hub really does: each snapshot file is a relative symlink
    to `../../blobs/<its sha256>`.
    """
    import hashlib

    repo = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    revision = "0" * 40
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    for name in files:
        if not links:
            shutil.copy(Path(checkpoint_dir) / name, snapshot / name)
            continue
        data = (Path(checkpoint_dir) / name).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(exist_ok=True)
        blob.write_bytes(data)
        (snapshot / name).symlink_to(Path("..") / ".." / "blobs" / blob.name)


def leftovers(directory) -> list[str]:
    """Everything under `directory`, for checking that a failure wrote nothing."""
    return sorted(str(p.relative_to(directory)) for p in Path(directory).rglob("*"))


WORDS = tuple(f"w{i}" for i in range(40))


def write_tokenizer(directory, vocab=WORDS):
    """An offline word-level tokenizer saved to `directory`; returns it as loaded back by AutoTokenizer.

    Like T5's own tokenizer it has <pad>=0, </s>=1, <unk>=2 and appends </s> to every sequence
    (T5's tokenizer does so with a TemplateProcessing post-processor, single=["$A", "</s>"]).
    Words are split on whitespace; ids follow `vocab` from 3 on. No network is needed.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    ids = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in vocab:
        ids.setdefault(word, len(ids))
    core = Tokenizer(models.WordLevel(ids, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)
