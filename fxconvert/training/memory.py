"""`--measure-memory`: the peak of torch-allocated memory during one training step, per rank, beside the plan's.

One step is measured: the second this process runs, so that the optimizer state exists (the
first step makes it, or a resume loads it) and the pipeline stages of the usual batch shape
(with their receive buffers) are built. It starts after the gradients are set to None and
ends after the optimizer step. Every rank measures its own stages; the rank that writes
RUN/metrics.jsonl writes one record per rank (`"record": "memory"`).

How the peak is taken:

- CUDA: `torch.cuda.reset_peak_memory_stats`, then `torch.cuda.max_memory_allocated` after
  the step: the caching allocator counts every tensor on the device.
- CPU: torch keeps no allocator statistics for CPU, and offers no allocator hook to Python.
  `torch.profiler` with `profile_memory=True` records each allocation and free the CPU
  allocator makes while it runs, with its time; summed in time order they give the bytes
  allocated since the step began at each moment, and their maximum is the step's peak above
  what was live when it began. That live part is counted from the tensors the rank holds:
  the stages' parameters and buffers, the optimizer state, the batch and the pipeline
  stages' receive buffers (each storage once). The profiler does not report the free of a
  block allocated before it started, so the step must free none of its own: the gradients
  are already None, and the receive buffers' gradients of the last step are released here
  before it starts (`PipelineStage.clear_runtime_states`, which the schedule calls first
  thing anyway). What remains unseen is a few scalars (the last step's losses).
  The profiler slows the measured step (it records every op), and only that step: a run
  without `--measure-memory` never builds a probe.

The record also splits the peak: `parameter_bytes`, `gradient_bytes` (the parameters that
train; a gradient is the size of its weight) and `optimizer_bytes` (the state after the step)
persist between steps; `activation_bytes` is the rest of the peak (saved activations,
received and sent values, transients). Most of that rest, at the peak, can be backward's
working memory (a fresh gradient of a shared embedding, the loss's gradient over the
vocabulary), which recompute does not change; `saved_activation_bytes` is what the saved
activations themselves hold: the bytes the step allocated and still holds when its first
backward op begins (the activations saved by the microbatches in flight under the schedule,
plus their outputs; under recompute, the checkpointed blocks' inputs). It is read from the
profiler's op and memory events, so it is None on CUDA. `predicted_peak_bytes` is the plan's
prediction for the rank's stages (pipeline.json, at the sizes it was planned for: `plan`),
None without one.
"""

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from fxconvert import manifest

BACKWARD_OP = "autograd::engine::evaluate_function: "  # how the profiler names each autograd node it runs


@dataclass
class Probe:
    """One measured step on this rank: what was live when it began, and the profiler (CPU) or None (CUDA)."""

    step: int
    device: torch.device
    live_bytes: int
    profiler: object = None
    began: float = field(default_factory=time.perf_counter)


def due(run, step: int, start: int) -> bool:
    """Whether `step` is the one to measure: the second this process runs."""
    return run.cfg.measure_memory and step == start + 1


def start(run, schedules, batch: dict, step: int) -> Probe:
    """Begin measuring the step about to run on `batch` (the gradients are None already); `schedules` is the
    rank's `fxconvert.training.schedules.Schedules`."""
    for stage in _pipeline_stages(schedules.get(batch)):
        stage.clear_runtime_states()  # last step's received-activation gradients: freed now, not unseen
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
        torch.cuda.reset_peak_memory_stats(run.device)
        return Probe(step, run.device, torch.cuda.memory_allocated(run.device))
    stages = [stage for schedule in schedules.cache.values() for stage in _pipeline_stages(schedule)]
    held = [*_module_tensors(run), *_optimizer_tensors(run), *batch.values(), *_buffers(stages)]
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
    profiler.__enter__()
    return Probe(step, run.device, storage_bytes(held), profiler)


