"""Checkpoints: bitwise resume, the multi-rank atomic protocol (real gloo processes), hostile directories."""

import json
import os
import pickle
import random
from pathlib import Path

import pytest
import torch

import helpers
from fxconvert import atomic_dir, convert, split_stages
from fxconvert.atomic_dir import mark
from fxconvert.training.checkpoint import (CheckpointDirError, CheckpointError, ResumeMismatchError, changed_options,
                                  complete_checkpoints,
                                  check_meta, latest_checkpoint, load_checkpoint, read_meta, remove_stale,
                                  rng_state, save_checkpoint, set_rng_state)

from checkpoint_ranks import META, run_ranks, toy_states

NAMES = ["input_ids", "attention_mask", "decoder_input_ids", "labels"]


def _no_barrier():
    pass


def save_single(run_dir, step, states, meta=None, rng=None):
    return save_checkpoint(run_dir, step, rank=0, world_size=1, states=states, rng=rng or rng_state(),
                           meta=dict(META, **(meta or {})), barrier=_no_barrier)


# -- random states ---------------------------------------------------------------------------


def test_rng_state_restores_torch_and_python_streams():
    state = rng_state()
    first = (torch.rand(4), random.random(), torch.nn.functional.dropout(torch.ones(8), 0.5))
    set_rng_state(state)
    again = (torch.rand(4), random.random(), torch.nn.functional.dropout(torch.ones(8), 0.5))
    assert torch.equal(first[0], again[0]) and first[1] == again[1] and torch.equal(first[2], again[2])


def test_rng_state_survives_a_checkpoint(tmp_path):
    state = rng_state()
    expected = (torch.rand(4), random.random())
    path = save_single(tmp_path, 0, toy_states(), rng=state)
    torch.rand(100), random.random()  # move both streams on
    _, rng, _ = load_checkpoint(path, rank=0, stage_indices=[])
    set_rng_state(rng)
    assert torch.equal(torch.rand(4), expected[0]) and random.random() == expected[1]


# -- bitwise resume of a converted, split model ----------------------------------------------


@pytest.fixture(scope="module")
def stages():
    model = helpers.build("T5ForConditionalGeneration", "original")  # dropout 0.1: resume must restore RNG
    return split_stages(convert(model, input_names=NAMES), 2)


def _batch(seed):
    return helpers.random_inputs(NAMES, 4, 7, 5, seed=seed)


def _step(modules, optimizers, batch):
    specs = [m.input_names for m in modules]
    sent = modules[0](**{n: batch[n] for n in specs[0]})
    loss = modules[1](*sent, **{n: batch[n] for n in specs[1][len(sent):]})
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    loss.backward()
    shared = [dict(m.named_parameters())["shared_embed_weight"] for m in modules]
    total = sum(p.grad for p in shared)  # what the launcher's all-reduce over the holders does
    for p in shared:
        p.grad = total.clone()
    for opt in optimizers:
        opt.step()
    return loss.detach()


OPTIMIZERS = {
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01),
    "adafactor": lambda params: torch.optim.Adafactor(params, lr=1e-2, weight_decay=0.01),
}


