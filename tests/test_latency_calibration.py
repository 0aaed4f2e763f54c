"""The latency table calibrated on the whole model: targets read off the measured curve, the
reach measured, the margin capped, the calibration saved and checked in the side-car.

Nothing here is timed: the timer is a planned function of the model (its layers' MACs, plus a
fixed cost for a whole model that no layer timing sees, as a runtime's time between layers),
with seeded noise where noise is the point.
"""

from __future__ import annotations

import copy
import functools
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from test_latency_pruning import blocked_timer, compressed, no_timer, wide_net, widths
from test_structured import _make
from torch import nn

import compress
from compress.deploy.sidecars import read_sidecar
from compress.errors import CompressError
from compress.pruning import latency, latency_calibration, latency_widths
from compress.pruning.latency_calibration import measured_ratio, table_fraction


def overhead_timer(model: nn.Module, x: torch.Tensor, share: float = 0.3) -> Any:
    """``blocked_timer``, plus for a whole model (not a single layer) a fixed cost of ``share``
    of ``model``'s layers: time between layers that does not shrink with the widths. The
    table sees it as a rest that shrinks with the groups' activations; only the whole model
    shows it stays."""
    cost = share * blocked_timer(functools.partial(model, x))

    def timer(fn: Any) -> float:
        t = blocked_timer(fn)
        return t if isinstance(fn.func, (nn.Conv2d, nn.Linear)) else t + cost

    return timer


def calibration(table_ratio: list[float], measured: list[float]) -> dict[str, Any]:
    """A table with only a calibration (what the curve functions read)."""
    n = len(table_ratio)
    return {
        "calibration": {
            "scales": [0.75, 0.5, 0.3, 0.0][:n],
            "table_ratio": table_ratio,
            "measured_ratio": measured,
            "spread": [0.0] * n,
            "rounds": 5,
        }
    }


def test_the_curve_interpolates_and_inverts() -> None:
    table = calibration([0.8, 0.5, 0.3, 0.1], [0.85, 0.6, 0.45, 0.3])
    assert measured_ratio(table, 1.0) == 1.0
    assert measured_ratio(table, 0.5) == pytest.approx(0.6)
    assert measured_ratio(table, 0.65) == pytest.approx((0.85 + 0.6) / 2)
    assert measured_ratio(table, 0.05) == pytest.approx(0.15)  # below: proportional
    for fraction in (0.1, 0.3, 0.4, 0.55, 0.7):
        tf = table_fraction(table, fraction)
        assert tf is not None
        assert measured_ratio(table, 1.0 - tf) == pytest.approx(1.0 - fraction)
    # the narrowest model measured 0.3 of the time: 0.7 removed is the reach, 0.75 is beyond
    assert latency_calibration.reach(table) == pytest.approx(0.7)
    assert table_fraction(table, 0.7) == pytest.approx(0.9)
    assert table_fraction(table, 0.75) is None


def test_a_narrower_model_measured_slower_counts_as_fast_as_the_wider_one() -> None:
    # noise: the 0.3 point measured slower than the 0.5 one
    table = calibration([0.8, 0.5, 0.3, 0.1], [0.85, 0.6, 0.62, 0.3])
    assert measured_ratio(table, 0.3) == pytest.approx(0.6)
    assert measured_ratio(table, 0.4) == pytest.approx(0.6)
    # a goal on the flat part takes its widest end: the least removed that measured it
    assert table_fraction(table, 0.4) == pytest.approx(0.5)


def _target(model: nn.Module, x: torch.Tensor, target: float, timer: Any = None) -> Any:
    timer = timer or overhead_timer(model, x)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(latency, "default_timer", timer)
        ctrl, algo = compressed(model, x, pruning_latency_target=target, schedule="baseline")
        small = ctrl.strip()
    return algo, small


