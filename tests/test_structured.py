"""Channel groups, masks and shrinking on the architectures filter pruning meets in practice."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import BasicBlock
from torch import nn

from compress import masks
from compress.deploy.pruned_file import load_pruned, save_pruned
from compress.errors import CompressError
from compress.pruning.channel_groups import build_groups
from compress.pruning.sizes import count_macs_params
from compress.pruning.structured import (
    OWNER,
    ChannelGroup,
    apply_channel_mask,
    channel_norms,
    group_weights,
    pruning_plan,
    round_keep,
    shrink,
)

ALL = {"prune_first_conv": True, "prune_downsample_convs": True}


class ResNetish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.layer1 = BasicBlock(16, 16, 1)
        self.layer2 = BasicBlock(16, 32, 2)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(F.relu(self.bn(self.stem(x)))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class DenseNetish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 1, 1)
        self.conv1 = nn.Conv2d(16, 8, 3, 1, 1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(24, 8, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(8)
        self.transition = nn.Conv2d(32, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = torch.cat([x, F.relu(self.bn1(self.conv1(x)))], 1)
        x = torch.cat([x, F.relu(self.bn2(self.conv2(x)))], 1)
        x = F.relu(self.transition(x))
        return self.fc(x.mean((2, 3)))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4) -> None:
        super().__init__()
        hidden = cin * expand
        self.residual = stride == 1 and cin == cout
        self.block = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.residual else self.block(x)


class MobileNetish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16))
        self.blocks = nn.Sequential(InvertedResidual(16, 16, 1), InvertedResidual(16, 24, 2))
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu6(self.stem(x)))
        return self.fc(x.mean((2, 3)))


class GroupedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 1, 1)
        self.g1 = nn.Conv2d(16, 32, 3, 1, 1, groups=4, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.g2 = nn.Conv2d(32, 32, 3, 1, 1, groups=4, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.mix = nn.Conv2d(32, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(self.bn1(self.g1(x)))
        x = F.relu(self.bn2(self.g2(x)))
        return self.fc(F.relu(self.mix(x)).mean((2, 3)))


class ConvFlatten(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, 1, 1)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


class QKVAttention(nn.Module):
    """Hand-written attention whose heads come from ``view``: not prunable without head logic."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(12, dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1 = nn.Linear(dim, 64)
        self.fc2 = nn.Linear(64, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        b, t, d = x.shape
        q, k, v = (
            f(x).view(b, t, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v)
        )
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads), dim=-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, t, d))
        x = x + self.fc2(F.gelu(self.fc1(x)))
        return self.head(x.mean(1))


class MHANet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(12, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.fc1 = nn.Linear(32, 64)
        self.head = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return self.head(F.relu(self.fc1(x)).mean(1))


IMAGE = (2, 3, 8, 8)
KINDS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "resnet": (ResNetish, IMAGE),
    "densenet": (DenseNetish, IMAGE),
    "mobilenetv2": (MobileNetish, IMAGE),
    "grouped": (GroupedNet, IMAGE),
    "flatten": (ConvFlatten, IMAGE),
    "attention": (QKVAttention, (2, 6, 12)),
}


