"""Edge cases of every algorithm: extreme levels, ties, tiny and all-zero layers, NaN/Inf during
training, frozen and tied weights, no layers, scopes that match nothing, refused sections."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ConvBNNet, fit_quietly, quiet_trainer
from test_resume import FILTER, RB, Lit, needs_fp, needs_rb, resumable_loader
from torch import nn

import compress
from callbacks import CompressionCallback
from compress import masks
from compress.algorithms import ALGORITHMS
from compress.errors import CompressError, ConfigError

X = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))


pytestmark = pytest.mark.usefixtures("one_thread")


def sparsity(level: float, name: str = "magnitude_sparsity", **params: Any) -> dict[str, Any]:
    return {"compression": {"algorithm": name, "sparsity_init": level, "params": params}}


def pruned_fraction(model: nn.Module) -> float:
    ms = [m for *_, m in masks.iter_masked(model)]
    return sum(int((m == 0).sum()) for m in ms) / sum(m.numel() for m in ms)


def assert_strip_equals(ctrl: compress.CompressionController, model: nn.Module, x: Any) -> None:
    plain = ctrl.strip().eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), atol=1e-5, rtol=1e-4)
    assert not any(masks.masked_names(m) for m in plain.modules())


# --- levels --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["global", "local"])
@pytest.mark.parametrize("level", [0.0, 0.999])
def test_magnitude_levels_zero_and_0999(level: float, mode: str) -> None:
    ctrl, model = compress.create_compressed_model(
        ConvBNNet(), sparsity(level, sparsity_level_setting_mode=mode), X
    )
    total = sum(m.numel() for *_, m in masks.iter_masked(model))
    if level == 0.0:
        assert pruned_fraction(model) == 0.0
    elif mode == "global":
        assert round(pruned_fraction(model) * total) == round(0.999 * total)
    else:  # every layer at the level on its own: the 32-weight fc keeps round(0.001 * 32) = 0
        assert pruned_fraction(model) > 0.99
    assert_strip_equals(ctrl, model, X)


@needs_rb
@pytest.mark.parametrize("level", [0.0, 0.999])
def test_rb_levels_zero_and_0999(level: float) -> None:
    ctrl, model = compress.create_compressed_model(
        ConvBNNet(), sparsity(level, "rb_sparsity", schedule="polynomial", sparsity_target=level), X
    )
    ctrl.scheduler.epoch_step()
    assert ctrl.compression_level == level
    loss = ctrl.loss()
    assert torch.isfinite(loss) and (loss > 0) == (level > 0)
    assert_strip_equals(ctrl, model, X)


@needs_fp
@pytest.mark.parametrize("target", [0.0, 0.999])
def test_filter_pruning_levels_zero_and_0999_keep_a_channel(target: float) -> None:
    recipe = {
        "compression": {
            "algorithm": "filter_pruning",
            "params": {"schedule": "baseline", "pruning_target": target, "round_to": 1},
        }
    }
    ctrl, model = compress.create_compressed_model(ConvBNNet(), recipe, X)
    ctrl.scheduler.epoch_step()
    plain = ctrl.strip().eval()
    model.eval()
    torch.testing.assert_close(plain(X), model(X), atol=1e-5, rtol=1e-4)
    assert plain.conv2.out_channels == (16 if target == 0.0 else 1)


# --- ties, tiny and zero layers ------------------------------------------------------------------


def test_global_ties_across_layers_prune_exactly_and_deterministically() -> None:
    def build() -> nn.Module:
        net = ConvBNNet()
        with torch.no_grad():
            for m in (net.conv1, net.conv2, net.fc):
                m.weight.fill_(0.5)
        return net

    recipe = sparsity(0.37, weight_importance="abs")
    (_, a), (_, b) = (compress.create_compressed_model(build(), recipe, X) for _ in range(2))
    total = sum(m.numel() for *_, m in masks.iter_masked(a))
    assert round(pruned_fraction(a) * total) == round(0.37 * total)
    assert all(
        torch.equal(x, y) for (*_, x), (*_, y) in zip(masks.iter_masked(a), masks.iter_masked(b))
    )


@needs_fp
def test_tied_filter_scores_prune_exactly() -> None:
    net = ConvBNNet()
    with torch.no_grad():
        net.conv2.weight.fill_(1.0)
    recipe = {
        "compression": {
            "algorithm": "filter_pruning",
            "params": {"schedule": "baseline", "pruning_target": 0.5, "round_to": 1},
        }
    }
    ctrl, model = compress.create_compressed_model(net, recipe, X)
    ctrl.scheduler.epoch_step()
    assert ctrl.strip().conv2.out_channels == 8


class OneWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.big = nn.Linear(8, 8)
        self.tiny = nn.Linear(1, 1, bias=False)
        self.zero = nn.Linear(8, 1)
        with torch.no_grad():
            self.zero.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tiny(self.zero(torch.relu(self.big(x))))


@pytest.mark.parametrize("name", ["magnitude_sparsity", "rb_sparsity", "const_sparsity"])
@pytest.mark.parametrize("mode", ["global", "local"])
def test_a_one_weight_layer_and_an_all_zero_layer(name: str, mode: str) -> None:
    if name not in ALGORITHMS:
        pytest.skip(f"{name} not landed")
    x = torch.randn(3, 8)
    if name == "const_sparsity":
        recipe: dict[str, Any] = {"compression": {"algorithm": name}}
    else:
        recipe = sparsity(0.5, name, sparsity_level_setting_mode=mode)
    ctrl, model = compress.create_compressed_model(OneWeight(), recipe, x)
    ctrl.scheduler.epoch_step()
    loss = model(x).sum() + ctrl.loss()
    loss.backward()
    assert torch.isfinite(loss)
    ctrl.statistics().to_dict()
    if name == "magnitude_sparsity" and mode == "global":
        # The all-zero layer goes first: its 8 zeros are the lowest scores.
        assert int((masks.get_mask(model.zero) == 0).sum()) == 8
    if name == "const_sparsity":
        assert int(masks.get_mask(model.zero).sum()) == 0
    assert_strip_equals(ctrl, model, x)


# --- NaN and Inf -------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_weights_are_named_at_the_step_they_appear(value: float, tmp_path: Path) -> None:
    """The weight goes bad in optimizer step 3 of epoch 0. Masks are recomputed only at the next
    epoch here, so it is the callback's per-step check that names the layer, at that step."""

    class Bad(Lit):
        def on_before_optimizer_step(self, optimizer):  # type: ignore[no-untyped-def]
            if self.trainer.global_step == 2:
                with torch.no_grad():
                    self.model.conv2.weight[0, 0, 0, 0] = value

    recipe = sparsity(0.3, sparsity_target=0.6, sparsity_target_epoch=3)
    cb = CompressionCallback(recipe, model_attr="model", verbose=False)
    trainer = quiet_trainer(tmp_path, cb, epochs=2, logger=False, enable_checkpointing=False)
    with pytest.raises(
        CompressError,
        match=r"layer 'conv2': the weight holds NaN or Inf after optimizer step 3 \(epoch 0\)",
    ):
        fit_quietly(trainer, Bad(), resumable_loader())


