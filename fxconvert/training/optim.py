"""The optimizer of a run: which one, one per stage built through `fxconvert.optimizers`, plain or sharded
over the stage's data-parallel replicas (`--zero`), its state for a checkpoint, and the bytes each rank holds.

Which one: `--optimizer`, else the optimizer a conversion's plan counted (pipeline.json's
`plan.optimizer`: its predicted peaks hold that optimizer's state), else AdamW. An explicit
`--optimizer` that differs from the plan's is a warning, not an error, and only for a plan
made for a memory target (`--max-memory`): its figures are then off by the difference in
state, and the run may still fit. A plan made without one promised nothing to differ from.

`--zero` is `torch.distributed.optim.ZeroRedundancyOptimizer` over the stage's replica group
(`Topology.dp_group`): each replica keeps the state of about 1/dp of the stage's weights,
steps those, and broadcasts them to the other replicas. Everything before the step stays
as it is: gradients are already all-reduced over the replicas (and tied copies summed over
stages) by `grad_sync`, so global clipping and the finite check see every gradient whole.

Checkpoints are consolidated: before a save, every replica sends its shard to replica 0,
which writes the stage's file as a run without `--zero` does, in the same format (torch's
optimizer state dict, parameters by index). So a checkpoint does not depend on `--zero`:
one written with it resumes with or without it, and the reverse; on resume every replica
reads the whole state and keeps its own shard. The consolidated copy on replica 0 is held
in CPU memory only while the file is written.
"""

import torch
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer

from fxconvert import optimizers
from fxconvert.training import planned
from fxconvert.errors import UsageError, printable

DEFAULT = "adamw"  # without --optimizer and without a plan that records one


def choose(cfg, *, warn) -> str:
    """The run's optimizer name: `cfg.optimizer`, else the plan's (a conversion's pipeline.json), else AdamW.

    A pipeline.json that does not read is left to `load_model` to report.
    """
    plan = planned.read(cfg.source)
    target = plan.max_memory if plan is not None else None
    planned_name = plan.optimizer if plan is not None else None
    if cfg.optimizer is None:
        if planned_name is not None and planned_name not in optimizers.NAMES:
            raise UsageError(f"{printable(cfg.source)}'s plan counts optimizer {planned_name!r}, which "
                             f"fxconvert.train does not run; pass --optimizer ({', '.join(optimizers.NAMES)})")
        return planned_name or DEFAULT
    if planned_name is not None and planned_name != cfg.optimizer and target is not None:
        warn(f"--optimizer {cfg.optimizer}, but {cfg.source}'s plan counted {planned_name}'s state in its memory "
             f"figures; the stages' memory differs from the plan's")
    return cfg.optimizer


def build(cfg, topo, params) -> torch.optim.Optimizer:
    """The optimizer of one stage's parameters: the record's, or sharded over the stage's replicas (`--zero`)."""
    record = optimizers.get(cfg.optimizer)
    if not cfg.zero:
        return record.build(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return ZeroRedundancyOptimizer(list(params), optimizer_class=record.build, process_group=topo.dp_group,
                                   lr=cfg.lr, weight_decay=cfg.weight_decay)


def state_to_save(optimizer, topo) -> dict | None:
    """The stage's whole optimizer state on replica 0 (None elsewhere); a collective over the replicas
    under `--zero` (every replica calls it, in the same stage order)."""
    if not isinstance(optimizer, ZeroRedundancyOptimizer):
        return optimizer.state_dict() if topo.replica == 0 else None
    optimizer.consolidate_state_dict(to=0)  # group rank 0 is replica 0 (`grad_sync.make_groups`)
    if topo.replica != 0:
        return None
    state = optimizer.state_dict()
    optimizer._all_state_dicts = []  # the consolidated copy: kept by torch until the next save otherwise
    return state


def local_state_bytes(optimizers_: dict) -> int:
    """Bytes of optimizer state this rank holds (its shard under `--zero`)."""
    total = 0
    for optimizer in optimizers_.values():
        local = optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer
        for state in local.state.values():
            total += sum(v.nbytes for v in state.values() if isinstance(v, torch.Tensor))
    return total


def state_bytes_per_rank(topo, optimizers_: dict, device) -> list[int]:
    """Every rank's `local_state_bytes`, in global rank order (a collective over all ranks)."""
    counts = torch.zeros(topo.world_size, dtype=torch.int64, device=device)
    counts[topo.rank] = local_state_bytes(optimizers_)
    if topo.world_size > 1:
        dist.all_reduce(counts)
    return counts.tolist()


__all__ = ["choose", "build", "state_to_save", "local_state_bytes", "state_bytes_per_rank"]
