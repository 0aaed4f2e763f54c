"""NNCF 2.17's two searches for ``pruning_flops_target``, as pure functions of a MACs counter.

Uniform allocation: bisection of the filter ratio on [0, 1] down to an interval of 0.01,
keeping the upper end, the first ratio tried that leaves fewer MACs than the goal (so the
result may remove much more than the target). Global allocation (``all_weights``): filters are
pruned one at a time in the order of their ranking scores, at most 90% of any group, until
fewer MACs than the goal remain; MACs only fall as the prefix grows, so the shortest such
prefix is found by bisection on its length.

Example:
    >>> uniform_ratio(lambda r: round(100 * (1 - r)), 60.0)  # 100 MACs, remove 40%
    0.40625
    >>> ranking_order([3, 2], [[0.1, 0.5, 0.9], [0.2, 0.3]], quota=0.9)
    [(0, 0), (1, 0), (0, 1)]
    >>> shortest_prefix(10, lambda n: 100 - 10 * n, 45.0)
    6
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

__all__ = ["QUOTA", "ranking_order", "shortest_prefix", "uniform_ratio"]

QUOTA = 0.9
"""NNCF's FLOPs-target ranking prunes at most this fraction of a group's channels."""


def uniform_ratio(macs: Callable[[float], int], goal: float) -> float:
    """The filter ratio NNCF's bisection keeps for ``macs(ratio) < goal``."""
    left, right = 0.0, 1.0
    while abs(right - left) > 0.01:
        middle = (left + right) / 2
        left, right = (left, middle) if macs(middle) < goal else (middle, right)
    return right


def ranking_order(
    sizes: Sequence[int], scores: Sequence[Sequence[float]], *, quota: float = QUOTA
) -> list[tuple[int, int]]:
    """(group, channel) in the order NNCF prunes them: ascending score (ties in group order),
    skipping a group's channels past ``floor(size * quota)``."""
    entries = sorted(
        ((s, i, c) for i, group in enumerate(scores) for c, s in enumerate(group)),
        key=lambda entry: entry[0],
    )
    left = [math.floor(size * quota) for size in sizes]
    order = []
    for _, i, c in entries:
        if left[i] > 0:
            left[i] -= 1
            order.append((i, c))
    return order


def shortest_prefix(n: int, macs: Callable[[int], int], goal: float) -> int:
    """The fewest of the ``n`` ordered channels whose pruning leaves ``macs(k) < goal``; ``n``
    when even all of them fall short."""
    lo, hi = 1, n
    if n == 0 or macs(hi) >= goal:
        return n
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if macs(mid) < goal else (mid + 1, hi)
    return lo
