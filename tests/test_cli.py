"""The command line: in-process for the many cases, in a subprocess for the real program."""

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fxconvert.cli import main
from fxconvert.load import PRESETS

from checkpoints import edit_config, leftovers, write_checkpoint

REPO = Path(__file__).resolve().parent.parent
FILES = [".fxconvert", "model.py", "report.json", "report.md", "weights.safetensors"]


@pytest.fixture
def ckpt(tmp_path):
    write_checkpoint(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_converts_validates_writes_and_reports(ckpt, tmp_path, capsys):
    code, out, err = run_cli(capsys, ckpt, "--out", tmp_path / "out", "--format", "json")
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "out")) == FILES
    report = json.loads(out)
    assert report == json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["status"] == "ok" and report["warnings"] == []
    assert report["model"]["source"]["origin"] == "local directory"
    assert report["validation"]["passed"] is True and len(report["validation"]["checks"]) > 100
    assert set(report["timings"]) == {"load", "trace", "passes", "validate", "write"}
    for phase in ("load", "trace", "passes", "validate", "write"):
        assert f"✓ {phase}" in err
    assert f"Wrote {tmp_path / 'out'}" in err


def test_stages_add_a_report_table_and_one_file_per_stage(ckpt, tmp_path, capsys):
    code, out, err = run_cli(capsys, ckpt, "--out", tmp_path / "out", "--format", "json", "--stages", "3")
    assert code == 0, err
    pipeline = ["config.json", "generation_config.json", "pipeline.json"]  # this checkpoint has no tokenizer files
    assert sorted(os.listdir(tmp_path / "out")) == sorted(FILES + pipeline + [f"stage_{i}.py" for i in range(3)])
    rows = json.loads(out)["stages"]
    assert [r["stage"] for r in rows] == [0, 1, 2]
    # every block of the 2+2-layer model lands in exactly one stage, in order
    assert [b for r in rows for b in r["blocks"]] == [f"encoder.block.{i}" for i in range(2)] + [
        f"decoder.block.{i}" for i in range(2)]
    # the tied embedding reaches the first stage (encoder embedding) and the last (decoder side, LM head)
    assert rows[0]["receives_shared_weight"] and rows[-1]["receives_shared_weight"]
    assert all(r["sent_bytes"] > 0 for r in rows[:-1]) and rows[-1]["sent"] == []
    assert "timings" in json.loads(out) and "split" in json.loads(out)["timings"]


def test_inputs_output_and_attention_options(ckpt, tmp_path, capsys):
    code, out, err = run_cli(capsys, ckpt, "--out", tmp_path / "out", "--format", "json", "--attn", "eager",
                             "--inputs", "input_ids, decoder_input_ids", "--output", "logits", "--seed", "3")
    assert code == 0, err
    report = json.loads(out)
    assert [i["name"] for i in report["io"]["inputs"]] == ["input_ids", "decoder_input_ids", "shared_embed_weight",
                                                          "training"]
    assert report["io"]["output"]["name"] == "logits"
    assert report["model"]["attention"] == "eager" and report["validation"]["seed"] == 3


def test_markdown_diff_and_quiet(ckpt, tmp_path, capsys):
    code, out, err = run_cli(capsys, ckpt, "--out", tmp_path / "a", "--format", "markdown", "--diff", "--no-validate")
    assert code == 0, err
    assert "```diff" in out and "- **status:** skipped: not run (--no-validate)" in out
    assert "validation skipped (--no-validate)" in err
    code, out, err = run_cli(capsys, ckpt, "--out", tmp_path / "b", "-q")
    assert (code, out, err) == (0, "", "")
    assert sorted(os.listdir(tmp_path / "b")) == FILES


def test_config_file_random_weights_and_the_default_out(ckpt, tmp_path, capsys, monkeypatch):
    (tmp_path / "arch.json").write_text((ckpt / "config.json").read_text())
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "--config", "arch.json", "--format", "plain")
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "fxconvert-out" / "arch")) == FILES
    assert "warning: RANDOM WEIGHTS" in err and "WARNING: RANDOM WEIGHTS" in out
    assert "source:     config file arch.json" in out and "status:    passed" in out


def test_meta_flag_skips_weights_and_validation(ckpt, tmp_path, capsys):
    code, out, err = run_cli(capsys, ckpt, "--meta", "--out", tmp_path / "out", "--format", "json")
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "out")) == [".fxconvert", "model.py", "report.json", "report.md"]
    report = json.loads(out)
    assert report["model"]["source"]["weights"] == "none (meta device)"
    assert "meta device" in report["validation"]["skipped"]


