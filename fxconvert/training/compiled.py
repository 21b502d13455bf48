"""`--compile`: each stage module this rank runs, `torch.compile(fullgraph=True)`, and the time compiling took.

The compiled module is the stage call's (`schedules.StageCall.stage`), never the stage's
own: the state dict, checkpoints, export and the tied-weight sync keep seeing the stage's
names (an `OptimizedModule` would prefix them with `_orig_mod.`), and torch's pipelining
schedules that cannot run compiled stages find the `OptimizedModule` and refuse it too.
`fullgraph=True` makes a graph break an error rather than a slower run: a converted graph
has none.

Compilation is lazy: a stage compiles its forward at its first call with a new batch shape
(a batch is padded to its own longest sequences, so a few shapes compile; after the second,
dynamic shapes) and its backward at the first backward. `compile_seconds` reads dynamo's
own counters of both, so the step that paid for a compile can say how long it took.
"""

from fxconvert.errors import UsageError

# torch's schedules (`get_schedule_class` names) that split a backward into its input and weight
# halves, which compiled stages cannot do: torch 2.13 refuses an OptimizedModule in each of them.
SPLIT_BACKWARD = frozenset({"InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV"})


def check(cfg, torch_schedule: str) -> None:
    """Refuse `--compile` with what cannot run compiled stages (`torch_schedule`: `--schedule`'s torch name)."""
    if not cfg.compile:
        return
    if torch_schedule in SPLIT_BACKWARD:
        raise UsageError(f"--compile cannot run with --schedule {cfg.schedule}, which splits each backward in two "
                         f"(torch refuses compiled stages there); drop --compile or choose --schedule 1f1b")
    if cfg.recompute == "full":
        raise UsageError("--compile cannot compile stages run under --recompute full (their blocks run as "
                         "checkpointed segments); drop --compile or pass --recompute none")


def check_recompute(cfg, recomputed: str | None) -> None:
    """Refuse `--compile` when `--recompute auto` chose blocks (the source's plan, known once the stages are
    loaded; `recomputed` is the line naming them, None when none is)."""
    if cfg.compile and recomputed:
        raise UsageError("--compile cannot compile stages whose blocks the plan recomputes (--recompute auto); "
                         "drop --compile or pass --recompute none")


def compile_seconds() -> float:
    """Seconds this process has spent compiling so far, forward graphs and backward graphs.

    Dynamo keeps these totals (`cumulative_time_spent_ns`) for its own report; 0.0 if a
    version of torch has no such counters (the run then reports no compile time).
    """
    try:
        from torch._dynamo.utils import cumulative_time_spent_ns
    except ImportError:
        return 0.0
    return sum(cumulative_time_spent_ns.get(k, 0.0) for k in ("entire_frame_compile", "entire_backward_compile")) / 1e9
