#!/usr/bin/env python
"""A PNG of a run's RUN/metrics.jsonl: the loss (and eval_loss, where the run evaluated) over the steps, the
learning rate and the gradient norm (README, "A real run"; docs/metrics.png was made by it).

    python scripts/plot_metrics.py run/metrics.jsonl docs/metrics.png

matplotlib is not a dependency of fxconvert (`pip install matplotlib`). Only the step records are
drawn (and the eval records; not the others with a "record", such as `--measure-memory`'s); a field no record has is left out.
"""

import argparse
import json
import sys
from pathlib import Path

PANELS = (("loss", ("loss", "eval_loss")), ("learning rate", ("lr",)), ("gradient norm", ("grad_norm",)))


def read(path: Path) -> list[dict]:
    """The step and eval records of a metrics.jsonl (a partial last line, as a killed run leaves, is skipped)."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and type(record.get("step")) is int and record.get("record", "eval") == "eval":
            records.append(record)
    return records


def plot(records: list[dict], out: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # a file, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(PANELS), 1, sharex=True, figsize=(6.4, 5.6), dpi=80)
    for ax, (label, fields) in zip(axes, PANELS):
        for field in fields:
            points = [(r["step"], r[field]) for r in records if isinstance(r.get(field), (int, float))]
            if points:
                ax.plot(*zip(*points), marker="o" if field == "eval_loss" else None, label=field)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if len(ax.get_lines()) > 1:
            ax.legend()
    axes[0].set_title(title)
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="plot a run's metrics.jsonl into a PNG")
    p.add_argument("metrics", type=Path, metavar="METRICS.jsonl")
    p.add_argument("out", type=Path, metavar="OUT.png")
    p.add_argument("--title", default=None, help="default: the metrics file's path")
    args = p.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("plot_metrics.py: error: this script draws with matplotlib, which is not installed; "
              "pip install matplotlib", file=sys.stderr)
        return 1
    try:
        records = read(args.metrics)
    except (OSError, UnicodeDecodeError) as e:
        print(f"plot_metrics.py: error: cannot read {args.metrics} ({getattr(e, 'strerror', None) or e})",
              file=sys.stderr)
        return 1
    if not records:
        print(f"plot_metrics.py: error: {args.metrics} has no step records; give a run's metrics.jsonl",
              file=sys.stderr)
        return 1
    plot(records, args.out, title=args.title or str(args.metrics))
    print(f"wrote {args.out} ({len(records)} records)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
