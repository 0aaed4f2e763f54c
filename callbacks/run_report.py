"""What ``CompressionCallback`` reports about a run: the metrics it logs per layer and per
algorithm, weights that diverged, and a run that ended short of its recipe. No Lightning here:
these are functions of the controller."""

from __future__ import annotations

from typing import Any

import torch

from compress import masks
from compress.controller import CompressionController
from compress.errors import CompressError
from compress.schedules import SCHEDULES


def shortfall(ctrl: CompressionController, *, loss_fed: bool = True) -> list[str]:
    """One line per scheduled algorithm whose level at fit end is below the recipe's target.
    Without ``loss_fed`` (the compression loss never reached a backward pass) learned masks
    that lag their level are not blamed on their learning rate."""
    lines = []
    epoch, step = ctrl.scheduler.epoch, ctrl.scheduler.global_step
    for algo in ctrl.algorithms:
        target = target_level(algo)
        if target is not None and algo.level < target - 1e-6:
            lines.append(
                f"compression: {algo.name} reached level {algo.level:.4f}, below the recipe's "
                f"target {target:.4f}, when the run ended (epoch {epoch}, optimizer step "
                f"{step}); train longer or reach the target earlier in the schedule"
            )
        if loss_fed:
            lines += learned_lag(algo, step)
    return lines


def learned_lag(algo: Any, step: int) -> list[str]:
    """A line when a learned mask (RB) is far sparser or denser than its schedule's level: its
    logits learn by gradient, and with a plain optimizer or few steps they barely move."""
    sparsity = getattr(algo, "sparsity", None)
    if not callable(sparsity):
        return []
    achieved = float(sparsity())
    if abs(achieved - algo.level) <= 0.05:
        return []
    return [
        f"compression: {algo.name}'s masks are {achieved:.4f} sparse where its schedule is "
        f"at level {algo.level:.4f} after {step} optimizer steps: the mask logits learn by "
        "gradient and moved too little; raise params.compression_lr_multiplier, train the "
        "logits with Adam, or train longer"
    ]


def target_level(algo: Any) -> float | None:
    """The level a scheduled algorithm's recipe ends at (None without a level schedule)."""
    fn = SCHEDULES.get(algo.name)
    params = dict(algo.params)
    if fn is None or (algo.name == "filter_pruning" and "pruning_target" not in params):
        return None
    if params.get("schedule") == "adaptive":
        return float(params["sparsity_target"])
    options = algo.cfg.options
    init = float(options.get("sparsity_init", options.get("pruning_init", 0.0)) or 0.0)
    return float(fn(params, init, 1e9))


def check_finite_weights(ctrl: CompressionController, epoch: int, step: int) -> None:
    """Names the compressed layer whose weight became NaN or Inf, at the optimizer step it
    happened (masks are recomputed only at schedule events, which may be an epoch later).
    One ``isfinite`` reduction per compressed weight."""
    seen: set[int] = set()
    for name, module, pname, _ in masks.iter_masked(ctrl.model):
        weight = module._parameters.get(pname)
        if weight is None or id(weight) in seen:
            continue
        seen.add(id(weight))
        if not bool(torch.isfinite(weight).all()):
            raise CompressError(
                f"layer {name!r}: the {pname} holds NaN or Inf after optimizer step {step} "
                f"(epoch {epoch}); lower the learning rate or check the loss"
            )


def layer_metrics(ctrl: CompressionController) -> dict[str, float]:
    """``compression/<algorithm>/<layer>/sparsity`` for every layer, plus the totals; for
    filter pruning ``.../<layer>/kept_filters`` and ``pruning_level`` per layer and
    ``compression/filter_pruning/{macs,params,filters}`` now and ``..._full``."""
    stats = ctrl.statistics().to_dict()
    out = {"compression/sparsity": float(stats["model"]["sparsity of compressed layers"])}
    for algo in stats["algorithms"]:
        name = algo["algorithm"]
        for row in algo.get("layers", ()):
            if "sparsity" in row:
                out[f"compression/{name}/{row['layer']}/sparsity"] = float(row["sparsity"])
            if "kept filters" in row:  # filter pruning
                out[f"compression/{name}/{row['layer']}/kept_filters"] = float(row["kept filters"])
                out[f"compression/{name}/{row['layer']}/pruning_level"] = float(
                    row["pruning level"]
                )
        for row in algo.get("summary", ()):  # filter pruning: MACs, params, filters
            what = str(row[""]).lower()
            out[f"compression/{name}/{what}"] = float(row["current"])
            out[f"compression/{name}/{what}_full"] = float(row["full"])
    if "effective sparsity of compressed layers" in stats["model"]:
        eff = stats["model"]["effective sparsity of compressed layers"]
        out["compression/effective_sparsity"] = float(eff)
    return out
