"""fxconvert.training.data against the tokenizer itself, transformers' T5, torch.tensor_split and the pinned batching contract."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoTokenizer, T5Tokenizer

import checkpoints
import helpers
from fxconvert.objectives import CAUSAL_LM, CLASSIFICATION, MASKED_LM, SEQ2SEQ
from fxconvert.training.data import DataError, Example, batch_indices, load_tokenizer, microbatches, read_jsonl
from fxconvert.errors import UsageError

TEXTS = [("w1 w2 w3 w4 w5 w6", "w7 w8 w9"), ("w3", "w4 w5 w6 w7 w8"), ("w9 zz w2", "w1"), ("  w5\tw6  ", "w38 w39")]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    checkpoints.write_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def t5_tokenizer_dir(tmp_path_factory):
    """transformers' own T5Tokenizer class, built offline from a small unigram vocabulary."""
    directory = tmp_path_factory.mktemp("t5_tokenizer")
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [(f"▁w{i}", -1.0) for i in range(40)]
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(directory)
    return directory


def write(path, lines, end="\n"):
    path.write_text("\n".join(json.dumps(line) if not isinstance(line, str) else line for line in lines) + end)
    return path


def text_lines(pairs=TEXTS):
    return [{"input": source, "target": target} for source, target in pairs]


# --- tokenizing ---------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["word_level", "t5"])
@pytest.mark.parametrize("lengths", [(None, None), (3, 2), (1, 1), (100, 100)])
def test_text_lines_are_tokenized_as_the_tokenizer_itself_does(tmp_path, tokenizer_dir, t5_tokenizer_dir, which, lengths):
    directory = {"word_level": tokenizer_dir, "t5": t5_tokenizer_dir}[which]
    tokenizer = load_tokenizer(directory)
    direct = AutoTokenizer.from_pretrained(directory)  # default settings
    source_max, target_max = lengths
    examples = read_jsonl(write(tmp_path / "d.jsonl", text_lines()), tokenizer=tokenizer, max_source_length=source_max, max_target_length=target_max)
    assert len(examples) == len(TEXTS)
    for (source, target), example in zip(TEXTS, examples):
        options = lambda n: dict(truncation=True, max_length=n) if n else {}  # noqa: E731
        assert example.input_ids == direct(source, **options(source_max))["input_ids"]
        assert example.labels == direct(text_target=target, **options(target_max))["input_ids"]
        # T5's tokenizer appends </s> (id 1) and keeps it when truncating
        assert example.input_ids[-1] == example.labels[-1] == 1
        assert len(example.input_ids) <= (source_max or 99) and len(example.labels) <= (target_max or 99)


def test_no_max_length_means_no_truncation_even_past_model_max_length(tmp_path, t5_tokenizer_dir):
    # "default settings": tokenizer(text) does not truncate, it only warns past model_max_length
    tokenizer = AutoTokenizer.from_pretrained(t5_tokenizer_dir, model_max_length=3)
    (example,) = read_jsonl(write(tmp_path / "d.jsonl", text_lines(TEXTS[:1])), tokenizer=tokenizer)
    assert example.input_ids == tokenizer(TEXTS[0][0])["input_ids"] and len(example.input_ids) == 7


def test_token_id_lines_are_cut_to_the_max_lengths(tmp_path):
    rows = [{"input_ids": [5, 6, 7, 8, 1], "labels": [9, -100, 1]}, {"input_ids": [4], "labels": [3, 2]}]
    path = write(tmp_path / "d.jsonl", rows)
    assert read_jsonl(path) == [Example(r["input_ids"], r["labels"]) for r in rows]
    assert read_jsonl(path, max_source_length=2, max_target_length=1, vocab_size=10) == [
        Example(r["input_ids"][:2], r["labels"][:1]) for r in rows
    ]


def test_both_formats_may_share_a_file(tmp_path, tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    path = write(tmp_path / "d.jsonl", [{"input_ids": [5], "labels": [6]}, {"input": "w1", "target": "w2"}])
    assert read_jsonl(path, tokenizer=tokenizer) == [Example([5], [6]), Example(tokenizer("w1")["input_ids"], tokenizer("w2")["input_ids"])]


def test_a_huge_line_is_fine(tmp_path):
    ids = [i % 97 for i in range(300_000)]
    path = write(tmp_path / "d.jsonl", [{"input_ids": ids, "labels": ids}])
    (example,) = read_jsonl(path, max_source_length=512, max_target_length=128, vocab_size=97)
    assert example == Example(ids[:512], ids[:128])


def test_a_byte_order_mark_at_the_start_is_accepted_and_anywhere_else_refused(tmp_path):
    line = b'{"input_ids": [5], "labels": [6]}\n'
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + line + line)
    assert read_jsonl(path) == [Example([5], [6])] * 2
    path.write_bytes(line + b"\xef\xbb\xbf" + line)
    with pytest.raises(DataError, match=r"d\.jsonl:2: invalid JSON"):
        read_jsonl(path)


