"""family.json (`fxconvert.families.stored`): a derived record written by the conversion, rebuilt on a rank.

The rank reads a file a user may have edited: every malformed field is one line naming it,
and a record without an objective (a head that computes no loss) is refused in one line naming what
trains.
"""

import json
import os
from pathlib import Path

import pytest
import transformers

from fxconvert import families
from fxconvert.errors import UsageError
from fxconvert.families import derived, stored
from fxconvert.objectives import CAUSAL_LM, CLASSIFICATION
from fxconvert.training import model as rank_model

CLASS = "OPTForCausalLM"


@pytest.fixture(scope="module")
def record():
    return derived.derive(transformers.OPTForCausalLM, derived.tiny_config("opt"), blocks=False)


@pytest.fixture(autouse=True)
def own_registry(monkeypatch):
    """What a test registers stays in the test."""
    monkeypatch.setattr(families, "_DERIVED", dict(families._DERIVED))


def write(tmp_path, data) -> None:
    (tmp_path / stored.FILE).write_text(data if isinstance(data, str) else json.dumps(data))


def test_a_rank_rebuilds_what_it_reads_of_the_record(tmp_path, record):
    write(tmp_path, stored.family_text(record))
    rebuilt = stored.read_family(tmp_path, CLASS, "opt")
    for field in ("classes", "train_inputs", "objective", "max_length", "position_offset", "hidden_field",
                  "positive_int_fields", "max_layers_fields", "derived_from"):
        assert getattr(rebuilt, field) == getattr(record, field), field
    assert dict(rebuilt.inputs) == dict(record.inputs) and dict(rebuilt.sequence_lengths) == dict(
        record.sequence_lengths)
    assert rebuilt.objective == CAUSAL_LM


def test_the_rank_registers_the_rebuilt_record_by_class_name(tmp_path, record, monkeypatch):
    monkeypatch.setattr(families, "_DERIVED", {})  # a rank: nothing converted in this process
    write(tmp_path, stored.family_text(record))
    rank_model._derived_record(tmp_path, CLASS, "opt")
    assert families.family_of_class(CLASS).train_inputs == record.train_inputs


def test_a_classifiers_record_travels_and_is_registered(tmp_path, monkeypatch):
    """A derived sequence classifier (RoBERTa's: one class id per row) trains from its conversion like a causal LM."""
    record = derived.derive(transformers.RobertaForSequenceClassification, derived.tiny_config("roberta"),
                            blocks=False)
    assert record.objective == CLASSIFICATION and record.inputs["labels"] == ("class", "encoder")
    monkeypatch.setattr(families, "_DERIVED", {})  # a rank: nothing converted in this process
    write(tmp_path, stored.family_text(record))
    rank_model._derived_record(tmp_path, "RobertaForSequenceClassification", "roberta")
    rebuilt = families.family_of_class("RobertaForSequenceClassification")
    assert rebuilt.objective == CLASSIFICATION and dict(rebuilt.inputs) == dict(record.inputs)
    assert rebuilt.train_inputs == ("input_ids", "attention_mask", "labels")


def test_a_classifiers_train_inputs_no_batch_holds_are_refused_in_one_line(tmp_path):
    """A classifier's batches hold no token_type_ids: a family.json that feeds them is refused when the rank reads it,
    not mid-run."""
    record = derived.derive(transformers.RobertaForSequenceClassification, derived.tiny_config("roberta"),
                            blocks=False)
    data = stored.family_data(record)
    assert "token_type_ids" in data["inputs"] and "token_type_ids" not in data["train_inputs"]
    write(tmp_path, {**data, "train_inputs": [*data["train_inputs"], "token_type_ids"]})
    with pytest.raises(UsageError) as e:
        rank_model._derived_record(tmp_path, "RobertaForSequenceClassification", "roberta")
    assert str(e.value) == (f"{tmp_path / stored.FILE}: train_inputs must be names the classification objective's "
                            f"batches hold (input_ids, attention_mask, labels), not token_type_ids; convert again "
                            f"with --stages N")


