"""`fxconvert.workflow`: the one conversion, load -> trace -> passes -> validate -> split -> save.

`run(source, out_dir, options=Options(...))` runs every phase and returns a `Result`. The
command line (`fxconvert.cli`) is one call of it, and the Python API goes through it too:
`convert(model)` runs the phases up to the passes and returns a `Conversion`, whose
`save(dir, ...)` is `run` given that conversion. So the API and the command line write the
same files and the same report (the stage costs included) for the same options.

Each phase reports to a progress object as it runs (`progress.step(name, description,
timings)`, a context manager yielding a `Step` whose `detail` and `ok` the phase fills in;
`progress.warn(message)` for a note the user should see; `progress.failed(result)` before
a failed validation is raised). `Progress` is the silent one the API uses; the command
line's prints a line per phase.

This module is the top of the converter's layers: it imports the phases (`fxconvert.load`,
`.trace`, `.convert`, `.validate`, `.stages`, `.pipeline`, `.report`, `.save`), and none of
them imports it. The data passed up is a `fxconvert.convert.ConvertedGraph`; `Conversion`
adds only `save`.
"""

import contextlib
import dataclasses
import os
import time
import warnings
from dataclasses import dataclass, field

import torch

from fxconvert.convert import ConvertedGraph, convert_traced
from fxconvert.errors import UsageError, with_article
from fxconvert.graph_info import graph_info
from fxconvert.graph_utils import gc_paused
from fxconvert.load import RandomWeightsWarning, check_model_config, load, quiet_transformers
from fxconvert.pipeline import pipeline_files, pipeline_output, skipped_tokenizer_files, source_directory
from fxconvert.report import Report, build_report, diff_section, memory_plan_section, stage_plan_section
from fxconvert.save import Saved, check_destination, save
from fxconvert.stages import Stages, split_stages, stage_blocks, stage_plan, stage_table
from fxconvert.trace import input_name_list, trace_with_stats
from fxconvert.validate import ValidationResult, validate


@dataclass(frozen=True, kw_only=True)
class Options:
    """Every choice of a run; each command-line option sets one field."""

    # load: a model given by name only
    offline: bool = False
    meta: bool = False
    attn: str = "sdpa"
    seed: int = 0  # of random weights, and of validation's random inputs
    dtype: "str | torch.dtype | None" = None
    allow_random: bool = False
    transformers_logs: bool = True  # False: transformers' info logs and progress bars off
    random_weights_warning: bool = True  # False: no RandomWeightsWarning (the caller shows the model's notes)
    # trace and passes
    input_names: "list[str] | None" = None
    output: str | None = None
    keep_traced_code: bool = False
    leaves: bool = True  # False: data-dependent code is refused, not run as a leaf
    # validate
    validate: bool = False
    atol: float | None = None
    rtol: float | None = None
    validation_skipped_by: str | None = None  # with validate False: the option named in the report, and warned
    # split: a number of stages, or `Stages` split from the conversion already
    stages: "int | Stages | None" = None
    balance: str = "time"
    batch: int | None = None
    encoder_length: int | None = None
    decoder_length: int | None = None
    schedule: str = "1f1b"
    microbatches: int | None = None
    optimizer: str = "adamw"
    recompute: str = "auto"
    max_memory: int | None = None  # bytes per stage
    # report and save
    diff: bool = False
    force: bool = False
    force_name: str = "force=True"  # how a refusal names `force` (the command line: --force)


# Report sections beyond the standard ones: (is it asked for, build it). A feature adds a field
# to Options, its flag to the command line, and a pair here.
OPTIONAL_SECTIONS = [
    (lambda options: options.diff, diff_section),
]


@dataclass
class Step:
    """What a phase says of itself once it ran: a one-line `detail`, and whether it went `ok`."""

    detail: str = ""
    ok: bool = True