def _fresh(stages, optimizer):
    modules = [stages.stage_module(i).train() for i in range(2)]
    return modules, [OPTIMIZERS[optimizer](m.parameters()) for m in modules]


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_resume_continues_bitwise(tmp_path, stages, optimizer):
    torch.manual_seed(1)
    modules, optimizers = _fresh(stages, optimizer)
    for k in range(3):
        _step(modules, optimizers, _batch(k))
    states = {i: {"model": m.state_dict(), "optimizer": o.state_dict()} for i, (m, o) in
              enumerate(zip(modules, optimizers))}
    path = save_single(tmp_path, 3, states, rng=rng_state())
    uninterrupted = [_step(modules, optimizers, _batch(k)) for k in (3, 4)]

    torch.manual_seed(12345)  # a new process starts from another random state
    random.seed(12345)
    resumed_modules, resumed_optimizers = _fresh(stages, optimizer)
    loaded, rng, meta = load_checkpoint(path, rank=0, stage_indices=[0, 1])
    for i in range(2):
        resumed_modules[i].load_state_dict(loaded[i]["model"])
        resumed_optimizers[i].load_state_dict(loaded[i]["optimizer"])
    set_rng_state(rng)
    resumed = [_step(resumed_modules, resumed_optimizers, _batch(k)) for k in (3, 4)]

    assert meta["step"] == 3 and meta["data_position"] == 4
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, resumed)), (uninterrupted, resumed)
    for before, after in zip(modules, resumed_modules):
        a, b = before.state_dict(), after.state_dict()
        assert list(a) == list(b)
        assert all(torch.equal(a[n], b[n]) for n in a), [n for n in a if not torch.equal(a[n], b[n])]


def test_resume_without_the_random_states_differs(stages):
    """The control for the test above: dropout makes the RNG state part of what must be restored."""
    torch.manual_seed(1)
    rng = rng_state()
    expected = _step(*_fresh(stages, "sgd"), _batch(0))
    set_rng_state(rng)
    assert torch.equal(_step(*_fresh(stages, "sgd"), _batch(0)), expected)
    torch.manual_seed(2)
    assert not torch.equal(_step(*_fresh(stages, "sgd"), _batch(0)), expected)


# -- the layout and what counts as complete ---------------------------------------------------


