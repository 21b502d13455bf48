"""`torchrun -m fxconvert.train` on GPT-2 (a causal LM), BART (seq2seq) and BERT (a masked LM) against eager transformers,
and on OPT, Mixtral and Gemma 2 (causal LMs), Marian (seq2seq) and RoBERTa's masked LM, whose records are derived
from transformers' declarations: their conversions carry the record to the ranks in family.json
(`fxconvert.families.stored`). Mixtral's expert blocks
are leaves, which each rank rebuilds from transformers as its stage file names them; Gemma 2 ties its embedding
across the stages, soft-caps its logits and slides a window shorter than the data's sequences. Sequence classifiers
(RoBERTa's and GPT-2's, both trained from family.json) equal one eager step on each whole batch.

The same contract as tests/test_train_eager.py for T5, with each family's batching written
here from the contract, not from fxconvert's code:

- seq2seq (BART): inputs padded with pad_token_id, labels with -100; BART builds its decoder
  inputs from the labels itself;
- causal (GPT-2): each line is one sequence, input_ids followed by labels; labels are -100 on
  the input's positions; padded on the right (GPT-2 has no pad token: eos_token_id pads,
  masked and never learned); GPT-2 shifts the labels itself;
- masked (BERT): input_ids and aligned labels (-100 where nothing is predicted) padded on the
  right with pad_token_id and -100; token_type_ids all 0.

Each run trains a tiny checkpoint written by save_pretrained (dropout 0), 2 stages with 1f1b,
SGD, 3 steps, 2 microbatches, and must give the eager model's loss at every step and, in
RUN/hf, its weights within 1e-5. The tied embedding (GPT-2's wte / lm_head, BART's shared
embedding, encoder and decoder embed_tokens and lm_head, BERT's word embedding and MLM decoder)
is held by both stages, so this also checks the tied-gradient all-reduce.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import train_runs as tr
from fxconvert.families import derived
from fxconvert.stage_files import load_pipeline

pytestmark = pytest.mark.xdist_group("ranks")  # torchrun runs: one at a time (tests/conftest.py)

STEPS, BATCH, MICRO, LR, TOL = 3, 4, 2, 0.5, 1e-5
VOCAB = 97

CONFIGS = {
    "gpt2": (transformers.GPT2LMHeadModel, lambda: transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=1, eos_token_id=1), "causal"),
    "bart": (transformers.BartForConditionalGeneration, lambda: transformers.BartConfig(
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=VOCAB, max_position_embeddings=64, dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2, forced_eos_token_id=None), "seq2seq"),
    # untied head, grouped-query attention, rotary positions (a tied Qwen2 trains in test_family_llama.py)
    "llama": (transformers.LlamaForCausalLM, lambda: transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=1, eos_token_id=1, tie_word_embeddings=False),
     "causal"),
    "bert": (transformers.BertForMaskedLM, lambda: transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0),
     "masked"),
    # no hand-written record: the ranks rebuild the derived one from the conversion's family.json
    "opt": (transformers.OPTForCausalLM, lambda: derived.tiny_config("opt", dropout=0.0, attention_dropout=0.0,
                                                                     layerdrop=0.0), "causal"),
    # derived, with leaves: each expert block runs its eager code, rebuilt on its rank from transformers; the
    # router's auxiliary loss is off (transformers' default), so the loss is the language-model loss alone
    "mixtral": (transformers.MixtralForCausalLM, lambda: derived.tiny_config("mixtral", output_router_logits=False),
                "causal"),
    # derived: a tied embedding held by both stages, logits soft-capped in attention and at the head, and a
    # sliding window (every other layer) shorter than the batches' sequences
    "gemma2": (transformers.Gemma2ForCausalLM, lambda: derived.tiny_config("gemma2", sliding_window=4), "causal"),
    # derived seq2seq: the encoder's and decoder's embeddings and the head tied (held by both stages), a
    # final_logits_bias buffer, and decoder inputs the trainer shifts from the labels as Marian itself does (its
    # decoder_start_token_id set apart from pad_token_id, so the two cannot be confused)
    "marian": (transformers.MarianMTModel, lambda: derived.tiny_config(
        "marian", dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, decoder_start_token_id=2), "seq2seq"),
    # derived masked LM: RoBERTa numbers positions from pad_token_id + 1, so its padding must be exactly that id
    "roberta": (transformers.RobertaForMaskedLM, lambda: derived.tiny_config(
        "roberta", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), "masked"),
}
DERIVED = ("opt", "mixtral", "gemma2", "marian", "roberta")  # no hand-written record: family.json carries the derived one
LEAVES = {"mixtral": [["model.layers.0.mlp.experts"], ["model.layers.1.mlp.experts"]]}  # per stage; others: none


def write_rows(path, objective, n=16, seed=3) -> list[dict]:
    """Pre-tokenized lines of varied lengths: no ignored labels (a causal LM refuses them), except for a
    masked LM, whose labels are aligned with its input and -100 where nothing is predicted."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        src, tgt = int(torch.randint(1, 8, (1,), generator=g)), int(torch.randint(1, 6, (1,), generator=g))
        row = {"input_ids": torch.randint(3, VOCAB, (src,), generator=g).tolist(),
               "labels": torch.randint(3, VOCAB, (tgt,), generator=g).tolist()}
        if objective == "masked":
            keep = torch.rand(src, generator=g) < 0.4
            keep[int(torch.randint(0, src, (1,), generator=g))] = True  # at least one predicted token
            row["labels"] = [t if k else -100 for t, k in zip(torch.randint(3, VOCAB, (src,), generator=g).tolist(),
                                                              keep.tolist())]
        rows.append(row)
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def eager_batch(rows, k, *, objective, pad):
    picked = [rows[i % len(rows)] for i in range(k * BATCH, k * BATCH + BATCH)]
    if objective == "seq2seq":
        return tr.eager_batch(rows, BATCH, k, pad_token_id=pad)
    if objective == "masked":
        batch = tr.eager_batch(rows, BATCH, k, pad_token_id=pad)  # labels have the inputs' lengths
        batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
        return batch
    seqs = [r["input_ids"] + r["labels"] for r in picked]
    width = max(map(len, seqs))
    out = {"input_ids": torch.full((BATCH, width), pad), "attention_mask": torch.zeros((BATCH, width), dtype=torch.long),
           "labels": torch.full((BATCH, width), -100)}
    for i, (r, s) in enumerate(zip(picked, seqs)):
        out["input_ids"][i, :len(s)] = torch.tensor(s)
        out["attention_mask"][i, :len(s)] = 1
        out["labels"][i, len(r["input_ids"]):len(s)] = torch.tensor(r["labels"])
    return out