@pytest.mark.parametrize("target", [0.3, 0.4, 0.5])
def test_the_whole_model_measures_what_the_target_asks(target: float) -> None:
    # 0.3 of the layers' time again is between layers and stays (so at most 2.3x here): the
    # table alone over-predicts (its rest shrinks with the channels), the calibrated choice
    # hits the target
    model, x = _make("resnet")
    algo, small = _target(model, x, target)
    report = small.compress_latency_table
    asked = 1 / (1 - target)
    cal = algo.latency_table["calibration"]
    assert cal["scales"] == list(latency_calibration.SCALES)
    assert cal["spread"] == [0.0] * len(cal["scales"]) and cal["rounds"] == 5
    # planned times: the calibration is exact at its uniform widths and interpolated between
    # (widths chosen per group are not uniform): within 5% of what the stripped model
    # measures, which is the target within the 2% margin and the table's width steps
    assert report["predicted_speedup"] == pytest.approx(report["measured_speedup"], rel=0.05)
    assert asked * 0.97 <= report["measured_speedup"] <= asked * 1.1
    # the table's own prediction is further off than the calibrated one
    own = abs(report["table_speedup"] / report["measured_speedup"] - 1)
    assert own > abs(report["predicted_speedup"] / report["measured_speedup"] - 1)


def test_without_the_calibration_the_table_alone_misses() -> None:
    # the same model and timer, widths chosen on the table's fraction as before calibrations
    model, x = _make("resnet")
    algo, small = _target(model, x, 0.5)
    table = {k: v for k, v in algo.latency_table.items() if k != "calibration"}
    scores = {g.name: torch.arange(g.size, dtype=torch.float) for g in algo.groups}
    raw = latency_widths.choose_widths(table, scores, 0.5)
    timer = overhead_timer(model, x)
    dense_ms = timer(functools.partial(model, x))
    keep = {g: torch.arange(algo.groups[i].size) < w for i, (g, w) in enumerate(raw.items())}
    from compress.pruning.structured import shrink

    shrunk = shrink(model, algo.groups, keep, example_inputs=(x,))
    measured = dense_ms / timer(functools.partial(shrunk, x))
    assert measured < 2.0 * 0.9  # more than 10% short of the 2.0x asked
    assert small.compress_latency_table["measured_speedup"] >= 2.0 * 0.97


def test_out_of_reach_is_said_before_training_with_the_flags_that_reach_it() -> None:
    # default flags: the first conv is kept; with it the narrowest model is timed as well
    model, x = wide_net()
    recipe = {
        "compression": {
            "algorithm": "filter_pruning",
            "params": {"pruning_latency_target": 0.8, "schedule": "baseline"},
        }
    }
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mp.setattr(latency, "default_timer", overhead_timer(model, x))
        ctrl, _ = compress.create_compressed_model(model, recipe, x)
        ctrl.scheduler.epoch_step()  # the first epoch, before any step: said then
    cal = ctrl.algorithms[0].latency_table["calibration"]
    said = [str(w.message) for w in caught if "with these flags" in str(w.message)]
    assert cal["flags"] == ["prune_first_conv: true"]
    most = latency_calibration.reach(ctrl.algorithms[0].latency_table)
    assert len(said) == 1 and f"The most reachable target is {most:.3f}" in said[0]
    flagged = 1 - cal["flags_ratio"]
    assert f"(target {flagged:.3f} reachable)" in said[0]
    verdict = "would reach it" if flagged >= 0.8 else "would not reach it either"
    assert said[0].endswith(f"prune_first_conv: true {verdict}")


def test_a_wide_spread_moves_the_goal_by_at_most_the_cap() -> None:
    model, x = _make("resnet")
    algo, _ = _target(model, x, 0.5, blocked_timer)
    table = copy.deepcopy(algo.latency_table)
    for e in table["layers"].values():  # spreads of 10% of every time
        e["spread"] = 0.1 * e["ms"]
        for c in [e["out"], *e["in"]]:
            if c:
                c["spread"] = [0.1 * v for v in c["ms"]]
    scores = {
        g: torch.arange(info["size"], dtype=torch.float) for g, info in table["groups"].items()
    }
    base = latency_widths.predicted_ms(table, {})
    free = latency_widths.choose_widths(table, scores, 0.5)
    capped = latency_widths.choose_widths(table, scores, 0.5, margin_cap=0.02)
    removed = latency_widths.removed_fraction
    assert removed(table, free) > removed(table, capped)  # the full spread overshoots more
    assert latency_widths.predicted_ms(table, capped) <= base * (0.5 + 0.02) + 1e-9
    assert latency_widths.target_holds(table, capped, 0.5, margin_cap=0.02)


