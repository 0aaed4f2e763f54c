"""NNCF 2.17's filter pruning, recorded: schedule levels, pruned filters, FLOPs targets, statistics.

Run by ``tools/record_nncf.py pruning`` beside NNCF 2.17. Case kinds:

- ``schedule``: NNCF's pruning scheduler classes on a stand-in controller (the scheduler only
  reads ``pruning_init`` and ``prune_flops``), over a grid of schedule, pruning_init,
  pruning_target, pruning_steps and num_init_steps (stated by the case id): the level after each
  ``epoch_step`` (before the first, NNCF's controller prunes at ``pruning_init``), or the
  exception NNCF raises.
- ``run``: a whole NNCF controller through ``epoch_step`` calls: level and kept filters per epoch.
- ``masks``: pruned filters per layer (hex bit sets: bit i is filter i) after
  ``set_pruning_level(level)`` for each of ``levels`` on a seeded model, per importance,
  prune_first_conv, prune_downsample_convs and all_weights, with NNCF's clusters, its full
  FLOPs, params and filters, and per level [FLOPs, params, filters].
- ``flops``: ``pruning_flops_target`` controllers: pruned filters and FLOPs, or the exception.
"""

from __future__ import annotations

import itertools
import logging
import warnings
from typing import Any

import torch
from nncf import NNCFConfig
from nncf.common.logging import nncf_logger
from nncf.common.pruning.schedulers import PRUNING_SCHEDULERS
from nncf.torch import create_compressed_model
from nncf217_models import MODELS, seeded

nncf_logger.setLevel(logging.ERROR)


class _Controller:
    """What NNCF's pruning schedulers read and call on their controller."""

    def __init__(self, init: float) -> None:
        self.pruning_init = init
        self.prune_flops = False
        self.levels: list[float] = []
        self.frozen = False

    def set_pruning_level(self, level: float) -> None:
        self.levels.append(float(level))

    def freeze(self) -> None:
        self.frozen = True

    def step(self, next_step: int | None) -> None:
        pass


def _schedule_case(kind: str, init: float, target: float, steps: int, warmup: int) -> dict:
    params = {"schedule": kind, "pruning_target": target, "pruning_steps": steps}
    params["num_init_steps"] = warmup
    # the id states the recipe: schedule/KIND/iINIT/tTARGET/sSTEPS/wNUM_INIT_STEPS
    case: dict[str, Any] = {"id": f"schedule/{kind}/i{init}/t{target}/s{steps}/w{warmup}"}
    ctrl = _Controller(init)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            scheduler = PRUNING_SCHEDULERS.get(kind)(ctrl, params)
            frozen_at = None
            for epoch in range(warmup + steps + 3):
                scheduler.epoch_step()
                if ctrl.frozen and frozen_at is None:
                    frozen_at = epoch
        case["levels"] = ctrl.levels  # after epoch_step 0, 1, ...; built at pruning_init
        case["frozen_at"] = frozen_at
        if caught:
            case["warnings"] = sorted({type(w.message).__name__ for w in caught})
    except Exception as err:  # noqa: BLE001 - a crash is a recorded outcome
        case["error"] = f"{type(err).__name__}: {err}"
    return case


def _schedule_cases() -> list[dict]:
    cases = []
    inits = (0.0, 0.1, 0.3, 0.5, 0.95)
    targets = (0.1, 0.3, 0.5, 0.8)
    for kind, init, target, steps, warmup in itertools.product(
        ("exponential", "exponential_with_bias", "baseline"),
        inits,
        targets,
        (1, 2, 3, 5, 10),
        (0, 2),
    ):
        if kind == "baseline" and steps not in (1, 5):
            continue
        cases.append(_schedule_case(kind, init, target, steps, warmup))
    for kind in ("exponential", "exponential_with_bias"):
        cases.append(_schedule_case(kind, 0.0, 0.5, 100, 0))  # NNCF's default pruning_steps
        cases.append(_schedule_case(kind, 0.0, 0.5, 15, 0))
    return cases


def _config(name: str, params: dict, init: float = 0.0) -> NNCFConfig:
    section = {"algorithm": "filter_pruning", "pruning_init": init, "params": params}
    return NNCFConfig.from_dict(
        {"input_info": {"sample_size": list(MODELS[name][1])}, "compression": section}
    )


def _build(name: str, params: dict, init: float = 0.0, seed: int = 0):  # type: ignore[no-untyped-def]
    ctrl, model = create_compressed_model(seeded(name, seed), _config(name, params, init))
    names = {id(m): n for n, m in model.named_modules()}
    clusters = [
        [names[id(minfo.module)] for minfo in c.elements]
        for c in ctrl.pruned_module_groups_info.get_all_clusters()
    ]
    return ctrl, names, clusters


