"""Masks cost one byte per weight: every algorithm's mask buffers are uint8 holding 0 and 1, with
no other copy beside them (eager and compiled passes read the same buffer), they stay so when
the algorithms write them, and states saved with float masks (earlier versions) still load."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
from conftest import ConvBNNet, lenet
from torch import nn

import compress
from compress import masks


def _build(model: nn.Module, recipe: dict[str, Any], x: Any) -> tuple[Any, nn.Module]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compress.create_compressed_model(model, {"compression": recipe}, x)


def _assert_one_byte(model: nn.Module, before: set[str]) -> int:
    """Every mask is uint8 with values 0 and 1, and the buffers compression added are exactly
    the masks (one byte per masked weight, nothing else); returns the number of zeros."""
    seen: dict[int, torch.Tensor] = {}
    for name, _, pname, mask in masks.iter_masked(model):
        assert mask.dtype == torch.uint8, (name, pname, mask.dtype)
        assert mask.element_size() == 1
        assert set(mask.unique().tolist()) <= {0, 1}, (name, pname)
        seen[id(mask)] = mask
    assert seen
    added = [b for n, b in model.named_buffers(remove_duplicate=True) if n not in before]
    assert sum(b.numel() * b.element_size() for b in added) == sum(m.numel() for m in seen.values())
    return sum(int((m == 0).sum()) for m in seen.values())


def _buffers(model: nn.Module) -> set[str]:
    return {n for n, _ in model.named_buffers()}


def test_magnitude_masks_are_one_byte_after_updates() -> None:
    torch.manual_seed(0)
    net = lenet(16)
    before = _buffers(net)
    recipe = {
        "algorithm": "magnitude_sparsity",
        "sparsity_init": 0.3,
        "params": {
            "schedule": "multistep",
            "multistep_steps": [1],
            "multistep_sparsity_levels": [0.3, 0.6],
        },
    }
    ctrl, net = _build(net, recipe, torch.zeros(1, 16))
    ctrl.scheduler.epoch_step()
    ctrl.scheduler.epoch_step()
    total = sum(m.numel() for *_, m in masks.iter_masked(net))
    assert _assert_one_byte(net, before) == round(0.6 * total)
    # the stripped model carries the masks' zeros and nothing of the masks
    plain = ctrl.strip()
    assert not any(n.startswith("_cmask") for n, _ in plain.named_buffers())
    zeros = sum(int((p == 0).sum()) for n, p in plain.named_parameters() if n.endswith("weight"))
    assert zeros >= round(0.6 * total)


def test_rb_masks_are_one_byte_when_frozen_and_fixed() -> None:
    torch.manual_seed(0)
    net = lenet(16)
    before = _buffers(net)
    ctrl, net = _build(net, {"algorithm": "rb_sparsity", "sparsity_init": 0.5}, torch.zeros(1, 16))
    algo = ctrl.algorithms[0]
    with torch.no_grad():
        for _, _, theta, _ in algo.entries:
            theta.copy_(torch.where(torch.rand_like(theta) < 0.5, 5.0, -5.0))
    assert _assert_one_byte(net, before) == 0  # ones while the logits learn
    ctrl.fix_dropped()  # mask.mul_(keep): zeros written into the uint8 buffers
    fixed = _assert_one_byte(net, before)
    n = sum(m.numel() for *_, m in masks.iter_masked(net))
    assert 0.45 * n < fixed < 0.55 * n
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        algo.freeze()
    assert _assert_one_byte(net, before) == fixed


def test_const_masks_are_one_byte() -> None:
    torch.manual_seed(0)
    net = lenet(16)
    with torch.no_grad():
        net[0].weight[:, :4] = 0.0
    before = _buffers(net)
    _, net = _build(net, {"algorithm": "const_sparsity"}, torch.zeros(1, 16))
    assert _assert_one_byte(net, before) == 300 * 4


def test_filter_pruning_and_sparsity_masks_are_one_byte() -> None:
    """Channel masks (conv, BatchNorm, consumers' input slices, ``index_fill_``) and a
    sparsity mask on the same weights, whose level counts what the channel masks leave."""
    torch.manual_seed(0)
    net = ConvBNNet()
    before = _buffers(net)
    recipe = [
        {
            "algorithm": "filter_pruning",
            "pruning_init": 0.5,
            "params": {"prune_first_conv": True, "round_to": 1},
        },
        {"algorithm": "magnitude_sparsity", "sparsity_init": 0.3},
    ]
    ctrl, net = _build(net, recipe, torch.randn(2, 3, 8, 8))
    assert _assert_one_byte(net, before) > 0
    fp = masks.get_mask(net.conv1, "weight", "filter_pruning")
    assert fp is not None and int((fp.flatten(1).amax(1) == 0).sum()) == 4  # 4 of 8 filters
    x = torch.randn(2, 3, 8, 8)
    net.eval()
    want = net(x)
    torch.testing.assert_close(ctrl.strip()(x), want, rtol=1e-5, atol=1e-5)


def test_fused_expert_masks_are_one_byte() -> None:
    pytest.importorskip("transformers")
    from hf_zoo import ZOO

    torch.manual_seed(0)
    model, x = ZOO["mixtral"].build(), ZOO["mixtral"].inputs()
    before = _buffers(model)
    recipe = {"algorithm": "magnitude_sparsity", "sparsity_init": 0.5}
    _, model = _build(model, recipe, x)
    assert _assert_one_byte(model, before) > 0
    experts = model.model.layers[0].mlp.experts
    mask = masks.get_mask(experts, "gate_up_proj")
    assert mask is not None and mask.shape == experts.gate_up_proj.shape


def test_compiled_pass_reads_the_one_byte_mask_itself() -> None:
    """No second copy for compiled passes: a mask written by hand, with nothing else called,
    is what the compiled forward pass and its gradient use."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 4))
    mask = masks.attach(net[0], "weight")
    compiled = torch.compile(net, backend="inductor")
    x = torch.randn(3, 8)
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):
        compiled(x).sum().backward()
        mask[:, :5] = 0
        net[0].weight.grad = None
        out = compiled(x)
        out.sum().backward()
    torch.testing.assert_close(out, net(x))
    assert net[0].weight.grad is not None
    assert bool((net[0].weight.grad[:, :5] == 0).all())
    assert bool((net[0].weight.grad[:, 5:] != 0).all())
    assert [n for n, _ in net.named_buffers()] == ["0._cmask_weight"]


