"""A small CNN on scikit-learn's digits, trained dense, then filter-pruned by a recipe.

The dense model is trained first; a copy is then fine-tuned with
``CompressionCallback("configs/filter_pruning.json")``, which masks half of the filters over the
first epochs and, at fit end, exports the physically smaller model (``pruned``, ``pt2``,
``onnx``). Prints both accuracies, the statistics tables, and the exported model's params, MACs
and CPU latency next to the dense model's.

    python examples/digits_cnn.py --dense-epochs 30 --epochs 20
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from digits import (  # examples/ is on sys.path when run
    Classifier,
    accuracy,
    digits_loaders,
    quiet_trainer,
)
from torch import nn

import compress
from callbacks import CompressionCallback
from compress.pruning.sizes import count_macs_params

CONFIGS = Path(__file__).resolve().parent.parent / "configs"  # runs from any directory


class DigitsCNN(nn.Module):
    """Three 3x3 conv blocks on the 8x8 image; takes the flat 64 pixels the loaders give."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
            )

        self.features = nn.Sequential(
            block(1, 32), block(32, 64), nn.MaxPool2d(2), block(64, 128), nn.MaxPool2d(2)
        )
        self.fc = nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x.reshape(-1, 1, 8, 8))
        return self.fc(x.mean((2, 3)))


def train(module: pl.LightningModule, epochs: int, callbacks: list[pl.Callback], seed: int) -> None:
    pl.seed_everything(seed, workers=True)
    train_loader, _ = digits_loaders(seed=seed)
    quiet_trainer(epochs, callbacks).fit(module, train_loader)


@torch.no_grad()
def latency_ms(model: nn.Module, batch: int, repeats: int = 50) -> float:
    """Median wall time of one forward pass on CPU, after warm-up."""
    model.eval()
    x = torch.rand(batch, 64)
    for _ in range(10):
        model(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(CONFIGS / "filter_pruning.json"))
    parser.add_argument("--dense-epochs", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=20, help="fine-tuning epochs with pruning")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--export-dir", default="exports/digits_cnn")
    args = parser.parse_args()
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    torch.set_num_threads(1)  # steadier latency figures on shared machines
    _, test = digits_loaders(seed=args.seed)

    dense = Classifier(DigitsCNN())
    train(dense, args.dense_epochs, [], args.seed)
    dense_acc = accuracy(dense.model, test)

    pruned = Classifier(copy.deepcopy(dense.model).train())  # accuracy() left it in eval
    cb = CompressionCallback(
        args.recipe,
        export_dir=args.export_dir,
        export_formats=["pruned", "pt2", "onnx"],
        model_attr="model",
        verbose=False,
    )
    train(pruned, args.epochs, [cb], args.seed)
    assert cb.ctrl is not None
    print(cb.ctrl.statistics())

    # The exported file rebuilds the small model from a fresh instance of the class.
    small = compress.load_pruned(DigitsCNN(), cb.exported["pruned"]).eval()
    masked_acc, small_acc = accuracy(pruned.model, test), accuracy(small, test)
    x = torch.zeros(1, 64)
    print(f"\n{'':22}{'dense':>12}{'pruned':>12}")
    print(f"{'test accuracy':22}{dense_acc:>12.4f}{small_acc:>12.4f}")
    (d_macs, d_params), (s_macs, s_params) = (
        count_macs_params(m, x) for m in (dense.model.eval(), small)
    )
    print(f"{'params':22}{d_params:>12,}{s_params:>12,}")
    print(f"{'MACs per image':22}{d_macs:>12,}{s_macs:>12,}")
    for batch in (1, 256):
        d, s = latency_ms(dense.model, batch), latency_ms(small, batch)
        print(f"{f'latency ms, batch {batch}':22}{d:>12.3f}{s:>12.3f}   ({d / s:.2f}x)")
    print(f"\nmasked model accuracy (as trained): {masked_acc:.4f}")
    for fmt, path in cb.exported.items():
        print(f"exported {fmt:>6}: {path} ({Path(path).stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
