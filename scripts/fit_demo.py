#!/usr/bin/env python
"""A training run that fits a memory target only because the plan recomputes blocks (README, "Will it fit?").

    PYTHONPATH=. python scripts/fit_demo.py DIR --max-memory 290MiB

Writes a small T5 with random weights (`save_pretrained`) and 8 pre-tokenized examples of
256/64 tokens into DIR (a new directory), converts it into 2 stages with a memory plan for `--max-memory`
(AdamW, 1F1B, 4 microbatches of 2), then trains 2 steps with `--measure-memory` twice under
torchrun (2 ranks, one thread each): with the plan's recompute (`--recompute auto`) and with
`--recompute none`. Every command is printed before it runs; the end is a table of each
stage's measured peak (the run's second step) against the target. Without `--max-memory`
it converts with `--recompute none` and with `--recompute full` instead and prints both
plans, to choose a target between them.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import torch
from transformers import T5Config, T5ForConditionalGeneration

CONFIG = dict(vocab_size=8192, d_model=256, d_kv=64, d_ff=1024, num_layers=4, num_decoder_layers=4, num_heads=4,
              dropout_rate=0.1, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
SOURCE, TARGET, MICROBATCH, MICROBATCHES = 256, 64, 2, 4
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}


def run(argv: list) -> None:
    argv = [str(a) for a in argv]
    print("$ " + shlex.join(argv), flush=True)
    subprocess.run(argv, env=ENV, check=True)


def convert(ckpt: Path, out: Path, *extra) -> None:
    run([sys.executable, "-m", "fxconvert", ckpt, "--stages", 2, "--optimizer", "adamw", "--seq-lengths",
         f"{SOURCE},{TARGET}", "--batch", MICROBATCH, "--microbatches", MICROBATCHES, "--schedule", "1f1b",
         "--offline", "--no-validate", "--format", "plain", "--out", out, *extra])


def train(conv: Path, data: Path, out: Path, recompute: str) -> list[dict]:
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--local-addr", "127.0.0.1",
         "--nproc-per-node", 2, "-m", "fxconvert.train", conv, "--data", data, "--out", out, "--steps", 2,
         "--batch", MICROBATCH * MICROBATCHES, "--microbatches", MICROBATCHES, "--schedule", "1f1b",
         "--optimizer", "adamw", "--recompute", recompute, "--device", "cpu", "--no-export", "--measure-memory"])
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return sorted((r for r in lines if r.get("record") == "memory"), key=lambda r: r["rank"])


def write_inputs(root: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    T5ForConditionalGeneration(T5Config(**CONFIG)).save_pretrained(root / "ckpt")
    g = torch.Generator().manual_seed(0)
    with open(root / "train.jsonl", "w") as f:
        for _ in range(MICROBATCH * MICROBATCHES):
            f.write(json.dumps({"input_ids": torch.randint(2, CONFIG["vocab_size"], (SOURCE,), generator=g).tolist(),
                                "labels": torch.randint(2, CONFIG["vocab_size"], (TARGET,), generator=g).tolist()})
                    + "\n")
    return root / "ckpt", root / "train.jsonl"


def mib(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir", type=Path)
    p.add_argument("--max-memory", help="the memory target, as fxconvert takes it (e.g. 290MiB)")
    args = p.parse_args()
    if args.dir.exists():
        p.error(f"{args.dir} exists; give a directory to create (the demo writes a checkpoint, conversions and runs)")
    args.dir.mkdir(parents=True)
    ckpt, data = write_inputs(args.dir)
    if args.max_memory is None:
        for recompute in ("none", "full"):
            convert(ckpt, args.dir / f"conv_{recompute}", "--recompute", recompute)
        return
    convert(ckpt, args.dir / "conv", "--max-memory", args.max_memory, "--recompute", "auto")
    target = json.loads((args.dir / "conv" / "pipeline.json").read_text())["plan"]["max_memory"]
    peaks = {rec: train(args.dir / "conv", data, args.dir / f"run_{rec}", rec) for rec in ("auto", "none")}
    print(f"\nmeasured peak per stage (step 2) against --max-memory {args.max_memory} = {mib(target)}")
    for rec, records in peaks.items():
        cells = [f"stage {r['stages'][0]} {mib(r['peak_bytes'])} ({r['peak_bytes'] / target:.0%})" for r in records]
        fits = "fits" if all(r["peak_bytes"] <= target for r in records) else "exceeds"
        print(f"--recompute {rec:<5} " + ", ".join(cells) + f": {fits}")


if __name__ == "__main__":
    main()
