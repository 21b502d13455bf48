"""Generated code carries user text only as repr() literals: hostile paths, names and constants.

Checkpoint directories (and a --config file) with hostile names are converted and saved with
stages; a fresh interpreter then imports model.py and every stage file, from a working
directory where each payload would create a file, and runs them. No payload may run, the
modules must work, and SOURCE must hold the path exactly.
"""

import json
import logging
import operator
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.fx

from fxconvert import convert
from fxconvert.cli import main
from fxconvert.codegen import CodegenError, forward_source
from fxconvert.load import ModelSource
from fxconvert.save import model_source

import helpers
from checkpoints import write_checkpoint

REPO = Path(__file__).resolve().parent.parent

# Directory names; a payload that ran would create the file named in it (relative to the working directory).
HOSTILE = {
    "triple_double_quotes": 'ck"""+open("pwned-1","w").close()+"""pt',
    "triple_single_quotes": "ck'''+open('pwned-2','w').close()+'''pt",
    "windows_path": r"C:\Users\new\x41\N{BULLET}\u00e9",
    "newline_statement": 'ck\nimport os; os.system("touch pwned-3")\n"""\nopen("pwned-4", "w")\n"""',
    "trailing_backslash": "ckpt\\",
    "quote_backslash": 'ck\\"""; open("pwned-5", "w"); x = """\\',
    "line_separators": "ck\u2028open('pwned-6','w')\u2029\x85\r\x0b\x0c\x1b[31mred",
}
# --config file names, through the command line
HOSTILE_CONFIGS = {
    "config_quotes": 'arch"""+open("pwned-7","w").close()+"""\\.json',
    "config_newline": 'arch\n"""\nopen("pwned-8","w")\n""".json',
}

RUNNER = r"""
import importlib.util, json, os, sys
import torch

out = {}
for directory in sys.argv[1:-1]:
    cases = torch.load(os.path.join(directory, "..", "cases.pt"))
    modules = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".py"):
            spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(directory, name))
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            modules[name] = module
    model = modules["model.py"].load()
    loss = model(**cases["inputs"]).item()
    n = len(modules) - 1
    values = ()
    for i in range(n):
        stage_module = modules[f"stage_{i}.py"]
        stage = stage_module.load()
        inputs = cases["inputs"]
        values = (stage(*values, *(inputs[k] for k in stage_module.INPUTS)) if i == 0 else
                  stage(*values, **{k: inputs[k] for k in stage_module.INPUTS}))
    out[directory] = {"source": modules["model.py"].SOURCE, "loss": loss, "stage_loss": values.item(),
                      "expected": cases["expected"], "stages": n}
print(json.dumps(out))
"""


def _pwned(directory) -> list[str]:
    return sorted(p.name for p in Path(directory).rglob("pwned*"))


@pytest.fixture(scope="module")
def hostile_outputs(tmp_path_factory):
    """{case: (checkpoint path, output dir)}, converted and saved from inside `root` (the payloads' directory)."""
    root = tmp_path_factory.mktemp("hostile")
    previous = os.getcwd()
    os.chdir(root)
    try:
        outputs = {}
        for i, (case, name) in enumerate(HOSTILE.items()):
            case_dir = root / f"case{i}"
            case_dir.mkdir()
            ckpt = case_dir / name
            model = write_checkpoint(ckpt)
            conversion = convert(ckpt)
            inputs = helpers.random_inputs(conversion.input_names, 2, 6, 4)
            expected = helpers.eager_outputs(model, inputs)["loss"].item()
            torch.save({"inputs": inputs, "expected": expected}, case_dir / "cases.pt")
            outputs[case] = (str(ckpt), conversion.save(case_dir / "out", stages=2).out_dir)
        # --config: the path of an architecture file, through the command line (random weights: the
        # stage files are compared with model.py)
        for case, name in HOSTILE_CONFIGS.items():
            case_dir = root / case
            case_dir.mkdir()
            config = case_dir / name
            config.write_text(json.dumps(helpers.tiny_config().to_dict()))
            out = case_dir / "out"
            assert main(["--config", str(config), "--out", str(out), "--stages", "2", "-q", "--no-validate"]) == 0
            torch.save({"inputs": helpers.random_inputs(conversion.input_names, 2, 6, 4), "expected": None},
                       case_dir / "cases.pt")
            outputs[case] = (str(config), out)
    finally:
        os.chdir(previous)
    return root, outputs


def test_hostile_paths_reach_generated_code_only_as_literals(hostile_outputs):
    """Checkpoint directories and --config files with hostile names: model.py and the stage files import, no
    payload runs, SOURCE holds the path exactly, and the modules compute eager's loss."""
    root, outputs = hostile_outputs
    assert _pwned(root) == []  # nothing ran while generating
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    directories = [str(out) for _, out in outputs.values()]
    run = subprocess.run([sys.executable, "-c", RUNNER, *directories, "unused"], capture_output=True, text=True,
                         env=env, cwd=root, timeout=600, errors="surrogateescape")
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    assert _pwned(root) == []  # nothing ran on import or use
    for case, (path, out) in outputs.items():
        r = result[str(out)]
        origin = "local directory" if case in HOSTILE else "config file"
        assert r["source"]["location"] == path and r["source"]["origin"] == origin, case
        assert r["stages"] == 2
        expected = r["expected"] if case in HOSTILE else r["loss"]  # eager, or model.py for random weights
        assert abs(r["loss"] - expected) <= 1e-5 and abs(r["stage_loss"] - expected) <= 1e-5, case
    assert set(HOSTILE_CONFIGS) <= set(outputs)


