import json
from pathlib import Path

import pytest

import compress
from compress.errors import ConfigError
from compress.recipe.config import load_config, schema

CONFIGS = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.json"))


def _err(recipe: object) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(recipe)  # type: ignore[arg-type]
    return str(e.value)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_recipe_is_valid(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.algorithms and all(
        a.name in compress.recipe.config.IMPLEMENTED for a in cfg.algorithms
    )


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_defaults_come_from_the_schema_and_caller_dict_is_untouched() -> None:
    recipe = {"compression": {"algorithm": "magnitude_sparsity"}}
    cfg = load_config(recipe)
    props = schema()["$defs"]["magnitude_sparsity"]["properties"]["params"]["properties"]
    for key, spec in props.items():
        if "default" in spec:
            assert cfg.algorithms[0].params[key] == spec["default"]
    assert recipe == {"compression": {"algorithm": "magnitude_sparsity"}}


def test_unknown_param_names_path_and_nearest_key() -> None:
    msg = _err(
        {"compression": {"algorithm": "magnitude_sparsity", "params": {"sparsity_traget": 0.5}}}
    )
    assert msg.startswith("compression.params: unknown key 'sparsity_traget'")
    assert "did you mean 'sparsity_target'?" in msg


def test_unknown_algorithm_level_key() -> None:
    msg = _err({"compression": [{"algorithm": "magnitude_sparsity", "sparsity_int": 0.1}]})
    assert "compression[0]: unknown key 'sparsity_int' (did you mean 'sparsity_init'?)" in msg


def test_enum_lists_allowed_values() -> None:
    msg = _err(
        {"compression": {"algorithm": "magnitude_sparsity", "params": {"schedule": "linear"}}}
    )
    assert msg == (
        'compression.params.schedule: "linear" is not allowed; one of "polynomial", '
        '"exponential", "multistep"'
    )


def test_out_of_range_value() -> None:
    msg = _err(
        {"compression": [{"algorithm": "magnitude_sparsity", "params": {"sparsity_target": 1.5}}]}
    )
    assert msg == "compression[0].params.sparsity_target: 1.5 must be < 1"


def test_multistep_length_rule_is_explained() -> None:
    msg = _err(
        {
            "compression": {
                "algorithm": "magnitude_sparsity",
                "params": {
                    "schedule": "multistep",
                    "multistep_steps": [1, 2],
                    "multistep_sparsity_levels": [0.1, 0.2],
                },
            }
        }
    )
    assert "2 levels for 2 steps; there must be one more level than steps" in msg


@pytest.mark.parametrize("name", ["quantization", "binarization"])
def test_not_implemented_algorithm_is_named(name: str) -> None:
    msg = _err({"compression": [{"algorithm": "magnitude_sparsity"}, {"algorithm": name}]})
    assert f"compression[1].algorithm: {name!r} is not implemented by this library" in msg


def test_unknown_algorithm_gets_a_hint() -> None:
    assert "did you mean 'rb_sparsity'?" in _err({"compression": {"algorithm": "rb_sparsty"}})


def test_accuracy_aware_training_block_is_validated() -> None:
    base = {"compression": {"algorithm": "magnitude_sparsity"}}
    msg = _err({**base, "accuracy_aware_training": {}})
    assert msg == "accuracy_aware_training: 'mode' is a required property"
    msg = _err(
        {**base, "accuracy_aware_training": {"mode": "early_exit", "params": {"patience": 1}}}
    )
    assert msg.startswith("accuracy_aware_training.params: unknown key 'patience'")
    msg = _err({**base, "accuracy_aware_training": {"mode": "fast", "params": {}}})
    assert msg.startswith(
        'accuracy_aware_training.mode: "fast" is not allowed; one of "early_exit"'
    )


def test_both_pruning_targets_are_refused() -> None:
    msg = _err(
        {
            "compression": {
                "algorithm": "filter_pruning",
                "params": {"pruning_target": 0.3, "pruning_flops_target": 0.4},
            }
        }
    )
    assert "pruning_target (0.3) and pruning_flops_target (0.4) are both set; give only one" in msg


def test_learned_ranking_is_not_supported() -> None:
    msg = _err(
        {
            "compression": {
                "algorithm": "filter_pruning",
                "params": {"interlayer_ranking_type": "learned_ranking"},
            }
        }
    )
    assert "'learned_ranking' (LeGR) is not supported" in msg


def test_broken_json_reports_line_and_column(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "compression": {"algorithm": "magnitude_sparsity",}\n}')
    assert f"{bad}: invalid JSON at line 2, column 53" in _err(bad)


def test_missing_file_and_missing_section(tmp_path: Path) -> None:
    assert "cannot read the recipe" in _err(tmp_path / "nope.json")
    # NNCF trains a config without 'compression' uncompressed (its baseline configs); so do we
    assert load_config({"model": "resnet"}).algorithms == ()
    assert load_config({"compression": []}).algorithms == ()


def test_nncf_top_level_keys_are_accepted_and_input_info_gives_inputs() -> None:
    cfg = load_config(
        {
            "model": "resnet18",
            "batch_size": 8,
            "epochs": 3,
            "target_device": "CPU",
            "optimizer": {"type": "Adam"},
            "log_dir": "runs",
            "dataset": "cifar10",
            "input_info": {"sample_size": [2, 3, 8, 8]},
            "compression": {"algorithm": "magnitude_sparsity"},
        }
    )
    (x,) = cfg.example_inputs()
    assert x.shape == (2, 3, 8, 8)


def test_nested_type_error_points_inside() -> None:
    msg = _err(
        {
            "compression": {"algorithm": "magnitude_sparsity"},
            "input_info": {"sample_size": [1, "a"]},
        }
    )
    assert msg == 'input_info.sample_size[1]: "a" is not of type integer'


def test_schema_gives_every_key_a_description() -> None:
    defs = schema()["$defs"]
    for algo in compress.recipe.config.IMPLEMENTED:
        props = defs[algo]["properties"]
        for key, spec in props["params"]["properties"].items():
            assert spec.get("description"), f"{algo}.params.{key}"
    json.dumps(schema())


def test_non_finite_value_under_an_odd_key_names_the_key_quoted() -> None:
    # Found by the property-based test: a control character as a key printed unescaped.
    bad = {"compression": {"algorithm": "magnitude_sparsity", "\x1f": float("inf")}}
    with pytest.raises(ConfigError, match=r"^compression\.'\\x1f': inf is not allowed"):
        load_config(bad)
    layer = {"layer_ratios": {"layer1.0.conv1": float("nan")}}
    with pytest.raises(
        ConfigError, match=r"params\.layer_ratios\.'layer1\.0\.conv1': nan is not allowed"
    ):
        load_config({"compression": {"algorithm": "filter_pruning", "params": layer}})
