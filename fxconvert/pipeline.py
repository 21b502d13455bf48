"""`fxconvert.pipeline`: the directory `fxconvert NAME --stages N` writes.

Besides model.py, weights.safetensors and the reports, a conversion split into stages holds
what a pipeline runtime needs to fine-tune the model and hand back a transformers checkpoint:

- `stage_<i>.py`: one importable module per stage (`stage_sources`, `write_stage_sources`), whose
  `load()` reads only that stage's tensors from weights.safetensors;
- `pipeline.json`: the stages, their parameters under their transformers names, the shared
  weights and the values that cross each boundary (`build_manifest`, a `fxconvert.manifest.Manifest`);
- `config.json` (and `generation_config.json` when the model has one): the transformers
  config, so the trained weights can be saved as a checkpoint again;
- the tokenizer files found beside the source checkpoint, copied byte for byte: only regular
  files inside it (a symlink into the Hugging Face cache's blobs/ included); any other is
  skipped with a warning (`tokenizer_sources`);
- `family.json`, for a model whose family record was derived from transformers' declarations:
  what a training rank needs of the record (`fxconvert.families.stored`).

`pipeline_files(stages, conversion)` gives all of these as {name: text or bytes} for
`fxconvert.save.save(extra_files=...)`; `pipeline_output` splits and adds the report's
stage table, for the command line and `Conversion.save(stages=...)` alike.
Reading the directory back is the rank's side, `fxconvert.stage_files` (`load_pipeline`,
re-exported here), which needs none of the converter this module imports.
"""

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch

import fxconvert
from fxconvert import families, manifest
from fxconvert.codegen import check_names, module_source, requirements, tensor_constants
from fxconvert.convert import ConvertedGraph
from fxconvert.errors import UsageError, printable
from fxconvert.families import stored
from fxconvert.files import read_copyable, roots_of, why_not_copyable
from fxconvert.graph_utils import leaves_on_meta
from fxconvert.inputs import SIZE_PROBES, build_inputs, meta_twins
from fxconvert.report import stages_section
from fxconvert.save import WEIGHTS_FILE
from fxconvert.stage_files import Pipeline, PipelineError, load_pipeline
from fxconvert.stages import SplitError, Stages, split_plan, split_stages, stage_table

CONFIG_FILE, GENERATION_CONFIG_FILE, PIPELINE_FILE = "config.json", "generation_config.json", manifest.FILE
# Files a tokenizer's save_pretrained writes (fast and slow T5, mT5, umT5 and the common formats).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "spiece.model", "sentencepiece.bpe.model", "vocab.json", "vocab.txt", "merges.txt",
                   "chat_template.jinja", "chat_template.json")
PIPELINE_FORMAT, PIPELINE_VERSION = manifest.FORMAT, manifest.VERSION


# -- stage files ----------------------------------------------------------------------------------

_STAGE_DOC = """Stage {index} of {num_stages} of {model_class} in FTPipe's pre-partitioning form, written by fxconvert {version}.

It runs the blocks in BLOCKS ({blocks}) and owns its parameters, with its
own copy of each shared weight in SHARED_WEIGHTS. It takes the values in RECEIVED from
the previous stage positionally, then the model inputs in INPUTS (positionally on the
first stage, by keyword on later ones), and returns {returns}.

    import stage_{index}  # this file
    stage = stage_{index}.load()  # only this stage's tensors, from weights.safetensors beside this file
    {usage}

`build()` gives the module without weights (on the meta device). Copies of a shared weight
stay equal only if their gradients are summed over the stages that hold them before each
optimizer step. pipeline.json describes every stage.
{needs}
"""

_SENT_FUNCTION = '''
def _sent(values):
    """The values sent to the next stage, contiguous: point-to-point communication sends contiguous buffers."""
    for name, value in zip(SENT, values):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"this stage sends {name}, which is {type(value).__name__} for this input; "
                            f"only tensors can cross a pipeline boundary")
    return tuple(value.contiguous() for value in values)
'''


