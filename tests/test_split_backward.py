"""The zero-bubble schedules' split backward (`fxconvert.training.split_backward`) against one whole backward.

Each case is a small stage shape that the split must get right: a chain of layers, an
output made from weights alone that a later op also reads (T5's position bias), a weight
used twice (tied), weights that share a path before it meets the activations, a first
stage whose inputs need no gradient, and an unused parameter. The reference is
`torch.autograd.grad` over everything at once.
"""

import pytest
import torch

from fxconvert.training.split_backward import input_half, weight_groups, weight_half


class Chain(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.norm = torch.nn.Linear(6, 8), torch.nn.Linear(8, 6), torch.nn.LayerNorm(6)

    def forward(self, x):
        return (self.norm(self.b(torch.relu(self.a(x)))),)


class WeightOnlyOutput(torch.nn.Module):
    """Like T5's first block: a bias made from a weight alone is added to the scores and passed on as an output."""

    def __init__(self):
        super().__init__()
        self.rel = torch.nn.Embedding(5, 4)
        self.q = torch.nn.Linear(4, 4)

    def forward(self, x):
        bias = self.rel(torch.tensor([0, 3, 1, 2]))[None].permute(0, 2, 1)  # weights only
        scores = self.q(x) @ x.transpose(-1, -2) + bias
        return scores.softmax(-1) @ x, bias * 1.0


class Tied(torch.nn.Module):
    """One weight read by two layers, and two weights summed before they meet the activations."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, 4))
        self.u = torch.nn.Parameter(torch.randn(4, 4))
        self.v = torch.nn.Parameter(torch.randn(4, 4))
        self.unused = torch.nn.Parameter(torch.randn(3))

    def forward(self, x):
        h = torch.tanh(x @ self.w)
        h = h @ (self.u + self.v).tanh()
        return (h @ self.w.t(),)


class FirstStage(torch.nn.Module):
    """No input needs a gradient: everything is the weight half's."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, ids):
        return (self.lin(self.emb(ids)),)


def _inputs(case):
    if case is FirstStage:
        return [torch.tensor([[1, 2, 3], [4, 5, 9]])]
    return [torch.randn(2, 4 if case is not Chain else 3, 4 if case is not Chain else 6, requires_grad=True)]


@pytest.mark.parametrize("case", [Chain, WeightOnlyOutput, Tied, FirstStage])
def test_split_backward_equals_one_backward(case):
    torch.manual_seed(0)
    module = case()
    inputs = _inputs(case)
    params = [p for p in module.parameters() if p.requires_grad]
    grads_out = [torch.randn_like(o) for o in module(*inputs)]

    outputs = module(*inputs)
    wanted = [v for v in inputs if v.requires_grad]
    expected = torch.autograd.grad(outputs, [*wanted, *params], grads_out, allow_unused=True)

    outputs = [o.clone() if o._is_view() else o for o in module(*inputs)]  # as `StageCall.copy_views` leaves them
    dinputs, groups = input_half(outputs, grads_out, inputs, params)
    assert all(p.grad is None for p in params)  # the input half leaves the weights alone
    for o in outputs:
        o.detach_()  # as the schedule does between the halves
    weight_half(groups)
    weight_half(groups)  # a second call finds nothing recorded: it adds nothing
    got = [d for d, v in zip(dinputs, inputs) if v.requires_grad] + [p.grad for p in params]
    for want, have in zip(expected, got):
        if want is None:
            assert have is None
        else:
            torch.testing.assert_close(have, want, rtol=1e-6, atol=1e-6)


def test_the_weight_half_starts_at_the_junctions_not_the_outputs():
    """A chain of layers: each layer's weight and bias are one group, starting at the layer's own op (a linear's
    addmm), so the weight half never walks the activations' path (that walk made it cost a whole backward)."""
    module = Chain()
    x = torch.randn(2, 3, 6, requires_grad=True)
    out = module(x)
    params = list(module.parameters())
    groups = weight_groups(list(out), [torch.ones_like(out[0])], [x], params)
    layers = [list(m.parameters()) for m in (module.a, module.b, module.norm)]
    assert [[id(p) for p in g.params] for g in groups] == [[id(p) for p in layer] for layer in layers]
    assert [len(g.junctions) for g in groups] == [1, 1, 1]
    assert all(not g.roots for g in groups)


def test_an_output_made_from_weights_alone_is_a_root_of_the_weight_half():
    module = WeightOnlyOutput()
    x = torch.randn(2, 4, 4, requires_grad=True)
    out = module(x)
    groups = weight_groups(list(out), [torch.ones_like(o) for o in out], [x], list(module.parameters()))
    (rel,) = [g for g in groups if any(p is module.rel.weight for p in g.params)]
    assert [e.node for e, _ in rel.roots] == [out[1].grad_fn]
