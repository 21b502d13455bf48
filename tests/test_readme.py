"""README.md's Python blocks run as written: each ```python block in a fresh interpreter, offline,
in an empty directory. A block that cannot run here (a Hub download, a GPU, several machines) is
fenced as ```bash or ```text instead; there is none today. Its family tables are the ones
`scripts/family_table.py` renders from the records."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BLOCKS = re.findall(r"^```python\n(.*?)^```$", (REPO / "README.md").read_text(), re.S | re.M)


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_a_readme_block_runs_as_written(block, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_HOME": str(tmp_path / "hf-home")}  # an empty cache: nothing downloaded earlier helps
    run = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]


def test_submodules_are_attributes_of_the_package_without_importing_torch():
    """`fxconvert.codegen.forward_source` and `fxconvert.pipeline.load_pipeline`, as the README names them."""
    code = ("import sys, fxconvert; assert 'torch' not in sys.modules; "
            "print(fxconvert.codegen.forward_source.__name__, fxconvert.pipeline.load_pipeline.__name__, "
            "callable(fxconvert.trace), callable(fxconvert.convert))")
    run = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["forward_source", "load_pipeline", "True", "True"]


def _family_table():
    spec = importlib.util.spec_from_file_location("family_table", REPO / "scripts" / "family_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_family_tables_are_the_ones_the_records_give():
    """README.md's family tables are rendered from the records, the presets and the conformance suite's data
    (`scripts/family_table.py`): a record, a preset or a leaf that changes without the README fails here."""
    family_table = _family_table()
    actual = family_table.readme_tables((REPO / "README.md").read_text())
    assert actual == family_table.render(), (f"README.md's family tables differ from the records; run "
                                             f"`{family_table.FIX}`")