@pytest.mark.slow
def test_t5_11b_converts_on_the_meta_device(tmp_path, capsys):
    code, out, err = run_cli(capsys, "t5-11b", "--offline", "--out", tmp_path / "out", "--format", "json")
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "out")) == [".fxconvert", "model.py", "report.json", "report.md"]  # no weights
    report = json.loads(out)
    assert report["model"]["parameters"] == 11_307_321_344
    assert report["model"]["source"]["device"] == "meta"
    assert report["validation"]["passed"] is False and "meta device" in report["validation"]["skipped"]
    assert any("meta device" in w for w in report["warnings"])
    assert "meta device" in err


@pytest.mark.parametrize("case, expected_code, message", [
    ("unknown name", 1, r"unknown model 'no-such-model'"),
    ("not T5", 1, r"model_type 'vit'.*not supported.*T5ForConditionalGeneration.*any other transformers model "
             r"that takes input_ids"),
    ("malformed config", 1, r"malformed .*config.json"),
    ("weights do not match", 1, r"do not match its config.json"),
    ("unknown input", 2, r"unknown input name\(s\) bogus for T5ForConditionalGeneration; choose from input_ids"),
    ("unknown output", 2, r"unknown output 'nope'; this model returns loss, logits, encoder_last_hidden_state"),
    ("unwritable out", 1, r"cannot write to .*not a directory"),
    ("existing out", 2, r"already exists; pass --force to replace it"),
    ("not fxconvert's out", 2, r"out is not empty and was not written by fxconvert .*; choose another output"),
    ("bad option", 2, r"unrecognized arguments: --bogus"),
    ("too many stages", 2, r"cannot split into 9 stages: the graph has 4 blocks .*ask for at most 4"),
    ("name and config", 2, r"give a model NAME or --config FILE.json, not both"),
])
def test_failures_are_one_line_with_an_exit_code_and_leave_nothing(case, expected_code, message, ckpt, tmp_path,
                                                                  capsys):
    out = tmp_path / "out"
    args = [ckpt, "--out", out]
    if case == "unknown name":
        args[0] = "no-such-model"
    elif case == "not T5":
        (ckpt / "config.json").write_text(json.dumps({"model_type": "vit", "architectures": ["ViTModel"]}))
    elif case == "malformed config":
        (ckpt / "config.json").write_text("{not json")
    elif case == "weights do not match":
        edit_config(ckpt, d_model=48)
    elif case == "unknown input":
        args += ["--inputs", "input_ids,bogus"]
    elif case == "unknown output":
        args += ["--output", "nope"]
    elif case == "unwritable out":
        (tmp_path / "file").write_text("")
        args[2] = tmp_path / "file" / "out"
    elif case == "existing out":
        assert main([str(ckpt), "--out", str(out), "--no-validate", "--offline", "-q"]) == 0
        capsys.readouterr()
    elif case == "not fxconvert's out":
        out.mkdir()
        (out / "mine.txt").write_text("keep")
    elif case == "bad option":
        args.append("--bogus")
    elif case == "too many stages":
        args += ["--stages", "9", "--no-validate"]
    elif case == "name and config":
        args += ["--config", ckpt / "config.json"]
    before = leftovers(tmp_path)
    code, stdout, err = run_cli(capsys, *args, "--offline")
    assert code == expected_code
    lines = err.strip().splitlines()
    assert len(lines) >= 1 and lines[-1].startswith("fxconvert: error: ")
    assert [line for line in lines if "error" in line] == [lines[-1]]
    assert re.search(message, lines[-1]), lines[-1]
    assert "Traceback" not in err
    assert leftovers(tmp_path) == before  # nothing written, nothing half-written


def test_a_broken_conversion_fails_validation_and_writes_nothing(ckpt, tmp_path, capsys, monkeypatch):
    from torch.fx.passes.infra.pass_base import PassBase, PassResult

    import fxconvert.passes

    class ScaleLoss(PassBase):  # a "pass" that changes what the graph computes
        def call(self, gm):
            out = next(n for n in gm.graph.nodes if n.op == "output")
            with gm.graph.inserting_before(out):
                scaled = gm.graph.call_function(torch.mul, (out.args[0], 1.001))
            out.args = (scaled,)
            gm.recompile()
            return PassResult(gm, True)

    before = leftovers(tmp_path)
    convert_module = importlib.import_module("fxconvert.convert")  # fxconvert.convert is the function
    monkeypatch.setattr(convert_module, "default_passes",
                        lambda output=None: fxconvert.passes.default_passes(output=output) + [ScaleLoss()])
    code, out, err = run_cli(capsys, ckpt, "--out", tmp_path / "out", "--format", "plain")
    assert code == 1
    assert err.strip().splitlines()[-1].startswith("fxconvert: error: validation failed: ")
    assert "output loss differs by" in err
    assert "Failures" in out and "VALIDATION FAILED" in out
    assert leftovers(tmp_path) == before


