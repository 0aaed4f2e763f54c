"""Filter pruning against NNCF 2.17's recording (tests/fixtures/nncf217/pruning.json, written by
``tools/record_nncf.py pruning`` beside NNCF; NNCF is not needed here).

Every recorded case is compared with ours: schedule levels per epoch, pruned filters per layer
at a level, ``pruning_flops_target`` results and whole runs. A case is identical, or it differs
on purpose for a stated reason (docs/nncf_differences.md, "Filter pruning"): NNCF crashed, or
its id is listed; a listed case that has become identical fails too, so the list stays true.
"""

from __future__ import annotations

import json
import math
import warnings
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from nncf217_models import example_input, seeded
from torch import nn

import compress
from compress.pruning.filter_pruning import FilterPruning
from compress.schedules import pruning_level

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURE = Path(__file__).parent / "fixtures" / "nncf217" / "pruning.json"
TOL = 1e-7

# --- the cases that differ on purpose (docs/nncf_differences.md, "Filter pruning") -----------

NNCF_DIVIDES_BY_ZERO = (
    "NNCF's exponential_with_bias raises ZeroDivisionError (pruning_steps 1, pruning_init equal "
    "to the target, or its solver landing exactly on k = 0: pruning_steps 2, or 3 with init above "
    "the target); ours: the target from the first pruning epoch, else the solution of the "
    "equations where one with k > 0 exists, or the straight line from pruning_init to the target"
)
NNCF_EMPTY_CAT = (
    "all_weights with no prunable group: NNCF raises (torch.cat of nothing); ours builds, warns "
    "and prunes nothing"
)
NNCF_FALLS_BELOW = (
    "pruning_init above the target: after the last pruning step NNCF's level falls below the "
    "target (exponential: to negative levels, the masks then freeze unpruned; "
    "exponential_with_bias: its solver does not converge); ours stays at the target"
)
NNCF_SOLVER_FAILS = (
    "exponential_with_bias: NNCF's fsolve stops at its starting guess k = 1 (pruning_steps 3 from "
    "pruning_init 0, pruning_steps 100) or at rounding noise of the trivial root (pruning_steps "
    "2), so the level misses NNCF's own equations; ours solves them"
)
NNCF_EMPTY_LAYER = (
    "all_weights: NNCF's one threshold prunes every filter of a layer (its FLOPs can drop to 0); "
    "ours keeps the round_to best filters of such a group"
)


def reason(case_id: str, error: str | None) -> str | None:
    """Why a case differs on purpose; None when it must be identical. Cases NNCF crashes on are
    known by the recorded exception, the others are listed by id (the tuples at the end)."""
    if error is not None:
        if error.startswith("ZeroDivisionError"):
            return NNCF_DIVIDES_BY_ZERO
        if "torch.cat" in error:
            return NNCF_EMPTY_CAT
        return f"NNCF raises {error}"
    for text, ids in (
        (NNCF_FALLS_BELOW, FALLS_BELOW),
        (NNCF_SOLVER_FAILS, SOLVER_FAILS),
        (NNCF_EMPTY_LAYER, EMPTY_LAYER),
    ):
        if case_id in ids:
            return text
    return None


# --- the recording -----------------------------------------------------------------------------


@cache
def recording() -> dict[str, Any]:
    return json.loads(FIXTURE.read_text())


def cases(kind: str) -> list[dict[str, Any]]:
    return [c for c in recording()["cases"] if c["id"].split("/")[0] == kind]


def _schedule_params(case_id: str) -> tuple[dict[str, Any], float]:
    _, kind, init, target, steps, warmup = case_id.split("/")
    params = {
        "schedule": kind,
        "pruning_target": float(target[1:]),
        "pruning_steps": int(steps[1:]),
        "num_init_steps": int(warmup[1:]),
    }
    return params, float(init[1:])


def _bits(pruned: dict[str, str]) -> dict[str, int]:
    return {layer: int(h, 16) for layer, h in pruned.items()}


def ours_pruned(algo: FilterPruning) -> dict[str, int]:
    """Pruned filters per prunable layer of ours, as bit sets (bit i: filter i pruned)."""
    out = {}
    for name, (group, member) in algo._layers().items():
        kept = algo.keep[group.name][member.channel]
        out[name] = sum(1 << int(i) for i, k in zip(member.index, kept, strict=True) if not k)
    return out


