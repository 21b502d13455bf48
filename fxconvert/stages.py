"""`fxconvert.stages`: cut the pre-partitioning graph into pipeline stages at the family's block boundaries.

`split_stages(conversion, num_stages)` returns `Stages`, an nn.Module that runs the stage
GraphModules in order and equals `conversion.module`: same output, same gradients, and
in train mode the same dropout masks, because the stages execute the nodes of the
converted graph in the same order (dropout draws from the random stream in that order).

How nodes are assigned to stages:

- a node whose `meta["module_path"]` lies in a block belongs to that block. The family
  record says what a block is (`Family.blocks`: T5's `encoder.block.<i>` then
  `decoder.block.<i>`, GPT-2's `transformer.h.<i>`, ...), or the caller passes its own rule
  (`block_rule`, as torch's `split_module` takes a callback); blocks must appear in order;
- any other node (embeddings, masks, final norms, LM head, loss) joins a neighbouring
  block in node order: a node computed from block outputs joins the block before it
  (its producer), a node computed only from graph inputs the block after it (its
  consumer). Stage indices are then nondecreasing along the node list, which is checked;
- the blocks are grouped into `num_stages` contiguous runs that minimise the largest
  stage's cost (`fxconvert.balance`): by default its predicted forward + backward time at
  the sizes given (`balance="time"`), or its measured time (`"profile"`), or its parameter
  bytes (`"params"`, where a shared weight, which every stage that uses it receives, is not
  counted). `Stages.plan` holds each stage's predicted time, FLOPs, peak memory and bytes sent.

What crosses a boundary: a value one stage computes and a later one reads (hidden states,
the encoder output, the position bias that block 0 computes and later blocks reuse, a
causal mask) is returned by every stage from its producer to its last reader, so each
stage needs only its predecessor's outputs. A value computed from model inputs alone,
deterministically and without parameters (a padding mask, which is None for an unpadded
batch), is recomputed by the stage that reads it instead: it never crosses. Neither does a
size (an int or a tuple of ints, such as the output shape GPT-2 computes before its first
block and uses after its last): only tensors can be sent, so the stage that reads it
rebuilds it from constants and its model inputs' sizes (`_rebuilt_sizes`).

Every stage GraphModule keeps the converted graph's calling convention: its inputs are
the values received from the previous stage, then the model inputs it reads, then the
shared weights it uses, then `training` (present on every stage, default False). It
returns a tuple of the values it sends on, and the last stage returns the converted
graph's single output. `Stages.stage_module(i)` packages one stage, with its own copy of
the shared weights, for `torch.distributed.pipelining` (see `fxconvert.train`).

Writing the stages out (stage files, pipeline.json) is `fxconvert.pipeline`'s, a layer above
this one: the split knows nothing of files.
"""

import copy
import inspect
import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx

from fxconvert import balance as balancing
from fxconvert import families, manifest, optimizers
from fxconvert.inputs import SIZE_PROBES, build_inputs, config_sizes, meta_twins
from fxconvert.cost import Sizes, analyze
from fxconvert.convert import ConvertedGraph, ConvertedModule
from fxconvert.errors import FxConvertError, UsageError, describe_node
from fxconvert.graph_utils import is_impure, leaves_on_meta
from fxconvert.passes.lift_shared_weights_pass import sparse_embedding_gradients
from fxconvert.passes.lift_training_flag_pass import PLACEHOLDER as TRAINING

# A module path -> (stack, index, block path) of the block it lies in, or None (`Family.block_of`).
BlockRule = Callable[[str], "tuple[int, int, str] | None"]


class SplitError(UsageError):
    """The graph cannot be cut as asked (too many stages, no block boundaries, blocks out of order)."""


class MemoryPlanError(FxConvertError):
    """No split fits the memory target: a fact of the model and the sizes, not a wrong option."""


@dataclass
class StageSpec:
    """What one stage holds and exchanges, as plain data (values are named by their node names)."""

    index: int
    blocks: list[str]
    received: list[str]
    inputs: list[str]
    shared_weights: list[str]
    uses_training: bool
    sent: list[str]
    recomputed: list[str]
    # predicted forward + backward FLOPs and peak memory (bytes) under the schedule, at the sizes
    # the split was balanced for; None when it was balanced by parameters with no sizes given
    flops: int | None = None
    peak_bytes: int | None = None