def finish(run, probe: Probe, reporter) -> None:
    """End the measurement; every rank sends its record to the rank that writes metrics.jsonl."""
    saved = None
    if probe.profiler is None:
        torch.cuda.synchronize(probe.device)
        peak = torch.cuda.max_memory_allocated(probe.device)
    else:
        probe.profiler.__exit__(None, None, None)
        events = probe.profiler.profiler.kineto_results.events()
        peak, saved = probe.live_bytes + max(0, peak_of(events)), saved_of(events)
    record = _record(run, probe, peak, saved)
    records = [None] * dist.get_world_size()
    dist.all_gather_object(records, record)
    if reporter is not None:
        for r in records:
            reporter.record(r)


def peak_of(events) -> int:
    """The largest running sum of the profiler's CPU memory events in time order (bytes above the start)."""
    total = peak = 0
    for _, nbytes in _deltas(events):
        total += nbytes
        peak = max(peak, total)
    return peak


def saved_of(events) -> int | None:
    """The bytes allocated since the start and still live when the first backward op begins (None: no backward).

    Autograd records each node it runs as "autograd::engine::evaluate_function: <node>"; until the
    first, the step has only run forwards, so what they left live is what backward will need: the
    activations the microbatches in flight saved (under recompute, the checkpointed blocks' inputs)
    and their outputs.
    """
    starts = [e.start_ns() for e in events if e.name().startswith(BACKWARD_OP)]
    if not starts:
        return None
    return sum(nbytes for t, nbytes in _deltas(events) if t < min(starts))


def _deltas(events) -> list[tuple[int, int]]:
    """(time, bytes) of the profiler's CPU allocations (positive) and frees (negative), in time order."""
    return sorted((e.start_ns(), e.nbytes()) for e in events
                  if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (a view or a tensor listed twice counts once)."""
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _record(run, probe: Probe, peak: int, saved: int | None) -> dict:
    params = [p for part in run.model.parts.values() for p in part.module.parameters()]
    parameter_bytes = storage_bytes(params)
    gradient_bytes = storage_bytes(p for p in params if p.requires_grad)
    optimizer_bytes = storage_bytes(_optimizer_tensors(run))
    stages = sorted(run.model.parts)
    plan, predicted = _predicted(run, stages)
    return {"step": probe.step + 1, "record": "memory", "rank": run.topo.rank, "replica": run.topo.replica,
            "stages": stages, "device": probe.device.type,
            "method": "max_memory_allocated" if probe.profiler is None else "torch.profiler",
            "peak_bytes": peak, "live_at_start_bytes": probe.live_bytes, "parameter_bytes": parameter_bytes,
            "gradient_bytes": gradient_bytes, "optimizer_bytes": optimizer_bytes,
            "activation_bytes": peak - parameter_bytes - gradient_bytes - optimizer_bytes,
            "saved_activation_bytes": saved,
            "predicted_peak_bytes": predicted, "plan": plan, "seconds": time.perf_counter() - probe.began}


def _predicted(run, stages: list[int]) -> tuple[dict | None, int | None]:
    """The plan's sizes and its predicted peak for `stages` (summed), from pipeline.json; (None, None) without."""
    if run.model.pipeline_dir is None:
        return None, None
    plan = manifest.read(run.model.pipeline_dir).plan
    if plan is None:
        return None, None
    peaks = [plan.peak_bytes[i] for i in stages]
    sizes = {"batch": plan.batch, **plan.lengths, "schedule": plan.schedule, "microbatches": plan.microbatches,
             "optimizer": plan.optimizer, "recompute": list(plan.recompute)}
    return sizes, None if any(p is None for p in peaks) else sum(peaks)


def _module_tensors(run):
    for part in run.model.parts.values():
        yield from part.module.parameters()
        yield from part.module.buffers()


def _optimizer_tensors(run):
    for optimizer in run.optimizers.values():
        for state in optimizer.state.values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor))


def _pipeline_stages(schedule) -> list:
    """The `PipelineStage`s a schedule runs (one for GPipe and 1F1B, several for interleaved schedules)."""
    return list(getattr(schedule, "_stages", None) or [schedule._stage])


def _buffers(stages):
    """The receive buffers of pipeline stages (activations forward, gradients backward), kept between steps."""
    for stage in stages:
        for infos in (*stage.args_recv_info.values(), *stage.grad_recv_info.values()):
            for info in infos:
                if getattr(info, "buffer", None) is not None:
                    yield info.buffer
