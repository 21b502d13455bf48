"""`--keep-last N` and `--save-best`: which checkpoints stay in run/checkpoints, decided by rank 0 after each save.

- Counted: the complete checkpoints (`checkpoint.complete_checkpoints`, what `--resume`
  would take). A half-written `.step_<k>.tmp`, a damaged or incomplete `step_<k>`, a symlink
  or file named `step_<k>`, and every other name are neither counted nor touched.
- Kept: the newest N, and with `--save-best` the one with the lowest eval loss (its
  meta.json's `eval_loss`; the earliest of equal ones; only among checkpoints evaluated on
  the same file at the same batch size, `evaluate.identity`) when it is older: N + 1 at most. The
  newest complete checkpoint is always kept, so `--resume` continues from it as before.
- Removed: the others, but only one that holds nothing besides a checkpoint's own files
  (`checkpoint.layout`: regular files, no symlink, no directory); one that also holds a
  file of someone else's stays, said once in a warning. A removal marks the directory,
  renames it to a temporary name (`.step_<k>.tmp.<8 hex>`) and deletes it: a kill in between
  leaves either the whole checkpoint or a marked temporary directory that the next save's
  cleanup takes (`checkpoint.remove_stale`), never a half-deleted `step_<k>`.
- `--save-best` writes `checkpoints/best.json` (`{"producer": "fxconvert.train",
  "checkpoint": "step_<k>", "step": k, "eval_loss": ...}`) by an atomic rename; a
  `best.json` that fxconvert did not write is refused before the run starts (`check_best`).
"""

import json
import math
import os
import secrets
import sys
from pathlib import Path

from fxconvert import atomic_dir
from fxconvert.errors import UsageError, printable
from fxconvert.files import open_regular
from fxconvert.signals import deferred
from fxconvert.training import evaluate
from fxconvert.training.checkpoint import CheckpointError, checkpoints_dir, complete_checkpoints, foreign_entry

BEST = "best.json"
PRODUCER = "fxconvert.train"


def check_best(run_dir, *, shown: str) -> None:
    """Refuse a checkpoints/best.json that is not fxconvert's record (a user's file, a symlink, a directory):
    `--save-best` replaces it."""
    path = checkpoints_dir(run_dir) / BEST
    if (path.exists() or path.is_symlink()) and _read_best(path) is None:
        raise UsageError(f"--save-best writes {printable(path)}, and the one there was not written by "
                         f"fxconvert.train; move it away, or train into a new --out")


def _read_best(path: Path) -> dict | None:
    """best.json's record when it is a regular file (not a symlink) that fxconvert.train wrote, else None."""
    try:
        with os.fdopen(open_regular(path, os.O_RDONLY), "rb") as f:
            record = json.loads(f.read(1 << 16).decode("utf-8"))
    except (OSError, ValueError, RecursionError):  # RecursionError: nested deeper than json decodes
        return None
    return record if isinstance(record, dict) and record.get("producer") == PRODUCER else None


def after_save(run) -> None:
    """Rank 0, after a checkpoint is complete: best.json and the pruning, as the options ask."""
    cfg = run.cfg
    if run.topo.rank != 0 or not (cfg.save_best or cfg.keep_last):
        return
    try:
        keep(run.run_dir, keep_last=cfg.keep_last, save_best=cfg.save_best, said=run.kept,
             eval_id=evaluate.identity(run))
    except OSError as e:
        raise CheckpointError(f"cannot {'prune' if cfg.keep_last else 'record the best of'} the checkpoints in "
                              f"{printable(checkpoints_dir(run.run_dir))}: {e.strerror or e}; fix permissions or "
                              f"free space, then resume") from e


def best_checkpoint(found: list, eval_id: str | None = None) -> tuple | None:
    """The (step, path, meta) of `found` with the lowest finite eval loss (the earliest of equal ones) among those
    evaluated as this run evaluates (`evaluate.identity`: a resume may change the eval file), or None."""
    scored = [item for item in found if _is_loss(item[2].get("eval_loss")) and item[2].get("eval_id") == eval_id]
    return min(scored, key=lambda item: (item[2]["eval_loss"], item[0]), default=None)


def _is_loss(value) -> bool:
    """Whether a meta.json's `eval_loss` is one: a finite JSON float, as `run._meta` records it (a bool or an
    integer is someone else's edit, and an integer past a float's range cannot even be compared as one)."""
    return type(value) is float and math.isfinite(value)


def keep(run_dir, *, keep_last: int | None, save_best: bool, said: set | None = None,
         eval_id: str | None = None) -> list[Path]:
    """Apply the rules of the module docstring to run/checkpoints; returns the checkpoints removed."""
    found = complete_checkpoints(run_dir)
    best = best_checkpoint(found, eval_id) if save_best else None
    if best is not None:
        _write_best(run_dir, best)
    if not keep_last:
        return []
    kept = {step for step, _, _ in found[-keep_last:]} | ({best[0]} if best is not None else set())
    removed = []
    for step, path, meta in found:
        if step in kept:
            continue
        foreign = foreign_entry(path, meta)
        if foreign:
            if said is None or path not in said:
                print(f"fxconvert.train: warning: --keep-last leaves {printable(path)}: it holds "
                      f"{printable(foreign)}, which fxconvert did not write", file=sys.stderr, flush=True)
            if said is not None:
                said.add(path)
            continue
        _remove(path, step)
        removed.append(path)
    named = _read_best(checkpoints_dir(run_dir) / BEST)  # an earlier run's, naming a checkpoint just removed
    if named is not None and named.get("checkpoint") in [path.name for path in removed]:  # it may name by a list
        (checkpoints_dir(run_dir) / BEST).unlink()
    return removed


def _remove(path: Path, step: int) -> None:
    with deferred():
        atomic_dir.mark(path)
        gone = path.parent / f".step_{step}.tmp.{secrets.token_hex(4)}"
        os.rename(path, gone)
    atomic_dir.rmtree(gone)


def _write_best(run_dir, best: tuple) -> None:
    step, path, meta = best
    root = checkpoints_dir(run_dir)
    record = {"producer": PRODUCER, "checkpoint": path.name, "step": step, "eval_loss": meta["eval_loss"]}
    target = root / BEST
    if (target.exists() or target.is_symlink()) and _read_best(target) is None:
        return  # appeared since `check_best`: not fxconvert's to replace
    if _read_best(target) == record:
        return
    tmp = root / f".{BEST}.{secrets.token_hex(4)}.tmp"
    try:
        with os.fdopen(open_regular(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "w", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        with deferred():
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
