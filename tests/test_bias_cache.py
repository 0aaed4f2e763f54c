"""Models that cache results of operations beside their weights (LeViT's and EfficientFormer's
attention-bias cache, filled by any eval-mode forward pass with autograd on, as Torch-Pruning's
trace runs) are copied for analysis and strip: the cached tensors have autograd history, which
``copy.deepcopy`` refuses. timm cannot be imported beside the CPU torch of the tests; the cache
is rebuilt from ``timm.models.levit.Attention.get_attention_biases``."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import compress


class BiasCacheBlock(nn.Module):
    def __init__(self, dim: int = 16, tokens: int = 4) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.attention_biases = nn.Parameter(torch.randn(tokens, dim))
        self.register_buffer("attention_bias_idxs", torch.arange(tokens).flip(0), persistent=False)
        self.attention_bias_cache: dict[str, torch.Tensor] = {}

    def get_attention_biases(self, device: torch.device) -> torch.Tensor:
        if self.training:
            return self.attention_biases[self.attention_bias_idxs]
        key = str(device)
        if key not in self.attention_bias_cache:
            self.attention_bias_cache[key] = self.attention_biases[self.attention_bias_idxs]
        return self.attention_bias_cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.get_attention_biases(x.device)
        return x + self.fc2(torch.relu(self.fc1(x)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.block, self.head = nn.Linear(8, 16), BiasCacheBlock(), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.embed(x)).mean(1))


@pytest.mark.parametrize(
    "recipe",
    [
        {"algorithm": "filter_pruning", "pruning_init": 0.5, "params": {"round_to": 1}},
        {"algorithm": "magnitude_sparsity", "sparsity_init": 0.5},
    ],
    ids=["filter_pruning", "magnitude"],
)
def test_a_model_with_a_cache_of_non_leaf_tensors_compresses_and_strips(recipe: dict) -> None:
    torch.manual_seed(0)
    net, x = Net().eval(), torch.randn(2, 4, 8)
    net(x)  # fills the cache with a tensor that has autograd history
    assert net.block.attention_bias_cache["cpu"].grad_fn is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctrl, net = compress.create_compressed_model(net, {"compression": recipe}, x)
    with torch.no_grad():
        want = net(x)
    plain = ctrl.strip().eval()
    if recipe["algorithm"] == "filter_pruning":
        assert plain.block.fc1.out_features < 32
    with torch.no_grad():
        torch.testing.assert_close(plain(x), want, rtol=1e-4, atol=1e-5)
