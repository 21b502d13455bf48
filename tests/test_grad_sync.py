"""sync_gradients on one rank holding two copies of a shared weight (two stages per rank, no process group needed)."""

import torch

from fxconvert.training.grad_sync import Topology, clip_global_norm, sync_gradients


def _two_copies(grads):
    modules = {}
    for i, g in enumerate(grads):
        m = torch.nn.Module()
        m.shared = torch.nn.Parameter(torch.zeros(3, 2))
        m.shared.grad = g
        modules[i] = m
    return Topology(world_size=1, dp=1, virtual_stages=2, shared_stages={"shared": [0, 1]}), modules


def test_copies_get_the_sum_in_tensors_of_their_own():
    g0, g1 = torch.randn(3, 2), torch.randn(3, 2)
    topo, modules = _two_copies([g0.clone(), g1.clone()])
    sync_gradients(topo, modules)
    a, b = modules[0].shared.grad, modules[1].shared.grad
    assert torch.equal(a, g0 + g1) and torch.equal(b, g0 + g1)
    assert a.data_ptr() != b.data_ptr()
    clip_global_norm(topo, modules, 1e-3)  # scales each copy once, in place
    assert torch.equal(a, b)


def test_a_copy_without_gradient_gets_the_others():
    g1 = torch.randn(3, 2)
    topo, modules = _two_copies([None, g1.clone()])
    sync_gradients(topo, modules)
    a, b = modules[0].shared.grad, modules[1].shared.grad
    assert torch.equal(a, g1) and torch.equal(b, g1) and a.data_ptr() != b.data_ptr()
