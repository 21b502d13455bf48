"""Training data for pipeline fine-tuning: JSONL lines -> examples -> padded batches -> microbatches.

Each line of the file is one JSON object, in either of two forms:

    {"input": "translate: hi", "target": "hallo"}     text, tokenized with the checkpoint's tokenizer
    {"input_ids": [37, 5, 1], "labels": [8, 1]}        already tokenized

A sequence classifier's lines hold one class id instead of a target (`Objective.label_key`):
`{"input": "great film", "label": 1}` or `{"input_ids": [37, 5], "label": 1}`, the label in
[0, num_labels).

The batching contract is pinned, so that two runs (or a pipeline run and an eager run) on the
same file see exactly the same batches, and a resumed run continues where it stopped:

- Global batch k of size B is positions k*B .. k*B+B-1 of an endless stream that repeats the
  file epoch after epoch. Without shuffling each epoch is the file order; with shuffling epoch
  e is `torch.randperm(n, generator=torch.Generator().manual_seed(seed + e))`. A batch larger
  than the file spans several epochs, so it may hold an example more than once.
- With R data-parallel replicas, replica r at optimizer step s takes global batch s*R + r, so
  the data position to save is the next global batch index.
- A batch is collated by the family's objective (`fxconvert.objectives`, `Objective.collate`):
  padded on the right to its own longest rows, int64. A runtime that sizes its buffers once
  may pad to fixed lengths instead (`collate(..., pad_to=...)`).
- Microbatches are `torch.tensor_split(tensor, M)` along dim 0: the first B % M microbatches
  hold one row more. All microbatches of a batch share the batch's padded lengths.

The whole file is checked, in one pass, before anything is returned: a bad line is a one-line
DataError naming the file, the 1-based line number, the problem and the fix. The examples are
not kept: the pass records where each line begins, and a batch reads its lines back and makes
them into examples exactly as the pass did (`DataFile.take`, `fxconvert.training.data_file`).
"""

import functools
import json
from array import array
from dataclasses import dataclass
from pathlib import Path

import torch

from fxconvert.errors import UsageError, with_article
from fxconvert.objectives import IGNORE_INDEX, SEQ2SEQ, Objective
from fxconvert.training import data_file
from fxconvert.training.data_file import DataError

ID_KEYS = SEQ2SEQ.id_keys  # a tokenized line of text, as a pre-tokenized one
# Files that hold a vocabulary. AutoTokenizer on a directory with config.json alone builds a
# T5 tokenizer of special tokens only, so without one of these there is no tokenizer.
VOCAB_FILES = ("tokenizer.json", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model", "vocab.json", "vocab.txt")
# What AutoTokenizer may open in a tokenizer directory, besides the vocabulary files.
TOKENIZER_READS = frozenset({*VOCAB_FILES, "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                             "merges.txt", "chat_template.jinja", "chat_template.json", "config.json"})


def no_tokenizer(objective: Objective = SEQ2SEQ) -> str:
    """The fix for text without a tokenizer, naming the objective's own pre-tokenized keys (a classifier's
    `input_ids`/`label`, a language model's `input_ids`/`labels`)."""
    return f"copy the checkpoint's tokenizer files beside it or give pre-tokenized {'/'.join(objective.id_keys)}"


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def _shown(text) -> str:
    text = str(text)
    return text if text.isprintable() else repr(text)


def _number(value: int) -> str:
    """An int as a message shows it: its first 40 digits (JSON holds ints of thousands of digits)."""
    text = str(value)
    return text if len(text) <= 40 else f"{text[:40]}... ({len(text.lstrip('-'))} digits)"


def load_tokenizer(directory, *, required=True, objective: Objective = SEQ2SEQ):
    """The tokenizer saved in `directory`, loaded with AutoTokenizer's default settings.

    With `required=False` a directory without tokenizer files gives None (pre-tokenized data
    needs none); files that exist but do not load are always an error. `objective` names the
    pre-tokenized keys the missing tokenizer's error suggests.
    """
    directory = Path(directory)
    if not any((directory / name).is_file() for name in VOCAB_FILES):
        if not required:
            return None
        raise DataError(f"{_shown(directory)} has no tokenizer (none of {', '.join(VOCAB_FILES)}); "
                        f"{no_tokenizer(objective)}")
    for path in sorted(directory.iterdir()):  # a FIFO or device read by the tokenizer would block or never end
        if path.name in TOKENIZER_READS and path.exists() and not path.is_file():
            raise DataError(f"{_shown(path)} is not a regular file; replace it with the checkpoint's own "
                            f"tokenizer file, or remove it")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as e:  # transformers raises many types here; one line is what the user needs
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(
            f"the tokenizer in {_shown(directory)} cannot be loaded ({type(e).__name__}: {_shown(first)}); "
            "replace its tokenizer files with ones AutoTokenizer.from_pretrained can load"
        ) from None


def _no_duplicates(pairs):
    obj = dict(pairs)
    if len(obj) != len(pairs):
        keys = [k for k, _ in pairs]
        raise ValueError(f"key {next(k for k in keys if keys.count(k) > 1)!r} appears twice")
    return obj


def _parse(raw: bytes, where: str, objective: Objective = SEQ2SEQ) -> dict:
    """One line -> its object, with the keys of exactly one of `objective`'s formats; DataError naming `where`
    (file:line)."""
    form, text_keys, id_keys = objective.line_format, objective.text_keys, objective.id_keys
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 (byte {e.start + 1}); save the file as UTF-8") from None
    if not text.strip():
        raise DataError(f"{where}: blank line; remove it ({form})")
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno}); {form}") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply; {form}") from None
    except ValueError as e:  # a repeated key, or an integer too long to convert
        raise DataError(f"{where}: invalid JSON ({_shown(str(e).splitlines()[0][:120])}); {form}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: a JSON {type(obj).__name__}, not an object; {form}")
    if not obj:
        raise DataError(f"{where}: an empty object; {form}")
    unknown = sorted(set(obj) - {*text_keys, *id_keys})
    if unknown:
        raise DataError(f"{where}: unknown key {unknown[0]!r}; {form}")
    text_only, ids_only = set(text_keys) - set(id_keys), set(id_keys) - set(text_keys)  # a label is in both
    if set(obj) & text_only and set(obj) & ids_only:
        raise DataError(f"{where}: mixes text and token-id keys ({', '.join(sorted(obj))}); {form}")
    keys = text_keys if set(obj) & text_only else id_keys
    missing = [k for k in keys if k not in obj]
    if missing:
        raise DataError(f"{where}: missing key {missing[0]!r}; {form}")
    return obj


