"""This rank's stages: from a conversion's stage files (each rank reads only its own), or by converting SOURCE here.

Reading stage files needs the manifest and the stage files only; converting a NAME needs
the converter, imported only then.
"""

import gc
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from fxconvert import families, manifest
from fxconvert.errors import RandomWeightsRefused, UsageError, printable
from fxconvert.families import stored
from fxconvert.objectives import SEQ2SEQ
from fxconvert.stage_files import load_pipeline
from fxconvert.training.grad_sync import Topology
from fxconvert.training.recompute import chosen_blocks, describe, recompute_blocks


def check_source_stages(source: str, topo: Topology) -> None:
    """A conversion's stage count (pipeline.json's num_stages, read cheaply) against the launch.

    A launch of the wrong size otherwise failed first on the microbatch checks, which
    assume the launch's stage count, and sent the user to change the wrong option. A
    pipeline.json that does not parse is left to `load_model` to report; one that is no
    regular file (a FIFO would block every rank here) is refused before it is read.
    """
    path = Path(source).expanduser()
    file = path / manifest.FILE
    if file.exists() and not file.is_file():
        raise UsageError(f"{printable(file)} is not a regular file; convert again with --stages N")
    if not file.is_file():
        return
    try:
        count = manifest.read(path).num_stages
    except manifest.ManifestError:
        return
    _check_stage_count(path, count, topo)


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
    recompute: str | None = None  # the start line naming the blocks each stage recomputes (`fxconvert.training.recompute`)


def _read_config(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"cannot read {path}: {e}; reconvert with --stages N") from None


def load_model(cfg, topo: Topology, device: torch.device) -> Model:
    """This rank's stage modules, from stage files or by converting SOURCE here."""
    path = Path(cfg.source).expanduser()
    if path.is_dir() and (path / manifest.FILE).is_file():
        return _from_stage_files(path, topo, device, cfg.recompute)
    if path.is_dir() and (path / "model.py").is_file() and not (path / manifest.FILE).exists():
        raise UsageError(f"{cfg.source} is a conversion without stages (no pipeline.json); reconvert it with "
                         f"`python -m fxconvert CKPT --stages {topo.num_stages} --out DIR` or pass the checkpoint")
    return _from_name(cfg, path, topo, device)


def _from_stage_files(path: Path, topo: Topology, device: torch.device, recompute: str) -> Model:
    pipeline = load_pipeline(path)
    _check_stage_count(path, pipeline.num_stages, topo)
    if pipeline.output_name != "loss":
        raise UsageError(f"{path} returns {pipeline.output_name!r}, not the loss; reconvert without --output "
                         f"(training needs the model's loss, from labels)")
    _derived_record(path, pipeline.model_class, pipeline.model_type)
    _check_inputs(path, pipeline.model_class, {n for s in pipeline.stages for n in s.inputs})
    config = _read_config(path / pipeline.config)
    _check_token_ids(path / pipeline.config, pipeline.manifest.token_ids, config)
    blocks = [s.blocks for s in pipeline.stages]
    plan = pipeline.manifest.plan
    where = f"the plan in {manifest.FILE}"
    chosen = chosen_blocks(recompute, blocks, plan.recompute if plan else None, where=where)
    parts = {}
    for i in topo.my_stages:
        module = pipeline.load_stage(i, device=str(device))
        recompute_blocks(module, blocks[i], chosen[i], index=i)
        parts[i] = StagePart(i, module.train(), list(pipeline.stages[i].inputs))
    shared = {name: list(info.stages) for name, info in pipeline.shared_weights.items()}
    return Model(parts, pipeline.num_stages, shared, config, pipeline_dir=path,
                 tokenizer_dir=path, recompute=describe(recompute, chosen, where=where))


def _check_token_ids(where: Path, recorded: dict, config: dict) -> None:
    """Refuse a config.json whose token ids differ from those the stages were converted with (pipeline.json's
    `token_ids`): the graph treats the recorded pad_token_id as padding (RoBERTa's positions, a decoder-only
    classifier's pooled token), so batches padded with another id would train on wrong values, silently."""
    for name, value in recorded.items():
        now = config.get(name) if isinstance(config, dict) else None
        if type(now) is not type(value) or now != value:
            raise UsageError(f"{printable(where)} has {name} = {printable(json.dumps(now))[:40]}, but the stages were "
                             f"converted with {name} = {json.dumps(value)}, which their graph was traced with; set "
                             f"{name} back to {json.dumps(value)} in config.json, or convert the edited checkpoint "
                             f"again")


def _check_record(model_class: str, model_type) -> None:
    """Refuse converting a model here whose family record is derived from transformers' declarations
    (`fxconvert.families.derived`): its stage files carry the record (`_derived_record`), this path not yet."""
    family = families.family_of_class(model_class)
    if model_type is None or (family is not None and not family.derived_from):
        return  # no transformers model (a plain module), or one with a hand-written record
    trained = ", ".join(f.title.split(" (")[0] for f in families.all_families() if f.objective is not None)
    raise UsageError(f"training a {printable(model_type)} model needs a hand-written family record, which "
                     f"{printable(model_class)} has not (it converts with one derived from transformers' "
                     f"declarations); convert it with --stages N and train the conversion, or train {trained} models")


