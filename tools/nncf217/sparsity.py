"""NNCF 2.17's sparsity behaviour: schedules per batch, magnitude masks, RB loss and masks.

``record()`` runs inside the NNCF side environment (see ``tools/record_nncf.py``). The training
loop is the one of NNCF's examples (``examples/torch/classification/main.py``)::

    for epoch in range(epochs):
        ctrl.scheduler.epoch_step()
        for batch in loader:
            ctrl.scheduler.step()          # before the forward pass
            loss = task_loss + ctrl.loss()
            ...

and after each ``step()`` we record the level the batch trains at (``applied``: the level the
magnitude masks were last computed at, or RB's loss target ``1 - loss.target``) and the level
NNCF reports (``scheduler.current_sparsity_level``). Levels are stored as space-separated
``%.12g`` strings to keep the fixture small; masks as a sha256 of their packed bits plus counts.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import re
from copy import deepcopy
from typing import Any

import numpy as np
import torch
from nncf import NNCFConfig
from nncf.common.sparsity.schedulers import SPARSITY_SCHEDULERS
from nncf.torch import create_compressed_model
from nncf.torch.sparsity.rb.loss import SparseLoss
from nncf217_models import MODELS, seeded

logging.getLogger("nncf").setLevel(logging.ERROR)

EPOCHS = 6


def _fmt(values: list[float]) -> str:
    return " ".join(f"{v:.12g}" for v in values)


def module_path(node_name: str) -> str:
    """The module path of an NNCF node name:
    ``ResNet/Sequential[layer2]/BasicBlock[0]/NNCFConv2d[conv1]/conv2d_0`` is ``layer2.0.conv1``."""
    return ".".join(re.findall(r"\[([^\]]+)\]", node_name))


def build(algo: dict[str, Any], model: str = "lenet300", rounding: float | None = None):  # type: ignore[no-untyped-def]
    shape = list(MODELS[model][1])
    cfg = NNCFConfig.from_dict({"input_info": {"sample_size": shape}, "compression": algo})
    ctrl, net = create_compressed_model(seeded(model, rounding=rounding), cfg)
    return ctrl, net


# --- schedules -------------------------------------------------------------------------------


def schedule_recipes() -> list[tuple[str, dict[str, Any], int]]:
    """(algorithm, recipe entry without 'algorithm', steps per epoch the loop runs)."""
    out: list[tuple[str, dict[str, Any], int]] = []
    for algo in ("magnitude_sparsity", "rb_sparsity"):
        poly = {} if algo == "magnitude_sparsity" else {"schedule": "polynomial"}
        # per-epoch polynomial: power / concave / init / target epoch
        for power, concave, init, te in itertools.product(
            (None, 1, 3, 0.5), (None, False), (0.0, 0.2), (3, 5)
        ):
            p = {**poly, "sparsity_target": 0.6, "sparsity_target_epoch": te}
            if power is not None:
                p["power"] = power
            if concave is not None:
                p["concave"] = concave
            out.append((algo, {"sparsity_init": init, "params": p}, 2))
        # per-step polynomial, with and without steps_per_epoch
        for power, concave, spe, init, te in itertools.product(
            (None, 2), (None, False), (None, 4), (0.0, 0.1), (2, 3, 4)
        ):
            p = {**poly, "sparsity_target": 0.5, "sparsity_target_epoch": te}
            p["update_per_optimizer_step"] = True
            if spe is not None:
                p["steps_per_epoch"] = spe
            if power is not None:
                p["power"] = power
            if concave is not None:
                p["concave"] = concave
            out.append((algo, {"sparsity_init": init, "params": p}, 4))
        # exponential, per epoch and with update_per_optimizer_step (NNCF moves it per epoch)
        for init, target, te, per_step in itertools.product(
            (0.0, 0.3, 0.5), (0.6, 0.9), (3, 5), (False, True)
        ):
            p = {"schedule": "exponential", "sparsity_target": target, "sparsity_target_epoch": te}
            if per_step:
                p.update(update_per_optimizer_step=True, steps_per_epoch=3)
            out.append((algo, {"sparsity_init": init, "params": p}, 3))
        # multistep
        variants = (
            ([2, 4], [0.1, 0.3, 0.6]),
            ([1, 2, 3], [0.0, 0.2, 0.4, 0.7]),
            ([3], [0.25, 0.5]),
            ([0, 2], [0.1, 0.2, 0.5]),
        )
        for (steps, levels), per_step, init in itertools.product(
            variants, (False, True), (0.0, 0.2)
        ):
            p = {"schedule": "multistep", "multistep_steps": steps}
            p["multistep_sparsity_levels"] = levels
            if per_step:
                p.update(update_per_optimizer_step=True, steps_per_epoch=2)
            out.append((algo, {"sparsity_init": init, "params": p}, 2))
        # adaptive (level rises by `step` after `patience` epochs that reached it)
        # (NNCF's schema refuses params.step and params.eps: only their defaults are reachable)
        for patience, init in itertools.product((None, 1, 2, 3), (0.0, 0.2)):
            p: dict[str, Any] = {"schedule": "adaptive", "sparsity_target": 0.5}
            if patience is not None:
                p["patience"] = patience
            out.append((algo, {"sparsity_init": init, "params": p}, 2))
        # freeze epochs over every schedule kind
        kinds = (
            {"schedule": "polynomial", "sparsity_target": 0.5, "sparsity_target_epoch": 5},
            {
                "schedule": "polynomial",
                "sparsity_target": 0.5,
                "sparsity_target_epoch": 4,
                "update_per_optimizer_step": True,
                "steps_per_epoch": 3,
            },
            {"schedule": "exponential", "sparsity_target": 0.5, "sparsity_target_epoch": 5},
            {
                "schedule": "multistep",
                "multistep_steps": [1, 3],
                "multistep_sparsity_levels": [0.1, 0.3, 0.5],
            },
        )
        for kind, freeze in itertools.product(kinds, (0, 1, 2, 3.5)):
            out.append((algo, {"params": {**kind, "sparsity_freeze_epoch": freeze}}, 3))
        # per-step recipes without steps_per_epoch: NNCF's polynomial spends the first epoch
        # measuring it (freezing one epoch late too); exponential and multistep never wait
        for extra in (
            {"schedule": "exponential", "sparsity_target": 0.6, "sparsity_target_epoch": 3},
            {"schedule": "exponential", "sparsity_target": 0.6, "sparsity_target_epoch": 4},
            {
                "schedule": "multistep",
                "multistep_steps": [1, 2],
                "multistep_sparsity_levels": [0.1, 0.3, 0.5],
            },
            {"sparsity_target": 0.5, "sparsity_target_epoch": 4, "sparsity_freeze_epoch": 1},
            {"sparsity_target": 0.5, "sparsity_target_epoch": 4, "sparsity_freeze_epoch": 2},
        ):
            p = {**poly, **extra, "update_per_optimizer_step": True}
            out.append((algo, {"sparsity_init": 0.1, "params": p}, 3))
        # defaults, and a target epoch of 0
        out.append((algo, {}, 2))
        out.append((algo, {"sparsity_init": 0.1, "params": {"sparsity_target_epoch": 4}}, 2))
        for kind in ("polynomial", "exponential"):
            p = {"schedule": kind, "sparsity_target": 0.4, "sparsity_target_epoch": 0}
            out.append((algo, {"sparsity_init": 0.1, "params": p}, 2))
    return out


ADAPTIVE_REACHED = (0.0, 0.05, 0.02, 0.14, 0.25, 0.3, 0.45)
"""RB adaptive cases: the sparsity the logits reach by the end of epoch e (set before e+1)."""


def set_rb_sparsity(ctrl: Any, sparsity: float) -> None:
    """Logits +5 everywhere except the first round(sparsity * n) of each layer, set to -5."""
    with torch.no_grad():
        for minfo in ctrl.sparsified_module_info:
            logits = minfo.operand.mask
            flat = torch.full((logits.numel(),), 5.0)
            flat[: round(sparsity * logits.numel())] = -5.0
            logits.data.copy_(flat.view_as(logits))


_BUILT: dict[str, Any] = {}


def fresh(algo: str, entry: dict[str, Any]) -> Any:
    """A controller for ``entry``: the model is built once per algorithm, then the scheduler,
    loss and freezing are set up again as NNCF's controller constructors do (tracing a model
    for each of hundreds of recipes is slow)."""
    cfg = {"algorithm": algo, **entry}
    NNCFConfig.validate({"input_info": {"sample_size": [1, 1, 28, 28]}, "compression": cfg})
    if algo not in _BUILT:
        _BUILT[algo] = build({"algorithm": algo})[0]
    ctrl = _BUILT[algo]
    params = deepcopy(entry.get("params", {}))
    params["sparsity_init"] = entry.get("sparsity_init", 0.0)
    default = "polynomial" if algo == "magnitude_sparsity" else "exponential"
    scheduler_cls = SPARSITY_SCHEDULERS.get(params.get("schedule", default))
    if algo == "magnitude_sparsity":
        ctrl.freeze(False)
        ctrl._scheduler = scheduler_cls(ctrl, params)
    else:
        ctrl._loss = SparseLoss([m.operand for m in ctrl.sparsified_module_info])
        for minfo in ctrl.sparsified_module_info:
            minfo.operand.frozen = False
            minfo.operand.mask.data.fill_(float(np.log(0.99 / 0.01)))
        ctrl._scheduler = scheduler_cls(ctrl, params)
    ctrl.set_sparsity_level(params["sparsity_init"])
    return ctrl


def record_schedule(algo: str, entry: dict[str, Any], spe: int) -> dict[str, Any]:
    ctrl = fresh(algo, entry)
    applied: list[float] = []
    mask_levels: list[float] = []
    if algo == "magnitude_sparsity":
        original = ctrl.set_sparsity_level

        def set_level(level: float, *args: Any, **kwargs: Any) -> None:
            applied.append(level)
            if not ctrl.sparsified_module_info[0].operand.frozen:
                mask_levels.append(level)
            original(level, *args, **kwargs)

        ctrl.set_sparsity_level = set_level
        ctrl.set_sparsity_level(entry.get("sparsity_init", 0.0))

    def now() -> tuple[float, float, bool]:
        if algo == "magnitude_sparsity":
            return mask_levels[-1], applied[-1], ctrl.sparsified_module_info[0].operand.frozen
        return 1.0 - ctrl.loss.target, 1.0 - ctrl.loss.target, ctrl.loss.disabled

    train, reported, target, frozen = [], [], [], []
    for epoch in range(EPOCHS):
        if algo == "rb_sparsity" and entry.get("params", {}).get("schedule") == "adaptive":
            set_rb_sparsity(ctrl, ADAPTIVE_REACHED[epoch])
            ctrl.loss()  # NNCF's adaptive schedule reads the sparsity the last loss computed
        ctrl.scheduler.epoch_step()
        for _ in range(spe):
            ctrl.scheduler.step()
            mask_level, set_level, is_frozen = now()
            train.append(mask_level)
            target.append(set_level)
            reported.append(float(ctrl.scheduler.current_sparsity_level))
            frozen.append(is_frozen)
            if algo == "rb_sparsity":
                ctrl.loss()
    if algo == "magnitude_sparsity":
        del ctrl.set_sparsity_level
    first_frozen = next((i for i, f in enumerate(frozen) if f), None)
    return {
        "algorithm": algo,
        "recipe": entry,
        "epochs": EPOCHS,
        "steps_per_epoch": spe,
        "train": _fmt(train),
        "set": _fmt(target),
        "reported": _fmt(reported),
        "frozen_from_batch": first_frozen,
    }


# --- magnitude masks -------------------------------------------------------------------------


def mask_summary(masks: list[tuple[str, torch.Tensor]]) -> dict[str, Any]:
    """Counts per layer (module path) and a sha256 of the packed bits, layers in model order."""
    bits = np.concatenate([m.detach().flatten().numpy() > 0.5 for _, m in masks])
    return {
        "layers": [name for name, _ in masks],
        "pruned": [int((m < 0.5).sum()) for _, m in masks],
        "sha256": hashlib.sha256(np.packbits(bits).tobytes()).hexdigest(),
    }


def ordered_masks(ctrl: Any, model: str) -> list[tuple[str, torch.Tensor]]:
    order = [name for name, _ in seeded(model).named_modules()]
    found = {
        module_path(m.module_node_name): m.operand.binary_mask for m in ctrl.sparsified_module_info
    }
    return [(name, found[name]) for name in order if name in found]


def record_masks() -> list[dict[str, Any]]:
    cases = []
    grid = [(m, r) for m in MODELS for r in (None, 0.02)] + [
        ("lenet300", 0.05),
        ("plain_cnn", 0.05),
    ]
    for (model, rounding), importance in itertools.product(grid, ("normed_abs", "abs")):
        entry = {"algorithm": "magnitude_sparsity", "params": {"weight_importance": importance}}
        ctrl, _ = build(entry, model, rounding)
        for level in (0.0, 0.1, 0.3, 0.5, 0.75, 0.9):
            ctrl.set_sparsity_level(level)
            threshold = ctrl._select_threshold(level, ctrl.sparsified_module_info)
            cases.append(
                {
                    "model": model,
                    "rounding": rounding,
                    "weight_importance": importance,
                    "mode": "global",
                    "level": level,
                    "threshold": threshold,
                    **mask_summary(ordered_masks(ctrl, model)),
                }
            )
    # local mode: NNCF applies sparsity_init under one global threshold and never moves
    for model, init in itertools.product(("lenet300", "plain_cnn", "resnet"), (0.3, 0.6)):
        params = {
            "sparsity_level_setting_mode": "local",
            "sparsity_target": 0.8,
            "sparsity_target_epoch": 2,
        }
        entry = {"algorithm": "magnitude_sparsity", "sparsity_init": init, "params": params}
        ctrl, _ = build(entry, model)
        for _ in range(3):
            ctrl.scheduler.epoch_step()
            ctrl.scheduler.step()
        cases.append(
            {
                "model": model,
                "rounding": None,
                "weight_importance": "normed_abs",
                "mode": "local",
                "level": init,
                "schedule_target": 0.8,
                **mask_summary(ordered_masks(ctrl, model)),
            }
        )
    return cases


# --- RB loss and masks -----------------------------------------------------------------------


def rb_logits(kind: str, shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    if kind == "randn":
        return torch.randn(shape, generator=gen) * 3
    if kind == "tiny":  # logits in (0, 6e-8): sigmoid rounds to 0.5 in float32
        return (torch.rand(shape, generator=gen) * 1.6e-7 - 1e-7).float()
    if kind == "zeros":
        return torch.where(torch.rand(shape, generator=gen) < 0.5, 0.0, 1e-3).float()
    return torch.full(shape, float(np.log(0.99 / 0.01)), dtype=torch.float32)  # "init"


def record_rb() -> list[dict[str, Any]]:
    cases = []
    for model, kind, level in itertools.product(
        ("lenet300", "plain_cnn"), ("randn", "tiny", "zeros", "init"), (0.3, 0.7)
    ):
        ctrl, _ = build({"algorithm": "rb_sparsity", "sparsity_init": level}, model)
        gen = torch.Generator().manual_seed(7)
        infos = sorted(
            ctrl.sparsified_module_info,
            key=lambda m: [n for n, _ in seeded(model).named_modules()].index(
                module_path(m.module_node_name)
            ),
        )
        with torch.no_grad():
            for minfo in infos:
                minfo.operand.mask.data.copy_(rb_logits(kind, minfo.operand.mask.shape, gen))
        loss = ctrl.loss()
        loss.backward()
        grads = [m.operand.mask.grad.double() for m in infos]
        masks = [
            (module_path(m.module_node_name), (torch.sigmoid(m.operand.mask) > 0.5).float())
            for m in infos
        ]
        stats = ctrl.statistics().rb_sparsity
        cases.append(
            {
                "model": model,
                "logits": kind,
                "level": level,
                "loss": float(loss),
                "grad_sum": float(sum(g.sum() for g in grads)),
                "grad_abs_sum": float(sum(g.abs().sum() for g in grads)),
                "current_sparsity": float(ctrl.loss.current_sparsity),
                "mean_sparse_prob": float(stats.mean_sparse_prob),
                **mask_summary(masks),
            }
        )
    return cases


def record_rb_local() -> str:
    """NNCF's RB local mode fails at its first loss; the message says how."""
    params = {"sparsity_level_setting_mode": "local"}
    try:
        ctrl, _ = build({"algorithm": "rb_sparsity", "params": params})
        ctrl.loss()
    except Exception as exc:  # noqa: BLE001 - what NNCF raises is what we record
        return f"{type(exc).__name__}: {exc}"
    return "no error"


