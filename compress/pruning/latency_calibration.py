"""The latency table calibrated on the whole model: what a target asks is what the exported
model measures.

A latency table (:func:`compress.pruning.latency.measure_table`) predicts a model's time from
its layers timed one by one. The model the runtime runs is more than that: the layers no group
prunes (the first conv, downsample convs, the classifier), the time between layers (copies,
reorders, pooling, adds the runtime does not fuse) and the shapes it actually runs. How much of
that shrinks with the groups is what the table gets wrong: on ResNet-18 in OpenVINO a table
asked for 2.0x gave 1.8x measured, on a small CNN a table that predicted 3.5x measured 9x.

So after the table, :func:`calibrate` times the WHOLE model shrunk uniformly, every group at a
few fractions of its width (``SCALES``) and at its narrowest, beside the model at full width
(interleaved rounds, the median of per-round ratios, as
:func:`compress.pruning.latency.compare_models`). That gives a curve from the table's predicted
relative time to the measured one, which :func:`measured_ratio` interpolates (piecewise linear,
made non-decreasing). A target of ``fraction`` (a speed-up of ``1 / (1 - fraction)``) becomes
the table's fraction whose curve value is ``1 - fraction`` (:func:`table_fraction`); the
widths are chosen on the table for that, with a margin of the table's spread capped at 2% of
the full time (``MARGIN_CAP``). The reach is measured, not predicted: the whole model with every
group at its narrowest; when recipe flags (``prune_first_conv``, ``prune_downsample_convs``)
keep groups whole, the model with those groups at their narrowest too is timed as well, so that
a target out of reach is warned before training with the target the flags reach.

The curve is measured at uniform widths; the widths a target chooses are not uniform, and the
whole model at them can measure off the curve (on MobileNetV2 in OpenVINO a 1.43x target chose
widths that measured 1.24x). So the choice for the final target is checked
(:func:`check`): the whole model at the chosen widths is timed once beside the full model, as
``strip()`` will time it, and when its speed-up is more than ``TOLERANCE`` off the target's the
table fraction is corrected (:func:`checked_fraction`: the secant between two checks on either
side of the target, else the curve scaled by what the last check measured against it) and the
widths chosen again, at most ``MAX_CHECKS`` timings; the check nearest the target is kept. The
checks are kept in the calibration, so a resumed run (or a later epoch with new importance
scores) chooses for the same table fraction without timing again.

The calibration is kept in the table (``table["calibration"]``, saved in the ``.latency.json``
side-car)::

    {"scales": [0.75, 0.5, 0.3, 0.0], "table_ratio": [0.76, 0.52, 0.33, 0.12],
     "measured_ratio": [0.8, 0.6, 0.45, 0.3], "spread": [0.01, 0.01, 0.01, 0.02],
     "rounds": 7, "flags": ["prune_first_conv: true"], "flags_ratio": 0.2,
     "checks": [{"fraction": 0.5, "table_fraction": 0.45, "table_ratio": 0.53,
                 "measured_ratio": 0.56, "spread": 0.01}]}
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from compress.pruning import latency, latency_widths
from compress.pruning.latency_backends import Backend, runtime_call
from compress.pruning.latency_widths import predicted_ms
from compress.pruning.structured import ChannelGroup, shrink

__all__ = [
    "MARGIN_CAP",
    "MAX_CHECKS",
    "MAX_TRIES",
    "SCALES",
    "TOLERANCE",
    "calibrate",
    "calibrated_speedup",
    "check",
    "checked_fraction",
    "check_warning",
    "settled",
    "measured_ratio",
    "prediction",
    "reach",
    "removed_fraction",
    "reach_warning",
    "table_fraction",
    "uniform_widths",
]

SCALES = (0.75, 0.5, 0.3, 0.0)
"""Fractions of every group's width the whole model is timed at (0: each group's narrowest)."""
MARGIN_CAP = 0.02
"""The most of the full time the widths are chosen below the goal (the table's spread)."""
TOLERANCE = 0.05
"""How far (relative) a checked choice's measured speed-up may be from the target's (the goal
is 10%; half of it is left for the noise between the check and a later measurement)."""
MAX_CHECKS = 3
"""The most whole-model timings of chosen widths per target (each one model converted and
timed beside the full one, as ``strip()`` does)."""
MAX_TRIES = 8
"""The most corrections per target, counting those that chose widths timed before."""


def uniform_widths(
    table: Mapping[str, Any], scale: float, fixed: Mapping[str, int] | None = None
) -> dict[str, int]:
    """Every group of the table at the candidate width nearest ``scale`` of its size (the
    narrower of two as near; 0: its narrowest); ``fixed`` groups at theirs."""
    fixed = dict(fixed or {})
    out = {}
    for g, info in table["groups"].items():
        want = info["size"] * scale
        out[g] = fixed.get(g, min(info["widths"], key=lambda w: (abs(w - want), w)))
    return out


def _keep(groups: Sequence[ChannelGroup], widths: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """Keep masks of the first ``widths[g]`` channels (which ones does not change the time)."""
    keep = {}
    for g in groups:
        w = widths.get(g.name, g.size)
        if w < g.size:
            keep[g.name] = torch.arange(g.size) < w
    return keep


def _timed(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    backend: Backend,
    timer: latency.Timer | None,
    sample_s: float,
) -> Callable[[], float]:
    """One sample of ``model``'s time on ``inputs`` in ``backend`` (``timer``: planned)."""
    whole = functools.partial(model, *inputs)
    if timer is not None:
        return functools.partial(timer, whole)
    if backend != "torch":
        return functools.partial(latency.time_call, runtime_call(backend, whole), target_s=sample_s)
    if latency.default_timer is latency.time_call:
        return functools.partial(latency.time_call, whole, target_s=sample_s)
    return functools.partial(latency.default_timer, whole)


def calibrate(
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    example_inputs: tuple[torch.Tensor, ...],
    table: Mapping[str, Any],
    *,
    batch_size: int | None = None,
    backend: Backend = "torch",
    timer: latency.Timer | None = None,
    fixed: Mapping[str, int] | None = None,
    flagged: tuple[Sequence[ChannelGroup], list[str]] | None = None,
    scales: Sequence[float] = SCALES,
    rounds: int = 5,
    max_rounds: int = 20,
    spread_bound: float = 0.02,
) -> dict[str, Any]:
    """Times ``model`` (at full width, unmasked) shrunk uniformly at each of ``scales`` beside
    itself at full width; returns the calibration (module docstring). ``flagged`` is the groups
    the model has with the recipe flags that keep groups whole turned on, and those flags: the
    model with all of them at their narrowest is timed too."""
    inputs = tuple(latency._batched(t, batch_size) for t in example_inputs)
    sample_s = float(table.get("sample_ms", 2.0)) / 1e3
    full = predicted_ms(table, {})
    points = [uniform_widths(table, s, fixed) for s in scales]
    was_training = model.training
    model.eval()
    try:
        jobs: list[tuple[Any, Callable[[], float]]] = [
            ("dense", _timed(model, inputs, backend, timer, sample_s))
        ]
        for i, widths in enumerate(points):
            small = shrink(model, groups, _keep(groups, widths), example_inputs=inputs).eval()
            jobs.append((i, _timed(small, inputs, backend, timer, sample_s)))
        if flagged is not None:
            narrowest = {g.name: latency.candidate_widths(g.size)[0] for g in flagged[0]}
            small = shrink(
                model, flagged[0], _keep(flagged[0], narrowest), example_inputs=inputs
            ).eval()
            jobs.append(("flags", _timed(small, inputs, backend, timer, sample_s)))
        samples = latency._rounds(
            jobs, rounds=rounds, max_rounds=max_rounds, bound=spread_bound, model=model
        )
    finally:
        model.train(was_training)

    def ratios(key: Any) -> list[float]:
        return [s / d for d, s in zip(samples["dense"], samples[key], strict=True) if d > 0]

    out: dict[str, Any] = {
        "scales": list(scales),
        "table_ratio": [predicted_ms(table, w) / full if full > 0 else 1.0 for w in points],
        "measured_ratio": [statistics.median(ratios(i)) for i in range(len(points))],
        "spread": [latency.median_spread(ratios(i)) for i in range(len(points))],
        "rounds": len(samples["dense"]),
    }
    if flagged is not None:
        out["flags"] = list(flagged[1])
        out["flags_ratio"] = statistics.median(ratios("flags"))
    return out


def _curve(table: Mapping[str, Any]) -> tuple[list[float], list[float]]:
    """The calibration's (table ratio, measured ratio) points, the table ratio increasing, with
    (1, 1) (full width) last; measured ratios made non-decreasing (a narrower model measured
    slower than a wider one is taken to be as fast)."""
    cal = table["calibration"]
    pairs = sorted(zip(cal["table_ratio"], cal["measured_ratio"], strict=True))
    xs = [x for x, _ in pairs if x < 1.0] + [1.0]
    ys = [y for x, y in pairs if x < 1.0] + [1.0]
    for i in range(len(ys) - 2, -1, -1):
        ys[i] = min(ys[i], ys[i + 1])
    return xs, ys


def measured_ratio(table: Mapping[str, Any], table_ratio: float) -> float:
    """The whole model's measured time over its full-width time where the table predicts
    ``table_ratio`` of its full time: interpolated on the calibration curve (below its
    narrowest point, proportional to it)."""
    xs, ys = _curve(table)
    if table_ratio <= xs[0]:
        return ys[0] * table_ratio / xs[0] if xs[0] > 0 else ys[0]
    i = next(k for k, x in enumerate(xs) if x >= table_ratio)
    lo, hi = xs[i - 1], xs[i]
    return ys[i - 1] + (ys[i] - ys[i - 1]) * (table_ratio - lo) / (hi - lo)


def table_fraction(table: Mapping[str, Any], fraction: float) -> float | None:
    """The fraction of the table's predicted time to remove so that the whole model measures
    ``fraction`` removed, read off the calibration curve; None when even every group at its
    narrowest does not remove it (:func:`reach`)."""
    xs, ys = _curve(table)
    goal = 1.0 - fraction
    if goal < ys[0] - 1e-12:
        return None
    i = max(k for k, y in enumerate(ys) if y <= goal)  # the widest point measured as fast
    if ys[i] >= goal or i == len(ys) - 1:
        return 1.0 - xs[i]
    lo, hi = ys[i], ys[i + 1]
    return 1.0 - (xs[i] + (xs[i + 1] - xs[i]) * (goal - lo) / (hi - lo))


def _table_ratio(table: Mapping[str, Any], widths: Mapping[str, int]) -> float:
    """The table's predicted time at ``widths`` over its full-width time (1 without any)."""
    full = predicted_ms(table, {})
    return predicted_ms(table, widths) / full if full > 0 else 1.0


def _at(checks: Sequence[Mapping[str, Any]], ratio: float) -> list[Mapping[str, Any]]:
    """The checks of widths whose predicted ratio is ``ratio`` (the same widths)."""
    return [c for c in checks if abs(c["table_ratio"] - ratio) < 1e-9]


def _widths_timed(checks: Sequence[Mapping[str, Any]]) -> int:
    """How many distinct width choices ``checks`` timed."""
    return len({round(c["table_ratio"], 9) for c in checks})


def _checks(table: Mapping[str, Any], fraction: float) -> list[Mapping[str, Any]]:
    """The checks of choices for ``fraction``, in the order made."""
    done = table["calibration"].get("checks", [])
    return [c for c in done if abs(c["fraction"] - fraction) < 1e-9]


def _missed(check: Mapping[str, Any]) -> float:
    """How far (relative) a check's measured speed-up is from its target's."""
    return abs((1.0 - check["fraction"]) / check["measured_ratio"] - 1.0)


def settled(table: Mapping[str, Any], fraction: float) -> bool:
    """Whether the choice for ``fraction`` needs no more checks: one measured within
    ``TOLERANCE`` of the target, ``MAX_CHECKS`` widths were timed, a correction between two
    checks on either side of the target chose widths timed before (the table's width steps
    have nothing between), or ``MAX_TRIES`` corrections were made."""
    done = _checks(table, fraction)
    if not done:
        return False
    timed = _widths_timed(done)
    goal = 1.0 - fraction
    sides = {c["measured_ratio"] > goal for c in done}
    stuck = _repeated(done) and len(sides) == 2  # nothing between two timed on either side
    return (
        stuck
        or min(map(_missed, done)) <= TOLERANCE
        or timed >= MAX_CHECKS
        or len(done) >= MAX_TRIES
    )


def _repeated(done: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the last check chose the widths of an earlier one (the same predicted ratio)."""
    return bool(_at(done[:-1], done[-1]["table_ratio"]))


def checked_fraction(table: Mapping[str, Any], fraction: float) -> float | None:
    """The table fraction to choose widths for so that the whole model measures ``fraction``
    removed: :func:`table_fraction` before any check; once :func:`settled`, the table fraction
    of the check that measured nearest the target; otherwise corrected from the checks. The
    secant between the last check and the nearest one on the other side of the target when
    there is one, else the curve scaled by what the last check measured against it; the
    correction moves the table fraction by as much as it moves the chosen widths' predicted
    ratio (what the choice adds to the fraction asked, its margin and width steps, stays)."""
    done = _checks(table, fraction)
    if not done:
        return table_fraction(table, fraction)
    if settled(table, fraction):
        return float(min(done, key=_missed)["table_fraction"])
    goal = 1.0 - fraction
    last = done[-1]
    narrowest = _curve(table)[0][0]
    if _repeated(done):  # the correction did not move the choice: twice as far the same way
        step = last["table_fraction"] - done[-2]["table_fraction"]
        return min(max(last["table_fraction"] + 2.0 * step, 0.0), 1.0 - narrowest)
    x, y = last["table_ratio"], last["measured_ratio"]
    other = [c for c in done[:-1] if (c["measured_ratio"] - goal) * (y - goal) < 0]
    if other:
        o = min(other, key=lambda c: abs(c["measured_ratio"] - goal))
        want = x + (goal - y) * (o["table_ratio"] - x) / (o["measured_ratio"] - y)
    else:
        scale = y / max(measured_ratio(table, x), 1e-12)  # the choice against the curve
        tf = table_fraction(table, max(0.0, 1.0 - goal / scale))
        want = narrowest if tf is None else 1.0 - tf
    want = min(max(want, narrowest), 1.0)
    return min(max(last["table_fraction"] + x - want, 0.0), 1.0 - narrowest)


def check_warning(table: Mapping[str, Any], fraction: float) -> str | None:
    """What to say when the checked choice for ``fraction`` measured more than 10% off the
    target's speed-up (None when within, or nothing was checked)."""
    done = _checks(table, fraction)
    if not done or min(map(_missed, done)) <= 0.1:
        return None
    best = min(done, key=_missed)
    timed = _widths_timed(done)
    return (
        f"pruning_latency_target {fraction:.3f} ({1 / (1 - fraction):.2f}x): the widths chosen "
        f"measured {1 / best['measured_ratio']:.2f}x in {table.get('backend', 'torch')}, more "
        f"than 10% off; of the {timed} width choices timed none was nearer (the table's "
        "candidate widths step too coarsely there)"
    )


def check(
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    example_inputs: tuple[torch.Tensor, ...],
    table: dict[str, Any],
    widths: Mapping[str, int],
    fraction: float,
    wanted: float,
    *,
    batch_size: int | None = None,
    backend: Backend = "torch",
) -> dict[str, float]:
    """Times ``model`` (at full width, unmasked) at ``widths``, chosen for the table fraction
    ``wanted`` to remove ``fraction``, beside itself at full width
    (:func:`compress.pruning.latency.compare_models`, as ``strip()`` times the stripped
    model), and adds the check to ``table["calibration"]["checks"]``. Widths an earlier check
    of ``fraction`` timed (the same predicted ratio) are not timed again: that check is
    repeated with ``wanted``."""
    x = _table_ratio(table, widths)
    same = _at(_checks(table, fraction), x)
    if same:  # the widths an earlier check timed: not timed again
        entry = {**same[-1], "table_fraction": wanted}
        table["calibration"]["checks"].append(entry)
        return entry
    inputs = tuple(latency._batched(t, batch_size) for t in example_inputs)
    small = shrink(model, groups, _keep(groups, widths), example_inputs=inputs)
    was_training = model.training
    try:
        measured = latency.compare_models(
            model,
            small,
            inputs,
            backend=backend,  # inputs already batched
        )
    finally:
        model.train(was_training)
    entry = {
        "fraction": fraction,
        "table_fraction": wanted,
        "table_ratio": x,
        "measured_ratio": 1.0 / max(measured["measured_speedup"], 1e-12),
        "spread": measured["measured_speedup_spread"] / max(measured["measured_speedup"], 1e-12),
    }
    table["calibration"].setdefault("checks", []).append(entry)
    return entry


def reach(table: Mapping[str, Any]) -> float:
    """The most of the whole model's measured time the groups remove: all at their narrowest."""
    return 1.0 - _curve(table)[1][0]


def calibrated_speedup(table: Mapping[str, Any], widths: Mapping[str, int]) -> float:
    """The whole model's speed-up the calibrated table predicts for ``widths``: what a check
    measured when these widths were checked."""
    x = _table_ratio(table, widths)
    timed = _at(table["calibration"].get("checks", []), x)
    ratio = timed[-1]["measured_ratio"] if timed else measured_ratio(table, x)
    return 1.0 / ratio if ratio > 0 else 0.0


def reach_warning(table: Mapping[str, Any], target: float) -> str | None:
    """Before training: what to say when ``target`` is beyond the measured :func:`reach`
    (None when within), with the target the recipe flags that keep groups whole would reach."""
    most = reach(table)
    if target <= most + 1e-6:
        return None
    cal = table["calibration"]
    asked = 1.0 / (1.0 - target)
    text = (
        f"pruning_latency_target {target:.3f} ({asked:.2f}x) is out of reach with these flags: "
        f"the whole model with every prunable group at its narrowest measured "
        f"{1.0 / (1.0 - most):.2f}x in {table.get('backend', 'torch')}. The most reachable "
        f"target is {most:.3f}"
    )
    if cal.get("flags"):
        flags = " and ".join(cal["flags"])
        with_flags = 1.0 - float(cal["flags_ratio"])
        verdict = "would reach it" if with_flags >= target else "would not reach it either"
        text += (
            f"; with {flags} the narrowest model measured {1.0 / cal['flags_ratio']:.2f}x "
            f"(target {with_flags:.3f} reachable): {flags} {verdict}"
        )
    return text


def removed_fraction(table: Mapping[str, Any], widths: Mapping[str, int]) -> float:
    """Fraction of the latency ``widths`` remove, predicted: on the calibrated curve when the
    table has one."""
    if "calibration" in table:
        return 1.0 - 1.0 / calibrated_speedup(table, widths)
    return latency_widths.removed_fraction(table, widths)


def prediction(table: Mapping[str, Any], widths: Mapping[str, int]) -> dict[str, float]:
    """:func:`latency_widths.prediction`; with a calibration, the speed-up is the calibrated
    one (its spread scaled), and the table's own is kept as ``table_speedup``."""
    out = latency_widths.prediction(table, widths)
    if "calibration" in table:
        speedup = calibrated_speedup(table, widths)
        rel = out["predicted_speedup_spread"] / max(out["predicted_speedup"], 1e-12)
        out["table_speedup"] = out["predicted_speedup"]
        out["predicted_speedup"], out["predicted_speedup_spread"] = speedup, speedup * rel
    return out
