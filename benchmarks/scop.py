"""SCOP against L2 and geometric-median filter scores at 45% of the filters pruned.

Two models: the digits CNN of ``examples/digits_cnn.py`` on scikit-learn's digits, and a small
ResNet (three stages of basic blocks, widths 16/32/64) on a synthetic 10-class image set (each
class a smooth random 3x16x16 pattern, randomly shifted, scaled and noised). For every seed a
dense model is trained; copies of it are then pruned by each criterion with the same recipe
(``baseline`` schedule, every channel group at 45%, ``round_to`` 1, the first conv kept) and
fine-tuned for the same number of epochs. SCOP first runs its knockoff phase
(``num_init_steps`` epochs, only the coefficients learn), which is its extra cost.

Reported per model and criterion, over the seeds (median [min, max]): test accuracy of the
dense model, right after pruning (masks on, no fine-tuning) and after fine-tuning (the stripped,
physically smaller model), its params and MACs, and the knockoff phase's wall time next to one
fine-tuning epoch. Training uses the core API (``create_compressed_model`` and its scheduler),
one thread, the seeds one after another.

    python benchmarks/scop.py                      # 3 seeds, both models
    python benchmarks/scop.py --seeds 1 --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from models import BasicBlock  # benchmarks/ is on sys.path when run as a script
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import compress
from compress.pruning.sizes import count_macs_params

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from digits import digits_loaders  # noqa: E402
from digits_cnn import DigitsCNN  # noqa: E402

CRITERIA = ("scop", "L2", "geometric_median")
RATIO = 0.45


class SmallResNet(nn.Module):
    """A CIFAR-style ResNet: a 3x3 stem and one basic block per stage (16, 32, 64 channels)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16))
        self.layer1 = BasicBlock(16, 16, 1)
        self.layer2 = BasicBlock(16, 32, 2)
        self.layer3 = BasicBlock(32, 64, 2)
        self.fc = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean((2, 3)))


def synthetic_loaders(seed: int, n_train: int = 2000, n_test: int = 1000) -> tuple[Any, Any]:
    """10 classes of smooth 3x16x16 patterns, shifted by up to 3 pixels, scaled and noised."""
    gen = torch.Generator().manual_seed(1000 + seed)
    templates = F.interpolate(torch.randn(10, 3, 4, 4, generator=gen), size=16, mode="bilinear")

    def draw(n: int) -> TensorDataset:
        y = torch.randint(0, 10, (n,), generator=gen)
        x = templates[y] * (0.5 + torch.rand(n, 1, 1, 1, generator=gen))
        shifts = torch.randint(-3, 4, (n, 2), generator=gen)
        x = torch.stack([t.roll(tuple(s.tolist()), (1, 2)) for t, s in zip(x, shifts)])
        return TensorDataset(x + 1.5 * torch.randn(x.shape, generator=gen), y)

    train = DataLoader(draw(n_train), batch_size=64, shuffle=True, generator=gen)
    return train, DataLoader(draw(n_test), batch_size=500)


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader) -> float:
    was = model.training
    model.eval()
    right = total = 0
    for x, y in loader:
        right += int((model(x).argmax(1) == y).sum())
        total += len(y)
    model.train(was)
    return right / total


def train_epoch(
    model: nn.Module, loader: DataLoader, opt: torch.optim.Optimizer, ctrl: Any = None
) -> None:
    model.train()
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        if ctrl is not None:
            loss = loss + ctrl.loss()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if ctrl is not None:
            ctrl.scheduler.step()


def recipe(criterion: str, knockoff_epochs: int, scop_lr: float = 0.01) -> dict:
    return {
        "compression": {
            "algorithm": "filter_pruning",
            "pruning_init": RATIO,
            "params": {
                "schedule": "baseline",
                "pruning_target": RATIO,
                "num_init_steps": knockoff_epochs if criterion == "scop" else 0,
                "filter_importance": criterion,
                "prune_downsample_convs": True,
                "round_to": 1,
                **({"scop_lr": scop_lr} if criterion == "scop" else {}),
            },
        }
    }


