"""`python -m fxconvert.train --self-check`: train a random tiny T5 in stages and compare with one process.

One process per stage (`torch.multiprocessing` spawn, gloo on CPU). Each process builds
the same tiny `T5ForConditionalGeneration` from a config and seed, converts it, splits it
with `fxconvert.stages.split_stages` and keeps its own stage (`Stages.stage_module`),
which it hands to `PipelineStage` under `ScheduleGPipe` or `Schedule1F1B`.

- Data flow: stage 0 takes the model inputs it reads as positional arguments of
  `schedule.step`; every later stage receives its predecessor's outputs (values produced
  earlier pass through) and reads the model inputs it needs (masks, labels) as keyword
  arguments of its own `schedule.step`, which pipelining chunks into the same microbatches.
- Loss: the last stage returns the converted graph's own loss (the mean cross-entropy of
  one microbatch), so the schedule's `loss_fn` returns its input; the labels are passed as
  the nominal `target`. With `scale_grads=True` (the default) gradients are summed over
  microbatches and divided by their number: the objective of a step is the mean of the
  microbatch losses, and the loss reported per step is that mean.
- Tied weights: pipelining would copy the shared embedding into every stage that uses it
  (encoder embedding, decoder embedding, tied LM head) and never reconcile the copies.
  Here each such stage owns a copy; the copies start equal (a broadcast from the lowest
  rank holding one) and their gradients are all-reduced (summed) over exactly the ranks
  that hold one, in a `dist.new_group`, before every optimizer step, as DeepSpeed does for
  tied layers. Every copy then takes the same step and stays identical.
- Reference: the unsplit converted module, trained in one process on the same batches
  split into the same microbatches (`torch.tensor_split`), gradients accumulated over the
  microbatches and divided by their number. The run compares the loss of every step and
  the final weights (fp32) and the copies of the shared weight among themselves.
- Dropout is 0 and the modules are in train mode (the `training` flag is True), so both
  sides are deterministic; dropout masks drawn by several processes cannot match one
  process's random stream.
- The optimizer is SGD by default. AdamW (`--optimizer adamw`) works the same way, but
  it divides each gradient entry by its own magnitude, so for entries near its `eps` the
  float reassociation of a pipelined backward (~1e-11) becomes a visible weight difference
  (up to 9e-6 after 3 steps with 4 stages at lr 1e-2, against 2e-7 for SGD at lr 0.5).
- `--control` adds a run of the first schedule without the all-reduce: what plain
  pipelining does with a weight used by several stages. Its copies drift apart.
"""

import argparse
import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from fxconvert.workflow import convert
from fxconvert.errors import UsageError
from fxconvert.stages import split_stages

SCHEDULES = ("gpipe", "1f1b")
OPTIMIZERS = ("sgd", "adamw")
INPUT_NAMES = ("input_ids", "attention_mask", "decoder_input_ids", "labels")


@dataclass
class RunConfig:
    stages: int = 2
    schedules: tuple[str, ...] = SCHEDULES
    steps: int = 3
    microbatches: int = 4
    batch: int = 8
    encoder_length: int = 7
    decoder_length: int = 5
    family: str = "T5"
    d_model: int = 32
    layers: int = 2
    decoder_layers: int = 2
    heads: int = 4
    vocab: int = 97
    optimizer: str = "sgd"
    lr: float = 0.5
    seed: int = 0
    tolerance: float = 1e-5
    timeout_s: int = 120
    control: bool = False  # also run the first schedule without the tied-gradient all-reduce

    def runs(self) -> list[tuple[str, bool]]:
        """(schedule, all-reduce tied gradients) for every run, in order."""
        return [(s, True) for s in self.schedules] + ([(self.schedules[0], False)] if self.control else [])


@dataclass
class ScheduleResult:
    schedule: str
    tied_sync: bool
    losses: list[float]
    reference_losses: list[float]
    max_loss_diff: float
    max_weight_diff: float
    max_weight_update: float
    shared_copies: dict[str, list[int]]
    max_shared_copy_diff: float
    ok: bool = field(default=False)


# -- model, data, optimizer: the same in every process ---------------------------------------


