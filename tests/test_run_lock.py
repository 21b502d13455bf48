"""`fxconvert.training.run_lock` against what a user (or another program) may have left at RUN/.fxconvert-lock."""

import os
import subprocess
import sys

import pytest

import train_runs as tr
from fxconvert.training import run_lock
from fxconvert.errors import UsageError

# The call runs in a child process: a lock that waits on a FIFO would hang this test run, not fail it.
_CALL = """
import sys
from pathlib import Path
from fxconvert.training import run_lock
from fxconvert.errors import UsageError
try:
    getattr(run_lock, sys.argv[1])(Path(sys.argv[2]), shown="run", **({"create": True} if sys.argv[1] == "take" else {}))
except UsageError as e:
    print(e)
    sys.exit(2)
"""


@pytest.mark.parametrize("call", ["check", "take"])
def test_a_fifo_as_the_lock_file_is_refused_not_waited_on(tmp_path, call):
    os.mkfifo(tmp_path / run_lock.LOCK)
    try:
        proc = subprocess.run([sys.executable, "-c", _CALL, call, str(tmp_path)], cwd=tr.REPO, env=tr.env(),
                              capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"run_lock.{call} waited on a FIFO at the lock file")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stdout.strip() == f"--out run: its lock file {run_lock.LOCK} is not a plain file; remove it, or " \
                                  f"choose another --out"


def test_a_directory_as_the_lock_file_is_refused(tmp_path):
    (tmp_path / run_lock.LOCK).mkdir()
    with pytest.raises(UsageError, match="is not a plain file"):
        run_lock.check(tmp_path, shown="run")
