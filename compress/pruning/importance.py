"""Filter importance criteria: ``(model, group) -> one score per channel`` of a channel group.

As NNCF 2.17: each criterion scores the filters of every layer that produces the group's
channels from the layer's weight alone (biases are not scored), and a group coupled over
several layers (a residual add, a depthwise conv) sums the per-layer scores. With
``normalise`` every weight is first divided by its L2 norm, as NNCF does before ranking the
filters of all layers together (``all_weights``). ``FILTER_IMPORTANCE`` maps the recipe's
``filter_importance`` names to the criteria computed from weights alone.
"""

from __future__ import annotations

from collections.abc import Callable
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
    group: ChannelGroup,
    normalise: bool,
    score: Callable[[torch.Tensor], torch.Tensor],
    *,
    per_row: bool,
) -> torch.Tensor:
    """The group's scores: ``score(rows)`` per producing layer, where ``rows[j]`` is the
    flattened weight slice of group channel ``channel[j]`` (divided by the whole weight's L2
    norm with ``normalise``), added up per channel in layer order.

    A weight sharded by FSDP2 is scored where it lies when the criterion is ``per_row`` (each
    score reads its own filter only) and the filters are rows (``Shard(0)`` cuts dim 0): each
    rank scores the filters it holds, and one all-reduce of the layer's scores (zeros where a
    rank holds nothing) gives every rank the scores one process computes. Otherwise the layer
    is gathered whole, one layer at a time."""
    scores = torch.zeros(group.size)
    for member in group.members:
        if member.role != "producer" or member.param_name.endswith("bias"):
            continue
        param = model.get_submodule(member.module_name)._parameters[member.param_name]
        assert param is not None  # a member names a parameter that is set
        weight = param.detach().float()
        if normalise:  # NNCF's expression, so that the bits agree (within a sum over ranks)
            norm = torch.sqrt(torch.tensor(distributed.scalar(torch.sum(torch.abs(weight) ** 2))))
        n = len(member.index)
        local = per_row and member.dim == 0 and distributed.is_sharded(weight)
        if local:
            which, index = distributed.held(weight, member.dim, member.index)
            weight = distributed.local(weight)
        else:
            which, index, weight = torch.arange(n), member.index, distributed.full(weight)
        rows = weight.index_select(member.dim, index.to(weight.device)).movedim(member.dim, 0)
        rows = rows.reshape(len(index), -1)
        if normalise:
            rows = rows / norm if norm > 0 else rows
        found = torch.zeros(n, device=rows.device)  # on the device the collective needs
        found.index_copy_(0, which.to(rows.device), score(rows))
        if local:
            distributed.sum_over_ranks(found, param)
        scores.index_add_(0, member.channel, found.cpu())
    return scores


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
    return _summed(model, group, normalise, ROW_SCORES["L1"], per_row=True)


def l2_importance(
    model: nn.Module, group: ChannelGroup, *, normalise: bool = False
) -> torch.Tensor:
    """Sum over the group's layers of each filter's L2 norm (NNCF adds norms, not squares)."""
    return _summed(model, group, normalise, ROW_SCORES["L2"], per_row=True)


def geometric_median_importance(
    model: nn.Module, group: ChannelGroup, *, normalise: bool = False
) -> torch.Tensor:
    """FPGM (He et al. 2019): a filter near the geometric median of its layer is the one the
    others can replace, so the score is the sum of Euclidean distances from a filter to every
    other filter of the same layer, summed over the group's layers."""
    return _summed(model, group, normalise, ROW_SCORES["geometric_median"], per_row=False)


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
