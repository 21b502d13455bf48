"""Leaves: a submodule whose Python decides on traced values runs its eager code as one `call_module` node.

Mixtral's expert loop (transformers' `integrations/moe.py`) sorts and counts tokens per expert, so its
`experts` modules become leaves; equality with eager, outputs and every gradient, is the conformance
suite's (tests/test_conformance_derived.py); the files written for leaves, tests/test_leaf_files.py. Here:
what the conversion says of its leaves, the strict refusal `leaves=False` keeps, the refusal of a leaf with
a shared weight, and the training-only random draws a derived record refuses.
"""

import json

import pytest
import torch
import transformers

from fxconvert.cli import main
from fxconvert.errors import TraceError
from fxconvert.families import derived
from fxconvert.report import model_section
from fxconvert.workflow import convert

EXPERTS = ("model.layers.0.mlp.experts", "model.layers.1.mlp.experts")


def tiny(model_type, auto=transformers.AutoModelForCausalLM, **overrides):
    torch.manual_seed(0)
    return auto.from_config(derived.tiny_config(model_type, **overrides)).eval()


@pytest.fixture(scope="module")
def mixtral():
    return tiny("mixtral")


@pytest.fixture(scope="module")
def conversion(mixtral):
    return convert(mixtral)


def test_the_conversion_names_its_leaves_and_the_report_lists_them(conversion, mixtral):
    assert list(conversion.leaves) == list(EXPERTS)
    assert all(where.startswith("transformers/integrations/moe.py:") for where in conversion.leaves.values())
    calls = [n.target for n in conversion.graph_module.graph.nodes if n.op == "call_module"]
    assert [t for t in calls if t in EXPERTS] == list(EXPERTS)
    # the leaf is the model's own module: its weights are the model's, trained in place
    assert conversion.graph_module.get_submodule(EXPERTS[0]).gate_up_proj is mixtral.get_submodule(
        EXPERTS[0]).gate_up_proj
    section = model_section(conversion)
    assert section.data["leaves"] == [{"module": path, "source": where} for path, where in conversion.leaves.items()]
    assert section.fields["leaves"] == "; ".join(f"{p} ({w})" for p, w in conversion.leaves.items())


def test_leaves_false_refuses_as_before(mixtral):
    with pytest.raises(TraceError) as e:
        convert(mixtral, leaves=False)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("cannot trace module 'model.layers.0.mlp.experts' at transformers/integrations/moe.py:")
    assert message.endswith("decides Python control flow, which a graph cannot record")


def test_no_leaves_on_the_command_line_shows_the_trace_refusal(mixtral, tmp_path, capsys):
    """(Writing a conversion with leaves, and splitting it: tests/test_leaf_files.py.)"""
    mixtral.save_pretrained(tmp_path / "ckpt")
    capsys.readouterr()  # transformers' progress bar
    assert main([str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"), "-q", "--no-leaves"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "cannot trace module 'model.layers.0.mlp.experts' at " in err
    assert not (tmp_path / "out").exists()


def test_a_leaf_may_not_hold_a_shared_weight():
    """ModernBERT's padding mask compares sizes in its base model's forward, which holds the embedding
    that the masked-LM head shares: a leaf would hide that sharing, so the conversion is refused."""
    model = tiny("modernbert", transformers.AutoModelForMaskedLM)
    with pytest.raises(TraceError) as e:
        convert(model)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("cannot trace module 'model': it must run as a leaf (transformers/masking_utils.py:")
    assert message.endswith("but it holds the shared weight 'model.embeddings.tok_embeddings.weight', which a "
                            "leaf cannot share; untie it, or convert with leaves=False (--no-leaves) to see the "
                            "refusal")


@pytest.mark.parametrize("model_type, auto, key, rate", [
    ("m2m_100", transformers.AutoModelForSeq2SeqLM, "encoder_layerdrop", 0.05),
    ("switch_transformers", transformers.AutoModelForSeq2SeqLM, "router_jitter_noise", 0.01),
])
def test_a_random_draw_made_only_in_training_is_refused(model_type, auto, key, rate):
    """M2M100's default LayerDrop and Switch Transformers' default router jitter draw in Python behind
    `if self.training`: one graph cannot record that branch for both modes. (Before leaves these types were
    refused for their positions or routing; their conversions now reach this.)"""
    model = tiny(model_type, auto)
    assert getattr(model.config, key) == rate  # the type's default
    with pytest.raises(TraceError) as e:
        convert(model)
    assert str(e.value) == (f"cannot trace {type(model).__name__}: {key} is {rate!r}: in training "
                            f"{derived.TRAINING_DRAWS[key]} behind `if self.training`, which one graph cannot "
                            f"record for both modes; set {key}=0 in the config")


def test_json_report_of_a_conversion_without_leaves_has_an_empty_list(tmp_path):
    conversion = convert(tiny("gpt_neox"))
    assert conversion.leaves == {}
    section = model_section(conversion)
    assert section.data["leaves"] == [] and "leaves" not in section.fields
    json.dumps(section.data)
