"""Models in bfloat16 and float16, and outputs that drop the tied head, through load, convert and
the command line; every comparison is with eager transformers."""

import copy
import importlib.util
import json
import uuid

import pytest
import torch
import transformers

from fxconvert import convert
from fxconvert.cli import main
from fxconvert.errors import UsageError
from fxconvert.load import load
from fxconvert.validate import validate

import helpers
from checkpoints import leftovers, write_checkpoint

CLS = transformers.T5ForConditionalGeneration


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A float32 checkpoint written with save_pretrained."""
    path = tmp_path_factory.mktemp("dtypes") / "ckpt"
    write_checkpoint(path)
    return path


def saved_in(directory, dtype, **overrides):
    """A checkpoint saved in `dtype`, the way a user who fine-tuned in it would save it."""
    model = helpers.build(**overrides).to(dtype)
    model.save_pretrained(directory)
    return directory


def dtypes(model) -> dict:
    return {name: p.dtype for name, p in model.named_parameters()}


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def import_model_py(directory):
    spec = importlib.util.spec_from_file_location(f"model_{uuid.uuid4().hex}", directory / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- load(dtype=...) as transformers loads ----------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_a_checkpoint_loads_in_a_dtype_as_from_pretrained_does(ckpt, dtype):
    expected = CLS.from_pretrained(ckpt, dtype=getattr(torch, dtype))
    model = load(ckpt, dtype=dtype).model
    assert dtypes(model) == dtypes(expected)
    for (name, p), q in zip(model.named_parameters(), expected.parameters()):
        assert torch.equal(p, q), name
    if dtype == "float16":  # T5's _keep_in_fp32_modules
        assert {d for n, d in dtypes(model).items() if ".wo." in n} == {torch.float32}
        assert {d for n, d in dtypes(model).items() if ".wo." not in n} == {torch.float16}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_config_build_gets_the_dtypes_from_pretrained_gives(ckpt, tmp_path, dtype):
    config = tmp_path / "config.json"
    config.write_text((ckpt / "config.json").read_text())
    expected = CLS.from_pretrained(ckpt, dtype=getattr(torch, dtype))
    assert dtypes(load(config, dtype=dtype, allow_random=True).model) == dtypes(expected)
    assert dtypes(load(config, dtype=dtype, meta=True).model) == dtypes(expected)


@pytest.mark.parametrize("bad", ["float64", "torch.float16", "Float16", "", 16, torch.int8])
def test_an_unknown_dtype_is_a_usage_error(ckpt, bad):
    with pytest.raises(UsageError, match=r"unknown dtype .*; choose float32, bfloat16, float16"):
        load(ckpt, dtype=bad)


def test_dtype_applies_to_names_only():
    with pytest.raises(UsageError, match="dtype apply to a model given by name"):
        convert(helpers.build(), dtype="float16")


# -- fp16: wo kept in fp32 --------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["original", "v1_1"])
def test_fp16_with_wo_in_fp32_converts_and_matches_eager(tmp_path, variant):
    helpers.build(variant=variant).save_pretrained(tmp_path / "ckpt")
    model = load(tmp_path / "ckpt", dtype="float16").model
    reference = copy.deepcopy(model)
    conversion = convert(model)
    result = validate(conversion)  # outputs and every gradient against eager fp16, in eval and train mode
    assert result.passed, result.failures
    assert (result.dtype, result.rtol) == ("float16", 1e-3)
    inputs = helpers.random_inputs(conversion.input_names, 2, 6, 4)
    out = conversion.module(**inputs)
    expected = helpers.eager_outputs(reference, inputs)["loss"]
    assert out.dtype == expected.dtype
    torch.testing.assert_close(out, expected)  # torch.testing's fp16 tolerance


# -- the command line --------------------------------------------------------------------------


def test_a_bf16_checkpoint_converts_with_default_options(tmp_path, capsys):
    """A user fine-tuning in bf16 saves in bf16 and converts without options."""
    ckpt = saved_in(tmp_path / "bf16", torch.bfloat16)
    code, out, err = run_cli(capsys, ckpt, "--out", tmp_path / "out", "--format", "json")
    assert code == 0, err
    report = json.loads(out)
    assert report["model"]["dtype"] == "bfloat16"
    validation = report["validation"]
    assert validation["passed"] and (validation["dtype"], validation["atol"], validation["rtol"]) == (
        "bfloat16", 1e-5, 1.6e-2)
    assert "(the bfloat16 defaults)" in validation["rule"]
    code, out, err = run_cli(capsys, ckpt, "--out", tmp_path / "out2", "--format", "plain")
    assert code == 0, err
    assert "tolerance: bfloat16: atol 1e-05, rtol 0.016" in out and "rule:" in out


def test_an_fp16_checkpoint_converts_with_default_options(tmp_path, capsys):
    """save_pretrained of an fp16 model; transformers loads it back in fp16 with wo in fp32."""
    ckpt = saved_in(tmp_path / "fp16", torch.float16)
    code, out, err = run_cli(capsys, ckpt, "--out", tmp_path / "out", "--format", "json")
    assert code == 0, err
    report = json.loads(out)
    assert report["model"]["dtype"] == "float16, float32" and report["validation"]["dtype"] == "float16"


def test_dtype_option_loads_in_that_dtype_and_model_py_runs_it(ckpt, tmp_path, capsys):
    code, out, err = run_cli(capsys, ckpt, "--dtype", "float16", "--out", tmp_path / "out", "--format", "json")
    assert code == 0, err
    assert json.loads(out)["model"]["dtype"] == "float16, float32"
    generated = import_model_py(tmp_path / "out").load()
    eager = CLS.from_pretrained(ckpt, dtype=torch.float16).eval()
    assert {str(d) for n, d in dtypes(generated).items() if ".wo." in n} == {"torch.float32"}
    inputs = helpers.random_inputs(["input_ids", "attention_mask", "decoder_input_ids", "labels"], 2, 6, 4)
    torch.testing.assert_close(generated(**inputs), helpers.eager_outputs(eager, inputs)["loss"])


@pytest.mark.parametrize("args, message", [
    (("--dtype", "float64"), "argument --dtype: invalid choice: 'float64'"),
    (("--rtol", "nan"), "--rtol must be a finite number >= 0, got nan"),
    (("--rtol=-1e-3",), "--rtol must be a finite number >= 0, got -0.001"),
    (("--atol", "inf"), "--atol must be a finite number >= 0, got inf"),
])
def test_bad_dtype_and_tolerance_options_are_usage_errors(ckpt, tmp_path, capsys, args, message):
    code, out, err = run_cli(capsys, ckpt, "--out", tmp_path / "out", *args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err
    assert not (tmp_path / "out").exists()


def test_rtol_and_atol_replace_the_defaults(tmp_path, capsys):
    ckpt = saved_in(tmp_path / "bf16", torch.bfloat16)
    code, out, err = run_cli(capsys, ckpt, "--out", tmp_path / "out", "--rtol", "0", "--atol", "1e-9")
    assert code == 1 and "exceed the tolerance (bfloat16: atol 1e-09, rtol 0)" in err
    assert "grad shared.weight differs by" in err


def test_the_encoder_output_drops_the_decoder_inputs_from_model_py(ckpt, tmp_path, capsys):
    code, out, err = run_cli(capsys, ckpt, "--output", "encoder_last_hidden_state", "--out", tmp_path / "out",
                             "--format", "json")
    assert code == 0, err
    report = json.loads(out)
    assert report["validation"]["passed"]
    assert report["io"]["dropped_inputs"] == ["decoder_input_ids", "labels"]
    assert [i["name"] for i in report["io"]["inputs"]] == ["input_ids", "attention_mask", "shared_embed_weight",
                                                          "training"]
    assert "dropped inputs: decoder_input_ids, labels (the output encoder_last_hidden_state does not read them)" \
        in (tmp_path / "out" / "report.md").read_text()
    module = import_model_py(tmp_path / "out")
    assert module.INPUT_NAMES == ("input_ids", "attention_mask")
    generated = module.load()
    eager = CLS.from_pretrained(ckpt).eval()
    inputs = helpers.random_inputs(["input_ids", "attention_mask", "decoder_input_ids"], 2, 6, 4)
    out = generated(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    expected = helpers.eager_outputs(eager, inputs)["encoder_last_hidden_state"]
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(generated.shared_embed_weight.grad, eager.shared.weight.grad)
    torch.nn.utils.clip_grad_norm_(generated.parameters(), 1.0)  # a sparse gradient fails here
    torch.optim.AdamW(generated.parameters()).step()


def test_nan_weights_in_a_checkpoint_fail_with_one_line(tmp_path, capsys):
    model = helpers.build()
    with torch.no_grad():
        model.decoder.block[1].layer[2].DenseReluDense.wi.weight[3, 4] = float("nan")
    model.save_pretrained(tmp_path / "ckpt")
    before = leftovers(tmp_path)
    code, out, err = run_cli(capsys, tmp_path / "ckpt", "--out", tmp_path / "out")
    assert code == 1
    line = err.strip().splitlines()[-1]
    assert line.startswith("fxconvert: error: validation failed: output loss in run 'eval 2x7/5' is not finite in "
                           "the converted module (NaN at 1 of 1 elements); eager is not finite there too")
    assert line.endswith("NaN or inf weights in the checkpoint are the usual cause (look with torch.isfinite)")
    assert leftovers(tmp_path) == before
