"""Tiny T5-family models and comparisons against eager transformers, shared by the tests."""

import torch
import transformers

from fxconvert.families.t5 import FAMILY as T5_FAMILY

FAMILIES = {"T5": transformers.T5Config, "MT5": transformers.MT5Config, "UMT5": transformers.UMT5Config}

# Config variants named in the tracer issue. Each is a set of overrides on a tiny config.
VARIANTS = {
    # original T5: relu FF, LM head tied to the shared embedding, d_model**-0.5 rescale
    "original": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    # v1.1 / flan: gated-gelu, untied LM head, no rescale. transformers 5 always ties T5's
    # head at construction (tie_word_embeddings=False only turns the rescale off) and
    # unties it when a checkpoint holds a distinct head; `build` unties it the same way.
    "v1_1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "uneven_layers": dict(feed_forward_proj="relu", tie_word_embeddings=True, num_layers=2, num_decoder_layers=1),
    "narrow_heads": dict(feed_forward_proj="relu", tie_word_embeddings=True, num_heads=3, d_kv=8),  # 24 != 32
}

CLASSES = [f"{family}{suffix}" for family in FAMILIES for suffix in ("Model", "ForConditionalGeneration", "EncoderModel")]

VOCAB = T5_FAMILY.tiny["vocab_size"]


def tiny_config(family="T5", variant="original", attn="sdpa", **overrides):
    """The record's tiny T5 (`Family.tiny`) with the variant's and then the test's overrides."""
    kwargs = dict(T5_FAMILY.tiny)
    kwargs.update(VARIANTS[variant])
    kwargs.update(overrides)
    config = FAMILIES[family](**kwargs)
    config._attn_implementation = attn
    return config


def build(cls_name="T5ForConditionalGeneration", variant="original", attn="sdpa", seed=0, **overrides):
    family = cls_name.split("For")[0].replace("EncoderModel", "").replace("Model", "")
    config = tiny_config(family, variant, attn, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)._from_config(config, attn_implementation=attn)
    if VARIANTS[variant].get("tie_word_embeddings") is False and hasattr(model, "lm_head"):
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    return model.eval()


def random_inputs(names, batch, enc_len, dec_len, vocab=VOCAB, seed=0, pad=True):
    """Random token inputs; the attention masks pad the tail of the first sequence."""
    g = torch.Generator().manual_seed(seed)
    enc_mask = torch.ones(batch, enc_len, dtype=torch.long)
    dec_mask = torch.ones(batch, dec_len, dtype=torch.long)
    if pad and enc_len > 2:
        enc_mask[0, -2:] = 0
    if pad and dec_len > 2:
        dec_mask[0, -1:] = 0
    labels = torch.randint(0, vocab, (batch, dec_len), generator=g)
    if dec_len > 1:
        labels[-1, -1] = -100  # an ignored label
    pool = {
        "input_ids": torch.randint(0, vocab, (batch, enc_len), generator=g),
        "attention_mask": enc_mask,
        "decoder_input_ids": torch.randint(0, vocab, (batch, dec_len), generator=g),
        "decoder_attention_mask": dec_mask,
        "labels": labels,
    }
    return {n: pool[n] for n in names}


def eager_outputs(model, inputs):
    kwargs = dict(inputs)
    if "use_cache" in model.forward.__code__.co_varnames or not type(model).__name__.endswith("EncoderModel"):
        kwargs["use_cache"] = False
    out = model(**kwargs)
    return {k: v for k, v in out.items() if v is not None}


def max_diff(a: dict, b: dict) -> dict:
    assert set(a) == set(b), (sorted(a), sorted(b))
    return {k: (a[k].detach().float() - b[k].detach().float()).abs().max().item() for k in a}


def grads(module) -> dict:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


# --- shared by tests/test_trace.py and tests/test_codegen.py --------------------------------

import functools  # noqa: E402

import torch.fx  # noqa: E402

# What a traced graph is asked to take, per case: (class-name suffix, input names or None for the
# tracer's default). The ForConditionalGeneration model is traced with labels among the inputs,
# without them, and with input_ids + labels only (the decoder inputs come from shifting labels right).
CASES = {
    "Model": ("Model", None),
    "CG_labels": ("ForConditionalGeneration", ["input_ids", "attention_mask", "decoder_input_ids", "labels"]),
    "CG_no_labels": ("ForConditionalGeneration", ["input_ids", "attention_mask", "decoder_input_ids"]),
    "CG_shift_right": ("ForConditionalGeneration", ["input_ids", "labels"]),
    "EncoderModel": ("EncoderModel", None),
}

