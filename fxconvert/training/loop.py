"""The step loop: batch, pipeline forward and backward, gradient sync, finite check, optimizer step, report, save.

Everything a step needs is set up before the loop (`setup`): the process groups, the
optimizers (restored on `--resume`, else the weights broadcast and the seed set), RUN's
marker, the schedules and the reporter. The loss of a step is the mean of its microbatch
losses (the schedule divides the accumulated gradients by their number), over replicas too.
"""

import json
import time
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from fxconvert.training import compiled, evaluate, grad_sync, lr_schedule, memory, optim, retention, tensorboard
from fxconvert.training.checkpoint import load_checkpoint, set_rng_state
from fxconvert.training.faults import check_finite
from fxconvert.training.metrics import Reporter
from fxconvert.training.run import RUN_MARKER, Run, export, save, say
from fxconvert.training.schedules import Schedules, StageCall


def train(run: Run) -> None:
    cfg, topo = run.cfg, run.topo
    start, modules, schedules, reporter = setup(run)
    try:
        for step in range(start, cfg.steps):
            began = time.perf_counter()
            compiling = compiled.compile_seconds() if cfg.compile else 0.0
            for optimizer in run.optimizers.values():
                optimizer.zero_grad(set_to_none=True)
            lr = next(iter(run.optimizers.values())).param_groups[0]["lr"]  # what this step trains at
            losses, probe = _forward_backward(run, modules, schedules, step, start)
            grad_sync.sync_gradients(topo, modules, tied=cfg.tie_gradients)
            if cfg.max_grad_norm is not None:
                grad_norm = grad_sync.clip_global_norm(topo, modules, cfg.max_grad_norm)
            else:
                grad_norm = grad_sync.global_grad_norm(topo, modules).item()
            check_finite(modules, losses, step + 1, run.device)
            for optimizer in run.optimizers.values():
                optimizer.step()
            for scheduler in run.schedulers.values():
                scheduler.step()
            if probe is not None:
                memory.finish(run, probe, reporter)
            record = {"step": step + 1, "loss": _mean_loss(topo, losses), "lr": lr, "grad_norm": grad_norm,
                      "seconds": time.perf_counter() - began}
            # what each rank holds of optimizer state (less under --zero), once: in the first step's record
            state_bytes = optim.state_bytes_per_rank(topo, run.optimizers, run.device) if step == start else None
            compiling = compiled.compile_seconds() - compiling if cfg.compile else 0.0  # this rank's, in this step
            if reporter is not None:
                _report(run, reporter, record, step, state_bytes=state_bytes, compile_s=compiling)
            evaluate.at_step(run, schedules.calls, reporter, step + 1)
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                save(run, step + 1)
                _saved(run, reporter, step + 1)
                retention.after_save(run)
    finally:
        if reporter is not None:
            reporter.close()
    if cfg.save_every and start < cfg.steps:
        save(run, cfg.steps)
        _saved(run, reporter, cfg.steps)
        retention.after_save(run)
    if not cfg.no_export:
        export(run)
        say(run, f"wrote {run.run_dir / 'hf'} (a transformers checkpoint: from_pretrained loads it) and "
                 f"{run.run_dir / 'metrics.jsonl'}")


def _saved(run: Run, reporter: Reporter | None, step: int) -> None:
    """"saved checkpoint", said by the rank that draws the progress bar (above the bar, on a terminal): another
    rank's line would land on the bar's own line, next to a bar not yet redrawn at this step."""
    if reporter is not None:
        reporter.line(f"saved checkpoint {run.run_dir / 'checkpoints' / f'step_{step}'}")


def _batch_indices(cfg, step: int) -> list[int]:
    """The global batches of a step on replica 0 (replica r adds r): replica r takes the batches it takes without
    accumulation, global batch (step * K + j) * dp + r for j < K."""
    return [(step * cfg.grad_accum + j) * cfg.dp for j in range(cfg.grad_accum)]


