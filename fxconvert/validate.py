"""Check a conversion against the eager model it came from.

`validate(conversion)` runs the eager model and `conversion.module` on the same random
inputs, at two shapes, in eval and in train mode (dropout on, the same seed before each
run), backpropagates the same cotangent through both, and compares the output and the
gradient of every parameter. Converted parameters are matched to eager ones by tensor
identity (the converted module shares the eager parameters; a lifted shared weight is the
eager tied tensor). Inputs the kept output does not read (`Conversion.dropped_inputs`) are
given to the eager model only.

The tolerance follows the model's dtype, as exporters that validate do: eager and the
converted module run the same ops in the same dtype, but not always in the same order
(sparse row gradients are added into a dense one, for instance), so they differ by
rounding, which is relative to the values' size and to the dtype's precision. The defaults
are `torch.testing.assert_close`'s (`TOLERANCES`), for the least precise floating dtype
among the parameters (fp16 weights with T5's `wo` kept in fp32 use the fp16 rule):

- an output passes when, elementwise, |converted - eager| <= atol + rtol * |eager|;
- a gradient passes when |converted - eager| <= atol + rtol * max|eager| over the tensor.
  A gradient is a sum over every use of the parameter; the rounding error of a sum is
  relative to the size of its terms, not of the result, so an element whose terms cancel
  can legitimately differ by more than rtol times itself. The tensor's largest magnitude
  bounds the terms' size. (bf16 T5 measures it: the tied embedding's gradient differs by
  2% of an element, 0.24% of the tensor's largest.)

`atol` and `rtol` given to `validate` replace those terms. The rule used is stated in
`ValidationResult.rule`.

A non-finite value (NaN or inf) in an output or a gradient, on either side, fails: two NaN
that agree prove nothing. The inputs built here never produce a legitimate one (labels are
never all ignored, masks never hide a whole row).

A model on the meta device has nothing to run: the result says validation was skipped.
"""

import math
from dataclasses import dataclass, field

import torch

from fxconvert.errors import ValidationError
from fxconvert.inputs import build_inputs, config_sizes
from fxconvert.trace import family_of, forward_parameters

# (batch, encoder length, decoder length): two shapes, so that a size frozen into the graph shows.
SHAPES = ((2, 7, 5), (3, 4, 9))
MODES = ("eval", "train")
# dtype -> (atol, rtol): torch.testing.assert_close's defaults. Other dtypes use float32's.
TOLERANCES = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1e-5, 1.3e-6),
    torch.float16: (1e-5, 1e-3),
    torch.bfloat16: (1e-5, 1.6e-2),
}
NON_FINITE_HINT = "NaN or inf weights in the checkpoint are the usual cause (look with torch.isfinite)"


@dataclass
class TensorCheck:
    run: str  # e.g. "train 2x7/5": mode, batch x encoder length / decoder length
    tensor: str  # "output <name>" or "grad <eager parameter name>"
    max_diff: float | None  # None: neither side has a gradient, or a value is not finite
    ok: bool
    note: str = ""
    finite: bool = True  # False: NaN or inf on either side


@dataclass
class ValidationResult:
    atol: float | None
    seed: int
    checks: list[TensorCheck] = field(default_factory=list)
    skipped: str | None = None  # why nothing was run
    rtol: float | None = None
    dtype: str = ""  # the dtype whose defaults applied
    rule: str = ""  # the pass criterion, in words

    @property
    def passed(self) -> bool:
        return self.skipped is None and all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[TensorCheck]:
        return [c for c in self.checks if not c.ok]

    @property
    def max_diff(self) -> float:
        return max((c.max_diff for c in self.checks if c.max_diff is not None), default=0.0)

    @property
    def tolerance(self) -> str:
        """The tolerance in a few words, e.g. "bfloat16: atol 1e-05, rtol 0.016"."""
        return f"{self.dtype + ': ' if self.dtype else ''}atol {self.atol:g}, rtol {self.rtol or 0:g}"

    def raise_if_failed(self) -> None:
        failures = self.failures
        if not failures:
            return
        non_finite = [c for c in failures if not c.finite]
        if non_finite:
            first = non_finite[0]
            raise ValidationError(
                f"validation failed: {first.tensor} in run '{first.run}' is {first.note} "
                f"({len(non_finite)} of {len(self.checks)} checked tensors are not finite); {NON_FINITE_HINT}"
            )
        worst = max(failures, key=lambda c: math.inf if c.max_diff is None else c.max_diff)
        diff = "" if worst.max_diff is None else f" differs by {worst.max_diff:.3g}"
        note = f" ({worst.note})" if worst.note else ""
        raise ValidationError(
            f"validation failed: {len(failures)} of {len(self.checks)} checked tensors exceed the tolerance "
            f"({self.tolerance}); worst: {worst.tensor}{diff} in run '{worst.run}'{note}"
        )


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The least precise floating dtype among `model`'s parameters (float32 when it has none)."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return max(dtypes, key=lambda d: TOLERANCES.get(d, TOLERANCES[torch.float32])[1], default=torch.float32)


