#!/usr/bin/env python
"""Run the tests that can be flaky many times in a row beside a CPU hog, and report every run.

    PYTHONPATH=. python scripts/soak.py --list                      # which tests, and why each was picked
    PYTHONPATH=. python scripts/soak.py --runs 20 --json soak.json  # 20 runs of them beside two busy loops
    PYTHONPATH=. python scripts/soak.py --runs 3 --all              # the whole suite, 3 times, likewise

A test is flaky-prone when it starts a process, sends a signal, uses threads or waits on a
clock. Which tests do is found in their source (tests/*.py, parsed with ast): a test
function, or a fixture or helper it reaches through calls and fixture arguments, that
names one of `PRIMITIVES` (subprocess, os.kill, signal, threading, time.sleep, torchrun,
multiprocessing ...). A test that reaches one only through a fixture of another module
(conftest) is found too, since fixtures are looked up by name across tests/.

The hog is `--hogs` Python processes spinning `while True: pass`, started before the first
run and killed by pid after the last (also on Ctrl-C). Each run is one pytest process;
a run's exit status, duration and failing test ids go to the table and to `--json`.
Exit status: 0 when every run passed, 1 otherwise.
"""

import argparse
import ast
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
# Names whose use marks code as starting processes, sending signals, using threads or waiting on a clock.
PRIMITIVES = frozenset({
    "subprocess", "Popen", "check_output", "check_call", "os.kill", "killpg", "os.killpg", "signal", "raise_signal",
    "threading", "Thread", "ThreadPoolExecutor", "ProcessPoolExecutor", "multiprocessing", "mp", "spawn",
    "time.sleep", "sleep", "torchrun", "torchrun_command", "fork", "os.fork", "setitimer", "alarm", "pty", "openpty",
    "time.monotonic", "time.time",
})


def _names(node: ast.AST) -> set[str]:
    """Every dotted name and attribute used in `node` ('os.kill', 'kill', 'os', 'subprocess.run', ...)."""
    out = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            out.add(sub.id)
        elif isinstance(sub, ast.Attribute):
            out.add(sub.attr)
            if isinstance(sub.value, ast.Name):
                out.add(f"{sub.value.id}.{sub.attr}")
        elif isinstance(sub, (ast.Import, ast.ImportFrom)):
            out |= {a.asname or a.name for a in sub.names}
    return out


def _module_functions(paths) -> dict[tuple[str, str], ast.AST]:
    """(module, function name) -> its definition, for module-level functions and methods of the test files."""
    out = {}
    for path in paths:
        module = path.stem
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                node.file = path  # type: ignore[attr-defined]
                out.setdefault((module, node.name), node)
    return out


def _scopes(paths, modules: set[str]) -> dict[str, dict[str, tuple[str, str]]]:
    """Per test module: a name it can call -> (module, function), through its own definitions and imports."""
    scopes = {}
    for path in paths:
        module, scope = path.stem, {}
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in modules:
                scope.update({a.asname or a.name: (node.module, a.name) for a in node.names})
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in modules:
                        scope[f"{a.asname or a.name}.*"] = (a.name, "*")
        scopes[module] = scope
    return scopes


def _callees(node: ast.AST, module: str, scope: dict, functions: dict) -> set[tuple[str, str]]:
    """The test-side functions `node` reaches: called names, attributes of imported test modules, fixtures."""
    out = set()
    used = {a.arg for a in getattr(node, "args", ast.arguments(args=[])).args}
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            used.add(sub.id)
        elif isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and f"{sub.value.id}.*" in scope:
            out.add((scope[f"{sub.value.id}.*"][0], sub.attr))
    for name in used:
        if (module, name) in functions:
            out.add((module, name))
        elif name in scope:
            out.add(scope[name])
        elif ("conftest", name) in functions:  # a fixture of conftest.py
            out.add(("conftest", name))
    return {c for c in out if c in functions}


def flaky_prone(paths=None) -> dict[str, str]:
    """`file::function` of each flaky-prone test function -> the primitive (and path) that made it one."""
    paths = sorted(paths or TESTS.rglob("*.py"))
    functions = _module_functions(paths)
    scopes = _scopes(paths, {p.stem for p in paths})
    reason: dict[tuple[str, str], str] = {}
    for key, node in functions.items():
        hit = sorted(_names(node) & PRIMITIVES)
        if hit:
            reason[key] = hit[0]
    edges = {key: _callees(node, key[0], scopes[key[0]], functions) - {key} for key, node in functions.items()}
    changed = True
    while changed:  # what calls (or takes as a fixture) a marked function is marked
        changed = False
        for key, callees in edges.items():
            via = sorted(c for c in callees if c in reason)
            if key not in reason and via:
                reason[key] = f"{via[0][1]} -> {reason[via[0]]}"
                changed = True
    return dict(sorted((f"{_shown(node.file)}::{key[1]}", reason[key])
                       for key, node in functions.items() if key[1].startswith("test_") and key in reason))


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def _hogs(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def _failures(output: str) -> list[str]:
    return sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", output, re.MULTILINE)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=20, help="pytest runs in a row (default 20)")
    p.add_argument("--hogs", type=int, default=2, help="busy-loop processes beside the runs (default 2)")
    p.add_argument("--all", action="store_true", help="run the whole suite instead of the flaky-prone tests")
    p.add_argument("--list", action="store_true", help="list the flaky-prone tests and exit")
    p.add_argument("-k", metavar="EXPR", help="a further pytest -k selection")
    p.add_argument("--json", metavar="FILE", help="write every run's result here")
    args = p.parse_args(argv)
    if args.runs < 1 or args.hogs < 0:
        p.error("--runs must be at least 1 and --hogs at least 0")
    tests = flaky_prone()
    if args.list:
        for test, why in tests.items():
            print(f"{test}  ({why})")
        print(f"{len(tests)} test functions", file=sys.stderr)
        return 0
    selection = [] if args.all else list(tests)  # node ids: every parametrization of each function
    keyword = ["-k", args.k] if args.k else []
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *selection, *keyword]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPO)] + [v for v in [os.environ.get("PYTHONPATH")] if v])}
    hogs = _hogs(args.hogs)
    runs = []
    try:
        for i in range(1, args.runs + 1):
            began = time.monotonic()
            done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
            seconds = time.monotonic() - began
            summary = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
            runs.append({"run": i, "returncode": done.returncode, "seconds": round(seconds, 1),
                         "summary": summary, "failures": _failures(done.stdout)})
            print(f"run {i}/{args.runs}: exit {done.returncode} in {seconds:.0f} s: {summary}", flush=True)
            for failure in runs[-1]["failures"]:
                print(f"    {failure}", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps({"command": command, "hogs": args.hogs, "runs": runs},
                                                      indent=2) + "\n", encoding="utf-8")
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    failed = [r for r in runs if r["returncode"] != 0]
    print(f"{len(runs) - len(failed)} of {len(runs)} runs passed beside {args.hogs} busy loops; "
          f"{sum(r['seconds'] for r in runs) / 60:.1f} min in all", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