def build_model(cfg: RunConfig) -> torch.nn.Module:
    import transformers

    if cfg.family == "BART":
        return _build_bart(cfg)
    config_class = {"T5": transformers.T5Config, "MT5": transformers.MT5Config, "UMT5": transformers.UMT5Config}
    config = config_class[cfg.family](
        d_model=cfg.d_model, d_ff=2 * cfg.d_model, d_kv=cfg.d_model // cfg.heads, num_heads=cfg.heads,
        num_layers=cfg.layers, num_decoder_layers=cfg.decoder_layers, vocab_size=cfg.vocab,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="relu",
        dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, use_cache=False,
    )
    torch.manual_seed(cfg.seed)
    model_class = getattr(transformers, f"{cfg.family}ForConditionalGeneration")
    return model_class._from_config(config, attn_implementation="sdpa").train()


def _build_bart(cfg: RunConfig) -> torch.nn.Module:
    """A tiny BartForConditionalGeneration: tied scaled embedding and head, learned positions."""
    import transformers

    config = transformers.BartConfig(
        d_model=cfg.d_model, encoder_ffn_dim=2 * cfg.d_model, decoder_ffn_dim=2 * cfg.d_model,
        encoder_attention_heads=cfg.heads, decoder_attention_heads=cfg.heads, encoder_layers=cfg.layers,
        decoder_layers=cfg.decoder_layers, vocab_size=cfg.vocab, max_position_embeddings=64, scale_embedding=True,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, use_cache=False,
    )
    torch.manual_seed(cfg.seed)
    return transformers.BartForConditionalGeneration._from_config(config, attn_implementation="sdpa").train()


def batches(cfg: RunConfig) -> list[dict[str, torch.Tensor]]:
    """One batch of random tokens per step; padding at random lengths, some ignored labels."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    out = []
    for _ in range(cfg.steps):
        b, n, m = cfg.batch, cfg.encoder_length, cfg.decoder_length
        lengths = torch.randint(1, n + 1, (b,), generator=g)
        labels = torch.randint(1, cfg.vocab, (b, m), generator=g)
        labels[torch.rand(b, m, generator=g) < 0.2] = -100
        out.append({
            "input_ids": torch.randint(1, cfg.vocab, (b, n), generator=g),
            "attention_mask": (torch.arange(n)[None, :] < lengths[:, None]).long(),
            "decoder_input_ids": torch.randint(1, cfg.vocab, (b, m), generator=g),
            "labels": labels,
        })
    return out


def make_optimizer(cfg: RunConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr)
    return torch.optim.AdamW(params, lr=cfg.lr)


def _named_weights(module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


# -- single-process reference ----------------------------------------------------------------


def train_reference(cfg: RunConfig) -> tuple[list[float], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Train the unsplit converted module as the pipeline does: (losses per step, initial, final weights)."""
    module = convert(build_model(cfg), input_names=INPUT_NAMES).module.train()
    initial = _named_weights(module)
    optimizer = make_optimizer(cfg, module.parameters())
    losses = []
    for batch in batches(cfg):
        optimizer.zero_grad()
        chunks = {k: torch.tensor_split(v, cfg.microbatches) for k, v in batch.items()}
        step = []
        for i in range(cfg.microbatches):
            loss = module(**{k: v[i] for k, v in chunks.items()})
            loss.backward()
            step.append(loss.detach())
        for p in module.parameters():
            if p.grad is not None:
                p.grad.div_(cfg.microbatches)
        optimizer.step()
        losses.append(torch.stack(step).mean().item())
    return losses, initial, _named_weights(module)


# -- one pipeline process ----------------------------------------------------------------------


def _loss_is_output(output, target):
    """The last stage returns the converted graph's loss already."""
    return output


def _tied_groups(specs) -> dict[str, tuple[list[int], object]]:
    """Shared weight -> (ranks holding a copy, their process group). Every rank must call this."""
    groups = {}
    for name in sorted({w for spec in specs for w in spec.shared_weights}):
        ranks = [spec.index for spec in specs if name in spec.shared_weights]
        groups[name] = (ranks, dist.new_group(ranks) if len(ranks) > 1 else None)
    return groups


