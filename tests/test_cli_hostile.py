"""The command line under hostile input: its own source as --out, signals at any moment, bad option
values, and config text or paths holding control characters. Each failure is one line and the
right exit code; what is on disk is what the message says."""

import importlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fxconvert.cli as cli_module
import fxconvert.save as save_module
from fxconvert.cli import main

from checkpoints import edit_config, leftovers, write_checkpoint

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    path = tmp_path_factory.mktemp("written") / "ckpt"
    write_checkpoint(path)
    return path


@pytest.fixture
def ckpt(written, tmp_path_factory):
    """A fresh copy of a tiny checkpoint for each test, outside its tmp_path (which tests list)."""
    return Path(shutil.copytree(written, tmp_path_factory.mktemp("source") / "ckpt"))


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    """The error line, once the warning that --no-validate always gives is set aside: the only line."""
    lines = err.replace("warning: validation skipped (--no-validate)\n", "").strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fxconvert: error: "), err
    return lines[0]


@pytest.mark.parametrize("out", ["the checkpoint", "its parent", "the config file's directory"])
def test_the_source_is_never_the_output(out, ckpt, tmp_path, capsys):
    source = ckpt
    args = [ckpt]
    if out == "the config file's directory":
        source = ckpt / "config.json"
        args = ["--config", source]
    target = {"the checkpoint": ckpt, "its parent": ckpt.parent}.get(out, source.parent)
    before = leftovers(source.parent)
    code, _, err = run_cli(capsys, *args, "--out", target, "--force", "--offline")
    assert code == 2
    assert f"would replace the source {source}" in one_error_line(err)  # before any work: no progress line
    assert leftovers(source.parent) == before


def interrupt_first(original, signum=signal.SIGINT):
    """`original`, called after this process has been sent `signum`."""
    def hooked(*args, **kwargs):
        os.kill(os.getpid(), signum)
        return original(*args, **kwargs)
    return hooked


@pytest.mark.parametrize("moment", ["writing", "removing the old output", "after the write"])
def test_an_interrupt_says_what_is_on_disk(moment, ckpt, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, ckpt, "--out", out, "--stages", "2", "--no-validate", "-q", "--offline")
    assert code == 0, err
    old = sorted(os.listdir(out))
    assert "stage_0.py" in old
    if moment == "writing":
        monkeypatch.setattr(save_module, "save_weights", interrupt_first(save_module.save_weights))
    elif moment == "removing the old output":  # as the hidden directory that held it goes
        rmdir = os.rmdir
        monkeypatch.setattr(os, "rmdir", lambda path, *args, **kwargs: (
            interrupt_first(rmdir) if os.path.basename(path).startswith(".out.") else rmdir)(path, *args, **kwargs))
    else:
        monkeypatch.setattr(cli_module, "_show", interrupt_first(cli_module._show))
    code, _, err = run_cli(capsys, ckpt, "--out", out, "--force", "--no-validate", "-q", "--offline")
    assert code == 130
    line = one_error_line(err)
    if moment == "writing":
        assert line == "fxconvert: error: interrupted; nothing was written"
        assert sorted(os.listdir(out)) == old
    else:
        assert line == f"fxconvert: error: interrupted; the output in {out} is complete"
        assert "stage_0.py" not in os.listdir(out) and "weights.safetensors" in os.listdir(out)
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no hidden temporary or old directory


@pytest.mark.parametrize("library", ["raises another error", "carries on"])
def test_an_interrupt_a_library_swallows_still_ends_the_run(library, ckpt, tmp_path, capsys, monkeypatch):
    """As transformers' lazy imports do with a Ctrl-C that lands in them (seen as ModuleNotFoundError)."""
    workflow = importlib.import_module("fxconvert.workflow")  # the trace as the one workflow calls it
    trace_with_stats = workflow.trace_with_stats

    def swallowing(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the KeyboardInterrupt lands here
        except BaseException as e:  # noqa: BLE001 - the library's doing
            if library == "raises another error":
                raise ModuleNotFoundError("Could not import module 'T5ForConditionalGeneration'") from e
        return trace_with_stats(*args, **kwargs)

    monkeypatch.setattr(workflow, "trace_with_stats", swallowing)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, ckpt, "--out", out, "--no-validate", "--offline")
    assert code == 130
    assert err.strip().splitlines()[-1] == ("fxconvert: error: interrupted; nothing was written"
                                            if library == "raises another error" else
                                            f"fxconvert: error: interrupted; the output in {out} is complete")
    assert os.listdir(tmp_path) == ([] if library == "raises another error" else ["out"])


# The program, with SIGTERM sent to itself while it writes the weights.
SIGTERM_WHILE_WRITING = r"""
import os, signal, sys
import fxconvert.save
from fxconvert.cli import main

original = fxconvert.save.save_weights
def save_weights(*args):
    os.kill(os.getpid(), signal.SIGTERM)
    original(*args)
fxconvert.save.save_weights = save_weights
raise SystemExit(main(sys.argv[1:]))
"""