def _check_ids(ids, key: str, where: str, vocab_size, *, fix: str, objective: Objective = SEQ2SEQ) -> list[int]:
    form = objective.line_format
    if not isinstance(ids, list):
        raise DataError(f"{where}: {key!r} is {with_article(type(ids).__name__)}, not a list of ints; {form}")
    if not ids:
        raise DataError(f"{where}: {key!r} is empty; give every line at least one token or remove it")
    allowed = f"[0, {vocab_size})" if vocab_size is not None else "[0, 2**63)"
    for i, value in enumerate(ids):
        if type(value) is not int:  # bool is an int subclass; floats and nested lists are wrong too
            raise DataError(f"{where}: {key}[{i}] is {with_article(type(value).__name__)} ({json.dumps(value)[:40]}), not an int; {form}")
        if key == "labels" and value == IGNORE_INDEX:
            if objective.labels_are_tokens:
                raise DataError(f"{where}: labels[{i}] is -100, but a {objective.title} reads its labels as tokens; "
                                f"put the tokens it should not learn in input_ids (they are never learned)")
            continue
        if value < 0 or value >= (vocab_size if vocab_size is not None else 2**63):
            extra = " or -100 (ignored)" if key == "labels" else ""
            raise DataError(f"{where}: {key}[{i}] = {_number(value)} is outside {allowed}{extra}; {fix}")
    if key == "labels" and all(v == IGNORE_INDEX for v in ids):
        _nothing_to_learn(where)
    return ids


def _check_aligned(obj: dict, where: str, objective: Objective) -> None:
    if "input" in obj:
        raise DataError(f"{where}: a {objective.title}'s lines must be pre-tokenized; give {{\"input_ids\": [int], "
                        f"\"labels\": [int]}} with labels aligned to input_ids (-100 where nothing is predicted)")
    if len(obj["labels"]) != len(obj["input_ids"]):
        raise DataError(f"{where}: {len(obj['labels'])} labels for {len(obj['input_ids'])} input_ids; a "
                        f"{objective.title}'s labels are aligned with its input_ids (-100 where nothing is predicted)")


def _check_label(value, where: str, rules: "_Rules") -> int:
    """A line's class id (`Objective.label_key`): an int (not a bool) in [0, classes)."""
    key, classes = rules.objective.label_key, rules.classes
    if type(value) is not int:
        raise DataError(f"{where}: {key!r} is {with_article(type(value).__name__)} ({json.dumps(value)[:40]}), not "
                        f"an int; {rules.objective.line_format}")
    if value < 0 or value >= (classes if classes is not None else 2**63):
        allowed = f"[0, {classes}), the model's {classes} classes" if classes is not None else "[0, 2**63)"
        raise DataError(f"{where}: {key} = {_number(value)} is outside {allowed}; give a class id the model was converted "
                        f"with (its config's id2label)")
    return value


