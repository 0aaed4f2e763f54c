"""Knowledge distillation's cost: the teacher's memory and the training-step overhead.

Two controllers on the same model class, magnitude sparsity alone and magnitude sparsity plus
``knowledge_distillation`` (softmax), are timed side by side in one process: rounds alternate
between them, each round times ``--steps`` optimizer steps; medians and ranges over rounds.

    python benchmarks/distillation.py --rounds 7 --steps 30
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import compress


def lenet() -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)
    )


def cnn() -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(3, 32), *block(32, 64), nn.MaxPool2d(2), *block(64, 128),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),
    )  # fmt: skip


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "lenet-300-100, batch 64": (lenet, (64, 784)),
    "cnn 32x32, batch 32": (cnn, (32, 3, 32, 32)),
}
SPARSITY = {"algorithm": "magnitude_sparsity", "sparsity_init": 0.5}
KD = {"algorithm": "knowledge_distillation", "type": "softmax", "temperature": 2.0}


def setup(factory: Callable[[], nn.Module], shape: tuple[int, ...], kd: bool) -> Callable[[], None]:
    torch.manual_seed(0)
    section = [SPARSITY, KD] if kd else [SPARSITY]
    x = torch.randn(shape)
    y = torch.randint(0, 10, (shape[0],))
    ctrl, model = compress.create_compressed_model(factory(), {"compression": section}, x[:1])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step() -> None:
        loss = nn.functional.cross_entropy(model(x), y) + ctrl.loss()
        loss.backward()
        opt.step()
        opt.zero_grad()
        ctrl.scheduler.step()

    step.ctrl = ctrl  # type: ignore[attr-defined]
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}; {args.rounds} rounds x {args.steps} steps")
    print("| model | teacher params | teacher MB | step ms, sparsity | step ms, + KD | overhead |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, (factory, shape) in MODELS.items():
        runs = {kd: setup(factory, shape, kd) for kd in (False, True)}
        times: dict[bool, list[float]] = {False: [], True: []}
        for fn in runs.values():
            for _ in range(3):
                fn()  # warm-up
        for _ in range(args.rounds):
            for kd, fn in runs.items():
                start = time.perf_counter()
                for _ in range(args.steps):
                    fn()
                times[kd].append(1000 * (time.perf_counter() - start) / args.steps)
        teacher = runs[True].ctrl.algorithms[0].teacher  # type: ignore[attr-defined]
        n = sum(p.numel() for p in teacher.parameters())
        mb = sum(t.numel() * t.element_size() for t in teacher.state_dict().values()) / 2**20
        ratios = [b / a for a, b in zip(times[False], times[True])]

        def fmt(v: list[float]) -> str:
            return f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})"

        print(
            f"| {name} | {n:,} | {mb:.2f} | {fmt(times[False])} | {fmt(times[True])} | "
            f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |"
        )


if __name__ == "__main__":
    main()
