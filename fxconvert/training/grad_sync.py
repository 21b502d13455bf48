"""Gradient bookkeeping of pipeline training: tied weights, data-parallel replicas, global clipping.

`torch.distributed.pipelining` gives every stage that uses a tied weight (T5's shared
embedding: encoder embedding, decoder embedding, tied LM head) its own copy and never
reconciles them. `Topology` describes where every stage and replica lives, and the
functions here make the copies behave as one parameter, as DeepSpeed does for tied layers:

- `broadcast_initial`: every copy starts equal to the lowest stage's copy, and every
  replica starts equal to replica 0;
- `sync_gradients`: each shared weight's gradient is summed over the stages holding a
  copy (first over the copies on this rank, then over the ranks of this replica that
  hold one), and every gradient is averaged over the replicas;
- `clip_global_norm`: clips by the norm of the whole model's gradient, counting each
  shared weight once (on the lowest stage holding it). A per-stage `clip_grad_norm_`
  would scale each stage by its own norm: the stages would take steps in different
  directions than the unsplit model, and copies of a shared weight would drift apart.

Ranks: pipeline rank p of replica r is global rank `p * dp + r` (replicas of one stage
are neighbours, so their all-reduce, the heavy traffic, stays on one machine when a
machine holds whole groups; the pipeline's point-to-point sends cross machines).
Stage i runs on pipeline rank `i % pipeline_ranks` (PyTorch's interleaved layout), or, in the
V placement of the `zbv` and `dualpipev` schedules (two stages per rank), pipeline rank r holds
stages r and 2P-1-r: the first and last stages share rank 0, so T5's encoder embedding and tied
LM head are summed on one rank.
"""

from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class Topology:
    """Where stages and replicas live; the process groups are made by `make_groups` on every rank."""

    world_size: int
    dp: int
    virtual_stages: int
    shared_stages: dict[str, list[int]]  # shared weight -> stages holding a copy
    rank: int = 0
    v_placement: bool = False  # rank r holds stages r and 2P-1-r (`schedules.V_PLACED`), else r, r+P, ...
    pipeline_group: object = None  # this replica's pipeline ranks
    dp_group: object = None  # this pipeline rank's replicas
    tied_groups: dict[str, object] = field(default_factory=dict)  # shared weight -> group of this replica's holders

    @property
    def pipeline_ranks(self) -> int:
        return self.world_size // self.dp

    @property
    def num_stages(self) -> int:
        return self.pipeline_ranks * self.virtual_stages

    @property
    def replica(self) -> int:
        return self.rank % self.dp

    @property
    def pipeline_rank(self) -> int:
        return self.rank // self.dp

    def global_rank(self, pipeline_rank: int, replica: int) -> int:
        return pipeline_rank * self.dp + replica

    def stage_rank(self, stage: int) -> int:
        if self.v_placement and stage >= self.pipeline_ranks:
            return self.num_stages - 1 - stage
        return stage % self.pipeline_ranks

    def stages_of(self, pipeline_rank: int) -> list[int]:
        return [s for s in range(self.num_stages) if self.stage_rank(s) == pipeline_rank]

    @property
    def my_stages(self) -> list[int]:
        return self.stages_of(self.pipeline_rank)

    def holders(self, name: str, replica: int) -> list[int]:
        """Global ranks of `replica` that hold a copy of shared weight `name`."""
        return sorted({self.global_rank(self.stage_rank(s), replica) for s in self.shared_stages[name]})


def make_groups(topo: Topology, *, timeout: timedelta) -> None:
    """Create every process group; all ranks call this with the same topology, in the same order.

    Each group gets `timeout` (the run's `--timeout`): `new_group` does not inherit the
    default group's, and its own default (30 minutes) let a hung rank stall the others
    in a tied-weight or replica all-reduce for half an hour.
    """
    P, R = topo.pipeline_ranks, topo.dp
    for r in range(R):
        ranks = [topo.global_rank(p, r) for p in range(P)]
        group = dist.new_group(ranks, timeout=timeout) if R > 1 else None  # None: the default (world) group
        if r == topo.replica:
            topo.pipeline_group = group
    for p in range(P):
        ranks = [topo.global_rank(p, r) for r in range(R)]
        group = dist.new_group(ranks, timeout=timeout) if R > 1 else None
        if p == topo.pipeline_rank:
            topo.dp_group = group
    for name in sorted(topo.shared_stages):
        for r in range(R):
            ranks = topo.holders(name, r)
            if len(ranks) > 1:
                group = dist.new_group(ranks, timeout=timeout)
                if topo.rank in ranks:
                    topo.tied_groups[name] = group


