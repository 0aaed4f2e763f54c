"""Schedules: pure functions from training progress to a sparsity or pruning level.

Progress is measured in epochs, possibly fractional (``epoch + step_in_epoch / steps_per_epoch``
when a recipe updates per optimizer step). The formulas are NNCF's, with its exponential schedule
clamped to the target level rather than to an epoch count.

Example:
    >>> round(polynomial(45, init=0.0, target=0.9, target_epoch=90, power=1, concave=False), 6)
    0.45
    >>> multistep(10, steps=[10, 20], levels=[0.1, 0.5, 0.9])
    0.5
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from compress.errors import CompressError


def polynomial(
    epoch: float, *, init: float, target: float, target_epoch: float, power: float, concave: bool
) -> float:
    """p = clip(epoch / target_epoch, 0, 1); concave: target - (target - init) * (1 - p) ** power,
    convex: init + (target - init) * p ** power."""
    p = min(max(epoch / target_epoch, 0.0), 1.0)
    if concave:
        return target - (target - init) * (1.0 - p) ** power
    return init + (target - init) * p**power


def exponential(epoch: float, *, init: float, target: float, target_epoch: float) -> float:
    """Density decays geometrically: 1 - level = (1 - init) * ((1 - target) / (1 - init)) ** p,
    p = clip(epoch / target_epoch, 0, 1). Exactly ``target`` from ``target_epoch`` on."""
    p = min(max(epoch / target_epoch, 0.0), 1.0)
    if p >= 1.0:
        return target
    return 1.0 - (1.0 - init) * ((1.0 - target) / (1.0 - init)) ** p


def multistep(epoch: float, *, steps: Sequence[float], levels: Sequence[float]) -> float:
    """levels[i], where i is the number of steps <= epoch."""
    return levels[bisect.bisect_right(steps, epoch)]


def sparsity_level(params: Mapping[str, Any], init: float, epoch: float) -> float:
    """The level of a sparsity recipe (magnitude or RB ``params``) at a (fractional) epoch."""
    kind = params["schedule"]
    target, target_epoch = params["sparsity_target"], params["sparsity_target_epoch"]
    if kind == "polynomial":
        return polynomial(
            epoch,
            init=init,
            target=target,
            target_epoch=target_epoch,
            power=params["power"],
            concave=params["concave"],
        )
    if kind == "exponential":
        return exponential(epoch, init=init, target=target, target_epoch=target_epoch)
    if kind == "multistep":
        return multistep(
            epoch, steps=params["multistep_steps"], levels=params["multistep_sparsity_levels"]
        )
    raise KeyError(kind)


# --- filter pruning ------------------------------------------------------------------------


def exponential_with_bias_coefficients(
    init: float, target: float, last_epoch: float, factor: float = 1 / 8
) -> tuple[float, float, float] | None:
    """(a, b, k) of level(e) = a * exp(-k * e) + b solving NNCF's three equations (SPFP):
    init = a + b; target = a * exp(-k * E) + b; 3/4 * target = a * exp(-k * factor * E) + b,
    with E = ``last_epoch`` (NNCF: pruning_steps - 1).

    With y = exp(-k * E) and c = (3/4 * target - init) / (target - init) the system reduces to
    y ** factor - c * y + c - 1 = 0, whose root y in (0, 1) (k > 0) exists when factor < c < 1
    and is found by bisection below the maximum of the left side. None when there is no such
    root (init at or above 3/4 of the target, or E = 0): NNCF's solver then lands on the
    trivial root y = 1 and divides by zero or by a rounding error; the schedule is then the
    k -> 0 limit, a straight line from init to target.

    Example:
        >>> a, b, k = exponential_with_bias_coefficients(0.0, 0.5, 4)
        >>> round(a + b, 9), round(a * math.exp(-k * 4) + b, 9), round(a * math.exp(-k / 2) + b, 9)
        (0.0, 0.5, 0.375)
    """
    if last_epoch <= 0 or target == init:
        return None
    c = (0.75 * target - init) / (target - init)
    if not factor < c < 1:
        return None
    lo, hi = 0.0, (c / factor) ** (1 / (factor - 1))  # the left side peaks at hi
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid**factor - c * mid + c - 1 < 0:
            lo = mid
        else:
            hi = mid
    y = (lo + hi) / 2
    k = -math.log(y) / last_epoch
    a = (target - init) / (math.exp(-k * last_epoch) - 1)
    return a, init - a, k


def pruning_level(params: Mapping[str, Any], init: float, epoch: float) -> float:
    """NNCF 2.17's filter pruning level at the start of ``epoch``: 0 before num_init_steps, then
    the schedule, which reaches the target at epoch ``num_init_steps + pruning_steps - 1``
    (NNCF's ``target_epoch = pruning_steps - 1``), then the target.

    exponential: density 1 - level decays geometrically from 1 - init and never below
    1 - target. exponential_with_bias: a * exp(-k * e) + b (see
    :func:`exponential_with_bias_coefficients`), at most the target. baseline: the target.
    ``params['pruning_target']`` is the target ratio: a fraction of filters or, for a FLOPs
    target, a fraction of FLOPs.

    Where NNCF 2.17 fails this returns the sane level (docs/nncf_differences.md): its
    exponential_with_bias divides by zero for pruning_steps 1 or init equal to the target (here:
    the target from the first pruning epoch, or the k -> 0 straight line), and with init above
    the target its exponential level falls below the target after the last step (here: the
    target).

    Example:
        >>> p = {"pruning_target": 0.5, "num_init_steps": 0, "pruning_steps": 5,
        ...      "schedule": "exponential"}
        >>> [round(pruning_level(p, 0.0, e), 3) for e in range(6)]
        [0.0, 0.159, 0.293, 0.405, 0.5, 0.5]
    """
    target = params["pruning_target"]
    e = epoch - params["num_init_steps"]
    last = params["pruning_steps"] - 1
    kind = params["schedule"]
    if e < 0:
        return 0.0
    if kind == "baseline" or e > last or last <= 0:
        return target
    if kind == "exponential":
        density, target_density = 1.0 - init, 1.0 - target
        if density <= 0.0:
            return target
        density = density * (target_density / density) ** (e / last)
        return min(1.0 - max(density, target_density), target)
    if kind == "exponential_with_bias":
        coefficients = exponential_with_bias_coefficients(init, target, last)
        if coefficients is None:
            return min(init + (target - init) * e / last, target)
        a, b, k = coefficients
        return min(a * math.exp(-k * e) + b, target)
    raise KeyError(kind)


SCHEDULES: dict[str, Callable[[Mapping[str, Any], float, float], float]] = {
    "magnitude_sparsity": sparsity_level,
    "rb_sparsity": sparsity_level,
    "filter_pruning": pruning_level,
}


class Scheduler:
    """Counts epochs and optimizer steps; the only state a schedule has.

    NNCF's protocol: call ``epoch_step()`` at the start of every epoch (the first call moves
    from epoch -1 to 0) and ``step()`` after every optimizer step. After each call the owner's
    ``on_change(per_step)`` is invoked so algorithms can move their levels and masks.
    """

    def __init__(self, on_change: Callable[[bool], None] | None = None) -> None:
        self.epoch = -1
        self.step_in_epoch = 0
        self.global_step = 0
        self.inferred_steps_per_epoch: int | None = None
        # False when no schedule reads the epoch length: epochs may then differ in length.
        self.infer_steps_per_epoch = True
        self.on_change = on_change

    def epoch_step(self, next_epoch: int | None = None) -> None:
        """Starts epoch ``next_epoch`` (default: the next one)."""
        target = self.epoch + 1 if next_epoch is None else next_epoch
        if not self.infer_steps_per_epoch:
            pass
        elif self.epoch == 0 and target == 1 and self.inferred_steps_per_epoch is None:
            self.inferred_steps_per_epoch = self.step_in_epoch or None
        elif (
            self.inferred_steps_per_epoch is not None
            and target == self.epoch + 1
            and self.step_in_epoch not in (0, self.inferred_steps_per_epoch)
        ):
            raise CompressError(
                f"epoch {self.epoch} had {self.step_in_epoch} optimizer steps, but the first "
                f"epoch had {self.inferred_steps_per_epoch}; per-step schedules need a constant "
                "count: set params.steps_per_epoch in the recipe"
            )
        self.epoch = target
        self.step_in_epoch = 0
        if self.on_change:
            self.on_change(False)

    def step(self) -> None:
        """Counts one optimizer step."""
        self.step_in_epoch += 1
        self.global_step += 1
        if self.on_change:
            self.on_change(True)

    def progress(self, steps_per_epoch: int | None, per_step: bool) -> float:
        """The current (fractional) epoch for a schedule; epoch -1 counts as 0."""
        epoch = max(self.epoch, 0)
        spe = steps_per_epoch or self.inferred_steps_per_epoch
        if per_step and spe:
            return epoch + min(self.step_in_epoch / spe, 1.0)
        return float(epoch)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "inferred_steps_per_epoch": self.inferred_steps_per_epoch,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.inferred_steps_per_epoch = state.get("inferred_steps_per_epoch")
