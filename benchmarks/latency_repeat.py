"""Does the same ``pruning_latency_target`` choose the same widths, build after build?

Builds the digits CNN (``examples/digits_cnn.py``: convs of 32, 64 and 128 channels on 8x8
images, default flags, so the first conv stays whole) with ``pruning_latency_target`` at
``--batch`` in ``--runs`` separate processes (each measures its own latency table), strips it,
and prints per run the widths chosen, the predicted speed-up with its spread and the measured
one (the stripped model against the dense one, interleaved rounds).

    python benchmarks/latency_repeat.py --runs 5 --target 0.7 --batch 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def one_build(target: float, batch: int, seed: int, threads: int) -> dict[str, object]:
    sys.path.insert(0, str(ROOT / "examples"))
    sys.path.insert(0, str(ROOT))
    from digits_cnn import DigitsCNN

    import compress

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = DigitsCNN()
    params = {"pruning_latency_target": target, "latency_batch_size": batch, "schedule": "baseline"}
    recipe = {"compression": {"algorithm": "filter_pruning", "params": params}}
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctrl, _ = compress.create_compressed_model(model, recipe, torch.zeros(1, 64))
        table_s = time.perf_counter() - start
        small = ctrl.strip()
    report = dict(small.compress_latency_table)
    if "predicted_speedup" not in report:  # a version before spreads were kept
        from compress.pruning.latency_widths import predicted_ms

        report["predicted_speedup"] = predicted_ms(report, {}) / report["predicted_ms"]
        report["measured_speedup"] = report["model_ms"] / report["measured_ms"]
    keys = ("predicted_speedup", "predicted_speedup_spread", "measured_speedup")
    keys += ("measured_speedup_spread", "measured_rounds")
    torch.manual_seed(seed)
    ratio, spread = speedup(DigitsCNN().eval(), small.eval(), batch)
    return {
        "widths": list(report["chosen"].values()),
        "table_rounds": report.get("rounds"),
        "table_s": round(table_s, 1),
        **{k: round(report[k], 3) for k in keys if k in report},
        "rechecked_speedup": round(ratio, 3),
        "rechecked_spread": round(spread, 3),
    }


@torch.no_grad()
def speedup(dense: torch.nn.Module, small: torch.nn.Module, batch: int) -> tuple[float, float]:
    """Dense over stripped time per round, 30 rounds of both taking turns (each a 20-call
    median after warm-up): the median ratio and its robust standard error (1.858 MAD / sqrt n),
    timed here rather than by the library, so that builds of any version compare alike."""
    x = torch.randn(batch, 64)
    for _ in range(5):
        dense(x), small(x)

    def once(model: torch.nn.Module) -> float:
        times = []
        for _ in range(20):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    ratios = [once(dense) / once(small) for _ in range(30)]
    mid = statistics.median(ratios)
    mad = statistics.median(abs(r - mid) for r in ratios)
    return mid, 1.858 * mad / len(ratios) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--target", type=float, default=0.7)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_build(args.target, args.batch, args.seed, args.threads)))
        return
    rows = []
    for run in range(args.runs):
        cmd = [sys.executable, __file__, "--one", "--target", str(args.target)]
        cmd += [
            "--batch",
            str(args.batch),
            "--seed",
            str(args.seed),
            "--threads",
            str(args.threads),
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
        row = json.loads(out.strip().splitlines()[-1])
        rows.append(row)
        print(f"run {run + 1}: {json.dumps(row)}", flush=True)
    chosen = {json.dumps(r["widths"], sort_keys=True) for r in rows}
    print(f"{len(chosen)} distinct width choice(s) in {len(rows)} runs")
    measured = [float(r["rechecked_speedup"]) for r in rows]
    print(
        f"measured speed-up median {statistics.median(measured):.2f}x "
        f"({min(measured):.2f}-{max(measured):.2f}) for a target of {1 / (1 - args.target):.2f}x"
    )


if __name__ == "__main__":
    main()
