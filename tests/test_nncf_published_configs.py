"""NNCF 2.17.0's published configs (tests/fixtures/nncf217/configs, copied from its repository)
load and build; the quantization and LeGR ones are refused by name.

Each config builds on a small model of its kind (a UNet for the segmentation ones, whose scopes
name UNet's layers; a small residual classifier otherwise) with the input shape of its
``input_info``, the spatial size shrunk to at most 64.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import LitClassifier, loader16, quiet_trainer
from torch import nn

import compress
from compress import masks
from compress.errors import ConfigError

ROOT = Path(__file__).parent / "fixtures" / "nncf217" / "configs"
CONFIGS = sorted(ROOT.rglob("*.json"))
REFUSED = {"quantization", "learned_ranking"}


def _algorithms(data: dict[str, Any]) -> list[dict[str, Any]]:
    section = data.get("compression", [])
    return section if isinstance(section, list) else [section]


def _refused(data: dict[str, Any]) -> str | None:
    for algo in _algorithms(data):
        if algo["algorithm"] == "quantization":
            return "quantization"
        if algo.get("params", {}).get("interlayer_ranking_type") == "learned_ranking":
            return "learned_ranking"
    return None


class Classifier(nn.Module):
    """A stem, one residual block with a 64-wide inner conv, and a linear head."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.block = nn.Sequential(
            nn.Conv2d(32, 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.Conv2d(64, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
        )
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(x + self.block(x))
        return self.fc(x.mean((2, 3)))


class UNetConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1),
            nn.ReLU(),
            nn.BatchNorm2d(cout),
            nn.Conv2d(cout, cout, 3, padding=1),
            nn.ReLU(),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class UNetUpBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cout, 2, stride=2)
        self.conv_block = UNetConvBlock(2 * cout, cout)

    def forward(self, x: torch.Tensor, bridge: torch.Tensor) -> torch.Tensor:
        return self.conv_block(torch.cat([self.up(x), bridge], 1))


class UNet(nn.Module):
    """NNCF's example UNet in miniature: the same module names, five levels of 16-32 channels."""

    def __init__(self, channels: int, widths: tuple[int, ...] = (16, 16, 32, 32, 32)) -> None:
        super().__init__()
        cins = (channels, *widths[:-1])
        self.down_path = nn.ModuleList(UNetConvBlock(i, o) for i, o in zip(cins, widths))
        self.up_path = nn.ModuleList(
            UNetUpBlock(widths[i + 1], widths[i]) for i in reversed(range(len(widths) - 1))
        )
        self.last = nn.Conv2d(widths[0], 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bridges = []
        for i, down in enumerate(self.down_path):
            x = down(x)
            if i < len(self.down_path) - 1:
                bridges.append(x)
                x = nn.functional.max_pool2d(x, 2)
        for up, bridge in zip(self.up_path, reversed(bridges)):
            x = up(x, bridge)
        return self.last(x)


def _input(data: dict[str, Any]) -> torch.Tensor:
    info = data["input_info"]
    shape = list((info[0] if isinstance(info, list) else info)["sample_size"])
    scale = max(shape[2:]) / 64
    spatial = [max(16, round(s / max(scale, 1) / 16) * 16) for s in shape[2:]]
    return torch.randn([min(shape[0], 2), shape[1], *spatial])


def _model(data: dict[str, Any], channels: int) -> nn.Module:
    torch.manual_seed(0)
    return UNet(channels) if "unet" in data.get("model", "") else Classifier(channels)


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT))


ACCEPTED = [p for p in CONFIGS if _refused(json.loads(p.read_text())) is None]
REFUSED_CONFIGS = [p for p in CONFIGS if p not in ACCEPTED]


def test_the_copied_configs_are_all_there() -> None:
    assert (len(CONFIGS), len(ACCEPTED), len(REFUSED_CONFIGS)) == (88, 52, 36)


