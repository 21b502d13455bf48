"""`fxconvert.training.checkpoint`: training checkpoints that a killed run can never leave half-written.

Layout of `run/checkpoints/step_<k>/`:

- `stage_<i>.pt` per pipeline stage: {"model": state dict, "optimizer": state dict},
  written by the rank that owns stage i in data-parallel replica 0 (replicas are equal; under
  `--zero` the replicas first gather the stage's optimizer state there: `optim.state_to_save`);
- `rank_<r>.pt` per global rank: that rank's random states (`rng_state()`), because
  dropout masks are drawn per rank and resuming must draw the same ones;
- `meta.json`: the step, the world size, the fxconvert version and what the caller
  records (data position, stages, dp, schedule, model, train arguments);
- `COMPLETE`: written last. Only a directory named `step_<k>` holding it counts.

Why the protocol (`save_checkpoint`, on `fxconvert.atomic_dir`): every rank writes into
`.step_<k>.tmp/` (which rank 0 creates marked, under a random name it then renames:
`atomic_dir.make_named_temp`); after a barrier (every file is on disk), rank 0 writes
meta.json and COMPLETE and puts the directory in place as `step_<k>` (`atomic_dir.commit`),
which is atomic on a POSIX filesystem. A rank killed at any point leaves at most a
`.step_<k>.tmp` that `latest_checkpoint` never looks at and that rank 0 removes at the next
save (`remove_stale`: only directories holding fxconvert's marker (`OWN`), and never through
a symlinked run/checkpoints, which a save refuses). `run/` must be on a filesystem that
every rank sees (one machine, or a shared filesystem across machines), as for
`torch.distributed.checkpoint`.

Files are read with `torch.load(weights_only=True)`: a checkpoint directory is user
input, and a full unpickle would run whatever code a crafted file names.
"""

import json
import os
import random
import re
from pathlib import Path
from typing import Callable

import torch

import fxconvert
from fxconvert import atomic_dir
from fxconvert.errors import FxConvertError, UsageError, first_line, printable

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
META = "meta.json"
_STEP = re.compile(r"^step_(0|[1-9][0-9]*)$")
# a save in progress, a step being replaced, or one being created (`_make_tmp`)
_TMP = re.compile(r"^\.step_(0|[1-9][0-9]*)\.tmp(\.old|\.[0-9a-f]{8})?$")
# Written into each temporary directory this module creates (and removed once it is a checkpoint):
# cleanup removes only directories holding it, never a user's that happens to have such a name.
OWN = atomic_dir.MARKER

# meta.json fields that must equal the current run's for a resume, with the option that sets each
RESUME_FIELDS = {
    "model": "SOURCE",
    "num_stages": "--stages of the conversion",
    "virtual_stages": "--virtual-stages",
    "dp": "--dp",
    "world_size": "the number of processes",
    "schedule": "--schedule",
    "optimizer": "--optimizer",
    "batch": "--batch",
    "grad_accum": "--grad-accum",
    "microbatches": "--microbatches",
    "shuffle": "--shuffle",
    "seed": "--seed",
    "dtype": "--dtype",
    "data": "--data (its path)",
    "data_sha256": "--data (its content)",
    "max_source_length": "--max-source-length",
    "max_target_length": "--max-target-length",
    "weight_decay": "--weight-decay",  # the optimizer's state holds it: a resume would keep the checkpoint's
}

# Options a resume may change, named when they differ from the checkpoint's "args" (`changed_options`): the
# learning rate and its curve (from the resumed step on: `lr_schedule.build`), how long to train, when to save,
# the clip, where the metrics also go, and evaluation. Options outside both tables (--timeout, --device,
# --recompute, --compile, --no-export, --measure-memory, --verbose) change how a run goes, not what it computes.
SHOWN = 240  # characters of a recorded option's value that `changed_options` prints
RESUME_MAY_CHANGE = {
    "lr": "--lr",
    "lr_schedule": "--lr-schedule",
    "warmup_steps": "--warmup-steps",
    "warmup_ratio": "--warmup-ratio",
    "min_lr": "--min-lr",
    "steps": "--steps",
    "epochs": "--epochs",
    "save_every": "--save-every",
    "max_grad_norm": "--max-grad-norm",
    "tensorboard": "--tensorboard",
    "eval_data": "--eval-data",
    "eval_every": "--eval-every",
    "eval_batch": "--eval-batch",
    "save_best": "--save-best",
    "keep_last": "--keep-last",
}