def _shared_copies(modules: dict[int, torch.nn.Module], name: str) -> list[torch.nn.Parameter]:
    return [dict(m.named_parameters())[name] for m in modules.values() if name in dict(m.named_parameters())]


def broadcast_initial(topo: Topology, modules: dict[int, torch.nn.Module]) -> None:
    """Every copy of a shared weight := the lowest stage's; every replica := replica 0."""
    if topo.dp > 1:
        for index in sorted(modules):
            for p in modules[index].parameters():
                dist.broadcast(p.data, src=topo.global_rank(topo.pipeline_rank, 0), group=topo.dp_group)
    for name in sorted(topo.shared_stages):
        copies = _shared_copies(modules, name)
        if not copies or (len(copies) == 1 and name not in topo.tied_groups):
            continue  # held once, by this rank alone: its gradient is the sum already
        lowest = min(topo.shared_stages[name])
        source = copies[0]
        if name in topo.tied_groups:
            dist.broadcast(source.data, src=topo.global_rank(topo.stage_rank(lowest), topo.replica),
                           group=topo.tied_groups[name])
        for copy in copies[1:]:
            copy.data.copy_(source.data)


def sync_gradients(topo: Topology, modules: dict[int, torch.nn.Module], *, tied: bool = True) -> None:
    """Sum each shared weight's gradient over its copies; average every gradient over replicas.

    `tied=False` leaves the copies' gradients alone: what plain pipelining does (the
    self-check's control run shows the copies drifting apart).
    """
    for name in sorted(topo.shared_stages) if tied else ():
        copies = _shared_copies(modules, name)
        if not copies or (len(copies) == 1 and name not in topo.tied_groups):
            continue  # held once, by this rank alone: its gradient is the sum already
        # Summed into the first gradient held, and copied into the other copies' (each keeps a tensor of its
        # own: the clip scales every copy's in place): no fresh tensor per copy of a 32128 x 512 embedding.
        owner = next((p for p in copies if p.grad is not None), copies[0])
        if owner.grad is None:
            owner.grad = torch.zeros_like(owner)
        total = owner.grad
        for p in copies:
            if p is not owner and p.grad is not None:
                total += p.grad
        if name in topo.tied_groups:
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=topo.tied_groups[name])
        for p in copies:
            if p is not owner:
                p.grad = total.clone() if p.grad is None else p.grad.copy_(total)
    if topo.dp > 1:
        grads = [p.grad for p in _params(modules)]
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=topo.dp_group)
        flat /= topo.dp
        for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)


def _params(modules):
    out = []
    for index in sorted(modules):
        for p in modules[index].parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            out.append(p)
    return out


def global_grad_norm(topo: Topology, modules: dict[int, torch.nn.Module]) -> torch.Tensor:
    """The 2-norm of the whole model's gradient, each shared weight counted once (after `sync_gradients`).

    As `clip_grad_norm_` computes it: each gradient's norm (no copy of the gradient: a float64 copy of a
    large embedding's gradient was the peak of a step), then the norm of those, summed in float64 over the
    pipeline ranks; one transfer to the host, none per tensor.
    """
    norms = []
    for index in sorted(modules):
        for name, p in modules[index].named_parameters():
            if name in topo.shared_stages and index != min(topo.shared_stages[name]):
                continue  # counted on the lowest stage holding a copy
            if p.grad is not None:
                norms.append(torch.linalg.vector_norm(p.grad.detach()))
    device = _device_of(modules)
    squares = (torch.stack(norms).double().pow(2).sum() if norms
               else torch.zeros((), dtype=torch.float64, device=device))
    if topo.pipeline_ranks > 1:
        dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=topo.pipeline_group)
    return squares.sqrt().float().cpu()


def clip_global_norm(topo: Topology, modules: dict[int, torch.nn.Module], max_norm: float) -> float:
    """Scale every gradient by min(1, max_norm / (norm + 1e-6)), as `clip_grad_norm_` does; return the norm."""
    norm = global_grad_norm(topo, modules)
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for module in modules.values():
        for p in module.parameters():
            if p.grad is not None:
                p.grad.mul_(scale.to(p.grad.device))
    return norm.item()


def _device_of(modules) -> torch.device:
    for module in modules.values():
        for p in module.parameters():
            return p.device if p.device.type != "cpu" else torch.device("cpu")
    return torch.device("cpu")


__all__ = ["Topology", "make_groups", "broadcast_initial", "sync_gradients", "global_grad_norm", "clip_global_norm"]