def test_sigterm_is_handled_as_ctrl_c(ckpt, tmp_path):
    run = subprocess.run([sys.executable, "-c", SIGTERM_WHILE_WRITING, str(ckpt), "--out", str(tmp_path / "out"),
                          "--no-validate", "-q"], env=ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode == 130, run.stderr
    assert one_error_line(run.stderr) == "fxconvert: error: interrupted; nothing was written"
    assert os.listdir(tmp_path) == []


def test_a_signal_stops_a_run_started_by_an_import(ckpt, tmp_path):
    """A script that runs the command line as it is imported: its own import is not one to wait for."""
    script = tmp_path / "script"
    script.mkdir()
    (script / "convert_on_import.py").write_text(SIGTERM_WHILE_WRITING.replace("raise SystemExit(main(sys.argv[1:]))",
                                                                              "CODE = main(sys.argv[1:])"))
    run = subprocess.run([sys.executable, "-c", "import sys, convert_on_import; sys.exit(convert_on_import.CODE)",
                          str(ckpt), "--out", str(tmp_path / "out"), "--no-validate", "-q"],
                         env={**ENV, "PYTHONPATH": f"{REPO}{os.pathsep}{script}"}, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 130, run.stderr
    assert one_error_line(run.stderr) == "fxconvert: error: interrupted; nothing was written"
    assert os.listdir(tmp_path) == ["script"]


# `python -m fxconvert ...`, saying "ready" on stdout when it first asks for torch: from then on
# it runs fxconvert's code only, where any Ctrl-C must end in one line and exit code 130. With
# SIGINT_AT set, it sends itself SIGINT at those imports (counted from torch's), so the signal
# lands inside the import of torch at a known place; at exit it says whether torch's import
# ran to its end (a KeyboardInterrupt raised inside it leaves no torch in sys.modules).
READY_AT_TORCH = r"""
import importlib.abc, os, runpy, signal, sys

AT = [int(k) for k in os.environ.get("SIGINT_AT", "").split(",") if k]

class Ready(importlib.abc.MetaPathFinder):
    count = -1
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and self.count < 0:
            print("ready", flush=True)
        if name == "torch" or self.count >= 0:
            self.count += 1
            if self.count in AT:
                os.kill(os.getpid(), signal.SIGINT)
            if self.count >= max(AT, default=0):
                sys.meta_path.remove(self)

sys.meta_path.insert(0, Ready())
sys.argv = ["fxconvert", *sys.argv[1:]]
try:
    runpy.run_module("fxconvert", run_name="__main__", alter_sys=True)
finally:
    torch = sys.modules.get("torch")
    print("torch imported" if torch is not None and hasattr(torch, "nn") else "torch not imported", flush=True)
"""


def start_at_torch(ckpt, out, sigint_at=()):
    return subprocess.Popen([sys.executable, "-c", READY_AT_TORCH, str(ckpt), "--out", str(out)],
                            env={**ENV, "SIGINT_AT": ",".join(map(str, sigint_at))},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def assert_interrupted_at_once(proc, tmp_path):
    """Exit code 130, the one line, nothing written; returns what the program printed."""
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err  # -6: a KeyboardInterrupt thrown through C++ aborted the process
    assert one_error_line(err) == "fxconvert: error: interrupted; nothing was written"
    assert os.listdir(tmp_path) == []
    return out


@pytest.mark.parametrize("delay", [0.0, 0.1, 0.3, 0.6, 1.0])
def test_ctrl_c_during_the_imports_is_one_line(delay, ckpt, tmp_path):
    proc = start_at_torch(ckpt, tmp_path / "out")
    try:
        assert proc.stdout.readline() == "ready\n"
        time.sleep(delay)  # where the interrupt lands (load decides); test_ctrl_c_inside_torchs_import pins it
        proc.send_signal(signal.SIGINT)
        assert_interrupted_at_once(proc, tmp_path)
    finally:
        proc.kill()


# Import counts from torch's own (0): early modules, the ones torch's C++ extension imports
# (_initExtension, about 170 on), the distributed ones it initialises from C++, and late ones.
@pytest.mark.parametrize("at", [(0,), (5,), (60,), (170,), (200,), (300,), (600,), (900,),
                                tuple(range(0, 1000, 7))], ids=lambda at: "every-7th" if len(at) > 1 else str(at[0]))
def test_ctrl_c_inside_torchs_import_waits_for_the_import(at, ckpt, tmp_path):
    """A SIGINT (or many) landing inside `import torch` is raised once the import returns, never inside it:
    raised inside, it can cross torch's C++ code and abort the process."""
    proc = start_at_torch(ckpt, tmp_path / "out", sigint_at=at)
    try:
        out = assert_interrupted_at_once(proc, tmp_path)
    finally:
        proc.kill()
    assert out.splitlines() == ["ready", "torch imported"]


@pytest.mark.parametrize("option, value, message", [
    ("--seed", "99999999999999999999999", "--seed must be an integer from 0 to 2**63 - 1, got 9999"),
    ("--seed", "-1", "--seed must be an integer from 0 to 2**63 - 1, got -1"),
    ("--atol", "inf", "--atol must be a finite number >= 0, got inf"),
    ("--atol", "nan", "--atol must be a finite number >= 0, got nan"),
])
def test_bad_option_values_are_refused_before_any_work(option, value, message, ckpt, tmp_path, capsys):
    code, _, err = run_cli(capsys, ckpt, "--out", tmp_path / "out", option, value, "--offline")
    assert code == 2
    assert message in one_error_line(err)  # one line: no progress line came before it
    assert os.listdir(tmp_path) == []


def test_too_many_stages_are_refused_right_after_the_trace(ckpt, tmp_path, capsys):
    code, _, err = run_cli(capsys, ckpt, "--out", tmp_path / "out", "--stages", "1000", "--offline")
    assert code == 2
    lines = err.strip().splitlines()
    assert [line.split()[1] for line in lines[:-1]] == ["load", "trace"]  # no passes, no validation
    assert "cannot split into 1000 stages: the graph has 4 blocks" in one_error_line(lines[-1])
    assert os.listdir(tmp_path) == []


def test_config_text_cannot_fake_lines_or_colours(ckpt, tmp_path, capsys):
    shutil.copytree(ckpt, tmp_path / "bad")
    edit_config(tmp_path / "bad", architectures=["X\n\x1b[31mfxconvert: all good"])
    code, out, err = run_cli(capsys, tmp_path / "bad", "--out", tmp_path / "out", "--offline")
    assert code == 1 and out == ""
    line = one_error_line(err)
    assert "\x1b" not in err and "X\\x0a\\x1b[31mfxconvert: all good" in line
    code, _, err = run_cli(capsys, tmp_path / "bad", "--out", tmp_path / "out", "--offline", "-v")
    assert code == 1 and "Traceback" in err and "\x1b" not in err  # the traceback quotes the text escaped too
    assert not any(line.startswith("fxconvert: all good") for line in err.splitlines())


def test_a_path_with_control_characters_and_markup_is_printed_escaped(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a short relative path, not folded in the report's columns
    shutil.copytree(ckpt, "ck\x1b[31m[/x]pt")
    code, out, err = run_cli(capsys, "ck\x1b[31m[/x]pt", "--out", "out", "--no-validate", "--offline")
    assert code == 0, err
    report_md = (tmp_path / "out" / "report.md").read_text()
    for text in (out, err, report_md):  # progress lines, the rich report, the markdown report
        assert "\x1b" not in text and "ck\\x1b[31m[/x]pt" in text


def test_the_redelivery_watcher_never_signals_after_the_run_ended():
    """The run ends (`done` is set) between the watcher's wait and its signal: no KeyboardInterrupt escapes."""
    import threading

    from fxconvert import cli

    class EndsMeanwhile:  # the wait times out, and by then the run has ended
        def wait(self, timeout):
            return False

        def is_set(self):
            return True

    watcher = threading.Thread(target=cli._redeliver, args=(signal.SIGINT, EndsMeanwhile(), threading.Lock(), [],
                                                            set()))
    watcher.start()
    watcher.join()
    time.sleep(0)  # a pending interrupt_main would be raised here, in the main thread
    sum(range(1000))


HELD_IN_A_FINALIZER = """
import os, signal, threading, time
from fxconvert import cli
inside = threading.Event()
class Slow:
    def __del__(self):
        inside.set()
        time.sleep(1.0)  # the SIGINT lands here
def send():
    inside.wait(60)
    os.kill(os.getpid(), signal.SIGINT)
threading.Thread(target=send, daemon=True).start()
try:
    with cli._interrupts([]):
        Slow()  # collected at once: its __del__ runs now
        for _ in range(600):
            time.sleep(0.1)  # the held signal is delivered here
    print("not interrupted")
except KeyboardInterrupt:
    print("interrupted after the finalizer")
"""


def test_a_signal_inside_a_finalizer_is_held_until_it_returns():
    """Raised inside a `__del__`, a KeyboardInterrupt is printed as "Exception ignored" and dropped, and the run
    went on to write its output: a Ctrl-C landing in a garbage-collected object's finalizer (a regex's, during
    transformers' import) made a conversion end complete instead of interrupted. It is held and delivered after."""
    proc = subprocess.run([sys.executable, "-c", HELD_IN_A_FINALIZER], env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.strip() == "interrupted after the finalizer", (proc.stdout, proc.stderr)
    assert "Exception ignored" not in proc.stderr, proc.stderr
