"""What a latency table (:func:`compress.pruning.latency.measure_table`) predicts, and the
per-group widths it chooses for ``pruning_latency_target``.

The latency of a layer whose input and output groups are both narrowed is predicted as its full
time times the two measured ratios (time at the narrowed out-width / full time, and the same for
the in-width). Conv and linear layers no group touches keep their measured full time.
Everything else (norms, activations, adds) is ``rest_ms``, shared among the layers by the size
of their outputs (``volume_total`` per sample), a group's share shrinking linearly with its
width and the others' staying; fractions are of the predicted full-width time, ``rest_ms`` plus
the layers' times. :func:`choose_widths` picks the
widths that reach a fraction of latency removed while removing the least importance.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

__all__ = [
    "choose_widths",
    "layer_ms",
    "layer_spread",
    "predicted_ms",
    "predicted_spread",
    "prediction",
    "reach",
    "reach_warning",
    "removed_fraction",
    "speedup_line",
    "target_holds",
    "text",
]


def _at(widths: list[int], values: list[float], width: int) -> float:
    """``values`` (one per measured width) at ``width``: interpolated linearly between measured
    widths; below the smallest scaled down from it."""
    if width >= widths[-1]:
        return values[-1]
    if width <= widths[0]:
        return values[0] * width / widths[0]
    i = next(k for k, w in enumerate(widths) if w >= width)
    lo, hi = widths[i - 1], widths[i]
    return values[i - 1] + (values[i] - values[i - 1]) * (width - lo) / (hi - lo)


def _ratio(table: Mapping[str, Any], curve: Mapping[str, Any], full_ms: float, width: int) -> float:
    """The layer's time at ``width`` of the curve's group over its full time. Measured times
    never fall as the width grows (the table is made so)."""
    if full_ms <= 0:
        return 1.0
    return _at(table["groups"][curve["group"]]["widths"], curve["ms"], width) / full_ms


def layer_ms(table: Mapping[str, Any], name: str, widths: Mapping[str, int]) -> float:
    """Predicted time of layer ``name`` with its groups at ``widths`` (missing: full)."""
    entry = table["layers"][name]
    t = entry["ms"]
    curves = ([entry["out"]] if entry["out"] else []) + list(entry["in"])
    for curve in curves:
        size = table["groups"][curve["group"]]["size"]
        t *= _ratio(table, curve, entry["ms"], widths.get(curve["group"], size))
    return float(t)


def predicted_ms(table: Mapping[str, Any], widths: Mapping[str, int]) -> float:
    """Predicted whole-model time: the measured rest plus every table layer at ``widths``."""
    full = sum(e["ms"] for e in table["layers"].values())
    rest = table.get("rest_ms", max(0.0, table["model_ms"] - full))
    total = _volume_total(table)
    if total:
        rest -= sum(
            _rest_saved(table, g, w, total) for g, w in widths.items() if g in table["groups"]
        )
    return rest + sum(layer_ms(table, n, widths) for n in table["layers"])


def layer_spread(table: Mapping[str, Any], name: str, widths: Mapping[str, int]) -> float:
    """The spread of :func:`layer_ms` (ms): the relative spreads of the full time and of every
    narrowed curve's time, added in quadrature (0 for tables measured without spreads)."""
    entry = table["layers"][name]
    if entry["ms"] <= 0:
        return 0.0
    rel = (entry.get("spread", 0.0) / entry["ms"]) ** 2
    for curve in ([entry["out"]] if entry["out"] else []) + list(entry["in"]):
        info = table["groups"][curve["group"]]
        width = widths.get(curve["group"], info["size"])
        if width >= info["size"] or "spread" not in curve:
            continue
        t = _at(info["widths"], curve["ms"], width)
        if t > 0:
            rel += (_at(info["widths"], curve["spread"], width) / t) ** 2
    return float(layer_ms(table, name, widths) * math.sqrt(rel))


def predicted_spread(table: Mapping[str, Any], widths: Mapping[str, int]) -> float:
    """The spread of :func:`predicted_ms` (ms): the layers' spreads and the rest's (scaled with
    what is left of it), in quadrature."""
    full = sum(e["ms"] for e in table["layers"].values())
    rest = table.get("rest_ms", max(0.0, table["model_ms"] - full))
    rest_spread = table.get("rest_spread", 0.0)
    if rest > 0:
        left = predicted_ms(table, widths) - sum(
            layer_ms(table, n, widths) for n in table["layers"]
        )
        rest_spread *= max(0.0, left) / rest
    layers = sum(layer_spread(table, n, widths) ** 2 for n in table["layers"])
    return math.sqrt(rest_spread**2 + layers)


