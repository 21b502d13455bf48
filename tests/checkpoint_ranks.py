"""Gloo ranks that save one checkpoint, for tests/test_checkpoint.py.

Kept apart from the test module so that each spawned process imports torch and fxconvert
only, not transformers.
"""

import multiprocessing
import os
from datetime import timedelta

import torch

from fxconvert.training.checkpoint import rng_state, save_checkpoint

META = {"num_stages": 2, "dp": 1, "virtual_stages": 1, "schedule": "1f1b", "model": "conv", "data_position": 4}


def toy_states(value=0.0, num_stages=2):
    return {i: {"model": {"w": torch.full((3,), value + i)}, "optimizer": {"state": {}, "param_groups": []}}
            for i in range(num_stages)}


def _rank(rank, run_dir, init_file, step, die_at_barrier):
    """Rank `rank` of 2 saving step `step`; rank 1 dies (os._exit(3)) at its `die_at_barrier`-th barrier."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                                         timeout=timedelta(seconds=30))
    calls = []

    def barrier():
        calls.append(1)
        if rank == 1 and len(calls) == die_at_barrier:
            os._exit(3)
        torch.distributed.barrier()

    torch.manual_seed(step * 10 + rank)
    save_checkpoint(run_dir, step, rank=rank, world_size=2, states={rank: toy_states(float(step))[rank]},
                    rng=rng_state(), meta=dict(META), barrier=barrier)
    torch.distributed.destroy_process_group()


def run_ranks(run_dir, init_file, step, die_at_barrier=0) -> list[int]:
    """Exit codes of the two ranks; a rank still alive after 120 s is killed and reported as None."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(r, str(run_dir), str(init_file), step, die_at_barrier))
             for r in range(2)]
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        for p in procs:
            p.start()
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = old
    for p in procs:
        p.join(120)  # a hang guard only: the collective timeout is 30 s
    codes = []
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
            codes.append(None)
        else:
            codes.append(p.exitcode)
    return codes
