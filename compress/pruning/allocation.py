"""How many channels each group keeps, and which: one ranking of all groups' channels for the
``global`` and ``slamp`` allocations of filter pruning (scores made comparable per group; the
``uniform`` allocation puts every group at the level and needs no ranking), and the
top-scored channels of a group as a keep mask.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from compress.pruning.structured import ChannelGroup
from compress.sparsity.allocation import slamp_scores

__all__ = ["global_counts", "top"]


def top(scores: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` highest scores; ties go to the lower index."""
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[torch.argsort(scores, descending=True, stable=True)[:n]] = True
    return keep


def global_counts(
    groups: list[ChannelGroup], scores: Mapping[str, torch.Tensor], ratio: float, *, slamp: bool
) -> dict[str, int]:
    """Kept channels per group after one ranking of all groups' channels. Scores are made
    comparable per layer: unit L2 norm per group (NNCF normalises each weight), or SLAMP."""
    if not groups:
        return {}
    normed = []
    for g in groups:
        s = scores[g.name].float()
        norm = s.norm()
        normed.append(slamp_scores(s) if slamp else (s / norm if norm > 0 else s))
    sizes = [g.size for g in groups]
    owner = torch.repeat_interleave(torch.arange(len(groups)), torch.tensor(sizes))
    order = torch.argsort(torch.cat(normed), stable=True)
    n_prune = math.floor(ratio * sum(sizes) + 1e-9)
    pruned = torch.bincount(owner[order[:n_prune]], minlength=len(groups))
    return {g.name: g.size - int(p) for g, p in zip(groups, pruned, strict=True)}
