"""Streamed data (`fxconvert.training.data_file`, `DataFile`): 8 bytes a line kept, lines read back as they were
checked, a file changed under a run refused, and a rank whose stages read only masks reading no line."""

import gc
import json
import os
import tracemalloc

import pytest
import torch

import checkpoints
from fxconvert.objectives import CAUSAL_LM, CLASSIFICATION, MASKED_LM, SEQ2SEQ
from fxconvert.training import data_file
from fxconvert.training.data import DataError, Example, load_jsonl, load_tokenizer, read_jsonl
from fxconvert.training.dataset import FROM_LENGTHS, Data, reads_lines
from fxconvert.training.model import Model, StagePart


def rows_of(n, seed=0, longest=12):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, 90, (int(torch.randint(1, longest, (1,), generator=g)),), generator=g).tolist(),
             "labels": torch.randint(1, 90, (int(torch.randint(1, longest, (1,), generator=g)),), generator=g).tolist()}
            for _ in range(n)]


def write_rows(path, rows, *, newline=b"\n", last_newline=True, bom=False):
    lines = [json.dumps(r).encode() for r in rows]
    path.write_bytes((data_file.BOM if bom else b"") + newline.join(lines) + (newline if last_newline else b""))
    return path


def expected(rows, source=None, target=None):
    return [Example(r["input_ids"][:source], r["labels"][:target]) for r in rows]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    checkpoints.write_tokenizer(directory)
    return directory


# --- what a rank keeps ---------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", ["offsets", "lengths"])
def test_a_rank_keeps_eight_bytes_a_line_not_the_examples(tmp_path, keep):
    """5,000 lines of up to 40 ids: the examples would take megabytes; a rank keeps where each line begins (a
    reading rank) or the two lengths (a rank reading only masks): 8 bytes a line, in arrays, no object per line."""
    n = 5_000
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"input_ids": [1 + (i * j) % 89 for j in range(1 + i % 40)],
                                        "labels": [1 + (i + j) % 89 for j in range(1 + i % 7)]}) + "\n" for i in range(n)))
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        read = load_jsonl(path, offsets=keep == "offsets", lengths=keep == "lengths")
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(read) == n
    kept = [read.offsets] if keep == "offsets" else [read.source_lengths, read.target_lengths]
    assert sum(a.itemsize for a in kept) == 8 and all(len(a) >= n for a in kept)
    assert (read.offsets is None) == (keep == "lengths") and (read.source_lengths is None) == (keep == "offsets")
    assert held < 8 * n * 1.25 + 64 * 1024, held  # the arrays (grown by an eighth at a time), a few objects (~35 KB)


# --- lines read back are the lines checked ------------------------------------------------------------

SHAPES = {
    "lf": {}, "crlf": {"newline": b"\r\n"}, "no_final_newline": {"last_newline": False},
    "crlf_no_final_newline": {"newline": b"\r\n", "last_newline": False}, "bom": {"bom": True},
}


@pytest.mark.parametrize("shape", SHAPES)
def test_lines_read_back_are_the_lines_checked(tmp_path, shape):
    rows = rows_of(30, seed=2)
    path = write_rows(tmp_path / "d.jsonl", rows, **SHAPES[shape])
    read = load_jsonl(path, max_source_length=5, max_target_length=4, lengths=True)
    want = expected(rows, 5, 4)
    picks = [29, 0, 3, 3, 17, 0]  # any order, repeats (a batch larger than the file)
    assert read.take(picks) == [want[i] for i in picks]
    assert read.take(range(30)) == want == read_jsonl(path, max_source_length=5, max_target_length=4)
    assert [(len(e.input_ids), len(e.labels)) for e in read.shaped(picks)] == \
        [(len(want[i].input_ids), len(want[i].labels)) for i in picks]
    assert read[-1] == want[-1] and read.sha256 == __import__("hashlib").sha256(path.read_bytes()).hexdigest()


def test_a_huge_single_line_is_read_back_whole(tmp_path):
    ids = [i % 97 for i in range(300_000)]
    rows = [{"input_ids": [5], "labels": [6]}, {"input_ids": ids, "labels": ids}, {"input_ids": [7], "labels": [8]}]
    read = load_jsonl(write_rows(tmp_path / "d.jsonl", rows, last_newline=False), max_target_length=3, lengths=True)
    assert read.take([2, 1, 0]) == [Example([7], [8]), Example(ids, ids[:3]), Example([5], [6])]
    assert read.longest == (1, 300_000) and list(read.source_lengths) == [1, 300_000, 1]


def test_text_lines_are_tokenized_again_as_the_pass_tokenized_them(tmp_path, tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    pairs = [(f"w{i % 40} w{(i * 7) % 40} w3", f"w{(i * 3) % 40}") for i in range(1500)]  # more than one chunk
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"input": s, "target": t}) + "\r\n" for s, t in pairs))
    read = load_jsonl(path, tokenizer=tokenizer, max_source_length=3)
    for i in (0, 1024, 1499):
        source, target = pairs[i]
        assert read.take([i]) == [Example(tokenizer(source, truncation=True, max_length=3)["input_ids"],
                                          tokenizer(text_target=target)["input_ids"])]


@pytest.mark.parametrize("where", ["middle", "end", "crlf"])
def test_a_blank_line_past_the_first_chunk_is_refused(tmp_path, where):
    good = json.dumps({"input_ids": [5], "labels": [6]})
    lines = [good] * 2000 + {"middle": ["", good], "end": [""], "crlf": ["\r", good]}[where]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl:2001: blank line; remove it"):
        load_jsonl(tmp_path / "d.jsonl")