class Stages(ConvertedModule):
    """The stages of a converted model, run in order; a drop-in for `conversion.module`.

    `graph_module` is a driver graph with the converted graph's placeholders that calls
    `stage_0` ... `stage_<N-1>`; the shared weights are Parameters of this module, held
    once. The stages share every other parameter with the conversion they were cut from.
    """

    def __init__(self, graph_module, shared, input_names, specs: list[StageSpec], *, model_class: str = "",
                 output_name: str = "", plan=None):
        super().__init__(graph_module, shared, input_names)
        self.specs = list(specs)
        self.model_class = model_class
        self.output_name = output_name
        self.plan = plan  # fxconvert.balance.Plan, or None

    @property
    def stages(self) -> list[torch.fx.GraphModule]:
        return [getattr(self.graph_module, f"stage_{spec.index}") for spec in self.specs]

    def stage_module(self, index: int) -> "StageModule":
        """Stage `index` as a standalone module for `torch.distributed.pipelining.PipelineStage`.

        It takes the values received from the previous stage positionally (stage 0: the
        model inputs it reads), the model inputs a later stage reads as keywords, and it
        owns deep copies of its parameters, including its own copy of each shared weight.
        Copies of a shared weight stay equal only if their gradients are summed over the
        stages that hold them before each optimizer step (see `fxconvert.train`).
        """
        spec = self.specs[index]
        shared = {name: torch.nn.Parameter(getattr(self, name).detach().clone()) for name in spec.shared_weights}
        module = StageModule(copy.deepcopy(self.stages[index]), shared, spec.received + spec.inputs, spec.sent)
        module.train(self.training)
        return module


class StageModule(ConvertedModule):
    """One stage on its own: a ConvertedModule whose inputs are the received values, then model inputs.

    It returns what the stage GraphModule returns, with the values sent on made
    contiguous: point-to-point communication sends and receives contiguous buffers.
    """

    def __init__(self, graph_module, shared, input_names, sent):
        super().__init__(graph_module, shared, input_names)
        self.sent = tuple(sent)

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        if not self.sent:
            return out
        for name, value in zip(self.sent, out):
            if not isinstance(value, torch.Tensor):
                raise SplitError(f"this stage sends '{name}', which is {type(value).__name__} for this input; "
                                 f"only tensors can cross a pipeline boundary")
        return tuple(v.contiguous() for v in out)


def split_stages(conversion: ConvertedGraph, num_stages: int, *, balance: str = "time", batch: int | None = None,
                 encoder_length: int | None = None, decoder_length: int | None = None, schedule: str = "1f1b",
                 microbatches: int | None = None, max_stage_bytes: int | None = None,
                 block_rule: BlockRule | None = None, optimizer: str = "adamw", recompute: str = "auto",
                 max_memory: int | None = None) -> Stages:
    """Cut `conversion.graph_module` into `num_stages` stages at block boundaries.

    `block_rule` maps a module path to its block (default: the family's, `Family.block_of`).
    `balance` ("time", "profile" or "params", see `fxconvert.balance`) says what the split
    evens out; `batch` (sequences per microbatch), `encoder_length` and `decoder_length`
    (defaults 8, 512, 128) are the sizes it is judged at. `schedule` ("1f1b" or "gpipe")
    and `microbatches` (default: at least 4, at least `num_stages`) decide how many
    microbatches' activations a stage holds; `optimizer` ("sgd", "adamw", "adafactor") whose
    state it keeps. No stage's predicted peak memory may exceed `max_memory` bytes
    (`max_stage_bytes` is its older name). `recompute` says which blocks recompute their
    activations in backward: "none", "full" (every block) or "auto": none without
    `max_memory`, else, per stage, the least recompute (by predicted seconds) that fits it within
    the target, and of the splits that fit, the fastest (smallest predicted bottleneck, recompute
    included), recomputing the least among equally fast ones (`_choose`). With
    balance="params" and none of the sizes nor a memory target, nothing is predicted
    (`Stages.plan` and each spec's `flops` / `peak_bytes` are None).
    """
    gm = conversion.graph_module
    if not isinstance(num_stages, int) or isinstance(num_stages, bool) or num_stages < 1:
        raise SplitError(f"the number of stages must be a positive integer, got {num_stages!r}")
    max_memory = _checked_options(balance=balance, schedule=schedule, microbatches=microbatches, optimizer=optimizer,
                                  recompute=recompute, max_memory=max_memory, max_stage_bytes=max_stage_bytes)
    blocks = stage_blocks(gm, num_stages, conversion.model_class, block_rule)
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    block_of = _block_of_nodes(nodes, block_rule or default_block_rule(conversion.model_class))
    unit = _attach_to_blocks(nodes, block_of, blocks)
    costs, params = [0] * len(blocks), [[] for _ in blocks]
    for node, param in _owned_parameters(gm, nodes):
        costs[unit[node]] += param.numel() * param.element_size()
        params[unit[node]].append(param)
    units, asked_microbatches = None, microbatches
    if (balance != "params" or max_memory is not None or recompute == "full"
            or any(v is not None for v in (batch, encoder_length, decoder_length))):
        sizes = _sizes(batch, encoder_length, decoder_length, max_length=_max_length(conversion))
        microbatches = microbatches or max(4, num_stages)
        units = _unit_costs(conversion, analyze(conversion, sizes=sizes), nodes, unit, costs, params=params,
                            optimizer=optimizer, blocks=blocks)
    options = None
    if units is None:
        group, measured = _balance(costs, num_stages), None  # the rule of earlier versions, kept exactly
    else:
        group, measured, options = _choose(
            conversion, units, costs, num_stages, balance=balance, schedule=schedule, microbatches=microbatches,
            max_memory=max_memory, recompute=recompute, optimizer=optimizer, asked_microbatches=asked_microbatches)
    stage_of = {node: group[u] for node, u in unit.items()}
    _check_monotone(nodes, stage_of)
    stages = _build(conversion, stage_of, [[b for b, g in zip(blocks, group) if g == s] for s in range(num_stages)])
    if units is not None:
        by_name = {n.name: n for n in nodes}
        sent = [sum(units.graph_cost.value_bytes(by_name[name]) for name in spec.sent) for spec in stages.specs]
        stages.plan = balancing.predict(units, group, balance=balance, schedule=schedule, microbatches=microbatches,
                                        sent_bytes=sent, seconds=measured, options=options, optimizer=optimizer,
                                        max_memory=max_memory)
        for spec, stage in zip(stages.specs, stages.plan.stages):
            spec.flops, spec.peak_bytes = stage.flops, stage.peak_bytes
    return stages


