"""What a run shows: its start-up lines and progress bar on a terminal, the "saved" lines, --resume's lines,
and --tensorboard's event files (against RUN/metrics.jsonl).

One 2-rank run in a pseudo-terminal (torchrun, as a user starts it: rank 1 draws the bar, rank 0
says what start-up does), stopped at step 4 with checkpoints at steps 2 and 4, then resumed from
step 2 (step 4's checkpoint removed, as after a kill) with another --lr, --steps and --tensorboard
path: both runs are made once (`runs`). The terminal is read back through `screen`, which does
what a terminal does with what the ranks write (carriage return, line feed, erase line, cursor up).
"""

import fcntl
import importlib.util
import io
import os
import pty
import re
import select
import shutil
import struct
import subprocess
import sys
import termios

import pytest

import train_runs as tr
from fxconvert.train import main

HAVE_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


def screen(text: str) -> list[str]:
    """The rows a terminal shows after `text`: "\\r" goes to column 0, "\\n" one row down (the terminal's own
    ONLCR adds the "\\r"), ESC[2K erases the row, ESC[nA goes n rows up; colours and other controls change no
    text. Writing at a column overwrites what is there, so a line written on the bar's row is glued to it."""
    rows, row, col = [""], 0, 0
    for token in re.findall(r"\x1b\[[0-9;?]*[A-Za-z]|\r|\n|[^\x1b\r\n]+", text):
        if token == "\r":
            col = 0
        elif token == "\n":
            row += 1
            rows.extend([""] * (row + 1 - len(rows)))
        elif token == "\x1b[2K":
            rows[row] = ""
        elif token.startswith("\x1b[") and token.endswith("A"):
            row = max(0, row - int(token[2:-1] or 1))
        elif not token.startswith("\x1b"):
            rows[row] = rows[row][:col].ljust(col) + token + rows[row][col + len(token):]
            col += len(token)
    return [r.rstrip() for r in rows]


def test_screen_glues_a_line_written_on_another_row():
    assert screen("bar 1\r\x1b[2Kbar 2 saved\r\nnext") == ["bar 2 saved", "next"]
    assert screen("a\r\nb\x1b[1A\r\x1b[2Kc") == ["c", "b"]


