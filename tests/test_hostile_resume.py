"""A crafted callback entry on resume is refused whole, with a message, before any of it is
applied: masked values that do not fill their positions, a ``where`` of another shape, offsets
that are not counts, accuracy-aware state with missing keys."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import LitClassifier, fit_quietly, loader16
from pytorch_lightning.callbacks import ModelCheckpoint
from test_lightning_path import PER_EPOCH, trainer

from callbacks import CompressionCallback
from compress import accuracy_aware
from compress.controller import pack_bits
from compress.errors import CompressError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[CompressionCallback, dict[str, Any]]:
    root: Path = tmp_path_factory.mktemp("fit")
    every = ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, filename="{epoch}")
    cb = CompressionCallback(PER_EPOCH, model_attr="model", verbose=False)
    fit_quietly(trainer(root, cb, every, epochs=1), LitClassifier(), loader16())
    state = torch.load(root / "ckpt" / "epoch=0.ckpt", weights_only=True)
    entry = state["callbacks"]["CompressionCallback"]
    assert "masked_values" in entry  # the masks still move at epoch 0
    return cb, entry


def refused(cb: CompressionCallback, entry: dict[str, Any], message: str) -> None:
    assert cb.ctrl is not None
    before = copy.deepcopy(cb.ctrl.state_dict())
    weights = {k: v.clone() for k, v in cb.ctrl.model.state_dict(keep_vars=True).items()}
    offsets = (cb._epoch_offset, cb._step_offset)
    with pytest.raises(CompressError, match=message):
        cb.load_state_dict(entry)
    after = cb.ctrl.state_dict()
    assert repr(after) == repr(before)  # nothing of the entry was applied
    for k, v in cb.ctrl.model.state_dict(keep_vars=True).items():
        assert torch.equal(v, weights[k]), k
    assert (cb._epoch_offset, cb._step_offset) == offsets


def test_masked_values_fewer_than_their_positions_are_refused(fitted: Any) -> None:
    """Before: one value filled every position."""
    cb, entry = fitted
    bad = copy.deepcopy(entry)
    saved = bad["masked_values"]["0.weight"]
    count = saved["values"].numel()
    saved["values"] = saved["values"][:1]
    refused(
        cb,
        bad,
        rf"masked_values\['0\.weight'\]\.values is \[1\]; {count} values, one per position",
    )


def test_a_where_of_another_shape_is_refused_before_the_controller_loads(fitted: Any) -> None:
    cb, entry = fitted
    bad = copy.deepcopy(entry)
    bad["masked_values"]["0.weight"]["where"] = pack_bits(torch.ones(4, 4, dtype=torch.bool))
    refused(cb, bad, r"masked_values\['0\.weight'\]\.where has shape \[4, 4\], the parameter")


@pytest.mark.parametrize("offsets", [["a", "b"], [1], [1.5, 2], [-1, 0], "ab"])
def test_offsets_that_are_not_counts_are_refused(fitted: Any, offsets: Any) -> None:
    """Before: ['a', 'b'] failed at the first batch."""
    cb, entry = fitted
    refused(cb, {**entry, "offsets": offsets}, r"checkpoint: offsets .* are not two counts")


def test_accuracy_aware_state_with_missing_keys_is_a_message() -> None:
    """Before: KeyError; the callback checks it before the controller state and applies it
    after."""
    with pytest.raises(CompressError, match=r"accuracy-aware state: missing keys \['best'"):
        accuracy_aware.check_state(
            {
                "version": accuracy_aware.STATE_VERSION,
                "phase": "search",
                "epochs": 1,
                "target": 0.1,
                "step_size": 0.1,
                "direction": 1,
                "epochs_at_level": 0,
                "reference": 1.0,
                "best_at_level": None,
                "history": [],
            }
        )
    with pytest.raises(CompressError, match=r"accuracy-aware state: epochs 'x' is not a count"):
        state = {k: 0 for k in accuracy_aware._STATE_KEYS}
        accuracy_aware.check_state(
            {**state, "version": accuracy_aware.STATE_VERSION, "epochs": "x", "history": []}
        )


def deep_list(depth: int) -> list[Any]:
    """A list in a list ``depth`` deep, built without recursion."""
    top: list[Any] = []
    inner = top
    for _ in range(depth):
        inner.append([])
        inner = inner[0]
    return top


@pytest.mark.parametrize("where", ["controller", "recipe", "accuracy_aware", "state"])
def test_a_deeply_nested_entry_is_refused_on_resume(fitted: Any, where: str) -> None:
    """Before: a 100,000-deep list under controller raised RecursionError."""
    cb, entry = fitted
    bad = copy.deepcopy(entry)
    if where == "state":  # deep inside the controller state
        bad["controller"]["state"]["magnitude_sparsity"]["thresholds"] = deep_list(100_000)
    else:
        bad[where] = deep_list(100_000)
    refused(cb, bad, r"checkpoint: the CompressionCallback entry: .* nests more than 100 deep")
    assert cb.ctrl is not None
    state = cb.ctrl.state_dict()
    state["state"]["magnitude_sparsity"]["thresholds"] = deep_list(100_000)
    with pytest.raises(CompressError, match=r"compression state: .* nests more than 100 deep"):
        cb.ctrl.load_state_dict(state)