def stage_parameters(stages: Stages, index: int) -> dict[str, torch.Tensor]:
    """Stage `index`'s state dict as its stage file names it (and as weights.safetensors keys it)."""
    spec, gm = stages.specs[index], stages.stages[index]
    constants = tensor_constants(gm)  # the stage file rebuilds them; none is a transformers tensor
    state = {f"graph_module.{name}": t for name, t in gm.state_dict(keep_vars=True).items() if name not in constants}
    state.update({name: getattr(stages, name) for name in spec.shared_weights})
    return state


def stage_sources(stages: Stages, config=None) -> dict[str, str]:
    """`stage_<i>.py` -> its text: a module a user imports on its own, as model.py (see the docstrings).
    `config`, the model's transformers config, rebuilds the leaves of a stage that has some."""
    num_stages = len(stages.specs)
    on_meta = any(t.device.type == "meta" for t in stages.state_dict().values())
    (model_class,) = check_names("the model class name", [stages.model_class or "Model"])
    (output,) = check_names("the output name", [stages.output_name or "output"])
    sources = {}
    for spec, gm in zip(stages.specs, stages.stages):
        first, last = spec.index == 0, spec.index == num_stages - 1
        received = check_names("the received value", spec.received)
        inputs = check_names("the input name", spec.inputs)
        arguments = received + inputs if first else received + [f"{n}={n}" for n in inputs]
        doc = _STAGE_DOC.format(
            index=spec.index, num_stages=num_stages, model_class=model_class, version=fxconvert.__version__,
            blocks=", ".join(spec.blocks),
            returns=f"the model's output, `{output}`" if last else "the values in SENT, as a tuple of contiguous tensors",
            usage=f"{output if last else 'sent'} = stage({', '.join(arguments)})",
            needs=requirements(gm),
        )
        constants = {
            "STAGE": spec.index,
            "NUM_STAGES": num_stages,
            "BLOCKS": list(spec.blocks),
            "RECEIVED": list(received),
            "INPUTS": list(inputs),
            "SENT": list(spec.sent),
            "OUTPUT_NAME": output,
        }
        parameters = {name: name for name in stage_parameters(stages, spec.index)}
        filename = f"stage_{spec.index}.py"
        sources[filename] = module_source(
            gm, filename=filename, doc=doc, constants=constants, wrapper="Stage",
            wrapper_doc="One pipeline stage: owns its parameters (and shared-weight copies), passes them with "
                        "`self.training` to the graph.",
            graph_doc="the received values, then the model inputs",
            signature=received + inputs, shared={n: getattr(stages, n) for n in spec.shared_weights},
            parameters=parameters, weights=WEIGHTS_FILE, on_meta=on_meta,
            extra="" if last else _SENT_FUNCTION, wrap="" if last else "_sent", config=config,
        )
    return sources