@pytest.fixture(scope="module")
def conversion():
    return convert(helpers.build())


def _exec(text: str) -> dict:
    namespace = {}
    exec(compile(text, "<generated>", "exec"), namespace)
    return namespace


def test_a_path_that_is_not_utf8_becomes_an_ascii_literal(tmp_path, caplog):
    """Undecodable bytes in a file name arrive as lone surrogates, which UTF-8 cannot encode.

    (safetensors cannot open a checkpoint under such a path, so the architecture comes from
    a config file; the model.py and stage files are checked here, not the report.) The random
    weights warning names the path too: it is caught here and its log record not kept, since
    pytest-xdist cannot send a test report holding lone surrogates to the main process.
    """
    from fxconvert.load import RandomWeightsWarning
    from fxconvert.pipeline import stage_sources
    from fxconvert.stages import split_stages

    path = tmp_path / os.fsdecode(b"arch\xff\xfe\x80.json")
    path.write_text(json.dumps(helpers.tiny_config().to_dict()))
    caplog.set_level(logging.ERROR, logger="fxconvert.load")
    with pytest.warns(RandomWeightsWarning, match="RANDOM WEIGHTS"):
        conversion = convert(path, allow_random=True)
    texts = {"model.py": model_source(conversion), **stage_sources(split_stages(conversion, 2))}
    for name, text in texts.items():
        text.encode("utf-8")  # the file can be written as UTF-8
        _exec(text)
    assert _exec(texts["model.py"])["SOURCE"]["location"] == str(path)


def test_characters_no_file_system_allows_still_become_literals(conversion):
    """NUL cannot occur in a path on disk, but a location is any str; lone surrogates cannot be encoded."""
    location = 'a\x00b"""\\\udcff\u2028'
    conversion.source, previous = ModelSource(location, "local directory", location, "checkpoint", "cpu"), \
        conversion.source
    try:
        text = model_source(conversion)
    finally:
        conversion.source = previous
    text.encode("utf-8")  # the file can be written as UTF-8
    assert "\x00" not in text and "\u2028" not in text
    assert _exec(text)["SOURCE"]["location"] == location


@pytest.mark.parametrize("attribute, value, message", [
    ("model_class", 'T5"""; import os', "model class name"),
    ("output_name", "loss\nimport os", "output name"),
    ("input_names", ["input_ids", "x=__import__('os')"], "input name"),
])
def test_names_written_bare_must_be_identifiers(conversion, attribute, value, message):
    previous = getattr(conversion, attribute)
    setattr(conversion, attribute, value)
    try:
        with pytest.raises(CodegenError, match=f"{message} .* not a Python identifier"):
            model_source(conversion)
    finally:
        setattr(conversion, attribute, previous)


# -- what fx writes ------------------------------------------------------------------------------

PAYLOAD = 'setattr(__import__("builtins"), "PWNED", 1)'  # no dot: it must fit in a module name


class _NamedChild(torch.nn.Module):
    """A module whose child's name is a payload (add_module accepts any name without a dot)."""

    NAME = f'x"), {PAYLOAD}, getattr(self, "y'

    def __init__(self):
        super().__init__()
        self.add_module(self.NAME, torch.nn.Linear(2, 2))

    def forward(self, x):
        return getattr(self, self.NAME)(x)


class _Sneaky:
    def __repr__(self):
        return PAYLOAD


def test_a_module_path_fx_would_write_unescaped_is_refused():
    gm = torch.fx.symbolic_trace(_NamedChild())
    assert PAYLOAD in gm.code  # what fx itself generates: the payload as code
    with pytest.raises(CodegenError, match="module path .* neither an identifier nor a number"):
        forward_source(gm)


def test_a_constant_whose_repr_is_not_source_is_refused():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(operator.add, (x, _Sneaky())))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    assert PAYLOAD in gm.code
    with pytest.raises(CodegenError, match="constant of type .*_Sneaky"):
        forward_source(gm)


def test_an_input_name_that_is_not_an_identifier_is_refused():
    """(fx writes a placeholder's name raw into the signature, and its own recompile already runs the
    payload; fxconvert's input names are checked against the model's forward before tracing.)"""
    graph = torch.fx.Graph()
    x = graph.placeholder(f"x=({PAYLOAD})")
    graph.output(x)
    try:
        gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    finally:
        vars(__import__("builtins")).pop("PWNED", None)
    assert PAYLOAD in gm.code
    with pytest.raises(CodegenError, match="input .* is not a Python identifier"):
        forward_source(gm)


def test_plain_constants_still_pass():
    """Floats (inf and nan too), dtypes, devices, slices, None and strings are written as they are."""
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    y = graph.call_method("to", (x,), {"dtype": torch.float64, "device": torch.device("cpu")})
    y = graph.call_function(operator.getitem, (y, (slice(None, -1, None), Ellipsis)))
    y = graph.call_function(torch.clamp, (y,), {"min": -float("inf"), "max": 1e-6})
    y = graph.call_function(torch.nan_to_num, (y,), {"nan": 0.5})
    y = graph.call_method("view", (y, (-1,)))
    graph.output(y)
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    forward = _exec(forward_source(gm))["forward"]
    x = torch.randn(3, 4)
    assert torch.equal(forward(gm, x), gm(x))