# --- frozen and tied weights ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["magnitude_sparsity", "rb_sparsity", "const_sparsity"])
def test_frozen_layers_inside_the_scope_keep_their_masks(name: str) -> None:
    if name not in ALGORITHMS:
        pytest.skip(f"{name} not landed")
    net = ConvBNNet()
    with torch.no_grad():
        net.conv1.weight[net.conv1.weight.abs() < 0.1] = 0.0
    net.conv1.weight.requires_grad_(False)
    recipe = (
        {"compression": {"algorithm": name}} if name == "const_sparsity" else sparsity(0.5, name)
    )
    ctrl, model = compress.create_compressed_model(net, recipe, X)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    ctrl.scheduler.epoch_step()
    mask_before = masks.effective(model.conv1, "weight") == 0
    for _ in range(3):
        (model(X).square().mean() + ctrl.loss()).backward()
        opt.step()
        opt.zero_grad()
        ctrl.scheduler.step()
    assert model.conv1.weight.grad is None and not model.conv1.weight.requires_grad
    assert masks.masked_names(model.conv1) == ("weight",)
    plain = ctrl.strip()
    if name != "rb_sparsity":  # RB's logits of a frozen weight still learn, by design
        assert torch.equal(plain.conv1.weight == 0, mask_before)
    assert_strip_equals(ctrl, model, X)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(8, 8)
        self.dec = nn.Linear(8, 8)
        self.dec.weight = self.enc.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(torch.relu(self.enc(x)))