def write_stage_sources(stages: Stages, directory, config=None) -> list[Path]:
    """Write the `stage_<i>.py` files into `directory`; return the paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in stage_sources(stages, config).items():
        (directory / name).write_text(text)
        paths.append(directory / name)
    return paths


# -- pipeline.json --------------------------------------------------------------------------------

def pipeline_manifest(stages: Stages, conversion: ConvertedGraph) -> dict:
    """pipeline.json as a dict (`build_manifest(...).to_json()`)."""
    return build_manifest(stages, conversion).to_json()


def build_manifest(stages: Stages, conversion: ConvertedGraph) -> manifest.Manifest:
    """pipeline.json's record: per stage its blocks, parameters (with their transformers names), shared
    weights, and the values it receives and sends, with symbolic shapes (see `symbolic_boundaries`).

    A parameter's `hf_name` is its transformers name; `tied_hf_names`, present only when the
    eager model ties the same tensor under more names without the graph sharing it, lists
    the others. Shared weights list all their tied names under `shared_weights`. A buffer the
    eager model's state dict leaves out (non-persistent: BERT's position_ids, RoBERTa's
    token_type_ids) is marked `persistent: false`, and the export leaves it out as save_pretrained does.
    """
    weights_keys = set(conversion.module.state_dict())
    hf_names = _hf_names(conversion)
    eager = conversion.model
    saved = None if eager is None else {id(t) for t in eager.state_dict(keep_vars=True).values()}  # persistent
    sent = symbolic_boundaries(stages, conversion)
    rows = []
    for spec in stages.specs:
        parameters = []
        for name, t in stage_parameters(stages, spec.index).items():
            if name not in weights_keys:
                raise SplitError(f"stage {spec.index} holds {name}, which weights.safetensors does not")
            hf_name, *tied = hf_names(name, t)
            parameters.append(manifest.Parameter(
                name=name, weights_key=name, hf_name=hf_name, shape=tuple(t.shape),
                dtype=str(t.dtype).removeprefix("torch."), bytes=t.numel() * t.element_size(),
                tied_hf_names=tuple(tied),
                persistent=saved is None or name in spec.shared_weights or id(t) in saved))
        rows.append(manifest.Stage(
            index=spec.index, file=f"stage_{spec.index}.py", blocks=tuple(spec.blocks), inputs=tuple(spec.inputs),
            received=sent[spec.index - 1] if spec.index else (), sent=sent[spec.index],
            shared_weights=tuple(spec.shared_weights), parameters=tuple(parameters),
            parameter_bytes=sum(p.bytes for p in parameters), flops=spec.flops, peak_bytes=spec.peak_bytes))
    config = getattr(conversion.model, "config", None)
    return manifest.Manifest(
        model_class=conversion.model_class,
        model_type=getattr(config, "model_type", None),
        num_stages=len(stages.specs),
        input_names=tuple(conversion.input_names),
        output_name=conversion.output_name,
        weights=WEIGHTS_FILE,
        config=CONFIG_FILE,
        tokenizer_files=tuple(sorted(tokenizer_sources(conversion.source))),
        sequence_lengths=tuple(families.sequence_lengths(conversion.model_class).values()),
        shared_weights={
            name: manifest.SharedWeight(tuple(conversion.shared_weights.get(name, [])),
                                        tuple(spec.index for spec in stages.specs if name in spec.shared_weights))
            for name in conversion.module.shared_names
        },
        plan=split_plan(stages),  # how the split was chosen and its predicted costs (None without predictions)
        stages=tuple(rows),
        token_ids=_token_ids(config),
    )


def _token_ids(config) -> dict:
    """The config's `manifest.TOKEN_IDS` the graph was traced with, as config.json has them (a rank compares)."""
    values = config.to_dict() if config is not None else {}
    return {name: values.get(name) for name in manifest.TOKEN_IDS
            if values.get(name) is None or (type(values.get(name)) is int and values[name] >= 0)}


def _hf_names(conversion: ConvertedGraph):
    """name, tensor -> the transformers names of a stage tensor, the one mirroring its module path first.

    A shared weight is named by its first tied name (all of them are in the manifest's
    shared_weights). Every other tensor is found by identity among the eager model's
    state dict, which the converted module shares. A tensor the eager model ties under
    several names but the graph reads once (T5EncoderModel's embedding is also
    `shared.weight`) is not lifted; its other names are listed too.
    """
    eager = {}
    if conversion.model is not None:
        for name, t in conversion.model.state_dict(keep_vars=True).items():
            eager.setdefault(id(t), []).append(name)
        # A buffer the state dict leaves out (BERT's non-persistent position_ids) is a graph
        # tensor all the same; transformers takes it back from a checkpoint and ignores it.
        for name, t in conversion.model.named_buffers(remove_duplicate=False):
            names = eager.setdefault(id(t), [])
            if name not in names:
                names.append(name)

    def hf_names(name: str, t: torch.Tensor) -> list[str]:
        if name in conversion.shared_weights:
            return conversion.shared_weights[name][:1]
        path = name.removeprefix("graph_module.")
        if conversion.model is None:
            return [path]
        names = eager.get(id(t))
        if not names:
            raise SplitError(f"cannot name {name} in transformers terms: the eager model does not hold it")
        return sorted(names, key=lambda n: n != path)

    return hf_names


