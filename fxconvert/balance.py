"""`fxconvert.balance`: choose where to cut, by what the stages cost, and predict each stage's cost.

A pipeline runs only as fast as its slowest stage, so the split minimises the largest
stage's time over every contiguous grouping of the blocks (dynamic programming, exact),
skipping groupings in which a stage's predicted peak memory exceeds a cap. A stage's time
comes from one of:

- `"time"`: the predicted forward + backward seconds of its nodes (`fxconvert.cost`, at
  the sizes given: FLOPs and bytes moved, per op);
- `"profile"`: each block's forward + backward measured on real tensors at those sizes,
  on this machine (`measure_stage_seconds` on a one-block-per-stage split);
- `"params"`: its parameter bytes (the rule of earlier versions; `stages._balance`).

Memory of a stage (bytes, `peak_memory`): its parameters, their gradients (as many bytes) and
the optimizer's state (`fxconvert.optimizers`, torch's own rules per weight), counting each
shared weight on every stage that holds a copy; plus the activations it saves for backward
per microbatch, times the microbatches in flight on it; plus, when blocks are recomputed, the
activations of the largest of them, rebuilt one block at a time during backward. GPipe runs
every microbatch's forward before any backward, so M are in flight on every stage; 1F1B
starts backward as early as it can, so stage s (of S) holds min(M, S - s).

Recompute (activation checkpointing of a block): a recomputed block saves only the tensors it
takes from outside itself (the checkpoint keeps its inputs), and runs its forward a second
time in backward. `stage_options` lists, per run of units, the recompute sets to try: none,
every block, or (auto) blocks added greedily by bytes saved per second of recompute.

Pipeline timing (`Plan.bubble_fraction`): with stage times t_s per microbatch, M
microbatches in a pipeline of S stages take sum(t) + (M - 1) * max(t) (both schedules);
the bubble is the idle share of the S stages over that time.
"""

import operator
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree

from fxconvert.cost import GraphCost, Sizes
from fxconvert.errors import UsageError
from fxconvert import families, optimizers
from fxconvert.inputs import build_inputs

BALANCES = ("time", "params", "profile")
SCHEDULES = ("1f1b", "gpipe")
RECOMPUTES = ("none", "full", "auto")


def peak_memory(*, parameter_bytes: int, optimizer_bytes: int, activation_bytes: int, in_flight: int,
                recomputed_bytes: int = 0) -> int:
    """A stage's predicted peak: parameters and their gradients (as many bytes), the optimizer's state, the
    activations saved by each microbatch in flight, and one recomputed block's activations at a time."""
    return 2 * parameter_bytes + optimizer_bytes + in_flight * activation_bytes + recomputed_bytes


@dataclass
class StagePrediction:
    """One stage's predicted cost per microbatch (seconds measured instead under balance="profile")."""

    index: int
    forward_seconds: float
    backward_seconds: float
    flops: int  # forward + backward
    parameter_bytes: int  # what it owns, plus a copy of each shared weight it uses
    activation_bytes: int  # saved for backward by one microbatch, under its recompute
    in_flight: int  # microbatches whose activations it holds at once under the schedule
    peak_bytes: int  # `peak_memory` of the terms here
    sent_bytes: int  # what it sends to the next stage per microbatch
    gradient_bytes: int = 0  # as many as parameter_bytes
    optimizer_bytes: int = 0  # the optimizer's state for its parameters
    recomputed_bytes: int = 0  # the largest recomputed block's activations, rebuilt in backward
    recompute: tuple[str, ...] = ()  # the blocks it recomputes
    recompute_seconds: float = 0.0  # their forward, run again in backward

    @property
    def seconds(self) -> float:
        return self.forward_seconds + self.backward_seconds + self.recompute_seconds


