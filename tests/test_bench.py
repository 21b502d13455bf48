"""scripts/bench.py keeps working: a --tiny run writes a report of the documented shape.

These tests check the JSON's keys and the kinds of its values, never the timings: `--tiny`
runs tiny models once, and the subprocess measurements run against a stand-in CLI.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "scripts" / "bench.py"

TARGET_KEYS = ["convert_over_export", "scaling_48_over_6", "runtime_overhead_tiny", "runtime_eval_1x32",
               "runtime_eval_8x128", "runtime_train_1x32", "runtime_train_8x128", "convert_over_export_gpt2",
               "runtime_overhead_tiny_gpt2", "runtime_eval_1x32_gpt2", "runtime_eval_8x128_gpt2",
               "runtime_train_1x32_gpt2", "runtime_train_8x128_gpt2", "balance_bottleneck_time_over_params",
               "balance_imbalance_time", "balance_prediction_error", "cli_over_import", "t5_11b_meta_peak_rss_mb",
               "pipeline_train_throughput_2x1", "train_step_over_eager_loop", "virtual_stages_over_one",
               "pipeline_rank_peak_rss_ratio", "plan_memory_error", "recompute_activation_ratio", "recompute_time_ratio", "adafactor_state_ratio", "convert_over_export_llama",
               "runtime_eval_1x32_llama", "runtime_eval_8x128_llama", "runtime_train_1x32_llama",
               "runtime_train_8x128_llama", "data_rss_ratio"]
SUBPROCESS_KEYS = ["cli_over_import", "t5_11b_meta_peak_rss_mb", "pipeline_train_throughput_2x1",
                   "train_step_over_eager_loop", "virtual_stages_over_one",
                   "pipeline_rank_peak_rss_ratio", "plan_memory_error", "recompute_activation_ratio",
                   "recompute_time_ratio", "data_rss_ratio", "zbv_over_1f1b"]
HIGHER_IS_BETTER = ["pipeline_train_throughput_2x1"]  # a speed-up: the value must reach its target
BALANCE_KEYS = ["balance_bottleneck_time_over_params", "balance_imbalance_time", "balance_prediction_error"]
IN_PROCESS_KEYS = [k for k in TARGET_KEYS if k not in (*SUBPROCESS_KEYS, *BALANCE_KEYS)]
INFO_KEYS = ["zbv_over_1f1b"]  # reported without a target
COMPILE_KEYS = ["compile_fullgraph", "compile_time_converted_s", "compile_time_eager_s", "compile_time_ratio",
                "compile_runtime_ratio"]


def load_bench():
    spec = importlib.util.spec_from_file_location("fxconvert_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return load_bench()


def is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def is_marker(x):
    return isinstance(x, str) and x.startswith(("unavailable: ", "skipped: "))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    md = tmp / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\nprose before\n\n<!-- bench:begin -->\nold table\n<!-- bench:end -->\n\nprose after\n")
    proc = subprocess.run([sys.executable, str(BENCH), "--tiny", "--json", str(tmp / "out.json"), "--markdown", str(md)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp / "out.json").read_text()), proc.stdout, md.read_text(), tmp / "out.json"


def test_tiny_run_json_shape(bench, tiny_run):
    report, _, _, _ = tiny_run
    assert report["schema_version"] == 1 and report["mode"] == "tiny"
    assert set(bench.TARGETS) == set(TARGET_KEYS) and list(bench.COMPILE_KEYS) == COMPILE_KEYS
    for key in ("cpu", "usable_cpus", "python", "torch", "transformers", "fxconvert", "torch_threads"):
        assert key in report["machine"], key
    assert list(report["results"]) == TARGET_KEYS + INFO_KEYS + COMPILE_KEYS
    for key in TARGET_KEYS + INFO_KEYS + COMPILE_KEYS:
        assert is_number(report[key]) or is_marker(report[key]), (key, report[key])
        entry = report["results"][key]
        assert entry["status"] in ("pass", "fail", "info", "unavailable", "skipped"), entry
    for key in TARGET_KEYS:
        entry = report["results"][key]
        comparison = ">=" if key in HIGHER_IS_BETTER else "<="
        assert entry["target"] == bench.TARGETS[key][0] and entry["comparison"] == comparison
        above = bench.Result(key, value=bench.TARGETS[key][0] * 1.01)
        assert above.status == ("pass" if comparison == ">=" else "fail"), key
    # The in-process measurements run in --tiny mode: a crash shows up as "unavailable: ...".
    for key in IN_PROCESS_KEYS:
        entry = report["results"][key]
        assert is_number(report[key]) and report[key] > 0, (key, report[key])
        assert entry["status"] in ("pass", "fail")
        assert entry["value"] == report[key]
        for side in ("fxconvert", "baseline"):
            assert is_number(entry[side]["median"]) and entry[side]["n"] >= 1 and entry[side]["label"]
    for key in [k for k in IN_PROCESS_KEYS if k.startswith("runtime_")]:  # the two losses agree
        assert report["results"][key]["details"]["loss_abs_diff"] < 1e-3
    for key in BALANCE_KEYS:  # two splits of one model, measured stage by stage
        entry = report["results"][key]
        assert is_number(report[key]) and report[key] > 0 and entry["status"] in ("pass", "fail"), (key, report[key])
        details = entry["details"]
        assert len(details["stage_seconds"]["time"]) == len(details["stage_seconds"]["params"]) == 4
        assert sum(details["predicted_share_time"]) == pytest.approx(1.0)
    for key in SUBPROCESS_KEYS:
        assert report[key].startswith("skipped: "), report[key]
    for key in COMPILE_KEYS:
        assert report[key] == "skipped: pass --compile"


def test_tiny_run_markdown(tiny_run):
    report, stdout, md, _ = tiny_run
    header = "| Measurement | fxconvert | Baseline | Value | Target | Result |"
    assert header in stdout
    for key in TARGET_KEYS:
        assert f"| `{key}` |" in stdout
    # --markdown replaces only the text between the markers
    assert md.startswith("# Benchmarks\n\nprose before\n\n<!-- bench:begin -->\n")
    assert md.endswith("<!-- bench:end -->\n\nprose after\n")
    assert "old table" not in md and header in md


def test_render_stored_report(bench, tiny_run, tmp_path, capsys):
    _, stdout, _, stored = tiny_run
    md = tmp_path / "B.md"
    assert bench.main(["--render", str(stored), "--markdown", str(md)]) == 0
    assert capsys.readouterr().out == stdout  # the same table as the run printed
    assert md.read_text() == f"# Benchmarks\n\n<!-- bench:begin -->\n{stdout[:-1]}<!-- bench:end -->\n"


FAKE_CLI = textwrap.dedent("""
    import argparse, os, sys
    p = argparse.ArgumentParser()
    p.add_argument("name"); p.add_argument("--offline", action="store_true")
    p.add_argument("--no-validate", action="store_true"); p.add_argument("--force", action="store_true")
    p.add_argument("--out", required=True); p.add_argument("--fail")
    a = p.parse_args()
    if os.environ.get("FAKE_CLI_FAIL"):
        sys.exit("error: cannot resolve " + a.name)
    os.makedirs(a.out, exist_ok=True)
    open(os.path.join(a.out, "model.py"), "w").write("# " + a.name)