def train_eager(cls, checkpoint, rows, *, objective, pad):
    model = cls.from_pretrained(checkpoint).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        optimizer.zero_grad()
        total = 0.0
        chunks = {k: torch.tensor_split(v, MICRO) for k, v in eager_batch(rows, step, objective=objective, pad=pad).items()}
        for i in range(MICRO):
            extra = {} if objective == "masked" else {"use_cache": False}
            loss = model(**{k: v[i] for k, v in chunks.items()}, **extra).loss
            (loss / MICRO).backward()
            total += loss.item() / MICRO
        optimizer.step()
        losses.append(total)
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def weights(cls, directory):
    return {k: v.detach().clone() for k, v in cls.from_pretrained(directory).state_dict().items()}


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_pipeline_training_equals_eager_transformers(tmp_path, family):
    cls, config, objective = CONFIGS[family]
    torch.manual_seed(0)
    model = cls(config())
    model.save_pretrained(tmp_path / "ckpt")
    rows = write_rows(tmp_path / "train.jsonl", objective)
    conv = tmp_path / "conv"
    proc = subprocess.run([sys.executable, "-m", "fxconvert", str(tmp_path / "ckpt"), "--stages", "2", "--out",
                           str(conv), "-q"], cwd=tr.REPO, env=tr.env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((conv / "pipeline.json").read_text())
    assert (conv / "family.json").is_file() == (family in DERIVED)  # only a derived record travels
    pipeline = load_pipeline(conv)
    leaves = [sorted(getattr(pipeline.import_stage(i), "TRANSFORMERS_LEAVES", {})) for i in range(2)]
    assert leaves == LEAVES.get(family, [[], []])  # each rank rebuilds its own from transformers
    if model.config.tie_word_embeddings:
        assert sorted(manifest["shared_weights"]["shared_embed_weight"]["stages"]) == [0, 1]  # held by both stages
    else:
        assert manifest["shared_weights"] == {}
    out = tmp_path / "run"
    proc = tr.torchrun(2, conv, "--data", tmp_path / "train.jsonl", "--out", out, "--steps", STEPS, "--batch", BATCH,
                       "--microbatches", MICRO, "--optimizer", "sgd", "--lr", LR, "--schedule", "1f1b")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else model.config.eos_token_id
    losses, expected = train_eager(cls, tmp_path / "ckpt", rows, objective=objective, pad=pad)
    got = [m["loss"] for m in tr.metrics(out)]
    assert max(abs(a - b) for a, b in zip(got, losses, strict=True)) <= TOL, (got, losses)
    trained = weights(cls, out / "hf")
    assert tr.max_weight_diff(trained, expected) <= TOL
    assert tr.max_weight_diff(weights(cls, tmp_path / "ckpt"), expected) > 1e-2  # the weights did move


def test_ignored_labels_in_causal_data_are_one_line_whichever_rank_reads_them(tmp_path):
    """Every rank checks the data before training; the line reaches the user once, whichever rank is first."""
    cls, config, _ = CONFIGS["gpt2"]
    cls(config()).save_pretrained(tmp_path / "ckpt")
    (tmp_path / "d.jsonl").write_text('{"input_ids": [5, 6], "labels": [7]}\n{"input_ids": [5], "labels": [7, -100]}\n')
    proc = tr.torchrun(2, tmp_path / "ckpt", "--data", tmp_path / "d.jsonl", "--out", tmp_path / "run", "--steps", 1,
                       "--batch", 2)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("fxconvert.train:")]
    assert proc.returncode != 0
    assert lines == [f"fxconvert.train: error: {tmp_path / 'd.jsonl'}:2: labels[1] is -100, but a causal LM reads its "
                     f"labels as tokens; put the tokens it should not learn in input_ids (they are never learned)"]
    assert not (tmp_path / "run").exists()