def _same_pruned(nncf: dict[str, int], ours: dict[str, int]) -> bool:
    """Same filters pruned in every layer (a layer one side does not prune counts as none)."""
    return all(nncf.get(n, 0) == ours.get(n, 0) for n in set(nncf) | set(ours))


def build(model: str, params: dict[str, Any], init: float = 0.0) -> tuple[Any, FilterPruning]:
    recipe = {"algorithm": "filter_pruning", "pruning_init": init, "params": params}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctrl, _ = compress.create_compressed_model(
            seeded(model), {"compression": recipe}, example_input(model)
        )
    return ctrl, ctrl.algorithms[0]


def _clusters(algo: FilterPruning) -> set[frozenset[str]]:
    """Our groups as NNCF's clusters: the set of prunable layers of each."""
    layers: dict[str, set[str]] = {}
    for name, (group, _) in algo._layers().items():
        layers.setdefault(group.name, set()).add(name)
    return {frozenset(names) for names in layers.values()}


def _filters(algo: FilterPruning) -> int:
    return next(r["current"] for r in algo.statistics()["summary"] if r[""] == "filters")


def _macs(algo: FilterPruning) -> int:
    return next(r["current"] for r in algo.statistics()["summary"] if r[""] == "MACs")


# --- comparisons: one outcome per case ------------------------------------------------------------


def schedule_outcomes() -> dict[str, bool]:
    out = {}
    for case in cases("schedule"):
        params, init = _schedule_params(case["id"])
        if "error" in case:
            _check_sane(params, init)
            out[case["id"]] = False
            continue
        ours = [pruning_level(params, init, e) for e in range(len(case["levels"]))]
        out[case["id"]] = all(
            math.isclose(a, b, abs_tol=TOL) for a, b in zip(ours, case["levels"], strict=True)
        )
    return out


def _check_sane(params: dict[str, Any], init: float) -> None:
    """Where NNCF crashes ours gives levels in [0, target] that reach the target at e = E."""
    target, warmup = params["pruning_target"], params["num_init_steps"]
    levels = [pruning_level(params, init, e) for e in range(warmup + params["pruning_steps"] + 2)]
    assert all(0.0 <= x <= target for x in levels), levels
    assert levels[warmup + max(params["pruning_steps"] - 1, 0)] == pytest.approx(target)


def mask_outcomes() -> dict[str, bool]:
    """Per level: the same filters pruned, NNCF's filter count and FLOPs (2 x our MACs). The
    groups must be NNCF's clusters (the layers pruned together: residual adds) in every build."""
    out = {}
    for case in cases("masks"):
        ids = [f"{case['id']}/l{level}" for level in case["levels"]]
        ctrl, algo = build(case["model"], case["params"])
        if "error" in case:
            for case_id, level in zip(ids, case["levels"], strict=True):
                algo.set_level(level)
                assert not any(ours_pruned(algo).values())  # ours prunes nothing there
                out[case_id] = False
            continue
        assert _clusters(algo) == {frozenset(c) for c in case["clusters"]}, case["id"]
        for case_id, level, pruned, figures in zip(
            ids, case["levels"], case["pruned"], case["figures"], strict=True
        ):
            algo.set_level(level)
            same = _same_pruned(_bits(pruned), ours_pruned(algo))
            flops, _, filters = figures
            out[case_id] = same and _filters(algo) == filters and 2 * _macs(algo) == flops
    return out


def flops_outcomes() -> dict[str, bool]:
    out = {}
    for case in cases("flops"):
        ctrl, algo = build(case["model"], case["params"])
        ctrl.scheduler.epoch_step()
        same = _same_pruned(_bits(case["pruned"]), ours_pruned(algo))
        out[case["id"]] = same and 2 * _macs(algo) == case["figures"]["flops"]
    return out


def run_outcomes() -> dict[str, bool]:
    out = {}
    for case in cases("run"):
        ctrl, algo = build(case["model"], case["params"], case["pruning_init"])
        got = [(algo.level, ours_pruned(algo))]
        for _ in case["epochs"][1:]:
            ctrl.scheduler.epoch_step()
            got.append((algo.level, ours_pruned(algo)))
        out[case["id"]] = all(
            math.isclose(level, e["level"], abs_tol=TOL) and _same_pruned(_bits(e["pruned"]), p)
            for (level, p), e in zip(got, case["epochs"], strict=True)
        )
    return out