def _checked_options(*, balance, schedule, microbatches, optimizer, recompute, max_memory, max_stage_bytes):
    """The options refused in one line (`SplitError`); returns the memory target (`max_stage_bytes` its old name)."""
    try:
        balancing.check_options(balance=balance, schedule=schedule, microbatches=microbatches,
                                max_stage_bytes=max_stage_bytes, optimizer=optimizer, recompute=recompute)
        balancing.check_options(balance=balance, schedule=schedule, microbatches=None, max_stage_bytes=max_memory)
    except UsageError as e:
        raise SplitError(str(e).replace("max_stage_bytes must", "max_memory must", max_memory is not None)) from None
    if max_memory is not None and max_stage_bytes is not None and max_memory != max_stage_bytes:
        raise SplitError(f"max_memory={max_memory} and max_stage_bytes={max_stage_bytes} disagree; give max_memory "
                         f"alone")
    return max_memory if max_memory is not None else max_stage_bytes


def _sizes(batch, encoder_length, decoder_length, max_length: tuple[str, int] | None = None) -> Sizes:
    defaults = Sizes()
    if max_length is not None:  # absolute positions: the default lengths are capped, longer ones refused
        field_name, limit = max_length
        defaults = Sizes(defaults.batch, min(defaults.encoder_length, limit), min(defaults.decoder_length, limit))
        for name, value in (("encoder_length", encoder_length), ("decoder_length", decoder_length)):
            if isinstance(value, int) and not isinstance(value, bool) and value > limit:
                raise SplitError(f"{name} {value} is longer than the model's {field_name} ({limit}); "
                                 f"give a length of at most {limit}")
    try:
        return Sizes(defaults.batch if batch is None else batch,
                     defaults.encoder_length if encoder_length is None else encoder_length,
                     defaults.decoder_length if decoder_length is None else decoder_length)
    except UsageError as e:
        raise SplitError(str(e)) from None


def _max_length(conversion) -> tuple[str, int] | None:
    """(config field, value) bounding sequence lengths for families with absolute positions
    (`Family.max_positions`: RoBERTa's table less its padding offset)."""
    family = families.family_of_class(conversion.model_class)
    config = getattr(conversion.model, "config", None)
    bound = family.max_positions(config) if family is not None and config is not None else None
    return bound if bound is not None and bound[1] > 0 else None


