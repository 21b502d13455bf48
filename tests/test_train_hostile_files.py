"""Hostile files that `python -m fxconvert.train` reads: one line and the right exit, never a traceback.

A source checkpoint, a conversion directory, a data file and a run directory all come
from the user (or from whoever sent them a checkpoint). Checks that fail before training
run in this process with the launcher's environment set (they never reach a collective);
the ones that need a run train a one-stage model in a world of one, as `python -m
fxconvert.train` without torchrun does.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

import checkpoints
import fxconvert.training.worker
import train_runs as tr
from fxconvert.train import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny T5 with a tokenizer beside it, its conversions into 1 and 2 stages, and pre-tokenized data."""
    from fxconvert.cli import main as convert_main

    root = tmp_path_factory.mktemp("train-files")
    tr.write_checkpoint(root / "ckpt")
    checkpoints.write_tokenizer(root / "ckpt")
    tr.write_jsonl(root / "train.jsonl", n=8)
    for n in (1, 2):
        assert convert_main([str(root / "ckpt"), "--stages", str(n), "--out", str(root / f"conv{n}"), "-q",
                             "--no-validate"]) == 0
    checkpoints.write_checkpoint(root / "wide", d_model=48)  # another model: its files do not fit conv1's
    assert convert_main([str(root / "wide"), "--stages", "1", "--out", str(root / "wide-conv1"), "-q",
                         "--no-validate"]) == 0
    return root