def prediction(table: Mapping[str, Any], widths: Mapping[str, int]) -> dict[str, float]:
    """What the table predicts for ``widths``, with spreads: the time, the full-width time, and
    the speed-up (their spreads in quadrature, relative)::

        {"predicted_ms": 3.6, "predicted_spread": 0.04, "full_ms": 12.0, "full_spread": 0.1,
         "predicted_speedup": 3.33, "predicted_speedup_spread": 0.05}
    """
    ms, full = predicted_ms(table, widths), predicted_ms(table, {})
    ms_spread, full_spread = predicted_spread(table, widths), predicted_spread(table, {})
    speedup = full / ms if ms > 0 else 0.0
    rel = math.hypot(ms_spread / ms if ms > 0 else 0.0, full_spread / full if full > 0 else 0.0)
    return {
        "predicted_ms": ms,
        "predicted_spread": ms_spread,
        "full_ms": full,
        "full_spread": full_spread,
        "predicted_speedup": speedup,
        "predicted_speedup_spread": speedup * rel,
    }


def _volume_total(table: Mapping[str, Any]) -> int:
    """The activations the rest works on: every layer's outputs (tables from before
    ``volume_total`` was recorded: the groups' alone, as if nothing else had any)."""
    groups = sum(int(info.get("volume", 0)) for info in table["groups"].values())
    return max(int(table.get("volume_total", 0)), groups)


def _rest_saved(table: Mapping[str, Any], group: str, width: int, total: int) -> float:
    """Time of the rest saved by ``group`` at ``width``: norms, activations and adds on its
    channels shrink with them (rest_ms shared by the groups' output sizes)."""
    info = table["groups"][group]
    if not total or "rest_ms" not in table:
        return 0.0
    return float(table["rest_ms"] * info.get("volume", 0) / total * (1 - width / info["size"]))


def removed_fraction(table: Mapping[str, Any], widths: Mapping[str, int]) -> float:
    """Fraction of the (predicted) full-width time that ``widths`` remove."""
    base = predicted_ms(table, {})
    return 1.0 - predicted_ms(table, widths) / base if base > 0 else 0.0


def reach(table: Mapping[str, Any], fixed: Mapping[str, int] | None = None) -> float:
    """The most of the predicted time the table's groups can remove: every group at its
    narrowest measured width (``fixed`` groups at theirs). Layers no group touches, and the
    rest outside the groups' share, stay: they bound what any target can reach."""
    fixed = dict(fixed or {})
    narrowest = {g: min(info["widths"]) for g, info in table["groups"].items() if g not in fixed}
    return removed_fraction(table, {**narrowest, **fixed})


def reach_warning(
    table: Mapping[str, Any], target: float, fixed: Mapping[str, int], flags: list[str]
) -> str | None:
    """Before training: what to say when ``pruning_latency_target`` ``target`` is beyond
    :func:`reach` (None when it is within). ``flags`` are the recipe flags that would let more
    layers shrink (``prune_first_conv: true``)."""
    most = reach(table, fixed)
    if target <= most + 1e-6:
        return None
    whole = sum(e["ms"] for e in table["layers"].values() if not e["out"] and not e["in"])
    full = predicted_ms(table, {})
    hint = f"; {' or '.join(flags)} would let more layers shrink" if flags else ""
    return (
        f"pruning_latency_target {target:.3f} is out of reach: at their narrowest widths the "
        f"prunable groups remove {most:.3f} of the predicted latency ({whole:.3g} of "
        f"{full:.3g} ms is in conv and linear layers no group prunes){hint}. The most "
        f"reachable target with these flags is {most:.3f}"
    )