def _check(outcomes: dict[str, bool], errors: dict[str, str]) -> None:
    wrong = []
    for case_id, same in outcomes.items():
        why = reason(case_id, errors.get(case_id))
        if same and why:
            wrong.append(f"{case_id}: listed as different ({why}) but identical")
        if not same and not why:
            wrong.append(f"{case_id}: differs from NNCF 2.17")
    assert not wrong, f"{len(wrong)} of {len(outcomes)} cases:\n" + "\n".join(wrong[:40])


def _errors(kind: str) -> dict[str, str]:
    out = {}
    for case in cases(kind):
        if "error" in case:
            for level in case.get("levels", [None]) if kind == "masks" else [None]:
                out[case["id"] if level is None else f"{case['id']}/l{level}"] = case["error"]
    return out


# --- the tests ---------------------------------------------------------------------------------


def test_recording_covers_the_grid() -> None:
    assert recording()["nncf"] == "2.17.0"
    assert len(cases("schedule")) >= 300
    assert sum(len(c["levels"]) for c in cases("masks")) >= 300
    kinds = {c["id"].split("/")[1] for c in cases("schedule")}
    assert kinds == {"exponential", "exponential_with_bias", "baseline"}
    importances = {c["params"]["filter_importance"] for c in cases("masks")}
    assert importances == {"L1", "L2", "geometric_median"}


def test_schedules_match_nncf() -> None:
    _check(schedule_outcomes(), _errors("schedule"))


def test_exponential_reaches_the_target_one_epoch_early() -> None:
    """NNCF's target_epoch is pruning_steps - 1: 5 steps give .159, .293, .405, .5."""
    params = {"schedule": "exponential", "pruning_target": 0.5, "pruning_steps": 5}
    levels = [pruning_level({**params, "num_init_steps": 0}, 0.0, e) for e in range(5)]
    assert [round(x, 3) for x in levels] == [0.0, 0.159, 0.293, 0.405, 0.5]


def test_filter_masks_match_nncf() -> None:
    _check(mask_outcomes(), _errors("masks"))


def test_listed_cases_show_the_nncf_fault() -> None:
    """The listed cases are what their reason says in NNCF's own recording."""
    by_id = {c["id"]: c for c in recording()["cases"]}
    for case_id in FALLS_BELOW:
        case = by_id[case_id]
        levels = case["levels"] if "levels" in case else [e["level"] for e in case["epochs"]]
        target = case["params"]["pruning_target"] if "params" in case else None
        target = target or _schedule_params(case_id)[0]["pruning_target"]
        assert min(levels[-2:]) < target - 1e-3, case_id
    widths = {}
    for case_id in EMPTY_LAYER:
        case_key, level = case_id.rsplit("/l", 1)
        case = by_id[case_key]
        if case["model"] not in widths:
            model = seeded(case["model"])
            widths[case["model"]] = {
                n: m.weight.shape[0]
                for n, m in model.named_modules()
                if isinstance(m, (nn.Conv2d, nn.Linear))
            }
        pruned = case["pruned"][case["levels"].index(float(level))]
        full = [
            n for n, bits in _bits(pruned).items() if bits == (1 << widths[case["model"]][n]) - 1
        ]
        assert full, f"{case_id}: NNCF left every layer some filters"


def test_flops_targets_match_nncf() -> None:
    _check(flops_outcomes(), _errors("flops"))


def test_runs_match_nncf() -> None:
    _check(run_outcomes(), _errors("run"))


def test_init_above_target_warns_and_builds_as_nncf() -> None:
    """NNCF's own resnet18_pruning_accuracy_aware.json has pruning_init 0.95 above the target
    0.1: NNCF builds the model pruned at 0.95 and prunes at 0.1 from the first epoch."""
    recipe = {
        "algorithm": "filter_pruning",
        "pruning_init": 0.95,
        "params": {"pruning_target": 0.1, "pruning_steps": 3, **ALL_LAYERS},
    }
    with pytest.warns(UserWarning, match=r"pruning_init: 0.95 is above pruning_target 0.1; as in"):
        ctrl, _ = compress.create_compressed_model(
            seeded("plain_cnn"), {"compression": recipe}, example_input("plain_cnn")
        )
    algo = ctrl.algorithms[0]
    assert {n: bin(b).count("1") for n, b in ours_pruned(algo).items()} == {
        "conv1": 8,
        "conv2": 24,
        "conv3": 56,
    }  # NNCF's recorded construction (run/plain_cnn/exponential/i0.95/t0.1/s3/w0)
    ctrl.scheduler.epoch_step()
    assert algo.level == pytest.approx(0.1) and not any(ours_pruned(algo).values())