def _fails(capsys, monkeypatch, argv, *, world=1, code=2) -> str:
    """Run the trainer's entry here; it must stop before training with exactly one stderr line."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", str(world))
    # Reaching the training fails the test here (a failure inside training would end this process).
    monkeypatch.setattr(fxconvert.training.worker, "train", _reached_training)
    capsys.readouterr()
    assert main([str(a) for a in argv]) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("fxconvert.train: error: ")
    return err


def _reached_training(run):
    import torch.distributed as dist

    dist.destroy_process_group()  # so that the next test's run starts afresh
    pytest.fail("the run reached training")


def _argv(source, out, *extra, data, steps=1):
    return [source, "--data", data, "--out", out, "--steps", steps, "--batch", 2, "--microbatches", 1,
            "--schedule", "gpipe", *extra]


def _train(*argv, timeout=600) -> subprocess.CompletedProcess:
    """`python -m fxconvert.train` in a world of one (no launcher)."""
    env = tr.env()
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    return subprocess.run([sys.executable, "-m", "fxconvert.train", *map(str, argv)], cwd=tr.REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _copy(src, dst):
    shutil.copytree(src, dst, symlinks=True)
    return dst


# -- files copied into run/hf ----------------------------------------------------------------------

def test_a_symlinked_tokenizer_file_of_the_source_never_reaches_run_hf(setup, tmp_path):
    """Training a checkpoint directory (converted by every rank): merges.txt -> a secret is skipped, warned."""
    ckpt = _copy(setup / "ckpt", tmp_path / "ckpt")
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:a secret\n")
    (ckpt / "merges.txt").symlink_to(secret)
    out = tmp_path / "run"
    proc = _train(*_argv(ckpt, out, data=setup / "train.jsonl"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if "merges.txt" in line]
    assert len(warnings) == 1 and warnings[0].startswith("fxconvert.train: warning: "), proc.stderr
    assert "a symlink to a file outside it" in warnings[0]
    assert not (out / "hf" / "merges.txt").exists()
    assert (out / "hf" / "tokenizer.json").is_file()
    assert all(b"a secret" not in p.read_bytes() for p in (out / "hf").iterdir())


@pytest.mark.parametrize("make", ["outside", "fifo"])
def test_a_conversion_whose_tokenizer_file_leads_out_is_refused_before_training(setup, tmp_path, capsys,
                                                                                monkeypatch, make):
    conv = _copy(setup / "conv1", tmp_path / "conv")
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:a secret\n")
    (conv / "tokenizer_config.json").unlink()
    if make == "outside":
        (conv / "tokenizer_config.json").symlink_to(secret)
    else:
        os.mkfifo(conv / "tokenizer_config.json")
    err = _fails(capsys, monkeypatch, _argv(conv, tmp_path / "run", data=setup / "train.jsonl"))
    assert "tokenizer_config.json" in err and "only regular files inside the conversion directory" in err
    assert not (tmp_path / "run").exists()


# -- pipeline.json is checked whole before training ---------------------------------------------------

def _tamper(conv, edit):
    manifest = json.loads((conv / "pipeline.json").read_text())
    edit(manifest)
    (conv / "pipeline.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m.update(tokenizer_files=["../../../../etc/passwd"]), "only plain file names"),
    (lambda m: m.update(tokenizer_files=["model.safetensors"]), "would stand beside the exported weights"),
    (lambda m: m["stages"][0]["parameters"][0].update(hf_name=""), "has no transformers name"),
    (lambda m: m["stages"][0].update(inputs=5), "stage 0's 'inputs' must be a list of names"),
    (lambda m: m.update(model_class=["T5ForConditionalGeneration"]), "'model_class' must be a class name"),
    (lambda m: m.update(shared_weights={"shared_embed_weight": {"stages": [7], "hf_names": ["shared.weight"]}}),
     "must list its stages"),
])
def test_a_tampered_manifest_is_refused_before_training(setup, tmp_path, capsys, monkeypatch, edit, needle):
    """A bad export entry used to be found only by the export, after all the training."""
    conv = _copy(setup / "conv1", tmp_path / "conv")
    _tamper(conv, edit)
    err = _fails(capsys, monkeypatch, _argv(conv, tmp_path / "run", data=setup / "train.jsonl"))
    assert needle in err and "pipeline.json" in err
    assert not (tmp_path / "run").exists()


# -- broken stage files, weights files and data: one line, no traceback ---------------------------------

def _truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


@pytest.mark.parametrize("damage, needles", [
    (lambda c, s: _truncate(c / "weights.safetensors", 100), ["cannot load", "weights.safetensors", "stage_0.py"]),
    (lambda c, s: _truncate(c / "weights.safetensors", 0), ["cannot load", "weights.safetensors"]),
    (lambda c, s: (c / "weights.safetensors").unlink(), ["weights.safetensors is missing"]),
    (lambda c, s: shutil.copy(s / "wide-conv1" / "weights.safetensors", c), ["were not written together",
                                                                             "[97, 48] in weights.safetensors"]),
    (lambda c, s: shutil.copy(s / "wide-conv1" / "stage_0.py", c), ["were not written together",
                                                                    "[97, 48] in stage_0.py"]),
    (lambda c, s: _truncate(c / "stage_0.py", 3000), ["cannot import", "stage_0.py", "SyntaxError"]),
    (lambda c, s: (c / "stage_0.py").write_text("garbage garbage\n"), ["cannot import", "SyntaxError"]),
    (lambda c, s: (c / "stage_0.py").write_text("STAGE = undefined_name\n"), ["cannot import", "NameError"]),
    (lambda c, s: (c / "stage_0.py").write_text("import sys\nsys.exit(3)\n"), ["cannot import",
                                                                                 "it called sys.exit(3)"]),
    (lambda c, s: (c / "stage_0.py").write_text("STAGE, NUM_STAGES = 0, 1\n"), ["stage_0.py has no load()"]),
])
def test_a_broken_stage_or_weights_file_is_one_line(setup, tmp_path, capsys, monkeypatch, damage, needles):
    conv = _copy(setup / "conv1", tmp_path / "conv")
    damage(conv, setup)
    err = _fails(capsys, monkeypatch, _argv(conv, tmp_path / "run", data=setup / "train.jsonl"))
    assert all(needle in err for needle in needles), err
    assert "convert again with --stages 1" in err
    assert not (tmp_path / "run").exists()


def test_swapped_stage_files_name_what_differs(setup, tmp_path, capsys, monkeypatch):
    conv = _copy(setup / "conv2", tmp_path / "conv")
    (conv / "stage_0.py").rename(tmp_path / "stage_0.py")
    (conv / "stage_1.py").rename(conv / "stage_0.py")
    shutil.move(tmp_path / "stage_0.py", conv / "stage_1.py")
    argv = _argv(conv, tmp_path / "run", data=setup / "train.jsonl")
    argv[argv.index("--microbatches") + 1] = 2
    err = _fails(capsys, monkeypatch, argv, world=2)
    assert "stage_0.py is not stage 0 of 2 (it says STAGE 1 of NUM_STAGES 2); convert again with --stages 2" in err


def test_a_lone_surrogate_in_a_text_line_names_file_and_line(setup, tmp_path, capsys, monkeypatch):
    data = tmp_path / "text.jsonl"
    lines = [{"input": "w1 w2", "target": "w3"}, {"input": "w1 \ud800 w2", "target": "w3"}]
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))  # json writes it as the escape "\\ud800"
    assert "\\ud800" in data.read_text()
    err = _fails(capsys, monkeypatch, _argv(setup / "conv1", tmp_path / "run", data=data))
    assert "text.jsonl:2: 'input' is not valid Unicode text (a lone surrogate \\ud800 at character 4)" in err
    assert not (tmp_path / "run").exists()


def test_a_fifo_as_pipeline_json_is_one_line_not_a_hang(setup, tmp_path):
    conv = _copy(setup / "conv1", tmp_path / "conv")
    (conv / "pipeline.json").unlink()
    os.mkfifo(conv / "pipeline.json")
    try:  # a rank that reads the FIFO waits for a writer forever: the child is killed, the test fails
        proc = _train(*_argv(conv, tmp_path / "run", data=setup / "train.jsonl"), timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("the trainer waited on a FIFO at pipeline.json")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "pipeline.json is not a regular file" in err, err


# -- a damaged metrics.jsonl does not stop a resume ---------------------------------------------------

@pytest.fixture(scope="module")
def stopped_run(setup, tmp_path_factory):
    """A run of one step with a checkpoint at step 1, as a resume finds it."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    proc = _train(*_argv(setup / "conv1", out, "--save-every", 1, "--no-export", data=setup / "train.jsonl"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [m["step"] for m in tr.metrics(out)] == [1] and (out / "checkpoints" / "step_1").is_dir()
    return out


