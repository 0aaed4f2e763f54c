"""Filter importance criteria: ``(model, group) -> one score per channel`` of a channel group.

Scores are taken over every layer slice that produces the group's channels, so coupled layers
(a residual add, a depthwise conv) are ranked together. ``FILTER_IMPORTANCE`` maps the recipe's
``filter_importance`` names to the criteria computed from weights alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from compress.pruning.structured import ChannelGroup, channel_norms, group_weights

Criterion = Callable[[nn.Module, ChannelGroup], torch.Tensor]


def l1_importance(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """Sum of |w| over every slice that produces the channel (all layers of the group)."""
    return channel_norms(model, group, p=1)


def l2_importance(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """L2 norm of everything that produces the channel, taken together."""
    return channel_norms(model, group, p=2).sqrt()


def geometric_median_importance(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """FPGM (He et al. 2019): a filter near the geometric median of its layer is the one the
    others can replace, so the score is the sum of Euclidean distances from a filter to every
    other filter of the same layer, summed over the group's producers."""
    scores = torch.zeros(group.size)
    for rows, channel in group_weights(model, group, roles=("producer",)):
        rows = rows.float()
        scores.index_add_(0, channel, torch.cdist(rows, rows).sum(1))
    return scores


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
