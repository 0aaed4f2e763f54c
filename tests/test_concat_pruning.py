"""Filter pruning of concatenation models: DenseNet (every layer's output concatenated into the
inputs of all later layers, transitions, a classifier after the last concat) and Inception
(parallel branches concatenated, a branch that splits into two concatenated convs, as in
Inception v3), rebuilt from torchvision's layer lists at a small width: torchvision cannot be
imported beside the CPU torch of the test environment.

Strip removed the right channels from the classifier only by chance before: every group's
positions in the classifier were those of the full model, while earlier groups had already
shrunk it (``mat1 and mat2 shapes cannot be multiplied`` on densenet121).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import compress


def conv_bn(cin: int, cout: int, k: int = 1, **kw: int) -> nn.Sequential:
    """torchvision's BasicConv2d (GoogLeNet, Inception v3)."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, bias=False, **kw), nn.BatchNorm2d(cout, eps=0.001), nn.ReLU()
    )


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.norm1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU()
        self.conv1 = nn.Conv2d(cin, 2 * growth, 1, bias=False)
        self.norm2, self.relu2 = nn.BatchNorm2d(2 * growth), nn.ReLU()
        self.conv2 = nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, 1)
        x = self.conv1(self.relu1(self.norm1(x)))
        return self.conv2(self.relu2(self.norm2(x)))


class DenseBlock(nn.ModuleDict):
    def __init__(self, layers: int, cin: int, growth: int) -> None:
        super().__init__()
        for i in range(layers):
            self[f"denselayer{i + 1}"] = DenseLayer(cin + i * growth, growth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class DenseNet(nn.Module):
    """torchvision.models.densenet.DenseNet at growth 8, blocks (3, 3), 16 initial features."""

    def __init__(self, growth: int = 8, classes: int = 10) -> None:
        super().__init__()
        width, layers = 16, []
        layers += [nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        for i, n in enumerate((3, 3)):
            layers.append(DenseBlock(n, width, growth))
            width += n * growth
            if i == 0:
                layers += [nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, width // 2, 1)]
                layers.append(nn.AvgPool2d(2))
                width //= 2
        layers.append(nn.BatchNorm2d(width))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.features(x))
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


class Inception(nn.Module):
    """GoogLeNet's four branches, with Inception v3's 3x3 branch that splits into a 1x3 and a
    3x1 conv concatenated."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch1 = conv_bn(cin, 8)
        self.branch2 = nn.Sequential(conv_bn(cin, 8), conv_bn(8, 12, 3, padding=1))
        self.branch3_1 = conv_bn(cin, 8)
        self.branch3_2a = conv_bn(8, 6, 1)  # (1, 3) in Inception v3; 1x1 keeps it small
        self.branch3_2b = conv_bn(8, 6, 3, padding=1)
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(cin, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3_1(x)
        b3 = torch.cat([self.branch3_2a(b3), self.branch3_2b(b3)], 1)
        return torch.cat([self.branch1(x), self.branch2(x), b3, self.branch4(x)], 1)


class InceptionNet(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = conv_bn(3, 16, 3, padding=1)
        self.inception3a = Inception(16)
        self.inception3b = Inception(36)
        self.fc = nn.Linear(36, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inception3b(self.inception3a(self.conv1(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


@pytest.mark.parametrize("make", [DenseNet, InceptionNet], ids=["densenet", "inception"])
def test_filter_pruning_half_of_a_concat_model_strips_to_the_masked_model(
    make: type[nn.Module],
) -> None:
    torch.manual_seed(0)
    net = make()
    with torch.no_grad():  # norms that are not the identity, so a misplaced channel shows
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 16, 16)
    recipe = {"algorithm": "filter_pruning", "pruning_init": 0.5, "params": {"round_to": 1}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the first conv stays whole, as NNCF keeps it
        ctrl, net = compress.create_compressed_model(net, {"compression": recipe}, x)
    algo = ctrl.algorithms[0]
    assert len(algo.groups) >= 8  # every conv before a concat is its own group
    pruned = [n for n, k in algo.keep.items() if not k.all()]
    assert len(pruned) == len(algo.groups)  # half of every group goes
    net.eval()
    with torch.no_grad():
        want = net(x)
    plain = ctrl.strip().eval()
    head = plain.classifier if make is DenseNet else plain.fc
    assert head.in_features < (28 if make is DenseNet else 36)
    with torch.no_grad():
        got = plain(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    before = sum(p.numel() for p in make().parameters())
    assert sum(p.numel() for p in plain.parameters()) < 0.6 * before


def test_groups_that_match_alone_but_not_together_are_all_left_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from compress.pruning import exactness
    from compress.pruning.channel_groups import build_groups

    net, x = DenseNet(), torch.randn(2, 3, 16, 16)
    groups = build_groups(net, x, validate=False)
    real = exactness._matches

    def together_only(model, dg, some, keep, inputs):  # type: ignore[no-untyped-def]
        if len(some) > 1:
            return "the shrunk model fails (forced)"
        return real(model, dg, some, keep, inputs)

    monkeypatch.setattr(exactness, "_matches", together_only)
    problems: list[str] = []
    assert exactness.exact_groups(net, groups, x, problems) == []
    assert len(problems) == len(groups)
    assert problems[0] == (
        f"group {groups[0].name!r}: pruned with the other groups, the shrunk model fails (forced)"
    )
