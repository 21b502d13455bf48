"""Activation recompute: chosen blocks of a stage run under `torch.utils.checkpoint`, their activations
recomputed in backward instead of kept from forward.

`--recompute` chooses the blocks (`chosen_blocks`): `none`, `full` (every block of every
stage) or `auto` (the source's plan: pipeline.json's `plan.recompute`, or the in-process
split's). `recompute_blocks(stage, blocks, chosen)` then runs the stage's graph as
segments, one per run of nodes of the same block, and wraps the chosen ones in
`checkpoint(..., use_reentrant=False)`:

- A node belongs to the block its module or attribute lies in (`meta["module_path"]` in a
  split made here, else the target of a `call_module` or `get_attr` node of a stage file's
  re-traced graph). Any other node joins a neighbour as the split attaches it
  (`fxconvert.stages`): one computed from a block's outputs joins the block before it,
  one computed only from the stage's inputs the block after it. So a stage's embedding
  joins its first block and its final norm, head and loss its last.
- Non-reentrant checkpoint keeps the forward's autograd graph and drops only the tensors
  it saved; backward recomputes them with the RNG state of the forward restored, so
  dropout draws the same masks: the losses and gradients are those of no recompute,
  bit for bit on CPU float32, and parameter gradients flow through as before.
- Nothing is registered: the segment GraphModules share the stage's parameter and
  module objects (kept in the forward's closure, out of the module tree), so the state
  dict, checkpoints, export and the tied-weight sync see the stage's names unchanged.
  `load_state_dict` copies into those objects, which the segments see.

Like the rest of a rank, this imports neither the converter nor transformers.
"""

import inspect
import re
from dataclasses import dataclass

import torch
import torch.fx
from torch.utils.checkpoint import checkpoint

from fxconvert import runtime
from fxconvert.errors import FxConvertError, UsageError, first_line, printable

MODES = ("none", "full", "auto")
# The leaf functions a stage file's graph calls (`fxconvert.runtime`): kept as one node each when re-traced.
RUNTIME_FUNCTIONS = tuple(f for f in vars(runtime).values()
                          if inspect.isfunction(f) and f.__module__ == runtime.__name__ and not f.__name__.startswith("_"))


def chosen_blocks(mode: str, stage_blocks, planned, *, where: str) -> list[tuple[str, ...]]:
    """Per stage, the blocks (of `stage_blocks`, each stage's in run order) that `--recompute mode`
    recomputes; `planned` is the source's plan (block names of any stage; None: no plan), `where` names it."""
    if mode == "full":
        return [tuple(blocks) for blocks in stage_blocks]
    if mode == "none" or not planned:
        return [() for _ in stage_blocks]
    unknown = sorted(set(planned) - {b for blocks in stage_blocks for b in blocks})
    if unknown:
        raise UsageError(f"{where} recomputes {unknown[0]}, which no stage runs; convert again, or pass "
                         f"--recompute full or none")
    return [tuple(b for b in blocks if b in set(planned)) for blocks in stage_blocks]


def describe(mode: str, chosen: list[tuple[str, ...]], *, where: str) -> str | None:
    """The start line saying which blocks each stage recomputes (None when none is: --recompute none, or auto
    with a plan that chose none, as every plan made without --max-memory does; the run is then as before)."""
    if mode == "none" or not any(chosen):
        return None
    source = "" if mode == "full" else f" ({where})"
    return f"recompute {mode}{source}: " + "; ".join(f"stage {i} {_ranges(blocks) or 'none'}"
                                                      for i, blocks in enumerate(chosen))


def _ranges(blocks) -> str:
    """`encoder.block.0, encoder.block.1, encoder.block.2` as `encoder.block.0-2`."""
    runs = []  # [prefix, first, last]
    for name in blocks:
        match = re.fullmatch(r"(.*?)(\d+)", name)
        prefix, index = (match[1], int(match[2])) if match else (name, None)
        if runs and index is not None and runs[-1][0] == prefix and runs[-1][2] == index - 1:
            runs[-1][2] = index
        else:
            runs.append([prefix, index, index])
    return ", ".join(p if a is None else f"{p}{a}" if a == b else f"{p}{a}-{b}" for p, a, b in runs)


@dataclass(frozen=True)
class Segment:
    """A run of a graph's nodes: a GraphModule from `inputs` to `outputs` (nodes of the whole graph)."""

    module: torch.fx.GraphModule
    inputs: tuple[torch.fx.Node, ...]
    outputs: tuple[torch.fx.Node, ...]
    recompute: bool


class RecomputeError(FxConvertError):
    """A stage's graph could not be run in segments."""


