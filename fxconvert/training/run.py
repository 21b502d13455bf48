"""A run prepared: every check that can be made before a process group or a file exists, the same on every
rank; RUN's lock, marker, checkpoints and export."""

import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist

from fxconvert.errors import FxConvertError, UsageError, printable
from fxconvert.export import check_destination, export_hf
from fxconvert.training import compiled, evaluate, optim, planned, retention, run_lock, tensorboard
from fxconvert.training.checkpoint import (CHECKPOINTS, changed_options, check_checkpoints_dir, check_meta,
                                           latest_checkpoint, read_meta, rng_state, save_checkpoint)
from fxconvert.training.config import Launch, TrainConfig, check_options, with_steps
from fxconvert.training.dataset import Data, load_data
from fxconvert.training.grad_sync import Topology
from fxconvert.training.model import Model, load_model


@dataclass
class Run:
    cfg: TrainConfig
    launch: Launch
    topo: Topology
    device: torch.device
    model: Model
    data: Data
    run_dir: Path
    resume_from: Path | None = None
    where: str = ""
    optimizers: dict = field(default_factory=dict)
    schedulers: dict = field(default_factory=dict)  # stage -> its optimizer's LambdaLR (`lr_schedule`)
    lock: int | None = None  # rank 0: the descriptor holding RUN's lock (`fxconvert.training.run_lock`)
    eval_data: Data | None = None  # --eval-data (`fxconvert.training.evaluate`)
    eval_losses: dict = field(default_factory=dict)  # step -> eval loss, recorded in that step's checkpoint
    kept: set = field(default_factory=set)  # checkpoints --keep-last left for holding files of others, said once


RUN_MARKER = ".fxconvert-run"  # written into RUN when a run starts; --resume continues only such a directory
RUN_OWN = (CHECKPOINTS, "hf", "metrics.jsonl", RUN_MARKER, run_lock.LOCK)  # what fxconvert writes in RUN


def resume_fields(cfg: TrainConfig, topo: Topology, data: "Data | None" = None) -> dict:
    """What a checkpoint must share with the run that resumes it for the two to be one run (RESUME_FIELDS).

    The data file is named by its resolved path and, once `data` is read, identified by the
    sha256 of the bytes its examples came from (read once, when they were checked), so an
    edit of the same size is noticed and a file changed during the run changes no record.
    """
    source = Path(cfg.source).expanduser()
    data_path = Path(cfg.data).expanduser()
    data_id = str(data_path.resolve()) if data_path.exists() else str(data_path)
    content = {"data_sha256": data.sha256} if data is not None and data.sha256 is not None else {}
    return {**content, "model": str(source.resolve()) if source.exists() else str(cfg.source),
            "num_stages": topo.num_stages, "virtual_stages": cfg.virtual_stages, "dp": cfg.dp,
            "world_size": topo.world_size, "schedule": cfg.schedule, "optimizer": cfg.optimizer,
            "batch": cfg.batch, "grad_accum": cfg.grad_accum, "microbatches": cfg.microbatches,
            "shuffle": cfg.shuffle, "seed": cfg.seed,
            "dtype": cfg.dtype, "data": data_id, "max_source_length": cfg.max_source_length,
            "max_target_length": cfg.max_target_length, "weight_decay": cfg.weight_decay}


def _meta(run: Run, step: int) -> dict:
    evaluated = {"eval_loss": run.eval_losses[step], "eval_id": evaluate.identity(run)} \
        if step in run.eval_losses else {}
    return {"step": step, "data_position": step * run.cfg.grad_accum * run.cfg.dp,
            **resume_fields(run.cfg, run.topo, run.data), **evaluated, "args": asdict(run.cfg)}


def _warn_once(launch: Launch):
    """A warning printed once per machine (local rank 0), before any process group exists."""
    def warn(message: str) -> None:
        if launch.local_rank == 0:
            print(f"fxconvert.train: warning: {printable(message)}", file=sys.stderr, flush=True)

    return warn


