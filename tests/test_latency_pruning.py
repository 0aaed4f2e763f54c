"""Latency-aware filter pruning: the table, the width choice, the schedule, resume, export.

No test times anything: the timer is replaced by planned numbers (a function of the layer's
shape), so every width chosen here is the same on any machine and under any load.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from test_structured import _make
from torch import nn

import compress
from compress.cli import main
from compress.errors import ConfigError
from compress.pruning import latency, latency_calibration, latency_widths
from compress.pruning.filter_pruning import FilterPruning
from compress.schedules import pruning_level

ALL = {"prune_first_conv": True, "prune_downsample_convs": True}


def blocked_timer(fn: Any) -> float:
    """oneDNN-like planned time: channels count in blocks of 16, so 24 channels cost what 32
    do; a whole model costs the sum of its layers."""
    assert isinstance(fn, functools.partial)
    total = 0.0
    for m in fn.func.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            out_ch, in_ch = m.weight.shape[:2]
            in_b = math.ceil(in_ch / 16) * 16 if in_ch >= 16 else in_ch
            total += math.ceil(out_ch / 16) * 16 * in_b * m.weight[0, 0].numel()
    return total * 1e-9


def no_timer(fn: Any) -> float:
    raise AssertionError("the latency table must come from the saved state, not be re-measured")


def wide_net() -> tuple[nn.Module, torch.Tensor]:
    """Two prunable groups of 64 channels ("0" and "2") feeding a 1x1 conv."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 8, 1),
    )
    return model, torch.randn(1, 3, 8, 8)


def compressed(model: nn.Module, x: torch.Tensor, **params: Any) -> tuple[Any, FilterPruning]:
    recipe = {"compression": {"algorithm": "filter_pruning", "params": {**ALL, **params}}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctrl, _ = compress.create_compressed_model(model, recipe, x)
    return ctrl, ctrl.algorithms[0]


def widths(algo: FilterPruning) -> dict[str, int]:
    return {name: int(k.sum()) for name, k in algo.keep.items()}


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"pruning_target": 0.3}, "pruning_target .* and pruning_latency_target .* both set"),
        ({"pruning_flops_target": 0.3}, "pruning_flops_target .* and pruning_latency_target"),
    ],
)
def test_latency_target_is_exclusive_with_the_other_targets(
    params: dict[str, float], match: str
) -> None:
    model, x = wide_net()
    with pytest.raises(ConfigError, match=match):
        compressed(model, x, pruning_latency_target=0.5, **params)


def test_table_measures_each_group_at_its_candidate_widths() -> None:
    model, x = wide_net()
    from compress.pruning.channel_groups import build_groups

    groups = build_groups(model, x, prune_first_conv=True)
    table = latency.measure_table(model, groups, (x,), batch_size=4, timer=blocked_timer)
    assert table["batch_size"] == 4
    # 64 channels of 8x8 per sample: the activation the rest's share is counted by.
    widths = [8, 16, 24, 32, 40, 48, 56, 64]
    assert table["groups"]["0"] == {"size": 64, "widths": widths, "volume": 64 * 8 * 8}
    layer2 = table["layers"]["2"]
    assert layer2["out"]["group"] == "2" and [c["group"] for c in layer2["in"]] == ["0"]
    # Conv 64->64 3x3: out-width 24 and 32 cost the same (16-channel blocks), input full.
    blocks = [math.ceil(w / 16) * 16 for w in (8, 16, 24, 32, 40, 48, 56, 64)]
    assert layer2["out"]["ms"] == pytest.approx([b * 64 * 9 * 1e-6 for b in blocks])
    assert layer2["ms"] == pytest.approx(64 * 64 * 9 * 1e-6)
    assert table["model_ms"] == pytest.approx(sum(e["ms"] for e in table["layers"].values()))
    assert table["rest_ms"] == 0.0  # timed with every conv replaced by its recorded output
    json.dumps(table)  # plain JSON
    # The rest (here planned at 10 ms) shrinks with each group's width, by its share of all
    # the layers' outputs (the last conv's 8 channels are no group's: their share stays).
    assert table["volume_total"] == (64 + 64 + 8) * 8 * 8
    table = {**table, "rest_ms": 10.0}
    full = latency_widths.predicted_ms(table, {})
    assert full - latency_widths.predicted_ms(table, {"0": 32, "2": 64}) == pytest.approx(
        sum(
            latency_widths.layer_ms(table, n, {}) - latency_widths.layer_ms(table, n, {"0": 32})
            for n in "02"
        )
        + 10.0 * 64 / (64 + 64 + 8) * 0.5
    )


