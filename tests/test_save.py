"""Saved files: the weights round-trip, model.py runs without transformers, writes are atomic."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fxconvert.save as save_module
from fxconvert import convert
from fxconvert.errors import UsageError
from fxconvert.save import MARKER, MODEL_FILE, REPORT_JSON, REPORT_MD, WEIGHTS_FILE, SaveError, save

import helpers
from checkpoints import checkpoint_tensors, leftovers, write_checkpoint

REPO = Path(__file__).resolve().parent.parent

# Run model.py in a fresh interpreter where importing transformers fails, on inputs and
# references written by the test; print the largest difference per case as JSON.
RUNNER = helpers.NO_TRANSFORMERS + r"""
import torch

out_dir, cases = sys.argv[1], torch.load(sys.argv[2])
spec = importlib.util.spec_from_file_location("model", out_dir + "/model.py")
model = importlib.util.module_from_spec(spec)
spec.loader.exec_module(model)
m = model.load()
diffs = {}
for key, (mode, inputs, expected) in cases.items():
    m.train(mode == "train")
    torch.manual_seed(0)
    diffs[key] = (m(**inputs) - expected).abs().max().item()
skeleton = model.build()
print(json.dumps({"diffs": diffs, "transformers_loaded": any(k.startswith("transformers") for k in sys.modules),
                  "meta_build": all(p.device.type == "meta" for p in skeleton.parameters()),
                  "keys": sorted(skeleton.state_dict())}))
"""


def eager_name(conversion, key: str) -> str:
    """The eager name of a weights-file key: shared weights by their first tied name, the rest by path."""
    if key in conversion.shared_weights:
        return conversion.shared_weights[key][0]
    return key.removeprefix("graph_module.")


@pytest.mark.parametrize("cls_name, variant", [("T5ForConditionalGeneration", "original"), ("MT5Model", "v1_1")])
def test_weights_round_trip_to_the_checkpoint(cls_name, variant, tmp_path):
    write_checkpoint(tmp_path / "ckpt", cls_name, variant=variant)
    original = checkpoint_tensors(tmp_path / "ckpt")
    conversion = convert(tmp_path / "ckpt")
    conversion.save(tmp_path / "out")
    saved = load_file(str(tmp_path / "out" / WEIGHTS_FILE))
    assert set(saved) == set(conversion.module.state_dict())
    for key, tensor in saved.items():
        assert torch.equal(tensor, original[eager_name(conversion, key)]), key
    # the shared weight is stored once: one entry per distinct eager tensor the module uses
    assert len(saved) == len({id(p) for p in conversion.module.parameters()})
    assert not any(k.endswith(("embed_tokens.weight", "lm_head.weight")) for k in saved)


def test_model_py_runs_without_transformers_and_matches_eager(tmp_path):
    model = helpers.build("T5ForConditionalGeneration", variant="v1_1")
    conversion = convert(model)
    conversion.save(tmp_path / "out")
    cases = {}
    for mode, (batch, enc, dec) in [("eval", (2, 6, 4)), ("eval", (1, 11, 7)), ("train", (3, 5, 5))]:
        inputs = helpers.random_inputs(conversion.input_names, batch, enc, dec)
        model.train(mode == "train")
        torch.manual_seed(0)
        expected = helpers.eager_outputs(model, inputs)["loss"].detach()
        cases[f"{mode} {batch}x{enc}/{dec}"] = (mode, inputs, expected)
    model.eval()
    torch.save(cases, tmp_path / "cases.pt")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", RUNNER, str(tmp_path / "out"), str(tmp_path / "cases.pt")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert not result["transformers_loaded"]
    assert set(result["diffs"]) == set(cases)
    assert all(d <= 1e-5 for d in result["diffs"].values()), result["diffs"]  # float32, other threads
    assert result["meta_build"] and result["keys"] == sorted(conversion.module.state_dict())


def test_model_py_is_readable_source(tmp_path):
    conversion = convert(helpers.build())
    conversion.save(tmp_path / "out")
    text = (tmp_path / "out" / MODEL_FILE).read_text()
    assert not re.search(r"^\s*(import|from) transformers", text, re.M)
    assert "def load(" in text and "def build(" in text and "class Converted(nn.Module)" in text
    assert "'encoder.block.0.layer.0.SelfAttention.q': ('Linear', {'in_features': 32, 'out_features': 32, " \
           "'bias': False})" in text
    assert "    def forward(self, input_ids, attention_mask, decoder_input_ids, labels, shared_embed_weight" in text


def test_meta_conversion_by_name_writes_no_weights(tmp_path):
    conversion = convert("google/t5-v1_1-small", offline=True, meta=True)
    assert conversion.source.origin == "preset" and conversion.source.device == "meta"
    saved = conversion.save(tmp_path / "out")
    assert saved.files == [MODEL_FILE, REPORT_MD, REPORT_JSON]
    assert not (tmp_path / "out" / WEIGHTS_FILE).exists()
    assert "meta device" in (tmp_path / "out" / MODEL_FILE).read_text()
    report = json.loads((tmp_path / "out" / REPORT_JSON).read_text())
    assert any("no weights are written" in w for w in report["warnings"])


def test_existing_output_is_refused_without_force_and_replaced_with_it(tmp_path):
    conversion = convert(helpers.build())
    out = tmp_path / "out"
    conversion.save(out)
    before = leftovers(tmp_path)
    with pytest.raises(UsageError, match="already exists; pass force=True"):
        conversion.save(out)
    assert leftovers(tmp_path) == before
    conversion.save(out, force=True)
    assert sorted(os.listdir(out)) == sorted([MARKER, MODEL_FILE, WEIGHTS_FILE, REPORT_MD, REPORT_JSON])
    assert leftovers(tmp_path) == before


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_write_leaves_the_old_output_untouched(error, tmp_path, monkeypatch):
    conversion = convert(helpers.build())
    out = tmp_path / "deep" / "out"
    conversion.save(out)
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(save_module, "save_weights", fail)
    expected = SaveError if isinstance(error, OSError) else KeyboardInterrupt
    with pytest.raises(expected):
        conversion.save(out, force=True)
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before  # no new model.py beside old weights
    assert leftovers(tmp_path) == sorted(["deep", "deep/out"] + [f"deep/out/{f}" for f in before])
    with pytest.raises(expected):  # a fresh destination: nothing at all is left, not even its parents
        conversion.save(tmp_path / "new" / "out")
    assert not (tmp_path / "new").exists()


def test_unwritable_destination_fails_before_writing(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(SaveError, match="not a directory"):
        save(convert(helpers.build()), tmp_path / "file" / "out")
    assert leftovers(tmp_path) == ["file"]
