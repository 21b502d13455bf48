"""Bad input to `python -m fxconvert.train`: one line, exit 2 or 1, and no run directory.

Every check runs on every rank before any process group exists, so these run in this
process with the launcher's environment set (WORLD_SIZE 2 means two pipeline ranks) and
never reach a collective.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

import checkpoints
import train_runs as tr
from fxconvert.errors import UsageError
from fxconvert.train import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-cli")
    tr.write_checkpoint(root / "ckpt")
    tr.write_jsonl(root / "train.jsonl")
    return root


def _fails(capsys, monkeypatch, argv, *, world=2, code=2):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", str(world))
    assert main([str(a) for a in argv]) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("fxconvert.train: error: ")
    return err


def _argv(root, out, *extra, data=None, source=None):
    return [source or root / "ckpt", "--data", data or root / "train.jsonl", "--out", out, "--steps", 2,
            "--batch", 4, *extra]


def test_a_malformed_line_names_file_and_line(setup, tmp_path, capsys, monkeypatch):
    data = tmp_path / "bad.jsonl"
    lines = (setup / "train.jsonl").read_text().splitlines()
    lines[2] = lines[2][:-3]  # cut off the end of line 3
    data.write_text("\n".join(lines) + "\n")
    err = _fails(capsys, monkeypatch, _argv(setup, tmp_path / "run", data=data))
    assert "bad.jsonl:3" in err
    assert not (tmp_path / "run").exists()


def test_an_out_of_vocabulary_id_is_refused(setup, tmp_path, capsys, monkeypatch):
    data = tmp_path / "oov.jsonl"
    data.write_text(json.dumps({"input_ids": [1, 2, tr.VOCAB], "labels": [1]}) + "\n")
    err = _fails(capsys, monkeypatch, _argv(setup, tmp_path / "run", data=data))
    assert "oov.jsonl:1" in err
    assert not (tmp_path / "run").exists()


def test_an_unknown_tokenizer(setup, tmp_path, capsys, monkeypatch):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(setup / "ckpt", ckpt)
    (ckpt / "tokenizer.json").write_text('{"model": {"type": "NoSuchModel"}}')
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "NoSuchTokenizer"}))
    data = tmp_path / "text.jsonl"
    data.write_text(json.dumps({"input": "hello", "target": "hallo"}) + "\n")
    err = _fails(capsys, monkeypatch, _argv(setup, tmp_path / "run", data=data, source=ckpt))
    assert "tokenizer" in err
    assert not (tmp_path / "run").exists()


def test_text_without_a_tokenizer(setup, tmp_path, capsys, monkeypatch):
    data = tmp_path / "text.jsonl"
    data.write_text(json.dumps({"input": "hello", "target": "hallo"}) + "\n")
    err = _fails(capsys, monkeypatch, _argv(setup, tmp_path / "run", data=data))
    assert "text.jsonl:1" in err and "tokenizer" in err
    assert not (tmp_path / "run").exists()


def test_a_conversion_without_stages(setup, tmp_path, capsys, monkeypatch):
    conv = tmp_path / "conv"
    proc = subprocess.run([sys.executable, "-m", "fxconvert", str(setup / "ckpt"), "--out", str(conv),
                           "--no-validate", "-q"], cwd=tr.REPO, env=tr.env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    err = _fails(capsys, monkeypatch, _argv(setup, tmp_path / "run", source=conv))
    assert "--stages 2" in err
    assert not (tmp_path / "run").exists()


def test_fewer_microbatches_than_stages_for_1f1b(setup, tmp_path, capsys, monkeypatch):
    err = _fails(capsys, monkeypatch, _argv(setup, tmp_path / "run", "--schedule", "1f1b", "--microbatches", 1),
                 world=2)
    assert "--microbatches" in err and "1 < 2" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra, world, needle", [
    (["--dp", 3], 4, "--dp 3"),
    (["--virtual-stages", 2], 2, "interleaved-1f1b"),
    (["--schedule", "interleaved-1f1b"], 2, "--virtual-stages 2"),
    (["--microbatches", 3], 2, "multiple of --microbatches"),
    (["--schedule", "zbv"], 2, "--schedule zbv needs --virtual-stages 2 (stages per rank), got 1"),
    (["--schedule", "dualpipev", "--virtual-stages", 3], 2, "--schedule dualpipev needs --virtual-stages 2 "),
    (["--schedule", "zb-interleaved"], 2, "--schedule zb-interleaved needs --virtual-stages 2 or more"),
    (["--schedule", "dualpipev", "--virtual-stages", 2, "--microbatches", 2], 2,
     "--schedule dualpipev needs at least as many microbatches as stages (2 < 4)"),
    (["--schedule", "zb-interleaved", "--virtual-stages", 2, "--microbatches", 5, "--batch", 10], 2,
     "--schedule zb-interleaved needs --microbatches to be a multiple of 2"),
    (["--lr", "nan"], 2, "--lr"),
    (["--steps", 0], 2, "--steps"),
    (["--timeout", "1e308"], 2, "--timeout must be from 1 to 31536000 seconds (a year), got 1e+308"),
    (["--timeout", "1e-9"], 2, "--timeout must be from 1 to 31536000 seconds (a year), got 1e-09"),
    (["--lr", "1e300"], 2, "--lr must be at most 1000, got 1e+300"),
    (["--zero"], 2, "--zero shards the optimizer state over the --dp replicas, but --dp is 1: nothing to shard"),
])
def test_bad_options(setup, tmp_path, capsys, monkeypatch, extra, world, needle):
    err = _fails(capsys, monkeypatch, _argv(setup, tmp_path / "run", *extra), world=world)
    assert needle in err
    assert not (tmp_path / "run").exists()


def test_stage_count_mismatch_names_the_fix(setup, tmp_path, capsys, monkeypatch):
    """More stages than the model has blocks: the split refuses before anything is written."""
    argv = _argv(setup, tmp_path / "run", "--schedule", "gpipe", "--microbatches", 4)
    err = _fails(capsys, monkeypatch, argv, world=5)
    assert "ask for at most 4" in err
    assert not (tmp_path / "run").exists()


def test_a_conversion_with_other_stages_names_the_fix(setup, tmp_path, capsys, monkeypatch):
    conv = tmp_path / "conv"
    proc = subprocess.run([sys.executable, "-m", "fxconvert", str(setup / "ckpt"), "--stages", "2", "--out", str(conv),
                           "--no-validate", "-q"], cwd=tr.REPO, env=tr.env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    err = _fails(capsys, monkeypatch, _argv(setup, tmp_path / "run", "--microbatches", 4, source=conv), world=4)
    assert "has 2 stages, but 4 processes with --dp 1 and --virtual-stages 1 run 4" in err
    assert "launch 2 processes, or reconvert with --stages 4" in err
    assert not (tmp_path / "run").exists()


def test_an_existing_run_needs_resume(setup, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    err = _fails(capsys, monkeypatch, _argv(setup, out))
    assert "--resume" in err
    assert checkpoints.leftovers(out) == ["notes.txt"]


def test_the_self_check_stays_behind_a_flag(capsys):
    assert main(["--self-check", "--stages", "3", "--layers", "1"]) == 2
    assert "at most 2" in capsys.readouterr().err


def test_the_progress_line_on_a_terminal_and_the_metrics_file(tmp_path, monkeypatch):
    """On a terminal: a rich progress line (step, loss, tokens/s, ETA); metrics.jsonl either way."""
    import io

    from fxconvert.training.metrics import Reporter

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    reporter = Reporter(tmp_path, total_steps=4, start_step=0)
    for step in (1, 2):
        reporter.step({"step": step, "loss": 3.25 / step, "lr": 0.1, "tokens_per_s": 1234.0, "seconds": 0.5})
    reporter.close()
    text = screen.getvalue()
    assert "step 2/4" in text and "loss 1.6250" in text and "1,234 tokens/s" in text and "ETA" in text
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]

    # a resume from step 1 drops the lines the stopped run wrote after it
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    Reporter(tmp_path, total_steps=4, start_step=1).close()
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]


def test_a_source_without_weights_needs_allow_random(setup, tmp_path, capsys, monkeypatch):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(setup / "ckpt" / "config.json", bare / "config.json")  # an architecture, no weights
    err = _fails(capsys, monkeypatch, _argv(setup, tmp_path / "run", source=bare))
    assert "--allow-random" in err and "allow_random=True" not in err
    assert not (tmp_path / "run").exists()


def test_resume_continues_only_a_run_with_a_checkpoint(setup, tmp_path, capsys, monkeypatch):
    """--resume never restarts over a finished run, nor writes into a directory fxconvert.train did not make."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 5, "mine": true}\n')
    err = _fails(capsys, monkeypatch, _argv(setup, out, "--resume"))
    assert "was not written by fxconvert.train" in err
    (out / ".fxconvert-run").write_text("{}\n")
    err = _fails(capsys, monkeypatch, _argv(setup, out, "--resume"))
    assert "has no complete checkpoint" in err
    assert (out / "metrics.jsonl").read_text() == '{"step": 5, "mine": true}\n'