def in_a_terminal(argv: list[str], *, columns: int = 120, timeout: float = 600) -> tuple[int, str]:
    """(exit status, everything written) of `argv` with a pseudo-terminal as its stdout and stderr."""
    terminal, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = {k: v for k, v in tr.env().items() if k not in ("COLUMNS", "LINES", "NO_COLOR", "FORCE_COLOR")}
    env["TERM"] = "xterm"
    proc = subprocess.Popen(argv, cwd=tr.REPO, env=env, stdin=subprocess.DEVNULL, stdout=child, stderr=child)
    os.close(child)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([terminal], [], [], timeout)
            assert ready, f"nothing written for {timeout} s: {b''.join(chunks)[-2000:]!r}"
            try:
                data = os.read(terminal, 65536)
            except OSError:  # EIO: every process that had the terminal closed it
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(terminal)
        if proc.poll() is None:
            proc.kill()
    return proc.wait(timeout=timeout), b"".join(chunks).decode("utf-8", "replace")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(root, out, the first run's terminal text, the resumed run's CompletedProcess)."""
    from fxconvert.cli import main as convert_main

    root = tmp_path_factory.mktemp("train-output")
    tr.write_checkpoint(root / "ckpt")
    tr.write_jsonl(root / "train.jsonl", n=24)
    assert convert_main([str(root / "ckpt"), "--stages", "2", "--out", str(root / "conv"), "-q", "--no-validate"]) == 0
    out = root / "run"
    common = [root / "conv", "--data", root / "train.jsonl", "--out", out, "--batch", 4, "--optimizer", "sgd",
              "--save-every", 2, "--lr-schedule", "linear", "--warmup-steps", 1]
    first = ["--tensorboard", out / "tb"] if HAVE_TENSORBOARD else []  # inside --out: a directory of its own
    # started by --nproc-per-node: its process says the first start-up lines, the ranks the rest
    code, text = in_a_terminal([sys.executable, "-m", "fxconvert.train", "--nproc-per-node", "2",
                                *map(str, common), "--steps", "4", "--lr", "0.1", *map(str, first)])
    assert code == 0, text[-3000:]
    shutil.rmtree(out / "checkpoints" / "step_4")  # as if the run had been killed after step 4's metrics
    second = []
    if HAVE_TENSORBOARD:
        (root / "tb-link").symlink_to(out / "tb", target_is_directory=True)
        second = ["--tensorboard", root / "tb-link"]
    resumed = tr.torchrun(2, *common, "--steps", 6, "--lr", 0.05, *second, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return root, out, text, resumed


@pytest.mark.xdist_group("ranks")
def test_start_up_says_what_it_does_on_a_terminal(runs):
    root, _, text, resumed = runs
    rows = screen(text)
    said = ["importing torch ...", "starting 2 ranks on this machine ...",
            f"loading {root / 'conv'} (2 stages on 2 ranks) ...", f"reading data: {root / 'train.jsonl'} ...",
            "reading data: 24 lines", "joining 2 ranks ..."]
    assert [rows.index(line) for line in said] == sorted(rows.index(line) for line in said), rows
    assert all(rows.count(line) == 1 for line in said), rows  # once: not again from each rank
    first_bar = min(n for n, row in enumerate(rows) if re.match(r"step \d+/4 ", row))
    assert rows.index(said[-1]) < first_bar
    # not in a log: there, the output of a run that fails to start is its one-line error
    assert not [line for line in said if line in resumed.stderr.splitlines()]


@pytest.mark.xdist_group("ranks")
def test_saved_lines_never_share_the_bar_s_line_and_the_bar_shows_their_step(runs):
    _, out, text, _ = runs
    rows = screen(text)
    for step in (2, 4):
        saved = f"saved checkpoint {out / 'checkpoints' / f'step_{step}'}"
        assert rows.count(saved) == 1, rows  # a row of its own
    # the bar drawn under step 2's line (a step later it was still at 0 or 1), and closed at step 4 before its line
    after = text[text.index(f"saved checkpoint {out / 'checkpoints' / 'step_2'}"):]
    assert re.search(r"step (\d+)/4", after).group(1) == "2", after[:300]
    before = text[:text.index(f"saved checkpoint {out / 'checkpoints' / 'step_4'}")]
    assert re.findall(r"step (\d+)/4", before)[-1] == "4", before[-300:]
    assert not [row for row in rows if "saved" in row and re.search(r"step \d+/4", row)], rows
    assert rows[-3:] == [f"saved checkpoint {out / 'checkpoints' / 'step_4'}",
                         f"wrote {out / 'hf'} (a transformers checkpoint: from_pretrained loads it) and "
                         f"{out / 'metrics.jsonl'}", ""], rows


@pytest.mark.xdist_group("ranks")
def test_resume_says_where_it_resumes_and_names_what_changed(runs):
    root, out, _, resumed = runs
    lines = resumed.stderr.splitlines()
    assert f"resuming from {out / 'checkpoints' / 'step_2'} (step 2 of 6)" in lines, resumed.stderr
    assert "--lr changed from 0.1 to 0.05 since the checkpoint" in lines
    assert "--steps changed from 4 to 6 since the checkpoint" in lines
    if HAVE_TENSORBOARD:
        assert f"--tensorboard changed from {out / 'tb'} to {root / 'tb-link'} since the checkpoint" in lines
    changed = [line for line in lines if " changed from " in line]
    assert len(changed) == 2 + HAVE_TENSORBOARD, changed  # nothing else is named
    assert [m["step"] for m in tr.metrics(out)] == [1, 2, 3, 4, 5, 6]
    # each step's line shows the rate it trained at: the new --lr's linear decay over 6 steps from step 3 on
    rates = [float(re.search(r"  lr (\S+)  ", line).group(1)) for line in lines if re.match(r"step \d+/6 ", line)]
    assert rates == pytest.approx([0.05 * (6 - s) / 5 for s in range(2, 6)], rel=1e-3)


@pytest.mark.xdist_group("ranks")
def test_tensorboard_scalars_are_the_metrics_records(runs):
    """Every numeric field of metrics.jsonl, at its step, in the event files: the resumed run's steps 3-4 replace
    the first run's (purged, not deleted), and one event file per run (the reporting rank's)."""
    if not HAVE_TENSORBOARD:
        pytest.skip("the tensorboard extra is not installed (pip install 'fxconvert[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out, _, _ = runs
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 2
    events = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    expected = {}
    for record in tr.metrics(out):
        for name, value in record.items():
            if name != "step" and type(value) in (int, float):
                expected.setdefault(name, []).append((record["step"], value))
    assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= set(expected)
    assert set(events.Tags()["scalars"]) == set(expected)
    for name, values in expected.items():
        got = [(e.step, e.value) for e in events.Scalars(name)]
        assert [s for s, _ in got] == [s for s, _ in values], name
        assert [v for _, v in got] == pytest.approx([v for _, v in values], rel=1e-6, abs=1e-12), name


def test_the_bar_is_redrawn_before_a_line_above_it(tmp_path, monkeypatch):
    """Reporter.line on a terminal: the line on a row of its own, and the bar drawn under it at the last step
    (rich redraws a few times a second: without a redraw, the bar showed an earlier step)."""
    from fxconvert.training.metrics import Reporter

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setattr(sys, "stderr", terminal)
    reporter = Reporter(tmp_path, total_steps=5, start_step=0)
    for step in (1, 2, 3):
        reporter.step({"step": step, "loss": 1.0, "lr": 0.1, "tokens_per_s": 10.0, "seconds": 0.1})
    reporter.line("saved checkpoint run/checkpoints/step_3")
    after = terminal.getvalue().split("saved checkpoint run/checkpoints/step_3", 1)[1]
    reporter.close()
    assert re.search(r"step (\d+)/5", after).group(1) == "3", after
    assert "saved checkpoint run/checkpoints/step_3" in screen(terminal.getvalue())


def _fails(capsys, monkeypatch, argv) -> str:
    """main(argv) as rank 0 of 2, before any process group: exit 2 and one line."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fxconvert.train: error: "), err
    return err


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("tensorboard-options")
    tr.write_checkpoint(root / "ckpt")
    tr.write_jsonl(root / "train.jsonl")
    return root


