"""A run that departs from the sizes its conversion's memory plan was made for gets one warning naming each
difference (`fxconvert.training.planned`); a plan without a memory target is not compared."""

import dataclasses

from fxconvert import manifest
from fxconvert.training import planned
from fxconvert.training.config import TrainConfig

PLAN = manifest.Plan(balance="time", batch=4, lengths={"encoder_length": 512, "decoder_length": 128},
                     schedule="1f1b", microbatches=8, bottleneck=0, bubble_fraction=0.4, step_seconds=1.0,
                     seconds=(1.0, 1.0), time_share=(0.5, 0.5), flops=(1, 1), peak_bytes=(1, 1),
                     optimizer="adafactor", max_memory=11 * 2**30, recompute=("encoder.block.0",))


def run(**changes):
    base = dict(source="conv\x1b", data="d.jsonl", out="run", batch=32, microbatches=8, schedule="1f1b",
                max_source_length=512, max_target_length=128)
    return TrainConfig(**{**base, **changes})


def test_a_run_at_the_plans_sizes_or_smaller_is_not_warned():
    assert planned.warning(PLAN, run()) is None
    assert planned.warning(PLAN, run(batch=16, max_source_length=256, max_target_length=64)) is None
    assert planned.warning(PLAN, run(max_source_length=None, max_target_length=None)) is None  # the data's own


def test_each_departure_is_named_in_one_line():
    line = planned.warning(PLAN, run(batch=64, schedule="gpipe", max_target_length=200))
    assert "\n" not in line and "\x1b" not in line  # the source is user text: escaped
    for needle in ("8 sequences per microbatch (the plan: 4)", "--schedule gpipe (the plan: 1f1b)",
                   "--max-target-length 200 (the plan: 128 tokens)", "11,811,160,064 bytes per stage",
                   "convert again with these sizes"):
        assert needle in line, line
    assert "--max-source-length" not in line
    assert planned.departures(PLAN, run(microbatches=16, batch=64)) == ["16 microbatches (the plan: 8)"]


def test_a_plan_without_a_memory_target_or_no_plan_is_not_compared():
    assert planned.warning(dataclasses.replace(PLAN, max_memory=None), run(batch=256, schedule="gpipe")) is None
    assert planned.warning(None, run(batch=256)) is None


def test_read_gives_none_for_a_name_or_an_unreadable_manifest(tmp_path):
    assert planned.read("t5-small") is None and planned.read(tmp_path) is None
    (tmp_path / manifest.FILE).write_text("{not json")
    assert planned.read(tmp_path) is None  # the loader reports it, with its fix
