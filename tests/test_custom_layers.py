"""Models built from timm's layer types: analysis leaves them untouched, strip works after it."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from timm_like import TimmLikeNet

import compress
from compress.analysis.effective import active_weights
from compress.analysis.summary import layer_macs

X = torch.randn(2, 3, 16, 16)
ALGORITHMS: list[dict[str, Any]] = [
    {"algorithm": "magnitude_sparsity", "sparsity_init": 0.5},
    {"algorithm": "rb_sparsity", "sparsity_init": 0.5},
    {"algorithm": "const_sparsity"},
    {"algorithm": "filter_pruning", "pruning_init": 0.5, "params": {"round_to": 1}},
]


def _snapshot(model: torch.nn.Module) -> dict[str, tuple[set[str], set[str], set[str], bool]]:
    return {
        name: (set(m.__dict__), set(m._buffers), set(m._parameters), m.training)
        for name, m in model.named_modules()
    }


@pytest.mark.parametrize("algo", ALGORITHMS, ids=lambda a: a["algorithm"])
def test_statistics_leave_the_model_untouched_and_strip_works_after(algo: dict[str, Any]) -> None:
    torch.manual_seed(0)
    ctrl, model = compress.create_compressed_model(TimmLikeNet(), {"compression": algo}, X)
    before = _snapshot(model)
    stats = ctrl.statistics().to_dict()["model"]
    active_weights(model, X)
    layer_macs(model, (X,))
    assert _snapshot(model) == before  # fx leaves no _tensor_constant, no mode changes
    assert stats["MACs"] > 0
    small = ctrl.strip()
    model.eval()
    small.eval()
    torch.testing.assert_close(small(X), model(X), rtol=1e-5, atol=1e-5)


def test_effective_sparsity_sees_through_custom_linear_and_norm_act() -> None:
    model = TimmLikeNet()
    with torch.no_grad():
        model.s2.conv3.weight[3] = 0.0  # channel 3 of s2's branch is dead, the residual is not
        model.head.weight[:, 5] = 0.0  # channel 5 no longer reaches the output
    active = active_weights(model, X)
    assert set(active) >= {"head.weight", "s2.conv3.weight"}  # the Linear subclass is a layer
    # s2's last conv output channel 5 feeds only head column 5, now zero: its rows are idle.
    assert not active["s2.conv3.weight"][5].any()
    assert active["s2.conv3.weight"][4].all()
