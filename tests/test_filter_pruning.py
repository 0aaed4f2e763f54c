"""Filter pruning: schedule, importance, allocation, recipe keys, strip/export, Lightning."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import pytorch_lightning as pl
import torch
from test_structured import KINDS, MHANet, _make, _rel_error
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import compress
from callbacks import CompressionCallback
from compress import masks
from compress.errors import ConfigError
from compress.pruning.channel_groups import build_groups
from compress.pruning.filter_pruning import FilterPruning
from compress.pruning.importance import FILTER_IMPORTANCE, feature_map_nuclear_norms
from compress.pruning.sizes import count_macs_params
from compress.pruning.structured import OWNER
from compress.recipe.scopes import parse_channels
from compress.schedules import pruning_level

ALL = {"prune_first_conv": True, "prune_downsample_convs": True}


def recipe(init: float = 0.0, **params: Any) -> dict[str, Any]:
    return {"compression": {"algorithm": "filter_pruning", "pruning_init": init, "params": params}}


def compressed(
    model: nn.Module, x: torch.Tensor, *, epochs: int = 0, **kw: Any
) -> tuple[Any, FilterPruning]:
    """The controller and its algorithm after ``epochs`` epoch steps (as NNCF 2.17, a model is
    built at pruning_init; a baseline schedule reaches its target at the first epoch step)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctrl, _ = compress.create_compressed_model(model, recipe(**kw), x)
        for _ in range(epochs):
            ctrl.scheduler.epoch_step()
    return ctrl, ctrl.algorithms[0]


def kept(algo: FilterPruning) -> dict[str, int]:
    return {name: int(k.sum()) for name, k in algo.keep.items()}


