"""Magnitude sparsity (NNCF ``magnitude_sparsity``): prune the weights of lowest importance.

At every schedule event the level is read from the schedule and the masks are recomputed from
the current weights, until ``sparsity_freeze_epoch``. In ``global`` mode exactly
round(level * N) of the N compressed weights are pruned under one threshold, ties included.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from compress.algorithms.base import Algorithm, attach_weight_masks, sparsity_rows, weight_layers
from compress.errors import CompressError
from compress.importance import IMPORTANCE, global_keep_masks, local_keep_mask
from compress.schedules import sparsity_level


class MagnitudeSparsity(Algorithm):
    name = "magnitude_sparsity"

    def __init__(self, model, cfg, scheduler, example_inputs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(model, cfg, scheduler, example_inputs)
        self.entries = attach_weight_masks(weight_layers(model, cfg))
        self.init = float(cfg.options["sparsity_init"])
        self.frozen = False
        self.current = self.init
        self.thresholds = [0.0] * len(self.entries)

    @property
    def level(self) -> float:
        return self.current

    def target_level(self) -> float:
        p = self.params
        progress = self.scheduler.progress(p["steps_per_epoch"], p["update_per_optimizer_step"])
        return sparsity_level(p, self.init, progress)

    def update(self, per_step: bool) -> None:
        p = self.params
        if self.frozen or (per_step and not p["update_per_optimizer_step"]):
            return
        epoch = self.scheduler.progress(p["steps_per_epoch"], per_step)
        if epoch >= p["sparsity_freeze_epoch"] and self.scheduler.epoch >= 0:
            self.frozen = True
            return
        self.current = self.target_level()
        self.set_masks(self.current)

    def set_masks(self, level: float) -> None:
        """Recomputes every mask so that ``level`` of the compressed weights are pruned."""
        importance = IMPORTANCE[self.params["weight_importance"]]
        scores = []
        for name, module, _ in self.entries:
            w = module.weight
            if not torch.isfinite(w).all():
                raise CompressError(
                    f"layer {name!r}: the weight holds NaN or Inf at epoch "
                    f"{self.scheduler.epoch}, step {self.scheduler.global_step}; lower the "
                    "learning rate or check the loss"
                )
            scores.append(importance(w))
        if self.params["sparsity_level_setting_mode"] == "global":
            total = sum(s.numel() for s in scores)
            keeps = global_keep_masks(scores, round(level * total))
        else:
            keeps = [local_keep_mask(s, round(level * s.numel())) for s in scores]
        for i, ((_, _, mask), keep, s) in enumerate(zip(self.entries, keeps, scores)):
            mask.copy_(keep)
            pruned = s[~keep]
            self.thresholds[i] = float(pruned.max()) if pruned.numel() else 0.0

    def statistics(self) -> dict[str, Any]:
        rows = sparsity_rows(self.entries)
        for row, t in zip(rows, self.thresholds):
            row["threshold"] = t
        return {
            "algorithm": self.name,
            "level": self.current,
            "frozen": self.frozen,
            "layers": rows,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "level": self.current,
            "frozen": self.frozen,
            "thresholds": list(self.thresholds),
            "masks": {name: mask.bool().clone() for name, _, mask in self.entries},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.current = float(state["level"])
        self.frozen = bool(state["frozen"])
        self.thresholds = list(state["thresholds"])
        load_masks(self.entries, state["masks"], self.name)


def load_masks(entries: list, saved: Mapping[str, torch.Tensor], algorithm: str) -> None:  # type: ignore[type-arg]
    """Copies saved masks into the attached ones, checking that they belong to this model."""
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
        mask.copy_(saved[name])
