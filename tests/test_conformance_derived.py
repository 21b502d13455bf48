"""Conformance of the derived family records (`fxconvert.families.derived`) over a named list of types.

The list is the model types transformers 4's HFTracer supported that transformers 5 still has,
each with no hand-written record. Each type's tiny model is built by the suite from its config
class with the defaults shrunk (`derived.tiny_config`; no downloads), once per module
(a module-scoped fixture), with every 1-d parameter moved off its initial value so that a lost
bias or norm fails. For each type:

- the derived record: blocks found in run order (stacks in order, every block the model holds),
  the objective of its auto mapping, registered under its class name;
- trace, in eval and in train mode: the graph's outputs equal eager's;
- convert: the kept output (the loss) and every gradient equal eager at 1e-5, at two shapes with
  padding, in eval and in train mode (dropout on, the same seed);
- split in 2 stages (in process): a leaf stays whole in the stage of its block, and the stages run
  in sequence equal the converted module, the loss and every gradient, in train mode;
- for a causal LM (decoder-only), 2 SGD steps on the 2 stages equal 2 steps of eager transformers on
  the same batches: the loss at each step and the weights after them (`fxconvert.train` does this
  under torchrun for a few of them, tests/test_train_families.py).

Every type of the list converts; a type that stops converting fails here with the one-line refusal
naming the construct and the source line.
"""

import functools
import importlib.util
import json
import subprocess
import sys

import pytest
import torch
import transformers

from fxconvert import families
from fxconvert.families import derived
from fxconvert.objectives import CAUSAL_LM, MASKED_LM, SEQ2SEQ
from fxconvert.stages import SplitError, split_stages
from fxconvert.trace import trace
from fxconvert.workflow import convert

import train_runs
from helpers import assert_outputs_match, grads_of, seeded

REPO = train_runs.REPO
DECODERS = ("opt gpt_neo gptj gpt_neox bloom falcon codegen gpt_bigcode xglm mpt phi phi3 gemma gemma2 gemma3_text "
            "qwen3 olmo olmo2 granite starcoder2 stablelm cohere glm glm4 smollm3 mixtral qwen2_moe qwen3_moe "
            "olmoe").split()
ENCODERS = ("roberta xlm-roberta camembert distilbert albert electra deberta deberta-v2 modernbert mobilebert "
            "megatron-bert roformer").split()
ENCODER_DECODERS = "mbart marian pegasus m2m_100 blenderbot blenderbot-small plbart longt5 switch_transformers " \
                   "t5gemma".split()
# Each kind's auto class and the objective its record must carry.
KINDS = {"decoder": (transformers.AutoModelForCausalLM, CAUSAL_LM),
         "encoder": (transformers.AutoModelForMaskedLM, MASKED_LM),
         "encoder-decoder": (transformers.AutoModelForSeq2SeqLM, SEQ2SEQ)}
KIND = {**dict.fromkeys(DECODERS, "decoder"), **dict.fromkeys(ENCODERS, "encoder"),
        **dict.fromkeys(ENCODER_DECODERS, "encoder-decoder")}
TYPES = [*DECODERS, *ENCODERS, *ENCODER_DECODERS]
# Types whose graph has one block: ALBERT's layers share one layer group's weights, so a split is refused.
ONE_BLOCK = {"albert": "cannot split into 2 stages: the graph has 1 blocks (albert.encoder.albert_layer_groups.0 ... "
                       "albert.encoder.albert_layer_groups.0) and a stage holds at least one; ask for at most 1"}
# (batch, encoder length, decoder length, padded tokens at the end of the first row)
SHAPES = [(2, 7, 5, 2), (3, 12, 4, 3)]
TRAIN_LR = 0.5  # SGD's, for the 2 training steps on the stages