def test_a_target_rounding_keeps_whole_builds_and_warns() -> None:
    """NarrowCNN's only prunable layer is 16 wide: at target 0.4 NNCF keeps all 16 and builds."""
    recipe = {"algorithm": "filter_pruning", "params": {"pruning_target": 0.4}}
    with pytest.warns(UserWarning, match="can prune nothing.*or a smaller round_to to prune some"):
        ctrl, _ = compress.create_compressed_model(
            seeded("narrow_cnn"), {"compression": recipe}, example_input("narrow_cnn")
        )
    for _ in range(3):
        ctrl.scheduler.epoch_step()
    assert not any(ours_pruned(ctrl.algorithms[0]).values())


ALL_LAYERS = {"prune_first_conv": True, "prune_downsample_convs": True}


# --- the ids of the cases that differ on purpose (by reason above) -----------------------------

FALLS_BELOW = (
    "schedule/exponential/i0.3/t0.1/s2/w0",
    "schedule/exponential/i0.3/t0.1/s2/w2",
    "schedule/exponential/i0.3/t0.1/s3/w0",
    "schedule/exponential/i0.3/t0.1/s3/w2",
    "schedule/exponential/i0.3/t0.1/s5/w0",
    "schedule/exponential/i0.3/t0.1/s5/w2",
    "schedule/exponential/i0.3/t0.1/s10/w0",
    "schedule/exponential/i0.3/t0.1/s10/w2",
    "schedule/exponential/i0.5/t0.1/s2/w0",
    "schedule/exponential/i0.5/t0.1/s2/w2",
    "schedule/exponential/i0.5/t0.1/s3/w0",
    "schedule/exponential/i0.5/t0.1/s3/w2",
    "schedule/exponential/i0.5/t0.1/s5/w0",
    "schedule/exponential/i0.5/t0.1/s5/w2",
    "schedule/exponential/i0.5/t0.1/s10/w0",
    "schedule/exponential/i0.5/t0.1/s10/w2",
    "schedule/exponential/i0.5/t0.3/s2/w0",
    "schedule/exponential/i0.5/t0.3/s2/w2",
    "schedule/exponential/i0.5/t0.3/s3/w0",
    "schedule/exponential/i0.5/t0.3/s3/w2",
    "schedule/exponential/i0.5/t0.3/s5/w0",
    "schedule/exponential/i0.5/t0.3/s5/w2",
    "schedule/exponential/i0.5/t0.3/s10/w0",
    "schedule/exponential/i0.5/t0.3/s10/w2",
    "schedule/exponential/i0.95/t0.1/s2/w0",
    "schedule/exponential/i0.95/t0.1/s2/w2",
    "schedule/exponential/i0.95/t0.1/s3/w0",
    "schedule/exponential/i0.95/t0.1/s3/w2",
    "schedule/exponential/i0.95/t0.1/s5/w0",
    "schedule/exponential/i0.95/t0.1/s5/w2",
    "schedule/exponential/i0.95/t0.1/s10/w0",
    "schedule/exponential/i0.95/t0.1/s10/w2",
    "schedule/exponential/i0.95/t0.3/s2/w0",
    "schedule/exponential/i0.95/t0.3/s2/w2",
    "schedule/exponential/i0.95/t0.3/s3/w0",
    "schedule/exponential/i0.95/t0.3/s3/w2",
    "schedule/exponential/i0.95/t0.3/s5/w0",
    "schedule/exponential/i0.95/t0.3/s5/w2",
    "schedule/exponential/i0.95/t0.3/s10/w0",
    "schedule/exponential/i0.95/t0.3/s10/w2",
    "schedule/exponential/i0.95/t0.5/s2/w0",
    "schedule/exponential/i0.95/t0.5/s2/w2",
    "schedule/exponential/i0.95/t0.5/s3/w0",
    "schedule/exponential/i0.95/t0.5/s3/w2",
    "schedule/exponential/i0.95/t0.5/s5/w0",
    "schedule/exponential/i0.95/t0.5/s5/w2",
    "schedule/exponential/i0.95/t0.5/s10/w0",
    "schedule/exponential/i0.95/t0.5/s10/w2",
    "schedule/exponential/i0.95/t0.8/s2/w0",
    "schedule/exponential/i0.95/t0.8/s2/w2",
    "schedule/exponential/i0.95/t0.8/s3/w0",
    "schedule/exponential/i0.95/t0.8/s3/w2",
    "schedule/exponential/i0.95/t0.8/s5/w0",
    "schedule/exponential/i0.95/t0.8/s5/w2",
    "schedule/exponential/i0.95/t0.8/s10/w0",
    "schedule/exponential/i0.95/t0.8/s10/w2",
    "schedule/exponential_with_bias/i0.3/t0.1/s3/w0",
    "schedule/exponential_with_bias/i0.3/t0.1/s3/w2",
    "schedule/exponential_with_bias/i0.5/t0.1/s3/w0",
    "schedule/exponential_with_bias/i0.5/t0.1/s3/w2",
    "schedule/exponential_with_bias/i0.95/t0.1/s3/w0",
    "schedule/exponential_with_bias/i0.95/t0.1/s3/w2",
    "schedule/exponential_with_bias/i0.95/t0.3/s3/w0",
    "schedule/exponential_with_bias/i0.95/t0.3/s3/w2",
    "run/plain_cnn/exponential/i0.95/t0.1/s3/w0",
)
SOLVER_FAILS = (
    "schedule/exponential_with_bias/i0.0/t0.1/s3/w0",
    "schedule/exponential_with_bias/i0.0/t0.1/s3/w2",
    "schedule/exponential_with_bias/i0.0/t0.3/s3/w0",
    "schedule/exponential_with_bias/i0.0/t0.3/s3/w2",
    "schedule/exponential_with_bias/i0.0/t0.5/s3/w0",
    "schedule/exponential_with_bias/i0.0/t0.5/s3/w2",
    "schedule/exponential_with_bias/i0.0/t0.8/s3/w0",
    "schedule/exponential_with_bias/i0.0/t0.8/s3/w2",
    "schedule/exponential_with_bias/i0.1/t0.3/s2/w0",
    "schedule/exponential_with_bias/i0.1/t0.3/s2/w2",
    "schedule/exponential_with_bias/i0.1/t0.5/s2/w0",
    "schedule/exponential_with_bias/i0.1/t0.5/s2/w2",
    "schedule/exponential_with_bias/i0.3/t0.5/s2/w0",
    "schedule/exponential_with_bias/i0.3/t0.5/s2/w2",
    "schedule/exponential_with_bias/i0.5/t0.8/s2/w0",
    "schedule/exponential_with_bias/i0.5/t0.8/s2/w2",
    "schedule/exponential_with_bias/i0.0/t0.5/s100/w0",
)
EMPTY_LAYER = (
    "masks/lenet300/geometric_median/first1/down0/all1/l0.3",
    "masks/lenet300/geometric_median/first1/down0/all1/l0.45",
    "masks/lenet300/geometric_median/first1/down0/all1/l0.5",
    "masks/lenet300/geometric_median/first1/down0/all1/l0.7",
    "masks/plain_cnn/L1/first1/down1/all1/l0.3",
    "masks/plain_cnn/L1/first1/down1/all1/l0.45",
    "masks/plain_cnn/L1/first1/down1/all1/l0.5",
    "masks/plain_cnn/L1/first1/down1/all1/l0.7",
    "masks/plain_cnn/L2/first0/down1/all1/l0.7",
    "masks/plain_cnn/L2/first1/down1/all1/l0.7",
    "masks/plain_cnn/geometric_median/first0/down1/all1/l0.45",
    "masks/plain_cnn/geometric_median/first0/down1/all1/l0.5",
    "masks/plain_cnn/geometric_median/first0/down1/all1/l0.7",
    "masks/plain_cnn/geometric_median/first1/down1/all1/l0.3",
    "masks/plain_cnn/geometric_median/first1/down1/all1/l0.45",
    "masks/plain_cnn/geometric_median/first1/down1/all1/l0.5",
    "masks/plain_cnn/geometric_median/first1/down1/all1/l0.7",
    "masks/resnet/L1/first0/down1/all1/l0.45",
    "masks/resnet/L1/first0/down1/all1/l0.5",
    "masks/resnet/L1/first0/down1/all1/l0.7",
    "masks/resnet/L1/first1/down0/all1/l0.5",
    "masks/resnet/L1/first1/down0/all1/l0.7",
    "masks/resnet/L1/first1/down1/all1/l0.45",
    "masks/resnet/L1/first1/down1/all1/l0.5",
    "masks/resnet/L1/first1/down1/all1/l0.7",
    "masks/resnet/L2/first0/down1/all1/l0.45",
    "masks/resnet/L2/first0/down1/all1/l0.5",
    "masks/resnet/L2/first0/down1/all1/l0.7",
    "masks/resnet/L2/first1/down0/all1/l0.5",
    "masks/resnet/L2/first1/down0/all1/l0.7",
    "masks/resnet/L2/first1/down1/all1/l0.3",
    "masks/resnet/L2/first1/down1/all1/l0.45",
    "masks/resnet/L2/first1/down1/all1/l0.5",
    "masks/resnet/L2/first1/down1/all1/l0.7",
    "masks/resnet/geometric_median/first0/down1/all1/l0.1",
    "masks/resnet/geometric_median/first0/down1/all1/l0.3",
    "masks/resnet/geometric_median/first0/down1/all1/l0.45",
    "masks/resnet/geometric_median/first0/down1/all1/l0.5",
    "masks/resnet/geometric_median/first0/down1/all1/l0.7",
    "masks/resnet/geometric_median/first1/down0/all1/l0.5",
    "masks/resnet/geometric_median/first1/down0/all1/l0.7",
    "masks/resnet/geometric_median/first1/down1/all1/l0.1",
    "masks/resnet/geometric_median/first1/down1/all1/l0.3",
    "masks/resnet/geometric_median/first1/down1/all1/l0.45",
    "masks/resnet/geometric_median/first1/down1/all1/l0.5",
    "masks/resnet/geometric_median/first1/down1/all1/l0.7",
    "masks/wide_cnn/L1/first0/down0/all1/l0.7",
    "masks/wide_cnn/L1/first0/down1/all1/l0.45",
    "masks/wide_cnn/L1/first0/down1/all1/l0.5",
    "masks/wide_cnn/L1/first0/down1/all1/l0.7",
    "masks/wide_cnn/L1/first1/down0/all1/l0.5",
    "masks/wide_cnn/L1/first1/down0/all1/l0.7",
    "masks/wide_cnn/L1/first1/down1/all1/l0.3",
    "masks/wide_cnn/L1/first1/down1/all1/l0.45",
    "masks/wide_cnn/L1/first1/down1/all1/l0.5",
    "masks/wide_cnn/L1/first1/down1/all1/l0.7",
    "masks/wide_cnn/L2/first0/down0/all1/l0.7",
    "masks/wide_cnn/L2/first0/down1/all1/l0.7",
    "masks/wide_cnn/L2/first1/down0/all1/l0.7",
    "masks/wide_cnn/L2/first1/down1/all1/l0.7",
    "masks/wide_cnn/geometric_median/first0/down0/all1/l0.45",
    "masks/wide_cnn/geometric_median/first0/down0/all1/l0.5",
    "masks/wide_cnn/geometric_median/first0/down0/all1/l0.7",
    "masks/wide_cnn/geometric_median/first0/down1/all1/l0.3",
    "masks/wide_cnn/geometric_median/first0/down1/all1/l0.45",
    "masks/wide_cnn/geometric_median/first0/down1/all1/l0.5",
    "masks/wide_cnn/geometric_median/first0/down1/all1/l0.7",
    "masks/wide_cnn/geometric_median/first1/down0/all1/l0.3",
    "masks/wide_cnn/geometric_median/first1/down0/all1/l0.45",
    "masks/wide_cnn/geometric_median/first1/down0/all1/l0.5",
    "masks/wide_cnn/geometric_median/first1/down0/all1/l0.7",
    "masks/wide_cnn/geometric_median/first1/down1/all1/l0.1",
    "masks/wide_cnn/geometric_median/first1/down1/all1/l0.3",
    "masks/wide_cnn/geometric_median/first1/down1/all1/l0.45",
    "masks/wide_cnn/geometric_median/first1/down1/all1/l0.5",
    "masks/wide_cnn/geometric_median/first1/down1/all1/l0.7",
    "masks/narrow_cnn/geometric_median/first1/down0/all1/l0.45",
    "masks/narrow_cnn/geometric_median/first1/down0/all1/l0.5",
    "masks/narrow_cnn/geometric_median/first1/down0/all1/l0.7",
    "masks/narrow_cnn/geometric_median/first1/down1/all1/l0.45",
    "masks/narrow_cnn/geometric_median/first1/down1/all1/l0.5",
    "masks/narrow_cnn/geometric_median/first1/down1/all1/l0.7",
)
