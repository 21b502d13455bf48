"""The training objectives: how a family's lines of data become batches, and what they need from the model.

A family record names its objective (`Family.objective`); `fxconvert.train` reads and batches
the data with it (`fxconvert.training.dataset`). An objective is one class here, and owns:

- `name`: "seq2seq", "causal", "masked" or "classification", for messages and metrics;
- what a line holds: its keys (`text_keys`, `id_keys`, and `label_key`, a class id rather than
  tokens, with `classes(config)` the ids allowed), `aligned` (labels aligned with input_ids: a
  line is pre-tokenized, and its labels are cut and padded with its input) and
  `labels_are_tokens` (the model reads its labels as input, so none may be -100);
- the length rule: `length(example)`, the positions an example takes in the model, and
  `length_options`, the options that bound it;
- the pad policy: `token_ids(config, vocab)`, the config's token ids the batches need, with
  their fallbacks, each checked;
- `collate(examples, pad_to=..., **token_ids)`: one padded int64 batch, by the contract below,
  holding exactly `batch_keys` (a family trains with some of them: `Family.train_inputs`).

A batch is padded on the right to its own longest rows, or to the fixed lengths `pad_to` =
(source length, target length) for a runtime that sizes its buffers once:

- seq2seq (`Seq2Seq`): input_ids with pad_token_id, attention_mask 1 on real tokens, labels
  with -100; decoder_input_ids are the padded labels shifted right behind
  decoder_start_token_id, -100 replaced by pad_token_id (what transformers' T5 does when given
  labels alone).
- causal (`CausalLM`, a decoder-only model): input and target make one sequence: input_ids
  are input + target, labels -100 on the input's positions; the model shifts the labels itself.
- masked (`MaskedLM`): lines are pre-tokenized with labels aligned to input_ids (-100 where
  nothing is predicted); both are padded alike and token_type_ids are 0.
- classification (`Classification`, a `*ForSequenceClassification`): input_ids and
  attention_mask as a masked LM's, labels one class id per row (shape [B]). A decoder-only
  classifier pools each row's last token that is not pad_token_id, so rows are padded with
  exactly the config's pad_token_id (no fallback).

Everything is int64. The rest of the contract (which examples make batch k, microbatches) is
`fxconvert.training.data`'s.

This module imports torch inside the functions that build tensors, not at the top: the family
records import it, and `import fxconvert.families` must not load torch.
"""

from typing import ClassVar

from fxconvert.errors import UsageError

IGNORE_INDEX = -100  # the label value transformers' cross-entropy ignores


class Objective:
    """What every objective has; each subclass is one objective. Objectives compare equal by class."""

    name: ClassVar[str]  # what the family trains with, for messages and metrics
    title: ClassVar[str]  # the kind of model, for people: "causal LM"
    aligned: ClassVar[bool] = False  # labels aligned with input_ids (pre-tokenized, cut to --max-source-length)
    labels_are_tokens: ClassVar[bool] = False  # the model reads its labels as input: -100 is refused
    length_options: ClassVar[str]  # the options that bound `length`, as a too-long example's fix reads them
    token_fields: ClassVar[tuple[str, ...]] = ("pad_token_id",)  # the config's token ids `collate` takes
    pad_fallback: ClassVar[str | None] = None  # the config field read when pad_token_id is not set
    text_keys: ClassVar[tuple[str, ...]] = ("input", "target")  # a line of text, tokenized with the checkpoint's
    id_keys: ClassVar[tuple[str, ...]] = ("input_ids", "labels")  # a pre-tokenized line
    label_key: ClassVar[str | None] = None  # the key of both forms holding one class id (not tokens)
    line_format: ClassVar[str] = ('each line must be {"input": str, "target": str} or '
                                  '{"input_ids": [int], "labels": [int]}')
    batch_keys: ClassVar[tuple[str, ...]]  # what `collate` returns: the inputs a family may train with

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other) -> bool:  # a copy (pickled to a process, say) is the same objective
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(type(self))

    def length(self, example) -> int:
        """The positions `example` takes in the model: its longer sequence by default."""
        return max(len(example.input_ids), len(example.labels))

    def classes(self, config) -> int | None:
        """The class ids a line's label may take, [0, classes), from config.json (a dict); None where no label is
        a class id."""
        return None

    def token_ids(self, config, vocab) -> dict[str, int]:
        """The token ids of `token_fields` that config.json (a dict) gives, each an int below `vocab` (if known)."""
        ids = {}
        for name in self.token_fields:
            field, value = name, config.get(name)
            if name == "pad_token_id" and self.pad_fallback and type(value) is not int:
                field, value = self.pad_fallback, config.get(self.pad_fallback)
                value = value[0] if isinstance(value, list) and value else value
            if type(value) is not int:
                raise UsageError(f"the model's config has {name} = {value!r}; set it in config.json")
            if type(vocab) is int and not 0 <= value < vocab:  # the embedding would fail mid-run
                raise UsageError(f"the model's config has {field} = {value}, outside its vocabulary (vocab_size "
                                 f"{vocab}); set {name} in config.json to a token id below {vocab}")
            ids[name] = value
        return ids

    def _check_batch(self, examples, ids: dict) -> None:
        if not examples:
            raise UsageError("cannot collate an empty batch; give at least one example")
        for name, value in ids.items():
            if type(value) is not int:
                field = f"{name} (or {self.pad_fallback})" if name == "pad_token_id" and self.pad_fallback else name
                raise UsageError(f"{name} is {value!r}, not a token id; set {field} in the model's config.json")