@pytest.mark.parametrize(
    "recipe",
    [
        {"algorithm": "magnitude_sparsity", "sparsity_init": 0.5},
        {"algorithm": "const_sparsity"},
        {"algorithm": "rb_sparsity", "sparsity_init": 0.5, "params": {"sparsity_freeze_epoch": 0}},
    ],
    ids=["magnitude", "const", "rb_frozen"],
)
def test_a_state_saved_with_float_masks_loads_cast_to_one_byte(recipe: dict[str, Any]) -> None:
    """States of earlier versions held masks as floats in the weight's dtype: they load, cast
    to the uint8 buffers, and give the masks they held."""
    torch.manual_seed(0)
    net = lenet(16)
    with torch.no_grad():
        net[0].weight[:, :4] = 0.0
    fresh = copy.deepcopy(net)
    ctrl, net = _build(net, recipe, torch.zeros(1, 16))
    ctrl.scheduler.epoch_step()  # RB freezes here, its buffers then hold its masks
    state = ctrl.state_dict()
    entry = state["state"][recipe["algorithm"]]
    assert entry.get("frozen") or recipe["algorithm"] != "rb_sparsity"
    # other masks than a fresh model's own (the inverse), so that the load has work to do
    want = {k: ~v for k, v in entry["masks"].items()}
    entry["masks"] = {k: (~v).float() for k, v in entry["masks"].items()}
    other, fresh = _build(fresh, recipe, torch.zeros(1, 16))
    other.load_state_dict(state)
    by_name = {name: m for name, _, _, m in masks.iter_masked(fresh)}
    assert sorted(by_name) == sorted(want) == ["0", "2", "4"]
    for name, m in by_name.items():
        assert m.dtype == torch.uint8
        assert torch.equal(m.bool(), want[name])
    assert other.state_dict()["state"][recipe["algorithm"]]["masks"]["0"].dtype == torch.bool


def test_a_float_mask_state_other_than_zeros_and_ones_is_refused() -> None:
    ctrl, _ = _build(lenet(16), {"algorithm": "const_sparsity"}, torch.zeros(1, 16))
    state = ctrl.state_dict()
    state["state"]["const_sparsity"]["masks"]["0"] = torch.full((300, 16), 0.5)
    with pytest.raises(compress.CompressError, match="holds values other than only 0 and 1"):
        ctrl.load_state_dict(state)
