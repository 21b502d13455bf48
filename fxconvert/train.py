"""`python -m fxconvert.train`: fine-tune a converted model with pipeline parallelism, launched by torchrun.

    torchrun --nproc-per-node 4 -m fxconvert.train conv/ --data train.jsonl --out run/ \\
        --steps 1000 --batch 32 --microbatches 8 --schedule 1f1b --lr 1e-4 --optimizer adamw

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
rank R (stage S, replica D): ...` (exit 1). A rank that dies breaks its neighbours'
connections at once, and one that hangs makes their next collective time out after
`--timeout`; torchrun then stops every other worker. Each line names the rank that failed
first, found with a heartbeat in torchrun's store (`fxconvert.training.heartbeat`).
"""

import os
import sys

from fxconvert.errors import UsageError
from fxconvert.training.config import Launch
from fxconvert.training.options import PROG, parse
from fxconvert.training.worker import run_training


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--self-check" in argv:
        from fxconvert.training.self_check import main as self_check  # a tiny model against eager transformers

        return self_check([a for a in argv if a != "--self-check"])
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    cfg = parse(argv)
    try:
        launch = Launch.from_env()
    except UsageError as e:
        print(f"{PROG.split()[-1]}: error: {e}", file=sys.stderr)
        return 2
    return run_training(cfg, launch)




if __name__ == "__main__":
    sys.exit(main())
