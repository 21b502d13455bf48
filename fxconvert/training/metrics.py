"""RUN/metrics.jsonl (one line per step) and the progress line, written by the rank that holds the loss."""

import json
import os
import sys
import time
from pathlib import Path

from fxconvert.errors import UsageError, printable
from fxconvert.files import open_regular


class Reporter:
    """Metrics lines and the progress line, on the rank that holds the loss (last stage, replica 0)."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, *, tensorboard=None):
        """`tensorboard`: a `fxconvert.training.tensorboard.Writer` that gets every record too (closed here)."""
        self.path = run_dir / "metrics.jsonl"
        self.tensorboard = tensorboard
        self.total, self.start = total_steps, start_step
        self.began = time.perf_counter()
        self.file = _open_metrics(self.path)
        self._keep_steps_up_to(start_step)
        self.progress = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                                     TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
                                     TextColumn("{task.fields[rate]} tokens/s"),
                                     TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True))
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, loss="-", lr="-",
                                              rate="-")
            self.progress.start()

    def _keep_steps_up_to(self, step: int) -> None:
        """On resume, drop lines of steps after the checkpoint (the killed run may have written them).

        A line that is not a metrics record is dropped as well: the last one is expected (a run
        killed while writing leaves part of a line); those before it are counted in one warning
        naming the file and the first of them. The file is a log, not state, so it never stops a
        resume. It is rewritten through the descriptor `_open_metrics` opened, never by its name.
        """
        self.file.seek(0)
        lines = self.file.buffer.read().split(b"\n")
        last = max((n for n, raw in enumerate(lines, 1) if raw.strip()), default=0)
        kept, damaged = [], []
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
                record = json.loads(text)
            except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
                record = None
            if not (isinstance(record, dict) and type(record.get("step")) is int):
                if number != last:
                    damaged.append(number)
                continue
            if record["step"] <= step:
                kept.append(text)
        if damaged:
            print(f"fxconvert.train: warning: {printable(self.path)}: dropped {len(damaged)} "
                  f"{'line that is' if len(damaged) == 1 else 'lines that are'} not a metrics record "
                  f"(the first is line {damaged[0]})", file=sys.stderr, flush=True)
        self.file.truncate(0)  # the file is open for appending: what follows lands at its start
        self.file.write("".join(line + "\n" for line in kept))
        self.file.flush()

    def step(self, record: dict) -> None:
        self._write(record)
        done = record["step"] - self.start
        elapsed = time.perf_counter() - self.began
        eta = elapsed / done * (self.total - record["step"]) if done else 0.0
        if self.progress is not None:
            self.progress.update(self.task, completed=record["step"], loss=f"{record['loss']:.4f}",
                                 lr=f"{record['lr']:.3g}", rate=f"{record['tokens_per_s']:,.0f}")
            if "compile_s" in record:
                self.line(f"step {record['step']}: compiling took {record['compile_s']:.1f} s")
        else:
            compiled = f"  (compiling {record['compile_s']:.1f} s)" if "compile_s" in record else ""
            print(f"step {record['step']}/{self.total}  loss {record['loss']:.6f}  lr {record['lr']:.3g}  "
                  f"{record['tokens_per_s']:,.0f} tokens/s  {record['seconds']:.3f} s{compiled}  ETA {_clock(eta)}",
                  file=sys.stderr, flush=True)

    def line(self, text: str) -> None:
        """A line of the progress output of its own (above the bar in a terminal, which is redrawn first: rich
        draws it a few times a second, and the bar under the line would show an earlier step)."""
        if self.progress is not None:
            self.progress.refresh()
            self.progress.console.print(printable(text), markup=False, highlight=False)
        else:
            print(printable(text), file=sys.stderr, flush=True)

    def record(self, record: dict) -> None:
        """A line that is not a step's (`fxconvert.training.memory`'s), with the step it belongs to."""
        self._write(record)

    def _write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            self.tensorboard.write(record)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def _open_metrics(path: Path):
    """RUN/metrics.jsonl opened for reading and appending, refused unless it is a regular file.

    `prepare` refuses a symlink or anything else there already; opening without following a
    symlink and checking what was opened closes the window between that check and this open,
    so a resume never rewrites a file outside the run.
    """
    try:
        fd = open_regular(path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
    except OSError as e:
        raise UsageError(f"cannot open {printable(path)} ({e.strerror}); it must be a regular file of the run: "
                         f"move it away, or train into a new --out") from None
    except ValueError:
        raise UsageError(f"{printable(path)} is not a regular file; move it away, or train into a new --out") from None
    return os.fdopen(fd, "a+", encoding="utf-8")


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
