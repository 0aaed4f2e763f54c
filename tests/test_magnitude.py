import copy

import pytest
import torch
from conftest import SmallCNN, lenet, magnitude
from torch import nn

import compress
from compress import masks
from compress.errors import CompressError, ConfigError


def _levels(ctrl, epochs: int) -> list[float]:
    out = []
    for _ in range(epochs):
        ctrl.scheduler.epoch_step()
        out.append(round(ctrl.compression_level, 6))
    return out


def _zeros(model: nn.Module) -> int:
    return sum(
        int((masks.effective(m, "weight") == 0).sum()) for _, m, _, _ in masks.iter_masked(model)
    )


def test_state_dict_keys_stay_the_original_ones() -> None:
    net = lenet()
    keys = list(net.state_dict())
    compress.create_compressed_model(net, magnitude(sparsity_init=0.5))
    assert list(net.state_dict()) == keys
    fresh = lenet()
    fresh.load_state_dict(net.state_dict())  # a checkpoint loads into the plain class


@pytest.mark.parametrize("mode", ["global", "local"])
@pytest.mark.parametrize("level", [0.0, 0.3, 0.9, 0.999])
def test_level_reached_within_one_weight(mode: str, level: float) -> None:
    net = lenet()
    ctrl, net = compress.create_compressed_model(
        net, magnitude(sparsity_init=level, sparsity_level_setting_mode=mode)
    )
    total = sum(m.weight.numel() for m in net if isinstance(m, nn.Linear))
    if mode == "global":
        assert abs(_zeros(net) - level * total) <= 1
    else:
        for layer in (net[0], net[2], net[4]):
            z = int((masks.effective(layer) == 0).sum())
            assert abs(z - level * layer.weight.numel()) <= 1


def test_ties_are_pruned_exactly() -> None:
    net = nn.Sequential(nn.Linear(10, 10, bias=False))
    with torch.no_grad():
        net[0].weight.fill_(1.0)
    compress.create_compressed_model(net, magnitude(sparsity_init=0.37, weight_importance="abs"))
    assert int((masks.effective(net[0]) == 0).sum()) == 37


def test_polynomial_schedule_through_the_controller() -> None:
    ctrl, _ = compress.create_compressed_model(
        lenet(),
        magnitude(
            sparsity_init=0.1,
            schedule="polynomial",
            sparsity_target=0.9,
            sparsity_target_epoch=4,
            sparsity_freeze_epoch=6,
            power=1,
            concave=False,
        ),
    )
    assert _levels(ctrl, 7) == [0.1, 0.3, 0.5, 0.7, 0.9, 0.9, 0.9]
    assert ctrl.algorithms[0].frozen


def test_masks_fixed_after_freeze_epoch() -> None:
    ctrl, net = compress.create_compressed_model(
        lenet(),
        magnitude(
            sparsity_init=0.5,
            schedule="multistep",
            multistep_steps=[1],
            multistep_sparsity_levels=[0.5, 0.8],
            sparsity_freeze_epoch=2,
        ),
    )
    ctrl.scheduler.epoch_step()
    ctrl.scheduler.epoch_step()
    mask_before = masks.get_mask(net[0]).clone()
    with torch.no_grad():
        net[0].weight.copy_(torch.randn_like(net[0].weight))  # would move a live mask
    ctrl.scheduler.epoch_step()
    assert torch.equal(masks.get_mask(net[0]), mask_before)


def test_per_step_updates_move_the_level_within_the_epoch() -> None:
    ctrl, _ = compress.create_compressed_model(
        lenet(),
        magnitude(
            schedule="polynomial",
            sparsity_target=0.8,
            sparsity_target_epoch=1,
            power=1,
            concave=False,
            update_per_optimizer_step=True,
            steps_per_epoch=4,
        ),
    )
    ctrl.scheduler.epoch_step()
    seen = []
    for _ in range(4):
        ctrl.scheduler.step()
        seen.append(round(ctrl.compression_level, 6))
    # NNCF 2.17's timing: batch k trains at k / 4 of the way; after the epoch's last step the
    # model stays as its last batch trained it, and 0.8 comes with epoch 1
    assert seen == [0.2, 0.4, 0.6, 0.6]
    ctrl.scheduler.epoch_step()
    assert ctrl.compression_level == pytest.approx(0.8)


