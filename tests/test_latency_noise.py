"""Latency tables measured with noise: rounds until the medians settle, widths chosen robustly
to the spread, the spread reported.

Nothing here is timed: tables are planned (a function of the layer's shape) and noise comes
from seeded generators, as two builds on one loaded machine would see it.
"""

from __future__ import annotations

import copy
import functools
import json
import random
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from test_latency_pruning import ALL, blocked_timer, wide_net, widths
from test_structured import _make

import compress
from compress.cli import main
from compress.pruning import latency, latency_calibration, latency_widths
from compress.pruning.channel_groups import build_groups


def noisy(table: dict[str, Any], rel: float, seed: int, *, spreads: bool = True) -> dict[str, Any]:
    """``table`` as one measurement of it: every time off by up to ``rel`` of itself (uniform,
    seeded), curves made non-decreasing as :func:`latency.measure_table` makes them, and
    ``rel`` of each time recorded as its spread (or no spreads, as tables were before)."""
    rng = random.Random(seed)
    out = copy.deepcopy(table)

    def jig(v: float) -> float:
        return v * (1 + rel * rng.uniform(-1.0, 1.0))

    for e in out["layers"].values():
        full = jig(e["ms"])
        for c in [e["out"], *e["in"]]:
            if not c:
                continue
            c["ms"] = [jig(v) for v in c["ms"][:-1]] + [full]
            for i in range(len(c["ms"]) - 2, -1, -1):
                c["ms"][i] = min(c["ms"][i], c["ms"][i + 1])
            c["spread"] = [rel * v for v in c["ms"]]
            if not spreads:
                del c["spread"]
        e["ms"], e["spread"] = full, rel * full
        if not spreads:
            del e["spread"]
    out["model_ms"] = jig(out["model_ms"])
    return out


