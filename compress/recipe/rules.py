"""Rules across recipe keys, which JSON Schema cannot say clearly: contradictions between keys
of one algorithm, and between a schedule and the number of epochs the run trains.

Where NNCF 2.17 refuses a combination (or crashes on it) the rule is a ``ConfigError``; where
NNCF 2.17 accepts it and trains something the recipe probably did not mean, a warning that
names the keys, their values and what would be consistent. NNCF refuses none of the
contradictions below beyond the multistep level count (``MultiStepSchedule``); it sorts
``multistep_steps``, which we refuse unsorted rather than reorder silently.

Example:
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     check_epochs("compression", "filter_pruning", {"num_init_steps": 5}, 3)
    >>> "num_init_steps: 5 is not below the 3 epochs" in str(caught[0].message)
    True
"""

from __future__ import annotations

import bisect
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from compress.errors import ConfigError

__all__ = ["all_layers_fixed", "check_algorithm", "check_epochs"]

_SPARSITY = ("magnitude_sparsity", "rb_sparsity")
_PRUNING_TARGETS = ("pruning_target", "pruning_flops_target", "pruning_latency_target")


def _warn(text: str, stacklevel: int = 6) -> None:
    # 6: the caller of load_config (load_config -> _algorithm -> check_algorithm -> a rule)
    warnings.warn(text, UserWarning, stacklevel=stacklevel)


def check_algorithm(
    name: str, options: Mapping[str, Any], params: dict[str, Any], path: str
) -> None:
    """The rules of one algorithm's keys; fills in the filter pruning defaults that depend on
    other keys (``pruning_target``, ``allocation``)."""
    if name in _SPARSITY and params["schedule"] == "multistep":
        _multistep(options, params, path)
    elif name in _SPARSITY and params["schedule"] != "adaptive":
        _sparsity(options, params, path)
    if name == "filter_pruning":
        _filter_pruning(options, params, path)


def _multistep(options: Mapping[str, Any], params: Mapping[str, Any], path: str) -> None:
    p = f"{path}.params"
    steps, levels = list(params["multistep_steps"]), list(params["multistep_sparsity_levels"])
    if len(levels) != len(steps) + 1:
        raise ConfigError(
            f"{p}.multistep_sparsity_levels: {len(levels)} levels for {len(steps)} steps; "
            "there must be one more level than steps (the first level holds before the "
            "first step), e.g. steps [10, 20] with levels [0.3, 0.5, 0.7]"
        )
    if steps != sorted(steps):
        raise ConfigError(f"{p}.multistep_steps: {steps} must be in ascending order")
    repeated = sorted({s for s in steps if steps.count(s) > 1})
    if repeated:
        skipped = [levels[i + 1] for i in range(len(steps) - 1) if steps[i] == steps[i + 1]]
        _warn(
            f"{p}.multistep_steps: {steps} repeat epoch {repeated[0]}; the level jumps past "
            f"{skipped} at that epoch, which then never applies. Give strictly increasing "
            "steps, one per level after the first (or drop the repeated level)"
        )
    if levels != sorted(levels):
        _warn(
            f"{p}.multistep_sparsity_levels: {levels} decrease; masks then give pruned "
            "weights back. Give the levels in ascending order unless you mean that"
        )
    first = levels[bisect.bisect_right(steps, 0)]  # the level of epoch 0
    init = options["sparsity_init"]
    if init > first:
        _warn(
            f"{path}.sparsity_init: {init} is above the multistep level of epoch 0, "
            f"multistep_sparsity_levels {levels} (starting at {first}); the model is built at "
            f"{init} and falls to {first} at epoch 0 (pruned weights come back). Give "
            f"sparsity_init <= {first}, or start multistep_sparsity_levels at {init}"
        )
    freeze = params["sparsity_freeze_epoch"]
    if steps and freeze <= steps[-1]:
        stuck = levels[bisect.bisect_right(steps, freeze - 1)] if freeze > 0 else init
        _warn(
            f"{p}.sparsity_freeze_epoch: {freeze} is not after the last multistep step "
            f"{steps[-1]} (multistep_steps {steps}); the masks freeze at level {stuck} and "
            f"never reach {levels[-1]}. Set sparsity_freeze_epoch > {steps[-1]}"
        )


def _sparsity(options: Mapping[str, Any], params: Mapping[str, Any], path: str) -> None:
    init, target = options["sparsity_init"], params["sparsity_target"]
    if init > target:
        _warn(
            f"{path}.sparsity_init: {init} is above sparsity_target {target}; the level "
            "falls during training. Give sparsity_init <= sparsity_target"
        )
    freeze, target_epoch = params["sparsity_freeze_epoch"], params["sparsity_target_epoch"]
    if freeze < target_epoch:
        _warn(
            f"{path}.params.sparsity_freeze_epoch: {freeze} comes before sparsity_target_epoch "
            f"{target_epoch}; the masks freeze before the level reaches {target}. Set "
            "sparsity_freeze_epoch >= sparsity_target_epoch"
        )


