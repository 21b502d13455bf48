"""scripts/plot_metrics.py: a run's metrics.jsonl drawn into a PNG; without matplotlib, one line naming the install."""

import importlib.util
import json
import subprocess
import sys

import pytest

import train_runs as tr

SCRIPT = tr.REPO / "scripts" / "plot_metrics.py"


def _metrics(path):
    records = [{"step": s, "loss": 5.0 / s, "lr": 0.01 * min(1, s / 3), "grad_norm": 1.0, "tokens_per_s": 10.0}
               for s in range(1, 7)]
    records.append({"step": 2, "record": "memory", "rank": 0, "peak_bytes": 10**9})  # not a step: not drawn
    records.append({"step": 6, "record": "eval", "eval_loss": 1.5, "eval_examples": 4})  # drawn beside the loss
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 7, "lo')  # a killed run's last line


def test_without_matplotlib_one_line_names_the_install(tmp_path):
    _metrics(tmp_path / "metrics.jsonl")
    argv = [str(tmp_path / "metrics.jsonl"), str(tmp_path / "m.png")]
    hidden = (f"import sys, runpy; sys.modules['matplotlib'] = None; sys.argv[1:] = {argv!r}; "
              f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", hidden], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == ["plot_metrics.py: error: this script draws with matplotlib, which is not "
                                        "installed; pip install matplotlib"]
    assert not (tmp_path / "m.png").exists()


def test_a_png_of_the_step_records(tmp_path):
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed (pip install matplotlib): the script's only dependency")
    _metrics(tmp_path / "metrics.jsonl")
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "metrics.jsonl"), str(tmp_path / "m.png")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"wrote {tmp_path / 'm.png'} (7 records)"
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_plot_reads_the_step_and_eval_records_only(tmp_path):
    _metrics(tmp_path / "metrics.jsonl")
    spec = importlib.util.spec_from_file_location("plot_metrics", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    records = module.read(tmp_path / "metrics.jsonl")
    assert [(r["step"], r.get("record")) for r in records] == [(s, None) for s in range(1, 7)] + [(6, "eval")]