class Progress:
    """The progress of a run nobody watches: each phase timed into `timings`, nothing shown."""

    @contextlib.contextmanager
    def step(self, name: str, description: str, timings: dict):
        step = Step()
        start = time.perf_counter()
        try:
            yield step
        finally:
            timings[name] = time.perf_counter() - start

    def warn(self, message: str) -> None:
        pass

    def failed(self, result: "Result") -> None:
        pass


@dataclass
class Result:
    """What a run made: the conversion, its validation, the split and the files it adds, and what was saved."""

    conversion: ConvertedGraph
    validation: ValidationResult | None = None
    sections: list = field(default_factory=list)  # report sections beyond the standard ones
    stages: Stages | None = None
    files: dict[str, str | bytes] = field(default_factory=dict)  # stage files, pipeline.json, config.json, ...
    saved: Saved | None = None

    def report(self, detail: bool = True) -> Report:
        """The report; `detail` lists every validated tensor (the files always have it)."""
        return build_report(self.conversion, validation=self.validation, extra=self.sections, detail=detail)


class Conversion(ConvertedGraph):
    """What `convert` returns: the converted graph (`fxconvert.convert.ConvertedGraph`), and `save`."""

    @classmethod
    def of(cls, converted: ConvertedGraph) -> "Conversion":
        return cls(**{f.name: getattr(converted, f.name) for f in dataclasses.fields(converted)})

    def save(self, out_dir, *, force: bool = False, validation=None, diff: bool = False, stages=None) -> Saved:
        """Write model.py, weights.safetensors, report.md and report.json to `out_dir`, atomically.

        An existing directory is refused unless `force`. `validation` (a
        `fxconvert.validate.ValidationResult`) and `diff` add those sections to the reports.
        `stages` (a number of stages, or `fxconvert.stages.Stages` split from this conversion)
        also writes what `--stages` does: stage files, pipeline.json, config.json and the
        tokenizer files (`fxconvert.pipeline`), and the stage table and stage costs in the reports.
        Returns the `fxconvert.save.Saved` record (paths and the report written).
        """
        return run(self, out_dir, options=Options(force=force, diff=diff, stages=stages), validation=validation).saved


def convert(model: "torch.nn.Module | str | os.PathLike", *, input_names=None, output: str | None = None,
            offline: bool = False, meta: bool = False, attn: str = "sdpa", seed: int = 0,
            dtype=None, allow_random: bool = False, keep_traced_code: bool = False, leaves: bool = True) -> Conversion:
    """Trace `model` and turn it into FTPipe's pre-partitioning form.

    `model` is a module, or a name that `fxconvert.load.load` resolves (a checkpoint
    directory, a Hub id, a config .json file or a preset such as "t5-small"); `offline`,
    `meta`, `attn`, `seed` (of random weights), `dtype` and `allow_random` apply to names only.
    A name that resolves to no weights raises `ModelResolutionError` unless
    `allow_random=True` (random weights, with a `RandomWeightsWarning`) or `meta=True`.
    `input_names` is a list of names (a bare string is refused, not split into letters).
    `keep_traced_code` keeps the code as traced, before the passes, in
    `Conversion.traced_code` (for a diff; generating it costs a tenth of a conversion).
    A submodule whose Python decides on traced values runs its eager code as one leaf
    (`Conversion.leaves`; the files written for it import transformers to rebuild it); `leaves=False`
    refuses it.
    """
    options = Options(input_names=input_names, output=output, offline=offline, meta=meta, attn=attn, seed=seed,
                      dtype=dtype, allow_random=allow_random, keep_traced_code=keep_traced_code, leaves=leaves)
    _check_names(options)
    if not isinstance(model, (str, os.PathLike)):
        if not isinstance(model, torch.nn.Module):
            raise UsageError(f"convert() takes a model (torch.nn.Module) or a name, got {type(model).__name__}")
        if (offline, meta, attn, seed, dtype, allow_random) != (False, False, "sdpa", 0, None, False):
            raise UsageError("offline, meta, attn, seed, allow_random and dtype apply to a model given by name; "
                             "this one is built already")
    return _converted(model, options, Progress(), {})


