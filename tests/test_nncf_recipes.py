"""Recipes in the shape of NNCF's published examples (examples/torch/classification/configs in
openvinotoolkit/nncf) load unchanged, build on a small model and schedule as NNCF does.

The recipes are in configs/nncf_*.json (top-level NNCF keys included: model, optimizer, epochs,
input_info, ...). NNCF scopes name its wrapped graph nodes; ours name modules, so recipes with
scopes set validate_scopes to false, as a user moving a recipe between models would.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import compress
from compress import cli, masks
from compress.algorithms import ALGORITHMS
from compress.errors import ConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


def _levels(ctrl: compress.CompressionController, epochs: int, algo: int = 0) -> list[float]:
    """The level of algorithm ``algo`` at the start of each epoch (NNCF's epoch_step protocol)."""
    out = []
    for _ in range(epochs):
        ctrl.scheduler.epoch_step()
        out.append(ctrl.algorithms[algo].level)
    return out


def _recipe(name: str) -> Path:
    path = CONFIGS / name
    if not path.exists():
        pytest.skip(f"{name} not written yet")
    return path


def test_multistep_magnitude_sparsity_with_freeze_epoch() -> None:
    path = _recipe("nncf_magnitude_sparsity_multistep.json")
    ctrl, model = compress.create_compressed_model(Net(), path)
    assert ctrl.example_inputs[0].shape == (1, 3, 32, 32)  # from input_info
    levels = _levels(ctrl, 45)
    # NNCF's MultiStepSparsityScheduler: levels[i] with i = number of steps <= epoch.
    assert levels[0] == levels[4] == 0.1
    assert levels[5] == levels[9] == 0.2
    assert levels[10] == 0.3 and levels[20] == 0.4 and levels[30] == 0.5 and levels[40] == 0.6
    assert levels[44] == 0.6
    total = sum(m.numel() for *_, m in masks.iter_masked(model))
    pruned = sum(int((m == 0).sum()) for *_, m in masks.iter_masked(model))
    assert pruned == round(0.6 * total)
    # From sparsity_freeze_epoch (45) on the masks stay, whatever the weights do.
    before = [m.clone() for *_, m in masks.iter_masked(model)]
    ctrl.scheduler.epoch_step()  # epoch 45
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    ctrl.scheduler.epoch_step()
    assert ctrl.statistics().to_dict()["algorithms"][0]["frozen"]
    assert all(torch.equal(a, b) for a, b in zip(before, (m for *_, m in masks.iter_masked(model))))


def test_compress_schedule_prints_the_nncf_multistep_levels() -> None:
    path = _recipe("nncf_magnitude_sparsity_multistep.json")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["schedule", str(path), "--json"]) == 0
    rows = json.loads(out.getvalue())
    assert len(rows) == 70  # "epochs" of the recipe
    assert [rows[e]["magnitude_sparsity"] for e in (0, 5, 10, 20, 30, 40, 69)] == [
        0.1,
        0.2,
        0.3,
        0.4,
        0.5,
        0.6,
        0.6,
    ]
    assert rows[45].get("frozen") == "yes" and "frozen" not in rows[44]


