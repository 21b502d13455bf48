"""`--eval-data`, `--save-best` and `--keep-last`: the eval loss against eager transformers, and which checkpoints stay.

The eval loss is checked against T5ForConditionalGeneration in eval mode on the same
batches (the README's definition: the mean of the batch losses, each batch's loss being
transformers' own, weighted by the batch's examples):

- through torchrun, 2 stages (1f1b), 2 ranks x 2 stages in a V (zbv) and --dp 2 x 2 stages, SGD and
  dropout 0:
  at each evaluated step, eager trained the same steps (`train_runs.train_eager`); the
  training losses stay eager's too (an evaluation changes nothing of the training);
- in a world of one, with dropout 0.3: the end's eval loss against eager on the exported
  `run/hf` in eval mode (dropout off), which differs from train mode's.

Pruning is checked on checkpoints made by `save_checkpoint` among hostile entries, and
once through a resumed run that adds the eval options to a run made without them.
"""

import contextlib
import io
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import transformers

import train_runs as tr
from fxconvert.errors import UsageError
from fxconvert.train import main
from fxconvert.training import retention
from fxconvert.training.checkpoint import latest_checkpoint, save_checkpoint
from fxconvert.training.config import Launch, check_options
from fxconvert.training.options import parse

STEPS, BATCH, LR, TOL = 3, 4, 0.5, 1e-5
EVAL_BATCH, EVAL_LINES = 3, 7  # the last eval batch holds one example


def eager_eval_loss(checkpoint, state, rows, batch_size) -> float:
    """The eval loss as the README defines it, computed by eager transformers in eval mode."""
    model = transformers.T5ForConditionalGeneration.from_pretrained(checkpoint)
    if state is not None:
        model.load_state_dict(state)
    model.eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            part = rows[start:start + batch_size]
            b = tr.eager_batch(part, len(part), 0)
            total += model(**b, use_cache=False).loss.item() * len(part)
    return total / len(rows)


