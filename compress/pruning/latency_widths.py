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

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["choose_widths", "layer_ms", "predicted_ms", "removed_fraction", "text"]


def _ratio(table: Mapping[str, Any], curve: Mapping[str, Any], full_ms: float, width: int) -> float:
    """The layer's time at ``width`` of the curve's group over its full time (interpolated
    linearly between measured widths; widths below the smallest scale down from it). Measured
    times never fall as the width grows (the table is made so)."""
    widths = table["groups"][curve["group"]]["widths"]
    times = curve["ms"]
    if full_ms <= 0:
        return 1.0
    if width >= widths[-1]:
        return times[-1] / full_ms
    if width <= widths[0]:
        return times[0] * width / widths[0] / full_ms
    i = next(k for k, w in enumerate(widths) if w >= width)
    lo, hi = widths[i - 1], widths[i]
    t = times[i - 1] + (times[i] - times[i - 1]) * (width - lo) / (hi - lo)
    return t / full_ms


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


def choose_widths(
    table: Mapping[str, Any],
    scores: Mapping[str, torch.Tensor],
    fraction: float,
    fixed: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Widths of the groups in ``scores`` that remove at least ``fraction`` of the predicted
    time and as little importance as the greedy search finds.

    Greedy: from full width, repeatedly take the narrowing (of one group, to its next candidate
    width that saves time) with the most time saved per importance removed (scores made
    comparable by unit L2 norm per group, the lowest channels go first), and as the last step the
    one that reaches the target losing least; then give back width where the target
    still holds, most important first. ``fixed`` groups keep their widths. Returns a width for
    every group in ``scores``; short of the target when even the narrowest widths do not reach it.
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

    def local(g: str, w: int) -> float:
        trial = {**widths, g: w}
        layers = sum(layer_ms(table, n, trial) for n in touching[g])
        return layers - _rest_saved(table, g, w, volume)

    while now > goal + 1e-12:
        best: tuple[float, float, float, str, int] | None = None
        for g in groups:
            here = local(g, widths[g])
            # The next narrower width that saves time: small steps, so little overshoot.
            for w in sorted(table["groups"][g]["widths"], reverse=True):
                if w >= widths[g]:
                    continue
                saved = here - local(g, w)
                if saved <= 0:
                    continue
                lost = cum[g][widths[g]] - cum[g][w]
                # A step that reaches the goal: the one losing least wins; else the best rate.
                reaches = now - saved <= goal + 1e-12
                key = (float(reaches), -lost if reaches else saved / max(lost, 1e-12), saved)
                if best is None or key > best[:3]:
                    best = (*key, g, w)
                break
        if best is None:
            break
        _, _, saved, g, w = best
        widths[g] = w
        now -= saved
    # Give width back where the target still holds: the most important channel first.
    for _ in range(2):
        for g in sorted(groups, key=lambda g: -(cum[g][-1] - cum[g][widths[g]])):
            for w in sorted(table["groups"][g]["widths"], reverse=True):
                if w <= widths[g]:
                    break
                extra = local(g, w) - local(g, widths[g])
                if now + extra <= goal + 1e-12 or extra <= 0:
                    widths[g] = w
                    now += extra
                    break
    return {g: widths[g] for g in groups}


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
    head = (
        f"latency table ({table.get('backend', 'torch')}, batch {table.get('batch_size')}): "
        f"model {table['model_ms']:.3f} ms "
        f"measured, {full:.3f} ms predicted at full width (of which {table.get('rest_ms', 0):.3f}"
        " ms outside the table's layers)"
    )
    if widths:
        head += f", {predicted_ms(table, widths):.3f} ms at the chosen widths"
    return head + "\n" + markdown(rows)
