"""`python -m fxconvert.train --self-check`: the trainer's own loop on a tiny random model, against eager transformers.

A tiny model of the chosen family (its record's `tiny_config`, dropout 0) is written with
`save_pretrained`, converted and split into `--stages` stage files, and trained by the real
trainer (`fxconvert.training.worker.run_training`): one process per stage (`torch.multiprocessing`,
torchrun's env:// rendezvous on 127.0.0.1, gloo), on a pre-tokenized JSONL of random
tokens and lengths (some labels ignored), once per `--schedule`. The reference is eager
transformers trained in this process on the same batches (`fxconvert.training.data`'s
contract), split into the same microbatches, gradients accumulated and divided by their
number. Compared: the loss of every step (RUN/metrics.jsonl), the exported weights (RUN/hf)
and the copies of each shared weight among the stages (the last checkpoint).

- The optimizer is SGD by default. AdamW (`--optimizer adamw`) divides each gradient entry
  by its own magnitude, so for entries near its `eps` the float reassociation of a pipelined
  backward (~1e-11) becomes a visible weight difference.
- `--control` adds a run of the first schedule without the tied-gradient all-reduce
  (`TrainConfig.tie_gradients`): what plain pipelining does with a weight used by several
  stages. Its copies drift apart.
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

from fxconvert import families
from fxconvert.errors import UsageError, first_line, printable
from fxconvert.training.checkpoint import load_checkpoint
from fxconvert.training.config import Launch, TrainConfig, TrainError, check_options
from fxconvert.training.data import IGNORE_INDEX, Example, microbatches
from fxconvert.training.worker import run_training

SCHEDULES = ("gpipe", "1f1b")  # one stage per process (interleaving needs several)
OPTIMIZERS = ("sgd", "adamw")


def _trainable_types() -> dict[str, families.Family]:
    return {t: f for f in families.all_families() if f.objective is not None and f.tiny for t in f.model_types}


@dataclass
class RunConfig:
    stages: int = 2
    schedules: tuple[str, ...] = SCHEDULES
    steps: int = 3
    microbatches: int = 4
    batch: int = 8
    encoder_length: int = 7  # longest input of a line
    decoder_length: int = 5  # longest target of a line
    family: str = "t5"  # a model_type of a family that trains
    layers: int | None = None  # every stack's layers (the family's `max_layers_fields`); None: the tiny config's
    optimizer: str = "sgd"
    lr: float = 0.5
    seed: int = 0
    tolerance: float = 1e-5
    timeout_s: int = 120
    control: bool = False  # also run the first schedule without the tied-gradient all-reduce

    def runs(self) -> list[tuple[str, bool]]:
        """(schedule, all-reduce tied gradients) for every run, in order."""
        return [(s, True) for s in self.schedules] + ([(self.schedules[0], False)] if self.control else [])

    @property
    def record(self) -> families.Family:
        return _trainable_types()[self.family.lower()]


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


# -- the model and the data: written once, read by every rank and by the reference --------------


def model_config(cfg: RunConfig):
    """The transformers config of the tiny model: the family's tiny config, dropout 0 (both sides deterministic)."""
    import transformers

    record = cfg.record
    config = record.tiny_config(cfg.family.lower())
    config.pop("architectures")
    config.update({k: 0.0 for k in record.rate_fields})  # also those the tiny config leaves to their default
    if cfg.layers is not None:
        config.update({k: cfg.layers for k in record.max_layers_fields})
    return transformers.AutoConfig.for_model(**config)


def build_model(cfg: RunConfig) -> torch.nn.Module:
    import transformers

    config = model_config(cfg)
    torch.manual_seed(cfg.seed)
    model_class = getattr(transformers, cfg.record.model_types[cfg.family.lower()][1])
    return model_class._from_config(config, attn_implementation="sdpa").train()