# (family, input length, label length): one token past the learned position table (64 rows)
TOO_LONG = [("gpt2", 40, 25), ("bart", 65, 3), ("bart", 3, 65), ("bert", 65, 65)]
CUT = {"causal": "--max-source-length and --max-target-length that add up to",
       "seq2seq": "--max-source-length and --max-target-length of", "masked": "--max-source-length of"}


@pytest.mark.parametrize("family,source,target", TOO_LONG, ids=[f"{f}-{s}-{t}" for f, s, t in TOO_LONG])
def test_examples_longer_than_the_positions_are_one_line_before_training(tmp_path, family, source, target):
    """GPT-2 (n_positions), BART and BERT (max_position_embeddings) look positions up in a 64-row table:
    eager transformers fails on a longer sequence, so the data check names the example and the fix."""
    from fxconvert.errors import UsageError
    from fxconvert.training.config import TrainConfig
    from fxconvert.training.dataset import load_data
    from fxconvert.training.model import Model

    cls, config, objective = CONFIGS[family]
    causal = objective == "causal"
    data = tmp_path / "d.jsonl"
    fits = {"input_ids": [5] * 3, "labels": [7] * 3}
    long = {"input_ids": [5] * source, "labels": [7] * target}
    data.write_text(json.dumps(fits) + "\n" + json.dumps(long) + "\n")
    config = {**config().to_dict(), "architectures": [cls.__name__]}
    model = Model(parts={}, num_stages=1, shared_stages={}, config=config)
    args = TrainConfig(source="-", data=str(data), out="-")
    with pytest.raises(UsageError) as info:
        load_data(args, model)
    field, total = ("n_positions", source + target) if causal else ("max_position_embeddings", max(source, target))
    assert str(info.value) == (f"{data}: example 2 is {total} tokens long, more than the model's {field} (64); pass "
                               f"{CUT[objective]} at most 64")
    # one token shorter it loads, and eager transformers runs it; one token longer eager fails
    long = {"input_ids": [5] * (source - (source >= target)), "labels": [7] * (target - (target >= source))}
    data.write_text(json.dumps(long) + "\n")
    assert len(load_data(args, model).examples) == 1
    torch.manual_seed(0)
    eager = cls(transformers.AutoConfig.for_model(**{k: v for k, v in config.items() if k != "architectures"})).eval()
    batch = (dict(input_ids=torch.tensor([long["input_ids"] + long["labels"]])) if causal else
             dict(input_ids=torch.tensor([long["input_ids"]]), labels=torch.tensor([long["labels"]])))
    with torch.no_grad():
        assert torch.isfinite(eager(**batch).logits).all()
        with pytest.raises((IndexError, RuntimeError)):  # an index past the table (BERT: past its position_ids)
            eager(**{k: torch.cat([v, v[:, :1]], dim=1) for k, v in batch.items()})


