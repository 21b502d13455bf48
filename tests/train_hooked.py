"""`python -m fxconvert.train` as a torchrun worker script, with faults injected from the environment.

torchrun runs this file instead of `-m fxconvert.train` (`train_runs.hooked_command`); the
trainer itself has no test hooks. Run as `python train_hooked.py --nproc-per-node P ...`, the launcher
starts its ranks with this file too (its own process has no RANK and injects nothing). Variables
(all optional):

- HOOK_PID_DIR: each worker writes its pid to `<dir>/<RANK>.pid` first thing;
- HOOK_STOP_RANK, HOOK_STOP_AT_SYNC=N: that rank SIGSTOPs itself just before its N-th
  `sync_gradients` (a hang where the others wait in a tied-weight or replica all-reduce);
- HOOK_EXIT_DIR: each worker writes its exit status to `<dir>/<RANK>.exit` (os._exit included), the
  process of `--nproc-per-node` to `<dir>/launcher.exit`;
- HOOK_NAN_RANK, HOOK_NAN_AT_SYNC=N: that rank puts a nan into the gradient of one weight
  no other rank holds (not a tied one) just before its N-th `sync_gradients`;
- HOOK_PAUSE_AT_SYNC=N, HOOK_PAUSE_UNTIL=FILE: every rank waits just before its N-th
  `sync_gradients` until FILE exists (a run held in the middle, with no collective pending);
  with HOOK_PAUSE_RANK=R only that rank waits, and the others wait for it inside a collective
  (a step held in the middle);
- HOOK_PAUSE_IN_SAVE=N, HOOK_PAUSE_UNTIL=FILE: every rank (HOOK_PAUSE_RANK: that one) waits in
  the checkpoint write of step N, after the last file it writes there (rank 0: COMPLETE, in the
  temporary directory not yet renamed), until FILE exists;
- with HOOK_PID_DIR, a rank that starts waiting for HOOK_PAUSE_UNTIL writes `<dir>/<RANK>.paused`;
- with HOOK_PAUSED_DIR, a rank that starts waiting for HOOK_PAUSE_UNTIL writes `<dir>/<RANK>.paused` there too;
- HOOK_OPENS_DIR: from the start of training (after every check), each worker writes a line to
  `<dir>/<RANK>.opens` each time it opens the `--data` file (a Python audit hook sees every open);
- HOOK_SLOW_RANK, HOOK_SLOW_PREPARE_FILE: that rank waits, after its own checks, until the
  file exists (a rank still preparing while the others already wait for it); with
  HOOK_SLOW_BEFORE_CHECKS=1 it waits before its checks instead (a rank that has not found yet
  what another rank already reports).
"""

import os
import signal
import sys
import time
from pathlib import Path

rank = int(os.environ.get("RANK", "-1"))  # -1: the process of --nproc-per-node, which starts the ranks
name = str(rank) if rank >= 0 else "launcher"
if os.environ.get("HOOK_PID_DIR") and rank >= 0:
    Path(os.environ["HOOK_PID_DIR"], f"{rank}.pid").write_text(str(os.getpid()))

if os.environ.get("HOOK_EXIT_DIR"):
    real_exit = os._exit

    def exit_and_tell(status):
        Path(os.environ["HOOK_EXIT_DIR"], f"{name}.exit").write_text(str(status))
        real_exit(status)

    os._exit = exit_and_tell

if os.environ.get("HOOK_STOP_RANK") == str(rank):
    from fxconvert.training import grad_sync

    real_sync, calls = grad_sync.sync_gradients, []

    def sync_gradients(*args, **kwargs):
        calls.append(1)
        if len(calls) == int(os.environ["HOOK_STOP_AT_SYNC"]):
            os.kill(os.getpid(), signal.SIGSTOP)
        return real_sync(*args, **kwargs)

    grad_sync.sync_gradients = sync_gradients

if os.environ.get("HOOK_NAN_RANK") == str(rank):
    from fxconvert.training import grad_sync

    clean_sync, nan_calls = grad_sync.sync_gradients, []

    def sync_with_nan(topo, modules, *args, **kwargs):
        nan_calls.append(1)
        if len(nan_calls) == int(os.environ["HOOK_NAN_AT_SYNC"]):
            # not a shared (tied) weight: sync_gradients sums those over their holders, so the other
            # rank would see the nan without `_check_finite`'s all-reduce over the world
            grad = next(p.grad for m in modules.values() for name, p in m.named_parameters()
                        if p.grad is not None and name not in topo.shared_stages)
            grad.view(-1)[0] = float("nan")
        return clean_sync(topo, modules, *args, **kwargs)

    grad_sync.sync_gradients = sync_with_nan

def pause() -> None:
    for var in ("HOOK_PID_DIR", "HOOK_PAUSED_DIR"):
        if os.environ.get(var):
            Path(os.environ[var], f"{rank}.paused").touch()
    while not Path(os.environ["HOOK_PAUSE_UNTIL"]).exists():
        time.sleep(0.05)


pausing = rank >= 0 and os.environ.get("HOOK_PAUSE_RANK", str(rank)) == str(rank)

if os.environ.get("HOOK_PAUSE_AT_SYNC") and pausing:
    from fxconvert.training import grad_sync

    paused_sync, pause_calls = grad_sync.sync_gradients, []

    def sync_and_pause(*args, **kwargs):
        pause_calls.append(1)
        if len(pause_calls) == int(os.environ["HOOK_PAUSE_AT_SYNC"]):
            pause()
        return paused_sync(*args, **kwargs)

    grad_sync.sync_gradients = sync_and_pause

if os.environ.get("HOOK_PAUSE_IN_SAVE") and pausing:
    from fxconvert.training import checkpoint

    real_write = checkpoint._write

    def write_and_pause(path, write):
        real_write(path, write)
        last = checkpoint.COMPLETE if rank == 0 else checkpoint.rank_file(rank)
        if path.parent.name == f".step_{os.environ['HOOK_PAUSE_IN_SAVE']}.tmp" and path.name == last:
            pause()

    checkpoint._write = write_and_pause

if os.environ.get("HOOK_OPENS_DIR"):
    from fxconvert.training import worker

    checked_train = worker.train

    def train_and_log_opens(run):
        data = os.path.realpath(run.cfg.data)
        log = Path(os.environ["HOOK_OPENS_DIR"], f"{rank}.opens")
        log.write_text("")

        def audit(event, args):
            path = args[0] if event == "open" else None
            if isinstance(path, (str, bytes, os.PathLike)) and os.path.realpath(os.fsdecode(path)) == data:
                with log.open("a") as f:
                    f.write(f"{args[1]}\n")

        sys.addaudithook(audit)
        return checked_train(run)

    worker.train = train_and_log_opens

if os.environ.get("HOOK_SLOW_RANK") == str(rank):
    from fxconvert.training import worker

    real_prepare = worker.prepare

    def prepare(*args, **kwargs):
        before = os.environ.get("HOOK_SLOW_BEFORE_CHECKS") == "1"
        run = None if before else real_prepare(*args, **kwargs)
        while not Path(os.environ["HOOK_SLOW_PREPARE_FILE"]).exists():
            time.sleep(0.05)
        return real_prepare(*args, **kwargs) if before else run

    worker.prepare = prepare

from fxconvert.train import main  # noqa: E402

status = main()
if os.environ.get("HOOK_EXIT_DIR"):
    Path(os.environ["HOOK_EXIT_DIR"], f"{name}.exit").write_text(str(status))
sys.exit(status)