def test_windows_line_endings_are_accepted(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"input_ids": [5], "labels": [6]}\r\n{"input_ids": [7], "labels": [8]}\r\n')
    assert read_jsonl(path) == [Example([5], [6]), Example([7], [8])]


# --- hostile data: one line naming file, line number, problem and fix -------------------------

GOOD = {"input_ids": [5, 6], "labels": [7, 1]}

HOSTILE = {
    "invalid_json": ('{"input_ids": [5], "labels": [6]', "invalid JSON"),
    "array": ("[5, 6]", "a JSON list, not an object"),
    "number": ("5", "a JSON int, not an object"),
    "string": ('"hello"', "a JSON str, not an object"),
    "null": ("null", "a JSON NoneType, not an object"),
    "missing_labels": ({"input_ids": [5]}, "missing key 'labels'"),
    "missing_target": ({"input": "w1"}, "missing key 'target'"),
    "empty_object": ({}, "an empty object"),
    "mixed": ({"input": "w1", "labels": [5]}, "mixes text and token-id keys"),
    "both_formats": ({"input": "w1", "target": "w2", "input_ids": [5], "labels": [6]}, "mixes text and token-id keys"),
    "unknown_key": ({**GOOD, "attention_mask": [1, 1]}, "unknown key 'attention_mask'"),
    "newline_in_key": ({**GOOD, "a\nb": 1}, r"unknown key 'a\\nb'"),
    "duplicate_key": ('{"input_ids": [5], "labels": [6], "labels": [7]}', r"invalid JSON \(key 'labels' appears twice\)"),
    "float_id": ({"input_ids": [5, 6.0], "labels": [7]}, r"input_ids\[1\] is a float \(6.0\), not an int"),
    "nan_id": ('{"input_ids": [NaN], "labels": [7]}', r"input_ids\[0\] is a float \(NaN\)"),
    "bool_id": ({"input_ids": [5], "labels": [True]}, r"labels\[0\] is a bool \(true\), not an int"),
    "string_id": ({"input_ids": ["5"], "labels": [7]}, r"input_ids\[0\] is a str"),
    "nested_ids": ({"input_ids": [[5, 6]], "labels": [7]}, r"input_ids\[0\] is a list"),
    "ids_not_list": ({"input_ids": 5, "labels": [7]}, "'input_ids' is an int, not a list of ints"),
    "ids_as_string": ({"input_ids": "5 6", "labels": [7]}, "'input_ids' is a str, not a list of ints"),
    "empty_input_ids": ({"input_ids": [], "labels": [7]}, "'input_ids' is empty"),
    "empty_labels": ({"input_ids": [5], "labels": []}, "'labels' is empty"),
    "id_too_big": ({"input_ids": [5, 97], "labels": [7]}, r"input_ids\[1\] = 97 is outside \[0, 97\)"),
    "label_too_big": ({"input_ids": [5], "labels": [1000]}, r"labels\[0\] = 1000 is outside \[0, 97\) or -100"),
    "negative_label": ({"input_ids": [5], "labels": [-1]}, r"labels\[0\] = -1 is outside"),
    "ignore_index_in_input": ({"input_ids": [5, -100], "labels": [7]}, r"input_ids\[1\] = -100 is outside \[0, 97\);"),
    "all_labels_ignored": ({"input_ids": [5], "labels": [-100, -100]}, "every label is -100"),
    "huge_int": ('{"input_ids": [' + "9" * 5000 + '], "labels": [7]}', "invalid JSON"),
    "deep_nesting": ('{"input_ids": ' + "[" * 100_000 + "]" * 100_000 + ', "labels": [7]}', "JSON nested too deeply"),
    "blank_line": ("", "blank line"),
    "whitespace_line": ("  \t", "blank line"),
    "text_not_string": ({"input": ["w1"], "target": "w2"}, "'input' is a list, not a string"),
    "empty_input_text": ({"input": "", "target": "w2"}, "'input' is empty"),
    "whitespace_target": ({"input": "w1", "target": " \n "}, "'target' is empty"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_a_bad_line_is_one_line_naming_the_file_and_line(tmp_path, tokenizer_dir, case):
    bad, problem = HOSTILE[case]
    path = write(tmp_path / "data.jsonl", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(DataError, match=rf"data\.jsonl:3: {problem}") as info:
        read_jsonl(path, tokenizer=load_tokenizer(tokenizer_dir), vocab_size=97)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    assert ";" in message  # the problem, then what to do


def test_text_without_a_tokenizer_is_refused(tmp_path):
    path = write(tmp_path / "d.jsonl", [GOOD, {"input": "w1", "target": "w2"}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: text needs a tokenizer and none is beside the checkpoint; copy"):
        read_jsonl(path)


@pytest.mark.parametrize("objective, keys", [(SEQ2SEQ, "input_ids/labels"), (CLASSIFICATION, "input_ids/label")],
                         ids=["seq2seq", "classification"])
def test_text_without_a_tokenizer_names_the_objectives_own_keys(tmp_path, objective, keys):
    """A classifier's pre-tokenized line is {"input_ids", "label"}: the fix names those keys, not a language model's."""
    good = {"input_ids": [5], **({"label": 1} if objective is CLASSIFICATION else {"labels": [6]})}
    text = {"input": "w1", **({"label": 1} if objective is CLASSIFICATION else {"target": "w2"})}
    path = write(tmp_path / "d.jsonl", [good, text])
    with pytest.raises(DataError) as info:
        read_jsonl(path, objective=objective, num_labels=3)
    assert str(info.value) == (f"{path}:2: text needs a tokenizer and none is beside the checkpoint; copy the "
                               f"checkpoint's tokenizer files beside it or give pre-tokenized {keys}")
    with pytest.raises(DataError) as info:
        load_tokenizer(tmp_path, objective=objective)
    assert str(info.value).endswith(f"; copy the checkpoint's tokenizer files beside it or give pre-tokenized {keys}")


def test_a_tokenizer_larger_than_the_model_is_refused(tmp_path, tokenizer_dir):
    path = write(tmp_path / "d.jsonl", [{"input": "w1", "target": "w39"}])  # w39 is id 42
    with pytest.raises(DataError, match=r"d\.jsonl:1 \(tokenized\): labels\[0\] = 42 is outside \[0, 40\).*checkpoint's own tokenizer"):
        read_jsonl(path, tokenizer=load_tokenizer(tokenizer_dir), vocab_size=40)


def test_labels_that_truncation_leaves_all_ignored_are_refused(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"input_ids": [5], "labels": [-100, 7]}])
    with pytest.raises(DataError, match=r"d\.jsonl:1 \(cut to --max-target-length 1\): every label is -100"):
        read_jsonl(path, max_target_length=1)


def test_the_whole_file_is_checked_before_anything_is_returned(tmp_path):
    path = write(tmp_path / "d.jsonl", [GOOD] * 1000 + [{"input_ids": [5], "labels": [1.5]}])
    with pytest.raises(DataError, match=r"d\.jsonl:1001: labels\[0\] is a float"):
        read_jsonl(path)


def test_the_first_bad_line_is_the_one_reported(tmp_path):
    path = write(tmp_path / "d.jsonl", [GOOD, {"input_ids": [5], "labels": [200]}, "not json"])
    with pytest.raises(DataError, match=r"d\.jsonl:2: labels\[0\] = 200"):
        read_jsonl(path, vocab_size=97)


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"input_ids": [5], "labels": [6]}\n{"input": "caf\xe9", "target": "x"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: not UTF-8 \(byte 15\); save the file as UTF-8"):
        read_jsonl(path)


@pytest.mark.parametrize("content", [b"", b"\n", b"\xef\xbb\xbf", b" \n\r\n"])
def test_an_empty_file_is_refused(tmp_path, content):
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=r"d\.jsonl is empty; each line must be"):
        read_jsonl(path)


def test_a_missing_file_or_a_directory_is_refused(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl does not exist; pass --data a JSONL file"):
        read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=r"is not a regular file; pass --data a JSONL file"):
        read_jsonl(tmp_path)


def test_a_path_with_a_newline_stays_one_line(tmp_path):
    path = write(tmp_path / "a\nb.jsonl", ["oops"])
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    assert "\n" not in str(info.value) and r"a\nb.jsonl" in str(info.value)


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "512"])
def test_bad_max_lengths_are_usage_errors(tmp_path, value):
    path = write(tmp_path / "d.jsonl", [GOOD])
    with pytest.raises(UsageError, match=r"--max-source-length is .*; give an integer >= 1"):
        read_jsonl(path, max_source_length=value)