def test_a_roberta_line_as_long_as_its_position_table_is_one_line_before_training(tmp_path, monkeypatch):
    """RoBERTa numbers positions from pad_token_id + 1 (fairseq's): its 64-row table holds 64 - 1 - 1 = 62 tokens
    when pad_token_id is 1. The bound travels in family.json to the rank, whose data check refuses a line of 64
    tokens (which eager transformers fails on, index out of bounds) in one line naming the bound and the fix."""
    from fxconvert import families
    from fxconvert.errors import UsageError
    from fxconvert.families import stored
    from fxconvert.training import model as rank_model
    from fxconvert.training.config import TrainConfig
    from fxconvert.training.dataset import load_data
    from fxconvert.training.model import Model

    cls = transformers.RobertaForSequenceClassification
    config = derived.tiny_config("roberta", max_position_embeddings=64, pad_token_id=1, num_labels=3)
    record = derived.derive(cls, config)
    monkeypatch.setattr(families, "_DERIVED", {})  # a rank: only what family.json says
    (tmp_path / stored.FILE).write_text(stored.family_text(record))
    rank_model._derived_record(tmp_path, cls.__name__, "roberta")
    config_json = {**config.to_dict(), "architectures": [cls.__name__]}
    model = Model(parts={}, num_stages=1, shared_stages={}, config=config_json)
    data = tmp_path / "d.jsonl"
    args = TrainConfig(source="-", data=str(data), out="-")
    for length in (64, 63):
        data.write_text(json.dumps({"input_ids": [5] * 3, "label": 0}) + "\n" +
                        json.dumps({"input_ids": [5] * length, "label": 1}) + "\n")
        with pytest.raises(UsageError) as info:
            load_data(args, model)
        assert str(info.value) == (f"{data}: example 2 is {length} tokens long, more than the model's "
                                   f"max_position_embeddings - pad_token_id - 1 (62); pass --max-source-length of at "
                                   f"most 62")
    data.write_text(json.dumps({"input_ids": [5] * 62, "label": 1}) + "\n")
    assert len(load_data(args, model).examples) == 1
    torch.manual_seed(0)
    eager = cls(config).eval()
    with torch.no_grad():
        assert torch.isfinite(eager(input_ids=torch.full((1, 62), 5)).logits).all()
        with pytest.raises((IndexError, RuntimeError)):
            eager(input_ids=torch.full((1, 63), 5))