@pytest.mark.parametrize("damage, warned", [
    (lambda text: text + '{"step": 2, "loss": 1.2', None),  # killed while writing step 2's line
    (lambda text: text + '{"step": 2, "loss": 1.2}\n\x00\x00\x00', None),  # a later line, then a torn block
    (lambda text: '{"step": 0, "lo\n' + text + "[1, 2]\n", 1),  # damage before the last line: said, dropped
])
def test_a_damaged_metrics_file_is_repaired_on_resume(setup, stopped_run, tmp_path, damage, warned):
    out = _copy(stopped_run, tmp_path / "run")
    metrics = out / "metrics.jsonl"
    metrics.write_text(damage(metrics.read_text()))
    proc = _train(*_argv(setup / "conv1", out, "--save-every", 1, "--no-export", "--resume", data=setup / "train.jsonl",
                         steps=2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert [m["step"] for m in tr.metrics(out)] == [1, 2]
    warnings = [line for line in proc.stderr.splitlines() if "warning" in line]
    if warned is None:
        assert warnings == [], proc.stderr
    else:
        assert warnings == [f"fxconvert.train: warning: {metrics}: dropped 1 line that is not a metrics record "
                            f"(the first is line {warned})"]


def test_many_damaged_metrics_lines_are_one_warning(tmp_path, capsys):
    from fxconvert.training.metrics import Reporter

    (tmp_path / "metrics.jsonl").write_text("\n".join(["not json"] * 50 + ['{"step": 1}', '{"step": 2}', "torn"]))
    Reporter(tmp_path, 3, 1).close()
    err = capsys.readouterr().err
    assert err.splitlines() == [f"fxconvert.train: warning: {tmp_path / 'metrics.jsonl'}: dropped 50 lines that "
                                f"are not a metrics record (the first is line 1)"], err
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'


@pytest.mark.parametrize("kind, said", [("symlink", "metrics.jsonl is a symlink"),
                                         ("fifo", "metrics.jsonl is not a regular file")])
def test_a_metrics_file_that_is_no_regular_file_is_refused_on_resume(setup, stopped_run, tmp_path, capsys,
                                                                     monkeypatch, kind, said):
    out = _copy(stopped_run, tmp_path / "run")
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\nline two\n")
    (out / "metrics.jsonl").unlink()
    if kind == "symlink":
        (out / "metrics.jsonl").symlink_to(notes)
    else:
        os.mkfifo(out / "metrics.jsonl")
    err = _fails(capsys, monkeypatch, _argv(setup / "conv1", out, "--save-every", 1, "--no-export", "--resume",
                                            data=setup / "train.jsonl", steps=2))
    assert said in err
    assert notes.read_text() == "my notes\nline two\n"


def test_the_metrics_writer_never_follows_a_symlink(tmp_path):
    """The second guard: a symlink put in place after `prepare` checked is refused, never followed."""
    from fxconvert.errors import UsageError
    from fxconvert.training.metrics import Reporter

    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    (tmp_path / "metrics.jsonl").symlink_to(notes)
    with pytest.raises(UsageError, match="metrics.jsonl"):
        Reporter(tmp_path, 2, 1)
    assert notes.read_text() == "my notes\n"


# -- the data of a run is identified by its content ----------------------------------------------------

def test_a_same_size_edit_of_the_data_is_refused_on_resume(setup, tmp_path, capsys, monkeypatch):
    data, out = tmp_path / "train.jsonl", tmp_path / "run"
    shutil.copy(setup / "train.jsonl", data)
    proc = _train(*_argv(setup / "conv1", out, "--save-every", 1, "--no-export", data=data))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = data.read_text().splitlines(keepends=True)
    before = data.stat().st_size
    data.write_text("".join([lines[1], lines[0], *lines[2:]]))  # the same bytes in another order
    assert data.stat().st_size == before
    err = _fails(capsys, monkeypatch, _argv(setup / "conv1", out, "--save-every", 1, "--no-export", "--resume",
                                            data=data, steps=2))
    assert f"the content of --data {data} differs from the file the checkpoint trained on" in err
    assert [m["step"] for m in tr.metrics(out)] == [1]


def test_data_changed_during_the_run_stops_it_and_changes_no_checkpoint_record(setup, tmp_path):
    """A file truncated while the run trains stops it at the next batch, in one line (its lines are read back as
    batches need them); the checkpoints record the data the run read, not what the file holds later."""
    import hashlib
    import signal
    import time

    data, out = tmp_path / "train.jsonl", tmp_path / "run"
    shutil.copy(setup / "train.jsonl", data)
    original = data.read_bytes()
    env = tr.env()
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    argv = _argv(setup / "conv1", out, "--save-every", 1, "--no-export", data=data, steps=100000)
    with open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "fxconvert.train", *map(str, argv)], cwd=tr.REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
    steps = lambda: {int(p.name[5:]) for p in (out / "checkpoints").glob("step_*") if (p / "COMPLETE").is_file()}
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoints").is_dir() or not steps():
            assert proc.poll() is None and time.monotonic() < deadline, "the run saved no checkpoint"
            time.sleep(0.05)
        proc.send_signal(signal.SIGSTOP)  # held while the file changes
        data.write_bytes(b"")  # truncated while the run trains
        proc.send_signal(signal.SIGCONT)
        assert proc.wait(timeout=300) == 2
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait()
    lines = [line for line in (tmp_path / "stderr").read_text().splitlines() if line.startswith("fxconvert.train")]
    assert lines == [f"fxconvert.train: error: rank 0 (stage 0, replica 0): {data} changed while the run was using "
                     f"it (its size or modification time is not what it was when it was read); put the original "
                     f"back and pass --resume, or train on a copy that stays unchanged"], lines
    later = json.loads((out / "checkpoints" / f"step_{max(steps())}" / "meta.json").read_text())
    assert later["data_sha256"] == hashlib.sha256(original).hexdigest()
    assert later["data"] == str(data.resolve())


# -- damaged checkpoints and a symlinked checkpoints/ ----------------------------------------------------

def test_a_world_of_one_needs_no_port_picked_ahead(setup, tmp_path):
    """Without a launcher there is nobody to meet: the run used to pick a free port and bind it later in
    init_process_group, and failed to start when another program took the port in between."""
    out = tmp_path / "run"
    proc = tr.train_with_ports_taken(*_argv(setup / "conv1", out, "--no-export", data=setup / "train.jsonl"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [m["step"] for m in tr.metrics(out)] == [1]


def test_a_checkpoint_with_a_deleted_shard_falls_back_to_the_one_before(setup, tmp_path):
    out = tmp_path / "run"
    proc = _train(*_argv(setup / "conv1", out, "--save-every", 1, "--no-export", data=setup / "train.jsonl", steps=2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out / "checkpoints" / "step_2" / "stage_0.pt").unlink()
    proc = _train(*_argv(setup / "conv1", out, "--save-every", 1, "--no-export", "--resume",
                         data=setup / "train.jsonl", steps=3))
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if "warning" in line]
    assert warnings == [f"fxconvert.train: warning: checkpoint {out / 'checkpoints' / 'step_2'} is damaged "
                        f"({out / 'checkpoints' / 'step_2'} lacks stage_0.pt); passing over it to an earlier one"]
    assert [m["step"] for m in tr.metrics(out)] == [1, 2, 3]  # resumed at step 1, not refused


def test_a_symlinked_checkpoints_directory_is_refused(setup, stopped_run, tmp_path, capsys, monkeypatch):
    out = _copy(stopped_run, tmp_path / "run")
    users = tmp_path / "users"
    (out / "checkpoints").rename(users)
    (users / ".step_7.tmp").mkdir()
    (users / ".step_7.tmp" / "thesis.tex").write_text("mine")
    (out / "checkpoints").symlink_to(users)
    err = _fails(capsys, monkeypatch, _argv(setup / "conv1", out, "--save-every", 1, "--no-export", "--resume",
                                            data=setup / "train.jsonl", steps=2))
    assert "checkpoints is a symlink" in err
    assert (users / ".step_7.tmp" / "thesis.tex").read_text() == "mine"
