"""ShuffleNetV2's units (torchvision's ``InvertedResidual``, rebuilt here: torchvision cannot be
imported beside the CPU torch of the test environment): a channel split, a concat and a channel
shuffle. Torch-Pruning cannot trace it (``ZeroDivisionError`` in its reshape index mapping), so
filter pruning prunes nothing, and says why at build and again at ``strip()``."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import compress


def channel_shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    b, c, h, w = x.size()
    x = torch.transpose(x.view(b, groups, c // groups, h, w), 1, 2).contiguous()
    return x.view(b, -1, h, w)


def _branch(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
        nn.Conv2d(cout, cout, 3, stride, 1, groups=cout, bias=False),
        nn.BatchNorm2d(cout),
        nn.Conv2d(cout, cout, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class Unit(nn.Module):
    """torchvision's ``InvertedResidual``."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride, half = stride, cout // 2
        self.branch1 = nn.Sequential()
        if stride > 1:
            self.branch1 = nn.Sequential(
                nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
                nn.BatchNorm2d(cin),
                nn.Conv2d(cin, half, 1, bias=False),
                nn.BatchNorm2d(half),
                nn.ReLU(),
            )
        self.branch2 = _branch(cin if stride > 1 else half, half, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class TinyShuffleNet(nn.Module):
    """One stage of ShuffleNetV2: a stride-2 unit, then stride-1 units (two are enough)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8))
        self.stage2 = nn.Sequential(Unit(8, 16, 2), Unit(16, 16, 1), Unit(16, 16, 1))
        self.conv5 = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32))
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv5(self.stage2(self.conv1(x))).mean((2, 3)))


def test_a_channel_shuffle_torch_pruning_cannot_trace_is_named_at_build_and_strip() -> None:
    torch.manual_seed(0)
    net, x = TinyShuffleNet(), torch.randn(2, 3, 16, 16)
    params = sum(p.numel() for p in net.parameters())
    recipe = {"algorithm": "filter_pruning", "pruning_init": 0.5}
    with pytest.warns(
        UserWarning, match=r"could not trace TinyShuffleNet \(ZeroDivisionError.*channel shuffle"
    ):
        ctrl, net = compress.create_compressed_model(net, {"compression": recipe}, x)
    with pytest.warns(UserWarning) as record:
        small = ctrl.strip()
    said = [str(w.message) for w in record]
    assert len(said) == 1
    assert said[0].startswith("strip(): filter pruning removed nothing")
    assert "ZeroDivisionError" in said[0] and "channel shuffle" in said[0]
    assert sum(p.numel() for p in small.parameters()) == params


def test_a_sparsity_algorithm_compresses_the_shufflenet() -> None:
    net, x = TinyShuffleNet(), torch.randn(2, 3, 16, 16)
    recipe = {"algorithm": "magnitude_sparsity", "sparsity_init": 0.5}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ctrl, net = compress.create_compressed_model(net, {"compression": recipe}, x)
        ctrl.strip()
    sparsity = ctrl.statistics().to_dict()["model"]["sparsity of compressed layers"]
    assert sparsity == pytest.approx(0.5, abs=0.01)