# --- the tokenizer beside the checkpoint ------------------------------------------------------


def test_load_tokenizer_loads_what_autotokenizer_loads(tokenizer_dir):
    ours, theirs = load_tokenizer(tokenizer_dir), AutoTokenizer.from_pretrained(tokenizer_dir)
    assert type(ours) is type(theirs) and ours.get_vocab() == theirs.get_vocab()
    assert (ours.pad_token_id, ours.eos_token_id, ours.unk_token_id) == (0, 1, 2)


def test_a_directory_with_only_a_model_has_no_tokenizer(tmp_path):
    # AutoTokenizer itself would build a T5 tokenizer of special tokens only from config.json
    checkpoints.write_checkpoint(tmp_path)
    with pytest.raises(DataError, match=r"has no tokenizer \(none of tokenizer\.json, spiece\.model.*\); copy"):
        load_tokenizer(tmp_path)
    assert load_tokenizer(tmp_path, required=False) is None


def test_a_broken_tokenizer_is_one_line(tmp_path, tokenizer_dir):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tokenizer_dir / name).read_bytes())
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nonsense"}}')
    with pytest.raises(DataError, match=r"the tokenizer in .* cannot be loaded \(.*\); replace its tokenizer files") as info:
        load_tokenizer(tmp_path)
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="cannot be loaded"):
        load_tokenizer(tmp_path, required=False)  # present but broken is always an error