# Shapes (batch, encoder length, decoder length) other than the traced meta example (2, 7, 5):
# length 1, lengths longer than relative_attention_max_distance (16 in tiny_config), and
# encoder/decoder lengths that differ in both directions.
SHAPES = [(1, 1, 1), (3, 40, 40), (2, 9, 3), (2, 3, 12), (1, 40, 1)]


def _matrix():
    """The class x variant x attention matrix of the per-configuration tests.

    Tracing a tiny model takes ~0.1 s, so the matrix stays small enough for the whole of
    test_trace.py + test_codegen.py to run well under 3 minutes on 2 cores:
    - T5: every case x every config variant, on "sdpa" and on "eager";
    - MT5 / UMT5: every case on "v1_1" (how mT5/umT5 checkpoints are configured) and
      "uneven_layers" (UMT5 keeps a position bias per layer, so layer counts matter), "sdpa";
      plus every case on "v1_1" with "eager".
    """
    rows = []
    for case in CASES:
        for variant in VARIANTS:
            for attn in ("sdpa", "eager"):
                rows.append(("T5", case, variant, attn))
        for family in ("MT5", "UMT5"):
            for variant in ("v1_1", "uneven_layers"):
                rows.append((family, case, variant, "sdpa"))
            rows.append((family, case, "v1_1", "eager"))
    return rows


MATRIX = _matrix()
MATRIX_IDS = ["-".join(row) for row in MATRIX]


def case_class(family, case):
    return family + CASES[case][0]


@functools.lru_cache(maxsize=None)
def traced(family, case, variant, attn):
    """(eval-mode eager model, GraphModule traced from it); cached, so treat both as read-only.

    The GraphModule shares the model's parameters. Tests that run backward must clear the
    gradients they create (see `grads_of`).
    """
    from fxconvert.trace import trace

    model = build(case_class(family, case), variant, attn)
    names = CASES[case][1]
    return model, trace(model, names)


def input_names_of(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "placeholder"]


def assert_outputs_match(expected: dict, actual: dict, atol=1e-5):
    """Same output names in the same order, and every tensor within `atol` (max abs diff, rtol 0)."""
    assert list(actual) == list(expected), (list(actual), list(expected))
    for name in expected:
        torch.testing.assert_close(
            actual[name], expected[name], rtol=0, atol=atol, equal_nan=True, msg=lambda m, name=name: f"{name}: {m}"
        )


def output_sum(outputs: dict) -> torch.Tensor:
    """A scalar depending on every output (the loss, when present, is one of them)."""
    return sum(v.float().sum() for v in outputs.values())


def seeded(fn, seed):
    """`fn` run after seeding torch with `seed` (dropout draws the same on both sides of a comparison)."""
    def run():
        torch.manual_seed(seed)
        return fn()
    return run


def grads_of(model, run) -> dict:
    """Gradients of every parameter of `model` from backward of `output_sum(run())`; leaves them cleared."""
    model.zero_grad(set_to_none=True)
    try:
        output_sum(run()).backward()
        return grads(model)
    finally:
        model.zero_grad(set_to_none=True)


