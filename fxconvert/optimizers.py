"""`fxconvert.optimizers`: the optimizers a run can use, one record each: how to build it, and the bytes of
state it keeps per weight.

The memory plan (`fxconvert.balance`) and the trainer (`fxconvert.training.run`) read the same
record, so what the plan counts is what the trainer allocates. The state rules are torch's own
(read from `torch.optim`'s step functions, and checked against a real step in the tests):

- `sgd`: plain SGD, as the trainer runs it (no momentum): no state;
- `adamw`: `exp_avg` and `exp_avg_sq`, each the size and dtype of the weight, and a scalar `step`;
- `adafactor` (`torch.optim.Adafactor`): for a weight of two or more dimensions, factored second
  moments: `row_var` of shape (..., rows, 1) and `col_var` of shape (..., 1, cols); for a vector,
  a full `variance`; each in the weight's dtype, and a scalar float32 `step`. No first moment.

Imports only torch: a rank imports it.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fxconvert.errors import UsageError

_STEP_BYTES = 4  # the float32 scalar `step` that AdamW and Adafactor keep per weight


@dataclass(frozen=True)
class Optimizer:
    """One optimizer: its name, how to build it, and its state bytes for a weight of a shape and element size."""

    name: str
    build: Callable  # (params, *, lr, weight_decay) -> torch.optim.Optimizer
    state_bytes: Callable[[tuple[int, ...], int], int]  # (shape, element size) -> bytes of state
    description: str

    def bytes_for(self, tensors) -> int:
        """Optimizer state of distinct tensors (a tensor listed twice counts once)."""
        seen = {id(t): t for t in tensors}
        return sum(self.state_bytes(tuple(t.shape), t.element_size()) for t in seen.values())


def _sgd_state(shape, size) -> int:
    return 0


def _adamw_state(shape, size) -> int:
    return 2 * math.prod(shape) * size + _STEP_BYTES


def _adafactor_state(shape, size) -> int:
    if len(shape) < 2:
        return math.prod(shape) * size + _STEP_BYTES
    *lead, rows, cols = shape
    return math.prod(lead) * (rows + cols) * size + _STEP_BYTES


def _build_sgd(params, *, lr, weight_decay=0.0):
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)


def _build_adamw(params, *, lr, weight_decay=0.0):
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _build_adafactor(params, *, lr, weight_decay=0.0):
    return torch.optim.Adafactor(params, lr=lr, weight_decay=weight_decay)


OPTIMIZERS = {
    "sgd": Optimizer("sgd", _build_sgd, _sgd_state, "plain SGD: no state"),
    "adamw": Optimizer("adamw", _build_adamw, _adamw_state, "AdamW: two moments the size of each weight"),
    "adafactor": Optimizer("adafactor", _build_adafactor, _adafactor_state,
                           "Adafactor: factored row and column second moments (torch.optim.Adafactor)"),
}
NAMES = tuple(OPTIMIZERS)


def get(name: str) -> Optimizer:
    if name not in OPTIMIZERS:
        raise UsageError(f"unknown optimizer {name!r}; use one of {', '.join(NAMES)}")
    return OPTIMIZERS[name]


__all__ = ["Optimizer", "OPTIMIZERS", "NAMES", "get"]
