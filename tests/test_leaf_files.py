"""Writing and splitting a conversion with leaves: model.py and the stage files rebuild each leaf from transformers.

A leaf (`fxconvert.trace`) is one of the model's own transformers modules. The files written for it
import its class by name, build it from the model's config and load its tensors from the weights
file, and their docstrings say they need transformers for those leaves. Here, for Mixtral (its
expert loops) and M2M-100 (its position tables, whose buffers the constructor computes), written
by the command line with --stages 2:

- the split keeps a block boundary as a cut point and each leaf, with its weights, in its block's stage;
- a fresh interpreter imports the stage files without transformers, then loads model.py and the
  stages, and their loss and every gradient equal eager transformers' at 1e-5;
- a leaf class that cannot be imported, and a tampered leaf class or path, fail in one line.
"""

import json
import subprocess
import sys

import pytest
import torch
import transformers

from fxconvert.cli import main
from fxconvert.families import derived
from fxconvert.pipeline import PipelineError, load_pipeline

import train_runs
from helpers import WRITTEN_FILES_RUNNER, assert_written_runs_equal_eager, two_stage_run

TYPES = {"mixtral": transformers.AutoModelForCausalLM, "m2m_100": transformers.AutoModelForSeq2SeqLM}


def tiny(model_type):
    config = derived.tiny_config(model_type)
    for key in derived.TRAINING_DRAWS:  # M2M-100's LayerDrop is refused (tests/test_leaves.py)
        if getattr(config, key, 0) > 0:
            setattr(config, key, 0.0)
    torch.manual_seed(0)
    return TYPES[model_type].from_config(config).eval()


def inputs_for(model, names):
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    feed = {"input_ids": torch.randint(3, vocab, (2, 7), generator=g), "attention_mask": torch.ones(2, 7, dtype=torch.long),
            "decoder_input_ids": torch.randint(3, vocab, (2, 5), generator=g)}
    feed["attention_mask"][0, -2:] = 0
    feed["labels"] = feed["decoder_input_ids" if "decoder_input_ids" in names else "input_ids"].clone()
    return {n: feed[n] for n in names}


@pytest.fixture(scope="module", params=list(TYPES))
def written(request, tmp_path_factory):
    """(model type, eager model, output directory), converted from a checkpoint by the command line."""
    root = tmp_path_factory.mktemp(request.param)
    model = tiny(request.param)
    model.save_pretrained(root / "ckpt")
    assert main([str(root / "ckpt"), "--stages", "2", "--out", str(root / "out"), "-q"]) == 0
    return request.param, model, root / "out"


def _docstring(path) -> str:
    import ast

    return " ".join(ast.get_docstring(ast.parse(path.read_text())).split())


def test_the_split_keeps_block_boundaries_and_each_leaf_with_its_block(written):
    model_type, model, out = written
    pipeline = load_pipeline(out)
    report = json.loads((out / "report.json").read_text())
    leaves = [row["module"] for row in report["model"]["leaves"]]
    assert leaves
    for stage in pipeline.stages:
        mine = [leaf for leaf in leaves if any(leaf.startswith(block + ".") for block in stage.blocks)]
        own = {p.name.removeprefix("graph_module.") for p in stage.parameters}
        for leaf in mine:  # the leaf's weights travel with its stage
            expected = {f"{leaf}.{name}" for name, _ in model.get_submodule(leaf).named_parameters()}
            assert expected <= own, (leaf, expected - own)
    if model_type == "mixtral":  # a layer holding its expert leaf is still one block: the cut is between layers
        assert [s.blocks for s in pipeline.stages] == [("model.layers.0",), ("model.layers.1",)]


def test_the_files_say_they_need_transformers_for_their_leaves(written):
    model_type, model, out = written
    pipeline = load_pipeline(out)
    version = transformers.__version__
    report = json.loads((out / "report.json").read_text())
    leaves = [row["module"] for row in report["model"]["leaves"]]
    assert f"needs transformers {version} for the leaves: {', '.join(leaves)}." in _docstring(out / "model.py")
    for i in range(pipeline.num_stages):
        text = (out / f"stage_{i}.py").read_text()
        mine = [leaf for leaf in leaves if f"'{leaf}': ('transformers." in text]
        doc = _docstring(out / f"stage_{i}.py")
        if mine:
            assert f"needs transformers {version} for the leaves: {', '.join(mine)}." in doc
        else:
            assert doc.endswith("Needs torch, safetensors and fxconvert.runtime; not transformers.")
            assert "import transformers" not in text and "TRANSFORMERS_LEAVES" not in text


