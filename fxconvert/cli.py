"""`fxconvert NAME` (or `python -m fxconvert NAME`): convert, validate, write and report.

The phases read as the package: load (`fxconvert.load`) -> trace (`fxconvert.trace`) ->
passes (`fxconvert.convert`) -> validate (`fxconvert.validate`) -> split (`fxconvert.stages`,
`fxconvert.pipeline`) -> write (`fxconvert.save`) -> report (`fxconvert.report`). Progress
goes to stderr, the report to stdout.

Exit codes: 0 done; 1 a failure (model not found or not supported, bad config or weights,
trace, validation, write); 2 a usage error (bad option, unknown input or output name,
existing --out without --force, an --out fxconvert did not write); 130 interrupted (Ctrl-C
or SIGTERM, alike). Every failure is one line on stderr (with a traceback under -v), and
nothing is left partially written: the line after an interrupt says whether the output is
complete or nothing was written. Everything printed has control characters escaped
(`fxconvert.errors.printable`).

The phases themselves are `fxconvert.workflow.run`, which `convert()` and `Conversion.save()`
run too; this module parses and checks the options, shows the progress and the report, and
turns errors and interrupts into exit codes. Optional report sections hang off
`fxconvert.workflow.OPTIONAL_SECTIONS`: a feature adds its option in `build_parser`, a field of
`fxconvert.workflow.Options` and a `(asked(options), build(conversion))` pair there.
"""

import _thread
import argparse
import contextlib
import os
import re
import signal
import sys
import threading
import time

import fxconvert
from fxconvert import families
from fxconvert.errors import FxConvertError, UsageError, first_line, printable

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
PROG = "fxconvert"


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see {PROG} --help)")


def _preset_list() -> str:
    written = [f"{f.name}: {', '.join(f.presets)}" for f in families.all_families() if f.presets]
    return "; ".join([*written, f"other types: {', '.join(families.derived_presets())}"])


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Convert a model of a supported family (T5, BART, GPT-2, BERT, Llama-style) from a "
                    "checkpoint directory, Hugging Face Hub id, config file or built-in preset into a torch.fx "
                    "GraphModule in FTPipe's pre-partitioning form, validate it against the original, and report "
                    "what changed.",
        epilog="NAME is tried as: a local directory with config.json; a Hub id in the local Hugging Face "
               "cache; a Hub id downloaded from the Hub (when reachable, and not --offline or "
               "HF_HUB_OFFLINE=1); a built-in preset with random weights (" + _preset_list() + "). "
               "Exit codes: 0 ok, 1 failure, 2 usage error.",
    )
    p.add_argument("--version", action="version", version=f"{PROG} {fxconvert.__version__}")
    p.add_argument("name", nargs="?", metavar="NAME", help="checkpoint directory, Hub id or preset name")
    p.add_argument("--config", metavar="FILE.json", help="convert the architecture in this config file "
                                                          "(random weights) instead of NAME")
    p.add_argument("--out", metavar="DIR", help="output directory (default: ./fxconvert-out/<name>/)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--inputs", metavar="A,B,...", help="comma-separated graph input names (default: "
                                                       "input_ids, attention_mask, decoder_input_ids and labels "
                                                       "as the model takes them)")
    p.add_argument("--output", metavar="NAME", help="the single output to keep (default: loss, else logits, "
                                                    "else last_hidden_state)")
    p.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa", help="attention implementation "
                                                                              "(default: sdpa)")
    p.add_argument("--offline", action="store_true", help="never touch the network")
    p.add_argument("--meta", action="store_true", help="build and trace on the meta device: no weights, no "
                                                       "validation (automatic above 2B random-weight parameters)")
    p.add_argument("--no-validate", dest="validate", action="store_false",
                   help="skip the comparison with the eager model")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="load the model in this dtype, as transformers does (float16 keeps T5's wo in float32; "
                        "default: the checkpoint's own)")
    p.add_argument("--atol", type=float, help="validation tolerance, absolute term (default: 1e-5)")
    p.add_argument("--rtol", type=float, help="validation tolerance, relative term (default by dtype: float32 "
                                              "1.3e-6, float16 1e-3, bfloat16 1.6e-2)")
    p.add_argument("--seed", type=int, default=0, help="seed of random inputs and random weights (default: 0)")
    p.add_argument("--format", choices=("rich", "plain", "markdown", "json"),
                   help="report format on stdout (default: rich)")
    p.add_argument("--stages", type=int, metavar="N", help="also split the converted graph into N pipeline "
                   "stages at the family's block boundaries: a report table, importable stage_<i>.py files, pipeline.json, "
                   "config.json and the source's tokenizer files")
    p.add_argument("--balance", choices=("time", "params", "profile"), default="time",
                   help="what --stages evens out: predicted time at --seq-lengths (default), parameter bytes, "
                        "or time measured on this machine")
    p.add_argument("--seq-lengths", metavar="ENC,DEC", help="encoder and decoder tokens the stages are balanced "
                                                            "for (default: 512,128)")
    p.add_argument("--batch", type=int, metavar="B", help="sequences per microbatch the stages are balanced for "
                                                          "(default: 8)")
    p.add_argument("--max-memory", metavar="SIZE", help="memory of one GPU: no stage's predicted peak may exceed "
                   "it (11GiB, 500MiB, 12GB or plain bytes); with --recompute auto the split recomputes the least "
                   "it needs to fit")
    p.add_argument("--optimizer", choices=("sgd", "adamw", "adafactor"), help="optimizer whose state the plan "
                   "counts (default: adamw)")
    p.add_argument("--recompute", choices=("none", "full", "auto"), help="blocks that recompute their "
                   "activations in backward: none, every one, or what --max-memory needs (default: auto)")
    p.add_argument("--microbatches", type=int, metavar="M", help="microbatches per step the plan is for (default: "
                                                                  "at least 4, at least the stages)")
    p.add_argument("--schedule", choices=("1f1b", "gpipe"), help="pipeline schedule the plan is for (default: "
                                                                 "1f1b)")
    p.add_argument("--no-leaves", dest="leaves", action="store_false",
                   help="refuse data-dependent code instead of running its module as a leaf")
    p.add_argument("--diff", action="store_true", help="add a unified diff of the code before and after the "
                                                       "passes")
    verbosity = p.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="no progress; report only with --format")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="more detail, library logs, tracebacks")
    return p


