"""One training process: the checks before any process group, joining it, the heartbeat, the loop, and the
one line a failure prints (`fxconvert.train` parses the options and starts it; `--self-check` starts its ranks
here too)."""

import os
import sys
import traceback
from datetime import timedelta

import torch.distributed as dist

from fxconvert.errors import FxConvertError, UsageError
from fxconvert.training.config import Launch, TrainConfig
from fxconvert.training.faults import (EXIT_INTERRUPTED, Signals, first_to_say, nonfinite, one_line, report_failure,
                                       tell)
from fxconvert.training.heartbeat import Heartbeat, die_with_launcher
from fxconvert.training.loop import train
from fxconvert.training.run import Run, lock_run, prepare, say


def run_training(cfg: TrainConfig, launch: Launch, *, received: int | None = None) -> int:
    """The run `cfg` as this process of `launch` (the exit status); `--self-check` starts its ranks here too.
    `received`: a signal that arrived before (while the entry point imported torch): the run stops at once."""
    signals = Signals(received)
    try:
        return _main(cfg, launch, signals)
    finally:
        signals.restore()


def _main(cfg: TrainConfig, launch: Launch, signals: Signals) -> int:
    if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun: end with it (`fxconvert.training.heartbeat`)
        die_with_launcher()
    # Checks before any process group or file: every rank finds the same problem; one line per machine.
    try:
        run = signals.guard(lambda: _prepared(cfg, launch))
    except Exception as e:
        if not isinstance(e, FxConvertError) and signals.received is None:
            raise  # a bug: its traceback  (with a signal, whatever it interrupted may wrap `_Terminated`)
        if first_to_say(launch, signals):
            tell(f"fxconvert.train: error: {signals.message or one_line(e)}")
        return EXIT_INTERRUPTED if signals.received else 2 if isinstance(e, UsageError) else 1
    state = {"heartbeat": None, "joined": False}
    try:
        signals.guard(lambda: _start_and_train(run, signals, state))
    except Exception as e:
        if cfg.verbose:
            traceback.print_exc()
        line = report_failure(e, run, state["heartbeat"], signals, joined=state["joined"])
        if line is not None:
            tell(line)
        if state["heartbeat"] is not None:  # this rank has reported: one still watching must not take it for dead
            state["heartbeat"].stop(finished=True)
        # No destroy_process_group: with a peer gone it can wait for the whole timeout. The
        # process ends here; its sockets close, which is what its peers notice.
        sys.stdout.flush()
        os._exit(1 if nonfinite(e) else EXIT_INTERRUPTED if signals.received else 2 if isinstance(e, UsageError)
                 else 1)
    if state["heartbeat"] is not None:
        state["heartbeat"].stop(finished=True)
    dist.destroy_process_group()
    if run.lock is not None:
        os.close(run.lock)
    return 0


def _prepared(cfg: TrainConfig, launch: Launch) -> Run:
    run = prepare(cfg, launch)
    lock_run(run)
    if run.model.recompute:
        say(run, run.model.recompute)
    return run


def _start_and_train(run: Run, signals: Signals, state: dict) -> None:
    """Join the process group, start the heartbeat (kept in `state` for the report, and `joined`), train."""
    launch = run.launch
    backend = "nccl" if run.device.type == "cuda" else "gloo"
    # Plain `python -m fxconvert.train` is a world of one without a launcher: nobody to meet, so its
    # store lives in this process and no port is opened (one picked here and bound later by
    # init_process_group could be taken in between by any other program on the machine).
    alone = launch.world_size == 1 and "MASTER_PORT" not in os.environ
    if launch.world_size == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")  # a world of one given only MASTER_PORT
    def start_heartbeat():
        heartbeat = state["heartbeat"] = Heartbeat(launch.rank, launch.world_size)
        signals.heartbeat_lost = lambda: heartbeat.lost

    # torchrun's store is up before any worker: beating before the rendezvous lets a rank that
    # waited in it name the one still preparing. Elsewhere rank 0 makes the store in init_process_group.
    early = launch.world_size > 1 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if early:
        start_heartbeat()
    if launch.world_size > 1:
        say(run, f"joining {launch.world_size} ranks ...", startup=True)
    dist.init_process_group(backend, store=dist.HashStore() if alone else None, rank=launch.rank,
                            world_size=launch.world_size, timeout=timedelta(seconds=run.cfg.timeout))
    state["joined"] = True
    if launch.world_size > 1 and not early:
        start_heartbeat()
    train(run)
