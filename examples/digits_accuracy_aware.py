"""Accuracy-aware compression on scikit-learn's digits: the highest sparsity within a budget.

A dense LeNet-300-100 is trained first and its validation accuracy is recorded with
``trainer.validate`` (the reference). A copy is then fine-tuned with
``CompressionCallback(recipe, monitor="val_acc")``; with ``configs/digits_adaptive_level.json``
the callback searches the magnitude-sparsity level that keeps accuracy within 1% (relative) of
the dense model, and the Trainer stops when the search ends, on the best model found.

    python examples/digits_accuracy_aware.py --recipe configs/digits_adaptive_level.json
"""

from __future__ import annotations

import argparse
import copy
import logging
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from digits import (  # examples/ on sys.path
    Classifier,
    accuracy,
    digits_loaders,
    lenet_300_100,
    quiet_trainer,
)

from callbacks import CompressionCallback

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


class Validated(Classifier):
    """The digits classifier with a validation step that logs ``val_acc``."""

    def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(CONFIGS / "digits_adaptive_level.json"))
    parser.add_argument("--dense-epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.INFO)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    torch.set_num_threads(1)

    pl.seed_everything(args.seed, workers=True)
    train, val = digits_loaders(seed=args.seed)
    dense = Validated(lenet_300_100())
    quiet_trainer(args.dense_epochs, []).fit(dense, train)
    dense_acc = accuracy(dense.model, val)

    module = Validated(copy.deepcopy(dense.model).train())
    cb = CompressionCallback(args.recipe, monitor="val_acc", model_attr="model", verbose=False)
    fine = quiet_trainer(10_000, [cb])  # the recipe's maximal_total_epochs ends it
    fine.validate(module, val, verbose=False)  # the reference: the dense model, once
    module.model.train()
    fine.fit(module, train, val)
    assert cb.ctrl is not None and cb._aa is not None
    compressed_acc = accuracy(cb.ctrl.strip(), val)
    level = cb._aa.best["level"] if cb._aa.best else cb.ctrl.compression_level
    print(f"\ndense accuracy:       {dense_acc:.4f}")
    print(f"compressed accuracy:  {compressed_acc:.4f} (budget >= {cb._aa.tolerable:.4f})")
    print(f"sparsity level found: {level:.4f}")
    print(f"epochs spent:         {cb._aa.epochs}")


if __name__ == "__main__":
    main()
