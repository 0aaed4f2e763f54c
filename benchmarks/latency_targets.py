"""What ``pruning_latency_target`` asks against what its table predicts and what the whole
stripped model measures, per runtime.

ResNet-18, ResNet-50 and MobileNetV2 (models.py: torchvision's layouts written without it,
random weights, BatchNorm statistics that look trained), default flags (the first conv and the
downsample convs kept), one thread. Per model and backend (``torch``: PyTorch eager,
``openvino``) the latency table and its calibration are measured once in that backend at
``--batch``, then targets 0.3 / 0.5 / 0.7 (1.43x / 2.0x / 3.33x asked) choose widths from it;
each stripped model is timed beside the dense one, whole, in the same backend (interleaved
rounds, the median of per-round ratios: ``strip()``'s ``compress_latency_table``). Filter
pruning at 50% of filters (no latency target) is timed the same way, for the 1.8x goal.

A run is one build of everything (a new table per model and backend); run it three times and
summarise: medians over the runs and their ranges, and how many distinct width choices the
runs made per target.

    python benchmarks/latency_targets.py --json run1.json      # ~10 minutes on 2 cores
    python benchmarks/latency_targets.py --summary run*.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from models import (  # benchmarks/ is on sys.path as a script
    MobileNetV2,
    ResNet18,
    ResNet50,
    trained_looking,
)
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import compress  # noqa: E402
from compress.pruning import latency  # noqa: E402

MODELS: dict[str, Callable[[], nn.Module]] = {
    "ResNet-18": ResNet18,
    "ResNet-50": ResNet50,
    "MobileNetV2": MobileNetV2,
}
TARGETS = (0.3, 0.5, 0.7)


def _recipe(backend: str, batch: int, **params: Any) -> dict[str, Any]:
    params = {"latency_batch_size": batch, "latency_backend": backend, **params}
    params.update(schedule="baseline", num_init_steps=1)
    return {"compression": {"algorithm": "filter_pruning", "params": params}}


def one_model(name: str, backend: str, size: int, batch: int) -> list[dict[str, Any]]:
    """Rows of one model in one backend: each target, then 50% of filters."""
    dense = trained_looking(MODELS[name]())
    x = torch.randn(1, 3, size, size)
    rows, table = [], None
    for target in TARGETS:
        recipe = _recipe(backend, batch, pruning_latency_target=target)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ctrl, _ = compress.create_compressed_model(copy.deepcopy(dense), recipe, x)
            algo = ctrl.algorithms[0]
            algo.latency_table = table
            start = time.perf_counter()
            table = algo.latency()
            if target == TARGETS[0]:
                print(f"{name} {backend}: table {time.perf_counter() - start:.0f} s", flush=True)
            start = time.perf_counter()
            for _ in range(2):  # epoch 0 is num_init_steps, epoch 1 prunes to the target
                ctrl.scheduler.epoch_step()
            choice_s = time.perf_counter() - start  # the choice and its checks
            small = ctrl.strip().eval()
        report = small.compress_latency_table
        again = [  # the stripped model timed twice more beside the dense one
            latency.compare_models(dense, small, (x,), batch_size=batch, backend=backend)  # type: ignore[arg-type]
            for _ in range(2)
        ]
        said = [str(w.message) for w in caught if "out of reach" in str(w.message)]
        rows.append(
            {
                "model": name,
                "backend": backend,
                "what": f"target {target}",
                "asked": 1.0 / (1.0 - target),
                "table": report["table_speedup"],
                "predicted": report["predicted_speedup"],
                "measured": report["measured_speedup"],
                "timings": [report["measured_speedup"], *(m["measured_speedup"] for m in again)],
                "checks": len(report["calibration"].get("checks", [])),
                "choice_s": round(choice_s, 1),
                "chosen": report["chosen"],
                "warned": said[0] if said else "",
                "calibration": report["calibration"],
            }
        )
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "chosen"}), flush=True)
    print(f"uptime: {os.getloadavg()}", flush=True)
    rows += filters(name, backend, dense, x, batch)
    return rows


def filters(name: str, backend: str, dense: nn.Module, x: torch.Tensor, batch: int) -> list[Any]:
    """50% of filters, default flags and every conv prunable, each timed three times."""
    rows = []
    for what, flags in (
        ("filters 50%", {}),
        ("filters 50% all convs", {"prune_first_conv": True, "prune_downsample_convs": True}),
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            params = {"pruning_target": 0.5, "schedule": "baseline", "num_init_steps": 1, **flags}
            recipe = {"compression": {"algorithm": "filter_pruning", "params": params}}
            ctrl, _ = compress.create_compressed_model(copy.deepcopy(dense), recipe, x)
            for _ in range(2):
                ctrl.scheduler.epoch_step()
            small = ctrl.strip().eval()
        timings = [
            latency.compare_models(dense, small, (x,), batch_size=batch, backend=backend)[  # type: ignore[arg-type]
                "measured_speedup"
            ]
            for _ in range(3)
        ]
        rows.append(
            {
                "model": name,
                "backend": backend,
                "what": what,
                "asked": None,
                "table": None,
                "predicted": None,
                "measured": statistics.median(timings),
                "timings": timings,
                "chosen": {},
                "warned": "",
            }
        )
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "chosen"}), flush=True)
    return rows


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    mid = statistics.median(values)
    return f"{mid:.2f}x ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else f"{mid:.2f}x"


def _timed(row: dict[str, Any], fraction: float) -> int:
    """How many width choices for ``fraction`` the build timed (its checks, repeats not)."""
    done = row.get("calibration", {}).get("checks", [])
    return len({round(c["table_ratio"], 9) for c in done if abs(c["fraction"] - fraction) < 1e-9})


def summary(files: list[Path]) -> None:
    """A markdown table: per model, backend and target the medians over runs with ranges."""
    runs = [json.loads(f.read_text()) for f in files]
    keys = list(dict.fromkeys((r["model"], r["backend"], r["what"]) for run in runs for r in run))
    print(
        "| model | backend | what | builds | asked | predicted | measured | within 10% | widths "
        "| checks |"
    )
    print("|---|---|---|---:|---|---|---|---|---|---|")
    for model, backend, what in keys:
        rows = [
            r
            for run in runs
            for r in run
            if (r["model"], r["backend"], r["what"]) == (model, backend, what)
        ]
        measured = [t for r in rows for t in r.get("timings", [r["measured"]])]
        asked = rows[0]["asked"]
        if asked is None:
            within = "≥ 1.8x" if min(measured) >= 1.8 else "< 1.8x"
            print(
                f"| {model} | {backend} | {what} | {len(rows)} | - | - | {_fmt(measured)} | "
                f"{within} | - | - |"
            )
            continue
        predicted = [r["predicted"] for r in rows]
        hits = sum(abs(m / asked - 1) <= 0.1 for m in measured)
        warned = " (warned)" if any(r["warned"] for r in rows) else ""
        distinct = len({json.dumps(r["chosen"], sort_keys=True) for r in rows})
        fraction = 1.0 - 1.0 / asked
        checks = "/".join(f"{_timed(r, fraction)} in {r.get('choice_s', 0):.0f} s" for r in rows)
        print(
            f"| {model} | {backend} | {what} | {len(rows)} | {asked:.2f}x | {_fmt(predicted)} | "
            f"{_fmt(measured)} | {hits}/{len(measured)}{warned} | {distinct} distinct | {checks} |"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--backends", nargs="+", default=["torch", "openvino"])
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", type=Path, help="write the rows of this run here")
    parser.add_argument("--filters-only", action="store_true", help="only the 50%% filter rows")
    parser.add_argument("--summary", nargs="+", type=Path, help="summarise runs' JSON files")
    args = parser.parse_args(argv)
    if args.summary:
        summary(args.summary)
        return
    torch.set_num_threads(1)
    rows = []
    for name in args.models:
        for backend in args.backends:
            if args.filters_only:
                dense = trained_looking(MODELS[name]())
                x = torch.randn(1, 3, args.size, args.size)
                rows += filters(name, backend, dense, x, args.batch)
            else:
                rows += one_model(name, backend, args.size, args.batch)
            if args.json:  # after each model: a run cut short keeps what it measured
                args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