def _choose(conversion, units, param_costs, num_stages, *, balance, schedule, microbatches, max_memory, recompute,
            optimizer, asked_microbatches):
    """(group of each unit, measured seconds per unit or None, each stage's `RecomputeOption` or None).

    Without a memory target and without full recompute: the best balance (today's rule). Otherwise, per
    run of units and stage, the first recompute option (`UnitCosts.stage_options`) that fits; then the
    best balance of the stages' times with that recompute, and the least total recompute seconds among
    the splits that reach it (`balance.balanced_then_least`).
    """
    measured = None
    if balance == "profile":
        try:
            balancing.check_profilable(conversion)
            per_unit = split_stages(conversion, len(units), balance="params")
            measured = balancing.profile_units(conversion, per_unit, units.graph_cost.sizes)
        except UsageError as e:
            raise SplitError(str(e)) from None
    predicted = [f + b for f, b in zip(units.forward, units.backward)]
    per_unit = {"params": param_costs, "profile": measured, "time": predicted}[balance]
    sums = _range_sums(per_unit)
    if max_memory is None and recompute != "full":
        return balancing.best_groups(len(units), num_stages, sums), measured, None
    mode = recompute if max_memory is not None else "full"
    # recompute seconds in the units of the balance: measured time scales the prediction, parameter bytes ignore it
    scale = [0.0 if balance == "params" else (m / p if p else 0.0) for m, p in zip(per_unit, predicted)]
    picks = {}

    def pick(j, i, k):
        key = (j, i, balancing.in_flight(schedule, k, num_stages, microbatches))
        if key not in picks:
            picks[key] = next((o for o in units.stage_options(j, i, mode) if max_memory is None or
                               units.peak_bytes(j, i, k, num_stages, schedule, microbatches, o) <= max_memory), None)
        return picks[key]

    def recompute_seconds(j, i, k):
        option = pick(j, i, k)
        return option.seconds if option is not None else None

    def stage_time(j, i, k):
        option = pick(j, i, k)
        return sums(j, i) + sum(units.block_forward[u] * scale[u] for u in option.units)

    group = balancing.balanced_then_least(len(units), num_stages, recompute_seconds, stage_time)
    if group is None:
        raise _nothing_fits(conversion, units, num_stages, schedule=schedule, microbatches=microbatches,
                            asked_microbatches=asked_microbatches, max_memory=max_memory, recompute=recompute,
                            optimizer=optimizer)
    return group, measured, [pick(j, i, k) for k, (j, i) in enumerate(balancing.ranges_of(group))]


def _nothing_fits(conversion, units, num_stages, *, schedule, microbatches, asked_microbatches, max_memory,
                  recompute, optimizer) -> "MemoryPlanError":
    """The one line when no split fits: the least memory that fits with full recompute, and a stage count that
    fits the memory given."""
    least = _least_memory(units, num_stages, schedule, microbatches)
    stages = next((n for n in range(num_stages + 1, len(units) + 1)
                   if _least_memory(units, n, schedule, asked_microbatches or max(4, n)) <= max_memory), None)
    other = (f"or split into {stages} stages" if stages is not None
             else f"no split into up to {len(units)} stages (one block each) fits {_size(max_memory)}")
    return MemoryPlanError(
        f"no split into {num_stages} stages keeps every stage's predicted peak memory within "
        f"max_memory={max_memory:,} bytes ({_size(max_memory)}) at {_sizes_text(units.graph_cost.sizes, conversion.model_class)}, "
        f"{schedule}, {microbatches} microbatches, {optimizer}, recompute {recompute}; raise it to at least "
        f"{least:,} bytes ({_size(least)}) with full recompute, {other}"
    )


def _least_memory(units, num_stages, schedule, microbatches, recompute="full") -> int:
    """The smallest largest predicted peak over the splits into `num_stages`, every block recomputed (or none)."""
    def peak(j, i, k):
        option = units.stage_options(j, i, recompute)[-1]
        return units.peak_bytes(j, i, k, num_stages, schedule, microbatches, option)
    return balancing.grouping(len(units), num_stages, peak, max)[0]


def _size(n: int) -> str:
    """Bytes as a person reads them, rounded up (a memory to give must not fall short): 11.1 GiB."""
    for unit, power in (("GiB", 3), ("MiB", 2), ("KiB", 1)):
        if n >= 1024 ** power:
            return f"{math.ceil(n / 1024 ** power * 10) / 10:.1f} {unit}"
    return f"{n} B"


def _range_sums(values):
    prefix = [0]
    for v in values:
        prefix.append(prefix[-1] + v)
    return lambda j, i: prefix[i] - prefix[j]


def _sizes_text(sizes: Sizes, model_class: str) -> str:
    lengths = families.sequence_lengths(model_class)
    return ", ".join([f"batch {sizes.batch}"] + [f"{name.removesuffix('_length')} {sizes.length(seq)}"
                                                 for seq, name in lengths.items()]) + " tokens"


def _unit_costs(conversion, graph_cost, nodes, unit, owned_costs, *, params=None, optimizer="adamw", blocks=None) -> "balancing.UnitCosts":
    count = len(owned_costs)
    nodes_of = [[] for _ in range(count)]
    for node in nodes:
        nodes_of[unit[node]].append(node)
    shared_names = set(conversion.module.shared_names)
    shared = [{a.target for n in members for a in n.all_input_nodes
               if a.op == "placeholder" and a.target in shared_names} for members in nodes_of]
    shared_bytes = {name: getattr(conversion.module, name).numel() * getattr(conversion.module, name).element_size()
                    for name in shared_names}
    # bytes crossing each possible cut (after unit u): values made up to u and read after it, unless recomputed
    gm = conversion.graph_module
    model_inputs = {p for p in gm.graph.find_nodes(op="placeholder") if p.target not in shared_names
                    and p.target != TRAINING}
    recomputable = _recomputable(gm, model_inputs)
    cut_bytes = [0] * max(count - 1, 0)
    for node in nodes:
        if node in recomputable:
            continue
        last = max((count - 1 if u.op == "output" else unit[u] for u in node.users), default=unit[node])
        for u in range(unit[node], last):
            cut_bytes[u] += graph_cost.value_bytes(node)
    state = optimizers.get(optimizer)
    return balancing.UnitCosts(graph_cost, nodes_of, list(owned_costs), shared, shared_bytes, cut_bytes,
                               optimizer_owned=[state.bytes_for(p) for p in params] if params is not None else None,
                               optimizer_shared={n: state.bytes_for([getattr(conversion.module, n)])
                                                 for n in shared_names},
                               names=blocks)  # a recomputed unit is the whole unit, as the trainer wraps it