""")


@pytest.fixture
def fake_cli(bench, tmp_path, monkeypatch):
    script = tmp_path / "fake_cli.py"
    script.write_text(FAKE_CLI)
    monkeypatch.setattr(bench, "CLI", [sys.executable, str(script)])
    monkeypatch.setattr(bench, "IMPORT_BASELINE", [sys.executable, "-c", "pass"])
    monkeypatch.setattr(bench, "cli_unavailable_reason", lambda: None)
    return bench.Context(bench.parse_args(["--quick", "--reps", "1"]))


def test_subprocess_measurements(bench, fake_cli):
    ctx = fake_cli
    cli = bench.measure_cli_over_import(ctx)
    assert cli.unavailable is None and cli.status in ("pass", "fail")
    assert is_number(cli.value) and cli.value > 0
    assert len(cli.fxconvert.samples) == 1 and len(cli.baseline.samples) == 1
    assert "--out" not in cli.fxconvert.label and "t5-small --offline --no-validate" in cli.fxconvert.label
    assert cli.details["import_peak_rss_mb"] > 0
    rss = bench.measure_t5_11b_rss(ctx)
    assert rss.unavailable is None and is_number(rss.value) and rss.value > 0
    assert rss.details["import_only_peak_rss_mb"] == cli.details["import_peak_rss_mb"]
    entry = rss.as_json()
    assert entry["unit"] == "MB" and entry["target"] == 1500.0


def test_data_rss_measures_both_files(bench, fake_cli, monkeypatch):
    """The data_rss_ratio entry on small files (what a --quick run does at 2k and 200k lines)."""
    monkeypatch.setitem(bench.DATA_RSS, "lines", (50, 500))
    monkeypatch.setitem(bench.DATA_RSS, "batches", 3)
    result = bench.measure_data_rss(fake_cli)
    assert result.unavailable is None and is_number(result.value) and result.value > 0, result.unavailable
    assert len(result.fxconvert.samples) == len(result.baseline.samples) == 1
    assert result.fxconvert.unit == "MB" and result.details["lines"] == [50, 500]
    assert result.as_json()["target"] == 1.10


def test_failing_cli_is_unavailable(bench, fake_cli, monkeypatch):
    monkeypatch.setenv("FAKE_CLI_FAIL", "1")
    cli = bench.measure_cli_over_import(fake_cli)
    assert cli.status == "unavailable"
    assert cli.unavailable.startswith("unavailable: ") and "error: cannot resolve t5-small" in cli.unavailable
    assert cli.baseline is not None and cli.as_json()["value"] is None  # the baseline is still measured
    rss = bench.measure_t5_11b_rss(fake_cli)
    assert rss.unavailable.startswith("unavailable: ") and "cannot resolve t5-11b" in rss.unavailable


def test_run_child_timeout(bench):
    run = bench.run_child([sys.executable, "-c", "import time; time.sleep(60)"], timeout_s=0.5)
    assert run.timed_out and "timed out" in run.failure()
    ok = bench.run_child([sys.executable, "-c", "print('hi')"])
    assert ok.failure() is None and ok.stdout.strip() == "hi" and ok.maxrss_mb > 0


def test_profile_missed(bench, fake_cli, tmp_path):
    missed = bench.Result("convert_over_export", value=1.0,
                          profile=lambda prof: bench._profiled(prof, lambda: sorted(range(10000), key=str)))
    argv = bench.CLI + ["t5-small", "--offline", "--out", str(tmp_path / "out"), "--force"]
    missed_child = bench.Result("cli_over_import", value=9.0,
                                profile=lambda out: bench._profile_child(argv, out, 60))
    passed = bench.Result("scaling_48_over_6", value=1.0, profile=lambda _: pytest.fail("profiled a passing target"))
    bench.profile_missed([missed, missed_child, passed], tmp_path / "prof")
    for r in (missed, missed_child):
        assert "profile_error" not in r.details, r.details
        assert (tmp_path / "prof" / f"{r.key}.txt").exists() and r.details["profile_top"]


def test_stage_sizes_are_read_through_the_manifest(bench, tmp_path):
    """The rank-RSS figure's stage sizes are pipeline.json's, read through `fxconvert.manifest`: the bytes of
    each stage's parameters as written."""
    import fxconvert
    import helpers

    helpers.build().save_pretrained(tmp_path / "ckpt")
    fxconvert.convert(tmp_path / "ckpt").save(tmp_path / "conv", stages=2)
    written = json.loads((tmp_path / "conv" / "pipeline.json").read_text())
    assert bench._stage_bytes(tmp_path / "conv") == [sum(p["bytes"] for p in stage["parameters"])
                                                     for stage in written["stages"]]


