import copy
import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import LitClassifier, lenet, loader16, quiet_trainer
from torch import nn

import compress
from callbacks import CompressionCallback
from compress import masks
from compress.errors import CompressError
from compress.sparsity.rb import adaptive_level
from compress.sparsity.rb_mask import INIT_LOGIT, LOGIT, NOISE_EPS, SEED

CONFIGS = Path(__file__).parent.parent / "configs"


def rb(sparsity_init: float = 0.0, multiplier: float | None = None, **params: object) -> dict:
    algo: dict = {"algorithm": "rb_sparsity", "sparsity_init": sparsity_init, "params": params}
    if multiplier is not None:
        algo["compression_lr_multiplier"] = multiplier
    return {"compression": algo}


def _set_logits(layer: nn.Module, values: list) -> None:  # type: ignore[type-arg]
    with torch.no_grad():
        getattr(layer, LOGIT).copy_(torch.tensor(values))


def _one_layer(**kw: object) -> tuple:  # type: ignore[type-arg]
    net = nn.Sequential(nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[0.5, -2.0]]))
    ctrl, net = compress.create_compressed_model(net, rb(**kw))  # type: ignore[arg-type]
    _set_logits(net[0], [[2.0, -1.0]])
    return ctrl, net


# --- parameters, checkpoints ----------------------------------------------------------------


def test_logits_are_parameters_but_not_in_state_dict() -> None:
    net = lenet()
    keys = list(net.state_dict())
    ctrl, net = compress.create_compressed_model(net, rb())
    names = [n for n, _ in net.named_parameters()]
    assert [n for n in names if n.endswith(LOGIT)] == [f"{i}.{LOGIT}" for i in (0, 2, 4)]
    assert torch.all(net[2].weight_rb_logit == INIT_LOGIT)
    assert torch.sigmoid(net[2].weight_rb_logit[0, 0]).item() == pytest.approx(0.99)
    assert list(net.state_dict()) == keys
    # Plain checkpoints load strictly both ways and leave the logits alone.
    _set_logits(net[4], torch.full((10, 100), -1.5).tolist())
    net.load_state_dict(lenet().state_dict())
    assert torch.all(net[4].weight_rb_logit == -1.5)
    lenet().load_state_dict(net.state_dict())


def test_strip_folds_the_deterministic_mask_and_removes_logits() -> None:
    ctrl, net = _one_layer()
    plain = ctrl.strip()
    assert [n for n, _ in plain.named_parameters()] == ["0.weight"]
    assert list(plain.state_dict()) == ["0.weight"]
    assert plain[0].weight.tolist() == [[0.5, 0.0]]
    layer = plain[0]
    assert not layer._forward_pre_hooks and not layer._forward_hooks
    assert not layer._state_dict_hooks and not layer._load_state_dict_pre_hooks
    assert not [k for k in vars(layer) if k.startswith("_compress")]
    # The compressed model is untouched and still learns.
    assert hasattr(net[0], LOGIT) and net[0].weight.tolist() == [[0.5, -2.0]]


# --- loss and gradients -----------------------------------------------------------------------


def test_loss_and_its_gradient_for_known_logits() -> None:
    net = nn.Sequential(nn.Linear(2, 2, bias=False))
    ctrl, net = compress.create_compressed_model(net, rb(sparsity_init=0.3))
    _set_logits(net[0], [[1.0, -1.0], [2.0, -3.0]])  # density 0.5, target density 0.7
    loss = ctrl.loss()
    assert loss.item() == pytest.approx(16.0, abs=1e-4)
    loss.backward()
    # d/ds ((d - 0.7) / 0.05) ** 2 = 2 * (0.5 - 0.7) / 0.05 ** 2 * sigmoid'(s) / 4
    expected = [-7.8644773, -7.8644773, -4.1997434, -1.8070664]
    assert net[0].weight_rb_logit.grad.flatten().tolist() == pytest.approx(expected, abs=1e-5)


def test_local_mode_drives_every_layer_global_mode_the_total() -> None:
    def build(mode: str) -> tuple:  # type: ignore[type-arg]
        net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        ctrl, net = compress.create_compressed_model(
            net, rb(sparsity_init=0.5, sparsity_level_setting_mode=mode)
        )
        _set_logits(net[0], [[1.0] * 4] * 4)  # dense
        _set_logits(net[1], [[1.0, -1.0] * 2] * 4)  # exactly at the level
        return ctrl, net

    ctrl, _ = build("global")
    assert ctrl.loss().item() == pytest.approx(25.0)  # ((0.75 - 0.5) / 0.05) ** 2
    ctrl, net = build("local")
    assert ctrl.loss().item() == pytest.approx(50.0)  # mean of 100 and 0
    ctrl.loss().backward()
    assert torch.all(net[1].weight_rb_logit.grad == 0)  # the layer at its level is left alone
    assert torch.all(net[0].weight_rb_logit.grad > 0)