class Seq2Seq(Objective):
    """An encoder-decoder model (T5, BART): input -> target, the decoder reading the labels shifted right."""

    name, title = "seq2seq", "seq2seq model"
    batch_keys = ("input_ids", "attention_mask", "labels", "decoder_input_ids")
    length_options = "--max-source-length and --max-target-length of"
    token_fields = ("pad_token_id", "decoder_start_token_id")

    def collate(self, examples, *, pad_token_id, decoder_start_token_id=None, pad_to=None) -> dict:
        """input_ids, attention_mask, labels, decoder_input_ids (the module docstring's contract)."""
        import torch  # not at the top: see the module docstring

        self._check_batch(examples, {"pad_token_id": pad_token_id, "decoder_start_token_id": decoder_start_token_id})
        source, target = (_pad_length(v) for v in pad_to) if pad_to is not None else (None, None)
        input_ids = _pad([e.input_ids for e in examples], pad_token_id, source, "--max-source-length")
        attention_mask = _pad([[1] * len(e.input_ids) for e in examples], 0, source, "--max-source-length")
        labels = _pad([e.labels for e in examples], IGNORE_INDEX, target, "--max-target-length")
        decoder_input_ids = torch.cat([torch.full_like(labels[:, :1], decoder_start_token_id), labels[:, :-1]], dim=1)
        decoder_input_ids.masked_fill_(decoder_input_ids == IGNORE_INDEX, pad_token_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                "decoder_input_ids": decoder_input_ids}


class CausalLM(Objective):
    """A decoder-only model (GPT-2, Llama): input + target as one sequence, only the target learned."""

    name, title = "causal", "causal LM"
    batch_keys = ("input_ids", "attention_mask", "labels")
    labels_are_tokens = True
    length_options = "--max-source-length and --max-target-length that add up to"
    pad_fallback = "eos_token_id"  # GPT-2 and Llama define no pad token: padding is masked and never learned

    def length(self, example) -> int:
        return len(example.input_ids) + len(example.labels)

    def collate(self, examples, *, pad_token_id, pad_to=None) -> dict:
        """input_ids, attention_mask, labels: the labels are the same tokens with the input's positions -100, so
        only the target is learned (the model shifts labels itself, as transformers' causal LMs do)."""
        self._check_batch(examples, {"pad_token_id": pad_token_id})
        length = _pad_length(sum(pad_to)) if pad_to is not None else None
        sequences = [e.input_ids + e.labels for e in examples]
        input_ids = _pad(sequences, pad_token_id, length, "--max-source-length and --max-target-length")
        attention_mask = _pad([[1] * len(s) for s in sequences], 0, length, "--max-source-length")
        labels = _pad([[IGNORE_INDEX] * len(e.input_ids) + e.labels for e in examples], IGNORE_INDEX, length,
                      "--max-target-length")
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class MaskedLM(Objective):
    """A masked LM (BERT): pre-tokenized lines, labels aligned with the input (-100 where nothing is predicted)."""

    name, title = "masked", "masked LM"
    batch_keys = ("input_ids", "attention_mask", "token_type_ids", "labels")
    aligned = True
    length_options = "--max-source-length of"

    def length(self, example) -> int:
        return len(example.input_ids)  # the labels are as long

    def collate(self, examples, *, pad_token_id, pad_to=None) -> dict:
        """input_ids, attention_mask, token_type_ids (all 0: one segment), labels."""
        import torch  # not at the top: see the module docstring

        self._check_batch(examples, {"pad_token_id": pad_token_id})
        length = _pad_length(pad_to[0]) if pad_to is not None else None
        input_ids = _pad([e.input_ids for e in examples], pad_token_id, length, "--max-source-length")
        attention_mask = _pad([[1] * len(e.input_ids) for e in examples], 0, length, "--max-source-length")
        labels = _pad([e.labels for e in examples], IGNORE_INDEX, length, "--max-source-length")
        return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": torch.zeros_like(input_ids),
                "labels": labels}


