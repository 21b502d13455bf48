"""Pipeline training of a tiny BertForMaskedLM on torch.distributed.pipelining: 2 gloo processes, 2 stages.

The same steps as `fxconvert.pipeline_check` (T5's self-check): each rank builds the same model
from a seed, converts and splits it, runs its stage with GPipe or 1F1B over 2 microbatches,
all-reduces the gradients of its shared-weight copies (BERT's embedding, read by the first
stage and the MLM head in the last) and takes an SGD step. Dropout is 0 so that the ranks'
random streams do not matter. `reference` trains the unsplit converted module the same way.
"""

from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from fxconvert.convert import convert
from fxconvert.pipeline_check import _loss_is_output, _tied_groups
from fxconvert.stages import split_stages

STAGES, MICROBATCHES, STEPS, BATCH, LENGTH, LR, VOCAB = 2, 2, 2, 4, 9, 0.5, 97
NAMES = ["input_ids", "attention_mask", "token_type_ids", "labels"]


def build_model() -> torch.nn.Module:
    import transformers

    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return transformers.BertForMaskedLM._from_config(config, attn_implementation="sdpa").train()


def batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        lengths = torch.randint(1, LENGTH + 1, (BATCH,), generator=g)
        labels = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=g)
        labels[torch.rand(BATCH, LENGTH, generator=g) < 0.5] = -100
        labels[:, 0] = torch.randint(0, VOCAB, (BATCH,), generator=g)  # every row keeps a label
        out.append({
            "input_ids": torch.randint(0, VOCAB, (BATCH, LENGTH), generator=g),
            "attention_mask": (torch.arange(LENGTH)[None, :] < lengths[:, None]).long(),
            "token_type_ids": torch.randint(0, 2, (BATCH, LENGTH), generator=g),
            "labels": labels,
        })
    return out


def _weights(module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def reference() -> tuple[list[float], dict, dict]:
    """(mean microbatch loss per step, initial and final weights) of the unsplit converted module."""
    module = convert(build_model(), input_names=NAMES).module.train()
    initial = _weights(module)
    optimizer = torch.optim.SGD(module.parameters(), lr=LR)
    losses = []
    for batch in batches():
        optimizer.zero_grad()
        chunks = {k: torch.tensor_split(v, MICROBATCHES) for k, v in batch.items()}
        step = []
        for i in range(MICROBATCHES):
            loss = module(**{k: v[i] for k, v in chunks.items()})
            loss.backward()
            step.append(loss.detach())
        for p in module.parameters():
            if p.grad is not None:
                p.grad.div_(MICROBATCHES)
        optimizer.step()
        losses.append(torch.stack(step).mean().item())
    return losses, initial, _weights(module)


def _train(rank: int, schedule_name: str) -> dict:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    stages = split_stages(convert(build_model(), input_names=NAMES), STAGES)
    spec, module = stages.specs[rank], stages.stage_module(rank).train()
    last = rank == STAGES - 1
    pipe = PipelineStage(module, rank, STAGES, torch.device("cpu"))
    schedule_class = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule_name]
    schedule = schedule_class(pipe, n_microbatches=MICROBATCHES, loss_fn=_loss_is_output)
    tied = {n: g for n, (ranks, g) in _tied_groups(stages.specs).items() if g is not None and rank in ranks}
    optimizer = torch.optim.SGD(module.parameters(), lr=LR)
    losses = []
    for batch in batches():
        optimizer.zero_grad()
        args = [batch[n] for n in spec.inputs] if rank == 0 else []
        kwargs = {} if rank == 0 else {n: batch[n] for n in spec.inputs}
        step_losses = [] if last else None
        schedule.step(*args, target=batch["labels"] if last else None, losses=step_losses, return_outputs=False,
                      **kwargs)
        for name, group in tied.items():
            param = getattr(module, name)
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM, group=group)
        optimizer.step()
        if last:
            losses.append(torch.stack([loss.detach() for loss in step_losses]).mean().item())
    return {"losses": losses, "weights": _weights(module), "shared": list(spec.shared_weights)}


def worker(rank: int, out_dir: str, schedules) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=STAGES,
                            timeout=timedelta(seconds=120))
    try:
        for name in schedules:
            torch.save(_train(rank, name), Path(out_dir) / f"{name}_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run(out_dir, schedules=("gpipe", "1f1b")) -> dict[str, list[dict]]:
    """schedule -> per-rank results."""
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(str(out_dir), tuple(schedules)), nprocs=STAGES, join=True)
    return {s: [torch.load(Path(out_dir) / f"{s}_rank{r}.pt") for r in range(STAGES)] for s in schedules}
