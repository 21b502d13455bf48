"""What every family must do, checked the same way for each: one matrix over `all_families()`.

Every model type of every family is built from its record's tiny configuration
(`Family.tiny_config`, dropout on) and each of its classes is taken through the whole path:

- trace, in eval and in train mode, with sdpa and eager attention: outputs and every parameter
  gradient equal eager transformers at 1e-5 (fp32) over padded, unpadded, length-1, long and
  uneven inputs; train mode runs both under the same seed, and another seed must change the output
  (the dropout masks act);
- convert: the converted module holds the model's own parameters, lifts a tied embedding into one
  placeholder, and its kept output and gradients equal eager in both modes;
- stages: every block is cut in order; the stages compose to the converted module, and each stage
  module run on its own (what a pipeline rank holds) chains to its loss and gradients, a shared
  weight's gradient summed over its copies;
- the command line: converting a saved checkpoint with `--stages 2` validates, and its model.py and
  stage files run in an interpreter where transformers cannot be imported, equal to eager;
- training: `torchrun -m fxconvert.train` against eager transformers training, in
  tests/test_train_families.py (GPT-2, BART, BERT, Llama) and tests/test_train_eager.py (T5); this
  module checks that every family that trains is listed there.

A family's quirks (its config variants, its refusals, its presets) stay in its own test file.
"""

import functools
import json
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO
from pathlib import Path

import pytest
import torch
import transformers

from fxconvert.workflow import convert
from fxconvert.families import all_families
from fxconvert.stages import split_stages
from fxconvert.trace import trace

from helpers import NO_TRANSFORMERS, assert_outputs_match, output_sum

REPO = Path(__file__).resolve().parent.parent
ATTNS = ("sdpa", "eager")
MODES = ("eval", "train")
# (batch, encoder length, decoder length, padding of the first row): one token; one row, padded on the
# right; a padded batch; a long sequence (60 of the smallest position table's 64); unpadded; uneven both
# ways; padded on the left (as for generation: in a decoder-only model the padded queries attend nothing).
# The decoder length applies to encoder-decoder models only, the padding to the first (encoder) sequence.
SHAPES = [(1, 1, 1, None), (1, 9, 4, "right"), (2, 7, 5, "right"), (3, 60, 33, "right"), (2, 9, 3, None),
          (2, 3, 12, "right"), (2, 17, 6, "left")]


def _prefix(family, model_type):
    return family.model_types[model_type][0].removesuffix("Config")


def _classes(family, model_type):
    """The classes of `model_type` that fxconvert traces (those named with its config's prefix)."""
    prefix = _prefix(family, model_type)
    return [c for c in family.classes if c.startswith(prefix) and c[len(prefix):len(prefix) + 1].isupper()]


ROWS = [(f, t, c) for f in all_families() for t in f.model_types for c in _classes(f, t)]
IDS = [c for _, _, c in ROWS]
FAMILY_OF = {c: (f, t) for f, t, c in ROWS}
# The command line: every class of a family's first model type, and the default class of the others
# (each conversion there validates against eager, which costs a second or so).
CLI_IDS = [c for f, t, c in ROWS if t == next(iter(f.model_types)) or c == f.model_types[t][1]]


@functools.cache
def refused(cls_name):
    """Why this transformers' model cannot be traced at all (the record's `check_trace` in training, which
    an eval-mode graph also runs in), or None: BART on transformers before 5.23 (.ci/floor)."""
    family, model_type = FAMILY_OF[cls_name]
    if family.check_trace is None:
        return None
    config = transformers.AutoConfig.for_model(**family.tiny_config(model_type))
    reason = family.check_trace(config, True, "float32")
    return reason and f"{cls_name} is refused here: {reason}"


def supported(cls_name):
    """Skip, with the record's reason, a class this transformers' model is refused on."""
    if refused(cls_name):
        pytest.skip(refused(cls_name))


def build(cls_name, attn="sdpa", seed=0):
    """The tiny model of the record, every 1-d parameter (norms at 1, biases at 0 after transformers'
    init) and every all-zero float buffer (BART's final_logits_bias) moved off its initial value, so
    that a lost bias, norm or scale fails the comparisons."""
    family, model_type = FAMILY_OF[cls_name]
    config = transformers.AutoConfig.for_model(**family.tiny_config(model_type))
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)._from_config(config, attn_implementation=attn)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
        for b in model.buffers():
            if b.is_floating_point() and not b.any():
                b.normal_()
    return model.eval()


