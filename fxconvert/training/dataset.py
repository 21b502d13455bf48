"""The run's data: the JSONL file read and checked with the family's objective, and its batches.

`fxconvert.training.data` holds the batching contract and `fxconvert.objectives` the objectives;
this module asks the model's for what it needs (its token ids, its length rule against the
model's position table).
"""

from dataclasses import dataclass

import torch

from fxconvert import families
from fxconvert.errors import UsageError
from fxconvert.objectives import SEQ2SEQ, Objective
from fxconvert.training.config import TrainConfig
from fxconvert.training.data import batch_indices, load_jsonl, load_tokenizer
from fxconvert.training.model import Model


@dataclass
class Data:
    examples: list
    token_ids: dict[str, int]  # what the objective's collate takes (`Objective.token_ids`): pad_token_id, ...
    objective: Objective = SEQ2SEQ  # the family's (`Family.objective`): how lines become batches
    sha256: str | None = None  # of the bytes the examples were read from: the data's identity on resume
    batch_size: int = 8  # examples per global batch (--batch), in the order of `--shuffle` and `--seed`
    shuffle: bool = False
    seed: int = 0

    def rows(self, index: int) -> list[int]:
        return batch_indices(len(self.examples), self.batch_size, index, shuffle=self.shuffle, seed=self.seed)

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        """Global batch `index` (`fxconvert.training.data`'s contract)."""
        return self.objective.collate([self.examples[i] for i in self.rows(index)], **self.token_ids)

    def tokens(self, index: int) -> int:
        """Real input tokens plus target tokens of global batch `index` (for tokens/s)."""
        rows = self.rows(index)
        return sum(len(self.examples[i].input_ids) + sum(1 for v in self.examples[i].labels if v != -100)
                   for i in rows)


def load_data(cfg: TrainConfig, model: Model, *, held_out: bool = False) -> Data:
    """`--data` (or with `held_out`, `--eval-data` in batches of `--eval-batch`), read and checked whole."""
    path, option = (cfg.eval_data, "--eval-data") if held_out else (cfg.data, "--data")
    config = model.config
    family = families.family_of_class((config.get("architectures") or [""])[0])
    objective = family.objective if family is not None else SEQ2SEQ
    if objective is None:
        raise UsageError(f"fxconvert.train has no data format for {family.title} models; train a seq2seq "
                         f"(T5, BART), causal LM (GPT-2, Llama-style) or masked LM (BERT) model")
    tokenizer = load_tokenizer(model.tokenizer_dir, required=False) if model.tokenizer_dir is not None else None
    vocab = families.vocabulary(config)
    read = load_jsonl(path, tokenizer=tokenizer, max_source_length=cfg.max_source_length,
                      max_target_length=cfg.max_target_length, vocab_size=vocab, objective=objective, flag=option)
    _check_lengths(read.examples, path, family, config, objective)
    token_ids = objective.token_ids(config, vocab)  # the pad policy: which ids, their fallbacks, in the vocabulary
    return Data(read.examples, token_ids, objective, sha256=read.sha256,
                batch_size=(cfg.eval_batch or cfg.batch) if held_out else cfg.batch, shuffle=cfg.shuffle,
                seed=cfg.seed)


def _check_lengths(examples, data, family, config: dict, objective: Objective) -> None:
    """Refuse examples longer than a learned position table (`Family.max_length`): eager would fail mid-run."""
    field = family.max_length if family is not None else ""
    limit = config.get(field) if field else None
    if type(limit) is not int or not examples:
        return
    lengths = [objective.length(e) for e in examples]
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    if lengths[longest] > limit:
        raise UsageError(f"{data}: example {longest + 1} is {lengths[longest]} tokens long, more than the model's "
                         f"{field} ({limit}); pass {objective.length_options} at most {limit}")
