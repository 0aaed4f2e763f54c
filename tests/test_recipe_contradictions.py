"""Recipes whose keys contradict each other (or the run's epochs) are accepted by NNCF 2.17,
so they load here too, with a warning that names the keys, their values and what would be
consistent (compress/recipe/rules.py); NNCF's own published recipes raise none of them."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ConvBNNet, LitClassifier, loader16, quiet_trainer

import compress
from callbacks import CompressionCallback
from compress.recipe.config import load_config

X = torch.randn(2, 3, 8, 8)
# the start of every message of the rules this file pins (a published recipe must raise none)
RULES = (
    r"is not after the last multistep step|multistep_steps: .* repeat epoch|"
    r"is above the multistep level of epoch 0|is above pruning_flops_target|"
    r"is above pruning_latency_target|prunable channel groups, so the schedule's target|"
    r"num_init_steps: .* is not below the|sparsity_target_epoch: .* is past the"
)


def multistep(steps: list[int], levels: list[float], **kw: Any) -> dict[str, Any]:
    init = kw.pop("sparsity_init", 0.0)
    params = {"schedule": "multistep", "multistep_steps": steps}
    return {
        "compression": {
            "algorithm": "magnitude_sparsity",
            "sparsity_init": init,
            "params": {**params, "multistep_sparsity_levels": levels, **kw},
        }
    }


def pruning(init: float, **params: Any) -> dict[str, Any]:
    return {"compression": {"algorithm": "filter_pruning", "pruning_init": init, "params": params}}


def test_freeze_before_the_last_multistep_step_warns_and_the_masks_stop_where_it_says() -> None:
    recipe = multistep([2, 5], [0.1, 0.3, 0.5], sparsity_freeze_epoch=4)
    with pytest.warns(
        UserWarning,
        match=r"compression\.params\.sparsity_freeze_epoch: 4 is not after the last multistep "
        r"step 5 \(multistep_steps \[2, 5\]\); the masks freeze at level 0\.3 and never reach "
        r"0\.5\. Set sparsity_freeze_epoch > 5",
    ):
        ctrl, net = compress.create_compressed_model(ConvBNNet(), recipe, X)
    for _ in range(8):
        ctrl.scheduler.epoch_step()
    stats = ctrl.statistics().to_dict()["model"]
    assert stats["sparsity of compressed layers"] == pytest.approx(0.3, abs=0.01)


def test_freeze_at_the_last_multistep_step_warns_too() -> None:
    # the freeze comes before that epoch's move (NNCF): the last level never applies
    with pytest.warns(UserWarning, match=r"sparsity_freeze_epoch: 5 is not after the last"):
        load_config(multistep([2, 5], [0.1, 0.3, 0.5], sparsity_freeze_epoch=5))


def test_repeated_multistep_steps_warn() -> None:
    with pytest.warns(
        UserWarning,
        match=r"compression\.params\.multistep_steps: \[3, 3\] repeat epoch 3; the level jumps "
        r"past \[0\.3\] at that epoch, which then never applies\. Give strictly increasing",
    ):
        load_config(multistep([3, 3], [0.1, 0.3, 0.5]))


def test_sparsity_init_above_the_first_multistep_level_warns() -> None:
    with pytest.warns(
        UserWarning,
        match=r"compression\.sparsity_init: 0\.7 is above the multistep level of epoch 0, "
        r"multistep_sparsity_levels \[0\.1, 0\.5\] \(starting at 0\.1\); the model is built at "
        r"0\.7 and falls to 0\.1 at epoch 0 .* Give sparsity_init <= 0\.1, or start "
        r"multistep_sparsity_levels at 0\.7",
    ):
        load_config(multistep([3], [0.1, 0.5], sparsity_init=0.7))


@pytest.mark.parametrize(
    ("key", "what"), [("pruning_flops_target", "MACs"), ("pruning_latency_target", "measured")]
)
def test_pruning_init_above_a_flops_or_latency_target_warns(key: str, what: str) -> None:
    with pytest.warns(
        UserWarning,
        match=rf"compression\.pruning_init: 0\.9 is above {key} 0\.1; the schedule starts by "
        rf"removing 0\.9 of the {what}.* Give pruning_init <= 0\.1",
    ):
        load_config(pruning(0.9, **{key: 0.1}))


def test_layer_ratios_on_every_layer_warn_that_the_target_is_unused() -> None:
    recipe = pruning(
        0.0, pruning_target=0.5, prune_first_conv=True, layer_ratios={"conv1": 0.25, "conv2": 0.5}
    )
    with pytest.warns(
        UserWarning,
        match=r"compression\.params\.layer_ratios: \{'conv1': 0\.25, 'conv2': 0\.5\} \(with "
        r"prune_channels\) set all 2 prunable channel groups, so the schedule's target",
    ):
        compress.create_compressed_model(ConvBNNet(), recipe, X)
    # one layer left to the target: no warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recipe = pruning(
            0.0, pruning_target=0.5, prune_first_conv=True, layer_ratios={"conv1": 0.25}
        )
        compress.create_compressed_model(ConvBNNet(), recipe, X)
    assert not [w for w in caught if re.search(RULES, str(w.message))]


def test_num_init_steps_past_the_recipe_epochs_warns() -> None:
    with pytest.warns(
        UserWarning,
        match=r"compression\.params\.num_init_steps: 1000 is not below the 3 epochs of the run; "
        r"pruning would start at epoch 1000, so it never starts\. Give num_init_steps < 3",
    ):
        load_config({**pruning(0.0, num_init_steps=1000), "epochs": 3})


def test_sparsity_target_epoch_past_the_recipe_epochs_warns() -> None:
    recipe = {
        "epochs": 10,
        "compression": {"algorithm": "rb_sparsity", "params": {"sparsity_target_epoch": 500}},
    }
    with pytest.warns(
        UserWarning,
        match=r"compression\.params\.sparsity_target_epoch: 500 is past the 10 epochs of the "
        r"run; the run ends before the level reaches sparsity_target 0\.5\. Give "
        r"sparsity_target_epoch <= 10",
    ):
        load_config(recipe)


def test_the_trainer_epochs_are_checked_by_the_callback(tmp_path: Path) -> None:
    recipe = {
        "compression": {
            "algorithm": "magnitude_sparsity",
            "params": {"sparsity_target": 0.5, "sparsity_target_epoch": 500},
        }
    }
    callback = CompressionCallback(recipe, verbose=False)  # no epochs known: no warning
    trainer = quiet_trainer(tmp_path, callback, epochs=2, logger=False, enable_checkpointing=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(LitClassifier(), loader16())
    said = [str(w.message) for w in caught if re.search(RULES, str(w.message))]
    assert len(said) == 1
    assert said[0].startswith("compression.params.sparsity_target_epoch: 500 is past the 2 ")


FIXTURES = Path(__file__).parent / "fixtures" / "nncf217" / "configs"
# published recipes that truly contradict themselves (none of the rules of this file so far)
CONTRADICTORY: dict[str, str] = {}


def _loadable(data: dict[str, Any]) -> dict[str, Any]:
    """The recipe without what this library refuses by name (quantization, LeGR)."""
    section = data.get("compression", [])
    items = section if isinstance(section, list) else [section]
    kept = []
    for item in items:
        if item["algorithm"] == "quantization":
            continue
        params = {
            k: v
            for k, v in item.get("params", {}).items()
            if k not in ("interlayer_ranking_type", "legr_params")
        }
        kept.append({**item, "params": params} if "params" in item else item)
    return {**data, "compression": kept}


def test_nncf_published_recipes_raise_none_of_these_warnings() -> None:
    paths = sorted(FIXTURES.rglob("*.json"))
    checked = 0
    for path in paths:
        data = _loadable(json.loads(path.read_text()))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                load_config(data)
            except compress.ConfigError:
                continue  # refused for another reason (test_nncf_published_configs says which)
        said = [str(w.message) for w in caught if re.search(RULES, str(w.message))]
        name = str(path.relative_to(FIXTURES))
        if name in CONTRADICTORY:
            assert any(CONTRADICTORY[name] in s for s in said), name
        else:
            assert said == [], name
        checked += 1
    assert checked >= 50
