"""Small models built from the layer types timm uses (timm itself needs torchvision, which does
not import beside this torch): a norm-act module that reads its weight in ``forward``, a Linear
subclass, grouped convs of group width 8 and squeeze-excite."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm then an activation in one module, as timm's: ``forward`` reads ``self.weight``."""

    def __init__(self, num_features: int, act: bool = True) -> None:
        super().__init__(num_features)
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training,
            self.momentum or 0.0,
            self.eps,
        )
        return self.act(x)


class Linear(nn.Linear):
    """timm's Linear: a subclass whose ``forward`` calls ``F.linear`` on its own weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced, 1)
        self.conv_expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        s = self.conv_expand(torch.relu(self.conv_reduce(s)))
        return x * torch.sigmoid(s)


class RegBlock(nn.Module):
    """RegNet's bottleneck: 1x1, grouped 3x3 of group width 8, squeeze-excite, 1x1, residual."""

    def __init__(self, cin: int, cout: int, stride: int, group_width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn1 = BatchNormAct2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride, 1, groups=cout // group_width, bias=False)
        self.bn2 = BatchNormAct2d(cout)
        self.se = SqueezeExcite(cout, cout // 4)
        self.conv3 = nn.Conv2d(cout, cout, 1, bias=False)
        self.bn3 = BatchNormAct2d(cout, act=False)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), BatchNormAct2d(cout, act=False)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn3(self.conv3(self.se(self.bn2(self.conv2(self.bn1(self.conv1(x)))))))
        return torch.relu(y + self.downsample(x))


class TimmLikeNet(nn.Module):
    """A stem, two RegNet-style stages and a timm ``Linear`` head: 3x16x16 in, 10 classes out."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 2, 1, bias=False)
        self.stem_bn = BatchNormAct2d(16)
        self.s1 = RegBlock(16, width, 1)
        self.s2 = RegBlock(width, width, 1)
        self.head = Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.s2(self.s1(self.stem_bn(self.stem(x))))
        return self.head(x.mean((2, 3)))
