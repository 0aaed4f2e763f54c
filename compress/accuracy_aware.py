"""NNCF's accuracy-aware training (``accuracy_aware_training`` in a recipe), outside any loop.

``AccuracyAware`` is told the validation metric after every training epoch (``step(metric)``)
and answers with a ``Decision``: the level to train at next, whether to stop, and why. It owns
no training loop, so the same object is driven by ``run_accuracy_aware`` (plain PyTorch) and by
``CompressionCallback`` (Lightning's validation ends).

- ``early_exit``: the recipe's schedule runs; training stops at the first epoch where every
  algorithm has reached its target level and the metric is within the budget, or after
  ``maximal_total_epochs`` on the best fully compressed model seen.
- ``adaptive_compression_level``: after ``initial_training_phase_epochs`` (an early-exit phase),
  the schedule is held and the level of the first of filter pruning, magnitude or RB sparsity is
  searched: raised by the step as soon as the best metric at the level is within the budget,
  lowered after ``patience_epochs`` epochs without; the step shrinks by
  ``compression_rate_step_reduction_factor`` whenever the direction changes. Each change starts
  from the best model found so far (the highest level within the budget). The search ends when
  the step falls below ``minimal_compression_rate_step`` or at ``maximal_total_epochs``, on
  that best model.

The budget is ``reference * (1 - maximal_relative_accuracy_degradation / 100)`` or
``reference - maximal_absolute_accuracy_degradation`` (mirrored when lower is better), where the
reference is the uncompressed model's metric.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch

from compress.algorithm import Algorithm
from compress.controller import CompressionController
from compress.errors import CompressError, ConfigError
from compress.recipe.config import Config, load_config, schema

Mode = Literal["max", "min"]
# Algorithms whose level ``set_level`` can move, in the order the search picks one.
ADAPTIVE = ("filter_pruning", "magnitude_sparsity", "rb_sparsity")
STATE_VERSION = 1


@dataclass(frozen=True)
class Params:
    """The ``accuracy_aware_training`` block of a recipe, with the schema's defaults."""

    mode: str
    maximal_relative_accuracy_degradation: float
    maximal_absolute_accuracy_degradation: float | None
    maximal_total_epochs: int
    initial_training_phase_epochs: int
    patience_epochs: int
    initial_compression_rate_step: float
    compression_rate_step_reduction_factor: float
    minimal_compression_rate_step: float
    lr_reduction_factor: float
    maximal_compression_rate: float

    @classmethod
    def from_config(cls, config: Config) -> Params | None:
        block = config.data.get("accuracy_aware_training")
        if block is None:
            return None
        spec = schema()["$defs"]["accuracy_aware_params"]["properties"]
        values = {k: v["default"] for k, v in spec.items()}
        values.update(block["params"])
        return cls(mode=block["mode"], **{f.name: values[f.name] for f in fields(cls)[1:]})


@dataclass(frozen=True)
class Decision:
    """What to do after one training epoch and its validation."""

    epoch: int  # training epochs counted so far
    metric: float
    level: float  # the level the metric was measured at (the reason names any new one)
    budget: float  # metric minus the tolerable metric (plus: within the budget)
    reason: str
    stop: bool = False
    lr_factor: float = 1.0  # multiply the learning rates by this before the next epoch
    next_level: float = 0.0  # the level the next epoch trains at (the restored one on stop)

    def line(self, reference: float) -> str:
        return (
            f"accuracy-aware epoch {self.epoch}: level {self.level:.4f}, metric "
            f"{self.metric:.4f} (reference {reference:.4f}, budget {self.budget:+.4f}): "
            f"{self.reason}"
        )