def test_compiled_forward_follows_every_mask_update() -> None:
    """Compiled forward passes read the masks themselves (one byte each): after a schedule
    step, a restored state and a mask written by hand they compute what the eager masked model
    computes, without recompiling."""
    from torch._dynamo.utils import counters

    ctrl, net = compress.create_compressed_model(
        lenet(),
        magnitude(
            sparsity_init=0.2,
            schedule="multistep",
            multistep_steps=[1, 2],
            multistep_sparsity_levels=[0.2, 0.5, 0.9],
        ),
    )
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(net, backend="eager")
    x = torch.randn(4, 64)
    first = ctrl.state_dict()
    outputs = []
    for _ in range(3):
        ctrl.scheduler.epoch_step()
        outputs.append(compiled(x))
        assert torch.equal(outputs[-1], net(x))
    assert not torch.equal(outputs[0], outputs[-1])  # the masks moved
    ctrl.load_state_dict(first)
    assert torch.equal(compiled(x), net(x))
    mask = masks.get_mask(net[0])
    assert mask is not None
    mask[0].zero_()
    assert torch.equal(compiled(x), net(x))
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["recompiles"].values()) == 0


def test_pruned_weights_get_zero_gradient() -> None:
    ctrl, net = compress.create_compressed_model(lenet(), magnitude(sparsity_init=0.5))
    net(torch.randn(4, 64)).sum().backward()
    mask = masks.get_mask(net[0])
    assert torch.all(net[0].weight.grad[mask == 0] == 0)
    assert torch.any(net[0].weight.grad[mask == 1] != 0)


def test_straight_through_gives_pruned_weights_the_masked_models_gradient() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 64)
    recipe = magnitude(sparsity_init=0.5, pruned_weights_gradient="straight_through")
    ctrl, net = compress.create_compressed_model(lenet(), recipe)
    mask = masks.get_mask(net[0]).clone()
    out = net(x)
    out.sum().backward()
    # The same function, computed by hand: forward with w * m, gradient taken w.r.t. w * m.
    w = (net[0].weight.detach() * mask).requires_grad_()
    h = torch.relu(x @ w.T + net[0].bias)
    want = net[4](torch.relu(net[2](h)))
    want.sum().backward()
    assert torch.equal(out, want)
    assert torch.allclose(net[0].weight.grad, w.grad, atol=1e-6)
    assert bool((net[0].weight.grad[mask == 0] != 0).any())


def test_straight_through_lets_a_pruned_weight_come_back_until_freeze() -> None:
    recipe = magnitude(
        sparsity_init=0.5,
        schedule="multistep",
        multistep_steps=[1],
        multistep_sparsity_levels=[0.5, 0.5],
        sparsity_freeze_epoch=2,
        pruned_weights_gradient="straight_through",
    )
    ctrl, net = compress.create_compressed_model(lenet(), recipe)
    ctrl.scheduler.epoch_step()  # epoch 0: masks set, still moving
    net(torch.randn(8, 64)).sum().backward()
    learning = (masks.get_mask(net[0]) == 0) & (net[0].weight.grad != 0)
    assert bool(learning.any())  # pruned weights with a gradient
    pruned = learning.nonzero()[0].tolist()
    with torch.no_grad():  # as if its gradient had made it the largest weight
        net[0].weight[tuple(pruned)] = 10.0
    ctrl.scheduler.epoch_step()  # epoch 1: masks recomputed from the raw weights
    assert masks.get_mask(net[0])[tuple(pruned)] == 1
    ctrl.scheduler.epoch_step()  # epoch 2: frozen, gradients are masked again
    net[0].weight.grad = None
    net(torch.randn(2, 64)).sum().backward()
    mask = masks.get_mask(net[0])
    assert torch.all(net[0].weight.grad[mask == 0] == 0)
    # a resumed controller at the frozen state masks gradients too
    other, other_net = compress.create_compressed_model(lenet(), recipe)
    other.load_state_dict(ctrl.state_dict())
    other_net(torch.randn(2, 64)).sum().backward()
    other_mask = masks.get_mask(other_net[0])
    assert torch.all(other_net[0].weight.grad[other_mask == 0] == 0)


def test_strip_equals_masked_model_and_is_plain() -> None:
    net = SmallCNN()
    x = torch.randn(2, 3, 8, 8)
    ctrl, net = compress.create_compressed_model(net, magnitude(sparsity_init=0.7), x)
    net.eval()
    plain = ctrl.strip()
    assert torch.allclose(plain(x), net(x), atol=1e-6)
    for m in plain.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks
        assert not any(b.startswith("_cmask") for b, _ in m.named_buffers())
    assert masks.get_mask(net.conv1) is not None  # the training model keeps its masks
    assert sorted(plain.state_dict()) == sorted(SmallCNN().state_dict())


