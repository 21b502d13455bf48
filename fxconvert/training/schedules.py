"""Pipeline schedules: one table from the `--schedule` names to torch's, and one `PipelineStage` set per batch shape.

A batch is padded to its own longest sequences, so shapes change between steps, and a
`PipelineStage` fixes its buffers at its first step: each rank keeps one stage set and
schedule per shape (`SHAPE_CACHE`, least recently used dropped), built the same way on
every rank of a replica.
"""

from collections import OrderedDict

import torch
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleMulti, get_schedule_class

from fxconvert.training.grad_sync import Topology

# --schedule name -> torch's schedule name (`get_schedule_class`), in the order `--help` lists them.
SCHEDULES = {"gpipe": "GPipe", "1f1b": "1F1B", "interleaved-1f1b": "Interleaved1F1B"}
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

    def forward(self, *received, **batch):
        if self.index == 0:
            args, kwargs = [batch[n] for n in self.inputs], {}
        else:
            args, kwargs = list(received), {n: batch[n] for n in self.inputs}
        if self.autocast is None:
            return self.stage(*args, **kwargs)
        with torch.autocast(self.device_type, dtype=self.autocast):
            out = self.stage(*args, **kwargs)
        if isinstance(out, tuple):
            return tuple(v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for v in out)
        return out.float()


class Schedules:
    """One `PipelineStage` set + schedule per batch shape, least recently used dropped first."""

    def __init__(self, calls: dict[int, StageCall], topo: Topology, *, schedule: str, microbatches: int,
                 device: torch.device):
        self.calls, self.topo, self.device = calls, topo, device
        self.schedule, self.microbatches = schedule, microbatches
        self.cache: OrderedDict = OrderedDict()

    def get(self, batch: dict[str, torch.Tensor]):
        key = tuple(tuple(v.shape) for v in batch.values())
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        stages = [PipelineStage(self.calls[i], i, self.topo.num_stages, self.device, group=self.topo.pipeline_group)
                  for i in sorted(self.calls)]
        self.cache[key] = build_schedule(self.schedule, stages, self.microbatches)
        while len(self.cache) > SHAPE_CACHE:
            self.cache.popitem(last=False)
        return self.cache[key]
