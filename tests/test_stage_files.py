"""What `--stages N` writes: importable stage files, pipeline.json, config.json, tokenizer files.

A tiny T5ForConditionalGeneration checkpoint (tied head, and the untied v1.1 head) is
written with save_pretrained, with a tokenizer beside it, converted once and saved with
1, 2, 3 and 4 stages. A fresh interpreter, where importing transformers fails, imports
every stage file, loads it (spying on which tensors it reads), chains the stages and
backpropagates; the loss and every gradient are compared with EAGER transformers here.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fxconvert import convert
from fxconvert.cli import main
from fxconvert.errors import UsageError
from fxconvert.pipeline import SIZE_PROBES, TOKENIZER_FILES, PipelineError, load_pipeline

import helpers
from checkpoints import write_checkpoint

REPO = Path(__file__).resolve().parent.parent
NUM_STAGES = (1, 2, 3, 4)
# (batch, encoder length, decoder length) of the runs: none equals a fixed size of the tiny model except
# the second batch, which equals the head count (4), and none is a size the conversion probed with.
EVAL_SIZES, TRAIN_SIZES = (3, 9, 6), (4, 10, 12)

# In a fresh interpreter where importing transformers fails: import each stage file of each
# directory, load it while recording the tensors it reads, chain the stages in eval mode
# (loss, gradients, received shapes) and in train mode (loss), and save the results.
RUNNER = helpers.NO_TRANSFORMERS + r"""
import safetensors, safetensors.torch, torch

reads = []

class SpyOpen:
    def __init__(self, *args, **kwargs):
        self.handle = real_open(*args, **kwargs)
    def __enter__(self):
        self.handle.__enter__()
        return self
    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)
    def keys(self):
        return self.handle.keys()
    def get_tensor(self, key):
        reads[-1].append(key)
        return self.handle.get_tensor(key)

def whole_file(*args, **kwargs):
    raise AssertionError("a stage read the whole weights file")

real_open, safetensors.safe_open = safetensors.safe_open, SpyOpen
safetensors.torch.load_file = whole_file

def chain(stages, files, inputs):
    # stage 0 takes RECEIVED (none) then INPUTS positionally; later stages take INPUTS by keyword
    values, received = (), []
    for i, (stage, module) in enumerate(zip(stages, files)):
        received.append([(list(v.shape), str(v.dtype).removeprefix("torch.")) for v in values])
        if i == 0:
            values = stage(*values, *(inputs[n] for n in module.INPUTS))
        else:
            values = stage(*values, **{n: inputs[n] for n in module.INPUTS})
    return values, received

