"""The training objectives are objects the family records own (`fxconvert.objectives`): each one collates its
batches and holds its length rule and pad policy, and no module chooses by an objective's name.
(The batches themselves are checked against eager transformers in test_data.py and test_train_families.py.)"""

import ast
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from fxconvert import families
from fxconvert.errors import UsageError
from fxconvert.objectives import CAUSAL_LM, CLASSIFICATION, MASKED_LM, OBJECTIVES, SEQ2SEQ, Objective
from fxconvert.training.data import Example

PACKAGE = Path(__file__).resolve().parents[1] / "fxconvert"
TRAINED = [f for f in families.all_families() if f.objective is not None]


def name_constants(path: Path) -> list[str]:
    """`line: 'name'` for every string constant of `path` that is an objective's name."""
    names = {o.name for o in OBJECTIVES}
    return [f"{node.lineno}: {node.value!r}" for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, ast.Constant) and node.value in names]


def test_no_module_chooses_by_an_objective_name():
    """A new objective is one class in fxconvert/objectives.py: no other module spells a name to compare it."""
    found = {str(p.relative_to(PACKAGE)): hits for p in sorted(PACKAGE.rglob("*.py"))
             if p.name != "objectives.py" and (hits := name_constants(p))}
    assert not found, f"ask the objective (fxconvert.objectives.Objective) instead: {found}"


def test_the_check_finds_a_name(tmp_path):
    source = tmp_path / "leak.py"
    source.write_text('def f(objective):\n    return objective == "causal" or objective.name == "seq2seq"\n')
    assert name_constants(source) == ["2: 'causal'", "2: 'seq2seq'"]


@pytest.mark.parametrize("family", TRAINED, ids=lambda f: f.name)
def test_a_record_owns_an_objective_that_builds_its_train_inputs(family):
    """The objective's batch is exactly what the family's first stage is fed (`Family.train_inputs`)."""
    objective = family.objective
    assert isinstance(objective, Objective) and objective in OBJECTIVES
    config = {"pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}
    batch = objective.collate([Example([5, 6], [7, 8])], **objective.token_ids(config, 97))
    assert sorted(batch) == sorted(family.train_inputs)


@pytest.mark.parametrize("objective", OBJECTIVES, ids=lambda o: o.name)
def test_an_objectives_batch_holds_exactly_its_batch_keys(objective):
    """family.json's train_inputs are checked against `batch_keys` (`fxconvert.families.stored`): they must be what
    `collate` returns."""
    config = {"pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}
    batch = objective.collate([Example([5, 6], [7, 8])], **objective.token_ids(config, 97))
    assert sorted(batch) == sorted(objective.batch_keys)


def test_a_record_survives_a_copy_with_its_objective():
    """A record pickled to another process compares equal: an objective is equal to its copies, not only itself."""
    for family in families.all_families():
        copy = pickle.loads(pickle.dumps(family))
        assert copy == family and hash(copy.objective) == hash(family.objective)
    assert len(set(OBJECTIVES)) == 4 and SEQ2SEQ != CAUSAL_LM != CLASSIFICATION


@pytest.mark.parametrize("objective, config, expected", [
    (SEQ2SEQ, {"pad_token_id": 0, "decoder_start_token_id": 2}, {"pad_token_id": 0, "decoder_start_token_id": 2}),
    (CAUSAL_LM, {"pad_token_id": 3, "eos_token_id": 1}, {"pad_token_id": 3}),
    (CAUSAL_LM, {"pad_token_id": None, "eos_token_id": [1, 2]}, {"pad_token_id": 1}),  # GPT-2, Llama: eos pads
    (MASKED_LM, {"pad_token_id": 0, "decoder_start_token_id": None}, {"pad_token_id": 0}),
    (CLASSIFICATION, {"pad_token_id": 0, "eos_token_id": 1}, {"pad_token_id": 0}),
])
def test_the_pad_policy_takes_the_ids_its_batches_need(objective, config, expected):
    assert objective.token_ids(config, 97) == expected


@pytest.mark.parametrize("objective, config, message", [
    (SEQ2SEQ, {"pad_token_id": 0}, "the model's config has decoder_start_token_id = None; set it in config.json"),
    (MASKED_LM, {"eos_token_id": 1}, "the model's config has pad_token_id = None; set it in config.json"),
    (CAUSAL_LM, {"eos_token_id": 97}, "the model's config has eos_token_id = 97, outside its vocabulary (vocab_size "
                                      "97); set pad_token_id in config.json to a token id below 97"),
    # a decoder-only classifier pools the last token that is not pad_token_id: eos cannot stand in for it
    (CLASSIFICATION, {"eos_token_id": 1}, "the model's config has pad_token_id = None; set it in config.json"),
])
def test_the_pad_policy_refuses_in_one_line(objective, config, message):
    with pytest.raises(UsageError) as info:
        objective.token_ids(config, 97)
    assert str(info.value) == message


def test_the_length_rule_counts_the_positions_an_example_takes():
    example = Example([1, 2, 3], [4, 5])
    assert (SEQ2SEQ.length(example), CAUSAL_LM.length(example)) == (3, 5)  # two sequences; one, input then target
    assert MASKED_LM.length(Example([1, 2, 3], [-100, 5, -100])) == 3


@pytest.mark.parametrize("config, expected", [
    ({"id2label": {"0": "neg", "1": "pos", "2": "neutral"}, "problem_type": "single_label_classification"}, 3),
    ({"num_labels": 4}, 4),
    ({}, 2),  # transformers' default
])
def test_a_classifier_takes_the_class_ids_its_config_counts(config, expected):
    assert CLASSIFICATION.classes(config) == expected
    assert SEQ2SEQ.classes(config) is None  # no class ids in its lines


@pytest.mark.parametrize("config, message", [
    ({"problem_type": "regression", "id2label": {"0": "x"}}, "the model's config has problem_type = 'regression', "
     "whose loss is not a cross-entropy over class ids; fxconvert.train trains single-label classification: "
     "convert a model with problem_type \"single_label_classification\" (or none)"),
    ({"problem_type": "multi_label_classification"}, "problem_type = 'multi_label_classification', whose loss"),
    ({"problem_type": "x\n" * 100_000}, "problem_type = " + repr("x\n" * 100_000)[:80] + "..., whose loss"),
    ({"id2label": {"0": "score"}}, "the model's config has 1 labels, and transformers trains one label as a "
     "regression (mean squared error); give the model at least 2 labels (id2label in config.json) and convert it "
     "again"),
])
def test_a_classifier_whose_loss_is_no_classification_is_refused_in_one_line(config, message):
    with pytest.raises(UsageError) as info:
        CLASSIFICATION.classes(config)
    assert message in str(info.value) and "\n" not in str(info.value) and len(str(info.value)) < 400


def test_importing_the_records_loads_neither_torch_nor_transformers():
    code = ("import json, sys, fxconvert.families as f; f.all_families(); "
            "print(json.dumps([m for m in ('torch', 'transformers') if m in sys.modules]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=PACKAGE.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout) == []


def test_the_reader_takes_an_objective_not_its_name(tmp_path):
    """The name is for messages: a caller passing "causal" learns in one line what to pass instead."""
    from fxconvert.training.data import read_jsonl

    path = tmp_path / "d.jsonl"
    path.write_text('{"input_ids": [1, 2], "labels": [3, 4]}\n')
    assert read_jsonl(path, objective=CAUSAL_LM)[0].labels == [3, 4]
    with pytest.raises(UsageError, match=r"^unknown data objective 'causal'; give one of fxconvert.objectives.OBJECTIVES$"):
        read_jsonl(path, objective="causal")