def test_model_and_stages_in_a_fresh_process_equal_eager_with_every_gradient(written, tmp_path):
    model_type, model, out = written
    pipeline = load_pipeline(out)
    inputs = inputs_for(model, pipeline.input_names)
    torch.save(inputs, tmp_path / "cases.pt")
    run = subprocess.run([sys.executable, "-c", WRITTEN_FILES_RUNNER, str(out), str(tmp_path / "cases.pt"),
                          str(tmp_path / "result.pt")], env=train_runs.env(), capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = torch.load(tmp_path / "result.pt")
    assert result["imported"] is False and result["loaded"] is True
    assert_written_runs_equal_eager(model, inputs, result)


@pytest.mark.parametrize("written", ["mixtral"], indirect=True)
def test_a_stage_with_leaves_runs_its_blocks_under_recompute(written):
    """A rank re-traces a stage file's graph to recompute its blocks: a leaf stays one call (its expert loop
    decides on values), and the loss and every gradient are those of the plain run."""
    model_type, model, out = written
    pipeline = load_pipeline(out)
    inputs = inputs_for(model, pipeline.input_names)
    plain, recomputed = two_stage_run(pipeline, inputs, False), two_stage_run(pipeline, inputs, True)
    assert set(plain) == set(recomputed) and any("experts" in name for name in plain)
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=0, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


# -- hostile ---------------------------------------------------------------------------------------

def _copy(out, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    return copy


@pytest.mark.parametrize("written", ["mixtral"], indirect=True)
def test_a_leaf_class_that_cannot_be_imported_fails_in_one_line(written, monkeypatch):
    module = "transformers.models.mixtral.modeling_mixtral"
    monkeypatch.setitem(sys.modules, module, None)  # as where transformers is missing or lacks it
    pipeline = load_pipeline(written[2])
    with pytest.raises(PipelineError) as e:
        pipeline.load_stage(0)
    version = transformers.__version__
    assert str(e.value) == (f"stage 0: the leaf model.layers.0.mlp.experts needs transformers {version}'s "
                            f"{module}.MixtralExperts, which cannot be imported (ModuleNotFoundError: import of "
                            f"{module} halted; None in sys.modules); install transformers {version}")


@pytest.mark.parametrize("old, new, expected", [
    ("('transformers.models.mixtral.modeling_mixtral', 'MixtralExperts',", "('os', 'system',",
     "stage 0: the leaf model.layers.0.mlp.experts names os.system, which is not transformers' own; this file was "
     "altered: convert again"),
    ("('transformers.models.mixtral.modeling_mixtral', 'MixtralExperts',",
     "('transformers.models.mixtral.modeling_mixtral', 'MixtralConfig',",
     "stage 0: the leaf model.layers.0.mlp.experts names transformers.models.mixtral.modeling_mixtral.MixtralConfig, "
     "which is not a module; this file was altered: convert again"),
    ("    'model.layers.0.mlp.experts': ('transformers.", "    'model.layers.0.mlp.expertz': ('transformers.",
     "stage 0: {weights} and stage_0.py were not written together ("),
    # a torch class that a transformers module imports is not transformers' own: it is not even built
    ("('transformers.models.mixtral.modeling_mixtral', 'MixtralExperts', 'config',",
     "('transformers.models.bert.modeling_bert', 'CrossEntropyLoss', 'config',",
     "stage 0: the leaf model.layers.0.mlp.experts names transformers.models.bert.modeling_bert.CrossEntropyLoss, "
     "which is not transformers' own; this file was altered: convert again"),
    # the config class must be a config: another transformers class's from_dict is not called
    ("LEAF_CONFIG = ('transformers.models.mixtral.configuration_mixtral',\n 'MixtralConfig',",
     "LEAF_CONFIG = ('transformers.models.mixtral.modeling_mixtral',\n 'MixtralExperts',",
     "stage 0: the leaf model.layers.0.mlp.experts's config names transformers.models.mixtral.modeling_mixtral."
     "MixtralExperts, which is not a config; this file was altered: convert again"),
])
@pytest.mark.parametrize("written", ["mixtral"], indirect=True)
def test_a_tampered_leaf_in_a_stage_file_fails_in_one_line(written, tmp_path, old, new, expected):
    out = _copy(written[2], tmp_path)
    path = out / "stage_0.py"
    text = path.read_text()
    assert text.count(old) == 1
    path.write_text(text.replace(old, new))
    with pytest.raises(PipelineError) as e:
        load_pipeline(out).load_stage(0)
    message = str(e.value)
    assert "\n" not in message and message.startswith(expected.format(weights=out / "weights.safetensors")), message