def recompute_blocks(stage: torch.nn.Module, blocks, chosen, *, index: int = 0) -> tuple[str, ...]:
    """Run the `chosen` blocks of `stage` (stage `index`, a module with a `graph_module`; `blocks` are all
    of its blocks) under checkpoint; returns the chosen blocks found in its graph (none: nothing changes)."""
    if not chosen:
        return ()
    inner = stage.graph_module
    try:
        graph = inner.graph if isinstance(inner, torch.fx.GraphModule) else _trace(inner)
    except Exception as e:  # noqa: BLE001 - a stage file edited by hand may fail to trace in any way
        raise RecomputeError(f"stage {index}: cannot run its blocks under recompute, its graph does not trace "
                             f"({printable(type(e).__name__ + ': ' + first_line(e))}); pass --recompute none, or "
                             f"convert again") from e
    nodes = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    unit = _units(nodes, list(blocks))
    found = tuple(b for b in chosen if b in set(unit.values()))
    if not found:
        return ()
    segments = _segments(inner, graph, [(n, unit[n] if unit[n] in found else None) for n in nodes])
    inner.forward = _runner(graph, segments)  # an instance attribute: no module, parameter or name is added
    return found


class _StageTracer(torch.fx.Tracer):
    """Keeps every module that is not a plain container as one call: torch.nn's, and a leaf's transformers
    module, whose code decides on values (`fxconvert.codegen`'s TRANSFORMERS_LEAVES)."""

    def is_leaf_module(self, m, module_qualified_name):
        return type(m) is not torch.nn.Module or super().is_leaf_module(m, module_qualified_name)


def _trace(module: torch.nn.Module) -> torch.fx.Graph:
    """A stage file's graph module re-traced: its generated forward, node for node (buffers read as
    attributes, as parameters are, and the runtime's leaf functions, the file's function leaves
    (TRANSFORMERS_FUNCTIONS) and the leaf modules kept whole)."""
    names = getattr(type(module).forward, "__globals__", {})  # the stage file's function leaves, by name
    leaves = tuple(names[n] for n in names.get("TRANSFORMERS_FUNCTIONS", {}) if callable(names.get(n)))
    tracer = _StageTracer(autowrap_functions=RUNTIME_FUNCTIONS + leaves)
    tracer.proxy_buffer_attributes = True
    return tracer.trace(module)


def _block_of(node: torch.fx.Node, blocks: list[str]) -> str | None:
    path = node.meta.get("module_path") or (node.target if node.op in ("call_module", "get_attr") else "")
    return next((b for b in blocks if path == b or path.startswith(b + ".")), None)


def _units(nodes, blocks: list[str]) -> dict:
    """node -> its block, or None (a stage without blocks); a node of no block joins a neighbour (module doc)."""
    own = {n: _block_of(n, blocks) for n in nodes}
    derived = set()
    for node in nodes:
        if own[node] is not None or any(a in derived for a in node.all_input_nodes):
            derived.add(node)
    unit, pending, previous = {}, [], None
    for node in nodes + [None]:
        if node is not None and own[node] is None:
            pending.append(node)
            continue
        current = None if node is None else own[node]
        last_derived = max((i for i, n in enumerate(pending) if n in derived), default=-1)
        for i, n in enumerate(pending):
            before = current is None or (previous is not None and i <= last_derived)
            unit[n] = previous if before else current
        pending = []
        if node is not None:
            unit[node] = previous = current
    return unit


def _segments(root, graph, keyed) -> list[Segment]:
    """The graph as consecutive segments: (node, chosen block or None) pairs, cut where the key changes."""
    runs = []
    for node, key in keyed:
        if runs and runs[-1][1] == key:
            runs[-1][0].append(node)
        else:
            runs.append(([node], key))
    position = {n: i for i, n in enumerate(graph.nodes)}
    return [_segment(root, run, key is not None, position) for run, key in runs]


def _segment(root, run, recompute: bool, position: dict) -> Segment:
    members = set(run)
    last = position[run[-1]]
    inputs = [a for a in dict.fromkeys(a for n in run for a in n.all_input_nodes)
              if a not in members and a.op != "get_attr"]
    outputs = [n for n in run if n.op != "get_attr" and any(position[u] > last for u in n.users)]
    g = torch.fx.Graph()
    env = {a: g.placeholder(a.name) for a in inputs}
    for node in run:
        for a in node.all_input_nodes:  # an attribute read in an earlier segment is read again here
            if a not in env and a.op == "get_attr":
                env[a] = g.get_attr(a.target)
        env[node] = g.node_copy(node, env.__getitem__)
    g.output(tuple(env[n] for n in outputs))
    return Segment(torch.fx.GraphModule(root, g), tuple(inputs), tuple(outputs), recompute)


def _runner(graph: torch.fx.Graph, segments: list[Segment]):
    """The graph's forward run segment by segment; each value dropped after its last reader."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    output = next(n for n in graph.nodes if n.op == "output")
    last_use = {}
    for i, s in enumerate(segments):
        last_use.update({a: i for a in s.inputs})
    kept = set(output.all_input_nodes)
    drop = [[a for a in s.inputs if last_use[a] == i and a not in kept] for i, s in enumerate(segments)]

    def forward(*args, **kwargs):
        env = {}
        for i, p in enumerate(placeholders):
            env[p] = args[i] if i < len(args) else kwargs[p.target] if p.target in kwargs else p.args[0]
        for s, dropped in zip(segments, drop):
            values = [env[a] for a in s.inputs]
            out = checkpoint(s.module, *values, use_reentrant=False) if s.recompute else s.module(*values)
            env.update(zip(s.outputs, out))
            for a in dropped:
                del env[a]
        return torch.fx.graph.map_arg(output.args[0], env.__getitem__)

    return forward
