"""The heads a type's hand-written record does not list, and sequence classifiers, converted through
derived records (`fxconvert.families.derived`).

- `*ForSequenceClassification` of hand-written types (BERT, GPT-2, Llama) and of derived ones
  (RoBERTa, OPT): labels are one class id per row; a decoder-only classifier pools each row's
  last token that is not pad_token_id, so the rows are padded on the right with pad_token_id.
- `BartForCausalLM` and `BertLMHeadModel`: other classes of hand-written types, whose derived
  records carry over the hand-written record's rules (BART's LayerDrop refusal, its config checks).

Each converts with the loss, the logits and every gradient equal to eager at 1e-5, at two padded
shapes, in eval and in train mode (dropout on, the same seed). Nothing here trains: the classifiers train
from their conversions with stages (tests/test_train_families.py), and a checkpoint given to fxconvert.train
as SOURCE is refused in one line.
"""

import functools

import pytest
import torch
import transformers

from fxconvert import families, load
from fxconvert.errors import ModelResolutionError, TraceError
from fxconvert.families import derived
from fxconvert.objectives import CAUSAL_LM, CLASSIFICATION
from fxconvert.trace import family_of
from fxconvert.workflow import convert

from helpers import grads_of, seeded

NUM_LABELS = 3
# (batch, length, padded tokens at the end of the first row)
SHAPES = [(2, 7, 2), (3, 12, 3)]
CLASSES = ["BertForSequenceClassification", "GPT2ForSequenceClassification", "LlamaForSequenceClassification",
           "RobertaForSequenceClassification", "OPTForSequenceClassification", "BartForCausalLM", "BertLMHeadModel"]


def tiny_config(cls_name, **overrides):
    """The tiny config of the class's type: the hand-written record's where the type has one, else shrunk
    defaults; a classifier gets NUM_LABELS labels and every config a pad token."""
    cls = getattr(transformers, cls_name)
    model_type = cls.config_class.model_type
    written = families.model_types().get(model_type)
    config = (transformers.AutoConfig.for_model(**written.tiny_config(model_type)) if written
              else derived.tiny_config(model_type))
    config.pad_token_id = 0 if config.pad_token_id is None else config.pad_token_id
    config.num_labels = NUM_LABELS
    config.is_decoder = cls_name == "BertLMHeadModel"
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def classifies(cls_name) -> bool:
    return cls_name.endswith("ForSequenceClassification")


class Case:
    """One class's tiny model (eval mode) and its conversions, keeping the loss and the logits."""

    def __init__(self, cls_name):
        self.cls_name = cls_name
        torch.manual_seed(0)
        self.model = getattr(transformers, cls_name)(tiny_config(cls_name)).eval()
        with torch.no_grad():  # a lost bias or norm must change the result
            for p in self.model.parameters():
                if p.dim() == 1:
                    p.add_(0.1 * torch.randn_like(p))

    @functools.cached_property
    def loss(self):
        return convert(self.model)

    @functools.cached_property
    def logits(self):
        return convert(self.model, input_names=["input_ids", "attention_mask"])

    def inputs(self, shape, seed):
        """Right-padded rows: pad_token_id where the mask is 0, so a classifier pools the real last token."""
        batch, length, pad = shape
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, self.model.config.vocab_size, (batch, length), generator=g)
        mask = torch.ones_like(ids)
        mask[0, -pad:] = 0
        mask[-1, -1:] = 0
        ids[mask == 0] = self.model.config.pad_token_id
        if classifies(self.cls_name):
            labels = torch.randint(0, NUM_LABELS, (batch,), generator=g)
        else:
            labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.fixture(scope="module", params=CLASSES)
def case(request):
    return Case(request.param)


def test_the_record_carries_the_types_rules(case):
    """A class of a hand-written type converts with a record derived for it that keeps the type's checks;
    a classifier's labels are a class id per row."""
    record = family_of(case.model)
    assert families.family_of_class(case.cls_name) is record and record.derived_from == case.cls_name and record.classes == (case.cls_name,)
    written = families.model_types().get(case.model.config.model_type)
    if written is not None:
        assert record.check_config is written.check_config and record.rate_fields == written.rate_fields
    assert record.inputs["labels"][0] == ("class" if classifies(case.cls_name) else "ids")
    # the objective is the class's (transformers' auto mappings), never the hand-written record's LM objective
    assert record.objective == (CLASSIFICATION if classifies(case.cls_name) else CAUSAL_LM)
    assert set(record.sequence_lengths) == {"encoder"}  # one sequence, BartForCausalLM's too