@pytest.mark.parametrize("eos", [VOCAB, -1, [VOCAB + 3, 1]], ids=["vocab", "negative", "list"])
def test_a_padding_token_outside_the_vocabulary_is_one_line_before_training(tmp_path, eos):
    """GPT-2 defines no pad token: eos_token_id pads. Out of the vocabulary, the embedding lookup of every
    padded batch would fail mid-run (as it does in eager transformers); the data check refuses it first."""
    from fxconvert.errors import UsageError
    from fxconvert.training.config import TrainConfig
    from fxconvert.training.dataset import load_data
    from fxconvert.training.model import Model

    cls, config, _ = CONFIGS["gpt2"]
    config = {**config().to_dict(), "architectures": [cls.__name__], "eos_token_id": eos, "pad_token_id": None}
    (tmp_path / "d.jsonl").write_text('{"input_ids": [5, 6], "labels": [7]}\n')
    model = Model(parts={}, num_stages=1, shared_stages={}, config=config)
    args = TrainConfig(source="-", data=str(tmp_path / "d.jsonl"), out="-")
    with pytest.raises(UsageError) as info:
        load_data(args, model)
    first = eos[0] if isinstance(eos, list) else eos
    assert str(info.value) == (f"the model's config has eos_token_id = {first}, outside its vocabulary (vocab_size "
                               f"{VOCAB}); set pad_token_id in config.json to a token id below {VOCAB}")
    with torch.no_grad(), pytest.raises(IndexError):
        cls(CONFIGS["gpt2"][1]())(input_ids=torch.tensor([[5, 6, first]]))


# Sequence classifiers, both with derived records: RoBERTa's type has no hand-written one, GPT-2's classifier is a class
# its type's record does not list; GPT-2 pools each row's last token that is not pad_token_id.
CLASSIFIERS = {
    "roberta": (transformers.RobertaForSequenceClassification, lambda: derived.tiny_config(
        "roberta", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)),
    "gpt2": (transformers.GPT2ForSequenceClassification, lambda: transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=1, eos_token_id=1, pad_token_id=0, num_labels=3)),
}


