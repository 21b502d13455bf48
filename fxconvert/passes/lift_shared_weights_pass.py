"""Make shared parameters explicit graph inputs that feed stateless calls.

FTPipe made T5's shared embedding "stateless": the weight is passed in as an argument to
the encoder embedding, the decoder embedding and a tied LM head, so that a partitioner
sees one tensor flowing to every stage that uses it. This pass does the same on a graph:

- parameters registered under several names are found by tensor identity
  (`fxconvert.analysis.find_shared_parameters`);
- each becomes one placeholder (`shared_embed_weight` for a weight an `nn.Embedding`
  owns, FTPipe's name), inserted after the model inputs and before `training`;
- `nn.Embedding` calls become `F.embedding(ids, w, ...)`, `nn.Linear` calls
  `F.linear(x, w, bias)`, and direct reads of the weight read the placeholder;
- the parameter is unregistered from the graph module, so it is not held twice. The
  lifted tensors are handed over in `GraphInfo.lifted_weights` (placeholder -> tensor)
  for the module that owns them (`fxconvert.convert.ConvertedModule`).

Parameters used under one name, such as an untied LM head, stay ordinary parameters.

Lookups keep the embedding's own `sparse` flag (dense for T5). Whether they may give sparse
row gradients depends on the final graph, so `SparsifySharedLookupsPass` decides that last.
"""

import copy

import torch
import torch.fx
import torch.nn.functional as F
from torch.fx.passes.infra.pass_base import PassResult

from fxconvert.graph_utils import delete_unused_submodules
from fxconvert.analysis import find_shared_parameters
from fxconvert.errors import PassError, describe_node
from fxconvert.graph_info import graph_info, update_graph_info
from fxconvert.passes.contract import GraphPass
from fxconvert.passes.lift_training_flag_pass import PLACEHOLDER as TRAINING
from fxconvert.passes.sparsify_shared_lookups_pass import sparse_embedding_gradients  # noqa: F401 (re-exported)


def _read_by_lookups(gm, names) -> bool:
    """Whether `F.embedding` lookups read the weight registered as `names` directly: an
    `nn.Embedding` subclass that the tracer went through (BART's scaled token embedding)
    leaves no embedding module in the graph module, only the lookup of its weight."""
    attrs = set(names)
    return any(node.op == "get_attr" and node.target in attrs
               and any(u.op == "call_function" and u.target is F.embedding and u.args[1:2] == (node,)
                       for u in node.users)
               for node in gm.graph.nodes)


def _placeholder_name(gm, names, taken) -> str:
    """`shared_embed_weight` for a weight an embedding owns or that embedding lookups read (FTPipe's
    name), else `shared_<first name>`."""
    def embedding_weight(name):
        owner, _, attr = name.rpartition(".")
        try:
            return attr == "weight" and isinstance(gm.get_submodule(owner), torch.nn.Embedding)
        except AttributeError:
            return False

    owner_is_embedding = any(embedding_weight(n) for n in names) or _read_by_lookups(gm, names)
    base = "shared_embed_weight" if owner_is_embedding else "shared_" + names[0].replace(".", "_")
    name, i = base, 1
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name


def _stateless_call(module, node, weight):
    """The functional call that replaces `node` (a call of `module`) with `weight` passed in."""
    if isinstance(module, torch.nn.Embedding):
        return F.embedding, (node.args[0], weight), {
            "padding_idx": module.padding_idx,
            "max_norm": module.max_norm,
            "norm_type": module.norm_type,
            "scale_grad_by_freq": module.scale_grad_by_freq,
            "sparse": module.sparse,
        }
    if isinstance(module, torch.nn.Linear):
        return F.linear, (node.args[0], weight), {}
    raise PassError(
        f"a shared weight is used by {type(module).__name__}, which has no stateless form here, "
        f"at {describe_node(node)}; untie that weight before converting"
    )


def _shared_bias_call(graph, node, bias):
    """`F.linear` for a call of an `nn.Linear` whose bias is the shared one (BERT's MLM decoder
    bias is also `cls.predictions.bias`); its weight is read, or lifted by its own group."""
    with graph.inserting_before(node):
        weight = graph.get_attr(f"{node.target}.weight")
    return F.linear, (node.args[0], weight), {"bias": bias}


class LiftSharedWeightsPass(GraphPass):
    ensured = ("lifted_weights",)  # {} when nothing is shared

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        shared = find_shared_parameters(graph_module)
        lifted = dict(graph_info(graph_module).lifted_weights or {})
        if not shared:
            update_graph_info(graph_module, lifted_weights=lifted)
            return PassResult(graph_module, False)
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        taken = {n.target for n in placeholders}
        anchor = next((n for n in placeholders if n.target == TRAINING), None)
        for info, param in shared:
            name = _placeholder_name(graph_module, info.names, taken)
            taken.add(name)
            if anchor is not None:
                with graph.inserting_before(anchor):
                    weight = graph.placeholder(name, type_expr=torch.Tensor)
            else:
                with graph.inserting_after(placeholders[-1]):
                    weight = graph.placeholder(name, type_expr=torch.Tensor)
                placeholders.append(weight)
            weight.meta["val"] = torch.empty_like(param, device="meta")
            owners = {n.rsplit(".", 1)[0] if "." in n else "" for n in info.names}
            attrs = set(info.names)
            for node in list(graph.nodes):
                if node.op == "call_module" and node.target in owners:
                    module = graph_module.get_submodule(node.target)
                    if module.weight is param:
                        fn, args, kwargs = _stateless_call(module, node, weight)
                        if isinstance(module, torch.nn.Linear) and module.bias is not None:
                            with graph.inserting_before(node):
                                kwargs["bias"] = graph.get_attr(f"{node.target}.bias")
                    elif isinstance(module, torch.nn.Linear) and module.bias is param:
                        fn, args, kwargs = _shared_bias_call(graph, node, weight)
                    else:
                        continue
                    with graph.inserting_before(node):
                        new = graph.call_function(fn, args, kwargs)
                    new.meta = dict(node.meta)
                    node.replace_all_uses_with(new)
                    graph.erase_node(node)
                elif node.op == "get_attr" and node.target in attrs:
                    node.replace_all_uses_with(weight)
                    graph.erase_node(node)
            lifted[name] = param
        update_graph_info(graph_module, lifted_weights=lifted)
        delete_unused_submodules(graph_module)
        for info, _ in shared:
            self._unregister(graph_module, info.names)
        graph_module.recompile()
        return PassResult(graph_module, True)

    @staticmethod
    def _unregister(gm: torch.nn.Module, names) -> None:
        """Drop any registration the graph module still holds, without touching the source model.

        Leaf modules are shared with the model that was traced, so a module that still
        holds the weight is replaced in the graph module by a copy that does not.
        """
        for qualified in names:
            owner_path, _, attr = qualified.rpartition(".")
            try:
                owner = gm.get_submodule(owner_path) if owner_path else gm
            except AttributeError:
                continue  # the owner was unused and has been deleted
            if attr not in owner._parameters:
                continue
            if owner is gm:
                del gm._parameters[attr]
                continue
            replacement = copy.copy(owner)
            replacement._parameters = {k: v for k, v in owner._parameters.items() if k != attr}
            parent_path, _, child = owner_path.rpartition(".")
            parent = gm.get_submodule(parent_path) if parent_path else gm
            setattr(parent, child, replacement)
