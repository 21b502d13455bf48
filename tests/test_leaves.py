"""Leaves: a submodule whose Python decides on traced values runs its eager code as one `call_module` node.

Mixtral's expert loop (transformers' `integrations/moe.py`) sorts and counts tokens per expert, so its
`experts` modules become leaves; equality with eager, outputs and every gradient, is the conformance
suite's (tests/test_conformance_derived.py); the files written for leaves, tests/test_leaf_files.py. Here:
what the conversion says of its leaves, the strict refusal `leaves=False` keeps, the refusal of a leaf with
a shared weight, and the training-only random draws a derived record refuses.

A model function (one defined in the model's own modeling module) that decides on traced values runs its
eager code as one `call_function` node instead, so a module holding a tied embedding need not be a leaf
(LongT5's `_split_into_blocks`); transformers' mask helpers that decide on sizes or values are recorded as
`fxconvert.runtime` calls that decide at run time (ModernBERT's sliding window, LFM2's recurrent mask).
"""

import json

import pytest
import torch
import transformers

from fxconvert import runtime
from fxconvert.cli import main
from fxconvert.errors import TraceError
from fxconvert.families import derived
from fxconvert.report import model_section
from fxconvert.trace import trace
from fxconvert.workflow import convert

from helpers import grads_of, seeded

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
    """XLM asserts on its inputs' values (`lengths.max().item() <= slen`) in its base model's forward, which
    holds the embedding that the LM head shares: a leaf would hide that sharing, so the conversion is refused."""
    model = tiny("xlm")
    with pytest.raises(TraceError) as e:
        convert(model)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("cannot trace module 'transformer': it must run as a leaf "
                              "(transformers/models/xlm/modeling_xlm.py:")
    assert message.endswith("but it holds the shared weight 'transformer.embeddings.weight', which a "
                            "leaf cannot share; untie it, or convert with leaves=False (--no-leaves) to see the "
                            "refusal")


def assert_converts_equal_to_eager(model, conversion, feeds):
    """The loss and every gradient of `conversion` equal eager's at 1e-5, for each feed."""
    kwargs = {"use_cache": False} if "use_cache" in derived._forward_parameters(type(model)) else {}
    for feed in feeds:
        run_eager = seeded(lambda: {"loss": model(**feed, **kwargs).loss}, 0)
        run_converted = seeded(lambda: {"loss": conversion.module(**feed)}, 0)
        expected, actual = grads_of(model, run_eager), grads_of(model, run_converted)
        assert expected and set(actual) == set(expected), sorted(set(actual) ^ set(expected))
        with torch.no_grad():
            torch.testing.assert_close(run_converted()["loss"], run_eager()["loss"], rtol=0, atol=1e-5)
        for name in expected:
            torch.testing.assert_close(actual[name], expected[name], atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def feed(length, padded, *, batch=2, seed=0, decoder=None, vocab=97):
    g = torch.Generator().manual_seed(seed)
    out = {"input_ids": torch.randint(3, vocab, (batch, length), generator=g)}
    out["attention_mask"] = torch.ones_like(out["input_ids"])
    if padded:
        out["attention_mask"][0, -padded:] = 0
    if decoder:
        out["decoder_input_ids"] = torch.randint(3, vocab, (batch, decoder), generator=g)
    out["labels"] = out["decoder_input_ids" if decoder else "input_ids"].clone()
    return out


@pytest.fixture(scope="module")
def longt5():
    """LongT5 with blocks of 4 (local_radius 3): a length of 8 fills its blocks, one of 7 is padded first."""
    return tiny("longt5", transformers.AutoModelForSeq2SeqLM, local_radius=3)


def test_a_model_function_that_branches_on_a_size_runs_as_a_function_leaf(longt5):
    """LongT5's `_split_into_blocks` pads `if x.shape[dim] % block_len != 0`, called in its encoder's forward,
    which holds the tied embedding: the function, not the encoder, runs its eager code, so the branch is taken
    at run time, per call; equal to eager at a length that fills the blocks and at one that does not."""
    from transformers.models.longt5 import modeling_longt5

    conversion = convert(longt5)
    name = "transformers.models.longt5.modeling_longt5._split_into_blocks()"
    assert conversion.leaves[name].startswith("transformers/models/longt5/modeling_longt5.py:")
    assert not any(path == "encoder" or path.startswith("encoder.embed") for path in conversion.leaves)
    calls = [n for n in conversion.graph_module.graph.nodes if n.op == "call_function"
             and n.target is modeling_longt5._split_into_blocks]  # transformers' own function, unwrapped again
    assert calls and not hasattr(modeling_longt5._split_into_blocks, "__wrapped_for_leaves__")
    section = model_section(conversion)
    assert {"function": name[:-2], "source": conversion.leaves[name]} in section.data["leaves"]
    assert f"{name} ({conversion.leaves[name]})" in section.fields["leaves"]
    assert_converts_equal_to_eager(longt5, conversion, [feed(8, 2, decoder=5), feed(7, 3, batch=3, decoder=4)])


def test_a_function_leaf_is_refused_with_leaves_false(longt5):
    with pytest.raises(TraceError) as e:
        convert(longt5, leaves=False)
    assert str(e.value).startswith("cannot trace module 'encoder' at transformers/models/longt5/modeling_longt5.py:")


@pytest.mark.parametrize("attn", ("sdpa", "eager"))
@pytest.mark.parametrize("local_attention, padded", [(4, 2), (4, 0), (128, 0)])
def test_a_bidirectional_sliding_window_mask_is_recorded_and_decided_at_run_time(attn, local_attention, padded):
    """ModernBERT's sliding layers get `create_bidirectional_sliding_window_mask`: one runtime mask call, not
    its base model as a leaf (which holds the tied embedding). A window of 2 (local_attention 4) masks keys
    farther than 2; a window wider than the keys with nothing padded is no mask at all under SDPA (decided at
    run time, as transformers does); each equals eager."""
    model = tiny("modernbert", transformers.AutoModelForMaskedLM, local_attention=local_attention,
                 attn_implementation=attn)
    assert model.config.sliding_window == local_attention // 2 and "sliding_attention" in model.config.layer_types
    conversion = convert(model)
    assert conversion.leaves == {}
    assert any(n.target is runtime.sliding_window_padding_mask for n in conversion.graph_module.graph.nodes)
    assert_converts_equal_to_eager(model, conversion, [feed(7, padded), feed(12, padded, batch=3, seed=1)])


def test_a_recurrent_layers_padding_mask_is_recorded_and_decided_at_run_time():
    """LFM2's convolution layers multiply their states by `create_recurrent_attention_mask`, which is None (no
    multiply) for one position or nothing padded: a runtime mask call, not the base model as a leaf. Equal to
    eager padded, unpadded, and at one position with a padded row (where eager does not mask at all)."""
    model = tiny("lfm2", layer_types=["conv", "full_attention"])
    conversion = convert(model)
    assert conversion.leaves == {}
    assert any(n.target is runtime.recurrent_padding_mask for n in conversion.graph_module.graph.nodes)
    assert_converts_equal_to_eager(model, conversion, [feed(7, 2), feed(6, 0, batch=3, seed=1)])
    gm = trace(model, ["input_ids", "attention_mask"])
    one = {"input_ids": torch.tensor([[5], [6]]), "attention_mask": torch.tensor([[0], [1]])}
    with torch.no_grad():
        torch.testing.assert_close(gm(**one)["logits"], model(**one, use_cache=False).logits, rtol=0, atol=1e-5)


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
