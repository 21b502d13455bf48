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

Memory of a stage (bytes): its parameters, their gradients and the optimizer's state
(Adam: two tensors per parameter), counting each shared weight on every stage that holds
a copy; plus the activations it saves for backward, times the microbatches in flight on
it. GPipe runs every microbatch's forward before any backward, so M are in flight on every
stage; 1F1B starts backward as early as it can, so stage s (of S) holds min(M, S - s).

Pipeline timing (`Plan.bubble_fraction`): with stage times t_s per microbatch, M
microbatches in a pipeline of S stages take sum(t) + (M - 1) * max(t) (both schedules);
the bubble is the idle share of the S stages over that time.
"""

import statistics
import time
from dataclasses import dataclass, field

import torch

from fxconvert.cost import GraphCost, Sizes
from fxconvert.errors import UsageError
from fxconvert import families
from fxconvert.inputs import build_inputs

BALANCES = ("time", "params", "profile")
SCHEDULES = ("1f1b", "gpipe")
OPTIMIZER_STATES = 2  # Adam: exp_avg and exp_avg_sq, each the size of its parameter


@dataclass
class StagePrediction:
    """One stage's predicted cost per microbatch (seconds measured instead under balance="profile")."""

    index: int
    forward_seconds: float
    backward_seconds: float
    flops: int  # forward + backward
    parameter_bytes: int  # what it owns, plus a copy of each shared weight it uses
    activation_bytes: int  # saved for backward by one microbatch
    in_flight: int  # microbatches whose activations it holds at once under the schedule
    peak_bytes: int  # parameters, gradients, optimizer state and in-flight activations
    sent_bytes: int  # what it sends to the next stage per microbatch

    @property
    def seconds(self) -> float:
        return self.forward_seconds + self.backward_seconds


@dataclass
class Plan:
    """How a split was chosen and what it is predicted to cost."""

    balance: str
    sizes: Sizes
    schedule: str
    microbatches: int
    stages: list[StagePrediction] = field(default_factory=list)

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


def check_options(*, balance, schedule, microbatches, max_stage_bytes) -> None:
    if balance not in BALANCES:
        raise UsageError(f"unknown balance {balance!r}; use one of {', '.join(BALANCES)}")
    if schedule not in SCHEDULES:
        raise UsageError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
    for name, value in (("microbatches", microbatches), ("max_stage_bytes", max_stage_bytes)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise UsageError(f"{name} must be a positive integer, got {value!r}")


# -- per-unit costs ------------------------------------------------------------------------------


class UnitCosts:
    """Costs of the units (blocks with their attached nodes) that stages are made of.

    `nodes_of[u]`: the graph nodes of unit u; `seconds[u]`, `flops[u]`: forward + backward;
    `owned[u]`: bytes of the parameters it owns; `shared[u]`: the shared weights it reads;
    `cut_bytes[u]`: bytes sent across the cut after unit u.
    Activations of a run of units are the union of their saved storages (`GraphCost.saved_bytes`).
    """

    def __init__(self, graph_cost: GraphCost, nodes_of, owned, shared, shared_bytes, cut_bytes):
        self.graph_cost = graph_cost
        self.cut_bytes = cut_bytes  # per microbatch, crossing the cut after unit u
        self.nodes_of = nodes_of
        self.owned = owned
        self.shared = shared
        self.shared_bytes = shared_bytes
        costs = graph_cost.nodes
        self.forward = [sum(costs[n].forward_seconds for n in nodes) for nodes in nodes_of]
        self.backward = [sum(costs[n].backward_seconds for n in nodes) for nodes in nodes_of]
        self.flops = [sum(costs[n].flops for n in nodes) for nodes in nodes_of]
        self._activations = {}

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

    def peak_bytes(self, j: int, i: int, stage: int, num_stages: int, schedule: str, microbatches: int) -> int:
        flight = in_flight(schedule, stage, num_stages, microbatches)
        return self.parameter_bytes(j, i) * (2 + OPTIMIZER_STATES) + self.activations(j, i) * flight


# -- choosing the cuts ---------------------------------------------------------------------------


def best_groups(count: int, parts: int, cost, fits=None) -> list[int] | None:
    """Group of each of `count` items: `parts` contiguous nonempty groups minimising the largest `cost(j, i)`
    (the cost of items j .. i-1), among the groupings where every group k satisfies `fits(j, i, k)`.

    None when no grouping fits. Exact: dynamic programming over (groups, items) in O(parts * count^2).
    """
    inf = float("inf")
    best = [[inf] * (count + 1) for _ in range(parts + 1)]
    cut = [[0] * (count + 1) for _ in range(parts + 1)]
    best[0][0] = 0
    for k in range(1, parts + 1):
        for i in range(k, count + 1):
            for j in range(k - 1, i):
                if best[k - 1][j] == inf or (fits is not None and not fits(j, i, k - 1)):
                    continue
                value = max(best[k - 1][j], cost(j, i))
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    if best[parts][count] == inf:
        return None
    group, i = [0] * count, count
    for k in range(parts, 0, -1):
        j = cut[k][i]
        group[j:i] = [k - 1] * (i - j)
        i = j
    return group


def ranges_of(group: list[int]) -> list[tuple[int, int]]:
    """(first, end) unit range of each group."""
    out = []
    for s in range(max(group) + 1):
        members = [u for u, g in enumerate(group) if g == s]
        out.append((members[0], members[-1] + 1))
    return out


def predict(units: UnitCosts, group: list[int], *, balance, schedule, microbatches, sent_bytes,
            seconds=None) -> Plan:
    """The plan of a grouping: per stage, its time (predicted, or `seconds[u]` per unit as measured),
    FLOPs, memory and bytes sent."""
    ranges = ranges_of(group)
    plan = Plan(balance, units.graph_cost.sizes, schedule, microbatches)
    for s, (j, i) in enumerate(ranges):
        if seconds is None:
            forward, backward = sum(units.forward[j:i]), sum(units.backward[j:i])
        else:  # measured: forward and backward together
            forward, backward = sum(seconds[j:i]), 0.0
        plan.stages.append(StagePrediction(
            index=s, forward_seconds=forward, backward_seconds=backward, flops=sum(units.flops[j:i]),
            parameter_bytes=units.parameter_bytes(j, i), activation_bytes=units.activations(j, i),
            in_flight=in_flight(schedule, s, len(ranges), microbatches),
            peak_bytes=units.peak_bytes(j, i, s, len(ranges), schedule, microbatches),
            sent_bytes=sent_bytes[s],
        ))
    return plan


# -- measuring -------------------------------------------------------------------------------------


def real_inputs(input_names, sizes: Sizes, *, specs, vocab_size: int, hidden: int | None = None,
                dtype=torch.float32, seed: int = 0, type_vocab: int = 2) -> dict:
    """Random model inputs at `sizes` (token ids below `vocab_size`, unpadded masks), for timing runs;
    `specs` are the family's input specs (`fxconvert.families.input_specs`)."""
    return build_inputs(specs, input_names, batch=sizes.batch,
                        lengths={"encoder": sizes.encoder_length, "decoder": sizes.decoder_length},
                        hidden=hidden, vocab=vocab_size, type_vocab=type_vocab, dtype=dtype,
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
                         dtype=first_float.dtype if first_float is not None else torch.float32)
    return measure_stage_seconds(per_unit, inputs, repeats=repeats)


__all__ = ["BALANCES", "SCHEDULES", "Plan", "StagePrediction", "UnitCosts", "best_groups", "predict",
           "measure_stage_seconds", "check_profilable", "profile_units", "real_inputs", "in_flight", "check_options"]