def test_choice_removes_the_least_important_channels_for_the_time() -> None:
    # Two groups with identical time curves; group "b"'s channels matter less.
    curve = {"ms": [1.0, 2.0, 3.0, 4.0]}
    table = {
        "model_ms": 8.0,
        "groups": {n: {"size": 4, "widths": [1, 2, 3, 4]} for n in ("a", "b")},
        "layers": {n: {"ms": 4.0, "out": {"group": n, **curve}, "in": []} for n in ("a", "b")},
    }
    scores = {"a": torch.tensor([4.0, 3.0, 2.0, 1.0]), "b": torch.tensor([1.0, 0.5, 0.2, 0.1])}
    # 25% of 8 ms = 2 ms: take it all from "b" (its two lowest channels weigh little).
    assert latency_widths.choose_widths(table, scores, 0.25) == {"a": 4, "b": 2}
    assert latency_widths.removed_fraction(table, {"a": 4, "b": 2}) == pytest.approx(0.25)
    # A fixed group keeps its width and counts toward the time.
    assert latency_widths.choose_widths(table, {"a": scores["a"]}, 0.25, {"b": 2}) == {"a": 4}


def test_widths_come_from_the_table_not_a_fixed_rounding() -> None:
    for target in (0.3, 0.5, 0.7):
        model, x = wide_net()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(latency, "default_timer", blocked_timer)
            ctrl, algo = compressed(model, x, pruning_latency_target=target, schedule="baseline")
        chosen = widths(algo)
        latency_table = algo.latency_table
        assert latency_table is not None
        removed = latency_widths.removed_fraction(latency_table, chosen)
        # The whole model (here the sum of its layers, as the table) was timed at the widths
        # chosen and the choice corrected: the one kept misses the target by the least of
        # those timed, and no more than the nearest pair of table widths on the side it is.
        checks = latency_table["calibration"]["checks"]

        def missed(f: float, target: float = target) -> float:
            return abs((1 - target) / (1 - f) - 1)

        assert missed(removed) == pytest.approx(
            min(missed(1 - c["measured_ratio"]) for c in checks)
        )
        candidates = latency_table["groups"]["0"]["widths"]
        side = [
            f
            for a, b in itertools.product(candidates, candidates)
            if ((f := latency_widths.removed_fraction(latency_table, {"0": a, "2": b})) >= target)
            == (removed >= target)
        ]
        assert missed(removed) <= min(map(missed, side)) + 0.06
        # 16-channel blocks: a width between blocks costs a whole block, so it is never kept.
        assert all(w % 16 == 0 for w in chosen.values()), chosen
        stats = algo.statistics()
        assert stats["latency removed (predicted)"] == pytest.approx(removed)