# --- batching ---------------------------------------------------------------------------------


def stream(n, epochs, *, shuffle=False, seed=0):
    """The pinned stream, written out: epoch after epoch, file order or the seeded permutation."""
    order = lambda e: torch.randperm(n, generator=torch.Generator().manual_seed(seed + e)).tolist() if shuffle else list(range(n))  # noqa: E731
    return [i for e in range(epochs) for i in order(e)]


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("n, size", [(10, 3), (5, 5), (3, 7), (1, 4), (4, 1)])  # B < N, B == N, B > N
def test_batch_k_is_a_slice_of_the_pinned_stream(n, size, shuffle):
    seed = 11
    full = stream(n, epochs=3 * size + 2, shuffle=shuffle, seed=seed)
    for k in range(3 * n):
        assert batch_indices(n, size, k, shuffle=shuffle, seed=seed) == full[k * size : k * size + size]


def test_file_order_without_shuffling():
    # the contract's first sentence, stated as the lines in the file: 0-based line numbers
    assert [batch_indices(5, 2, k) for k in range(4)] == [[0, 1], [2, 3], [4, 0], [1, 2]]
    assert batch_indices(3, 7, 0) == [0, 1, 2, 0, 1, 2, 0]  # a batch larger than the file spans epochs


def test_each_epoch_is_a_permutation_and_seeds_differ():
    n = 12
    epochs = [sum((batch_indices(n, 4, k, shuffle=True, seed=3) for k in range(3 * e, 3 * e + 3)), []) for e in range(3)]
    assert all(sorted(epoch) == list(range(n)) for epoch in epochs)
    assert epochs[0] != epochs[1]  # a fresh permutation per epoch
    assert batch_indices(n, 4, 0, shuffle=True, seed=3) != batch_indices(n, 4, 0, shuffle=True, seed=4)


@pytest.mark.parametrize("shuffle", [False, True])
def test_data_parallel_replicas_together_take_one_large_batch(shuffle):
    # replica r of R takes global batch s*R + r at step s: together the same examples as
    # a single process with batch R*B, so dp runs compare with one-process runs
    n, size, replicas = 7, 3, 2
    for step in range(6):
        together = sum((batch_indices(n, size, step * replicas + r, shuffle=shuffle, seed=5) for r in range(replicas)), [])
        assert together == batch_indices(n, size * replicas, step, shuffle=shuffle, seed=5)


@pytest.mark.parametrize("args", [(0, 2, 0), (5, 0, 0), (5, 2, -1), (5, True, 0), (5, 2.0, 0)])
def test_bad_batch_arguments_are_usage_errors(args):
    with pytest.raises(UsageError, match=r" is .*; give an integer >= [01]$"):
        batch_indices(*args)


# --- collate and microbatches -----------------------------------------------------------------

EXAMPLES = [Example([5, 6, 7, 1], [8, 1]), Example([9, 1], [10, 11, -100, 12, 1]), Example([13, 14, 1], [15, 1])]