def default_tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) for a model in `dtype` (see TOLERANCES)."""
    return TOLERANCES.get(dtype, TOLERANCES[torch.float32])


def validate(conversion, *, atol: float | None = None, rtol: float | None = None, seed: int = 0,
             shapes=SHAPES) -> ValidationResult:
    """Compare `conversion.module` with `conversion.model` (see the module docstring).

    `atol` / `rtol` default to the model dtype's (`TOLERANCES`); either given replaces that term.
    """
    model, module = conversion.model, conversion.module
    dtype = model_dtype(model if model is not None else module)
    default_atol, default_rtol = default_tolerance(dtype)
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    dtype_name = str(dtype).removeprefix("torch.")
    result = ValidationResult(atol=atol, seed=seed, rtol=rtol, dtype=dtype_name, rule=(
        f"|converted - eager| <= atol + rtol * |eager| elementwise for outputs, atol + rtol * max|eager| per "
        f"tensor for gradients; atol {atol:g}, rtol {rtol:g} "
        f"({_origin(atol, rtol, default_atol, default_rtol, dtype_name)}); any NaN or inf fails"))
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
    embeds_dtype = next((p.dtype for p in params if p.is_floating_point()), torch.float32)
    names = list(conversion.input_names)
    all_names = names + [n for n in getattr(conversion, "dropped_inputs", ()) if n not in names]
    was_training = (model.training, module.training)
    saved_grads = {id(p): (p, p.grad) for p in params}  # the caller's gradients are put back afterwards
    threads = torch.get_num_threads()
    # The validation shapes are tiny: with several intra-op threads on a busy machine, thread
    # hand-offs (not arithmetic) dominate and a 2 s check can take 40 s. One thread is steady.
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():  # the runs' seeding leaves the caller's random state as it was
            for batch, enc, dec in shapes:
                inputs = _random_inputs(all_names, model, batch, enc, dec, seed, embeds_dtype)
                module_inputs = {n: inputs[n] for n in names}
                for mode in MODES:
                    run = f"{mode} {batch}x{enc}/{dec}"
                    model.train(mode == "train")
                    module.train(mode == "train")
                    ref, ref_grads = _run(lambda: _eager_output(model, inputs, conversion.output_name),
                                          model.named_parameters(), params, seed)
                    out, out_grads = _run(lambda: module(**module_inputs), module.named_parameters(), params, seed)
                    result.checks.append(_compare(run, f"output {conversion.output_name}", ref, out, atol, rtol,
                                                  elementwise=True))
                    out_grads = {converted_names[n]: g for n, g in out_grads.items() if n in converted_names}
                    for name in ref_grads:
                        result.checks.append(_compare(run, f"grad {name}", ref_grads[name], out_grads.get(name),
                                                      atol, rtol, elementwise=False))
    finally:
        torch.set_num_threads(threads)
        model.train(was_training[0])
        module.train(was_training[1])
        for p, grad in saved_grads.values():
            p.grad = grad
    return result


def _origin(atol, rtol, default_atol, default_rtol, dtype_name) -> str:
    given = [name for name, value, default in (("atol", atol, default_atol), ("rtol", rtol, default_rtol))
             if value != default]
    if not given:
        return f"the {dtype_name} defaults"
    return f"{' and '.join(given)} given, otherwise the {dtype_name} defaults"


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


def _compare(run, tensor, ref, out, atol, rtol, *, elementwise: bool) -> TensorCheck:
    if ref is None and out is None:
        return TensorCheck(run, tensor, None, True, "no gradient on either side")
    if ref is None or out is None:
        which = "the eager model" if ref is None else "the converted module"
        return TensorCheck(run, tensor, None, False, f"no gradient in {which}")
    if ref.shape != out.shape:
        return TensorCheck(run, tensor, None, False, f"shape {tuple(out.shape)}, eager {tuple(ref.shape)}")
    if ref.layout != out.layout:  # e.g. a sparse gradient where eager's is dense: optimizers refuse it
        return TensorCheck(run, tensor, None, False, f"layout {out.layout}, eager {ref.layout}")
    ref, out = ref.to_dense().double(), out.to_dense().double()
    ref_bad, out_bad = ~torch.isfinite(ref), ~torch.isfinite(out)
    if ref_bad.any() or out_bad.any():
        return TensorCheck(run, tensor, None, False, _non_finite(ref, out, ref_bad, out_bad), finite=False)
    diff = (ref - out).abs()
    worst = diff.max().item() if diff.numel() else 0.0
    scale = ref.abs() if elementwise else ref.abs().max() if ref.numel() else 0.0
    over = int((diff > atol + rtol * scale).sum())
    if over:
        return TensorCheck(run, tensor, worst, False, f"{over} of {diff.numel()} elements exceed the tolerance")
    return TensorCheck(run, tensor, worst, True)


def _non_finite(ref, out, ref_bad, out_bad) -> str:
    """Which side holds NaN or inf, how many, and whether the other side does there too."""
    if out_bad.any():
        side = f"not finite in the converted module ({_count(out, out_bad)})"
        other = ref_bad[out_bad]
        agree = ("eager is not finite there too" if other.all() else
                 "eager is not finite at some of those elements" if other.any() else "eager is finite there")
    else:
        side = f"not finite in eager only ({_count(ref, ref_bad)})"
        agree = "the converted module is finite there"
    return f"{side}; {agree}"


def _count(t, bad) -> str:
    kinds = [k for k, present in (("NaN", torch.isnan(t).any()), ("inf", torch.isinf(t).any())) if present]
    return f"{' and '.join(kinds)} at {int(bad.sum())} of {t.numel()} elements"


def _random_inputs(names, model, batch, enc, dec, seed, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Random padded inputs for `names` (`fxconvert.inputs.build_inputs`): none makes eager compute a NaN."""
    family = family_of(model)
    return build_inputs(family.inputs, names, batch=batch, lengths={"encoder": enc, "decoder": dec}, dtype=dtype,
                        generator=torch.Generator().manual_seed(seed), padded=True,
                        **config_sizes(model.config, family))
