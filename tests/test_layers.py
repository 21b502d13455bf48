"""The package's import layers: no import circle among fxconvert's modules, and no import that runs upward.

The imports are read from the source with `ast`, every one of them: at module level and inside
functions, absolute and relative. A function-level import is still a dependency; hiding one in a
function does not make a circle go away.

Layers, lowest first (`LAYERS`). A module may import modules of its own layer or of lower ones:
the data path reads upward, from the families' records through tracing, the passes, the split,
the writers and the one workflow to the command line. The training side is apart (`TRAINING`): a
rank reads pipeline.json and the stage files, so it may import only the light modules a rank
needs, and the workflow for a SOURCE that is a NAME to convert.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "fxconvert"

# Each layer and its modules, lowest first. A module of a package counts as its package's layer
# (fxconvert.passes.keep_single_output_pass is in "passes").
LAYERS = [
    ("foundation", {"fxconvert", "fxconvert.errors", "fxconvert.files", "fxconvert.signals", "fxconvert.atomic_dir",
                    "fxconvert.runtime"}),
    ("rank", {"fxconvert.manifest", "fxconvert.stage_files", "fxconvert.export", "fxconvert.objectives",
              "fxconvert.optimizers"}),
    ("families", {"fxconvert.families", "fxconvert.inputs", "fxconvert.graph_utils", "fxconvert.graph_info",
                  "fxconvert.analysis"}),
    ("trace", {"fxconvert.trace", "fxconvert.load"}),
    ("passes", {"fxconvert.passes"}),
    ("convert", {"fxconvert.convert", "fxconvert.validate"}),
    ("cost", {"fxconvert.cost", "fxconvert.balance"}),
    ("stages", {"fxconvert.stages"}),
    ("writers", {"fxconvert.codegen", "fxconvert.save", "fxconvert.report", "fxconvert.pipeline"}),
    ("workflow", {"fxconvert.workflow"}),
    ("cli", {"fxconvert.cli", "fxconvert.__main__"}),
]
RANK = {name for layer, modules in LAYERS if layer in ("foundation", "rank") for name in modules}

# The training side: what a rank runs. It may import the rank's light modules, its own, the family
# records (plain data: the objective, the input names; no torch, no transformers) and the workflow
# (to convert a SOURCE given as a NAME), never the converter's inner modules.
TRAINING = {"fxconvert.train", "fxconvert.training"}
TRAINING_MAY_IMPORT = RANK | TRAINING | {"fxconvert.families", "fxconvert.workflow"}


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(module: str, path: pathlib.Path, source: str | None = None) -> set[str]:
    """The fxconvert modules `module` imports anywhere in its source (`from fxconvert import families` names
    the module fxconvert.families; `from fxconvert.errors import UsageError`, fxconvert.errors)."""
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    source = path.read_text(encoding="utf-8") if source is None else source
    for node in ast.walk(ast.parse(source, str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            submodules = [f"{origin}.{a.name}" for a in node.names if f"{origin}.{a.name}" in MODULES]
            names = submodules if submodules and len(submodules) == len(node.names) else [origin, *submodules]
        else:
            continue
        for name in names:
            if name == "fxconvert" or name.startswith("fxconvert."):
                while name not in MODULES and "." in name:
                    name = name.rpartition(".")[0]
                if name != module:
                    found.add(name)
    return found


IMPORTS = {name: imported(name, path) for name, path in MODULES.items()}


def within(module: str, names) -> bool:
    """Whether `module` is one of `names` or inside one of them (a package other than fxconvert itself)."""
    return any(module == n or (n != "fxconvert" and module.startswith(n + ".")) for n in names)


def layer_of(module: str) -> str | None:
    """The layer of `module`: its own entry, else its package's (None when neither has one)."""
    for layer, modules in LAYERS:
        if within(module, modules):
            return layer
    return "training" if within(module, TRAINING) else None


def rank(layer: str) -> int:
    return [name for name, _ in LAYERS].index(layer)


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in MODULES if layer_of(m) is None)
    assert not unplaced, f"give these modules a layer in tests/test_layers.py (LAYERS or TRAINING): {unplaced}"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph` as [a, b, ..., a], or None (a depth-first search)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_a_new_module_needs_a_layer():
    assert layer_of("fxconvert.passes.new_pass") == "passes" and layer_of("fxconvert.training.loop") == "training"
    assert layer_of("fxconvert.something_new") is None  # not the root package's layer
    assert not within("fxconvert.trace", TRAINING_MAY_IMPORT) and within("fxconvert.families.t5", TRAINING_MAY_IMPORT)


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "d": {"a", "c"}}) is None


def test_no_import_circle():
    cycle = find_cycle(IMPORTS)
    assert cycle is None, f"import circle: {' -> '.join(cycle)}"


def test_no_module_imports_a_higher_layer():
    upward = []
    for module, targets in sorted(IMPORTS.items()):
        layer = layer_of(module)
        if layer is None:
            continue
        for target in sorted(targets):
            if layer == "training":
                if not within(target, TRAINING_MAY_IMPORT):
                    upward.append(f"{module} (training) -> {target}")
            elif layer_of(target) is None or layer_of(target) == "training" or rank(layer_of(target)) > rank(layer):
                upward.append(f"{module} ({layer}) -> {target} ({layer_of(target)})")
    assert not upward, "imports that run upward:\n" + "\n".join(upward)


@pytest.mark.parametrize("source, expected", [
    ("from fxconvert import families\n", {"fxconvert.families"}),
    ("from fxconvert.errors import UsageError\n", {"fxconvert.errors"}),
    ("def f():\n    from . import stages\n", {"fxconvert.stages"}),
    ("def f():\n    from .pipeline import stage_sources\n", {"fxconvert.pipeline"}),
    ("import fxconvert\n", {"fxconvert"}),
    ("from fxconvert import __version__\n", {"fxconvert"}),
])
def test_imports_are_read_in_every_spelling(source, expected):
    path = PACKAGE / "layers_probe.py"  # never written: only its name places it in the package
    assert imported("fxconvert.layers_probe", path, source) == expected