def default_block_rule(model_class: str) -> BlockRule:
    """The block rule of the family that `model_class` belongs to (one that finds no blocks for no family)."""
    family = families.family_of_class(model_class)
    return family.block_of if family is not None else (lambda path: None)


def stage_blocks(gm: torch.fx.GraphModule, num_stages: int, model_class: str = "",
                 block_rule: BlockRule | None = None) -> list[str]:
    """The graph's blocks in order, once `num_stages` is known to fit them (a stage holds at least one).

    The traced graph has the same blocks as the converted one, so a command line can refuse
    too many stages before the passes and validation run.
    """
    if not isinstance(num_stages, int) or isinstance(num_stages, bool) or num_stages < 1:
        raise SplitError(f"the number of stages must be a positive integer, got {num_stages!r}")
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    rule = block_rule or default_block_rule(model_class)
    keys = {block: key for block, key in _block_of_nodes(nodes, rule).values()}
    blocks = sorted(keys, key=keys.__getitem__)
    if not blocks:
        family = families.family_of_class(model_class)
        where = (" or ".join(f"'{p}'" for p in family.blocks) if family is not None and block_rule is None
                 else "a block of the block rule")
        raise SplitError(
            f"{model_class or 'this graph'} has no block boundaries (no node's module path matches "
            f"{where}); it cannot be split into stages"
        )
    if num_stages > len(blocks):
        raise SplitError(
            f"cannot split into {num_stages} stages: the graph has {len(blocks)} blocks "
            f"({blocks[0]} ... {blocks[-1]}) and a stage holds at least one; ask for at most {len(blocks)}"
        )
    return blocks


# -- assignment ----------------------------------------------------------------------------


def _block_of_nodes(nodes, rule: BlockRule) -> dict[torch.fx.Node, tuple[str, tuple[int, int]]]:
    """node -> (block path, (stack, index)) for every node that lies in a block."""
    out = {}
    for node in nodes:
        found = rule(node.meta.get("module_path") or "")
        if found:
            stack, index, block = found
            out[node] = (block, (stack, index))
    return out


def _attach_to_blocks(nodes, block_of, blocks) -> dict[torch.fx.Node, int]:
    """Unit (block index) of every node; non-block nodes join a neighbour in node order.

    Between two consecutive block nodes, the nodes computed from block outputs up to the
    last such node join the block before; the rest join the block after.
    """
    index_of = {block: i for i, block in enumerate(blocks)}
    derived = set()
    for node in nodes:
        if node in block_of or any(a in derived for a in node.all_input_nodes):
            derived.add(node)
    unit, pending, previous = {}, [], None
    for node in nodes + [None]:
        if node is not None and node not in block_of:
            pending.append(node)
            continue
        current = None if node is None else index_of[block_of[node][0]]
        if previous is not None and current is not None and current < previous:
            raise SplitError(
                f"block nodes are out of order: {describe_node(node)} comes after a node of a later block; "
                f"stages must run the graph in order"
            )
        # before the first block everything joins the next block, after the last one the previous block
        last_derived = max((i for i, n in enumerate(pending) if n in derived), default=-1)
        for i, n in enumerate(pending):
            unit[n] = previous if current is None or (previous is not None and i <= last_derived) else current
        pending = []
        if node is not None:
            unit[node] = previous = current
    return unit


def _owned_parameters(gm, nodes):
    """(node, parameter) for every parameter the nodes reach, each parameter once."""
    seen = set()
    for node in nodes:
        if node.op == "call_module":
            params = list(gm.get_submodule(node.target).parameters())
        elif node.op == "get_attr":
            value = operator.attrgetter(node.target)(gm)
            params = [value] if isinstance(value, torch.nn.Parameter) else []
        else:
            continue
        for p in params:
            if id(p) not in seen:
                seen.add(id(p))
                yield node, p


def _balance(costs: list[int], parts: int) -> list[int]:
    """Group of each item: `parts` contiguous nonempty groups minimising the largest sum."""
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    return balancing.best_groups(len(costs), parts, lambda j, i: prefix[i] - prefix[j])