def test_noisy_builds_choose_few_distinct_widths() -> None:
    # five builds, every timed value off by a seeded 3% normal draw (table and calibration)
    chosen = []
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        model, x = wide_net()
        base = overhead_timer(model, x)

        def timer(fn: Any, gen: torch.Generator = gen, base: Any = base) -> float:
            return float(base(fn) * (1.0 + 0.03 * float(torch.randn((), generator=gen))))

        algo, _ = _target(model, x, 0.5, timer)
        chosen.append(json.dumps(widths(algo), sort_keys=True))
    assert len(set(chosen)) <= 2, chosen


def test_the_calibration_is_saved_and_checked_in_the_side_car(tmp_path: Path) -> None:
    model, x = _make("resnet")
    _, small = _target(model, x, 0.5)
    compress.export(small, tmp_path / "m", ["pruned"], example_inputs=x)
    path = tmp_path / "m.latency.json"
    saved = read_sidecar(path, "latency")
    report = small.compress_latency_table
    assert saved["calibration"] == report["calibration"]
    for key in ("predicted_speedup", "table_speedup", "measured_speedup", "target_speedup"):
        assert saved[key] == report[key]
    bad = json.loads(path.read_text())
    bad["calibration"]["measured_ratio"] = bad["calibration"]["measured_ratio"][:-1]
    path.write_text(json.dumps(bad))
    with pytest.raises(
        CompressError, match=r"calibration.measured_ratio: 3 values for the 4 scales"
    ):
        read_sidecar(path, "latency")
    bad["calibration"]["measured_ratio"] = "fast"
    path.write_text(json.dumps(bad))
    with pytest.raises(CompressError, match=r"calibration.measured_ratio"):
        read_sidecar(path, "latency")


def _checked(table: dict[str, Any], fraction: float, *points: tuple[float, float, float]) -> None:
    """Adds checks (table fraction, table ratio, measured ratio) of ``fraction`` to ``table``."""
    table["calibration"]["checks"] = [
        {"fraction": fraction, "table_fraction": f, "table_ratio": x, "measured_ratio": y}
        for f, x, y in points
    ]


def test_a_checked_choice_that_missed_is_corrected_along_the_curve() -> None:
    checked = latency_calibration.checked_fraction
    table = calibration([0.8, 0.5, 0.3, 0.1], [0.85, 0.6, 0.45, 0.3])
    assert checked(table, 0.4) == pytest.approx(table_fraction(table, 0.4))  # nothing checked
    # the widths chosen for 0.4 (table ratio 0.5, the curve says 0.6) measured 0.72: the
    # curve scaled by 1.2; the choice must move to where the curve says 0.6 / 1.2, and the
    # table fraction moves by as much as the choice's table ratio must
    _checked(table, 0.4, (0.45, 0.5, 0.72))
    assert not latency_calibration.settled(table, 0.4)
    want = 1 - table_fraction(table, 1 - 0.6 / 1.2)  # type: ignore[operator]
    assert checked(table, 0.4) == pytest.approx(0.45 + 0.5 - want)
    # a second check on the other side of 0.6: the secant between the two
    _checked(table, 0.4, (0.45, 0.5, 0.72), (0.6, 0.35, 0.54))
    assert checked(table, 0.4) == pytest.approx(0.6 + 0.35 - (0.35 + (0.6 - 0.54) * 0.15 / 0.18))
    # a check within TOLERANCE settles it: its table fraction is kept, whatever came after
    _checked(table, 0.4, (0.45, 0.5, 0.72), (0.6, 0.35, 0.61), (0.7, 0.3, 0.5))
    assert latency_calibration.settled(table, 0.4)
    assert checked(table, 0.4) == pytest.approx(0.6)