class Classification(Objective):
    """A sequence classifier (RoBERTa's, GPT-2's `*ForSequenceClassification`): text or ids -> one class id.

    transformers' loss is the cross-entropy's mean over the batch's rows (single-label
    classification: `problem_type`, set from the labels' dtype the first time the model runs).
    A step's loss is the mean of its microbatches' losses, and microbatches are equal (--batch is
    a multiple of --microbatches), so it is the mean over the whole batch's rows: one eager step."""

    name, title = "classification", "sequence classifier"
    batch_keys = ("input_ids", "attention_mask", "labels")
    length_options = "--max-source-length of"
    text_keys, id_keys, label_key = ("input", "label"), ("input_ids", "label"), "label"
    line_format = 'each line must be {"input": str, "label": int} or {"input_ids": [int], "label": int}'

    def length(self, example) -> int:
        return len(example.input_ids)  # the label takes no position

    def classes(self, config) -> int:
        """num_labels (config.json saves id2label; transformers' default is 2), refused unless single-label."""
        kind = config.get("problem_type")
        if kind not in (None, "single_label_classification"):
            shown = repr(kind) if len(repr(kind)) <= 80 else f"{repr(kind)[:80]}..."
            raise UsageError(f"the model's config has problem_type = {shown}, whose loss is not a cross-entropy over "
                             f"class ids; fxconvert.train trains single-label classification: convert a model with "
                             f"problem_type \"single_label_classification\" (or none)")
        labels = config.get("id2label")
        count = config.get("num_labels") or (len(labels) if isinstance(labels, dict) and labels else 2)
        if type(count) is not int or count < 2:
            raise UsageError(f"the model's config has {count!r} labels, and transformers trains one label as a "
                             f"regression (mean squared error); give the model at least 2 labels (id2label in "
                             f"config.json) and convert it again")
        return count

    def collate(self, examples, *, pad_token_id, pad_to=None) -> dict:
        """input_ids, attention_mask, labels: one class id per row (each example's single label)."""
        import torch  # not at the top: see the module docstring

        self._check_batch(examples, {"pad_token_id": pad_token_id})
        length = _pad_length(pad_to[0]) if pad_to is not None else None
        input_ids = _pad([e.input_ids for e in examples], pad_token_id, length, "--max-source-length")
        attention_mask = _pad([[1] * len(e.input_ids) for e in examples], 0, length, "--max-source-length")
        labels = torch.tensor([e.labels[0] for e in examples], dtype=torch.int64)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


SEQ2SEQ, CAUSAL_LM, MASKED_LM, CLASSIFICATION = Seq2Seq(), CausalLM(), MaskedLM(), Classification()
OBJECTIVES = (SEQ2SEQ, CAUSAL_LM, MASKED_LM, CLASSIFICATION)


def _pad_length(value) -> int:
    if type(value) is not int or value < 1:
        raise UsageError(f"pad_to is {value!r}; give an integer >= 1")
    return value


def _pad(rows: list[list[int]], value: int, length: int | None, option: str):
    """`rows` as one int64 tensor, padded on the right with `value` to `length` (or the longest row)."""
    import torch  # not at the top: see the module docstring

    longest = max(len(r) for r in rows)
    if length is not None and longest > length:
        raise UsageError(f"an example has {longest} tokens, more than the {length} to pad to; truncate with {option} {length}")
    out = torch.full((len(rows), length or longest), value, dtype=torch.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
    return out
