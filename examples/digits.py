"""LeNet-300-100 on scikit-learn's digits, dense and compressed by a recipe, with Lightning.

Trains a dense model, then the same model with ``CompressionCallback(recipe)``, prints both test
accuracies and the statistics table, and exports the compressed model.

    python examples/digits.py --recipe configs/magnitude_sparsity.json --epochs 40
"""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import compress
from callbacks import CompressionCallback

CONFIGS = Path(__file__).resolve().parent.parent / "configs"  # runs from any directory


def digits_loaders(batch_size: int = 64, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """70/30 stratified split, pixels scaled to [0, 1]."""
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x / 16.0, y, test_size=0.3, stratify=y, random_state=seed
    )

    def tensors(a, b):  # type: ignore[no-untyped-def]
        return TensorDataset(torch.tensor(a, dtype=torch.float32), torch.tensor(b))

    gen = torch.Generator().manual_seed(seed)
    train = DataLoader(tensors(x_tr, y_tr), batch_size=batch_size, shuffle=True, generator=gen)
    return train, DataLoader(tensors(x_te, y_te), batch_size=512)


def lenet_300_100(inputs: int = 64, classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Linear(inputs, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, classes)
    )


class Classifier(pl.LightningModule):
    """A plain LightningModule: nothing in it knows about compression."""

    def __init__(self, model: nn.Module, lr: float = 1e-3) -> None:
        super().__init__()
        self.model = model
        self.lr = lr
        self.example_input_array = torch.zeros(1, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return correct / total


def quiet_trainer(epochs: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    """A deterministic CPU Trainer that prints nothing and writes no logs or checkpoints."""
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )


def fit(recipe: str | None, epochs: int, seed: int, export_dir: str | None) -> tuple[float, object]:
    pl.seed_everything(seed, workers=True)
    train, test = digits_loaders(seed=seed)
    module = Classifier(lenet_300_100())
    callbacks = []
    if recipe is not None:
        callbacks.append(
            CompressionCallback(recipe, export_dir=export_dir, model_attr="model", verbose=False)
        )
    quiet_trainer(epochs, callbacks).fit(module, train)
    if not callbacks:
        return accuracy(module.model, test), None
    cb = callbacks[0]
    return accuracy(cb.ctrl.strip(), test), cb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(CONFIGS / "magnitude_sparsity.json"))
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--export-dir", default="exports/digits")
    args = parser.parse_args()
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")

    dense_acc, _ = fit(None, args.epochs, args.seed, None)
    acc, cb = fit(args.recipe, args.epochs, args.seed, args.export_dir)
    print(cb.ctrl.statistics())  # type: ignore[union-attr]
    print(f"\ndense test accuracy:      {dense_acc:.4f}")
    print(f"compressed test accuracy: {acc:.4f}  ({args.recipe})")
    for fmt, path in cb.exported.items():  # type: ignore[union-attr]
        print(f"exported {fmt:>6}: {path} ({Path(path).stat().st_size:,} bytes)")
    # The export restores into a fresh model of the same class.
    fresh = compress.load_sparse(cb.exported["sparse"], lenet_300_100())  # type: ignore[union-attr]
    print(
        f"reloaded sparse export accuracy: {accuracy(fresh, digits_loaders(seed=args.seed)[1]):.4f}"
    )


if __name__ == "__main__":
    main()
