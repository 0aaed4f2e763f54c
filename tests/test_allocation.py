"""Layerwise allocations against numbers worked out by hand from each formula."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch

from compress.errors import ConfigError
from compress.sparsity.allocation import ALLOCATIONS, allocate, lamp_scores, slamp_scores

SHAPES = [(100, 10), (10, 10)]  # n = 1000 and 100 weights, N = 1100
LENET = [(300, 784), (100, 300), (10, 100)]


def pruned(shapes: Sequence[tuple[int, ...]], sparsities: list[float]) -> float:
    return sum(s * math.prod(shape) for s, shape in zip(sparsities, shapes, strict=True))


def test_registry_names() -> None:
    assert sorted(ALLOCATIONS) == ["erk", "igq", "lamp", "uniform"]


def test_uniform() -> None:
    assert allocate("uniform", SHAPES, 0.5) == [0.5, 0.5]


def test_erk_by_hand() -> None:
    # raw density (sum of dims / product): 110 / 1000 = 0.11 and 20 / 100 = 0.2.
    # eps * (0.11 * 1000 + 0.2 * 100) = (1 - 0.5) * 1100  ->  eps = 550 / 130.
    eps = 550 / 130
    expected = [1 - 0.11 * eps, 1 - 0.2 * eps]  # [69.5 / 130, 20 / 130]
    assert allocate("erk", SHAPES, 0.5) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx([0.534615, 0.153846], abs=1e-6)


def test_erk_conv_uses_kernel_dims() -> None:
    shapes = [(16, 3, 3, 3), (10, 16)]  # 432 and 160 weights
    # raw: (16 + 3 + 3 + 3) / 432 = 25 / 432 and (10 + 16) / 160 = 26 / 160.
    # eps * (25 + 26) = 0.5 * 592  ->  eps = 296 / 51.
    eps = 296 / 51
    expected = [1 - 25 / 432 * eps, 1 - 26 / 160 * eps]
    assert allocate("erk", shapes, 0.5) == pytest.approx(expected, abs=1e-12)


def test_erk_caps_density_at_one_and_resolves() -> None:
    # At 0.2: eps = 880 / 130 gives layer 2 density 0.2 * 880 / 130 = 1.35 > 1, so it is dense.
    # Re-solved: eps * 0.11 * 1000 = 0.8 * 1000 - 0.2 * 100 = 780  ->  layer 1 density 0.78.
    assert allocate("erk", SHAPES, 0.2) == pytest.approx([0.22, 0.0], abs=1e-12)
    assert pruned(SHAPES, allocate("erk", SHAPES, 0.2)) == pytest.approx(0.2 * 1100)


def test_igq_by_hand() -> None:
    # Solve 1000 / (1 + 1000 F) + 100 / (1 + 100 F) = 550. Clearing denominators:
    # 1100 + 200000 F = 550 (1 + 1100 F + 100000 F^2)  ->  55e6 F^2 + 405000 F - 550 = 0.
    a, b, c = 55e6, 405000.0, -550.0
    force = (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)
    expected = [force * n / (1 + force * n) for n in (1000, 100)]
    assert allocate("igq", SHAPES, 0.5) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx([0.539513, 0.104874], abs=1e-6)


def test_igq_single_layer_and_ordering() -> None:
    assert allocate("igq", [(30, 20)], 0.7) == pytest.approx([0.7], abs=1e-12)
    sparsities = allocate("igq", LENET, 0.98)
    assert sparsities[0] > sparsities[1] > sparsities[2]  # larger cylinders compress more


def test_lamp_scores_by_hand() -> None:
    # Ascending squares 0, 1, 4, 9; tail sums 14, 14, 13, 9.
    scores = lamp_scores(torch.tensor([[2.0, -3.0], [1.0, 0.0]]))
    assert scores.shape == (2, 2) and scores.dtype == torch.float32
    assert scores.flatten().tolist() == pytest.approx([4 / 13, 1.0, 1 / 14, 0.0], abs=1e-7)


def test_lamp_allocation_by_hand() -> None:
    # Layer A [1, 2, 3] scores 1/14, 4/13, 1; layer B [10, 20] scores 100/500 = 0.2, 1.
    # Pruning round(0.4 * 5) = 2 lowest: 1/14 (A) and 0.2 (B). Global magnitude would have
    # pruned 1 and 2, both in A.
    weights = [torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[10.0, 20.0]])]
    assert allocate("lamp", [(1, 3), (1, 2)], 0.4, weights=weights) == [1 / 3, 1 / 2]


@pytest.mark.parametrize("method", ["uniform", "erk", "igq", "lamp"])
@pytest.mark.parametrize("target", [0.0, 0.5, 0.9, 0.99])
def test_total_pruned_equals_target(method: str, target: float) -> None:
    torch.manual_seed(0)
    weights = [torch.randn(shape) for shape in LENET]
    sparsities = allocate(method, LENET, target, weights=weights)
    total = sum(math.prod(shape) for shape in LENET)
    assert all(0.0 <= s < 1.0 for s in sparsities)
    if method == "lamp":
        assert pruned(LENET, sparsities) == pytest.approx(round(target * total), abs=1e-6)
    else:
        assert pruned(LENET, sparsities) == pytest.approx(target * total, abs=1e-6)


def test_slamp_on_a_toy_vector() -> None:
    # Ascending 1 (channel 1), 2 (channel 2), 3 (channel 0): 1/14, 4/13, 9/9.
    assert slamp_scores(torch.tensor([3.0, 1.0, 2.0])).tolist() == pytest.approx(
        [1.0, 1 / 14, 4 / 13], abs=1e-7
    )
    with pytest.raises(ValueError, match="1-D"):
        slamp_scores(torch.ones(2, 2))


def test_bad_arguments_name_what_is_allowed() -> None:
    with pytest.raises(ConfigError, match=r"'foo' is not one of \['erk', 'igq', 'lamp'"):
        allocate("foo", SHAPES, 0.5)
    with pytest.raises(ConfigError, match="'global' is a magnitude-threshold mode"):
        allocate("global", SHAPES, 0.5)
    with pytest.raises(ConfigError, match=r"target 1.0 is not in \[0, 1\)"):
        allocate("erk", SHAPES, 1.0)
    with pytest.raises(ConfigError, match="needs the layers' weights"):
        allocate("lamp", SHAPES, 0.5)
    with pytest.raises(ConfigError, match="weights have shapes"):
        allocate("lamp", SHAPES, 0.5, weights=[torch.ones(2, 2), torch.ones(10, 10)])
