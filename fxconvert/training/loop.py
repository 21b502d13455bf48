"""The step loop: batch, pipeline forward and backward, gradient sync, finite check, optimizer step, report, save.

Everything a step needs is set up before the loop (`setup`): the process groups, the
optimizers (restored on `--resume`, else the weights broadcast and the seed set), RUN's
marker, the schedules and the reporter. The loss of a step is the mean of its microbatch
losses (the schedule divides the accumulated gradients by their number), over replicas too.
"""

import json
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from fxconvert.training import compiled, grad_sync, memory, optim
from fxconvert.training.checkpoint import load_checkpoint, set_rng_state
from fxconvert.training.faults import check_finite
from fxconvert.training.metrics import Reporter
from fxconvert.training.run import RUN_MARKER, Run, export, save, say
from fxconvert.training.schedules import Schedules, StageCall


def train(run: Run) -> None:
    cfg, topo, data, device = run.cfg, run.topo, run.data, run.device
    start, modules, schedules, reporter = setup(run)
    last = topo.num_stages - 1 in modules
    try:
        for step in range(start, cfg.steps):
            began = time.perf_counter()
            compiling = compiled.compile_seconds() if cfg.compile else 0.0
            batch = {k: v.to(device) for k, v in data.batch(step * cfg.dp + topo.replica).items()}
            for optimizer in run.optimizers.values():
                optimizer.zero_grad(set_to_none=True)
            probe = memory.start(run, schedules, batch, step) if memory.due(run, step, start) else None
            losses = [] if last else None
            schedules.get(batch).step(batch["input_ids"], target=batch["labels"], losses=losses,
                                      return_outputs=False, **batch)
            grad_sync.sync_gradients(topo, modules, tied=cfg.tie_gradients)
            if cfg.max_grad_norm is not None:
                grad_sync.clip_global_norm(topo, modules, cfg.max_grad_norm)
            check_finite(modules, losses, step + 1, device)
            for optimizer in run.optimizers.values():
                optimizer.step()
            if probe is not None:
                memory.finish(run, probe, reporter)
            if last:
                loss = torch.stack([v.detach().float() for v in losses]).mean()
                if topo.dp > 1:
                    dist.all_reduce(loss, op=dist.ReduceOp.SUM, group=topo.dp_group)
                    loss /= topo.dp
            seconds = time.perf_counter() - began
            # what each rank holds of optimizer state (less under --zero), once: in the first step's record
            state_bytes = optim.state_bytes_per_rank(topo, run.optimizers, device) if step == start else None
            compiling = compiled.compile_seconds() - compiling if cfg.compile else 0.0  # this rank's, in this step
            if reporter is not None:
                tokens = sum(data.tokens(step * cfg.dp + r) for r in range(cfg.dp))
                reporter.step({"step": step + 1, "loss": loss.item(), "lr": cfg.lr,
                               "tokens_per_s": tokens / seconds, "seconds": seconds,
                               **({"optimizer_state_bytes": state_bytes} if state_bytes else {}),
                               **({"compile_s": compiling} if compiling else {})})
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                save(run, step + 1)
                say(run, f"saved checkpoint {run.run_dir / 'checkpoints' / f'step_{step + 1}'}")
    finally:
        if reporter is not None:
            reporter.close()
    if cfg.save_every and start < cfg.steps:
        save(run, cfg.steps)
        say(run, f"saved checkpoint {run.run_dir / 'checkpoints' / f'step_{cfg.steps}'}")
    if not cfg.no_export:
        export(run)
        say(run, f"wrote {run.run_dir / 'hf'} (a transformers checkpoint: from_pretrained loads it) and "
                 f"{run.run_dir / 'metrics.jsonl'}")


def setup(run: Run) -> tuple[int, dict, Schedules, Reporter | None]:
    """(first step, this rank's stage modules, schedules, reporter or None), the same way on every rank."""
    cfg, topo = run.cfg, run.topo
    grad_sync.make_groups(topo, timeout=timedelta(seconds=cfg.timeout))
    modules = {i: part.module for i, part in run.model.parts.items()}
    run.optimizers = {i: optim.build(cfg, topo, m.parameters()) for i, m in sorted(modules.items())}
    start = 0
    if run.resume_from is not None:
        states, rng, meta = load_checkpoint(run.resume_from, rank=topo.rank, stage_indices=sorted(modules))
        for i, state in states.items():
            modules[i].load_state_dict(state["model"])
            run.optimizers[i].load_state_dict(state["optimizer"])
        set_rng_state(rng)
        start = int(meta["step"])
    else:
        torch.manual_seed(cfg.seed * 1000 + topo.rank)  # dropout: each rank its own stream
        grad_sync.broadcast_initial(topo, modules)
    if topo.rank == 0:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        marker = run.run_dir / RUN_MARKER
        if not marker.exists():
            marker.write_text(json.dumps({"producer": "fxconvert.train", "source": str(cfg.source)}) + "\n",
                              encoding="utf-8")
    dist.barrier()
    calls = {i: StageCall(i, part.module, part.inputs, autocast=cfg.autocast, device=run.device, compile=cfg.compile)
             for i, part in run.model.parts.items()}
    schedules = Schedules(calls, topo, schedule=cfg.schedule, microbatches=cfg.microbatches, device=run.device)
    last = topo.num_stages - 1 in modules
    reporter = Reporter(run.run_dir, cfg.steps, start) if last and topo.replica == 0 else None
    return start, modules, schedules, reporter
