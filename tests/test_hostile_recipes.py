"""Recipes that hang, overflow or say something other than what they mean: each is refused
with a ConfigError naming the key, or warned about where NNCF accepts it."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import compress
from compress import cli
from compress.errors import ConfigError
from compress.recipe.config import load_config


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.ModuleDict(
            {
                "layers": nn.ModuleList(
                    [
                        nn.ModuleDict(
                            {
                                "self_attention": nn.ModuleDict(
                                    {"output_projection": nn.Linear(4, 4)}
                                )
                            }
                        )
                    ]
                )
            }
        )
        self.head_fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.encoder["layers"][0]["self_attention"]["output_projection"]
        return self.head_fc(layer(x))


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(args))
    assert "Traceback" not in out.getvalue() + err.getvalue()
    return code, out.getvalue(), err.getvalue()


def magnitude(**extra: Any) -> dict[str, Any]:
    return {"compression": {"algorithm": "magnitude_sparsity", **extra}}


def write(tmp_path: Path, recipe: dict[str, Any] | str) -> Path:
    path = tmp_path / "recipe.json"
    path.write_text(recipe if isinstance(recipe, str) else json.dumps(recipe))
    return path


# --- 4. no hangs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scope", [r"{re}(\w+\.?)+_fc$", "{re}(a+)+$", "{re}(a|aa)+$", "{re}.*.*.*.*x"]
)
def test_catastrophic_regex_scopes_are_refused_by_a_static_check(
    scope: str, tmp_path: Path
) -> None:
    """Refused from the parsed pattern, before any name is matched: without the check,
    create_compressed_model never returns on the first two."""
    recipe = magnitude(ignored_scopes=[scope])
    with pytest.raises(
        ConfigError, match=r"compression.ignored_scopes: .*(variable length|unbounded)"
    ):
        compress.create_compressed_model(Encoder(), recipe, torch.randn(1, 4))
    code, _, err = run_cli("validate", str(write(tmp_path, recipe)))
    assert code == 2 and "ignored_scopes" in err


def test_safe_regex_scopes_still_work() -> None:
    recipe = magnitude(ignored_scopes=[r"{re}encoder\..*_projection$", "{re}.*fc"])
    with pytest.raises(ConfigError, match="no layer to compress"):
        compress.create_compressed_model(Encoder(), recipe, torch.randn(1, 4))


def test_scope_count_and_length_are_bounded() -> None:
    with pytest.raises(ConfigError, match=r"ignored_scopes: 95000 items, more than 10000"):
        load_config(magnitude(ignored_scopes=[f"layer{i}" for i in range(95000)]))
    with pytest.raises(
        ConfigError, match=r"target_scopes: \"aaaa.*\(10000002 characters\) is longer than 1000"
    ):
        load_config(magnitude(target_scopes="a" * 10**7))


@pytest.mark.parametrize("epochs", ["--epochs=-5", "--epochs=0", "--epochs=1000000000000"])
def test_schedule_epochs_are_bounded(epochs: str, tmp_path: Path) -> None:
    code, out, err = run_cli("schedule", str(write(tmp_path, magnitude())), epochs)
    assert code == 2 and out == "" and "give 1 to 10000" in err


def test_recipe_epochs_are_bounded(tmp_path: Path) -> None:
    code, out, err = run_cli("schedule", str(write(tmp_path, {**magnitude(), "epochs": 10**12})))
    assert code == 2 and "epochs: 1000000000000 must be <= 100000" in err


# --- 8. errors, not tracebacks, from recipes ----------------------------------------------------


def test_a_5000_digit_integer_is_an_error(tmp_path: Path) -> None:
    text = (
        '{"compression": {"algorithm": "magnitude_sparsity", "sparsity_init": ' + "9" * 5000 + "}}"
    )
    code, _, err = run_cli("validate", str(write(tmp_path, text)))
    assert code == 2 and "a number in the recipe is too long" in err


@pytest.mark.parametrize(
    "algorithm, key",
    [
        ("magnitude_sparsity", "power"),
        ("magnitude_sparsity", "sparsity_target_epoch"),
        ("filter_pruning", "pruning_steps"),
    ],
)
def test_400_digit_numbers_are_an_error_naming_the_key(algorithm: str, key: str) -> None:
    recipe = {"compression": {"algorithm": algorithm, "params": {key: 10**400}}}
    with pytest.raises(ConfigError, match=rf"compression.params.{key}: an integer of 401 digits"):
        compress.create_compressed_model(nn.Sequential(nn.Linear(4, 4)), recipe, torch.randn(1, 4))


def test_huge_channel_ranges_and_inputs_are_errors() -> None:
    from compress.recipe.scopes import parse_channels

    with pytest.raises(ConfigError, match=r"'0-100000000' names a channel beyond 1048575"):
        parse_channels("0-100000000", "prune_channels")
    with pytest.raises(
        ConfigError, match=r"input_info: the sample sizes hold 10000000000 elements"
    ):
        load_config({**magnitude(), "input_info": {"sample_size": [100000, 100000]}})


def test_an_invalid_regex_is_an_error_even_without_scope_validation() -> None:
    recipe = magnitude(validate_scopes=False, ignored_scopes=["{re}conv[12"])
    with pytest.raises(ConfigError, match=r"ignored_scopes: '\{re\}conv\[12' is not a valid regex"):
        compress.create_compressed_model(nn.Sequential(nn.Linear(4, 4)), recipe, torch.randn(1, 4))


# --- 9. accepted, but not without a word -------------------------------------------------------


def test_duplicate_keys_warn(tmp_path: Path) -> None:
    text = '{"compression": {"algorithm": "magnitude_sparsity", "sparsity_init": 0.1, '
    text += '"sparsity_init": 0.5}}'
    with pytest.warns(UserWarning, match=r"key 'sparsity_init' appears more than once"):
        cfg = load_config(write(tmp_path, text))
    assert cfg.algorithms[0].options["sparsity_init"] == 0.5
    code, _, err = run_cli("validate", str(tmp_path / "recipe.json"))
    assert code == 0 and err.startswith("warning: ") and "sparsity_init" in err


@pytest.mark.parametrize(
    "recipe, message",
    [
        (
            magnitude(params={"sparsity_target_epoch": 10, "sparsity_freeze_epoch": 2}),
            r"sparsity_freeze_epoch: 2 comes before sparsity_target_epoch 10",
        ),
        (
            magnitude(
                params={
                    "schedule": "multistep",
                    "multistep_steps": [2],
                    "multistep_sparsity_levels": [0.5, 0.2],
                }
            ),
            r"multistep_sparsity_levels: \[0.5, 0.2\] decrease",
        ),
        (
            magnitude(sparsity_init=0.7, params={"sparsity_target": 0.5}),
            r"sparsity_init: 0.7 is above sparsity_target 0.5",
        ),
    ],
)
def test_contradictory_schedules_warn(recipe: dict[str, Any], message: str) -> None:
    with pytest.warns(UserWarning, match=message):
        load_config(recipe)