@pytest.mark.skipif("rb_sparsity" not in ALGORITHMS, reason="rb_sparsity not landed")
def test_rb_sparsity_with_target_and_freeze_epochs() -> None:
    path = _recipe("nncf_rb_sparsity.json")
    cfg = compress.load_config(path)
    p = cfg.algorithms[0].params
    init = cfg.algorithms[0].options["sparsity_init"]
    target, target_epoch, freeze = (
        p["sparsity_target"],
        p["sparsity_target_epoch"],
        p["sparsity_freeze_epoch"],
    )
    ctrl, model = compress.create_compressed_model(Net(), cfg, torch.randn(2, 3, 32, 32))
    levels = _levels(ctrl, int(freeze))
    assert p["schedule"] == "exponential"
    # NNCF's ExponentialSparsityScheduler: density decays geometrically to 1 - target.
    for e in (0, 1, target_epoch // 2):
        want = 1 - (1 - init) * ((1 - target) / (1 - init)) ** (e / target_epoch)
        assert math.isclose(levels[int(e)], want, rel_tol=1e-9), e
    assert levels[int(target_epoch)] == target and levels[-1] == target
    assert ctrl.loss().item() > 0  # the density loss pulls towards the level
    assert not ctrl.algorithms[0].frozen
    ctrl.scheduler.epoch_step()  # sparsity_freeze_epoch
    assert ctrl.algorithms[0].frozen and float(ctrl.loss()) == 0.0
    # Scopes from the recipe: conv1 and fc are not compressed.
    names = {n for n, *_ in masks.iter_masked(model)}
    assert names == {"conv2", "conv3"}


@pytest.mark.skipif("filter_pruning" not in ALGORITHMS, reason="filter_pruning not landed")
def test_exponential_geometric_median_filter_pruning_given_as_a_list() -> None:
    path = _recipe("nncf_filter_pruning_geometric_median.json")
    raw = json.loads(path.read_text())
    assert isinstance(raw["compression"], list)
    ctrl, model = compress.create_compressed_model(Net(), path)
    levels = _levels(ctrl, 20)
    # NNCF 2.17's ExponentialPruningScheduler: target_epoch = pruning_steps - 1 = 14, so the
    # kept fraction decays from 0.9 to 0.6 over 14 epochs.
    for e in (0, 1, 7, 13):
        want = 1 - 0.9 * (0.6 / 0.9) ** (e / 14)
        assert math.isclose(levels[e], want, rel_tol=1e-9), e
    assert levels[14] == levels[15] == levels[19] == 0.4
    stats = ctrl.statistics().to_dict()["algorithms"][0]
    assert stats["algorithm"] == "filter_pruning"
    # prune_first_conv: false keeps conv1 whole; the exported model is smaller and equal.
    x = torch.randn(2, 3, 32, 32)
    plain = ctrl.strip().eval()
    model.eval()
    assert plain.conv1.out_channels == 16 and plain.conv2.out_channels < 32
    torch.testing.assert_close(plain(x), model(x), atol=1e-5, rtol=1e-4)


def test_const_sparsity_keeps_a_pruned_models_zeros() -> None:
    path = _recipe("nncf_const_sparsity.json")
    net = Net()
    with torch.no_grad():
        for m in (net.conv2, net.conv3, net.fc):
            m.weight[m.weight.abs() < m.weight.abs().median()] = 0.0
    zeros = {n: (m.weight == 0).clone() for n, m in net.named_modules() if hasattr(m, "weight")}
    ctrl, model = compress.create_compressed_model(net, path, torch.randn(2, 3, 32, 32))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for _ in range(3):
        ctrl.scheduler.epoch_step()
        model(torch.randn(4, 3, 32, 32)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        ctrl.scheduler.step()
    plain = ctrl.strip()
    for name in ("conv2", "conv3", "fc"):
        w = getattr(plain, name).weight
        assert torch.all(w[zeros[name]] == 0)
    assert 0.3 < ctrl.compression_level < 0.6


NNCF_SPARSITY_INT8 = {
    "model": "ResNet34_cifar",
    "input_info": {"sample_size": [1, 3, 32, 32]},
    "num_classes": 100,
    "batch_size": 256,
    "dataset": "CIFAR100",
    "epochs": 70,
    "optimizer": {
        "type": "SGD",
        "base_lr": 0.001,
        "weight_decay": 1e-4,
        "schedule_type": "multistep",
        "steps": [50, 60],
    },
    "compression": [
        {
            "algorithm": "magnitude_sparsity",
            "sparsity_init": 0.1,
            "params": {
                "schedule": "multistep",
                "multistep_steps": [5, 10, 20, 30, 40],
                "multistep_sparsity_levels": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
            },
        },
        {"algorithm": "quantization"},
    ],
}


def test_sparsity_plus_quantization_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError,
        match=r"compression\[1\]\.algorithm: 'quantization' is not implemented by this library; "
        r"implemented: \"magnitude_sparsity\"",
    ):
        compress.load_config(NNCF_SPARSITY_INT8)
    path = tmp_path / "sparsity_int8.json"
    path.write_text(json.dumps(NNCF_SPARSITY_INT8))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert cli.main(["validate", str(path)]) == 2
    assert err.getvalue().startswith("error: compression[1].algorithm: 'quantization'")


@pytest.mark.parametrize(
    "name",
    [
        "nncf_resnet18_cifar10_accuracy_aware.json",
        "nncf_resnet18_imagenet_pruning_accuracy_aware.json",
        "nncf_resnet50_imagenet_pruning_accuracy_aware.json",
    ],
)
def test_accuracy_aware_filter_pruning_recipes_run(name: str) -> None:
    """NNCF's adaptive_compression_level recipes, unchanged, on a scripted validation: the
    metric stays within 1% up to 45% of filters pruned."""
    path = _recipe(name)
    ctrl, _ = compress.create_compressed_model(Net(), path, torch.randn(1, 3, 32, 32))
    algo = ctrl.algorithms[0]
    aa = compress.run_accuracy_aware(
        ctrl,
        lambda epoch: None,
        lambda: 1.0 if algo.level <= 0.45 + 1e-9 else 0.9,
        reference_metric=1.0,
        log=None,
    )
    target = json.loads(path.read_text())["compression"]
    target = (target[0] if isinstance(target, list) else target)["params"]["pruning_target"]
    assert aa.best is not None and aa.best["level"] >= target  # the search went past the target
    assert 0.42 < algo.level <= 0.45 and aa.phase == "done"


def test_distillation_recipe_builds_and_trains() -> None:
    path = _recipe("nncf_resnet34_imagenet_pruning_geometric_median_kd.json")
    ctrl, model = compress.create_compressed_model(Net(), path, torch.randn(1, 3, 32, 32))
    assert [a.name for a in ctrl.algorithms] == ["knowledge_distillation", "filter_pruning"]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctrl.scheduler.epoch_step()
    model(torch.randn(4, 3, 32, 32)).square().mean().backward()
    loss = ctrl.loss()
    assert float(loss) > 0 and loss.requires_grad  # the pruned student already differs
    opt.step()
    for _ in range(7):  # epoch 7, level 0.275: NNCF's rounding up first removes 8 of conv2's 32
        ctrl.scheduler.epoch_step()
    plain = ctrl.strip()
    assert plain.conv2.out_channels < 32 and not plain._forward_hooks
