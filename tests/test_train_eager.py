"""`torchrun -m fxconvert.train` against eager transformers trained in one process.

A tiny T5 written by save_pretrained (dropout 0) and a pre-tokenized JSONL whose lines have
different lengths (every batch has its own shape). Each configuration trains with SGD and
must give eager T5ForConditionalGeneration's loss at every step within 1e-5 and, in
RUN/hf, its weights within 1e-5.

CI runs the whole matrix (about 25 s per launch on 2 cores): 2, 3 and 4 stages with gpipe
and 1f1b, interleaved-1f1b on 2 ranks x 2 virtual stages, and --dp 2 x 2 stages.
"""

import pytest

import train_runs as tr

STEPS, BATCH, LR, TOL = 3, 4, 0.5, 1e-5

# id -> (processes, train options, microbatches, dp)
CONFIGS = {
    "2-gpipe": (2, ["--schedule", "gpipe"], 2, 1),
    "2-1f1b": (2, ["--schedule", "1f1b"], 2, 1),
    "3-gpipe": (3, ["--schedule", "gpipe"], 4, 1),
    "3-1f1b": (3, ["--schedule", "1f1b"], 4, 1),
    "4-gpipe": (4, ["--schedule", "gpipe"], 4, 1),
    "4-1f1b": (4, ["--schedule", "1f1b"], 4, 1),
    "2x2-interleaved": (2, ["--schedule", "interleaved-1f1b", "--virtual-stages", "2"], 4, 1),
    "dp2x2-1f1b": (4, ["--schedule", "1f1b", "--dp", "2"], 2, 2),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-eager")
    tr.write_checkpoint(root / "ckpt")
    rows = tr.write_jsonl(root / "train.jsonl")
    return root, rows


@pytest.fixture(scope="module")
def eager(setup):
    root, rows = setup
    cache = {}

    def get(microbatches, dp):
        if (microbatches, dp) not in cache:
            cache[microbatches, dp] = tr.train_eager(root / "ckpt", rows, steps=STEPS, batch=BATCH,
                                                     microbatches=microbatches, dp=dp, lr=LR)
        return cache[microbatches, dp]

    return get


def _train(root, name, nproc, options, microbatches, source=None):
    out = root / f"run-{name}"
    proc = tr.torchrun(nproc, source or root / "ckpt", "--data", root / "train.jsonl", "--out", out,
                       "--steps", STEPS, "--batch", BATCH, "--microbatches", microbatches, "--optimizer", "sgd",
                       "--lr", LR, *options)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


@pytest.mark.parametrize("name", list(CONFIGS))
def test_pipeline_training_equals_eager_transformers(setup, eager, name):
    root, _ = setup
    nproc, options, microbatches, dp = CONFIGS[name]
    out, _ = _train(root, name, nproc, options, microbatches)
    losses, weights = eager(microbatches, dp)
    got = [m["loss"] for m in tr.metrics(out)]
    assert [m["step"] for m in tr.metrics(out)] == [1, 2, 3]
    assert max(abs(a - b) for a, b in zip(got, losses, strict=True)) <= TOL, (got, losses)
    trained = tr.weights_of(out / "hf")
    assert tr.max_weight_diff(trained, weights) <= TOL
    initial = tr.weights_of(root / "ckpt")
    assert tr.max_weight_diff(initial, weights) > 1e-2  # the weights did move