@pytest.mark.parametrize("mode", ("eval", "train"))
def test_convert_matches_eager_with_every_gradient(case, mode):
    model = case.model
    for conversion, kept in ((case.loss, "loss"), (case.logits, "logits")):
        assert conversion.output_name == kept
        module = conversion.module
        model.train(mode == "train")
        module.train(mode == "train")
        try:
            for i, shape in enumerate(SHAPES):
                inputs = {n: v for n, v in case.inputs(shape, seed=i).items() if n in conversion.input_names}
                run_eager = seeded(lambda: {kept: getattr(model(**inputs, use_cache=False), kept)}, i)
                run_converted = seeded(lambda: {kept: module(**inputs)}, i)
                with torch.no_grad():
                    expected, actual = run_eager()[kept], run_converted()[kept]
                    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)
                expected, actual = grads_of(model, run_eager), grads_of(model, run_converted)
                assert expected and set(actual) == set(expected), sorted(set(actual) ^ set(expected))
                for name in expected:
                    torch.testing.assert_close(actual[name], expected[name], atol=1e-5, rtol=1e-4,
                                               msg=lambda m, name=name: f"{mode} {kept} {shape} {name}: {m}")
        finally:
            model.eval()
            module.eval()


def test_a_classifier_pools_the_last_real_token():
    """The pooled row is the last token that is not pad_token_id: the logits of a row padded on the right
    equal those of the row cut to its real tokens (a fact of eager's pooling that the graph keeps)."""
    case = Case("GPT2ForSequenceClassification")
    inputs = case.inputs(SHAPES[0], seed=0)
    module = case.logits.module
    with torch.no_grad():
        padded = module(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])[0]
        real = int(inputs["attention_mask"][0].sum())
        cut = module(input_ids=inputs["input_ids"][:1, :real], attention_mask=inputs["attention_mask"][:1, :real])
    torch.testing.assert_close(padded, cut[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("key", ["decoder_layerdrop", "encoder_layerdrop"])
def test_bart_for_causal_lm_keeps_the_layerdrop_refusal(key):
    model = transformers.BartForCausalLM(tiny_config("BartForCausalLM", **{key: 0.1}))
    with pytest.raises(TraceError) as e:
        convert(model)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"cannot trace BartForCausalLM: {key} is 0.1: ")
    assert f"set {key}=0 in the config" in message


def test_bart_for_causal_lm_keeps_the_config_rules():
    config = {**families.model_types()["bart"].tiny_config("bart"), "architectures": ["BartForCausalLM"],
              "normalize_before": True}
    with pytest.raises(ModelResolutionError) as e:
        load.check_config(config, "config.json")
    assert str(e.value).startswith("invalid config in config.json: normalize_before is True; set it to false")


def test_a_decoder_only_classifier_without_a_pad_token_is_refused_in_one_line():
    config = tiny_config("LlamaForSequenceClassification", pad_token_id=None)
    with pytest.raises(TraceError) as e:
        convert(transformers.LlamaForSequenceClassification(config))
    assert str(e.value) == (
        "cannot trace LlamaForSequenceClassification: it classifies each row by its last token that is not "
        "pad_token_id, which the config does not set (eager then accepts only a batch of one); set pad_token_id "
        "in the config")


def test_training_a_classifier_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    from fxconvert.train import main

    transformers.BertForSequenceClassification(tiny_config("BertForSequenceClassification")).save_pretrained(
        tmp_path / "ckpt")
    (tmp_path / "train.jsonl").write_text('{"input_ids": [5, 6, 7], "labels": [1]}\n' * 4)
    capsys.readouterr()  # what saving printed
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    argv = [str(tmp_path / "ckpt"), "--data", str(tmp_path / "train.jsonl"), "--out", str(tmp_path / "run"),
            "--steps", "1", "--batch", "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(
        "fxconvert.train: error: training a bert model needs a hand-written family record, which "
        "BertForSequenceClassification has not")
    assert not (tmp_path / "run").exists()


def test_a_classifier_converts_to_files_in_stages(tmp_path, capsys):
    """The CLI's validation (padded random inputs) and the split's cost analysis size a class-id label as one per
    row: both failed on its missing sequence dimension, so a classifier could not be written in stages."""
    from helpers import cli_convert

    report = cli_convert(Case("GPT2ForSequenceClassification").model, tmp_path, capsys, "--stages", 2)
    assert report["validation"]["passed"] is True
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert {"stage_0.py", "stage_1.py", "pipeline.json", "family.json"} <= set(written), written
