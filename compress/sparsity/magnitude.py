"""Magnitude sparsity (NNCF ``magnitude_sparsity``): prune the weights of lowest importance.

At every schedule event the level is read from the schedule and the masks are recomputed from
the current weights, until ``sparsity_freeze_epoch``. In ``global`` mode exactly
round(level * N) of the N compressed weights are pruned under one threshold, ties included.

``layerwise_allocation`` shares the level among layers (uniform, erk, igq: a level per layer;
lamp: one threshold on LAMP scores), and ``sparsity_target_type: effective`` searches the direct
level whose effective sparsity (weights zero or cut off from input or output) is the target.
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Mapping
from typing import Any

import torch

from compress import distributed, masks
from compress.algorithm import (
    Algorithm,
    attach_weight_masks,
    check_flag,
    check_fraction,
    check_numbers,
    matrices,
    param_name,
    sparsity_event,
    sparsity_rows,
    weight,
    weight_layers,
)
from compress.analysis.effective import active_weights
from compress.errors import CompressError
from compress.schedules import initial_level, schedule_position, sparsity_level
from compress.sparsity.allocation import allocate, lamp_scores
from compress.sparsity.importance import (
    IMPORTANCE,
    block_scores,
    global_keep_masks,
    local_keep_masks,
    normed_abs_importance,
    random_importance,
)


class MagnitudeSparsity(Algorithm):
    name = "magnitude_sparsity"

    def __init__(self, model, cfg, scheduler, example_inputs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(model, cfg, scheduler, example_inputs)
        self.layers = weight_layers(model, cfg)
        self.entries = attach_weight_masks(self.layers)
        self.init = float(cfg.options["sparsity_init"])
        self.frozen = False
        self.current = self.init  # the level the masks were computed at
        self.scheduled = initial_level(self.params, self.init)  # the level NNCF reports
        self.thresholds = [0.0] * len(self.entries)
        self.collapsed: set[str] = set()  # layers already warned about as fully pruned
        self.set_straight_through()

    def set_straight_through(self) -> None:
        """Pruned weights get the masked model's gradient while masks move (if asked)."""
        on = self.params["pruned_weights_gradient"] == "straight_through" and not self.frozen
        for name, module in self.layers:  # every module, tied weights included
            masks.straight_through(module, param_name(name, module), on=on)

    @property
    def level(self) -> float:
        """The schedule's level now, as NNCF reports it: after ``sparsity_freeze_epoch`` it
        keeps following the schedule while the masks stay where they froze."""
        return self.scheduled

    def update(self, per_step: bool) -> None:
        event = sparsity_event(self, self.frozen, per_step)
        if event == "init":
            self.set_level(self.init)
            self.scheduled = initial_level(self.params, self.init)
            self.warn_collapse()
            return
        if event == "skip":
            return
        p = self.params
        position = schedule_position(p, self.scheduler)
        assert position is not None  # sparsity_event skips before the schedule's first epoch
        self.scheduled = sparsity_level(p, self.init, position)
        if event == "freeze":
            self.frozen = True
            self.set_straight_through()
        if event != "update":
            return
        self.set_level(self.scheduled)
        self.warn_collapse()

    def set_level(self, level: float) -> None:
        """Moves to ``level`` now: the schedule's level, or one accuracy-aware training sets."""
        self.current = self.scheduled = level
        if self.params["sparsity_target_type"] == "effective":
            self.set_effective_masks(level)
        else:
            self.set_masks(level)

    def warn_collapse(self) -> None:
        """Warns (once per layer) when a layer is pruned to 100%: the network is then cut in two
        and computes a constant."""
        alive = distributed.reduced(
            [distributed.local(mask).any() for _, _, mask in self.entries],
            [mask for _, _, mask in self.entries],
            "max",
        )
        dead = [name for (name, _, _), any_kept in zip(self.entries, alive) if not any_kept]
        new = [name for name in dead if name not in self.collapsed]
        if new:
            self.collapsed.update(new)
            warnings.warn(
                f"{self.cfg.path}: layers {new} are pruned to 100% at level {self.current:.4g}: "
                "the network is disconnected and its output no longer depends on the input. "
                "Use an allocation that keeps every layer alive (params.layerwise_allocation: "
                '"erk", "igq" or "uniform", or sparsity_level_setting_mode: "local") or a '
                "lower sparsity_target",
                stacklevel=2,
            )

    def set_effective_masks(self, level: float, tolerance: float = 1e-4) -> float:
        """Sets the masks at the direct level whose effective sparsity is ``level``, by
        bisection (effective sparsity never falls as the direct level rises); returns the
        direct level. This is the low-cost extension of Vysogorets & Kempe (2023)."""
        lo, hi = 0.0, level
        for _ in range(30):
            mid = (lo + hi) / 2
            self.set_masks(mid)
            if self.effective_sparsity() < level:
                lo = mid
            else:
                hi = mid
            if hi - lo < tolerance:
                break
        self.set_masks(lo)
        reached = self.effective_sparsity()
        if abs(reached - level) > 0.01:
            warnings.warn(
                f"{self.cfg.path}: effective sparsity jumps past the target {level:.4f} "
                f"(whole units disconnect at once); reached {reached:.4f} at direct level "
                f"{lo:.4f}",
                stacklevel=2,
            )
        return lo

    def effective_sparsity(self) -> float:
        """Fraction of the compressed weights that are zero or on no input-output path."""
        active = active_weights(self.model, self.example_inputs)
        total = sum(m.numel() for _, _, m in self.entries)
        alive = sum(
            int(active[f"{name}.weight"].sum())
            for name, _, _ in self.entries
            if f"{name}.weight" in active
        )
        # fused experts are not in the path analysis: their nonzero weights count as active
        alive += sum(
            int(mask.count_nonzero())
            for name, module, mask in self.entries
            if param_name(name, module) != "weight"
        )
        return 1.0 - alive / total

    def set_masks(self, level: float) -> None:
        """Recomputes every mask so that ``level`` of the compressed weights are pruned."""
        p = self.params
        _check_sharded_options(p, self.entries)
        importance = IMPORTANCE[p["weight_importance"]]
        # One score tensor per matrix: a fused expert parameter gives one per expert, so that
        # allocation treats every expert as a layer of its own.
        weights = [weight(module, param_name(name, module)) for name, module, _ in self.entries]
        # one read of w and no bool tensor: a NaN or Inf anywhere makes the sum non-finite;
        # the sums of sharded weights are summed over the ranks together (one all-reduce)
        sums = [distributed.local(w).detach().sum(dtype=torch.float32) for w in weights]
        for (name, _, _), w, total in zip(
            self.entries, weights, distributed.reduced(sums, weights)
        ):
            if not math.isfinite(total) and not bool(torch.isfinite(w).all()):
                raise CompressError(
                    f"layer {name!r}: the weight holds NaN or Inf at epoch "
                    f"{self.scheduler.epoch}, step {self.scheduler.global_step}; lower the "
                    "learning rate or check the loss"
                )
        mats, keys, owners, others = [], [], [], []
        for i, ((name, module, _), w) in enumerate(zip(self.entries, weights)):
            other = masks.others(module, param_name(name, module))
            for j, m in enumerate(matrices(name, module, w)):
                mats.append(m)
                keys.append(name if m is w else f"{name}.{j}")
                owners.append(i)
                others.append(None if other is None else (other if m is w else other[j]))
        if p["weight_importance"] == "random":
            # One fixed pattern per layer (by name), the same on every rank and resume.
            scores = [random_importance(m, seed=zlib.crc32(k.encode())) for m, k in zip(mats, keys)]
        elif p["weight_importance"] == "normed_abs":
            # the norms of sharded weights with one all-reduce, not one each
            scores = [normed_abs_importance(m, n) for m, n in zip(mats, distributed.norms(mats))]
        else:
            scores = [importance(m) for m in mats]
        allocation = p["layerwise_allocation"]
        if p["sparsity_level_setting_mode"] == "local":
            allocation = "uniform"
        if allocation == "lamp":
            scores = [lamp_scores(s) for s in scores]
        # Weights another algorithm removed (filter pruning) are not ours to count or choose:
        # the level applies to the weights that remain.
        alive = [s.numel() for s in scores]
        removed = [(i, other) for i, other in enumerate(others) if other is not None]
        for i, other in removed:
            scores[i] = scores[i].masked_fill(torch.eq(other, 0), float("inf"))
        counts = [distributed.local(other).count_nonzero() for _, other in removed]
        for (i, _), n in zip(removed, distributed.reduced(counts, [o for _, o in removed])):
            alive[i] = int(n)
        block = p.get("block_shape")
        blocks = []
        if block:  # choose whole blocks (BSR-friendly); the level then counts blocks
            # A block never exceeds its layer (a [256, 256] block on a 10x100 layer is 10x100).
            blocks = [(min(block[0], s.shape[0]), min(block[1], s[0].numel())) for s in scores]
            sizes = [tuple(s.shape) for s in scores]
            scores = [block_scores(s, b) for s, b in zip(scores, blocks)]
            alive = [s.numel() for s in scores]
        if allocation in ("global", "lamp"):
            keeps = global_keep_masks(scores, round(level * sum(alive)))
        else:
            shapes = [tuple(s.shape) for s in scores]
            levels = allocate(allocation, shapes, level)
            keeps = local_keep_masks(scores, [round(x * n) for x, n in zip(levels, alive)])
        # no boolean indexing: gathering 90% of the scores took 40% of set_masks
        pruned = [_top(s, k) for k, s in zip(keeps, scores)]
        tops = distributed.reduced(pruned, scores, "max")
        inf = [j for j, top in enumerate(tops) if top == float("inf")]
        if inf:  # pruned a weight another algorithm removed: the largest finite score pruned
            finite = [
                _top(
                    scores[j],
                    distributed.local(keeps[j]) | ~torch.isfinite(distributed.local(scores[j])),
                )
                for j in inf
            ]
            for j, top in zip(inf, distributed.reduced(finite, [scores[j] for j in inf], "max")):
                tops[j] = top
        if block:
            keeps = [_expand_blocks(k, b, sz) for k, b, sz in zip(keeps, blocks, sizes)]
        of_entry: dict[int, list[int]] = {}
        for j, owner in enumerate(owners):
            of_entry.setdefault(owner, []).append(j)
        for i, (_, _, mask) in enumerate(self.entries):
            mine = of_entry[i]
            if len(mine) == 1 and keeps[mine[0]].shape == mask.shape:
                mask.copy_(keeps[mine[0]])
            else:
                mask.copy_(torch.stack([keeps[j] for j in mine]).reshape(mask.shape))
            top = max(tops[j] for j in mine)
            self.thresholds[i] = top if top != float("-inf") else 0.0

    def statistics(self) -> dict[str, Any]:
        rows = sparsity_rows(self.entries)
        for row, t in zip(rows, self.thresholds):
            row["threshold"] = t
        return {
            "algorithm": self.name,
            "level": self.scheduled,
            "frozen": self.frozen,
            "layers": rows,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "level": self.current,
            "scheduled": self.scheduled,
            "frozen": self.frozen,
            "thresholds": list(self.thresholds),
            "masks": {name: mask.bool().clone() for name, _, mask in self.entries},
        }

    def check_state(self, state: Mapping[str, Any]) -> None:
        check_fraction(f"{self.name}.scheduled", state.get("scheduled", state.get("level")))
        check_flag(f"{self.name}.frozen", state.get("frozen"))
        check_numbers(f"{self.name}.thresholds", state.get("thresholds"), len(self.entries))

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.current = float(state["level"])
        self.scheduled = float(state.get("scheduled", self.current))
        self.frozen = bool(state["frozen"])
        self.set_straight_through()
        self.thresholds = list(state["thresholds"])
        load_masks(self.entries, state["masks"], self.name)


