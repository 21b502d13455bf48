"""What a run is told: `TrainConfig` (the options, parsed once), `Launch` (torchrun's environment) and their checks.

`TrainConfig` is frozen: `check_options` returns a new one with the defaults that depend on
the launch filled in (`microbatches`), together with the layout (`grad_sync.Topology`).
"""

import math
import os
from dataclasses import dataclass, fields, replace

import torch

from fxconvert import optimizers
from fxconvert.errors import FxConvertError, UsageError
from fxconvert.training import compiled, evaluate, lr_schedule
from fxconvert.training.grad_sync import Topology
from fxconvert.training.model import check_source_stages
from fxconvert.training.schedules import SCHEDULES, STAGES_PER_RANK, V_PLACED

OPTIMIZERS = optimizers.NAMES
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Outside these, a value passed the checks and failed later without naming its option: a timeout
# under a second times out the rendezvous itself, one over a year overflows torch's timedelta to
# milliseconds, and a learning rate over 1000 only makes weights inf (no optimizer here needs one).
TIMEOUT_RANGE = (1.0, 365 * 24 * 3600.0)
MAX_LR = 1000.0
STEPS = 100  # without --steps or --epochs


class TrainError(FxConvertError):
    """Training failed (a rank died, a collective timed out, a step produced no loss)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    """Every option of a run (`options.build_parser` takes its defaults from here)."""

    source: str
    data: str
    out: str
    steps: int | None = None  # None: STEPS, or what --epochs makes of the data (`with_steps`)
    epochs: int | None = None
    batch: int = 8
    grad_accum: int = 1  # batches per optimizer step
    microbatches: int | None = None  # None: one per stage (`check_options` fills it in)
    schedule: str = "1f1b"
    virtual_stages: int = 1
    dp: int = 1
    lr: float = 1e-4
    lr_schedule: str = "constant"  # `fxconvert.training.lr_schedule.SCHEDULES`
    warmup_steps: int | None = None
    warmup_ratio: float | None = None
    min_lr: float = 0.0
    optimizer: str | None = None  # None: the plan's, else adamw (`optim.choose`, in `run.prepare`)
    weight_decay: float = 0.0
    zero: bool = False
    dtype: str = "float32"
    recompute: str = "auto"  # `fxconvert.training.recompute.MODES`
    max_grad_norm: float | None = None
    save_every: int | None = None
    eval_data: str | None = None  # `fxconvert.training.evaluate`: the eval loss over this file
    eval_every: int | None = None  # None: evaluate once, at the end
    eval_batch: int | None = None  # None: --batch
    save_best: bool = False  # `fxconvert.training.retention`: checkpoints/best.json names the lowest eval loss's
    keep_last: int | None = None  # keep the newest N complete checkpoints (and the best), remove older ones
    resume: bool = False
    shuffle: bool = False
    seed: int = 0
    max_source_length: int | None = None
    max_target_length: int | None = None
    timeout: float = 300.0
    device: str | None = None
    offline: bool = False
    allow_random: bool = False
    no_export: bool = False
    verbose: bool = False
    measure_memory: bool = False  # `fxconvert.training.memory`: one step's peak per rank, into metrics.jsonl
    compile: bool = False  # `fxconvert.training.compiled`: each stage torch.compile(fullgraph=True)
    tensorboard: str | None = None  # `fxconvert.training.tensorboard`: the metrics as TensorBoard scalars there
    nproc_per_node: int | None = None  # `fxconvert.training.launcher`: start this many ranks here
    # Sum the gradients of a weight's copies on several stages (`grad_sync`). Only the self-check's
    # control run turns it off, to show what plain pipelining does; no option sets it.
    tie_gradients: bool = True

    @property
    def autocast(self) -> torch.dtype | None:
        return DTYPES[self.dtype] if self.dtype != "float32" else None

    @property
    def examples_per_step(self) -> int:
        """Examples one optimizer step trains on, over every replica and accumulated batch."""
        return self.batch * self.dp * self.grad_accum


DEFAULTS = {f.name: f.default for f in fields(TrainConfig) if f.name not in ("source", "data", "out")}


@dataclass(frozen=True)
class Launch:
    """What torchrun (or the environment) says about this process."""

    rank: int
    world_size: int
    local_rank: int

    @classmethod
    def from_env(cls) -> "Launch":
        def number(name, default):
            value = os.environ.get(name, default)
            try:
                return int(value)
            except ValueError:
                raise UsageError(f"{name}={value!r} is not an integer; launch with torchrun") from None

        launch = cls(number("RANK", "0"), number("WORLD_SIZE", "1"), number("LOCAL_RANK", "0"))
        if not 0 <= launch.rank < launch.world_size:
            raise UsageError(f"RANK {launch.rank} is not below WORLD_SIZE {launch.world_size}; launch with torchrun")
        return launch


def check_options(cfg: TrainConfig, launch: Launch) -> tuple[TrainConfig, Topology]:
    """Every check of the options (and of a conversion's stage count, which they depend on); the same on
    every rank. Returns the config with `microbatches` filled in, and the layout (without groups)."""
    if cfg.epochs is not None and cfg.steps is not None:
        raise UsageError(f"--epochs {cfg.epochs} and --steps {cfg.steps} both say how long to train; give one")
    if cfg.epochs is None and cfg.steps is None:
        cfg = replace(cfg, steps=STEPS)
    _check_numbers(cfg)
    if cfg.zero and cfg.dp < 2:
        raise UsageError(f"--zero shards the optimizer state over the --dp replicas, but --dp is {cfg.dp}: nothing "
                         f"to shard; drop --zero or train with --dp 2 or more")
    lr_schedule.check_options(cfg)
    evaluate.check_options(cfg)
    if cfg.steps is not None:
        lr_schedule.check_steps(cfg)
    if cfg.measure_memory and cfg.steps is not None and cfg.steps < 2:
        raise UsageError(f"--measure-memory measures a run's second step (the first makes the optimizer state), "
                         f"but --steps is {cfg.steps}; use --steps 2 or more")
    if launch.world_size % cfg.dp:
        raise UsageError(f"{launch.world_size} processes do not split into --dp {cfg.dp} replicas; launch a "
                         f"multiple of {cfg.dp} processes (pipeline ranks x replicas)")
    _check_stages_per_rank(cfg)
    compiled.check(cfg, SCHEDULES[cfg.schedule])
    topo = Topology(world_size=launch.world_size, dp=cfg.dp, virtual_stages=cfg.virtual_stages,
                    shared_stages={}, rank=launch.rank, v_placement=cfg.schedule in V_PLACED)
    check_source_stages(cfg.source, topo)  # before the microbatch checks, which depend on the stage count
    if cfg.microbatches is None:
        cfg = replace(cfg, microbatches=topo.num_stages)
    _check_microbatches(cfg, topo)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but CUDA is not available; use --device cpu")
    return cfg, topo


def _check_numbers(cfg: TrainConfig) -> None:
    """Counts at least 1, rates and limits positive and finite, each within its range."""
    positive = {"--batch": cfg.batch, "--grad-accum": cfg.grad_accum, "--virtual-stages": cfg.virtual_stages,
                "--dp": cfg.dp}
    for option, value in (("--steps", cfg.steps), ("--epochs", cfg.epochs), ("--microbatches", cfg.microbatches),
                          ("--save-every", cfg.save_every), ("--eval-every", cfg.eval_every),
                          ("--eval-batch", cfg.eval_batch), ("--keep-last", cfg.keep_last)):
        if value is not None:
            positive[option] = value
    for option, value in positive.items():
        if value < 1:
            raise UsageError(f"{option} must be at least 1, got {value}")
    for option, value in (("--lr", cfg.lr), ("--timeout", cfg.timeout), ("--max-grad-norm", cfg.max_grad_norm)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UsageError(f"{option} must be a positive number, got {value}")
    if cfg.lr > MAX_LR:
        raise UsageError(f"--lr must be at most {MAX_LR:g}, got {cfg.lr:g}")
    if not TIMEOUT_RANGE[0] <= cfg.timeout <= TIMEOUT_RANGE[1]:
        raise UsageError(f"--timeout must be from {TIMEOUT_RANGE[0]:.0f} to {TIMEOUT_RANGE[1]:.0f} seconds (a year), "
                         f"got {cfg.timeout:g}")
    if not 0 <= cfg.seed < 2**63 // 1000 - 1000:
        raise UsageError(f"--seed must be an integer from 0 to {2**63 // 1000 - 1001}, got {cfg.seed}")
    if not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):
        raise UsageError(f"--weight-decay must be a non-negative number, got {cfg.weight_decay}")


def _check_stages_per_rank(cfg: TrainConfig) -> None:
    """--virtual-stages as the schedule runs stages per rank (`schedules.STAGES_PER_RANK`)."""
    fewest, most = STAGES_PER_RANK[cfg.schedule]
    if cfg.virtual_stages > 1 and most == 1:
        several = ", ".join(n for n, (low, _) in STAGES_PER_RANK.items() if low > 1)
        raise UsageError(f"--virtual-stages {cfg.virtual_stages} needs a schedule that runs several stages per "
                         f"rank: --schedule {several}")
    if cfg.virtual_stages < fewest or (most is not None and cfg.virtual_stages > most):
        wanted = f"{fewest}" if fewest == most else f"{fewest} or more"
        raise UsageError(f"--schedule {cfg.schedule} needs --virtual-stages {wanted} (stages per rank), got "
                         f"{cfg.virtual_stages}")


def _check_microbatches(cfg: TrainConfig, topo: Topology) -> None:
    """--microbatches against --batch, the stage count and the schedule."""
    m, stages, pipeline_ranks = cfg.microbatches, topo.num_stages, topo.pipeline_ranks
    if cfg.batch % m:
        raise UsageError(f"--batch {cfg.batch} does not split into {m} equal microbatches; "
                         f"make --batch a multiple of --microbatches")
    if cfg.schedule in ("1f1b", "dualpipev") and m < stages:
        raise UsageError(f"--schedule {cfg.schedule} needs at least as many microbatches as stages ({m} < {stages}); "
                         f"raise --microbatches to {stages} or more")
    if cfg.schedule in ("interleaved-1f1b", "zb-interleaved"):
        rounds = max(1, m // pipeline_ranks)
        if m % rounds:
            raise UsageError(f"--schedule {cfg.schedule} needs --microbatches to be a multiple of "
                             f"{rounds} with {pipeline_ranks} pipeline ranks; use e.g. {pipeline_ranks * rounds}")


def with_steps(cfg: TrainConfig, examples: int) -> TrainConfig:
    """`cfg` with `steps` filled in from `--epochs` once the data's size is known: enough optimizer steps to
    go through the file `epochs` times (the last step may run into the next epoch: batches have one size)."""
    if cfg.steps is not None:
        return cfg
    cfg = replace(cfg, steps=-(-cfg.epochs * examples // cfg.examples_per_step))
    lr_schedule.check_steps(cfg)
    if cfg.measure_memory and cfg.steps < 2:
        raise UsageError(f"--measure-memory measures a run's second step, but --epochs {cfg.epochs} is "
                         f"{cfg.steps} step of {examples} examples; raise --epochs")
    return cfg
