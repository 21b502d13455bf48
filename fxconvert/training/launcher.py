"""`python -m fxconvert.train --nproc-per-node P`: the ranks of one machine, started through torch's elastic launcher.

torchrun wraps a failure of its workers in about 40 lines of its own (the agent's log lines, then a
`ChildFailedError` traceback listing every worker), under which the one line each rank prints was
lost, and exits 1 whatever the ranks said (2 for a usage error, 130 for Ctrl-C). Here this process
runs the same launcher torchrun runs (`torch.distributed.launcher.api.elastic_launch`: the agent,
its store, its signal forwarding, its 30 s between SIGTERM and SIGKILL), with its logging silenced,
and catches its failure: the ranks print their own lines, as under torchrun, and this process adds
one only for a rank that could not (killed by a signal). Its exit status is the ranks' (2 when one
refused its options or data, 1 for any other failure, 130 when interrupted).

- The rendezvous is c10d on 127.0.0.1 port 0: the launcher's store binds a free port itself (a port
  picked first and bound later can be taken in between) and the ranks learn it from the launcher.
- Every rank runs this process's program again, without a second launch: `LAUNCHED` in its
  environment says that the launcher started it (under torchrun, `--nproc-per-node` is refused).
- OMP_NUM_THREADS=1 for each rank when it is unset, as torchrun does (one line says so): P ranks of
  one thread per core each would otherwise start P x cores threads.
- At most `MAX_NPROC` ranks, refused before any starts (a mistyped count would start that many).
- One machine only: several machines need a rendezvous every machine's launcher reaches, which is
  what torchrun's `--nnodes`/`--rdzv-endpoint` are for.
"""

import logging
import os
import signal
import sys
import tempfile
import uuid
from dataclasses import replace

from fxconvert.errors import FxConvertError, UsageError
from fxconvert.training.config import Launch, TrainConfig, check_options
from fxconvert.training.faults import EXIT_INTERRUPTED, tell

LAUNCHED = "FXCONVERT_TRAIN_LAUNCHED"  # set for the ranks this launcher starts
QUIET_LOGGERS = ("torch.distributed.elastic", "torch.distributed.launcher")
# The most ranks `--nproc-per-node` starts. A checkpoint converted as the ranks start has no stage count to check
# the launch against before they do (and gpipe takes fewer microbatches than stages), so a mistyped count would
# start that many processes; a stage holds at least one layer, and fxconvert builds at most 1024 in a stack
# (`fxconvert.load.MAX_LAYERS`, not imported here: a rank does not import the converter).
MAX_NPROC = 1024


def launched() -> bool:
    """Whether this process is a rank `launch` started (its `--nproc-per-node` is then the launcher's, done)."""
    return os.environ.get(LAUNCHED) == "1"


def launch(cfg: TrainConfig, program: list[str], argv: list[str]) -> int:
    """Start `cfg.nproc_per_node` ranks running `program + argv` (`python program argv`); the exit status."""
    try:
        _check(cfg)
    except FxConvertError as e:
        tell(f"fxconvert.train: error: {e}")
        return 2 if isinstance(e, UsageError) else 1
    if "OMP_NUM_THREADS" not in os.environ and cfg.nproc_per_node > 1:
        os.environ["OMP_NUM_THREADS"] = "1"
        tell(f"fxconvert.train: OMP_NUM_THREADS=1 for each of the {cfg.nproc_per_node} ranks (as torchrun sets "
             f"it); set OMP_NUM_THREADS to choose")
    os.environ[LAUNCHED] = "1"
    if sys.stderr.isatty():  # start-up, said on a terminal (`run.say`); the ranks say the rest
        tell(f"starting {cfg.nproc_per_node} rank{'s' if cfg.nproc_per_node > 1 else ''} on this machine ...")
    try:
        return _run(cfg.nproc_per_node, program, argv)
    finally:
        del os.environ[LAUNCHED]


def _check(cfg: TrainConfig) -> None:
    """What can be refused before any rank starts: the launch itself, and every option check a rank makes first."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        raise UsageError("--nproc-per-node starts the ranks itself, but this process is already one of torchrun's; "
                         "drop --nproc-per-node, or run without torchrun")
    if cfg.nproc_per_node < 1:
        raise UsageError(f"--nproc-per-node must be at least 1, got {cfg.nproc_per_node}")
    if cfg.nproc_per_node > MAX_NPROC:
        raise UsageError(f"--nproc-per-node must be at most {MAX_NPROC} (the ranks of one machine; torchrun starts "
                         f"more over several machines), got {cfg.nproc_per_node}")
    check_options(replace(cfg, nproc_per_node=None), Launch(0, cfg.nproc_per_node, 0))


def _run(nproc: int, program: list[str], argv: list[str]) -> int:
    # the launcher's modules import torch's elastic agent: loaded here, so a rank never loads them
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for name in QUIET_LOGGERS:  # the agent's warnings and errors retell, in many lines, what the ranks say in one
        logger = logging.getLogger(name)
        logger.addHandler(logging.NullHandler())
        logger.propagate = False
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)  # the agent's (LaunchConfig's default)
    previous = {s: signal.getsignal(s) for s in handled}
    try:
        with tempfile.TemporaryDirectory(prefix="fxconvert-launch-") as logs:  # the agent's per-rank error files
            config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                                  rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", local_addr="127.0.0.1",
                                  max_restarts=0, logs_specs=DefaultLogsSpecs(log_dir=logs))
            try:
                elastic_launch(config, sys.executable)(*program, *argv)
            except ChildFailedError as e:
                return _failed({rank: failure.exitcode for rank, failure in e.failures.items()})
        return 0
    except SignalException:  # the agent forwarded it to the ranks and waited for them (each said its line)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:  # before the agent's handlers were in place: no rank had started
        tell("fxconvert.train: error: interrupted")
        return EXIT_INTERRUPTED
    finally:  # the agent leaves its handlers in place, which raise outside it
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def _failed(exits: dict[int, int]) -> int:
    """The exit status for ranks that ended with `exits` (rank -> exit code, minus a signal's number), after
    one line for each rank a signal other than the launcher's SIGTERM killed: nothing else can speak for it."""
    for rank, code in sorted(exits.items()):
        if code < 0 and -code != signal.SIGTERM:
            tell(f"fxconvert.train: error: rank {rank} was killed by {_signal_name(-code)} (by hand, or out of "
                 f"memory); --resume continues from the last checkpoint")
    codes = set(exits.values())
    if 2 in codes:  # a rank refused its options or data (the others, stopped, exit 130)
        return 2
    if codes <= {EXIT_INTERRUPTED, -signal.SIGTERM}:  # interrupted, not by this launcher
        return EXIT_INTERRUPTED
    return 1


def _signal_name(number: int) -> str:
    """SIGKILL, ...; "signal 40" for a real-time signal between SIGRTMIN and SIGRTMAX, which `signal.Signals` lacks."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
