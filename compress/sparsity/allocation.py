"""Layerwise sparsity allocation: how a global sparsity target is split across layers.

Each allocation is a pure function ``(shapes, target, *, weights=None) -> list[float]`` giving
one sparsity per layer such that ``sum_l s_l * n_l == target * sum_l n_l`` (``n_l`` = number of
weights of layer ``l``), up to float rounding; each ``s_l`` is in ``[0, 1)``. Masks then prune
``round(s_l * n_l)`` weights of layer ``l`` by the algorithm's own criterion.

``ALLOCATIONS`` maps the recipe names to the functions. ``"global"`` (one magnitude threshold
over all layers) is not an allocation in this sense; the magnitude algorithm handles it.

Example:
    >>> [round(s, 4) for s in allocate("erk", [(100, 10), (10, 10)], 0.5)]
    [0.5346, 0.1538]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from compress.errors import ConfigError

Shape = tuple[int, ...]


def uniform(
    shapes: Sequence[Shape], target: float, *, weights: Sequence[torch.Tensor] | None = None
) -> list[float]:
    """Every layer at the target: ``s_l = target``.

    Example:
        >>> uniform([(100, 10), (10, 10)], 0.5)
        [0.5, 0.5]
    """
    return [float(target)] * len(shapes)


def erk(
    shapes: Sequence[Shape], target: float, *, weights: Sequence[torch.Tensor] | None = None
) -> list[float]:
    """Erdos-Renyi-Kernel (Evci et al., RigL, 2020): thin layers keep more of their weights.

    ``density_l = eps * (sum of dims) / (product of dims)`` of the weight shape, i.e.
    ``(n_out + n_in) / (n_out * n_in)`` for Linear and
    ``(n_out + n_in + k_h + k_w) / (n_out * n_in * k_h * k_w)`` for conv. The common ``eps``
    solves ``sum_l density_l * n_l = (1 - target) * N``. A layer whose density would exceed 1 is
    made dense and ``eps`` is re-solved over the others (RigL's loop, one layer at a time, the
    one with the largest raw density first): ``eps = (sum_{l sparse} n_l (1 - target)
    - sum_{l dense} n_l * target) / sum_{l sparse} raw_l * n_l``. ``s_l = 1 - density_l``.

    Example:
        >>> [round(s, 4) for s in erk([(100, 10), (10, 10)], 0.2)]  # layer 2 capped dense
        [0.22, 0.0]
    """
    counts = [math.prod(shape) for shape in shapes]
    raw = [sum(shape) / n for shape, n in zip(shapes, counts, strict=True)]
    dense: set[int] = set()
    while True:
        sparse = [i for i in range(len(shapes)) if i not in dense]
        if not sparse or target == 0:
            return [0.0] * len(shapes)
        rhs = sum(counts[i] * (1 - target) for i in sparse) - sum(counts[i] * target for i in dense)
        eps = rhs / sum(raw[i] * counts[i] for i in sparse)
        top = max(raw[i] for i in sparse)
        if eps * top <= 1:
            return [0.0 if i in dense else 1.0 - eps * raw[i] for i in range(len(shapes))]
        dense |= {i for i in sparse if raw[i] == top}


def igq(
    shapes: Sequence[Shape], target: float, *, weights: Sequence[torch.Tensor] | None = None
) -> list[float]:
    """Ideal Gas Quotas (Vysogorets & Kempe, "Connectivity Matters", arXiv 2107.02306, Sec. 6).

    Each layer is a gas cylinder of length ``L_l = n_l`` (its weight count) and cross-section
    ``A_l = 1 / n_l``; one force ``F`` compresses all of them. By the ideal gas law the pressure
    ``F / A_l`` shortens cylinder ``l`` to ``L_l / (F / A_l + 1)``, so layer ``l`` keeps
    ``n_l / (F * n_l + 1)`` weights:

        s_l = 1 - 1 / (1 + F * n_l) = F * n_l / (1 + F * n_l)

    with ``F >= 0`` solving ``sum_l n_l / (1 + F * n_l) = (1 - target) * N`` (found by
    bisection, as in the authors' code). Large layers are pruned more, yet no layer is ever
    pruned completely, and no cap is needed: every ``s_l`` is in ``[0, 1)``.

    Example:
        >>> [round(s, 4) for s in igq([(100, 10), (10, 10)], 0.5)]
        [0.5395, 0.1049]
    """
    counts = [math.prod(shape) for shape in shapes]
    kept = (1.0 - target) * sum(counts)

    def remaining(force: float) -> float:
        return sum(n / (1.0 + force * n) for n in counts)

    if target == 0 or not counts:
        return [0.0] * len(counts)
    low, high = 0.0, 1.0
    while remaining(high) > kept:
        low, high = high, 2 * high
    for _ in range(200):  # halves [low, high] down to float resolution
        middle = (low + high) / 2
        if middle in (low, high):
            break
        low, high = (middle, high) if remaining(middle) > kept else (low, middle)
    force = (low + high) / 2
    return [force * n / (1.0 + force * n) for n in counts]


def lamp_scores(weight: torch.Tensor) -> torch.Tensor:
    """LAMP scores (Lee et al., "Layer-adaptive sparsity for the magnitude-based pruning", 2021).

    Sort the layer's weights ascending by magnitude; weight ``u`` scores

        score(u) = w_u^2 / sum_{v >= u} w_v^2

    (the sum runs over ``u`` and every weight ranked above it). The largest weight of a layer
    scores 1, so pruning the globally lowest scores never empties a layer that has a nonzero
    weight, and the scores are comparable across layers without any per-layer tuning. Ties
    are ranked by flat index (stable sort); an all-zero tail scores 0.

    Example:
        >>> lamp_scores(torch.tensor([1.0, 3.0, 2.0]))
        tensor([0.0714, 1.0000, 0.3077])
    """
    return _lamp64(weight).to(weight.dtype if weight.is_floating_point() else torch.float32)


def _lamp64(weight: torch.Tensor) -> torch.Tensor:
    squared = weight.detach().double().flatten() ** 2
    ordered, order = torch.sort(squared, stable=True)
    tail = ordered.flip(0).cumsum(0).flip(0)
    sorted_scores = torch.where(tail > 0, ordered / tail.clamp_min(1e-300), 0.0)
    return torch.empty_like(squared).scatter_(0, order, sorted_scores).view_as(weight)


def slamp_scores(channel_scores: torch.Tensor) -> torch.Tensor:
    """Structured LAMP (NetsPresso's "SLAMP"): LAMP applied to one layer's channel importances.

    With ``c`` ranked ascending by importance ``I_c`` (an L1/L2 norm or any other criterion),

        slamp(c) = I_c^2 / sum_{c' >= c} I_{c'}^2

    so the most important channel of every layer scores 1 and scores from different layers can
    be ranked together for global filter pruning.

    Example:
        >>> slamp_scores(torch.tensor([3.0, 1.0, 2.0]))
        tensor([1.0000, 0.0714, 0.3077])
    """
    if channel_scores.dim() != 1:
        raise ValueError(
            f"slamp_scores expects one score per channel (a 1-D tensor), "
            f"got shape {tuple(channel_scores.shape)}"
        )
    return lamp_scores(channel_scores)


def lamp(
    shapes: Sequence[Shape], target: float, *, weights: Sequence[torch.Tensor] | None = None
) -> list[float]:
    """LAMP: prune the ``round(target * N)`` weights with the lowest ``lamp_scores`` globally.

    ``s_l = (pruned weights of layer l) / n_l``; see ``lamp_scores`` for the score. Needs the
    layers' ``weights``. The count is exact: ``sum_l s_l * n_l = round(target * N)``.

    Example:
        >>> weights = [torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[10.0, 20.0]])]
        >>> lamp([(1, 3), (1, 2)], 0.4, weights=weights)  # magnitude would prune 1.0 and 2.0
        [0.3333333333333333, 0.5]
    """
    if weights is None:
        raise ConfigError("the 'lamp' allocation needs the layers' weights (weights=...)")
    if not shapes:
        return []
    scores = torch.cat([_lamp64(w).flatten() for w in weights])
    pruned = torch.zeros(scores.numel(), dtype=torch.bool)
    pruned[torch.sort(scores, stable=True).indices[: round(target * scores.numel())]] = True
    counts = [math.prod(shape) for shape in shapes]
    per_layer = pruned.split(counts)
    return [int(p.sum()) / n for p, n in zip(per_layer, counts, strict=True)]


AllocationFn = Callable[..., list[float]]

ALLOCATIONS: dict[str, AllocationFn] = {
    "uniform": uniform,
    "erk": erk,
    "igq": igq,
    "lamp": lamp,
}


def allocate(
    method: str,
    shapes: Sequence[Shape],
    target: float,
    *,
    weights: Sequence[torch.Tensor] | None = None,
) -> list[float]:
    """Per-layer sparsities for ``method`` (a key of ``ALLOCATIONS``) at overall ``target``.

    ``shapes`` are the weight shapes of the pruned layers, in order; ``weights`` (same order and
    shapes) are needed by ``"lamp"`` only. The result keeps
    ``sum_l s_l * n_l == target * sum_l n_l`` up to rounding, with each ``s_l`` in ``[0, 1)``.

    Example:
        >>> allocate("uniform", [(100, 10), (10, 10)], 0.5)
        [0.5, 0.5]
    """
    if method not in ALLOCATIONS:
        hint = " ('global' is a magnitude-threshold mode, not a layerwise allocation)"
        raise ConfigError(
            f"allocation {method!r} is not one of {sorted(ALLOCATIONS)}"
            + (hint if method == "global" else "")
        )
    if not isinstance(target, (int, float)) or not 0.0 <= target < 1.0:
        raise ConfigError(f"sparsity target {target!r} is not in [0, 1)")
    shapes = [tuple(int(d) for d in shape) for shape in shapes]
    if any(not shape or min(shape) < 1 for shape in shapes):
        raise ConfigError(f"every layer shape needs positive dimensions, got {shapes}")
    if weights is not None:
        got = [tuple(w.shape) for w in weights]
        if got != shapes:
            raise ConfigError(f"weights have shapes {got}, expected {shapes}")
    return ALLOCATIONS[method](shapes, float(target), weights=weights)


__all__ = [
    "ALLOCATIONS",
    "allocate",
    "erk",
    "igq",
    "lamp",
    "lamp_scores",
    "slamp_scores",
    "uniform",
]