def run(source, out_dir, *, options: Options = Options(), validation: ValidationResult | None = None,
        progress=None) -> Result:
    """Convert `source`, validate, split and save to `out_dir`; return the `Result`.

    `source` is a name (as `convert` takes it), a model, or a conversion already made (its
    load, trace and passes are then done). `validation`, a result computed before, is
    reported as it is; `options.validate` runs one instead, and a failed one raises
    `ValidationError` before anything is written. `progress` hears of each phase (see the
    module docstring; default: silent).
    """
    progress = progress or Progress()
    timings = {}
    _check_names(options)
    if isinstance(source, ConvertedGraph):
        conversion = source
        keep = [source.source.location] if source.source is not None else []
    else:
        keep = [source] if isinstance(source, (str, os.PathLike)) else []
    check_destination(out_dir, force=options.force, keep=[p for p in keep if os.path.exists(p)],
                      force_name=options.force_name)  # before any work
    if not isinstance(source, ConvertedGraph):
        conversion = _converted(source, options, progress, timings)
    result = Result(conversion, sections=[build(conversion) for asked, build in OPTIONAL_SECTIONS if asked(options)])
    result.validation = _validation(conversion, options, validation, progress, timings)
    if options.stages is not None:
        _split(result, options, progress, timings)
    if options.validate and result.validation.skipped is None and not result.validation.passed:
        progress.failed(result)
        result.validation.raise_if_failed()
    with progress.step("write", f"writing {out_dir}", timings) as step:
        result.saved = save(conversion, out_dir, force=options.force, make_report=result.report,
                            extra_files=result.files, force_name=options.force_name)
        step.detail = f"{len(result.saved.files)} files"
    for note in result.saved.notes:
        progress.warn(note)
    return result


def _check_names(options: Options) -> None:
    """The names a run is given, checked before a model is loaded: a bad one should not cost a load."""
    if options.output is not None and not isinstance(options.output, str):
        raise UsageError(f"output is {with_article(type(options.output).__name__)}; give one output name such as "
                         f"'loss'")
    if options.input_names is not None:
        input_name_list(options.input_names)


def _converted(model, options: Options, progress, timings: dict) -> Conversion:
    """load -> trace -> passes."""
    source = None
    if isinstance(model, (str, os.PathLike)):
        with progress.step("load", f"loading {os.fspath(model)}", timings) as step:
            if not options.transformers_logs:
                quiet_transformers()
            with warnings.catch_warnings():
                if not options.random_weights_warning:
                    warnings.simplefilter("ignore", RandomWeightsWarning)
                loaded = load(model, offline=options.offline, meta=options.meta, attn=options.attn, seed=options.seed,
                              dtype=options.dtype, allow_random=options.allow_random)
            model, source = loaded.model, loaded.source
            step.detail = f"{type(model).__name__}, {source.origin} {source.location}, weights: {source.weights}"
        for note in source.notes:
            progress.warn(note)
    else:  # the checks a name gets at load, so that the API and the command line accept the same models
        check_model_config(model)
    input_names = input_name_list(options.input_names) if options.input_names is not None else None
    with gc_paused():
        with progress.step("trace", "tracing", timings) as step:
            traced = trace_with_stats(model, input_names, leaves=options.leaves)
            step.detail = f"{len(traced.graph_module.graph.nodes)} nodes"
        if isinstance(options.stages, int):  # the blocks are known now: refuse too many stages before the passes
            stage_blocks(traced.graph_module, options.stages, graph_info(traced.graph_module).model_class)
        with progress.step("passes", "running passes", timings) as step:
            converted = convert_traced(model, traced, output=options.output, source=source,
                                       keep_traced_code=options.keep_traced_code or options.diff)
            modified = sum(r.modified for r in converted.passes)
            step.detail = (f"{len(converted.passes)} passes, {modified} modified the graph; "
                           f"{len(converted.graph_module.graph.nodes)} nodes, output {converted.output_name}")
    converted.timings = {**converted.timings, **timings}  # the phases as a whole, as the progress timed them
    return Conversion.of(converted)