def write_labelled(path, n, seed) -> list[dict]:
    """Pre-tokenized lines of 1 to 8 tokens (none the pad token), each with a class id in [0, 3)."""
    g = torch.Generator().manual_seed(seed)
    rows = [{"input_ids": torch.randint(3, VOCAB, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist(),
             "label": int(torch.randint(0, 3, (1,), generator=g))} for _ in range(n)]
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def labelled_batch(picked, pad):
    """The rows padded on the right with pad_token_id (GPT-2 pools the last token that is not it), one class id each."""
    width = max(len(r["input_ids"]) for r in picked)
    batch = {"input_ids": torch.full((len(picked), width), pad), "attention_mask": torch.zeros(len(picked), width,
                                                                                               dtype=torch.long),
             "labels": torch.tensor([r["label"] for r in picked])}
    for i, r in enumerate(picked):
        batch["input_ids"][i, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
        batch["attention_mask"][i, :len(r["input_ids"])] = 1
    return batch


@pytest.mark.parametrize("family", sorted(CLASSIFIERS))
def test_a_sequence_classifier_trains_as_one_eager_step_on_each_whole_batch(tmp_path, family):
    """transformers' classification loss is the mean over the batch's rows: the pipeline's mean over its equal
    microbatches is that mean, so each step equals ONE eager step on the whole batch (no accumulation), and the
    eval loss over a held-out file cut into unequal batches (3, 3, 1) is the loss of the whole file at once."""
    cls, config = CLASSIFIERS[family]
    torch.manual_seed(0)
    model = cls(config())
    model.save_pretrained(tmp_path / "ckpt")
    rows = write_labelled(tmp_path / "train.jsonl", 16, seed=3)
    held = write_labelled(tmp_path / "eval.jsonl", 7, seed=4)
    conv = tmp_path / "conv"
    proc = subprocess.run([sys.executable, "-m", "fxconvert", str(tmp_path / "ckpt"), "--stages", "2", "--out",
                           str(conv), "-q"], cwd=tr.REPO, env=tr.env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((conv / "family.json").read_text())["objective"] == "classification"
    out = tmp_path / "run"
    proc = tr.torchrun(2, conv, "--data", tmp_path / "train.jsonl", "--out", out, "--steps", STEPS, "--batch", BATCH,
                       "--microbatches", MICRO, "--optimizer", "sgd", "--lr", LR, "--schedule", "1f1b",
                       "--eval-data", tmp_path / "eval.jsonl", "--eval-batch", 3)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    eager = cls.from_pretrained(tmp_path / "ckpt").train()
    pad = eager.config.pad_token_id
    optimizer = torch.optim.SGD(eager.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        optimizer.zero_grad()
        loss = eager(**labelled_batch([rows[i % len(rows)] for i in range(step * BATCH, step * BATCH + BATCH)], pad)).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        eval_loss = eager.eval()(**labelled_batch(held, pad)).loss.item()
    records = tr.metrics(out)
    got = [m["loss"] for m in records if "loss" in m]
    assert max(abs(a - b) for a, b in zip(got, losses, strict=True)) <= TOL, (got, losses)
    (evaluated,) = [m for m in records if m.get("record") == "eval"]
    assert evaluated["eval_examples"] == 7 and abs(evaluated["eval_loss"] - eval_loss) <= TOL, (evaluated, eval_loss)
    expected = {k: v.detach().clone() for k, v in eager.state_dict().items()}
    assert tr.max_weight_diff(weights(cls, out / "hf"), expected) <= TOL
    assert tr.max_weight_diff(weights(cls, tmp_path / "ckpt"), expected) > 1e-2  # the weights did move


def test_a_pad_token_id_edited_after_the_conversion_is_one_line(tmp_path):
    """GPT-2's classifier pools each row's last token that is not pad_token_id, a constant of the converted graph:
    a config.json edited to another pad_token_id would pad batches with a token the graph reads as a real one.
    The rank refuses it in one line naming the value the stages were converted with."""
    from fxconvert.cli import main
    from fxconvert.errors import UsageError
    from fxconvert.training.config import TrainConfig
    from fxconvert.training.grad_sync import Topology
    from fxconvert.training.model import load_model

    cls, config = CLASSIFIERS["gpt2"]
    torch.manual_seed(0)
    cls(config()).save_pretrained(tmp_path / "ckpt")
    conv = tmp_path / "conv"
    assert main([str(tmp_path / "ckpt"), "--stages", "2", "--out", str(conv), "-q"]) == 0
    topo = Topology(world_size=1, dp=1, virtual_stages=2, shared_stages={})
    args = TrainConfig(source=str(conv), data="-", out="-")
    assert load_model(args, topo, torch.device("cpu")).config["pad_token_id"] == 0
    edited = json.loads((conv / "config.json").read_text())
    (conv / "config.json").write_text(json.dumps({**edited, "pad_token_id": 5}))
    with pytest.raises(UsageError) as info:
        load_model(args, topo, torch.device("cpu"))
    assert str(info.value) == (f"{conv / 'config.json'} has pad_token_id = 5, but the stages were converted with "
                               f"pad_token_id = 0, which their graph was traced with; set pad_token_id back to 0 in "
                               f"config.json, or convert the edited checkpoint again")
    eager = cls(config()).eval()  # the fact behind it: eager pools another token when pad_token_id changes
    ids = torch.tensor([[7, 8, 5, 0]])
    with torch.no_grad():
        as_converted = eager(input_ids=ids).logits
        eager.config.pad_token_id = 5
        assert not torch.allclose(eager(input_ids=ids).logits, as_converted)