def inputs_for(family, config, names, shape, seed=0):
    """Random inputs of `names` from the record's kinds: ids below the vocabulary, masks padding the first
    row, segment ids below type_vocab_size, labels of the sequence they span with one ignored (-100)."""
    batch, enc, dec, pad = shape
    g = torch.Generator().manual_seed(seed)
    lengths = {"encoder": enc, "decoder": dec}
    out = {}
    for name in names:
        kind, sequence = family.inputs[name]
        length = lengths[sequence]
        if kind == "mask":
            value = torch.ones(batch, length, dtype=torch.long)
            if sequence == "encoder" and pad == "left" and length > 3:
                value[0, :3] = 0
            elif pad and length > 2:
                value[0, -2:] = 0
        elif kind == "type_ids":
            value = torch.randint(0, config.type_vocab_size, (batch, length), generator=g)
        elif kind == "embeds":
            value = torch.randn(batch, length, getattr(config, family.hidden_field), generator=g)
        else:
            value = torch.randint(0, config.vocab_size, (batch, length), generator=g)
            if name == "labels" and length > 1:
                value[-1, -1] = -100
        out[name] = value
    return out


def eager(model, inputs):
    kwargs = dict(inputs)
    if "use_cache" in model.forward.__code__.co_varnames:
        kwargs["use_cache"] = False
    return {k: v for k, v in model(**kwargs).items() if isinstance(v, torch.Tensor)}


def seeded(fn, seed):
    def run():
        torch.manual_seed(seed)
        return fn()
    return run


def grads_by_id(module, run) -> dict:
    """Gradients (by parameter identity, dense) of backward of `output_sum(run())`; leaves them cleared."""
    module.zero_grad(set_to_none=True)
    try:
        out = run()
        output_sum(out if isinstance(out, dict) else {"out": out}).backward()
        return {id(p): p.grad.detach().to_dense().clone() for p in module.parameters() if p.grad is not None}
    finally:
        module.zero_grad(set_to_none=True)


def assert_grads(expected: dict, actual: dict, names: dict, where, atol=1e-5, rtol=1e-4):
    """The same parameters reached, every gradient within atol/rtol (NaN where eager has NaN: the loss of
    a decoder-only model over one token averages over no label)."""
    assert set(actual) == set(expected), (where, sorted(names.get(k, "?") for k in set(actual) ^ set(expected)))
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=atol, rtol=rtol, equal_nan=True,
                                   msg=lambda m, key=key: f"{where} {names.get(key)}: {m}")


def used_parameters(model) -> set:
    """Every parameter eager's backward reaches from the outputs: all but BERT's MLM bias registration,
    which forward never reads when the head's bias is untied from it."""
    unused = set()
    predictions = getattr(getattr(model, "cls", None), "predictions", None)
    if predictions is not None and predictions.bias is not predictions.decoder.bias:
        unused.add(id(predictions.bias))
    return {id(p) for p in model.parameters() if p.requires_grad} - unused


def test_every_family_has_a_tiny_config_of_each_class():
    """The matrix below covers every class of every family; each tiny config is the documented size."""
    assert sorted(c for _, _, c in ROWS) == sorted(c for f in all_families() for c in f.classes)
    for family in all_families():
        assert family.tiny, family.name
        for model_type in family.model_types:
            config = transformers.AutoConfig.for_model(**family.tiny_config(model_type))
            assert config.model_type == model_type and config.vocab_size == 97, model_type
            assert getattr(config, family.hidden_field) == 32, model_type


# -- trace ----------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def traced(cls_name, attn, mode):
    """(model, graph) traced in `mode`; cached, so the tests treat both as read-only."""
    model = build(cls_name, attn).train(mode == "train")
    return model, trace(model)


TRACE = [(c, a, m) for c in IDS for a in ATTNS for m in MODES]


