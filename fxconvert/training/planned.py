"""What a conversion's plan (pipeline.json's `plan`) was made for, and whether a run departs from it.

A plan made for a memory target (`fxconvert NAME --stages N --max-memory SIZE`) predicts each
stage's peak at its sizes: sequences per microbatch, microbatches, schedule, sequence
lengths and optimizer. Sequence lengths are compared where the run caps them
(`--max-source-length`, `--max-target-length`); pre-tokenized data is taken as it is. A run that trains at other sizes may not fit where the plan said it
would, or may fit with room to spare: that is one warning line naming each difference, not
an error (a run at smaller sizes is a sound choice). A plan made without a target promised
nothing, so it is not compared.
"""

from pathlib import Path

from fxconvert import manifest
from fxconvert.errors import printable


def read(source) -> manifest.Plan | None:
    """The plan of a conversion directory (None for a name, a checkpoint, or a conversion without one).

    A pipeline.json that does not read is left to `training.model.load_model` to report.
    """
    path = Path(source).expanduser()
    if not (path / manifest.FILE).is_file():
        return None
    try:
        return manifest.read(path).plan
    except manifest.ManifestError:
        return None


def departures(plan: manifest.Plan | None, cfg) -> list[str]:
    """How the run `cfg` (its microbatches filled in) differs from what a plan with a memory target was made
    for; empty when it does not, or when there is no such plan."""
    if plan is None or plan.max_memory is None:
        return []
    out = []
    per_microbatch = cfg.batch // cfg.microbatches
    if per_microbatch > plan.batch:
        out.append(f"{per_microbatch} sequences per microbatch (the plan: {plan.batch})")
    if cfg.schedule != plan.schedule:
        out.append(f"--schedule {cfg.schedule} (the plan: {plan.schedule})")
    if cfg.microbatches > plan.microbatches:
        out.append(f"{cfg.microbatches} microbatches (the plan: {plan.microbatches})")
    limits = {"encoder_length": cfg.max_source_length, "sequence_length": cfg.max_source_length,
              "decoder_length": cfg.max_target_length}
    for name, tokens in plan.lengths.items():
        limit = limits.get(name)
        if limit is not None and limit > tokens:  # unset: the data's own lengths, not known here
            option = "--max-target-length" if name == "decoder_length" else "--max-source-length"
            out.append(f"{option} {limit} (the plan: {tokens} tokens)")
    return out


def warning(plan: manifest.Plan | None, cfg) -> str | None:
    """The one warning line for a run that departs from its plan, or None."""
    found = departures(plan, cfg)
    if not found:
        return None
    return (f"{printable(cfg.source)}'s plan fits {plan.max_memory:,} bytes per stage at its sizes, but this run "
            f"trains at {'; '.join(found)}: its memory may exceed the plan's; convert again with these sizes to "
            f"plan for them")


__all__ = ["read", "departures", "warning"]
