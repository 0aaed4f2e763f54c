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
    convex: init + (target - init) * p ** power. ``target_epoch`` 0 gives the target at once."""
    if target_epoch == 0:
        return target
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


def sparsity_exponential(epoch: float, *, init: float, target: float, target_epoch: float) -> float:
    """NNCF 2.17's exponential sparsity schedule, float for float: the density
    ``(1 - init) * ((1 - target) / (1 - init)) ** (epoch / target_epoch)``, no lower than
    ``1 - target``; the level is ``min(1 - density, target)``.

    Example:
        >>> round(sparsity_exponential(1, init=0.0, target=0.75, target_epoch=2), 6)
        0.5
    """
    initial, final = 1.0 - init, 1.0 - target
    if target_epoch == 0:
        density = final
    else:
        density = max(initial * (final / initial) ** (epoch / target_epoch), final)
    return min(1.0 - density, target)


def multistep(epoch: float, *, steps: Sequence[float], levels: Sequence[float]) -> float:
    """levels[i], where i is the number of steps <= epoch."""
    return levels[bisect.bisect_right(sorted(steps), epoch)]


def adaptive(epoch: float, *, init: float, target: float, step: float, patience: int) -> float:
    """NNCF's adaptive schedule when every epoch reaches its level (magnitude sparsity always
    does): the level rises by ``step`` at every ``patience``-th epoch start, counting epoch 0,
    up to ``target``. RB sparsity counts only the epochs its learned masks reached."""
    rises = int((math.floor(epoch) + 1) // patience)
    level = init
    for _ in range(rises):  # one addition at a time, as NNCF adds
        if level == target:  # a level above the target still falls to it, as in NNCF
            break
        level = min(level + step, target)
    return level


def adaptive_level(
    level: float,
    reached_epochs: int,
    sparsity: float,
    *,
    target: float,
    step: float,
    eps: float,
    patience: int,
) -> tuple[float, int]:
    """NNCF's adaptive schedule, once per epoch start (epoch 0 included): returns the new
    (level, reached_epochs).

    An epoch counts when the reached ``sparsity`` is at least ``level - eps``; after
    ``patience`` such epochs the level rises by ``step`` (capped at ``target``) and the count
    restarts.

    Example:
        >>> adaptive_level(0.1, 0, 0.08, target=0.5, step=0.05, eps=0.03, patience=1)
        (0.15000000000000002, 0)
    """
    if sparsity >= level - eps:
        reached_epochs += 1
    if reached_epochs >= patience:
        return min(level + step, target), 0
    return level, reached_epochs


def sparsity_level(params: Mapping[str, Any], init: float, epoch: float) -> float:
    """The level of a sparsity recipe (magnitude or RB ``params``) at a (fractional) epoch, as
    NNCF 2.17's schedulers compute it."""
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
        return sparsity_exponential(epoch, init=init, target=target, target_epoch=target_epoch)
    if kind == "multistep":
        return multistep(
            epoch, steps=params["multistep_steps"], levels=params["multistep_sparsity_levels"]
        )
    if kind == "adaptive":
        return adaptive(
            epoch, init=init, target=target, step=params["step"], patience=params["patience"]
        )
    raise KeyError(kind)


def initial_level(params: Mapping[str, Any], init: float) -> float:
    """The level NNCF reports before the schedule's first epoch: ``sparsity_init``, or the
    first multistep level."""
    if params["schedule"] == "multistep":
        return float(params["multistep_sparsity_levels"][0])
    return init


def moves_per_step(params: Mapping[str, Any]) -> bool:
    """Whether a sparsity schedule moves after optimizer steps: with
    ``update_per_optimizer_step``, NNCF 2.17 moves only polynomial schedules per step (the others
    keep their epoch's level); ``per_step_schedules: "all"`` moves exponential and multistep too.
    """
    if not params["update_per_optimizer_step"] or params["schedule"] == "adaptive":
        return False
    return params["schedule"] == "polynomial" or params.get("per_step_schedules") == "all"


def schedule_epoch(params: Mapping[str, Any], scheduler: Scheduler) -> int | None:
    """The epoch NNCF 2.17's sparsity scheduler is at (None before its first one).

    A per-step schedule without ``steps_per_epoch`` spends the first epoch measuring its length
    and starts one epoch late, as NNCF's does: epoch 1 of training is its epoch 0. Not when the
    loop told the scheduler the length in advance (``length_known``: the Lightning callback
    does), which is NNCF's behaviour with ``steps_per_epoch`` given.
    """
    epoch = scheduler.epoch
    if moves_per_step(params) and not params["steps_per_epoch"] and not scheduler.length_known:
        epoch -= 1
    return epoch if epoch >= 0 else None


def schedule_position(params: Mapping[str, Any], scheduler: Scheduler) -> float | None:
    """The fractional epoch at which the next batch trains, as NNCF 2.17 evaluates it (None
    before the schedule's first epoch: the level is then ``sparsity_init``).

    NNCF's loop calls ``step()`` before each batch and its k-th call in epoch e sets the level
    of ``e + (k - 1) / steps_per_epoch``. Ours calls ``step()`` after each optimizer step, so after
    k steps the next batch is batch k: ``e + k / steps_per_epoch``, held at the epoch's last batch
    once the epoch is over (validation sees the model its last batch trained).
    """
    epoch = schedule_epoch(params, scheduler)
    if epoch is None or not moves_per_step(params):
        return None if epoch is None else float(epoch)
    spe = params["steps_per_epoch"] or scheduler.inferred_steps_per_epoch
    if not spe:
        return float(epoch)
    return epoch + min(scheduler.step_in_epoch, spe - 1) / spe


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

    The protocol: call ``epoch_step()`` at the start of every epoch (the first call moves from
    epoch -1 to 0) and ``step()`` after every optimizer step. After each call the owner's
    ``on_change(per_step)`` is invoked so algorithms can move their levels and masks.

    NNCF's examples call ``step()`` before each batch's forward pass instead; every batch trains
    at the same level either way (see :func:`schedule_position`): after ``epoch_step()`` and k
    calls of our ``step()``, batch k of the epoch trains at the level NNCF's loop gives it after
    its (k + 1)-th ``step()``. The one visible difference is the count itself: code ported from
    an NNCF loop should move its ``step()`` call after ``optimizer.step()``, or every batch trains
    one step ahead.
    """

    def __init__(self, on_change: Callable[[bool], None] | None = None) -> None:
        self.epoch = -1
        self.step_in_epoch = 0
        self.global_step = 0
        self.inferred_steps_per_epoch: int | None = None
        # True when the loop set inferred_steps_per_epoch before the first epoch
        self.length_known = False
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
            "length_known": self.length_known,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.inferred_steps_per_epoch = state.get("inferred_steps_per_epoch")
        self.length_known = bool(state.get("length_known", False))