directories, cases = sys.argv[1:-2], torch.load(sys.argv[-2])
results = {}
for directory in directories:
    n = len([f for f in __import__("os").listdir(directory) if f.startswith("stage_")])
    files, stages = [], []
    for i in range(n):
        spec = importlib.util.spec_from_file_location(f"stage_{i}", f"{directory}/stage_{i}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        reads.append([])
        stage = module.load()
        assert not stage.training
        files.append(module)
        stages.append(stage)
    loss, received = chain(stages, files, cases["eval"])
    loss.backward()
    grads = [{name: p.grad.clone() for name, p in stage.named_parameters()} for stage in stages]
    for stage in stages:
        stage.train()
    torch.manual_seed(0)
    train_loss, train_received = chain(stages, files, cases["train"])
    results[directory] = {
        "loss": loss.detach(), "grads": grads, "received": received, "train_loss": train_loss.detach(),
        "train_received": train_received, "reads": reads[-n:],
        "parameters": [dict(m.PARAMETERS) for m in files],
        "constants": [{k: getattr(m, k) for k in ("STAGE", "NUM_STAGES", "BLOCKS", "RECEIVED", "INPUTS",
                       "SHARED_WEIGHTS", "SENT", "OUTPUT_NAME", "WEIGHTS")} for m in files],
        "meta_build": all(p.device.type == "meta" for m in files for p in m.build().parameters()),
    }
results["transformers_loaded"] = any(k.startswith("transformers") for k in sys.modules)
torch.save(results, sys.argv[-1])
"""


def make_tokenizer(directory) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny vocabulary, saved with save_pretrained into `directory`."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, helpers.VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                                     unk_token="<unk>")
    tokenizer.save_pretrained(directory)
    return tokenizer


def sizes_inputs(names, sizes, seed):
    return helpers.random_inputs(names, *sizes, seed=seed)


def run_stage_files(directories, cases, tmp) -> dict:
    torch.save(cases, tmp / "cases.pt")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", RUNNER, *map(str, directories), str(tmp / "cases.pt"),
                          str(tmp / "results.pt")], capture_output=True, text=True, env=env, cwd=tmp, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(tmp / "results.pt")


@pytest.fixture(scope="module", params=["original", "v1_1"])
def converted(request, tmp_path_factory):
    """(variant, eager model, source directory, {N: output directory}, results of the stage-file runs)."""
    tmp = tmp_path_factory.mktemp(f"stages-{request.param}")
    ckpt = tmp / "ckpt"
    write_checkpoint(ckpt, variant=request.param)
    make_tokenizer(ckpt)
    eager = transformers.T5ForConditionalGeneration.from_pretrained(ckpt).eval()  # the checkpoint as written
    conversion = convert(ckpt)
    outputs = {n: conversion.save(tmp / f"out{n}", stages=n).out_dir for n in NUM_STAGES}
    names = conversion.input_names
    cases = {"eval": sizes_inputs(names, EVAL_SIZES, 1), "train": sizes_inputs(names, TRAIN_SIZES, 2)}
    results = run_stage_files([outputs[n] for n in NUM_STAGES], cases, tmp)
    return request.param, eager, ckpt, outputs, results, cases


def manifest(out) -> dict:
    return json.loads((Path(out) / "pipeline.json").read_text())


def resolve(shape, sizes):
    batch, enc, dec = sizes
    table = {"batch": batch, "encoder_length": enc, "decoder_length": dec}
    return [table.get(d, d) for d in shape]


# -- the stage files run without transformers and equal eager transformers ------------------------

@pytest.mark.parametrize("n", NUM_STAGES)
def test_stage_files_chain_to_eager_loss_and_gradients(converted, n):
    variant, eager, _, outputs, results, cases = converted
    assert not results["transformers_loaded"]
    result = results[str(outputs[n])]
    eager.zero_grad(set_to_none=True)
    loss = eager(**cases["eval"], use_cache=False).loss
    loss.backward()
    try:
        torch.testing.assert_close(result["loss"], loss.detach(), rtol=0, atol=1e-5)
        # every stage parameter, by its transformers name; copies of a shared weight summed over the stages
        by_param = {}
        for stage, grads in zip(manifest(outputs[n])["stages"], result["grads"]):
            for p in stage["parameters"]:
                param = eager.get_parameter(p["hf_name"])
                by_param.setdefault(id(param), [param, 0])[1] += grads[p["name"]]
        assert set(by_param) == {id(p) for p in eager.parameters()}  # every eager parameter, none twice
        for param, grad in by_param.values():
            torch.testing.assert_close(grad, param.grad, rtol=1e-4, atol=1e-5)
    finally:
        eager.zero_grad(set_to_none=True)
    # train mode: `.train()` drives dropout, drawn in eager's order
    eager.train()
    try:
        torch.manual_seed(0)
        expected = eager(**cases["train"], use_cache=False).loss.detach()
    finally:
        eager.eval()
    torch.testing.assert_close(result["train_loss"], expected, rtol=0, atol=1e-5)
    assert not torch.allclose(result["train_loss"], eager(**cases["train"], use_cache=False).loss)
    assert result["meta_build"]
    if variant == "v1_1":  # the untied head is a stage parameter of its own, not a shared-weight use
        names = {p["hf_name"] for s in manifest(outputs[n])["stages"] for p in s["parameters"]}
        assert "lm_head.weight" in names


@pytest.mark.parametrize("n", NUM_STAGES)
def test_load_reads_only_its_own_tensors(converted, n):
    _, _, _, outputs, results, _ = converted
    result, stages = results[str(outputs[n])], manifest(outputs[n])["stages"]
    with safe_open(str(outputs[n] / "weights.safetensors"), "pt") as f:
        everything = set(f.keys())
    seen = []
    for stage, reads, parameters in zip(stages, result["reads"], result["parameters"]):
        assert len(reads) == len(set(reads))  # each tensor read once
        assert set(reads) == set(parameters.values()) == {p["weights_key"] for p in stage["parameters"]}
        seen += [k for k in reads if k not in stage["shared_weights"]]
    assert len(seen) == len(set(seen))  # a parameter that is not shared lives in exactly one stage
    assert set(seen) | {w for s in stages for w in s["shared_weights"]} == everything


def test_load_works_from_a_file_holding_only_that_stage(converted, tmp_path):
    _, _, _, outputs, _, _ = converted
    pipeline = load_pipeline(outputs[3])
    everything = load_file(str(outputs[3] / "weights.safetensors"))
    module = pipeline.import_stage(1)
    own = {key: everything[key] for key in module.PARAMETERS.values()}
    assert len(own) < len(everything)
    save_file(own, str(tmp_path / "only.safetensors"))
    stage = module.load(str(tmp_path / "only.safetensors"))
    assert {k: torch.equal(v, own[module.PARAMETERS[k]]) for k, v in stage.state_dict().items()} == \
        {k: True for k in module.PARAMETERS}
    missing = dict(own)
    missing.pop(next(iter(missing)))
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(KeyError, match="not written with this file"):
        module.load(str(tmp_path / "missing.safetensors"))


def test_stage_constants_follow_the_calling_convention(converted):
    _, _, _, outputs, results, _ = converted
    for n in NUM_STAGES:
        constants, stages = results[str(outputs[n])]["constants"], manifest(outputs[n])["stages"]
        for i, (c, s) in enumerate(zip(constants, stages)):
            assert (c["STAGE"], c["NUM_STAGES"], c["OUTPUT_NAME"], c["WEIGHTS"]) == (i, n, "loss", "weights.safetensors")
            assert c["BLOCKS"] == s["blocks"] and c["INPUTS"] == s["inputs"]
            assert c["SHARED_WEIGHTS"] == s["shared_weights"]
            assert c["RECEIVED"] == [v["name"] for v in s["received"]] == (constants[i - 1]["SENT"] if i else [])
            assert c["SENT"] == [v["name"] for v in s["sent"]] and (c["SENT"] == []) == (i == n - 1)


# -- pipeline.json -------------------------------------------------------------------------------

@pytest.mark.parametrize("n", NUM_STAGES)
def test_symbolic_shapes_resolve_to_the_shapes_received_at_other_sizes(converted, n):
    _, _, _, outputs, results, _ = converted
    result, stages = results[str(outputs[n])], manifest(outputs[n])["stages"]
    for received, sizes in ((result["received"], EVAL_SIZES), (result["train_received"], TRAIN_SIZES)):
        for stage, actual in zip(stages, received):
            expected = [(resolve(v["shape"], sizes), v["dtype"]) for v in stage["received"]]
            assert [(shape, dtype) for shape, dtype in actual] == expected
    if n > 1:  # encoder hidden states cross the first boundary as (batch, encoder length, d_model)
        assert ["batch", "encoder_length", 32] in [v["shape"] for v in stages[1]["received"]]
    if n == 4:  # and encoder block 0's position bias, (1, heads, encoder length, encoder length)
        assert [1, 4, "encoder_length", "encoder_length"] in [v["shape"] for v in stages[1]["received"]]
    for sizes in (EVAL_SIZES, TRAIN_SIZES):  # the runs above used sizes the conversion never saw
        assert sizes not in [tuple(p.values()) for p in SIZE_PROBES]


@pytest.mark.parametrize("n", NUM_STAGES)
def test_manifest_names_every_eager_tensor_and_counts_its_bytes(converted, n):
    _, eager, _, outputs, _, _ = converted
    m = manifest(outputs[n])
    eager_state = eager.state_dict()
    weights = load_file(str(outputs[n] / "weights.safetensors"))
    assert (m["format"], m["version"], m["num_stages"], m["model_class"], m["model_type"]) == (
        "fxconvert-pipeline", 3, n, "T5ForConditionalGeneration", "t5")
    assert (m["output_name"], m["weights"], m["config"]) == ("loss", "weights.safetensors", "config.json")
    assert m["input_names"] == ["input_ids", "attention_mask", "decoder_input_ids", "labels"]
    assert sorted(all_hf_names(m)) == sorted(eager_state)  # exactly the eager state dict's names, each once
    for name, shared in m["shared_weights"].items():
        assert shared["stages"] == [s["index"] for s in m["stages"] if name in s["shared_weights"]]
    unique = {}
    for stage in m["stages"]:
        for p in stage["parameters"]:
            tensor = weights[p["weights_key"]]
            assert torch.equal(tensor, eager_state[p["hf_name"]]), p["name"]  # the checkpoint's own tensor
            assert (p["shape"], p["dtype"]) == (list(tensor.shape), str(tensor.dtype).removeprefix("torch."))
            assert p["bytes"] == tensor.numel() * tensor.element_size()
            unique[p["weights_key"]] = p["bytes"]
        assert stage["parameter_bytes"] == sum(p["bytes"] for p in stage["parameters"])
    assert sum(unique.values()) == sum(t.numel() * t.element_size() for t in weights.values())
    assert set(unique) == set(weights)


def all_hf_names(m: dict) -> list[str]:
    """Every transformers name in a manifest: parameters (and their tied aliases), then shared weights."""
    names = [n for s in m["stages"] for p in s["parameters"] if p["name"] not in m["shared_weights"]
             for n in [p["hf_name"], *p.get("tied_hf_names", [])]]
    return names + [n for w in m["shared_weights"].values() for n in w["hf_names"]]


def test_a_tied_tensor_the_graph_reads_once_lists_all_its_names():
    """T5EncoderModel ties `shared` to `encoder.embed_tokens` but reads it once: nothing is lifted, and the
    parameter carries both names (the one mirroring its module path first)."""
    from fxconvert.pipeline import pipeline_manifest  # the names the pipeline interface pins
    from fxconvert.stages import split_stages

    model = helpers.build("T5EncoderModel")
    conversion = convert(model)
    assert conversion.shared_weights == {}
    m = pipeline_manifest(split_stages(conversion, 2), conversion)
    assert sorted(all_hf_names(m)) == sorted(model.state_dict())
    (embedding,) = [p for p in m["stages"][0]["parameters"] if "tied_hf_names" in p]
    assert (embedding["hf_name"], embedding["tied_hf_names"]) == ("encoder.embed_tokens.weight", ["shared.weight"])
    assert not any("tied_hf_names" in p for s in m["stages"] for p in s["parameters"] if p is not embedding)


# -- config and tokenizer files -------------------------------------------------------------------

def test_config_and_tokenizer_files_are_copied(converted):
    _, eager, ckpt, outputs, _, _ = converted
    out = outputs[2]
    tokenizer_files = sorted(f for f in TOKENIZER_FILES if (ckpt / f).is_file())
    assert "tokenizer.json" in tokenizer_files and manifest(out)["tokenizer_files"] == tokenizer_files
    for name in tokenizer_files:
        assert (out / name).read_bytes() == (ckpt / name).read_bytes(), name
    text = "w3 w17 w96 unknown w5"
    assert transformers.AutoTokenizer.from_pretrained(out)(text).input_ids == \
        transformers.AutoTokenizer.from_pretrained(ckpt)(text).input_ids
    config = transformers.AutoConfig.from_pretrained(out)
    assert config.architectures == ["T5ForConditionalGeneration"]
    source = transformers.AutoConfig.from_pretrained(ckpt).to_dict()
    where = ("transformers_version", "_name_or_path")  # which library wrote it, and where it was loaded from
    assert {k: v for k, v in config.to_dict().items() if k not in where} == \
        {k: v for k, v in source.items() if k not in where}
    assert "_name_or_path" not in json.loads((out / "config.json").read_text())
    generation = transformers.GenerationConfig.from_pretrained(out)
    assert generation.decoder_start_token_id == eager.generation_config.decoder_start_token_id


def test_cli_stages_writes_the_pipeline_files(converted, tmp_path):
    _, _, ckpt, _, _, _ = converted
    assert main([str(ckpt), "--stages", "2", "--out", str(tmp_path / "conv"), "-q", "--no-validate"]) == 0
    files = set(os.listdir(tmp_path / "conv"))
    assert {"model.py", "weights.safetensors", "stage_0.py", "stage_1.py", "pipeline.json", "config.json",
            "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    assert "stage_2.py" not in files
    pipeline = load_pipeline(tmp_path / "conv")
    assert pipeline.num_stages == 2 and pipeline.tokenizer_files == manifest(tmp_path / "conv")["tokenizer_files"]


# -- load_pipeline -------------------------------------------------------------------------------

def test_load_pipeline_loads_stages(converted):
    _, _, _, outputs, _, _ = converted
    pipeline = load_pipeline(outputs[2])
    assert pipeline.directory == outputs[2] and pipeline.num_stages == 2 and pipeline.output_name == "loss"
    assert [s.file for s in pipeline.stages] == ["stage_0.py", "stage_1.py"]
    weights = load_file(str(outputs[2] / "weights.safetensors"))
    for i in range(2):
        stage = pipeline.load_stage(i)
        assert isinstance(stage, torch.nn.Module) and not stage.training
        assert all(torch.equal(t, weights[k]) for k, t in stage.state_dict().items())
    with pytest.raises(PipelineError, match="no stage 2"):
        pipeline.load_stage(2)


def test_load_pipeline_errors_name_the_fix(converted, tmp_path):
    _, _, _, outputs, _, _ = converted
    with pytest.raises(PipelineError, match=r"conv/ has no pipeline.json; convert with --stages N$") as e:
        load_pipeline(tmp_path / "conv")
    assert isinstance(e.value, UsageError) and "\n" not in str(e.value)
    broken = tmp_path / "broken"
    shutil.copytree(outputs[2], broken)
    good = manifest(broken)
    cases = [
        ("{not json", "malformed"),
        (json.dumps({**good, "format": "other"}), "not an fxconvert pipeline manifest"),
        (json.dumps({**good, "version": 2}), "version 2, this fxconvert reads version 3; convert again"),
        (json.dumps({**good, "num_stages": 3}), "inconsistently"),
        (json.dumps({**good, "weights": "../model.safetensors"}), "must be a file name"),
    ]
    for text, message in cases:
        (broken / "pipeline.json").write_text(text)
        with pytest.raises(PipelineError, match=message):
            load_pipeline(broken)
    (broken / "pipeline.json").write_text(json.dumps(good))
    (broken / "stage_1.py").unlink()
    with pytest.raises(PipelineError, match="stage_1.py is missing; convert again with --stages 2"):
        load_pipeline(broken).load_stage(1)
    shutil.copy(outputs[3] / "stage_1.py", broken / "stage_1.py")  # a stage of another split
    with pytest.raises(PipelineError, match="is not stage 1 of 2"):
        load_pipeline(broken).load_stage(1)


def test_meta_conversion_writes_stage_files_without_weights(tmp_path):
    conversion = convert(helpers.build().to("meta"))
    saved = conversion.save(tmp_path / "out", stages=2)
    assert "weights.safetensors" not in saved.files and "stage_1.py" in saved.files
    pipeline = load_pipeline(tmp_path / "out")
    module = pipeline.import_stage(1)
    assert all(p.device.type == "meta" for p in module.build().parameters())
    with pytest.raises(PipelineError, match="meta device, so no weights were written; use build"):
        pipeline.load_stage(1)


@pytest.mark.parametrize("heads", [2, 3])  # the batch size of the first, then of the second size probe
def test_a_head_count_equal_to_a_probe_batch_stays_fixed(heads):
    from fxconvert.pipeline import pipeline_manifest
    from fxconvert.stages import split_stages

    assert heads in [p["batch"] for p in SIZE_PROBES]
    conversion = convert(helpers.build(num_heads=heads, d_kv=8))
    stages = split_stages(conversion, 4)
    m = pipeline_manifest(stages, conversion)
    shapes = [v["shape"] for v in m["stages"][1]["received"]]
    assert [1, heads, "encoder_length", "encoder_length"] in shapes  # encoder block 0's position bias
    # and it resolves to what the stages send at a batch equal to the head count
    inputs = helpers.random_inputs(conversion.input_names, heads, 9, 6)
    values = stages.stage_module(0)(**{n: inputs[n] for n in stages.specs[0].inputs})
    assert [list(v.shape) for v in values] == [resolve(s, (heads, 9, 6)) for s in shapes]


def test_tokenizer_files_come_from_the_hub_cache_snapshot(tmp_path, monkeypatch):
    """A model found in the Hugging Face cache: its tokenizer files are beside config.json in the snapshot."""
    import huggingface_hub.constants

    from checkpoints import fake_hub_cache

    write_checkpoint(tmp_path / "ckpt")
    make_tokenizer(tmp_path / "ckpt")
    files = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    fake_hub_cache(tmp_path / "cache", "someone/tiny-t5", tmp_path / "ckpt", files=files)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    conversion = convert("someone/tiny-t5", offline=True)
    assert conversion.source.origin == "Hugging Face cache"
    conversion.save(tmp_path / "out", stages=2)
    assert manifest(tmp_path / "out")["tokenizer_files"] == ["tokenizer.json", "tokenizer_config.json"]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "ckpt" / name).read_bytes()


def test_tokenizer_files_of_a_real_hub_cache_layout_are_copied(tmp_path, monkeypatch):
    """huggingface_hub's snapshot files are symlinks into the repository's blobs/: they are inside it."""
    import huggingface_hub.constants

    from checkpoints import fake_hub_cache

    write_checkpoint(tmp_path / "ckpt")
    make_tokenizer(tmp_path / "ckpt")
    files = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    fake_hub_cache(tmp_path / "cache", "someone/tiny-t5", tmp_path / "ckpt", files=files, links=True)
    snapshot = next((tmp_path / "cache").glob("models--*/snapshots/*"))
    assert (snapshot / "tokenizer.json").is_symlink()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    conversion = convert("someone/tiny-t5", offline=True)
    saved = conversion.save(tmp_path / "out", stages=2)
    assert manifest(tmp_path / "out")["tokenizer_files"] == ["tokenizer.json", "tokenizer_config.json"]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "ckpt" / name).read_bytes()
    assert not saved.report.warnings


def test_tokenizer_files_that_are_not_regular_files_inside_the_checkpoint_are_skipped(tmp_path, capsys):
    """A hostile checkpoint: merges.txt a symlink to a secret, a FIFO and a directory under tokenizer names."""
    ckpt, conv = tmp_path / "ckpt", tmp_path / "conv"
    write_checkpoint(ckpt)
    make_tokenizer(ckpt)
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:a secret\n")
    (ckpt / "merges.txt").symlink_to(secret)
    (ckpt / "chat_template.jinja").symlink_to(Path("..") / "secret.txt")
    (ckpt / "templates").mkdir()
    (ckpt / "templates" / "chat.json").write_text('{"chat_template": "{{ messages }}"}')
    (ckpt / "chat_template.json").symlink_to(Path("templates") / "chat.json")  # inside: copied
    os.mkfifo(ckpt / "vocab.txt")
    (ckpt / "vocab.json").mkdir()
    assert main([str(ckpt), "--stages", "2", "--out", str(conv), "-q", "--no-validate"]) == 0
    err = capsys.readouterr().err
    for name, why in [("merges.txt", "a symlink to a file outside it"), ("chat_template.jinja", "a symlink to a "
                      "file outside it"), ("vocab.txt", "not a regular file"), ("vocab.json", "not a regular file")]:
        assert not (conv / name).exists() and not (conv / name).is_symlink(), name
        (line,) = [line for line in err.splitlines() if f"{name} not copied" in line]
        assert line.startswith("warning: ") and why in line, line
    assert all(b"a secret" not in p.read_bytes() for p in conv.iterdir())
    assert manifest(conv)["tokenizer_files"] == ["chat_template.json", "tokenizer.json", "tokenizer_config.json"]
    assert (conv / "chat_template.json").read_bytes() == (ckpt / "templates" / "chat.json").read_bytes()
    report = json.loads((conv / "report.json").read_text())
    assert sum("not copied" in w for w in report["warnings"]) == 4


@pytest.mark.parametrize("n", NUM_STAGES)
def test_manifest_carries_the_split_plan(converted, n):
    """pipeline.json states how the split was chosen: the plan the same split predicts, per stage and in all."""
    from fxconvert.stages import split_stages, stage_plan

    _, _, ckpt, outputs, _, _ = converted
    m = manifest(outputs[n])
    stages = split_stages(convert(ckpt), n)  # the split Conversion.save(stages=n) made: deterministic
    plan = stage_plan(stages)
    assert m["plan"] == json.loads(json.dumps(plan))
    assert [s["flops"] for s in m["stages"]] == plan["flops"] == [spec.flops for spec in stages.specs]
    assert [s["peak_bytes"] for s in m["stages"]] == plan["peak_bytes"]
    assert [s["blocks"] for s in m["stages"]] == [spec.blocks for spec in stages.specs]
