"""Writing and splitting a conversion with a function leaf or a tensor constant (`tests/test_leaf_files.py` for
module leaves).

LongT5 calls `_split_into_blocks`, a function of its modeling module that decides on traced values: the
graph calls it as one `call_function` leaf, and the written files import it from transformers by
module and name (repr() literals in TRANSFORMERS_FUNCTIONS) when they are built. LongT5's local
attention mask (128 x 384) and T5Gemma's `hidden_size**0.5` are tensors the trace builds from
constants: the files rebuild them (TENSOR_CONSTANTS: a literal when small, else from the weights file),
and pipeline.json does not list them as transformers tensors. Here, written by the command line with
--stages 2:

- a fresh interpreter imports the stage files without transformers, then loads model.py and the
  stages of both models, and their loss and every gradient equal eager transformers' at 1e-5;
- a rank recomputing a stage's blocks keeps the function leaf one call;
- a function leaf that cannot be imported, and a function table pointing outside transformers, fail
  in one line.
"""

import ast
import shutil
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

TYPES = ("longt5", "t5gemma")
FUNCTION = "transformers.models.longt5.modeling_longt5._split_into_blocks"
GLOBAL = FUNCTION.replace(".", "_")  # the name the generated forward calls it by


def tiny(model_type):
    torch.manual_seed(0)
    return transformers.AutoModelForSeq2SeqLM.from_config(derived.tiny_config(model_type)).eval()


def inputs_for(model):
    g = torch.Generator().manual_seed(0)
    vocab = model.config.get_text_config().vocab_size
    feed = {"input_ids": torch.randint(3, vocab, (2, 7), generator=g), "attention_mask": torch.ones(2, 7, dtype=torch.long),
            "decoder_input_ids": torch.randint(3, vocab, (2, 5), generator=g)}
    feed["attention_mask"][0, -2:] = 0
    feed["labels"] = feed["decoder_input_ids"].clone()
    return feed


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """model type -> (eager model, output directory), each converted from a checkpoint by the command line."""
    out = {}
    for model_type in TYPES:
        root = tmp_path_factory.mktemp(model_type)
        model = tiny(model_type)
        model.save_pretrained(root / "ckpt")
        assert main([str(root / "ckpt"), "--stages", "2", "--out", str(root / "out"), "-q"]) == 0
        out[model_type] = model, root / "out"
    return out


def test_the_files_import_the_function_leaf_from_transformers_and_rebuild_the_constants(written):
    _, out = written["longt5"]
    text = (out / "model.py").read_text()
    imported = [alias.name if isinstance(stmt, ast.Import) else stmt.module for stmt in ast.parse(text).body
                if isinstance(stmt, (ast.Import, ast.ImportFrom)) for alias in stmt.names]
    assert imported and not any(name.startswith("transformers") for name in imported)  # imported when built
    assert f"'{FUNCTION.rsplit('.', 1)[0]}', '_split_into_blocks')" in text
    doc = " ".join(text.split('"""')[1].split())
    assert f"{FUNCTION}()" in doc and doc.startswith("LongT5ForConditionalGeneration")
    text = (written["t5gemma"][1] / "model.py").read_text()
    assert "TENSOR_CONSTANTS" in text and "Needs torch, safetensors and fxconvert.runtime; not transformers." in text
    for model_type in TYPES:  # pipeline.json names only the model's tensors, each in transformers terms
        model, out = written[model_type]
        eager = set(model.state_dict()) | {name for name, _ in model.named_buffers()}
        for stage in load_pipeline(out).stages:
            assert all(p.hf_name in eager for p in stage.parameters)


def test_model_and_stages_in_a_fresh_process_equal_eager_with_every_gradient(written, tmp_path):
    jobs = []
    for model_type in TYPES:
        model, out = written[model_type]
        torch.save(inputs_for(model), tmp_path / f"{model_type}.pt")
        jobs += [str(out), str(tmp_path / f"{model_type}.pt"), str(tmp_path / f"{model_type}.result.pt")]
    run = subprocess.run([sys.executable, "-c", WRITTEN_FILES_RUNNER, *jobs], env=train_runs.env(), capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    for model_type in TYPES:
        model, _ = written[model_type]
        inputs = inputs_for(model)
        result = torch.load(tmp_path / f"{model_type}.result.pt")
        assert result["imported"] is False
        assert_written_runs_equal_eager(model, inputs, result, model_type)


def test_a_stage_with_a_function_leaf_runs_its_blocks_under_recompute(written):
    """A rank re-traces a stage file's graph to recompute its blocks: the function leaf stays one call (it
    decides on values), and the loss and every gradient are those of the plain run."""
    model, out = written["longt5"]
    pipeline = load_pipeline(out)
    inputs = inputs_for(model)
    plain, recomputed = two_stage_run(pipeline, inputs, False), two_stage_run(pipeline, inputs, True)
    assert set(plain) == set(recomputed)
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=0, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


# -- hostile ---------------------------------------------------------------------------------------

def _stage_with_the_function(out) -> int:
    pipeline = load_pipeline(out)
    return next(i for i in range(pipeline.num_stages) if "_split_into_blocks'" in (out / f"stage_{i}.py").read_text())


def test_a_function_leaf_that_cannot_be_imported_fails_in_one_line(written, monkeypatch):
    from transformers.models.longt5 import modeling_longt5

    out = written["longt5"][1]
    index = _stage_with_the_function(out)
    monkeypatch.delattr(modeling_longt5, "_split_into_blocks")  # as in a transformers that lacks it
    with pytest.raises(PipelineError) as e:
        load_pipeline(out).load_stage(index)
    version, module = transformers.__version__, modeling_longt5.__name__
    assert str(e.value) == (f"stage {index}: the leaf function {GLOBAL} needs transformers {version}'s {FUNCTION}, "
                            f"which cannot be imported (AttributeError: module '{module}' has no attribute "
                            f"'_split_into_blocks'); install transformers {version}")


@pytest.mark.parametrize("new, expected", [
    ("('os', 'system')", "names os.system, which is not transformers' own; this file was altered: convert again"),
    (f"('{FUNCTION.rsplit('.', 1)[0]}', 'LongT5Config')",
     f"names {FUNCTION.rsplit('.', 1)[0]}.LongT5Config, which is not a function; this file was altered: convert again"),
    # shutil.copyfile, which a transformers module imports: a function, but not transformers' own
    ("('transformers.tokenization_utils_sentencepiece', 'copyfile')",
     "names transformers.tokenization_utils_sentencepiece.copyfile, which is not transformers' own; this file was "
     "altered: convert again"),
])
def test_a_tampered_function_leaf_in_a_stage_file_fails_in_one_line(written, tmp_path, new, expected):
    out = tmp_path / "copy"
    shutil.copytree(written["longt5"][1], out)
    index = _stage_with_the_function(out)
    path = out / f"stage_{index}.py"
    old = f"('{FUNCTION.rsplit('.', 1)[0]}', '_split_into_blocks')"
    text = path.read_text()
    assert text.count(old) == 1
    path.write_text(text.replace(old, new))
    with pytest.raises(PipelineError) as e:
        load_pipeline(out).load_stage(index)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"stage {index}: the leaf function ") and \
        message.endswith(expected), message
