"""Tests of `fxconvert.cost`: per-node FLOPs equal hand-computed values, the whole graph's FLOPs equal what
torch's own counter sees on a real run, and the activations predicted for a stage are the bytes a real
forward saves for backward (unique storages, parameters excepted)."""

import functools

import pytest
import torch
import torch.fx
from torch.utils.flop_counter import FlopCounterMode

from fxconvert import convert
from fxconvert.cost import Sizes, analyze, run_costs
from fxconvert.errors import UsageError
from fxconvert.stages import split_stages

from helpers import build, random_inputs

B, L, S, D, OUT, HEADS, HEAD_DIM, VOCAB = 3, 6, 5, 16, 24, 4, 8, 50


def meta(*shape, grad=False, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta").requires_grad_(grad)


def only_node(cost, op):
    (node,) = [n for n in cost.nodes if n.op == op]
    return cost.nodes[node]


class LinearModule(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(D, OUT)

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("input_grad", [True, False], ids=["input-needs-grad", "input-is-data"])
def test_linear_flops(input_grad):
    """y = x W^T + b over B*L rows: 2*B*L*D*OUT forward; backward 2*B*L*D*OUT for dW, and as much again for
    dx when x needs a gradient (the bias gradient is a sum: no multiply-adds)."""
    cost = run_costs(torch.fx.symbolic_trace(LinearModule()), [meta(B, L, D, grad=input_grad)])
    node = only_node(cost, "call_module")
    assert node.forward_flops == 2 * B * L * D * OUT
    assert node.backward_flops == 2 * B * L * D * OUT * (2 if input_grad else 1)
    # the input (B*L*D floats) is saved for dW; the weight is a parameter, not an activation
    assert sum(node.saved.values()) == B * L * D * 4


def sdpa(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def test_sdpa_flops():
    """Scores Q K^T and their product with V: two (L x d) @ (d x S) products per head, 4*B*H*L*S*d forward;
    backward takes dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q: four more, 8*B*H*L*S*d. (The math kernel,
    which CPU training with dropout runs, and meta tensors dispatch to; flash kernels also recompute P.)"""
    q = meta(B, HEADS, L, HEAD_DIM, grad=True)
    k, v = meta(B, HEADS, S, HEAD_DIM, grad=True), meta(B, HEADS, S, HEAD_DIM, grad=True)
    cost = run_costs(torch.fx.symbolic_trace(sdpa), [q, k, v])
    node = only_node(cost, "call_function")
    assert node.forward_flops == 4 * B * HEADS * L * S * HEAD_DIM
    assert node.backward_flops == 8 * B * HEADS * L * S * HEAD_DIM


def lookup(ids, table):
    return torch.nn.functional.embedding(ids, table)


def test_embedding_lookup_flops_and_bytes():
    """A lookup has no arithmetic (0 FLOPs both ways, as torch's counter says); it reads the ids and the B*L
    rows it copies, and writes them: ids + 2 * B*L*D*4 bytes, not the whole table."""
    table = meta(VOCAB, D, grad=True)
    cost = run_costs(torch.fx.symbolic_trace(lookup), [meta(B, L, dtype=torch.long), table], weights=[table])
    node = only_node(cost, "call_function")
    assert node.forward_flops == 0 and node.backward_flops == 0
    assert node.forward_bytes == B * L * 8 + 2 * B * L * D * 4
    assert sum(node.saved.values()) == B * L * 8  # the ids, for the scatter of the gradient


# -- a tiny T5 ---------------------------------------------------------------------------------------

SIZES = Sizes(batch=3, encoder_length=6, decoder_length=4)


@functools.lru_cache(maxsize=None)
def conversion(attn="sdpa"):
    return convert(build("T5ForConditionalGeneration", attn=attn))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_graph_flops_equal_torchs_counter_on_a_real_run(attn):
    """torch's FlopCounterMode on a real CPU training step (SDPA with dropout runs the math kernel, whose matmuls
    it counts): the per-node forward and backward FLOPs of the analysis add up to its totals."""
    conv = conversion(attn)
    cost = analyze(conv, sizes=SIZES)
    inputs = random_inputs(conv.input_names, SIZES.batch, SIZES.encoder_length, SIZES.decoder_length)
    conv.module.train()
    try:
        counter = FlopCounterMode(display=False)
        with counter:
            loss = conv.module(**inputs)
        forward = counter.get_total_flops()
        with counter:
            loss.backward()
        backward = counter.get_total_flops()
    finally:
        conv.module.eval()
        conv.module.zero_grad(set_to_none=True)
    assert forward > 0 and backward > forward
    assert sum(c.forward_flops for c in cost.nodes.values()) == forward
    assert sum(c.backward_flops for c in cost.nodes.values()) == backward


def saved_by_real_forward(stages, inputs) -> list[int]:
    """Bytes each stage's real forward (train mode) saves for backward: unique storages, parameters excepted."""
    weights = {p.untyped_storage().data_ptr() for p in stages.parameters()}
    out, values = [], ()
    for spec, gm in zip(stages.specs, stages.stages):
        storages, keep = {}, []

        def pack(t):
            keep.append(t)
            ptr = t.untyped_storage().data_ptr()
            if ptr not in weights:
                storages[ptr] = t.untyped_storage().nbytes()
            return t

        received = [v.detach().requires_grad_(v.requires_grad) for v in values]  # as in the unsplit graph
        args = [*received, *(inputs[n] for n in spec.inputs), *(getattr(stages, w) for w in spec.shared_weights), True]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            result = gm(*args)
        out.append(sum(storages.values()))
        values = result if spec.sent else ()
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_predicted_activation_bytes_match_a_real_forward(attn):
    """One block per stage: the bytes each stage saves for backward, predicted on meta tensors, equal those its
    real forward saves (padded inputs: the analysis prices the padding mask)."""
    conv = conversion(attn)
    stages = split_stages(conv, 4, batch=SIZES.batch, encoder_length=SIZES.encoder_length,
                          decoder_length=SIZES.decoder_length)
    inputs = random_inputs(conv.input_names, SIZES.batch, SIZES.encoder_length, SIZES.decoder_length, pad=True)
    torch.manual_seed(0)
    measured = saved_by_real_forward(stages, inputs)
    assert all(m > 0 for m in measured)
    assert [s.activation_bytes for s in stages.plan.stages] == measured


def test_values_at_the_sizes_given():
    """The values are re-propagated at the sizes asked for, not the traced example's."""
    conv = conversion()
    cost = analyze(conv, sizes=Sizes(batch=5, encoder_length=33, decoder_length=2))
    hidden = [v.shape for n, v in cost.values.items() if n.meta.get("module_path") == "encoder.final_layer_norm"]
    assert hidden and hidden[-1] == (5, 33, 32)


@pytest.mark.parametrize("bad", [dict(batch=0), dict(encoder_length=-3), dict(decoder_length=2.5),
                                 dict(batch=True), dict(batch="8")])
def test_sizes_refuse_nonsense(bad):
    with pytest.raises(UsageError, match="must be a positive integer"):
        Sizes(**bad)