@pytest.mark.parametrize("cls_name,attn,mode", TRACE, ids=["-".join(r) for r in TRACE])
def test_trace_matches_eager(cls_name, attn, mode):
    supported(cls_name)
    family, _ = FAMILY_OF[cls_name]
    model, gm = traced(cls_name, attn, mode)
    assert model.training == (mode == "train")
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    assert names == family.default_input_names(cls_name)
    gm.graph.lint()
    # the graph calls torch and fxconvert.runtime only (rotary tables, masks and the like are recorded as ops)
    assert not [n for n in gm.graph.nodes if n.op == "call_function"
                and getattr(n.target, "__module__", "").startswith("transformers")]
    by_id = {id(p): n for n, p in model.named_parameters()}
    for i, shape in enumerate(SHAPES):
        where = f"{mode} {shape}"
        inputs = inputs_for(family, model.config, names, shape, seed=i)
        run_eager, run_graph = seeded(lambda: eager(model, inputs), i), seeded(lambda: gm(**inputs), i)
        with torch.no_grad():
            expected, actual = run_eager(), run_graph()
        assert_outputs_match(expected, actual)
        expected_grads = grads_by_id(model, run_eager)
        assert set(expected_grads) == used_parameters(model), where  # eager reaches every parameter
        assert_grads(expected_grads, grads_by_id(model, run_graph), by_id, where)
        if mode == "train" and shape[1] > 1:  # dropout really drops: another seed, other outputs
            with torch.no_grad():
                other = seeded(lambda: gm(**inputs), 99)()
            first = next(iter(expected))
            assert not torch.equal(other[first], actual[first]), where


@pytest.mark.parametrize("cls_name", IDS)
def test_traces_on_the_meta_device_to_the_same_graph(cls_name):
    supported(cls_name)
    family, model_type = FAMILY_OF[cls_name]
    config = transformers.AutoConfig.for_model(**family.tiny_config(model_type))
    with torch.device("meta"):
        meta_model = getattr(transformers, cls_name)._from_config(config, attn_implementation="sdpa").eval()
    gm = trace(meta_model)
    assert all(p.device.type == "meta" for p in gm.parameters())
    assert gm.code == traced(cls_name, "sdpa", "eval")[1].code


# -- convert --------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def converted(cls_name, attn="sdpa"):
    """(eager reference, its conversion): the conversion holds the reference's own parameters."""
    model = build(cls_name, attn)
    return model, convert(model)


def _tied(model):
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    return head is not None and head.weight is embedding.weight


CONVERT = [(c, a) for c in IDS for a in ATTNS]


@pytest.mark.parametrize("cls_name,attn", CONVERT, ids=["-".join(r) for r in CONVERT])
def test_convert_matches_eager(cls_name, attn):
    supported(cls_name)
    family, _ = FAMILY_OF[cls_name]
    model, conv = converted(cls_name, attn)
    names = family.default_input_names(cls_name)
    assert conv.input_names == names
    # a model trained on labels keeps its loss; a bare model its last hidden state
    assert conv.output_name == ("loss" if "labels" in names else "last_hidden_state")
    # the module holds the model's own parameters: exactly those that eager's kept output reaches (a bare
    # BertModel's pooler is not among them)
    inputs = inputs_for(family, model.config, names, SHAPES[2])
    reached = grads_by_id(model, lambda: {conv.output_name: eager(model, inputs)[conv.output_name]})
    assert {id(p) for p in conv.module.parameters()} == set(reached)
    placeholders = [n.target for n in conv.graph_module.graph.nodes if n.op == "placeholder"]
    assert placeholders == [*names, *conv.shared_weights, "training"]
    embedding = model.get_input_embeddings().weight
    # the embedding read in two places (a tied head, or an encoder's and a decoder's lookups) is one
    # placeholder fed the model's own parameter; read once, it stays a parameter of the graph
    shared = _tied(model) or "decoder_input_ids" in names
    assert ("shared_embed_weight" in conv.shared_weights) == shared
    assert any(p is embedding for p in conv.graph_module.parameters()) == (not shared)
    if shared:  # listed under every name the model gives it
        assert conv.module.shared_embed_weight is embedding
        assert conv.shared_weights["shared_embed_weight"] == [
            n for n, p in model.named_parameters(remove_duplicate=False) if p is embedding]
    by_id = {id(p): n for n, p in model.named_parameters()}
    for mode in MODES:
        model.train(mode == "train")
        conv.module.train(mode == "train")
        try:
            for i, shape in enumerate(SHAPES):
                where = f"{mode} {shape}"
                inputs = inputs_for(family, model.config, names, shape, seed=i)
                run_eager = seeded(lambda: {conv.output_name: eager(model, inputs)[conv.output_name]}, i)
                run_converted = seeded(lambda: {conv.output_name: conv.module(**inputs)}, i)
                with torch.no_grad():
                    assert_outputs_match(run_eager(), run_converted())
                assert_grads(grads_by_id(model, run_eager), grads_by_id(model, run_converted), by_id, where)
        finally:
            model.eval()
            conv.module.eval()


