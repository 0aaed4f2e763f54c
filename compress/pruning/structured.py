"""Structured (filter/channel) pruning on channel groups: scores, masks, shrinking.

A :class:`ChannelGroup` names, by module name, every parameter slice that holds one set of
coupled output channels (:func:`compress.pruning.channel_groups.build_groups` finds them with
Torch-Pruning's ``DependencyGraph``). A pruning algorithm scores the channels
(:func:`group_weights`, :func:`channel_norms`), writes its choice into masks during training
(:func:`apply_channel_mask`), and finally calls :func:`shrink` to remove the channels
physically. The masked model computes exactly what the shrunk model computes: a pruned channel
is zero at every producer (weights, bias, norm affine), so consumers see exact zeros, which is
what removing the channel gives. :func:`compress.pruning.exactness.exact_groups` checks that
numerically. The sizes of the shrunk model, counted without shrinking, are in
:mod:`compress.pruning.sizes`.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from compress.pruning.channel_groups import build_groups
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    >>> x = torch.randn(1, 3, 8, 8)
    >>> (group,) = build_groups(model, x, prune_first_conv=True)
    >>> keep = torch.arange(8) < 2
    >>> apply_channel_mask(model, group, keep)
    >>> small = shrink(model, [group], {group.name: keep}, example_inputs=x)
    >>> small[0], bool(torch.allclose(model(x), small(x), atol=1e-6))
    (Conv2d(3, 2, kernel_size=(3, 3), stride=(1, 1)), True)
"""

from __future__ import annotations

import bisect
import functools
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.dependency import index_mapping as tp_index_mapping

from compress import distributed, masks
from compress.analysis.summary import counting_macs
from compress.analysis.untouched import copy_model
from compress.errors import CompressError
from compress.pruning import hf_layers
from compress.pruning.attention import cache_off, rotary_as_identity
from compress.pruning.group_search import indexed_groups, repeats_heads, searched

__all__ = [
    "ChannelGroup",
    "Member",
    "apply_channel_mask",
    "bare_copy",
    "channel_norms",
    "check_keep",
    "group_weights",
    "pruning_plan",
    "remove_channels",
    "round_keep",
    "shrink",
]

Role = Literal["producer", "norm", "consumer", "other"]
Inputs = torch.Tensor | Sequence[torch.Tensor]

OWNER = "filter_pruning"
"""The mask owner of channel masks: a sparsity algorithm on the same weight keeps its own."""
INPUT_OWNER = "filter_pruning_inputs"
"""The owner of the masks on consumers' input slices. Apart from :data:`OWNER` because a layer
is often the producer of one group (rows) and a consumer of another (columns): one buffer would
let a group setting its kept rows back to 1 undo another group's zero columns."""


@dataclass(frozen=True, eq=False)
class Member:
    """One parameter slice that belongs to a channel group.

    ``index[j]`` is a position along ``dim`` of ``module_name.param_name`` and ``channel[j]`` the
    group channel it belongs to. For the common one-to-one case ``channel == arange(size)``, so
    ``index[i]`` is the position of group channel ``i``. A channel may own several positions
    (Linear after flatten: one per spatial element) and a member may cover only some channels
    (a consumer of one half of a split).

    ``role`` says how the slice relates to the channel: ``producer`` (conv/linear out-dim weight
    and bias, depthwise conv, unwrapped parameters), ``norm`` (norm affine weight and bias),
    ``consumer`` (in-dim weight of the next layer) or ``other`` (PReLU slopes).
    """

    module_name: str
    param_name: str
    dim: int
    index: torch.Tensor
    channel: torch.Tensor
    role: Role


