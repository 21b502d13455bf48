#!/usr/bin/env python
"""Benchmark fxconvert against baselines measured in the same run; one command for every figure.

    PYTHONPATH=. python scripts/bench.py --quick --json bench.json     # about 6 minutes on a quiet 2-core machine
    PYTHONPATH=. python scripts/bench.py --json bench.json             # more repetitions
    PYTHONPATH=. python scripts/bench.py --quick --compile             # + torch.compile comparison
    PYTHONPATH=. python scripts/bench.py --tiny --json out.json        # smoke run (tests/test_bench.py)
    PYTHONPATH=. python scripts/bench.py --only runtime_eval --profile prof/   # a subset, with profiles

Every target is a ratio fxconvert / baseline (lower is better), except the peak RSS of the
t5-11b meta conversion, which is absolute (MB), and the pipeline training throughput, a
speed-up (tokens/s over tokens/s: higher is better). Each figure is the median of several
repetitions after a warm-up; an fxconvert repetition and a baseline repetition alternate
(AB BA AB ...), so drifting load on a shared machine hits both sides alike.

A measurement that cannot run (no CLI yet, torch.compile unusable, a crash) is reported as
"unavailable: <reason>" in the table and the JSON; the rest of the run goes on.
"""

import argparse
import contextlib
import cProfile
import datetime
import gc
import io
import itertools
import json
import os
import platform
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # `python scripts/bench.py` works without PYTHONPATH too

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import transformers  # noqa: E402

SCHEMA_VERSION = 1
THREADS = 2

# Every measurement is registered once, in `REGISTRY` (after the functions that measure them):
# key, target, unit, what it compares, the function, and the comparison (">=" for a speed-up).
# TARGETS, COMPARISONS, RUNTIME_KEYS and COMPILE_KEYS are read from it. Ratios are fxconvert /
# baseline; lower is better unless the comparison is ">=".

# Repetition plans. In-process comparisons run `warmup` untimed rounds (one call of each side),
# then enough timed rounds to fill `budget_s` (judged from the warm-up), at least `min_reps` and
# at most `max_reps` (conversions: at most min_reps + 2). Subprocess comparisons run one untimed
# round and `sub_reps` timed ones; the t5-11b peak RSS is the median of `rss_reps` runs.
MODES = {
    "tiny": dict(warmup=0, min_reps=1, max_reps=1, budget_s=0.0, sub_reps=1, rss_reps=1, subprocess=False,
                 child_timeout_s=120),
    "quick": dict(warmup=1, min_reps=3, max_reps=100, budget_s=3.0, sub_reps=3, rss_reps=1, subprocess=True,
                  child_timeout_s=150),
    "full": dict(warmup=2, min_reps=7, max_reps=400, budget_s=10.0, sub_reps=5, rss_reps=3, subprocess=True,
                 child_timeout_s=600),
}


# --- results -----------------------------------------------------------------------------------


@dataclass
class Figure:
    """One side of a comparison: what ran, and its timed samples (or one measured value)."""

    label: str
    samples: list[float]
    unit: str = "s"

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def as_json(self):
        return {"label": self.label, "median": self.median, "min": min(self.samples), "unit": self.unit,
                "n": len(self.samples), "samples": self.samples}


@dataclass
class Result:
    key: str
    value: float | None = None
    fxconvert: Figure | None = None
    baseline: Figure | None = None
    unavailable: str | None = None  # "unavailable: ..." or "skipped: ..."
    details: dict = field(default_factory=dict)
    # Profiles the fxconvert side (--profile): in-process, called with a cProfile.Profile to enable
    # around the profiled work only; for a subprocess, called with a path prefix for the .prof file.
    profile: object = None

    @property
    def target(self):
        return TARGETS[self.key][0] if self.key in TARGETS else None

    @property
    def status(self) -> str:
        if self.unavailable:
            return self.unavailable.split(":", 1)[0]  # "unavailable" / "skipped"
        if self.key == "compile_fullgraph":  # a requirement without a number: no graph break
            return "pass" if self.value else "fail"
        if self.target is None:
            return "info"
        if COMPARISONS.get(self.key) == ">=":  # a speed-up: higher is better
            return "pass" if self.value >= self.target else "fail"
        return "pass" if self.value <= self.target else "fail"

    def as_json(self):
        out = {"value": self.value, "status": self.status}
        if self.key in TARGETS:
            target, unit, what = TARGETS[self.key]
            out.update(target=target, comparison=COMPARISONS[self.key], unit=unit, what=what)
        if self.unavailable:
            out["reason"] = self.unavailable
        if self.fxconvert:
            out["fxconvert"] = self.fxconvert.as_json()
        if self.baseline:
            out["baseline"] = self.baseline.as_json()
        out["details"] = self.details
        return out


def unavailable(key, why, **details) -> Result:
    return Result(key, unavailable=f"unavailable: {why}", details=details)


def _fmt(x, unit):
    if x is None:
        return "-"
    if unit == "s":
        if x < 0.01:
            return f"{x * 1e3:.2f} ms"
        if x < 1:
            return f"{x * 1e3:.1f} ms"
        return f"{x:.2f} s"
    if unit == "MB":
        return f"{x:.0f} MB"
    if unit == "tokens/s":
        return f"{x:,.0f} tokens/s"
    return f"{x:.3g}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


# --- timing ------------------------------------------------------------------------------------


def interleaved(sides: dict, *, warmup: int, min_reps: int, max_reps: int, budget_s: float, setup=None):
    """Time each side (a name -> zero-argument callable) in alternating order: AB BA AB ...

    `setup(name)` runs untimed before each call (seeding, clearing gradients). Returns
    name -> list of seconds. The number of timed rounds fills `budget_s`, judged from the
    warm-up (or from the first round when there is none), within [min_reps, max_reps].
    """
    names = list(sides)
    samples = {n: [] for n in names}

    def once(name):
        if setup is not None:
            setup(name)
        gc.collect()  # untimed, before every call: no side runs in (or pays to collect) the other's garbage
        start = time.perf_counter()
        sides[name]()
        return time.perf_counter() - start

    gc.collect()
    gc.freeze()  # what exists now is never garbage here: keeps the collection before each call cheap
    try:
        round_s = None
        for _ in range(warmup):
            round_s = sum(once(n) for n in names)
        reps, i = min_reps, 0
        while i < reps:
            for n in names if i % 2 == 0 else names[::-1]:
                samples[n].append(once(n))
            if i == 0:
                first = round_s if round_s is not None else sum(samples[n][0] for n in names)
                reps = max(min_reps, min(max_reps, int(budget_s / max(first, 1e-6))))
            i += 1
    finally:
        gc.unfreeze()
    return samples


# --- models and inputs ---------------------------------------------------------------------------


def small_config(**overrides):
    """The t5-small architecture (T5Config's defaults)."""
    return transformers.T5Config(decoder_start_token_id=0, use_cache=False, **overrides)


def tiny_config(**overrides):
    kwargs = dict(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2, vocab_size=1000,
                  decoder_start_token_id=0, use_cache=False)
    kwargs.update(overrides)
    return transformers.T5Config(**kwargs)


def build(config, *, meta=False, seed=0):
    torch.manual_seed(seed)
    if meta:
        with torch.device("meta"):
            model = transformers.T5ForConditionalGeneration(config)
    else:
        model = transformers.T5ForConditionalGeneration(config)
    return model.eval()


def make_inputs(batch, seq, vocab, seed=0, names=None):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if seq > 4:
        mask[0, -2:] = 0  # pad the tail of the first sequence
    inputs = {
        "input_ids": torch.randint(0, vocab, (batch, seq), generator=g),
        "attention_mask": mask,
        "decoder_input_ids": torch.randint(0, vocab, (batch, seq), generator=g),
        "labels": torch.randint(0, vocab, (batch, seq), generator=g),
    }
    return {n: inputs[n] for n in names or input_names(transformers.T5ForConditionalGeneration)}


def input_names(model) -> list[str]:
    """What the trainer feeds the model (its family record's `train_inputs`)."""
    from fxconvert import families

    cls = model if isinstance(model, type) else type(model)
    return list(families.family_of_class(cls.__name__).train_inputs)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def gpt2_config(tiny: bool):
    """GPT-2's published small architecture (GPT2Config's defaults; tiny under --tiny), dropout 0.1."""
    sizes = dict(n_embd=64, n_head=4, n_layer=2, vocab_size=1000, n_positions=256) if tiny else {}
    return transformers.GPT2Config(use_cache=False, **sizes)


def build_gpt2(config, seed=0):
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).eval()


def llama_config(tiny: bool):
    """A Llama-shaped model of about 100M parameters (TinyLlama's layout, narrower and shallower):
    hidden 768, 12 heads on 4 kv heads, SwiGLU 2048, 8 layers, vocab 32000, untied head."""
    kwargs = dict(hidden_size=768, intermediate_size=2048, num_attention_heads=12, num_key_value_heads=4,
                  num_hidden_layers=8, vocab_size=32000, max_position_embeddings=2048, use_cache=False,
                  tie_word_embeddings=False)
    if tiny:
        kwargs.update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=1000)
    return transformers.LlamaConfig(**kwargs)