def prepare(cfg: TrainConfig, launch: Launch) -> Run:
    """Everything that can be checked before a process group or a file exists, on every rank alike."""
    cfg, topo = check_options(cfg, launch)
    cfg = replace(cfg, optimizer=optim.choose(cfg, warn=_warn_once(launch)))
    departs = planned.warning(planned.read(cfg.source), cfg)
    if departs:
        _warn_once(launch)(departs)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(launch.local_rank)
        device = torch.device("cuda", launch.local_rank)
    run_dir = Path(cfg.out).expanduser()
    resume_from = None
    source = Path(cfg.source).expanduser()
    if source.exists() and (run_dir.resolve() == source.resolve() or source.resolve() in run_dir.resolve().parents):
        raise UsageError(f"--out {cfg.out} is inside SOURCE {cfg.source}; choose an --out outside the conversion")
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--out {cfg.out} exists and is not a directory; choose another --out")
    if launch.rank == 0:
        run_lock.check(run_dir, shown=cfg.out)  # another run in it: say so (`lock_run` takes the lock)
    check_checkpoints_dir(run_dir)  # a symlinked run/checkpoints: saving would write and clean up through it
    if cfg.save_best:
        retention.check_best(run_dir, shown=cfg.out)
    _check_metrics_file(run_dir, shown=cfg.out)  # a resume rewrites it
    if cfg.tensorboard is not None:
        tensorboard.check(cfg.tensorboard, run_dir=run_dir, own=RUN_OWN, source=cfg.source)
    if run_dir.is_dir() and any(p.name != run_lock.LOCK for p in run_dir.iterdir()):
        if not cfg.resume:
            raise UsageError(f"--out {cfg.out} exists and is not empty; pass --resume to continue it, "
                             f"or choose another --out")
        if not (run_dir / RUN_MARKER).is_file():
            raise UsageError(f"--out {cfg.out} was not written by fxconvert.train (it has no {RUN_MARKER}); "
                             f"choose another --out")
        resume_from = latest_checkpoint(run_dir, warn=_warn_once(launch))
        if resume_from is None:
            raise UsageError(f"--resume, but {cfg.out} has no complete checkpoint (they are written with "
                             f"--save-every K); train into a new --out")
        meta = read_meta(resume_from)
        check_meta(meta, resume_fields(cfg, topo), path=resume_from)
        if cfg.steps is not None:
            _check_resume_step(cfg, meta, resume_from)
    if not cfg.no_export:
        try:
            check_destination(run_dir / "hf")
        except FxConvertError as e:
            raise UsageError(str(e)) from None
    ranks = f"{topo.world_size} rank{'s' if topo.world_size > 1 else ''}"
    say(launch, f"loading {cfg.source} ({topo.num_stages} stage{'s' if topo.num_stages > 1 else ''} on {ranks}) ...",
        startup=True)
    model = load_model(cfg, topo, device)
    compiled.check_recompute(cfg, model.recompute)
    topo.shared_stages = model.shared_stages
    say(launch, f"reading data: {cfg.data} ...", startup=True)
    data = load_data(cfg, model)
    say(launch, f"reading data: {len(data)} lines", startup=True)  # checked: each rank reads only its batches' lines
    eval_data = load_data(cfg, model, held_out=True) if cfg.eval_data is not None else None
    if cfg.steps is None:
        cfg = with_steps(cfg, len(data.examples))
        if resume_from is not None:
            _check_resume_step(cfg, meta, resume_from)
    run = Run(cfg, launch, topo, device, model, data, run_dir, resume_from, eval_data=eval_data)
    if resume_from is not None:  # the data's content (and --epochs' steps), now that it is read
        check_meta(meta, resume_fields(cfg, topo, data), path=resume_from)
        say(run, f"resuming from {resume_from} (step {meta.get('step', 0)} of {cfg.steps})")
        for line in changed_options(meta.get("args", {}), asdict(cfg)):
            say(run, line)
    return run


def _check_resume_step(cfg: TrainConfig, meta: dict, resume_from: Path) -> None:
    step = meta.get("step", 0)
    how, option = (f"--epochs {cfg.epochs} ({cfg.steps} steps)", "--epochs") if cfg.epochs is not None else \
        (f"--steps {cfg.steps}", "--steps")
    if step > cfg.steps:
        raise UsageError(f"{resume_from} is step {step}, past {how}; raise {option} to train on")
    if cfg.measure_memory and step + 2 > cfg.steps:
        more = "" if cfg.epochs is not None else f" to {step + 2} or more"
        raise UsageError(f"--measure-memory measures the second step a run takes, but {resume_from} is step "
                         f"{step} of {how}; raise {option}{more}")