def _pruned(ctrl, names: dict) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Pruned filters per layer as a hex number whose bit i is filter i (keeps the file small)."""
    out = {}
    for minfo in ctrl.pruned_module_groups_info.get_all_nodes():
        mask = minfo.operand.binary_filter_pruning_mask
        bits = sum(1 << i for i in torch.nonzero(mask == 0).flatten().tolist())
        out[names[id(minfo.module)]] = format(bits, "x")
    return out


def _figures(ctrl) -> dict[str, int]:  # type: ignore[no-untyped-def]
    ctrl._update_benchmark_statistics()
    return {
        "full_flops": int(ctrl.full_flops),
        "flops": int(ctrl.current_flops),
        "full_params": int(ctrl.full_params_num),
        "params": int(ctrl.current_params_num),
        "full_filters": int(ctrl.full_filters_num),
        "filters": int(ctrl.current_filters_num),
    }


def _mask_cases() -> list[dict]:
    """One entry per built controller; its ``levels`` are cases ``ID/lLEVEL``."""
    cases = []
    names = ("lenet300", "plain_cnn", "resnet", "wide_cnn", "narrow_cnn")
    for name, importance, first, down, all_weights in itertools.product(
        names, ("L1", "L2", "geometric_median"), (False, True), (False, True), (False, True)
    ):
        if name == "lenet300" and down:
            continue  # no conv: the flag changes nothing
        params = {
            "schedule": "baseline",
            "pruning_target": 0.5,
            "filter_importance": importance,
            "prune_first_conv": first,
            "prune_downsample_convs": down,
            "all_weights": all_weights,
        }
        case: dict[str, Any] = {"kind": "masks", "model": name, "params": params}
        flags = f"first{int(first)}/down{int(down)}/all{int(all_weights)}"
        case["id"] = f"masks/{name}/{importance}/{flags}"
        case["levels"] = [0.1, 0.3, 0.45, 0.5, 0.7]
        try:
            ctrl, mnames, case["clusters"] = _build(name, params)
        except Exception as err:  # noqa: BLE001 - NNCF's all_weights with no cluster crashes
            case["error"] = f"{type(err).__name__}: {err}"
            cases.append(case)
            continue
        case["full"] = _figures(ctrl)
        case["pruned"], case["figures"] = [], []
        for level in case["levels"]:
            ctrl.set_pruning_level(level)
            case["pruned"].append(_pruned(ctrl, mnames))
            figures = _figures(ctrl)
            case["figures"].append([figures["flops"], figures["params"], figures["filters"]])
        cases.append(case)
    return cases


def _flops_cases() -> list[dict]:
    cases = []
    for name, all_weights, target in itertools.product(
        ("lenet300", "plain_cnn", "resnet", "wide_cnn"), (False, True), (0.1, 0.2, 0.3, 0.5, 0.7)
    ):
        params = {
            "schedule": "baseline",
            "pruning_flops_target": target,
            "prune_first_conv": True,
            "prune_downsample_convs": True,
            "all_weights": all_weights,
        }
        case: dict[str, Any] = {"kind": "flops", "model": name, "params": params}
        case["id"] = f"flops/{name}/all{int(all_weights)}/t{target}"
        try:
            ctrl, mnames, clusters = _build(name, params)
            ctrl.scheduler.epoch_step()
            case["clusters"] = clusters
            case["pruned"] = _pruned(ctrl, mnames)
            case["figures"] = _figures(ctrl)
        except Exception as err:  # noqa: BLE001
            case["error"] = f"{type(err).__name__}: {err}"
        cases.append(case)
    return cases


def _run_cases() -> list[dict]:
    cases = []
    runs = [
        ("plain_cnn", "exponential", 0.0, 0.5, 5, 0),
        ("plain_cnn", "exponential", 0.95, 0.1, 3, 0),  # init above target (NNCF's own config)
        ("plain_cnn", "exponential_with_bias", 0.3, 0.5, 5, 1),
        ("plain_cnn", "baseline", 0.2, 0.6, 5, 2),
        ("wide_cnn", "exponential", 0.1, 0.7, 4, 1),
        ("wide_cnn", "exponential_with_bias", 0.0, 0.6, 6, 0),
        ("narrow_cnn", "exponential", 0.0, 0.4, 3, 0),  # only prunable layer 16 wide
        ("narrow_cnn", "baseline", 0.0, 0.6, 3, 0),
    ]
    for name, kind, init, target, steps, warmup in runs:
        params = {
            "schedule": kind,
            "pruning_target": target,
            "pruning_steps": steps,
            "num_init_steps": warmup,
            "prune_first_conv": True,
            "prune_downsample_convs": True,
        }
        case: dict[str, Any] = {"kind": "run", "model": name, "pruning_init": init}
        case["params"] = params
        case["id"] = f"run/{name}/{kind}/i{init}/t{target}/s{steps}/w{warmup}"
        try:
            ctrl, mnames, _ = _build(name, params, init)
            epochs = [{"level": float(ctrl.pruning_level), "pruned": _pruned(ctrl, mnames)}]
            for _ in range(warmup + steps + 2):
                ctrl.scheduler.epoch_step()
                epochs.append(
                    {
                        "level": float(ctrl.scheduler.current_pruning_level),
                        "pruned": _pruned(ctrl, mnames),
                        "frozen": bool(ctrl.frozen),
                    }
                )
            case["epochs"] = epochs
        except Exception as err:  # noqa: BLE001
            case["error"] = f"{type(err).__name__}: {err}"
        cases.append(case)
    return cases


def record() -> dict:
    """Every case of the pruning area, with the NNCF version it came from."""
    import nncf

    cases = _schedule_cases() + _mask_cases() + _flops_cases() + _run_cases()
    return {"nncf": nncf.__version__, "torch": torch.__version__, "cases": cases}