HOSTILE = {
    "not an object": ([], "does not hold a JSON object"),
    "a field missing": ({"drop": "objective"}, "has no objective"),
    "an unknown field": ({"set": {"run": "x"}}, "unknown fields (run)"),
    "an unknown objective": ({"set": {"objective": "telepathy"}}, "objective must be one of seq2seq, causal, masked"),
    "an objective of another type": ({"set": {"objective": 1}}, "objective must be one of"),
    "classification spelled otherwise": ({"set": {"objective": "Classification"}}, "objective must be one of seq2seq, "
                                         "causal, masked, classification or null"),
    "classification as a list": ({"set": {"objective": ["classification"]}}, "objective must be one of"),
    "classification of token labels": ({"set": {"objective": "classification"}},
                                       'objective must be "classification" exactly where the labels are of kind '
                                       '"class"'),
    "class labels of a causal LM": ({"set": {"inputs": {"input_ids": ["ids", "encoder"],
                                                        "attention_mask": ["mask", "encoder"],
                                                        "labels": ["class", "encoder"]}}},
                                    'objective must be "classification" exactly where'),
    "class ids for input ids": ({"set": {"inputs": {"input_ids": ["class", "encoder"], "labels": ["class", "encoder"]},
                                          "objective": "classification", "train_inputs": ["input_ids", "labels"]}},
                                 'inputs must be of kind "class" only for labels'),
    "inputs as a list": ({"set": {"inputs": ["input_ids"]}}, "inputs must be an object of 1 to 64 input names"),
    "no inputs": ({"set": {"inputs": {}}}, "inputs must be an object of 1 to 64 input names"),
    "too many inputs": ({"set": {"inputs": {f"x{i}": ["ids", "encoder"] for i in range(65)}}}, "inputs must be"),
    "an unknown kind": ({"set": {"inputs": {"input_ids": ["pixels", "encoder"]}}}, "inputs must be [kind, sequence]"),
    "an input name with a newline": ({"set": {"inputs": {"input\nids": ["ids", "encoder"]}}}, "inputs must be"),
    "train inputs not among inputs": ({"set": {"train_inputs": ["pixel_values"]}},
                                      "train_inputs must be a list of names among inputs"),
    "train inputs no causal batch holds": ({"set": {"inputs": {"input_ids": ["ids", "encoder"],
                                                               "attention_mask": ["mask", "encoder"],
                                                               "token_type_ids": ["type_ids", "encoder"],
                                                               "labels": ["ids", "encoder"]},
                                                    "train_inputs": ["input_ids", "attention_mask", "token_type_ids",
                                                                     "labels"]}},
                                           "train_inputs must be names the causal objective's batches hold "
                                           "(input_ids, attention_mask, labels), not token_type_ids"),
    "train inputs as a string": ({"set": {"train_inputs": "input_ids"}}, "train_inputs must be a list of at most"),
    "a long name": ({"set": {"max_length": "m" * 101}}, "max_length must be a config field name or \"\""),
    "a number for a field name": ({"set": {"max_length": 10**30}}, "max_length must be a config field name"),
    "null for a field name": ({"set": {"hidden_field": None}}, "hidden_field must be a config field name"),
    "a number for the position offset": ({"set": {"position_offset": 2}}, "position_offset must be a config field"),
    "size fields as a string": ({"set": {"positive_int_fields": "vocab_size"}}, "positive_int_fields must be"),
    "an unnamed sequence": ({"set": {"sequence_lengths": {}}}, "sequence_lengths must be an object naming"),
    "another class": ({"set": {"model_class": "GPT2LMHeadModel"}},
                      "is the record of GPT2LMHeadModel, but the stages are a OPTForCausalLM"),
    "a class name with a control character": ({"set": {"model_class": "OPT\x1b[2J"}},
                                              "model_class must be a class name"),
    "malformed JSON": ('{"model_class": ', "malformed JSON"),
    "deep nesting": ("[" * 50000, "malformed JSON"),
    "not UTF-8": ("\udcff", "malformed JSON"),
    "a huge file": (" " * (stored.MAX_BYTES + 1), f"is larger than {stored.MAX_BYTES} bytes"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_family_json_is_one_line_naming_the_field(tmp_path, record, case):
    change, expected = HOSTILE[case]
    if isinstance(change, dict):
        data = stored.family_data(record)
        data.pop(change.get("drop"), None)
        data.update(change.get("set", {}))
        change = data
    if isinstance(change, str) and "\udcff" in change:
        (tmp_path / stored.FILE).write_bytes(b'{"model_class": "\xff"}')
    else:
        write(tmp_path, change)
    before = families._DERIVED.get(CLASS)
    with pytest.raises(UsageError) as e:
        rank_model._derived_record(tmp_path, CLASS, "opt")
    message = str(e.value)
    assert "\n" not in message and "\x1b" not in message and len(message) < 400, message
    assert expected in message and message.endswith("; convert again with --stages N"), message
    assert families._DERIVED.get(CLASS) is before  # nothing registered from it


def test_a_missing_or_irregular_family_json_is_one_line(tmp_path):
    with pytest.raises(UsageError) as e:
        rank_model._derived_record(tmp_path, CLASS, "opt")
    assert str(e.value) == (f"{tmp_path}{os.sep} has no family.json (the record {CLASS} was converted with, derived "
                            f"from transformers' declarations); convert again with --stages N")
    os.mkfifo(tmp_path / stored.FILE)  # would block the rank that opened it
    with pytest.raises(UsageError) as e:
        rank_model._derived_record(tmp_path, CLASS, "opt")
    assert str(e.value) == f"{tmp_path / stored.FILE} is not a regular file; convert again with --stages N"


@pytest.mark.parametrize("objective", ["masked", "seq2seq"])
def test_a_derived_record_of_every_objective_is_registered_for_training(tmp_path, record, objective):
    write(tmp_path, {**stored.family_data(record), "objective": objective})
    rank_model._derived_record(tmp_path, CLASS, "opt")
    assert families.family_of_class(CLASS).objective.name == objective


def test_a_derived_record_without_an_objective_is_refused_in_one_line(tmp_path, record):
    write(tmp_path, {**stored.family_data(record), "objective": None})
    before = families._DERIVED.get(CLASS)
    with pytest.raises(UsageError) as e:
        rank_model._derived_record(tmp_path, CLASS, "opt")
    trained = ", ".join(f.title.split(" (")[0] for f in families.all_families() if f.objective is not None)
    assert str(e.value) == (f"training a opt model whose record has no objective needs a hand-written family record, "
                            f"which {CLASS} has not; fxconvert.train trains the causal LMs, seq2seq models, masked LMs "
                            f"and sequence classifiers of derived records (a *ForCausalLM, *ForConditionalGeneration, "
                            f"*ForMaskedLM or *ForSequenceClassification class) and {trained} models")
    assert families._DERIVED.get(CLASS) is before  # nothing registered from it


@pytest.mark.parametrize("model_type", sorted(rank_model.LAST_TOKEN_START))
def test_a_seq2seq_type_whose_decoder_starts_with_the_last_label_is_refused_in_one_line(tmp_path, record,
                                                                                          model_type):
    """mBART's model shifts labels into decoder inputs by wrapping each row's last token (its language id) to the
    front; the seq2seq batches start with decoder_start_token_id, so training would match no eager step."""
    write(tmp_path, {**stored.family_data(record), "objective": "seq2seq"})
    with pytest.raises(UsageError) as e:
        rank_model._derived_record(tmp_path, CLASS, model_type)
    assert str(e.value) == (f"training a {model_type} model needs a hand-written family record, which {CLASS} has "
                            f"not: its decoder starts with each row's last label token (the language id), not the "
                            f"decoder_start_token_id the seq2seq batches start with; train another derived seq2seq "
                            f"type (marian, pegasus, m2m_100, ...)")


def test_the_types_refused_for_their_decoder_start_are_those_whose_shift_takes_no_start_token():
    """LAST_TOKEN_START against transformers: of the derived seq2seq types, exactly those whose module's
    shift_tokens_right takes no decoder_start_token_id (the others shift behind that id, as the batches do)."""
    import importlib
    import inspect

    types = json.loads((Path(__file__).parent / "conformance_derived.json").read_text())["types"]
    seq2seq = [t["type"] for t in types if t["kind"] == "encoder-decoder"]
    assert {"marian", "mbart", "plbart"} <= set(seq2seq)  # the listing still names them
    wraps = set()
    for name in seq2seq:
        module = importlib.import_module(f"transformers.models.{name.replace('-', '_')}.modeling_"
                                         f"{name.replace('-', '_')}")
        shift = getattr(module, "shift_tokens_right", None)
        if shift is not None and "decoder_start_token_id" not in inspect.signature(shift).parameters:
            wraps.add(name)
    assert wraps == set(rank_model.LAST_TOKEN_START)