def test_checks_stop_when_the_width_steps_have_nothing_nearer() -> None:
    table = calibration([0.8, 0.5, 0.3, 0.1], [0.85, 0.6, 0.45, 0.3])
    # one either side of the goal 0.6, 10% off each, and the secant chose the first again
    _checked(table, 0.4, (0.45, 0.5, 0.54), (0.3, 0.62, 0.67), (0.4, 0.5, 0.54))
    assert latency_calibration.settled(table, 0.4)
    # the nearer of the two: 0.6 / 0.67 is 10.4% off, 0.6 / 0.54 11.1%
    assert latency_calibration.checked_fraction(table, 0.4) == pytest.approx(0.3)
    # on one side only, a repeat moves twice as far the same way
    _checked(table, 0.4, (0.45, 0.5, 0.54), (0.4, 0.5, 0.54))
    assert not latency_calibration.settled(table, 0.4)
    assert latency_calibration.checked_fraction(table, 0.4) == pytest.approx(0.3)
    # MAX_CHECKS widths timed: settled on the nearest
    _checked(table, 0.4, (0.45, 0.5, 0.52), (0.5, 0.45, 0.5), (0.55, 0.4, 0.48))
    assert latency_calibration.settled(table, 0.4)
    assert latency_calibration.checked_fraction(table, 0.4) == pytest.approx(0.45)


def test_a_curve_off_for_the_chosen_widths_is_corrected_by_timing_them() -> None:
    # the curve measured at uniform widths says the model is faster than it is (every
    # measured ratio 40% low): the first choice misses; the checks time it and correct it
    model, x = _make("resnet")
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.setattr(latency, "default_timer", overhead_timer(model, x))
        ctrl, algo = compressed(model, x, pruning_latency_target=0.5, schedule="baseline")
        cal = algo.latency()["calibration"]
        cal["measured_ratio"] = [0.6 * r for r in cal["measured_ratio"]]
        cal.pop("checks", None)  # the choice made when the model was built: made again
        for _ in range(2):
            ctrl.scheduler.epoch_step()
        small = ctrl.strip()
        checks = algo.latency_table["calibration"]["checks"]
        assert 2 <= len(checks) <= latency_calibration.MAX_TRIES
        assert abs(2.0 * checks[0]["measured_ratio"] - 1) > latency_calibration.TOLERANCE
        report = small.compress_latency_table
        assert report["measured_speedup"] == pytest.approx(2.0, rel=latency_calibration.TOLERANCE)
        # what strip() measured is what the check measured, and the prediction says it
        assert report["predicted_speedup"] == pytest.approx(report["measured_speedup"])
        # a later choice for the same target (new scores, a resumed run) times nothing
        mp.setattr(latency, "default_timer", no_timer)
        before = len(checks)
        algo.set_level(algo.level)
        assert len(algo.latency_table["calibration"]["checks"]) == before


def test_a_checked_choice_more_than_10_percent_off_is_said() -> None:
    table = calibration([0.8, 0.5, 0.3, 0.1], [0.85, 0.6, 0.45, 0.3])
    table["backend"] = "openvino"
    _checked(table, 0.4, (0.45, 0.5, 0.54), (0.3, 0.62, 0.67), (0.4, 0.5, 0.54))
    said = latency_calibration.check_warning(table, 0.4)
    assert said == (
        "pruning_latency_target 0.400 (1.67x): the widths chosen measured 1.49x in openvino, "
        "more than 10% off; of the 2 width choices timed none was nearer (the table's candidate "
        "widths step too coarsely there)"
    )
    _checked(table, 0.4, (0.45, 0.5, 0.54), (0.3, 0.62, 0.65))  # 8% off
    assert latency_calibration.check_warning(table, 0.4) is None