def symbolic_boundaries(stages: Stages, conversion: ConvertedGraph) -> list[tuple[manifest.Boundary, ...]]:
    """Per stage, the values it sends; sizes that follow the batch or a sequence length are "batch" or the
    family's name of that length (`Family.sequence_lengths`), the others ints.

    Two meta runs of the stages at `inputs.SIZE_PROBES` tell them apart: a dimension that
    changes follows the one size that changed the same way; one that does not change is fixed.
    """
    runs = [_sent_values(stages, conversion, sizes) for sizes in SIZE_PROBES]
    names = {"batch": "batch", **families.sequence_lengths(conversion.model_class)}
    out = []
    for spec, first, second in zip(stages.specs, *runs):
        values = []
        for name, a, b in zip(spec.sent, first, second):
            shape = []
            for dim, (x, y) in enumerate(zip(a.shape, b.shape)):
                if x == y:
                    shape.append(x)
                    continue
                follows = [size for size in SIZE_PROBES[0] if (SIZE_PROBES[0][size], SIZE_PROBES[1][size]) == (x, y)]
                if len(follows) != 1 or a.dim() != b.dim() or follows[0] not in names:
                    raise SplitError(f"stage {spec.index} sends {name}, whose dimension {dim} ({x}, then {y}) follows "
                                     f"neither the batch nor a sequence length; pipeline.json cannot describe it")
                shape.append(names[follows[0]])
            values.append(manifest.Boundary(name=name, dtype=str(a.dtype).removeprefix("torch."), shape=tuple(shape)))
        out.append(tuple(values))
    return out


def _sent_values(stages: Stages, conversion: ConvertedGraph, sizes: dict) -> list[list[torch.Tensor]]:
    """The values each stage sends when the stages run on meta copies with inputs of `sizes`."""
    config = getattr(conversion.model, "config", None)
    family = families.family_of_class(conversion.model_class)
    dtype = next((p.dtype for p in stages.parameters() if p.is_floating_point()), torch.float32)
    inputs = build_inputs(family.inputs, stages.input_names, batch=sizes["batch"], lengths=sizes,
                          hidden=family.input_sizes(config)["hidden"], dtype=dtype, meta=True)
    memo = meta_twins([*stages.parameters(), *stages.buffers()])
    out, values = [], ()
    with torch.no_grad():
        for spec, gm in zip(stages.specs, stages.stages):
            meta = copy.deepcopy(gm, dict(memo))
            leaves_on_meta(meta, conversion.leaves)
            args = (*values, *(inputs[n] for n in spec.inputs), *(memo[id(getattr(stages, w))]
                                                                   for w in spec.shared_weights), False)
            values = meta(*args) if spec.sent else ()
            for name, value in zip(spec.sent, values):
                if not isinstance(value, torch.Tensor):
                    raise SplitError(f"stage {spec.index} sends {name}, which is {type(value).__name__}; only "
                                     f"tensors can cross a pipeline boundary")
            out.append(list(values))
    return out


# -- the output directory -------------------------------------------------------------------------

def source_directory(source) -> Path | None:
    """The directory the converted checkpoint was read from (a local directory or its Hub cache snapshot)."""
    if source is None:
        return None
    if source.origin == "local directory":
        return Path(source.location)
    if source.origin in ("Hugging Face cache", "Hugging Face Hub"):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source.location, "config.json")
        return Path(cached).parent if isinstance(cached, str) else None
    return None


def tokenizer_sources(source) -> dict[str, Path]:
    """Tokenizer file name -> its path beside the source checkpoint, for the files that may be copied.

    Only regular files inside the checkpoint are (`fxconvert.files`): a `merges.txt` that is a
    symlink to a file outside it (say /etc/passwd), a FIFO or a directory is skipped, and
    `skipped_tokenizer_files` says why. The converted model does not need them; skipping,
    not refusing, keeps the conversion of a model whose tokenizer is of no use here.
    """
    return _tokenizer_files(source)[0]


