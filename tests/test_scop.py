"""SCOP (``filter_importance: scop``): the knockoff phase mixes real and knockoff features with a
learned coefficient per filter, the user's batch stays its own, and the lowest coefficients
are the filters pruned."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from conftest import ConvBNNet, fit_quietly, quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import compress
from callbacks import CompressionCallback
from compress.errors import ConfigError
from compress.pruning.filter_pruning import FilterPruning
from compress.pruning.scop import KNOCKOFFS, Scop
from compress.recipe.config import schema

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
pytestmark = pytest.mark.usefixtures("one_thread")


def recipe(num_init_steps: int = 2, **params: Any) -> dict:
    return {
        "compression": {
            "algorithm": "filter_pruning",
            "pruning_init": 0.5,
            "params": {
                "schedule": "baseline",
                "pruning_target": 0.5,
                "num_init_steps": num_init_steps,
                "filter_importance": "scop",
                "round_to": 1,
                "prune_first_conv": True,
                **params,
            },
        }
    }


class PlainCNN(nn.Module):
    """Two conv-ReLU stages without BatchNorm, and a linear head on the channel means."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


MODELS = [pytest.param(ConvBNNet, id="batchnorm"), pytest.param(PlainCNN, id="no-batchnorm")]


def scop_of(ctrl: compress.CompressionController) -> Scop:
    algo = ctrl.algorithms[0]
    assert isinstance(algo, FilterPruning) and algo.scop is not None
    return algo.scop


def test_mixing_rule_on_a_hand_built_conv() -> None:
    """real <- k * real + (1 - k) * knockoff, per output channel; the knockoff half passes."""
    first = nn.Conv2d(2, 2, 1, bias=False)
    head = nn.Conv2d(2, 1, 1, bias=False)
    with torch.no_grad():
        first.weight.copy_(torch.eye(2).reshape(2, 2, 1, 1))  # conv(x) = x
        head.weight.fill_(1.0)
    model = nn.Sequential(first, head)
    ctrl, _ = compress.create_compressed_model(model, recipe(), torch.zeros(1, 2, 1, 1))
    scop = scop_of(ctrl)
    assert sorted(scop.coefficients) == ["0"]
    with torch.no_grad():
        scop.coefficients["0"].copy_(torch.tensor([0.25, 1.0]))
    ctrl.scheduler.epoch_step()  # the knockoff phase starts: its hooks come first
    seen: dict[str, torch.Tensor] = {}
    first.register_forward_pre_hook(lambda m, a: seen.update(inputs=a[0].detach().clone()))
    first.register_forward_hook(lambda m, a, out: seen.update(out=out.detach().clone()))
    x = torch.tensor([1.0, 10.0, 2.0, 20.0, 3.0, 30.0, 4.0, 40.0]).reshape(4, 2, 1, 1)
    out = model(x)

    inputs = seen["inputs"].flatten(1)
    real, knockoff = inputs[:4], inputs[4:]
    assert torch.equal(real, x.flatten(1))
    assert sorted(knockoff[:, 0].tolist()) == [1.0, 2.0, 3.0, 4.0]  # the batch, permuted
    assert torch.equal(knockoff[:, 1], 10 * knockoff[:, 0])
    mixed = seen["out"].flatten(1)
    assert torch.equal(mixed[4:], knockoff)
    assert torch.allclose(mixed[:4, 0], 0.25 * real[:, 0] + 0.75 * knockoff[:, 0])
    assert torch.equal(mixed[:4, 1], real[:, 1])  # k = 1: the real feature alone
    assert out.shape == (4, 1, 1, 1)  # cut back to the real half
    assert torch.allclose(out.flatten(), mixed[:4].sum(1))
    # The gradient reaches k: d out_i / d k_c = real - knockoff of channel c.
    out.sum().backward()
    grad = scop.coefficients["0"].grad
    assert grad is not None
    assert torch.allclose(grad, (real - knockoff).sum(0))