def build_llama(config, seed=0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def convert(model):
    import fxconvert

    conversion = fxconvert.convert(model, input_names=input_names(model))
    conversion.graph_module.code  # codegen is part of the cost (convert already recompiles)
    return conversion


# --- measurements: in-process conversion --------------------------------------------------------


def measure_convert_over_export(ctx, key="convert_over_export", model=None) -> Result:
    model = ctx.main_model() if model is None else model
    inputs = make_inputs(1, 32, model.config.vocab_size, names=input_names(model))
    phases = []

    def run_convert():
        phases.append(convert(model).timings)

    def run_export():
        torch.export.export(model, (), kwargs={**inputs, "use_cache": False}, strict=False)

    samples = interleaved({"fxconvert": run_convert, "export": run_export}, **ctx.plan(heavy=True))
    fx = Figure("fxconvert.convert (trace + passes + codegen)", samples["fxconvert"])
    base = Figure("torch.export.export(strict=False)", samples["export"])
    details = {"model": ctx.name_of(model), "params": n_params(model), "export_inputs": "1x32",
               "fxconvert_phases_median_s": {k: statistics.median(p[k] for p in phases) for k in phases[0]}}
    return Result(key, fx.median / base.median, fx, base, details=details, profile=lambda prof: _profiled(prof, lambda: convert(model)))


def measure_scaling(ctx) -> Result:
    key = "scaling_48_over_6"
    lo, hi = ctx.scaling_layers
    base_cfg = dict(d_model=64, d_ff=128, d_kv=16, num_heads=4, vocab_size=1000) if ctx.mode == "tiny" else {}
    models = {L: build(small_config(num_layers=L, **base_cfg), meta=True) for L in (lo, hi)}
    phases = {lo: [], hi: []}

    def side(L):
        return lambda: phases[L].append(convert(models[L]).timings)

    samples = interleaved({hi: side(hi), lo: side(lo)}, **ctx.plan(heavy=True))
    fx = Figure(f"convert, {hi} layers (meta)", samples[hi])
    base = Figure(f"convert, {lo} layers (meta)", samples[lo])
    details = {
        "layers": [lo, hi], "d_model": models[lo].config.d_model, "device": "meta",
        "per_layer_ms": {L: 1e3 * statistics.median(samples[L]) / L for L in (lo, hi)},
        "fxconvert_phases_median_s": {L: {k: statistics.median(p[k] for p in phases[L]) for k in phases[L][0]}
                                      for L in (lo, hi)},
    }
    return Result(key, fx.median / base.median, fx, base, details=details, profile=lambda prof: _profiled(prof, lambda: convert(models[hi])))


# --- measurements: runtime ----------------------------------------------------------------------


def compare_runtime(ctx, key, model, conversion, batch, seq, train) -> Result:
    inputs = make_inputs(batch, seq, model.config.vocab_size, names=input_names(model))
    module = conversion.module
    model.train(train)
    module.train(train)
    try:
        if train:
            def eager():
                model(**inputs, use_cache=False).loss.backward()

            def converted():
                module(**inputs).backward()

            def setup(_):
                model.zero_grad(set_to_none=True)
                torch.manual_seed(0)
        else:
            def eager():
                with torch.no_grad():
                    model(**inputs, use_cache=False).loss

            def converted():
                with torch.no_grad():
                    module(**inputs)

            setup = None

        # Same seed, same inputs: the two losses should agree (dropout draws too, in train mode).
        with torch.no_grad():
            torch.manual_seed(0)
            loss_eager = model(**inputs, use_cache=False).loss.item()
            torch.manual_seed(0)
            loss_converted = module(**inputs).item()
        samples = interleaved({"converted": converted, "eager": eager}, setup=setup, **ctx.plan())
        model.zero_grad(set_to_none=True)
    finally:
        model.eval()
        module.eval()
    fx = Figure("Conversion.module" + (" fwd+bwd" if train else " forward"), samples["converted"])
    base = Figure("eager transformers" + (" fwd+bwd" if train else " forward"), samples["eager"])
    details = {"model": ctx.name_of(model) if not key.startswith("runtime_overhead_tiny") else "tiny",
               "params": n_params(model),
               "batch": batch, "seq": seq, "mode": "train" if train else "eval", "threads": torch.get_num_threads(),
               "loss_abs_diff": abs(loss_eager - loss_converted)}

    def profile(profiler):
        """Three converted calls under `profiler`; setup (mode, seed, gradients) stays outside it."""
        module.train(train)
        try:
            for _ in range(3):
                model.zero_grad(set_to_none=True)
                torch.manual_seed(0)
                _profiled(profiler, converted)
        finally:
            model.zero_grad(set_to_none=True)
            module.eval()

    return Result(key, fx.median / base.median, fx, base, details=details, profile=profile)


RUNTIME_SHAPES = [("eval_1x32", 1, 32, False), ("eval_8x128", 8, 128, False), ("train_1x32", 1, 32, True),
                  ("train_8x128", 8, 128, True)]


def measure_runtime(ctx) -> list[Result]:
    results = []
    if ctx.selected("runtime_overhead_tiny"):
        tiny = build(tiny_config())
        results.append(ctx.guard("runtime_overhead_tiny", lambda: compare_runtime(
            ctx, "runtime_overhead_tiny", tiny, convert(tiny), 1, 8, False)))
    if not any(ctx.selected(k) for k in RUNTIME_KEYS if k != "runtime_overhead_tiny"):
        return results
    model = ctx.main_model()
    conversion = convert(model)
    for name, batch, seq, train in RUNTIME_SHAPES:
        key = f"runtime_{name}"
        if ctx.selected(key):
            results.append(ctx.guard(key, lambda: compare_runtime(ctx, key, model, conversion, batch, seq, train)))
    return results


def measure_convert_over_export_gpt2(ctx) -> Result:
    return measure_convert_over_export(ctx, "convert_over_export_gpt2", ctx.gpt2_model())


def measure_runtime_gpt2(ctx) -> list[Result]:
    """The runtime comparisons of `measure_runtime` on GPT-2 (keys suffixed `_gpt2`)."""
    results = []
    if ctx.selected("runtime_overhead_tiny_gpt2"):
        tiny = build_gpt2(gpt2_config(tiny=True))
        results.append(ctx.guard("runtime_overhead_tiny_gpt2", lambda: compare_runtime(
            ctx, "runtime_overhead_tiny_gpt2", tiny, convert(tiny), 1, 8, False)))
    keys = [(f"runtime_{name}_gpt2", batch, seq, train) for name, batch, seq, train in RUNTIME_SHAPES]
    if not any(ctx.selected(key) for key, *_ in keys):
        return results
    model = ctx.gpt2_model()
    conversion = convert(model)
    for key, batch, seq, train in keys:
        if ctx.selected(key):
            results.append(ctx.guard(key, lambda: compare_runtime(ctx, key, model, conversion, batch, seq, train)))
    return results


def measure_convert_over_export_llama(ctx) -> Result:
    return measure_convert_over_export(ctx, "convert_over_export_llama", ctx.llama_model())


def measure_runtime_llama(ctx) -> list[Result]:
    """The runtime comparisons of `measure_runtime` on the ~100M Llama (keys suffixed `_llama`)."""
    keys = [(f"runtime_{name}_llama", batch, seq, train) for name, batch, seq, train in RUNTIME_SHAPES]
    if not any(ctx.selected(key) for key, *_ in keys):
        return []
    model = ctx.llama_model()
    conversion = convert(model)
    return [ctx.guard(key, lambda key=key, batch=batch, seq=seq, train=train: compare_runtime(
        ctx, key, model, conversion, batch, seq, train)) for key, batch, seq, train in keys if ctx.selected(key)]


# --- measurements: subprocesses -----------------------------------------------------------------


@dataclass
class ChildRun:
    argv: list[str]
    returncode: int
    wall_s: float
    maxrss_mb: float
    stdout: str
    stderr: str
    timed_out: bool = False
    cpu_s: float = float("nan")  # user + system time of the command and the processes it waited for

    def failure(self) -> str | None:
        """None when the child succeeded, else one line saying how it failed."""
        if self.timed_out:
            return f"{_cli_label(self.argv)} timed out after {self.wall_s:.0f} s"
        if self.returncode != 0:
            tail = [line for line in self.stderr.strip().splitlines() if line.strip()]
            return f"{_cli_label(self.argv)} exited {self.returncode}: {tail[-1].strip() if tail else '(no stderr)'}"
        return None


def _cmdline(argv):
    shown = ["python" if a == sys.executable else repr(a) if " " in a else a for a in argv]
    return " ".join(shown)


def child_env(overrides=None):
    """This process's environment with the repository on PYTHONPATH; `overrides` name -> value, None removes."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("HF_HUB_OFFLINE", "1")
    for name, value in (overrides or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


# Runs the measured command for run_child, from a small process. Linux carries a process's peak
# RSS across exec(), so a child forked straight from this (large) process would report at least
# this process's size; a grandchild forked from this small launcher reports only its own.
_LAUNCHER = """
import json, os, signal, subprocess, sys, threading, time
report, timeout, argv = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
start = time.perf_counter()
proc = subprocess.Popen(argv)
killed = threading.Event()
def kill():
    killed.set()
    proc.kill()
timer = threading.Timer(timeout, kill)
timer.start()
_, status, usage = os.wait4(proc.pid, 0)
wall = time.perf_counter() - start
timer.cancel()
with open(report, "w") as f:
    json.dump({"status": status, "wall_s": wall, "maxrss_kb": usage.ru_maxrss, "timed_out": killed.is_set(),
               "cpu_s": usage.ru_utime + usage.ru_stime}, f)
"""


def run_child(argv, *, cwd=None, timeout_s=600.0, env=None) -> ChildRun:
    """Run `argv` to completion: its wall time and its own peak RSS (os.wait4's rusage of it).

    The command runs under a small launcher process (see `_LAUNCHER`), which times it, kills it
    after `timeout_s`, and reports its rusage. `env`: overrides of the environment (see `child_env`).
    """
    with tempfile.TemporaryDirectory(prefix="fxbench-run-") as tmp:
        out_path, err_path, report_path = (os.path.join(tmp, n) for n in ("stdout", "stderr", "report.json"))
        with open(out_path, "w") as out, open(err_path, "w") as err:
            launcher = subprocess.Popen([sys.executable, "-c", _LAUNCHER, report_path, str(timeout_s), *argv],
                                        cwd=cwd, env=child_env(env), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                        start_new_session=True)
            try:
                launcher.wait(timeout=timeout_s + 30)
            except subprocess.TimeoutExpired:  # the launcher itself hung: end its whole session
                os.killpg(launcher.pid, 9)
                launcher.wait()
        stdout, stderr = Path(out_path).read_text(), Path(err_path).read_text()
        if not os.path.exists(report_path):
            return ChildRun(list(argv), launcher.returncode or -1, float("nan"), float("nan"), stdout,
                            stderr + "\nthe benchmark's launcher process failed", timed_out=launcher.returncode == -9)
        report = json.loads(Path(report_path).read_text())
    return ChildRun(list(argv), os.waitstatus_to_exitcode(report["status"]), report["wall_s"],
                    report["maxrss_kb"] / 1024.0, stdout, stderr, report["timed_out"], report["cpu_s"])


def cli_unavailable_reason() -> str | None:
    """Why `python -m fxconvert` cannot run at all, judged without running it (None: try it)."""
    if not (REPO / "fxconvert" / "__main__.py").exists():
        return "python -m fxconvert is not implemented yet (no fxconvert/__main__.py)"
    return None


CLI = [sys.executable, "-m", "fxconvert"]
IMPORT_BASELINE = [sys.executable, "-c", "import torch, transformers.models.t5.modeling_t5"]


def _cli_label(argv):
    """The command line as the table shows it: without the temporary --out directory."""
    shown = list(argv)
    if "--out" in shown:
        i = shown.index("--out")
        del shown[i:i + 2]
    return "`" + _cmdline(shown) + "`"


def measure_cli_over_import(ctx) -> Result:
    key = "cli_over_import"
    with tempfile.TemporaryDirectory(prefix="fxbench-cli-") as tmp:
        cli = CLI + ["t5-small", "--offline", "--no-validate", "--out", os.path.join(tmp, "out"), "--force"]
        why = cli_unavailable_reason()
        runs = {"cli": [], "import": []}
        rounds = ctx.plan_subprocess()
        timeout = ctx.plan_dict["child_timeout_s"]
        # warm-up round (page cache), then AB BA ... rounds
        for i in range(1 + rounds):
            order = ["cli", "import"] if i % 2 == 0 else ["import", "cli"]
            for side in order:
                if side == "cli" and why:
                    continue
                run = run_child(cli if side == "cli" else IMPORT_BASELINE, cwd=tmp, timeout_s=timeout)
                if run.failure():
                    if side == "import":
                        return unavailable(key, f"the baseline failed: {run.failure()}")
                    why = run.failure()
                    continue
                if i > 0:
                    runs[side].append(run)
    base = Figure(_cli_label(IMPORT_BASELINE), [r.wall_s for r in runs["import"]])
    details = {"import_peak_rss_mb": statistics.median(r.maxrss_mb for r in runs["import"])}
    ctx.import_rss_mb = details["import_peak_rss_mb"]
    if why:
        result = unavailable(key, why, **details)
        result.baseline = base
        return result
    fx = Figure(_cli_label(cli), [r.wall_s for r in runs["cli"]])
    details["cli_peak_rss_mb"] = statistics.median(r.maxrss_mb for r in runs["cli"])
    return Result(key, fx.median / base.median, fx, base, details=details,
                  profile=lambda out: _profile_child(cli, out, timeout))


def measure_t5_11b_rss(ctx) -> Result:
    key = "t5_11b_meta_peak_rss_mb"
    why = cli_unavailable_reason()
    if why:
        return unavailable(key, why)
    runs = []
    with tempfile.TemporaryDirectory(prefix="fxbench-11b-") as tmp:
        argv = CLI + ["t5-11b", "--offline", "--out", os.path.join(tmp, "out"), "--force"]
        for _ in range(ctx.plan_dict["rss_reps"]):
            run = run_child(argv, cwd=tmp, timeout_s=ctx.plan_dict["child_timeout_s"])
            if run.failure():
                return unavailable(key, run.failure())
            runs.append(run)
    fx = Figure(_cli_label(argv) + " peak RSS", [r.maxrss_mb for r in runs], unit="MB")
    details = {"wall_s": statistics.median(r.wall_s for r in runs)}
    if ctx.import_rss_mb is not None:
        details["import_only_peak_rss_mb"] = ctx.import_rss_mb
    return Result(key, fx.median, fx, None, details=details,
                  profile=lambda out: _profile_child(argv, out, ctx.plan_dict["child_timeout_s"]))


def _profile_child(argv, out_prefix, timeout_s):
    """Profile a `python -m fxconvert ...` child with cProfile; returns the .prof path."""
    prof = os.path.abspath(f"{out_prefix}.prof")  # the child runs in a temporary directory
    with tempfile.TemporaryDirectory(prefix="fxbench-prof-") as tmp:
        args = list(argv)
        if "--out" in args:  # a fresh output directory
            args[args.index("--out") + 1] = os.path.join(tmp, "out")
        run = run_child([sys.executable, "-m", "cProfile", "-o", prof] + args[1:], cwd=tmp, timeout_s=timeout_s)
    if run.failure():
        raise RuntimeError(run.failure())
    return prof


# --- torch.compile --------------------------------------------------------------------------------


def measure_compile(ctx) -> list[Result]:
    """torch.compile(fullgraph=True) of Conversion.module vs torch.compile of eager transformers."""

    def all_unavailable(why):
        return [unavailable(k, why) for k in COMPILE_KEYS]

    if not ctx.compile:
        return [Result(k, unavailable="skipped: pass --compile") for k in COMPILE_KEYS]
    if shutil.which(os.environ.get("CXX", "g++")) is None and shutil.which("c++") is None:
        return all_unavailable("torch.compile's inductor backend needs a C++ compiler (g++) and none is on PATH")
    import torch._dynamo
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    inductor_config.force_disable_caches = True  # cold compile times, not the on-disk cache's
    warnings.filterwarnings("ignore", message=".*force disabled by torch.compiler.config.force_disable_caches")
    try:  # one-off costs (imports, compiler probing) count against neither side
        torch._dynamo.reset()
        torch.compile(lambda x: (x * 2).sin() + 1, fullgraph=True)(torch.randn(8))
    except Exception as e:
        return all_unavailable(f"torch.compile does not work here: {_first_line(e)}")

    model = ctx.main_model()
    conversion = convert(model)
    batch, seq = 1, 32
    inputs = make_inputs(batch, seq, model.config.vocab_size)
    with torch.no_grad():
        reference = model(**inputs, use_cache=False).loss.item()

    def compile_once(side):
        """Compile one side and run its first call: (compiled callable, seconds, loss, graph breaks)."""
        counters.clear()
        if side == "converted":
            compiled = torch.compile(conversion.module, fullgraph=True)
            call = lambda: compiled(**inputs)  # noqa: E731
        else:
            compiled = torch.compile(model)  # fullgraph=False: the eager model may break graphs
            call = lambda: compiled(**inputs, use_cache=False).loss  # noqa: E731
        start = time.perf_counter()
        with torch.no_grad():
            loss = call().item()
        return call, time.perf_counter() - start, loss, sum(counters["graph_break"].values())

    # Cold compiles (caches off, dynamo reset before each), in AB BA order when there are two of
    # each; the last two stay compiled for the steady-state comparison.
    order = ["converted", "eager"] if ctx.mode == "tiny" else ["converted", "eager", "eager", "converted"]
    times = {"converted": [], "eager": []}
    live, losses, breaks = {}, {}, {}
    for i, side in enumerate(order):
        if i < len(order) - 1:
            torch._dynamo.reset()
        try:
            live[side], seconds, losses[side], breaks[side] = compile_once(side)
        except Exception as e:
            if side == "converted":
                why = f"torch.compile(Conversion.module, fullgraph=True) failed: {_first_line(e)}"
                return [Result("compile_fullgraph", value=0.0, details={"error": why})] + \
                    [unavailable(k, why) for k in COMPILE_KEYS[1:]]
            why = f"torch.compile on eager transformers failed: {_first_line(e)}"
            return [Result("compile_fullgraph", value=1.0, details={"graph_breaks_converted": 0})] + \
                [unavailable(k, why) for k in COMPILE_KEYS[1:]]
        times[side].append(seconds)

    def run(side):
        def go():
            with torch.no_grad():
                live[side]()
        return go

    samples = interleaved({"converted": run("converted"), "eager": run("eager")}, **ctx.plan())
    common = {"model": ctx.main_name, "batch": batch, "seq": seq, "mode": "eval"}
    fx_rt = Figure("torch.compile(Conversion.module, fullgraph=True) forward", samples["converted"])
    base_rt = Figure("torch.compile(eager transformers) forward", samples["eager"])
    fx_ct = Figure("compile + first call, Conversion.module", times["converted"])
    base_ct = Figure("compile + first call, eager transformers", times["eager"])
    return [
        Result("compile_fullgraph", 1.0, details={**common, "graph_breaks_converted": breaks["converted"],
                                                  "graph_breaks_eager": breaks["eager"]}),
        Result("compile_time_converted_s", fx_ct.median, fx_ct, None, details=common),
        Result("compile_time_eager_s", base_ct.median, base_ct, None, details=common),
        Result("compile_time_ratio", fx_ct.median / base_ct.median, fx_ct, base_ct, details=common),
        Result("compile_runtime_ratio", fx_rt.median / base_rt.median, fx_rt, base_rt,
               details={**common, "loss_abs_diff_vs_uncompiled": {k: abs(v - reference) for k, v in losses.items()}}),
    ]


# --- pipeline balance ------------------------------------------------------------------------------

BALANCE_STAGES = 4
BALANCE_SIZES = {"tiny": dict(batch=2, encoder_length=32, decoder_length=8),
                 "small": dict(batch=4, encoder_length=256, decoder_length=32)}


def measure_balance(ctx) -> list[Result]:
    """Stage times of a split balanced by predicted time against one balanced by parameter bytes.

    Both splits of one converted model run stage by stage as a pipeline runs them
    (`fxconvert.balance.measure_stage_seconds`: forward on the previous stage's detached
    outputs, backward with the next stage's gradients), one round of each split in turn
    (AB BA ...). A stage's time is the median of its rounds.

    On one torch thread, whatever --threads says: each stage of a pipeline runs in a process of its
    own, and with 4 stages on a small machine each gets one core at most. (On a busy 2-core machine,
    2 threads per stage made these timings swing by a factor of ten from thread hand-offs alone.)
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure_balance(ctx)
    finally:
        torch.set_num_threads(threads)


def _measure_balance(ctx) -> list[Result]:
    from fxconvert.balance import measure_stage_seconds, real_inputs
    from fxconvert.families import input_specs
    from fxconvert.stages import split_stages

    model = ctx.main_model()
    conversion = convert(model)
    sizes = BALANCE_SIZES["tiny" if ctx.mode == "tiny" else "small"]
    splits = {b: split_stages(conversion, BALANCE_STAGES, balance=b, **sizes) for b in ("time", "params")}
    inputs = real_inputs(conversion.input_names, splits["time"].plan.sizes, vocab_size=model.config.vocab_size,
                         specs=input_specs(conversion.model_class))
    plan = ctx.plan()
    rounds = {b: [] for b in splits}  # per round: each stage's seconds
    for _ in range(max(plan["warmup"], 1)):  # untimed
        for b in splits:
            measure_stage_seconds(splits[b], inputs, repeats=1, warmup=0)
    for i in range(plan["min_reps"]):
        for b in (("time", "params") if i % 2 == 0 else ("params", "time")):
            rounds[b].append(measure_stage_seconds(splits[b], inputs, repeats=1, warmup=0))
    medians = {b: [statistics.median(r[s] for r in rounds[b]) for s in range(BALANCE_STAGES)] for b in splits}
    measured_share = [t / sum(medians["time"]) for t in medians["time"]]
    predicted_share = splits["time"].plan.shares
    slowest = max(range(BALANCE_STAGES), key=lambda s: medians["time"][s])
    details = {
        "model": ctx.main_name, **sizes, "stages": BALANCE_STAGES, "threads": torch.get_num_threads(),
        "rounds": plan["min_reps"],
        "blocks": {b: [spec.blocks for spec in splits[b].specs] for b in splits},
        "stage_seconds": medians,
        "predicted_stage_seconds": {b: [st.seconds for st in splits[b].plan.stages] for b in splits},
        "predicted_share_time": predicted_share, "measured_share_time": measured_share,
    }

    def bottleneck(b):
        return Figure(f"bottleneck stage fwd+bwd, balance={b!r}", [max(r) for r in rounds[b]])

    return [
        Result("balance_bottleneck_time_over_params", max(medians["time"]) / max(medians["params"]),
               bottleneck("time"), bottleneck("params"), details=details),
        Result("balance_imbalance_time", max(medians["time"]) / statistics.mean(medians["time"]),
               Figure(f"slowest stage ({slowest}), balance='time'", [r[slowest] for r in rounds["time"]]),
               Figure("mean stage, balance='time'", [statistics.mean(r) for r in rounds["time"]]), details=details),
        Result("balance_prediction_error", max(abs(p - m) for p, m in zip(predicted_share, measured_share)),
               details=details),
    ]


# --- pipeline training (torchrun) ----------------------------------------------------------------

# The shapes of the two pipeline-training measurements: every example has exactly these lengths
# (so no batch is padded and every step has the same shapes), and the model is built from T5Config.
PIPELINE_THROUGHPUT = dict(batch=32, microbatches=8, source_length=64, target_length=32, stages=2,
                           rounds=2, warmup_steps=1, timed_steps={"quick": 2, "full": 5})
PIPELINE_RSS = dict(batch=8, microbatches=2, source_length=64, target_length=32, stages=2,
                    config=dict(d_model=768, d_ff=3072, d_kv=64, num_heads=12, num_layers=5))

# Runs in each rank under torchrun: fxconvert.train's main, then the rank's own peak RSS into DIR.
_RANK_RSS = """
import json, os, resource, sys
from fxconvert.train import main
code = main(sys.argv[2:])
with open(os.path.join(sys.argv[1], "rank_" + os.environ.get("RANK", "0") + ".json"), "w") as f:
    json.dump({"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "exit": code}, f)
sys.exit(code)
"""

# The whole-model baseline: load the checkpoint, take one AdamW step on the first BATCH lines.
_WHOLE_MODEL_STEP = """
import json, sys, torch, transformers
checkpoint, data, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = [json.loads(line) for line in open(data)][:batch]
input_ids = torch.tensor([r["input_ids"] for r in rows])
labels = torch.tensor([r["labels"] for r in rows])
model = transformers.T5ForConditionalGeneration.from_pretrained(checkpoint).train()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels, use_cache=False).loss.backward()
optimizer.step()
"""

# Pipeline runs: one torch thread per process, loopback only, no rank variables inherited.
_ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error",
               **{name: None for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}}


def _torchrun(nproc, *args) -> list[str]:
    """torchrun on this machine alone: its store listens on a port chosen as it is bound (a port picked
    here and bound later could be taken in between), and the ranks meet at 127.0.0.1."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--local-addr", "127.0.0.1",
            "--nproc-per-node", str(nproc), *map(str, args)]


def _write_pretokenized(path, *, lines, source_length, target_length, vocab_size, seed=0):
    """Pre-tokenized JSONL, every line of the same lengths (ids 1.., never the pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    with open(path, "w") as f:
        for _ in range(lines):
            f.write(json.dumps({"input_ids": torch.randint(1, vocab_size, (source_length,), generator=g).tolist(),
                                "labels": torch.randint(1, vocab_size, (target_length,), generator=g).tolist()}) + "\n")


def _write_checkpoint(config, directory):
    """save_pretrained of a randomly initialised model; built and dropped here, outside any measured process."""
    model = build(config)
    model.save_pretrained(directory)
    del model
    gc.collect()


def _convert_stages(ctx, checkpoint, out, stages, *extra):
    """`python -m fxconvert CHECKPOINT --stages N --out OUT`; raises with the child's last line on failure."""
    run = run_child(CLI + [str(checkpoint), "--stages", str(stages), "--out", str(out), "--offline", "--no-validate",
                           "--force", "-q", *map(str, extra)], timeout_s=ctx.plan_dict["child_timeout_s"])
    if run.failure():
        raise RuntimeError(run.failure())


def _train_args(source, data, out, *, steps, batch, microbatches, source_length, target_length, schedule="gpipe"):
    return [str(a) for a in (source, "--data", data, "--out", out, "--steps", steps, "--batch", batch,
                             "--microbatches", microbatches, "--schedule", schedule, "--optimizer", "adamw",
                             "--lr", "1e-4", "--max-source-length", source_length, "--max-target-length",
                             target_length, "--device", "cpu", "--no-export", "--timeout", 120)]


def measure_pipeline_throughput(ctx) -> Result:
    """Training tokens/s of 2 pipeline ranks x 1 thread over 1 process x 1 thread, same launcher and batches.

    The baseline is `python -m fxconvert.train` with WORLD_SIZE=1 on a 1-stage conversion of the same
    checkpoint, with the same 8 microbatches, schedule, optimizer and batches: it runs the same code
    (data, microbatching, loss, optimizer, metrics) on one core, so the ratio is what pipelining over
    2 cores buys. (GPipe's bubble bounds it at 2 x 8 / (8 + 1) = 1.78 against exactly this baseline.)
    Each side's figure is the median tokens/s of `RUN/metrics.jsonl` over the steps after warm-up, of
    two runs per side in the order single, pipeline, pipeline, single: load that drifts during the
    measurement hits both sides alike.
    """
    key = "pipeline_train_throughput_2x1"
    why = cli_unavailable_reason()
    if why:
        return unavailable(key, why)
    sizes = PIPELINE_THROUGHPUT
    warmup, timed = sizes["warmup_steps"], sizes["timed_steps"][ctx.mode]
    timeout = ctx.plan_dict["child_timeout_s"] * 2
    with tempfile.TemporaryDirectory(prefix="fxbench-pipe-") as tmp:
        tmp = Path(tmp)
        config = small_config()
        _write_checkpoint(config, tmp / "ckpt")
        _write_pretokenized(tmp / "train.jsonl", lines=sizes["batch"] * 2, source_length=sizes["source_length"],
                            target_length=sizes["target_length"], vocab_size=config.vocab_size)
        # Stages balanced by predicted time at the microbatch shape the run trains on.
        balance = ["--seq-lengths", f"{sizes['source_length']},{sizes['target_length']}",
                   "--batch", sizes["batch"] // sizes["microbatches"]]
        for stages in (1, sizes["stages"]):
            _convert_stages(ctx, tmp / "ckpt", tmp / f"conv{stages}", stages, *balance)
        common = dict(steps=warmup + timed, batch=sizes["batch"], microbatches=sizes["microbatches"],
                      source_length=sizes["source_length"], target_length=sizes["target_length"])
        def argv(side, out):
            if side == "pipeline":
                return _torchrun(sizes["stages"], "-m", "fxconvert.train",
                                 *_train_args(tmp / f"conv{sizes['stages']}", tmp / "train.jsonl", out, **common))
            return [sys.executable, "-m", "fxconvert.train", *_train_args(tmp / "conv1", tmp / "train.jsonl", out,
                                                                         **common)]

        records, walls, cpus = ({"single": [], "pipeline": []} for _ in range(3))
        for i in range(sizes["rounds"]):
            for side in ("single", "pipeline") if i % 2 == 0 else ("pipeline", "single"):
                out = tmp / f"run_{side}_{i}"
                run = run_child(argv(side, out), cwd=tmp, timeout_s=timeout, env=_ONE_THREAD)
                if run.failure():
                    return unavailable(key, f"the {side} run failed: {run.failure()}")
                records[side].append([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()])
                walls[side].append(run.wall_s)
                cpus[side].append(run.cpu_s)
    tokens_per_s = {side: [r["tokens_per_s"] for recs in runs for r in recs[warmup:]] for side, runs in records.items()}
    fx = Figure(f"torchrun 2 ranks x 1 thread, {sizes['microbatches']} microbatches, gpipe", tokens_per_s["pipeline"],
                unit="tokens/s")
    base = Figure("1 process x 1 thread (WORLD_SIZE=1, 1 stage), same launcher and batches",
                  tokens_per_s["single"], unit="tokens/s")
    details = {"model": "t5-small shape (T5Config defaults, dropout 0.1)", "params": n_params(build(config, meta=True)),
               "batch": sizes["batch"], "microbatches": sizes["microbatches"],
               "source_length": sizes["source_length"], "target_length": sizes["target_length"],
               "schedule": "gpipe", "optimizer": "adamw", "rounds": sizes["rounds"], "warmup_steps": warmup,
               "timed_steps": timed, "ideal": 2 * sizes["microbatches"] / (sizes["microbatches"] + 1),
               # per side, per run: every step, warm-up included
               "step_seconds": {side: [[r["seconds"] for r in recs] for recs in runs] for side, runs in records.items()},
               "losses": {side: [[r["loss"] for r in recs] for recs in runs] for side, runs in records.items()},
               "wall_s": walls, "cpu_s": cpus,
               # CPU seconds over wall seconds of a whole run (start-up included): the cores a side got. Two
               # ranks on a machine that others keep busy get fewer than 2, and the ratio falls with them.
               "cores_used": {side: [c / w for c, w in zip(cpus[side], walls[side])] for side in walls}}
    return Result(key, fx.median / base.median, fx, base, details=details)


# The trainer's step against the plain loop a user would write: t5-small shape, every example of
# these lengths (no padding), 1 thread per process; the median step over the steps after warm-up.
TRAIN_STEP = dict(batch=8, source_length=128, target_length=32, rounds=2, warmup_steps=2,
                  timed_steps={"quick": 4, "full": 8})

# The baseline of train_step_over_eager_loop: transformers' T5 with AdamW on the same batches (step k takes
# lines k*BATCH.. of the file, as fxconvert.train does with --dp 1), each step timed from building the batch
# to the loss on the host, as fxconvert.train times its steps; the step seconds into OUT.
_EAGER_LOOP = """
import json, sys, time, torch, transformers
checkpoint, data, batch, steps, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
rows = [json.loads(line) for line in open(data)]
model = transformers.T5ForConditionalGeneration.from_pretrained(checkpoint).train()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
torch.manual_seed(0)
seconds = []
for step in range(steps):
    began = time.perf_counter()
    picked = rows[step * batch:(step + 1) * batch]
    input_ids = torch.tensor([r["input_ids"] for r in picked])
    labels = torch.tensor([r["labels"] for r in picked])
    optimizer.zero_grad(set_to_none=True)
    loss = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels, use_cache=False).loss
    loss.backward()
    optimizer.step()
    loss.item()
    seconds.append(time.perf_counter() - began)
json.dump(seconds, open(out, "w"))
"""


def measure_train_step(ctx) -> list[Result]:
    """`fxconvert.train` on 1 process over the eager loop (`_EAGER_LOOP`), and 2 stages on that process over 1.

    Three runs per round, each a fresh process with 1 thread: the eager loop, fxconvert.train
    on a 1-stage conversion (gpipe, 1 microbatch) and on a 2-stage one (`--virtual-stages 2`,
    interleaved-1f1b, 2 microbatches: the same arithmetic in two stages, as a rank of an
    interleaved pipeline runs it). Rounds alternate the order (ABC CBA) so drifting load hits
    every side alike. fxconvert's step seconds are RUN/metrics.jsonl's (batch to loss, the
    same span the eager loop times); each figure is the median over every run's steps after
    the warm-up.
    """
    keys = ("train_step_over_eager_loop", "virtual_stages_over_one")
    why = cli_unavailable_reason()
    if why:
        return [unavailable(k, why) for k in keys]
    sizes = TRAIN_STEP
    warmup, timed = sizes["warmup_steps"], sizes["timed_steps"].get(ctx.mode, 1)
    steps = warmup + timed
    timeout = ctx.plan_dict["child_timeout_s"] * 2
    with tempfile.TemporaryDirectory(prefix="fxbench-step-") as tmp:
        tmp = Path(tmp)
        config = small_config()
        _write_checkpoint(config, tmp / "ckpt")
        _write_pretokenized(tmp / "train.jsonl", lines=sizes["batch"] * steps, source_length=sizes["source_length"],
                            target_length=sizes["target_length"], vocab_size=config.vocab_size)
        for stages in (1, 2):
            _convert_stages(ctx, tmp / "ckpt", tmp / f"conv{stages}", stages)
        common = dict(steps=steps, batch=sizes["batch"], source_length=sizes["source_length"],
                      target_length=sizes["target_length"])
        argv = {
            "eager": lambda out: [sys.executable, "-c", _EAGER_LOOP, tmp / "ckpt", tmp / "train.jsonl",
                                  sizes["batch"], steps, out],
            "one": lambda out: [sys.executable, "-m", "fxconvert.train",
                                *_train_args(tmp / "conv1", tmp / "train.jsonl", out, microbatches=1, **common)],
            "two": lambda out: [sys.executable, "-m", "fxconvert.train", "--virtual-stages", "2",
                                *_train_args(tmp / "conv2", tmp / "train.jsonl", out, microbatches=2,
                                             schedule="interleaved-1f1b", **common)],
        }
        seconds = {side: [] for side in argv}
        for i in range(sizes["rounds"]):
            for side in list(argv) if i % 2 == 0 else list(argv)[::-1]:
                out = tmp / f"{side}_{i}"
                run = run_child([str(a) for a in argv[side](out)], cwd=tmp, timeout_s=timeout, env=_ONE_THREAD)
                if run.failure():
                    return [unavailable(k, f"the {side} run failed: {run.failure()}") for k in keys]
                if side == "eager":
                    seconds[side].append(json.loads(out.read_text()))
                else:
                    seconds[side].append([json.loads(line)["seconds"]
                                          for line in (out / "metrics.jsonl").read_text().splitlines()])
    timed_s = {side: [s for run in runs for s in run[warmup:]] for side, runs in seconds.items()}
    eager = Figure("eager transformers loop, AdamW, 1 thread", timed_s["eager"])
    one = Figure("python -m fxconvert.train, 1 stage, gpipe, 1 microbatch, 1 thread", timed_s["one"])
    two = Figure("python -m fxconvert.train, 2 stages on one rank (--virtual-stages 2), interleaved-1f1b, "
                 "2 microbatches, 1 thread", timed_s["two"])
    details = {"model": "t5-small shape (T5Config defaults, dropout 0.1)", "batch": sizes["batch"],
               "source_length": sizes["source_length"], "target_length": sizes["target_length"],
               "optimizer": "adamw", "rounds": sizes["rounds"], "warmup_steps": warmup, "timed_steps": timed,
               "step_seconds": seconds}  # per side, per run: every step, warm-up included
    return [Result(keys[0], one.median / eager.median, one, eager, details=details),
            Result(keys[1], two.median / one.median, two, one, details=dict(details))]


# zbv against 1f1b on the same 2 ranks: t5-small shape, 8 microbatches of 2 x 64/32 tokens, 1 thread per rank.
ZBV = dict(batch=16, microbatches=8, source_length=64, target_length=32, ranks=2, rounds=2, warmup_steps=1,
           timed_steps={"quick": 3, "full": 6})


def measure_zbv_over_1f1b(ctx) -> Result:
    """Training tokens/s of `zbv` (2 ranks x 2 stages in a V) over `1f1b` (2 ranks x 1 stage), same model and batches.

    Both sides are `torchrun --nproc-per-node 2 -m fxconvert.train` with 1 thread per rank, on a
    4-stage and a 2-stage conversion of one checkpoint, each balanced by predicted time at the
    microbatch shape; runs alternate 1f1b, zbv, zbv, 1f1b so drifting load hits both alike. Each
    side's figure is the median tokens/s of RUN/metrics.jsonl over the steps after warm-up. The
    ratio is reported, not judged: zbv fills 1F1B's bubble ((P-1)/(M+P-1) of the step here, 1/9)
    with weight gradients, but its weight half re-differentiates the stage's outputs (W costs
    about B + W, README "Schedules"), which a 2-core machine pays in full.
    """
    key = "zbv_over_1f1b"
    why = cli_unavailable_reason()
    if why:
        return unavailable(key, why)
    sizes = ZBV
    warmup, timed = sizes["warmup_steps"], sizes["timed_steps"].get(ctx.mode, 1)
    timeout = ctx.plan_dict["child_timeout_s"] * 2
    ranks = sizes["ranks"]
    with tempfile.TemporaryDirectory(prefix="fxbench-zbv-") as tmp:
        tmp = Path(tmp)
        config = small_config()
        _write_checkpoint(config, tmp / "ckpt")
        _write_pretokenized(tmp / "train.jsonl", lines=sizes["batch"] * (warmup + timed),
                            source_length=sizes["source_length"], target_length=sizes["target_length"],
                            vocab_size=config.vocab_size)
        balance = ["--seq-lengths", f"{sizes['source_length']},{sizes['target_length']}",
                   "--batch", sizes["batch"] // sizes["microbatches"]]
        for stages in (ranks, 2 * ranks):
            _convert_stages(ctx, tmp / "ckpt", tmp / f"conv{stages}", stages, *balance)
        common = dict(steps=warmup + timed, batch=sizes["batch"], microbatches=sizes["microbatches"],
                      source_length=sizes["source_length"], target_length=sizes["target_length"])
        argv = {"1f1b": lambda out: _torchrun(ranks, "-m", "fxconvert.train", *_train_args(
                    tmp / f"conv{ranks}", tmp / "train.jsonl", out, schedule="1f1b", **common)),
                "zbv": lambda out: _torchrun(ranks, "-m", "fxconvert.train", "--virtual-stages", 2, *_train_args(
                    tmp / f"conv{2 * ranks}", tmp / "train.jsonl", out, schedule="zbv", **common))}
        records, walls = {side: [] for side in argv}, {side: [] for side in argv}
        for i in range(sizes["rounds"]):
            for side in ("1f1b", "zbv") if i % 2 == 0 else ("zbv", "1f1b"):
                out = tmp / f"run_{side}_{i}"
                run = run_child(argv[side](out), cwd=tmp, timeout_s=timeout, env=_ONE_THREAD)
                if run.failure():
                    return unavailable(key, f"the {side} run failed: {run.failure()}")
                records[side].append([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()])
                walls[side].append(run.wall_s)
    tokens_per_s = {side: [r["tokens_per_s"] for recs in runs for r in recs[warmup:]] for side, runs in records.items()}
    zbv = Figure(f"torchrun {ranks} ranks x 2 stages (V), zbv, {sizes['microbatches']} microbatches, 1 thread per "
                 "rank", tokens_per_s["zbv"], unit="tokens/s")
    one = Figure(f"torchrun {ranks} ranks x 1 stage, 1f1b, same batches", tokens_per_s["1f1b"], unit="tokens/s")
    details = {"model": "t5-small shape (T5Config defaults, dropout 0.1)", "batch": sizes["batch"],
               "microbatches": sizes["microbatches"], "source_length": sizes["source_length"],
               "target_length": sizes["target_length"], "optimizer": "adamw", "rounds": sizes["rounds"],
               "warmup_steps": warmup, "timed_steps": timed, "wall_s": walls,
               # per side, per run: every step, warm-up included
               "step_seconds": {side: [[r["seconds"] for r in recs] for recs in runs] for side, runs in records.items()},
               "losses": {side: [[r["loss"] for r in recs] for recs in runs] for side, runs in records.items()}}
    return Result(key, zbv.median / one.median, zbv, one, details=details)


def _stage_bytes(directory) -> list[int]:
    """The parameter bytes of each stage of the split saved in `directory` (its pipeline.json)."""
    from fxconvert import manifest

    return [stage.parameter_bytes for stage in manifest.read(directory).stages]


def measure_pipeline_rss(ctx) -> Result:
    """Peak RSS of the larger of 2 pipeline ranks over one process that loads the whole model and steps.

    A ~107M-parameter T5 (d_model 768, 5+5 layers, vocab 32128), split into 2 stages by parameter
    bytes. Each rank runs `fxconvert.train`'s main under torchrun (one AdamW step on batch 8, 2
    microbatches) and then writes its own ru_maxrss; the baseline runs from_pretrained and one AdamW
    step on the same 8 examples, and its peak comes from os.wait4 (see `run_child`).
    """
    key = "pipeline_rank_peak_rss_ratio"
    why = cli_unavailable_reason()
    if why:
        return unavailable(key, why)
    sizes = PIPELINE_RSS
    timeout = ctx.plan_dict["child_timeout_s"] * 2
    with tempfile.TemporaryDirectory(prefix="fxbench-rss-") as tmp:
        tmp = Path(tmp)
        config = small_config(**sizes["config"])
        _write_checkpoint(config, tmp / "ckpt")
        _write_pretokenized(tmp / "train.jsonl", lines=sizes["batch"], source_length=sizes["source_length"],
                            target_length=sizes["target_length"], vocab_size=config.vocab_size)
        _convert_stages(ctx, tmp / "ckpt", tmp / "conv", sizes["stages"], "--balance", "params")
        stage_bytes = _stage_bytes(tmp / "conv")
        (tmp / "rank_rss.py").write_text(_RANK_RSS)
        (tmp / "ranks").mkdir()
        common = dict(steps=1, batch=sizes["batch"], microbatches=sizes["microbatches"],
                      source_length=sizes["source_length"], target_length=sizes["target_length"])
        argv = {"pipeline": _torchrun(sizes["stages"], tmp / "rank_rss.py", tmp / "ranks",
                                      *_train_args(tmp / "conv", tmp / "train.jsonl", tmp / "run", **common)),
                "whole": [sys.executable, "-c", _WHOLE_MODEL_STEP, str(tmp / "ckpt"), str(tmp / "train.jsonl"),
                          str(sizes["batch"])]}
        runs = {}
        for side in ("whole", "pipeline"):
            runs[side] = run_child(argv[side], cwd=tmp, timeout_s=timeout, env=_ONE_THREAD)
            if runs[side].failure():
                return unavailable(key, f"the {side} run failed: {runs[side].failure()}")
        ranks = [json.loads((tmp / "ranks" / f"rank_{r}.json").read_text())["maxrss_kb"] / 1024.0
                 for r in range(sizes["stages"])]
    fx = Figure(f"larger of {sizes['stages']} ranks (torchrun, fxconvert.train, 1 AdamW step) peak RSS", [max(ranks)],
                unit="MB")
    base = Figure("one process: from_pretrained + 1 AdamW step peak RSS", [runs["whole"].maxrss_mb], unit="MB")
    total = sum(p.numel() * p.element_size() for p in build(config, meta=True).parameters())
    details = {"model": "T5 d_model 768, d_ff 3072, 12 heads, 5+5 layers, vocab 32128",
               "params": n_params(build(config, meta=True)), "batch": sizes["batch"],
               "microbatches": sizes["microbatches"], "source_length": sizes["source_length"],
               "target_length": sizes["target_length"], "balance": "params",
               "rank_peak_rss_mb": ranks, "stage_parameter_mb": [b / 2 ** 20 for b in stage_bytes],
               # weights + gradients + 2 AdamW moments scale with the parameters a process holds
               "parameter_share_of_larger_stage": max(stage_bytes) / total,
               "torchrun_tree_peak_rss_mb": runs["pipeline"].maxrss_mb,
               "wall_s": {side: r.wall_s for side, r in runs.items()}}
    return Result(key, fx.median / base.median, fx, base, details=details)


# --- streamed data: a rank's memory against the file's length ----------------------------------------

# Lines of the small and the large file, their lengths (pre-tokenized), and the batches each run reads.
DATA_RSS = dict(lines=(2_000, 200_000), source_length=64, target_length=16, vocab_size=32128, batch=8, batches=50)

# What a rank that reads the data does with it (`fxconvert.training.dataset`): the checking pass, then batches.
_DATA_LOAD = """
import sys
from fxconvert.objectives import SEQ2SEQ
from fxconvert.training.data import load_jsonl
from fxconvert.training.dataset import Data
path, vocab, batch, batches = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
data = Data(load_jsonl(path, vocab_size=vocab), {"pad_token_id": 0, "decoder_start_token_id": 0}, SEQ2SEQ,
            batch_size=batch)
for k in range(0, batches * 997, 997):  # batches spread over the file
    data.batch(k)
    data.tokens(k)
print(len(data))
"""


def _write_lines_fast(path, *, lines, source_length, target_length, vocab_size, seed=0):
    """Pre-tokenized JSONL of `lines` lines of the given lengths, ids drawn at once (a 200k-line file in seconds)."""
    g = torch.Generator().manual_seed(seed)
    sources = torch.randint(1, vocab_size, (lines, source_length), generator=g).tolist()
    targets = torch.randint(1, vocab_size, (lines, target_length), generator=g).tolist()
    with open(path, "w") as f:
        for source, target in zip(sources, targets):
            f.write(json.dumps({"input_ids": source, "labels": target}) + "\n")


def measure_data_rss(ctx) -> Result:
    """Peak RSS of a rank's data loading for a 200k-line file over a 2k-line file (same lines, same batches read).

    Each side runs in its own process (`run_child`: its own peak, from os.wait4): the checking pass over
    the file and `DATA_RSS["batches"]` batches read from it, as the first and last stages do. The rank
    keeps 8 bytes a line, so the ratio stays near 1 (the process's imports dominate); a rank that held
    the examples grew with the file.
    """
    key = "data_rss_ratio"
    sizes = DATA_RSS
    small, large = sizes["lines"]
    with tempfile.TemporaryDirectory(prefix="fxbench-data-") as tmp:
        tmp = Path(tmp)
        for n in (small, large):
            _write_lines_fast(tmp / f"{n}.jsonl", lines=n, source_length=sizes["source_length"],
                              target_length=sizes["target_length"], vocab_size=sizes["vocab_size"])
        argv = {n: [sys.executable, "-c", _DATA_LOAD, str(tmp / f"{n}.jsonl"), str(sizes["vocab_size"]),
                    str(sizes["batch"]), str(sizes["batches"])] for n in (small, large)}
        runs = {small: [], large: []}
        for i in range(1 + ctx.plan_subprocess()):  # a warm-up round (page cache), then AB BA ...
            for n in (small, large) if i % 2 == 0 else (large, small):
                run = run_child(argv[n], cwd=tmp, timeout_s=ctx.plan_dict["child_timeout_s"], env=_ONE_THREAD)
                if run.failure():
                    return unavailable(key, f"the {n}-line run failed: {run.failure()}")
                if run.stdout.split() != [str(n)]:
                    return unavailable(key, f"the {n}-line run read {run.stdout.strip()!r} lines, not {n}")
                if i > 0:
                    runs[n].append(run)
        file_mb = {n: (tmp / f"{n}.jsonl").stat().st_size / 2 ** 20 for n in (small, large)}
    fx = Figure(f"{large:,}-line file: check + {sizes['batches']} batches, peak RSS", [r.maxrss_mb for r in runs[large]],
                unit="MB")
    base = Figure(f"{small:,}-line file, the same, peak RSS", [r.maxrss_mb for r in runs[small]], unit="MB")
    details = {"lines": [small, large], "file_mb": [file_mb[small], file_mb[large]],
               "source_length": sizes["source_length"], "target_length": sizes["target_length"],
               "wall_s": {str(n): statistics.median(r.wall_s for r in runs[n]) for n in (small, large)}}
    return Result(key, fx.median / base.median, fx, base, details=details)


# --- the registry -----------------------------------------------------------------------------------


# --- the memory plan against a measured step (torchrun) -------------------------------------------

# A ~107M-parameter T5 (PIPELINE_RSS's shape), 2 stages, 1F1B, 4 microbatches of 1 x 256/64 tokens.
PLAN_MEMORY = dict(microbatch=1, microbatches=4, source_length=256, target_length=64, stages=2, steps=5,
                   config=PIPELINE_RSS["config"])


def measure_plan_memory(ctx) -> list[Result]:
    """Each stage's predicted peak against `fxconvert.train --measure-memory`, with recompute none and full.

    For each recompute setting the checkpoint is converted with a plan for exactly the shapes the run
    trains at (`--seq-lengths`, `--batch` per microbatch, `--microbatches`, `--schedule`, `--recompute`),
    and 2 ranks train 5 AdamW steps with `--measure-memory` (step 2 is measured). The error is the largest
    |predicted - measured| / measured over the stages and both settings; the activation memory of a stage
    is what its saved activations hold (the record's `saved_activation_bytes`: the bytes the measured step's
    forwards left live when its first backward began), summed over the stages; the rest of the peak
    (`activation_bytes`: the peak less parameters, gradients and optimizer state, mostly backward's working
    memory, which recompute does not change) goes into the details. The step time is the median of steps 3 to 5
    (after the warm-up and the profiled step), from metrics.jsonl.
    """
    keys = ("plan_memory_error", "recompute_activation_ratio", "recompute_time_ratio")
    why = cli_unavailable_reason()
    if why:
        return [unavailable(k, why) for k in keys]
    sizes = PLAN_MEMORY
    timeout = ctx.plan_dict["child_timeout_s"] * 2
    records, seconds = {}, {}
    with tempfile.TemporaryDirectory(prefix="fxbench-plan-") as tmp:
        tmp = Path(tmp)
        config = small_config(**sizes["config"])
        _write_checkpoint(config, tmp / "ckpt")
        batch = sizes["microbatch"] * sizes["microbatches"]
        _write_pretokenized(tmp / "train.jsonl", lines=batch * sizes["steps"], source_length=sizes["source_length"],
                            target_length=sizes["target_length"], vocab_size=config.vocab_size)
        for recompute in ("none", "full"):
            conv, out = tmp / f"conv_{recompute}", tmp / f"run_{recompute}"
            _convert_stages(ctx, tmp / "ckpt", conv, sizes["stages"], "--seq-lengths",
                            f"{sizes['source_length']},{sizes['target_length']}", "--batch", sizes["microbatch"],
                            "--microbatches", sizes["microbatches"], "--schedule", "1f1b", "--recompute", recompute)
            argv = _torchrun(sizes["stages"], "-m", "fxconvert.train", *_train_args(
                conv, tmp / "train.jsonl", out, steps=sizes["steps"], batch=batch, microbatches=sizes["microbatches"],
                source_length=sizes["source_length"], target_length=sizes["target_length"], schedule="1f1b"),
                "--recompute", recompute, "--measure-memory")
            run = run_child(argv, cwd=tmp, timeout_s=timeout, env=_ONE_THREAD)
            if run.failure():
                return [unavailable(k, f"the recompute {recompute} run failed: {run.failure()}") for k in keys]
            lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            records[recompute] = sorted((r for r in lines if r.get("record") == "memory"), key=lambda r: r["rank"])
            steps = [r["seconds"] for r in lines if r.get("record") is None]
            seconds[recompute] = statistics.median(steps[2:])  # after the warm-up and the profiled step
    errors = {rec: [(r["predicted_peak_bytes"] - r["peak_bytes"]) / r["peak_bytes"] for r in rs]
              for rec, rs in records.items()}
    if any(r["saved_activation_bytes"] is None for rs in records.values() for r in rs):
        return [unavailable(k, "a memory record has no saved_activation_bytes (no backward op profiled)")
                for k in keys]
    activations = {rec: sum(r["saved_activation_bytes"] for r in rs) for rec, rs in records.items()}
    details = {"model": "T5 of ~107M parameters (d_model 768, 5+5 layers, vocab 32128)", **{
        k: v for k, v in sizes.items() if k != "config"}, "schedule": "1f1b", "optimizer": "adamw",
        "errors": errors, "measured_peak_bytes": {rec: [r["peak_bytes"] for r in rs] for rec, rs in records.items()},
        "predicted_peak_bytes": {rec: [r["predicted_peak_bytes"] for r in rs] for rec, rs in records.items()},
        "activation_bytes": {rec: [r["activation_bytes"] for r in rs] for rec, rs in records.items()},
        "saved_activation_bytes": {rec: [r["saved_activation_bytes"] for r in rs] for rec, rs in records.items()},
        "step_seconds": seconds}
    act = {rec: Figure(f"saved activation bytes, recompute {rec}", [float(v)], unit="B")
           for rec, v in activations.items()}
    time_ = {rec: Figure(f"median step seconds (steps 3-{sizes['steps']}), recompute {rec}", [v])
             for rec, v in seconds.items()}
    return [
        Result("plan_memory_error", max(abs(e) for es in errors.values() for e in es), details=details),
        Result("recompute_activation_ratio", activations["full"] / activations["none"], act["full"], act["none"],
               details=details),
        Result("recompute_time_ratio", seconds["full"] / seconds["none"], time_["full"], time_["none"],
               details=details),
    ]


def measure_adafactor_state(ctx) -> Result:
    """Optimizer state bytes under Adafactor over AdamW for t5-small (tiny T5 under --tiny), by
    `fxconvert.optimizers`' rules; each rule is checked against the state a real optimizer step leaves
    on the same model (a mismatch makes the figure unavailable)."""
    from fxconvert import optimizers
    from fxconvert.training.memory import storage_bytes

    model = build(tiny_config() if ctx.mode == "tiny" else small_config()).train()
    params = [p for p in model.parameters() if p.requires_grad]
    predicted, real = {}, {}
    for name in ("adamw", "adafactor"):
        predicted[name] = optimizers.get(name).bytes_for(params)
        optimizer = optimizers.get(name).build(params, lr=1e-4)
        for p in params:
            p.grad = torch.ones_like(p)
        optimizer.step()
        real[name] = storage_bytes(v for state in optimizer.state.values() for v in state.values())
        del optimizer
        for p in params:
            p.grad = None
    details = {"model": ctx.main_name, "parameters": n_params(model), "predicted_bytes": predicted, "real_bytes": real}
    if predicted != real:
        return unavailable("adafactor_state_ratio", f"the state rules disagree with a real step: {predicted} "
                                                    f"predicted, {real} allocated", **details)
    return Result("adafactor_state_ratio", predicted["adafactor"] / predicted["adamw"],
                  Figure("Adafactor state", [float(predicted["adafactor"])], unit="B"),
                  Figure("AdamW state", [float(predicted["adamw"])], unit="B"), details=details)


@dataclass(frozen=True)
class Measurement:
    """One figure: its key, target (None: reported without one), unit, what it compares, and the function that
    measures it. A function that measures several keys is registered once per key, consecutively, and called
    once for them all (it returns a list of Results)."""

    key: str
    target: float | None
    unit: str
    what: str
    measure: Callable
    subprocess: bool = False
    comparison: str = "<="  # ">=": the value must reach the target (a speed-up)


def _m(key, target, unit, what, measure, **kw):
    return Measurement(key, target, unit, what, measure, **kw)


# In the order they run (cli_over_import measures the import-only RSS that t5_11b_meta_peak_rss_mb shows).
REGISTRY = [
    _m("convert_over_export", 0.10, "ratio", "fxconvert.convert vs torch.export.export(strict=False), t5-small shape",
       measure_convert_over_export),
    _m("scaling_48_over_6", 9.0, "ratio", "convert time, 48 vs 6 layers (d_model 512, meta device)", measure_scaling),
    _m("runtime_overhead_tiny", 0.60, "ratio", "eval forward, tiny T5 (d_model 64, 2+2 layers), 1x8", measure_runtime),
    _m("runtime_eval_1x32", 0.95, "ratio", "eval forward, t5-small shape, 1x32", measure_runtime),
    _m("runtime_eval_8x128", 1.02, "ratio", "eval forward, t5-small shape, 8x128", measure_runtime),
    _m("runtime_train_1x32", 0.95, "ratio", "train forward + backward, t5-small shape, 1x32", measure_runtime),
    _m("runtime_train_8x128", 1.02, "ratio", "train forward + backward, t5-small shape, 8x128", measure_runtime),
    _m("convert_over_export_gpt2", 0.10, "ratio", "fxconvert.convert vs torch.export.export(strict=False), gpt2 shape",
       measure_convert_over_export_gpt2),
    _m("runtime_overhead_tiny_gpt2", 0.60, "ratio", "eval forward, tiny GPT-2 (n_embd 64, 2 layers), 1x8",
       measure_runtime_gpt2),
    _m("runtime_eval_1x32_gpt2", 0.95, "ratio", "eval forward, gpt2 shape, 1x32", measure_runtime_gpt2),
    _m("runtime_eval_8x128_gpt2", 1.02, "ratio", "eval forward, gpt2 shape, 8x128", measure_runtime_gpt2),
    _m("runtime_train_1x32_gpt2", 0.95, "ratio", "train forward + backward, gpt2 shape, 1x32", measure_runtime_gpt2),
    _m("runtime_train_8x128_gpt2", 1.02, "ratio", "train forward + backward, gpt2 shape, 8x128",
       measure_runtime_gpt2),
    _m("balance_bottleneck_time_over_params", 0.65, "ratio",
       "bottleneck stage fwd+bwd time, balance='time' vs 'params'; t5-small shape, 4 stages, encoder 256 / "
       "decoder 32 tokens, batch 4", measure_balance),
    _m("balance_imbalance_time", 1.15, "ratio", "slowest stage time over the mean stage time, balance='time'",
       measure_balance),
    _m("balance_prediction_error", 0.08, "share",
       "largest gap between a stage's predicted and measured share of the total time, balance='time'",
       measure_balance),
    _m("cli_over_import", 1.5, "ratio", "`python -m fxconvert t5-small --offline --no-validate` vs importing torch + T5",
       measure_cli_over_import, subprocess=True),
    _m("t5_11b_meta_peak_rss_mb", 1500.0, "MB", "peak RSS of `python -m fxconvert t5-11b --offline`",
       measure_t5_11b_rss, subprocess=True),
    _m("pipeline_train_throughput_2x1", 1.5, "ratio",
       "training tokens/s, `torchrun --nproc-per-node 2 -m fxconvert.train` (2 stages, 1 thread per rank, gpipe, "
       "8 microbatches) over the same launcher with WORLD_SIZE=1 on a 1-stage conversion (1 thread): same code, "
       "batches and microbatches, so the ratio is what pipelining buys (GPipe's ideal: 1.78); t5-small shape, "
       "random weights, batch 32 x 64/32 tokens, AdamW; median over the steps after warm-up",
       measure_pipeline_throughput, subprocess=True, comparison=">="),
    _m("train_step_over_eager_loop", 1.03, "ratio",
       "step time, `python -m fxconvert.train` (1 process, 1 stage, gpipe, 1 microbatch) over a plain eager "
       "transformers loop on the same batches; t5-small shape, random weights, batch 8 x 128/32 tokens, AdamW, "
       "1 thread; median over the steps after warm-up", measure_train_step, subprocess=True),
    _m("virtual_stages_over_one", 1.10, "ratio",
       "step time, the same run with 2 stages on its one rank (--virtual-stages 2, interleaved-1f1b, 2 "
       "microbatches) over 1 stage", measure_train_step, subprocess=True),
    _m("pipeline_rank_peak_rss_ratio", 0.75, "ratio",
       "peak RSS of the larger of 2 pipeline ranks (fxconvert.train, 1 AdamW step) over one process that runs "
       "from_pretrained and 1 AdamW step; T5 of 107M parameters (d_model 768, 5+5 layers, vocab 32128), "
       "stages balanced by parameters, batch 8 x 64/32 tokens",
       measure_pipeline_rss, subprocess=True),
    _m("plan_memory_error", 0.10, "share",
       "largest |predicted - measured| / measured peak memory over the stages (fxconvert.train --measure-memory), "
       "recompute none and full; T5 of 107M parameters, 2 stages, 1f1b, 4 microbatches of 1 x 256/64 tokens",
       measure_plan_memory, subprocess=True),
    _m("recompute_activation_ratio", 0.35, "ratio",
       "measured activation memory (the bytes the forwards left live when the step's first backward began: the "
       "saved activations of the microbatches in flight and their outputs), recompute full over none, same runs",
       measure_plan_memory, subprocess=True),
    _m("recompute_time_ratio", 1.40, "ratio", "median step time (steps 3-5, unprofiled), recompute full over none, same runs",
       measure_plan_memory, subprocess=True),
    _m("adafactor_state_ratio", 0.05, "ratio",
       "optimizer state bytes, Adafactor over AdamW, t5-small (fxconvert.optimizers, checked against a real step)",
       measure_adafactor_state),
    # The Llama-style family: a decoder-only model of about 100M parameters.
    _m("convert_over_export_llama", 0.10, "ratio",
       "fxconvert.convert vs torch.export.export(strict=False), Llama of ~100M parameters (hidden 768, 8 layers, "
       "12 heads on 4 kv heads, vocab 32000)", measure_convert_over_export_llama),
    _m("runtime_eval_1x32_llama", 0.95, "ratio", "eval forward, Llama ~100M, 1x32", measure_runtime_llama),
    _m("runtime_eval_8x128_llama", 1.02, "ratio", "eval forward, Llama ~100M, 8x128", measure_runtime_llama),
    _m("runtime_train_1x32_llama", 0.95, "ratio", "train forward + backward, Llama ~100M, 1x32",
       measure_runtime_llama),
    _m("runtime_train_8x128_llama", 1.02, "ratio", "train forward + backward, Llama ~100M, 8x128",
       measure_runtime_llama),
    _m("data_rss_ratio", 1.10, "ratio",
       "peak RSS of a rank's data loading (the checking pass over a pre-tokenized JSONL of 64/16 ids a line, then 50 "
       "batches of 8 read from it) for a 200k-line file over a 2k-line file: a rank keeps 8 bytes a line",
       measure_data_rss, subprocess=True),
    # Reported, no target (on a quiet machine the aim is >= 1.05).
    _m("zbv_over_1f1b", None, "ratio",
       "training tokens/s, zbv on 2 ranks x 2 stages over 1f1b on 2 ranks x 1 stage, 8 microbatches",
       measure_zbv_over_1f1b, subprocess=True, comparison=">="),
    # Reported with --compile; no targets.
    *(_m(k, None, "", "", measure_compile) for k in ("compile_fullgraph", "compile_time_converted_s",
                                                       "compile_time_eager_s", "compile_time_ratio",
                                                       "compile_runtime_ratio")),
]
TARGETS = {m.key: (m.target, m.unit, m.what) for m in REGISTRY if m.target is not None}
COMPARISONS = {m.key: m.comparison for m in REGISTRY}
RUNTIME_KEYS = [m.key for m in REGISTRY if m.measure is measure_runtime]
COMPILE_KEYS = tuple(m.key for m in REGISTRY if m.measure is measure_compile)


# --- the run ----------------------------------------------------------------------------------------


class Context:
    def __init__(self, args):
        self.mode = "tiny" if args.tiny else "quick" if args.quick else "full"
        self.plan_dict = dict(MODES[self.mode])
        if args.reps:
            self.plan_dict.update(min_reps=args.reps, max_reps=args.reps, sub_reps=args.reps, rss_reps=args.reps)
        self.only = [s for s in (args.only or "").split(",") if s]
        self.compile = args.compile
        self.main_name = "tiny" if self.mode == "tiny" else "t5-small"
        self.scaling_layers = (1, 8) if self.mode == "tiny" else (6, 48)
        self.import_rss_mb = None
        self._main = None
        self._gpt2 = None
        self._llama = None

    def plan(self, heavy=False):
        p = self.plan_dict
        if heavy:  # a conversion takes ~0.1-5 s; a few rounds suffice
            return dict(warmup=p["warmup"], min_reps=p["min_reps"], max_reps=min(p["max_reps"], p["min_reps"] + 2),
                        budget_s=p["budget_s"])
        return dict(warmup=p["warmup"], min_reps=p["min_reps"], max_reps=p["max_reps"], budget_s=p["budget_s"])

    def plan_subprocess(self):
        return self.plan_dict["sub_reps"]

    def main_model(self):
        """t5-small's shape (tiny under --tiny), random weights, eval mode; built once."""
        if self._main is None:
            self._main = build(tiny_config() if self.mode == "tiny" else small_config())
        return self._main

    def gpt2_model(self):
        """gpt2's shape (tiny under --tiny), random weights, eval mode; built once."""
        if self._gpt2 is None:
            self._gpt2 = build_gpt2(gpt2_config(tiny=self.mode == "tiny"))
        return self._gpt2

    def llama_model(self):
        """The ~100M-parameter Llama (tiny under --tiny), random weights, eval mode; built once."""
        if self._llama is None:
            self._llama = build_llama(llama_config(tiny=self.mode == "tiny"))
        return self._llama

    def name_of(self, model) -> str:
        if isinstance(model, transformers.LlamaForCausalLM):
            return "tiny Llama" if self.mode == "tiny" else "Llama ~100M"
        if isinstance(model, transformers.GPT2LMHeadModel):
            return "tiny GPT-2" if self.mode == "tiny" else "gpt2"
        return self.main_name

    def selected(self, key) -> bool:
        return not self.only or any(s in key for s in self.only)

    def guard(self, key, fn):
        try:
            return fn()
        except Exception as e:
            traceback.print_exc()
            return unavailable(key, f"the measurement crashed: {_first_line(e)}")


def run_all(ctx) -> list[Result]:
    results = []

    def add(keys, fn, *, subprocess_needed=False):
        wanted = [k for k in keys if ctx.selected(k)]
        if not wanted:
            results.extend(Result(k, unavailable="skipped: not selected (--only)") for k in keys)
            return
        if subprocess_needed and not ctx.plan_dict["subprocess"]:
            results.extend(Result(k, unavailable=f"skipped: subprocess measurements are off in --{ctx.mode} mode")
                           for k in keys)
            return
        _log(f"measuring {', '.join(wanted)} ...")
        start = time.perf_counter()
        try:
            out = fn(ctx)
        except Exception as e:
            traceback.print_exc()
            out = [unavailable(k, f"the measurement crashed: {_first_line(e)}") for k in keys]
        out = out if isinstance(out, list) else [out]
        load = _loadavg()
        for r in out:
            r.details.setdefault("loadavg_1min_after", load[0] if load else None)
        got = {r.key for r in out}
        out += [Result(k, unavailable="skipped: not selected (--only)") for k in keys if k not in got]
        results.extend(out)
        _log(f"  ... {time.perf_counter() - start:.1f} s")

    # one call per function, for the keys it measures, in the registry's order
    for fn, group in itertools.groupby(REGISTRY, key=lambda m: m.measure):
        group = list(group)
        keys = [m.key for m in group]
        if fn is measure_compile and not ctx.compile:
            results.extend(fn(ctx))  # "skipped: pass --compile"
            continue
        add(keys, fn, subprocess_needed=group[0].subprocess)
    order = [m.key for m in REGISTRY]
    return sorted(results, key=lambda r: order.index(r.key))


def machine_info():
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": _mem_gb(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import fxconvert

        info["fxconvert"] = fxconvert.__version__
    except Exception as e:  # pragma: no cover
        info["fxconvert"] = f"import failed: {_first_line(e)}"
    commit = _git_commit()
    if commit:
        info["commit"] = commit
    return info


def _cpu_model():
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _mem_gb():
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 ** 2, 1)
    return None


def _git_commit():
    """HEAD's commit, read from .git without running git (the tree may have local changes)."""
    with contextlib.suppress(OSError):
        head = (REPO / ".git" / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head[:12]
        ref = head[5:]
        path = REPO / ".git" / ref
        if path.exists():
            return path.read_text().strip()[:12]
        packed = REPO / ".git" / "packed-refs"
        if packed.exists():
            for line in packed.read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split()[0][:12]
    return None


def _loadavg():
    with contextlib.suppress(OSError):
        return list(os.getloadavg())
    return None


# --- output ------------------------------------------------------------------------------------


def render_markdown(report) -> str:
    m = report["machine"]
    lines = [
        *(["**--tiny smoke run: tiny models, one repetition, no warm-up; the figures mean nothing.**", ""]
          if report["mode"] == "tiny" else []),
        f"Run {report['started']} ({report['mode']} mode, {report['wall_s']:.0f} s), "
        f"`{report['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['usable_cpus']} usable CPUs, {m['memory_gb']} GB RAM; {m['platform']}; "
        f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, fxconvert {m['fxconvert']}"
        + (f" (commit {m['commit']}, working tree as run)" if m.get("commit") else "")
        + f"; torch threads {m['torch_threads']}; load average at start / end: "
        + f"{_fmt_load(report['loadavg_start'])} / {_fmt_load(report['loadavg_end'])}",
        *(["", f"**Warning: the machine was busy during this run (1-minute load average up to "
             f"{_max_load(report):.1f} on {m['usable_cpus']} CPUs; `loadavg_1min_after` in the JSON says when); "
             "multi-threaded timings suffer most. Rerun on a quiet machine before trusting a ratio near its "
             "target.**"] if _max_load(report) > (m["usable_cpus"] or 1) else []),
        "",
        "| Measurement | fxconvert | Baseline | Value | Target | Result |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for key, r in report["results"].items():
        fx = r.get("fxconvert")
        base = r.get("baseline")
        fx_text = f"{fx['label']}: {_fmt(fx['median'], fx['unit'])} (n={fx['n']})" if fx else "-"
        base_text = f"{base['label']}: {_fmt(base['median'], base['unit'])} (n={base['n']})" if base else "-"
        if key == "t5_11b_meta_peak_rss_mb" and r["details"].get("import_only_peak_rss_mb"):
            base_text = f"(absolute target; importing torch + T5 alone peaks at " \
                        f"{r['details']['import_only_peak_rss_mb']:.0f} MB)"
        if r["status"] in ("unavailable", "skipped"):
            value = r["reason"]
        else:
            value = _fmt(r["value"], r.get("unit", "ratio"))
            if key == "compile_fullgraph":
                value = "yes (no graph break)" if r["value"] else "no"
            elif key.endswith("_s"):
                value = _fmt(r["value"], "s")
        target = f"{r.get('comparison', '<=')} {r['target']:g}" + (" MB" if r.get("unit") == "MB" else "") \
            if "target" in r else "-"
        status = {"pass": "PASS", "fail": "**FAIL**", "info": "-"}.get(r["status"], r["status"])
        lines.append(f"| `{key}` | {fx_text} | {base_text} | {value} | {target} | {status} |")
    targets = {k: r for k, r in report["results"].items() if k in TARGETS}
    passed = sum(r["status"] == "pass" for r in targets.values())
    failed = [k for k, r in report["results"].items() if r["status"] == "fail"]
    missing = [k for k, r in targets.items() if r["status"] == "unavailable"]
    lines += ["", f"{passed} of {len(TARGETS)} targets pass"
              + (f"; missed: {', '.join(failed)}" if failed else "")
              + (f"; unavailable: {', '.join(missing)}" if missing else "") + "."]
    notes = _detail_notes(report["results"])
    if notes:
        lines += ["", "Details:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _max_load(report) -> float:
    """The highest 1-minute load average seen: at the start, after each measurement, at the end."""
    loads = [load[0] for load in (report["loadavg_start"], report["loadavg_end"]) if load]
    loads += [r["details"].get("loadavg_1min_after") or 0 for r in report["results"].values()]
    return max(loads, default=0.0)


def _fmt_load(load):
    return "?" if not load else ", ".join(f"{x:.1f}" for x in load)


def _detail_notes(results) -> list[str]:
    notes = []
    r = results.get("convert_over_export", {})
    if r.get("status") in ("pass", "fail"):
        ph = r["details"]["fxconvert_phases_median_s"]
        notes.append(f"convert ({r['details']['model']}, {r['details']['params'] / 1e6:.1f}M params): "
                     + ", ".join(f"{k} {_fmt(v, 's')}" for k, v in ph.items()) + " (medians)")
    r = results.get("scaling_48_over_6", {})
    if r.get("status") in ("pass", "fail"):
        d = r["details"]
        notes.append("convert per layer: " + ", ".join(f"{L} layers {ms:.0f} ms" for L, ms in d["per_layer_ms"].items())
                     + "; phases " + "; ".join(f"{L} layers: " + ", ".join(f"{k} {_fmt(v, 's')}" for k, v in p.items())
                                               for L, p in d["fxconvert_phases_median_s"].items()))
    mins = {k: r["fxconvert"]["min"] / r["baseline"]["min"] for k, r in results.items()
            if r.get("status") in ("pass", "fail") and r.get("unit") == "ratio" and r.get("comparison") == "<="
            and r["fxconvert"]["n"] > 1}
    if mins:
        notes.append("ratios of the fastest repetitions (less sensitive to load than the medians): "
                     + ", ".join(f"{k} {v:.3g}" for k, v in mins.items()))
    diffs = {k: r["details"]["loss_abs_diff"] for k, r in results.items()
             if k.startswith("runtime_") and r.get("status") in ("pass", "fail")}
    if diffs:
        notes.append("|loss(eager) - loss(converted)|, same inputs and seed: "
                     + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    r = results.get("cli_over_import", {})
    if r.get("details", {}).get("cli_peak_rss_mb"):
        notes.append(f"peak RSS: CLI t5-small {r['details']['cli_peak_rss_mb']:.0f} MB, "
                     f"import-only baseline {r['details']['import_peak_rss_mb']:.0f} MB")
    r = results.get("t5_11b_meta_peak_rss_mb", {})
    if r.get("status") in ("pass", "fail"):
        notes.append(f"t5-11b meta CLI run: {r['details']['wall_s']:.1f} s wall")
    r = results.get("pipeline_train_throughput_2x1", {})
    if r.get("status") in ("pass", "fail"):
        d = r["details"]
        timed = {side: statistics.median(s for sec in runs for s in sec[d["warmup_steps"]:])
                 for side, runs in d["step_seconds"].items()}
        notes.append(f"pipeline training, {d['batch']} x {d['source_length']}/{d['target_length']} tokens, "
                     f"{d['microbatches']} microbatches: median step {_fmt(timed['single'], 's')} in one process, "
                     f"{_fmt(timed['pipeline'], 's')} on 2 ranks ({d['rounds']} runs per side in the order AB BA, "
                     f"{d['timed_steps']} steps each after {d['warmup_steps']} warm-up); GPipe's ideal ratio "
                     f"{d['ideal']:.2f}"
                     + ("; cores used (CPU time / wall time of a whole run): " + ", ".join(
                         f"{side} " + " / ".join(f"{c:.2f}" for c in d["cores_used"][side]) for side in ("single", "pipeline"))
                        if "cores_used" in d else ""))
    r = results.get("pipeline_rank_peak_rss_ratio", {})
    if r.get("status") in ("pass", "fail"):
        d = r["details"]
        notes.append(f"pipeline ranks' peak RSS ({d['params'] / 1e6:.1f}M-parameter T5): "
                     + ", ".join(f"{mb:.0f} MB" for mb in d["rank_peak_rss_mb"])
                     + f"; the larger stage holds {100 * d['parameter_share_of_larger_stage']:.0f}% of the parameters "
                       "(the shared embedding included)")
    r = results.get("compile_fullgraph", {})
    if r.get("status") in ("pass", "fail") and "graph_breaks_eager" in r.get("details", {}):
        notes.append(f"torch.compile graph breaks: Conversion.module {r['details']['graph_breaks_converted']} "
                     f"(fullgraph=True), eager transformers {r['details']['graph_breaks_eager']} (fullgraph=False)")
    for k, r in results.items():
        d = r.get("details", {})
        if d.get("profile_top"):
            notes.append(f"profile of `{k}` ({d['profile_file']}), top self time: " + "; ".join(d["profile_top"][:5])
                         + (("; fxconvert by cumulative time: " + "; ".join(d["profile_fxconvert"][:6]))
                            if d.get("profile_fxconvert") else ""))
        elif d.get("profile_error"):
            notes.append(f"profiling `{k}` failed: {d['profile_error']}")
    return notes


def _profiled(profiler, fn):
    profiler.enable()
    try:
        return fn()
    finally:
        profiler.disable()


def profile_missed(results, directory: Path, top=25):
    """cProfile the fxconvert side of each missed target; write DIR/<key>.txt and .prof."""
    directory.mkdir(parents=True, exist_ok=True)
    for r in results:
        if r.status != "fail" or r.profile is None:
            continue
        _log(f"profiling {r.key} ...")
        prefix = directory / r.key
        try:
            if r.key in ("cli_over_import", "t5_11b_meta_peak_rss_mb"):
                prof = r.profile(str(prefix))
                stats = pstats.Stats(prof)
            else:
                profiler = cProfile.Profile()
                r.profile(profiler)
                prof = f"{prefix}.prof"
                profiler.dump_stats(prof)
                stats = pstats.Stats(profiler)
        except Exception as e:
            r.details["profile_error"] = _first_line(e)
            continue
        buf = io.StringIO()
        stats.stream = buf
        stats.sort_stats("tottime").print_stats(top)
        stats.sort_stats("cumulative").print_stats(top)
        Path(f"{prefix}.txt").write_text(buf.getvalue())
        r.details["profile_file"] = f"{prefix}.txt"
        r.details["profile_top"] = _top_entries(stats, 10)
        r.details["profile_fxconvert"] = _fxconvert_entries(stats, 10)


def _top_entries(stats, n):
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:n]  # by tottime
    total = sum(v[2] for v in stats.stats.values()) or 1.0
    out = []
    for (filename, line, func), (_, ncalls, tottime, cumtime, _) in rows:
        where = "~" if filename == "~" else _short(filename) + f":{line}"
        out.append(f"{where}({func}) {tottime:.3f}s self ({100 * tottime / total:.0f}%), {ncalls} calls")
    return out


def _fxconvert_entries(stats, n):
    """fxconvert's own functions by cumulative time: where in the package the time goes."""
    package = str(REPO / "fxconvert") + os.sep
    rows = [(k, v) for k, v in stats.stats.items() if k[0].startswith(package)]
    rows.sort(key=lambda kv: kv[1][3], reverse=True)
    total = max((v[3] for v in stats.stats.values()), default=0.0) or 1.0
    return [f"{_short(f)}:{line}({func}) {cum:.3f}s cumulative ({100 * cum / total:.0f}%), {ncalls} calls"
            for (f, line, func), (_, ncalls, _, cum, _) in rows[:n]]


def _short(filename):
    for marker in ("site-packages" + os.sep, str(REPO) + os.sep):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def write_markdown_section(path: Path, table: str):
    """Replace the text between the bench markers in `path` (or create it)."""
    begin, end = "<!-- bench:begin -->", "<!-- bench:end -->"
    block = f"{begin}\n{table}{end}"
    if path.exists() and begin in (text := path.read_text()) and end in text:
        head, rest = text.split(begin, 1)
        path.write_text(head + block + rest.split(end, 1)[1])
    else:
        path.write_text(f"# Benchmarks\n\n{block}\n")


def wait_quiet(limit_s: float, poll_s: float = 5.0, polls: int = 3):
    """Wait (at most `limit_s`) until the 1-minute load average is below the CPU count and at most
    one task is runnable (this one), `polls` polls in a row."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    deadline = time.monotonic() + limit_s
    quiet = 0
    while time.monotonic() < deadline:
        load, runnable = _loadavg(), _runnable()
        quiet = quiet + 1 if (not load or load[0] < cpus) and runnable <= 1 else 0
        if quiet >= polls:
            return
        _log(f"waiting for a quiet machine: load average {load[0] if load else '?'}, {runnable} runnable tasks ...")
        time.sleep(poll_s)
    _log("the machine did not quieten down; measuring anyway")


def _runnable() -> int:
    """Runnable tasks now, from /proc/loadavg (this process counts as one); 0 where unknown."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
    return 0


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer repetitions: about 6 minutes on a quiet 2-core machine")
    mode.add_argument("--tiny", action="store_true",
                      help="smoke test: tiny models, 1 repetition, no subprocess measurements (figures meaningless)")
    p.add_argument("--json", metavar="FILE", help="write every figure to FILE as JSON")
    p.add_argument("--compile", action="store_true",
                   help="also compare torch.compile(fullgraph=True) of the converted module with torch.compile of "
                        "eager transformers (slow: minutes)")
    p.add_argument("--only", metavar="KEYS", help="comma-separated substrings of measurement keys to run")
    p.add_argument("--reps", type=int, help="exact number of timed repetitions (overrides the mode)")
    p.add_argument("--threads", type=int,
                   help=f"torch threads (default {THREADS}; 1 under --tiny, which must not depend on a quiet machine)")
    p.add_argument("--wait-quiet", type=float, metavar="SECONDS",
                   help="first wait up to SECONDS for the 1-minute load average to drop below the CPU count")
    p.add_argument("--profile", metavar="DIR", help="cProfile the fxconvert side of every missed target into DIR")
    p.add_argument("--render", metavar="JSON", help="measure nothing: print (and --markdown) the table of a stored "
                                                    "--json report")
    p.add_argument("--markdown", metavar="FILE",
                   help="write the table into FILE between <!-- bench:begin --> and <!-- bench:end --> "
                        "(e.g. BENCHMARKS.md)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        table = render_markdown(json.loads(Path(args.render).read_text()))
        print(table)
        if args.markdown:
            write_markdown_section(Path(args.markdown), table)
        return 0
    torch.set_num_threads(args.threads or (1 if args.tiny else THREADS))
    ctx = Context(args)
    if args.wait_quiet:
        wait_quiet(args.wait_quiet)
    started = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    load_start = _loadavg()
    start = time.perf_counter()
    results = run_all(ctx)
    wall = time.perf_counter() - start
    if args.profile:
        profile_missed(results, Path(args.profile))
    report = {
        "schema_version": SCHEMA_VERSION,
        "started": started.isoformat(),
        "mode": ctx.mode,
        "command": "python " + " ".join([os.path.relpath(__file__, REPO)] + (sys.argv[1:] if argv is None else argv)),
        "wall_s": wall,
        "loadavg_start": load_start,
        "loadavg_end": _loadavg(),
        "machine": machine_info(),
        "results": {r.key: r.as_json() for r in results},
    }
    # Flat keys: each figure's value, or "unavailable: ..." / "skipped: ..." when it has none.
    for r in results:
        report[r.key] = r.unavailable if r.unavailable else r.value
    table = render_markdown(report)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    if args.markdown:
        write_markdown_section(Path(args.markdown), table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
