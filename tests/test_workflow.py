"""The one workflow (`fxconvert.workflow`): the command line and the Python API run the same phases,
so for the same model and options they write the same files and the same report."""

import contextlib
import json
import os
import re

import pytest
import torch
from safetensors import safe_open

from fxconvert import convert, workflow
from fxconvert.cli import main
from fxconvert.validate import validate

from checkpoints import write_checkpoint, write_tokenizer

# What differs between two runs of the same conversion: how long each phase took.
TIMED = ("timings",)
TIME = re.compile(r"[0-9.]+ (ms|s)|time")


def untimed(report: dict) -> dict:
    """report.json without the measured times (the phases', and each pass's)."""
    report = {k: v for k, v in report.items() if k not in TIMED}
    report["passes"] = [{k: v for k, v in p.items() if k != "seconds"} for p in report["passes"]]
    return report


def untimed_markdown(text: str) -> list[str]:
    """report.md without the Timings section and the passes' times (table cells stripped: widths follow the times)."""
    lines, timings = [], False
    for line in text.splitlines():
        if line.startswith("## "):
            timings = line == "## Timings"
        if timings:
            continue
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            line = "|".join("-" if set(c) <= set("-:") else c for c in cells if not TIME.fullmatch(c))
        lines.append(line)
    return lines


def same_weights(a, b) -> bool:
    """The same tensors, bit for bit, under the same names, and the same metadata."""
    with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb:
        if fa.metadata() != fb.metadata() or list(fa.keys()) != list(fb.keys()):
            return False
        return all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) and fa.get_tensor(k).dtype == fb.get_tensor(k).dtype
                   for k in fa.keys())


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("source") / "ckpt"
    write_checkpoint(path)
    write_tokenizer(path)
    return path


@pytest.mark.parametrize("stages", [None, 2])
def test_the_api_and_the_command_line_write_the_same_output(ckpt, tmp_path, capsys, stages):
    """`convert(name).save(dir, stages=N, diff=True, validation=...)` and `fxconvert NAME --stages N --diff`:
    the same files, byte for byte except the measured times in the reports (the stage costs included)."""
    split = [] if stages is None else ["--stages", str(stages)]
    code = main([str(ckpt), "--out", str(tmp_path / "cli"), "--diff", "-q", *split])
    assert code == 0, capsys.readouterr().err
    conversion = convert(ckpt, keep_traced_code=True)
    conversion.save(tmp_path / "api", stages=stages, diff=True, validation=validate(conversion))
    cli, api = tmp_path / "cli", tmp_path / "api"
    assert sorted(os.listdir(api)) == sorted(os.listdir(cli))
    for name in sorted(os.listdir(cli)):
        if name in ("report.json", "report.md", ".fxconvert"):  # times; the marker names the writing process
            continue
        if name == "weights.safetensors":  # safetensors writes its metadata's keys in a random order
            assert same_weights(api / name, cli / name)
            continue
        assert (api / name).read_bytes() == (cli / name).read_bytes(), name
    cli_report, api_report = (json.loads((d / "report.json").read_text()) for d in (cli, api))
    assert untimed(api_report) == untimed(cli_report)
    assert untimed_markdown((api / "report.md").read_text()) == untimed_markdown((cli / "report.md").read_text())
    if stages is not None:
        assert "stage_plan" in api_report and "Stage costs (predicted)" in (api / "report.md").read_text()


class Recorder(workflow.Progress):
    """The phases a run reports, in order, with their details; and its warnings."""

    def __init__(self):
        self.phases, self.warnings = [], []

    @contextlib.contextmanager
    def step(self, name, description, timings):
        with super().step(name, description, timings) as step:
            yield step
        self.phases.append((name, step.detail, step.ok))

    def warn(self, message):
        self.warnings.append(message)


def test_a_run_reports_each_phase_in_order_and_times_it(ckpt, tmp_path):
    progress = Recorder()
    result = workflow.run(ckpt, tmp_path / "out", options=workflow.Options(validate=True, stages=2),
                          progress=progress)
    assert [p[0] for p in progress.phases] == ["load", "trace", "passes", "validate", "split", "write"]
    assert all(ok and detail for _, detail, ok in progress.phases)
    assert set(result.conversion.timings) == {"load", "trace", "passes", "validate", "split", "write"}
    assert result.validation.passed and len(result.stages.specs) == 2
    assert {*result.saved.files, ".fxconvert"} == set(os.listdir(tmp_path / "out"))


def test_a_converted_model_is_saved_by_the_same_run(ckpt, tmp_path):
    """`Conversion.save` is `run` given the conversion: nothing is loaded, traced or converted again."""
    conversion = convert(ckpt)
    progress = Recorder()
    result = workflow.run(conversion, tmp_path / "out", options=workflow.Options(stages=2), progress=progress)
    assert [p[0] for p in progress.phases] == ["split", "write"]
    assert result.conversion is conversion