def _validation(conversion, options: Options, given, progress, timings: dict) -> ValidationResult | None:
    if not options.validate:
        if given is None and options.validation_skipped_by is not None:
            progress.warn(f"validation skipped ({options.validation_skipped_by})")
            return ValidationResult(options.atol, options.seed, skipped=f"not run ({options.validation_skipped_by})",
                                    rtol=options.rtol)
        return given
    with progress.step("validate", "validating against the eager model", timings) as step:
        validation = validate(conversion, atol=options.atol, rtol=options.rtol, seed=options.seed)
        step.detail = (f"skipped: {validation.skipped}" if validation.skipped else
                       f"{len(validation.checks)} tensors, max diff {validation.max_diff:.2g}, "
                       + ("passed" if validation.passed else f"{len(validation.failures)} FAILED"))
        step.ok = validation.skipped is not None or validation.passed
    conversion.timings["validate"] = timings["validate"]
    return validation


def _split(result: Result, options: Options, progress, timings: dict) -> None:
    """The stages, their report sections (the table, and the predicted costs when there is a plan) and files."""
    conversion, stages = result.conversion, options.stages
    with progress.step("split", f"splitting into {stages if isinstance(stages, int) else len(stages.specs)} stages",
                       timings) as step:
        if isinstance(stages, int):
            stages = split_stages(conversion, stages, balance=options.balance, batch=options.batch,
                                  encoder_length=options.encoder_length, decoder_length=options.decoder_length,
                                  schedule=options.schedule, microbatches=options.microbatches,
                                  optimizer=options.optimizer, recompute=options.recompute,
                                  max_memory=options.max_memory)
        output = pipeline_output(conversion, stages)
        result.stages, result.files = stages, output.files
        result.sections.append(output.section)
        if stages.plan is not None:
            rows, plan = stage_table(stages), stage_plan(stages)
            result.sections += [stage_plan_section(rows, plan), memory_plan_section(rows, plan)]
        step.detail = ", ".join(f"{len(spec.blocks)} blocks" for spec in stages.specs)
    conversion.timings["split"] = timings["split"]
    for note in output.notes:
        progress.warn(note)


@dataclass
class Split:
    """A conversion split in memory (`split`): what a trainer given a NAME runs instead of stage files."""

    conversion: ConvertedGraph
    stages: Stages
    files: dict[str, str | bytes]  # what a conversion directory holds besides stage files and weights
    notes: list[str]  # tokenizer files beside the source that are not copied, and why
    tokenizer_dir: "os.PathLike | None"  # the checkpoint directory (or its Hub cache snapshot)


def split(source, num_stages: int, *, offline: bool = False, seed: int = 0, allow_random: bool = False,
          check=None, optimizer: str = "adamw") -> Split:
    """Convert `source` (a name, or a conversion already made) and split it in `num_stages` stages, writing
    nothing: pipeline.json, config.json and the tokenizer files are returned as `Split.files`. `check`, given
    the conversion, may refuse it (raise) before the split. The plan counts `optimizer`'s state."""
    conversion = source if isinstance(source, ConvertedGraph) else convert(
        source, offline=offline, seed=seed, allow_random=allow_random)
    if check is not None:
        check(conversion)
    stages = split_stages(conversion, num_stages, optimizer=optimizer)
    files = {name: text for name, text in pipeline_files(stages, conversion).items() if not name.startswith("stage_")}
    return Split(conversion, stages, files, skipped_tokenizer_files(conversion.source),
                 source_directory(conversion.source))


__all__ = ["Conversion", "Options", "OPTIONAL_SECTIONS", "Progress", "Result", "Split", "Step", "convert", "run",
           "split"]