def _check_metrics_file(run_dir: Path, *, shown: str) -> None:
    """Refuse a RUN/metrics.jsonl that is a symlink or not a regular file: a resume rewrites it, and
    would empty whatever it points to (`_open_metrics` checks again when it opens it)."""
    path = run_dir / "metrics.jsonl"
    if path.is_symlink():
        raise UsageError(f"--out {shown}: metrics.jsonl is a symlink; fxconvert rewrites it on --resume only as a "
                         f"regular file of the run: replace it with one, or train into a new --out")
    if path.exists() and not path.is_file():
        raise UsageError(f"--out {shown}: metrics.jsonl is not a regular file; move it away, or train into a "
                         f"new --out")


def lock_run(run: Run) -> None:
    """Rank 0 holds RUN's lock until its process ends (`fxconvert.training.run_lock`), before the run writes anything.

    `prepare` looked at RUN before the lock was held; a run that went through it in the
    meantime (started and ended, or wrote a newer checkpoint) makes this one stop.
    """
    if run.launch.rank != 0:
        return
    run.lock = run_lock.take(run.run_dir, shown=run.cfg.out, create=True)
    if run.resume_from is None:
        changed = any(p.name != run_lock.LOCK for p in run.run_dir.iterdir())
    else:
        changed = latest_checkpoint(run.run_dir) != run.resume_from
    if changed:
        os.close(run.lock)
        run.lock = None
        raise UsageError(f"--out {run.cfg.out} was written by another run while this one started; run again "
                         f"(with --resume to continue it)")


def say(run: "Run | Launch", message: str, *, startup: bool = False) -> None:
    """A status line, from global rank 0 only (every rank knows the same); control characters escaped
    (`--out` is the user's: a newline or ESC in it would fake or colour a line).

    `startup`: what start-up is doing before the first step ("loading ...", "joining ..."), said on a
    terminal only, where someone waits for it; a log keeps to the run's results, and the output of a
    run that fails to start stays its one-line error.
    """
    rank = run.launch.rank if isinstance(run, Run) else run.rank
    if rank == 0 and (not startup or sys.stderr.isatty()):
        print(printable(message), file=sys.stderr, flush=True)


def save(run: Run, step: int) -> None:
    """Checkpoint `step` (`fxconvert.training.checkpoint`): replica 0 writes the stages (their optimizer state
    consolidated under `--zero`: `optim.state_to_save`), every rank its RNG."""
    optimizer_states = {i: optim.state_to_save(o, run.topo) for i, o in sorted(run.optimizers.items())}
    states = {}
    if run.topo.replica == 0:
        states = {i: {"model": part.module.state_dict(), "optimizer": optimizer_states[i],
                      "scheduler": run.schedulers[i].state_dict()} for i, part in run.model.parts.items()}
    save_checkpoint(run.run_dir, step, rank=run.topo.rank, world_size=run.topo.world_size, states=states,
                    rng=rng_state(), meta=_meta(run, step), barrier=dist.barrier)


def export(run: Run) -> None:
    """RUN/hf (`fxconvert.export`): the trained stages as a transformers checkpoint."""
    barrier = dist.barrier
    states = {i: part.module.state_dict() for i, part in run.model.parts.items()} if run.topo.replica == 0 else {}
    if run.model.pipeline_dir is not None:
        export_hf(run.run_dir / "hf", pipeline_dir=run.model.pipeline_dir, states=states, rank=run.topo.rank,
                  barrier=barrier)
        return
    with tempfile.TemporaryDirectory(prefix="fxconvert-export-") as tmp:  # on every rank: no shared files needed
        for name, content in run.model.export_files.items():
            (Path(tmp) / name).write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
        export_hf(run.run_dir / "hf", pipeline_dir=tmp, states=states, rank=run.topo.rank, barrier=barrier)
