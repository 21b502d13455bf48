"""`--eval-data`: the loss over a held-out file, forward only through the pipeline, every `--eval-every` steps
and once more at the end.

What the number is. The file is cut into batches of `--eval-batch` (default `--batch`)
consecutive lines in file order, the last one shorter when the lines do not divide; each is
padded to its own longest rows, as a training batch is. A batch's loss is the one
transformers' model returns for it (the mean over its target tokens), and `eval_loss` is the
mean of the batch losses weighted by their examples: the Hugging Face Trainer's `eval_loss`
with `per_device_eval_batch_size` = `--eval-batch` (it repeats each batch's loss once per
example and takes the mean), and with equal batches simply the mean of the batch losses.

How. Each batch goes through the stages whole: one forward per stage under `torch.no_grad()`,
the stage modules in eval mode (dropout off, as eager's `model.eval()`; the generated code
passes `self.training` down), stage i's outputs sent point to point to stage i+1's rank,
their shapes first. Not a pipelining schedule's `eval()`: a schedule splits its batch into
its fixed number of microbatches, whose loss means are not the batch's, and a last batch with
fewer rows than microbatches would not split. No gradient, no optimizer state and no random
number is touched, so the training after an evaluation is the one it would have been without
it. With `--dp R`, replica r takes batches r, r+R, ...; one all-reduce over every rank gives
every rank the result (a `--save-best` checkpoint records it in its meta.json).
"""

import math
import time

import torch
import torch.distributed as dist

from fxconvert.errors import FxConvertError, UsageError


def check_options(cfg) -> None:
    """The evaluation and checkpoint-keeping options against each other (their numbers are checked with the
    others: at least 1)."""
    if cfg.eval_data is None:
        for option, given in (("--eval-every", cfg.eval_every is not None),
                              ("--eval-batch", cfg.eval_batch is not None), ("--save-best", cfg.save_best)):
            if given:
                raise UsageError(f"{option} needs --eval-data FILE.jsonl (the held-out lines to evaluate); "
                                 f"give it, or drop {option}")
    for option, given in (("--save-best", cfg.save_best), (f"--keep-last {cfg.keep_last}", cfg.keep_last)):
        if given and cfg.save_every is None:
            raise UsageError(f"{option} chooses among checkpoints, and none are written without --save-every K; "
                             f"add --save-every")
    if cfg.save_best and cfg.eval_every is None:
        raise UsageError("--save-best needs an eval loss at every checkpoint, but without --eval-every the run "
                         "evaluates only at the end; add --eval-every K with K dividing --save-every")
    if cfg.save_best and cfg.save_every % cfg.eval_every:
        raise UsageError(f"--save-best needs an eval loss at every checkpoint, but --save-every {cfg.save_every} "
                         f"is not a multiple of --eval-every {cfg.eval_every}; make it one")


def identity(run) -> str | None:
    """What makes two eval losses comparable: the eval file's content (sha256) and the batch size (the batch
    losses are weighted by examples, and a batch's loss is a mean over its own tokens). Recorded in each
    checkpoint's meta.json beside `eval_loss`; `--save-best` compares only checkpoints with this run's."""
    data = run.eval_data
    return None if data is None else f"{data.sha256}/{data.batch_size}"


def due(cfg, step: int) -> bool:
    """Whether the run evaluates after step `step` (1-based): every --eval-every steps, and after the last."""
    if cfg.eval_data is None:
        return False
    return step == cfg.steps or (cfg.eval_every is not None and step % cfg.eval_every == 0)


def batches(examples: int, size: int) -> list[range]:
    """The example indices of each eval batch: `size` consecutive lines, the last batch holding the rest."""
    return [range(start, min(start + size, examples)) for start in range(0, examples, size)]


def evaluate(run, calls: dict) -> tuple[float, int]:
    """(eval_loss, examples) over `run.eval_data`, on every rank alike; `calls` are this rank's
    `schedules.StageCall`s by stage index."""
    topo, data = run.topo, run.eval_data
    total = torch.zeros(2, dtype=torch.float64, device=run.device)  # sum of batch loss x rows, rows
    modes = {i: call.training for i, call in calls.items()}
    for call in calls.values():
        call.eval()
    try:
        with torch.no_grad():
            for rows in batches(len(data.examples), data.batch_size)[topo.replica::topo.dp]:
                batch = data.take(list(rows))
                loss = _forward(run, calls, {k: v.to(run.device) for k, v in batch.items()})
                if loss is not None:
                    total[0] += loss.double() * len(rows)
                    total[1] += len(rows)
    finally:
        for i, call in calls.items():
            call.train(modes[i])
    dist.all_reduce(total)  # the world: only the last stage's ranks added anything
    return (total[0] / total[1]).item(), int(total[1].item())


def _forward(run, calls: dict, batch: dict) -> torch.Tensor | None:
    """One batch through every stage of this replica, in stage order: the loss on the rank of the last stage,
    None elsewhere. Walking the stages in one order on every rank pairs each send with its receive."""
    topo = run.topo
    here, last = topo.pipeline_rank, topo.num_stages - 1
    values = ()
    for i in range(topo.num_stages):
        if topo.stage_rank(i) != here:
            continue
        if i > 0 and topo.stage_rank(i - 1) != here:
            values = _receive(run, topo.global_rank(topo.stage_rank(i - 1), topo.replica))
        out = calls[i](*values, **batch)
        values = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        if i == last:
            return values[0].detach().float().reshape(())
        if topo.stage_rank(i + 1) != here:
            _send(run, values, topo.global_rank(topo.stage_rank(i + 1), topo.replica), stage=i)
    return None


def _object_device(run):
    return run.device if run.device.type == "cuda" else None  # nccl sends objects through the rank's device


def _send(run, values: tuple, dst: int, *, stage: int) -> None:
    if not all(isinstance(v, torch.Tensor) for v in values):
        kinds = ", ".join(type(v).__name__ for v in values)
        raise FxConvertError(f"stage {stage} returned {kinds}, not tensors; evaluation sends only tensors between "
                             f"stages: reconvert the model")
    dist.send_object_list([[(tuple(v.shape), v.dtype) for v in values]], dst=dst, group=run.topo.pipeline_group,
                          device=_object_device(run))
    for v in values:
        dist.send(v.contiguous(), dst=dst, group=run.topo.pipeline_group)


def _receive(run, src: int) -> tuple:
    meta = [None]
    dist.recv_object_list(meta, src=src, group=run.topo.pipeline_group, device=_object_device(run))
    values = tuple(torch.empty(shape, dtype=dtype, device=run.device) for shape, dtype in meta[0])
    for v in values:
        dist.recv(v, src=src, group=run.topo.pipeline_group)
    return values


def at_step(run, calls: dict, reporter, step: int) -> None:
    """Evaluate after `step` when it is due: the record and progress line, and the loss kept for the checkpoint."""
    if not due(run.cfg, step):
        return
    began = time.perf_counter()
    loss, examples = evaluate(run, calls)
    run.eval_losses[step] = loss
    if reporter is not None:
        seconds = time.perf_counter() - began
        reporter.record({"step": step, "record": "eval", "eval_loss": loss, "eval_examples": examples,
                         "eval_seconds": seconds})
        shown = f"{loss:.6f}" if math.isfinite(loss) else str(loss)
        reporter.line(f"step {step}/{run.cfg.steps}  eval loss {shown}  ({examples} examples, {seconds:.3f} s)")
