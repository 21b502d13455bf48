"""Launching `python -m fxconvert.train` under torchrun, and the eager transformers run it must equal.

The eager side is written from the batching contract of the issue, not from fxconvert's
code: batch k is lines k*B .. k*B+B-1 of the file (wrapping), padded to its longest input
(pad_token_id, attention_mask) and longest labels (-100); transformers' T5 builds the
decoder inputs from the labels itself. Each step accumulates the microbatches'
(torch.tensor_split) losses divided by M * R (R replicas: batches s*R .. s*R+R-1) and takes
one optimizer step (SGD, or the optimizer a test names).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file

import helpers

REPO = Path(__file__).resolve().parent.parent
VOCAB = helpers.VOCAB


# Ports that torchrun or a test binds later. A port the kernel hands out (bind to 0, close) can be
# taken again before it is bound, by any connection on the machine: the tests' own gloo connections
# use the ephemeral range too, and pytest-xdist runs two test processes at once. So each test process
# takes its ports from its own block below the ephemeral range (/proc/sys/net/ipv4/ip_local_port_range
# starts at 32768 by default), cycling so that two calls in one test differ, and skips ports in use.
_PORTS_PER_WORKER = 400
_next_port = 0


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _worker_index() -> int:
    """0 without pytest-xdist; n for its worker `gwn`."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(worker[2:]) if worker[2:].isdigit() else 0


def free_port() -> int:
    """A loopback port free now, from this test process's own block (see above)."""
    global _next_port
    base = _ephemeral_start() - _PORTS_PER_WORKER * (_worker_index() + 1)
    for _ in range(_PORTS_PER_WORKER):
        port = base + _next_port
        _next_port = (_next_port + 1) % _PORTS_PER_WORKER
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free loopback port in {base}..{base + _PORTS_PER_WORKER - 1}")


# `python -m fxconvert.train ARGS` in a process where every port picked by binding to port 0 is one that
# another program already listens on: what happens when a port picked first is taken before it is bound.
_PORTS_TAKEN = """
import socket, sys
taken = socket.socket()
taken.bind(("127.0.0.1", 0))
taken.listen()
port = taken.getsockname()[1]
socket.socket.getsockname = lambda self: ("127.0.0.1", port)
from fxconvert.train import main
sys.exit(main(sys.argv[1:]))
"""


def train_with_ports_taken(*train_args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _PORTS_TAKEN, *map(str, train_args)], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=timeout)


def env() -> dict:
    out = dict(os.environ)
    out.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    return out


def torchrun_command(nproc: int, *train_args, port: int | None = None, extra=()) -> list[str]:
    """`extra` with --rdzv-endpoint replaces the single-machine master address."""
    master = [] if "--rdzv-endpoint" in extra else ["--master-addr", "127.0.0.1", "--master-port",
                                                    str(port or free_port())]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), *master, *extra,
            "-m", "fxconvert.train", *map(str, train_args)]


def torchrun(nproc: int, *train_args, timeout=600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_command(nproc, *train_args, **kwargs), cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=timeout)


def write_checkpoint(directory) -> transformers.T5ForConditionalGeneration:
    """A tiny T5 with dropout 0, written by save_pretrained."""
    model = helpers.build(dropout_rate=0.0)
    model.save_pretrained(directory)
    return model


def write_jsonl(path, n=24, seed=1) -> list[dict]:
    """Pre-tokenized lines of varied lengths (so batches differ in shape), some labels ignored."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        src, tgt = int(torch.randint(2, 10, (1,), generator=g)), int(torch.randint(1, 7, (1,), generator=g))
        labels = torch.randint(1, VOCAB, (tgt,), generator=g).tolist()
        if tgt > 2 and torch.rand((), generator=g) < 0.3:
            labels[0] = -100
        rows.append({"input_ids": torch.randint(1, VOCAB, (src,), generator=g).tolist(), "labels": labels})
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def eager_batch(rows, batch_size, k, pad_token_id=0):
    picked = [rows[i % len(rows)] for i in range(k * batch_size, k * batch_size + batch_size)]
    width = max(len(r["input_ids"]) for r in picked)
    length = max(len(r["labels"]) for r in picked)
    input_ids = torch.full((len(picked), width), pad_token_id)
    mask = torch.zeros((len(picked), width), dtype=torch.long)
    labels = torch.full((len(picked), length), -100)
    for i, r in enumerate(picked):
        input_ids[i, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[i, :len(r["input_ids"])] = 1
        labels[i, :len(r["labels"])] = torch.tensor(r["labels"])
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


# The trainer's optimizers as torch defines them, weight decay 0 (`--weight-decay`'s default)
EAGER_OPTIMIZERS = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW, "adafactor": torch.optim.Adafactor}


def train_eager(checkpoint, rows, *, steps, batch, microbatches, dp=1, lr=0.5, max_grad_norm=None,
                clip=None, optimizer="sgd", scheduler=None, seen=None) -> tuple[list[float], dict[str, torch.Tensor]]:
    """(loss per step, final state dict) of eager T5ForConditionalGeneration, SGD unless `optimizer` names another
    (torch's, with its defaults and `lr`).

    `clip(model)` replaces the global clip_grad_norm_ (to show what a per-stage clip does).
    `scheduler(optimizer)` makes a learning-rate scheduler stepped after each optimizer step; `seen`, a
    list, gets each step's learning rate and gradient norm (before clipping) as {"lr", "grad_norm"}.
    """
    model = transformers.T5ForConditionalGeneration.from_pretrained(checkpoint).train()
    optimizer = EAGER_OPTIMIZERS[optimizer](model.parameters(), lr=lr, weight_decay=0.0)
    schedule = scheduler(optimizer) if scheduler is not None else None
    losses = []
    for step in range(steps):
        optimizer.zero_grad()
        total = 0.0
        for r in range(dp):
            b = eager_batch(rows, batch, step * dp + r)
            chunks = {k: torch.tensor_split(v, microbatches) for k, v in b.items()}
            for i in range(microbatches):
                loss = model(**{k: v[i] for k, v in chunks.items()}, use_cache=False).loss
                (loss / (microbatches * dp)).backward()
                total += loss.item() / (microbatches * dp)
        if seen is not None:
            norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
            seen.append({"lr": optimizer.param_groups[0]["lr"], "grad_norm": norm.item()})
        if clip is not None:
            clip(model)
        elif max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        if schedule is not None:
            schedule.step()
        losses.append(total)
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def weights_of(directory) -> dict[str, torch.Tensor]:
    """Every tensor of a transformers checkpoint as from_pretrained loads it (tied names included)."""
    model = transformers.T5ForConditionalGeneration.from_pretrained(directory)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def hf_files(run_dir) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted((Path(run_dir) / "hf").glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def max_weight_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def hooked_command(nproc: int, *train_args, port: int | None = None, extra=()) -> list[str]:
    """torchrun running `tests/train_hooked.py` (fxconvert.train with faults from HOOK_* variables)."""
    command = torchrun_command(nproc, *train_args, port=port, extra=extra)
    at = command.index("-m", 3)  # torchrun's own `-m torch.distributed.run` is the first
    return command[:at] + [str(Path(__file__).with_name("train_hooked.py"))] + command[at + 2:]
