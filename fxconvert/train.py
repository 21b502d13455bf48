"""`python -m fxconvert.train`: fine-tune a converted model with pipeline parallelism, launched by torchrun.

    torchrun --nproc-per-node 4 -m fxconvert.train conv/ --data train.jsonl --out run/ \\
        --steps 1000 --batch 32 --microbatches 8 --schedule 1f1b --lr 1e-4 --optimizer adamw

SOURCE is a conversion written with `python -m fxconvert CKPT --stages N` (each rank
imports its own `stage_<i>.py` and reads only that stage's tensors, so no rank ever holds
the whole model), or any name `fxconvert` accepts, which every rank then converts and
splits the same way (each rank holds the whole model while it converts).

How a run is laid out (see `fxconvert.grad_sync` for the ranks):

- world size = pipeline ranks x `--dp`; stages = pipeline ranks x `--virtual-stages`;
  stage i runs on pipeline rank i % pipeline ranks. The rendezvous is torchrun's env://
  (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so multi-machine launches work unchanged;
  gloo on CPU, nccl on CUDA.
- Data (`fxconvert.data`): replica r at step s trains on global batch s*dp + r; every rank
  reads the file and builds its replica's batch; `torch.distributed.pipelining` splits it
  into `--microbatches` equal microbatches. A batch is padded to its own longest sequences,
  so shapes change between steps; a pipeline stage fixes its buffers at its first step,
  so each rank keeps one `PipelineStage` + schedule per shape (a few, least recently used
  dropped), built the same way on every rank of the replica.
- Loss: the last stage returns the converted graph's loss (transformers' own: the mean
  over that microbatch's target tokens), the schedule's `loss_fn` passes it through, and
  the schedule divides the accumulated gradients by the number of microbatches
  (`scale_grads=True`): a step's objective is the mean of the microbatch losses, as in
  eager gradient accumulation. The loss reported per step is that mean (over replicas too).
- Tied weights, replicas and `--max-grad-norm`: `fxconvert.grad_sync`.
- `--dtype bfloat16`: each stage's forward runs under `torch.autocast(bfloat16)`; the
  weights, their gradients and the optimizer state stay float32 (master weights), and
  the values sent between stages are float32, as torch's stage buffers are fixed by a
  metadata pass that autocast does not see.
- Checkpoints (`fxconvert.checkpoint`) every `--save-every` steps, with every rank's RNG
  state; `--resume` continues from the latest complete one. Everything that decides a step
  (weights, optimizer state, the batch index, RNG) is restored, so a resumed run repeats
  the uninterrupted run's losses and weights bit for bit (float32 on CPU).
- Output: `RUN/hf/` (`fxconvert.export.export_hf`: a sharded transformers checkpoint written
  stage by stage) and `RUN/metrics.jsonl` (one line per step).

Errors: a bad option, SOURCE or data line is found by every rank alike before any process
group or file exists, and printed once per machine as one line (exit 2, or 1 for a
failure). A failure during training is printed by each rank as `fxconvert.train: error:
rank R (stage S, replica D): ...` (exit 1). A rank that dies breaks its neighbours'
connections at once, and one that hangs makes their next collective time out after
`--timeout`; torchrun then stops every other worker. Each line names the rank that failed
first, found with a heartbeat in torchrun's store (`fxconvert.heartbeat`).
"""

import argparse
import gc
import json
import math
import os
import re
import signal
import sys
import tempfile
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch

from fxconvert import families
from fxconvert.errors import FxConvertError, UsageError
from fxconvert.grad_sync import Topology

PROG = "python -m fxconvert.train"
SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b")
OPTIMIZERS = ("sgd", "adamw")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
INPUT_NAMES = ("input_ids", "attention_mask", "decoder_input_ids", "labels")  # what the data gives (T5, BART)
SHAPE_CACHE = 8  # pipeline stages (with their buffers) kept per rank, one per batch shape
# Outside these, a value passed the checks and failed later without naming its option: a timeout
# under a second times out the rendezvous itself, one over a year overflows torch's timedelta to
# milliseconds, and a learning rate over 1000 only makes weights inf (no optimizer here needs one).
TIMEOUT_RANGE = (1.0, 365 * 24 * 3600.0)
MAX_LR = 1000.0


class TrainError(FxConvertError):
    """Training failed (a rank died, a collective timed out, a step produced no loss)."""


# -- options --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    trained = ", ".join(f.title.split(" (")[0] for f in families.all_families() if f.objective is not None)
    p = argparse.ArgumentParser(prog=PROG, description=f"fine-tune a converted model ({trained}) with pipeline "
                                                       f"parallelism, launched by torchrun.")
    p.add_argument("source", metavar="SOURCE",
                   help="a conversion directory written with --stages N, or a name fxconvert accepts")
    p.add_argument("--data", required=True, metavar="FILE.jsonl",
                   help='one {"input": str, "target": str} or {"input_ids": [...], "labels": [...]} per line')
    p.add_argument("--out", required=True, metavar="RUN", help="run directory: metrics.jsonl, checkpoints/, hf/")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    p.add_argument("--batch", type=int, default=8, help="examples per step and replica (default 8)")
    p.add_argument("--microbatches", type=int, default=None, help="microbatches per batch (default: the stages)")
    p.add_argument("--schedule", choices=SCHEDULES, default="1f1b")
    p.add_argument("--virtual-stages", type=int, default=1, metavar="V",
                   help="stages per pipeline rank (V > 1 needs --schedule interleaved-1f1b)")
    p.add_argument("--dp", type=int, default=1, metavar="R", help="data-parallel replicas of the pipeline")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                   help="bfloat16: bf16 autocast, float32 weights and optimizer state")
    p.add_argument("--max-grad-norm", type=float, default=None, help="clip by the whole model's gradient norm")
    p.add_argument("--save-every", type=int, default=None, metavar="K", help="checkpoint every K steps")
    p.add_argument("--resume", action="store_true", help="continue RUN from its latest complete checkpoint")
    p.add_argument("--shuffle", action="store_true", help="a seeded permutation of the data per epoch")
    p.add_argument("--seed", type=int, default=0, help="data order, dropout, and random weights of a preset")
    p.add_argument("--max-source-length", type=int, default=None)
    p.add_argument("--max-target-length", type=int, default=None)
    p.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                   help="how long a rank waits for the others before failing (default 300)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--offline", action="store_true", help="never contact the Hugging Face Hub for SOURCE")
    p.add_argument("--allow-random", action="store_true", help="when SOURCE resolves to no weights (a preset, a "
                   "config), train from random weights instead of refusing")
    p.add_argument("--no-export", action="store_true", help="do not write RUN/hf at the end")
    p.add_argument("-v", "--verbose", action="store_true", help="print a failing rank's traceback before its line")
    return p


