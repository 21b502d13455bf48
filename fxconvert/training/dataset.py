"""The run's data: the JSONL file read and checked with the family's objective, and its batches.

`fxconvert.training.data` holds the batching contract; this module decides what the model
needs from it (the objective, the pad and decoder start tokens, the length limit).
"""

from dataclasses import dataclass

import torch

from fxconvert import families
from fxconvert.errors import UsageError
from fxconvert.training.config import TrainConfig
from fxconvert.training.data import batch_indices, collate, load_jsonl, load_tokenizer
from fxconvert.training.model import Model


@dataclass
class Data:
    examples: list
    pad_token_id: int
    decoder_start_token_id: int | None
    objective: str = "seq2seq"  # the family's (`Family.objective`): how lines become batches (`fxconvert.training.data`)
    sha256: str | None = None  # of the bytes the examples were read from: the data's identity on resume
    batch_size: int = 8  # examples per global batch (--batch), in the order of `--shuffle` and `--seed`
    shuffle: bool = False
    seed: int = 0

    def rows(self, index: int) -> list[int]:
        return batch_indices(len(self.examples), self.batch_size, index, shuffle=self.shuffle, seed=self.seed)

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        """Global batch `index` (`fxconvert.training.data`'s contract)."""
        return collate([self.examples[i] for i in self.rows(index)], pad_token_id=self.pad_token_id,
                       decoder_start_token_id=self.decoder_start_token_id, objective=self.objective)

    def tokens(self, index: int) -> int:
        """Real input tokens plus target tokens of global batch `index` (for tokens/s)."""
        rows = self.rows(index)
        return sum(len(self.examples[i].input_ids) + sum(1 for v in self.examples[i].labels if v != -100)
                   for i in rows)


def load_data(cfg: TrainConfig, model: Model) -> Data:
    config = model.config
    family = families.family_of_class((config.get("architectures") or [""])[0])
    objective = family.objective if family is not None else "seq2seq"
    if objective is None:
        raise UsageError(f"fxconvert.train has no data format for {family.title} models; train a seq2seq "
                         f"(T5, BART), causal LM (GPT-2, Llama-style) or masked LM (BERT) model")
    causal = objective == "causal"
    tokenizer = load_tokenizer(model.tokenizer_dir, required=False) if model.tokenizer_dir is not None else None
    read = load_jsonl(cfg.data, tokenizer=tokenizer, max_source_length=cfg.max_source_length,
                      max_target_length=cfg.max_target_length, vocab_size=families.vocabulary(config),
                      objective=objective)
    examples = read.examples
    _check_lengths(examples, cfg.data, family, config, objective)
    pad, pad_name = config.get("pad_token_id"), "pad_token_id"
    if causal and type(pad) is not int:  # GPT-2 and Llama define none: padding is masked and never learned
        pad, pad_name = config.get("eos_token_id"), "eos_token_id"
        pad = pad[0] if isinstance(pad, list) and pad else pad
    start = config.get("decoder_start_token_id") if objective == "seq2seq" else None
    vocab = families.vocabulary(config)
    for name, value in ((pad_name, pad), ("decoder_start_token_id", start)):
        if type(value) is not int and not (objective != "seq2seq" and name == "decoder_start_token_id"):
            name = "pad_token_id" if name == "eos_token_id" else name
            raise UsageError(f"the model's config has {name} = {value!r}; set it in config.json")
        if type(value) is int and type(vocab) is int and not 0 <= value < vocab:  # the embedding would fail mid-run
            raise UsageError(f"the model's config has {name} = {value}, outside its vocabulary (vocab_size {vocab}); "
                             f"set {'pad_token_id' if name == 'eos_token_id' else name} in config.json to a token id "
                             f"below {vocab}")
    return Data(examples, pad, start, objective, sha256=read.sha256, batch_size=cfg.batch, shuffle=cfg.shuffle,
                seed=cfg.seed)


def _check_lengths(examples, data, family, config: dict, objective: str) -> None:
    """Refuse examples longer than a learned position table (`Family.max_length`): eager would fail mid-run."""
    field = family.max_length if family is not None else ""
    limit = config.get(field) if field else None
    if type(limit) is not int or not examples:
        return

    def length(e):  # a causal example is one sequence, input then target; a seq2seq one is two
        return len(e.input_ids) + len(e.labels) if objective == "causal" else max(len(e.input_ids), len(e.labels))

    longest = max(range(len(examples)), key=lambda i: length(examples[i]))
    if length(examples[longest]) > limit:
        cut = {"causal": "--max-source-length and --max-target-length that add up to",
               "masked": "--max-source-length of"}.get(objective, "--max-source-length and --max-target-length of")
        raise UsageError(f"{data}: example {longest + 1} is {length(examples[longest])} tokens long, more "
                         f"than the model's {field} ({limit}); pass {cut} at most {limit}")