def choose_widths(
    table: Mapping[str, Any],
    scores: Mapping[str, torch.Tensor],
    fraction: float,
    fixed: Mapping[str, int] | None = None,
    *,
    margin_cap: float | None = None,
) -> dict[str, int]:
    """Widths of the groups in ``scores`` that remove at least ``fraction`` of the predicted
    time and as little importance as the greedy search finds.

    Greedy: from full width, repeatedly take the narrowing (of one group, to its next candidate
    width that saves time) with the most time saved per importance removed (scores made
    comparable by unit L2 norm per group, the lowest channels go first), and as the last step the
    one that reaches the target losing least; then give back width where the target
    still holds, most important first. ``fixed`` groups keep their widths. Returns a width for
    every group in ``scores``; short of the target when even the narrowest widths do not reach it.

    The table's times are medians with a spread (:func:`compress.pruning.latency.median_spread`),
    and two tables of one machine differ by about that much, so no choice turns on a difference
    within it: a narrower width saves time only when it saves more than the spread of the
    saving; steps whose rates are within their spreads of the best are ties, taken from the
    group kept widest (then the one losing least importance, then the table's order); and the
    target must hold at the slow end of the prediction's spread (:func:`predicted_spread`), so
    that a choice just short of it is not taken in one run and left in the next. With spreads of
    0 (planned tables) every difference counts. ``margin_cap``: that margin is at most this
    fraction of the full time (a table of many layers adds up spreads that would overshoot).
    """
    fixed = dict(fixed or {})
    groups = [g for g in scores if g not in fixed and g in table["groups"]]
    widths = {**{g: table["groups"][g]["size"] for g in groups}, **fixed}
    touching: dict[str, list[str]] = {g: [] for g in table["groups"]}
    for name, e in table["layers"].items():
        for curve in ([e["out"]] if e["out"] else []) + list(e["in"]):
            touching[curve["group"]].append(name)
    cum: dict[str, list[float]] = {}
    for g in groups:
        s = scores[g].float()
        norm = float(s.norm())
        s = torch.sort(s / norm if norm > 0 else s, descending=True).values
        cum[g] = [0.0, *torch.cumsum(s, 0).tolist()]  # cum[g][w]: importance of the top w

    base = predicted_ms(table, {})
    goal = base * (1.0 - fraction)
    now = predicted_ms(table, widths)
    volume = _volume_total(table)
    order = {g: i for i, g in enumerate(table["groups"])}

    def local(g: str, w: int) -> tuple[float, float]:
        """The time of the group's layers and of its share of the rest, and its spread."""
        trial = {**widths, g: w}
        layers = sum(layer_ms(table, n, trial) for n in touching[g])
        spread = math.sqrt(sum(layer_spread(table, n, trial) ** 2 for n in touching[g]))
        return layers - _rest_saved(table, g, w, volume), spread

    def step(g: str) -> tuple[int, float, float] | None:
        """The next narrower width of ``g`` that saves more time than the saving's spread."""
        here, here_spread = local(g, widths[g])
        for w in sorted(table["groups"][g]["widths"], reverse=True):
            if w >= widths[g]:
                continue
            there, there_spread = local(g, w)
            saved, spread = here - there, math.hypot(here_spread, there_spread)
            if saved > max(spread, 0.0):
                return w, saved, spread
        return None

    def spread_of(w: Mapping[str, int]) -> float:
        spread = predicted_spread(table, w)
        return spread if margin_cap is None else min(spread, margin_cap * base)

    while now + (margin := spread_of(widths)) > goal + 1e-12:
        steps = {g: found for g in groups if (found := step(g)) is not None}
        if not steps:
            break
        lost = {g: cum[g][widths[g]] - cum[g][w] for g, (w, _, _) in steps.items()}
        reaching = [g for g, (_, saved, _) in steps.items() if now - saved + margin <= goal + 1e-12]
        if reaching:  # the last step: the one losing least
            pick = min(reaching, key=lambda g: (lost[g], order[g]))
        else:
            rate = {g: saved / max(lost[g], 1e-12) for g, (_, saved, _) in steps.items()}
            slack = {g: spread / max(lost[g], 1e-12) for g, (_, _, spread) in steps.items()}
            best = max(rate, key=lambda g: rate[g])
            ties = [g for g in steps if rate[g] + slack[g] >= rate[best] - slack[best]]
            pick = min(
                ties,
                key=lambda g: (-widths[g] / table["groups"][g]["size"], lost[g], order[g]),
            )
        widths[pick] = steps[pick][0]
        now -= steps[pick][1]
    # Give width back where the target still holds: the most important channel first.
    margin = spread_of(widths)
    for _ in range(2):
        for g in sorted(groups, key=lambda g: (-(cum[g][-1] - cum[g][widths[g]]), order[g])):
            for w in sorted(table["groups"][g]["widths"], reverse=True):
                if w <= widths[g]:
                    break
                extra = local(g, w)[0] - local(g, widths[g])[0]
                if now + extra + margin <= goal + 1e-12 or extra <= 0:
                    widths[g] = w
                    now += extra
                    break
    return {g: widths[g] for g in groups}


