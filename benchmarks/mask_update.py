"""Time and peak extra memory of one global magnitude mask (level 0.9) vs parameter count.

The model is a chain of bias-free Linear layers of varied widths (``linear_chain``), scaled to
about 1M, 5M, 25M and 100M weights. Methods:

- ``ours keep masks``: ``|w|`` per layer, then ``compress.sparsity.importance.global_keep_masks``;
- ``ours set_masks``: ``ctrl.algorithms[0].set_masks(0.9)`` of a ``magnitude_sparsity``
  controller (recipe defaults: ``normed_abs`` importance, global mode), which also checks the
  weights for NaN, copies the masks into the mask buffers and records per-layer thresholds;
- ``torch.prune``: ``prune.global_unstructured(..., prune.L1Unstructured, amount=0.9)`` on the
  plain model (this also creates ``weight_orig`` and ``weight_mask``, which is part of its cost);
- NNCF 2.17 (``ctrl.set_sparsity_level(0.9)``) comes from ``benchmarks/nncf_mask_update.py``,
  which needs its own virtual environment; see that file.

Method: every measurement runs in a fresh subprocess, so no method inherits another's heap.
The subprocess builds the model (and the controller) first, then resets the kernel's peak
resident-set counter (``echo 5 > /proc/self/clear_refs`` resets ``VmHWM``), reads ``VmRSS``,
runs the one timed call, and reads ``VmHWM`` again: peak extra memory is ``VmHWM - VmRSS``,
i.e. every page the call touched beyond what the model already held, including memory it
freed before returning and memory it keeps (torch.prune's ``weight_orig``/``weight_mask``).
``tracemalloc`` does not see torch's allocations, and torch keeps no allocator statistics on
CPU; the kernel's counter sees everything. Repeats are interleaved (method by method) and the
table gives medians.

    python benchmarks/mask_update.py            # 1M, 5M, 25M, 100M weights, 3 repeats
    python benchmarks/mask_update.py --quick    # up to 25M
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

LEVEL = 0.9
SIZES = (1_000_000, 5_000_000, 25_000_000, 100_000_000)
# Widths of the chain in units of a base width: layers of shapes 1x2, 2x1, 1x4, 4x2, ...
WIDTH_MULTIPLIERS = (1, 2, 1, 4, 2, 3, 1, 2, 1)
METHODS = ("ours keep masks", "ours set_masks", "torch.prune")


def linear_chain(n_weights: int, seed: int = 0) -> nn.Sequential:
    """Bias-free Linear layers whose widths follow ``WIDTH_MULTIPLIERS`` (a multiple of 8),
    with about ``n_weights`` weights in total. Weights are drawn in place, so building the model
    leaves no freed peak behind it."""
    products = sum(a * b for a, b in zip(WIDTH_MULTIPLIERS, WIDTH_MULTIPLIERS[1:]))
    base = max(8, round((n_weights / products) ** 0.5 / 8) * 8)
    widths = [m * base for m in WIDTH_MULTIPLIERS]
    gen = torch.Generator().manual_seed(seed)
    layers = []
    with torch.no_grad():
        for cin, cout in zip(widths, widths[1:]):
            layer = nn.Linear(cin, cout, bias=False, device="meta").to_empty(device="cpu")
            layer.weight.normal_(0.0, cin**-0.5, generator=gen)
            layers.append(layer)
    return nn.Sequential(*layers)


def n_weights(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def memory_kb() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+)", text).group(1)) for k in ("VmRSS", "VmHWM")}  # type: ignore[union-attr]


def measure(fn: Callable[[], object]) -> dict[str, float]:
    """Times one call of ``fn`` and the peak memory it adds over the resident set before it."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = memory_kb()["VmRSS"]
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    peak = memory_kb()["VmHWM"]
    return {"seconds": seconds, "peak_extra_mb": (peak - before) / 1024}


def setup(method: str, size: int) -> tuple[int, Callable[[], object]]:
    """Builds the model for ``method`` and returns (weights, the call to time)."""
    model = linear_chain(size)
    total = n_weights(model)
    if method == "ours keep masks":
        from compress.sparsity.importance import abs_importance, global_keep_masks

        weights = [m.weight for m in model]

        def call() -> object:
            scores = [abs_importance(w) for w in weights]
            return global_keep_masks(scores, round(LEVEL * total))

        return total, call
    if method == "ours set_masks":
        import compress

        recipe = {"compression": {"algorithm": "magnitude_sparsity", "sparsity_init": 0.0}}
        ctrl, model = compress.create_compressed_model(model, recipe)
        return total, lambda: ctrl.algorithms[0].set_masks(LEVEL)
    if method == "torch.prune":
        from torch.nn.utils import prune

        params = [(m, "weight") for m in model]
        return total, lambda: prune.global_unstructured(
            params, pruning_method=prune.L1Unstructured, amount=LEVEL
        )
    raise ValueError(f"unknown method {method!r}")


def worker(method: str, size: int) -> None:
    total, call = setup(method, size)
    out = measure(call)
    print(json.dumps({"method": method, "size": size, "weights": total, **out}))


def run_one(method: str, size: int, threads: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--worker", method, str(size), "--threads", str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode:
        raise RuntimeError(f"{method} at {size}: {res.stderr.strip()[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def table(results: dict[tuple[str, int], list[dict[str, float]]], sizes: tuple[int, ...]) -> str:
    lines = [
        "| weights | method | median time (s) | median peak extra memory (MB) | repeats |",
        "|---:|---|---:|---:|---:|",
    ]
    for size in sizes:
        for method in METHODS:
            runs = results.get((method, size), [])
            if not runs:
                continue
            t = statistics.median(r["seconds"] for r in runs)
            mem = statistics.median(r["peak_extra_mb"] for r in runs)
            weights = runs[0]["weights"] / 1e6
            lines.append(f"| {weights:.1f}M | {method} | {t:.3f} | {mem:.0f} | {len(runs)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="only up to 25M weights")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        worker(args.worker[0], int(args.worker[1]))
        return
    sizes = tuple(s for s in SIZES if not args.quick or s <= 25_000_000)
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), level {LEVEL}, "
        f"{args.repeats} repeats, one fresh subprocess per measurement"
    )
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    for size in sizes:
        for _ in range(args.repeats):
            for method in METHODS:
                r = run_one(method, size, args.threads)
                results.setdefault((method, size), []).append(r)
                print(
                    f"  {r['weights'] / 1e6:.1f}M {method}: {r['seconds']:.3f} s, "
                    f"{r['peak_extra_mb']:.0f} MB",
                    flush=True,
                )
    print(table(results, sizes))


if __name__ == "__main__":
    main()
