"""Pipeline schedules: one table from the `--schedule` names to torch's, and one `PipelineStage` set per batch shape.

A batch is padded to its own longest sequences, so shapes change between steps, and a
`PipelineStage` fixes its buffers at its first step: each rank keeps one stage set and
schedule per shape (`SHAPE_CACHE`, least recently used dropped), built the same way on
every rank of a replica.

The zero-bubble schedules (`zb-interleaved`, `zbv`, `dualpipev`) split each backward into
the input gradient, sent upstream at once, and the weight gradient, run later to fill the
bubble. Both halves run within the step, so the tied-weight sum, the clip and the
optimizer step after it see whole gradients as with the other schedules. `zbv` and
`dualpipev` place two stages per rank in a V (`grad_sync.Topology.v_placement`).

Each half does only its own work, exactly (`fxconvert.training.split_backward`, where
torch's own split loses a gradient T5 needs).
"""

from collections import OrderedDict

import torch
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleMulti, get_schedule_class

from fxconvert.training import split_backward
from fxconvert.training.grad_sync import Topology

# --schedule name -> torch's schedule name (`get_schedule_class`), in the order `--help` lists them.
SCHEDULES = {"gpipe": "GPipe", "1f1b": "1F1B", "interleaved-1f1b": "Interleaved1F1B",
             "zb-interleaved": "InterleavedZeroBubble", "zbv": "ZBVZeroBubble", "dualpipev": "DualPipeV"}
# --schedule name -> (fewest, most) stages per rank (--virtual-stages); None: no upper bound
STAGES_PER_RANK = {"gpipe": (1, 1), "1f1b": (1, 1), "interleaved-1f1b": (2, None), "zb-interleaved": (2, None),
                   "zbv": (2, 2), "dualpipev": (2, 2)}
V_PLACED = frozenset({"zbv", "dualpipev"})  # rank r holds stages r and 2P-1-r
SPLIT_BACKWARD = frozenset({"zb-interleaved", "zbv", "dualpipev"})  # input and weight gradients apart
SHAPE_CACHE = 8  # pipeline stages (with their buffers) kept per rank, one per batch shape


def build_schedule(name: str, stages: list[PipelineStage], microbatches: int):
    """torch's schedule `name` over this rank's stages; the last stage's output is the loss already."""
    cls = get_schedule_class(SCHEDULES[name])
    first = stages if issubclass(cls, PipelineScheduleMulti) else stages[0]
    return cls(first, n_microbatches=microbatches, loss_fn=_loss_is_output)


def _loss_is_output(output, target):
    """The last stage returns the converted graph's loss already."""
    return output


class StageCall(torch.nn.Module):
    """Adapts one stage to the schedule: model inputs arrive as keywords on every stage.

    The schedule passes every rank's keyword arguments to each of its stages, so a rank
    that runs several stages (interleaved) gives each all the model inputs; this picks
    the ones its stage reads. Stage 0 takes them positionally (the schedule's own
    positional argument, the input ids, is only there to mark the first stage's input).
    """

    def __init__(self, index: int, module: torch.nn.Module, inputs: list[str], *, autocast: torch.dtype | None,
                 device: torch.device, compile: bool = False):
        super().__init__()
        self.stage = torch.compile(module, fullgraph=True) if compile else module  # `fxconvert.training.compiled`
        self.index = index
        self.inputs = list(inputs)
        self.autocast = autocast
        self.device_type = device.type

    # Set by `Schedules` for the zero-bubble schedules: their input-gradient half detaches the stage's outputs
    # in place (`torch.distributed.pipelining._backward.stage_backward_input`), which torch refuses for a view
    # (an expanded mask, a slice passed on): such outputs leave as copies.
    copy_views = False

    def forward(self, *received, **batch):
        if self.index == 0:
            args, kwargs = [batch[n] for n in self.inputs], {}
        else:
            args, kwargs = list(received), {n: batch[n] for n in self.inputs}
        if self.autocast is None:
            out = self.stage(*args, **kwargs)
        else:
            with torch.autocast(self.device_type, dtype=self.autocast):
                out = self.stage(*args, **kwargs)
            if isinstance(out, tuple):
                out = tuple(v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for v in out)
            else:
                out = out.float()
        if self.copy_views and isinstance(out, tuple):
            out = tuple(v.clone() if isinstance(v, torch.Tensor) and v._is_view() else v for v in out)
        return out


class SplitStage(PipelineStage):
    """A `PipelineStage` whose backward halves are exact and each do their own work (`split_backward`)."""

    def backward_maybe_with_nosync(self, backward_type, bwd_kwargs: dict, last_backward: bool = False):
        if backward_type == "input":
            outputs, grads = [], []
            given = bwd_kwargs["output_grads"]
            for i, out in enumerate(bwd_kwargs["stage_output"]):
                if isinstance(out, torch.Tensor) and out.requires_grad:
                    outputs.append(out)
                    grads.append(torch.ones_like(out) if given is None else given[i])
            params = [p for p in self.submod.parameters() if p.requires_grad]
            return split_backward.input_half(outputs, grads, bwd_kwargs["input_values"], params)
        if backward_type == "weight":
            split_backward.weight_half(bwd_kwargs["param_groups"])
            return (), None
        return super().backward_maybe_with_nosync(backward_type, bwd_kwargs, last_backward)


class Schedules:
    """One `PipelineStage` set + schedule per batch shape, least recently used dropped first."""

    def __init__(self, calls: dict[int, StageCall], topo: Topology, *, schedule: str, microbatches: int,
                 device: torch.device):
        self.calls, self.topo, self.device = calls, topo, device
        self.schedule, self.microbatches = schedule, microbatches
        self.cache: OrderedDict = OrderedDict()
        for call in calls.values():
            call.copy_views = schedule in SPLIT_BACKWARD

    def get(self, batch: dict[str, torch.Tensor]):
        key = tuple(tuple(v.shape) for v in batch.values())
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        kind = SplitStage if self.schedule in SPLIT_BACKWARD else PipelineStage
        stages = [kind(self.calls[i], i, self.topo.num_stages, self.device, group=self.topo.pipeline_group)
                  for i in sorted(self.calls)]
        self.cache[key] = build_schedule(self.schedule, stages, self.microbatches)
        while len(self.cache) > SHAPE_CACHE:
            self.cache.popitem(last=False)
        return self.cache[key]