def test_problems_are_reported_as_if_every_line_were_parsed_then_tokenized_then_cut(tmp_path, tokenizer_dir):
    """The pass makes examples a chunk at a time, yet reports what checking every line first reported: a line that
    does not parse before any tokenized problem, a tokenized problem before any line cut to nothing."""
    tokenizer, good = load_tokenizer(tokenizer_dir), json.dumps({"input_ids": [5], "labels": [6]})
    cut = json.dumps({"input_ids": [5], "labels": [-100, 6]})
    wide = json.dumps({"input": "w39", "target": "w1"})  # w39 is id 42, outside a vocabulary of 40
    cases = [([wide] + [good] * 1500 + ["not json"], r"d\.jsonl:1502: invalid JSON"),
             ([cut] + [good] * 1500 + [wide], r"d\.jsonl:1502 \(tokenized\): input_ids\[0\] = 42"),
             ([cut, wide], r"d\.jsonl:2 \(tokenized\)"),
             ([good] * 1500 + [cut], r"d\.jsonl:1501 \(cut to --max-target-length 1\)")]
    for lines, message in cases:
        (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
        with pytest.raises(DataError, match=message):
            load_jsonl(tmp_path / "d.jsonl", tokenizer=tokenizer, vocab_size=40, max_target_length=1)


# --- a file that changes under the run ---------------------------------------------------------------------


def _append(path):
    with open(path, "a") as f:
        f.write(json.dumps({"input_ids": [9], "labels": [9]}) + "\n")


def _same_size_later(path):
    content = path.read_bytes()
    path.write_bytes(content.replace(b"[5]", b"[7]", 1))
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a clock's second later, whatever its resolution


def _replaced(path):
    copy = path.with_name("copy.jsonl")
    copy.write_bytes(path.read_bytes())
    st = os.stat(path)
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))  # the same size and time: another file all the same
    os.replace(copy, path)


@pytest.mark.parametrize("change", [_append, _same_size_later, _replaced], ids=["append", "edit", "replace"])
def test_a_file_changed_after_it_was_read_stops_the_next_read(tmp_path, change):
    path = write_rows(tmp_path / "d.jsonl", [{"input_ids": [5], "labels": [6]}] * 3)
    read = load_jsonl(path)
    assert read.take([0]) == [Example([5], [6])]
    change(path)
    with pytest.raises(DataError) as info:
        read.take([1])
    assert str(info.value) == (f"{path} changed while the run was using it (its size or modification time is not what "
                               f"it was when it was read); put the original back and pass --resume, or train on a "
                               f"copy that stays unchanged")


def test_a_file_removed_after_it_was_read_is_one_line(tmp_path):
    path = write_rows(tmp_path / "d.jsonl", [{"input_ids": [5], "labels": [6]}])
    read = load_jsonl(path)
    path.unlink()
    with pytest.raises(DataError, match=r"d\.jsonl cannot be read any more \(No such file or directory\); put it "
                                        r"back and pass --resume"):
        read.take([0])


def test_a_file_changed_while_it_is_checked_is_refused(tmp_path):
    path = write_rows(tmp_path / "d.jsonl", [{"input_ids": [5], "labels": [6]}] * 3)
    with open(path, "rb") as file:
        lines = data_file.Lines(file, "d.jsonl")
        seen = iter(lines)
        next(seen)
        _append(path)
        with pytest.raises(DataError, match=r"^d\.jsonl changed while the run was using it"):
            list(seen)


# --- a rank whose stages read only masks --------------------------------------------------------------------

OBJECTIVES = {"seq2seq": (SEQ2SEQ, {"pad_token_id": 0, "decoder_start_token_id": 0}),
              "causal": (CAUSAL_LM, {"pad_token_id": 3}), "masked": (MASKED_LM, {"pad_token_id": 3}),
              "classification": (CLASSIFICATION, {"pad_token_id": 3})}


@pytest.mark.parametrize("name", OBJECTIVES)
def test_a_rank_reading_no_line_collates_the_batchs_shapes_and_masks(tmp_path, name):
    objective, token_ids = OBJECTIVES[name]
    rows = rows_of(10, seed=4)
    if objective.aligned:
        rows = [{"input_ids": r["input_ids"], "labels": r["input_ids"][::-1]} for r in rows]
    if objective.label_key:  # one class id a line
        rows = [{"input_ids": r["input_ids"], "label": i % 3} for i, r in enumerate(rows)]
    path = write_rows(tmp_path / "d.jsonl", rows)
    reading = Data(load_jsonl(path, objective=objective), token_ids, objective, batch_size=4)
    masks_only = Data(load_jsonl(path, objective=objective, offsets=False, lengths=True), token_ids, objective,
                      batch_size=4, reads=False)
    assert masks_only.examples.offsets is None
    for k in range(4):
        real, stand_in = reading.batch(k), masks_only.batch(k)
        assert {n: v.shape for n, v in real.items()} == {n: v.shape for n, v in stand_in.items()}
        assert set(real) & FROM_LENGTHS
        for field in set(real) & FROM_LENGTHS:
            assert torch.equal(real[field], stand_in[field]), field


def test_which_ranks_read_lines():
    """T5 on 3 stages: the middle stage reads the attention mask alone (as the converter splits it)."""
    def model(inputs):
        parts = {i: StagePart(i, torch.nn.Identity(), names) for i, names in inputs.items()}
        return Model(parts, num_stages=3, shared_stages={}, config={})

    assert reads_lines(model({0: ["input_ids", "attention_mask"]}))
    assert not reads_lines(model({1: ["attention_mask"]}))
    assert reads_lines(model({2: ["attention_mask", "decoder_input_ids", "labels"]}))
    assert reads_lines(model({1: ["attention_mask", "decoder_input_ids"]}))  # the decoder starts in the middle
    assert reads_lines(model({2: []}))  # the loss stage, whatever it lists
