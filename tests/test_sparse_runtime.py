"""to_sparse_runtime: outputs equal the dense model's, and conversion follows the timings.

Timings are injected (``fn.func`` tells the dense layer from its sparse replacement), so every
conversion decision here is deterministic; no test depends on how fast this machine is.
"""

from __future__ import annotations

import copy
import io
import json
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from compress.deploy.sparse_layers import SparseConv1x1, SparseLinear
from compress.deploy.sparse_runtime import (
    RuntimeReport,
    median_timer,
    report_from_dict,
    to_sparse_runtime,
)
from compress.errors import ConfigError
from compress.sparsity.importance import block_scores

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
SPARSE = (SparseLinear, SparseConv1x1)


def timer_with(dense_s: float, sparse_s: float) -> Callable[[Callable[[], object]], float]:
    """A timer that reports fixed seconds for dense layers and for their sparse replacements."""

    def timer(fn: Callable[[], object]) -> float:
        return sparse_s if isinstance(fn.func, SPARSE) else dense_s  # type: ignore[attr-defined]

    return timer


SPARSE_FAST = timer_with(dense_s=1.0, sparse_s=0.25)
SPARSE_SLOW = timer_with(dense_s=1.0, sparse_s=2.0)


def magnitude_prune_(model: nn.Module, sparsity: float) -> None:
    """Zero the smallest-magnitude fraction ``sparsity`` of every Linear/Conv2d weight."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                k = int(sparsity * m.weight.numel())
                threshold = m.weight.abs().flatten().kthvalue(k).values
                m.weight[m.weight.abs() <= threshold] = 0


def assert_close_to(got: torch.Tensor, expected: torch.Tensor) -> None:
    scale = float(expected.abs().max())
    assert scale > 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * scale)


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 96), nn.Linear(96, 10))


def convnet() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, 32, 1), nn.ReLU(), nn.Conv2d(32, 16, 1, bias=False))


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.98])
def test_linear_outputs_equal_dense_at_any_batch_and_leading_dims(sparsity: float) -> None:
    model = mlp()
    magnitude_prune_(model, sparsity)
    fast = to_sparse_runtime(model, torch.randn(4, 64), min_speedup=0, timer=SPARSE_FAST)

    assert [type(fast[i]) for i in (0, 2, 3)] == [SparseLinear] * 3
    stored = fast[0].values.numel() / model[0].weight.numel()
    assert stored == pytest.approx(1 - sparsity, abs=0.01)
    with torch.no_grad():
        for x in (torch.randn(1, 64), torch.randn(33, 64), torch.randn(3, 7, 64), torch.randn(64)):
            out = fast(x)
            assert out.is_contiguous()
            assert_close_to(out, model(x))


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.98])
def test_conv1x1_outputs_equal_dense(sparsity: float) -> None:
    model = convnet()
    magnitude_prune_(model, sparsity)
    fast = to_sparse_runtime(model, torch.randn(2, 8, 5, 5), min_speedup=0, timer=SPARSE_FAST)

    assert type(fast[0]) is SparseConv1x1 and type(fast[2]) is SparseConv1x1
    with torch.no_grad():
        for x in (torch.randn(1, 8, 6, 3), torch.randn(5, 8, 4, 4), torch.randn(8, 3, 3)):
            assert_close_to(fast(x), model(x))


def test_fallback_keeps_a_layer_dense_when_sparse_is_slower() -> None:
    model = mlp()
    magnitude_prune_(model, 0.9)
    slow = to_sparse_runtime(model, torch.randn(4, 64), timer=SPARSE_SLOW)

    assert [type(slow[i]) for i in (0, 2, 3)] == [nn.Linear] * 3
    report = slow.runtime_report
    assert report.converted == []
    assert [layer.speedup for layer in report.layers] == [0.5, 0.5, 0.5]
    assert all("below 1.1" in layer.reason for layer in report.layers)


@pytest.mark.parametrize(("dense_s", "converted"), [(1.05, False), (1.1, True), (3.0, True)])
def test_min_speedup_is_the_threshold(dense_s: float, converted: bool) -> None:
    model = nn.Linear(32, 16)
    fast = to_sparse_runtime(model, torch.randn(2, 32), timer=timer_with(dense_s, 1.0))
    assert isinstance(fast, SparseLinear) is converted
    assert fast.runtime_report.layers[0].speedup == pytest.approx(dense_s)


def test_report_names_flags_and_round_trip() -> None:
    model = mlp()
    magnitude_prune_(model, 0.9)
    model[3] = nn.Linear(96, 10)  # left fully dense
    calls: list[str] = []

    def timer(fn: Callable[[], object]) -> float:
        calls.append(type(fn.func).__name__)  # type: ignore[attr-defined]
        # Sparse is 4x faster on the two big layers only.
        if isinstance(fn.func, SparseLinear):  # type: ignore[attr-defined]
            return 0.25 if fn.func.out_features > 10 else 2.0  # type: ignore[attr-defined]
        return 1.0

    fast = to_sparse_runtime(model, torch.randn(4, 64), timer=timer)
    report = fast.runtime_report

    assert isinstance(report, RuntimeReport)
    assert [layer.name for layer in report.layers] == ["0", "2", "3"]
    assert [layer.converted for layer in report.layers] == [True, True, False]
    assert report.converted == ["0", "2"]
    assert [layer.shape for layer in report.layers] == [(128, 64), (96, 128), (10, 96)]
    assert [layer.kind for layer in report.layers] == ["linear"] * 3
    assert [layer.layout for layer in report.layers] == ["csr", "csr", "dense"]
    assert report.layers[0].sparsity == pytest.approx(0.9, abs=1e-3)
    assert report.layers[2].sparsity == 0.0
    assert [(layer.dense_ms, layer.sparse_ms) for layer in report.layers] == [
        (1000.0, 250.0),
        (1000.0, 250.0),
        (1000.0, 2000.0),
    ]
    # Unstructured weights have no BSR candidate: dense and CSR take turns, three rounds a layer;
    # then the dense and the converted model (and, with several threads, a copy whose kernels
    # run on one) take turns end to end, three rounds.
    ends = 3 if torch.get_num_threads() > 1 else 2
    assert calls == ["Linear", "SparseLinear"] * 3 * 3 + ["Sequential"] * ends * 3

    text = str(report)
    assert "| 0 | linear | 128x64 | 90.0% | 1000 | 250 | 4.00x | csr |" in text
    assert "2 of 3 candidate layers converted" in text
    again = report_from_dict(json.loads(json.dumps(report.to_dict())))
    assert again == report


def test_model_slower_end_to_end_stays_dense() -> None:
    model = mlp()
    magnitude_prune_(model, 0.9)

    def timer(fn: Callable[[], object]) -> float:
        target = fn.func  # type: ignore[attr-defined]
        if isinstance(target, SparseLinear):
            return 0.25  # every layer wins alone ...
        if any(isinstance(m, SparseLinear) for m in target.modules()):
            return 2.0  # ... but the converted model loses end to end
        return 1.0

    fast = to_sparse_runtime(model, torch.randn(4, 64), timer=timer)
    assert not any(isinstance(m, SparseLinear) for m in fast.modules())
    assert fast.runtime_report.converted == []
    assert {layer.reason for layer in fast.runtime_report.layers if layer.sparse_ms} == {
        "the converted model timed slower end to end"
    }
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(fast(x), model(x))


def test_report_from_dict_rejects_other_dicts() -> None:
    with pytest.raises(ConfigError, match="expected the output of RuntimeReport.to_dict"):
        report_from_dict({"layers": [{"name": "x"}]})


def test_unsupported_layers_are_left_alone() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1),  # 3x3
        nn.Conv2d(8, 8, 1, stride=2),  # strided 1x1
        nn.Conv2d(8, 8, 1, groups=2),  # grouped 1x1
        nn.Conv2d(8, 8, 1, padding=1),  # padded 1x1
        nn.Flatten(),
        nn.Linear(8 * 5 * 5, 5),
    )
    magnitude_prune_(model, 0.9)
    fast = to_sparse_runtime(model, torch.randn(2, 4, 6, 6), min_speedup=0, timer=SPARSE_FAST)

    assert [type(m) for m in fast[:4]] == [nn.Conv2d] * 4
    assert type(fast[5]) is SparseLinear
    assert [layer.name for layer in fast.runtime_report.layers] == ["5"]
    x = torch.randn(3, 4, 6, 6)
    with torch.no_grad():
        assert_close_to(fast(x), model(x))


def test_input_model_is_not_modified() -> None:
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.Linear(32, 4))
    magnitude_prune_(model, 0.9)
    model.train()
    before = copy.deepcopy(model.state_dict())

    fast = to_sparse_runtime(model, torch.randn(8, 16), min_speedup=0, timer=SPARSE_FAST)

    assert fast is not model
    assert [type(m) for m in model] == [nn.Linear, nn.BatchNorm1d, nn.Linear]
    assert not hasattr(model, "runtime_report")
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert model.training and fast.training and fast[1].training
    # Capturing activations ran in eval mode: the copy's BatchNorm statistics did not move.
    assert torch.equal(fast[1].running_mean, before["1.running_mean"])
    assert int(fast[1].num_batches_tracked) == 0


def test_layers_not_reached_or_masked_stay_dense() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(8, 8)
            self.unused = nn.Linear(8, 8)
            self.masked = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.masked(self.used(x))

    model = Branchy()
    # A mask applied by a hook, as compress.masks does before strip(): the raw weight is wrong.
    model.masked.register_forward_pre_hook(lambda m, args: (args[0] * 0.5,))
    fast = to_sparse_runtime(model, torch.randn(2, 8), min_speedup=0, timer=SPARSE_FAST)

    reasons = {layer.name: layer.reason for layer in fast.runtime_report.layers}
    assert fast.runtime_report.converted == ["used"]
    assert reasons["unused"] == "not reached by example_inputs"
    assert reasons["masked"].startswith("has hooks")
    assert type(fast.unused) is nn.Linear and type(fast.masked) is nn.Linear
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert_close_to(fast(x), model(x))


def test_block_pruned_weight_can_run_as_bsr() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    with torch.no_grad():
        scores = block_scores(layer.weight, (8, 8))
        keep = scores > scores.median()
        layer.weight *= keep.repeat_interleave(8, 0).repeat_interleave(8, 1)
    layouts: list[str] = []

    def bsr8_fastest(fn: Callable[[], object]) -> float:
        if isinstance(fn.func, SparseLinear):  # type: ignore[attr-defined]
            layouts.append(fn.func.layout)  # type: ignore[attr-defined]
            return 0.1 if fn.func.layout == "bsr8x8" else 0.5  # type: ignore[attr-defined]
        return 1.0

    fast = to_sparse_runtime(layer, torch.randn(3, 64), timer=bsr8_fastest)

    assert "csr" in layouts and "bsr4x4" in layouts and "bsr8x8" in layouts
    assert fast.runtime_report.layers[0].layout == "bsr8x8"
    assert fast.values.shape[1:] == (8, 8)
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert_close_to(fast(x), layer(x))


def test_block_scores_are_block_l2_norms_with_padded_edges() -> None:
    weight = torch.arange(15.0).reshape(3, 5)
    scores = block_scores(weight, (2, 2))
    assert scores.shape == (2, 3)
    torch.testing.assert_close(scores[0, 0], torch.tensor([0.0, 1, 5, 6]).norm())
    torch.testing.assert_close(scores[1, 2], torch.tensor(14.0))
    assert block_scores(torch.ones(4, 8, 1, 1), (4, 4)).tolist() == [[4.0, 4.0]]
    with pytest.raises(ConfigError, match="block_shape"):
        block_scores(weight, (0, 2))


def test_converted_model_copies_and_saves_as_plain_tensors() -> None:
    model = mlp()
    magnitude_prune_(model, 0.9)
    fast = to_sparse_runtime(model, torch.randn(4, 64), min_speedup=0, timer=SPARSE_FAST)
    buffer = io.BytesIO()
    torch.save(fast.state_dict(), buffer)
    buffer.seek(0)
    reloaded = copy.deepcopy(fast)
    reloaded.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(2, 64)
    with torch.no_grad():
        assert_close_to(reloaded(x), model(x))


def test_torch_prune_reparametrization_asks_to_remove_it_first() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    with pytest.raises(ConfigError, match="HINT: .*prune.remove"):
        to_sparse_runtime(model, torch.randn(1, 4))


def test_bad_arguments_name_the_argument() -> None:
    with pytest.raises(ConfigError, match="min_speedup=-1 is not allowed"):
        to_sparse_runtime(nn.Linear(2, 2), torch.randn(1, 2), min_speedup=-1)
    with pytest.raises(ConfigError, match="example_inputs must be a Tensor"):
        to_sparse_runtime(nn.Linear(2, 2), "x")  # type: ignore[arg-type]


def test_median_timer_returns_seconds_per_call() -> None:
    calls = []
    seconds = median_timer(lambda: calls.append(1), repeats=3)
    assert 0 < seconds < 1e-3
    assert len(calls) >= 2 + 3


def test_sparse_kernels_take_the_thread_count_that_times_faster_end_to_end() -> None:
    model = mlp()
    magnitude_prune_(model, 0.9)
    x = torch.randn(4, 64)

    def one_thread_faster(fn: Callable[[], object]) -> float:
        target = fn.func  # type: ignore[attr-defined]
        if isinstance(target, SparseLinear):
            return 0.25
        kernels = [m for m in target.modules() if isinstance(m, SparseLinear)]
        if not kernels:
            return 1.0
        return 0.3 if all(m.threads == 1 for m in kernels) else 0.6

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fast = to_sparse_runtime(model, x, timer=one_thread_faster)
        kernels = [m for m in fast.modules() if isinstance(m, SparseLinear)]
        assert fast.runtime_report.sparse_threads == 1 and len(kernels) == 3
        assert all(m.threads == 1 for m in kernels)
        with torch.no_grad():
            assert_close_to(fast(x), model(x))
        assert torch.get_num_threads() == 2  # restored after every kernel call
        assert "sparse kernels on 1 thread(s)" in str(fast.runtime_report)
        again = report_from_dict(json.loads(json.dumps(fast.runtime_report.to_dict())))
        assert again.sparse_threads == 1
        # All threads when one is not faster; a fixed count when given.
        fast = to_sparse_runtime(model, x, timer=SPARSE_FAST)
        assert fast.runtime_report.sparse_threads == 0
        fixed = to_sparse_runtime(model, x, timer=one_thread_faster, threads=1)
        assert fixed.runtime_report.sparse_threads == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ConfigError, match="threads=0 is not allowed"):
        to_sparse_runtime(model, x, threads=0)
