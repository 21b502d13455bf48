"""Faults: signals, non-finite steps and failures, each reported as one line per rank.

A failure during training is printed by each rank as `fxconvert.train: error: rank R (stage S,
replica D): ...`, naming the rank that failed first when another one did (found with the
heartbeat in torchrun's store, `fxconvert.training.heartbeat`). SIGTERM and SIGINT become one
exception, raised only inside `Signals.guard`ed work.
"""

import os
import re
import signal
import sys
import time

import torch
import torch.distributed as dist

from fxconvert.errors import FxConvertError, first_line, printable
from fxconvert.training.config import Launch, TrainError
from fxconvert.training.grad_sync import Topology
from fxconvert.training.heartbeat import first_to_claim, launcher_gone


class NonFiniteError(TrainError):
    """A loss or gradient was nan or inf; every rank raises it at the same step (`check_finite`)."""


def check_finite(modules: dict, losses: list | None, step: int, device: torch.device) -> None:
    """Stop every rank before the optimizer step when any rank's loss or gradient is nan or inf.

    One all-reduce of two flags over the world, so all ranks stop at the same step and no
    weight anywhere takes the update: the last checkpoint is the last good state. (Training
    on would report `loss nan` to the end and export nan weights.)
    """
    grads = [p.grad for m in modules.values() for p in m.parameters() if p.grad is not None]
    flags = torch.zeros(2, device=device)
    if losses:
        flags[0] = (~torch.stack([v.detach().float() for v in losses]).isfinite()).any()
    # A sum is finite only if each of its terms is (a nan or inf anywhere makes it nan or inf), and a sum reads a
    # gradient at memory speed, where `isfinite().all()` took 6% of a t5-small step on one thread. Only a sum
    # that is not finite (a gradient that is not, or finite values whose sum overflowed) is looked at elementwise.
    if grads and not torch.stack([g.sum() for g in grads]).isfinite().all():
        flags[1] = (~torch.stack([g.isfinite().all() for g in grads])).any()
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    if flags.any():
        what = " and ".join(name for name, bad in zip(("loss", "gradient"), flags.tolist()) if bad)
        verb = "are" if flags.all() else "is"
        raise NonFiniteError(f"step {step}: the {what} {verb} not finite (nan or inf), so the run stopped before "
                             f"any weight took it; nothing of step {step} was saved, and --resume continues from "
                             f"the last checkpoint; lower --lr or set --max-grad-norm, or check SOURCE's weights "
                             f"for nan")


def tell(line: str) -> None:
    """`line` and its newline on stderr in one write, so that ranks sharing a terminal never glue their lines.

    torchrun starts its workers with `python -u`, where `print` writes the text and the newline
    apart, and two ranks' lines used to land on one line. One `write` of up to 4096 bytes into a
    pipe is atomic (PIPE_BUF), and a terminal takes it whole. A stderr that is not a file (a
    test's capture) gets the line as any other text.
    """
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
        return
    sys.stderr.flush()
    data = (line + "\n").encode("utf-8", "backslashreplace")
    while data:
        data = data[os.write(fd, data):]


def one_line(error: BaseException) -> str:
    """One printable line: our own messages whole (a newline in a path is escaped, not a cut), others' first line."""
    if isinstance(error, FxConvertError):
        return printable(str(error).strip())
    line = printable(first_line(error))
    # gloo's messages: "[.../pair.cc:537] Read error [addr]: Connection reset by peer. This is typically ..."
    line = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\] ", "", line)
    return line.split(". This is typically")[0]


def describe(topo: Topology, launch: Launch, *, rank: int | None = None) -> str:
    rank = launch.rank if rank is None else rank
    pipeline_rank, replica = divmod(rank, topo.dp)
    stages = topo.stages_of(pipeline_rank)
    listed = ", ".join(str(s) for s in stages)
    return f"rank {rank} (stage{'s' if len(stages) > 1 else ''} {listed}, replica {replica})"


class Terminated(Exception):
    pass


EXIT_INTERRUPTED = 130


