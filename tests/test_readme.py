"""README.md's Python blocks run as written: each ```python block in a fresh interpreter, offline,
in an empty directory. A block that cannot run here (a Hub download, a GPU, several machines) is
fenced as ```bash or ```text instead; there is none today."""

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
