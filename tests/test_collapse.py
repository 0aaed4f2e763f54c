"""A compressed network that silently dies: a layer pruned to 100%, or RB frozen far from its
level. Both warn, naming the layers or the key to change."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import lenet

import compress


def test_a_fully_pruned_layer_warns_naming_it_and_the_allocations_that_avoid_it() -> None:
    recipe = {
        "compression": {
            "algorithm": "magnitude_sparsity",
            "sparsity_init": 0.995,
            "params": {"sparsity_target": 0.995, "weight_importance": "normed_abs"},
        }
    }
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"layers \['0'(, '2')?\] are pruned to 100%.*erk") as rec:
        ctrl, _ = compress.create_compressed_model(lenet(784), recipe, torch.randn(2, 784))
    stats = ctrl.statistics().to_dict()["model"]
    assert stats["effective sparsity of compressed layers"] == 1.0
    assert len([w for w in rec if "pruned to 100%" in str(w.message)]) == 1
    recipe["compression"]["params"]["layerwise_allocation"] = "erk"
    with warnings.catch_warnings():  # the allocation the message names keeps every layer alive
        warnings.simplefilter("error", UserWarning)
        compress.create_compressed_model(lenet(784), recipe, torch.randn(2, 784))


def test_rb_frozen_far_from_its_level_warns_naming_the_lr_multiplier() -> None:
    recipe = {
        "compression": {
            "algorithm": "rb_sparsity",
            "sparsity_init": 0.5,
            "params": {
                "sparsity_target": 0.5,
                "sparsity_target_epoch": 1,
                "sparsity_freeze_epoch": 1,
            },
        }
    }
    ctrl, _ = compress.create_compressed_model(lenet(16), recipe, torch.randn(2, 16))
    ctrl.scheduler.epoch_step()
    with pytest.warns(
        UserWarning,
        match=r"froze at sparsity 0.000, far from the level 0.500.*"
        "compression_lr_multiplier",
    ):
        ctrl.scheduler.epoch_step()
