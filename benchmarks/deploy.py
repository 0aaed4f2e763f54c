"""What filter pruning and sparsity buy in the runtimes a model is deployed in.

ResNet-18 and MobileNetV2 (ImageNet layouts, written in models.py, random weights, BatchNorm
statistics that look trained) at 112x112: dense; filter-pruned by our ``filter_pruning`` at 30,
50 and 70% of filters (default flags: the first conv and the downsample convs are kept; with
``--all-convs`` every conv is prunable) and stripped, i.e. shrunk; 90% sparse by
``magnitude_sparsity`` and stripped (zeros in dense tensors). Each is exported with
``compress.export`` to ONNX and OpenVINO IR (both checked against the model) and run at batch 1
and 8 on one thread in:

- PyTorch eager (``torch.set_num_threads(1)``, inference mode, the stripped model as is);
- ONNX Runtime (CPU provider, one intra-op and one inter-op thread, all graph optimisations);
- OpenVINO (CPU, one inference thread, one stream, float32: its CPU plugin would compute in
  bfloat16 by default on a CPU that has it, which is another model's accuracy).

All run in one process. Each round times every runtime and batch with the variants one after
the other (in a shuffled order), each timing a loop of calls that
lasts about ``--sample-ms``; the speed-up of a variant in a round is dense's time per call over
its own, so load on the machine that lasts a few seconds hits both alike. Per variant: the
median speed-up over the rounds and its range, and dense's median time per call.

    python benchmarks/deploy.py                       # 2 minutes on 2 cores, after the
                                                      # exports (5 minutes, kept in --exports)
    python benchmarks/deploy.py --json run1.json      # also write the figures
    python benchmarks/deploy.py --summary run*.json   # medians over runs and their ranges
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from models import (  # benchmarks/ is on sys.path when run as a script
    MobileNetV2,
    ResNet18,
    trained_looking,
)
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import compress  # noqa: E402
from compress.pruning.sizes import count_macs_params  # noqa: E402

MODELS: dict[str, Callable[[], nn.Module]] = {"ResNet-18": ResNet18, "MobileNetV2": MobileNetV2}
RUNTIMES = ("eager", "onnxruntime", "openvino")
BATCHES = (1, 8)
FILTER_RATIOS = (0.3, 0.5, 0.7)
SPARSITY = 0.9


def _compressed(
    dense: nn.Module, recipe: dict[str, Any], x: torch.Tensor, epochs: int = 0
) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctrl, _ = compress.create_compressed_model(copy.deepcopy(dense), recipe, x)
        for _ in range(epochs):
            ctrl.scheduler.epoch_step()
        return ctrl.strip().eval()


def variants(dense: nn.Module, x: torch.Tensor, all_convs: bool) -> dict[str, nn.Module]:
    flags = {"prune_first_conv": True, "prune_downsample_convs": True} if all_convs else {}
    out = {"dense": dense}
    for ratio in FILTER_RATIOS:
        params = {"pruning_target": ratio, "schedule": "baseline", "num_init_steps": 1, **flags}
        recipe = {"compression": {"algorithm": "filter_pruning", "params": params}}
        # epoch 0 is num_init_steps, epoch 1 prunes to the target
        out[f"filters -{ratio:.0%}"] = _compressed(dense, recipe, x, epochs=2)
    magnitude = {"algorithm": "magnitude_sparsity", "sparsity_init": SPARSITY, "params": {}}
    out[f"sparse {SPARSITY:.0%}"] = _compressed(dense, {"compression": magnitude}, x)
    return out


def latency_variants(
    dense: nn.Module, x: torch.Tensor, all_convs: bool, backends: list[str], batch: int
) -> tuple[dict[str, nn.Module], dict[str, float]]:
    """Dense and ``pruning_latency_target`` 0.3 / 0.5 / 0.7 with the table measured in each
    backend at ``batch`` (once per backend, then handed on as a resume would), and the latency
    each one's table predicts removed."""
    from compress.errors import ConfigError
    from compress.pruning import latency_widths

    flags = {"prune_first_conv": True, "prune_downsample_convs": True} if all_convs else {}
    out, predicted = {"dense": dense}, {}
    for backend in backends:
        table = None
        for target in (0.3, 0.5, 0.7):
            params = {
                "pruning_latency_target": target,
                "latency_batch_size": batch,
                "latency_backend": backend,
                "schedule": "baseline",
                "num_init_steps": 1,
                **flags,
            }
            recipe = {"compression": {"algorithm": "filter_pruning", "params": params}}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ctrl, _ = compress.create_compressed_model(copy.deepcopy(dense), recipe, x)
                algo = ctrl.algorithms[0]
                algo.latency_table = table
                start = time.perf_counter()
                table = algo.latency()
                if target == 0.3:
                    print(f"{backend} table: {time.perf_counter() - start:.0f} s", flush=True)
                try:
                    for _ in range(2):
                        ctrl.scheduler.epoch_step()
                except ConfigError as e:  # out of reach with these flags
                    print(f"{backend} {target}: {e}")
                    continue
                small = ctrl.strip().eval()
            name = f"latency {target:.0%} ({backend} table)"
            out[name] = small
            chosen = small.compress_latency_table["chosen"]
            predicted[name] = latency_widths.removed_fraction(table, chosen)
    return out, predicted


