"""How many channels each group keeps, and which: the kept count of a group at a level
(rounded up to a multiple of ``round_to`` as NNCF 2.17 rounds, or to the nearest), one ranking
of all groups' channels for the ``global`` allocation (NNCF's ``all_weights``: one threshold on
scores of normalised weights) and for ``slamp``, and the top-scored channels of a group as a
keep mask.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from compress.pruning.structured import ChannelGroup, round_keep
from compress.sparsity.allocation import slamp_scores

__all__ = ["global_counts", "global_keep", "kept_count", "top"]


def kept_count(
    size: int, level: float, round_to: int = 8, *, unit: int = 1, rounding: str = "up"
) -> int:
    """The channels a group of ``size`` keeps at ``level``; at least 1.

    ``up`` (NNCF 2.17's ``get_rounded_pruned_element_number``): the kept count
    ``size - size * level`` rounded up to a multiple of ``round_to``, at most ``size``, so a
    group no wider than ``round_to`` keeps every channel. ``nearest``: the pruned count
    ``floor(level * size)`` removed, the rest rounded to the nearest multiple of ``round_to``
    (never below it) where the group is at least ``round_to`` wide (:func:`round_keep`).
    ``unit`` is the number of layer channels one group channel stands for (see
    :func:`round_keep`).

    Example:
        >>> kept_count(16, 0.4), kept_count(64, 0.6), kept_count(64, 0.6, rounding="nearest")
        (16, 32, 24)
    """
    if rounding == "nearest":
        return round_keep(size, size - math.floor(level * size + 1e-9), round_to, unit)
    step = round_to // math.gcd(round_to, unit) if round_to > 1 else 1
    kept = math.ceil((size - size * level) / step) * step  # NNCF's expression, bit for bit
    return min(max(kept, 1), size)


def global_keep(
    groups: list[ChannelGroup], scores: Mapping[str, torch.Tensor], level: float, least: int
) -> dict[str, torch.Tensor]:
    """Keep masks after one ranking of all groups' channels, as NNCF 2.17's ``all_weights``:
    the threshold is the score at index ``int(level * n)`` of the ``n`` sorted scores and every
    channel below it is pruned. A group left with no channel (NNCF leaves it empty) keeps its
    ``least`` best ones."""
    if not groups:
        return {}
    flat = torch.cat([scores[g.name].float() for g in groups])
    threshold = torch.sort(flat).values[min(int(level * flat.numel()), flat.numel() - 1)]
    keep = {}
    for g in groups:
        k = scores[g.name].float() >= threshold
        keep[g.name] = k if k.any() else top(scores[g.name], min(least, g.size))
    return keep


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