# -- stages ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cls_name", IDS)
def test_stages_compose_to_the_converted_module(cls_name, mode):
    supported(cls_name)
    family, _ = FAMILY_OF[cls_name]
    model, conv = converted(cls_name)
    stages = split_stages(conv, 2)
    blocks = [b for spec in stages.specs for b in spec.blocks]
    assert all(spec.blocks for spec in stages.specs)
    found = [family.block_of(b) for b in blocks]
    assert None not in found and found == sorted(found), blocks  # every block once, stack by stack, in order
    called = {family.block_of(n.target)[2] for n in conv.graph_module.graph.nodes
              if n.op == "call_module" and family.block_of(n.target)}
    assert len(set(blocks)) == len(blocks) and set(blocks) == called  # and every block the graph calls
    if _tied(model):  # the tied embedding reaches the stage of the lookup and the stage of the head
        assert "shared_embed_weight" in stages.specs[0].shared_weights
        assert "shared_embed_weight" in stages.specs[-1].shared_weights
    whole = conv.module
    names = {id(p): n for n, p in whole.named_parameters()}
    assert sorted(id(p) for p in stages.parameters()) == sorted(names)
    inputs = inputs_for(family, model.config, conv.input_names, (3, 11, 6, "right"), seed=3)
    results = []
    for module in (whole, stages):
        module.train(mode == "train")
        try:
            out = seeded(lambda: module(**inputs), 0)
            with torch.no_grad():
                value = out()
            results.append((value, grads_by_id(module, out)))
        finally:
            module.eval()
    (expected, expected_grads), (actual, actual_grads) = results
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)
    assert set(expected_grads) == set(names), sorted(set(names) - set(expected_grads))
    assert_grads(expected_grads, actual_grads, names, mode, atol=1e-6, rtol=0)


@pytest.mark.parametrize("cls_name", IDS)
def test_stage_modules_as_the_pipeline_runs_them(cls_name):
    """Each stage on its own, with its own copy of each shared weight it uses, sends tensors only: summed
    over the copies, a shared weight's gradient is the converted module's; every other gradient matches."""
    supported(cls_name)
    family, _ = FAMILY_OF[cls_name]
    model, conv = converted(cls_name)
    stages = split_stages(conv, 2)
    modules = [stages.stage_module(i).train() for i in range(2)]
    conv.module.train()
    try:
        inputs = inputs_for(family, model.config, conv.input_names, (3, 13, 7, "right"), seed=5)
        expected_run = seeded(lambda: conv.module(**inputs), 0)
        with torch.no_grad():
            expected = expected_run()
        by_id = grads_by_id(conv.module, expected_run)
        expected_grads = {n: by_id[id(p)] for n, p in conv.module.named_parameters() if id(p) in by_id}
        torch.manual_seed(0)
        values = ()
        for spec, module in zip(stages.specs, modules):
            values = module(*values, **{n: inputs[n] for n in spec.inputs})
            if spec.sent:
                assert all(isinstance(v, torch.Tensor) for v in values), spec.sent
        torch.testing.assert_close(values, expected, rtol=0, atol=1e-6)
        output_sum({"out": values}).backward()
    finally:
        conv.module.eval()
        for module in modules:
            module.eval()
    for name, grad in expected_grads.items():
        copies = [dict(m.named_parameters())[name] for m in modules if name in dict(m.named_parameters())]
        assert len(copies) == (sum(name in s.shared_weights for s in stages.specs) if name in conv.shared_weights
                               else 1), name
        torch.testing.assert_close(sum(c.grad.to_dense() for c in copies), grad, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")


# -- the command line, and the files it writes without transformers --------------------------------

RUNNER = NO_TRANSFORMERS + r"""
import importlib.util, os
import torch

def load(directory, name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(directory, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

cases = torch.load(sys.argv[1])
results = {}
for key, (directory, runs) in cases.items():
    model_file = load(directory, "model")
    model = model_file.load()
    files = [load(directory, f"stage_{i}") for i in range(2)]
    stages = [f.load() for f in files]
    out = {"input_names": list(model_file.INPUT_NAMES), "model": [], "stages": []}
    for mode, inputs in runs:
        for module in (model, *stages):
            module.train(mode == "train")
        torch.manual_seed(0)
        out["model"].append(model(**inputs).detach())
        torch.manual_seed(0)
        values = ()
        for i, (stage, f) in enumerate(zip(stages, files)):  # stage 0 takes its inputs positionally
            values = (stage(*values, *(inputs[k] for k in f.INPUTS)) if i == 0 else
                      stage(*values, **{k: inputs[k] for k in f.INPUTS}))
        out["stages"].append(values.detach())
    results[key] = out
results["transformers_loaded"] = sorted(k for k in sys.modules if k.split(".")[0] == "transformers")
torch.save(results, sys.argv[2])
"""
CLI_RUNS = [("eval", (2, 6, 4, "right")), ("eval", (1, 11, 7, None)), ("eval", (1, 1, 1, None)),
            ("eval", (3, 30, 20, "right")), ("train", (3, 5, 5, "right"))]


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory):
    """Every class converted by the command line (`--stages 2`, JSON report, validation on), then every
    model.py and stage file run in one fresh interpreter that cannot import transformers (one start for
    all of them). -> (reports, eager outputs, what the files computed)."""
    from fxconvert.cli import main

    tmp = tmp_path_factory.mktemp("cli")
    reports, expected, cases = {}, {}, {}
    for cls_name in [c for c in CLI_IDS if not refused(c)]:
        family, _ = FAMILY_OF[cls_name]
        model = build(cls_name)
        model.save_pretrained(tmp / cls_name / "ckpt")
        out = tmp / cls_name / "out"
        stdout, stderr = StringIO(), StringIO()
        with redirect_stdout(stdout), redirect_stderr(stderr):
            code = main([str(tmp / cls_name / "ckpt"), "--out", str(out), "--format", "json", "--stages", "2"])
        reports[cls_name] = (code, stdout.getvalue(), stderr.getvalue())
        if code != 0:
            continue
        names = family.default_input_names(cls_name)
        runs, wants = [], []
        for i, (mode, shape) in enumerate(CLI_RUNS):
            inputs = inputs_for(family, model.config, names, shape, seed=i)
            model.train(mode == "train")
            torch.manual_seed(0)
            with torch.no_grad():
                wants.append(eager(model, inputs))
            runs.append((mode, inputs))
        model.eval()
        cases[cls_name], expected[cls_name] = (str(out), runs), wants
    torch.save(cases, tmp / "cases.pt")
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(tmp / "cases.pt"), str(tmp / "results.pt")],
                          capture_output=True, text=True, cwd=tmp, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return reports, expected, torch.load(tmp / "results.pt")