def _check_monotone(nodes, stage_of) -> None:
    for before, node in zip(nodes, nodes[1:]):
        if stage_of[node] < stage_of[before]:
            raise SplitError(
                f"stage indices decrease along the graph at {describe_node(node)} (stage {stage_of[node]} after "
                f"{stage_of[before]}); the stages would not run the graph in order"
            )


# -- building --------------------------------------------------------------------------------

_RANDOM = re.compile(r"rand|dropout|bernoulli|multinomial|normal|uniform|exponential|geometric|cauchy|poisson")


def _recomputable(gm, model_inputs) -> set:
    """Nodes computed from model inputs alone, deterministically, with no parameter and no mutation.

    Such a value (a padding mask, say; it may even be None for some batches) is recomputed
    in each later stage that reads it rather than sent: only activations cross a boundary.
    """
    out = set()
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method") or is_impure(node):
            continue
        if _RANDOM.search(getattr(node.target, "__name__", str(node.target))):
            continue
        if any(is_impure(u) and u.op != "output" for u in node.users):
            continue
        if all(a in out or a in model_inputs for a in node.all_input_nodes):
            out.add(node)
    return out


def _build(conversion: ConvertedGraph, stage_of, blocks_per_stage) -> Stages:
    gm = conversion.graph_module
    num_stages = len(blocks_per_stage)
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    placeholders = [n for n in nodes if n.op == "placeholder"]
    output = nodes[-1]
    shared_names = set(conversion.module.shared_names)
    training = next(p for p in placeholders if p.target == TRAINING)
    model_inputs = {p for p in placeholders if p.target not in shared_names and p is not training}
    recomputable = _recomputable(gm, model_inputs)

    def stage(n):
        return num_stages - 1 if n.op == "output" else stage_of[n]

    crossing = [n for n in nodes if n.op not in ("placeholder", "output") and n not in recomputable
                and any(stage(u) != stage(n) for u in n.users)]
    rebuilt = _rebuilt_sizes(conversion, crossing, model_inputs)

    # sent[s]: values produced in stages <= s and read in a stage > s, in node order;
    # recomputed[s]: values of earlier stages that stage s recomputes (with what they are computed from)
    sent = [set() for _ in range(num_stages)]
    recomputed = [set() for _ in range(num_stages)]
    rebuilds = [set() for _ in range(num_stages)]  # sizes a stage rebuilds (see _rebuilt_sizes)
    for node in nodes:
        if node.op in ("placeholder", "output"):
            continue
        for user in node.users:
            if stage(user) == stage(node):
                continue
            if node in recomputable:
                recomputed[stage(user)] |= _ancestors(node, recomputable)
            elif node in rebuilt:
                rebuilds[stage(user)].add(node)
            else:
                for s in range(stage(node), stage(user)):
                    sent[s].add(node)
    sent = [sorted(v, key=order.get) for v in sent]

    specs, modules = [], {}
    for s in range(num_stages):
        body = sorted(recomputed[s], key=order.get) + [n for n in nodes if stage_of.get(n) == s]
        reads = {a for n in body + ([output] if s == num_stages - 1 else []) for a in n.all_input_nodes}
        reads |= {item[0] for n in rebuilds[s] for item in rebuilt[n][1] if isinstance(item, tuple)}
        received = sent[s - 1] if s else []
        inputs = [p for p in placeholders if p in reads and p in model_inputs]
        shared = [p for p in placeholders if p in reads and p.target in shared_names]
        graph, env = torch.fx.Graph(), {}
        for node in received + inputs + shared + [training]:
            env[node] = graph.placeholder(node.name if node in received else node.target,
                                          type_expr=node.type, default_value=_default(node))
            env[node].meta = dict(node.meta)
        for node in sorted(rebuilds[s], key=order.get):
            env[node] = _rebuild_size(graph, rebuilt[node], env)
        for node in body:
            env[node] = graph.node_copy(node, lambda a: env[a])
        if s == num_stages - 1:
            graph.output(torch.fx.map_arg(output.args[0], lambda a: env[a]))
        else:
            graph.output(tuple(env[n] for n in sent[s]))
        # A stage whose only use of a shared weight is a lookup gets a dense lookup back, so
        # the weight's gradient there is dense too (see LiftSharedWeightsPass).
        sparse_embedding_gradients(graph, {p.target for p in shared})
        graph.lint()
        modules[f"stage_{s}"] = torch.fx.GraphModule(gm, graph, class_name=f"Stage{s}")
        specs.append(StageSpec(
            index=s,
            blocks=blocks_per_stage[s],
            received=[n.name for n in received],
            inputs=[p.target for p in inputs],
            shared_weights=[p.target for p in shared],
            uses_training=training in reads,
            sent=[n.name for n in sent[s]] if s < num_stages - 1 else [],
            recomputed=[n.name for n in sorted(recomputed[s], key=order.get)],
        ))
    driver = _driver(placeholders, specs, modules)
    shared_params = {name: getattr(conversion.module, name) for name in conversion.module.shared_names}
    stages = Stages(driver, shared_params, conversion.input_names, specs, model_class=conversion.model_class,
                    output_name=conversion.output_name)
    stages.train(conversion.module.training)
    return stages