def _top(scores: Any, keep: Any) -> torch.Tensor:
    """The largest score this rank holds of those ``keep`` prunes (-inf if none: a rank may
    hold no row of a small layer), on this rank's parts: no DTensor dispatch."""
    part = torch.where(distributed.local(keep), float("-inf"), distributed.local(scores))
    return part.amax() if part.numel() else part.new_tensor(float("-inf"))


def _expand_blocks(
    keep: torch.Tensor, block: tuple[int, int], shape: tuple[int, ...]
) -> torch.Tensor:
    """A [ceil(rows/bh), ceil(cols/bw)] block mask spread over a weight of ``shape`` ([out,
    rest])."""
    rows = shape[0]
    cols = math.prod(shape) // rows
    full = keep.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return full[:rows, :cols].reshape(shape)


def load_masks(entries: list, saved: Mapping[str, torch.Tensor], algorithm: str) -> None:  # type: ignore[type-arg]
    """Copies saved masks into the attached ones, checking that they belong to this model; a
    mask saved in another dtype (bool, or the float masks of earlier versions) is cast to the
    attached one's."""
    names = [name for name, _, _ in entries]
    if sorted(saved) != sorted(names):
        missing = sorted(set(names) - set(saved))
        extra = sorted(set(saved) - set(names))
        raise CompressError(
            f"{algorithm} state does not fit this model: layers missing from the state "
            f"{missing[:5]}, layers the model lacks {extra[:5]}"
        )
    for name, _, mask in entries:
        if tuple(saved[name].shape) != tuple(mask.shape):
            raise CompressError(
                f"{algorithm} state does not fit this model: layer {name!r} has shape "
                f"{tuple(mask.shape)}, the saved mask {tuple(saved[name].shape)}"
            )
        mask.copy_(distributed.shard_like(saved[name].to(mask.dtype), mask))


def _check_sharded_options(params: Mapping[str, Any], entries: list) -> None:  # type: ignore[type-arg]
    """Options that read a whole weight or the whole model, refused for sharded weights."""
    if not entries or not distributed.is_sharded(entries[0][2]):
        return
    asked = [
        opt
        for opt, on in (
            ("block_shape", bool(params.get("block_shape"))),
            ('layerwise_allocation: "lamp"', params["layerwise_allocation"] == "lamp"),
            (
                'sparsity_target_type: "effective"',
                params["sparsity_target_type"] == "effective",
            ),
        )
        if on
    ]
    if asked:
        raise CompressError(
            f"magnitude_sparsity: {', '.join(asked)} needs whole weights, but the weights are "
            "sharded (FSDP2); under sharding use global, local, uniform, erk or igq levels of "
            "single weights"
        )
