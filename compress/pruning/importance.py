"""Filter importance criteria: ``(model, group) -> one score per channel`` of a channel group.

As NNCF 2.17: each criterion scores the filters of every layer that produces the group's
channels from the layer's weight alone (biases are not scored), and a group coupled over
several layers (a residual add, a depthwise conv) sums the per-layer scores. With
``normalise`` every weight is first divided by its L2 norm, as NNCF does before ranking the
filters of all layers together (``all_weights``). ``FILTER_IMPORTANCE`` maps the recipe's
``filter_importance`` names to the criteria computed from weights alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import nn

from compress import distributed
from compress.pruning.structured import ChannelGroup


class Criterion(Protocol):
    def __call__(
        self, model: nn.Module, group: ChannelGroup, *, normalise: bool = False
    ) -> torch.Tensor: ...


def _summed(
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    normalise: bool,
    score: Callable[[torch.Tensor], torch.Tensor],
    *,
    per_row: bool,
) -> list[torch.Tensor]:
    """Each group's scores: ``score(rows)`` per producing layer, where ``rows[j]`` is the
    flattened weight slice of group channel ``channel[j]`` (divided by the whole weight's L2
    norm with ``normalise``), added up per channel in layer order.

    A weight sharded by FSDP2 is scored where it lies when the criterion is ``per_row`` (each
    score reads its own filter only) and the filters are rows (``Shard(0)`` cuts dim 0): each
    rank scores the filters it holds, and one all-reduce of the scores of every such layer of
    every group (zeros where a rank holds nothing) gives every rank the scores one process
    computes; the norms too are summed over the ranks with one all-reduce for all layers.
    Otherwise the layer is gathered whole, one layer at a time."""
    producers = [
        (j, member, param)
        for j, group in enumerate(groups)
        for member in group.members
        if member.role == "producer" and not member.param_name.endswith("bias")
        for param in [model.get_submodule(member.module_name)._parameters[member.param_name]]
    ]
    weights = [param.detach().float() for _, _, param in producers]  # type: ignore[union-attr]
    norms: list[torch.Tensor | None] = [None] * len(weights)
    if normalise:  # NNCF's expression, so that the bits agree (within a sum over ranks)
        squares = [torch.sum(torch.abs(distributed.local(w)) ** 2) for w in weights]
        norms = [torch.sqrt(torch.tensor(x)) for x in distributed.reduced(squares, weights)]
    found, summed = [], []
    for i, ((_, member, _), weight, norm) in enumerate(zip(producers, weights, norms)):
        n = len(member.index)
        local = per_row and member.dim == 0 and distributed.is_sharded(weight)
        if local:
            which, index = distributed.held(weight, member.dim, member.index)
            weight = distributed.local(weight)
            summed.append(i)
        else:
            which, index, weight = torch.arange(n), member.index, distributed.full(weight)
        rows = weight.index_select(member.dim, index.to(weight.device)).movedim(member.dim, 0)
        rows = rows.reshape(len(index), -1)
        if norm is not None:
            rows = rows / norm if norm > 0 else rows
        part = torch.zeros(n, device=rows.device)  # on the device the collective needs
        found.append(part.index_copy_(0, which.to(rows.device), score(rows)))
    if summed:
        flat = distributed.sum_over_ranks(torch.cat([found[i] for i in summed]), weights[summed[0]])
        for i, part in zip(summed, flat.split([len(found[i]) for i in summed])):
            found[i] = part
    scores = [torch.zeros(g.size) for g in groups]
    for (j, member, _), part in zip(producers, found):
        scores[j].index_add_(0, member.channel, part.cpu())
    return scores


def group_scores(
    model: nn.Module, groups: Sequence[ChannelGroup], criterion: str, *, normalise: bool = False
) -> dict[str, torch.Tensor]:
    """``FILTER_IMPORTANCE[criterion](model, g, normalise=normalise)`` of every group ``g``,
    by name; the sums over the ranks of sharded layers run once for all groups (two
    all-reduces in all, not one or two per layer).

    Example:
        >>> from compress.pruning.structured import channel_groups  # doctest: +SKIP
        >>> group_scores(model, channel_groups(model, x), "L1")  # doctest: +SKIP
    """
    per_row = criterion in _PER_ROW
    found = _summed(model, groups, normalise, ROW_SCORES[criterion], per_row=per_row)
    return {g.name: s for g, s in zip(groups, found)}


_PER_ROW = frozenset({"L1", "L2"})
"""The criteria whose score of a filter reads that filter alone (``_summed``'s ``per_row``)."""

ROW_SCORES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "L1": lambda rows: torch.norm(rows, p=1, dim=1),
    "L2": lambda rows: torch.norm(rows, p=2, dim=1),
    "geometric_median": lambda rows: torch.cdist(rows[None], rows[None]).squeeze(0).sum(0),
}
"""One score per row of one layer's filters (rows: [filters, elements]): the criteria below per
layer, and per expert matrix for the widths of mixture-of-experts layers
(:mod:`compress.pruning.moe`)."""


def l1_importance(
    model: nn.Module, group: ChannelGroup, *, normalise: bool = False
) -> torch.Tensor:
    """Sum over the group's layers of each filter's L1 norm."""
    return group_scores(model, [group], "L1", normalise=normalise)[group.name]


def l2_importance(
    model: nn.Module, group: ChannelGroup, *, normalise: bool = False
) -> torch.Tensor:
    """Sum over the group's layers of each filter's L2 norm (NNCF adds norms, not squares)."""
    return group_scores(model, [group], "L2", normalise=normalise)[group.name]


def geometric_median_importance(
    model: nn.Module, group: ChannelGroup, *, normalise: bool = False
) -> torch.Tensor:
    """FPGM (He et al. 2019): a filter near the geometric median of its layer is the one the
    others can replace, so the score is the sum of Euclidean distances from a filter to every
    other filter of the same layer, summed over the group's layers."""
    return group_scores(model, [group], "geometric_median", normalise=normalise)[group.name]


FILTER_IMPORTANCE: dict[str, Criterion] = {
    "L1": l1_importance,
    "L2": l2_importance,
    "geometric_median": geometric_median_importance,
}


def feature_map_nuclear_norms(output: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Per channel, the nuclear norm (sum of singular values) of each sample's feature map,
    summed over the samples. Maps of conv2d are H x W matrices; 1-D maps (Linear, conv1d) are
    vectors, whose nuclear norm is their L2 norm; deeper maps are flattened to (D, H * W).

    Example:
        >>> fmap = torch.zeros(1, 1, 2, 2)
        >>> fmap[0, 0] = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
        >>> feature_map_nuclear_norms(fmap, 1)
        tensor([4.])
    """
    x = output.detach().float().movedim(channel_dim, 1)
    rows = x.shape[2] if x.dim() > 2 else 1
    maps = x.reshape(x.shape[0], x.shape[1], rows, -1)
    return torch.linalg.matrix_norm(maps, ord="nuc").sum(0)