class DictModel(nn.Module):
    """Keyword inputs and a dict output with a per-sample tensor and a scalar."""

    def __init__(self) -> None:
        super().__init__()
        self.net = ConvBNNet()

    def forward(
        self, x: torch.Tensor, weight: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        logits = self.net(x)
        weight = torch.ones(len(x)) if weight is None else weight
        return {"logits": logits, "weighted": (logits.sum(1) * weight).mean()}


def test_keyword_inputs_and_dict_outputs_are_doubled_and_cut() -> None:
    model = DictModel()
    ctrl, _ = compress.create_compressed_model(model, recipe(), torch.zeros(1, 3, 8, 8))
    ctrl.scheduler.epoch_step()
    seen: list[torch.Tensor] = []
    model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["weight"].clone()), with_kwargs=True
    )
    weight = torch.arange(4.0)
    out = model(torch.randn(4, 3, 8, 8), weight=weight)
    assert out["logits"].shape == (4, 2) and out["weighted"].shape == ()
    assert torch.equal(seen[0][:4], weight) and sorted(seen[0][4:].tolist()) == [0, 1, 2, 3]


def test_outside_training_the_model_is_plain() -> None:
    model = ConvBNNet()
    ctrl, _ = compress.create_compressed_model(model, recipe(), torch.zeros(1, 3, 8, 8))
    ctrl.scheduler.epoch_step()
    x = torch.randn(4, 3, 8, 8)
    sizes: list[int] = []
    model.conv2.register_forward_pre_hook(lambda m, a: sizes.append(a[0].shape[0]))
    model.eval()
    model(x)
    model.train()
    with torch.no_grad():
        model(x)
    model(x)
    assert sizes == [4, 4, 8]


