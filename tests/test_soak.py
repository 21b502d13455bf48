"""scripts/soak.py picks the tests that start processes, send signals, use threads or wait on a clock."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _soak():
    spec = importlib.util.spec_from_file_location("soak", REPO / "scripts" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tests_reaching_a_process_or_a_thread_through_helpers_and_fixtures_are_picked(tmp_path):
    (tmp_path / "helpers_x.py").write_text("import subprocess\ndef launch():\n    subprocess.run(['true'])\n"
                                           "def pure():\n    return 1\n")
    (tmp_path / "conftest.py").write_text("import pytest, threading\n@pytest.fixture\ndef worker():\n"
                                          "    return threading.Thread(target=print)\n")
    (tmp_path / "test_x.py").write_text(
        "import helpers_x\nfrom helpers_x import pure\nimport time\n"
        "def convert():\n    return pure()\n"
        "def test_direct():\n    helpers_x.launch()\n"
        "def test_fixture(worker):\n    pass\n"
        "def test_clock():\n    time.sleep(0)\n"
        "def test_pure():\n    assert convert() == 1\n")
    (tmp_path / "test_y.py").write_text("def convert():\n    import subprocess\n"
                                        "def test_other_modules_convert_is_not_mine():\n    pass\n")
    picked = {k.split("::")[1]: v for k, v in _soak().flaky_prone(sorted(tmp_path.glob("*.py"))).items()}
    assert set(picked) == {"test_direct", "test_fixture", "test_clock"}
    assert picked["test_direct"] == "launch -> subprocess"