# Seq2seq types whose transformers model, given labels alone, starts the decoder with each row's last label token
# (mBART's language id) rather than decoder_start_token_id: the seq2seq batches would train another model. The
# set is checked against transformers' shift_tokens_right (tests/test_family_stored.py).
LAST_TOKEN_START = frozenset({"mbart", "plbart"})


def _derived_record(path: Path, model_class: str, model_type) -> None:
    """Rebuild and register the record of stages converted with a derived one, from the conversion's family.json
    (`fxconvert.families.stored`): a rank has no transformers to derive it again. Any record with an objective
    trains (a seq2seq model's batches shift the decoder inputs from the labels, as transformers'
    encoder-decoders do when given labels alone); one without (a head that computes no loss) is refused."""
    family = families.family_of_class(model_class)
    if model_type is None or (family is not None and not family.derived_from):
        return  # no transformers model (a plain module), or one with a hand-written record
    family = stored.read_family(path, model_class, model_type)
    if family.objective is None:
        trained = ", ".join(f.title.split(" (")[0] for f in families.all_families() if f.objective is not None)
        raise UsageError(f"training a {printable(model_type)} model whose record has no objective needs a "
                         f"hand-written family record, which {printable(model_class)} has not; fxconvert.train trains "
                         f"the causal LMs, seq2seq models, masked LMs and sequence classifiers of derived records "
                         f"(a *ForCausalLM, *ForConditionalGeneration, *ForMaskedLM or *ForSequenceClassification "
                         f"class) and {trained} models")
    if family.objective == SEQ2SEQ and model_type in LAST_TOKEN_START:
        raise UsageError(f"training a {printable(model_type)} model needs a hand-written family record, which "
                         f"{printable(model_class)} has not: its decoder starts with each row's last label token (the "
                         f"language id), not the decoder_start_token_id the seq2seq batches start with; train another "
                         f"derived seq2seq type (marian, pegasus, m2m_100, ...)")
    families.register_derived(family)


def _check_inputs(where, model_class: str, inputs: set) -> None:
    """Refuse stages that read an input the data does not give (the family's `train_inputs`)."""
    family = families.family_of_class(model_class) or families.family_of_class("T5ForConditionalGeneration")
    given = family.train_inputs  # a class of no family is trained as seq2seq (`dataset.load_data`)
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


def _from_name(cfg, path: Path, topo: Topology, device: torch.device) -> Model:
    import transformers

    from fxconvert import workflow  # the converter, only for a SOURCE to convert here

    transformers.utils.logging.disable_progress_bar()
    try:
        split = workflow.split(cfg.source, topo.num_stages, offline=cfg.offline, seed=cfg.seed,
                               allow_random=cfg.allow_random, check=lambda c: _check_conversion(cfg.source, c),
                               optimizer=cfg.optimizer or "adamw")
    except RandomWeightsRefused as e:
        raise UsageError(f"{e.why}: give a checkpoint directory, or pass --allow-random to train from random "
                         f"weights") from e
    conversion, stages = split.conversion, split.stages
    blocks = [spec.blocks for spec in stages.specs]
    where = "the split's plan"
    chosen = chosen_blocks(cfg.recompute, blocks, getattr(stages.plan, "recompute", ()), where=where)
    parts = {}
    for i in topo.my_stages:
        module = stages.stage_module(i).train().to(device)
        recompute_blocks(module, blocks[i], chosen[i], index=i)
        parts[i] = StagePart(i, module, list(stages.specs[i].inputs))
    shared = {name: [s.index for s in stages.specs if name in s.shared_weights] for name in conversion.shared_weights}
    config = conversion.model.config.to_dict()
    config["architectures"] = [conversion.model_class]
    for note in split.notes if topo.rank == 0 else ():
        print(f"fxconvert.train: warning: {printable(note)}", file=sys.stderr, flush=True)
    # What a conversion directory would hold besides stage files and weights (pipeline.json, config.json,
    # tokenizer files): RUN/hf's export reads them from a directory written at export time.
    files, tokenizer_dir = split.files, split.tokenizer_dir
    del conversion, stages, split
    gc.collect()  # the whole model was here; keep only this rank's stages
    return Model(parts, topo.num_stages, shared, config, export_files=files, tokenizer_dir=tokenizer_dir,
                 recompute=describe(cfg.recompute, chosen, where=where))


def _check_conversion(source, conversion) -> None:
    """A conversion a trainer can run, checked before it is split."""
    if conversion.output_name != "loss":
        raise UsageError(f"{source} is a {conversion.model_class}, which computes no loss; train a class "
                         f"with a language-model head")
    _check_record(conversion.model_class, getattr(getattr(conversion.model, "config", None), "model_type", None))
    _check_inputs(source, conversion.model_class, set(conversion.input_names))
    if conversion.source is not None and conversion.source.device == "meta":
        raise UsageError(f"{source} has no weights here (built on the meta device); convert a checkpoint")