@pytest.mark.parametrize("path", ACCEPTED, ids=_id)
def test_a_published_config_loads_and_builds(path: Path) -> None:
    data = json.loads(path.read_text())
    x = _input(data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ctrl, model = compress.create_compressed_model(_model(data, x.shape[1]), path, x)
    names = [a["algorithm"] for a in _algorithms(data)]
    assert sorted(a.name for a in ctrl.algorithms) == sorted(names)
    said = [str(w.message) for w in caught if "no 'compression' section" in str(w.message)]
    assert len(said) == (0 if names else 1)  # an uncompressed run says so, once
    model.train()
    out = model(x)
    loss = out.float().pow(2).mean() + ctrl.loss()
    loss.backward()
    ctrl.scheduler.epoch_step()
    if any(n.endswith("sparsity") and n != "const_sparsity" for n in names):
        assert list(masks.iter_masked(model))  # the layers are masked


@pytest.mark.parametrize("path", REFUSED_CONFIGS, ids=_id)
def test_quantization_and_legr_are_refused_by_name(path: Path) -> None:
    what = _refused(json.loads(path.read_text()))
    pattern = (
        r"'quantization' is not implemented by this library"
        if what == "quantization"
        else r"'learned_ranking' \(LeGR\) is not supported"
    )
    with pytest.raises(ConfigError, match=pattern):
        compress.load_config(path)


def test_the_unet_scopes_leave_nncfs_layers_whole() -> None:
    """unet_mapillary_pruning_geometric_median.json ignores the up-convolutions and the last
    block's convs by NNCF node-name regexes: those layers keep every filter."""
    path = ROOT / "examples/torch/semantic_segmentation/configs"
    path = path / "unet_mapillary_pruning_geometric_median.json"
    x = _input(json.loads(path.read_text()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctrl, model = compress.create_compressed_model(UNet(3), path, x)
    groups = ctrl.algorithms[0].groups  # type: ignore[attr-defined]
    pruned = {m.module_name for g in groups for m in g.members if m.role == "producer"}
    ignored = {f"up_path.{i}.up" for i in range(4)}
    ignored |= {"up_path.3.conv_block.block.0", "up_path.3.conv_block.block.3"}
    assert pruned and not pruned & ignored
    assert "up_path.2.conv_block.block.0" in pruned


def test_a_recipe_without_compression_trains_uncompressed_under_the_callback(
    tmp_path: Path,
) -> None:
    from callbacks import CompressionCallback

    cb = CompressionCallback({"epochs": 2}, model_attr="model", verbose=False)
    module = LitClassifier()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(tmp_path, cb, epochs=2, logger=False).fit(module, loader16())
    said = [w for w in caught if "no 'compression' section; the model trains" in str(w.message)]
    assert len(said) == 1  # once, not per epoch or step
    assert cb.ctrl.algorithms == [] and cb.ctrl.compression_level == 0.0
    assert not list(masks.iter_masked(module))
    assert any(not torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_pruning_init_above_the_target_warns_as_nncf_accepts_it() -> None:
    recipe = {
        "compression": {
            "algorithm": "filter_pruning",
            "pruning_init": 0.95,
            "params": {"pruning_target": 0.1, "pruning_steps": 1},
        }
    }
    with pytest.warns(UserWarning, match=r"pruning_init: 0\.95 is above pruning_target 0\.1"):
        cfg = compress.load_config(recipe)
    assert cfg.algorithms[0].options["pruning_init"] == 0.95


def test_top_level_scopes_apply_to_every_algorithm_as_in_nncf() -> None:
    recipe = {
        "ignored_scopes": ["{re}NNCFLinear\\[fc\\]"],
        "compression": [
            {"algorithm": "magnitude_sparsity", "ignored_scopes": ["conv1"]},
            {"algorithm": "knowledge_distillation", "type": "mse"},
        ],
    }
    cfg = compress.load_config(recipe)
    assert cfg.algorithms[0].options["ignored_scopes"] == ["{re}NNCFLinear\\[fc\\]", "conv1"]
    ctrl, model = compress.create_compressed_model(Classifier(3), cfg, torch.randn(1, 3, 8, 8))
    masked = sorted(n for n, _, p, _ in masks.iter_masked(model) if p == "weight")
    assert masked == ["block.0", "block.3"]


def test_compress_validate_says_a_baseline_config_trains_uncompressed(capsys) -> None:  # type: ignore[no-untyped-def]
    from compress.cli import main

    path = ROOT / "examples/torch/classification/configs/pruning/resnet18_imagenet.json"
    assert main(["validate", str(path)]) == 0
    assert (
        "valid: no 'compression' section, the model trains uncompressed" in capsys.readouterr().out
    )


def test_nncf_keys_our_schema_lacked_are_accepted() -> None:
    """Keys NNCF 2.17's schema accepts: an algorithm's ``initializer`` (BatchNorm adaptation,
    not run here), magnitude sparsity's ``params.patience``, and the top-level
    ``compression_lr_multiplier`` (the default of every algorithm that has the key)."""
    cfg = compress.load_config(
        {
            "compression_lr_multiplier": 2.0,
            "disable_shape_matching": True,
            "compression": [
                {"algorithm": "rb_sparsity"},
                {
                    "algorithm": "filter_pruning",
                    "initializer": {"batchnorm_adaptation": {"num_bn_adaptation_samples": 512}},
                },
            ],
        }
    )
    assert cfg.algorithms[0].options["compression_lr_multiplier"] == 2.0
    own = {"algorithm": "rb_sparsity", "compression_lr_multiplier": 5.0}
    assert (
        compress.load_config({"compression_lr_multiplier": 2.0, "compression": own})
        .algorithms[0]
        .options["compression_lr_multiplier"]
        == 5.0
    )
    magnitude = {"algorithm": "magnitude_sparsity", "params": {"patience": 2}}
    magnitude["initializer"] = {"batchnorm_adaptation": {"num_bn_adaptation_samples": 0}}
    assert compress.load_config({"compression": magnitude}).algorithms[0].params["patience"] == 2
    with pytest.raises(ConfigError, match=r"^compression_lr_multiplier: \"x\" is not of type"):
        compress.load_config({"compression_lr_multiplier": "x", "compression": own})