def _forward_backward(run: Run, modules: dict, schedules: Schedules, step: int, start: int):
    """The step's K batches through the pipeline, gradients accumulated: (the last stage's microbatch losses or
    None on other ranks, the memory probe of a measured step or None)."""
    cfg, topo = run.cfg, run.topo
    last = topo.num_stages - 1 in modules
    losses, probe = ([] if last else None), None
    for j, index in enumerate(_batch_indices(cfg, step)):
        batch = {k: v.to(run.device) for k, v in run.data.batch(index + topo.replica).items()}
        if j == 0 and memory.due(run, step, start):
            probe = memory.start(run, schedules, batch, step)
        part = [] if last else None  # torch empties the list it is given
        with _accumulated(modules, j, cfg.grad_accum):
            schedules.get(batch).step(batch["input_ids"], target=batch["labels"], losses=part,
                                      return_outputs=False, **batch)
        if last:
            losses.extend(part)
    return losses, probe


def _mean_loss(topo, losses) -> torch.Tensor | None:
    """The step's loss on the last stage: the mean of its microbatch losses, over the replicas too (a collective
    over the replica group there); None on other ranks. A tensor: only the reporting rank reads it (`_report`)."""
    if losses is None:
        return None
    loss = torch.stack([v.detach().float() for v in losses]).mean()
    if topo.dp > 1:
        dist.all_reduce(loss, op=dist.ReduceOp.SUM, group=topo.dp_group)
        loss /= topo.dp
    return loss


def _report(run: Run, reporter: Reporter, record: dict, step: int, *, state_bytes, compile_s: float) -> None:
    """The step's metrics line (tokens/s counts every batch of every replica) and, with --epochs, its epoch line."""
    cfg = run.cfg
    tokens = sum(run.data.tokens(index + r) for index in _batch_indices(cfg, step) for r in range(cfg.dp))
    reporter.step({"step": record["step"], "loss": record["loss"].item(), "lr": record["lr"],
                   "grad_norm": record["grad_norm"], "tokens_per_s": tokens / record["seconds"],
                   "seconds": record["seconds"],
                   **({"optimizer_state_bytes": state_bytes} if state_bytes else {}),
                   **({"compile_s": compile_s} if compile_s else {})})
    if cfg.epochs is not None:
        _epoch_line(reporter, cfg, step, len(run.data.examples))


@contextmanager
def _accumulated(modules: dict, j: int, k: int):
    """Batch j of the step's k: its schedule's gradients (the mean over its microbatches: torch divides every
    `.grad` of the stage by their number after each step, so earlier batches' sums must not be there yet) are
    added to those of batches 0..j-1, and the last batch leaves their mean, that of one batch k times as big."""
    if k == 1:
        yield
        return
    params = [p for index in sorted(modules) for p in modules[index].parameters()]
    kept = [p.grad for p in params]
    for p in params:
        p.grad = None
    yield
    for p, before in zip(params, kept):
        if before is not None:
            p.grad = before if p.grad is None else p.grad.add_(before)
    if j == k - 1:
        for p in params:
            if p.grad is not None:
                p.grad.div_(k)


def _epoch_line(reporter: Reporter, cfg, step: int, examples: int) -> None:
    """A line when step `step` (0-based) finished an epoch: examples trained on crossed a multiple of the file."""
    done, before = (step + 1) * cfg.examples_per_step // examples, step * cfg.examples_per_step // examples
    if done > before:
        reporter.line(f"epoch {min(done, cfg.epochs)}/{cfg.epochs} done at step {step + 1}/{cfg.steps}")


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
    run.schedulers = {i: lr_schedule.build(cfg, o, step=start) for i, o in run.optimizers.items()}
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
    reporter = Reporter(run.run_dir, cfg.steps, start, tensorboard=tensorboard.writer(cfg, start_step=start)) \
        if last and topo.replica == 0 else None
    return start, modules, schedules, reporter