def test_verbose_failures_show_the_traceback(capsys):
    code, out, err = run_cli(capsys, "no-such-model", "--offline", "-v")
    assert code == 1 and "Traceback" in err and err.strip().splitlines()[-1].startswith("fxconvert: error: unknown")


def test_help_lists_every_option(capsys):
    code, out, err = run_cli(capsys, "--help")
    assert code == 0
    for option in ("--inputs", "--output", "--attn", "--out", "--force", "--offline", "--meta", "--config",
                   "--format", "--diff", "--atol", "--seed", "--no-validate", "-q", "-v"):
        assert option in out, option


def test_the_program_in_a_subprocess(ckpt, tmp_path):
    """`python -m fxconvert` as a user runs it: a success, then a failure, each in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    ok = subprocess.run([sys.executable, "-m", "fxconvert", str(ckpt), "--out", str(tmp_path / "out"), "--format",
                         "plain", "--diff"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert ok.returncode == 0, ok.stderr
    for title in ("Model", "Inputs and output", "Passes", "Shared weights", "Validation", "Timings",
                  "Code diff (traced -> converted)"):
        assert f"\n{title}\n" in ok.stdout
    assert "status:    passed" in ok.stdout
    assert sorted(os.listdir(tmp_path / "out")) == FILES
    bad = subprocess.run([sys.executable, "-m", "fxconvert", "google/not-a-t5", "--out", str(tmp_path / "bad")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [
        "fxconvert: error: unknown model 'google/not-a-t5': not a local directory, not in the Hugging Face cache "
        f"(offline), and not a built-in preset (presets: {', '.join(PRESETS)}; use --config FILE.json for another "
        "architecture)"]
    assert not (tmp_path / "bad").exists()


def test_offline_does_not_outlive_the_run(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    code, _, err = run_cli(capsys, ckpt, "--out", tmp_path / "out", "--offline", "--no-validate", "-q")
    assert code == 0, err
    assert "HF_HUB_OFFLINE" not in os.environ


def test_stages_balanced_at_the_sizes_given(ckpt, tmp_path, capsys):
    """--balance/--seq-lengths/--batch reach the split: the report's stage costs are at those sizes."""
    code, out, err = run_cli(capsys, ckpt, "--out", tmp_path / "out", "--format", "json", "--no-validate",
                             "--stages", "2", "--balance", "time", "--seq-lengths", "64,8", "--batch", "3")
    assert code == 0, err
    report = json.loads(out)
    plan = report["stage_plan"]
    assert (plan["balance"], plan["batch"], plan["encoder_length"], plan["decoder_length"]) == ("time", 3, 64, 8)
    assert plan["bottleneck"] in (0, 1) and 0 <= plan["bubble_fraction"] < 1
    rows = report["stages"]
    assert all(r["flops"] > 0 and r["peak_bytes"] > 0 for r in rows)
    assert sum(r["time_share"] for r in rows) == pytest.approx(1.0)
    # the encoder output sent by stage 0: (3, 64, 32) fp32 at the sizes asked for
    assert rows[0]["sent_bytes_per_microbatch"] >= 3 * 64 * 32 * 4
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Stage costs (predicted)" in md and "bubble" in md


def test_stages_balanced_by_params_report_no_predictions(ckpt, tmp_path, capsys):
    code, out, err = run_cli(capsys, ckpt, "--out", tmp_path / "out", "--format", "json", "--no-validate",
                             "--stages", "2", "--balance", "params")
    assert code == 0, err
    report = json.loads(out)
    assert "stage_plan" not in report and all(r["flops"] is None for r in report["stages"])