def main(argv=None) -> int:
    """Run the command line; returns the exit code."""
    args, started, signals = None, time.time(), []
    try:
        with _interrupts(signals):
            args = build_parser().parse_args(argv)
            with _offline_env(args.offline):
                code = run(args)
            if signals:  # a library caught the KeyboardInterrupt and carried on
                raise KeyboardInterrupt
            return code
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else EXIT_OK
    except KeyboardInterrupt:
        return _interrupted(args, started)
    except BrokenPipeError:  # stdout closed early (| head): stop quietly, as rich does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
    except Exception as e:
        if signals:  # a library caught the KeyboardInterrupt and raised another error
            return _interrupted(args, started)
        if isinstance(e, FxConvertError):
            _fail(str(e), args)
            return EXIT_USAGE if isinstance(e, UsageError) else EXIT_FAILURE
        hint = "" if args is not None and args.verbose else " (rerun with -v for the traceback)"
        _fail(f"unexpected {type(e).__name__}: {first_line(e)}{hint}", args)
        return EXIT_FAILURE


@contextlib.contextmanager
def _interrupts(received: list):
    """Ctrl-C and SIGTERM alike raise KeyboardInterrupt, and are recorded in `received`.

    The record matters because some libraries catch a KeyboardInterrupt and raise another
    error, or carry on; the run must still end as interrupted.

    A signal that lands inside an import, or inside a finalizer (`__del__`, whose exception
    Python prints and drops), is held until that returns. Raised inside an import, it can
    cross C++ (torch's extension imports its Python modules through pybind11), which aborts
    the process ("terminate called after throwing an instance of
    'pybind11::error_already_set'") instead of printing the one line. A watcher thread
    delivers it again, to the main thread, once neither is running there.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    done = threading.Event()
    watching = []
    lock = threading.Lock()  # the watcher signals the main thread only while `done` is not set
    # The frames that run fxconvert: an import among them (a script that calls main() as it is
    # imported) is not one to wait for. Held, so that no later frame can take one's id.
    stack = _stack(sys._getframe())
    outer = {id(f) for f in stack}

    def interrupt(signum, frame):
        received.append(signum)
        if not _importing(frame, outer):
            raise KeyboardInterrupt
        if not watching:
            watching.append(threading.Thread(target=_redeliver, args=(signum, done, lock, watching, outer),
                                             daemon=True))
            watching[0].start()

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s, handler in previous.items():
        if handler is not signal.SIG_IGN:  # under nohup, or a background job: ignored stays ignored
            signal.signal(s, interrupt)
    try:
        yield
    finally:
        with lock:
            done.set()
        pending = None
        for s, handler in previous.items():  # signal.signal runs a pending handler first, this one
            try:
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)
            except KeyboardInterrupt as e:  # every handler is put back all the same
                pending = e
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        if pending is not None:
            raise pending


def _stack(frame) -> list:
    frames = []
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    return frames


def _importing(frame, outer: set) -> bool:
    """Whether `frame` runs where an exception must not be raised, below the frames `outer`: inside an import
    (importlib's frames in between), or inside a finalizer (`__del__`), whose exception Python prints as
    "Exception ignored" and drops, so the run would carry on as if never interrupted."""
    while frame is not None and id(frame) not in outer:
        if frame.f_code.co_filename.startswith("<frozen importlib") or frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _redeliver(signum: int, done: threading.Event, lock: threading.Lock, watching: list, outer: set) -> None:
    """Signal the main thread again once it runs no import nor finalizer (checked every 50 ms), unless the run
    has ended."""
    main = threading.main_thread().ident
    while not done.wait(0.05):
        if not _importing(sys._current_frames().get(main), outer):
            with lock:
                if done.is_set():
                    return
                watching.clear()  # the handler may defer again (another import began) and start a new watcher
                _thread.interrupt_main(signum)
            return


def _interrupted(args, started: float) -> int:
    _fail(f"interrupted; {_on_disk(args, started)}", args)
    return EXIT_INTERRUPTED


def _on_disk(args, started: float) -> str:
    """What an interrupted run leaves: its complete output (the commit is atomic), or nothing it wrote."""
    save = sys.modules.get("fxconvert.save")  # not imported: nothing was written
    if (save is not None and args is not None and (args.name or args.config)
            and save.is_own_output(_out_dir(args), since=started)):
        return f"the output in {_out_dir(args)} is complete"
    return "nothing was written"


def _out_dir(args):
    from pathlib import Path

    # Imported here, not at the top: fxconvert.load imports torch, which --help need not wait for.
    from fxconvert.load import short_name

    return Path(args.out) if args.out else Path("fxconvert-out") / short_name(args.name or args.config)


@contextlib.contextmanager
def _offline_env(offline: bool):
    """With --offline, HF_HUB_OFFLINE=1 for huggingface_hub and transformers during the run only."""
    previous = os.environ.get("HF_HUB_OFFLINE")
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if offline:
            if previous is None:
                os.environ.pop("HF_HUB_OFFLINE", None)
            else:
                os.environ["HF_HUB_OFFLINE"] = previous


def run(args) -> int:
    input_names, lengths = _checked(args)
    max_memory = _memory_plan(args)
    name, out = args.name if args.name is not None else args.config, _out_dir(args)
    # Imported here, not at the top: it imports torch, which --help and a usage error need not wait for.
    from fxconvert import workflow

    options = workflow.Options(
        offline=args.offline, meta=args.meta, attn=args.attn, seed=args.seed, dtype=args.dtype, allow_random=True,
        transformers_logs=args.verbose, random_weights_warning=False,  # the progress shows the model's notes
        input_names=input_names, output=args.output, leaves=args.leaves,
        validate=args.validate, atol=args.atol, rtol=args.rtol,
        validation_skipped_by=None if args.validate else "--no-validate",
        stages=args.stages, balance=args.balance, batch=args.batch, encoder_length=lengths[0],
        decoder_length=lengths[1], schedule=args.schedule or "1f1b", microbatches=args.microbatches,
        optimizer=args.optimizer or "adamw", recompute=args.recompute or "auto", max_memory=max_memory,
        diff=args.diff, force=args.force, force_name="--force")
    progress = Progress(enabled=not args.quiet, verbose=args.verbose,
                        show=lambda result: _show(result.report(detail=args.verbose), args))
    result = workflow.run(name, out, options=options, progress=progress)
    _show(result.report(detail=args.verbose), args)
    if not args.quiet:
        progress.console.print(_markup(f"Wrote {out}{os.sep} ({', '.join(result.saved.files)})"), highlight=False)
    return EXIT_OK


def _checked(args) -> tuple[list[str] | None, tuple[int | None, int | None]]:
    """The options a run cannot start with refused, one line each; the input names and sequence lengths parsed."""
    if (args.name is None) == (args.config is None):
        raise UsageError(f"give a model NAME or --config FILE.json{'' if args.name is None else ', not both'} "
                         f"(see {PROG} --help)")
    if args.config is not None and not os.path.isfile(args.config):
        raise UsageError(f"--config {args.config}: no such file")
    if args.stages is not None and args.stages < 1:
        raise UsageError(f"--stages must be at least 1, got {args.stages}")
    lengths = _seq_lengths(args.seq_lengths)
    if args.batch is not None and args.batch < 1:
        raise UsageError(f"--batch must be at least 1, got {args.batch}")
    for flag, value in (("--atol", args.atol), ("--rtol", args.rtol)):
        if value is not None and not 0 <= value < float("inf"):
            raise UsageError(f"{flag} must be a finite number >= 0, got {value}")
    if not 0 <= args.seed < 2**63:  # torch.manual_seed takes 64 bits, and validation seeds with seed + 1
        raise UsageError(f"--seed must be an integer from 0 to 2**63 - 1, got {args.seed}")
    input_names = [n.strip() for n in args.inputs.split(",") if n.strip()] if args.inputs is not None else None
    if input_names == []:
        raise UsageError("--inputs is empty; give comma-separated input names")
    return input_names, lengths


_PLAN_FLAGS = (("--max-memory", "max_memory"), ("--optimizer", "optimizer"), ("--recompute", "recompute"),
               ("--microbatches", "microbatches"), ("--schedule", "schedule"))
_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def _memory_plan(args) -> int | None:
    """The memory plan's options refused without --stages, and --max-memory in bytes (None when not given)."""
    given = [flag for flag, name in _PLAN_FLAGS if getattr(args, name) is not None]
    if given and args.stages is None:
        raise UsageError(f"{', '.join(given)} plan{'s' if len(given) == 1 else ''} a pipeline split; add --stages N")
    if args.microbatches is not None and args.microbatches < 1:
        raise UsageError(f"--microbatches must be at least 1, got {args.microbatches}")
    return memory_size(args.max_memory) if args.max_memory is not None else None


def memory_size(text: str) -> int:
    """'11GiB', '500MiB', '12GB', '1.5GiB' or plain bytes -> bytes (GiB = 1024^3, GB = 10^9)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", text)
    size = int(float(match.group(1)) * _UNITS[match.group(2).lower()]) if match and match.group(2).lower() in _UNITS \
        else 0
    if size < 1:
        raise UsageError(f"--max-memory takes a positive size such as 11GiB, 500MiB, 12GB or plain bytes, "
                         f"got {text!r}")
    return size


def _seq_lengths(text):
    """--seq-lengths ENC,DEC -> (ENC, DEC); None -> (None, None), the defaults."""
    if text is None:
        return None, None
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise UsageError(f"--seq-lengths takes two positive integers, encoder and decoder tokens, as ENC,DEC "
                         f"(e.g. 512,128), got {text!r}")
    return int(parts[0]), int(parts[1])


def _show(report, args) -> None:
    if args.quiet and args.format is None:
        return
    fmt = args.format or "rich"
    if fmt == "rich":
        from rich.console import Console

        report.print_rich(Console(highlight=False))
    else:
        sys.stdout.write(report.render(fmt))
        sys.stdout.flush()


class _Step:
    def __init__(self):
        self.detail = ""
        self.ok = True


class Progress:
    """One line per phase on stderr (a spinner while it runs, in a terminal); warnings stand out.

    The progress `fxconvert.workflow.run` reports to (`fxconvert.workflow.Progress` is the silent one).
    """

    def __init__(self, *, enabled: bool, verbose: bool, show=None):
        from rich.console import Console

        self.console = Console(stderr=True, highlight=False, soft_wrap=True)
        self.enabled = enabled
        self.verbose = verbose
        self.show = show  # shows a run's report when its validation failed, before the error line

    @contextlib.contextmanager
    def step(self, name: str, description: str, timings: dict):
        step = _Step()
        start = time.perf_counter()
        status = self.console.status(_markup(f"{description}...")) if self.enabled else contextlib.nullcontext()
        try:
            with status:
                yield step
        finally:  # on an exception, the error line that main() prints says what failed
            timings[name] = time.perf_counter() - start
        if self.enabled:
            mark = "[green]✓[/]" if step.ok else "[bold red]✗[/]"
            detail = step.detail if self.verbose or len(step.detail) < 100 else step.detail[:97] + "..."
            self.console.print(f"{mark} {name:<9}{_seconds(timings[name]):>9}  {_markup(detail)}", highlight=False)

    def warn(self, message: str) -> None:
        self.console.print(f"[bold yellow]warning:[/] {_markup(message)}", highlight=False)

    def failed(self, result) -> None:
        if self.show is not None:
            self.show(result)


def _markup(text: str) -> str:
    """Text for rich markup: control characters escaped, brackets quoted (a path may hold `[/x]`)."""
    from rich.markup import escape

    return escape(printable(text))


def _seconds(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def _fail(message: str, args) -> None:
    if args is not None and args.verbose:
        import traceback

        sys.stderr.write("".join(printable(line) + "\n" for line in traceback.format_exc().splitlines()))
    print(f"{PROG}: error: {printable(message)}", file=sys.stderr)
