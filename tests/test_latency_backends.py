"""latency_backend: the layer calls of a latency table rebuilt in ONNX Runtime and OpenVINO
compute what the PyTorch layers compute, and the table of a recipe with the key is measured
there (timings are never compared: the machine is shared)."""

from __future__ import annotations

import functools
import sys
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import compress
from compress.errors import ConfigError
from compress.pruning import latency, latency_widths
from compress.pruning.channel_groups import build_groups
from compress.pruning.latency_backends import runtime_call

pytestmark = pytest.mark.usefixtures("one_thread")


def _transformers_conv1d() -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    return Conv1D(6, 5)  # 5 inputs, 6 outputs, weight stored (in, out)


LAYERS = {
    "conv": (lambda: nn.Conv2d(3, 8, 3, stride=2, padding=1), (2, 3, 9, 9)),
    "conv dilated, no bias": (lambda: nn.Conv2d(4, 6, 3, dilation=2, bias=False), (1, 4, 9, 9)),
    "conv same": (lambda: nn.Conv2d(4, 6, (3, 5), padding="same"), (1, 4, 7, 7)),
    "depthwise": (lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8), (2, 8, 6, 6)),
    "grouped": (lambda: nn.Conv2d(8, 4, 1, groups=2), (2, 8, 6, 6)),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3), (2, 4, 10)),
    "linear": (lambda: nn.Linear(5, 7), (3, 4, 5)),
    "linear, no bias": (lambda: nn.Linear(5, 7, bias=False), (3, 5)),
    "transformers Conv1D": (_transformers_conv1d, (2, 3, 5)),
}


def _first(out: Any) -> np.ndarray:
    return np.asarray(out[0] if isinstance(out, list) else next(iter(out.values())))


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_a_layer_rebuilt_in_the_runtime_computes_the_same(backend: str, kind: str) -> None:
    if backend == "openvino":
        pytest.importorskip("openvino")
    build, shape = LAYERS[kind]
    layer = build().eval()
    x = torch.randn(shape)
    call = functools.partial(layer, x)
    with torch.no_grad():
        want = call()
    got = torch.from_numpy(_first(runtime_call(backend, call)()))  # type: ignore[arg-type]
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.bn(self.conv1(x)))))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_the_table_is_timed_in_the_runtime(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if backend == "openvino":
        pytest.importorskip("openvino")
    model, x = Net().eval(), torch.randn(2, 3, 8, 8)
    groups = build_groups(model, x, prune_first_conv=True)
    timed: list[object] = []

    def record(fn: Any, **kw: Any) -> float:
        timed.append(fn)
        return 1e-3

    monkeypatch.setattr(latency, "time_call", record)
    table = latency.measure_table(model, groups, (x,), rounds=2, backend=backend)
    assert table["backend"] == backend
    # every call timed is the runtime's (a closure over its session), none a PyTorch module,
    # but the first: one eager call of the whole model that sets how long a sample lasts
    probe, *timed = timed
    assert isinstance(probe, functools.partial) and table["sample_ms"] == 2.0
    assert timed and not any(isinstance(fn, functools.partial) for fn in timed)
    layers = table["layers"]
    n_jobs = sum(
        1 + sum(len(table["groups"][c["group"]]["widths"]) - 1 for c in [e["out"], *e["in"]] if c)
        for e in layers.values()
    )
    assert len(timed) == 2 * (n_jobs + 1)  # per round: the whole model and every job
    # the rest is what the whole model takes beyond its layers (here 1 ms each)
    assert table["model_ms"] == 1.0
    assert table["rest_ms"] == max(0.0, 1.0 - sum(e["ms"] for e in layers.values()))


def test_the_recipe_key_picks_the_runtime_and_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("openvino")
    model, x = Net(), torch.randn(2, 3, 8, 8)
    params = {
        "pruning_latency_target": 0.3,
        "prune_first_conv": True,
        "round_to": 1,
        "latency_backend": "openvino",
    }
    recipe = {"compression": {"algorithm": "filter_pruning", "params": params}}
    monkeypatch.setattr(latency, "time_call", lambda fn, **kw: 1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctrl, _ = compress.create_compressed_model(model, recipe, x)
    assert ctrl.algorithms[0].latency()["backend"] == "openvino"
    bad = {
        "compression": {
            "algorithm": "filter_pruning",
            "params": {**params, "latency_backend": "tvm"},
        }
    }
    with pytest.raises(ConfigError, match="latency_backend"):
        compress.create_compressed_model(Net(), bad, x)
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(ConfigError, match=r"pip install lightning-compress\[openvino\]"):
        latency.measure_table(model, [], (x,), backend="openvino")


def test_a_layer_no_group_touches_is_timed_and_stays_whole() -> None:
    """The first conv is not prunable by default: it is in the table at full width, and the
    narrowest widths cannot remove its time (the prediction once let the rest absorb it)."""
    model, x = Net().eval(), torch.randn(2, 3, 8, 8)
    groups = build_groups(model, x)
    assert "conv1" not in [g.name for g in groups]
    table = latency.measure_table(model, groups, (x,), timer=latency.layer_macs_timer)
    conv1 = table["layers"]["conv1"]
    ms = pytest.approx(2 * 16 * 64 * 27 * 1e-9 * 1e3)
    assert conv1 == {"ms": ms, "spread": 0.0, "out": None, "in": []}
    narrowest = {g: info["widths"][0] for g, info in table["groups"].items()}
    assert latency_widths.predicted_ms(table, narrowest) >= conv1["ms"]