def test_state_round_trip_resumes_exactly() -> None:
    recipe = magnitude(
        schedule="polynomial",
        sparsity_target=0.9,
        sparsity_target_epoch=3,
        update_per_optimizer_step=True,
        steps_per_epoch=2,
    )
    ctrl, net = compress.create_compressed_model(lenet(), recipe)
    ctrl.scheduler.epoch_step()
    ctrl.scheduler.step()
    state = copy.deepcopy(ctrl.state_dict())
    other_net = lenet()
    other_net.load_state_dict(net.state_dict())
    other, other_net = compress.create_compressed_model(other_net, recipe)
    other.load_state_dict(state)
    for (_, _, _, a), (_, _, _, b) in zip(masks.iter_masked(net), masks.iter_masked(other_net)):
        assert torch.equal(a, b)
    ctrl.scheduler.step()
    other.scheduler.step()
    assert ctrl.compression_level == other.compression_level
    assert ctrl.scheduler.state_dict() == other.scheduler.state_dict()


def test_state_of_another_model_is_refused() -> None:
    ctrl, _ = compress.create_compressed_model(lenet(), magnitude())
    other, _ = compress.create_compressed_model(lenet(inputs=32), magnitude())
    with pytest.raises(
        CompressError, match="layer '0' has shape \\(300, 64\\), the saved mask \\(300, 32\\)"
    ):
        ctrl.load_state_dict(other.state_dict())


def test_scopes_globs_regex_and_validation() -> None:
    net = SmallCNN()
    ctrl, _ = compress.create_compressed_model(
        net,
        {"compression": {"algorithm": "magnitude_sparsity", "ignored_scopes": ["{re}conv[12]"]}},
    )
    assert [r["layer"] for r in ctrl.statistics().to_dict()["algorithms"][0]["layers"]] == ["fc"]
    ctrl, _ = compress.create_compressed_model(
        SmallCNN(), {"compression": {"algorithm": "magnitude_sparsity", "target_scopes": "conv*"}}
    )
    assert [r["layer"] for r in ctrl.statistics().to_dict()["algorithms"][0]["layers"]] == [
        "conv1",
        "conv2",
    ]
    with pytest.raises(ConfigError, match="compression.ignored_scopes: 'layer9' matches no module"):
        compress.create_compressed_model(
            SmallCNN(),
            {"compression": {"algorithm": "magnitude_sparsity", "ignored_scopes": ["layer9"]}},
        )


def test_model_without_prunable_layers_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no layer to compress"):
        compress.create_compressed_model(nn.Sequential(nn.ReLU()), magnitude())


def test_nan_weights_name_the_layer() -> None:
    ctrl, net = compress.create_compressed_model(lenet(), magnitude())
    with torch.no_grad():
        net[2].weight[0, 0] = float("nan")
    with pytest.raises(CompressError, match="layer '2': the weight holds NaN or Inf at epoch 0"):
        ctrl.scheduler.epoch_step()


def test_tied_weights_share_one_mask() -> None:
    a = nn.Linear(8, 8)
    b = nn.Linear(8, 8)
    b.weight = a.weight
    net = nn.Sequential(a, nn.ReLU(), b)
    ctrl, net = compress.create_compressed_model(net, magnitude(sparsity_init=0.5))
    assert masks.get_mask(a) is masks.get_mask(b)
    assert len(ctrl.statistics().to_dict()["algorithms"][0]["layers"]) == 1
    plain = ctrl.strip()
    assert plain[0].weight is plain[2].weight


def test_statistics_table_and_numbers() -> None:
    x = torch.randn(1, 64)
    ctrl, _ = compress.create_compressed_model(lenet(), magnitude(sparsity_init=0.5), x)
    d = ctrl.statistics().to_dict()
    assert d["model"]["sparsity of compressed layers"] == pytest.approx(0.5, abs=1e-4)
    assert d["model"]["MACs"] == 64 * 300 + 300 * 100 + 100 * 10
    assert d["model"]["nonzero MACs"] == pytest.approx(d["model"]["MACs"] * 0.5, rel=0.01)
    text = str(ctrl.statistics())
    assert "Statistics of magnitude_sparsity (current level 0.5000)" in text
    assert "| 2     | 100x300 |" in text


def test_const_sparsity_keeps_existing_zeros_under_training() -> None:
    net = lenet()
    with torch.no_grad():
        net[0].weight[:, :32] = 0
    ctrl, net = compress.create_compressed_model(
        net, {"compression": {"algorithm": "const_sparsity"}}
    )
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for _ in range(3):
        net(torch.randn(8, 64)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    assert torch.all(ctrl.strip()[0].weight[:, :32] == 0)
