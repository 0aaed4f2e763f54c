"""From one group of Torch-Pruning's ``DependencyGraph`` to the :class:`Member` slices of a
:class:`~compress.pruning.structured.ChannelGroup`: which parameter, dim and role every item of
the group prunes, and which root channels must go together (a grouped conv drops the same
offset in every conv group, attention drops whole heads, grouped-query attention ties query and
key/value heads), found by union-find over the root channels. A group that cannot be mapped so
that its masked model equals its shrunk model raises :class:`Skip` with the reason;
:func:`compress.pruning.channel_groups.build_groups` records it and leaves the group whole.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch_pruning as tp
from torch import nn

from compress.analysis.node_kinds import is_transposed_linear
from compress.pruning.attention import grouped_query_heads, per_head_parameter
from compress.pruning.structured import Member, Role

__all__ = ["Skip", "map_group"]

_OPS = tp.ops.OPTYPE
# Graph nodes that only route channels (no parameters); their items carry nothing to map.
_ROUTING = {
    _OPS.CONCAT,
    _OPS.SPLIT,
    _OPS.ELEMENTWISE,
    _OPS.RESHAPE,
    _OPS.UNBIND,
    _OPS.EXPAND,
    _OPS.SLICE,
}
# Why a group is left out instead of mapped: the masked model would not equal the shrunk one.
_UNSUPPORTED = {
    _OPS.MHA: "nn.MultiheadAttention: removing embedding channels re-partitions the heads",
    _OPS.LN: "LayerNorm: its statistics include the zeroed channels, so masking is not exact",
    _OPS.GN: "GroupNorm: its statistics include the zeroed channels, so masking is not exact",
    _OPS.LSTM: "LSTM: gate-coupled channels are not mapped",
    _OPS.CUSTOMIZED: "customized layer: no known parameter layout",
}


class Skip(Exception):
    """A group that is left out on purpose; ``warn`` says whether the user should hear of it."""

    def __init__(self, reason: str, *, warn: bool = True, kind: str = "not mapped") -> None:
        super().__init__(reason)
        self.warn = warn
        self.kind = kind


class _Classes:
    """Union-find over root channels; grouped convs tie channels across their conv groups."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a != b:
            self.parent[max(a, b)] = min(a, b)

    def labels(self) -> tuple[torch.Tensor, int]:
        roots = sorted({self.find(i) for i in range(len(self.parent))})
        rank = {r: k for k, r in enumerate(roots)}
        return torch.tensor([rank[self.find(i)] for i in range(len(self.parent))]), len(roots)


def _tie_grouped_conv(
    classes: _Classes, conv: nn.modules.conv._ConvNd, idxs: list[int], roots: list[int], n: int
) -> None:
    """A grouped conv keeps or drops the same relative channel in every conv group.

    That is the only layout a smaller grouped conv can hold (and what Torch-Pruning's
    in-channel pruning assumes), so channels that sit at the same offset are tied into one.
    """
    if sorted(idxs) != list(range(n)):
        raise Skip(f"grouped conv {conv} shares its channels with another group")
    period = n // conv.groups
    first: dict[int, int] = {}
    for idx, root in zip(idxs, roots, strict=True):
        first.setdefault(idx % period, root)
        classes.union(first[idx % period], root)


def _item_members(
    name: str,
    module: nn.Module | nn.Parameter,
    node_type: tp.ops.OPTYPE,
    is_out: bool,
    dg: tp.DependencyGraph,
) -> list[tuple[str, str, int, Role]]:
    """(module name, param name, dim, role) for every parameter one Torch-Pruning item prunes.

    ``module`` is the node's module, or the parameter itself for an unwrapped parameter.
    """
    if isinstance(module, nn.Parameter):  # node type PARAMETER
        full = dg._param_to_name[module]
        owner, _, param = full.rpartition(".")
        if per_head_parameter(dg.model, owner, module):
            return []  # whole heads go; what every head shares stays
        kind = type(dg.model.get_submodule(owner)).__name__
        if kind.endswith(("RMSNorm", "LayerNorm")):  # LlamaRMSNorm, T5LayerNorm: bare parameters
            raise Skip(
                f"{kind}: its statistics include the zeroed channels, so masking is not exact"
            )
        return [(owner, param, dg.module2node[module].pruning_dim % module.dim(), "producer")]
    if node_type in (_OPS.CONV, _OPS.DEPTHWISE_CONV, _OPS.LINEAR):
        transposed = getattr(module, "transposed", False)
        if transposed and isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1:
            raise Skip(f"grouped transposed conv {name!r} is not mapped")
        if is_out or node_type == _OPS.DEPTHWISE_CONV:
            dims: list[tuple[str, str, int, Role]] = [
                (name, "weight", 1 if transposed else 0, "producer")
            ]
            if module.bias is not None:
                dims.append((name, "bias", 0, "producer"))
            return dims
        return [(name, "weight", 0 if transposed else 1, "consumer")]
    if node_type == _OPS.CUSTOMIZED and is_transposed_linear(module):  # weight (in, out)
        if not is_out:
            return [(name, "weight", 0, "consumer")]
        out: list[tuple[str, str, int, Role]] = [(name, "weight", 1, "producer")]
        return out + ([(name, "bias", 0, "producer")] if module.bias is not None else [])
    if node_type in (_OPS.BN, _OPS.IN):
        return [(name, p, 0, "norm") for p in ("weight", "bias") if getattr(module, p) is not None]
    if isinstance(module, nn.PReLU):  # node type PRELU
        return [(name, "weight", 0, "other")] if module.num_parameters > 1 else []
    if node_type == _OPS.EMBED:
        return [(name, "weight", 1, "producer")]
    raise Skip(_UNSUPPORTED.get(node_type, f"{node_type.name} layer {name!r} is not mapped"))