@pytest.fixture(scope="module")
def model():
    # pad and decoder start differ from each other and from 0, so each is seen where it belongs
    return helpers.build(dropout_rate=0.0, pad_token_id=3, decoder_start_token_id=4)


def test_collate_pads_and_shifts_exactly_as_t5_does(model):
    batch = SEQ2SEQ.collate(EXAMPLES, pad_token_id=3, decoder_start_token_id=4)
    assert list(batch) == ["input_ids", "attention_mask", "labels", "decoder_input_ids"]
    assert all(t.dtype == torch.int64 for t in batch.values())
    for i, example in enumerate(EXAMPLES):
        n, m = len(example.input_ids), len(example.labels)
        assert batch["input_ids"][i].tolist() == example.input_ids + [3] * (4 - n)
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (4 - n)
        assert batch["labels"][i].tolist() == example.labels + [-100] * (5 - m)
    torch.testing.assert_close(batch["decoder_input_ids"], model._shift_right(batch["labels"]), rtol=0, atol=0)


def test_a_padded_batch_gives_the_losses_of_its_examples_alone(model):
    # right padding with the mask and -100 labels changes nothing for the real tokens: the
    # token-weighted mean of the batch loss equals the examples' own losses, in eager transformers
    with torch.no_grad():
        batch = SEQ2SEQ.collate(EXAMPLES, pad_token_id=3, decoder_start_token_id=4)
        together = model(**batch).loss * (batch["labels"] != -100).sum()
        alone = sum(model(**SEQ2SEQ.collate([e], pad_token_id=3, decoder_start_token_id=4)).loss * sum(v != -100 for v in e.labels) for e in EXAMPLES)
        from_labels_only = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(**batch).loss, from_labels_only, rtol=0, atol=0)  # T5 shifts the same way itself


def test_fixed_lengths_pad_further_and_change_no_loss(model):
    alone = SEQ2SEQ.collate(EXAMPLES, pad_token_id=3, decoder_start_token_id=4)
    fixed = SEQ2SEQ.collate(EXAMPLES, pad_token_id=3, decoder_start_token_id=4, pad_to=(6, 8))
    assert fixed["input_ids"].shape == fixed["attention_mask"].shape == (3, 6)
    assert fixed["labels"].shape == fixed["decoder_input_ids"].shape == (3, 8)
    for name, tensor in alone.items():  # the same batch, padded further
        assert torch.equal(fixed[name][:, : tensor.shape[1]], tensor)
    torch.testing.assert_close(fixed["decoder_input_ids"], model._shift_right(fixed["labels"]), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(**fixed).loss, model(**alone).loss, rtol=1e-5, atol=1e-6)
    with pytest.raises(UsageError, match="an example has 5 tokens, more than the 4 to pad to; truncate with --max-target-length 4"):
        SEQ2SEQ.collate(EXAMPLES, pad_token_id=3, decoder_start_token_id=4, pad_to=(6, 4))


@pytest.mark.parametrize("bad", [dict(pad_token_id=None, decoder_start_token_id=0), dict(pad_token_id=0, decoder_start_token_id=1.0)])
def test_collate_refuses_missing_token_ids(bad):
    with pytest.raises(UsageError, match="not a token id; set .* in the model's config.json"):
        SEQ2SEQ.collate(EXAMPLES, **bad)
    with pytest.raises(UsageError, match="empty batch"):
        SEQ2SEQ.collate([], pad_token_id=0, decoder_start_token_id=0)


