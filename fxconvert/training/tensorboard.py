"""`--tensorboard DIR`: the records of RUN/metrics.jsonl as TensorBoard scalars, through `torch.utils.tensorboard`.

The rank that writes metrics.jsonl (the last stage of replica 0, `metrics.Reporter`) hands
each record to `Writer.write` as it writes the line, so the two never disagree: every numeric
field of a record becomes a scalar of that name at the record's step (loss, lr, grad_norm,
tokens_per_s, and whatever a record gains later, an evaluation's eval_loss among them). A
record of one rank (the memory records carry "rank") puts its fields under `rank_<r>/`, so
the ranks' values stay apart. "step", "rank" and "replica" name a record; they are no scalars.

`tensorboard` is an optional extra (`pip install 'fxconvert[tensorboard]'`): `check` imports
it on every rank alike before any process group exists, and refuses DIR in one line when it
cannot be a directory of event files (a file, a broken symlink, a parent that is a file, or
a place fxconvert itself writes: RUN's checkpoints/, hf/, metrics.jsonl and marker files, the
temporary names beside them (`.hf.tmp`, `.hf.<8 hex>.old`: `.NAME.` anything), or SOURCE). A symlink to a directory is followed: TensorBoard only adds files to DIR. A resumed
run writes a new event file with `purge_step`, so TensorBoard hides the steps the stopped run
logged after its checkpoint (nothing is deleted).
"""

import math
from pathlib import Path

from fxconvert.errors import UsageError, printable

EXTRA = "pip install 'fxconvert[tensorboard]'"
NAMES = ("step", "rank", "replica")  # what identifies a record, not what it measures


def check(directory: str, *, run_dir: Path, own: tuple[str, ...], source: str) -> None:
    """Refuse `--tensorboard directory` before anything is written (one line each); `own`: RUN's names that
    fxconvert writes, where no event file may go."""
    try:
        import torch.utils.tensorboard  # noqa: F401  (imports tensorboard, and checks its version)
    except ImportError:
        raise UsageError(f"--tensorboard needs the tensorboard package, which is not installed; {EXTRA}, or drop "
                         f"--tensorboard") from None
    shown = printable(directory)
    path = Path(directory).expanduser()
    if path.is_symlink() and not path.exists():
        raise UsageError(f"--tensorboard {shown} is a symlink to nothing; point it at a directory, or choose "
                         f"another --tensorboard")
    if path.exists() and not path.is_dir():
        raise UsageError(f"--tensorboard {shown} exists and is not a directory; choose another --tensorboard")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"--tensorboard {shown}: {printable(parent)} is not a directory; choose another "
                                 f"--tensorboard")
            break
    where = path.resolve()
    run = run_dir.expanduser().resolve()
    first = where.relative_to(run).parts[0] if run in where.parents else None
    if first is not None and (first in own or first.startswith(tuple(f".{name}." for name in own))):
        raise UsageError(f"--tensorboard {shown} is inside {printable(first)} of --out, which fxconvert writes; "
                         f"choose a directory of its own (RUN/tb is fine)")
    source_path = Path(source).expanduser()
    if source_path.is_dir() and (where == source_path.resolve() or source_path.resolve() in where.parents):
        raise UsageError(f"--tensorboard {shown} is inside SOURCE {printable(source)}; choose a directory outside "
                         f"the conversion")


class Writer:
    """Scalars of the metrics records, into a new event file of DIR (flushed with each record, as metrics.jsonl
    is: a run that is killed keeps what it logged)."""

    def __init__(self, directory: str, *, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        path = Path(directory).expanduser()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create --tensorboard {printable(directory)} ({e.strerror}); choose another "
                             f"--tensorboard") from None
        # On resume, steps after the checkpoint's (records are numbered from 1) are hidden by TensorBoard.
        self.writer = SummaryWriter(str(path), purge_step=start_step + 1 if start_step else None)

    def write(self, record: dict) -> None:
        rank = record.get("rank")
        prefix = f"rank_{rank}/" if type(rank) is int else ""
        for name, value in record.items():
            if name not in NAMES and type(value) in (int, float) and math.isfinite(value):
                self.writer.add_scalar(prefix + name, value, global_step=record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def writer(cfg, *, start_step: int) -> Writer | None:
    """The run's writer (on the rank that reports), or None without --tensorboard."""
    return Writer(cfg.tensorboard, start_step=start_step) if cfg.tensorboard is not None else None


__all__ = ["EXTRA", "check", "Writer", "writer"]