def test_schedule_raises_the_latency_fraction_over_pruning_steps() -> None:
    model, x = wide_net()
    params = {"pruning_latency_target": 0.6, "pruning_steps": 3, "round_to": 1}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(latency, "default_timer", latency.layer_macs_timer)
        ctrl, algo = compressed(model, x, **params)
        seen = []
        for _ in range(5):
            ctrl.scheduler.epoch_step()
            table = algo.latency_table  # measured when the level first leaves 0
            removed = 0.0 if table is None else latency_widths.removed_fraction(table, widths(algo))
            seen.append((algo.level, removed))
    expected = [pruning_level({**params, "schedule": "exponential",
                               "pruning_target": 0.6, "num_init_steps": 0}, 0.0, e)
                for e in range(5)]  # fmt: skip
    assert [level for level, _ in seen] == pytest.approx(expected)
    # NNCF's exponential schedule: the target at epoch pruning_steps - 1 = 2
    assert expected[0] == 0.0 and 0.0 < expected[1] < 0.6 == expected[2] == expected[3]
    for level, removed in seen:
        assert level <= removed + 1e-9
        assert removed < level + 0.15  # MAC-proportional times: 8-channel steps come close
    assert algo.frozen


def test_resume_restores_the_table_and_the_widths_exactly() -> None:
    model, x = _make("resnet")
    params = {"pruning_latency_target": 0.5, "pruning_steps": 4}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(latency, "default_timer", blocked_timer)
        ctrl, algo = compressed(model, x, **params)
        for _ in range(2):
            ctrl.scheduler.epoch_step()
    state = ctrl.state_dict()
    model2, _ = _make("resnet")  # the same weights, as a checkpoint would restore them
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(latency, "default_timer", no_timer)
        ctrl2, algo2 = compressed(model2, x, **params)
        ctrl2.load_state_dict(state)
        assert algo2.latency_table == algo.latency_table
        assert widths(algo2) == widths(algo)
        ctrl.scheduler.epoch_step()
        ctrl2.scheduler.epoch_step()
        assert {n: k.tolist() for n, k in algo2.keep.items()} == {
            n: k.tolist() for n, k in algo.keep.items()
        }