class Case:
    """One type's tiny model (eval mode, built once) and, on first use, its conversion."""

    def __init__(self, model_type):
        self.model_type, self.kind = model_type, KIND[model_type]
        auto, self.objective = KINDS[self.kind]
        torch.manual_seed(0)
        config = derived.tiny_config(model_type)
        for key in derived.TRAINING_DRAWS:  # M2M100's LayerDrop, Switch's jitter: refused (see below)
            if getattr(config, key, 0) > 0:
                setattr(config, key, 0.0)
        self.model = auto.from_config(config).eval()
        with torch.no_grad():
            for p in self.model.parameters():
                if p.dim() == 1:
                    p.add_(0.1 * torch.randn_like(p))

    @functools.cached_property
    def conversion(self):
        return convert(self.model)

    @functools.cached_property
    def stages(self):
        """The conversion split in 2 stages, in process: they run the model's own parameters."""
        return split_stages(self.conversion, 2)

    def inputs(self, names, shape, seed):
        batch, enc, dec, pad = shape
        g = torch.Generator().manual_seed(seed)
        vocab = self.model.config.get_text_config().vocab_size
        feed = {"input_ids": torch.randint(3, vocab, (batch, enc), generator=g),
                "attention_mask": torch.ones(batch, enc, dtype=torch.long),
                "decoder_input_ids": torch.randint(3, vocab, (batch, dec), generator=g)}
        feed["attention_mask"][0, -pad:] = 0
        labels = feed["decoder_input_ids" if self.kind == "encoder-decoder" else "input_ids"].clone()
        labels[-1, -1] = -100
        feed["labels"] = labels
        return {n: feed[n] for n in names}

    def eager(self, inputs):
        kwargs = {"use_cache": False} if "use_cache" in derived._forward_parameters(type(self.model)) else {}
        out = self.model(**inputs, **kwargs)
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


@pytest.fixture(scope="module", params=TYPES)
def case(request):
    return Case(request.param)


@pytest.mark.parametrize("model_type", [*DECODERS, *ENCODERS, *ENCODER_DECODERS])
def test_the_record_is_derived_from_the_declarations(model_type):
    """Blocks in run order and each of the model's repeated blocks once; the objective of its mapping;
    registered under the class name, where the rest of the process asks."""
    auto, objective = KINDS[KIND[model_type]]
    config = derived.tiny_config(model_type)
    cls = auto._model_mapping[type(config)]
    record = derived.derive(cls, config)
    assert families.family_of_class(cls.__name__) is record and record.derived_from == cls.__name__
    assert record.objective is objective and record.classes == (cls.__name__,)
    with torch.device("meta"):
        model = cls._from_config(config)
    found = [b for path, _ in model.named_modules() if (b := record.block_of(path)) and b[2] == path]
    assert found and found == sorted(found)  # stack by stack, each in index order
    stacks = 2 if KIND[model_type] == "encoder-decoder" else 1
    assert len(record.blocks) == stacks and {stack for stack, _, _ in found} == set(range(stacks))
    for stack, index, path in found:  # every element of each block list
        assert path.endswith(f".{index}") and type(model.get_submodule(path)) is type(
            model.get_submodule(path.rpartition(".")[0])[0])
    assert set(record.sequence_lengths) == ({"encoder", "decoder"} if KIND[model_type] == "encoder-decoder"
                                            else {"encoder"})


@pytest.mark.parametrize("mode", ("eval", "train"))
def test_trace_matches_eager(case, mode):
    model = case.model.train(mode == "train")
    try:
        gm = trace(model)
        names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
        inputs = case.inputs(names, SHAPES[0], seed=0)
        with torch.no_grad():
            assert_outputs_match(seeded(lambda: case.eager(inputs), 1)(), seeded(lambda: gm(**inputs), 1)())
    finally:
        model.eval()


@pytest.mark.parametrize("mode", ("eval", "train"))
def test_convert_matches_eager_with_every_gradient(case, mode):
    conversion = case.conversion
    assert conversion.output_name == "loss"
    model, module = case.model, conversion.module
    model.train(mode == "train")
    module.train(mode == "train")
    try:
        for i, shape in enumerate(SHAPES):
            inputs = case.inputs(conversion.input_names, shape, seed=i)
            run_eager = seeded(lambda: {"loss": case.eager(inputs)["loss"]}, i)
            run_converted = seeded(lambda: {"loss": module(**inputs)}, i)
            with torch.no_grad():
                assert_outputs_match(run_eager(), run_converted())
            expected, actual = grads_of(model, run_eager), grads_of(model, run_converted)
            assert expected and set(actual) == set(expected), sorted(set(actual) ^ set(expected))
            for name in expected:
                torch.testing.assert_close(actual[name], expected[name], atol=1e-5, rtol=1e-4,
                                           msg=lambda m, name=name: f"{mode} {shape} {name}: {m}")
    finally:
        model.eval()
        module.eval()


