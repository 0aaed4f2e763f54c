"""Importance criteria (tensor -> scores) and exact threshold selection.

Weights with the lowest scores are pruned. ``global_keep_masks`` prunes exactly ``k`` weights
over many tensors without concatenating them: NNCF's global mode concatenates every weight into
one tensor and runs out of memory on large models.

Example:
    >>> import torch
    >>> keep = global_keep_masks([torch.tensor([3.0, 1.0, 2.0]), torch.tensor([1.0, 5.0])], 2)
    >>> [m.tolist() for m in keep]
    [[True, False, True], [False, True]]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from compress import distributed
from compress.errors import ConfigError


def abs_importance(weight: torch.Tensor) -> torch.Tensor:
    """|w|."""
    return weight.detach().abs()


def normed_abs_importance(weight: torch.Tensor, norm: torch.Tensor | None = None) -> torch.Tensor:
    """|w| / ||W||_2, NNCF's default, so that one global threshold treats layers fairly.
    ``norm``: ||W||_2 when it is known already (``distributed.norms`` finds those of many
    sharded weights with one all-reduce)."""
    w = weight.detach()
    if norm is None:
        norm = distributed.norms([w])[0]
    part = distributed.local(w).abs()
    return distributed.like(part.div_(norm) if norm > 0 else part, w)


def random_importance(weight: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A fixed random score per weight: the random-pruning baseline. Zeros stay lowest, so
    masks only grow as the level rises."""
    gen = torch.Generator().manual_seed(seed)
    scores = distributed.shard_like(torch.rand(weight.shape, generator=gen) + 1.0, weight)
    scores = scores.to(weight.device)
    return torch.where(weight.detach() == 0, torch.zeros_like(scores), scores)


IMPORTANCE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "abs": abs_importance,
    "normed_abs": normed_abs_importance,
    "random": random_importance,
}


def _keep_with_ties(scores: torch.Tensor, threshold: torch.Tensor, n_ties: int) -> torch.Tensor:
    """Keeps scores > threshold, and all but the first ``n_ties`` scores equal to it."""
    if not n_ties:
        return scores >= threshold
    keep = scores > threshold
    ties = (scores == threshold).flatten().nonzero().squeeze(1)
    keep.view(-1)[ties[n_ties:]] = True
    return keep