def resnet_table() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A small ResNet's planned table (oneDNN-like 16-channel blocks: widths between blocks cost
    what the next block does) and seeded importance scores."""
    model, x = _make("resnet")
    groups = build_groups(model, x, prune_first_conv=True, prune_downsample_convs=True)
    table = latency.measure_table(model, groups, (x,), timer=blocked_timer)
    gen = torch.Generator().manual_seed(0)
    return table, {g.name: torch.rand(g.size, generator=gen) for g in groups}


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.7])
def test_noisy_tables_within_their_spread_choose_the_same_widths(fraction: float) -> None:
    table, scores = resnet_table()
    planned = latency_widths.choose_widths(table, scores, fraction)
    chosen = [
        latency_widths.choose_widths(noisy(table, 0.03, seed), scores, fraction)
        for seed in range(20)
    ]
    assert all(c == planned for c in chosen), chosen
    # the planned widths reach the target, as every noisy table's at the slow end of its spread
    assert latency_widths.removed_fraction(table, planned) >= fraction
    for seed in range(20):
        t = noisy(table, 0.03, seed)
        base = latency_widths.predicted_ms(t, {})
        slow = latency_widths.predicted_ms(t, planned) + latency_widths.predicted_spread(t, planned)
        assert slow <= base * (1 - fraction) + 1e-9


def test_without_spreads_the_same_noise_moves_the_widths() -> None:
    # what the spreads are for: the same twenty noisy tables, their spreads left out (every
    # difference counts), choose widths that differ from table to table
    table, scores = resnet_table()
    for fraction in (0.3, 0.5):
        chosen = {
            json.dumps(
                latency_widths.choose_widths(
                    noisy(table, 0.03, seed, spreads=False), scores, fraction
                )
            )
            for seed in range(20)
        }
        assert len(chosen) >= 3, chosen


def two_groups(saved_b: float, spread: float) -> dict[str, Any]:
    """Groups "a" and "b" of 4 channels, 4 ms each at full width; narrowing "a" by one
    channel saves 1 ms, "b" ``saved_b`` ms; every time has ``spread`` of itself as spread."""
    curves = {"a": [1.0, 2.0, 3.0, 4.0], "b": [1.0, 2.0, 3.0, 4.0]}
    curves["b"][2] = 4.0 - saved_b
    return {
        "model_ms": 8.0,
        "groups": {n: {"size": 4, "widths": [1, 2, 3, 4]} for n in curves},
        "layers": {
            n: {
                "ms": 4.0,
                "spread": 4.0 * spread,
                "out": {"group": n, "ms": ms, "spread": [t * spread for t in ms]},
                "in": [],
            }
            for n, ms in curves.items()
        },
    }


def test_a_faster_choice_outside_the_spread_still_wins() -> None:
    # 20% of 8 ms: no single step reaches it, so the first step goes to the best time saved per
    # importance removed; the importance is alike, so only the time tells "a" and "b" apart.
    # Taking "b" first ends at 3/3, taking "a" first at 2/4 (the second step then reaches the
    # target either way and ties on importance).
    scores = {"a": torch.ones(4), "b": torch.ones(4)}
    # "b"'s step saves 1.5 ms against "a"'s 1.0, far outside a 1% spread: "b" goes first
    assert latency_widths.choose_widths(two_groups(1.5, 0.01), scores, 0.2) == {"a": 3, "b": 3}
    # 1.02 ms or 0.98 against 1.0, with a 3% spread (about 0.17 ms on each saving): a tie,
    # broken in the table's order, the same whichever of the two the noise makes faster
    for saved_b in (0.98, 1.02):
        table = two_groups(saved_b, 0.03)
        assert latency_widths.choose_widths(table, scores, 0.2) == {"a": 2, "b": 4}
    # with no spread (planned times) every difference counts
    assert latency_widths.choose_widths(two_groups(1.02, 0.0), scores, 0.2) == {"a": 3, "b": 3}
    assert latency_widths.choose_widths(two_groups(0.98, 0.0), scores, 0.2) == {"a": 2, "b": 4}


def test_median_spread_is_the_robust_error_of_the_median() -> None:
    # median 3, median absolute deviation 1 (an outlier of 100 moves neither)
    assert latency.median_spread([1.0, 2.0, 3.0, 4.0, 100.0]) == pytest.approx(1.858 / 5**0.5)
    assert latency.median_spread([2.0] * 7) == 0.0
    assert latency.median_spread([2.0]) == 0.0


def noisy_timer(rel: float, seed: int) -> Any:
    """``blocked_timer`` times (1 + ``rel`` * a seeded normal draw)."""
    gen = torch.Generator().manual_seed(seed)

    def timer(fn: Any) -> float:
        return blocked_timer(fn) * (1.0 + rel * float(torch.randn((), generator=gen)))

    return timer


def test_rounds_go_on_until_the_medians_settle_or_the_cap() -> None:
    model, x = wide_net()
    groups = build_groups(model, x, prune_first_conv=True)
    rounds = {}
    for rel in (0.0, 0.01, 0.03, 0.05):
        table = latency.measure_table(model, groups, (x,), timer=noisy_timer(rel, 0))
        rounds[rel] = table["rounds"]
        pairs = [(e["ms"], e["spread"]) for e in table["layers"].values()]
        for e in table["layers"].values():
            for c in [e["out"], *e["in"]]:
                pairs += zip(c["ms"], c["spread"], strict=True) if c else []
        # settled: every median within 2% (its spread) of itself, or of a fiftieth of the model
        big = [s / ms for ms, s in pairs if ms >= table["model_ms"] / 50]
        if rounds[rel] < 20:
            assert max(big) <= 0.02
        else:
            assert max(s / ms for ms, s in pairs) > 0.02
        if rel == 0.0:
            assert {s for _, s in pairs} == {0.0}
    # planned times and 1% noise settle at the first check; 3% needs more; 5% reaches the cap
    assert rounds[0.0] == rounds[0.01] == 5
    assert 5 < rounds[0.03] < 20
    assert rounds[0.05] == 20
    table = latency.measure_table(model, groups, (x,), timer=noisy_timer(0.05, 0), max_rounds=8)
    assert table["rounds"] == 8 and table["spread_bound"] == 0.02
    assert all(s > 0 for s in table["layers"]["2"]["out"]["spread"])


def test_strip_export_and_inspect_report_both_speedups_with_their_spreads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, x = wide_net()
    monkeypatch.setattr(latency, "default_timer", noisy_timer(0.05, 1))
    recipe = {
        "compression": {
            "algorithm": "filter_pruning",
            "params": {**ALL, "pruning_latency_target": 0.5, "schedule": "baseline"},
        }
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctrl, _ = compress.create_compressed_model(model, recipe, x)
    algo = ctrl.algorithms[0]
    small = ctrl.strip()
    report = small.compress_latency_table
    table = algo.latency_table
    predicted = latency_widths.prediction(table, widths(algo))
    # the table's own prediction is kept; the one reported is read off its calibration
    assert report["table_speedup"] == pytest.approx(predicted["predicted_speedup"])
    calibrated = latency_calibration.calibrated_speedup(table, widths(algo))
    assert report["predicted_speedup"] == pytest.approx(calibrated)
    rel = predicted["predicted_speedup_spread"] / predicted["predicted_speedup"]
    assert 0 < report["predicted_speedup_spread"] == pytest.approx(calibrated * rel)
    assert report["measured_speedup_spread"] > 0 and 5 <= report["measured_rounds"] <= 20
    # the planned times of the two models, within the noise of the rounds
    planned = blocked_timer(functools.partial(model, x)) / blocked_timer(
        functools.partial(small, x)
    )
    assert report["measured_speedup"] == pytest.approx(planned, rel=0.1)
    line = latency_widths.speedup_line(report)
    assert (
        f"{report['predicted_speedup']:.2f}x ± {report['predicted_speedup_spread']:.2f} "
        f"predicted, {report['measured_speedup']:.2f}x ± "
        f"{report['measured_speedup_spread']:.2f} measured over {report['measured_rounds']} "
        "interleaved rounds for a target of 2.00x)"
    ) in line
    paths = compress.export(small, tmp_path / "m", ["pruned"], example_inputs=x)
    saved = json.loads((tmp_path / "m.latency.json").read_text())
    for key in ("predicted_speedup_spread", "measured_speedup_spread", "rounds", "model_spread"):
        assert saved[key] == report[key]
    assert saved["layers"]["2"]["out"]["spread"] == table["layers"]["2"]["out"]["spread"]
    assert main(["inspect", str(paths["pruned"])]) == 0
    out = capsys.readouterr().out
    assert f"latency table (torch, batch 1, {table['rounds']} rounds)" in out
    assert line in out


def test_the_callback_says_both_speedups_at_export(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import logging

    from conftest import fit_quietly
    from test_lightning_path import trainer
    from test_resume import Lit
    from torch.utils.data import DataLoader, TensorDataset

    from callbacks import CompressionCallback

    monkeypatch.setattr(latency, "default_timer", noisy_timer(0.05, 2))
    params = {"pruning_latency_target": 0.4, "prune_first_conv": True, "schedule": "baseline"}
    recipe = {"compression": {"algorithm": "filter_pruning", "params": params}}
    cb = CompressionCallback(
        recipe, model_attr="model", export_dir=tmp_path, export_formats=["pruned"], verbose=False
    )
    data = TensorDataset(torch.randn(16, 3, 8, 8), torch.randint(0, 2, (16,)), torch.arange(16))
    with caplog.at_level(logging.INFO):
        fit_quietly(trainer(tmp_path, cb, epochs=1), Lit(), DataLoader(data, batch_size=8))
    saved = json.loads((tmp_path / "model.latency.json").read_text())
    said = [r.getMessage() for r in caplog.records if "compression: latency:" in r.getMessage()]
    assert said == [f"compression: latency: {latency_widths.speedup_line(saved)}"]
    assert f"± {saved['measured_speedup_spread']:.2f} measured" in said[0]
    assert said[0].endswith("for a target of 1.67x)")
