"""`fxconvert.training.faults.check_finite`, in this process: what it flags and what it lets through."""

import pytest


@pytest.mark.parametrize("bad", [None, float("nan"), float("inf")])
def test_the_finite_check_flags_exactly_the_gradients_that_are_not_finite(bad, monkeypatch):
    """`faults.check_finite` sums each gradient first (a step's fast path): finite values whose sum overflows
    to inf are still finite, and a nan or inf anywhere still stops the run."""
    import torch
    import torch.distributed as dist

    from fxconvert.training import faults

    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: None)  # a world of one: nothing to reduce
    layer = torch.nn.Linear(4, 4)
    layer.weight.grad = torch.full((4, 4), 3e38)  # finite; its sum is inf
    layer.bias.grad = torch.zeros(4)
    if bad is None:
        faults.check_finite({0: layer}, None, 1, torch.device("cpu"))
        return
    layer.bias.grad[2] = bad
    with pytest.raises(faults.NonFiniteError, match="step 1: the gradient is not finite"):
        faults.check_finite({0: layer}, None, 1, torch.device("cpu"))