@dataclass
class Plan:
    """How a split was chosen and what it is predicted to cost."""

    balance: str
    sizes: Sizes
    schedule: str
    microbatches: int
    stages: list[StagePrediction] = field(default_factory=list)
    optimizer: str = "adamw"  # whose state the peaks count
    max_memory: int | None = None  # the per-stage memory target the split was chosen under (bytes)

    @property
    def recompute(self) -> tuple[str, ...]:
        """The blocks recomputed, over all stages, in order."""
        return tuple(b for s in self.stages for b in s.recompute)

    @property
    def shares(self) -> list[float]:
        """Each stage's share of the total forward + backward time."""
        total = sum(s.seconds for s in self.stages) or 1.0
        return [s.seconds / total for s in self.stages]

    @property
    def flop_shares(self) -> list[float]:
        total = sum(s.flops for s in self.stages) or 1
        return [s.flops / total for s in self.stages]

    @property
    def bottleneck(self) -> int:
        return max(range(len(self.stages)), key=lambda i: self.stages[i].seconds)

    @property
    def step_seconds(self) -> float:
        times = [s.seconds for s in self.stages]
        return sum(times) + (self.microbatches - 1) * max(times)

    @property
    def bubble_fraction(self) -> float:
        """Idle share of the stages over one step (fill, drain and waiting on the bottleneck)."""
        busy = self.microbatches * sum(s.seconds for s in self.stages)
        return 1.0 - busy / (len(self.stages) * self.step_seconds) if self.step_seconds else 0.0


def in_flight(schedule: str, stage: int, num_stages: int, microbatches: int) -> int:
    """Microbatches whose saved activations stage `stage` holds at once (see the module docstring)."""
    return microbatches if schedule == "gpipe" else min(microbatches, num_stages - stage)