class Lit(pl.LightningModule):
    """A user's module: records what training_step sees."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.example_input_array = torch.zeros(2, 3, 8, 8)
        self.batch_sizes: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        logits = self(x)
        self.batch_sizes.append((x.shape[0], logits.shape[0]))
        return nn.functional.cross_entropy(logits, y)

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def loader(n: int = 48, batch: int = 8) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 8, 8, generator=gen)
    y = (x[:, 0].mean((1, 2)) > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=batch)


@pytest.mark.parametrize("model_cls", MODELS)
def test_training_step_sees_its_own_batch_and_only_k_learns(model_cls: Any, tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    module = Lit(model_cls())
    before = {n: t.clone() for n, t in module.model.state_dict().items()}
    inner: list[int] = []
    cb = CompressionCallback(
        recipe(scop_lr=0.05),
        model_attr="model",
        verbose=False,
        export_dir=tmp_path / "exports",
        export_formats=["pruned"],
    )
    trainer = quiet_trainer(tmp_path, cb, epochs=3, logger=False)
    epoch_weights: list[dict[str, torch.Tensor]] = []

    class Snapshot(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            conv2 = module.model.conv2
            conv2.register_forward_pre_hook(
                lambda m, a: inner.append(a[0].shape[0]) if m.training else None
            )

        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            epoch_weights.append({n: t.clone() for n, t in module.model.state_dict().items()})

    trainer.callbacks.append(Snapshot())  # type: ignore[attr-defined]
    fit_quietly(trainer, module, loader())

    assert module.batch_sizes == [(8, 8)] * 18  # 6 steps x 3 epochs, its own batch size
    assert inner[:12] == [16] * 12 and inner[12:] == [8] * 6  # doubled in the 2 knockoff epochs
    # The knockoff phase changed no weight and no running statistic; then training resumed.
    for n, t in before.items():
        assert torch.equal(epoch_weights[1][n], t), n
    assert not torch.equal(epoch_weights[2]["conv2.weight"], before["conv2.weight"])
    assert all(p.requires_grad for p in module.model.parameters())
    # The coefficients learned, stayed out of the user's optimizer and out of the model.
    assert cb.ctrl is not None
    scop = scop_of(cb.ctrl)
    assert scop.phase == "done"
    k = torch.cat([c.detach() for c in scop.coefficients.values()])
    assert (k != 0.5).all() and (k >= 0).all() and (k <= 1).all()
    user_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert not user_params & {id(c) for c in scop.coefficients.values()}
    assert sorted(module.model.state_dict()) == sorted(before)
    # The lowest coefficients are the pruned filters.
    algo = cb.ctrl.algorithms[0]
    assert isinstance(algo, FilterPruning)
    for layer in ("conv1", "conv2"):
        coeff = scop.coefficients[layer].detach()
        kept = algo.keep[layer]
        assert int(kept.sum()) == coeff.numel() // 2
        assert coeff[kept].min() >= coeff[~kept].max()
    # The export rebuilds the small model from a fresh instance; it computes what was trained.
    small = compress.load_pruned(model_cls(), cb.exported["pruned"]).eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(small(x), module.model.eval()(x), atol=1e-5)


@pytest.mark.parametrize("model_cls", MODELS)
def test_strip_equals_masked(model_cls: Any) -> None:
    model = model_cls()
    ctrl, _ = compress.create_compressed_model(model, recipe(1), torch.zeros(1, 3, 8, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(16, 3, 8, 8)
    y = (x[:, 0].mean((1, 2)) > 0).long()

    def epoch() -> None:
        ctrl.scheduler.epoch_step()
        for i in range(0, 16, 4):
            nn.functional.cross_entropy(model(x[i : i + 4]), y[i : i + 4]).backward()
            opt.step()
            opt.zero_grad()
            ctrl.scheduler.step()

    epoch()  # the knockoff phase: the stripped copy has no hooks and trains
    mid = ctrl.strip().train()
    assert all(p.requires_grad for p in mid.parameters())
    sizes: list[int] = []
    mid.conv2.register_forward_pre_hook(lambda m, a: sizes.append(a[0].shape[0]))
    mid(x[:4])
    assert sizes == [4]
    epoch()  # pruned
    plain = ctrl.strip()
    assert plain.conv2.out_channels == 8
    model.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), plain(x), atol=1e-5)


def test_coupled_layers_sum_their_coefficients_and_lowest_are_pruned() -> None:
    from conftest import BasicBlock

    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), BasicBlock(8, 8, 1), BasicBlock(8, 16, 2))
    net.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2)))
    rec = recipe(1, prune_downsample_convs=True)
    ctrl, _ = compress.create_compressed_model(net, rec, torch.zeros(1, 3, 8, 8))
    scop = scop_of(ctrl)
    algo = ctrl.algorithms[0]
    assert isinstance(algo, FilterPruning)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for k in scop.coefficients.values():
            k.copy_(torch.rand(k.shape, generator=gen))
    ctrl.scheduler.epoch_step()  # the knockoff phase (no training here)
    ctrl.scheduler.epoch_step()  # ends it: the coefficients are the scores
    assert scop.phase == "done"
    coupled = [g for g in algo.groups if len(_producers(g)) > 1]
    assert coupled, "the residual adds couple several convolutions"
    for g in algo.groups:
        total = torch.zeros(g.size)
        for m in _producers(g):
            total.index_add_(0, m.channel, scop.coefficients[m.module_name].detach()[m.index])
        kept = algo.keep[g.name]
        assert int(kept.sum()) == g.size - g.size // 2
        assert total[kept].min() >= total[~kept].max(), g.name


def _producers(group: Any) -> list[Any]:
    return [m for m in group.members if m.role == "producer" and m.param_name == "weight"]


def test_recipe_errors() -> None:
    with pytest.raises(ConfigError, match=r"num_init_steps: .*'scop'.* is 0; set it to 1"):
        compress.create_compressed_model(ConvBNNet(), recipe(0), torch.zeros(1, 3, 8, 8))
    only_head = recipe()
    only_head["compression"]["target_scopes"] = ["fc"]  # its channels are the model's output
    with pytest.raises(ConfigError, match=r"'scop' found no conv or linear layer whose output"):
        compress.create_compressed_model(ConvBNNet(), only_head, torch.zeros(1, 3, 8, 8))
    with pytest.raises(ConfigError, match=r'scop_knockoff: "gaussian" is not allowed; one of "p'):
        compress.load_config(recipe(scop_knockoff="gaussian"))
    props = schema()["$defs"]["filter_pruning"]["properties"]["params"]["properties"]
    assert props["scop_knockoff"]["enum"] == list(KNOCKOFFS)


def test_shipped_recipe_builds_on_the_digits_cnn() -> None:
    cfg = compress.load_config(CONFIGS / "scop_filter_pruning.json")
    params = json.loads((CONFIGS / "scop_filter_pruning.json").read_text())["compression"]["params"]
    assert params["filter_importance"] == "scop" and params["pruning_target"] == 0.45
    net = nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    ctrl, _ = compress.create_compressed_model(net, cfg)
    assert sorted(scop_of(ctrl).coefficients) == ["3"]  # not the first conv
