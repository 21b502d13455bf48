"""The learning rate over a run: `--lr-schedule constant|linear|cosine`, `--warmup-steps`/`--warmup-ratio`, `--min-lr`.

One `torch.optim.lr_scheduler.LambdaLR` per optimizer, stepped after each optimizer step, so
step s (0-based) trains at `--lr * factor(s)`. The factors are the Hugging Face ones, so a
recipe written for the Trainer means the same here:

- warmup (every schedule): s / warmup for s < warmup (the first step at 0, as transformers);
- constant: 1 (`get_constant_schedule_with_warmup`);
- linear: (steps - s) / (steps - warmup) (`get_linear_schedule_with_warmup`);
- cosine: 0.5 * (1 + cos(pi * progress)), progress = (s - warmup) / (steps - warmup)
  (`get_cosine_schedule_with_warmup`).

`--min-lr` lifts the decay's floor: a decay factor f becomes f * (1 - m) + m with m = min-lr / lr
(transformers' `get_cosine_with_min_lr_schedule_with_warmup` does the same); 0 leaves f as it is.
`--warmup-ratio r` is ceil(r * steps) warmup steps, as the Trainer counts them.

The scheduler's state is saved beside its optimizer's (`fxconvert.training.run.save`). A
resumed run builds its scheduler at the checkpoint's step from its own options (`build`):
the rate is a function of the options and the step alone, so with the same options it trains
at the uninterrupted run's rates, bit for bit, and with another --lr or schedule (which a
resume names) it follows the new curve from that step on.
"""

import math
from functools import partial

import torch

from fxconvert.errors import UsageError

SCHEDULES = ("constant", "linear", "cosine")


def warmup_steps(cfg) -> int:
    """The run's warmup in optimizer steps (`cfg.steps` known)."""
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    return math.ceil(cfg.warmup_ratio * cfg.steps) if cfg.warmup_ratio is not None else 0


def factor(step: int, *, schedule: str, warmup: int, steps: int, min_ratio: float) -> float:
    """The multiple of `--lr` that 0-based optimizer step `step` trains at (the module docstring's curves)."""
    if step < warmup:
        return float(step) / float(max(1, warmup))
    if schedule == "constant":
        return 1.0
    progress = float(step - warmup) / float(max(1, steps - warmup))
    if schedule == "linear":
        decay = max(0.0, float(steps - step) / float(max(1, steps - warmup)))
    else:
        decay = max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(0.5) * 2.0 * progress)))
    return max(0.0, decay * (1 - min_ratio) + min_ratio)


def build(cfg, optimizer: torch.optim.Optimizer, *, step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """The scheduler of one stage's optimizer, at 0-based step `step` (a resume's: its optimizer state loaded);
    it sets that step's rate, from this run's options: a resume may change them (`checkpoint.RESUME_MAY_CHANGE`)."""
    curve = partial(factor, schedule=cfg.lr_schedule, warmup=warmup_steps(cfg), steps=cfg.steps,
                    min_ratio=cfg.min_lr / cfg.lr)
    if step:
        for group in optimizer.param_groups:  # the checkpoint's --lr otherwise
            group["initial_lr"] = cfg.lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, curve, last_epoch=step - 1)


def check_options(cfg) -> None:
    """The schedule's options on their own (one line each)."""
    if cfg.warmup_steps is not None and cfg.warmup_ratio is not None:
        raise UsageError(f"--warmup-steps {cfg.warmup_steps} and --warmup-ratio {cfg.warmup_ratio:g} both set the "
                         f"warmup; give one")
    if cfg.warmup_steps is not None and cfg.warmup_steps < 0:
        raise UsageError(f"--warmup-steps must be 0 or more, got {cfg.warmup_steps}")
    if cfg.warmup_ratio is not None and not (math.isfinite(cfg.warmup_ratio) and 0 <= cfg.warmup_ratio <= 1):
        raise UsageError(f"--warmup-ratio must be a number from 0 to 1 (a share of the steps), got {cfg.warmup_ratio}")
    if not (math.isfinite(cfg.min_lr) and cfg.min_lr >= 0):
        raise UsageError(f"--min-lr must be a non-negative number, got {cfg.min_lr}")
    if cfg.min_lr > 0 and cfg.lr_schedule == "constant":
        raise UsageError("--min-lr is the floor of a decay, and --lr-schedule constant does not decay; pass "
                         "--lr-schedule linear or cosine, or drop --min-lr")
    if math.isfinite(cfg.lr) and cfg.min_lr > cfg.lr:
        raise UsageError(f"--min-lr {cfg.min_lr:g} is above --lr {cfg.lr:g}; the decay ends at --min-lr, so give "
                         f"one at most --lr")


def check_steps(cfg) -> None:
    """The warmup against the run's length (`cfg.steps` known: given, or made of --epochs)."""
    if cfg.warmup_steps is not None and cfg.warmup_steps > cfg.steps:
        raise UsageError(f"--warmup-steps {cfg.warmup_steps} is more than the run's {cfg.steps} steps; give at most "
                         f"{cfg.steps} (or --warmup-ratio)")


__all__ = ["SCHEDULES", "warmup_steps", "factor", "build", "check_options", "check_steps"]