@pytest.mark.parametrize("size, m", [(8, 4), (7, 3), (5, 5), (3, 1)])
def test_microbatches_follow_tensor_split(size, m):
    batch = SEQ2SEQ.collate([EXAMPLES[i % 3] for i in range(size)], pad_token_id=0, decoder_start_token_id=0)
    parts = microbatches(batch, m)
    assert len(parts) == m
    for name, tensor in batch.items():
        for part, expected in zip(parts, torch.tensor_split(tensor, m, dim=0)):
            assert torch.equal(part[name], expected)
    assert [len(p["labels"]) for p in parts] == [size // m + (i < size % m) for i in range(m)]  # first ones hold one more


@pytest.mark.parametrize("m, problem", [(9, "--microbatches 9 is more than the batch's 8 examples; use --microbatches <= --batch"), (0, "--microbatches is 0; give an integer >= 1")])
def test_bad_microbatch_counts_are_one_line(m, problem):
    batch = SEQ2SEQ.collate([EXAMPLES[0]] * 8, pad_token_id=0, decoder_start_token_id=0)
    with pytest.raises(UsageError, match=problem.replace("(", r"\(")):
        microbatches(batch, m)


# --- causal-LM batches (decoder-only models) ------------------------------------------------------

CAUSAL = [Example([5, 6, 7], [8, 9]), Example([10], [11, 12, 13, 14]), Example([15, 16], [17])]


@pytest.fixture(scope="module")
def gpt2():
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=97, n_positions=64,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def test_causal_batches_are_input_then_target_with_only_the_target_learned():
    batch = CAUSAL_LM.collate(CAUSAL, pad_token_id=3)
    assert list(batch) == ["input_ids", "attention_mask", "labels"]
    for i, e in enumerate(CAUSAL):
        n = len(e.input_ids) + len(e.labels)
        assert batch["input_ids"][i].tolist() == e.input_ids + e.labels + [3] * (5 - n)
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (5 - n)
        assert batch["labels"][i].tolist() == [-100] * len(e.input_ids) + e.labels + [-100] * (5 - n)


def test_a_causal_batch_learns_each_target_token_from_what_precedes_it(gpt2):
    # against eager GPT-2: the batch loss is the mean over target tokens of -log p(token | prefix),
    # each computed from that example alone, without padding
    batch = CAUSAL_LM.collate(CAUSAL, pad_token_id=3)
    with torch.no_grad():
        loss = gpt2(**batch).loss
        terms = []
        for e in CAUSAL:
            ids = torch.tensor([e.input_ids + e.labels])
            logp = gpt2(input_ids=ids).logits.log_softmax(-1)[0]
            start = len(e.input_ids)
            terms += [-logp[start + j - 1, token] for j, token in enumerate(e.labels)]
    torch.testing.assert_close(loss, torch.stack(terms).mean(), rtol=1e-5, atol=1e-5)


def test_causal_fixed_lengths_and_refusals():
    fixed = CAUSAL_LM.collate(CAUSAL, pad_token_id=3, pad_to=(4, 4))
    assert fixed["input_ids"].shape == (3, 8)
    with pytest.raises(UsageError, match="not a token id; set pad_token_id"):
        CAUSAL_LM.collate(CAUSAL, pad_token_id=None)


def test_ignored_labels_are_refused_for_a_causal_model(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"input_ids": [1, 2], "labels": [3, -100]}\n')
    assert read_jsonl(path)[0].labels == [3, -100]  # a seq2seq model ignores it
    with pytest.raises(DataError, match=r"d.jsonl:1: labels\[1\] is -100, but a causal LM reads its labels as tokens"):
        read_jsonl(path, objective=CAUSAL_LM)


# --- masked-LM batches (BERT) ------------------------------------------------------------------------

MASKED = [Example([5, 6, 7], [-100, 9, -100]), Example([10, 11, 12, 13, 14], [20, -100, -100, -100, 21]),
          Example([15], [16])]


def test_masked_batches_keep_labels_aligned_with_the_input():
    batch = MASKED_LM.collate(MASKED, pad_token_id=3)
    assert list(batch) == ["input_ids", "attention_mask", "token_type_ids", "labels"]
    for i, e in enumerate(MASKED):
        n = len(e.input_ids)
        assert batch["input_ids"][i].tolist() == e.input_ids + [3] * (5 - n)
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (5 - n)
        assert batch["labels"][i].tolist() == e.labels + [-100] * (5 - n)
    assert not batch["token_type_ids"].any()


def test_a_padded_masked_batch_gives_the_losses_of_its_examples_alone():
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                     vocab_size=97, max_position_embeddings=32, pad_token_id=3)
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(config).eval()
    with torch.no_grad():
        batch = MASKED_LM.collate(MASKED, pad_token_id=3)
        together = model(**batch).loss * (batch["labels"] != -100).sum()
        alone = sum(model(**MASKED_LM.collate([e], pad_token_id=3)).loss * sum(v != -100 for v in e.labels)
                    for e in MASKED)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("line, message", [
    ('{"input_ids": [1, 2, 3], "labels": [4, 5]}', "2 labels for 3 input_ids; a masked LM's labels are aligned"),
    ('{"input": "a [MASK] b", "target": "a c b"}', "a masked LM's lines must be pre-tokenized"),
])
def test_masked_lines_that_do_not_align_are_refused(tmp_path, tokenizer_dir, line, message):
    path = tmp_path / "d.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(DataError, match=rf"d.jsonl:1: {message}"):
        read_jsonl(path, tokenizer=load_tokenizer(tokenizer_dir), objective=MASKED_LM)