def rows(cfg: RunConfig) -> list[dict]:
    """One pre-tokenized line per example (`steps x batch`): random tokens and lengths, some labels ignored."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    vocab, objective = families.vocabulary(model_config(cfg)), cfg.record.objective
    out = []
    for _ in range(cfg.steps * cfg.batch):
        n = int(torch.randint(1, cfg.encoder_length + 1, (1,), generator=g))
        m = n if objective.aligned else int(torch.randint(1, cfg.decoder_length + 1, (1,), generator=g))
        labels = torch.randint(1, vocab, (m,), generator=g)
        if not objective.labels_are_tokens:  # a causal LM reads its labels as tokens: none is ignored
            # labels aligned with the input predict a few of its tokens (a masked LM's); a target, most of its own
            ignored = torch.rand(m, generator=g) < (0.8 if objective.aligned else 0.2)
            ignored[int(torch.randint(0, m, (1,), generator=g))] = False  # every line has something to learn
            labels[ignored] = IGNORE_INDEX
        out.append({"input_ids": torch.randint(1, vocab, (n,), generator=g).tolist(), "labels": labels.tolist()})
    return out


def batches(cfg: RunConfig) -> list[dict[str, torch.Tensor]]:
    """The batch of every step, as the trainer collates it (`Data.batch`)."""
    config, objective = model_config(cfg), cfg.record.objective
    token_ids = objective.token_ids(config.to_dict(), families.vocabulary(config))
    examples = [Example(r["input_ids"], r["labels"]) for r in rows(cfg)]
    return [objective.collate(examples[s * cfg.batch:(s + 1) * cfg.batch], **token_ids) for s in range(cfg.steps)]


def make_optimizer(cfg: RunConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)


def train_eager(cfg: RunConfig, checkpoint) -> tuple[list[float], dict, dict]:
    """(loss per step, initial and final state dict) of eager transformers on the trainer's batches."""
    import transformers

    model_class = getattr(transformers, cfg.record.model_types[cfg.family.lower()][1])
    model = model_class.from_pretrained(checkpoint, attn_implementation="sdpa").train()
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = make_optimizer(cfg, model.parameters())
    losses = []
    for batch in batches(cfg):
        optimizer.zero_grad()
        step = []
        for chunk in microbatches(batch, cfg.microbatches):
            loss = model(**chunk, use_cache=False).loss
            (loss / cfg.microbatches).backward()
            step.append(loss.detach())
        optimizer.step()
        losses.append(torch.stack(step).mean().item())
    return losses, initial, {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- the pipeline runs ---------------------------------------------------------------------------


def check(cfg: RunConfig) -> None:
    """The trainer's own option checks for every run, before anything is written or started."""
    if cfg.stages < 2:
        raise UsageError(f"--self-check trains in stages: --stages must be at least 2, got {cfg.stages}")
    for schedule in cfg.schedules:
        check_options(_train_config(cfg, schedule, True, Path(os.devnull), 0), Launch(0, cfg.stages, 0))


def _train_config(cfg: RunConfig, schedule: str, tied: bool, work: Path, port: int) -> TrainConfig:
    return TrainConfig(source=str(work / "conv"), data=str(work / "train.jsonl"), out=str(work / _run_name(schedule, tied)),
                       steps=cfg.steps, batch=cfg.batch, microbatches=cfg.microbatches, schedule=schedule,
                       lr=cfg.lr, optimizer=cfg.optimizer, seed=cfg.seed, save_every=cfg.steps,
                       timeout=float(cfg.timeout_s), device="cpu", tie_gradients=tied)


def _run_name(schedule: str, tied: bool) -> str:
    return f"{schedule}{'' if tied else '-unsynced'}"


def _worker(rank: int, train: TrainConfig, world: int, port: int) -> None:
    """One rank of one run: the real trainer, rendezvous in the store at 127.0.0.1:`port`, which this
    process's parent holds as torchrun's agent does (so rank 0 opens no port of its own)."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True")
    status = run_training(train, Launch(rank, world, rank))
    if status:
        sys.exit(status)


def _store(world: int, timeout_s: int):
    """The run's rendezvous store, listening on a port the kernel picks as it binds. A port picked
    first and bound later by rank 0 could be taken in between by any other program on the machine."""
    return dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False,
                         timeout=timedelta(seconds=timeout_s))


def prepare(cfg: RunConfig, work: Path):
    """Write the tiny checkpoint, its conversion in `cfg.stages` stages and the data; the stages (split here, so
    a model that does not split is refused before any process starts)."""
    from fxconvert import workflow  # the converter: the self-check converts its tiny model here

    build_model(cfg).save_pretrained(work / "ckpt")
    split = workflow.split(str(work / "ckpt"), cfg.stages, offline=True, optimizer=cfg.optimizer)
    stages = split.stages
    split.conversion.save(work / "conv", stages=stages)
    (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(cfg)), encoding="utf-8")
    return stages


def run(cfg: RunConfig, out_dir: str | None = None) -> list[ScheduleResult]:
    """Train with the trainer in `cfg.stages` processes per run, train eager transformers here, compare."""
    import torch.multiprocessing as mp

    import transformers

    transformers.utils.logging.disable_progress_bar()
    check(cfg)
    with tempfile.TemporaryDirectory(prefix="fxconvert-self-check-") as tmp:
        work = Path(tmp)
        stages = prepare(cfg, work)
        reference_losses, initial, final = train_eager(cfg, work / "ckpt")
        results = []
        for schedule, tied in cfg.runs():
            train = _train_config(cfg, schedule, tied, work, 0)
            try:
                store = _store(cfg.stages, cfg.timeout_s)
                mp.spawn(_worker, args=(train, cfg.stages, store.port), nprocs=cfg.stages, join=True)
            except mp.ProcessExitedException as e:
                raise TrainError(f"the {schedule} run failed ({first_line(e)}); its ranks said why above") from None
            ranks = _rank_results(cfg, stages, Path(train.out))
            if out_dir is not None:
                keep = Path(out_dir)
                keep.mkdir(parents=True, exist_ok=True)
                for r, result in enumerate(ranks):
                    torch.save(result, keep / f"{_run_name(schedule, tied)}_rank{r}.pt")
            results.append(_compare(cfg, (schedule, tied), ranks, Path(train.out), reference_losses, initial, final))
    return results


def _rank_results(cfg: RunConfig, stages, run_dir: Path) -> list[dict]:
    """Per rank: its losses (the last stage's, from metrics.jsonl), its stage's weights (the last checkpoint) and
    the shared weights it holds a copy of."""
    checkpoint = run_dir / "checkpoints" / f"step_{cfg.steps}"
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    out = []
    for r, spec in enumerate(stages.specs):
        states, _, _ = load_checkpoint(checkpoint, rank=r, stage_indices=[r])
        params = dict(stages.stage_module(r).named_parameters())
        weights = {k: v for k, v in states[r]["model"].items() if k in params}
        out.append({"losses": losses if r == cfg.stages - 1 else [], "weights": weights,
                    "shared": list(spec.shared_weights)})
    return out


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _compare(cfg, run, ranks, run_dir: Path, reference_losses, initial, final) -> ScheduleResult:
    import transformers

    model_class = getattr(transformers, cfg.record.model_types[cfg.family.lower()][1])
    trained = model_class.from_pretrained(run_dir / "hf").state_dict()
    if set(trained) != set(final):
        raise TrainError(f"RUN/hf holds {sorted(set(trained) ^ set(final))} unlike eager transformers")
    weight_diff = max(_max_diff(trained[k], final[k]) for k in final)
    copies: dict[str, list[int]] = {}
    copy_diff = 0.0
    for r, result in enumerate(ranks):
        for key in result["shared"]:
            copies.setdefault(key, []).append(r)
            copy_diff = max(copy_diff, _max_diff(result["weights"][key], ranks[copies[key][0]]["weights"][key]))
    losses = ranks[-1]["losses"]
    loss_diff = max(abs(a - b) for a, b in zip(losses, reference_losses, strict=True))
    result = ScheduleResult(schedule=run[0], tied_sync=run[1], losses=losses, reference_losses=reference_losses,
                            max_loss_diff=loss_diff, max_weight_diff=weight_diff,
                            max_weight_update=max(_max_diff(final[k], initial[k]) for k in final),
                            shared_copies=copies, max_shared_copy_diff=copy_diff)
    result.ok = loss_diff <= cfg.tolerance and weight_diff <= cfg.tolerance and copy_diff == 0.0
    return result


def format_results(cfg: RunConfig, results: list[ScheduleResult]) -> str:
    model_class = cfg.record.model_types[cfg.family.lower()][1]
    lines = [f"{model_class} (tiny), {cfg.stages} stages, {cfg.microbatches} microbatches of a batch of {cfg.batch}, "
             f"{cfg.steps} {cfg.optimizer} steps (lr {cfg.lr}), tolerance {cfg.tolerance:g}, against eager "
             f"transformers"]
    for r in results:
        if r.tied_sync:
            lines.append(f"{r.schedule}: {'OK' if r.ok else 'MISMATCH'}")
        else:
            lines.append(f"{r.schedule} without the tied-gradient all-reduce (control; expected to differ): "
                         f"{'differs' if not r.ok else 'no difference'}")
        for i, (a, b) in enumerate(zip(r.losses, r.reference_losses)):
            lines.append(f"  step {i}: loss {a:.8f}  eager {b:.8f}  diff {abs(a - b):.2e}")
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
    p.add_argument("--family", type=str.lower, choices=sorted(_trainable_types()), default=d.family,
                   help="the model_type of the tiny model")
    p.add_argument("--layers", type=int, default=d.layers, help="layers of every stack (default: the tiny config's)")
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
                    batch=a.batch, family=a.family, layers=a.layers, optimizer=a.optimizer, lr=a.lr, seed=a.seed,
                    tolerance=a.tolerance, timeout_s=a.timeout, control=a.control)
    return cfg, a


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    cfg, args = parse_args(argv)
    try:
        results = run(cfg, args.out)
    except UsageError as e:
        print(f"fxconvert.train: error: {printable(str(e))}", file=sys.stderr)
        return 2
    except TrainError as e:
        print(f"fxconvert.train: error: {printable(str(e))}", file=sys.stderr)
        return 1
    print(format_results(cfg, results))
    if args.json:
        Path(args.json).write_text(json.dumps({"config": asdict(cfg), "results": [asdict(r) for r in results]},
                                              indent=2))
    return 0 if all(r.ok for r in results if r.tied_sync) else 1