def test_stages_equal_the_converted_module(case):
    """Split in 2 stages at a block boundary (a leaf stays whole, in the stage of its block) and run in
    sequence, in train mode: the loss and every gradient equal the converted module's at 1e-5 (the stages
    run its nodes in its order, so dropout draws the same)."""
    conversion = case.conversion
    if case.model_type in ONE_BLOCK:
        with pytest.raises(SplitError) as e:
            split_stages(conversion, 2)
        assert str(e.value) == ONE_BLOCK[case.model_type]
        return
    stages = case.stages
    assert all(spec.blocks for spec in stages.specs)
    for leaf in conversion.leaves:  # a module leaf: one call, in one stage: that of the block it lies in, if any
        if leaf.endswith("()"):  # a function leaf: called by some stage, a module's code around it traced
            assert any(n.op == "call_function" and f"{n.target.__module__}.{n.target.__qualname__}()" == leaf
                       for gm in stages.stages for n in gm.graph.nodes), leaf
            continue
        holders = [spec for spec, gm in zip(stages.specs, stages.stages)
                   if any(n.op == "call_module" and n.target == leaf for n in gm.graph.nodes)]
        blocks = [b for spec in stages.specs for b in spec.blocks if leaf.startswith(b + ".")]
        assert len(holders) == 1 and set(blocks) <= set(holders[0].blocks), leaf
    module = conversion.module
    module.train()
    stages.train()
    try:
        inputs = case.inputs(conversion.input_names, SHAPES[1], seed=1)
        run_module = seeded(lambda: {"loss": module(**inputs)}, 1)
        run_stages = seeded(lambda: {"loss": stages(*(inputs[n] for n in conversion.input_names))}, 1)
        with torch.no_grad():
            assert_outputs_match(run_module(), run_stages())
        expected, actual = grads_of(case.model, run_module), grads_of(case.model, run_stages)
        assert expected and set(actual) == set(expected), sorted(set(actual) ^ set(expected))
        for name in expected:
            torch.testing.assert_close(actual[name], expected[name], atol=1e-5, rtol=1e-4,
                                       msg=lambda m, name=name: f"{name}: {m}")
    finally:
        module.eval()
        stages.eval()


@pytest.mark.parametrize("case", DECODERS, indirect=True)
def test_two_sgd_steps_on_the_stages_equal_eager_transformers(case):
    """What `fxconvert.train` does on 2 stages, in process: 2 SGD steps on the stages (in train mode, on two
    padded batches of different shapes) give eager transformers' loss at each step and its weights after
    them, within 1e-5. The stages hold the model's own parameters (a tied weight once), so their steps
    move the model; its state is restored afterwards for the module's other tests."""
    model, stages, names = case.model, case.stages, case.conversion.input_names
    owned = {id(p) for p in model.parameters()}
    assert all(id(p) in owned for p in stages.parameters())
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    batches = [case.inputs(names, shape, seed=10 + i) for i, shape in enumerate(SHAPES)]

    def train(module, run):
        optimizer = torch.optim.SGD(module.parameters(), lr=TRAIN_LR)
        losses = []
        for i, inputs in enumerate(batches):
            optimizer.zero_grad(set_to_none=True)
            loss = seeded(lambda: run(inputs), i)()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}

    model.train()
    stages.train()
    try:
        expected_losses, expected = train(model, lambda inputs: case.eager(inputs)["loss"])
        model.load_state_dict(start)
        losses, trained = train(stages, lambda inputs: stages(*(inputs[n] for n in names)))
    finally:
        model.load_state_dict(start)
        model.zero_grad(set_to_none=True)
        model.eval()
        stages.eval()
    assert max(abs(a - b) for a, b in zip(losses, expected_losses, strict=True)) <= 1e-5, (losses, expected_losses)
    assert set(trained) == set(expected)
    diffs = {k: (trained[k] - expected[k]).abs().max().item() for k in expected}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= 1e-5, (worst, diffs[worst])
    assert max((expected[k] - start[k]).abs().max().item() for k in expected) > 1e-2  # the weights did move