def test_straight_through_gradient_in_eval_mode() -> None:
    ctrl, net = _one_layer()
    net.eval()
    x = torch.tensor([[1.0, 3.0]])
    out = net(x)
    assert out.item() == 0.5  # the second weight is dropped
    out.backward()
    assert net[0].weight.grad.tolist() == [[1.0, 0.0]]
    # x * w * sigmoid'(s)
    grad = net[0].weight_rb_logit.grad.flatten().tolist()
    assert grad == pytest.approx([0.0524968, -1.1796716], abs=1e-6)


def test_training_masks_sample_logistic_noise_from_the_seeded_generator() -> None:
    ctrl, net = _one_layer()
    x = torch.tensor([[1.0, 3.0]])
    gen = torch.Generator().manual_seed(SEED)
    for _ in range(5):
        u = torch.empty(1, 2).uniform_(generator=gen)
        z = torch.tensor([[2.0, -1.0]]) + torch.logit(u, eps=NOISE_EPS)
        keep = (torch.sigmoid(z) > 0.5).float()
        slope = torch.sigmoid(z) * (1 - torch.sigmoid(z))
        net[0].weight_rb_logit.grad = None
        out = net(x)
        assert out.item() == pytest.approx(float((torch.tensor([0.5, -6.0]) * keep).sum()))
        out.backward()
        expected = torch.tensor([[0.5, -6.0]]) * slope
        assert torch.allclose(net[0].weight_rb_logit.grad, expected, atol=1e-7)


def test_compression_lr_multiplier_moves_the_logits_faster() -> None:
    steps = {}
    for k in (1.0, 4.0):
        ctrl, net = _one_layer(multiplier=k)
        _set_logits(net[0], [[2.0 / k, -1.0 / k]])  # same logits (2, -1) as stored / k
        net.eval()
        net(torch.tensor([[1.0, 3.0]])).backward()
        # The stored parameter receives the logit's own gradient, whatever k.
        grad = net[0].weight_rb_logit.grad
        assert grad.flatten().tolist() == pytest.approx([0.0524968, -1.1796716], abs=1e-6)
        for opt_cls in (torch.optim.SGD, torch.optim.Adam):
            theta = net[0].weight_rb_logit.detach().clone().requires_grad_()
            opt = opt_cls([theta], lr=0.01)
            theta.grad = grad.clone()
            opt.step()
            steps[(k, opt_cls.__name__)] = (theta.detach() - net[0].weight_rb_logit) * k
    for name in ("SGD", "Adam"):
        assert torch.allclose(steps[(4.0, name)], 4 * steps[(1.0, name)], atol=1e-6)


# --- deterministic masks ------------------------------------------------------------------


def _noisy_net() -> tuple:  # type: ignore[type-arg]
    net = nn.Sequential(nn.Linear(16, 16, bias=False))
    ctrl, net = compress.create_compressed_model(
        net, rb(sparsity_target=0.5, sparsity_target_epoch=1, sparsity_freeze_epoch=2)
    )
    with torch.no_grad():
        net[0].weight_rb_logit.copy_(torch.randn(16, 16) * 0.5)
    return ctrl, net


def test_eval_mode_masks_are_deterministic_training_masks_are_not() -> None:
    ctrl, net = _noisy_net()
    x = torch.randn(4, 16)
    keep = net[0].weight_rb_logit.detach() > 0
    expected = x @ (net[0].weight.detach() * keep).T
    assert not torch.equal(net(x), net(x))
    net.eval()
    assert torch.equal(net(x), expected) and torch.equal(net(x), expected)
    with torch.no_grad():  # statistics and folding see the same mask, in any mode
        net.train()
        assert torch.equal(masks.effective(net[0]), net[0].weight * keep)
    assert ctrl.statistics().to_dict()["algorithms"][0]["sparsity"] == pytest.approx(
        1 - keep.float().mean().item()
    )


def test_freezing_fixes_the_masks_and_turns_the_loss_off() -> None:
    ctrl, net = _noisy_net()
    x = torch.randn(4, 16)
    keep = net[0].weight_rb_logit.detach() > 0
    ctrl.scheduler.epoch_step()
    ctrl.scheduler.epoch_step()
    assert ctrl.loss() is not None and not ctrl.algorithms[0].frozen
    ctrl.scheduler.epoch_step()  # epoch 2 = sparsity_freeze_epoch
    algo = ctrl.algorithms[0]
    assert algo.frozen and algo.loss() is None and ctrl.loss().item() == 0.0
    assert torch.equal(masks.get_mask(net[0], owner="rb_sparsity"), keep.float())
    expected = x @ (net[0].weight.detach() * keep).T
    out = net(x)
    assert torch.equal(out, expected) and torch.equal(net(x), expected)
    out.sum().backward()
    assert torch.all(net[0].weight_rb_logit.grad == 0)  # present (for DDP) but zero
    with torch.no_grad():
        net[0].weight_rb_logit.neg_()  # logits moving after freezing change nothing
    assert torch.equal(net(x), expected)
    assert algo.statistics()["frozen"] and algo.sparsity() == 1 - keep.float().mean().item()