def assert_grads_match(expected: dict, actual: dict, model):
    everything = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(expected) == everything, sorted(everything - set(expected))  # eager reaches every parameter
    assert set(actual) == everything, sorted(everything - set(actual))
    for name in expected:  # to_dense: a sparse embedding's gradient is sparse
        torch.testing.assert_close(actual[name].to_dense(), expected[name].to_dense(), atol=1e-5, rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")


# The start of a script run in a fresh interpreter where importing transformers fails: generated
# files (model.py, stage files) must run on torch, safetensors and fxconvert.runtime alone.
NO_TRANSFORMERS = r"""
import importlib.abc, importlib.util, json, sys

class NoTransformers(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError("transformers is blocked in this test")

sys.meta_path.insert(0, NoTransformers())
"""


def cli_convert(model, tmp_path, capsys, *options) -> dict:
    """Save `model` to tmp_path/ckpt, convert it with the CLI into tmp_path/out (JSON report, validation on)
    and return the report, after checking the run succeeded and validation passed."""
    import json

    from fxconvert.cli import main

    model.save_pretrained(tmp_path / "ckpt")
    code = main([str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"), "--format", "json", *map(str, options)])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(stdout)
    assert report["status"] == "ok" and report["validation"]["passed"] is True, report["validation"]
    return report


# A fresh process runs a conversion's written files: argv holds (directory, inputs file, result file) per
# conversion. It imports every stage file first (which must import no transformers), then per conversion
# runs model.py and the stages in sequence on the inputs (a torch.save'd dict) with a backward each, and saves
# both losses and their gradients by the model's parameter names (`assert_written_runs_equal_eager`).
WRITTEN_FILES_RUNNER = r"""
import importlib.util, sys
import torch
from fxconvert.stage_files import load_pipeline

jobs = [sys.argv[i:i + 3] for i in range(1, len(sys.argv), 3)]
pipelines = [load_pipeline(directory) for directory, _, _ in jobs]
for pipeline in pipelines:
    for i in range(pipeline.num_stages):
        pipeline.import_stage(i)
imported = "transformers" in sys.modules  # importing a stage file needs no transformers

for (directory, cases, result), pipeline in zip(jobs, pipelines):
    names = {p.name: p.hf_name for stage in pipeline.stages for p in stage.parameters}

    def hf_grads(modules):
        grads = {}
        for module in modules:
            for name, p in module.named_parameters():
                if p.grad is not None:
                    grads[names[name]] = grads.get(names[name], 0) + p.grad
        return grads

    spec = importlib.util.spec_from_file_location("model", f"{directory}/model.py")
    model_file = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model_file)
    model = model_file.load()
    inputs = torch.load(cases)
    loss = model(**inputs)
    loss.backward()
    stages = [pipeline.load_stage(i) for i in range(pipeline.num_stages)]
    values = stages[0](*(inputs[k] for k in pipeline.stages[0].inputs))
    for i in range(1, len(stages)):
        values = stages[i](*values, **{k: inputs[k] for k in pipeline.stages[i].inputs})
    values.backward()
    torch.save({"imported": imported, "loaded": "transformers" in sys.modules, "model_loss": loss.detach(),
                "stage_loss": values.detach(), "model_grads": hf_grads([model]), "stage_grads": hf_grads(stages)},
               result)
"""


def assert_written_runs_equal_eager(model, inputs, result: dict, label: str = "") -> None:
    """A fresh process's run of a conversion's files against eager `model` on `inputs`: for "model" (model.py)
    and "stage" (the stages in sequence), `result["<side>_loss"]` equals eager's loss and
    `result["<side>_grads"]` (keyed by the model's parameter names) reaches every parameter eager's
    gradient reaches, each within 1e-5."""
    params = dict(model.named_parameters(remove_duplicate=False))
    expected_loss = model(**inputs, use_cache=False).loss
    expected = grads_of(model, lambda: {"loss": model(**inputs, use_cache=False).loss})
    assert expected
    by_id = {id(p): expected[name] for name, p in model.named_parameters() if name in expected}
    for side in ("model", "stage"):
        torch.testing.assert_close(result[f"{side}_loss"], expected_loss.detach(), rtol=0, atol=1e-5)
        grads = result[f"{side}_grads"]
        assert {id(params[name]) for name in grads} == set(by_id)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, by_id[id(params[name])], atol=1e-5, rtol=1e-4,
                                       msg=lambda m, name=name: f"{label} {side} {name}: {m}")


def two_stage_run(pipeline, inputs, recompute: bool) -> dict:
    """The loss and every stage gradient of a 2-stage pipeline's files loaded afresh, with every block
    recomputed in backward (as a rank's `--recompute` does) or none."""
    from fxconvert.training.recompute import recompute_blocks

    stages = [pipeline.load_stage(i) for i in range(pipeline.num_stages)]
    for i, (stage, spec) in enumerate(zip(stages, pipeline.stages)):
        chosen = spec.blocks if recompute else ()
        assert recompute_blocks(stage, spec.blocks, chosen, index=i) == chosen
    values = stages[0](*(inputs[k] for k in pipeline.stages[0].inputs))
    loss = stages[1](*values, **{k: inputs[k] for k in pipeline.stages[1].inputs})
    loss.backward()
    return {"loss": loss.detach(), **{f"{i}.{n}": p.grad for i, s in enumerate(stages) for n, p in s.named_parameters()}}
