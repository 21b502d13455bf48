"""Activation recompute (`fxconvert.training.recompute`): a recomputed stage computes what the plain one does.

Each family's tiny model (the record's config, dropout on) is converted and split in two stages
here; each stage is taken both as the split made in process gives it (a GraphModule whose nodes
carry their module path) and as its stage file builds it (a generated module, re-traced). Each
runs chained in train mode, once plain and once with every block recomputed, from the same seed:
the outputs and every gradient are equal bit for bit (CPU float32; non-reentrant checkpoint
restores the RNG state, so dropout draws the same masks), the state-dict names are unchanged,
and the recomputed run keeps less than half the activation bytes the plain run saves for backward.
"""

import importlib.util

import pytest
import torch
import transformers

from fxconvert import families
from fxconvert.errors import UsageError
from fxconvert.inputs import build_inputs
from fxconvert.pipeline import stage_parameters, stage_sources
from fxconvert.stages import split_stages
from fxconvert.training.options import parse
from fxconvert.training.recompute import RecomputeError, chosen_blocks, describe, recompute_blocks
from fxconvert.workflow import convert

from helpers import output_sum

FAMILIES = [f.name for f in families.all_families() if any(f.blocks)]


def _converted(name):
    family = next(f for f in families.all_families() if f.name == name)
    config = family.tiny_config()
    torch.manual_seed(0)
    model = getattr(transformers, config["architectures"][0])._from_config(transformers.AutoConfig.for_model(**config))
    conversion = convert(model)
    sizes = family.input_sizes(model.config)
    inputs = build_inputs(family.inputs, conversion.input_names, batch=3, lengths={"encoder": 9, "decoder": 6},
                          hidden=sizes["hidden"], vocab=sizes["vocab"], type_vocab=sizes["type_vocab"],
                          generator=torch.Generator().manual_seed(1), padded=True)
    return conversion, split_stages(conversion, 2), inputs


def _from_file(stages, index, tmp_path):
    path = tmp_path / f"stage_{index}.py"
    path.write_text(stage_sources(stages)[path.name])
    spec = importlib.util.spec_from_file_location(f"recompute_stage_{index}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    stage = module.build("cpu")
    stage.load_state_dict({k: v.detach().clone() for k, v in stage_parameters(stages, index).items()})
    return stage


def _run(stages, modules, inputs):
    """(output, gradients by stage and name, bytes autograd saved outside any checkpoint)."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        values = ()
        for spec, module in zip(stages.specs, modules):
            values = (module(*values, *(inputs[n] for n in spec.inputs)) if spec.index == 0 else
                      module(*values, **{n: inputs[n] for n in spec.inputs}))
    output_sum({"out": values}).backward()
    grads = {(i, n): p.grad for i, m in enumerate(modules) for n, p in m.named_parameters()}
    return values, grads, sum(saved)


@pytest.mark.parametrize("kind", ["split", "file"])
@pytest.mark.parametrize("name", FAMILIES)
def test_a_recomputed_stage_computes_and_differentiates_as_the_plain_one(name, kind, tmp_path):
    conversion, stages, inputs = _converted(name)

    def fresh():
        made = [stages.stage_module(i) if kind == "split" else _from_file(stages, i, tmp_path) for i in range(2)]
        return [m.train() for m in made]

    plain, recomputed = fresh(), fresh()
    names = [sorted(m.state_dict()) for m in recomputed]
    for spec, module in zip(stages.specs, recomputed):
        assert recompute_blocks(module, spec.blocks, spec.blocks) == tuple(spec.blocks)
    assert [sorted(m.state_dict()) for m in recomputed] == names
    want, want_grads, want_saved = _run(stages, plain, inputs)
    got, got_grads, got_saved = _run(stages, recomputed, inputs)
    assert torch.equal(got, want)
    assert want_grads.keys() == got_grads.keys() and all(g is not None for g in want_grads.values())
    unequal = [k for k in want_grads if not torch.equal(want_grads[k], got_grads[k])]
    assert not unequal, unequal
    assert got_saved < want_saved / 2, (got_saved, want_saved)


def test_a_stage_without_the_chosen_blocks_is_left_alone():
    conversion, stages, inputs = _converted("gpt2")
    module = stages.stage_module(0)
    forward = module.graph_module.forward
    assert recompute_blocks(module, stages.specs[0].blocks, ("transformer.h.9",)) == ()
    assert module.graph_module.forward == forward


def test_the_modes_choose_blocks_per_stage():
    blocks = [("encoder.block.0", "encoder.block.1"), ("encoder.block.2", "decoder.block.0", "decoder.block.1")]
    assert chosen_blocks("none", blocks, ("encoder.block.0",), where="the plan") == [(), ()]
    assert chosen_blocks("full", blocks, (), where="the plan") == blocks
    assert chosen_blocks("auto", blocks, ("decoder.block.0", "encoder.block.1"), where="the plan") == [
        ("encoder.block.1",), ("decoder.block.0",)]
    assert chosen_blocks("auto", blocks, None, where="the plan") == [(), ()]
    full = describe("full", blocks, where="the plan")
    assert full == "recompute full: stage 0 encoder.block.0-1; stage 1 encoder.block.2, decoder.block.0-1"
    assert describe("none", blocks, where="the plan") is None


def test_auto_without_a_planned_block_adds_no_line():
    """A plan made without --max-memory recomputes nothing: the run starts as it did before recompute existed."""
    assert describe("auto", [(), ()], where="the plan in pipeline.json") is None
    line = describe("auto", [("encoder.block.1",), ()], where="the plan in pipeline.json")
    assert line == "recompute auto (the plan in pipeline.json): stage 0 encoder.block.1; stage 1 none"


def test_a_plan_naming_a_block_no_stage_runs_is_refused():
    with pytest.raises(UsageError, match=r"^the plan in pipeline.json recomputes decoder.block.7, which no stage "
                                         r"runs; convert again, or pass --recompute full or none$"):
        chosen_blocks("auto", [("decoder.block.0",)], ("decoder.block.7",), where="the plan in pipeline.json")


@pytest.mark.parametrize("value", ["", "some", "Full", "auto,full"])
def test_a_bad_recompute_value_is_a_usage_error(value, capsys):
    with pytest.raises(SystemExit) as raised:
        parse(["conv", "--data", "d.jsonl", "--out", "run", "--recompute", value])
    assert raised.value.code == 2
    assert "argument --recompute: invalid choice" in capsys.readouterr().err


def test_recompute_defaults_to_auto():
    assert parse(["conv", "--data", "d.jsonl", "--out", "run"]).recompute == "auto"
    assert {parse(["c", "--data", "d", "--out", "r", "--recompute", m]).recompute for m in ("none", "full")} == {
        "none", "full"}




def test_a_stage_whose_graph_does_not_trace_is_one_line_naming_the_fix():
    """A stage file edited by hand (here: a branch on a tensor's value) cannot be run in segments."""

    class Graph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            setattr(self, "block", torch.nn.ModuleList([torch.nn.Linear(2, 2)]))

        def forward(self, x, training: bool = False):
            return self.block[0](x) if x.sum() > 0 else x

    stage = torch.nn.Module()
    stage.graph_module = Graph()
    with pytest.raises(RecomputeError, match=r"^stage 3: cannot run its blocks under recompute, its graph does not "
                                             r"trace \(TraceError: [^\n]*\); pass --recompute none, or convert again$"):
        recompute_blocks(stage, ["block.0"], ["block.0"], index=3)
    assert recompute_blocks(stage, ["block.0"], [], index=3) == ()  # nothing chosen: not even traced