def test_a_sliding_window_mask_that_no_layer_reads_is_not_refused():
    """Qwen2-MoE builds a sliding-window mask whatever its layers are, with a window of 0 when none
    slides; with only dense layers (mlp_only_layers) it converts, equal to eager."""
    config = derived.tiny_config("qwen2_moe", mlp_only_layers=[0, 1])
    assert config.sliding_window == 0 and "sliding_attention" not in config.layer_types
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    conversion = convert(model)
    ids = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss
        torch.testing.assert_close(conversion.module(input_ids=ids, attention_mask=mask, labels=ids), expected,
                                   rtol=0, atol=1e-5)


# -- what a derived record does beyond conversion -------------------------------------------------

@pytest.fixture(scope="module")
def neox_checkpoint(tmp_path_factory):
    """A tiny GPT-NeoX checkpoint, and its conversion into 2 stages by the command line."""
    root = tmp_path_factory.mktemp("derived")
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(derived.tiny_config("gpt_neox")).save_pretrained(root / "ckpt")
    proc = subprocess.run([sys.executable, "-m", "fxconvert", str(root / "ckpt"), "--stages", "2", "--out",
                           str(root / "conv"), "-q"], cwd=REPO, env=train_runs.env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    (root / "train.jsonl").write_text('{"input_ids": [5, 6, 7], "labels": [8, 9]}\n' * 4)
    return root


def test_the_report_names_the_record(neox_checkpoint):
    report = json.loads((neox_checkpoint / "conv" / "report.json").read_text())
    assert report["model"]["record"] == "derived from GPTNeoXForCausalLM's declarations"
    assert "record:** derived from GPTNeoXForCausalLM's declarations" in (
        neox_checkpoint / "conv" / "report.md").read_text()


def test_training_a_derived_record_from_a_checkpoint_is_refused_in_one_line(neox_checkpoint, capsys, monkeypatch,
                                                                            tmp_path):
    """Converting on every rank is not offered for a derived record yet; its conversion with stages trains
    (tests/test_train_families.py), carrying the record in family.json."""
    from fxconvert.train import main

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    argv = [str(neox_checkpoint / "ckpt"), "--data", str(neox_checkpoint / "train.jsonl"), "--out",
            str(tmp_path / "run"), "--steps", "1", "--batch", "2", "--allow-random"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("fxconvert.train: error: training a gpt_neox model needs a hand-written family record, which "
                   "GPTNeoXForCausalLM has not (it converts with one derived from transformers' declarations); "
                   "convert it with --stages N and train the conversion, or "
                   "train " + ", ".join(
                       f.title.split(" (")[0] for f in families.all_families() if f.objective) + " models")
    assert not (tmp_path / "run").exists()


# -- the suite's data, which README.md's family table shows (scripts/family_table.py) -------------

def _family_table():
    spec = importlib.util.spec_from_file_location("family_table", REPO / "scripts" / "family_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_data_file_lists_the_suites_types_kinds_and_refusals():
    data = _family_table().types()
    assert [(e["type"], e["kind"]) for e in data] == [(t, KIND[t]) for t in (*DECODERS, *ENCODERS, *ENCODER_DECODERS)]
    assert [e["type"] for e in data if e["refused"]] == []


def test_the_leaves_are_the_recorded_ones(case):
    """The modules each conversion runs as leaves, as tests/conformance_derived.json records them for the README."""
    family_table = _family_table()
    recorded = next(e for e in family_table.types() if e["type"] == case.model_type)["leaves"]
    assert family_table.leaf_patterns(case.conversion.leaves) == recorded, (
        f"{case.model_type}'s leaves changed; run `PYTHONPATH=. python scripts/family_table.py --measure --write`")