def test_masked_lines_are_cut_to_the_source_length(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"input_ids": [1, 2, 3, 4], "labels": [-100, 5, -100, 6]}\n{"input_ids": [1, 2], "labels": [-100, 7]}\n')
    examples = read_jsonl(path, max_source_length=2, objective=MASKED_LM)
    assert [(e.input_ids, e.labels) for e in examples] == [([1, 2], [-100, 5]), ([1, 2], [-100, 7])]
    with pytest.raises(DataError, match=r"d.jsonl:1 \(cut to --max-source-length 1\): every label is -100"):
        read_jsonl(path, max_source_length=1, objective=MASKED_LM)


@pytest.mark.parametrize("name", ["tokenizer_config.json", "special_tokens_map.json"])
def test_a_fifo_named_like_a_tokenizer_file_is_refused_not_waited_on(tmp_path, tokenizer_dir, name):
    """A hostile checkpoint's FIFO would block the tokenizer's read forever; it is refused in one line.
    (In a subprocess, so that the old behaviour, a hang, ends as a failure at the timeout.)"""
    for file in tokenizer_dir.iterdir():
        if file.name != name:
            (tmp_path / file.name).write_bytes(file.read_bytes())
    os.mkfifo(tmp_path / name)
    code = ("import sys; from fxconvert.training.data import load_tokenizer, DataError\n"
            "try:\n    load_tokenizer(sys.argv[1])\nexcept DataError as e:\n    print(e)\n")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().endswith(f"{name} is not a regular file; replace it with the checkpoint's own "
                                       f"tokenizer file, or remove it")


# --- sequence classification (RoBERTa, GPT-2 *ForSequenceClassification) -----------------------------------

LABELLED = [Example([5, 6, 7], [2]), Example([10, 11, 12, 13, 14], [0]), Example([15], [1])]


def test_classification_batches_are_padded_ids_and_one_class_id_per_row():
    batch = CLASSIFICATION.collate(LABELLED, pad_token_id=3)
    assert list(batch) == ["input_ids", "attention_mask", "labels"]
    assert batch["labels"].tolist() == [2, 0, 1] and batch["labels"].dtype == torch.int64
    for i, e in enumerate(LABELLED):
        n = len(e.input_ids)
        assert batch["input_ids"][i].tolist() == e.input_ids + [3] * (5 - n)
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (5 - n)
    assert CLASSIFICATION.collate(LABELLED, pad_token_id=3, pad_to=(8, 1))["input_ids"].shape == (3, 8)


@pytest.mark.parametrize("cls_name", ["RobertaForSequenceClassification", "GPT2ForSequenceClassification"])
def test_a_padded_classification_batch_gives_the_mean_of_its_examples_losses(cls_name):
    """transformers' loss is the cross-entropy's mean over rows; GPT-2 pools each row's last token that is not
    pad_token_id, so the padding must be exactly that id."""
    from fxconvert.families import derived

    model_type = "roberta" if cls_name.startswith("Roberta") else "gpt2"
    config = derived.tiny_config(model_type, num_labels=3, pad_token_id=3)
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(config).eval()
    with torch.no_grad():
        together = model(**CLASSIFICATION.collate(LABELLED, pad_token_id=3)).loss
        alone = [model(**CLASSIFICATION.collate([e], pad_token_id=3)).loss for e in LABELLED]
    torch.testing.assert_close(together, torch.stack(alone).mean(), rtol=1e-5, atol=1e-5)


