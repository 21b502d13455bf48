"""Check a conversion against the eager model it came from.

`validate(conversion)` runs the eager model and `conversion.module` on the same random
inputs, at two shapes, in eval and in train mode (dropout on, the same seed before each
run), backpropagates the same cotangent through both, and compares the output and the
gradient of every parameter. Converted parameters are matched to eager ones by tensor
identity (the converted module shares the eager parameters; a lifted shared weight is the
eager tied tensor). A check passes when the largest absolute difference is at most `atol`.

A model on the meta device has nothing to run: the result says validation was skipped.
"""

import math
from dataclasses import dataclass, field

import torch

from fxconvert.errors import ValidationError
from fxconvert.trace import INPUT_SPECS, forward_parameters

# (batch, encoder length, decoder length): two shapes, so that a size frozen into the graph shows.
SHAPES = ((2, 7, 5), (3, 4, 9))
MODES = ("eval", "train")


@dataclass
class TensorCheck:
    run: str  # e.g. "train 2x7/5": mode, batch x encoder length / decoder length
    tensor: str  # "output <name>" or "grad <eager parameter name>"
    max_diff: float | None  # None: neither side has a gradient
    ok: bool
    note: str = ""


@dataclass
class ValidationResult:
    atol: float
    seed: int
    checks: list[TensorCheck] = field(default_factory=list)
    skipped: str | None = None  # why nothing was run

    @property
    def passed(self) -> bool:
        return self.skipped is None and all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[TensorCheck]:
        return [c for c in self.checks if not c.ok]

    @property
    def max_diff(self) -> float:
        return max((c.max_diff for c in self.checks if c.max_diff is not None), default=0.0)

    def raise_if_failed(self) -> None:
        failures = self.failures
        if failures:
            worst = max(failures, key=lambda c: math.inf if c.max_diff is None else c.max_diff)
            diff = "" if worst.max_diff is None else f" differs by {worst.max_diff:.3g}"
            note = f" ({worst.note})" if worst.note else ""
            raise ValidationError(
                f"validation failed: {len(failures)} of {len(self.checks)} checked tensors exceed atol "
                f"{self.atol:g}; worst: {worst.tensor}{diff} in run '{worst.run}'{note}"
            )


def validate(conversion, *, atol: float = 1e-5, seed: int = 0, shapes=SHAPES) -> ValidationResult:
    """Compare `conversion.module` with `conversion.model` (see the module docstring)."""
    result = ValidationResult(atol=atol, seed=seed)
    model, module = conversion.model, conversion.module
    if model is None:
        result.skipped = "the conversion holds no eager model to compare with"
        return result
    if any(p.device.type == "meta" for p in model.parameters()):
        result.skipped = "the model is on the meta device: there is nothing to run"
        return result
    eager_names = {id(p): name for name, p in model.named_parameters()}
    converted_names = {}
    for name, p in module.named_parameters():
        if id(p) not in eager_names:
            result.checks.append(TensorCheck("all", f"param {name}", None, False,
                                             "no eager parameter is this tensor"))
        else:
            converted_names[name] = eager_names[id(p)]
    params = [p for _, p in model.named_parameters()] + [p for _, p in module.named_parameters()]
    dtype = next((p.dtype for p in params if p.is_floating_point()), torch.float32)
    was_training = (model.training, module.training)
    saved_grads = {id(p): (p, p.grad) for p in params}  # the caller's gradients are put back afterwards
    threads = torch.get_num_threads()
    # The validation shapes are tiny: with several intra-op threads on a busy machine, thread
    # hand-offs (not arithmetic) dominate and a 2 s check can take 40 s. One thread is steady.
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():  # the runs' seeding leaves the caller's random state as it was
            for batch, enc, dec in shapes:
                inputs = _random_inputs(conversion.input_names, model.config, batch, enc, dec, seed, dtype)
                for mode in MODES:
                    run = f"{mode} {batch}x{enc}/{dec}"
                    model.train(mode == "train")
                    module.train(mode == "train")
                    ref, ref_grads = _run(lambda: _eager_output(model, inputs, conversion.output_name),
                                          model.named_parameters(), params, seed)
                    out, out_grads = _run(lambda: module(**inputs), module.named_parameters(), params, seed)
                    result.checks.append(_compare(run, f"output {conversion.output_name}", ref, out, atol))
                    out_grads = {converted_names[n]: g for n, g in out_grads.items() if n in converted_names}
                    for name in ref_grads:
                        result.checks.append(
                            _compare(run, f"grad {name}", ref_grads[name], out_grads.get(name), atol))
    finally:
        torch.set_num_threads(threads)
        model.train(was_training[0])
        module.train(was_training[1])
        for p, grad in saved_grads.values():
            p.grad = grad
    return result


def _run(forward, named_parameters, all_params, seed):
    """Output and parameter gradients of one forward/backward, with the RNG seeded first."""
    for p in all_params:
        p.grad = None  # the next backward allocates fresh gradients: no copies needed
    torch.manual_seed(seed)
    out = forward()
    if out.requires_grad:
        generator = torch.Generator().manual_seed(seed + 1)
        cotangent = torch.randn(out.shape, generator=generator, dtype=out.dtype)
        out.backward(cotangent)
    return out.detach(), {name: p.grad for name, p in named_parameters}


def _eager_output(model, inputs, output_name):
    kwargs = dict(inputs)
    if "use_cache" in forward_parameters(model):
        kwargs["use_cache"] = False
    outputs = model(**kwargs, return_dict=True)
    return outputs[output_name]


def _compare(run, tensor, ref, out, atol) -> TensorCheck:
    if ref is None and out is None:
        return TensorCheck(run, tensor, None, True, "no gradient on either side")
    if ref is None or out is None:
        which = "the eager model" if ref is None else "the converted module"
        return TensorCheck(run, tensor, None, False, f"no gradient in {which}")
    if ref.shape != out.shape:
        return TensorCheck(run, tensor, None, False, f"shape {tuple(out.shape)}, eager {tuple(ref.shape)}")
    if torch.equal(ref, out):
        return TensorCheck(run, tensor, 0.0, True)
    worst = (ref.float() - out.float()).abs().max().item() if ref.numel() else 0.0
    if math.isnan(worst):  # NaN where both are NaN is agreement; anywhere else it is an infinite difference
        nan_ref, nan_out = torch.isnan(ref), torch.isnan(out)
        diff = (ref.float() - out.float()).abs().masked_fill(nan_ref & nan_out, 0.0)
        worst = math.inf if (nan_ref != nan_out).any() else diff.max().item()
    return TensorCheck(run, tensor, worst, worst <= atol)


def _random_inputs(names, config, batch, enc, dec, seed, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Random inputs for `names`: token ids, masks that pad the first sequence, labels with an ignored one."""
    generator = torch.Generator().manual_seed(seed)
    lengths = {"encoder": enc, "decoder": dec}
    out = {}
    for name in names:
        kind, seq = INPUT_SPECS[name]
        length = lengths[seq]
        if kind == "ids":
            ids = torch.randint(0, config.vocab_size, (batch, length), generator=generator)
            if name == "labels" and length > 1:
                ids[-1, -1] = -100
            out[name] = ids
        elif kind == "mask":
            mask = torch.ones(batch, length, dtype=torch.long)
            mask[0, max(1, length - 2):] = 0
            out[name] = mask
        else:
            out[name] = torch.randn(batch, length, config.d_model, generator=generator, dtype=dtype)
    return out
