"""The command line of `python -m fxconvert.train`, parsed once into a `TrainConfig`."""

import argparse
from dataclasses import fields

from fxconvert import families
from fxconvert.training.config import DEFAULTS, DTYPES, OPTIMIZERS, STEPS, TrainConfig
from fxconvert.training.lr_schedule import SCHEDULES as LR_SCHEDULES
from fxconvert.training.recompute import MODES
from fxconvert.training.schedules import SCHEDULES

PROG = "python -m fxconvert.train"


def build_parser() -> argparse.ArgumentParser:
    trained = ", ".join(f.title.split(" (")[0] for f in families.all_families() if f.objective is not None)
    p = argparse.ArgumentParser(prog=PROG, description=f"fine-tune a converted model ({trained}) with pipeline "
                                                       f"parallelism, launched by torchrun or by --nproc-per-node.")
    p.set_defaults(**{k: v for k, v in DEFAULTS.items() if k != "tie_gradients"})
    p.add_argument("source", metavar="SOURCE",
                   help="a conversion directory written with --stages N, or a name fxconvert accepts")
    p.add_argument("--data", required=True, metavar="FILE.jsonl",
                   help='one {"input": str, "target": str} or {"input_ids": [...], "labels": [...]} per line (a '
                        'sequence classifier: "label": int in place of the target or labels)')
    p.add_argument("--out", required=True, metavar="RUN", help="run directory: metrics.jsonl, checkpoints/, hf/")
    p.add_argument("--steps", type=int, help=f"optimizer steps (default {STEPS})")
    p.add_argument("--epochs", type=int, metavar="E", help="instead of --steps: the steps that go through --data "
                   "E times (a line per epoch)")
    p.add_argument("--batch", type=int, help=f"examples per batch and replica (default {DEFAULTS['batch']})")
    p.add_argument("--grad-accum", type=int, metavar="K", help="batches per optimizer step, their gradients "
                   "averaged (default 1)")
    p.add_argument("--microbatches", type=int, help="microbatches per batch (default: the stages)")
    p.add_argument("--schedule", choices=SCHEDULES)
    p.add_argument("--virtual-stages", type=int, metavar="V",
                   help="stages per pipeline rank (V > 1: interleaved-1f1b, zb-interleaved; V = 2: zbv, dualpipev)")
    p.add_argument("--dp", type=int, metavar="R", help="data-parallel replicas of the pipeline")
    p.add_argument("--lr", type=float)
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, help="the learning rate after warmup: constant (default), "
                   "linear decay to --min-lr, or cosine decay to --min-lr (transformers' curves)")
    p.add_argument("--warmup-steps", type=int, metavar="N", help="steps of linear warmup from 0 to --lr (default 0)")
    p.add_argument("--warmup-ratio", type=float, metavar="R", help="warmup as a share of the steps (ceil(R x steps))")
    p.add_argument("--min-lr", type=float, help="where linear and cosine decay end (default 0)")
    p.add_argument("--optimizer", choices=OPTIMIZERS,
                   help="default: the one SOURCE's plan counted (pipeline.json), else adamw")
    p.add_argument("--weight-decay", type=float, help="the optimizer's weight decay (default 0)")
    p.add_argument("--zero", action="store_true",
                   help="shard the optimizer state over each stage's --dp replicas (ZeroRedundancyOptimizer)")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="bfloat16: bf16 autocast, float32 weights and optimizer state")
    p.add_argument("--recompute", choices=MODES, help="recompute activations in backward instead of keeping them: "
                   "none, full (every block) or auto (the blocks the conversion's plan chose; default)")
    p.add_argument("--compile", action="store_true", help="torch.compile(fullgraph=True) each stage (compiles at "
                   "the first step of each batch shape; not with zero-bubble schedules or recompute)")
    p.add_argument("--max-grad-norm", type=float, help="clip by the whole model's gradient norm")
    p.add_argument("--save-every", type=int, metavar="K", help="checkpoint every K steps")
    p.add_argument("--keep-last", type=int, metavar="N", help="keep the newest N complete checkpoints (and with "
                   "--save-best the best), remove older ones fxconvert wrote")
    p.add_argument("--eval-data", metavar="FILE.jsonl", help="held-out lines (as --data): their loss, forward only, "
                   "as eval_loss in metrics.jsonl at the end and every --eval-every steps")
    p.add_argument("--eval-every", type=int, metavar="K", help="evaluate every K steps (default: at the end only)")
    p.add_argument("--eval-batch", type=int, metavar="B", help="examples per eval batch (default: --batch)")
    p.add_argument("--save-best", action="store_true", help="name the checkpoint with the lowest eval loss in "
                   "RUN/checkpoints/best.json and keep it through --keep-last")
    p.add_argument("--resume", action="store_true", help="continue RUN from its latest complete checkpoint")
    p.add_argument("--shuffle", action="store_true", help="a seeded permutation of the data per epoch")
    p.add_argument("--seed", type=int, help="data order, dropout, and random weights of a preset")
    p.add_argument("--max-source-length", type=int)
    p.add_argument("--max-target-length", type=int)
    p.add_argument("--timeout", type=float, metavar="SECONDS",
                   help=f"how long a rank waits for the others before failing (default {DEFAULTS['timeout']:g})")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--offline", action="store_true", help="never contact the Hugging Face Hub for SOURCE")
    p.add_argument("--allow-random", action="store_true", help="when SOURCE resolves to no weights (a preset, a "
                   "config), train from random weights instead of refusing")
    p.add_argument("--no-export", action="store_true", help="do not write RUN/hf at the end")
    p.add_argument("--measure-memory", action="store_true", help="measure each rank's peak memory in one step "
                   "(the second) and write it to RUN/metrics.jsonl beside the plan's prediction")
    p.add_argument("--tensorboard", metavar="DIR", help="also write the metrics as TensorBoard scalars into DIR "
                   "(pip install 'fxconvert[tensorboard]')")
    p.add_argument("--nproc-per-node", type=int, metavar="P", help="start P ranks on this machine (torch's "
                   "elastic launcher, as torchrun does) and print only their one-line errors; for several "
                   "machines, launch with torchrun")
    p.add_argument("-v", "--verbose", action="store_true", help="print a failing rank's traceback before its line")
    return p


def parse(argv) -> TrainConfig:
    """The options of `argv` (argparse exits 2 with its usage on a bad one)."""
    args = build_parser().parse_args(argv)
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)})
