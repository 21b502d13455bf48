"""pipeline.json as typed records (`fxconvert.manifest`), and a rank that reads it without the converter.

Real manifests of a tiny model of every family round-trip through the records; every field
given a hostile value is one line naming that field; a file of another format or version
is refused. A decoder-only or encoder-only model's one sequence is `sequence_length`, not
an encoder's. A fresh interpreter, where importing transformers fails, loads a converted
pipeline through `fxconvert.stage_files`, runs its stages to eager transformers' loss, and
has imported neither the tracer, the passes nor transformers.
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import helpers
from checkpoints import write_checkpoint
from fxconvert import convert, manifest, split_stages
from fxconvert.pipeline import manifest_text, pipeline_manifest
from fxconvert.report import io_section, stage_plan_section
from fxconvert.stages import stage_plan, stage_table

REPO = Path(__file__).resolve().parent.parent
VOCAB = helpers.VOCAB


def _model(name: str) -> torch.nn.Module:
    """A tiny model of each family (two blocks per stack), random weights."""
    torch.manual_seed(0)
    small = dict(vocab_size=VOCAB, use_cache=False)
    configs = {
        "gpt2": (transformers.GPT2LMHeadModel, transformers.GPT2Config(n_embd=32, n_head=4, n_layer=2, n_positions=64,
                                                                         bos_token_id=0, eos_token_id=0, **small)),
        "bert": (transformers.BertForMaskedLM, transformers.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB,
            max_position_embeddings=64)),
        "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
            max_position_embeddings=64, **small)),
        "bart": (transformers.BartForConditionalGeneration, transformers.BartConfig(
            d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, **small)),
    }
    if name == "t5":
        return helpers.build()
    cls, config = configs[name]
    return cls._from_config(config).eval()


FAMILIES = ("t5", "bart", "gpt2", "bert", "llama")
ONE_SEQUENCE = {"gpt2", "bert", "llama"}


@pytest.fixture(scope="module")
def written():
    """family -> (conversion, stages, pipeline.json's text as the converter writes it)."""
    out = {}
    for name in FAMILIES:
        conversion = convert(_model(name))
        stages = split_stages(conversion, 2, batch=2, encoder_length=16, decoder_length=8)
        out[name] = conversion, stages, manifest_text(pipeline_manifest(stages, conversion))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_real_manifests_round_trip(written, family):
    _, _, text = written[family]
    obj = json.loads(text)
    record = manifest.Manifest.from_json(obj, "pipeline.json")
    assert record.to_json() == obj and record.text() == text
    assert manifest.Manifest.from_json(record.to_json(), "pipeline.json") == record
    assert (obj["format"], obj["version"]) == (manifest.FORMAT, manifest.VERSION)
    assert record.plan is not None and len(record.stages) == 2 and record.stages[1].received == record.stages[0].sent


def test_a_split_without_predictions_round_trips():
    conversion = convert(helpers.build())
    stages = split_stages(conversion, 3, balance="params")
    obj = pipeline_manifest(stages, conversion)
    assert obj["plan"] is None
    assert manifest.Manifest.from_json(obj, "pipeline.json").to_json() == obj


@pytest.mark.parametrize("family", FAMILIES)
def test_sequence_lengths_are_named_by_the_family(written, family):
    """GPT-2, BERT and Llama have one sequence: pipeline.json, the plan and the report call it sequence_length."""
    conversion, stages, text = written[family]
    obj = json.loads(text)
    names = ["sequence_length"] if family in ONE_SEQUENCE else ["encoder_length", "decoder_length"]
    assert obj["sequence_lengths"] == names
    assert [k for k in obj["plan"] if k.endswith("_length")] == names
    assert obj["plan"][names[0]] == 16 and stage_plan(stages) == obj["plan"]
    hidden = obj["stages"][0]["sent"]
    assert ["batch", names[0], 32] in [v["shape"] for v in hidden]  # the hidden states crossing the boundary
    report = io_section(conversion)
    shapes = [row["shape"] for row in report.data["inputs"] if row["role"] == "model input"]
    assert f"(batch, {names[0]})" in shapes
    shapes.append(report.data["output"]["shape"])  # the loss: a scalar
    sizes = stage_plan_section(stage_table(stages), stage_plan(stages)).fields["sizes"]
    if family in ONE_SEQUENCE:
        assert "encoder_length" not in text and "decoder_length" not in text  # (BERT's blocks are bert.encoder.*)
        assert not any("encoder" in s or "decoder" in s for s in shapes)
        assert sizes == "batch 2 per microbatch, sequence 16 tokens"
    else:
        assert sizes == "batch 2 per microbatch, encoder 16, decoder 8 tokens"


# -- hostile fields ---------------------------------------------------------------------------------

def _set(path, value):
    """An edit of pipeline.json's object: set the field at `path` (keys and list indices) to `value`."""
    def edit(obj):
        *parents, last = path
        for key in parents:
            obj = obj[key]
        obj[last] = value
    return edit


def _drop(path):
    def edit(obj):
        *parents, last = path
        for key in parents:
            obj = obj[key]
        del obj[last]
    return edit


SHARED = "shared_embed_weight"  # T5's embedding, held by both stages
HOSTILE = [
    (_set(["model_class"], ""), "'model_class' must be a class name"),
    (_set(["model_type"], 5), "'model_type' must be a string"),
    (_set(["num_stages"], "2"), "for num_stages '2'"),
    (_set(["num_stages"], 3), "lists stages [0, 1] for num_stages 3"),
    (_set(["input_names"], ["input_ids", ""]), "'input_names' must be a list of names"),
    (_set(["output_name"], None), "'output_name' must be a name"),
    (_set(["weights"], "../weights.safetensors"), "'weights' must be a file name"),
    (_set(["config"], "."), "'config' must be a file name"),
    (_set(["tokenizer_files"], "tokenizer.json"), "'tokenizer_files' must be a list of file names"),
    (_set(["sequence_lengths"], ["encoder"]), "'sequence_lengths' must be a list of names"),
    (_set(["shared_weights"], []), "'shared_weights' must be an object"),
    (_set(["shared_weights", SHARED, "stages"], [0, 2]), f"shared weight '{SHARED}' must list its stages"),
    (_set(["shared_weights", SHARED, "hf_names"], "shared.weight"), f"shared weight '{SHARED}' must list"),
    (_set(["shared_weights", SHARED, "stages"], [0]), f"shared weight '{SHARED}' must list the stages that hold"),
    (_set(["plan"], [1]), "'plan' must be an object or null"),
    (_set(["plan", "balance"], "speed"), "the plan's 'balance' must be one of"),
    (_set(["plan", "batch"], 0), "the plan's 'batch' must be a positive integer"),
    (_set(["plan", "encoder_length"], True), "the plan's 'encoder_length' must be a positive integer"),
    (_drop(["plan", "decoder_length"]), "'decoder_length' is missing"),
    (_set(["plan", "schedule"], 1), "the plan's 'schedule' must be a schedule name"),
    (_set(["plan", "microbatches"], -1), "the plan's 'microbatches' must be a positive integer"),
    (_set(["plan", "bottleneck"], 2), "the plan's 'bottleneck' must be a stage"),
    (_set(["plan", "bubble_fraction"], "0.1"), "the plan's 'bubble_fraction' must be a number"),
    (_set(["plan", "step_seconds"], None), "the plan's 'step_seconds' must be a number"),
    (_set(["plan", "seconds"], [0.1]), "the plan's 'seconds' must list one number per stage"),
    (_set(["plan", "time_share"], [0.5, "x"]), "the plan's 'time_share' must list one number per stage"),
    (_set(["plan", "flops"], [1, -1]), "the plan's 'flops' must list one count or null per stage"),
    (_set(["plan", "peak_bytes"], {}), "the plan's 'peak_bytes' must list one count or null per stage"),
    (_set(["stages"], {}), "lists stages {} for num_stages 2"),
    (_set(["stages", 1, "index"], 0), "lists stages [0, 0] for num_stages 2"),
    (_set(["stages", 1, "file"], "../model.py"), "stage 1's 'file' must be stage_1.py"),
    (_set(["stages", 0, "blocks"], [None]), "stage 0's 'blocks' must be a list of module paths"),
    (_set(["stages", 0, "inputs"], 5), "stage 0's 'inputs' must be a list of names"),
    (_set(["stages", 1, "received"], [{"name": "x", "dtype": "float32", "shape": ["batch", "heads"]}]),
     "stage 1's 'received' must be a list of values"),
    (_set(["stages", 1, "received"], []), "stage 1's 'received' must be what stage 0 sends"),
    (_set(["stages", 0, "sent"], None), "stage 0's 'sent' must be a list of values"),
    (_set(["stages", 0, "shared_weights"], ["nothing"]), "stage 0's 'shared_weights' must be a list of the"),
    (_set(["stages", 0, "parameters"], {}), "stage 0's 'parameters' must be a list"),
    (_set(["stages", 0, "parameter_bytes"], 1), "stage 0's 'parameter_bytes' must be the sum"),
    (_set(["stages", 0, "flops"], 1.5), "stage 0's 'flops' must be a count or null"),
    (_set(["stages", 0, "peak_bytes"], "1"), "stage 0's 'peak_bytes' must be a byte count or null"),
    (_set(["stages", 0, "parameters", 0], "w"), "stage 0's parameter 0 must be an object"),
    (_set(["stages", 0, "parameters", 0, "name"], ""), "stage 0's parameter 0 'name' must be a name"),
    (_set(["stages", 0, "parameters", 0, "weights_key"], 3), "stage 0's parameter 0 'weights_key' must be"),
    (_set(["stages", 0, "parameters", 0, "hf_name"], ""), "has no transformers name ('hf_name')"),
    (_set(["stages", 0, "parameters", 0, "shape"], [2, -1]), "stage 0's parameter 0 'shape' must be a list of"),
    (_set(["stages", 0, "parameters", 0, "dtype"], None), "stage 0's parameter 0 'dtype' must be a dtype name"),
    (_set(["stages", 0, "parameters", 0, "bytes"], -4), "stage 0's parameter 0 'bytes' must be a byte count"),
    (_set(["stages", 0, "parameters", 0, "tied_hf_names"], []), "stage 0's parameter 0 'tied_hf_names' is"),
    (_set(["stages", 0, "parameters", 0, "tied_hf_names"], [1]), "'tied_hf_names' must be a list of names"),
    (_set(["stages", 0, "parameters", 0, "persistent"], True), "stage 0's parameter 0 'persistent' is written only as"),
    (_set(["stages", 0, "parameters", 0, "persistent"], 0), "stage 0's parameter 0 'persistent' is written only as"),
    (_drop(["model_class"]), "is malformed (KeyError: 'model_class' is missing)"),
    (_drop(["stages", 0, "inputs"]), "is malformed (KeyError: stage 0's 'inputs' is missing)"),
    (_set(["plan", "optimizer"], ""), "the plan's 'optimizer' must be an optimizer name"),
    (_set(["plan", "max_memory"], 0), "the plan's 'max_memory' must be a positive integer or null"),
    (_set(["plan", "max_memory"], "11GiB"), "the plan's 'max_memory' must be a positive integer or null"),
    (_set(["plan", "recompute"], "encoder.block.0"), "the plan's 'recompute' must list block names"),
    (_set(["plan", "recompute"], [""]), "the plan's 'recompute' must list block names"),
    (_drop(["plan", "recompute"]), "is malformed (KeyError: plan 'recompute' is missing)"),
    (_set(["token_ids"], {}), "'token_ids' must be an object of pad_token_id, each a token id or null"),
    (_set(["token_ids"], {"pad_token_id": -1}), "'token_ids' must be an object of pad_token_id"),
    (_set(["token_ids"], {"pad_token_id": True}), "'token_ids' must be an object of pad_token_id"),
    (_set(["token_ids"], {"eos_token_id": 2}), "'token_ids' must be an object of pad_token_id"),
    (_set(["token_ids"], [0]), "'token_ids' must be an object of pad_token_id"),
    (_set(["trainer"], {}), "'trainer' is not a field of format fxconvert-pipeline version 3"),
    (_set(["stages", 0, "extra"], 1), "stage 0's 'extra' is not a field"),
    (_set(["stages", 0, "parameters", 0, "extra"], 1), "stage 0's parameter 0 'extra' is not a field"),
    (lambda obj: obj.clear() or obj.update(version=3), "is malformed (KeyError: 'format' is missing)"),
]


@pytest.mark.parametrize("edit, needle", HOSTILE, ids=[needle for _, needle in HOSTILE])
def test_every_hostile_field_is_one_line_naming_it(written, edit, needle):
    obj = json.loads(written["t5"][2])
    assert manifest.Manifest.from_json(obj, "conv/pipeline.json")  # the untouched file reads
    edit(obj)
    with pytest.raises(manifest.ManifestError) as e:
        manifest.Manifest.from_json(obj, "conv/pipeline.json")
    message = str(e.value)
    assert needle in message, message
    assert "\n" not in message and message.startswith("conv/pipeline.json") and "convert" in message.split(";")[-1]


@pytest.mark.parametrize("field, value, needle", [
    ("format", "fxconvert-pipeline-v3", "is not an fxconvert pipeline manifest; convert with --stages N"),
    ("format", None, "is not an fxconvert pipeline manifest"),
    ("version", 2, "has version 2, this fxconvert reads version 3; convert again with this fxconvert"),
    ("version", 4, "has version 4, this fxconvert reads version 3; convert again with this fxconvert"),
    ("version", "3", "has version '3'"),
])
def test_another_format_or_version_is_refused_whole(written, field, value, needle):
    obj = {**json.loads(written["gpt2"][2]), field: value, "stages": "anything"}  # refused before anything else
    with pytest.raises(manifest.ManifestError, match="^pipeline.json ") as e:
        manifest.Manifest.from_json(obj, "pipeline.json")
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_the_reader_refuses_what_is_no_manifest(tmp_path):
    with pytest.raises(manifest.ManifestError, match=r"has no pipeline.json; convert with --stages N$"):
        manifest.read(tmp_path)
    (tmp_path / "pipeline.json").write_text("[1, 2]")
    with pytest.raises(manifest.ManifestError, match=r"does not hold a JSON object; convert again"):
        manifest.read(tmp_path)
    (tmp_path / "pipeline.json").write_bytes(b'{"format": "\xff"}')
    with pytest.raises(manifest.ManifestError, match=r"cannot read .*malformed JSON"):
        manifest.read(tmp_path)


def test_records_are_frozen(written):
    record = manifest.Manifest.from_json(json.loads(written["t5"][2]), "pipeline.json")
    with pytest.raises(AttributeError):
        record.num_stages = 3
    with pytest.raises(AttributeError):
        record.stages[0].parameters[0].hf_name = "x"
    assert copy.deepcopy(record) == record


# -- a rank loads stage files without the converter -------------------------------------------------

RANK = helpers.NO_TRANSFORMERS + r"""
import torch
import fxconvert.train  # the trainer's entry point, and every module a rank imports (lazily, after it holds Ctrl-C)
import fxconvert.training.worker
import fxconvert.training.launcher
from fxconvert.training.model import load_model  # what a rank reads its stages with
from fxconvert.stage_files import load_pipeline

pipeline = load_pipeline(sys.argv[1])
inputs = torch.load(sys.argv[2])
values = ()
for i, stage in enumerate(pipeline.stages):
    module = pipeline.load_stage(i)
    names = stage.inputs
    values = module(*values, *(inputs[n] for n in names)) if i == 0 else module(*values, **{n: inputs[n] for n in names})
heavy = ("fxconvert.trace", "fxconvert.passes", "fxconvert.convert", "fxconvert.stages", "fxconvert.pipeline",
         "transformers")
print(json.dumps({"loss": values.item(), "num_stages": pipeline.num_stages,
                  "imported": sorted(m for m in sys.modules if m.split(".")[0] in ("fxconvert", "transformers")),
                  "heavy": sorted(m for m in sys.modules if m in heavy or m.startswith(heavy[1] + "."))}))
"""


def test_a_rank_loads_stages_without_the_converter(tmp_path):
    """A rank imports the stage-loading path, reads pipeline.json and runs stage files: nothing more."""
    checkpoint, conv = tmp_path / "ckpt", tmp_path / "conv"
    write_checkpoint(checkpoint)
    convert(checkpoint).save(conv, stages=2)
    eager = transformers.T5ForConditionalGeneration.from_pretrained(checkpoint).eval()
    inputs = helpers.random_inputs(["input_ids", "attention_mask", "decoder_input_ids", "labels"], 3, 9, 6)
    torch.save(inputs, tmp_path / "inputs.pt")
    before = sorted(p.name for p in conv.iterdir())
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    run = subprocess.run([sys.executable, "-c", RANK, str(conv), str(tmp_path / "inputs.pt")], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.splitlines()[-1])
    assert result["heavy"] == [], result["imported"]
    assert result["num_stages"] == 2
    with torch.no_grad():
        expected = eager(**inputs, use_cache=False).loss.item()
    assert abs(result["loss"] - expected) <= 1e-5
    assert sorted(p.name for p in conv.iterdir()) == before  # the rank wrote nothing beside the stage files