def runners(
    model: nn.Module, prefix: Path, x1: torch.Tensor
) -> dict[str, Callable[[np.ndarray], object]]:
    """One call per runtime on a batch (numpy), the model exported through ``compress.export``
    unless ``prefix`` holds its exports from an earlier run (the models are seeded)."""
    import onnxruntime as ort
    import openvino as ov

    paths = {"onnx": prefix.with_suffix(".onnx"), "openvino": prefix.with_suffix(".xml")}
    if not all(p.is_file() for p in (*paths.values(), prefix.with_suffix(".bin"))):
        paths = compress.export(model, prefix, ["onnx", "openvino"], example_inputs=x1)
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(str(paths["onnx"]), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    compiled = ov.Core().compile_model(
        str(paths["openvino"]),
        "CPU",
        {
            "INFERENCE_NUM_THREADS": 1,
            "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "f32",
        },
    )
    request = compiled.create_infer_request()

    def eager(a: np.ndarray) -> object:
        with torch.inference_mode():
            return model(torch.from_numpy(a))

    return {
        "eager": eager,
        "onnxruntime": lambda a: session.run(None, {name: a}),
        "openvino": lambda a: request.infer({0: a}),
    }


def _loop(fn: Callable[[np.ndarray], object], a: np.ndarray, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn(a)
    return (time.perf_counter() - start) / calls


def measure(
    model_name: str,
    rounds: int,
    sample_ms: float,
    all_convs: bool,
    size: int,
    exports: Path,
    latency: list[str] | None = None,
) -> list[dict[str, Any]]:
    torch.manual_seed(0)  # the same models in every run, so the kept exports are theirs
    dense = trained_looking(MODELS[model_name]())
    x1 = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    tag = f"{model_name}-{size}-{'all' if all_convs else 'default'}"
    predicted: dict[str, float] = {}
    if latency:  # timing decides the widths: no export of another run is these models'
        models, predicted = latency_variants(dense, x1, all_convs, latency, max(BATCHES))
        exports = Path(tempfile.mkdtemp(prefix="compress-deploy-latency-"))
    else:
        models = variants(dense, x1, all_convs)
    run = {
        v: runners(m, exports / f"{tag}-{v.replace(' ', '').replace('%', '')}", x1)
        for v, m in models.items()
    }
    inputs = {
        b: np.random.default_rng(b).standard_normal((b, 3, size, size), np.float32) for b in BATCHES
    }
    with torch.no_grad():  # each runtime computes what the model does (a wrong export is no data)
        for v, fns in run.items():
            want = models[v](torch.from_numpy(inputs[8]))
            for rt in ("onnxruntime", "openvino"):
                got = fns[rt](inputs[8])
                got = got[0] if isinstance(got, list) else next(iter(got.values()))
                err = float((torch.from_numpy(np.asarray(got)) - want).abs().max())
                assert err <= 1e-3 * float(want.abs().max()), (model_name, v, rt, err)
    keys = [(b, rt) for b in BATCHES for rt in RUNTIMES]
    calls: dict[tuple[int, str, str], int] = {}
    for b, rt in keys:  # warm up; calls per timed loop so that a loop lasts about sample_ms
        for v, fns in run.items():
            _loop(fns[rt], inputs[b], 2)
            one = _loop(fns[rt], inputs[b], 1)
            calls[b, rt, v] = max(1, round(sample_ms / 1e3 / one))
    times: dict[tuple[int, str, str], list[float]] = {k: [] for k in calls}
    rng = random.Random(0)
    order = list(run)
    for _ in range(rounds):
        for b, rt in keys:
            rng.shuffle(order)
            for v in order:
                times[b, rt, v].append(_loop(run[v][rt], inputs[b], calls[b, rt, v]))
    rows = []
    for b, rt, v in times:
        speedups = [d / t for d, t in zip(times[b, rt, "dense"], times[b, rt, v], strict=True)]
        rows.append(
            {
                "model": model_name,
                "batch": b,
                "runtime": rt,
                "variant": v,
                "macs": count_macs_params(models[v], x1)[0],
                "params": sum(p.numel() for p in models[v].parameters()),
                "ms": statistics.median(times[b, rt, v]) * 1e3,
                "speedup": statistics.median(speedups),
                "speedup_min": min(speedups),
                "speedup_max": max(speedups),
                "predicted_removed": predicted.get(v),
            }
        )
    return rows


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    """One table per model: a row per batch and variant, a column per runtime."""
    print(f"\n{title}\n")
    for model in dict.fromkeys(r["model"] for r in rows):
        print(f"**{model}**\n")
        print("| batch | variant | MACs (M) | " + " | ".join(RUNTIMES) + " |")
        print("|---:|---|---:|" + "---:|" * len(RUNTIMES))
        for b in BATCHES:
            for v in dict.fromkeys(r["variant"] for r in rows if r["model"] == model):
                cells = {
                    r["runtime"]: r
                    for r in rows
                    if (r["model"], r["batch"], r["variant"]) == (model, b, v)
                }
                macs = next(iter(cells.values()))["macs"] / 1e6
                if v == "dense":
                    text = [f"{cells[rt]['ms']:.1f} ms" for rt in RUNTIMES]
                else:
                    text = [
                        f"{cells[rt]['speedup']:.2f}x ({cells[rt]['speedup_min']:.2f}-"
                        f"{cells[rt]['speedup_max']:.2f})"
                        for rt in RUNTIMES
                    ]
                print(f"| {b} | {v} | {macs:.0f} | " + " | ".join(text) + " |")
        print()


def summary(files: list[Path]) -> None:
    """Across runs: the median of the runs' median speed-ups and their range."""
    runs = [json.loads(f.read_text()) for f in files]
    merged: dict[tuple[str, int, str, str], list[dict[str, Any]]] = {}
    for rows in runs:
        for r in rows:
            merged.setdefault((r["model"], r["batch"], r["runtime"], r["variant"]), []).append(r)
    out = []
    for (model, b, rt, v), rs in merged.items():
        s = [r["speedup"] for r in rs]
        ms = [r["ms"] for r in rs]
        out.append(
            {
                "model": model,
                "batch": b,
                "runtime": rt,
                "variant": v,
                "macs": rs[0]["macs"],
                "ms": statistics.median(ms),
                "speedup": statistics.median(s),
                "speedup_min": min(s),
                "speedup_max": max(s),
            }
        )
    print_table(
        out,
        f"{len(files)} runs: speed-up over dense in the same runtime, the median of the runs' "
        "medians (range of the runs' medians); dense: median time per call",
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--sample-ms", type=float, default=40.0, help="length of a timed loop")
    parser.add_argument("--size", type=int, default=112, help="input height and width")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument(
        "--all-convs", action="store_true", help="the first and downsample convs too"
    )
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument(
        "--exports",
        type=Path,
        default=Path(tempfile.gettempdir()) / "compress-deploy-bench",
        help="the exported files, kept for the next run (exporting takes minutes)",
    )
    parser.add_argument("--summary", type=Path, nargs="+", help="summarise the runs' JSON files")
    parser.add_argument(
        "--latency",
        nargs="+",
        choices=["torch", "onnxruntime", "openvino"],
        help="instead of the filter ratios and sparsity: pruning_latency_target 0.3 / 0.5 / 0.7 "
        "with the table measured in each of these backends at batch 8",
    )
    args = parser.parse_args(argv)
    if args.summary:
        summary(args.summary)
        return
    torch.set_num_threads(1)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed"
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.export's pytree notices
    start = time.perf_counter()
    rows = []
    for name in args.models:
        rows += measure(
            name,
            args.rounds,
            args.sample_ms,
            args.all_convs,
            args.size,
            args.exports,
            args.latency,
        )
    flags = "every conv prunable" if args.all_convs else "default flags"
    print_table(
        rows,
        f"{args.size}x{args.size}, one thread, {args.rounds} rounds, filter pruning with {flags}: "
        "speed-up over dense in the same runtime, median (range over rounds); dense: median "
        f"time per call ({time.perf_counter() - start:.0f} s in all)",
    )
    for r in rows:
        if r.get("predicted_removed") is not None and r["batch"] == max(BATCHES):
            asked = 1 / (1 - float(r["variant"].split()[1].rstrip("%")) / 100)
            print(
                f"{r['model']} {r['variant']} in {r['runtime']}, batch {r['batch']}: asked "
                f"{asked:.2f}x, predicted {1 / (1 - r['predicted_removed']):.2f}x, measured "
                f"{r['speedup']:.2f}x"
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