_SIZE_TYPES = (int, tuple, list, torch.Size)


def _rebuilt_sizes(conversion: ConvertedGraph, crossing, model_inputs) -> dict:
    """Sizes among `crossing` (ints, tuples of ints) that a later stage can rebuild, rather than receive.

    GPT-2 computes its output shape, `(-1,) + input_ids.size()[1:] + (hidden.size(-1),)`, before
    the first block and uses it after the last. A size is no tensor and cannot be sent; it is
    evaluated at two input sizes (meta tensors), and each item that stays the same is a constant
    and each that changes is the size of a model input's dimension that changes the same way,
    which the stage that needs it reads. Returns node -> (kind, items), kind the value's type and
    each item an int or (model input placeholder, dim); a size that cannot be rebuilt is left out
    (it is sent, and refused as no tensor).
    """
    candidates = [n for n in crossing if isinstance(n.meta.get("val"), _SIZE_TYPES)
                  and not isinstance(n.meta.get("val"), bool)]
    if not candidates:
        return {}
    runs = [_meta_values(conversion, sizes, {n.name for n in candidates} | {p.name for p in model_inputs})
            for sizes in SIZE_PROBES]
    inputs = sorted(model_inputs, key=lambda p: list(conversion.graph_module.graph.nodes).index(p))
    out = {}
    for node in candidates:
        first, second = (run.get(node.name) for run in runs)
        scalar = isinstance(first, int)
        a, b = ((first,), (second,)) if scalar else (first, second)
        if not (isinstance(a, _SIZE_TYPES) and isinstance(b, _SIZE_TYPES) and len(a) == len(b)
                and all(type(x) is int and type(y) is int for x, y in zip(a, b))):
            continue
        items = []
        for x, y in zip(a, b):
            if x == y:
                items.append(x)
                continue
            source = next(((p, d) for p in inputs for d, (u, v) in enumerate(zip(runs[0][p.name].shape,
                                                                                  runs[1][p.name].shape))
                           if (u, v) == (x, y)), None)
            if source is None:
                break
            items.append(source)
        else:
            out[node] = ("int" if scalar else "tuple", items)
    return out


def _meta_values(conversion: ConvertedGraph, sizes: dict, names: set) -> dict:
    """The values of the nodes `names` when the converted graph runs on meta inputs of `sizes`."""
    gm = conversion.graph_module
    family = families.family_of_class(conversion.model_class)
    config = getattr(conversion.model, "config", None)
    hidden = config_sizes(config, family)["hidden"] if config is not None else None
    dtype = next((p.dtype for p in conversion.module.parameters() if p.is_floating_point()), torch.float32)
    inputs = build_inputs(family.inputs, conversion.input_names, batch=sizes["batch"],
                          lengths={k: v for k, v in sizes.items() if k != "batch"}, hidden=hidden, dtype=dtype,
                          meta=True)
    meta_gm = copy.deepcopy(gm, meta_twins([*gm.parameters(), *gm.buffers()]))
    leaves_on_meta(meta_gm, conversion.leaves)
    shared = [torch.empty_like(getattr(conversion.module, n), device="meta") for n in conversion.module.shared_names]
    interpreter = torch.fx.Interpreter(meta_gm, garbage_collect_values=False)
    with torch.no_grad():
        interpreter.run(*(inputs[n] for n in conversion.input_names), *shared, False)
    return {n.name: v for n, v in interpreter.env.items() if n.name in names}


def _rebuild_size(graph: torch.fx.Graph, rebuilt, env):
    """The size `rebuilt` (see `_rebuilt_sizes`) in a stage graph, from its constants and model inputs' sizes."""
    kind, items = rebuilt
    values = [graph.call_method("size", (env[item[0]], item[1])) if isinstance(item, tuple) else item
              for item in items]
    return values[0] if kind == "int" else tuple(values)


def _ancestors(node, within: set) -> set:
    out, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n not in out:
            out.add(n)
            todo.extend(a for a in n.all_input_nodes if a in within)
    return out


def _default(node):
    return node.args[0] if node.op == "placeholder" and node.args else inspect.Signature.empty


def _driver(placeholders, specs, modules) -> torch.fx.GraphModule:
    """The converted graph's signature, calling the stages in order."""
    graph = torch.fx.Graph()
    env = {}
    for p in placeholders:
        env[p.target] = graph.placeholder(p.target, type_expr=p.type, default_value=_default(p))
    for spec in specs:
        args = [env[name] for name in spec.received + spec.inputs + spec.shared_weights + [TRAINING]]
        result = graph.call_module(f"stage_{spec.index}", tuple(args))
        for i, name in enumerate(spec.sent):
            env[name] = graph.create_node("call_function", operator.getitem, (result, i),
                                          name=f"stage{spec.index}_{name}")
    graph.output(result)
    graph.lint()
    return torch.fx.GraphModule(modules, graph, class_name="StagesDriver")


