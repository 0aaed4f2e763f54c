"""A masked weight is masked wherever it is read, and every strip and export is checked against
the masked model before anything is written.

torchvision's ViT encoder block (``nn.MultiheadAttention``, whose forward reads
``out_proj.weight`` without calling ``out_proj``) and Swin's window attention (``F.linear`` on
``self.qkv.weight`` and ``self.proj.weight``) are rebuilt here from their published layer lists:
torchvision cannot be imported beside the CPU torch of the test environment.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compress
from compress import masks
from compress.errors import CompressError
from compress.sparsity.rb_mask import LOGIT

DIM, HEADS = 32, 4


class EncoderBlock(nn.Module):
    """torchvision.models.vision_transformer.EncoderBlock."""

    def __init__(self) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(DIM, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(DIM, HEADS, batch_first=True)
        self.ln_2 = nn.LayerNorm(DIM, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + y
        return x + self.mlp(self.ln_2(x))


class WindowAttention(nn.Module):
    """torchvision.models.swin_transformer.ShiftedWindowAttention's use of its weights (one
    window, no shift): the projections are read with ``F.linear``, never called."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = F.linear(x, self.qkv.weight, self.qkv.bias)
        q, k, v = qkv.reshape(b, n, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        return F.linear(out, self.proj.weight, self.proj.bias)


class SwinBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(DIM)
        self.attn = WindowAttention()
        self.norm2 = nn.LayerNorm(DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Net(nn.Module):
    def __init__(self, block: type[nn.Module]) -> None:
        super().__init__()
        self.embed = nn.Linear(12, DIM)
        self.blocks = nn.Sequential(block(), block())
        self.head = nn.Linear(DIM, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(x)).mean(1))


RECIPES: dict[str, dict[str, Any]] = {
    "magnitude": {
        "algorithm": "magnitude_sparsity",
        "sparsity_init": 0.8,
        "params": {"sparsity_target": 0.8},
    },
    "rb": {"algorithm": "rb_sparsity", "sparsity_init": 0.5},
    "const": {"algorithm": "const_sparsity"},
}
X = torch.randn(2, 7, 12, generator=torch.Generator().manual_seed(1))


def _compressed(block: type[nn.Module], algo: str) -> tuple[Any, nn.Module]:
    torch.manual_seed(0)
    net = Net(block)
    if algo == "const":  # zeros that const sparsity keeps
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, nn.Linear):
                    m.weight.mul_(torch.rand_like(m.weight) > 0.5)
    ctrl, net = compress.create_compressed_model(net, {"compression": RECIPES[algo]}, X)
    if algo == "rb":  # logits that drop half of every weight, as training would move them
        with torch.no_grad():
            for m in net.modules():
                theta = m._parameters.get(LOGIT)
                if theta is not None:
                    theta.masked_fill_(torch.rand_like(theta) < 0.5, -100.0)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for _ in range(2):  # unmasked reads would move the pruned weights
        (net(X).pow(2).mean() + ctrl.loss()).backward()
        opt.step()
        opt.zero_grad()
    return ctrl, net


def _out(model: nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(X)


@pytest.mark.parametrize("algo", sorted(RECIPES))
@pytest.mark.parametrize("block", [EncoderBlock, SwinBlock], ids=["vit", "swin"])
def test_weights_read_outside_their_module_are_masked(block: type[nn.Module], algo: str) -> None:
    ctrl, net = _compressed(block, algo)
    attention = net.blocks[0].self_attention.out_proj if block is EncoderBlock else None
    layer = attention if attention is not None else net.blocks[0].attn.proj
    effective = masks.effective(layer, "weight")
    zeros = float((effective == 0).float().mean())
    assert zeros > 0.3  # the weight the attention reads itself is masked...
    want = _out(net)
    # ... and the forward pass reads it masked: unmasked, the output would differ
    raw = layer._parameters["weight"]
    with torch.no_grad():
        saved = raw.clone()
        raw.copy_(effective)
        same = _out(net)
        raw.copy_(saved)
    assert torch.equal(want, same)
    plain = ctrl.strip()
    assert not any(masks.masked_names(m) for m in plain.modules())
    assert not any(m._forward_pre_hooks for m in plain.modules())
    torch.testing.assert_close(_out(plain), want, rtol=0, atol=1e-6)


def test_a_child_called_directly_still_reads_its_own_mask() -> None:
    _, net = _compressed(SwinBlock, "magnitude")
    proj = net.blocks[0].attn.proj
    x = torch.randn(3, DIM)
    with torch.no_grad():
        want = F.linear(x, masks.effective(proj, "weight"), proj.bias)
        assert torch.equal(proj(x), want)
    assert "weight" not in proj.__dict__  # no shadow left behind


def _unmask_out_proj(model: nn.Module) -> None:
    """A mask the forward pass does not apply: the bug this file is about, forced."""
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            masks.remove(m)  # the cover: out_proj's weight is read unmasked again


def test_strip_raises_on_a_mismatch(monkeypatch: pytest.MonkeyPatch) -> None:
    ctrl, net = _compressed(EncoderBlock, "magnitude")
    _unmask_out_proj(net)
    with pytest.raises(
        CompressError, match=r"strip\(\): output 0 differs from the masked model's by"
    ):
        ctrl.strip()


@pytest.mark.parametrize("fmt", ["pt2", "onnx", "sparse"])
def test_export_raises_on_a_mismatch_and_writes_nothing(
    fmt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctrl, net = _compressed(SwinBlock, "magnitude")
    plain = ctrl.strip()
    if fmt == "sparse":  # a packer that loses values
        from compress.deploy import export as export_module

        real = export_module.pack

        def lossy(t: torch.Tensor) -> dict[str, Any]:
            entry = real(t)
            if "values" in entry:
                entry["values"] = entry["values"] * 0.5
            return entry

        monkeypatch.setattr(export_module, "pack", lossy)
        match = "does not unpack to its values"
    else:  # an exporter that traces a model other than the one it is given
        exporter = torch.export if fmt == "pt2" else torch.onnx
        real_export = exporter.export

        def elsewhere(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
            other = copy.deepcopy(model)
            with torch.no_grad():
                other.head.bias.add_(1.0)
            return real_export(other, *args, **kwargs)

        monkeypatch.setattr(exporter, "export", elsewhere)
        match = rf"{fmt} export: output 0 differs from the stripped model's by"
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    with pytest.raises(CompressError, match=match):
        compress.export(plain, tmp_path / "m", [fmt], example_inputs=X)
    assert list(tmp_path.iterdir()) == []


def test_export_of_a_model_that_still_carries_masks_is_refused(tmp_path: Path) -> None:
    _, net = _compressed(EncoderBlock, "magnitude")
    with pytest.raises(CompressError, match=r"still carries masks.*export ctrl.strip\(\)'s model"):
        compress.export(net, tmp_path / "m", ["sparse"])
    assert list(tmp_path.iterdir()) == []
