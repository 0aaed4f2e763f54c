"""``save_pretrained`` after filter pruning of Hugging Face models: the default recipe prunes only
the widths the config states, so ``from_pretrained`` rebuilds the stripped model; and the advice
given for a recipe that prunes more, followed as written, gives a recipe that prunes and
round-trips too."""

from __future__ import annotations

import ast
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from hf_zoo import MORE, ZOO, logits

import compress
from compress.pruning.hf_config import widths

pytest.importorskip("transformers")

MODELS = ZOO | MORE
DEFAULT = {"algorithm": "filter_pruning", "pruning_init": 0.5}
BEYOND = DEFAULT | {"params": {"prune_beyond_config": True}}
ADVICE = "save_pretrained will not rebuild"


def _outputs(model: torch.nn.Module, x: tuple) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return logits(model(*x))


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _strip(name: str, recipe: dict[str, Any]) -> tuple[torch.nn.Module, tuple, int, list[str]]:
    """The stripped model, its inputs, the params before, and what strip() warned."""
    torch.manual_seed(0)
    zoo = MODELS[name]
    model, x = zoo.build(), zoo.inputs()
    full = _params(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the coverage warning: norm-coupled groups stay whole
        ctrl, model = compress.create_compressed_model(model, {"compression": recipe}, x)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        small = ctrl.strip()
    return small, x, full, [str(w.message) for w in record]


def _round_trip_diff(small: torch.nn.Module, x: tuple, path: Path) -> float:
    small.save_pretrained(path)
    again = type(small).from_pretrained(path)  # raises on any shape the config does not state
    return float((_outputs(again, x) - _outputs(small, x)).abs().max())


SLOW = {"whisper"}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
        for n in [
            "bert",
            "roberta",
            "distilbert",
            "gpt2",
            "phi3",
            "t5",
            "clip_text",
            "llama",
            "vit",
            "qwen2_moe",
            "whisper",
        ]
    ],
)
def test_the_default_recipe_prunes_and_round_trips_through_save_pretrained(
    name: str, tmp_path: Path
) -> None:
    small, x, full, said = _strip(name, DEFAULT)
    assert not [m for m in said if "config" in m]  # the config states every pruned width
    assert _params(small) < full
    assert _round_trip_diff(small, x, tmp_path / "hf") <= 1e-6


def test_a_fused_gate_and_up_width_is_written_to_the_config() -> None:
    phi3, _, _, _ = _strip("phi3", DEFAULT)
    # gate_up_proj holds gate and up side by side: twice intermediate_size, halved with it
    assert phi3.model.layers[0].mlp.gate_up_proj.out_features == 64
    assert phi3.model.layers[0].mlp.down_proj.in_features == 32
    assert phi3.config.intermediate_size == 32
    # its fused qkv_proj, as wide as intermediate_size here, is no MLP
    stated = widths(MODELS["phi3"].build())
    assert sorted(stated) == [f"model.layers.{i}.mlp.gate_up_proj" for i in (0, 1)]
    assert set(stated.values()) == {("intermediate_size", 64)}


@pytest.mark.slow
def test_whisper_ffn_dims_are_written_to_the_config() -> None:
    whisper, _, _, _ = _strip("whisper", DEFAULT)
    assert (whisper.config.encoder_ffn_dim, whisper.config.decoder_ffn_dim) == (16, 16)
    assert whisper.model.encoder.layers[0].fc1.out_features == 16
    assert whisper.model.decoder.layers[0].fc1.out_features == 16


@pytest.mark.parametrize(
    ("name", "advised"),
    [
        ("bert", True),
        ("roberta", True),
        ("distilbert", True),
        ("gpt2", True),
        ("clip_text", True),
        # heads that Torch-Pruning does not map (Phi-3's fused qkv_proj, T5's relative
        # position bias) stay whole: what is pruned, the config states
        ("phi3", False),
        ("t5", False),
    ],
)
def test_the_ignored_scopes_advice_followed_as_written_prunes_and_round_trips(
    name: str, advised: bool, tmp_path: Path
) -> None:
    small, x, full, said = _strip(name, BEYOND)
    advice = [m for m in said if ADVICE in m]
    assert bool(advice) == advised
    if advised:
        # what the warning offers: ignored_scopes added to the recipe as it was
        scopes = ast.literal_eval(advice[0].rpartition("ignored_scopes: ")[2])
        small, x, full, said = _strip(name, BEYOND | {"ignored_scopes": scopes})
        assert not [m for m in said if "config" in m]
    assert _params(small) < full
    assert _round_trip_diff(small, x, tmp_path / "hf") <= 1e-6


def test_a_recipe_left_nothing_by_the_config_says_which_key_prunes_more(tmp_path: Path) -> None:
    # the MLPs kept whole: what is left (heads, pre_classifier) DistilBERT's config cannot state
    recipe = DEFAULT | {"ignored_scopes": ["{re}.*ffn.*"]}
    zoo = MODELS["distilbert"]
    with pytest.warns(UserWarning, match=r"can prune nothing.*\(out of scope, config\)") as record:
        compress.create_compressed_model(zoo.build(), {"compression": recipe}, zoo.inputs())
    said = next(str(w.message) for w in record if "can prune nothing" in str(w.message))
    key = "prune_beyond_config: true (then export the 'pruned' file, not save_pretrained)"
    assert f"or {key} to prune some" in said
    # followed as written: it prunes, and the pruned file rebuilds the model on a fresh instance
    recipe["params"] = {"prune_beyond_config": True}
    small, x, full, _ = _strip("distilbert", recipe)
    assert _params(small) < full
    paths = compress.export(small, tmp_path / "m", ["pruned"], example_inputs=x)
    again = compress.load_pruned(zoo.build(), paths["pruned"])
    assert float((_outputs(again, x) - _outputs(small, x)).abs().max()) <= 1e-6


def test_a_cut_layer_whose_width_no_key_states_is_said_at_strip() -> None:
    # only the pooler is pruned: no width the config states changes, the pooler's does
    recipe = BEYOND | {"target_scopes": ["bert.pooler.dense"]}
    small, _, full, said = _strip("bert", recipe)
    assert _params(small) < full
    advice = [m for m in said if ADVICE in m]
    assert len(advice) == 1, said  # was silent, and from_pretrained failed on the pooler
    assert advice[0].endswith("ignored_scopes: ['bert.pooler.dense']")
    assert "bert.pooler.dense.weight of shape (32, 32), the pruned model (16, 32)" in advice[0]