def _train_stage(rank: int, cfg: RunConfig, schedule_name: str, tied_sync: bool) -> dict:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    stages = split_stages(convert(build_model(cfg), input_names=INPUT_NAMES), cfg.stages)
    specs, spec, module = stages.specs, stages.specs[rank], stages.stage_module(rank).train()
    last = rank == cfg.stages - 1
    pipe = PipelineStage(module, rank, cfg.stages, torch.device("cpu"))
    schedule_class = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule_name]
    schedule = schedule_class(pipe, n_microbatches=cfg.microbatches, loss_fn=_loss_is_output)
    tied = {name: group for name, (ranks, group) in _tied_groups(specs).items() if group is not None and rank in ranks}
    if not tied_sync:  # what plain pipelining does: each copy goes its own way
        tied = {}
    for name, group in tied.items():
        dist.broadcast(getattr(module, name).data, group=group, group_src=0)
    optimizer = make_optimizer(cfg, module.parameters())
    losses = []
    for batch in batches(cfg):
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
    return {"losses": losses, "weights": _named_weights(module), "shared": list(spec.shared_weights)}


def _worker(rank: int, cfg: RunConfig, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=cfg.stages,
                            timeout=timedelta(seconds=cfg.timeout_s))
    try:
        for name, tied_sync in cfg.runs():
            torch.save(_train_stage(rank, cfg, name, tied_sync), Path(out_dir) / _result_file(name, tied_sync, rank))
    finally:
        dist.destroy_process_group()


def _result_file(schedule: str, tied_sync: bool, rank: int) -> str:
    return f"{schedule}{'' if tied_sync else '-unsynced'}_rank{rank}.pt"


# -- launch and compare --------------------------------------------------------------------------


def check(cfg: RunConfig) -> None:
    if cfg.stages < 2:
        raise UsageError(f"pipeline training needs at least 2 stages, got {cfg.stages}")
    unknown = [s for s in cfg.schedules if s not in SCHEDULES]
    if unknown:
        raise UsageError(f"unknown schedule(s) {', '.join(unknown)}; choose from {', '.join(SCHEDULES)}")
    if "1f1b" in cfg.schedules and cfg.microbatches < cfg.stages:
        raise UsageError(f"Schedule1F1B needs at least as many microbatches as stages "
                         f"({cfg.microbatches} < {cfg.stages}); raise --microbatches")
    if cfg.batch < cfg.microbatches:
        raise UsageError(f"the batch ({cfg.batch}) must hold at least one sample per microbatch ({cfg.microbatches})")


