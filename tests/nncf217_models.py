"""Seeded models shared by tools/record_nncf.py (run beside NNCF 2.17) and the parity tests.

The class and attribute names matter: NNCF names graph nodes after them
(``LeNet300/NNCFLinear[fc1]/linear_0``), and the recorded scope tests use those names. Weights
come from a seeded CPU generator, not from each layer's default initialisation, so both sides
build the same tensors whatever torch version initialises modules differently.
"""

from __future__ import annotations

import torch
from torch import nn


class LeNet300(nn.Module):
    """LeNet-300-100 on flattened 28x28 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(x.flatten(1)))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


class PlainCNN(nn.Module):
    """Three conv-BatchNorm-ReLU stages (3 -> 16 -> 32 -> 64) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, stride=2)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1, stride=2)
        self.bn3 = nn.BatchNorm2d(64)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A small CIFAR-style ResNet: stem 16, stages of 16, 32, 64 channels with residual adds."""

    def __init__(self, blocks: tuple[int, int, int] = (1, 1, 1)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        cin = 16
        stages = []
        for width, stride, count in zip((16, 32, 64), (1, 2, 2), blocks):
            layers = []
            for i in range(count):
                layers.append(BasicBlock(cin, width, stride if i == 0 else 1))
                cin = width
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean((2, 3)))


class WideCNN(nn.Module):
    """Widths that are not multiples of 8 (12 -> 40 -> 100), so rounding kept filters matters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 40, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(40)
        self.conv3 = nn.Conv2d(40, 100, 3, padding=1, stride=2)
        self.bn3 = nn.BatchNorm2d(100)
        self.conv4 = nn.Conv2d(100, 20, 1)
        self.fc = nn.Linear(20, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        x = torch.relu(self.conv4(x))
        return self.fc(x.mean((2, 3)))


class NarrowCNN(nn.Module):
    """A first conv and one prunable conv 16 wide: a pruning target rounding keeps whole."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


MODELS: dict[str, tuple[type[nn.Module], tuple[int, ...]]] = {
    "lenet300": (LeNet300, (1, 1, 28, 28)),
    "plain_cnn": (PlainCNN, (1, 3, 32, 32)),
    "resnet": (ResNet, (1, 3, 32, 32)),
    "wide_cnn": (WideCNN, (1, 3, 16, 16)),
    "narrow_cnn": (NarrowCNN, (1, 3, 16, 16)),
}


def seeded(name: str, seed: int = 0, *, rounding: float | None = None) -> nn.Module:
    """The model ``name`` with every parameter and BatchNorm statistic drawn from ``seed``.

    ``rounding`` rounds weights to a multiple of it, making ties (what the threshold rules of
    magnitude sparsity disagree on).
    """
    cls, _ = MODELS[name]
    model = cls()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in sorted(model.named_parameters()):
            fan_in = p[0].numel() if p.dim() > 1 else p.numel()
            values = torch.randn(p.shape, generator=gen) / fan_in**0.5
            if pname.endswith("bias") and p.dim() == 1 and "bn" not in pname:
                values = values * 0.1
            if rounding:
                values = torch.round(values / rounding) * rounding
            p.copy_(values)
        for bname, b in sorted(model.named_buffers()):
            if bname.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=gen) + 0.5)
            elif bname.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
    return model


def example_input(name: str, seed: int = 0) -> torch.Tensor:
    """A seeded input batch of the model's example shape."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(MODELS[name][1], generator=gen)
