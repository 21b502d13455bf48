"""`python -m fxconvert.train`: fine-tune a converted model with pipeline parallelism.

    python -m fxconvert.train --nproc-per-node 4 conv/ --data train.jsonl --out run/ \\
        --steps 1000 --batch 32 --microbatches 8 --schedule 1f1b --lr 1e-4 --optimizer adamw

`--nproc-per-node P` starts the ranks of one machine through torch's elastic launcher
(`fxconvert.training.launcher`); `torchrun --nproc-per-node 4 -m fxconvert.train ...` starts the same
ranks, and is what launches a run over several machines.

SOURCE is a conversion written with `python -m fxconvert CKPT --stages N` (each rank
imports its own `stage_<i>.py` and reads only that stage's tensors, so no rank ever holds
the whole model), or any name `fxconvert` accepts, which every rank then converts and
splits the same way (each rank holds the whole model while it converts).

The training side lives in `fxconvert.training` (its modules are named by the data path);
this module is its entry point. How a run is laid out (see `fxconvert.training.grad_sync`
for the ranks):

- world size = pipeline ranks x `--dp`; stages = pipeline ranks x `--virtual-stages`;
  stage i runs on pipeline rank i % pipeline ranks. The rendezvous is torchrun's env://
  (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so multi-machine launches work unchanged;
  gloo on CPU, nccl on CUDA.
- Data (`fxconvert.training.data`): replica r at step s trains on global batch s*dp + r; every rank
  checks the file, then the ranks whose stages read tokens read its replica's batch lines
  (`fxconvert.training.dataset`); `torch.distributed.pipelining` splits it
  into `--microbatches` equal microbatches. A batch is padded to its own longest sequences,
  so shapes change between steps; a pipeline stage fixes its buffers at its first step,
  so each rank keeps one `PipelineStage` + schedule per shape (a few, least recently used
  dropped), built the same way on every rank of the replica.
- Loss: the last stage returns the converted graph's loss (transformers' own: the mean
  over that microbatch's target tokens), the schedule's `loss_fn` passes it through, and
  the schedule divides the accumulated gradients by the number of microbatches
  (`scale_grads=True`): a step's objective is the mean of the microbatch losses, as in
  eager gradient accumulation. The loss reported per step is that mean (over replicas too).
- Tied weights, replicas and `--max-grad-norm`: `fxconvert.training.grad_sync`.
- `--optimizer` (default: the conversion's plan's, else adamw) and `--zero` (the optimizer state
  sharded over each stage's replicas): `fxconvert.training.optim`.
- `--dtype bfloat16`: each stage's forward runs under `torch.autocast(bfloat16)`; the
  weights, their gradients and the optimizer state stay float32 (master weights), and
  the values sent between stages are float32, as torch's stage buffers are fixed by a
  metadata pass that autocast does not see.
- Checkpoints (`fxconvert.training.checkpoint`) every `--save-every` steps, with every rank's RNG
  state; `--resume` continues from the latest complete one. Everything that decides a step
  (weights, optimizer state, the batch index, RNG) is restored, so a resumed run repeats
  the uninterrupted run's losses and weights bit for bit (float32 on CPU).
- Output: `RUN/hf/` (`fxconvert.export.export_hf`: a sharded transformers checkpoint written
  stage by stage) and `RUN/metrics.jsonl` (one line per step).

Errors: a bad option, SOURCE or data line is found by every rank alike before any process
group or file exists, and printed once per machine as one line (exit 2, or 1 for a
failure). A failure during training is printed by each rank as `fxconvert.train: error:
rank R (stage S, replica D): ...` (exit 1), in one write (ranks sharing a terminal never
glue their lines). A rank that dies breaks its neighbours'
connections at once, and one that hangs makes their next collective time out after
`--timeout`; torchrun then stops every other worker. Each line names the rank that failed
first, found with a heartbeat in torchrun's store (`fxconvert.training.heartbeat`).
"""

import os
import signal
import sys
import threading


def main(argv=None) -> int:
    program = _program() if argv is None else ["-m", "fxconvert.train"]
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--self-check" in argv:
        from fxconvert.training.self_check import main as self_check  # a tiny model against eager transformers

        return self_check([a for a in argv if a != "--self-check"])
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if _says_start_up(argv):  # the imports below take seconds: say so at once
        print("importing torch ...", file=sys.stderr, flush=True)
    with _held_signals() as held:  # torch's import takes seconds, and Ctrl-C in it was a KeyboardInterrupt traceback
        from fxconvert.errors import UsageError
        from fxconvert.training.config import Launch
        from fxconvert.training.faults import EXIT_INTERRUPTED, tell
        from fxconvert.training.launcher import launch as launch_ranks, launched
        from fxconvert.training.options import parse
        from fxconvert.training.worker import run_training

        cfg = parse(argv)
        if cfg.nproc_per_node is None or launched():
            try:
                launch = Launch.from_env()
            except UsageError as e:
                print(f"fxconvert.train: error: {e}", file=sys.stderr)
                return 2
            # the run's own handlers take over (`faults.Signals`), with any signal held so far
            return run_training(cfg, launch, received=held[0] if held else None)
    if held:  # interrupted before any rank started
        tell("fxconvert.train: error: interrupted")
        return EXIT_INTERRUPTED
    return launch_ranks(cfg, program, argv)


def _says_start_up(argv: list[str]) -> bool:
    """Whether this process tells a terminal what start-up does (`run.say(startup=True)`'s rule, before the imports
    that define it): the first rank of torchrun, or the process of `--nproc-per-node`, not the ranks it starts."""
    launched = os.environ.get("FXCONVERT_TRAIN_LAUNCHED") == "1"  # `fxconvert.training.launcher.LAUNCHED`
    return (sys.stderr.isatty() and os.environ.get("RANK", "0") == "0" and not launched
            and not {"-h", "--help"} & set(argv))


def _program() -> list[str]:
    """What each rank of `--nproc-per-node` runs after `python`: this program again (`-m fxconvert.train`, or
    the script that called `main`)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return ["-u", "-m", spec.name]  # -u: unbuffered, as torchrun starts its workers
    return ["-u", os.path.abspath(sys.argv[0])]


class _held_signals:
    """Record SIGINT and SIGTERM instead of acting on them (the list holds them), then put the handlers back.

    A signal that is ignored (nohup, a background job) stays ignored; outside the main thread this does nothing.
    """

    def __enter__(self) -> list:
        self.held, self.previous = [], {}
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(s) is not signal.SIG_IGN:
                    self.previous[s] = signal.signal(s, lambda signum, frame: self.held.append(signum))
        return self.held

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