def _hostile(root, tmp_path):
    """(--tensorboard DIR, what the line says) for DIRs that cannot take event files."""
    (tmp_path / "a-file").write_text("mine\n")
    (tmp_path / "broken").symlink_to(tmp_path / "nowhere")
    (tmp_path / "tb\n\x1b[31mFAKE").write_text("mine\n")
    out = tmp_path / "run"
    return [(tmp_path / "a-file", "exists and is not a directory"),
            (tmp_path / "broken", "is a symlink to nothing"),
            (tmp_path / "a-file" / "tb", "a-file is not a directory"),
            (out / "checkpoints" / "tb", "is inside checkpoints of --out"),
            (out / "hf", "is inside hf of --out"),
            (out / "metrics.jsonl", "is inside metrics.jsonl of --out"),
            (out / ".hf.tmp", "is inside .hf.tmp of --out"),  # the export's temporary: it would stop the export
            (out / ".hf.0123abcd.old" / "tb", "is inside .hf.0123abcd.old of --out"),
            (root / "ckpt" / "tb", "is inside SOURCE"),
            (tmp_path / "tb\n\x1b[31mFAKE", "tb\\x0a\\x1b[31mFAKE exists and is not a directory")]


def test_hostile_tensorboard_directories_are_refused_in_one_line(small, tmp_path, capsys, monkeypatch):
    if not HAVE_TENSORBOARD:
        pytest.skip("the tensorboard extra is not installed (pip install 'fxconvert[tensorboard]')")
    for directory, needle in _hostile(small, tmp_path):
        err = _fails(capsys, monkeypatch, [small / "ckpt", "--data", small / "train.jsonl", "--out", tmp_path / "run",
                                           "--steps", 2, "--batch", 4, "--tensorboard", directory])
        assert needle in err and "--tensorboard" in err, (directory, err)
        assert "\x1b" not in err
        assert not (tmp_path / "run").exists() and not (small / "ckpt" / "tb").exists()
    assert (tmp_path / "a-file").read_text() == "mine\n"


# The tensorboard package hidden (None in sys.modules makes its import fail), then `python -m fxconvert.train`.
_HIDDEN = """
import sys
sys.modules["tensorboard"] = None
from fxconvert.train import main
sys.exit(main(sys.argv[1:]))
"""


def test_tensorboard_without_the_package_names_the_extra(small, tmp_path):
    env = tr.env()
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2")
    proc = subprocess.run([sys.executable, "-c", _HIDDEN, str(small / "ckpt"), "--data", str(small / "train.jsonl"),
                           "--out", str(tmp_path / "run"), "--steps", "2", "--batch", "4", "--tensorboard",
                           str(tmp_path / "tb")], cwd=tr.REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == ["fxconvert.train: error: --tensorboard needs the tensorboard package, which is "
                                        "not installed; pip install 'fxconvert[tensorboard]', or drop --tensorboard"]
    assert not (tmp_path / "run").exists() and not (tmp_path / "tb").exists()