def check_options(*, balance, schedule, microbatches, max_stage_bytes, optimizer="adamw", recompute="none") -> None:
    if balance not in BALANCES:
        raise UsageError(f"unknown balance {balance!r}; use one of {', '.join(BALANCES)}")
    if schedule not in SCHEDULES:
        raise UsageError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
    if recompute not in RECOMPUTES:
        raise UsageError(f"unknown recompute {recompute!r}; use one of {', '.join(RECOMPUTES)}")
    if not isinstance(optimizer, str):
        raise UsageError(f"optimizer must be a name, one of {', '.join(optimizers.NAMES)}; got {optimizer!r}")
    optimizers.get(optimizer)
    for name, value in (("microbatches", microbatches), ("max_stage_bytes", max_stage_bytes)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise UsageError(f"{name} must be a positive integer, got {value!r}")


# -- per-unit costs ------------------------------------------------------------------------------


class UnitCosts:
    """Costs of the units (blocks with their attached nodes) that stages are made of.

    `nodes_of[u]`: the graph nodes of unit u; `seconds[u]`, `flops[u]`: forward + backward;
    `owned[u]`: bytes of the parameters it owns; `shared[u]`: the shared weights it reads;
    `cut_bytes[u]`: bytes sent across the cut after unit u; `optimizer_owned[u]` and
    `optimizer_shared[name]`: the optimizer's state bytes for them; `names[u]`: its block;
    `block_nodes`: the nodes a recomputed unit reruns (default: all of its nodes, as the trainer's
    `fxconvert.training.recompute` wraps a block with the nodes attached to it: a stage's
    embedding with its first block, its final norm, head and loss with its last).
    Activations of a run of units are the union of their saved storages (`GraphCost.saved_bytes`).
    """

    def __init__(self, graph_cost: GraphCost, nodes_of, owned, shared, shared_bytes, cut_bytes, *,
                 optimizer_owned=None, optimizer_shared=None, names=None, block_nodes=None):
        self.graph_cost = graph_cost
        self.cut_bytes = cut_bytes  # per microbatch, crossing the cut after unit u
        self.nodes_of = nodes_of
        self.owned = owned
        self.shared = shared
        self.shared_bytes = shared_bytes
        self.optimizer_owned = optimizer_owned or [0] * len(nodes_of)
        self.optimizer_shared = optimizer_shared or {}
        self.names = names or [str(u) for u in range(len(nodes_of))]
        costs = graph_cost.nodes
        self.forward = [sum(costs[n].forward_seconds for n in nodes) for nodes in nodes_of]
        self.backward = [sum(costs[n].backward_seconds for n in nodes) for nodes in nodes_of]
        self.flops = [sum(costs[n].flops for n in nodes) for nodes in nodes_of]
        self._activations = {}
        self._options = {}
        inside = set(block_nodes) if block_nodes is not None else {n for nodes in nodes_of for n in nodes}
        self._kept, self._block, self._inputs = [], [], []  # storages: always saved, saved by the block, its inputs
        for nodes in nodes_of:
            block = [n for n in nodes if n in inside]
            self._kept.append(_storages(costs[n].saved for n in nodes if n not in inside))
            self._block.append(_storages(costs[n].saved for n in block))
            self._inputs.append(_input_storages(graph_cost, block))
        self.block_forward = [sum(costs[n].forward_seconds for n in nodes if n in inside) for nodes in nodes_of]

    def __len__(self):
        return len(self.nodes_of)

    def activations(self, j: int, i: int) -> int:
        """Bytes saved for backward by units j .. i-1 together (each storage once)."""
        if (j, i) not in self._activations:
            self._activations[(j, i)] = self.graph_cost.saved_bytes(n for u in range(j, i) for n in self.nodes_of[u])
        return self._activations[(j, i)]

    def parameter_bytes(self, j: int, i: int) -> int:
        names = set().union(*self.shared[j:i])
        return sum(self.owned[j:i]) + sum(self.shared_bytes[n] for n in names)

    def optimizer_bytes(self, j: int, i: int) -> int:
        names = set().union(*self.shared[j:i])
        return sum(self.optimizer_owned[j:i]) + sum(self.optimizer_shared.get(n, 0) for n in names)

    def peak_bytes(self, j: int, i: int, stage: int, num_stages: int, schedule: str, microbatches: int,
                   option: "RecomputeOption | None" = None) -> int:
        """`peak_memory` of units j .. i-1 as stage `stage`, with what a pipelined step holds beside it.

        - Backward's working set (`GraphCost.backward_bytes`): the gradients arriving and created
          beside the activations still saved. In the step's first backward, with `in_flight`
          microbatches held, the weights' gradients are not all allocated yet; in a later one they
          are, with as many microbatches held (1F1B's steady state) or one fewer (GPipe, or M at most
          the in-flight count). The peak is the larger of the two.
        - The receive buffers torch's stage keeps for every microbatch: the values received and their
          gradients (sent back, kept until the next step), and the gradients received for what it sends.
        """
        option = option or self.stage_options(j, i, "none")[0]
        work = self.__dict__.setdefault("_backward", {})
        if (j, i) not in work:
            work[j, i] = self.graph_cost.backward_bytes(n for u in range(j, i) for n in self.nodes_of[u])
        saved = self.activations(j, i)
        first, later = (w - saved for w in work[j, i])  # beyond one microbatch's saved activations
        flight = in_flight(schedule, stage, num_stages, microbatches)
        terms = dict(parameter_bytes=self.parameter_bytes(j, i), optimizer_bytes=self.optimizer_bytes(j, i),
                     activation_bytes=option.activation_bytes, recomputed_bytes=option.recomputed_bytes)
        received = self.cut_bytes[j - 1] if j > 0 else 0
        sent = self.cut_bytes[i - 1] if i < len(self) else 0
        return max(peak_memory(**terms, in_flight=flight) - terms["parameter_bytes"] + first,
                   peak_memory(**terms, in_flight=flight if microbatches > flight else microbatches - 1) + later) \
            + microbatches * (2 * received + sent)

    def stage_options(self, j: int, i: int, mode: str) -> list["RecomputeOption"]:
        """The recompute sets tried for units j .. i-1, fewest first: "none" the empty set, "full" every
        block, "auto" the empty set then blocks added one by one, most bytes saved per second first."""
        key = (j, i, mode)
        if key not in self._options:
            units = range(j, i)
            if mode == "auto":
                order = sorted((u for u in units if self._gain(u) > 0),
                               key=lambda u: -self._gain(u) / max(self.block_forward[u], 1e-12))
            else:
                order = list(units) if mode == "full" else []
            options = self._prefixes(units, order)
            if mode == "auto" and len(order) < len(units):  # every block, the most auto may do
                options.append(self.stage_options(j, i, "full")[0])
            self._options[key] = options[-1:] if mode == "full" else options
        return self._options[key]

    def _gain(self, u: int) -> int:
        return sum(self._block[u].values()) - sum(self._inputs[u].values())

    def _prefixes(self, units, order) -> list["RecomputeOption"]:
        """The option of each prefix of `order` (units recomputed), counting each saved storage once."""
        refs, total = {}, 0

        def add(storages, step):
            nonlocal total
            for key, size in storages.items():
                before = refs.get(key, 0)
                refs[key] = before + step
                if before == 0:
                    total += size
                elif before + step == 0:
                    total -= size
        for u in units:
            add(self._kept[u], 1)
            add(self._block[u], 1)
        options = [RecomputeOption((), total, 0, 0.0)]
        for u in order:
            add(self._inputs[u], 1)
            add(self._block[u], -1)
            last = options[-1]
            options.append(RecomputeOption(tuple(sorted((*last.units, u))), total,
                                           max(last.recomputed_bytes, sum(self._block[u].values())),
                                           last.seconds + self.block_forward[u]))
        return options


@dataclass(frozen=True)
class RecomputeOption:
    """Recomputing `units` in a run of units: the activations it then saves per microbatch, the largest
    recomputed block's activations, and the seconds of recompute forward per microbatch."""

    units: tuple[int, ...]
    activation_bytes: int
    recomputed_bytes: int
    seconds: float


def _storages(saved_dicts) -> dict:
    out = {}
    for saved in saved_dicts:
        out.update(saved)
    return out


def _input_storages(graph_cost: GraphCost, block) -> dict:
    """Storages of the tensors `block` reads from nodes outside it (what a checkpoint of it keeps),
    parameters apart."""
    inside, out = set(block), {}
    for node in block:
        for arg in node.all_input_nodes:
            if arg in inside:
                continue
            for t in pytree.tree_leaves(graph_cost.values.get(arg)):
                if isinstance(t, torch.Tensor) and not (t.is_leaf and t.requires_grad):
                    storage = t.untyped_storage()
                    out[storage._cdata] = storage.nbytes()
    return out


# -- choosing the cuts ---------------------------------------------------------------------------


def best_groups(count: int, parts: int, cost, fits=None) -> list[int] | None:
    """Group of each of `count` items: `parts` contiguous nonempty groups minimising the largest `cost(j, i)`
    (the cost of items j .. i-1), among the groupings where every group k satisfies `fits(j, i, k)`.

    None when no grouping fits. Exact: dynamic programming over (groups, items) in O(parts * count^2).
    """
    def staged(j, i, k):
        return cost(j, i) if fits is None or fits(j, i, k) else None
    found = grouping(count, parts, staged, max)
    return found[1] if found is not None else None


def grouping(count: int, parts: int, cost, combine) -> tuple[float, list[int]] | None:
    """(value, group of each item) of the `parts` contiguous nonempty groups of `count` items that minimise
    `combine` (max or sum) of `cost(j, i, k)` over the groups (items j .. i-1 as group k; None: not allowed)."""
    inf = float("inf")
    best = [[inf] * (count + 1) for _ in range(parts + 1)]
    cut = [[0] * (count + 1) for _ in range(parts + 1)]
    best[0][0] = 0
    for k in range(1, parts + 1):
        for i in range(k, count + 1):
            for j in range(k - 1, i):
                if best[k - 1][j] == inf:
                    continue
                c = cost(j, i, k - 1)
                if c is None:
                    continue
                value = combine(best[k - 1][j], c)
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    if best[parts][count] == inf:
        return None
    group, i = [0] * count, count
    for k in range(parts, 0, -1):
        j = cut[k][i]
        group[j:i] = [k - 1] * (i - j)
        i = j
    return best[parts][count], group


def balanced_then_least(count: int, parts: int, cost, time) -> list[int] | None:
    """The grouping with the smallest largest `time(j, i, k)` among the allowed ones (`cost(j, i, k)` None:
    group k cannot be items j .. i-1), and among those, the least sum of `cost`; None when none is allowed.

    The bottleneck comes first (dynamic programming over the largest time), then the least sum under it.
    For a memory plan, `time` includes the stage's recompute and `cost` is its recompute seconds: the
    fastest predicted step that fits, recomputing no more than that step needs. A target with room for
    the best unrecomputed split gets it unchanged: recompute only ever adds time.
    """
    def allowed_time(j, i, k):
        return time(j, i, k) if cost(j, i, k) is not None else None

    found = grouping(count, parts, allowed_time, max)
    if found is None:
        return None
    limit = found[0] * (1 + 1e-9) + 1e-12  # sums in another order differ in the last bits

    def bounded(j, i, k):
        c = cost(j, i, k)
        return c if c is not None and time(j, i, k) <= limit else None

    return grouping(count, parts, bounded, operator.add)[1]


def ranges_of(group: list[int]) -> list[tuple[int, int]]:
    """(first, end) unit range of each group."""
    out = []
    for s in range(max(group) + 1):
        members = [u for u, g in enumerate(group) if g == s]
        out.append((members[0], members[-1] + 1))
    return out


def predict(units: UnitCosts, group: list[int], *, balance, schedule, microbatches, sent_bytes,
            seconds=None, options=None, optimizer="adamw", max_memory=None) -> Plan:
    """The plan of a grouping: per stage, its time (predicted, or `seconds[u]` per unit as measured),
    FLOPs, memory and bytes sent; `options[s]` is stage s's `RecomputeOption` (default: none)."""
    ranges = ranges_of(group)
    plan = Plan(balance, units.graph_cost.sizes, schedule, microbatches, optimizer=optimizer, max_memory=max_memory)
    for s, (j, i) in enumerate(ranges):
        option = options[s] if options is not None else units.stage_options(j, i, "none")[0]
        if seconds is None:
            forward, backward = sum(units.forward[j:i]), sum(units.backward[j:i])
        else:  # measured: forward and backward together
            forward, backward = sum(seconds[j:i]), 0.0
        parameters = units.parameter_bytes(j, i)
        plan.stages.append(StagePrediction(
            index=s, forward_seconds=forward, backward_seconds=backward, flops=sum(units.flops[j:i]),
            parameter_bytes=parameters, activation_bytes=option.activation_bytes,
            in_flight=in_flight(schedule, s, len(ranges), microbatches),
            peak_bytes=units.peak_bytes(j, i, s, len(ranges), schedule, microbatches, option),
            sent_bytes=sent_bytes[s], gradient_bytes=parameters, optimizer_bytes=units.optimizer_bytes(j, i),
            recomputed_bytes=option.recomputed_bytes, recompute=tuple(units.names[u] for u in option.units),
            recompute_seconds=option.seconds,
        ))
    return plan


# -- measuring -------------------------------------------------------------------------------------


def real_inputs(input_names, sizes: Sizes, *, specs, vocab_size: int, hidden: int | None = None,
                dtype=torch.float32, seed: int = 0, type_vocab: int = 2, classes: int = 2) -> dict:
    """Random model inputs at `sizes` (token ids below `vocab_size`, unpadded masks), for timing runs;
    `specs` are the family's input specs (`fxconvert.families.input_specs`)."""
    return build_inputs(specs, input_names, batch=sizes.batch,
                        lengths={"encoder": sizes.encoder_length, "decoder": sizes.decoder_length},
                        hidden=hidden, vocab=vocab_size, type_vocab=type_vocab, classes=classes, dtype=dtype,
                        generator=torch.Generator().manual_seed(seed))


def measure_stage_seconds(stages, inputs: dict, *, repeats: int = 3, warmup: int = 1) -> list[float]:
    """Median forward + backward seconds of each stage on `inputs`, run as a pipeline runs them.

    Each stage's forward runs on the previous stage's detached outputs; backward runs from
    the last stage to the first with the gradients the next stage returned, in training
    mode. Gradients are taken with `torch.autograd.grad`, so no parameter's `.grad` changes,
    and the caller's random state is restored. `warmup` untimed rounds come first.
    """
    samples = [[] for _ in stages.specs]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for round_ in range(repeats + warmup):
            times = _one_round(stages, inputs)
            if round_ >= warmup:
                for s, t in enumerate(times):
                    samples[s].append(t)
    return [statistics.median(s) for s in samples]


def _one_round(stages, inputs) -> list[float]:
    forward, saved = [], []
    values = ()
    for spec, gm in zip(stages.specs, stages.stages):
        received = [v.detach().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v
                    for v in values]  # a value needs a gradient where it needs one in the unsplit graph
        args = [*received, *(inputs[n] for n in spec.inputs), *(getattr(stages, w) for w in spec.shared_weights),
                True]
        start = time.perf_counter()
        out = gm(*args)
        forward.append(time.perf_counter() - start)
        saved.append((received, args, out))
        values = out if spec.sent else ()
    backward = [0.0] * len(forward)
    grads = None
    for s in reversed(range(len(forward))):
        received, args, out = saved[s]
        outs = [out] if not stages.specs[s].sent else list(out)
        pairs = [(o, torch.ones_like(o) if grads is None else g) for o, g in
                 zip(outs, [None] * len(outs) if grads is None else grads)
                 if isinstance(o, torch.Tensor) and o.requires_grad]
        wrt = [r for r in received if isinstance(r, torch.Tensor) and r.requires_grad]
        params = [p for p in stages.stages[s].parameters() if p.requires_grad]
        params += [getattr(stages, w) for w in stages.specs[s].shared_weights]
        start = time.perf_counter()
        result = torch.autograd.grad([o for o, _ in pairs], wrt + params, [g for _, g in pairs], allow_unused=True)
        backward[s] = time.perf_counter() - start
        got = iter(result[:len(wrt)])
        grads = [(next(got) if isinstance(r, torch.Tensor) and r.requires_grad else None) for r in received]
        grads = [g if g is not None else (torch.zeros_like(r) if isinstance(r, torch.Tensor) else None)
                 for g, r in zip(grads, received)]
    return [f + b for f, b in zip(forward, backward)]


def check_profilable(conversion) -> None:
    """balance='profile' runs the blocks: refuse a model without real weights before it is split."""
    if any(p.device.type == "meta" for p in conversion.module.parameters()):
        raise UsageError("balance='profile' runs the blocks and needs real weights, but this model is on the meta "
                         "device; use balance='time'")


def profile_units(conversion, per_unit, sizes: Sizes, *, repeats: int = 3) -> list[float]:
    """Measured forward + backward seconds of each unit, at `sizes`, on this machine.

    `per_unit` is `conversion` split one block per stage (`fxconvert.stages` splits it, after
    `check_profilable`): this module sits below the split and takes its result.
    """
    shared = [getattr(conversion.module, n) for n in conversion.module.shared_names]
    first_float = next((p for p in conversion.module.parameters() if p.is_floating_point()), None)
    family = families.family_of_class(conversion.model_class)
    config = getattr(conversion.model, "config", None)
    config_sizes = family.input_sizes(config)  # 2 for the vocabularies without a config
    vocab = shared[0].shape[0] if shared else config_sizes["vocab"]
    inputs = real_inputs(conversion.input_names, sizes, specs=family.inputs, vocab_size=vocab,
                         hidden=config_sizes["hidden"], type_vocab=config_sizes["type_vocab"],
                         classes=config_sizes["classes"], dtype=first_float.dtype if first_float is not None else torch.float32)
    return measure_stage_seconds(per_unit, inputs, repeats=repeats)


__all__ = ["BALANCES", "SCHEDULES", "RECOMPUTES", "Plan", "StagePrediction", "UnitCosts", "RecomputeOption",
           "best_groups", "grouping", "balanced_then_least", "peak_memory", "predict",
           "measure_stage_seconds", "check_profilable", "profile_units", "real_inputs", "in_flight", "check_options"]
