"""Training-step overhead of masking: dense vs ours vs ``torch.nn.utils.prune``.

A small CIFAR-style ResNet (stem conv 3->32, three stages of two basic blocks with 32/64/128
channels, BatchNorm, ReLU, stride-2 downsampling with a 1x1 shortcut, average pool, Linear)
trains on a fixed random batch of 64 images of 32x32 with SGD and momentum. One step is
forward, cross-entropy, backward and ``optimizer.step()``; for our variants it also adds
``ctrl.loss()`` to the loss and calls ``ctrl.scheduler.step()``, as a user would.

Variants, all from the same initial weights:

- ``dense``: the plain model;
- ``ours magnitude 50%``: ``magnitude_sparsity`` at a constant 50%, global, masks set once;
- ``torch.prune L1 50%``: ``prune.global_unstructured(..., prune.L1Unstructured, amount=0.5)``;
- ``ours rb_sparsity``: NNCF-style RB sparsity (learned masks, density loss), when the
  algorithm is registered in ``compress.algorithms.ALGORITHMS``.

The variants run in one process, one step each in turn (round-robin, the starting variant
rotating every round), so that load from other processes on a shared machine falls on all of
them alike. The table gives the median step time,
the ratio of medians to dense, and the median of the per-round ratios (each step divided by
the dense step of the same round), which is the less noisy of the two, and the median CPU time
of the process per step (``time.process_time``), which time spent waiting for a core while
other jobs run does not inflate. One intra-op thread by
default: on two cores shared with other jobs, two threads made a dense step 2-3x slower and far
noisier (threads wait for each other at every barrier).

    python benchmarks/overhead.py              # 40 timed steps per variant, about 4 minutes
    python benchmarks/overhead.py --steps 100
    python benchmarks/overhead.py --quick      # 15 timed steps, a smoke run
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from models import BasicBlock  # benchmarks/ is on sys.path when run as a script
from torch import nn
from torch.nn.utils import prune

import compress
from compress.algorithms import ALGORITHMS

BATCH = 64
LEVEL = 0.5


def level_recipe(algorithm: str) -> dict:
    """A recipe that holds ``algorithm`` at LEVEL (target == init keeps the polynomial flat)."""
    return {
        "compression": {
            "algorithm": algorithm,
            "sparsity_init": LEVEL,
            "params": {
                "schedule": "polynomial",
                "sparsity_target": LEVEL,
                "sparsity_target_epoch": 10,
                "sparsity_freeze_epoch": 100,
                "update_per_optimizer_step": False,
                "sparsity_level_setting_mode": "global",
            },
        }
    }


MAGNITUDE_RECIPE = level_recipe("magnitude_sparsity")
RB_RECIPE = level_recipe("rb_sparsity")


class SmallResNet(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (32, 64, 128), classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        blocks, cin = [], widths[0]
        for i, cout in enumerate(widths):
            stride = 1 if i == 0 else 2
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.bn(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@dataclass
class Variant:
    name: str
    step: Callable[[], None]
    times: list[float]
    cpu: list[float]


def make_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    ctrl: compress.CompressionController | None = None,
) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        if ctrl is not None:
            loss = loss + ctrl.loss()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ctrl is not None:
            ctrl.scheduler.step()

    return step


def build_variants(x: torch.Tensor, y: torch.Tensor) -> list[Variant]:
    torch.manual_seed(0)
    base = SmallResNet()
    out = [Variant("dense", make_step(copy.deepcopy(base), x, y), [], [])]

    model = copy.deepcopy(base)
    ctrl, model = compress.create_compressed_model(model, MAGNITUDE_RECIPE, x[:1])
    ctrl.scheduler.epoch_step()
    out.append(Variant("ours magnitude 50%", make_step(model, x, y, ctrl), [], []))

    model = copy.deepcopy(base)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    prune.global_unstructured(
        [(m, "weight") for m in layers], pruning_method=prune.L1Unstructured, amount=LEVEL
    )
    out.append(Variant("torch.prune L1 50%", make_step(model, x, y), [], []))

    if "rb_sparsity" in ALGORITHMS:
        model = copy.deepcopy(base)
        ctrl, model = compress.create_compressed_model(model, RB_RECIPE, x[:1])
        ctrl.scheduler.epoch_step()
        out.append(Variant("ours rb_sparsity", make_step(model, x, y, ctrl), [], []))
    else:
        print("rb_sparsity is not in compress.algorithms.ALGORITHMS: skipped")
    return out


def run(steps: int, warmup: int) -> list[Variant]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (BATCH,), generator=gen)
    variants = build_variants(x, y)
    for r in range(warmup + steps):
        # each round starts one variant later, so no variant always follows the same one
        start = r % len(variants)
        for v in variants[start:] + variants[:start]:
            c0, t0 = time.process_time(), time.perf_counter()
            v.step()
            t, c = time.perf_counter() - t0, time.process_time() - c0
            if r >= warmup:
                v.times.append(t)
                v.cpu.append(c)
    return variants


def table(variants: list[Variant]) -> str:
    dense, dense_cpu = variants[0].times, variants[0].cpu
    lines = [
        "| variant | median wall (ms) | IQR wall (ms) | wall ratio | per-round wall ratio "
        "| median CPU (ms) | CPU ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for v in variants:
        med = statistics.median(v.times)
        q = statistics.quantiles(v.times, n=4)
        paired = statistics.median(t / d for t, d in zip(v.times, dense))
        cpu = statistics.median(v.cpu)
        lines.append(
            f"| {v.name} | {med * 1e3:.1f} | {(q[2] - q[0]) * 1e3:.1f} "
            f"| {med / statistics.median(dense):.3f}x | {paired:.3f}x "
            f"| {cpu * 1e3:.1f} | {cpu / statistics.median(dense_cpu):.3f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per variant")
    parser.add_argument("--quick", action="store_true", help="15 timed steps, 3 warm-up")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps, warmup = (15, 3) if args.quick else (max(15, args.steps), args.warmup)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH}, "
        f"32x32, {steps} timed steps per variant (round-robin, {warmup} warm-up)"
    )
    print(table(run(steps, warmup)))


if __name__ == "__main__":
    main()