@pytest.mark.parametrize("cls_name", CLI_IDS)
def test_cli_converts_and_the_files_run_without_transformers(cls_name, cli_results):
    supported(cls_name)
    family, _ = FAMILY_OF[cls_name]
    reports, expected, results = cli_results
    code, stdout, stderr = reports[cls_name]
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["status"] == "ok" and report["validation"]["passed"] is True, report["validation"]
    assert report["model"]["source"]["origin"] == "local directory"
    names = family.default_input_names(cls_name)
    _, conv = converted(cls_name)
    assert [i["name"] for i in report["io"]["inputs"]] == [*names, *conv.shared_weights, "training"]
    blocks = [b for row in report["stages"] for b in row["blocks"]]
    assert len(report["stages"]) == 2 and blocks == [b for s in split_stages(conv, 2).specs for b in s.blocks]
    assert results["transformers_loaded"] == []
    ran = results[cls_name]
    assert ran["input_names"] == names
    for want, model_out, stage_out in zip(expected[cls_name], ran["model"], ran["stages"], strict=True):
        torch.testing.assert_close(model_out, want[conv.output_name], rtol=0, atol=1e-5, equal_nan=True)
        torch.testing.assert_close(stage_out, want[conv.output_name], rtol=0, atol=1e-5, equal_nan=True)


# -- training -------------------------------------------------------------------------------------

def test_every_family_that_trains_is_trained_against_eager_transformers():
    """Pipeline training against eager training is a torchrun run per family, kept in the trainer's tests
    (one run each; this suite does not start them again)."""
    import test_train_eager
    import test_train_families

    trained = {"t5"} | set(test_train_families.CONFIGS)
    assert "test_pipeline_training_equals_eager_transformers" in dir(test_train_eager)
    assert "test_pipeline_training_equals_eager_transformers" in dir(test_train_families)
    # every hand-written family that trains, derived causal LMs of three skeletons: learned positions (opt),
    # expert leaves rebuilt on each rank (mixtral), a tied embedding with soft-capping and a sliding window
    # (gemma2); a derived seq2seq model (marian) and a derived masked LM (roberta)
    assert trained == {f.name for f in all_families() if f.objective} | {"opt", "mixtral", "gemma2", "marian",
                                                                         "roberta"}
