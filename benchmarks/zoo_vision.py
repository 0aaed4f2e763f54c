"""torchvision and timm models (random weights) through magnitude 0.8, RB 0.5, const sparsity and
50% filter pruning: build, two SGD steps, ``strip()`` (which checks itself against the masked
model) and a pt2 export. One line per model and algorithm: ok with the largest
``|strip - masked|`` beside the output scale and the seconds taken, or the error.

Needs torchvision and timm beside torch (not project dependencies; a side venv):

    python benchmarks/zoo_vision.py resnet18,densenet121          # every algorithm
    python benchmarks/zoo_vision.py timm:vit_tiny_patch16_224 filter
"""

from __future__ import annotations

import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import compress  # noqa: E402

RECIPES: dict[str, dict[str, Any]] = {
    "magnitude": {
        "algorithm": "magnitude_sparsity",
        "sparsity_init": 0.8,
        "params": {"sparsity_target": 0.8},
    },
    "rb": {"algorithm": "rb_sparsity", "sparsity_init": 0.5},
    "const": {"algorithm": "const_sparsity"},
    "filter": {"algorithm": "filter_pruning", "pruning_init": 0.5},
}
# Input sizes other than 64x64: the smallest these architectures accept, or their fixed one.
SIZE = {
    "inception_v3": 96,
    "timm:levit_128s": 224,
    "timm:efficientformer_l1": 224,
    "timm:mixer_s16_224": 224,
    "timm:swin_tiny_patch4_window7_224": 224,
}


def build(name: str) -> nn.Module:
    if name.startswith("timm:"):
        import timm

        arch = name.removeprefix("timm:")
        extra = {"img_size": 64} if arch.startswith(("vit", "deit")) else {}
        return timm.create_model(arch, pretrained=False, num_classes=10, **extra)
    import torchvision

    if name == "vit_b_16":
        return torchvision.models.vit_b_16(num_classes=10, image_size=64)
    if name in ("inception_v3", "googlenet"):
        return getattr(torchvision.models, name)(weights=None, aux_logits=False, init_weights=True)
    return getattr(torchvision.models, name)(weights=None)


def run(name: str, algo: str) -> str:
    torch.manual_seed(0)
    model = build(name)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and not p.any():
                p.normal_(0, 0.05)  # torchvision's ViT head is zero-initialised
            if algo == "const" and p.dim() >= 2:
                p.mul_(torch.rand_like(p) > 0.5)  # zeros that const sparsity keeps
    size = SIZE.get(name, 64)
    x = torch.randn(2, 3, size, size)
    start = time.perf_counter()
    ctrl, model = compress.create_compressed_model(model, {"compression": RECIPES[algo]}, x)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(2):
        (model(x).pow(2).mean() + ctrl.loss()).backward()
        opt.step()
        opt.zero_grad()
        ctrl.scheduler.step()
    model.eval()
    with torch.no_grad():
        want = model(x)
    plain = ctrl.strip().eval()
    with torch.no_grad():
        got = plain(x)
    with tempfile.TemporaryDirectory() as tmp:
        compress.export(plain, Path(tmp) / "m", ["pt2"], x)
    diff, scale = float((want - got).abs().max()), float(want.abs().max())
    return f"ok {diff:.2g} (scale {scale:.2g}) {time.perf_counter() - start:.0f} s"


def main() -> None:
    names = sys.argv[1].split(",")
    algos = sys.argv[2].split(",") if len(sys.argv) > 2 else list(RECIPES)
    for name in names:
        for algo in algos:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    line = run(name, algo)
                except Exception as err:  # noqa: BLE001 - a row says why it failed
                    line = f"error {type(err).__name__}: {str(err)[:200]}"
            print(f"| {name} | {algo} | {line} |", flush=True)


if __name__ == "__main__":
    main()
