"""The report: its data states facts of the conversion, and it renders as rich, markdown, plain and json."""

import copy
import io
import json
import re

import pytest
import torch
from rich.console import Console

from fxconvert import convert
from fxconvert.errors import UsageError
from fxconvert.report import FORMATS, build_report, diff_section, print_rich, render
from fxconvert.validate import validate

import helpers


@pytest.fixture(scope="module")
def conversion():
    return convert(helpers.build(), keep_traced_code=True)


@pytest.fixture(scope="module")
def report(conversion):
    return build_report(conversion, validation=validate(conversion), extra=[diff_section(conversion)])


def test_sections_hold_the_conversion_facts(conversion, report):
    assert [s.key for s in report.sections] == ["model", "io", "passes", "shared_weights", "validation", "timings",
                                                "diff"]
    assert report.status == "ok" and report.warnings == []
    model = report.section("model").data
    assert model["class"] == "T5ForConditionalGeneration"
    assert model["parameters"] == sum(p.numel() for p in conversion.model.parameters())
    io_data = report.section("io").data
    placeholders = [n.target for n in conversion.graph_module.graph.nodes if n.op == "placeholder"]
    assert [i["name"] for i in io_data["inputs"]] == placeholders
    assert io_data["output"] == {"name": "loss", "dtype": "float32", "shape": "scalar"}
    assert [p["name"] for p in report.section("passes").data] == [p.name for p in conversion.passes]
    (shared,) = report.section("shared_weights").data
    node = next(n for n in conversion.graph_module.graph.nodes if n.target == "shared_embed_weight")
    assert [c["node"] for c in shared["consumers"]] == [u.name for u in node.users]
    assert {c["module"] for c in shared["consumers"]} == {"encoder.embed_tokens", "decoder.embed_tokens", "lm_head"}
    assert shared["tied_names"] == conversion.shared_weights["shared_embed_weight"]
    assert report.section("validation").data["passed"] is True
    assert set(report.section("timings").data) == {"trace", "passes"}
    diff = report.section("diff").data
    assert diff.startswith("--- traced\n+++ converted")
    assert "+    dropout = torch.nn.functional.dropout(" in diff
    assert "-    encoder_dropout = self.encoder.dropout(" in diff


def test_json_is_the_data(report):
    data = json.loads(render(report, "json"))
    assert data == json.loads(json.dumps(report.to_dict(), default=str))
    assert data["status"] == "ok" and data["validation"]["passed"] is True
    assert len(data["validation"]["checks"]) == len(report.section("validation").data["checks"])


def test_markdown_has_github_tables_and_a_diff_block(report):
    text = render(report, "markdown")
    assert text.startswith("# fxconvert: T5ForConditionalGeneration")
    assert "## Passes" in text and "| pass " in text and "|---" in text
    assert re.search(r"\| LiftSharedWeightsPass +\| yes", text)
    assert "-1 call_module Linear" in text
    assert "```diff\n--- traced" in text
    assert "Max abs diff per tensor" in text  # every checked tensor is in the file


def test_plain_and_rich_show_every_section(report):
    plain = render(report, "plain")
    buffer = io.StringIO()
    print_rich(report, Console(file=buffer, width=160, color_system=None))
    rich_text = buffer.getvalue()
    for text in (plain, rich_text):
        for section in report.sections:
            assert section.title in text
        for name in ("RemoveNoneChecksPass", "LiftTrainingFlagPass", "LiftSharedWeightsPass", "KeepSingleOutputPass",
                     "shared_embed_weight", "embedding_1", "passed", "atol 1e-05"):
            assert name in text, name
    assert "\x1b[" not in plain


def test_warnings_and_failures_stand_out():
    model = helpers.build()
    conversion = convert(model)
    attention = conversion.graph_module.get_submodule("decoder.block.1.layer.1.EncDecAttention")
    attention.o = copy.deepcopy(attention.o)
    with torch.no_grad():
        attention.o.weight.mul_(2)
    report = build_report(conversion, validation=validate(conversion))
    assert report.status == "validation failed"
    assert any("VALIDATION FAILED" in w for w in report.warnings)
    plain = render(report, "plain")
    assert "WARNING: VALIDATION FAILED" in plain and "Failures" in plain and "FAILED" in plain


def test_unknown_format_is_refused(report):
    with pytest.raises(ValueError, match="unknown format 'html'"):
        render(report, "html")
    assert FORMATS == ("rich", "plain", "markdown", "json")


def test_a_diff_needs_the_traced_code_kept():
    with pytest.raises(UsageError, match="keep_traced_code=True"):
        diff_section(convert(helpers.build()))