def target_holds(
    table: Mapping[str, Any],
    widths: Mapping[str, int],
    fraction: float,
    *,
    margin_cap: float | None = None,
) -> bool:
    """Whether ``widths`` remove ``fraction`` of the predicted time within the prediction's
    spread (as :func:`choose_widths` reaches it, the spread capped as there)."""
    base = predicted_ms(table, {})
    goal = base * (1.0 - fraction)
    spread = predicted_spread(table, widths)
    if margin_cap is not None:
        spread = min(spread, margin_cap * base)
    return predicted_ms(table, widths) <= goal + spread + 1e-9 * base


def text(table: Mapping[str, Any], widths: Mapping[str, int] | None = None) -> str:
    """The table as text: per group its candidate widths, the time its layers take at each
    (others full), and the chosen width."""
    from compress.analysis.summary import table as markdown

    widths = dict(widths or table.get("chosen") or {})
    touching: dict[str, list[str]] = {g: [] for g in table["groups"]}
    for n, e in table["layers"].items():  # one pass: a table of many groups stays fast
        for g in dict.fromkeys(c["group"] for c in ([e["out"]] if e["out"] else []) + e["in"]):
            touching[g].append(n)
    rows = []
    for g, info in table["groups"].items():
        names = touching[g]
        times = [sum(layer_ms(table, n, {g: w}) for n in names) for w in info["widths"]]
        rows.append(
            {
                "group": g,
                "size": info["size"],
                "chosen": widths.get(g, info["size"]),
                "widths": " ".join(str(w) for w in info["widths"]),
                "ms": " ".join(f"{t:.3g}" for t in times),
            }
        )
    full = predicted_ms(table, {})
    rounds = f", {table['rounds']} rounds" if "rounds" in table else ""
    head = (
        f"latency table ({table.get('backend', 'torch')}, batch {table.get('batch_size')}"
        f"{rounds}): model {table['model_ms']:.3f} ms "
        f"measured, {full:.3f} ms predicted at full width (of which {table.get('rest_ms', 0):.3f}"
        " ms outside the table's layers)"
    )
    if widths:
        head += f", {predicted_ms(table, widths):.3f} ms at the chosen widths"
    if table.get("calibration"):
        cal = table["calibration"]
        narrowest = min(cal["measured_ratio"])
        head += (
            f"; calibrated on the whole model shrunk uniformly at {len(cal['scales'])} widths "
            f"(the narrowest measured {1 / narrowest if narrowest > 0 else 0:.2f}x)"
        )
    if "measured_ms" in table:
        head += f"; {speedup_line(table)}"
    return head + "\n" + markdown(rows)


def speedup_line(report: Mapping[str, Any]) -> str:
    """The predicted and measured speed-ups of a stripped model's report (``strip()``'s
    ``compress_latency_table``), each with its spread, and the target's."""
    if "predicted_speedup" not in report:  # a report from before spreads were kept
        full = predicted_ms(report, {})
        speedup = full / report["predicted_ms"] if report["predicted_ms"] else 0.0
        measured = report["model_ms"] / report["measured_ms"] if report["measured_ms"] else 0.0
        return (
            f"the stripped model measured {report['measured_ms']:.3f} ms (speed-up "
            f"{speedup:.2f}x predicted, {measured:.2f}x measured)"
        )
    target = report.get("target_speedup")
    aim = f" for a target of {target:.2f}x" if target else ""
    return (
        f"the stripped model measured {report['measured_ms']:.3f} ms against "
        f"{report['dense_ms']:.3f} ms at full width (speed-up "
        f"{report['predicted_speedup']:.2f}x ± {report['predicted_speedup_spread']:.2f} predicted, "
        f"{report['measured_speedup']:.2f}x ± {report['measured_speedup_spread']:.2f} measured "
        f"over {report['measured_rounds']} interleaved rounds{aim})"
    )