# --- schedules ------------------------------------------------------------------------------


def test_adaptive_level_for_a_scripted_history() -> None:
    history = [0.0, 0.0, 0.05, 0.085, 0.09, 0.19, 0.2, 0.3, 0.3, 0.35, 0.35]
    level, count, levels = 0.0, 0, []
    for s in history:
        level, count = adaptive_level(level, count, s, target=0.35, step=0.1, eps=0.02, patience=2)
        levels.append(round(level, 6))
    assert levels == [0.0, 0.1, 0.1, 0.1, 0.2, 0.2, 0.3, 0.3, 0.35, 0.35, 0.35]


def test_adaptive_schedule_through_the_controller() -> None:
    net = nn.Sequential(nn.Linear(10, 10, bias=False))
    ctrl, net = compress.create_compressed_model(
        net, rb(schedule="adaptive", sparsity_target=0.3, step=0.1, eps=0.02, patience=1)
    )
    levels = []
    for reached in (0, 0, 5, 9, 20, 20, 30):
        values = torch.full((100,), 3.0)
        values[:reached] = -3.0
        _set_logits(net[0], values.reshape(10, 10).tolist())
        ctrl.scheduler.epoch_step()
        for _ in range(3):
            ctrl.scheduler.step()  # optimizer steps never move the adaptive level
        levels.append(round(ctrl.compression_level, 6))
    assert levels == [0.1, 0.1, 0.1, 0.2, 0.3, 0.3, 0.3]
    state = ctrl.state_dict()["state"]["rb_sparsity"]
    assert state["level"] == pytest.approx(0.3) and state["reached_epochs"] == 0


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (
            {"schedule": "exponential", "sparsity_target": 0.9, "sparsity_target_epoch": 2},
            [0.0, 0.683772, 0.9, 0.9],
        ),
        (
            {"schedule": "polynomial", "power": 1, "concave": False, "sparsity_target_epoch": 2},
            [0.0, 0.25, 0.5, 0.5],
        ),
        (
            {
                "schedule": "multistep",
                "multistep_steps": [1, 3],
                "multistep_sparsity_levels": [0.1, 0.4, 0.6],
            },
            [0.1, 0.4, 0.4, 0.6],
        ),
    ],
)
def test_schedules_set_the_loss_target(params: dict, expected: list) -> None:  # type: ignore[type-arg]
    net = nn.Sequential(nn.Linear(4, 4, bias=False))
    ctrl, net = compress.create_compressed_model(net, rb(**params))
    levels = []
    for _ in range(4):
        ctrl.scheduler.epoch_step()
        levels.append(round(ctrl.compression_level, 6))
        # all logits positive: density 1, so the loss is ((1 - (1 - level)) / 0.05) ** 2
        assert ctrl.loss().item() == pytest.approx((ctrl.compression_level / 0.05) ** 2)
    assert levels == expected


# --- state, DDP -------------------------------------------------------------------------------


def _train(net: nn.Module, ctrl, steps: int, seed: int = 1) -> None:  # type: ignore[no-untyped-def]
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = net(torch.randn(8, 64, generator=gen)).pow(2).mean() + ctrl.loss()
        loss.backward()
        opt.step()
        opt.zero_grad()
        ctrl.scheduler.step()


def test_every_rank_draws_the_same_masks() -> None:
    torch.manual_seed(3)
    a = lenet()
    b = copy.deepcopy(a)
    ctrl_a, a = compress.create_compressed_model(a, rb(sparsity_init=0.5, multiplier=50))
    torch.manual_seed(4)  # ranks differ in their global random state
    ctrl_b, b = compress.create_compressed_model(b, rb(sparsity_init=0.5, multiplier=50))
    _train(a, ctrl_a, 6)
    _train(b, ctrl_b, 6)
    assert ctrl_a.algorithms[0].sparsity() > 0
    for la, lb in zip(a, b):
        if isinstance(la, nn.Linear):
            assert torch.equal(la.weight_rb_logit, lb.weight_rb_logit)