@dataclass(frozen=True, eq=False)
class ChannelGroup:
    """A set of coupled channels that are kept or removed together.

    ``name`` is the root module's name, a stable id across fresh instances of the same class.
    ``mask_norms`` is False when the group was built with ``prune_batch_norms=False``.
    """

    name: str
    size: int
    members: tuple[Member, ...]
    mask_norms: bool = True

    @property
    def root(self) -> Member:
        """The root layer's out-dim weight: its positions are the ones Torch-Pruning prunes."""
        return self.members[0]

    @property
    def unit(self) -> int:
        """Channels of the root layer per group channel: 1, or more when a group channel stands
        for a channel in every conv group of a grouped conv (or a whole attention head)."""
        return max(len(self.root.index) // self.size, 1)


def as_tuple(example_inputs: Inputs) -> tuple[torch.Tensor, ...]:
    """The positional arguments of one forward pass."""
    return (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)


def bare_copy(model: nn.Module) -> nn.Module:
    """A deep copy without masks: mask products in the forward pass would look like extra ops."""
    clone = copy_model(model)
    for module in clone.modules():
        masks.remove(module)
    return clone


def dependency_graph(
    model: nn.Module,
    example_inputs: Inputs,
    *,
    outputs: list[torch.Size] | None = None,
    macs: dict[str, int] | None = None,
) -> tp.DependencyGraph:
    """Torch-Pruning's ``DependencyGraph`` of ``model``; pass a copy, tracing calls ``eval()``.

    The graph is traced back from every tensor of the output that has a gradient, so outputs
    that are dicts or dataclasses holding caches (Hugging Face's ``ModelOutput``) trace too.
    ``outputs``, if given, receives the shapes of the output's tensors (:func:`leaves`), and
    ``macs`` the MACs of each module in the trace's forward pass
    (:func:`compress.analysis.summary.counting_macs`; no forward pass of its own)."""
    inputs = as_tuple(example_inputs)

    def forward(m: nn.Module, x: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        if macs is None:
            out = leaves(m(*x))
        else:
            with counting_macs(m) as counted:
                out = leaves(m(*x))
            macs.update(counted)
        if outputs is not None:
            outputs[:] = [t.shape for t in out]
        return [t for t in out if t.grad_fn is not None]

    with (
        torch.enable_grad(),
        warnings.catch_warnings(),
        rotary_as_identity(model),
        cache_off(model),
    ):
        warnings.simplefilter("ignore")  # Torch-Pruning's own notices; we report what matters
        dg = tp.DependencyGraph().build_dependency(
            model,
            inputs,
            forward_fn=forward,
            customized_pruners=hf_layers.pruners(model),  # type: ignore[arg-type]
            verbose=False,
        )
    hf_layers.map_last_dim_splits(dg)
    return dg


@contextmanager
def mappings_as_traced(dg: tp.DependencyGraph) -> Iterator[None]:
    """Inside the block, Torch-Pruning's group search on ``dg`` reuses the index mappings of its
    concat, split and reshape nodes instead of computing them all again for every group it is
    asked for, which on DenseNet is most of the search. The trace computed them, and they stay
    valid while no channel is removed; other graphs (a shrink elsewhere) still update theirs."""
    update = tp_index_mapping.update_index_mapping

    def update_others(graph: tp.DependencyGraph) -> None:
        if graph is not dg:
            update(graph)

    tp_index_mapping.update_index_mapping = update_others
    try:
        yield
    finally:
        tp_index_mapping.update_index_mapping = update


_MAPPED = {
    "CONCAT": "update_concat_index_mapping",
    "SPLIT": "update_split_index_mapping",
    "UNBIND": "update_unbind_index_mapping",
    "EXPAND": "update_expand_index_mapping",
    "SLICE": "update_slice_index_mapping",
}
"""The node types whose index mappings Torch-Pruning's ``update_index_mapping`` computes during a
removal, and the function that computes each. Not reshapes: the mapping of a flatten (a channel
to ``stride`` positions) does not change when channels are removed, and Torch-Pruning's own
update leaves it once the traced sizes no longer hold; what its update did after a removal was
set mappings where the trace could not (its channel inference gave up on swin_t's long chains),
mappings the group search never used, at 0.16 s per group on swin_t. The removal then maps
channels as the search that found the groups did."""


@contextmanager
def concats_as_sized(dg: tp.DependencyGraph) -> Iterator[None]:
    """Inside the block, Torch-Pruning computes the index mapping of a concat node of ``dg``
    again only when the sizes of its parts changed since it last did. It computes every
    concat's mapping before each group it prunes, and the mapping follows from the part sizes
    alone (which its concat pruner updates); a group changes a few of them, and DenseNet-121
    has 58 concats of up to 32 parts each. The other mappings of :data:`_MAPPED` are computed
    as before, for the nodes that have one (:func:`_may_map`), listed once instead of looked
    for among all nodes before each group."""
    update_all, update = (
        tp_index_mapping.update_index_mapping,
        tp_index_mapping.update_concat_index_mapping,
    )
    done: dict[object, tuple[int, ...]] = {}
    kinds = {getattr(tp_index_mapping.ops.OPTYPE, k): f for k, f in _MAPPED.items()}
    mapped = [
        (node, kinds[node.type])
        for node in dg.module2node.values()
        if node.type in kinds and _may_map(node)
    ]

    def update_changed(graph: tp.DependencyGraph, node: Any) -> None:
        sizes = node.module.concat_sizes
        if graph is dg and sizes is not None and done.get(node) == tuple(sizes):
            return
        update(graph, node)
        if graph is dg and node.module.concat_sizes is not None:
            done[node] = tuple(node.module.concat_sizes)

    def update_mapped(graph: tp.DependencyGraph) -> None:
        if graph is not dg:
            update_all(graph)
            return
        # its channel inference asks for the pruner of a layer again and again (swin_t: a
        # million times per group, through a chain of isinstance); nothing changes in a pass
        cached = functools.cache(graph.get_pruner_of_module)
        graph.get_pruner_of_module = cached  # type: ignore[method-assign]
        try:
            for node, name in mapped:  # looked up now: the concat's is update_changed
                getattr(tp_index_mapping, name)(graph, node)
        finally:
            del graph.get_pruner_of_module

    tp_index_mapping.update_concat_index_mapping = update_changed
    tp_index_mapping.update_index_mapping = update_mapped
    try:
        yield
    finally:
        tp_index_mapping.update_concat_index_mapping = update
        tp_index_mapping.update_index_mapping = update_all


def _may_map(node: Any) -> bool:
    """False for an expand node whose mapping Torch-Pruning never sets (:func:`repeats_heads`).
    Its update infers the channels around it before it looks, which on swin_t was a third of
    the check's removal, with "Maximum recursive depth" warnings."""
    return node.type != tp_index_mapping.ops.OPTYPE.EXPAND or repeats_heads(node)


def group_weights(
    model: nn.Module, group: ChannelGroup, *, roles: Sequence[Role] = ("producer", "norm")
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(rows, channel) per member with a role in ``roles``: ``rows[j]`` is the flattened slice at
    ``index[j]`` and ``channel[j]`` its group channel, ready for ``index_add_``.

    Raw parameter values (not masked), so that a pruned channel can earn its way back.

    Example:
        >>> scores = torch.zeros(group.size)  # doctest: +SKIP
        >>> for rows, ch in group_weights(model, group):  # doctest: +SKIP
        ...     scores.index_add_(0, ch, rows.abs().sum(1))
    """
    out = []
    for member in group.members:
        if member.role not in roles:
            continue
        param = model.get_submodule(member.module_name)._parameters[member.param_name]
        assert param is not None  # a member names a parameter that is set
        rows = param.detach().index_select(member.dim, member.index).movedim(member.dim, 0)
        out.append((rows.reshape(len(member.index), -1), member.channel))
    return out


def channel_norms(model: nn.Module, group: ChannelGroup, *, p: float = 1.0) -> torch.Tensor:
    """Per-channel Lp norm (to the p) of the producers' weights: the classic filter criterion."""
    scores = torch.zeros(group.size)
    for rows, channel in group_weights(model, group, roles=("producer",)):
        scores.index_add_(0, channel, rows.float().abs().pow(p).sum(1))
    return scores


def check_keep(group: ChannelGroup, keep: torch.Tensor) -> torch.Tensor:
    """``keep`` as a bool tensor of the group's width with at least one channel kept."""
    keep = torch.as_tensor(keep, dtype=torch.bool)
    if keep.shape != (group.size,):
        raise CompressError(
            f"group {group.name!r}: keep has shape {tuple(keep.shape)}, expected ({group.size},)"
        )
    if not keep.any():
        raise CompressError(
            f"group {group.name!r}: at least one channel must remain, keep is all False"
        )
    return keep


def apply_channel_mask(model: nn.Module, group: ChannelGroup, keep: torch.Tensor) -> None:
    """Masks every slice of the group: 1 where ``keep``, 0 where pruned.

    Kept slices are set back to 1, so calling this again with a new choice restores channels.
    Norm affines, and the input slices of the layers that consume the channels, are masked only
    when the group was built with ``prune_batch_norms=True``: a pruned channel is then exactly
    zero, so masking its consumers changes nothing in the output, and the masked weights are
    the ones :func:`shrink` removes (a sparsity level set on the rest counts what remains). The
    masks are owned by :data:`OWNER` (:data:`INPUT_OWNER` for consumers), so a sparsity mask on
    the same weight is never overwritten: the forward pass multiplies all of them.
    """
    keep = check_keep(group, keep)
    owners = {"producer": OWNER}
    if group.mask_norms:
        owners |= {"norm": OWNER, "consumer": INPUT_OWNER}
    for member in group.members:
        owner = owners.get(member.role)
        if owner is None:
            continue
        module = model.get_submodule(member.module_name)
        mask = masks.attach(module, member.param_name, owner=owner)
        # a sharded mask (FSDP2) is written in the part this rank holds
        which, where = distributed.held(mask, member.dim, member.index)
        kept = keep[member.channel[which]]
        part = distributed.local(mask)
        with torch.no_grad():
            part.index_fill_(member.dim, where[kept], 1)
            part.index_fill_(member.dim, where[~kept], 0)


def shrink(
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    keep: Mapping[str, torch.Tensor],
    *,
    example_inputs: Inputs,
) -> nn.Module:
    """A smaller dense copy of ``model`` with the channels that ``keep`` drops removed.

    The copy has its masks folded in; ``model`` is unchanged. Groups absent from ``keep`` stay
    whole. Torch-Pruning does the surgery on a fresh graph of the copy, traced with
    ``example_inputs``.
    """
    small = copy_model(model)
    masks.fold(small)
    pruned = [g for g in groups if g.name in keep and not check_keep(g, keep[g.name]).all()]
    if not pruned:  # nothing to remove: no trace (a model Torch-Pruning cannot trace strips too)
        return small
    was_training = small.training
    remove_channels(dependency_graph(small, example_inputs), small, pruned, keep)
    small.train(was_training)
    return small


def remove_channels(
    dg: tp.DependencyGraph,
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    keep: Mapping[str, torch.Tensor],
) -> None:
    """Removes from ``model`` itself, whose dependency graph ``dg`` is, the channels that ``keep``
    drops (:func:`shrink` on a copy it has traced; the exactness check on the copy it traced to
    find the groups)."""
    removed: dict[tuple[str, bool], list[int]] = {}
    with concats_as_sized(dg), indexed_groups(), warnings.catch_warnings():
        # its shape inference gives up on long chains (swin_t), which leaves a mapping unset
        # and says so at every group; the check has measured what the removal computes
        warnings.filterwarnings("ignore", message="Maximum recursive depth reached!")
        for group in groups:
            if group.name in keep:
                _prune_group(dg, model, group, check_keep(group, keep[group.name]), removed)
    hf_layers.fit_attention(model)


def _prune_group(
    dg: tp.DependencyGraph,
    model: nn.Module,
    group: ChannelGroup,
    keep: torch.Tensor,
    removed: dict[tuple[str, bool], list[int]],
) -> None:
    """Removes the channels of ``group`` that ``keep`` drops. ``removed`` holds, per (Linear
    layer, out-dim), the positions of the full model that earlier groups removed from it; it
    is updated."""
    root = group.root
    dropped = root.index[~keep[root.channel]].tolist()
    if not dropped:
        return
    try:
        module = model.get_submodule(root.module_name)
    except AttributeError as err:
        raise CompressError(f"the model has no layer {root.module_name!r}") from err
    if module not in dg.module2node:
        raise CompressError(f"layer {root.module_name!r} is not used in the forward pass")
    fn = dg.get_pruner_of_module(module).prune_out_channels
    tp_group = searched(dg, module, fn, sorted(dropped))
    _use_member_positions(dg, tp_group, group, keep, removed)
    tp_group.prune(record_history=False)


def _use_member_positions(
    dg: tp.DependencyGraph,
    tp_group: tp.dependency.Group,
    group: ChannelGroup,
    keep: torch.Tensor,
    removed: dict[tuple[str, bool], list[int]],
) -> None:
    """Gives every Linear layer of ``tp_group`` the positions ``group`` drops from it, where
    Torch-Pruning's index mapping differs: it maps through attention as if the key and value
    projections of grouped-query attention were as wide as the query projection
    (:func:`compress.pruning.attention.grouped_query_heads` maps them).

    A member's positions are those of the full model, and the layer has already lost the
    positions ``removed`` lists (a classifier after a concat of several groups' channels, as in
    DenseNet): each position moves down by the removed positions below it, so that it names
    the same channel in the layer as it is now."""
    full: dict[tuple[str, bool], list[int]] = {}
    for m in group.members:
        if m.param_name == "weight" and m.role in ("producer", "consumer"):
            full[(m.module_name, m.role == "producer")] = m.index[~keep[m.channel]].tolist()
    want: dict[tuple[str, bool], list[int]] = {}
    for key, positions in full.items():
        gone = removed.get(key, [])
        want[key] = sorted(i - bisect.bisect_left(gone, i) for i in positions)
        removed[key] = sorted(gone + positions)
    params = {f"{m.module_name}.{m.param_name}".lstrip(".") for m in group.members}
    for k, item in enumerate(tp_group.items):
        layer = item.dep.target.module
        if isinstance(layer, nn.Parameter) and dg._param_to_name.get(layer) not in params:
            tp_group[k] = type(item)(item.dep, [])  # shared by all heads (Qwen3's q/k norms)
        if not isinstance(layer, nn.Linear):
            continue
        key = (dg._module2name.get(layer, ""), dg.is_out_channel_pruning_fn(item.dep.handler))
        if key in want and sorted(item.idxs) != want[key]:
            tp_group[k] = type(item)(item.dep, want[key])


def pruning_plan(
    groups: Sequence[ChannelGroup], keep: Mapping[str, torch.Tensor]
) -> dict[str, list[int]]:
    """Kept channel indices per group name: enough to rebuild the small model from its class."""
    by_name = {g.name: g for g in groups}
    return {
        name: torch.nonzero(check_keep(by_name[name], k)).flatten().tolist()
        for name, k in keep.items()
        if name in by_name
    }


def leaves(out: object) -> list[torch.Tensor]:
    """The tensors of a model's output (nested in dicts, lists and tuples), as float."""
    if isinstance(out, torch.Tensor):
        return [out if out.is_floating_point() else out.float()]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in leaves(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in leaves(v)]
    return []


def round_keep(size: int, n_keep: int, round_to: int = 8, unit: int = 1) -> int:
    """Hardware-friendly kept width, as NNCF rounds filter counts.

    For a layer at least ``round_to`` wide, ``n_keep`` goes to the nearest multiple of
    ``round_to`` (halves round up), never below ``round_to`` and never above ``size``. Narrower
    layers, and ``round_to <= 1``, only clamp to ``[1, size]``. Never returns 0.

    ``unit`` is the number of layer channels one group channel stands for (a grouped conv keeps
    the same offset in each of its conv groups, a head is ``head_dim`` channels): the rounding
    is then of ``n_keep * unit`` channels, so a grouped conv of group width 8 with 4 conv groups
    rounds its 8 group channels to multiples of 2, not 8, and rounding cannot undo the pruning.

    Example:
        >>> round_keep(64, 29, 8), round_keep(64, 3, 8), round_keep(20, 20, 8), round_keep(6, 0, 8)
        (32, 8, 20, 1)
        >>> round_keep(8, 4, 8), round_keep(8, 4, 8, unit=4), round_keep(8, 3, 8, unit=8)
        (8, 4, 3)
    """
    n_keep = min(max(n_keep, 1), size)
    step = round_to // math.gcd(round_to, unit) if round_to > 1 else 1
    if step <= 1 or size * unit < round_to:
        return n_keep
    rounded = math.floor(n_keep / step + 0.5) * step
    return min(max(rounded, step), size)
