"""Model inputs built from a family's input specs: one builder for tracing, validation, costs and timing.

Each input has a kind and a sequence (`fxconvert.families.KINDS`, `SEQUENCES`). The
builder makes meta tensors (tracing, cost analysis, probing stage shapes) or random real
ones (validation, timing). Random inputs can be padded: the masks pad the tail of the
first row, keeping each row's first token, and the last label of the last row is ignored
(-100) when that row has another, so no input makes eager compute 0/0.
"""

import torch

# Two sets of sizes at which every size differs, each by a different pair of values: running a
# graph on meta inputs at both tells which dimensions follow the batch or a sequence length (a
# head count equal to one run's batch size cannot pass for the batch) and which are fixed.
SIZE_PROBES = ({"batch": 2, "encoder": 7, "decoder": 5}, {"batch": 3, "encoder": 11, "decoder": 13})


def build_inputs(specs, names, *, batch: int, lengths: dict, hidden: int | None = None, vocab: int = 2,
                 type_vocab: int = 2, classes: int = 2, dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None,
                 padded: bool = False, meta: bool = False) -> dict[str, torch.Tensor]:
    """Inputs `names` (each in `specs`) of `batch` rows, the sequence lengths in `lengths` ("encoder", "decoder").

    `meta=True` gives meta tensors; otherwise values are drawn from `generator`.
    """
    out = {}
    for name in names:
        kind, seq = specs[name]
        shape = (batch,) if kind == "class" else (batch, lengths[seq])  # a class id per row, or per token
        if kind == "embeds":
            if hidden is None:
                raise ValueError(f"the input {name!r} needs the model's hidden size")
            shape += (hidden,)
        float_input = kind == "embeds"
        if meta:
            out[name] = torch.empty(shape, dtype=dtype if float_input else torch.long, device="meta")
        elif kind == "embeds":
            out[name] = torch.randn(shape, generator=generator, dtype=dtype)
        elif kind == "mask":
            mask = torch.ones(shape, dtype=torch.long)
            if padded:
                mask[0, max(1, shape[1] - 2):] = 0
            out[name] = mask
        else:
            high = {"type_ids": type_vocab, "class": classes}.get(kind, vocab)
            ids = torch.randint(0, high, shape, generator=generator)
            if padded and name == "labels" and kind != "class" and shape[1] > 1:
                ids[-1, -1] = -100
            out[name] = ids
    return out


def meta_twins(tensors) -> dict:
    """id(tensor) -> a meta tensor like it (a Parameter stays a Parameter): a `copy.deepcopy` memo
    that copies a module onto the meta device without copying its data."""
    memo = {}
    for t in tensors:
        twin = torch.empty_like(t, device="meta")
        memo[id(t)] = torch.nn.Parameter(twin, t.requires_grad) if isinstance(t, torch.nn.Parameter) else twin
    return memo


def config_sizes(config, family) -> dict:
    """The keyword arguments of `build_inputs` that come from a model's config (`Family.input_sizes`)."""
    return family.input_sizes(config)


__all__ = ["build_inputs", "config_sizes", "meta_twins", "SIZE_PROBES"]