def _head_dim(model: nn.Module, layer_name: str) -> int | None:
    """The head size of the attention block ``layer_name`` projects for, read from its parent
    (``head_dim`` in Llama and ViT, ``attention_head_size`` in BERT), or None."""
    parent = layer_name.rpartition(".")[0]
    try:
        block = model.get_submodule(parent)
    except AttributeError:
        return None
    for attr in ("head_dim", "attention_head_size"):
        value = getattr(block, attr, None)
        if isinstance(value, int) and value > 1:
            return value
    return None


def _tie_heads(
    model: nn.Module,
    classes: _Classes,
    raw: Sequence[tuple[str, str, int, Role, list[int], list[int]]],
) -> None:
    """Attention keeps or drops whole heads: the channels of one head of the projections become
    one group channel, so q, k, v and the output projection's inputs lose the same heads and the
    model's ``view(..., -1, head_dim)`` still splits them right (Torch-Pruning's ``num_heads``
    grouping, read from the model instead of given by hand)."""
    for mod_name, _, _, role, idxs, roots in raw:
        head = _head_dim(model, mod_name) if role == "producer" else None
        if head is None:
            continue
        root_of = dict(zip(idxs, roots, strict=True))
        for idx, root in root_of.items():
            classes.union(root_of.get(idx - idx % head, root), root)


def map_group(
    dg: tp.DependencyGraph, tp_group: tp.dependency.Group, model: nn.Module
) -> tuple[list[Member], int]:
    """Maps one Torch-Pruning group to Members; raises Skip when that is not possible."""
    root_size = len(set(tp_group[0].root_idxs))
    classes = _Classes(root_size)
    raw: list[tuple[str, str, int, Role, list[int], list[int]]] = []
    for item in tp_group.items:
        node = item.dep.target
        module, idxs, roots = node.module, list(item.idxs), list(item.root_idxs)
        if node.type == _OPS.OUTPUT:
            raise Skip("its channels are network outputs", warn=False, kind="network output")
        if node.type in _ROUTING:
            if not node.outputs:
                raise Skip("its channels are network outputs", warn=False, kind="network output")
            continue
        if any(r is not None and not 0 <= r < root_size for r in roots):
            raise Skip(f"root index outside the root layer at {node.name}")
        name = dg._module2name.get(module, str(node.name))
        is_out = dg.is_out_channel_pruning_fn(item.dep.handler)
        consumer = not is_out and (
            node.type in (_OPS.CONV, _OPS.LINEAR) or is_transposed_linear(module)
        )
        if not consumer and not node.outputs:
            raise Skip("its channels are network outputs", warn=False, kind="network output")
        if node.type == _OPS.CONV and module.groups > 1:
            n = module.out_channels if is_out else module.in_channels
            _tie_grouped_conv(classes, module, idxs, roots, n)
            if not is_out:  # the weight's in-dim holds one conv group's worth of channels
                idxs = [i % (n // module.groups) for i in idxs]
        for mod_name, param, dim, role in _item_members(name, module, node.type, is_out, dg):
            raw.append((mod_name, param, dim, role, idxs, roots))
    try:
        raw, ties = grouped_query_heads(model, raw)
    except ValueError as err:
        raise Skip(str(err)) from None
    for a, b in ties:
        classes.union(a, b)
    if any(r is None for *_, roots in raw for r in roots):  # lost behind an expand op
        raise Skip("Torch-Pruning lost the root channels of a layer in this group")
    _tie_heads(model, classes, raw)
    labels, size = classes.labels()
    members: list[Member] = []
    for mod_name, param, dim, role, idxs, roots in raw:
        tensor = model.get_submodule(mod_name)._parameters.get(param)
        if tensor is not None and idxs and max(idxs) >= tensor.shape[dim]:
            raise Skip(f"Torch-Pruning mapped a channel outside {mod_name}.{param}")
        channel = labels[torch.tensor(roots, dtype=torch.long)]
        members.append(Member(mod_name, param, dim, torch.tensor(idxs), channel, role))
    return members, size
