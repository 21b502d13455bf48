"""Tests of `fxconvert.codegen.forward_source`: the generated forward, run outside the GraphModule.

The per-configuration round trip runs over `helpers.MATRIX` (see its docstring for the chosen
class x variant x attention combinations); results are compared with the GraphModule itself and
with the eager transformers model.
"""

import importlib.util
import inspect
import re

import pytest
import torch

from fxconvert.codegen import forward_source
from fxconvert.trace import trace

from helpers import (
    CASES,
    MATRIX,
    MATRIX_IDS,
    SHAPES,
    assert_grads_match,
    assert_outputs_match,
    build,
    case_class,
    eager_outputs,
    grads_of,
    input_names_of,
    random_inputs,
    traced,
)


def load_forward(gm):
    """`forward` from the generated source, exec'd in a fresh, empty namespace."""
    namespace = {}
    exec(compile(forward_source(gm), "<fxconvert generated forward>", "exec"), namespace)
    return namespace["forward"]


def assert_identical(expected: dict, actual: dict):
    assert list(actual) == list(expected)
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


@pytest.mark.parametrize("family,case,variant,attn", MATRIX, ids=MATRIX_IDS)
def test_forward_source_round_trips(family, case, variant, attn):
    model, gm = traced(family, case, variant, attn)
    names = input_names_of(gm)
    forward = load_forward(gm)
    assert list(inspect.signature(forward).parameters) == ["self", *names]
    for batch, enc_len, dec_len in SHAPES:
        inputs = random_inputs(names, batch, enc_len, dec_len, seed=batch + enc_len)
        with torch.no_grad():
            from_graph = gm(**inputs)
            by_keyword = forward(gm, **inputs)
            by_position = forward(gm, *[inputs[n] for n in names])
            expected = eager_outputs(model, inputs)
        assert_identical(from_graph, by_keyword)
        assert_identical(from_graph, by_position)
        assert_outputs_match(expected, by_keyword)


@pytest.mark.parametrize("family,case,variant,attn", [
    ("T5", "CG_labels", "original", "sdpa"),
    ("T5", "CG_shift_right", "v1_1", "eager"),
    ("UMT5", "Model", "uneven_layers", "sdpa"),
    ("MT5", "EncoderModel", "v1_1", "eager"),
])
def test_generated_forward_gives_eager_gradients(family, case, variant, attn):
    model, gm = traced(family, case, variant, attn)
    forward = load_forward(gm)
    inputs = random_inputs(input_names_of(gm), 2, 10, 7, seed=2)
    expected = grads_of(model, lambda: eager_outputs(model, inputs))
    actual = grads_of(model, lambda: forward(gm, **inputs))
    assert_grads_match(expected, actual, model)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_generated_forward_of_train_mode_trace_matches_eager_under_same_seed(attn):
    model = build("T5ForConditionalGeneration", "v1_1", attn).train()
    gm = trace(model, CASES["CG_labels"][1])
    forward = load_forward(gm)
    inputs = random_inputs(input_names_of(gm), 3, 8, 6, seed=3)
    with torch.no_grad():
        torch.manual_seed(11)
        expected = eager_outputs(model, inputs)
        torch.manual_seed(11)
        actual = forward(gm, **inputs)
    assert_outputs_match(expected, actual)


_IMPORT = re.compile(r"^(?:import (\S+)(?: as \w+)?|from (\S+) import \w+(?: as \w+)?|\w+ = .+)$")


@pytest.mark.parametrize("family,case,variant,attn", [
    ("T5", "CG_labels", "original", "sdpa"),
    ("T5", "Model", "narrow_heads", "eager"),
    ("UMT5", "CG_shift_right", "v1_1", "sdpa"),
])
def test_forward_source_needs_only_torch_and_fxconvert_runtime(family, case, variant, attn):
    _, gm = traced(family, case, variant, attn)
    source = forward_source(gm)
    header, body = source.split("\ndef forward(", 1)
    modules = set()
    for line in filter(None, header.splitlines()):
        match = _IMPORT.match(line)
        assert match, f"unexpected line before forward: {line!r}"
        module = match.group(1) or match.group(2)
        if module:
            modules.add(module.split(".")[0] if module.split(".")[0] != "fxconvert" else module)
    assert modules <= {"torch", "math", "builtins", "fxconvert.runtime"}, modules
    assert "fxconvert.runtime" in modules  # the mask leaf functions
    assert "transformers" not in source


def test_forward_source_runs_from_a_file(tmp_path):
    model, gm = traced("T5", "CG_labels", "v1_1", "sdpa")
    path = tmp_path / "generated_t5_forward.py"
    path.write_text(forward_source(gm))
    spec = importlib.util.spec_from_file_location("generated_t5_forward", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    inputs = random_inputs(input_names_of(gm), 2, 21, 17, seed=4)
    with torch.no_grad():
        assert_identical(gm(**inputs), module.forward(gm, **inputs))
        assert_outputs_match(eager_outputs(model, inputs), module.forward(gm, **inputs))


def test_forward_source_is_the_graph_modules_code():
    _, gm = traced("T5", "Model", "original", "sdpa")
    source = forward_source(gm)
    body = source[source.index("def forward("):]
    assert body.strip() == gm.code.strip()


def test_forward_source_of_a_meta_model():
    """A graph traced from meta weights generates the same runnable code; on meta inputs it gives
    the output shapes that the eager model gives on real ones."""
    with torch.device("meta"):
        meta_model = build(case_class("T5", "CG_labels"), "v1_1", "sdpa")
    assert all(p.device.type == "meta" for p in meta_model.parameters())
    gm = trace(meta_model, CASES["CG_labels"][1])
    forward = load_forward(gm)
    assert list(inspect.signature(forward).parameters) == ["self", *CASES["CG_labels"][1]]
    inputs = random_inputs(input_names_of(gm), 3, 12, 9)
    real_model, _ = traced("T5", "CG_labels", "v1_1", "sdpa")
    with torch.no_grad():
        expected = eager_outputs(real_model, inputs)
        actual = forward(gm, **{k: v.to("meta") for k, v in inputs.items()})
    assert list(actual) == list(expected)
    for name in expected:
        assert actual[name].device.type == "meta"
        assert actual[name].shape == expected[name].shape and actual[name].dtype == expected[name].dtype, name