def test_classification_text_is_tokenized_and_ids_cut_to_the_source_length(tmp_path, tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    direct = AutoTokenizer.from_pretrained(tokenizer_dir)
    path = write(tmp_path / "d.jsonl", [{"input": "w1 w2 w3", "label": 2}, {"input_ids": [5, 6, 7, 8], "label": 0}])
    examples = read_jsonl(path, tokenizer=tokenizer, objective=CLASSIFICATION, num_labels=3)
    assert examples == [Example(direct("w1 w2 w3")["input_ids"], [2]), Example([5, 6, 7, 8], [0])]
    cut = read_jsonl(path, tokenizer=tokenizer, objective=CLASSIFICATION, num_labels=3, max_source_length=2,
                     max_target_length=1)
    assert cut == [Example(direct("w1 w2 w3", truncation=True, max_length=2)["input_ids"], [2]), Example([5, 6], [0])]
    assert CLASSIFICATION.length(cut[1]) == 2  # the label takes no position


LABEL_FIX = r'each line must be \{"input": str, "label": int\} or \{"input_ids": \[int\], "label": int\}'
HOSTILE_LABELS = {
    "label_string": ({"input_ids": [5], "label": "1"}, rf"'label' is a str \(\"1\"\), not an int; {LABEL_FIX}"),
    "label_float": ({"input": "w1", "label": 1.0}, rf"'label' is a float \(1.0\), not an int; {LABEL_FIX}"),
    "label_bool": ({"input_ids": [5], "label": True}, r"'label' is a bool \(true\), not an int"),
    "label_null": ({"input_ids": [5], "label": None}, r"'label' is a NoneType \(null\), not an int"),
    "label_list": ({"input_ids": [5], "label": [1]}, r"'label' is a list \(\[1\]\), not an int"),
    "label_negative": ({"input_ids": [5], "label": -1}, r"label = -1 is outside \[0, 3\), the model's 3 classes; "
                                                        r"give a class id the model was converted with"),
    "label_ignored": ({"input_ids": [5], "label": -100}, r"label = -100 is outside \[0, 3\)"),
    "label_too_big": ({"input": "w1", "label": 3}, r"label = 3 is outside \[0, 3\), the model's 3 classes"),
    "label_huge": ({"input_ids": [5], "label": 10**4000},  # JSON ints have no bound: the message shows 40 digits
                   r"label = 10{39}\.\.\. \(4001 digits\) is outside \[0, 3\), the model's 3 classes"),
    "id_huge": ({"input_ids": [5, -10**4000], "label": 1}, r"input_ids\[1\] = -10{38}\.\.\. \(4001 digits\) is outside"),
    "missing_label": ({"input_ids": [5]}, rf"missing key 'label'; {LABEL_FIX}"),
    "missing_input": ({"label": 1}, r"missing key 'input_ids'"),
    "labels_for_label": ({"input_ids": [5], "labels": [1]}, rf"unknown key 'labels'; {LABEL_FIX}"),
    "a_target": ({"input": "w1", "target": "w2"}, rf"unknown key 'target'; {LABEL_FIX}"),
    "mixed": ({"input": "w1", "input_ids": [5], "label": 1}, "mixes text and token-id keys"),
    "empty_input": ({"input": " ", "label": 1}, rf"'input' is empty; {LABEL_FIX}"),
    "input_not_text": ({"input": 5, "label": 1}, r"'input' is an int, not a string"),
    "empty_ids": ({"input_ids": [], "label": 1}, r"'input_ids' is empty"),
    "id_outside": ({"input_ids": [97], "label": 1}, r"input_ids\[0\] = 97 is outside \[0, 97\)"),
    "blank_line": ("", rf"blank line; remove it \({LABEL_FIX}\)"),
    "not_an_object": ("[1]", rf"a JSON list, not an object; {LABEL_FIX}"),
}


@pytest.mark.parametrize("case", HOSTILE_LABELS)
def test_a_bad_classification_line_is_one_line_naming_the_file_and_line(tmp_path, tokenizer_dir, case):
    good = {"input_ids": [5, 6], "label": 2}
    bad, problem = HOSTILE_LABELS[case]
    path = write(tmp_path / "data.jsonl", [good, {"input": "w1", "label": 0}, bad, good])
    with pytest.raises(DataError, match=rf"^{tmp_path}/data\.jsonl:3: {problem}") as info:
        read_jsonl(path, tokenizer=load_tokenizer(tokenizer_dir), vocab_size=97, objective=CLASSIFICATION, num_labels=3)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400 and ";" in message, message


def test_a_class_id_past_int64_is_refused_without_the_models_classes(tmp_path):
    """Without num_labels a label is still an int64 (the batch's dtype): 2**63 is refused in one line."""
    path = write(tmp_path / "d.jsonl", [{"input_ids": [5], "label": 2**63 - 1}, {"input_ids": [5], "label": 2**63}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: label = 9223372036854775808 is outside \[0, 2\*\*63\); "):
        read_jsonl(path, objective=CLASSIFICATION)


def test_an_empty_classification_file_names_the_classifiers_format(tmp_path):
    with pytest.raises(DataError, match=rf"d\.jsonl is empty; {LABEL_FIX}, one per line$"):
        read_jsonl(write(tmp_path / "d.jsonl", [], end=""), objective=CLASSIFICATION, num_labels=3)