# --- statistics ------------------------------------------------------------------------------


def record_statistics() -> list[dict[str, Any]]:
    out = []
    for model, level in itertools.product(("lenet300", "plain_cnn", "resnet"), (0.3, 0.5)):
        ctrl, _ = build({"algorithm": "magnitude_sparsity", "sparsity_init": level}, model)
        stats = ctrl.statistics().magnitude_sparsity
        ms = stats.model_statistics
        out.append(
            {
                "algorithm": "magnitude_sparsity",
                "model": model,
                "level": level,
                "sparsity_level": ms.sparsity_level,
                "sparsity_level_for_layers": ms.sparsity_level_for_layers,
                "compression_rate": float(ctrl.compression_rate),
                "target_sparsity_level": stats.target_sparsity_level,
                "layers": {
                    module_path(s.name): [s.sparsity_level, s.weight_percentage]
                    for s in ms.sparsified_layers_summary
                },
                "thresholds": {module_path(t.name): t.threshold for t in stats.thresholds},
            }
        )
    for model in ("lenet300", "plain_cnn"):
        ctrl, _ = build({"algorithm": "rb_sparsity", "sparsity_init": 0.4}, model)
        ctrl.loss()
        stats = ctrl.statistics().rb_sparsity
        out.append(
            {
                "algorithm": "rb_sparsity",
                "model": model,
                "level": 0.4,
                "sparsity_level": stats.model_statistics.sparsity_level,
                "sparsity_level_for_layers": stats.model_statistics.sparsity_level_for_layers,
                "target_sparsity_level": stats.target_sparsity_level,
                "mean_sparse_prob": stats.mean_sparse_prob,
            }
        )
    return out


def record() -> dict[str, Any]:
    cases = []
    for algo, entry, spe in schedule_recipes():
        case = record_schedule(algo, entry, spe)
        case["id"] = f"schedule-{len(cases):03d}"
        cases.append(case)
    for case in record_masks():
        case["id"] = f"mask-{len(cases):03d}"
        cases.append(case)
    for case in record_rb():
        case["id"] = f"rb-{len(cases):03d}"
        cases.append(case)
    return {
        "nncf": "2.17.0",
        "cases": cases,
        "rb_local_error": record_rb_local(),
        "statistics": record_statistics(),
    }
