"""The run's data: the JSONL file read and checked with the family's objective, and its batches.

`fxconvert.training.data` holds the batching contract and `fxconvert.objectives` the objectives;
this module asks the model's for what it needs (its token ids, its length rule against the
model's position table).

Every rank checks the whole file (so every rank finds the same bad line, and all agree on its
length and sha256), then keeps 8 bytes a line: where each line begins on a rank that reads lines
(`reads_lines`: the first stage's, the last stage's, a stage reading another token input), the
examples' lengths on a rank whose stages read only masks. A reading rank reads and makes the
examples of each batch when it needs them; a middle rank collates stand-ins of the same lengths
(`DataFile.shaped`), whose shapes and masks are the batch's.
"""

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from fxconvert import families
from fxconvert.errors import UsageError
from fxconvert.objectives import SEQ2SEQ, Objective
from fxconvert.training.config import TrainConfig
from fxconvert.training.data import DataFile, batch_indices, load_jsonl, load_tokenizer
from fxconvert.training.model import Model

# The batch tensors every objective's collate makes from the examples' lengths alone (`Objective.collate`): a
# rank whose stages read nothing else (a middle stage reading the attention mask) needs no line of the file.
FROM_LENGTHS = frozenset({"attention_mask", "token_type_ids"})
CACHED_BATCHES = 16  # batches whose examples a rank keeps: a step's own, read again for tokens/s


@dataclass
class Data:
    examples: DataFile  # read line by line when a batch needs them (`DataFile.take`); len() is the file's
    token_ids: dict[str, int]  # what the objective's collate takes (`Objective.token_ids`): pad_token_id, ...
    objective: Objective = SEQ2SEQ  # the family's (`Family.objective`): how lines become batches
    sha256: str | None = None  # of the bytes the examples were read from: the data's identity on resume
    batch_size: int = 8  # examples per global batch (--batch), in the order of `--shuffle` and `--seed`
    shuffle: bool = False
    seed: int = 0
    reads: bool = True  # False: this rank's stages read no token; its batches are `DataFile.shaped` stand-ins
    _cache: OrderedDict = field(default_factory=OrderedDict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.examples)

    def rows(self, index: int) -> list[int]:
        return batch_indices(len(self.examples), self.batch_size, index, shuffle=self.shuffle, seed=self.seed)

    def _examples(self, index: int) -> list:
        if index not in self._cache:
            rows = self.rows(index)
            self._cache[index] = self.examples.take(rows) if self.reads else self.examples.shaped(rows)
            while len(self._cache) > CACHED_BATCHES:
                self._cache.popitem(last=False)
        return self._cache[index]

    def take(self, rows: list[int]) -> dict[str, torch.Tensor]:
        """A batch of these rows of the file, in this order (the held-out file's consecutive batches)."""
        examples = self.examples.take(rows) if self.reads else self.examples.shaped(rows)
        return self.objective.collate(examples, **self.token_ids)

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        """Global batch `index` (`fxconvert.training.data`'s contract); on a rank that `reads` no line, the same
        shapes and masks with every token 0."""
        return self.objective.collate(self._examples(index), **self.token_ids)

    def tokens(self, index: int) -> int:
        """Real input tokens plus target tokens of global batch `index` (for tokens/s; a rank that reads)."""
        if not self.reads:
            raise RuntimeError("tokens/s is counted on a rank that reads the data (the last stage's)")
        return sum(len(e.input_ids) + sum(1 for v in e.labels if v != -100) for e in self._examples(index))


def reads_lines(model: Model) -> bool:
    """Whether this rank reads lines of the file: it holds the first stage (input_ids), the last (labels), or a
    stage that reads another token input (a decoder's decoder_input_ids); masks come from the lengths."""
    return any(i in (0, model.num_stages - 1) or set(part.inputs) - FROM_LENGTHS for i, part in model.parts.items())


def load_data(cfg: TrainConfig, model: Model, *, held_out: bool = False) -> Data:
    """`--data` (or with `held_out`, `--eval-data` in batches of `--eval-batch`), read and checked whole."""
    path, option = (cfg.eval_data, "--eval-data") if held_out else (cfg.data, "--data")
    config = model.config
    family = families.family_of_class((config.get("architectures") or [""])[0])
    objective = family.objective if family is not None else SEQ2SEQ
    if objective is None:
        raise UsageError(f"fxconvert.train has no data format for {family.title} models; train a seq2seq "
                         f"(T5, BART), causal LM (GPT-2, Llama-style), masked LM (BERT) or sequence classifier model")
    tokenizer = load_tokenizer(model.tokenizer_dir, required=False) if model.tokenizer_dir is not None else None
    vocab = families.vocabulary(config)
    reads = reads_lines(model)
    read = load_jsonl(path, tokenizer=tokenizer, max_source_length=cfg.max_source_length,
                      max_target_length=cfg.max_target_length, vocab_size=vocab, objective=objective,
                      num_labels=objective.classes(config), flag=option, offsets=reads, lengths=not reads)
    _check_lengths(read, path, family, config, objective)
    token_ids = objective.token_ids(config, vocab)  # the pad policy: which ids, their fallbacks, in the vocabulary
    return Data(read, token_ids, objective, sha256=read.sha256,
                batch_size=(cfg.eval_batch or cfg.batch) if held_out else cfg.batch, shuffle=cfg.shuffle,
                seed=cfg.seed, reads=reads)


def _check_lengths(read: DataFile, data, family, config: dict, objective: Objective) -> None:
    """Refuse examples longer than a learned position table holds (`Family.max_positions`): eager would fail
    mid-run, on every rank, with an index out of bounds."""
    bound = family.max_positions(config) if family is not None else None
    if bound is None or not len(read):
        return
    table, limit = bound
    longest, length = read.longest
    if length > limit:
        raise UsageError(f"{data}: example {longest + 1} is {length} tokens long, more than the model's "
                         f"{table} ({limit}); pass {objective.length_options} at most {limit}")