# -- report --------------------------------------------------------------------------------


def stage_table(stages: Stages) -> list[dict]:
    """One row per stage, as plain data: blocks, parameters, what it receives and sends.

    Sizes are those of the traced example shapes (batch 2, encoder 7, decoder 5 tokens).
    Parameters are those the stage owns; shared weights are listed apart, since every
    stage that uses one receives it.
    """
    rows = []
    plan = stages.plan
    for spec, gm in zip(stages.specs, stages.stages):
        params = list(gm.parameters())
        out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
        sent = [_value_row(n) for n in out.args[0]] if spec.sent else []
        predicted = plan.stages[spec.index] if plan is not None else None
        rows.append({
            "stage": spec.index,
            "blocks": list(spec.blocks),
            "parameters": sum(p.numel() for p in params),
            "parameter_bytes": sum(p.numel() * p.element_size() for p in params),
            "inputs": list(spec.inputs),
            "receives_shared_weight": bool(spec.shared_weights),
            "shared_weights": list(spec.shared_weights),
            "uses_training": spec.uses_training,
            "received": list(spec.received),
            "sent": sent,
            "sent_bytes": sum(v["bytes"] or 0 for v in sent),
            "recomputed": list(spec.recomputed),
            # predictions at the sizes the split was balanced for (None without them), per microbatch
            "flops": spec.flops,
            "flops_share": plan.flop_shares[spec.index] if plan is not None else None,
            "seconds": predicted.seconds if predicted is not None else None,
            "time_share": plan.shares[spec.index] if plan is not None else None,
            "activation_bytes": predicted.activation_bytes if predicted is not None else None,
            # the memory plan: parameters (with a copy of each shared weight), gradients, optimizer state,
            # the largest recomputed block's activations, and the blocks recomputed
            "stage_parameter_bytes": predicted.parameter_bytes if predicted is not None else None,
            "gradient_bytes": predicted.gradient_bytes if predicted is not None else None,
            "optimizer_bytes": predicted.optimizer_bytes if predicted is not None else None,
            "recomputed_bytes": predicted.recomputed_bytes if predicted is not None else None,
            "recompute": list(predicted.recompute) if predicted is not None else [],
            "recompute_seconds": predicted.recompute_seconds if predicted is not None else None,
            "in_flight": predicted.in_flight if predicted is not None else None,
            "peak_bytes": spec.peak_bytes,
            "sent_bytes_per_microbatch": predicted.sent_bytes if predicted is not None else None,
            "bottleneck": plan.bottleneck == spec.index if plan is not None else None,
        })
    return rows


def stage_plan(stages: Stages) -> dict | None:
    """How the split was chosen and its predicted pipeline behaviour, as plain data (None without predictions).

    `seconds` are predicted forward + backward seconds per microbatch (measured ones with
    balance="profile"); `step_seconds` is one step of `microbatches` under the schedule.
    The sequence lengths carry the family's names (`Family.sequence_lengths`).
    """
    plan = split_plan(stages)
    return plan.to_json() if plan is not None else None


def split_plan(stages: Stages) -> manifest.Plan | None:
    """`stage_plan` as pipeline.json's record (`fxconvert.manifest.Plan`)."""
    plan = stages.plan
    if plan is None:
        return None
    return manifest.Plan(
        balance=plan.balance, batch=plan.sizes.batch,
        lengths={name: plan.sizes.length(seq) for seq, name in families.sequence_lengths(stages.model_class).items()},
        schedule=plan.schedule, microbatches=plan.microbatches, bottleneck=plan.bottleneck,
        bubble_fraction=plan.bubble_fraction, step_seconds=plan.step_seconds,
        seconds=tuple(s.seconds for s in plan.stages), time_share=tuple(plan.shares),
        flops=tuple(s.flops for s in plan.stages), peak_bytes=tuple(s.peak_bytes for s in plan.stages),
        optimizer=plan.optimizer, max_memory=plan.max_memory, recompute=plan.recompute,
    )


def _value_row(node: torch.fx.Node) -> dict:
    val = node.meta.get("val")
    tensor = isinstance(val, torch.Tensor)
    return {
        "name": node.name,
        "module_path": node.meta.get("module_path"),
        "shape": list(val.shape) if tensor else None,
        "dtype": str(val.dtype).removeprefix("torch.") if tensor else type(val).__name__,
        "bytes": val.numel() * val.element_size() if tensor else None,
    }


__all__ = ["split_stages", "Stages", "StageModule", "StageSpec", "SplitError", "MemoryPlanError", "stage_table", "stage_plan",
           "split_plan"]