def _nothing_to_learn(where: str):
    raise DataError(f"{where}: every label is -100, so the line teaches nothing; give it a real target or remove it")


def _positive(value, what: str, minimum=1) -> int:
    if type(value) is not int or value < minimum:
        raise UsageError(f"{what} is {value!r}; give an integer >= {minimum}")
    return value


@dataclass(frozen=True)
class _Rules:
    """What makes a checked line an example: the tokenizer, the max lengths, the vocabulary and the objective."""

    tokenizer: object
    max_source_length: int | None
    max_target_length: int | None
    vocabulary: int | None  # the ids allowed: [0, vocabulary)
    objective: Objective
    classes: int | None = None  # the class ids a label may take (`Objective.classes`): [0, classes)


@dataclass
class DataFile:
    """A checked data file: its examples, read back line by line when asked (`take`), and the sha256 of its bytes.

    A rank keeps where each line begins (`offsets`, 8 bytes a line) or, where its stages read no
    token, only the examples' lengths (`source_lengths`, `target_lengths`: what a batch's shape
    and masks need, `shaped`). The digest identifies the data of a run: a checkpoint records it
    and a resume compares it, so a file edited in place (even to the same size) is noticed; a
    file changed while the run trains stops it (`fxconvert.training.data_file`).
    """

    path: Path
    shown: str
    sha256: str
    count: int
    stamp: data_file.Stamp
    rules: _Rules
    longest: tuple[int, int]  # (index, positions) of the first longest example by the objective's length rule
    offsets: array | None = None
    source_lengths: array | None = None
    target_lengths: array | None = None

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Example:
        if not -self.count <= index < self.count:
            raise IndexError(f"example {index} of {self.count}")
        return self.take([index % self.count])[0]

    def take(self, indices) -> list[Example]:
        """The examples at `indices` (0-based; repeats allowed), read from the file and made as the pass made them."""
        indices = list(indices)
        raw = data_file.read_lines(self.path, self.shown, self.stamp, self.offsets, indices)
        numbers = [i + 1 for i in sorted(raw)]  # 1-based, as the pass named them
        rows = [_check_line(raw[n - 1], f"{self.shown}:{n}", self.rules) for n in numbers]
        rows = _tokenized(numbers, rows, self.shown, self.rules)
        made = dict(zip(sorted(raw), _cut(numbers, rows, self.shown, self.rules)))
        return [made[i] for i in indices]

    def shaped(self, indices) -> list[Example]:
        """Stand-ins for the examples at `indices`: their lengths, every token 0. Collated, they give the batch's
        shapes and its masks (which depend on the lengths alone), for a rank whose stages read no token."""
        return [Example([0] * self.source_lengths[i], [0] * self.target_lengths[i]) for i in indices]


CHUNK = 1024  # lines made into examples at once: the tokenizer's batched calls, and the most the pass holds


def read_jsonl(path, **options) -> list[Example]:
    """Every example of the JSONL file `path` (`load_jsonl`, then each line read back)."""
    file = load_jsonl(path, **options)
    return file.take(range(len(file)))