@pytest.mark.slow
def test_tiny_compile_run(tmp_path):
    """--compile on the tiny model (about 30 s): torch.compile figures, or a clear 'unavailable: ...'."""
    out = tmp_path / "compile.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--tiny", "--compile", "--only", "compile", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    for key in COMPILE_KEYS:
        assert is_number(report[key]) or report[key].startswith("unavailable: "), (key, report[key])
    if is_number(report["compile_fullgraph"]):
        assert report["compile_fullgraph"] == 1.0, report["results"]["compile_fullgraph"]  # no graph break
    for key in TARGET_KEYS + INFO_KEYS:
        assert report[key] == "skipped: not selected (--only)"


def test_the_pipeline_runs_need_no_port_picked_ahead(bench, tmp_path, monkeypatch):
    """The bench's torchrun picks its own port as it binds it. It used to be given a port picked here by
    binding to port 0, which another program could take before torchrun bound it; here every such pick is
    a port a listener already holds."""
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    monkeypatch.setattr(socket.socket, "getsockname", lambda self: ("127.0.0.1", port))
    script = tmp_path / "meet.py"
    script.write_text("import os, pathlib, torch, torch.distributed as dist\n"
                      "dist.init_process_group('gloo')\n"
                      "t = torch.ones(1)\n"
                      "dist.all_reduce(t)\n"
                      f"pathlib.Path({str(tmp_path)!r}, 'rank' + os.environ['RANK'])"
                      ".write_text(os.environ['MASTER_ADDR'] + ' ' + str(int(t)))\n"
                      "dist.destroy_process_group()\n")
    command = bench._torchrun(2, script)
    monkeypatch.undo()
    with taken:  # still held while torchrun starts
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [(tmp_path / f"rank{r}").read_text() for r in range(2)] == ["127.0.0.1 2"] * 2