def skipped_tokenizer_files(source) -> list[str]:
    """One warning per tokenizer file beside the source checkpoint that is not copied, and why."""
    return _tokenizer_files(source)[1]


def _tokenizer_files(source) -> tuple[dict[str, Path], list[str]]:
    directory = source_directory(source)
    if directory is None:
        return {}, []
    roots, found, skipped = roots_of(directory), {}, []
    for name in TOKENIZER_FILES:
        path = directory / name
        if not (path.exists() or path.is_symlink()):
            continue
        why = why_not_copyable(path, roots)
        if why is None:
            found[name] = path
        else:
            skipped.append(f"tokenizer file {printable(path)} not copied: {why} (only regular files inside the "
                           f"checkpoint are copied; put the file itself there to include it)")
    return found, skipped


@dataclass
class PipelineOutput:
    """What --stages adds to a conversion's output: the split, its report section and the files."""

    stages: object  # fxconvert.stages.Stages
    section: object  # fxconvert.report.Section
    files: dict[str, str | bytes]
    notes: list[str]  # tokenizer files beside the checkpoint that were not copied, and why


def pipeline_output(conversion, stages) -> PipelineOutput:
    """Split `conversion` (`stages`: a number of stages, or `Stages` split from it) for `save(extra_files=...)`."""
    if isinstance(stages, int):
        stages = split_stages(conversion, stages)
    notes = skipped_tokenizer_files(conversion.source)
    if conversion.source is not None:  # the reports' warnings list the source's notes
        conversion.source.notes.extend(n for n in notes if n not in conversion.source.notes)
    return PipelineOutput(stages, stages_section(stage_table(stages)), pipeline_files(stages, conversion), notes)


def pipeline_files(stages, conversion) -> dict[str, str | bytes]:
    """Everything --stages adds to the output directory (see the module docstring)."""
    model = conversion.model
    if model is None or getattr(model, "config", None) is None:
        raise UsageError("this conversion holds no transformers model, so config.json cannot be written; "
                         "convert the model with fxconvert.convert")
    files: dict[str, str | bytes] = dict(stage_sources(stages, model.config))
    config = json.loads(model.config.to_json_string(use_diff=False))
    config.pop("_name_or_path", None)  # where this process loaded it from, not part of the model
    config["architectures"] = [conversion.model_class]
    files[CONFIG_FILE] = json.dumps(config, indent=2, sort_keys=True) + "\n"
    generation = getattr(model, "generation_config", None) if model.can_generate() else None
    if generation is not None:
        files[GENERATION_CONFIG_FILE] = generation.to_json_string(use_diff=True)
    roots = roots_of(source_directory(conversion.source) or ".")
    for name, path in tokenizer_sources(conversion.source).items():
        try:
            files[name] = read_copyable(path, roots)
        except (OSError, ValueError) as e:  # changed since it was looked at
            raise PipelineError(f"cannot copy the tokenizer file {printable(path)}: "
                                f"{e.strerror if isinstance(e, OSError) else e}; convert again") from e
    files[PIPELINE_FILE] = manifest_text(build_manifest(stages, conversion))
    family = families.family_of_class(conversion.model_class)
    if family is not None and family.derived_from:  # a rank cannot derive it again (`fxconvert.families.stored`)
        files[stored.FILE] = stored.family_text(family)
    return files


def manifest_text(record: "manifest.Manifest | dict") -> str:
    """pipeline.json's text (`fxconvert.manifest.text`), written only once it reads back as the same record."""
    if isinstance(record, dict):
        record = manifest.Manifest.from_json(record, PIPELINE_FILE)
    text = record.text()
    assert manifest.Manifest.from_json(json.loads(text), PIPELINE_FILE) == record
    return text


__all__ = ["Pipeline", "PipelineError", "PipelineOutput", "load_pipeline", "pipeline_output", "pipeline_files",
           "stage_sources", "write_stage_sources", "pipeline_manifest", "build_manifest", "manifest_text", "SIZE_PROBES",
           "symbolic_boundaries", "stage_parameters", "tokenizer_sources",
           "skipped_tokenizer_files", "TOKENIZER_FILES"]
