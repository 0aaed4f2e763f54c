"""Filter pruning of timm's ViT attention (``timm.layers.Attention``: a fused ``qkv`` reshaped
by ``num_heads`` and ``head_dim``, the output by ``attn_dim``), rebuilt here: timm cannot be
imported beside the CPU torch of the test environment. Whole heads go, and the attention's
``num_heads``/``attn_dim`` follow the smaller ``qkv`` (``vit_tiny_patch16_224`` and
``deit_tiny`` crashed at ``strip()`` before: ``shape '[2, 17, 3, 3, 64]' is invalid``)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compress
from compress.pruning import exactness
from compress.pruning.structured import ChannelGroup

DIM, HEADS, HEAD_DIM = 48, 3, 16


class Attention(nn.Module):
    """timm.layers.attention.Attention's forward (fused attention, no q/k norm)."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads, self.head_dim = HEADS, HEAD_DIM
        self.attn_dim = HEADS * HEAD_DIM
        self.qkv = nn.Linear(DIM, self.attn_dim * 3)
        self.proj = nn.Linear(self.attn_dim, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, self.attn_dim))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(DIM), Attention()
        self.norm2 = nn.LayerNorm(DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, DIM, 4, stride=4)
        self.blocks = nn.Sequential(Block(), Block())
        self.norm, self.head = nn.LayerNorm(DIM), nn.Linear(DIM, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.blocks(x)).mean(1))


def test_filter_pruning_removes_whole_timm_heads_and_strips_to_the_masked_model() -> None:
    torch.manual_seed(0)
    net, x = TinyViT(), torch.randn(2, 3, 16, 16)
    recipe = {"algorithm": "filter_pruning", "pruning_init": 0.5, "params": {"round_to": 1}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the residual stream stays whole (LayerNorm)
        ctrl, net = compress.create_compressed_model(net, {"compression": recipe}, x)
    heads = [g for g in ctrl.algorithms[0].groups if g.name.endswith("attn.qkv")]
    assert [g.size for g in heads] == [HEADS, HEADS]  # a group channel is a whole head
    net.eval()
    with torch.no_grad():
        want = net(x)
    plain = ctrl.strip().eval()
    attn = plain.blocks[0].attn
    assert attn.num_heads < HEADS
    assert attn.qkv.out_features == 3 * attn.num_heads * HEAD_DIM == 3 * attn.attn_dim
    assert attn.proj.in_features == attn.attn_dim
    with torch.no_grad():
        torch.testing.assert_close(plain(x), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("size", range(2, exactness.SMALL_GROUP))
def test_small_groups_are_checked_with_each_head_removed_once_and_kept_once(size: int) -> None:
    group = ChannelGroup("blocks.0.attn.qkv", size, ())
    for seed in range(5):
        draws = [k[group.name] for k in exactness._draws([group], seed)]
        for keep in draws:  # each draw removes at least one and keeps at least one head
            assert 0 < int(keep.sum()) < size
        removed = torch.stack([~k for k in draws]).any(0)
        kept = torch.stack(draws).any(0)
        assert removed.all() and kept.all()
    big = ChannelGroup("blocks.0.mlp.fc1", exactness.SMALL_GROUP, ())
    assert len(exactness._draws([big])) == 1  # a wide group: one draw, as before


def test_a_group_that_fails_only_without_the_head_the_first_draw_keeps_is_left_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    group = ChannelGroup("blocks.2.attn.qkv", HEADS, ())
    first = exactness._random_keep([group])[group.name]
    kept = int(torch.nonzero(first)[0])  # a head the old single draw never removed

    def matches(model: object, dg: object, groups: object, keep: dict, x: object) -> str | None:
        return None if keep[group.name][kept] else "the shrunk model fails (shape invalid)"

    monkeypatch.setattr(exactness, "_matches", matches)
    problems: list[str] = []
    assert exactness.exact_groups(torch.nn.Identity(), [group], (), problems) == []
    assert problems == ["group 'blocks.2.attn.qkv': the shrunk model fails (shape invalid)"]