def run(cfg: RunConfig, out_dir: str | None = None) -> list[ScheduleResult]:
    """Train with pipelining in `cfg.stages` processes, train the reference here, compare."""
    import torch.multiprocessing as mp

    check(cfg)
    split_stages(convert(build_model(cfg), input_names=INPUT_NAMES), cfg.stages)  # a SplitError before any spawn
    with tempfile.TemporaryDirectory(prefix="fxconvert-pipe-") as tmp:
        work = Path(out_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        (work / "rendezvous").unlink(missing_ok=True)
        mp.spawn(_worker, args=(cfg, str(work)), nprocs=cfg.stages, join=True)
        per_rank = {run: [torch.load(work / _result_file(*run, r)) for r in range(cfg.stages)] for run in cfg.runs()}
    reference_losses, initial, final = train_reference(cfg)
    return [_compare(cfg, run, ranks, reference_losses, initial, final) for run, ranks in per_rank.items()]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _compare(cfg, run, ranks, reference_losses, initial, final) -> ScheduleResult:
    losses = ranks[-1]["losses"]
    copies: dict[str, list[int]] = {}
    weight_diff = copy_diff = 0.0
    for r, result in enumerate(ranks):
        for key, value in result["weights"].items():
            weight_diff = max(weight_diff, _max_diff(value, final[key]))
            if key in result["shared"]:
                copies.setdefault(key, []).append(r)
                copy_diff = max(copy_diff, _max_diff(value, ranks[copies[key][0]]["weights"][key]))
    covered = {key for result in ranks for key in result["weights"]}
    if covered != set(final):
        raise AssertionError(f"the stages hold {sorted(covered ^ set(final))} unlike the unsplit module")
    loss_diff = max(abs(a - b) for a, b in zip(losses, reference_losses, strict=True))
    result = ScheduleResult(
        schedule=run[0],
        tied_sync=run[1],
        losses=losses,
        reference_losses=reference_losses,
        max_loss_diff=loss_diff,
        max_weight_diff=weight_diff,
        max_weight_update=max(_max_diff(final[k], initial[k]) for k in final),
        shared_copies=copies,
        max_shared_copy_diff=copy_diff,
    )
    result.ok = loss_diff <= cfg.tolerance and weight_diff <= cfg.tolerance and copy_diff == 0.0
    return result


def format_results(cfg: RunConfig, results: list[ScheduleResult]) -> str:
    lines = [f"{cfg.family}ForConditionalGeneration d_model={cfg.d_model} layers={cfg.layers}+{cfg.decoder_layers}, "
             f"{cfg.stages} stages, {cfg.microbatches} microbatches of a batch of {cfg.batch}, {cfg.steps} "
             f"{cfg.optimizer} steps (lr {cfg.lr}), tolerance {cfg.tolerance:g}"]
    for r in results:
        if r.tied_sync:
            lines.append(f"{r.schedule}: {'OK' if r.ok else 'MISMATCH'}")
        else:
            lines.append(f"{r.schedule} without the tied-gradient all-reduce (control; expected to differ): "
                         f"{'differs' if not r.ok else 'no difference'}")
        for i, (a, b) in enumerate(zip(r.losses, r.reference_losses)):
            lines.append(f"  step {i}: loss {a:.8f}  single-process {b:.8f}  diff {abs(a - b):.2e}")
        lines.append(f"  max weight diff {r.max_weight_diff:.2e} (largest update {r.max_weight_update:.2e})")
        for key, ranks in r.shared_copies.items():
            lines.append(f"  {key}: copies on ranks {ranks}, max diff between copies {r.max_shared_copy_diff:.2e}")
    return "\n".join(lines)


def parse_args(argv=None) -> tuple[RunConfig, argparse.Namespace]:
    d = RunConfig()
    p = argparse.ArgumentParser(prog="python -m fxconvert.train --self-check", description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", type=int, default=d.stages, help="pipeline stages = processes")
    p.add_argument("--schedule", nargs="+", choices=SCHEDULES, default=list(d.schedules))
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--microbatches", type=int, default=d.microbatches)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--family", choices=("T5", "MT5", "UMT5", "BART"), default=d.family)
    p.add_argument("--d-model", type=int, default=d.d_model)
    p.add_argument("--layers", type=int, default=d.layers, help="encoder layers")
    p.add_argument("--decoder-layers", type=int, default=d.decoder_layers)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--tolerance", type=float, default=d.tolerance)
    p.add_argument("--timeout", type=int, default=d.timeout_s, help="seconds a collective may wait")
    p.add_argument("--control", action="store_true",
                   help="also run the first schedule without the tied-gradient all-reduce, as plain pipelining does")
    p.add_argument("--out", help="keep the per-rank results here")
    p.add_argument("--json", help="write the comparison as JSON to this file")
    a = p.parse_args(argv)
    cfg = RunConfig(stages=a.stages, schedules=tuple(a.schedule), steps=a.steps, microbatches=a.microbatches,
                    batch=a.batch, family=a.family, d_model=a.d_model, layers=a.layers,
                    decoder_layers=a.decoder_layers, optimizer=a.optimizer, lr=a.lr, seed=a.seed,
                    tolerance=a.tolerance, timeout_s=a.timeout, control=a.control)
    return cfg, a


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    cfg, args = parse_args(argv)
    try:
        results = run(cfg, args.out)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_results(cfg, results))
    if args.json:
        Path(args.json).write_text(json.dumps({"config": asdict(cfg), "results": [asdict(r) for r in results]},
                                              indent=2))
    return 0 if all(r.ok for r in results if r.tied_sync) else 1


if __name__ == "__main__":
    sys.exit(main())