def load_jsonl(path, *, tokenizer=None, max_source_length=None, max_target_length=None, vocab_size=None,
               objective: Objective = SEQ2SEQ, num_labels=None, flag: str = "--data", offsets=True,
               lengths=False) -> DataFile:
    """The JSONL file `path`, every line checked in one pass before anything is returned, and its sha256.

    Text is tokenized as `tokenizer(input, truncation=True, max_length=max_source_length)` and
    `tokenizer(text_target=target, truncation=True, max_length=max_target_length)`, with the
    tokenizer's default settings (a None length means no truncation). Pre-tokenized ids are
    cut to their first max length ids, exactly as given. A UTF-8 byte-order mark at the very
    start of the file is accepted (editors on Windows write one); anywhere else it is invalid JSON.
    `objective` is the model family's (`Family.objective`): where its labels are tokens the model
    reads (a causal LM) -100 is refused; where its labels are aligned with the input (a masked
    LM) a line is pre-tokenized, its labels as long as its input_ids (-100 where nothing is
    predicted), and both are cut to max_source_length; where its lines hold a class id (a sequence
    classifier) that is an int in [0, `num_labels`) and only the input is tokenized and cut to
    max_source_length. `flag` is the option the messages tell the user to
    pass a file to (`--eval-data` for the held-out file).

    The pass holds at most `CHUNK` lines, and keeps `offsets` (to read lines back) and/or
    `lengths` (the examples' lengths, `DataFile.shaped`). Problems are reported as if every
    line were parsed first, then every text tokenized, then every example cut: the first
    line that does not parse, else the first whose tokens do not fit, else the first cut
    to nothing.
    """
    if not isinstance(objective, Objective):
        raise UsageError(f"unknown data objective {objective!r}; give one of fxconvert.objectives.OBJECTIVES")
    for option, value in (("--max-source-length", max_source_length), ("--max-target-length", max_target_length)):
        if value is not None:
            _positive(value, option)
    path = Path(path)
    name = _shown(path)
    if not path.exists():
        raise DataError(f"{name} does not exist; pass {flag} a JSONL file")
    if not path.is_file():
        raise DataError(f"{name} is not a regular file; pass {flag} a JSONL file")
    rules = _Rules(tokenizer, max_source_length, max_target_length, vocab_size, objective, num_labels)
    try:
        file = path.open("rb")
    except OSError as e:
        raise DataError(f"{name} cannot be read ({e.strerror}); check its permissions") from None
    sizes = (array("i"), array("i")) if lengths else None
    late, longest, chunk, blank = {}, (0, 0), [], None

    def make():  # the chunk's examples, or the first problem after tokenizing / cutting kept for the end
        nonlocal longest
        numbers, rows = [n for n, _ in chunk], [row for _, row in chunk]
        chunk.clear()
        if "tokenized" in late:
            return
        try:
            rows = _tokenized(numbers, rows, name, rules)
        except DataError as e:
            late["tokenized"] = e
            return
        try:
            examples = _cut(numbers, rows, name, rules)
        except DataError as e:
            late.setdefault("cut", e)
            return
        for number, example in zip(numbers, examples):
            if objective.length(example) > longest[1]:
                longest = (number - 1, objective.length(example))
            if sizes is not None:
                sizes[0].append(len(example.input_ids))
                sizes[1].append(len(example.labels))

    with file:
        lines = data_file.Lines(file, name, offsets=offsets)
        for number, raw in lines:
            if not raw.strip():  # refused as a blank line, unless every line is blank (an empty file)
                blank = blank or number
                continue
            if blank is not None:
                _parse(b"", f"{name}:{blank}", objective)
            chunk.append((number, _check_line(raw, f"{name}:{number}", rules)))
            if len(chunk) == CHUNK:
                make()
        make()
    if blank == 1 or not lines.count:  # every line blank (or none): blank lines after the first line are refused
        raise DataError(f"{name} is empty; {objective.line_format}, one per line")
    if blank is not None:
        _parse(b"", f"{name}:{blank}", objective)
    if late:
        raise late.get("tokenized", late.get("cut"))
    return DataFile(path, name, lines.sha256, lines.count, lines.stamp, rules, longest, lines.offsets,
                    *(sizes or (None, None)))


def _check_line(raw: bytes, where: str, rules: _Rules) -> dict:
    """One line parsed and checked (`where` is file:line), text not yet tokenized."""
    objective = rules.objective
    obj = _parse(raw, where, objective)
    if objective.label_key is not None:  # checked first: a wrong class id needs no tokenizer to be found
        _check_label(obj[objective.label_key], where, rules)
    if "input" in obj and rules.tokenizer is None:
        raise DataError(f"{where}: text needs a tokenizer and none is beside the checkpoint; "
                        f"{no_tokenizer(objective)}")
    for key in (k for k in objective.text_keys if k != objective.label_key) if "input" in obj else ():
        if not isinstance(obj[key], str) or not obj[key].strip():
            problem = "is empty" if isinstance(obj[key], str) else f"is {with_article(type(obj[key]).__name__)}, not a string"
            raise DataError(f"{where}: {key!r} {problem}; {objective.line_format}")
        try:  # JSON can escape half a surrogate pair ("\\ud800"), which no tokenizer takes
            obj[key].encode("utf-8")
        except UnicodeEncodeError as e:
            raise DataError(f"{where}: {key!r} is not valid Unicode text (a lone surrogate "
                            f"\\u{ord(obj[key][e.start]):04x} at character {e.start + 1}); write the "
                            f"character itself, or a complete surrogate pair") from None
    for key in (k for k in objective.id_keys if k != objective.label_key) if "input_ids" in obj else ():
        _check_ids(obj[key], key, where, rules.vocabulary, fix="re-tokenize it with the model's tokenizer",
                   objective=rules.objective)
    if rules.objective.aligned:
        _check_aligned(obj, where, rules.objective)
    return obj