class AccuracyAware:
    """The accuracy-aware state machine; ``attach(ctrl)`` before the first ``step``.

    Example:
        >>> aa = AccuracyAware(Params.from_config(cfg), reference=0.95)  # doctest: +SKIP
        >>> aa.attach(ctrl)  # doctest: +SKIP
        >>> decision = aa.step(validate())  # after each training epoch  # doctest: +SKIP
    """

    def __init__(self, params: Params, *, mode: Mode = "max", reference: float | None = None):
        if mode not in ("max", "min"):
            raise ConfigError(f"mode: {mode!r} is not allowed; one of 'max', 'min'")
        self.params = params
        self.mode = mode
        self.reference = reference
        self.ctrl: CompressionController | None = None
        self.phase = "initial"  # "search" (adaptive only), then "done"
        self.epochs = 0
        self.target = 0.0  # the searched level
        self.step_size = params.initial_compression_rate_step
        self.direction = 0  # +1 raised, -1 lowered on the last change, 0 none yet
        self.epochs_at_level = 0
        self.best_at_level: float | None = None
        self.best: dict[str, Any] | None = None  # {"level", "metric", "model", "controller"}
        self.history: list[tuple[float, float]] = []  # (level, metric) per epoch
        self._measured: float | None = None  # the level of the latest metric

    # --- binding -----------------------------------------------------------------------------

    def attach(self, ctrl: CompressionController) -> None:
        if self.params.mode == "adaptive_compression_level" and self._searched(ctrl) is None:
            names = [a.name for a in ctrl.algorithms]
            raise ConfigError(
                "accuracy_aware_training.mode: 'adaptive_compression_level' needs one of "
                f"{list(ADAPTIVE)} in compression; the recipe has {names}"
            )
        self.ctrl = ctrl
        if self.phase == "search":
            _hold(ctrl)

    @staticmethod
    def _searched(ctrl: CompressionController) -> Algorithm | None:
        return next((a for a in ctrl.algorithms if a.name in ADAPTIVE), None)

    @property
    def tolerable(self) -> float:
        """The worst metric within the budget."""
        if self.reference is None:
            raise CompressError(
                "accuracy_aware_training: no reference metric; measure the uncompressed model "
                "once before training, or give reference_metric"
            )
        p, ref = self.params, self.reference
        sign = 1.0 if self.mode == "max" else -1.0
        if p.maximal_absolute_accuracy_degradation is not None:
            return ref - sign * p.maximal_absolute_accuracy_degradation
        return ref - sign * abs(ref) * p.maximal_relative_accuracy_degradation / 100.0

    def budget(self, metric: float) -> float:
        return metric - self.tolerable if self.mode == "max" else self.tolerable - metric

    def _better(self, a: float, b: float | None) -> bool:
        return b is None or (a > b if self.mode == "max" else a < b)

    # --- the decision after each epoch ------------------------------------------------------

    def step(self, metric: float) -> Decision:
        """Takes the validation metric of the epoch just trained; returns the decision (and has
        already applied it to the controller: level set, best model restored when stopping)."""
        ctrl = self.ctrl
        if ctrl is None:
            raise CompressError("AccuracyAware.step: attach(ctrl) first")
        if self.phase == "done":
            return self._decision(metric, "already finished", stop=True)
        if not math.isfinite(metric):
            raise CompressError(f"accuracy_aware_training: the monitored metric is {metric}")
        self.epochs += 1
        self._measured = self._level()
        self.history.append((self._measured, metric))
        if self.phase == "initial":
            return self._initial(metric)
        return self._search(metric)

    def _initial(self, metric: float) -> Decision:
        assert self.ctrl is not None
        p, level = self.params, self._level()
        full = fully_compressed(self.ctrl)
        within = self.budget(metric) >= 0
        adaptive = p.mode == "adaptive_compression_level"
        if full and (within or not adaptive):
            self._offer(level, metric, by_level=adaptive)
        if full and within:
            if not adaptive:
                return self._finish(metric, "target level reached with the metric within budget")
            return self._start_search(metric, "initial phase met the criterion")
        if self.epochs >= p.maximal_total_epochs:
            return self._finish(metric, f"maximal_total_epochs ({p.maximal_total_epochs}) reached")
        if adaptive and self.epochs >= p.initial_training_phase_epochs:
            return self._start_search(metric, "initial training phase over")
        why = "metric below budget" if full else "level below its target"
        return self._decision(metric, f"training on ({why})")

    def _start_search(self, metric: float, why: str) -> Decision:
        assert self.ctrl is not None
        self.phase = "search"
        self.target = self._level()
        _hold(self.ctrl)
        self.best_at_level = metric
        return self._change(metric, f"{why}; search starts")

    def _search(self, metric: float) -> Decision:
        p = self.params
        self.epochs_at_level += 1
        if self._better(metric, self.best_at_level):
            self.best_at_level = metric
        if self.budget(metric) >= 0:
            self._offer(self.target, metric, by_level=True)
        if self.epochs >= p.maximal_total_epochs:
            return self._finish(metric, f"maximal_total_epochs ({p.maximal_total_epochs}) reached")
        if self.step_size < p.minimal_compression_rate_step:
            return self._finish(
                metric,
                f"step {self.step_size:.4g} below minimal_compression_rate_step "
                f"{p.minimal_compression_rate_step:.4g}",
            )
        assert self.best_at_level is not None
        if self.budget(self.best_at_level) >= 0:
            return self._change(metric, "metric within budget")
        if self.epochs_at_level >= p.patience_epochs:
            return self._change(metric, f"no epoch within budget in {p.patience_epochs}")
        return self._decision(
            metric, f"training on (epoch {self.epochs_at_level} of patience {p.patience_epochs})"
        )

    def _change(self, metric: float, why: str) -> Decision:
        """Raises or lowers the level by the step (NNCF's uniform-decrease stepping)."""
        assert self.ctrl is not None and self.best_at_level is not None
        p = self.params
        sign = 1 if self.budget(self.best_at_level) >= 0 else -1
        lr_factor = 1.0
        if self.direction not in (0, sign):
            self.step_size *= p.compression_rate_step_reduction_factor
            lr_factor = p.lr_reduction_factor
        self.direction = sign
        new = self.target + sign * self.step_size
        if new <= 0.0:
            return self._finish(metric, f"{why}; no level above 0 keeps the metric within budget")
        if new > p.maximal_compression_rate + 1e-9:
            return self._finish(
                metric, f"{why}; maximal_compression_rate {p.maximal_compression_rate} reached"
            )
        if self.best is not None:
            self._restore(self.best)
        self.target = new
        assert self.ctrl is not None
        self.ctrl.set_level(self._searched_or_fail(), new)
        self.epochs_at_level = 0
        self.best_at_level = None
        verb = "raised" if sign > 0 else "lowered"
        return self._decision(
            metric, f"{why}; level {verb} to {new:.4f} (step {self.step_size:.4g})", lr=lr_factor
        )

    def _finish(self, metric: float, why: str) -> Decision:
        self.phase = "done"
        if self.best is None:
            warnings.warn(
                "accuracy_aware_training: no fully compressed model met the budget; the last "
                "model is kept",
                stacklevel=3,
            )
            return self._decision(metric, f"{why}; no model met the budget, keeping the last")
        self._restore(self.best)
        self.target = self.best["level"]
        best = f"level {self.best['level']:.4f}, metric {self.best['metric']:.4f}"
        return self._decision(metric, f"{why}; stopping on the best model ({best})", stop=True)

    def _decision(
        self, metric: float, reason: str, *, stop: bool = False, lr: float = 1.0
    ) -> Decision:
        stop = stop or self.phase == "done"
        level = self._measured if self._measured is not None else self._level()
        return Decision(
            self.epochs, metric, level, self.budget(metric), reason, stop, lr, self._level()
        )

    def _level(self) -> float:
        assert self.ctrl is not None
        algo = self._searched(self.ctrl)
        return algo.level if algo is not None else self.ctrl.compression_level

    def _searched_or_fail(self) -> Algorithm:
        assert self.ctrl is not None
        algo = self._searched(self.ctrl)
        assert algo is not None  # attach() checked
        return algo

    # --- the best model --------------------------------------------------------------------

    def _offer(self, level: float, metric: float, *, by_level: bool) -> None:
        """Keeps a copy of the model if it is the best so far: the highest level, then the best
        metric (adaptive), or the best metric (early exit)."""
        best = self.best
        if best is not None:
            if by_level and level < best["level"]:
                return
            same = not by_level or level == best["level"]
            if same and not self._better(metric, best["metric"]):
                return
        assert self.ctrl is not None
        self.best = {
            "level": level,
            "metric": metric,
            "model": {k: v.detach().clone() for k, v in self.ctrl.model.state_dict().items()},
            "controller": copy.deepcopy(self.ctrl.state_dict()),
        }

    def _restore(self, best: Mapping[str, Any]) -> None:
        ctrl = self.ctrl
        assert ctrl is not None
        ctrl.model.load_state_dict(best["model"])
        # The epoch counters go on; only weights, masks and levels go back.
        ctrl.load_state_dict(  # the teacher is this run's (a resume has checked it)
            {**best["controller"], "scheduler": ctrl.scheduler.state_dict()},
            accept_new_teacher=True,
        )

    # --- checkpoints -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        keys = ("phase", "epochs", "target", "step_size", "direction", "epochs_at_level")
        out: dict[str, Any] = {k: getattr(self, k) for k in keys}
        out.update(
            version=STATE_VERSION,
            reference=self.reference,
            best_at_level=self.best_at_level,
            best=self.best,
            history=list(self.history),
        )
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        check_state(state)
        for k in ("phase", "epochs", "target", "step_size", "direction", "epochs_at_level"):
            setattr(self, k, state[k])
        if self.reference is None:
            self.reference = state["reference"]
        self.best_at_level = state["best_at_level"]
        self.best = state["best"]
        self.history = [tuple(x) for x in state["history"]]  # type: ignore[misc]
        if self.ctrl is not None and self.phase == "search":
            _hold(self.ctrl)