def test_resume_refuses_a_checkpoint_of_other_settings(setup, tmp_path, capsys, monkeypatch):
    """Everything that decides the batches and the steps must match, SOURCE by its resolved path."""
    from fxconvert.training.checkpoint import ResumeMismatchError, check_meta
    from fxconvert.training.config import Launch, check_options
    from fxconvert.training.options import parse
    from fxconvert.training.run import resume_fields

    def fields(*extra, source=setup / "ckpt"):
        cfg = parse([str(a) for a in _argv(setup, tmp_path / "run", *extra, source=source)])
        return resume_fields(*check_options(cfg, Launch(0, 2, 0)))

    monkeypatch.chdir(setup)
    check_meta(fields(), fields(source="ckpt/"), path="step_1")  # the same directory, spelled otherwise
    for extra, name in [(["--batch", 8], "batch"), (["--shuffle"], "shuffle"), (["--seed", 7], "seed"),
                        (["--dtype", "bfloat16"], "dtype"), (["--max-source-length", 5], "max_source_length")]:
        with pytest.raises(ResumeMismatchError, match=f"{name} differs"):
            check_meta(fields(), fields(*extra), path="step_1")


def test_a_conversion_without_the_loss_is_refused(setup, tmp_path, capsys, monkeypatch):
    conv = tmp_path / "conv"
    proc = subprocess.run([sys.executable, "-m", "fxconvert", str(setup / "ckpt"), "--stages", "2", "--out", str(conv),
                           "--output", "logits", "--no-validate", "-q"], cwd=tr.REPO, env=tr.env(),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    err = _fails(capsys, monkeypatch, _argv(setup, tmp_path / "run", source=conv))
    assert "returns 'logits', not the loss" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra, needle", [(["--seed", 2**63], "--seed"), (["--seed", -1], "--seed")])
def test_seeds_outside_the_range_are_refused(setup, tmp_path, capsys, monkeypatch, extra, needle):
    err = _fails(capsys, monkeypatch, _argv(setup, tmp_path / "run", *extra))
    assert needle in err and not (tmp_path / "run").exists()


def test_out_inside_the_source_is_refused(setup, tmp_path, capsys, monkeypatch):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(setup / "ckpt", ckpt)
    for out in (ckpt, ckpt / "run"):
        err = _fails(capsys, monkeypatch, _argv(setup, out, source=ckpt))
        assert "inside SOURCE" in err
    assert not (ckpt / "run").exists()


def test_messages_escape_control_characters(setup, tmp_path, capsys, monkeypatch):
    evil = tmp_path / "evil\nfxconvert.train: all good \x1b[31m"
    evil.write_text("a file")
    err = _fails(capsys, monkeypatch, _argv(setup, evil))
    assert "\\x0a" in err and "\x1b" not in err and "exists and is not a directory" in err


def test_text_data_uses_the_tokenizer_of_a_hub_cache_source(setup, tmp_path, monkeypatch):
    """A Hub id found in the local cache: the tokenizer beside its snapshot tokenizes text lines."""
    import huggingface_hub

    from fxconvert.training.config import Launch
    from fxconvert.training.options import parse
    from fxconvert.training.run import prepare

    ckpt = tmp_path / "ckpt"
    shutil.copytree(setup / "ckpt", ckpt)
    checkpoints.write_tokenizer(ckpt)
    checkpoints.fake_hub_cache(tmp_path / "cache", "someone/tiny-t5", ckpt,
                               files=("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "text.jsonl"
    data.write_text(json.dumps({"input": "w1 w2 w3", "target": "w4"}) + "\n" * 1)
    args = parse(["someone/tiny-t5", "--data", str(data), "--out", str(tmp_path / "run"),
                                      "--steps", "1", "--batch", "2", "--offline"])
    run = prepare(args, Launch(0, 2, 0))
    assert run.model.tokenizer_dir is not None
    assert not (tmp_path / "run").exists()


def test_ctrl_c_while_training_is_one_line_and_exit_130(setup, tmp_path):
    """SIGINT during the steps: no traceback, exit 130, one line naming the rank."""
    import signal
    import time

    env = tr.env()
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    proc = subprocess.Popen([sys.executable, "-m", "fxconvert.train", str(setup / "ckpt"), "--data",
                             str(setup / "train.jsonl"), "--out", str(tmp_path / "run"), "--steps", "100000",
                             "--batch", "4", "--microbatches", "1", "--schedule", "gpipe"],
                            cwd=tr.REPO, env=env, stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        lines.append(line)
        if line.startswith("step 2/"):
            break
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 130, rest
    errors = [line for line in rest.splitlines() if line.strip() and not line.startswith("step ")]
    assert errors == ["fxconvert.train: error: rank 0 (stage 0, replica 0): interrupted"], rest


def test_a_run_that_took_out_while_this_one_was_checking_stops_it(setup, tmp_path):
    """Rank 0 checks --out, then loads the model; another run that wrote into --out meanwhile wins."""
    from fxconvert.training.config import Launch
    from fxconvert.training.options import parse
    from fxconvert.training.run import lock_run, prepare

    out = tmp_path / "run"
    args = parse([str(a) for a in _argv(setup, out)])
    run = prepare(args, Launch(0, 2, 0))
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')  # what the other run wrote
    with pytest.raises(UsageError, match="was written by another run while this one started"):
        lock_run(run)
    assert run.lock is None
    (out / "metrics.jsonl").unlink()
    lock_run(run)  # the lock was let go: an empty --out is this run's
    assert run.lock is not None
    os.close(run.lock)


def test_status_lines_escape_control_characters(setup, tmp_path):
    """--out with a newline and ESC: "saved checkpoint" and "wrote" print them escaped, one line each."""
    out = tmp_path / "runs\n\x1b[31mFAKE"
    env = tr.env()
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    proc = subprocess.run([sys.executable, "-m", "fxconvert.train", str(setup / "ckpt"), "--data",
                           str(setup / "train.jsonl"), "--out", str(out), "--steps", "2", "--batch", "4",
                           "--microbatches", "1", "--schedule", "gpipe", "--save-every", "1"],
                          cwd=tr.REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "\x1b" not in proc.stderr
    status = [line for line in proc.stderr.splitlines() if not line.startswith("step ")]
    escaped = str(out).replace("\n", "\\x0a").replace("\x1b", "\\x1b")
    assert status == ["reading data: 24 lines", f"saved checkpoint {escaped}/checkpoints/step_1", f"saved checkpoint {escaped}/checkpoints/step_2",
                      f"wrote {escaped}/hf (a transformers checkpoint: from_pretrained loads it) and "
                      f"{escaped}/metrics.jsonl"], proc.stderr


def test_help_lists_every_family_that_trains():
    from fxconvert.families import all_families

    proc = subprocess.run([sys.executable, "-m", "fxconvert.train", "--help"], cwd=tr.REPO, env=tr.env(),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    trained = [f for f in all_families() if f.objective is not None]
    assert "BERT" in [f.title for f in trained]
    for family in trained:
        assert family.title.split(" (")[0] in text, family.title


def test_a_launch_of_the_wrong_size_names_the_stages_before_the_microbatches(setup, tmp_path, capsys, monkeypatch):
    """3 processes for a 2-stage conversion: --microbatches defaults to 3, which --batch 4 does not
    split into; the stage count is the problem to name."""
    conv = tmp_path / "conv"
    proc = subprocess.run([sys.executable, "-m", "fxconvert", str(setup / "ckpt"), "--stages", "2", "--out", str(conv),
                           "--no-validate", "-q"], cwd=tr.REPO, env=tr.env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    err = _fails(capsys, monkeypatch, _argv(setup, tmp_path / "run", source=conv), world=3)
    assert "has 2 stages, but 3 processes with --dp 1 and --virtual-stages 1 run 3" in err
    assert not (tmp_path / "run").exists()


def test_every_optimizer_takes_lr_and_weight_decay():
    """--lr and --weight-decay reach every optimizer, torch's own class (SGD ignored --weight-decay)."""
    import torch

    from fxconvert.training import optim
    from fxconvert.training.config import TrainConfig

    for name, cls in tr.EAGER_OPTIMIZERS.items():
        cfg = TrainConfig(source="s", data="d", out="o", optimizer=name, lr=0.25, weight_decay=0.125)
        optimizer = optim.build(cfg, None, [torch.nn.Parameter(torch.ones(2, 2))])
        assert type(optimizer) is cls
        assert (optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["weight_decay"]) == (0.25, 0.125)
