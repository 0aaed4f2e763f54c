"""Layerwise allocation and the effective-sparsity target, through magnitude sparsity."""

import pytest
import torch
from conftest import lenet, magnitude

import compress
from compress.sparsity.allocation import allocate


def _layer_levels(ctrl) -> list[float]:
    return [r["sparsity"] for r in ctrl.statistics().to_dict()["algorithms"][0]["layers"]]


@pytest.mark.parametrize("method", ["uniform", "erk", "igq"])
def test_allocation_sets_each_layer_to_its_quota(method: str) -> None:
    ctrl, net = compress.create_compressed_model(
        lenet(), magnitude(sparsity_init=0.9, layerwise_allocation=method)
    )
    expected = allocate(method, [(300, 64), (100, 300), (10, 100)], 0.9)
    for got, want, n in zip(_layer_levels(ctrl), expected, (19200, 30000, 1000)):
        assert abs(got * n - round(want * n)) <= 1


def test_local_mode_is_uniform_allocation() -> None:
    ctrl, _ = compress.create_compressed_model(
        lenet(), magnitude(sparsity_init=0.6, sparsity_level_setting_mode="local")
    )
    assert _layer_levels(ctrl) == pytest.approx([0.6, 0.6, 0.6], abs=1e-4)


def test_lamp_prunes_exactly_the_level_overall() -> None:
    ctrl, _ = compress.create_compressed_model(
        lenet(), magnitude(sparsity_init=0.95, layerwise_allocation="lamp")
    )
    zeros = sum(lv * n for lv, n in zip(_layer_levels(ctrl), (19200, 30000, 1000)))
    assert abs(zeros - 0.95 * 50200) <= 1


def test_effective_target_is_met_and_direct_is_lower() -> None:
    recipe = magnitude(
        sparsity_init=0.98,
        weight_importance="random",
        layerwise_allocation="uniform",
        sparsity_target_type="effective",
    )
    ctrl, _ = compress.create_compressed_model(lenet(), recipe, torch.zeros(1, 64))
    model = ctrl.statistics().to_dict()["model"]
    assert model["effective sparsity of compressed layers"] == pytest.approx(0.98, abs=2e-4)
    assert model["sparsity of compressed layers"] < 0.975


def test_statistics_report_effective_sparsity_of_a_disconnected_net() -> None:
    net = lenet()
    with torch.no_grad():
        net[2].weight[:, :150] = 0  # half the first hidden layer reaches nothing
    ctrl, _ = compress.create_compressed_model(
        net, {"compression": {"algorithm": "const_sparsity"}}
    )
    model = ctrl.statistics().to_dict()["model"]
    direct = 150 * 100 / 50200
    assert model["sparsity of compressed layers"] == pytest.approx(direct)
    assert model["effective sparsity of compressed layers"] == pytest.approx(
        (150 * 100 + 150 * 64) / 50200
    )


def test_block_shape_prunes_whole_blocks() -> None:
    recipe = magnitude(sparsity_init=0.75, block_shape=[4, 4], sparsity_level_setting_mode="local")
    ctrl, net = compress.create_compressed_model(lenet(), recipe)
    w = compress.masks.effective(net[2])  # 100x300: 25x75 blocks of 4x4
    blocks = (w != 0).reshape(25, 4, 75, 4).permute(0, 2, 1, 3).reshape(25 * 75, 16)
    assert torch.all(blocks.all(1) | ~blocks.any(1))  # every block all kept or all pruned
    assert int((~blocks.any(1)).sum()) == round(0.75 * 25 * 75)