def _make(kind: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A model with non-trivial norm statistics, in eval mode, and its example input."""
    factory, shape = KINDS[kind]
    torch.manual_seed(seed)
    model = factory()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return model.eval(), torch.randn(shape, generator=torch.Generator().manual_seed(1))


def _random_keep(groups: list[ChannelGroup], seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    keep = {}
    for g in groups:
        k = torch.zeros(g.size, dtype=torch.bool)
        k[torch.randperm(g.size, generator=gen)[: max(1, g.size // 2)]] = True
        keep[g.name] = k
    return keep


def _rel_error(want: torch.Tensor, got: torch.Tensor) -> float:
    return float((want - got).abs().max() / want.abs().max())


def _expected_params(
    model: nn.Module, groups: list[ChannelGroup], keep: dict[str, torch.Tensor]
) -> int:
    """Counted from the groups alone: each parameter loses the positions its groups drop."""
    dropped: dict[tuple[str, str, int], set[int]] = {}
    for g in groups:
        for m in g.members:
            gone = m.index[~keep[g.name][m.channel]].tolist()
            dropped.setdefault((m.module_name, m.param_name, m.dim), set()).update(gone)
    total = 0
    for mod_name, module in model.named_modules():
        for p_name, param in module.named_parameters(recurse=False):
            total += math.prod(
                size - len(dropped.get((mod_name, p_name, d), ()))
                for d, size in enumerate(param.shape)
            )
    return total


def _groups(model: nn.Module, x: torch.Tensor, **flags: object) -> list[ChannelGroup]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_groups(model, x, **flags)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_masked_equals_shrunk_and_round_trips(kind: str, tmp_path: Path) -> None:
    model, x = _make(kind)
    groups = _groups(model, x, **ALL)
    assert groups, kind
    keep = _random_keep(groups)
    for g in groups:
        apply_channel_mask(model, g, keep[g.name])
    with torch.no_grad():
        masked_out = model(x)

    small = shrink(model, groups, keep, example_inputs=x).eval()
    with torch.no_grad():
        small_out = small(x)
    assert _rel_error(masked_out, small_out) <= 1e-5
    assert not list(masks.iter_masked(small)), "the shrunk model carries no masks"
    n_small = sum(p.numel() for p in small.parameters())
    n_dense = sum(p.numel() for p in model.parameters())
    assert n_small == _expected_params(model, groups, keep)
    assert n_small < 0.8 * n_dense

    path = tmp_path / "model.pruned.pt"
    save_pruned(small, pruning_plan(groups, keep), path, x)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pruned.pt"]
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "compress.pruned" and payload["input_shapes"] == [list(x.shape)]
    fresh, _ = _make(kind, seed=123)  # different weights: everything must come from the file
    loaded = load_pruned(fresh, path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), small_out)

    exported = torch.export.export(small, (x,))
    with torch.no_grad():
        assert _rel_error(small_out, exported.module()(x)) <= 1e-6


def test_groups_follow_the_coupling() -> None:
    by_name = {g.name: g for g in _groups(*_make("resnet"), **ALL)}
    assert sorted(by_name) == ["layer1.conv1", "layer2.conv1", "layer2.conv2", "stem"]
    stem = {(m.module_name, m.param_name, m.dim, m.role) for m in by_name["stem"].members}
    # The residual chain of stage 1: stem and layer1.conv2 produce the same channels.
    assert ("layer1.conv2", "weight", 0, "producer") in stem
    assert ("layer1.bn2", "bias", 0, "norm") in stem
    assert ("layer2.shortcut.0", "weight", 1, "consumer") in stem

    dense = {g.name: g for g in _groups(*_make("densenet"), **ALL)}
    conv2_in = next(m for m in dense["conv1"].members if m.module_name == "conv2")
    assert conv2_in.index.tolist() == list(range(16, 24))  # concat offset after the stem's 16
    transition_in = next(m for m in dense["conv2"].members if m.module_name == "transition")
    assert transition_in.index.tolist() == list(range(24, 32))

    flat = {g.name: g for g in _groups(*_make("flatten"), **ALL)}
    fc1_in = next(m for m in flat["conv2"].members if m.module_name == "fc1")
    assert len(fc1_in.index) == 16 * 16  # each channel owns its 4x4 spatial positions
    assert fc1_in.index[fc1_in.channel == 3].tolist() == list(range(48, 64))

    grouped = {g.name: g for g in _groups(*_make("grouped"), **ALL)}
    assert grouped["g1"].size == 8  # 32 channels in 4 conv groups: same offset tied together
    assert grouped["stem"].size == 4

    mobile = {g.name: g for g in _groups(*_make("mobilenetv2"), **ALL)}
    dw = next(m for m in mobile["blocks.0.block.0"].members if m.module_name == "blocks.0.block.3")
    assert (dw.dim, dw.role) == (0, "producer")  # depthwise: coupled on its out-dim


def test_hand_written_attention_is_left_out_with_one_warning() -> None:
    model, x = _make("attention")
    with pytest.warns(UserWarning, match="left unpruned") as record:
        groups = build_groups(model, x, **ALL)
    assert len(record) == 1
    assert "'q'" in str(record[0].message) and "'embed'" in str(record[0].message)
    assert [g.name for g in groups] == ["fc1"]


def test_multihead_attention_group_warns_and_the_rest_prunes() -> None:
    torch.manual_seed(0)
    model, x = MHANet().eval(), torch.randn(2, 5, 12)
    with pytest.warns(UserWarning, match="MultiheadAttention: removing embedding channels"):
        groups = build_groups(model, x, **ALL)
    assert [g.name for g in groups] == ["fc1"]
    keep = {"fc1": torch.arange(64) % 3 == 0}
    apply_channel_mask(model, groups[0], keep["fc1"])
    small = shrink(model, groups, keep, example_inputs=x)
    with torch.no_grad():
        assert _rel_error(model(x), small(x)) <= 1e-5
    assert small.fc1.out_features == 22


def test_flags_choose_the_groups() -> None:
    model, x = _make("resnet")
    assert [g.name for g in _groups(model, x)] == ["layer1.conv1"]
    first = _groups(model, x, prune_first_conv=True)
    assert sorted(g.name for g in first) == ["layer1.conv1", "stem"]
    down = _groups(model, x, prune_downsample_convs=True)
    assert sorted(g.name for g in down) == ["layer1.conv1", "layer2.conv1", "layer2.conv2"]
    # Ignoring layer1 removes its own group and the stem group, which holds layer1.conv2's outputs.
    ignored = _groups(model, x, ignored=["layer1"], **ALL)
    assert sorted(g.name for g in ignored) == ["layer2.conv1", "layer2.conv2"]
    only_linear = _groups(model, x, prunable=(nn.Linear,), **ALL)
    assert only_linear == []


def test_masked_channels_are_exact_zeros_in_training() -> None:
    model, x = _make("resnet")
    group = next(g for g in _groups(model, x, **ALL) if g.name == "layer1.conv1")
    keep = torch.ones(16, dtype=torch.bool)
    keep[[1, 5, 9]] = False
    apply_channel_mask(model, group, keep)
    seen = {}
    model.layer1.bn1.register_forward_hook(lambda m, i, o: seen.update(out=o))
    model.train()(x)
    assert torch.equal(seen["out"][:, ~keep], torch.zeros_like(seen["out"][:, ~keep]))
    assert seen["out"][:, keep].abs().sum() > 0

    # Calling again with a new choice restores channels.
    apply_channel_mask(model, group, torch.ones(16, dtype=torch.bool))
    assert bool(masks.get_mask(model.layer1.conv1, "weight", OWNER).all())


def test_channel_masks_keep_a_sparsity_mask_on_the_same_weight() -> None:
    model, x = _make("resnet")
    group = next(g for g in _groups(model, x, **ALL) if g.name == "layer1.conv1")
    sparse = masks.attach(model.layer1.conv1, "weight")  # a sparsity algorithm's own mask
    sparse.copy_(torch.rand(sparse.shape, generator=torch.Generator().manual_seed(0)) < 0.5)
    keep = torch.arange(16) % 2 == 0
    apply_channel_mask(model, group, keep)
    channel = masks.get_mask(model.layer1.conv1, "weight", OWNER)
    assert channel is not sparse and bool(sparse[1].any())  # the sparsity mask is untouched
    assert torch.equal(
        masks.effective(model.layer1.conv1), model.layer1.conv1.weight * sparse * channel
    )


def test_prune_batch_norms_false_leaves_norms_unmasked() -> None:
    model, x = _make("resnet")
    group = next(
        g for g in _groups(model, x, prune_batch_norms=False, **ALL) if g.name == "layer1.conv1"
    )
    keep = torch.arange(16) < 8
    apply_channel_mask(model, group, keep)
    assert masks.get_mask(model.layer1.bn1, "weight", OWNER) is None
    assert not bool(masks.get_mask(model.layer1.conv1, "weight", OWNER)[8:].any())
    with torch.no_grad():
        masked, small = model(x), shrink(model, [group], {group.name: keep}, example_inputs=x)(x)
    # NNCF semantics: the pruned channels carry BN's constant until the channels are removed.
    assert _rel_error(masked, small) > 1e-3


def test_at_least_one_channel_remains() -> None:
    model, x = _make("resnet")
    group = next(g for g in _groups(model, x, **ALL) if g.name == "layer1.conv1")
    none = torch.zeros(16, dtype=torch.bool)
    with pytest.raises(CompressError, match="at least one channel must remain"):
        shrink(model, [group], {group.name: none}, example_inputs=x)
    with pytest.raises(CompressError, match="at least one channel must remain"):
        apply_channel_mask(model, group, none)
    one = torch.zeros(16, dtype=torch.bool)
    one[7] = True
    small = shrink(model, [group], {group.name: one}, example_inputs=x)
    assert small.layer1.conv1.out_channels == 1


def test_group_weights_and_channel_norms() -> None:
    model, x = _make("flatten")
    group = next(g for g in _groups(model, x, **ALL) if g.name == "conv1")
    l1 = model.conv1.weight.detach().abs().sum((1, 2, 3)) + model.conv1.bias.detach().abs()
    assert torch.allclose(channel_norms(model, group, p=1), l1)
    rows = group_weights(model, group)
    assert [r.shape for r, _ in rows] == [(8, 27), (8, 1), (8, 1), (8, 1)]  # conv w, b; bn w, b


def test_round_keep() -> None:
    assert round_keep(64, 29, 8) == 32
    assert round_keep(64, 27, 8) == 24
    assert round_keep(64, 28, 8) == 32  # halves round up
    assert round_keep(64, 3, 8) == 8  # never below round_to
    assert round_keep(20, 19, 8) == 16
    assert round_keep(20, 20, 8) == 20  # 24 would exceed the layer
    assert round_keep(6, 3, 8) == 3  # narrower than round_to: untouched
    assert round_keep(6, 0, 8) == 1  # never 0
    assert round_keep(64, 29, 1) == 29


def test_count_macs_params() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    macs, params = count_macs_params(model, torch.randn(1, 3, 8, 8))
    assert macs == 8 * 6 * 6 * 3 * 9 + 288 * 10
    assert params == 8 * 27 + 8 + 288 * 10 + 10


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    model, x = _make("resnet")
    groups = _groups(model, x, **ALL)
    keep = _random_keep(groups)
    small = shrink(model, groups, keep, example_inputs=x)
    good = tmp_path / "good.pt"
    save_pruned(small, pruning_plan(groups, keep), good, x)

    with pytest.raises(CompressError, match=r"missing\.pt: no such file"):
        load_pruned(ResNetish(), tmp_path / "missing.pt")
    torch.save({"weights": torch.ones(2)}, tmp_path / "plain.pt")
    with pytest.raises(CompressError, match=r"plain\.pt: not a pruned model file"):
        load_pruned(ResNetish(), tmp_path / "plain.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(CompressError, match=r"junk\.pt: not a readable file of this library"):
        load_pruned(ResNetish(), tmp_path / "junk.pt")

    payload = torch.load(good, weights_only=True)
    payload["plan"]["head.conv"] = [0]
    torch.save(payload, tmp_path / "unknown.pt")
    with pytest.raises(CompressError, match=r"unknown\.pt: the plan prunes layer 'head\.conv'"):
        load_pruned(ResNetish(), tmp_path / "unknown.pt")
    other = ResNetish()
    other.fc = nn.Linear(32, 7)  # same layer names, another shape
    with pytest.raises(CompressError, match=r"(?s)good\.pt: does not fit this model.*fc\.weight"):
        load_pruned(other, good)


class _FusedProjection(torch.nn.Module):
    """One Linear computes q, k and v, split along the last dim (GPT-2's c_attn, in small)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(6, 12)
        self.out = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # dim=2, as GPT-2 writes it (Torch-Pruning maps dim=-1 splits, not dim=2 ones)
        q, k, v = self.qkv(x).split(self.qkv.out_features // 3, dim=2)
        return self.out(torch.tanh(q * k) + v)


def test_a_fused_projection_split_along_the_last_dim_keeps_its_parts_in_step() -> None:
    torch.manual_seed(0)
    model, x = _FusedProjection(), torch.randn(2, 5, 6)
    (group,) = build_groups(model, x, prune_first_conv=True)  # validated: masked == shrunk
    assert group.size == 4  # channel i of q, k and v is one channel, not three
    qkv = next(m for m in group.members if m.module_name == "qkv" and m.param_name == "weight")
    assert qkv.channel.tolist() == [0, 1, 2, 3] * 3
    keep = torch.tensor([True, False, True, False])
    apply_channel_mask(model, group, keep)
    small = shrink(model, [group], {group.name: keep}, example_inputs=x)
    assert (small.qkv.out_features, small.out.in_features) == (6, 2)