_STATE_KEYS = (
    "phase",
    "epochs",
    "target",
    "step_size",
    "direction",
    "epochs_at_level",
    "reference",
    "best_at_level",
    "best",
    "history",
)


def check_state(state: Any) -> None:
    """An accuracy-aware state from a checkpoint has this version and every key, with counts
    and a history of the right types (else a ``CompressError``, before any is applied)."""
    if not isinstance(state, Mapping):
        raise CompressError(f"accuracy-aware state is a {type(state).__name__}, not a dict")
    if state.get("version") != STATE_VERSION:
        raise CompressError(
            f"accuracy-aware state version {state.get('version')} is not {STATE_VERSION}"
        )
    missing = [k for k in _STATE_KEYS if k not in state]
    if missing:
        raise CompressError(f"accuracy-aware state: missing keys {missing}; the entry is damaged")
    for key in ("epochs", "epochs_at_level"):
        n = state[key]
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise CompressError(f"accuracy-aware state: {key} {n!r} is not a count")
    if not isinstance(state["history"], (list, tuple)) or not all(
        isinstance(x, (list, tuple)) for x in state["history"]
    ):
        raise CompressError("accuracy-aware state: history is not a list of entries")


def from_config(
    config: Config, *, mode: Mode = "max", reference: float | None = None
) -> AccuracyAware | None:
    """The state machine for a recipe's ``accuracy_aware_training`` block; None without one."""
    params = Params.from_config(config)
    return None if params is None else AccuracyAware(params, mode=mode, reference=reference)