def _convert(root, stages):
    out = root / f"conv-{stages}"
    if not out.exists():
        proc = subprocess.run([sys.executable, "-m", "fxconvert", str(root / "ckpt"), "--stages", str(stages),
                               "--out", str(out), "--no-validate", "-q"], cwd=tr.REPO, env=tr.env(),
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-eval")
    tr.write_checkpoint(root / "ckpt")
    rows = tr.write_jsonl(root / "train.jsonl")
    eval_rows = tr.write_jsonl(root / "eval.jsonl", n=EVAL_LINES, seed=7)
    return root, rows, eval_rows


# -- against eager transformers, through torchrun -------------------------------------------------------------

# id -> (processes, stages of the conversion, options, microbatches, dp)
PIPELINES = {"2-1f1b": (2, 2, ["--schedule", "1f1b"], 2, 1),
             "2x2-zbv": (2, 4, ["--schedule", "zbv", "--virtual-stages", 2], 4, 1),
             "dp2x2-1f1b": (4, 2, ["--schedule", "1f1b", "--dp", 2], 2, 2)}  # replicas take eval batches 0, 2 and 1


@pytest.mark.xdist_group("ranks")
@pytest.mark.parametrize("name", list(PIPELINES))
def test_eval_loss_equals_eager_transformers_at_each_evaluation(setup, name):
    root, rows, eval_rows = setup
    nproc, stages, options, microbatches, dp = PIPELINES[name]
    out = root / f"run-{name}"
    proc = tr.torchrun(nproc, _convert(root, stages), "--data", root / "train.jsonl", "--out", out, "--steps", STEPS,
                       "--batch", BATCH, "--microbatches", microbatches, "--optimizer", "sgd", "--lr", LR,
                       "--eval-data", root / "eval.jsonl", "--eval-every", 2, "--eval-batch", EVAL_BATCH, *options)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = tr.metrics(out)
    evals = {m["step"]: m for m in records if m.get("record") == "eval"}
    assert sorted(evals) == [2, 3]  # every 2 steps, and once more at the end
    assert all(m["eval_examples"] == EVAL_LINES for m in evals.values())
    for step in (2, 3):
        _, state = tr.train_eager(root / "ckpt", rows, steps=step, batch=BATCH, microbatches=microbatches, dp=dp,
                                  lr=LR)
        expected = eager_eval_loss(root / "ckpt", state, eval_rows, EVAL_BATCH)
        assert abs(evals[step]["eval_loss"] - expected) <= TOL, (step, evals[step], expected)
    # the training is eager's, evaluations or not
    losses, weights = tr.train_eager(root / "ckpt", rows, steps=STEPS, batch=BATCH, microbatches=microbatches,
                                     dp=dp, lr=LR)
    got = [m["loss"] for m in records if "loss" in m]
    assert max(abs(a - b) for a, b in zip(got, losses, strict=True)) <= TOL
    assert tr.max_weight_diff(tr.weights_of(out / "hf"), weights) <= TOL
    assert "step 2/3  eval loss " in proc.stderr and "step 3/3  eval loss " in proc.stderr


# -- in a world of one ----------------------------------------------------------------------------------------


def _world_of_one(monkeypatch) -> None:
    for name in ("RANK", "LOCAL_RANK"):
        monkeypatch.setenv(name, "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    for name in ("MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)


def _train(monkeypatch, source, root, out, *options, code=0) -> str:
    _world_of_one(monkeypatch)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        got = main([str(a) for a in [source, "--data", root / "train.jsonl", "--out", out, "--batch", BATCH,
                                     "--microbatches", 2, "--schedule", "gpipe", "--optimizer", "sgd", "--lr", 0.1,
                                     *options]])
    assert got == code, err.getvalue()[-3000:]
    return err.getvalue()


@pytest.fixture(scope="module")
def dropout(setup):
    """A one-stage conversion of a T5 with dropout 0.3."""
    from fxconvert.cli import main as convert_main

    root, _, _ = setup
    ckpt, conv = root / "ckpt-dropout", root / "conv-dropout"
    tr.helpers.build(dropout_rate=0.3).save_pretrained(ckpt)
    assert convert_main([str(ckpt), "--stages", "1", "--out", str(conv), "-q", "--no-validate"]) == 0
    return ckpt, conv


def test_the_eval_loss_is_eager_models_in_eval_mode(setup, dropout, tmp_path, monkeypatch):
    root, _, eval_rows = setup
    ckpt, conv = dropout
    out = tmp_path / "run"
    _train(monkeypatch, conv, root, out, "--steps", 2, "--eval-data", root / "eval.jsonl", "--eval-batch",
           EVAL_BATCH)
    (record,) = [m for m in tr.metrics(out) if m.get("record") == "eval"]
    assert record["step"] == 2
    expected = eager_eval_loss(out / "hf", None, eval_rows, EVAL_BATCH)
    assert abs(record["eval_loss"] - expected) <= TOL
    model = transformers.T5ForConditionalGeneration.from_pretrained(out / "hf").train()  # dropout on
    torch.manual_seed(0)
    b = tr.eager_batch(eval_rows, len(eval_rows), 0)
    assert abs(model(**b, use_cache=False).loss.item() - expected) > 1e-3


def test_eval_options_added_on_resume_and_pruning_among_hostile_entries(setup, dropout, tmp_path, monkeypatch):
    """A run with checkpoints and no eval options, resumed with --eval-data --save-best --keep-last 1 among a user's
    file, directory, a symlink named step_9, an incomplete step_50 and a checkpoint holding a user's note."""
    root, _, _ = setup
    _, conv = dropout
    out = tmp_path / "run"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    _train(monkeypatch, conv, root, out, "--steps", 3, "--save-every", 1, "--no-export")
    cks = out / "checkpoints"
    (cks / "notes.txt").write_text("mine")
    (cks / "mine").mkdir()
    (cks / "step_9").symlink_to(outside)
    (cks / "step_50").mkdir()
    (cks / "step_50" / "stage_0.pt").write_text("not a checkpoint")
    (cks / "step_1" / "README").write_text("a user's note")
    err = _train(monkeypatch, conv, root, out, "--steps", 6, "--save-every", 1, "--no-export", "--resume",
                 "--eval-data", root / "eval.jsonl", "--eval-every", 1, "--save-best", "--keep-last", 1)
    evals = {m["step"]: m["eval_loss"] for m in tr.metrics(out) if m.get("record") == "eval"}
    assert sorted(evals) == [4, 5, 6]
    best = min(evals, key=lambda s: (evals[s], s))
    assert json.loads((cks / "best.json").read_text()) == {"producer": "fxconvert.train", "checkpoint": f"step_{best}",
                                                           "step": best, "eval_loss": evals[best]}
    steps = sorted(p.name for p in cks.iterdir() if p.name.startswith("step_") and not p.is_symlink())
    assert steps == sorted({"step_1", "step_50", "step_6", f"step_{best}"})
    assert (cks / "notes.txt").read_text() == "mine" and (cks / "mine").is_dir()
    assert (cks / "step_9").is_symlink() and (outside / "keep.txt").read_text() == "mine"
    assert (cks / "step_50" / "stage_0.pt").read_text() == "not a checkpoint"
    assert (cks / "step_1" / "README").read_text() == "a user's note"
    warned = [line for line in err.splitlines() if "--keep-last leaves" in line]
    assert len(warned) == 1 and "step_1" in warned[0] and "README" in warned[0]
    assert latest_checkpoint(out) == cks / "step_6"
    assert json.loads((cks / f"step_{best}" / "meta.json").read_text())["eval_loss"] == evals[best]


# -- pruning, on checkpoints made here ------------------------------------------------------------------------


def _checkpoint(run_dir, step, eval_loss=None, eval_id=None):
    meta = {"num_stages": 1, **({"eval_loss": eval_loss, "eval_id": eval_id} if eval_loss is not None else {})}
    return save_checkpoint(run_dir, step, rank=0, world_size=1, states={0: {"model": {}, "optimizer": {}}},
                           rng={"torch": torch.get_rng_state()}, meta=meta, barrier=lambda: None)


def test_keep_last_keeps_an_older_best_and_the_newest(tmp_path):
    for step, loss in ((1, 3.0), (2, 1.0), (3, 2.0), (4, 2.5), (5, 4.0)):
        _checkpoint(tmp_path, step, loss)
    cks = tmp_path / "checkpoints"
    removed = retention.keep(tmp_path, keep_last=2, save_best=True)
    assert sorted(p.name for p in removed) == ["step_1", "step_3"]
    assert sorted(p.name for p in cks.iterdir()) == ["best.json", "step_2", "step_4", "step_5"]
    assert json.loads((cks / "best.json").read_text())["checkpoint"] == "step_2"
    assert latest_checkpoint(tmp_path) == cks / "step_5"


def test_keep_last_without_save_best_keeps_only_the_newest(tmp_path):
    for step in (2, 4, 6):
        _checkpoint(tmp_path, step, 1.0 / step)
    retention.keep(tmp_path, keep_last=1, save_best=False)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_6"]


def test_keep_last_touches_nothing_it_did_not_write(tmp_path, capsys):
    """Incomplete and damaged checkpoints, a symlink named step_N, a user's file or directory, and a checkpoint
    holding a user's file or symlink are neither counted nor removed; the last two are said once."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "stage_0.pt").write_text("mine")
    run = tmp_path / "run"
    for step in (0, 1, 2, 3, 4):
        _checkpoint(run, step)
    cks = run / "checkpoints"
    (cks / "step_0" / "stage_0.pt").unlink()
    (cks / "step_0" / "stage_0.pt").symlink_to(outside / "stage_0.pt")  # a checkpoint's name, a user's file
    (cks / "step_1" / "notes.txt").write_text("mine")  # a user's file in a checkpoint
    (cks / "step_2" / "COMPLETE").unlink()  # incomplete
    os.symlink(outside, cks / "step_7")  # a symlink with a checkpoint's name, newer than all
    (cks / "step_8").mkdir()  # a user's directory with a checkpoint's name
    (cks / "step_8" / "COMPLETE").write_text("complete\n")
    (cks / "scratch.txt").write_text("mine")
    (cks / "step_3" / "rank_0.pt").unlink()  # damaged: a listed file is missing
    said = set()
    for _ in range(2):
        assert retention.keep(run, keep_last=1, save_best=False, said=said) == []
    assert sorted(p.name for p in cks.iterdir()) == ["scratch.txt", "step_0", "step_1", "step_2", "step_3",
                                                    "step_4", "step_7", "step_8"]
    assert (outside / "stage_0.pt").read_text() == "mine" and (cks / "step_1" / "notes.txt").read_text() == "mine"
    assert (cks / "step_0" / "stage_0.pt").is_symlink()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2, lines
    assert "step_0" in lines[0] and "stage_0.pt" in lines[0] and "step_1" in lines[1] and "notes.txt" in lines[1]


def test_a_removal_killed_midway_leaves_what_the_next_save_cleans_up(tmp_path, monkeypatch):
    """Killed after the rename: a marked temporary directory, never a half-deleted step_<k>; the next save takes it."""
    for step in (1, 2):
        _checkpoint(tmp_path, step)

    def killed(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(retention.atomic_dir, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        retention.keep(tmp_path, keep_last=1, save_best=False)
    monkeypatch.undo()
    cks = tmp_path / "checkpoints"
    assert not (cks / "step_1").exists() and latest_checkpoint(tmp_path) == cks / "step_2"
    _checkpoint(tmp_path, 3)
    assert sorted(p.name for p in cks.iterdir()) == ["step_2", "step_3"]


@pytest.mark.parametrize("kind", ["file", "symlink", "directory", "nested", "fifo"])
def test_a_best_json_fxconvert_did_not_write_is_refused(tmp_path, kind):
    cks = tmp_path / "checkpoints"
    cks.mkdir()
    target = tmp_path / "mine.json"
    target.write_text(json.dumps({"producer": "fxconvert.train"}))
    {"file": lambda p: p.write_text("{}"), "symlink": lambda p: p.symlink_to(target),
     "directory": lambda p: p.mkdir(), "nested": lambda p: p.write_text("[" * 60_000),  # past json's recursion
     "fifo": os.mkfifo}[kind](cks / "best.json")
    with pytest.raises(UsageError) as e:
        retention.check_best(tmp_path, shown="run")
    assert "was not written by fxconvert.train" in str(e.value) and "\n" not in str(e.value)
    _checkpoint(tmp_path, 1, 1.0)
    retention.keep(tmp_path, keep_last=None, save_best=True)  # written meanwhile: still not replaced
    assert target.read_text() == json.dumps({"producer": "fxconvert.train"})
    best = cks / "best.json"
    assert {"file": lambda: best.read_text() == "{}", "symlink": best.is_symlink, "directory": best.is_dir,
            "nested": lambda: best.read_text() == "[" * 60_000, "fifo": lambda: best.is_fifo()}[kind]()


@pytest.mark.parametrize("named", [["step_1"], {"a": 1}, 7])
def test_a_best_json_naming_no_checkpoint_name_is_left_by_keep_last(tmp_path, named):
    """best.json says fxconvert.train wrote it but names its checkpoint by a list, an object or a number (not a
    name, and a list is unhashable): --keep-last prunes without a TypeError and leaves it."""
    cks = tmp_path / "checkpoints"
    cks.mkdir()
    record = json.dumps({"producer": "fxconvert.train", "checkpoint": named})
    (cks / "best.json").write_text(record)
    retention.check_best(tmp_path, shown="run")
    for step in (1, 2):
        _checkpoint(tmp_path, step)
    assert [p.name for p in retention.keep(tmp_path, keep_last=1, save_best=False)] == ["step_1"]
    assert (cks / "best.json").read_text() == record


def test_the_best_is_chosen_among_checkpoints_evaluated_the_same_way(tmp_path):
    """A resume may change --eval-data or --eval-batch: a loss on another file or batch size is not comparable."""
    _checkpoint(tmp_path, 1, 0.5, eval_id="other-file/8")
    _checkpoint(tmp_path, 2, 2.0, eval_id="this-file/8")
    _checkpoint(tmp_path, 3, 3.0, eval_id="this-file/8")
    retention.keep(tmp_path, keep_last=1, save_best=True, eval_id="this-file/8")
    assert json.loads((tmp_path / "checkpoints" / "best.json").read_text())["step"] == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best.json", "step_2", "step_3"]


def test_a_non_finite_eval_loss_is_never_the_best(tmp_path):
    for step, loss in ((1, float("nan")), (2, 2.0), (3, float("inf"))):
        _checkpoint(tmp_path, step, loss)
    retention.keep(tmp_path, keep_last=None, save_best=True)
    assert json.loads((tmp_path / "checkpoints" / "best.json").read_text())["step"] == 2


# -- options and the eval file --------------------------------------------------------------------------------

REFUSED = [
    (["--eval-every", "2"], "--eval-every needs --eval-data FILE.jsonl"),
    (["--eval-batch", "2"], "--eval-batch needs --eval-data FILE.jsonl"),
    (["--save-best", "--save-every", "2"], "--save-best needs --eval-data FILE.jsonl"),
    (["--eval-data", "e.jsonl", "--save-best", "--eval-every", "2"], "none are written without --save-every K"),
    (["--keep-last", "2"], "--keep-last 2 chooses among checkpoints, and none are written without --save-every K"),
    (["--eval-data", "e.jsonl", "--save-best", "--save-every", "2"], "add --eval-every K with K dividing --save-every"),
    (["--eval-data", "e.jsonl", "--save-best", "--save-every", "3", "--eval-every", "2"],
     "--save-every 3 is not a multiple of --eval-every 2; make it one"),
    (["--eval-data", "e.jsonl", "--eval-every", "0"], "--eval-every must be at least 1, got 0"),
    (["--eval-data", "e.jsonl", "--eval-batch", "-1"], "--eval-batch must be at least 1, got -1"),
    (["--save-every", "1", "--keep-last", "0"], "--keep-last must be at least 1, got 0"),
]


@pytest.mark.parametrize("options,message", REFUSED, ids=[" ".join(o) for o, _ in REFUSED])
def test_eval_and_keep_options_are_refused_in_one_line(options, message):
    with pytest.raises(UsageError) as e:
        check_options(parse(["conv", "--data", "d.jsonl", "--out", "run", *options]), Launch(0, 1, 0))
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("content,needle", [(None, "does not exist; pass --eval-data a JSONL file"),
                                            ('{"input_ids": [1], "labels": [1]}\n{"input_ids": [1]}\n',
                                             "eval.jsonl:2: missing key 'labels'")])
def test_a_bad_eval_file_is_one_line_before_any_process_group(setup, tmp_path, monkeypatch, capsys, content,
                                                              needle):
    root, _, _ = setup
    data = tmp_path / "eval.jsonl"
    if content is not None:
        data.write_text(content)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")  # two ranks: a collective would wait forever
    capsys.readouterr()
    argv = [root / "ckpt", "--data", root / "train.jsonl", "--out", tmp_path / "run", "--batch", 4,
            "--eval-data", data]
    assert main([str(a) for a in argv]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("fxconvert.train: error: ") and needle in line
    assert not (tmp_path / "run").exists()


def test_eval_batches_hold_every_line_once():
    from fxconvert.training.evaluate import batches

    assert [list(b) for b in batches(7, 3)] == [[0, 1, 2], [3, 4, 5], [6]]
    assert [list(b) for b in batches(2, 8)] == [[0, 1]]
    assert math.fsum(len(b) for b in batches(1000, 7)) == 1000


@pytest.mark.parametrize("loss", [True, 10**400, "1.0"], ids=["bool", "huge-int", "string"])
def test_a_hostile_eval_loss_in_meta_json_is_never_the_best(tmp_path, loss):
    """fxconvert records an eval loss as a JSON float; anything else in a checkpoint's meta.json (a bool, an integer
    too large for a float, a string) is not a loss, and choosing the best neither fails nor picks it."""
    _checkpoint(tmp_path, 1, loss)
    _checkpoint(tmp_path, 2, 2.0)
    retention.keep(tmp_path, keep_last=1, save_best=True)
    assert json.loads((tmp_path / "checkpoints" / "best.json").read_text())["step"] == 2
