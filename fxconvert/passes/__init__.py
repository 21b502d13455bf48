"""Graph passes that turn a traced T5 graph into FTPipe's pre-partitioning form.

Each pass lives in its own file, is a `torch.fx.passes.infra.pass_base.PassBase`, takes a
GraphModule and returns `PassResult(graph_module, modified)` with an honest `modified`.
Each is idempotent and leaves a graph that passes `lint()`. Each declares the fields of the
graph's `GraphInfo` it needs and records (`GraphPass.required` / `ensured`, checked by
`PassBase`'s `requires` / `ensures`). The list below is the order `fxconvert.convert` runs them in.
"""

from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxconvert.passes.contract import GraphPass
from fxconvert.passes.keep_single_output_pass import KeepSingleOutputPass
from fxconvert.passes.lift_shared_weights_pass import LiftSharedWeightsPass
from fxconvert.passes.lift_training_flag_pass import LiftTrainingFlagPass
from fxconvert.passes.remove_none_checks_pass import RemoveNoneChecksPass
from fxconvert.passes.sparsify_shared_lookups_pass import SparsifySharedLookupsPass


def default_passes(*, output: str | None = None) -> list[PassBase]:
    return [RemoveNoneChecksPass(), LiftTrainingFlagPass(), LiftSharedWeightsPass(), KeepSingleOutputPass(output),
            SparsifySharedLookupsPass()]


__all__ = [
    "PassBase",
    "PassResult",
    "GraphPass",
    "RemoveNoneChecksPass",
    "LiftTrainingFlagPass",
    "LiftSharedWeightsPass",
    "KeepSingleOutputPass",
    "SparsifySharedLookupsPass",
    "default_passes",
]