def local_keep_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask that prunes exactly ``k`` of the lowest scores (ties broken by position)."""
    n = scores.numel()
    if distributed.is_sharded(scores):
        return distributed.global_keep_masks([scores], k)[0]
    if k <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    if k >= n:
        return torch.zeros_like(scores, dtype=torch.bool)
    flat = scores.flatten()
    t = flat.kthvalue(k).values
    below = int((flat < t).sum())
    return _keep_with_ties(scores, t, k - below)


def local_keep_masks(scores: Sequence[torch.Tensor], ks: Sequence[int]) -> list[torch.Tensor]:
    """``local_keep_mask(s, k)`` of every (s, k) of ``scores`` and ``ks``; sharded scores are
    selected together (``distributed.keep_masks``: one all-reduce per radix pass for all of
    them, not one per tensor)."""
    sharded = [i for i, s in enumerate(scores) if distributed.is_sharded(s)]
    found = distributed.keep_masks([[scores[i]] for i in sharded], [ks[i] for i in sharded])
    out = dict(zip(sharded, (keep for [keep] in found)))
    return [
        out[i] if i in out else local_keep_mask(s, k) for i, (s, k) in enumerate(zip(scores, ks))
    ]


def global_keep_masks(
    scores: Sequence[torch.Tensor], k: int, sample: int = 1 << 18
) -> list[torch.Tensor]:
    """Bool masks that prune exactly ``k`` of the lowest scores over all tensors together.

    A random sample brackets the k-th score; only the scores inside the bracket are gathered
    to find it exactly, so memory stays about the size of the largest tensor. Ties at the
    threshold are pruned in tensor order, then by position.
    """
    if distributed.group_of(scores) is not None:
        return distributed.global_keep_masks(scores, k)
    total = sum(s.numel() for s in scores)
    if k <= 0:
        return [torch.ones_like(s, dtype=torch.bool) for s in scores]
    if k >= total:
        return [torch.zeros_like(s, dtype=torch.bool) for s in scores]
    t, below, bands = _kth_smallest(scores, k, total, sample)
    ties_left = k - sum(b + int((band < t).sum()) for b, band in zip(below, bands))
    out = []
    for s, band in zip(scores, bands):
        take = min(ties_left, int((band == t).sum()))
        ties_left -= take
        out.append(_keep_with_ties(s, t, take))
    return out


def _kth_smallest(
    scores: Sequence[torch.Tensor], k: int, total: int, sample: int
) -> tuple[torch.Tensor, list[int], list[torch.Tensor]]:
    """The k-th smallest score; per tensor, the count below the bracket and the scores in it."""
    lo: torch.Tensor | None = None
    hi: torch.Tensor | None = None
    if total > sample:
        gen = torch.Generator().manual_seed(k)
        picks = []
        for s in scores:
            m = max(1, round(sample * s.numel() / total))
            idx = torch.randint(0, s.numel(), (m,), generator=gen).to(s.device)
            picks.append(s.flatten()[idx])
        pooled = torch.cat(picks)
        margin = 6.0 / pooled.numel() ** 0.5  # several standard errors of a sample quantile
        lo = _quantile(pooled, k / total - margin)
        hi = _quantile(pooled, k / total + margin)
    while True:
        below, bands = [], []
        for s in scores:
            flat = s.flatten()
            if lo is None:
                in_band, n_lo = torch.ones_like(flat, dtype=torch.bool), 0
            else:
                # count_nonzero: sum() of a bool tensor casts it to int64 first, 3x slower
                in_band = flat >= lo
                n_lo = flat.numel() - int(torch.count_nonzero(in_band))
            if hi is not None:
                in_band &= flat <= hi
            below.append(n_lo)
            bands.append(flat[in_band])
        n_below = sum(below)
        if n_below < k <= n_below + sum(b.numel() for b in bands):
            return torch.cat(bands).kthvalue(k - n_below).values, below, bands
        # The sample missed (rare): open the side that failed and look again.
        if n_below >= k:
            lo = None
        else:
            hi = None


def _quantile(x: torch.Tensor, q: float) -> torch.Tensor | None:
    if q <= 0 or q >= 1:
        return None
    return x.kthvalue(max(1, int(q * x.numel()))).values


def block_scores(weight: torch.Tensor, block_shape: tuple[int, int]) -> torch.Tensor:
    """L2 norm of each ``block_shape`` block of a weight, as a [ceil(rows/bh), ceil(cols/bw)] grid.

    Pruning whole blocks by this score gives BSR-friendly sparsity, which on this CPU runs up to
    about 2x faster than CSR at the same sparsity (docs/sparse_runtime.md). Edge blocks are
    zero-padded; weights with more than two dims are viewed as [out, rest] like a 1x1 conv.

    Example:
        >>> block_scores(torch.ones(4, 6), (2, 4))
        tensor([[2.8284, 2.0000],
                [2.8284, 2.0000]])
    """
    bh, bw = block_shape
    if bh < 1 or bw < 1:
        raise ConfigError(f"block_scores: block_shape={block_shape!r}; both sizes must be >= 1")
    w = weight.detach().flatten(1) if weight.dim() > 2 else weight.detach()
    rows, cols = w.shape
    padded = torch.nn.functional.pad(w, (0, -cols % bw, 0, -rows % bh))
    blocks = padded.reshape(padded.shape[0] // bh, bh, padded.shape[1] // bw, bw)
    return blocks.pow(2).sum(dim=(1, 3)).sqrt()
