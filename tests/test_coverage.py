"""No silent no-op: what filter pruning can reach, why groups stay whole, rounding by group."""

from __future__ import annotations

import pytest
import torch
from conftest import ConvBNNet, SmallCNN
from timm_like import TimmLikeNet

import compress
from compress.pruning.structured import round_keep


def _build(
    model: torch.nn.Module, x: torch.Tensor, init: float = 0.5, **params: object
) -> compress.CompressionController:
    recipe = {"algorithm": "filter_pruning", "pruning_init": init, "params": params}
    ctrl, _ = compress.create_compressed_model(model, {"compression": recipe}, x)
    return ctrl


def test_options_that_exclude_every_group_warn_naming_the_flags() -> None:
    # NNCF 2.17 builds such a recipe and trains unpruned; so does this, with a warning
    x = torch.randn(1, 3, 8, 8)
    with pytest.warns(
        UserWarning,
        match=r"prune nothing.*set prune_first_conv: true or prune_downsample_convs: true",
    ):
        ctrl = _build(SmallCNN(), x)
    assert ctrl.algorithms[0].groups == []


def test_rounding_that_keeps_every_channel_is_reported() -> None:
    x = torch.randn(1, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"conv1 \(rounding: a smaller round_to would include"):
        ctrl = _build(ConvBNNet(), x, prune_first_conv=True, round_to=8)
    stats = ctrl.algorithms[0].statistics()
    assert stats["rounded whole"] == ["conv1"]  # 8 channels at 0.5 round back up to 8
    rows = [(r["group"], r["excluded because"]) for r in stats["excluded"]]
    assert ("conv1", "rounding") in rows
    assert "Groups of coupled channels left whole" in str(ctrl.statistics())
    with pytest.warns(UserWarning, match="set a smaller round_to"):
        # at a 0.2 target, 8 -> 6.4 and 16 -> 12.8 both round up to every channel (NNCF 2.17
        # builds it and prunes nothing)
        ctrl = _build(ConvBNNet(), x, 0.0, prune_first_conv=True, round_to=8, pruning_target=0.2)
    ctrl.scheduler.epoch_step()
    assert all(bool(k.all()) for k in ctrl.algorithms[0].keep.values())


def test_round_to_counts_the_channels_a_grouped_conv_channel_stands_for() -> None:
    x = torch.randn(1, 3, 16, 16)
    ctrl = _build(TimmLikeNet(), x, round_to=8)  # NNCF's default
    algo = ctrl.algorithms[0]
    grouped = next(g for g in algo.groups if g.name == "s1.conv1")
    # s1.conv2 has 4 conv groups of width 8: one group channel is 4 layer channels, so keeping
    # 4 of 8 keeps 16 channels, a multiple of 8; rounding in group channels would keep all 8.
    assert (grouped.size, grouped.unit) == (8, 4)
    assert int(algo.keep["s1.conv1"].sum()) == 4
    assert round_keep(8, 4, 8) == 8
    small = ctrl.strip()
    assert small.s1.conv2.out_channels == 16


def test_statistics_say_what_share_is_removable() -> None:
    x = torch.randn(1, 3, 8, 8)
    ctrl = _build(ConvBNNet(), x, prune_first_conv=True, round_to=1)
    stats = ctrl.algorithms[0].statistics()
    assert 0.0 < stats["prunable params share"] < 1.0
    assert 0.0 < stats["prunable MACs share"] < 1.0
    assert "Removable at most" in str(ctrl.statistics())


class CacheOut(torch.nn.Module):
    """Returns, beside its output, a cache holding the hidden channels (as a decoder's key/value
    cache does): every channel group reaches a network output."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)
        self.register_buffer("past", torch.zeros(2, 3, 16))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.a(x)
        return self.b(h), torch.cat([self.past, h[:, None]], dim=1)


def test_a_model_with_nothing_prunable_is_told_why() -> None:
    recipe = {"compression": {"algorithm": "filter_pruning", "pruning_init": 0.5}}
    with pytest.warns(
        UserWarning,
        match=r"at most 0\.0% of the model's MACs .* 2 groups stay whole \(2 network output\): "
        r"a \(network output: its channels are network outputs\)",
    ):
        compress.create_compressed_model(CacheOut(), recipe, torch.randn(2, 8))