def _hold(ctrl: CompressionController) -> None:
    """Stops the schedule from moving levels: from now on the search sets them."""
    ctrl.scheduler.on_change = None


def _final_target(algo: Algorithm) -> float:
    p = algo.params
    if algo.name == "filter_pruning":
        return float(algo.target)  # type: ignore[attr-defined]
    if p.get("schedule") == "multistep":
        return float(max(p["multistep_sparsity_levels"]))
    return float(p["sparsity_target"])


def fully_compressed(ctrl: CompressionController) -> bool:
    """Whether every algorithm with a schedule has reached its target level (or froze)."""
    for algo in ctrl.algorithms:
        if algo.name not in ADAPTIVE or getattr(algo, "frozen", False):
            continue
        if algo.level < _final_target(algo) - 1e-9:
            return False
    return True


def run_accuracy_aware(
    ctrl: CompressionController,
    train_epoch_fn: Callable[[int], Any],
    validate_fn: Callable[[], float],
    *,
    reference_metric: float,
    mode: Mode = "max",
    config: Config | Mapping[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    log: Callable[[str], None] | None = print,
) -> AccuracyAware:
    """NNCF's accuracy-aware loop for users without Lightning; returns the finished state
    (``best``, ``history``). The model ends on the best model found.

    Each epoch: ``ctrl.scheduler.epoch_step()``, ``train_epoch_fn(epoch)`` (which calls
    ``ctrl.scheduler.step()`` after each optimizer step and adds ``ctrl.loss()``), then
    ``validate_fn()``. ``reference_metric`` is the uncompressed model's ``validate_fn()``,
    measured before ``create_compressed_model``. ``optimizer`` gets its learning rates scaled by
    ``lr_reduction_factor`` when the search reduces its step.

    Example:
        >>> reference = validate()  # the model before compression  # doctest: +SKIP
        >>> ctrl, model = compress.create_compressed_model(model, recipe)  # doctest: +SKIP
        >>> aa = compress.run_accuracy_aware(ctrl, train_epoch, validate,
        ...                                  reference_metric=reference)  # doctest: +SKIP
    """
    cfg = ctrl.config if config is None else load_config(config)
    aa = from_config(cfg, mode=mode, reference=reference_metric)
    if aa is None:
        raise ConfigError("accuracy_aware_training: the recipe has no such section")
    aa.attach(ctrl)
    while True:
        ctrl.scheduler.epoch_step()
        train_epoch_fn(ctrl.scheduler.epoch)
        decision = aa.step(float(validate_fn()))
        if log is not None:
            log(decision.line(reference_metric))
        if optimizer is not None and decision.lr_factor != 1.0:
            for group in optimizer.param_groups:
                group["lr"] *= decision.lr_factor
        if decision.stop:
            return aa