class Signals:
    """SIGTERM (torchrun stopping the workers after another one failed, or the launcher gone) and SIGINT
    (Ctrl-C) become one exception, `Terminated`, raised only inside `guard`ed work and once per guard;
    any other signal is only recorded. So no signal can land in the reporting of a failure (a second
    Ctrl-C, or torchrun's SIGTERM after a first one, used to end a rank with a traceback), and torchrun's
    30 s between SIGTERM and SIGKILL are the reporting's. `received` remembers the first signal: torch
    may wrap the exception in one of its own."""

    MESSAGES = {signal.SIGTERM: "stopped by the launcher (another rank failed, or the run was interrupted)",
                signal.SIGINT: "interrupted"}
    LAUNCHER_GONE = ("stopped: the launcher is gone (torchrun was killed, or its store stopped answering), and its "
                     "workers stop with it; --resume continues from the last checkpoint")

    def __init__(self, received: int | None = None):
        self.armed = False
        self.raised = False
        self.received = received
        self.heartbeat_lost = lambda: False  # main: whether the heartbeat found the launcher's store gone
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        if self.received is None:
            self.received = signum
        if self.armed and not self.raised:
            self.raised = True
            raise Terminated(self.MESSAGES[self.received])

    def guard(self, work):
        """`work()`, interruptible: a signal already received, or one arriving during it, raises `Terminated`.

        At most once per guard, not per process: code inside `work` that catches every
        Exception (transformers and torch have such places) may swallow the one raised in
        it, so a signal received during `work` raises again when it returns (else one
        swallowed Ctrl-C disabled Ctrl-C and SIGTERM for the rest of the run), and every
        later guard raises at once. A signal landing in the `finally` below raises before
        `armed` is cleared: that is the one raise, and the caller's `except` catches it
        like any other.
        """
        self.armed, self.raised = True, False
        try:
            if self.received is None:
                result = work()
            if self.received is not None:  # before `work`, or during it and swallowed there
                self.raised = True
                raise Terminated(self.MESSAGES[self.received])
            return result
        finally:
            self.armed = False

    def restore(self) -> None:
        """Put back the handlers found (for `main` called in a process that goes on)."""
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    @property
    def message(self) -> str | None:
        if self.received == signal.SIGTERM and (launcher_gone() or self.heartbeat_lost()):
            return self.LAUNCHER_GONE
        return self.MESSAGES[self.received] if self.received is not None else None


def first_to_say(launch: Launch, signals: Signals, grace: float = 2.0) -> bool:
    """Whether this rank prints the problem it found before training: one line per machine.

    Every rank runs the same checks, and each one that fails comes here. Under torchrun the
    first of a machine's ranks to arrive claims the machine's line in the launcher's store
    (`heartbeat.first_to_claim`, an atomic counter: no clock decides, however loaded the
    machine); the others stay quiet, whether they found a problem themselves or were stopped
    by the launcher because another rank did. Without a launcher's store, local rank 0 speaks
    for the machine, and another rank that found a problem waits `grace` seconds: when local
    rank 0 fails too, the launcher stops this rank in that time and it stays quiet; otherwise
    it says what it found.
    """
    claimed = first_to_claim(f"said/{os.environ.get('GROUP_RANK', '0')}")
    if claimed is not None:
        return claimed
    if launch.local_rank == 0:
        return True
    deadline = time.monotonic() + grace
    while signals.received is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return signals.received is None


def nonfinite(error: BaseException | None) -> "NonFiniteError | None":
    """The NonFiniteError behind `error` (a signal's exception may have replaced it), or None."""
    while error is not None and not isinstance(error, NonFiniteError):
        error = error.__context__
    return error


def report_failure(error: BaseException, run, heartbeat, signals: Signals, *, joined: bool = True) -> str | None:
    """One line for this rank's first error, naming the rank that failed first when another one did
    (None: another rank says it). Stopped by the launcher before it `joined` the process group, a rank
    speaks as before any process group (`first_to_say`: one line per machine), and blames no one."""
    stopped = nonfinite(error)
    if stopped is not None:  # every rank found it at once: rank 0 says it (the launcher's SIGTERM is no news)
        return f"fxconvert.train: error: {one_line(stopped)}" if run.launch.rank == 0 else None
    message = signals.message or one_line(error)
    if signals.received == signal.SIGINT:  # Ctrl-C reaches every rank: nobody failed, nobody to name
        return f"fxconvert.train: error: {describe(run.topo, run.launch)}: {message}"
    if signals.received is not None and not joined:  # stopped while another rank failed its checks (it says so)
        return f"fxconvert.train: error: {message}" if first_to_say(run.launch, signals) else None
    waiting = signals.received is None  # a timeout this rank hit waiting may be a late rank's
    culprit = heartbeat.culprit(waiting=waiting) if heartbeat is not None else None  # torchrun allows 30 s
    if culprit is not None and culprit[0] != run.launch.rank:
        rank, what = culprit
        other = Launch(rank, run.launch.world_size, 0)
        message = f"{describe(run.topo, other, rank=rank)} failed: {what} (here: {message})"
    elif heartbeat is not None and signals.received is None:  # a rank that was stopped is no culprit
        heartbeat.record_failure(message)
    return f"fxconvert.train: error: {describe(run.topo, run.launch)}: {message}"