def test_save_writes_the_pinned_layout(tmp_path):
    path = save_single(tmp_path, 7, toy_states(1.0), meta={"train_args": {"lr": 1e-4}})
    assert path == tmp_path / "checkpoints" / "step_7"
    assert sorted(p.name for p in path.iterdir()) == ["COMPLETE", "meta.json", "rank_0.pt", "stage_0.pt", "stage_1.pt"]
    meta = json.loads((path / "meta.json").read_text())
    assert meta["step"] == 7 and meta["world_size"] == 1 and meta["train_args"] == {"lr": 1e-4}
    assert meta["fxconvert_version"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_7"]
    states, _, _ = load_checkpoint(path, rank=0, stage_indices=[1])
    assert list(states) == [1] and torch.equal(states[1]["model"]["w"], torch.full((3,), 2.0))
    assert latest_checkpoint(tmp_path) == path


def test_save_refuses_a_checkpoint_missing_a_stage(tmp_path):
    with pytest.raises(CheckpointError, match="missing stage_1.pt") as e:
        save_single(tmp_path, 2, {0: toy_states()[0]})
    assert "\n" not in str(e.value)
    assert latest_checkpoint(tmp_path) is None
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == []


def test_resaving_a_step_replaces_it(tmp_path):
    save_single(tmp_path, 4, toy_states(1.0))
    path = save_single(tmp_path, 4, toy_states(5.0))
    states, _, _ = load_checkpoint(path, rank=0, stage_indices=[0])
    assert torch.equal(states[0]["model"]["w"], torch.full((3,), 5.0))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_4"]


@pytest.mark.parametrize("step", [-1, 1.5, "3", True])
def test_save_refuses_a_bad_step(tmp_path, step):
    with pytest.raises(CheckpointError, match="non-negative integer"):
        save_single(tmp_path, step, toy_states())


def test_latest_checkpoint_passes_over_hostile_and_incomplete_entries(tmp_path):
    good = save_single(tmp_path, 3, toy_states())
    save_single(tmp_path, 2, toy_states())
    root = tmp_path / "checkpoints"
    (root / "step_abc").mkdir()
    (root / "step_abc" / "COMPLETE").write_text("")
    (root / "step_5").write_text("a file, not a checkpoint")
    (root / "step_007").mkdir()                      # not a name fxconvert writes
    (root / "step_8").mkdir()                        # no COMPLETE: a save that died
    for name, meta in [("step_9", "{not json"), ("step_10", json.dumps({"step": 4})), ("step_11", "[1, 2]"),
                       ("step_12", "\udcff")]:
        (root / name).mkdir()
        (root / name / "COMPLETE").write_text("")
        (root / name / "meta.json").write_bytes(meta.encode("utf-8", "surrogateescape"))
    elsewhere = tmp_path / "elsewhere" / "step_99"
    elsewhere.mkdir(parents=True)
    (elsewhere / "COMPLETE").write_text("")
    (elsewhere / "meta.json").write_text(json.dumps({"step": 99}))
    (root / "step_99").symlink_to(elsewhere)
    (root / ".step_50.tmp").mkdir()
    (root / ".step_50.tmp" / "COMPLETE").write_text("")
    (root / ".step_50.tmp" / "meta.json").write_text(json.dumps({"step": 50}))
    assert latest_checkpoint(tmp_path) == good


def test_latest_checkpoint_of_a_run_without_checkpoints(tmp_path):
    assert latest_checkpoint(tmp_path / "nothing") is None
    (tmp_path / "checkpoints").write_text("a file")
    assert latest_checkpoint(tmp_path) is None


def test_remove_stale_touches_only_its_own_temporary_directories(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    for name in (".step_4.tmp", ".step_5.tmp.old"):  # what a killed save leaves: with the module's marker
        (root / name).mkdir()
        mark(root / name)
        (root / name / "stage_0.pt").write_text("partial")
    (root / ".step_6.tmp").write_text("a user's file")
    (root / ".step_7.tmp").symlink_to(outside)
    mark(outside)  # a marker behind a symlink is not followed either
    (root / ".step_8.tmp").mkdir()  # a user's directory of that name, without the marker
    (root / ".step_8.tmp" / "notes.txt").write_text("mine")
    for name in (".step_x.tmp", "notes.tmp", "step_3.tmp", ".step_04.tmp"):
        (root / name).mkdir()
    removed = remove_stale(tmp_path)
    assert [p.name for p in removed] == [".step_4.tmp", ".step_5.tmp.old"]
    assert sorted(p.name for p in root.iterdir()) == [".step_04.tmp", ".step_6.tmp", ".step_7.tmp", ".step_8.tmp",
                                                      ".step_x.tmp", "notes.tmp", "step_3.tmp"]
    assert (outside / "keep.txt").read_text() == "keep"
    assert (root / ".step_8.tmp" / "notes.txt").read_text() == "mine"


def test_a_symlinked_checkpoints_directory_is_never_cleaned_up_through(tmp_path):
    """A user's `.step_N.tmp` where run/checkpoints points (even one holding the marker) survives; saving refuses."""
    elsewhere = tmp_path / "users"
    (elsewhere / ".step_3.tmp").mkdir(parents=True)
    (elsewhere / ".step_3.tmp" / "thesis.tex").write_text("mine")
    (elsewhere / ".step_4.tmp").mkdir()
    mark(elsewhere / ".step_4.tmp")
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").symlink_to(elsewhere)
    assert remove_stale(run) == []
    with pytest.raises(CheckpointDirError, match="checkpoints is a symlink") as e:
        save_single(run, 5, toy_states())
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in elsewhere.iterdir()) == [".step_3.tmp", ".step_4.tmp"]
    assert (elsewhere / ".step_3.tmp" / "thesis.tex").read_text() == "mine"


def test_a_users_directory_in_the_way_of_a_save_is_kept(tmp_path):
    (tmp_path / "checkpoints" / ".step_5.tmp").mkdir(parents=True)
    (tmp_path / "checkpoints" / ".step_5.tmp" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"\.step_5\.tmp is in the way and fxconvert did not write it"):
        save_single(tmp_path, 5, toy_states())
    assert (tmp_path / "checkpoints" / ".step_5.tmp" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("what", ["users_dir", "note_in_checkpoint", "symlink", "file"])
def test_a_users_entry_at_the_steps_name_is_never_replaced(tmp_path, what):
    """A resumed run re-saving step k replaces the checkpoint fxconvert wrote there, never what a user put there."""
    final = tmp_path / "checkpoints" / "step_5"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("theirs")
    if what == "users_dir":
        final.mkdir(parents=True)
        (final / "notes.txt").write_text("mine")
    elif what == "note_in_checkpoint":
        save_single(tmp_path, 5, toy_states(1.0))
        (final / "notes.txt").write_text("mine")
    elif what == "symlink":
        final.parent.mkdir(parents=True)
        final.symlink_to(outside, target_is_directory=True)
    else:
        final.parent.mkdir(parents=True)
        final.write_text("mine")
    with pytest.raises(CheckpointError, match=r"step_5 is in the way and is not a checkpoint fxconvert wrote"):
        save_single(tmp_path, 5, toy_states(2.0))
    assert (outside / "keep.txt").read_text() == "theirs"
    if what == "symlink":
        assert final.is_symlink()
    elif what == "file":
        assert final.read_text() == "mine"
    else:
        assert (final / "notes.txt").read_text() == "mine"
    assert not any(p.name.startswith(".step_5") for p in final.parent.iterdir())  # nothing left half-written


def test_save_removes_what_a_killed_save_left(tmp_path):
    stale = tmp_path / "checkpoints" / ".step_2.tmp"
    stale.mkdir(parents=True)
    mark(stale)
    (stale / "rank_1.pt").write_text("partial")
    save_single(tmp_path, 3, toy_states())
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_3"]


# A save killed (os._exit, no cleanup runs) right after creating its directory, before the marker.
_KILLED_SAVE = """
import os, sys
from pathlib import Path
from fxconvert.training.checkpoint import OWN, rng_state, save_checkpoint
from checkpoint_ranks import META, toy_states

real_write_text = Path.write_text
def write_text(self, *args, **kwargs):
    if self.name == OWN:
        os._exit(9)
    return real_write_text(self, *args, **kwargs)
Path.write_text = write_text
save_checkpoint(Path(sys.argv[1]), 3, rank=0, world_size=1, states=toy_states(), rng=rng_state(), meta=META,
                barrier=lambda: None)
"""


def test_a_save_killed_before_its_marker_blocks_no_later_save(tmp_path):
    import subprocess
    import sys

    import train_runs as tr

    users = tmp_path / "checkpoints" / ".step_3.tmp.0123abcd"  # a user's directory with a name of that shape
    users.mkdir(parents=True)
    (users / "notes.txt").write_text("mine")
    proc = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(tmp_path)], cwd=os.path.dirname(__file__),
                          env=tr.env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr[-2000:]
    save_single(tmp_path, 3, toy_states())  # the next save of the same step
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_3"
    assert (users / "notes.txt").read_text() == "mine"
    # all the kill can have left is the empty directory it was creating, under a name of its own
    left = [p for p in (tmp_path / "checkpoints").iterdir() if p.name not in ("step_3", users.name)]
    assert all(p.name.startswith(".step_3.tmp.") and not any(p.iterdir()) for p in left), left


def test_remove_stale_takes_a_marked_directory_a_killed_save_was_creating(tmp_path):
    root = tmp_path / "checkpoints"
    (root / ".step_3.tmp.0123abcd").mkdir(parents=True)
    mark(root / ".step_3.tmp.0123abcd")
    (root / ".step_3.tmp.89abcdef").mkdir()  # unmarked: not removed
    (root / ".step_3.tmp.89abcdef" / "notes.txt").write_text("mine")
    assert [p.name for p in remove_stale(tmp_path)] == [".step_3.tmp.0123abcd"]
    assert (root / ".step_3.tmp.89abcdef" / "notes.txt").read_text() == "mine"


# -- reading hostile or mismatched checkpoints ---------------------------------------------------


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_load_refuses_a_crafted_pickle(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = save_single(tmp_path, 1, toy_states())
    with open(path / "stage_0.pt", "wb") as f:
        pickle.dump(_Exploit(), f)
    with pytest.raises(CheckpointError, match="cannot load .*stage_0.pt") as e:
        load_checkpoint(path, rank=0, stage_indices=[0])
    assert "\n" not in str(e.value)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("lost", ["stage_1.pt", "rank_0.pt"])
def test_a_checkpoint_with_a_deleted_shard_is_passed_over_with_a_warning(tmp_path, lost):
    earlier = save_single(tmp_path, 2, toy_states())
    damaged = save_single(tmp_path, 4, toy_states())
    (damaged / lost).unlink()
    warnings = []
    assert latest_checkpoint(tmp_path, warn=warnings.append) == earlier
    assert warnings == [f"checkpoint {damaged} is damaged ({damaged} lacks {lost}); passing over it to an "
                        f"earlier one"]
    index = int(lost.split("_")[1].split(".")[0])
    with pytest.raises(CheckpointError, match=f"checkpoint .*step_4 is damaged: {lost} is missing; delete") as e:
        load_checkpoint(damaged, rank=0 if lost.startswith("stage") else index,
                        stage_indices=[index] if lost.startswith("stage") else [0])
    assert "other stages or ranks" not in str(e.value)


def test_load_errors_name_the_missing_piece(tmp_path):
    path = save_single(tmp_path, 1, toy_states())
    with pytest.raises(CheckpointError, match="has no stage_5.pt; .*resume with the same settings"):
        load_checkpoint(path, rank=0, stage_indices=[5])
    with pytest.raises(CheckpointError, match="has no rank_3.pt"):
        load_checkpoint(path, rank=3, stage_indices=[0])
    (path / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_checkpoint(path, rank=0, stage_indices=[0])


def test_load_refuses_files_of_the_wrong_shape(tmp_path):
    path = save_single(tmp_path, 1, toy_states())
    torch.save({"x": 1}, path / "rank_0.pt")
    with pytest.raises(CheckpointError, match="rank_0.pt holds no random states"):
        load_checkpoint(path, rank=0, stage_indices=[])
    torch.save([1, 2], path / "stage_1.pt")
    with pytest.raises(CheckpointError, match="stage_1.pt holds no model and optimizer states"):
        load_checkpoint(path, rank=0, stage_indices=[1])


def test_check_meta_names_what_differs_and_the_fix(tmp_path):
    path = save_single(tmp_path, 1, toy_states())
    meta = json.loads((path / "meta.json").read_text())
    check_meta(meta, {**META, "world_size": 1}, path=path)  # the same run resumes
    with pytest.raises(ResumeMismatchError) as e:
        check_meta(meta, {**META, "world_size": 1, "dp": 2, "schedule": "gpipe", "num_stages": 3,
                          "model": "other"}, path=path)
    message = str(e.value)
    assert "\n" not in message
    for part in ("dp differs (checkpoint 1, this run 2; set by --dp)", "schedule differs", "num_stages differs",
                 "model differs", "resume with the checkpoint's settings, or train into a new --out"):
        assert part in message, message
    assert "virtual_stages" not in message and "optimizer" not in message


def test_check_meta_quotes_a_huge_recorded_value_short():
    """A meta.json's value is quoted in the refusal: a megabyte there stays a short line, control characters
    escaped (repr)."""
    with pytest.raises(ResumeMismatchError) as e:
        check_meta({"model": "\x1b[2J" + "x" * 1_000_000, "dp": [1] * 100_000}, {"model": "conv", "dp": 1}, path="run")
    message = str(e.value)
    assert message.isprintable() and len(message) < 1200, message[:1200]
    assert "model differs (checkpoint '\\x1b[2Jxxx" in message and "dp differs (checkpoint [1, 1," in message


# -- the multi-rank protocol with real processes ---------------------------------------------------


@pytest.mark.xdist_group("ranks")
def test_two_ranks_save_and_a_killed_rank_leaves_no_checkpoint(tmp_path):
    run = tmp_path / "run"
    assert run_ranks(run, tmp_path / "init_1", 1) == [0, 0]
    first = run / "checkpoints" / "step_1"
    assert sorted(p.name for p in first.iterdir()) == ["COMPLETE", "meta.json", "rank_0.pt", "rank_1.pt",
                                                       "stage_0.pt", "stage_1.pt"]
    states, rng1, meta = load_checkpoint(first, rank=1, stage_indices=[0, 1])
    assert torch.equal(states[1]["model"]["w"], torch.full((3,), 2.0)) and meta["world_size"] == 2
    torch.manual_seed(11)
    assert torch.equal(rng1["torch"], torch.get_rng_state())  # rank 1's own state, not rank 0's

    # rank 1 writes its files, then dies before the barrier that lets rank 0 complete the save
    codes = run_ranks(run, tmp_path / "init_2", 2, die_at_barrier=2)
    assert codes[1] == 3 and codes[0] != 0
    assert not (run / "checkpoints" / "step_2").exists()
    assert latest_checkpoint(run) == first

    # rank 1 dies before the first barrier, so rank 0 never gets past creating the directory
    codes = run_ranks(run, tmp_path / "init_3", 3, die_at_barrier=1)
    assert codes[1] == 3 and codes[0] != 0
    assert not (run / "checkpoints" / "step_3").exists()
    assert latest_checkpoint(run) == first
    remove_stale(run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_1"]


def test_save_refuses_meta_that_is_not_json(tmp_path):
    with pytest.raises(CheckpointError, match="plain JSON data"):
        save_single(tmp_path, 1, toy_states(), meta={"data": tmp_path})
    assert not (tmp_path / "checkpoints").exists()


def test_a_write_failure_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError, match="cannot write checkpoint step 1 .*No space left on device") as e:
        save_single(tmp_path, 1, toy_states())
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == []
    assert latest_checkpoint(tmp_path) is None


class _Stop(Exception):
    pass


def test_a_signal_between_the_renames_of_a_resave_loses_nothing(tmp_path, monkeypatch):
    """SIGTERM (torchrun stopping the workers) after the old step_k is moved aside and before the new one is
    in place: the swap finishes first, then the signal is delivered; step_k is the new checkpoint."""
    import signal

    import fxconvert.training.checkpoint as checkpoint

    save_single(tmp_path, 4, toy_states(1.0))
    monkeypatch.setattr(atomic_dir, "_renameat2", lambda src, dst, flags: False)  # the swap is two renames
    real_rename, renames = os.rename, []

    def rename(src, dst):
        real_rename(src, dst)
        if Path(src).name == "step_4" or Path(dst).name == "step_4":  # the swap's renames
            renames.append(dst)
        if Path(dst).name == ".step_4.tmp.old":  # the old checkpoint has just been moved aside
            os.kill(os.getpid(), signal.SIGTERM)

    def stop(signum, frame):
        raise _Stop

    previous = signal.signal(signal.SIGTERM, stop)
    monkeypatch.setattr(checkpoint.os, "rename", rename)
    try:
        with pytest.raises(_Stop):
            save_single(tmp_path, 4, toy_states(5.0))
    finally:
        signal.signal(signal.SIGTERM, previous)
    monkeypatch.undo()
    assert len(renames) == 2  # the signal waited for the second rename
    path = latest_checkpoint(tmp_path)
    states, _, _ = load_checkpoint(path, rank=0, stage_indices=[0])
    assert torch.equal(states[0]["model"]["w"], torch.full((3,), 5.0))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_4"]


def test_a_failed_swap_puts_the_previous_checkpoint_back(tmp_path, monkeypatch):
    import fxconvert.training.checkpoint as checkpoint

    save_single(tmp_path, 4, toy_states(1.0))
    monkeypatch.setattr(atomic_dir, "_renameat2", lambda src, dst, flags: False)  # the swap is two renames
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append(Path(dst).name)
        if Path(src).name == ".step_4.tmp" and Path(dst).name == "step_4":  # the new one cannot take its place
            raise OSError(28, "No space left on device")
        real_rename(src, dst)

    monkeypatch.setattr(checkpoint.os, "rename", rename)
    with pytest.raises(CheckpointError, match="No space left on device"):
        save_single(tmp_path, 4, toy_states(5.0))
    monkeypatch.undo()
    states, _, _ = load_checkpoint(latest_checkpoint(tmp_path), rank=0, stage_indices=[0])
    assert calls[-3:] == [".step_4.tmp.old", "step_4", "step_4"]  # aside, the failed swap, back
    assert torch.equal(states[0]["model"]["w"], torch.full((3,), 1.0))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_4"]


@pytest.mark.parametrize("meta", ['{"step": 7, "x": ' + "9" * 5000 + "}", "[" * 100_000 + "]" * 100_000],
                         ids=["integer-too-long", "nested-too-deeply"])
def test_a_meta_json_that_json_cannot_hold_is_passed_over(tmp_path, meta):
    """A meta.json whose integer has more digits than Python converts, or that nests deeper than its recursion
    limit, is a damaged checkpoint: passed over with the warning, not a traceback."""
    good = save_single(tmp_path, 3, toy_states())
    damaged = tmp_path / "checkpoints" / "step_7"
    damaged.mkdir()
    (damaged / "COMPLETE").write_text("")
    (damaged / "meta.json").write_text(meta)
    warnings = []
    assert latest_checkpoint(tmp_path, warn=warnings.append) == good
    (warning,) = warnings
    assert "step_7" in warning and "\n" not in warning
    with pytest.raises(CheckpointError):
        read_meta(damaged)


@pytest.mark.parametrize("recorded", ["lr lr_schedule steps", ["lr", 0.1], None, 7])
def test_changed_options_of_args_that_are_not_a_dict_names_nothing(recorded):
    """A meta.json whose "args" someone replaced by a string (where `"lr" in args` is a substring test), a list
    or a number records no option: nothing to name, and no TypeError."""
    assert changed_options(recorded, {"lr": 0.1, "steps": 4}) == []


def test_changed_options_lines_are_one_escaped_bounded_line_each():
    """The checkpoint's values are printed: control characters escaped, and a huge value cut, so each option
    is one short line whatever meta.json holds."""
    recorded = {"eval_data": "a\nfxconvert.train: error: fake\x1b[2J" + "x" * 1_000_000, "lr": 0.1,
                "tensorboard": {"nested": ["\r"] * 100_000}}
    lines = changed_options(recorded, {"eval_data": "e.jsonl", "lr": 0.2, "tensorboard": "tb"})
    assert len(lines) == 3
    for line in lines:
        assert line.isprintable() and len(line) < 400, line[:400]
    assert "--lr changed from 0.1 to 0.2 since the checkpoint" in lines
    (data,) = [line for line in lines if line.startswith("--eval-data")]
    assert data.startswith("--eval-data changed from a\\x0afxconvert.train: error: fake\\x1b[2Jxxx")
    assert data.endswith(" to e.jsonl since the checkpoint")


def test_a_step_recorded_as_a_bool_or_a_float_is_damaged(tmp_path):
    """`true == 1` and `2.0 == 2` in Python: a meta.json whose "step" is no integer must not pass for step_1 or
    step_2 (the run would say 'resuming from ... (step True of 4)' and count from a bool)."""
    for step, recorded in ((1, True), (2, 2.0), (3, "3" * 100_000)):
        save_single(tmp_path, step, toy_states())
        meta_path = tmp_path / "checkpoints" / f"step_{step}" / "meta.json"
        meta_path.write_text(json.dumps(dict(json.loads(meta_path.read_text()), step=recorded)))
    warnings = []
    assert latest_checkpoint(tmp_path, warn=warnings.append) is None
    assert complete_checkpoints(tmp_path) == []
    assert len(warnings) == 3 and all(len(w) < 400 for w in warnings), [w[:400] for w in warnings]