@pytest.mark.parametrize("args, message", [
    (["--seq-lengths", "512"], r"--seq-lengths takes two positive integers.*got '512'"),
    (["--seq-lengths", "0,8"], r"--seq-lengths takes two positive integers"),
    (["--seq-lengths", "64,-8"], r"--seq-lengths takes two positive integers"),
    (["--seq-lengths", "1e3,8"], r"--seq-lengths takes two positive integers"),
    (["--batch", "0"], r"--batch must be at least 1, got 0"),
    (["--balance", "flops"], r"argument --balance: invalid choice: 'flops'"),
    (["--max-memory", "0"], r"--max-memory takes a positive size such as 11GiB, 500MiB, 12GB or plain bytes, got '0'"),
    (["--max-memory", "-5"], r"--max-memory takes a positive size .*got '-5'"),
    (["--max-memory=-1GiB"], r"--max-memory takes a positive size .*got '-1GiB'"),
    (["--max-memory", "11XB"], r"--max-memory takes a positive size .*got '11XB'"),
    (["--max-memory", "1e9"], r"--max-memory takes a positive size .*got '1e9'"),
    (["--max-memory", "0.1B"], r"--max-memory takes a positive size .*got '0.1B'"),
    (["--max-memory", ""], r"--max-memory takes a positive size .*got ''"),
    (["--microbatches", "0"], r"--microbatches must be at least 1, got 0"),
    (["--recompute", "some"], r"argument --recompute: invalid choice: 'some'"),
    (["--optimizer", "adam"], r"argument --optimizer: invalid choice: 'adam'"),
])
def test_bad_balance_and_memory_plan_options_are_usage_errors(args, message, ckpt, tmp_path, capsys):
    before = leftovers(tmp_path)
    code, _, err = run_cli(capsys, ckpt, "--out", tmp_path / "out", "--no-validate", "--stages", "2", *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert re.search(message, lines[-1]) and "Traceback" not in err, lines[-1]
    assert leftovers(tmp_path) == before


def test_version_is_the_packages_and_pyprojects(capsys):
    import tomllib

    import fxconvert

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert fxconvert.__version__ == pyproject["project"]["version"]
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"fxconvert {fxconvert.__version__}\n"
    run = subprocess.run([sys.executable, "-m", "fxconvert", "--version"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}, timeout=600)
    assert (run.returncode, run.stdout, run.stderr) == (0, f"fxconvert {fxconvert.__version__}\n", "")


@pytest.mark.parametrize("text, size", [("11GiB", 11 * 1024**3), ("500MiB", 500 * 1024**2), ("12GB", 12 * 10**9),
                                        ("1.5gib", 3 * 1024**3 // 2), ("123456", 123456), ("64 KiB", 65536)])
def test_memory_sizes_read_as_people_write_them(text, size):
    from fxconvert.cli import memory_size

    assert memory_size(text) == size


def test_memory_plan_options_need_stages(ckpt, tmp_path, capsys):
    code, _, err = run_cli(capsys, ckpt, "--out", tmp_path / "out", "--no-validate", "--max-memory", "1GiB",
                           "--recompute", "full")
    assert code == 2 and err.strip().splitlines()[-1] == (
        "fxconvert: error: --max-memory, --recompute plan a pipeline split; add --stages N")
    assert not (tmp_path / "out").exists()


def test_memory_plan_refused_then_fits_and_is_written(ckpt, tmp_path, capsys):
    """A memory too small: one line, exit 1, naming a memory; given back, it fits, with some blocks recomputed,
    and pipeline.json and every report format carry the plan."""
    plan_args = ["--no-validate", "--stages", "2", "--seq-lengths", "12,4", "--batch", "3", "--optimizer",
                 "adafactor", "--microbatches", "4", "--schedule", "gpipe"]
    code, out, err = run_cli(capsys, ckpt, "--out", tmp_path / "small", *plan_args, "--max-memory", "1000")
    line = err.strip().splitlines()[-1]
    assert code == 1 and "Traceback" not in err and not (tmp_path / "small").exists()
    named = re.search(r"raise it to at least ([\d,]+) bytes", line).group(1).replace(",", "")
    code, out, err = run_cli(capsys, ckpt, "--out", tmp_path / "out", *plan_args, "--max-memory", named,
                             "--format", "json")
    assert code == 0, err
    memory = json.loads(out)["memory_plan"]
    assert memory["optimizer"] == "adafactor" and memory["max_memory"] == int(named) and memory["recompute"]
    assert all(s["peak_bytes"] <= int(named) for s in memory["stages"])
    from fxconvert import manifest

    plan = manifest.read(tmp_path / "out").plan
    assert (plan.optimizer, plan.max_memory, plan.recompute, plan.schedule) == (
        "adafactor", int(named), tuple(memory["recompute"]), "gpipe")
    assert "Memory plan (predicted)" in (tmp_path / "out" / "report.md").read_text()
    for fmt in ("plain", "rich"):
        code, out, err = run_cli(capsys, ckpt, "--out", tmp_path / fmt, *plan_args, "--max-memory", named,
                                 "--format", fmt)
        assert code == 0 and "Memory plan (predicted)" in out and "optimizer state" in out, err