def _filter_pruning(options: Mapping[str, Any], params: dict[str, Any], path: str) -> None:
    p = f"{path}.params"
    given = [k for k in _PRUNING_TARGETS if k in params]
    if len(given) > 1:
        raise ConfigError(
            f"{p}: {' and '.join(f'{k} ({params[k]})' for k in given)} are both set; give "
            "only one target (a fraction of filters, of MACs or of measured latency)"
        )
    if not given:
        params.setdefault("pruning_target", 0.5)
    if params["interlayer_ranking_type"] == "learned_ranking" or any(
        k in params for k in ("legr_params", "save_ranking_coeffs_path", "load_ranking_coeffs_path")
    ):
        raise ConfigError(
            f"{p}.interlayer_ranking_type: 'learned_ranking' (LeGR) is not supported; "
            "use 'unweighted_ranking'"
        )
    allocation = params.get("allocation")
    if allocation is None:
        params["allocation"] = "global" if params["all_weights"] else "uniform"
    elif params["all_weights"] and allocation == "uniform":
        raise ConfigError(
            f"{p}.allocation: 'uniform' contradicts all_weights: true; drop one of them"
        )
    key = next(k for k in _PRUNING_TARGETS if k in params)
    init, target = options["pruning_init"], params[key]
    if init <= target:
        return
    if key == "pruning_target":  # NNCF 2.17 accepts it (its own resnet18_pruning_accuracy_aware)
        _warn(
            f"{path}.pruning_init: {init} is above pruning_target {target}; as in NNCF 2.17 the "
            f"model is built pruned at {init} and pruned at {target} from epoch num_init_steps on"
        )
        return
    what = "MACs" if key == "pruning_flops_target" else "measured latency"
    _warn(
        f"{path}.pruning_init: {init} is above {key} {target}; the schedule starts by removing "
        f"{init} of the {what} and falls to {target} (pruned filters come back). Give "
        f"pruning_init <= {target} (pruning_init is a fraction of the {what} with {key})"
    )


def check_epochs(path: str, name: str, params: Mapping[str, Any], epochs: int) -> None:
    """Warnings for a schedule that a run of ``epochs`` epochs cannot follow to its end:
    filter pruning that starts after the last epoch, a sparsity target epoch past it.
    ``epochs`` comes from the recipe's ``epochs`` or from the trainer's ``max_epochs``."""
    if name == "filter_pruning" and params.get("num_init_steps", 0) >= epochs:
        _warn(  # 5: the caller of load_config (load_config -> check_run_epochs -> here)
            f"{path}.params.num_init_steps: {params['num_init_steps']} is not below the "
            f"{epochs} epochs of the run; pruning would start at epoch "
            f"{params['num_init_steps']}, so it never starts. Give num_init_steps < {epochs} "
            "(the epochs trained before pruning starts), or train longer",
            5,
        )
    if name in _SPARSITY and params.get("schedule") in ("polynomial", "exponential"):
        target_epoch = params["sparsity_target_epoch"]
        if target_epoch > epochs:
            _warn(
                f"{path}.params.sparsity_target_epoch: {target_epoch} is past the {epochs} "
                f"epochs of the run; the run ends before the level reaches sparsity_target "
                f"{params['sparsity_target']}. Give sparsity_target_epoch <= {epochs}, or "
                "train longer",
                5,
            )


def check_run_epochs(algorithms: Sequence[Any], epochs: int | None) -> None:
    """:func:`check_epochs` for every algorithm of a recipe (``AlgorithmConfig``s); nothing
    when the number of epochs is unknown."""
    if epochs is None or isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        return
    for a in algorithms:
        check_epochs(a.path, a.name, a.params, epochs)


def all_layers_fixed(path: str, layer_ratios: Mapping[str, float], groups: int) -> str:
    """The warning when ``layer_ratios`` (with ``prune_channels``) fix every prunable group: the
    schedule's target then decides nothing."""
    return (
        f"{path}.layer_ratios: {dict(layer_ratios)} (with prune_channels) set all {groups} "
        "prunable channel groups, so the schedule's target (pruning_target, "
        "pruning_flops_target or pruning_latency_target) is never used. Leave some layers out "
        "of layer_ratios, or drop the target if the per-layer ratios are what you mean"
    )