def prune_and_finetune(
    dense: nn.Module, criterion: str, data: tuple[Any, Any], example: torch.Tensor, args: Any
) -> dict[str, float]:
    train, test = data
    model = copy.deepcopy(dense).train()
    ctrl, model = compress.create_compressed_model(
        model, recipe(criterion, args.knockoff_epochs, args.scop_lr), example
    )
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    start = args.knockoff_epochs if criterion == "scop" else 0
    out: dict[str, float] = {"knockoff s": 0.0}
    epoch_times = []
    for epoch in range(start + args.finetune_epochs):
        ctrl.scheduler.epoch_step()
        if epoch == start:
            out["pruned, no fine-tuning"] = accuracy(model, test)
        t0 = time.perf_counter()
        train_epoch(model, train, opt, ctrl)
        elapsed = time.perf_counter() - t0
        if epoch < start:
            out["knockoff s"] += elapsed
        else:
            epoch_times.append(elapsed)
    out["fine-tune epoch s"] = statistics.median(epoch_times)
    small = ctrl.strip().eval()
    out["accuracy"] = accuracy(small, test)
    macs, params = count_macs_params(small, example)
    out["params"], out["MACs"] = params, macs
    return out


def run(name: str, make: Any, loaders: Any, example: torch.Tensor, args: Any) -> None:
    rows: dict[str, list[dict[str, float]]] = {"dense": []}
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        data = loaders(seed)
        dense = make()
        opt = torch.optim.SGD(dense.parameters(), lr=args.lr * 5, momentum=0.9, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.dense_epochs)
        for _ in range(args.dense_epochs):
            train_epoch(dense, data[0], opt)
            sched.step()
        macs, params = count_macs_params(dense.eval(), example)
        rows["dense"].append({"accuracy": accuracy(dense, data[1]), "params": params, "MACs": macs})
        for criterion in CRITERIA:
            torch.manual_seed(100 + seed)  # the same fine-tuning batches for every criterion
            data = loaders(seed)
            rows.setdefault(criterion, []).append(
                prune_and_finetune(dense, criterion, data, example, args)
            )
            print(f"{name} seed {seed} {criterion}: {rows[criterion][-1]}", flush=True)
    print(f"\n### {name}\n")
    cols = ["accuracy", "pruned, no fine-tuning", "params", "MACs", "knockoff s"]
    print("| criterion | " + " | ".join(cols) + " |")
    print("| --- |" + " --- |" * len(cols))
    for criterion, runs in rows.items():
        cells = []
        for c in cols:
            values = [r[c] for r in runs if c in r]
            cells.append(_cell(c, values, runs))
        print(f"| {criterion} | " + " | ".join(cells) + " |")


def _cell(column: str, values: list[float], runs: list[dict[str, float]]) -> str:
    if not values:
        return ""
    med, lo, hi = statistics.median(values), min(values), max(values)
    if column in ("params", "MACs"):
        return f"{med:,.0f}" if lo == hi else f"{med:,.0f} [{lo:,.0f}, {hi:,.0f}]"
    if column == "knockoff s":
        if med == 0:
            return "-"
        epoch = statistics.median(r["fine-tune epoch s"] for r in runs)
        return f"{med:.1f} [{lo:.1f}, {hi:.1f}] ({med / epoch:.1f} fine-tune epochs)"
    return f"{100 * med:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--dense-epochs", type=int, default=15)
    parser.add_argument("--knockoff-epochs", type=int, default=2)
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.01, help="fine-tuning; dense: 5x")
    parser.add_argument("--scop-lr", type=float, default=0.01)
    parser.add_argument("--quick", action="store_true", help="few epochs, a smoke run")
    parser.add_argument("--models", default="digits,resnet")
    args = parser.parse_args()
    if args.quick:
        args.dense_epochs, args.knockoff_epochs, args.finetune_epochs = 3, 1, 1
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    if "digits" in args.models:
        run(
            "digits CNN, scikit-learn digits",
            DigitsCNN,
            lambda seed: digits_loaders(seed=seed),
            torch.zeros(1, 64),
            args,
        )
    if "resnet" in args.models:
        run(
            "small ResNet, synthetic 16x16 images",
            SmallResNet,
            synthetic_loaders,
            torch.zeros(1, 3, 16, 16),
            args,
        )


if __name__ == "__main__":
    main()