def wide() -> tuple[nn.Module, torch.Tensor]:
    """One prunable 64-wide group, named "0"."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(), nn.Conv2d(64, 4, 1))
    return model, torch.randn(1, 3, 6, 6)


# --- schedule ----------------------------------------------------------------------------


def test_exponential_schedule_boundaries_and_freeze() -> None:
    model, x = wide()
    ctrl, algo = compressed(
        model, x, init=0.1, pruning_target=0.5, num_init_steps=1, pruning_steps=3, round_to=1, **ALL
    )
    seen = [(algo.level, kept(algo)["0"], algo.frozen)]
    for _ in range(6):
        ctrl.scheduler.epoch_step()
        seen.append((algo.level, kept(algo)["0"], algo.frozen))
        ctrl.scheduler.step()  # optimizer steps never move filter pruning
        assert seen[-1] == (algo.level, kept(algo)["0"], algo.frozen)
    # NNCF 2.17: built at pruning_init; the target at epoch num_init_steps + pruning_steps - 1
    expected = [
        (pytest.approx(0.1), 58, False),  # construction: pruning_init, ceil(57.6) kept
        (0.0, 64, False),  # epoch 0: inside num_init_steps
        (pytest.approx(0.1), 58, False),  # epoch 1 = num_init_steps: pruning_init
        (pytest.approx(1 - 0.9 * (0.5 / 0.9) ** 0.5), 43, False),  # ceil(42.93) kept
        (0.5, 32, False),  # epoch 3 = num_init_steps + pruning_steps - 1: the target
        (0.5, 32, True),  # epoch 4 = num_init_steps + pruning_steps: frozen
        (0.5, 32, True),
    ]
    assert seen == expected
    # Frozen masks ignore the weights.
    before = algo.keep["0"].clone()
    with torch.no_grad():
        model[0].weight.mul_(torch.linspace(3, 0.1, 64).view(64, 1, 1, 1))
    ctrl.scheduler.epoch_step()
    assert torch.equal(algo.keep["0"], before)


def test_baseline_and_exponential_with_bias_boundaries() -> None:
    model, x = wide()
    ctrl, algo = compressed(
        model, x, pruning_target=0.4, schedule="baseline", num_init_steps=2, round_to=1, **ALL
    )
    levels = []
    for _ in range(4):
        ctrl.scheduler.epoch_step()
        levels.append((algo.level, algo.frozen))
    assert levels == [(0.0, False), (0.0, False), (0.4, True), (0.4, True)]

    model, x = wide()
    ctrl, algo = compressed(
        model,
        x,
        init=0.1,
        pruning_target=0.5,
        schedule="exponential_with_bias",
        pruning_steps=8,
        **ALL,
    )
    levels = []
    for _ in range(10):
        ctrl.scheduler.epoch_step()
        levels.append(algo.level)
    assert levels[0] == pytest.approx(0.1)  # a + b = init
    # NNCF's equations with E = pruning_steps - 1 = 7: 3/4 of the target at E / 8
    params = {**algo.params, "pruning_target": 0.5}
    assert pruning_level(params, 0.1, 7 / 8) == pytest.approx(0.375, abs=1e-9)
    assert levels[1] == pytest.approx(0.3941392, abs=1e-6)
    assert levels[6] < 0.5 and levels[7] == pytest.approx(0.5)  # the target at pruning_steps - 1
    assert levels[8:] == [0.5, 0.5]
    assert algo.frozen


def test_state_dict_resumes_exactly() -> None:
    model, x = _make("resnet")
    ctrl, algo = compressed(model, x, init=0.2, pruning_target=0.5, pruning_steps=4, **ALL)
    for _ in range(2):
        ctrl.scheduler.epoch_step()
    state = ctrl.state_dict()
    model2, _ = _make("resnet", seed=5)
    ctrl2, algo2 = compressed(model2, x, init=0.2, pruning_target=0.5, pruning_steps=4, **ALL)
    ctrl2.load_state_dict(state)
    assert (algo2.level, algo2.frozen, kept(algo2)) == (algo.level, algo.frozen, kept(algo))
    for (_, _, _, a), (_, _, _, b) in zip(masks.iter_masked(model), masks.iter_masked(model2)):
        assert torch.equal(a, b)


# --- every model kind: masked == stripped, params, round trips ---------------------------


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_strip_matches_masked_and_round_trips(kind: str, tmp_path: Path) -> None:
    model, x = _make(kind)
    dense_params = sum(p.numel() for p in model.parameters())
    ctrl, algo = compressed(
        model, x, pruning_target=0.5, schedule="baseline", round_to=1, epochs=1, **ALL
    )
    assert all(n == (k.numel() + 1) // 2 for n, k in zip(kept(algo).values(), algo.keep.values()))
    with torch.no_grad():
        want = model(x)
    plain = ctrl.strip().eval()
    assert not list(masks.iter_masked(plain))
    with torch.no_grad():
        assert _rel_error(want, plain(x)) <= 1e-5
    macs, params = count_macs_params(plain, x)
    assert (macs, params) == algo.macs_params(algo.keep)  # counted without shrinking
    assert params < 0.85 * dense_params
    paths = compress.export(plain, tmp_path / "m", ["pruned", "pt2"], example_inputs=x)
    fresh, _ = _make(kind, seed=7)
    loaded = compress.load_pruned(fresh, paths["pruned"]).eval()
    program = torch.export.load(str(paths["pt2"])).module()
    with torch.no_grad():
        assert torch.equal(loaded(x), plain(x))
        assert _rel_error(want, program(x)) <= 1e-5


# --- FLOPs target, rounding, at least one channel, unsupported groups -----------------------


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_flops_target_is_reached_within_two_percent(allocation: str) -> None:
    model, x = _make("resnet")
    dense_macs, _ = count_macs_params(model, x)
    ctrl, algo = compressed(
        model,
        x,
        pruning_flops_target=0.5,
        schedule="baseline",
        round_to=1,
        allocation=allocation,
        epochs=1,
        **ALL,
    )
    macs, _ = count_macs_params(ctrl.strip(), x)
    assert 1 - macs / dense_macs == pytest.approx(0.5, abs=0.02)
    assert algo.level == 0.5
    # Fewer filters than MACs go (a layer loses inputs and outputs). NNCF's searches: uniform
    # bisection keeps ratio 0.3125; the global ranking of normalised weights prunes filter by
    # filter (layer2.conv1 the most, the stem none) until fewer MACs than half remain.
    assert algo.ratio == (0.3125 if allocation == "uniform" else pytest.approx(0.34375))
    assert 1 - macs / dense_macs > 0.5  # NNCF stops at the first result past the target


def test_round_to() -> None:
    model, x = wide()
    _, algo = compressed(model, x, pruning_target=0.3, schedule="baseline", epochs=1, **ALL)
    assert kept(algo) == {"0": 48}  # NNCF: 64 - 19.2 = 44.8 kept, rounded up to 48
    _, algo = compressed(wide()[0], x, pruning_target=0.6, schedule="baseline", epochs=1, **ALL)
    assert kept(algo) == {"0": 32}  # 25.6 rounded up (nearest rounding keeps 24)
    _, algo = compressed(
        wide()[0], x, pruning_target=0.6, schedule="baseline", epochs=1, rounding="nearest", **ALL
    )
    assert kept(algo) == {"0": 24}  # 64 - floor(38.4) = 26, to the nearest multiple of 8
    _, algo = compressed(
        wide()[0], x, pruning_target=0.3, schedule="baseline", round_to=1, epochs=1, **ALL
    )
    assert kept(algo) == {"0": 45}


def test_at_least_one_channel_remains_in_a_global_ranking() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 16, 1, bias=False), nn.ReLU(), nn.Conv2d(16, 4, 1, bias=False), nn.ReLU()
    )
    model.append(nn.Conv2d(4, 2, 1))
    nn.init.ones_(model[0].weight)  # L1 3 per channel, unit-normed 0.25
    nn.init.ones_(model[2].weight)  # L1 16 per channel, unit-normed 0.5
    _, algo = compressed(
        model,
        torch.randn(1, 3, 4, 4),
        pruning_target=0.9,
        schedule="baseline",
        filter_importance="L1",
        all_weights=True,
        round_to=1,
        epochs=1,
        **ALL,
    )
    # NNCF's threshold is the score at index int(0.9 * 20) = 18 of the sorted scores (0.5) and
    # only scores below it go: all 16 of group "0", none of the tied "2". NNCF would leave
    # group "0" empty; ours keeps its round_to (1) best.
    assert kept(algo) == {"0": 1, "2": 4}


def test_unsupported_group_warns_and_the_rest_prunes() -> None:
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="MultiheadAttention: removing embedding channels"):
        compress.create_compressed_model(
            MHANet(), recipe(pruning_target=0.5, schedule="baseline"), torch.randn(2, 5, 12)
        )


def test_example_inputs_are_required() -> None:
    with pytest.raises(ConfigError, match="pass example_inputs to create_compressed_model or"):
        compress.create_compressed_model(wide()[0], recipe())


# --- importance criteria ------------------------------------------------------------------


def test_criteria_rank_hand_made_filters_differently() -> None:
    model = nn.Sequential(nn.Conv2d(2, 4, 1, bias=False), nn.ReLU(), nn.Conv2d(4, 1, 1))
    with torch.no_grad():
        filters = torch.tensor([[3.0, 0.0], [2.0, 2.0], [0.0, 2.5], [-1.0, -1.0]])
        model[0].weight.copy_(filters.view(4, 2, 1, 1))
    (group,) = build_groups(model, torch.randn(1, 2, 3, 3), prune_first_conv=True)
    scores = {name: fn(model, group) for name, fn in FILTER_IMPORTANCE.items()}
    assert scores["L1"].tolist() == [3.0, 4.0, 2.5, 2.0]
    assert torch.allclose(scores["L2"], torch.tensor([3.0, 8**0.5, 2.5, 2**0.5]))
    assert torch.allclose(scores["geometric_median"], torch.cdist(filters, filters).sum(1))
    order = {name: torch.argsort(s, descending=True).tolist() for name, s in scores.items()}
    assert order == {"L1": [1, 0, 2, 3], "L2": [0, 1, 2, 3], "geometric_median": [3, 0, 2, 1]}


def test_nuclear_norm_of_known_feature_maps() -> None:
    fmap = torch.zeros(2, 2, 2, 2)
    fmap[0, 0] = torch.tensor([[3.0, 0.0], [0.0, 1.0]])  # singular values 3, 1
    fmap[1, 0] = torch.tensor([[0.0, 2.0], [0.0, 0.0]])  # 2
    u, v = torch.tensor([0.6, 0.8]), torch.tensor([0.8, -0.6])
    fmap[0, 1] = 5 * torch.outer(u, v)  # rank one, singular value 5
    assert torch.allclose(feature_map_nuclear_norms(fmap, 1), torch.tensor([6.0, 5.0]))
    tokens = torch.tensor([[[3.0, 1.0], [4.0, 0.0]]])  # (batch, tokens, channels)
    assert torch.allclose(feature_map_nuclear_norms(tokens, -1), torch.tensor([5.0, 1.0]))


def _nuclear_norm_net() -> tuple[nn.Module, Any, Any]:
    """Channels 1 and 3 win on the example input, 0 and 2 on the calibration batches."""
    model = nn.Sequential(nn.Linear(2, 4, bias=False), nn.ReLU(), nn.Linear(4, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0], [0, 1], [2, 0], [0, 3]]))
    ctrl, algo = compressed(
        model,
        torch.tensor([[0.0, 10.0]]),
        pruning_target=0.5,
        schedule="baseline",
        filter_importance="nuclear_norm",
        prune_first_conv=True,  # the first Linear counts as NNCF's first conv
        round_to=1,  # 4 channels: rounded up to 8 they would all stay
        init=0.5,  # built pruned (NNCF builds at pruning_init); the first epoch step rescores
    )
    return model, ctrl, algo


def test_nuclear_norm_follows_the_calibration_data() -> None:
    model, ctrl, algo = _nuclear_norm_net()
    assert algo.keep["0"].tolist() == [False, True, False, True]  # from the example inputs
    algo.calibrate(iter([torch.tensor([[10.0, 0.0]]), (torch.tensor([[1.0, 0.0]]),)]))
    assert algo.calibration["0"].tolist() == [11.0, 0.0, 22.0, 0.0]
    ctrl.scheduler.epoch_step()
    assert algo.keep["0"].tolist() == [True, False, True, False]


# --- recipe keys naming layers -----------------------------------------------------------


def test_prune_channels_parsing_and_errors() -> None:
    assert parse_channels("105, 8, 9, 11-13", "p") == [8, 9, 11, 12, 13, 105]
    assert parse_channels(" 3 - 4 ,4", "p") == [3, 4]
    with pytest.raises(ConfigError, match=r"^p: '8x' is not a channel index or range"):
        parse_channels("1, 8x", "p")
    with pytest.raises(ConfigError, match=r"^p: the range '5-3' is reversed; write '3-5'"):
        parse_channels("5-3", "p")

    model, x = wide()
    _, algo = compressed(model, x, pruning_target=0.5, prune_channels={"0": "1, 3-5"}, **ALL)
    assert torch.nonzero(~algo.keep["0"]).flatten().tolist() == [1, 3, 4, 5]
    path = r'compression\.params\.prune_channels\["0"\]'
    with pytest.raises(
        ConfigError, match=path + r": channel 64 is outside layer '0', which has 64 output"
    ):
        compressed(wide()[0], x, prune_channels={"0": "2, 64"}, **ALL)
    with pytest.raises(ConfigError, match=path + r": prunes all 64 channels of group '0'"):
        compressed(wide()[0], x, prune_channels={"0": "0-63"}, **ALL)
    with pytest.raises(ConfigError, match=r'prune_channels\["conv9"\]: \'conv9\' matches no layer'):
        compressed(wide()[0], x, prune_channels={"conv9": "1"}, **ALL)
    with pytest.raises(ConfigError, match=r'prune_channels\["2"\]: layer \'2\' cannot be pruned'):
        compressed(wide()[0], x, prune_channels={"2": "1"}, **ALL)


def test_layer_ratios_override_the_level() -> None:
    model, x = _make("resnet")
    _, algo = compressed(
        model,
        x,
        pruning_target=0.5,
        schedule="baseline",
        round_to=1,
        layer_ratios={"layer2.conv1": 0.25, "layer1.conv2": 0.75},  # the latter is in "stem"
        epochs=1,
        **ALL,
    )
    assert kept(algo) == {"layer1.conv1": 8, "layer2.conv1": 24, "layer2.conv2": 16, "stem": 4}
    with pytest.raises(ConfigError, match=r'layer_ratios\["fc9"\]: \'fc9\' matches no layer'):
        compressed(_make("resnet")[0], x, layer_ratios={"fc9": 0.5}, **ALL)
    with pytest.raises(ConfigError, match=r"layer_ratios\.stem: 1\.0 must be < 1"):
        compressed(_make("resnet")[0], x, layer_ratios={"stem": 1.0}, **ALL)
    with pytest.raises(ConfigError, match=r"group 'stem' is already set by"):
        compressed(_make("resnet")[0], x, layer_ratios={"stem": 0.1, "layer1.conv2": 0.2}, **ALL)


# --- Lightning ------------------------------------------------------------------------------


class Lit(pl.LightningModule):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.example_input_array = torch.zeros(2, 3, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _fit(tmp_path: Path, model: nn.Module, cb: CompressionCallback, epochs: int = 3) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 8, 8, generator=gen)
    loader = DataLoader(TensorDataset(x, torch.randint(0, 10, (32,), generator=gen)), 8)
    pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        callbacks=[cb],
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(Lit(model), loader)


def _check_exports(model: nn.Module, paths: dict[str, Path], kind: str) -> nn.Module:
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model.eval()(x)
        small = compress.load_pruned(_make(kind, seed=9)[0], paths["pruned"]).eval()
        assert _rel_error(want, small(x)) <= 1e-5
        assert _rel_error(want, torch.export.load(str(paths["pt2"])).module()(x)) <= 1e-5
    return small


def test_lightning_fit_exports_shrunk_model(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    seen: list[int] = []
    original = FilterPruning.calibrate

    def spy(self: FilterPruning, batches: Any) -> None:
        batches = list(batches)
        seen.append(len(batches))
        original(self, batches)

    monkeypatch.setattr(FilterPruning, "calibrate", spy)
    cb = CompressionCallback(
        recipe(
            init=0.25,
            pruning_target=0.5,
            pruning_steps=1,
            filter_importance="nuclear_norm",
            calibration_batches=2,
            round_to=1,
            prune_first_conv=True,
        ),
        export_dir=tmp_path / "out",
        export_formats=["pruned", "pt2", "onnx"],
        model_attr="model",
        verbose=False,
    )
    model, _ = _make("flatten")
    _fit(tmp_path, model.train(), cb, epochs=2)  # level 0.25, then 0.5 and frozen
    assert seen == [2]  # the callback fed two training batches
    algo = cb.ctrl.algorithms[0]
    assert (algo.level, algo.frozen, kept(algo)) == (0.5, True, {"conv1": 4, "conv2": 8, "fc1": 16})
    small = _check_exports(model, cb.exported, "flatten")
    assert small.conv2.out_channels == 8 and small.fc1.in_features == 8 * 16
    x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    session = ort.InferenceSession(str(cb.exported["onnx"]), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x})
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_filter_pruning_with_magnitude_sparsity_end_to_end(tmp_path: Path) -> None:
    combined = {
        "compression": [
            recipe(init=0.5, schedule="baseline", pruning_target=0.5, round_to=1, **ALL)[
                "compression"
            ],
            {"algorithm": "magnitude_sparsity", "sparsity_init": 0.5},
        ]
    }
    cb = CompressionCallback(
        combined,
        export_dir=tmp_path / "out",
        export_formats=["pruned", "pt2", "sparse"],
        model_attr="model",
        verbose=False,
    )
    model, _ = _make("resnet")
    _fit(tmp_path, model.train(), cb, epochs=1)
    conv = model.layer1.conv1
    fp, sparse = masks.get_mask(conv, "weight", OWNER), masks.get_mask(conv, "weight")
    assert fp is not None and sparse is not None and fp is not sparse  # one buffer per algorithm
    small = _check_exports(model, cb.exported, "resnet")
    # The sparse file holds the shrunk model's weights, zeros of magnitude sparsity included.
    reloaded = compress.load_sparse(cb.exported["sparse"], small)
    rows = fp.flatten(1).any(1)
    cols = masks.get_mask(model.stem, "weight", OWNER).flatten(1).any(1)  # layer1.conv1's input
    want = (conv.weight * fp * sparse).detach()[rows][:, cols]
    assert torch.equal(reloaded.layer1.conv1.weight, want)
    assert 0.2 < float((want == 0).float().mean()) < 0.8


def test_combined_sparsity_level_applies_to_the_weights_that_remain() -> None:
    combined = {
        "compression": [
            recipe(init=0.5, schedule="baseline", pruning_target=0.5, round_to=1, **ALL)[
                "compression"
            ],
            {"algorithm": "magnitude_sparsity", "sparsity_init": 0.6},
        ]
    }
    model, x = _make("flatten")
    ctrl, model = compress.create_compressed_model(model, combined, x)
    small = ctrl.strip()
    weights = [m.weight for m in small.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    zeros = sum(int((w == 0).sum()) for w in weights)
    total = sum(w.numel() for w in weights)
    # Filter-pruned filters, and the input slices of removed channels, are not counted against
    # the sparsity budget: the level is met exactly on the weights the shrunk model keeps.
    assert abs(zeros - round(0.6 * total)) <= 1
    for module in model.modules():
        fp, own = masks.get_mask(module, "weight", OWNER), masks.get_mask(module, "weight")
        if fp is not None and own is not None:
            assert torch.all(own[fp == 0] == 1)  # no budget spent on removed filters


def test_calibration_of_a_compiled_model_sees_every_channel() -> None:
    # compiled forward passes read the masks themselves: lifting the masks for the
    # calibration (and putting them back) must reach them too
    torch._dynamo.reset()
    model, ctrl, algo = _nuclear_norm_net()
    model.compile(backend="eager")
    assert algo.keep["0"].tolist() == [False, True, False, True]
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):  # as the callback sets it
        algo.calibrate(iter([torch.tensor([[10.0, 0.0]]), (torch.tensor([[1.0, 0.0]]),)]))
        x = torch.tensor([[1.0, 1.0]])
        assert torch.equal(model(x), model._call_impl(x))  # compiled and eager: the same masks
    assert algo.calibration["0"].tolist() == [11.0, 0.0, 22.0, 0.0]
