"""Controller states from elsewhere: validated as a whole, applied as a whole or not at all."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import ConvBNNet, lenet

import compress
from compress.errors import CompressError

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))

RECIPES = {
    "magnitude_sparsity": {
        "algorithm": "magnitude_sparsity",
        "sparsity_init": 0.3,
        "params": {"sparsity_target": 0.81, "sparsity_target_epoch": 2, "sparsity_freeze_epoch": 2},
    },
    "rb_sparsity": {"algorithm": "rb_sparsity", "sparsity_init": 0.3},
    "const_sparsity": {"algorithm": "const_sparsity"},
}


def flat(state: Any) -> Any:
    """A state with its tensors as lists, for == comparison."""
    if isinstance(state, dict):
        return {k: flat(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return [flat(v) for v in state]
    return state.tolist() if isinstance(state, torch.Tensor) else state


@pytest.mark.parametrize("name", list(RECIPES))
def test_a_state_of_another_model_changes_nothing(name: str) -> None:
    recipe = {"compression": RECIPES[name]}
    other, _ = compress.create_compressed_model(lenet(48), recipe, torch.randn(2, 48))
    for _ in range(3):
        other.scheduler.epoch_step()  # frozen, at the target level
    ctrl, model = compress.create_compressed_model(ConvBNNet(), recipe, X)
    ctrl.scheduler.epoch_step()
    before = flat(ctrl.state_dict())
    with torch.no_grad():
        out = model(X)
    with pytest.raises(CompressError, match="does not fit this model"):
        ctrl.load_state_dict(other.state_dict())
    assert flat(ctrl.state_dict()) == before
    with torch.no_grad():
        assert torch.equal(model(X), out)


def test_masks_that_are_not_binary_are_refused_before_anything_is_applied() -> None:
    ctrl, _ = compress.create_compressed_model(
        ConvBNNet(), {"compression": RECIPES["magnitude_sparsity"]}, X
    )
    state = ctrl.state_dict()
    state["scheduler"]["epoch"] = 5
    state["state"]["magnitude_sparsity"]["masks"]["conv1"] = torch.full((8, 3, 3, 3), 7.0)
    before = flat(ctrl.state_dict())
    with pytest.raises(
        CompressError,
        match=r"magnitude_sparsity.masks\['conv1'\] holds values other than only 0 and 1",
    ):
        ctrl.load_state_dict(state)
    assert flat(ctrl.state_dict()) == before
    state = ctrl.state_dict()
    state["state"]["magnitude_sparsity"]["level"] = 3.0
    with pytest.raises(CompressError, match=r"magnitude_sparsity.level is 3.0, not in \[0, 1\]"):
        ctrl.load_state_dict(state)


# --- 7. no silent NaN ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["rb_sparsity", "const_sparsity", "filter_pruning"])
def test_strip_and_export_refuse_non_finite_weights_naming_the_layer(name: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    recipe = RECIPES.get(name, {"algorithm": name, "pruning_init": 0.25})
    ctrl, model = compress.create_compressed_model(ConvBNNet(), {"compression": recipe}, X)
    with torch.no_grad():
        model.conv2.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(CompressError, match=r"strip\(\): conv2.weight holds NaN or Inf"):
        ctrl.strip()
    plain = ConvBNNet()
    with torch.no_grad():
        plain.fc.bias[0] = float("inf")
    with pytest.raises(CompressError, match=r"export: fc.bias holds NaN or Inf"):
        compress.export(plain, tmp_path / "m", ["sparse"])
    assert not list(tmp_path.iterdir())


def test_models_the_masks_cannot_work_on_are_errors() -> None:
    from torch import nn
    from torch.nn.utils import prune

    recipe = {"compression": RECIPES["magnitude_sparsity"]}
    pruned = nn.Sequential(nn.Linear(4, 4))
    prune.l1_unstructured(pruned[0], "weight", amount=0.5)
    with pytest.raises(CompressError, match=r"model: 0 carries a torch.nn.utils.prune .*'weight'"):
        compress.create_compressed_model(pruned, recipe, torch.randn(1, 4))
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(CompressError, match=r"model: 0.weight is on the meta device"):
        compress.create_compressed_model(meta, recipe, torch.randn(1, 4))
