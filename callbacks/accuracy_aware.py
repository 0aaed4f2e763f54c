"""Lightning glue of accuracy-aware training: ``CompressionCallback`` calls these at each
validation end. The decisions themselves are ``compress.accuracy_aware``'s."""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info

from compress.accuracy_aware import AccuracyAware
from compress.errors import ConfigError


def metric(trainer: pl.Trainer, monitor: str) -> float:
    value = trainer.callback_metrics.get(monitor)
    if value is None:
        raise ConfigError(
            f"monitor: {monitor!r} was not logged at this validation; logged: "
            f"{sorted(trainer.callback_metrics)} (log it with self.log in validation_step)"
        )
    return float(value)


def on_validation_end(aa: AccuracyAware, trainer: pl.Trainer, monitor: str, fitting: bool) -> None:
    """Before ``fit`` (``trainer.validate`` on the uncompressed model) records the reference;
    during ``fit`` decides, logs ``compression/aa/*``, prints one line and applies the decision
    (learning rates, stop)."""
    if trainer.sanity_checking:
        return
    if not fitting:
        if aa.ctrl is None and aa.reference is None:
            aa.reference = float(trainer.strategy.broadcast(metric(trainer, monitor), src=0))
            rank_zero_info(f"accuracy-aware: reference {monitor} = {aa.reference:.4f}")
        return
    # Rank zero's metric decides on every rank, so that levels and masks stay identical.
    decision = aa.step(float(trainer.strategy.broadcast(metric(trainer, monitor), src=0)))
    assert aa.reference is not None
    rank_zero_info(decision.line(aa.reference).replace("metric", monitor, 1))
    values = {
        "compression/aa/level": decision.level,
        "compression/aa/metric": decision.metric,
        "compression/aa/budget": decision.budget,
        "compression/aa/next_level": decision.next_level,
        "compression/aa/stop": float(decision.stop),
    }
    for logger in trainer.loggers:
        logger.log_metrics(values, step=trainer.global_step)
    if decision.lr_factor != 1.0:
        scale_learning_rates(trainer, decision.lr_factor)
    if decision.stop:
        trainer.should_stop = True
    check_reference(aa)


def unmet_budget(aa: AccuracyAware, monitor: str) -> str | None:
    """A line at fit end when no epoch met the budget at the level the recipe asks for (early
    exit: the full level; the search: any level above 0), and no decision said so already."""
    if not aa.history or aa.reference is None:
        return None
    if aa.best is not None and aa.budget(aa.best["metric"]) >= 0:
        return None
    if aa.best is None and aa.phase == "done":  # the finish warned
        return None
    level, metric = aa.history[-1]
    return (
        f"accuracy-aware training ({aa.params.mode}): no epoch met the budget at the "
        f"recipe's level ({monitor} within {aa.tolerable:.4f}, reference {aa.reference:.4f}; "
        f"the last epoch: level {level:.4f}, {monitor} {metric:.4f}); the model at fit end "
        "does not meet it. Train more epochs (max_epochs, maximal_total_epochs) or allow more "
        "degradation (maximal_relative_accuracy_degradation)"
    )


def scale_learning_rates(trainer: pl.Trainer, factor: float) -> None:
    """Multiplies every learning rate, and the base rates schedulers restart from, by factor."""
    for opt in trainer.optimizers:
        for group in opt.param_groups:
            group["lr"] *= factor
    for config in trainer.lr_scheduler_configs:
        base = getattr(config.scheduler, "base_lrs", None)
        if base is not None:
            config.scheduler.base_lrs = [lr * factor for lr in base]  # type: ignore[union-attr]


def check_reference(aa: AccuracyAware) -> None:
    """Refuses to train when there is no reference metric to measure the budget against."""
    if aa.reference is None:
        raise ConfigError(
            "accuracy_aware_training: no reference metric. HINT: run trainer.validate(model, "
            "datamodule) once before trainer.fit (the callback records the monitored metric of "
            "the uncompressed model), or pass CompressionCallback(..., reference_metric=...)"
        )
