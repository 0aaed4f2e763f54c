"""Training-step time under ``torch.compile``: eager vs compiled, dense vs masked.

A 12-layer MLP (256 wide, ReLU) trains on a fixed batch of 64 with SGD. "masked" is the same
network under ``magnitude_sparsity`` at 50% (masks set once); "compiled" is
``torch.compile(net)`` (inductor) after the masks are attached, with the hook guards on (as
``CompressionCallback`` sets them: see ``main``). One step is forward, cross-entropy, backward
and ``optimizer.step()``. Before timing, each variant warms up (compilation), and the number of
graphs and recompiles dynamo made is read from its counters, after the warm-up and again at the
end (no recompile may happen while timing).

The four variants run in one process, one step each in turn, the first variant rotating every
round; the table gives the median step time over the timed rounds, the range of the per-repeat
medians, and the median of the per-round ratios to "dense compiled". One intra-op thread.

    python benchmarks/compiled_step.py               # 5 repeats of 60 rounds
    python benchmarks/compiled_step.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import compress  # noqa: E402


def mlp(width: int = 256, depth: int = 12) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers)


def variant(masked: bool, compiled: bool):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    net = mlp()
    if masked:
        recipe = {"compression": {"algorithm": "magnitude_sparsity", "sparsity_init": 0.5}}
        _, net = compress.create_compressed_model(net, recipe, torch.zeros(1, 256))
    if compiled:
        net = torch.compile(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(64, 256)
    y = torch.randint(0, 256, (64,))

    def step() -> float:
        start = time.perf_counter()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return time.perf_counter() - start

    return step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.rounds = 2, 20
    torch.set_num_threads(1)
    # As CompressionCallback does: without hook guards, "masked compiled" would reuse the graph
    # traced for "dense compiled" (same class and code) and run without its masks.
    torch._dynamo.config.skip_nnmodule_hook_guards = False
    names = ["dense eager", "masked eager", "dense compiled", "masked compiled"]
    steps = {n: variant(masked="masked" in n, compiled="compiled" in n) for n in names}
    for step in steps.values():  # warm-up: compile, first-call costs
        for _ in range(5):
            step()
    graphs = dict(counters["stats"])
    recompiles_after_warmup = sum(counters["recompiles"].values())
    medians: dict[str, list[float]] = {n: [] for n in names}
    ratios: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.repeats):
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.rounds):
            order = names[r % 4 :] + names[: r % 4]
            got = {n: steps[n]() for n in order}
            for n in names:
                times[n].append(got[n])
                ratios[n].append(got[n] / got["dense compiled"])
        for n in names:
            medians[n].append(statistics.median(times[n]))
    recompiles = sum(counters["recompiles"].values()) - recompiles_after_warmup
    print(f"dynamo after warm-up: {graphs}; recompiles while timing: {recompiles}")
    print(
        "| variant | median step ms | range of repeat medians | per-round ratio to dense compiled |"
    )
    print("|---|---:|---:|---:|")
    for n in names:
        all_ms = statistics.median(medians[n]) * 1e3
        lo, hi = min(medians[n]) * 1e3, max(medians[n]) * 1e3
        print(f"| {n} | {all_ms:.2f} | {lo:.2f}-{hi:.2f} | {statistics.median(ratios[n]):.3f} |")


if __name__ == "__main__":
    main()