def _tokenized(numbers: list[int], rows: list[dict], name: str, rules: _Rules) -> list[dict]:
    """`rows` (lines `numbers`) with their text tokenized and the tokens checked against the vocabulary."""
    texts = [i for i, obj in enumerate(rows) if "input" in obj]
    if not texts:
        return rows
    rows = list(rows)
    sources = _tokenize(rules.tokenizer, [rows[i]["input"] for i in texts], rules.max_source_length, target=False)
    fix = "the tokenizer does not fit the model; use the checkpoint's own tokenizer"
    label = rules.objective.label_key
    if label is not None:  # a class id: only the input is text
        for i, input_ids in zip(texts, sources):
            ids = _check_ids(input_ids, "input_ids", f"{name}:{numbers[i]} (tokenized)", rules.vocabulary, fix=fix,
                             objective=rules.objective)
            rows[i] = {"input_ids": ids, label: rows[i][label]}
        return rows
    targets = _tokenize(rules.tokenizer, [rows[i]["target"] for i in texts], rules.max_target_length, target=True)
    for i, input_ids, labels in zip(texts, sources, targets):
        where = f"{name}:{numbers[i]} (tokenized)"
        rows[i] = {key: _check_ids(ids, key, where, rules.vocabulary, fix=fix) for key, ids in zip(ID_KEYS, (input_ids, labels))}
    return rows


def _cut(numbers: list[int], rows: list[dict], name: str, rules: _Rules) -> list[Example]:
    """The examples of tokenized `rows` (lines `numbers`), cut to the max lengths."""
    objective, examples = rules.objective, []
    cut, option = (rules.max_source_length, "--max-source-length") if objective.aligned else (
        rules.max_target_length, "--max-target-length")
    for number, obj in zip(numbers, rows):
        if objective.label_key is not None:  # one class id, nothing to cut
            examples.append(Example(obj["input_ids"][:rules.max_source_length], [obj[objective.label_key]]))
            continue
        labels = obj["labels"][:cut]
        if cut is not None and all(v == IGNORE_INDEX for v in labels):
            _nothing_to_learn(f"{name}:{number} (cut to {option} {cut})")
        examples.append(Example(obj["input_ids"][:rules.max_source_length], labels))
    return examples


def _tokenize(tokenizer, texts: list[str], max_length, *, target: bool, chunk=1024) -> list[list[int]]:
    options = dict(truncation=True, max_length=max_length) if max_length is not None else {}
    out = []
    for start in range(0, len(texts), chunk):  # batched calls: the fast tokenizers work in parallel
        part = texts[start:start + chunk]
        encoded = tokenizer(text_target=part, **options) if target else tokenizer(part, **options)
        out.extend(list(ids) for ids in encoded["input_ids"])
    return out


def batch_indices(num_examples, batch_size, k, *, shuffle=False, seed=0) -> list[int]:
    """The example indices of global batch `k` (see the module docstring for the contract).

    Replica r of R data-parallel replicas takes global batch `step * R + r` at each optimizer
    step. Batch k depends only on (num_examples, batch_size, k, shuffle, seed), so resuming at
    a saved batch index gives the same batches as an uninterrupted run.
    """
    n = _positive(num_examples, "the number of examples")
    size = _positive(batch_size, "--batch")
    k = _positive(k, "the batch index", minimum=0)
    if type(seed) is not int:
        raise UsageError(f"--seed is {seed!r}; give an integer")
    positions = [divmod(p, n) for p in range(k * size, k * size + size)]  # (epoch, index in epoch)
    if not shuffle:
        return [i for _, i in positions]
    return [_epoch_order(n, seed + epoch)[i] for epoch, i in positions]


@functools.lru_cache(maxsize=4)  # consecutive batches mostly fall in the same epoch
def _epoch_order(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def microbatches(batch: dict, m) -> list[dict]:
    """`m` microbatches of `batch`, each tensor split with `torch.tensor_split` along dim 0."""
    m = _positive(m, "--microbatches")
    rows = {len(v) for v in batch.values()}
    if len(rows) != 1:
        raise UsageError(f"the batch's tensors have different numbers of rows ({sorted(rows)}); collate them together")
    (size,) = rows
    if m > size:
        raise UsageError(f"--microbatches {m} is more than the batch's {size} examples; use --microbatches <= --batch")
    parts = {name: torch.tensor_split(tensor, m, dim=0) for name, tensor in batch.items()}
    return [{name: parts[name][i] for name in batch} for i in range(m)]