def test_export_writes_the_table_beside_the_file_and_inspect_shows_it(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model, x = wide_net()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(latency, "default_timer", blocked_timer)
        ctrl, algo = compressed(model, x, pruning_latency_target=0.5, schedule="baseline")
    small = ctrl.strip()
    paths = compress.export(small, tmp_path / "m", ["pruned"], example_inputs=x)
    saved = json.loads((tmp_path / "m.latency.json").read_text())
    assert saved["chosen"] == widths(algo)
    assert saved["layers"] == algo.latency_table["layers"]  # type: ignore[index]
    assert small[0].out_channels == widths(algo)["0"]
    assert main(["inspect", str(paths["pruned"])]) == 0
    out = capsys.readouterr().out
    assert "m.latency.json: latency table (torch, batch 1, 5 rounds)" in out
    assert f"| 0     | 64   | {widths(algo)['0']:<6} | 8 16 24 32 40 48 56 64 |" in out


def test_validate_and_schedule_name_the_latency_target(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "r.json"
    params = {"pruning_latency_target": 0.4, "pruning_steps": 2}
    path.write_text(json.dumps({"compression": {"algorithm": "filter_pruning", "params": params}}))
    assert main(["validate", str(path)]) == 0
    assert "filter_pruning (exponential: 0.4 of latency from epoch 1)" in capsys.readouterr().out
    assert main(["schedule", str(path), "--epochs", "3", "--json"]) == 0
    levels = [row["filter_pruning"] for row in json.loads(capsys.readouterr().out)]
    assert levels[0] == 0.0 and levels[2] == 0.4


def test_a_target_out_of_reach_warns_and_prunes_to_the_narrowest_widths() -> None:
    model, x = wide_net()
    recipe = {
        "compression": {
            "algorithm": "filter_pruning",
            "params": {**ALL, "pruning_latency_target": 0.99, "schedule": "baseline"},
        }
    }
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.filterwarnings("always", message=".*out of reach.*")
        mp.setattr(latency, "default_timer", blocked_timer)
        with pytest.warns(UserWarning, match=r"pruning_latency_target 0.990 is out of reach"):
            ctrl, _ = compress.create_compressed_model(model, recipe, x)
    assert widths(ctrl.algorithms[0]) == {"0": 8, "2": 8}


def test_a_level_set_outside_the_schedule_is_a_latency_fraction_too() -> None:
    # accuracy-aware training sets the level itself: with a latency target it is still the
    # fraction of latency removed, not of filters
    model, x = wide_net()
    params = {"pruning_latency_target": 0.6, "pruning_steps": 3, "round_to": 1}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(latency, "default_timer", latency.layer_macs_timer)
        ctrl, algo = compressed(model, x, **params)
        algo.set_level(0.3)
        removed = latency_widths.removed_fraction(algo.latency_table, widths(algo))
    assert algo.level == 0.3
    assert 0.3 <= removed < 0.3 + 0.15


def test_flags_that_leave_the_latency_target_out_of_reach_are_said_before_training() -> None:
    # the first conv is excluded by default: its time stays, so 0.9 cannot be reached; the
    # warning comes at the first epoch, before any step, with the most reachable target
    model, x = wide_net()
    recipe = {
        "compression": {
            "algorithm": "filter_pruning",
            "params": {"pruning_latency_target": 0.9, "pruning_steps": 3},
        }
    }
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mp.setattr(latency, "default_timer", blocked_timer)
        ctrl, _ = compress.create_compressed_model(model, recipe, x)
        ctrl.scheduler.epoch_step()  # epoch 0: the schedule's level is still 0
        algo = ctrl.algorithms[0]
    assert algo.level == 0.0
    said = [str(w.message) for w in caught if "out of reach" in str(w.message)]
    most = latency_calibration.reach(algo.latency_table)  # measured on the whole model
    assert len(said) == 1
    assert said[0].startswith(
        "compression: pruning_latency_target 0.900 (10.00x) is out of reach with these flags: "
        "the whole model with every prunable group at its narrowest measured "
        f"{1 / (1 - most):.2f}x in torch. The most reachable target is {most:.3f}"
    )
    # the model with the first conv prunable too was timed at its narrowest: that reaches it
    assert "; with prune_first_conv: true the narrowest model measured" in said[0]
    assert said[0].endswith("prune_first_conv: true would reach it")
    assert 0.0 < most < 0.9
    # every conv prunable: the target is within reach, nothing is said
    model, x = wide_net()
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mp.setattr(latency, "default_timer", blocked_timer)
        ctrl, algo = compressed(model, x, pruning_latency_target=0.6, pruning_steps=3)
        ctrl.scheduler.epoch_step()
    assert not [w for w in caught if "out of reach" in str(w.message)]


def test_strip_reports_the_measured_time_beside_the_predicted_one() -> None:
    model, x = wide_net()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(latency, "default_timer", blocked_timer)
        ctrl, algo = compressed(model, x, pruning_latency_target=0.5, schedule="baseline")
        small = ctrl.strip()
    report = small.compress_latency_table
    assert report["chosen"] == widths(algo)
    assert report["predicted_ms"] == latency_widths.predicted_ms(algo.latency_table, widths(algo))
    # the planned timer: the stripped model's time is that of its narrower convs, the dense
    # model's that of the full ones, timed in the same rounds (planned times: no spread)
    assert report["measured_ms"] == pytest.approx(blocked_timer(functools.partial(small, x)) * 1e3)
    assert report["dense_ms"] == pytest.approx(report["model_ms"])
    assert report["measured_speedup"] == pytest.approx(report["dense_ms"] / report["measured_ms"])
    assert report["measured_speedup_spread"] == report["predicted_speedup_spread"] == 0.0
    assert report["target_speedup"] == 2.0
    head = latency_widths.text(report).splitlines()[0]
    assert f"the stripped model measured {report['measured_ms']:.3f} ms" in head
    assert f"{report['predicted_speedup']:.2f}x ± 0.00 predicted" in head
    assert f"{report['measured_speedup']:.2f}x ± 0.00 measured over 5 interleaved rounds" in head
    assert head.endswith("for a target of 2.00x)")