@dataclass
class Launch:
    """What torchrun (or the environment) says about this process."""

    rank: int
    world_size: int
    local_rank: int

    @classmethod
    def from_env(cls) -> "Launch":
        def number(name, default):
            value = os.environ.get(name, default)
            try:
                return int(value)
            except ValueError:
                raise UsageError(f"{name}={value!r} is not an integer; launch with torchrun") from None

        launch = cls(number("RANK", "0"), number("WORLD_SIZE", "1"), number("LOCAL_RANK", "0"))
        if not 0 <= launch.rank < launch.world_size:
            raise UsageError(f"RANK {launch.rank} is not below WORLD_SIZE {launch.world_size}; launch with torchrun")
        return launch


def check_options(args, launch: Launch) -> Topology:
    """Every check of the options (and of a conversion's stage count, which they depend on); the same on
    every rank. Returns the layout (without groups)."""
    positive = {"--steps": args.steps, "--batch": args.batch, "--virtual-stages": args.virtual_stages,
                "--dp": args.dp}
    if args.microbatches is not None:
        positive["--microbatches"] = args.microbatches
    if args.save_every is not None:
        positive["--save-every"] = args.save_every
    for option, value in positive.items():
        if value < 1:
            raise UsageError(f"{option} must be at least 1, got {value}")
    for option, value in (("--lr", args.lr), ("--timeout", args.timeout), ("--max-grad-norm", args.max_grad_norm)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UsageError(f"{option} must be a positive number, got {value}")
    if args.lr > MAX_LR:
        raise UsageError(f"--lr must be at most {MAX_LR:g}, got {args.lr:g}")
    if not TIMEOUT_RANGE[0] <= args.timeout <= TIMEOUT_RANGE[1]:
        raise UsageError(f"--timeout must be from {TIMEOUT_RANGE[0]:.0f} to {TIMEOUT_RANGE[1]:.0f} seconds (a year), "
                         f"got {args.timeout:g}")
    if not 0 <= args.seed < 2**63 // 1000 - 1000:
        raise UsageError(f"--seed must be an integer from 0 to {2**63 // 1000 - 1001}, got {args.seed}")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        raise UsageError(f"--weight-decay must be a non-negative number, got {args.weight_decay}")
    if launch.world_size % args.dp:
        raise UsageError(f"{launch.world_size} processes do not split into --dp {args.dp} replicas; launch a "
                         f"multiple of {args.dp} processes (pipeline ranks x replicas)")
    if args.virtual_stages > 1 and args.schedule != "interleaved-1f1b":
        raise UsageError(f"--virtual-stages {args.virtual_stages} needs --schedule interleaved-1f1b")
    if args.schedule == "interleaved-1f1b" and args.virtual_stages < 2:
        raise UsageError("--schedule interleaved-1f1b needs --virtual-stages 2 or more (stages per rank)")
    topo = Topology(world_size=launch.world_size, dp=args.dp, virtual_stages=args.virtual_stages,
                    shared_stages={}, rank=launch.rank)
    _check_source_stages(args, topo)  # before the microbatch checks, which depend on the stage count
    stages, pipeline_ranks = topo.num_stages, topo.pipeline_ranks
    if args.microbatches is None:
        args.microbatches = stages
    m = args.microbatches
    if args.batch % m:
        raise UsageError(f"--batch {args.batch} does not split into {m} equal microbatches; "
                         f"make --batch a multiple of --microbatches")
    if args.schedule == "1f1b" and m < stages:
        raise UsageError(f"--schedule 1f1b needs at least as many microbatches as stages ({m} < {stages}); "
                         f"raise --microbatches to {stages} or more")
    if args.schedule == "interleaved-1f1b":
        rounds = max(1, m // pipeline_ranks)
        if m % rounds:
            raise UsageError(f"--schedule interleaved-1f1b needs --microbatches to be a multiple of "
                             f"{rounds} with {pipeline_ranks} pipeline ranks; use e.g. {pipeline_ranks * rounds}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but CUDA is not available; use --device cpu")
    return topo


def _check_source_stages(args, topo: Topology) -> None:
    """A conversion's stage count (pipeline.json's num_stages, read cheaply) against the launch.

    A launch of the wrong size otherwise failed first on the microbatch checks, which
    assume the launch's stage count, and sent the user to change the wrong option. A
    pipeline.json that does not parse is left to `load_model` to report; one that is no
    regular file (a FIFO would block every rank here) is refused before it is read.
    """
    from fxconvert.errors import printable

    path = Path(args.source).expanduser()
    manifest = path / "pipeline.json"
    if manifest.exists() and not manifest.is_file():
        raise UsageError(f"{printable(manifest)} is not a regular file; convert again with --stages N")
    if not manifest.is_file():
        return
    try:
        count = json.loads((path / "pipeline.json").read_text(encoding="utf-8")).get("num_stages")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return
    if type(count) is int:
        _check_stage_count(path, count, topo)


# -- the model: this rank's stages -------------------------------------------------------------


@dataclass
class StagePart:
    """One stage this rank runs: the module and what it reads."""

    index: int
    module: torch.nn.Module
    inputs: list[str]


@dataclass
class Model:
    """This rank's stages and what the run needs to know about the whole model."""

    parts: dict[int, StagePart]
    num_stages: int
    shared_stages: dict[str, list[int]]
    config: dict
    pipeline_dir: Path | None = None  # a conversion directory (stage files)
    export_files: dict | None = None  # converted here: pipeline.json, config.json, tokenizer files
    tokenizer_dir: Path | None = None


def _read_config(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"cannot read {path}: {e}; reconvert with --stages N") from None


def load_model(args, topo: Topology, device: torch.device) -> Model:
    """This rank's stage modules, from stage files or by converting SOURCE here."""
    path = Path(args.source).expanduser()
    if path.is_dir() and (path / "pipeline.json").is_file():
        return _from_stage_files(path, topo, device)
    if path.is_dir() and (path / "model.py").is_file() and not (path / "pipeline.json").exists():
        raise UsageError(f"{args.source} is a conversion without stages (no pipeline.json); reconvert it with "
                         f"`python -m fxconvert CKPT --stages {topo.num_stages} --out DIR` or pass the checkpoint")
    return _from_name(args, path, topo, device)


def _from_stage_files(path: Path, topo: Topology, device: torch.device) -> Model:
    from fxconvert.pipeline import load_pipeline

    pipeline = load_pipeline(path)
    _check_stage_count(path, pipeline.num_stages, topo)
    if pipeline.output_name != "loss":
        raise UsageError(f"{path} returns {pipeline.output_name!r}, not the loss; reconvert without --output "
                         f"(training needs the model's loss, from labels)")
    _check_inputs(path, pipeline.model_class, {n for s in pipeline.stages for n in s["inputs"]})
    parts = {}
    for i in topo.my_stages:
        module = pipeline.load_stage(i, device=str(device))
        parts[i] = StagePart(i, module.train(), list(pipeline.stages[i]["inputs"]))
    shared = {name: list(info["stages"]) for name, info in pipeline.shared_weights.items()}
    return Model(parts, pipeline.num_stages, shared, _read_config(path / pipeline.config), pipeline_dir=path,
                 tokenizer_dir=path)


def _check_inputs(where, model_class: str, inputs: set) -> None:
    """Refuse stages that read an input the data does not give (the family's `train_inputs`)."""
    family = families.family_of_class(model_class)
    given = family.train_inputs if family is not None else INPUT_NAMES
    unknown = sorted(inputs - set(given))
    if unknown:
        raise UsageError(f"{where}'s stages read {', '.join(unknown)}, which the data does not give; reconvert "
                         f"with the inputs {', '.join(given)}")


def _check_stage_count(where, count: int, topo: Topology) -> None:
    if count != topo.num_stages:
        ranks = count // topo.virtual_stages if count % topo.virtual_stages == 0 else None
        fix = (f"launch {ranks * topo.dp} processes" if ranks else f"choose --virtual-stages dividing {count}")
        raise UsageError(f"{where} has {count} stages, but {topo.world_size} processes with --dp {topo.dp} and "
                         f"--virtual-stages {topo.virtual_stages} run {topo.num_stages}; {fix}, or reconvert with "
                         f"--stages {topo.num_stages}")


def _from_name(args, path: Path, topo: Topology, device: torch.device) -> Model:
    import transformers

    from fxconvert.workflow import convert
    from fxconvert.pipeline import pipeline_files
    from fxconvert.stages import split_stages

    transformers.utils.logging.disable_progress_bar()
    from fxconvert.load import RandomWeightsRefused

    try:
        conversion = convert(args.source, offline=args.offline, seed=args.seed, allow_random=args.allow_random)
    except RandomWeightsRefused as e:
        raise UsageError(f"{e.why}: give a checkpoint directory, or pass --allow-random to train from random "
                         f"weights") from e
    if conversion.output_name != "loss":
        raise UsageError(f"{args.source} is a {conversion.model_class}, which computes no loss; train a class "
                         f"with a language-model head")
    _check_inputs(args.source, conversion.model_class, set(conversion.input_names))
    if conversion.source is not None and conversion.source.device == "meta":
        raise UsageError(f"{args.source} has no weights here (built on the meta device); convert a checkpoint")
    stages = split_stages(conversion, topo.num_stages)
    parts = {}
    for i in topo.my_stages:
        module = stages.stage_module(i).train().to(device)
        parts[i] = StagePart(i, module, list(stages.specs[i].inputs))
    shared = {name: [s.index for s in stages.specs if name in s.shared_weights] for name in conversion.shared_weights}
    config = conversion.model.config.to_dict()
    config["architectures"] = [conversion.model_class]
    # What a conversion directory would hold besides stage files and weights (pipeline.json, config.json,
    # tokenizer files): RUN/hf's export reads them from a directory written at export time.
    files = {name: text for name, text in pipeline_files(stages, conversion).items() if not name.startswith("stage_")}
    from fxconvert.errors import printable
    from fxconvert.pipeline import skipped_tokenizer_files, source_directory

    for note in skipped_tokenizer_files(conversion.source) if topo.rank == 0 else ():
        print(f"fxconvert.train: warning: {printable(note)}", file=sys.stderr, flush=True)

    tokenizer_dir = source_directory(conversion.source)  # a local checkpoint or its Hub cache snapshot
    del conversion, stages
    gc.collect()  # the whole model was here; keep only this rank's stages
    return Model(parts, topo.num_stages, shared, config, export_files=files, tokenizer_dir=tokenizer_dir)


# -- data ---------------------------------------------------------------------------------------


@dataclass
class Data:
    examples: list
    pad_token_id: int
    decoder_start_token_id: int | None
    objective: str = "seq2seq"  # the family's (`Family.objective`): how lines become batches (`fxconvert.data`)
    sha256: str | None = None  # of the bytes the examples were read from: the data's identity on resume

    def batch(self, args, index: int) -> dict[str, torch.Tensor]:
        from fxconvert.data import batch_indices, collate

        rows = batch_indices(len(self.examples), args.batch, index, shuffle=args.shuffle, seed=args.seed)
        return collate([self.examples[i] for i in rows], pad_token_id=self.pad_token_id,
                       decoder_start_token_id=self.decoder_start_token_id, objective=self.objective)

    def tokens(self, args, index: int) -> int:
        """Real input tokens plus target tokens of global batch `index` (for tokens/s)."""
        from fxconvert.data import batch_indices

        rows = batch_indices(len(self.examples), args.batch, index, shuffle=args.shuffle, seed=args.seed)
        return sum(len(self.examples[i].input_ids) + sum(1 for v in self.examples[i].labels if v != -100)
                   for i in rows)


def load_data(args, model: Model) -> Data:
    from fxconvert.data import load_jsonl, load_tokenizer

    config = model.config
    family = families.family_of_class((config.get("architectures") or [""])[0])
    objective = family.objective if family is not None else "seq2seq"
    if objective is None:
        raise UsageError(f"fxconvert.train has no data format for {family.title} models; train a seq2seq "
                         f"(T5, BART), causal LM (GPT-2, Llama-style) or masked LM (BERT) model")
    causal = objective == "causal"
    tokenizer = load_tokenizer(model.tokenizer_dir, required=False) if model.tokenizer_dir is not None else None
    read = load_jsonl(args.data, tokenizer=tokenizer, max_source_length=args.max_source_length,
                      max_target_length=args.max_target_length, vocab_size=config.get("vocab_size"),
                      objective=objective)
    examples = read.examples
    _check_lengths(examples, args, family, config, objective)
    pad, pad_name = config.get("pad_token_id"), "pad_token_id"
    if causal and type(pad) is not int:  # GPT-2 and Llama define none: padding is masked and never learned
        pad, pad_name = config.get("eos_token_id"), "eos_token_id"
        pad = pad[0] if isinstance(pad, list) and pad else pad
    start = config.get("decoder_start_token_id") if objective == "seq2seq" else None
    vocab = config.get("vocab_size")
    for name, value in ((pad_name, pad), ("decoder_start_token_id", start)):
        if type(value) is not int and not (objective != "seq2seq" and name == "decoder_start_token_id"):
            name = "pad_token_id" if name == "eos_token_id" else name
            raise UsageError(f"the model's config has {name} = {value!r}; set it in config.json")
        if type(value) is int and type(vocab) is int and not 0 <= value < vocab:  # the embedding would fail mid-run
            raise UsageError(f"the model's config has {name} = {value}, outside its vocabulary (vocab_size {vocab}); "
                             f"set {'pad_token_id' if name == 'eos_token_id' else name} in config.json to a token id "
                             f"below {vocab}")
    return Data(examples, pad, start, objective, sha256=read.sha256)


def _check_lengths(examples, args, family, config: dict, objective: str) -> None:
    """Refuse examples longer than a learned position table (`Family.max_length`): eager would fail mid-run."""
    field = family.max_length if family is not None else ""
    limit = config.get(field) if field else None
    if type(limit) is not int or not examples:
        return

    def length(e):  # a causal example is one sequence, input then target; a seq2seq one is two
        return len(e.input_ids) + len(e.labels) if objective == "causal" else max(len(e.input_ids), len(e.labels))

    longest = max(range(len(examples)), key=lambda i: length(examples[i]))
    if length(examples[longest]) > limit:
        cut = {"causal": "--max-source-length and --max-target-length that add up to",
               "masked": "--max-source-length of"}.get(objective, "--max-source-length and --max-target-length of")
        raise UsageError(f"{args.data}: example {longest + 1} is {length(examples[longest])} tokens long, more "
                         f"than the model's {field} ({limit}); pass {cut} at most {limit}")


# -- pipeline stages --------------------------------------------------------------------------------


class StageCall(torch.nn.Module):
    """Adapts one stage to the schedule: model inputs arrive as keywords on every stage.

    The schedule passes every rank's keyword arguments to each of its stages, so a rank
    that runs several stages (interleaved) gives each all the model inputs; this picks
    the ones its stage reads. Stage 0 takes them positionally (the schedule's own
    positional argument, the input ids, is only there to mark the first stage's input).
    """

    def __init__(self, part: StagePart, *, autocast: torch.dtype | None, device: torch.device):
        super().__init__()
        self.stage = part.module
        self.index = part.index
        self.inputs = list(part.inputs)
        self.autocast = autocast
        self.device_type = device.type

    def forward(self, *received, **batch):
        if self.index == 0:
            args, kwargs = [batch[n] for n in self.inputs], {}
        else:
            args, kwargs = list(received), {n: batch[n] for n in self.inputs}
        if self.autocast is None:
            return self.stage(*args, **kwargs)
        with torch.autocast(self.device_type, dtype=self.autocast):
            out = self.stage(*args, **kwargs)
        if isinstance(out, tuple):
            return tuple(v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for v in out)
        return out.float()


def _loss_is_output(output, target):
    """The last stage returns the converted graph's loss already."""
    return output


class Schedules:
    """One `PipelineStage` set + schedule per batch shape, least recently used dropped first."""

    def __init__(self, calls: dict[int, StageCall], topo: Topology, args, device: torch.device):
        self.calls, self.topo, self.args, self.device = calls, topo, args, device
        self.cache: OrderedDict = OrderedDict()

    def get(self, batch: dict[str, torch.Tensor]):
        key = tuple(tuple(v.shape) for v in batch.values())
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe,
                                                  ScheduleInterleaved1F1B)

        stages = [PipelineStage(self.calls[i], i, self.topo.num_stages, self.device, group=self.topo.pipeline_group)
                  for i in sorted(self.calls)]
        m = self.args.microbatches
        if self.args.schedule == "interleaved-1f1b":
            schedule = ScheduleInterleaved1F1B(stages, n_microbatches=m, loss_fn=_loss_is_output)
        else:
            cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[self.args.schedule]
            schedule = cls(stages[0], n_microbatches=m, loss_fn=_loss_is_output)
        self.cache[key] = schedule
        while len(self.cache) > SHAPE_CACHE:
            self.cache.popitem(last=False)
        return schedule


# -- progress and metrics --------------------------------------------------------------------------


class Reporter:
    """Metrics lines and the progress line, on the rank that holds the loss (last stage, replica 0)."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int):
        self.path = run_dir / "metrics.jsonl"
        self.total, self.start = total_steps, start_step
        self.began = time.perf_counter()
        self.file = _open_metrics(self.path)
        self._keep_steps_up_to(start_step)
        self.progress = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                                     TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} tokens/s"),
                                     TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True))
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, loss="-", rate="-")
            self.progress.start()

    def _keep_steps_up_to(self, step: int) -> None:
        """On resume, drop lines of steps after the checkpoint (the killed run may have written them).

        A line that is not a metrics record is dropped as well: the last one is expected (a run
        killed while writing leaves part of a line); those before it are counted in one warning
        naming the file and the first of them. The file is a log, not state, so it never stops a
        resume. It is rewritten through the descriptor `_open_metrics` opened, never by its name.
        """
        from fxconvert.errors import printable

        self.file.seek(0)
        lines = self.file.buffer.read().split(b"\n")
        last = max((n for n, raw in enumerate(lines, 1) if raw.strip()), default=0)
        kept, damaged = [], []
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
                record = json.loads(text)
            except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
                record = None
            if not (isinstance(record, dict) and type(record.get("step")) is int):
                if number != last:
                    damaged.append(number)
                continue
            if record["step"] <= step:
                kept.append(text)
        if damaged:
            print(f"fxconvert.train: warning: {printable(self.path)}: dropped {len(damaged)} "
                  f"{'line that is' if len(damaged) == 1 else 'lines that are'} not a metrics record "
                  f"(the first is line {damaged[0]})", file=sys.stderr, flush=True)
        self.file.truncate(0)  # the file is open for appending: what follows lands at its start
        self.file.write("".join(line + "\n" for line in kept))
        self.file.flush()

    def step(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        done = record["step"] - self.start
        elapsed = time.perf_counter() - self.began
        eta = elapsed / done * (self.total - record["step"]) if done else 0.0
        if self.progress is not None:
            self.progress.update(self.task, completed=record["step"], loss=f"{record['loss']:.4f}",
                                 rate=f"{record['tokens_per_s']:,.0f}")
        else:
            print(f"step {record['step']}/{self.total}  loss {record['loss']:.6f}  "
                  f"{record['tokens_per_s']:,.0f} tokens/s  {record['seconds']:.3f} s  ETA {_clock(eta)}",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        self.file.close()


def _open_metrics(path: Path):
    """RUN/metrics.jsonl opened for reading and appending, refused unless it is a regular file.

    `prepare` refuses a symlink or anything else there already; opening without following a
    symlink and checking what was opened closes the window between that check and this open,
    so a resume never rewrites a file outside the run.
    """
    from fxconvert.errors import printable

    from fxconvert.files import open_regular

    try:
        fd = open_regular(path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
    except OSError as e:
        raise UsageError(f"cannot open {printable(path)} ({e.strerror}); it must be a regular file of the run: "
                         f"move it away, or train into a new --out") from None
    except ValueError:
        raise UsageError(f"{printable(path)} is not a regular file; move it away, or train into a new --out") from None
    return os.fdopen(fd, "a+", encoding="utf-8")


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# -- the run ---------------------------------------------------------------------------------------


@dataclass
class Run:
    args: argparse.Namespace
    launch: Launch
    topo: Topology
    device: torch.device
    model: Model
    data: Data
    run_dir: Path
    resume_from: Path | None = None
    where: str = ""
    optimizers: dict = field(default_factory=dict)
    lock: int | None = None  # rank 0: the descriptor holding RUN's lock (`fxconvert.run_lock`)


def _optimizer(args, params) -> torch.optim.Optimizer:
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.lr)
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)


RUN_MARKER = ".fxconvert-run"  # written into RUN when a run starts; --resume continues only such a directory


def resume_fields(args, topo: Topology, data: "Data | None" = None) -> dict:
    """What a checkpoint must share with the run that resumes it for the two to be one run (RESUME_FIELDS).

    The data file is named by its resolved path and, once `data` is read, identified by the
    sha256 of the bytes its examples came from (read once, when they were checked), so an
    edit of the same size is noticed and a file changed during the run changes no record.
    """
    source = Path(args.source).expanduser()
    data_path = Path(args.data).expanduser()
    data_id = str(data_path.resolve()) if data_path.exists() else str(data_path)
    content = {"data_sha256": data.sha256} if data is not None and data.sha256 is not None else {}
    return {**content, "model": str(source.resolve()) if source.exists() else str(args.source),
            "num_stages": topo.num_stages, "virtual_stages": args.virtual_stages, "dp": args.dp,
            "world_size": topo.world_size, "schedule": args.schedule, "optimizer": args.optimizer,
            "batch": args.batch, "microbatches": args.microbatches, "shuffle": args.shuffle, "seed": args.seed,
            "dtype": args.dtype, "data": data_id, "max_source_length": args.max_source_length,
            "max_target_length": args.max_target_length}


def _meta(run: Run, step: int) -> dict:
    args = run.args
    return {"step": step, "data_position": step * args.dp, **resume_fields(args, run.topo, run.data),
            "args": {k: v for k, v in vars(args).items()}}


def _warn_once(launch: Launch):
    """A warning printed once per machine (local rank 0), before any process group exists."""
    from fxconvert.errors import printable

    def warn(message: str) -> None:
        if launch.local_rank == 0:
            print(f"fxconvert.train: warning: {printable(message)}", file=sys.stderr, flush=True)

    return warn


def prepare(args, launch: Launch) -> Run:
    """Everything that can be checked before a process group or a file exists, on every rank alike."""
    topo = check_options(args, launch)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(launch.local_rank)
        device = torch.device("cuda", launch.local_rank)
    run_dir = Path(args.out).expanduser()
    resume_from = None
    source = Path(args.source).expanduser()
    if source.exists() and (run_dir.resolve() == source.resolve() or source.resolve() in run_dir.resolve().parents):
        raise UsageError(f"--out {args.out} is inside SOURCE {args.source}; choose an --out outside the conversion")
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--out {args.out} exists and is not a directory; choose another --out")
    from fxconvert import run_lock
    from fxconvert.checkpoint import check_checkpoints_dir

    if launch.rank == 0:
        run_lock.check(run_dir, shown=args.out)  # another run in it: say so (`lock_run` takes the lock)
    check_checkpoints_dir(run_dir)  # a symlinked run/checkpoints: saving would write and clean up through it
    _check_metrics_file(run_dir, shown=args.out)  # a resume rewrites it
    if run_dir.is_dir() and any(p.name != run_lock.LOCK for p in run_dir.iterdir()):
        if not args.resume:
            raise UsageError(f"--out {args.out} exists and is not empty; pass --resume to continue it, "
                             f"or choose another --out")
        if not (run_dir / RUN_MARKER).is_file():
            raise UsageError(f"--out {args.out} was not written by fxconvert.train (it has no {RUN_MARKER}); "
                             f"choose another --out")
        from fxconvert.checkpoint import check_meta, latest_checkpoint, read_meta

        resume_from = latest_checkpoint(run_dir, warn=_warn_once(launch))
        if resume_from is None:
            raise UsageError(f"--resume, but {args.out} has no complete checkpoint (they are written with "
                             f"--save-every K); train into a new --out")
        meta = read_meta(resume_from)
        check_meta(meta, resume_fields(args, topo), path=resume_from)
        if meta.get("step", 0) > args.steps:
            raise UsageError(f"{resume_from} is step {meta['step']}, past --steps {args.steps}; "
                             f"raise --steps to train on")
    if not args.no_export:
        from fxconvert.export import check_destination

        try:
            check_destination(run_dir / "hf")
        except FxConvertError as e:
            raise UsageError(str(e)) from None
    model = load_model(args, topo, device)
    topo.shared_stages = model.shared_stages
    data = load_data(args, model)
    if resume_from is not None:  # the data's content, now that it is read
        check_meta(meta, resume_fields(args, topo, data), path=resume_from)
    return Run(args, launch, topo, device, model, data, run_dir, resume_from)


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
    """Rank 0 holds RUN's lock until its process ends (`fxconvert.run_lock`), before the run writes anything.

    `prepare` looked at RUN before the lock was held; a run that went through it in the
    meantime (started and ended, or wrote a newer checkpoint) makes this one stop.
    """
    from fxconvert import run_lock
    from fxconvert.checkpoint import latest_checkpoint

    if run.launch.rank != 0:
        return
    run.lock = run_lock.take(run.run_dir, shown=run.args.out, create=True)
    if run.resume_from is None:
        changed = any(p.name != run_lock.LOCK for p in run.run_dir.iterdir())
    else:
        changed = latest_checkpoint(run.run_dir) != run.resume_from
    if changed:
        os.close(run.lock)
        run.lock = None
        raise UsageError(f"--out {run.args.out} was written by another run while this one started; run again "
                         f"(with --resume to continue it)")


def train(run: Run) -> None:
    import torch.distributed as dist

    from fxconvert.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
    from fxconvert.grad_sync import broadcast_initial, clip_global_norm, make_groups, sync_gradients

    args, topo, model = run.args, run.topo, run.model
    make_groups(topo, timeout=timedelta(seconds=args.timeout))
    modules = {i: part.module for i, part in model.parts.items()}
    run.optimizers = {i: _optimizer(args, m.parameters()) for i, m in modules.items()}
    start = 0
    if run.resume_from is not None:
        states, rng, meta = load_checkpoint(run.resume_from, rank=topo.rank, stage_indices=sorted(modules))
        for i, state in states.items():
            modules[i].load_state_dict(state["model"])
            run.optimizers[i].load_state_dict(state["optimizer"])
        set_rng_state(rng)
        start = int(meta["step"])
    else:
        torch.manual_seed(args.seed * 1000 + topo.rank)  # dropout: each rank its own stream
        broadcast_initial(topo, modules)
    if topo.rank == 0:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        marker = run.run_dir / RUN_MARKER
        if not marker.exists():
            marker.write_text(json.dumps({"producer": "fxconvert.train", "source": str(args.source)}) + "\n",
                              encoding="utf-8")
    dist.barrier()
    autocast = torch.bfloat16 if args.dtype == "bfloat16" else None
    calls = {i: StageCall(part, autocast=autocast, device=run.device) for i, part in model.parts.items()}
    schedules = Schedules(calls, topo, args, run.device)
    last = topo.num_stages - 1 in modules
    reporter = Reporter(run.run_dir, args.steps, start) if last and topo.replica == 0 else None
    try:
        for step in range(start, args.steps):
            began = time.perf_counter()
            batch = {k: v.to(run.device) for k, v in run.data.batch(args, step * args.dp + topo.replica).items()}
            for optimizer in run.optimizers.values():
                optimizer.zero_grad(set_to_none=True)
            losses = [] if last else None
            schedules.get(batch).step(batch["input_ids"], target=batch["labels"], losses=losses,
                                      return_outputs=False, **batch)
            sync_gradients(topo, modules)
            if args.max_grad_norm is not None:
                clip_global_norm(topo, modules, args.max_grad_norm)
            _check_finite(modules, losses, step + 1, run.device)
            for optimizer in run.optimizers.values():
                optimizer.step()
            if last:
                loss = torch.stack([v.detach().float() for v in losses]).mean()
                if topo.dp > 1:
                    dist.all_reduce(loss, op=dist.ReduceOp.SUM, group=topo.dp_group)
                    loss /= topo.dp
            if reporter is not None:
                seconds = time.perf_counter() - began
                tokens = sum(run.data.tokens(args, step * args.dp + r) for r in range(args.dp))
                reporter.step({"step": step + 1, "loss": loss.item(), "lr": args.lr,
                               "tokens_per_s": tokens / seconds, "seconds": seconds})
            if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
                _save(run, step + 1, save_checkpoint, rng_state, dist.barrier)
                _say(run, f"saved checkpoint {run.run_dir / 'checkpoints' / f'step_{step + 1}'}")
    finally:
        if reporter is not None:
            reporter.close()
    if args.save_every and start < args.steps:
        _save(run, args.steps, save_checkpoint, rng_state, dist.barrier)
        _say(run, f"saved checkpoint {run.run_dir / 'checkpoints' / f'step_{args.steps}'}")
    if not args.no_export:
        _export(run, dist.barrier)
        _say(run, f"wrote {run.run_dir / 'hf'} (a transformers checkpoint: from_pretrained loads it) and "
                  f"{run.run_dir / 'metrics.jsonl'}")


class NonFiniteError(TrainError):
    """A loss or gradient was nan or inf; every rank raises it at the same step (`_check_finite`)."""


def _check_finite(modules: dict, losses: list | None, step: int, device: torch.device) -> None:
    """Stop every rank before the optimizer step when any rank's loss or gradient is nan or inf.

    One all-reduce of two flags over the world, so all ranks stop at the same step and no
    weight anywhere takes the update: the last checkpoint is the last good state. (Training
    on would report `loss nan` to the end and export nan weights.)
    """
    import torch.distributed as dist

    grads = [p.grad for m in modules.values() for p in m.parameters() if p.grad is not None]
    flags = torch.zeros(2, device=device)
    if losses:
        flags[0] = (~torch.stack([v.detach().float() for v in losses]).isfinite()).any()
    if grads:
        flags[1] = (~torch.stack([g.isfinite().all() for g in grads])).any()
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    if flags.any():
        what = " and ".join(name for name, bad in zip(("loss", "gradient"), flags.tolist()) if bad)
        verb = "are" if flags.all() else "is"
        raise NonFiniteError(f"step {step}: the {what} {verb} not finite (nan or inf), so the run stopped before "
                             f"any weight took it; nothing of step {step} was saved, and --resume continues from "
                             f"the last checkpoint; lower --lr or set --max-grad-norm, or check SOURCE's weights "
                             f"for nan")


def _say(run: Run, message: str) -> None:
    """A status line, from global rank 0 only (every rank knows the same); control characters escaped
    (`--out` is the user's: a newline or ESC in it would fake or colour a line)."""
    from fxconvert.errors import printable

    if run.topo.rank == 0:
        print(printable(message), file=sys.stderr, flush=True)


def _save(run: Run, step: int, save_checkpoint, rng_state, barrier) -> None:
    states = {}
    if run.topo.replica == 0:
        states = {i: {"model": part.module.state_dict(), "optimizer": run.optimizers[i].state_dict()}
                  for i, part in run.model.parts.items()}
    save_checkpoint(run.run_dir, step, rank=run.topo.rank, world_size=run.topo.world_size, states=states,
                    rng=rng_state(), meta=_meta(run, step), barrier=barrier)


def _export(run: Run, barrier) -> None:
    from fxconvert.export import export_hf

    states = {i: part.module.state_dict() for i, part in run.model.parts.items()} if run.topo.replica == 0 else {}
    if run.model.pipeline_dir is not None:
        export_hf(run.run_dir / "hf", pipeline_dir=run.model.pipeline_dir, states=states, rank=run.topo.rank,
                  barrier=barrier)
        return
    with tempfile.TemporaryDirectory(prefix="fxconvert-export-") as tmp:  # on every rank: no shared files needed
        for name, content in run.model.export_files.items():
            (Path(tmp) / name).write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
        export_hf(run.run_dir / "hf", pipeline_dir=tmp, states=states, rank=run.topo.rank, barrier=barrier)


# -- entry point -----------------------------------------------------------------------------------


def _one_line(error: BaseException) -> str:
    """One printable line: our own messages whole (a newline in a path is escaped, not a cut), others' first line."""
    from fxconvert.errors import first_line, printable

    if isinstance(error, FxConvertError):
        return printable(str(error).strip())
    line = printable(first_line(error))
    # gloo's messages: "[.../pair.cc:537] Read error [addr]: Connection reset by peer. This is typically ..."
    line = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\] ", "", line)
    return line.split(". This is typically")[0]


def _describe(topo: Topology, launch: Launch, *, rank: int | None = None) -> str:
    rank = launch.rank if rank is None else rank
    pipeline_rank, replica = divmod(rank, topo.dp)
    stages = topo.stages_of(pipeline_rank)
    listed = ", ".join(str(s) for s in stages)
    return f"rank {rank} (stage{'s' if len(stages) > 1 else ''} {listed}, replica {replica})"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Terminated(Exception):
    pass


EXIT_INTERRUPTED = 130


class _Signals:
    """SIGTERM (torchrun stopping the workers after another one failed, or the launcher gone) and SIGINT
    (Ctrl-C) become one exception, `_Terminated`, raised only inside `guard`ed work and once per guard;
    any other signal is only recorded. So no signal can land in the reporting of a failure (a second
    Ctrl-C, or torchrun's SIGTERM after a first one, used to end a rank with a traceback), and torchrun's
    30 s between SIGTERM and SIGKILL are the reporting's. `received` remembers the first signal: torch
    may wrap the exception in one of its own."""

    MESSAGES = {signal.SIGTERM: "stopped by the launcher (another rank failed, or the run was interrupted)",
                signal.SIGINT: "interrupted"}
    LAUNCHER_GONE = ("stopped: the launcher is gone (torchrun was killed, or its store stopped answering), and its "
                     "workers stop with it; --resume continues from the last checkpoint")

    def __init__(self):
        self.armed = False
        self.raised = False
        self.received = None
        self.heartbeat_lost = lambda: False  # main: whether the heartbeat found the launcher's store gone
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        if self.received is None:
            self.received = signum
        if self.armed and not self.raised:
            self.raised = True
            raise _Terminated(self.MESSAGES[self.received])

    def guard(self, work):
        """`work()`, interruptible: a signal already received, or one arriving during it, raises `_Terminated`.

        At most once per guard, not per process: code inside `work` that catches every
        Exception (transformers and torch have such places) may swallow the one raised in
        it, so a signal received during `work` raises again when it returns (else one
        swallowed Ctrl-C disabled Ctrl-C and SIGTERM for the rest of the run), and every
        later guard raises at once. A signal landing in the `finally` below raises before
        `armed` is cleared: that is the one raise, and the caller's `except` catches it
        like any other.
        """
        self.armed, self.raised = True, False
        try:
            if self.received is None:
                result = work()
            if self.received is not None:  # before `work`, or during it and swallowed there
                self.raised = True
                raise _Terminated(self.MESSAGES[self.received])
            return result
        finally:
            self.armed = False

    def restore(self) -> None:
        """Put back the handlers found (for `main` called in a process that goes on)."""
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    @property
    def message(self) -> str | None:
        from fxconvert.heartbeat import launcher_gone

        if self.received == signal.SIGTERM and (launcher_gone() or self.heartbeat_lost()):
            return self.LAUNCHER_GONE
        return self.MESSAGES[self.received] if self.received is not None else None


def _first_to_say(launch: "Launch", signals: _Signals, grace: float = 2.0) -> bool:
    """Whether this rank prints the problem it found before training: one line per machine.

    Every rank runs the same checks, so local rank 0 speaks for the machine. Another rank
    that found a problem (one local rank 0 may not reach, e.g. in data only it reads, or
    simply sooner) waits `grace` seconds: when local rank 0 fails too, the launcher stops
    this rank in that time and it stays quiet; otherwise it says what it found. A rank
    the launcher stopped says so only as local rank 0.
    """
    if launch.local_rank == 0:
        return True
    deadline = time.monotonic() + grace
    while signals.received is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return signals.received is None


def _nonfinite(error: BaseException | None) -> "NonFiniteError | None":
    """The NonFiniteError behind `error` (a signal's exception may have replaced it), or None."""
    while error is not None and not isinstance(error, NonFiniteError):
        error = error.__context__
    return error


def _report_failure(error: BaseException, run: "Run", heartbeat, signals: _Signals, *,
                    joined: bool = True) -> str | None:
    """One line for this rank's first error, naming the rank that failed first when another one did
    (None: another rank says it). Stopped by the launcher before it `joined` the process group, a rank
    speaks as before any process group (`_first_to_say`: one line per machine), and blames no one."""
    nonfinite = _nonfinite(error)
    if nonfinite is not None:  # every rank found it at once: rank 0 says it (the launcher's SIGTERM is no news)
        return f"fxconvert.train: error: {_one_line(nonfinite)}" if run.launch.rank == 0 else None
    message = signals.message or _one_line(error)
    if signals.received == signal.SIGINT:  # Ctrl-C reaches every rank: nobody failed, nobody to name
        return f"fxconvert.train: error: {_describe(run.topo, run.launch)}: {message}"
    if signals.received is not None and not joined:  # stopped while another rank failed its checks (it says so)
        return f"fxconvert.train: error: {message}" if _first_to_say(run.launch, signals) else None
    waiting = signals.received is None  # a timeout this rank hit waiting may be a late rank's
    culprit = heartbeat.culprit(waiting=waiting) if heartbeat is not None else None  # torchrun allows 30 s
    if culprit is not None and culprit[0] != run.launch.rank:
        rank, what = culprit
        other = Launch(rank, run.launch.world_size, 0)
        message = f"{_describe(run.topo, other, rank=rank)} failed: {what} (here: {message})"
    elif heartbeat is not None and signals.received is None:  # a rank that was stopped is no culprit
        heartbeat.record_failure(message)
    return f"fxconvert.train: error: {_describe(run.topo, run.launch)}: {message}"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--self-check" in argv:
        from fxconvert.pipeline_check import main as self_check

        return self_check([a for a in argv if a != "--self-check"])
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    try:
        launch = Launch.from_env()
    except UsageError as e:
        print(f"{PROG.split()[-1]}: error: {e}", file=sys.stderr)
        return 2
    signals = _Signals()
    try:
        return _main(args, launch, signals)
    finally:
        signals.restore()


def _main(args, launch: Launch, signals: _Signals) -> int:
    if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun: end with it (`fxconvert.heartbeat`)
        from fxconvert.heartbeat import die_with_launcher

        die_with_launcher()
    # Checks before any process group or file: every rank finds the same problem; one line per machine.
    try:
        run = signals.guard(lambda: _prepared(args, launch))
    except Exception as e:
        if not isinstance(e, FxConvertError) and signals.received is None:
            raise  # a bug: its traceback  (with a signal, whatever it interrupted may wrap `_Terminated`)
        if _first_to_say(launch, signals):
            print(f"fxconvert.train: error: {signals.message or _one_line(e)}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED if signals.received else 2 if isinstance(e, UsageError) else 1
    import torch.distributed as dist

    state = {"heartbeat": None, "joined": False}
    try:
        signals.guard(lambda: _start_and_train(run, signals, state))
    except Exception as e:
        if args.verbose:
            traceback.print_exc()
        line = _report_failure(e, run, state["heartbeat"], signals, joined=state["joined"])
        if line is not None:
            print(line, file=sys.stderr, flush=True)
        # No destroy_process_group: with a peer gone it can wait for the whole timeout. The
        # process ends here; its sockets close, which is what its peers notice.
        sys.stdout.flush()
        os._exit(1 if _nonfinite(e) else EXIT_INTERRUPTED if signals.received else 2 if isinstance(e, UsageError)
                 else 1)
    if state["heartbeat"] is not None:
        state["heartbeat"].stop(finished=True)
    dist.destroy_process_group()
    if run.lock is not None:
        os.close(run.lock)
    return 0


def _prepared(args, launch: Launch) -> Run:
    run = prepare(args, launch)
    lock_run(run)
    return run


def _start_and_train(run: Run, signals: _Signals, state: dict) -> None:
    """Join the process group, start the heartbeat (kept in `state` for the report, and `joined`), train."""
    import torch.distributed as dist

    from fxconvert.heartbeat import Heartbeat

    launch = run.launch
    backend = "nccl" if run.device.type == "cuda" else "gloo"
    if launch.world_size == 1:  # plain `python -m fxconvert.train`: a world of one, no launcher
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    def start_heartbeat():
        heartbeat = state["heartbeat"] = Heartbeat(launch.rank, launch.world_size)
        signals.heartbeat_lost = lambda: heartbeat.lost

    # torchrun's store is up before any worker: beating before the rendezvous lets a rank that
    # waited in it name the one still preparing. Elsewhere rank 0 makes the store in init_process_group.
    early = launch.world_size > 1 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if early:
        start_heartbeat()
    dist.init_process_group(backend, rank=launch.rank, world_size=launch.world_size,
                            timeout=timedelta(seconds=run.args.timeout))
    state["joined"] = True
    if launch.world_size > 1 and not early:
        start_heartbeat()
    train(run)


if __name__ == "__main__":
    sys.exit(main())