@pytest.mark.parametrize("name", ["magnitude_sparsity", "rb_sparsity", "const_sparsity"])
def test_tied_weights_share_one_mask_and_strip_stays_tied(name: str) -> None:
    if name not in ALGORITHMS:
        pytest.skip(f"{name} not landed")
    x = torch.randn(3, 8)
    recipe = (
        {"compression": {"algorithm": name}} if name == "const_sparsity" else sparsity(0.5, name)
    )
    ctrl, model = compress.create_compressed_model(Tied(), recipe, x)
    ctrl.scheduler.epoch_step()
    assert masks.get_mask(model.enc, owner="") is masks.get_mask(model.dec, owner="") or (
        name == "rb_sparsity"
    )
    rows = ctrl.statistics().to_dict()["algorithms"][0].get("layers", [])
    assert len(rows) == 1  # one weight, counted once
    plain = ctrl.strip()
    assert plain.enc.weight is plain.dec.weight
    assert_strip_equals(ctrl, model, x)


# --- layers that are not there -----------------------------------------------------------------

ALL = [
    {"algorithm": "magnitude_sparsity"},
    {"algorithm": "const_sparsity"},
    pytest.param(RB, marks=needs_rb),
    pytest.param(FILTER, marks=needs_fp),
]


@pytest.mark.parametrize(
    "section",
    [*ALL[:3], pytest.param(FILTER, marks=[needs_fp])],
    ids=lambda s: s["algorithm"],
)
def test_no_prunable_layers_is_a_config_error(section: dict[str, Any]) -> None:
    model = nn.Sequential(nn.BatchNorm1d(4), nn.ReLU())
    with pytest.raises(ConfigError, match=r"compression: no (layer|group)"):
        compress.create_compressed_model(model, {"compression": section}, torch.randn(3, 4))


@pytest.mark.parametrize("section", ALL, ids=lambda s: s["algorithm"])
def test_scopes_that_match_nothing(section: dict[str, Any]) -> None:
    strict = {**section, "ignored_scopes": ["decoder.*"]}
    with pytest.raises(ConfigError, match=r"compression\.ignored_scopes: .*'decoder\.\*'"):
        compress.create_compressed_model(ConvBNNet(), {"compression": strict}, X)
    lenient = {**strict, "validate_scopes": False}
    ctrl, model = compress.create_compressed_model(ConvBNNet(), {"compression": lenient}, X)
    assert {n for n, *_ in masks.iter_masked(model)} >= {"conv2"}


def test_quantization_is_a_config_error_naming_it() -> None:
    for recipe in (
        {"compression": {"algorithm": "quantization"}},
        {"compression": [{"algorithm": "magnitude_sparsity"}, {"algorithm": "quantization"}]},
    ):
        with pytest.raises(ConfigError, match=r"'quantization' is not implemented by this library"):
            compress.create_compressed_model(ConvBNNet(), recipe, X)


def test_accuracy_aware_training_without_monitor_is_a_config_error() -> None:
    recipe = {**sparsity(0.5), "accuracy_aware_training": {"mode": "early_exit", "params": {}}}
    with pytest.raises(ConfigError, match="monitor: the recipe has accuracy_aware_training; name"):
        CompressionCallback(recipe)
    with pytest.raises(ConfigError, match="mode: 'highest' is not allowed; one of 'max', 'min'"):
        CompressionCallback(recipe, monitor="val_acc", mode="highest")  # type: ignore[arg-type]


# --- combinations and bugs found here ----------------------------------------------------------


@needs_rb
@needs_fp
def test_filter_pruning_plus_rb_strips_to_the_masked_model() -> None:
    """Regression: strip() ran filter pruning's shrink first, which folded RB's masks away, and
    RB's strip then failed with 'lost its RB mask'. The controller now unwinds in reverse."""
    ctrl, model = compress.create_compressed_model(ConvBNNet(), {"compression": [FILTER, RB]}, X)
    ctrl.scheduler.epoch_step()
    ctrl.scheduler.epoch_step()
    assert_strip_equals(ctrl, model, X)


@needs_rb
def test_rb_with_a_tiny_lr_multiplier_is_a_config_error() -> None:
    recipe = {"compression": {**RB, "compression_lr_multiplier": 1e-300}}
    with pytest.raises(ConfigError, match=r"compression_lr_multiplier: 1e-300 must be >= 0.001"):
        compress.create_compressed_model(ConvBNNet(), recipe, X)


def test_resumable_loader_helper_is_importable() -> None:
    # The Lightning tests here reuse test_resume's loader; keep the dependency visible.
    assert len(resumable_loader()) == 8
