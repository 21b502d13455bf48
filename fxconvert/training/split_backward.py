"""A stage's backward in two exact halves, for the zero-bubble schedules: the input gradient now, the weights' later.

The input half differentiates the stage's outputs by its inputs only, so the gradient can
be sent upstream at once. The weight half runs later, to fill the schedule's bubble, and
must not walk the activation gradients a second time, or it costs a whole backward.

The analysis (`weight_groups`) reads the autograd graph of the stage's outputs. The nodes
on a path from an output to an input are the *input side*; the input half runs exactly
those. From each parameter, the graph is walked towards the outputs until it meets the
input side: the nodes met there are the parameter's *junctions*, where its gradient
leaves the activations' path. The input half records the whole gradient arriving at each
junction (a node pre-hook). The weight half starts from the junctions with those
gradients and goes down to the parameters only, so it runs each weight's own part of the
backward (`x.T @ dy` of a linear layer) and nothing of the input side's.

Two cases make this more than torch's own split (`torch.distributed.pipelining._backward`):

- An output computed from weights alone (T5's position bias, passed to the next stage)
  is not on the input side; its gradient reaches the weights only through the output
  itself. Such an output is a root of the weight half, with the gradient it was given.
- Parameters whose walks meet a common junction or output share one call (a *group*), and
  every call keeps the graph: another group may still need a node both walk through.

Within a group, one junction may lie below another. The weight half runs both, and a
pre-hook on each junction replaces what arrives there with the whole gradient recorded
in the input half, so nothing is counted twice.
"""

from collections import defaultdict, deque
from dataclasses import dataclass, field

import torch
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge


@dataclass(eq=False)
class Group:
    """Parameters whose gradients one autograd call finds, from these junctions and outputs."""

    params: list[torch.Tensor] = field(default_factory=list)
    junctions: list[Node] = field(default_factory=list)
    roots: list[tuple[GradientEdge, torch.Tensor]] = field(default_factory=list)  # outputs off the input side
    recorded: dict = field(default_factory=dict)  # junction -> the gradients that arrived there (input half)


def _node(t: torch.Tensor) -> Node | None:
    """The autograd node a gradient for `t` arrives at: its grad_fn, or a leaf's gradient accumulator."""
    if t.grad_fn is not None:
        return t.grad_fn
    if not t.requires_grad:
        return None
    return t.view_as(t).grad_fn.next_functions[0][0]


def _consumers(roots: list[Node]) -> dict[Node, list[Node]]:
    """node -> the nodes that pass it a gradient, over the graph below `roots`."""
    consumers: dict[Node, list[Node]] = defaultdict(list)
    seen, queue = set(roots), deque(roots)
    while queue:
        node = queue.popleft()
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            consumers[nxt].append(node)
            if nxt not in seen:
                seen.add(nxt)
                queue.append(nxt)
    return consumers


def _above(starts, consumers, stop=frozenset()):
    """The nodes reached from `starts` towards the outputs without passing through `stop`, and the `stop` nodes met
    (both in the order met: the groups' order, and so the sums' order, is the same on every run)."""
    reached, met, queue = dict.fromkeys(starts), {}, deque(starts)
    while queue:
        for up in consumers.get(queue.popleft(), ()):
            if up in stop:
                met[up] = None
            elif up not in reached:
                reached[up] = None
                queue.append(up)
    return list(reached), list(met)


def weight_groups(outputs, grads, inputs, params) -> list[Group]:
    """The analysis: the stage's parameters in groups, each with its junctions and the outputs it starts from."""
    edges = [get_gradient_edge(o) for o in outputs]
    roots = list(dict.fromkeys(e.node for e in edges))
    consumers = _consumers(roots)
    input_nodes = [n for n in (_node(v) for v in inputs if isinstance(v, torch.Tensor))
                   if n is not None and (n in consumers or n in roots)]
    input_side = set(_above(input_nodes, consumers)[0]) if input_nodes else set()
    root_edges = defaultdict(list)
    for edge, grad in zip(edges, grads):
        root_edges[edge.node].append((edge, grad))
    groups: list[Group] = []
    owner: dict[Node, Group] = {}  # a junction or an output node -> its group
    for p in params:
        node = _node(p)
        if node is None or (node not in consumers and node not in roots):
            continue  # unused by this stage's forward: no gradient, as in a full backward
        walked, junctions = _above([node], consumers, stop=input_side)
        outs = [n for n in walked if n in root_edges]
        met = [*junctions, *outs]
        joined = list({id(owner[n]): owner[n] for n in met if n in owner}.values())
        if not joined:
            joined = [Group()]
            groups.append(joined[0])
        group = joined[0]
        for other in joined[1:]:  # the parameter's walk meets two groups: they become one
            group.params += other.params
            group.junctions += other.junctions
            group.roots += other.roots
            for n in (*other.junctions, *(e.node for e, _ in other.roots)):
                owner[n] = group
            groups.remove(other)
        group.params.append(p)
        for j in junctions:
            if owner.get(j) is not group:
                owner[j] = group
                group.junctions.append(j)
        for r in outs:
            if owner.get(r) is not group:
                owner[r] = group
                group.roots += root_edges[r]
    return groups


def input_half(outputs, grads, inputs, params):
    """The inputs' gradients (None where an input needs none) and the groups for `weight_half`, their junctions'
    gradients recorded."""
    groups = weight_groups(outputs, grads, inputs, params)
    handles = []
    for group in groups:
        for j in group.junctions:
            handles.append(j.register_prehook(lambda grad_outputs, g=group, j=j: g.recorded.__setitem__(j, grad_outputs)))
    try:
        wanted = [v for v in inputs if isinstance(v, torch.Tensor) and v.requires_grad]
        found = iter(torch.autograd.grad(outputs, wanted, grads, retain_graph=True, allow_unused=True)
                     if outputs and wanted else [None] * len(wanted))
    finally:
        for h in handles:
            h.remove()
    dinputs = tuple(next(found) if isinstance(v, torch.Tensor) and v.requires_grad else None for v in inputs)
    return dinputs, groups


def weight_half(groups: list[Group]) -> None:
    """Add each group's parameter gradients to `.grad`, from its junctions' recorded gradients and its outputs'
    (once: the groups are spent)."""
    for group in groups:
        starts, given = [], []
        for j in group.junctions:
            for i, g in enumerate(group.recorded.get(j, ())):
                if g is not None:
                    starts.append(GradientEdge(j, i))
                    given.append(g)
        for edge, g in group.roots:
            starts.append(edge)
            given.append(g)
        if not starts:
            continue
        # a junction below another receives part of the gradient again: hand it the whole, recorded one
        handles = [j.register_prehook(lambda _, saved=group.recorded[j]: saved)
                   for j in group.junctions if j in group.recorded]
        try:
            found = torch.autograd.grad(starts, group.params, given, retain_graph=True, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        for p, g in zip(group.params, found):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g
        group.recorded.clear()  # used once: a group's gradients are added once
        group.roots.clear()
