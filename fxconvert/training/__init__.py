"""The training side of fxconvert: `python -m fxconvert.train` (`fxconvert/train.py`) in modules named by the data path.

- `options` parses the command line once into a frozen `config.TrainConfig`; nothing below
  the entry point sees argparse.
- `config` checks the options against the launch (`Launch`) and gives the layout (`Topology`).
- `model` loads this rank's stages (stage files, or a conversion done here); `dataset` reads
  the data with the family's objective (`fxconvert.objectives`: collate, length rule, pad
  policy), `data` holds the batching contract.
- `schedules` builds the `torch.distributed.pipelining` schedule (one table).
- `run` prepares a run (every check before any process group or file), `loop` is the step
  loop, `faults` turns signals and failures into one line per rank, `metrics` writes
  metrics.jsonl and the progress line.
- `grad_sync` (tied weights, replicas, clipping), `checkpoint`, `heartbeat`, `run_lock`.
- `evaluate` (`--eval-data`: the eval loss, forward only) and `retention` (`--keep-last`, `--save-best`).
- `self_check`: `--self-check`, the same loop on a tiny random model against eager transformers.

This package's `__init__` imports nothing: a module of the package loads only what it needs.
"""
