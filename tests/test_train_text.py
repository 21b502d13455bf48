"""The issue's workflow end to end, on text: convert with --stages, train on {"input", "target"} lines, load run/hf.

The checkpoint directory holds a word-level tokenizer (tests/checkpoints.py); the
conversion copies it, the launcher tokenizes with it, and run/hf carries it on. The run
must equal eager transformers trained on the same text tokenized by AutoTokenizer itself,
and `from_pretrained(run/hf)` with its tokenizer must generate.
"""

import json
import subprocess
import sys

import pytest
import torch
import transformers

import checkpoints
import train_runs as tr

pytestmark = pytest.mark.xdist_group("ranks")  # torchrun runs: one at a time (tests/conftest.py)

STEPS, BATCH, LR = 2, 4, 0.5


def test_text_data_from_conversion_to_generate(tmp_path):
    tokenizer = checkpoints.write_tokenizer(tmp_path / "ckpt")
    tr.write_checkpoint(tmp_path / "ckpt")
    g = torch.Generator().manual_seed(3)
    words = [f"w{i}" for i in range(40)]
    lines = [{"input": " ".join(words[j] for j in torch.randint(0, 40, (int(n),), generator=g)),
              "target": " ".join(words[j] for j in torch.randint(0, 40, (int(n) // 2 + 1,), generator=g))}
             for n in torch.randint(2, 9, (8,), generator=g)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    proc = subprocess.run([sys.executable, "-m", "fxconvert", str(tmp_path / "ckpt"), "--stages", "2", "--out",
                           str(tmp_path / "conv"), "--no-validate", "-q"], cwd=tr.REPO, env=tr.env(),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "run"
    proc = tr.torchrun(2, tmp_path / "conv", "--data", tmp_path / "train.jsonl", "--out", out, "--steps", STEPS,
                       "--batch", BATCH, "--microbatches", 2, "--schedule", "1f1b", "--optimizer", "sgd", "--lr", LR)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"step {STEPS}/{STEPS}  loss" in proc.stderr  # plain progress lines: stderr is not a terminal

    rows = [{"input_ids": tokenizer(line["input"])["input_ids"],
             "labels": tokenizer(text_target=line["target"])["input_ids"]} for line in lines]
    losses, weights = tr.train_eager(tmp_path / "ckpt", rows, steps=STEPS, batch=BATCH, microbatches=2, lr=LR)
    got = [m["loss"] for m in tr.metrics(out)]
    assert max(abs(a - b) for a, b in zip(got, losses, strict=True)) <= 1e-5
    assert tr.max_weight_diff(tr.weights_of(out / "hf"), weights) <= 1e-5
    first, *rest = tr.metrics(out)
    assert all(set(m) == {"step", "loss", "lr", "grad_norm", "tokens_per_s", "seconds"} for m in rest)
    assert first.pop("optimizer_state_bytes") == [0, 0] and set(first) == set(rest[0])  # SGD keeps no state

    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(out / "hf")
    loaded = transformers.AutoTokenizer.from_pretrained(out / "hf")
    ids = loaded("w1 w2 w3", return_tensors="pt")["input_ids"]
    generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert generated.shape[0] == 1 and 1 < generated.shape[1] <= 5