class CheckpointError(FxConvertError):
    """A checkpoint could not be written or read."""


class ResumeMismatchError(CheckpointError, UsageError):
    """The checkpoint was written by a run with other settings than this one."""


class CheckpointDirError(CheckpointError, UsageError):
    """run/checkpoints is not a directory fxconvert may write into (a symlink, a file)."""


def check_checkpoints_dir(run_dir) -> None:
    """Refuse a run/checkpoints that is a symlink or not a directory: saving, and the cleanup that comes
    with it, would write and delete wherever it points. Every rank calls it, before any collective."""
    root = checkpoints_dir(run_dir)
    if root.is_symlink():
        raise CheckpointDirError(f"{root} is a symlink; fxconvert writes (and cleans up) checkpoints only in a "
                                 f"real directory: replace it with one, or train into a new --out")
    if root.exists() and not root.is_dir():
        raise CheckpointDirError(f"{root} exists and is not a directory; move it away, or train into a new --out")


def stage_file(index: int) -> str:
    return f"stage_{index}.pt"


def rank_file(rank: int) -> str:
    return f"rank_{rank}.pt"


def checkpoints_dir(run_dir) -> Path:
    return Path(run_dir) / CHECKPOINTS


# -- random states ---------------------------------------------------------------------------


def rng_state() -> dict:
    """This process's random states: torch CPU, the current CUDA device (when available), python `random`.

    Dropout draws from the generator of the device it runs on, so a resumed run draws the
    same masks only if these are restored (`set_rng_state`). Only the current CUDA device
    is read: a rank drives one device, and reading every device's state would create a
    CUDA context on each of them from every rank. python's state is stored as lists so
    that `torch.load(weights_only=True)` reads it back.
    """
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "python": [version, list(internal), gauss],
    }


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state()` captured (the CUDA state onto the current device, when both runs have one)."""
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# -- saving ----------------------------------------------------------------------------------


def save_checkpoint(run_dir, step: int, *, rank: int, world_size: int, states: dict[int, dict], rng: dict,
                    meta: dict, barrier: Callable[[], None]) -> Path:
    """Write `run/checkpoints/step_<step>/` from every rank; returns its path (see the module docstring).

    Every rank calls this with the states of the stages it writes (dp replica 0's owners;
    `{}` elsewhere) and its own `rng`. `meta` must hold `num_stages`: rank 0 checks that
    every stage file and every rank file is there before it marks the checkpoint complete.
    `barrier()` is a collective over all ranks (`torch.distributed.barrier`, say); when a
    rank dies, the others fail in it, and the checkpoint is not completed.
    """
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"a checkpoint step must be a non-negative integer, got {step!r}")
    if "num_stages" not in meta:
        raise CheckpointError("checkpoint meta has no 'num_stages'; pass the pipeline's stage count in meta")
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint meta must be plain JSON data ({e}); convert paths and objects to "
                              f"strings") from e
    root = checkpoints_dir(run_dir)
    check_checkpoints_dir(run_dir)
    tmp, final = root / f".step_{step}.tmp", root / f"step_{step}"
    try:
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            remove_stale(run_dir)
            if tmp.exists() or tmp.is_symlink():
                raise CheckpointError(f"{tmp} is in the way and fxconvert did not write it; move it away, "
                                      f"then resume")
            if (final.exists() or final.is_symlink()) and not _replaceable(final):
                raise CheckpointError(f"{final} is in the way and is not a checkpoint fxconvert wrote (or holds "
                                      f"files it did not write); move it away, then resume")
            atomic_dir.make_named_temp(tmp)
        barrier()  # the tmp directory exists and is empty
        for index, state in states.items():
            _write(tmp / stage_file(index), lambda f, state=state: torch.save(state, f))
        _write(tmp / rank_file(rank), lambda f: torch.save(rng, f))
        barrier()  # every rank's files are on disk
        if rank == 0:
            _complete(tmp, final, step=step, world_size=world_size, meta=meta)
        barrier()  # no rank goes on (or exits) before the checkpoint is in place
    except OSError as e:
        _abandon(tmp, rank)
        raise CheckpointError(f"cannot write checkpoint step {step} in {root}: {e.strerror or e}"
                              f"{f' ({e.filename})' if e.filename else ''}; free space or fix permissions, "
                              f"then resume") from e
    except BaseException:
        _abandon(tmp, rank)
        raise
    return final


def _abandon(tmp: Path, rank: int) -> None:
    """Rank 0 removes a save that failed; a tmp name held by anything this module did not create stays."""
    if rank == 0:
        atomic_dir.remove_if_marked(tmp)


def _complete(tmp: Path, final: Path, *, step: int, world_size: int, meta: dict) -> None:
    expected = [stage_file(i) for i in range(meta["num_stages"])] + [rank_file(r) for r in range(world_size)]
    missing = [name for name in expected if not (tmp / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint step {step} is missing {', '.join(missing)} after every rank wrote; "
                              f"check that every stage of dp replica 0 passes its states")
    record = {**meta, "step": step, "world_size": world_size, "fxconvert_version": fxconvert.__version__}
    _write(tmp / META, lambda f: f.write(json.dumps(record, indent=2, sort_keys=True).encode()))
    _write(tmp / COMPLETE, lambda f: f.write(b"complete\n"))
    old = None
    if final.is_dir() and not final.is_symlink():
        # a newer run re-saving a step it reached before (resumed from an earlier one): replace it
        old = final.parent / f".step_{step}.tmp.old"
        if old.exists() or old.is_symlink():
            if not atomic_dir.is_marked(old):
                raise CheckpointError(f"{old} is in the way and fxconvert did not write it; move it away, "
                                      f"then resume")
            atomic_dir.rmtree(old)
    # the marker goes once it is in place: a checkpoint holds exactly the layout above
    atomic_dir.commit(tmp, final, replace=old is not None, aside=old, keep_marker=False)


def _replaceable(final: Path) -> bool:
    """Whether `final` is a checkpoint holding nothing but its own regular files (complete, or damaged by a lost
    shard): one a resumed run that reaches its step again may replace. Anything else there is the user's."""
    if final.is_symlink() or not final.is_dir() or not (final / COMPLETE).is_file():
        return False
    try:
        meta = read_meta(final)
    except CheckpointError:
        return False
    return foreign_entry(final, meta) is None


def foreign_entry(path: Path, meta: dict) -> str | None:
    """The first entry of checkpoint `path` that is not one of its own regular files, or None."""
    own = layout(meta) | {atomic_dir.MARKER}  # the marker: a removal killed before its rename
    for name in sorted(os.listdir(path)):
        entry = path / name
        if name not in own or entry.is_symlink() or not entry.is_file():
            return name
    return None


def _write(path: Path, write: Callable) -> None:
    """Write through `write(file)` and fsync, so COMPLETE never lands on disk before the data."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def remove_stale(run_dir) -> list[Path]:
    """Remove the `.step_<k>.tmp` directories a killed save left in run/checkpoints; return them.

    Only directories with exactly that name (or `.step_<k>.tmp.old`, `.step_<k>.tmp.<8 hex>`)
    that fxconvert created (they hold its `OWN` marker) are touched: no symlink, nothing
    else, so a file or directory a user keeps
    there survives, and a run/checkpoints that is a symlink is never looked into. Call it
    on rank 0 only, and only while no save is in flight (at a save, or when resuming).
    """
    root = checkpoints_dir(run_dir)
    if root.is_symlink() or not root.is_dir():
        return []
    return atomic_dir.remove_leftovers(root, _TMP)


# -- reading ---------------------------------------------------------------------------------


def latest_checkpoint(run_dir, *, warn: Callable[[str], None] | None = None) -> Path | None:
    """The complete checkpoint with the highest step in run/checkpoints, or None.

    A directory counts only if its name is exactly `step_<k>`, it is a real directory,
    it holds COMPLETE, its meta.json parses and records step k, and every file its meta
    says it has is there (a stage file per stage, a rank file per rank). Anything else (a
    half-written `.step_<k>.tmp`, a file or symlink called `step_5`, `step_abc`, a
    meta.json someone truncated, a shard someone deleted) is passed over, so a damaged
    newest checkpoint falls back to the one before it; `warn(message)` hears of each
    directory marked COMPLETE that is passed over for being damaged.
    """
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return None
    candidates = []
    for path in root.iterdir():
        match = _STEP.match(path.name)
        if match and path.is_dir() and not path.is_symlink() and (path / COMPLETE).is_file():
            candidates.append((int(match.group(1)), path))
    for step, path in sorted(candidates, reverse=True):
        try:
            meta = read_meta(path)
        except CheckpointError as e:
            why = str(e).split("; ")[0]
        else:
            missing = _missing(path, meta) if _records_step(meta, step) else None
            if not missing and _records_step(meta, step):
                return path
            why = f"{path / META} records step {repr(meta.get('step'))[:40]}" if missing is None else \
                f"{path} lacks {', '.join(missing[:3])}{' and more' if len(missing) > 3 else ''}"
        if warn is not None:
            warn(f"checkpoint {path} is damaged ({why}); passing over it to an earlier one")
    return None


def _records_step(meta: dict, step: int) -> bool:
    """Whether meta.json records `step` as the integer it writes (`true == 1` and `2.0 == 2` in Python)."""
    return type(meta.get("step")) is int and meta["step"] == step


def complete_checkpoints(run_dir) -> list[tuple[int, Path, dict]]:
    """(step, path, meta) of every checkpoint in run/checkpoints that `latest_checkpoint` would take, lowest
    step first; nothing through a symlinked run/checkpoints."""
    root = checkpoints_dir(run_dir)
    if root.is_symlink() or not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP.match(path.name)
        if not (match and path.is_dir() and not path.is_symlink() and (path / COMPLETE).is_file()):
            continue
        try:
            meta = read_meta(path)
        except CheckpointError:
            continue
        if _records_step(meta, int(match.group(1))) and not _missing(path, meta):
            found.append((meta["step"], path, meta))
    return sorted(found, key=lambda item: item[0])


def layout(meta: dict) -> set[str]:
    """The names a checkpoint with this meta.json holds (empty when meta.json does not say)."""
    stages, ranks = meta.get("num_stages"), meta.get("world_size")
    if not all(type(n) is int and n >= 1 for n in (stages, ranks)):
        return set()
    return {META, COMPLETE, *(stage_file(i) for i in range(stages)), *(rank_file(r) for r in range(ranks))}


def _missing(path: Path, meta: dict) -> list[str]:
    """The files meta.json says the checkpoint has that are not there (meta.json itself when it says nothing)."""
    stages, ranks = meta.get("num_stages"), meta.get("world_size")
    if not all(type(n) is int and n >= 1 for n in (stages, ranks)):
        return [f"{META} with num_stages and world_size"]
    present = set(os.listdir(path))
    if stages + ranks > len(present):  # cannot all be there (and a crafted count is not iterated)
        expected = [stage_file(i) for i in range(min(stages, len(present) + 1))] + \
                   [rank_file(r) for r in range(min(ranks, len(present) + 1))]
    else:
        expected = [stage_file(i) for i in range(stages)] + [rank_file(r) for r in range(ranks)]
    return [name for name in expected if name not in present or not (path / name).is_file()]


def read_meta(path) -> dict:
    path = Path(path)
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: JSON, or an int too long
        raise CheckpointError(f"cannot read {path / META}: {first_line(e)[:200]}; resume from another checkpoint") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path / META} does not hold a JSON object; resume from another checkpoint")
    return meta


def load_checkpoint(path, *, rank: int, stage_indices) -> tuple[dict[int, dict], dict, dict]:
    """(states of `stage_indices`, this rank's random states, meta) of a complete checkpoint.

    Tensors come back on the CPU; the caller moves them (`load_state_dict` copies into
    the module's own device anyway).
    """
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {COMPLETE}); resume from latest_checkpoint()")
    meta = read_meta(path)
    states = {i: _load(path / stage_file(i), i, meta.get("num_stages")) for i in stage_indices}
    for i, state in states.items():
        if not (isinstance(state, dict) and isinstance(state.get("model"), dict) and "optimizer" in state):
            raise CheckpointError(f"{path / stage_file(i)} holds no model and optimizer states; "
                                  f"resume from another checkpoint")
    rng = _load(path / rank_file(rank), rank, meta.get("world_size"))
    if not (isinstance(rng, dict) and isinstance(rng.get("torch"), torch.Tensor)
            and isinstance(rng.get("python"), list) and len(rng["python"]) == 3):
        raise CheckpointError(f"{path / rank_file(rank)} holds no random states; resume from another checkpoint")
    return states, rng, meta


def _load(file: Path, index: int, count):
    """One file of a checkpoint: stage or rank `index` of the `count` its meta.json records."""
    if not file.is_file():
        if type(count) is int and 0 <= index < count:  # the checkpoint's own layout has it: it was lost
            raise CheckpointError(f"checkpoint {file.parent} is damaged: {file.name} is missing; delete "
                                  f"{file.parent} to resume from the checkpoint before it")
        raise CheckpointError(f"checkpoint {file.parent} has no {file.name}; it was written by a run with other "
                              f"stages or ranks; resume with the same settings or start a new --out")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a damaged or crafted file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load {file}: {first}; resume from another checkpoint") from e


def check_meta(meta: dict, current: dict, *, path) -> None:
    """Refuse to resume from a checkpoint whose run differs in what a resume cannot change.

    `current` holds this run's values of the `RESUME_FIELDS` it knows; each field both
    record and that differs is named, with the option that sets it.
    """
    def quoted(value) -> str:  # meta.json's: escaped, and cut to SHOWN characters
        text = printable(repr(value)[:SHOWN + 1])
        return text if len(text) <= SHOWN else f"{text[:SHOWN]}..."

    differ = [f"{key} differs (checkpoint {quoted(meta[key])}, this run {quoted(current[key])}; set by {option})"
              if key != "data_sha256" else
              f"the content of --data {current.get('data', '')} differs from the file the checkpoint trained on "
              f"(sha256 {str(meta[key])[:16]}..., now {str(current[key])[:16]}...)"
              for key, option in RESUME_FIELDS.items()
              if key in current and key in meta and meta[key] != current[key]]
    if differ:
        raise ResumeMismatchError(f"cannot resume from {path}: {', '.join(differ)}; "
                                  f"resume with the checkpoint's settings, or train into a new --out")


def changed_options(recorded: dict, current: dict) -> list[str]:
    """A line for each option of `RESUME_MAY_CHANGE` whose value in `current` (this run's options) differs from
    `recorded` (the checkpoint's "args"); one that either lacks (a checkpoint of an older release) is not named.
    `recorded` comes from meta.json: what is not a dict names nothing, and a value is shown escaped and cut to
    `SHOWN` characters, so each line stays one short line."""
    def shown(value) -> str:
        if value is None:
            return "unset"
        if isinstance(value, bool):
            return "on" if value else "off"
        text = printable(f"{value:g}" if isinstance(value, float) else str(value)[:SHOWN + 1])
        return text if len(text) <= SHOWN else f"{text[:SHOWN]}..."

    if not isinstance(recorded, dict):
        return []

    return [f"{option} changed from {shown(recorded[key])} to {shown(current[key])} since the checkpoint"
            for key, option in RESUME_MAY_CHANGE.items()
            if key in recorded and key in current and recorded[key] != current[key]]


__all__ = ["save_checkpoint", "latest_checkpoint", "complete_checkpoints", "layout", "load_checkpoint", "remove_stale", "rng_state", "set_rng_state",
           "check_meta", "read_meta", "check_checkpoints_dir", "CheckpointError", "CheckpointDirError",
           "ResumeMismatchError", "RESUME_FIELDS", "RESUME_MAY_CHANGE", "changed_options"]