def test_state_round_trip_restores_logits_and_noise() -> None:
    net = lenet()
    ctrl, net = compress.create_compressed_model(net, rb(sparsity_init=0.5, multiplier=50))
    _train(net, ctrl, 4)
    state = copy.deepcopy(ctrl.state_dict())
    weights = copy.deepcopy(net.state_dict())

    fresh = lenet()
    fresh.load_state_dict(weights)
    ctrl2, fresh = compress.create_compressed_model(fresh, rb(sparsity_init=0.5, multiplier=50))
    ctrl2.load_state_dict(state)
    for a, b in zip(net, fresh):
        if isinstance(a, nn.Linear):
            assert torch.equal(a.weight_rb_logit, b.weight_rb_logit)
    x = torch.randn(8, 64)
    for _ in range(3):  # the same noise: identical training-mode outputs
        assert torch.equal(net(x), fresh(x))
    assert torch.equal(
        ctrl.state_dict()["state"]["rb_sparsity"]["generator"],
        ctrl2.state_dict()["state"]["rb_sparsity"]["generator"],
    )


def test_frozen_state_round_trip_and_mismatch() -> None:
    ctrl, net = _noisy_net()
    for _ in range(3):
        ctrl.scheduler.epoch_step()
    state = ctrl.state_dict()
    mask = masks.get_mask(net[0], owner="rb_sparsity").clone()
    ctrl2, net2 = _noisy_net()
    ctrl2.load_state_dict(state)
    assert ctrl2.algorithms[0].frozen
    assert torch.equal(masks.get_mask(net2[0], owner="rb_sparsity"), mask)
    other, _ = compress.create_compressed_model(lenet(), rb())
    with pytest.raises(CompressError, match=r"rb_sparsity state does not fit this model"):
        other.load_state_dict(state)


def test_tied_weights_share_one_logit() -> None:
    a, b = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
    b.weight = a.weight
    net = nn.Sequential(a, b)
    ctrl, net = compress.create_compressed_model(net, rb())
    assert a.weight_rb_logit is b.weight_rb_logit
    assert len(list(net.parameters())) == 2
    assert [row["layer"] for row in ctrl.statistics().to_dict()["algorithms"][0]["layers"]] == ["0"]


def test_recipes_in_configs_build() -> None:
    for name in ("rb_sparsity.json", "nncf_rb_sparsity.json"):
        cfg = compress.load_config(CONFIGS / name)
        assert cfg.algorithms[-1].name == "rb_sparsity"
    data = json.loads((CONFIGS / "rb_sparsity.json").read_text())
    ctrl, _ = compress.create_compressed_model(lenet(), data)
    assert ctrl.compression_level == 0.0


# --- Lightning --------------------------------------------------------------------------------


def _lit() -> LitClassifier:
    return LitClassifier(optimizer=torch.optim.Adam, lr=0.01)


LIT_RECIPE = rb(
    multiplier=100,
    schedule="exponential",
    sparsity_target=0.7,
    sparsity_target_epoch=1,
    update_per_optimizer_step=True,
)


def _trainer(root: Path, cb: pl.Callback, epochs: int) -> pl.Trainer:
    return quiet_trainer(root, cb, epochs=epochs, devices=1, logger=False)


def test_lightning_fit_adds_the_loss_and_sparsity_rises(tmp_path: Path) -> None:
    cb = CompressionCallback(LIT_RECIPE, model_attr="model", verbose=False)
    module = _lit()
    _trainer(tmp_path, cb, 2).fit(module, loader16())
    opt = module.optimizers().optimizer
    optimized = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(module.model[0].weight_rb_logit) in optimized
    assert "compression/loss" in module.trainer.callback_metrics
    assert cb.ctrl.compression_level == pytest.approx(0.7)
    assert cb.ctrl.algorithms[0].sparsity() > 0.3
    assert not any(k.endswith(LOGIT) for k in module.state_dict())


def test_lightning_resume_restores_logits_exactly(tmp_path: Path) -> None:
    straight = CompressionCallback(LIT_RECIPE, model_attr="model", verbose=False)
    module = _lit()
    _trainer(tmp_path / "a", straight, 2).fit(module, loader16())

    torch.manual_seed(0)
    first = CompressionCallback(LIT_RECIPE, model_attr="model", verbose=False)
    _trainer(tmp_path / "b", first, 1).fit(_lit(), loader16())
    (ckpt,) = list((tmp_path / "b").rglob("*.ckpt"))
    saved = torch.load(ckpt, weights_only=True)
    assert not any(k.endswith(LOGIT) for k in saved["state_dict"])
    resumed = CompressionCallback(LIT_RECIPE, model_attr="model", verbose=False)
    module2 = _lit()
    _trainer(tmp_path / "c", resumed, 2).fit(module2, loader16(), ckpt_path=ckpt)
    for a, b in zip(module.model, module2.model):
        if isinstance(a, nn.Linear):
            assert torch.equal(a.weight_rb_logit, b.weight_rb_logit)
            assert torch.equal(a.weight, b.weight)
