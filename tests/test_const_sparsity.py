from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import lenet
from torch import nn

import compress
from compress import masks

RECIPE = Path(__file__).parent.parent / "configs" / "const_sparsity.json"

OPTIMIZERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "sgd_momentum_wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=1e-2),
}


def _pruned_lenet() -> tuple[nn.Module, list[torch.Tensor]]:
    """A LeNet whose first layer lost its first 32 inputs and every third weight of the rest."""
    net = lenet()
    with torch.no_grad():
        net[0].weight[:, :32] = 0
        net[2].weight.view(-1)[::3] = 0
        net[4].weight[:5] = 0
    return net, [layer.weight == 0 for layer in (net[0], net[2], net[4])]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_existing_zeros_stay_zero_under_each_optimizer(name: str) -> None:
    net, zeros = _pruned_lenet()
    before = [layer.weight.detach().clone() for layer in (net[0], net[2], net[4])]
    ctrl, net = compress.create_compressed_model(net, RECIPE)
    opt = OPTIMIZERS[name](list(net.parameters()))
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        net(torch.randn(16, 64, generator=gen)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        ctrl.scheduler.step()
        for layer, z in zip((net[0], net[2], net[4]), zeros):
            assert int((masks.effective(layer)[z] != 0).sum()) == 0
    plain = ctrl.strip()
    for layer, z, w0 in zip((plain[0], plain[2], plain[4]), zeros, before):
        assert int((layer.weight[z] != 0).sum()) == 0
        assert torch.all(layer.weight[~z] != w0[~z])  # the other weights did train
    assert ctrl.compression_level == pytest.approx(
        sum(int(z.sum()) for z in zeros) / sum(z.numel() for z in zeros)
    )


def test_masks_come_from_the_weights_once_and_survive_a_state_round_trip() -> None:
    net, zeros = _pruned_lenet()
    ctrl, net = compress.create_compressed_model(net, RECIPE)
    with torch.no_grad():
        net[0].weight[:, :32] = 1.0  # stored values change; the mask does not
    assert torch.all(masks.effective(net[0])[:, :32] == 0)
    state = ctrl.state_dict()
    fresh, _ = _pruned_lenet()
    with torch.no_grad():
        fresh[0].weight.fill_(1.0)
    ctrl2, fresh = compress.create_compressed_model(fresh, RECIPE)
    assert int((masks.effective(fresh[0]) == 0).sum()) == 0
    ctrl2.load_state_dict(state)
    assert torch.equal(masks.get_mask(fresh[0]).bool(), ~zeros[0])
    stats = ctrl2.statistics().to_dict()["algorithms"][0]
    assert [round(row["sparsity"], 4) for row in stats["layers"]] == [0.5, 0.3333, 0.5]
