"""Filter pruning on a CIFAR-style ResNet-18: our masks -> shrink path against Torch-Pruning's own.

For each ratio, every channel group keeps ``round_keep(size, size * (1 - ratio), round_to)``
channels chosen by L1 norm; Torch-Pruning's ``MagnitudePruner`` (L1, same ``round_to``) prunes a
copy of the same model at the same ratio. Widths are rounded to multiples of 8 (the recipe
default) and of 16 (the channel block of oneDNN's AVX-512 convolutions: a 24-channel 3x3 conv
at 16x16, batch 64, took as long as a 32-channel one here, 1.61 ms each). Reports MAC
reduction, parameters, CPU latency speed-up at batch 1 and 64 (medians of interleaved runs) and
speed-up / MAC reduction, which says how much of the arithmetic saved turns into time saved, in
two settings applied alike to every model:

- eager: the models as trained (NCHW, BatchNorm as its own op);
- deploy: PyTorch's CPU inference setup, BatchNorm folded into the convolutions
  (``torch.fx.experimental.optimization.fuse``) and channels-last tensors.

    python benchmarks/structured.py              # widths 32..256, 2.8M parameters
    python benchmarks/structured.py --threads 1  # one intra-op thread
    python benchmarks/structured.py --width 64   # the full ResNet-18, 11M parameters (slow)
    python benchmarks/structured.py --quick      # widths 16..128, a smoke run
    python benchmarks/structured.py --focus 200 --round-to 16  # dense vs ours only, deploy, b64
    python benchmarks/structured.py --latency 40  # latency target vs FLOPs target vs Torch-Pruning

``--latency ROUNDS``: for 30/50/70% of latency to remove, our ``pruning_latency_target`` (its
table measured once, eager, at ``--batch``), our ``pruning_flops_target`` at the MACs the
latency target reached, and Torch-Pruning (L1, ``round_to`` 8) at those MACs too, timed eager
at ``--batch`` taking turns for ROUNDS rounds: the per-round speed-up (dense time / pruned time)
as median and range, the latency removed it means, the importance kept (unit-L2-normalised L1
channel norms per group, summed over kept channels) and MACs.

The default is the half-width network because a batch of 64 through the full one takes
seconds on a small shared CPU, which leaves too few repetitions in five minutes.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
import torch_pruning as tp
from models import BasicBlock  # benchmarks/ is on sys.path when run as a script
from torch import nn
from torch.fx.experimental.optimization import fuse

import compress
from compress.pruning import latency_widths
from compress.pruning.channel_groups import build_groups
from compress.pruning.sizes import count_macs_params
from compress.pruning.structured import (
    apply_channel_mask,
    channel_norms,
    round_keep,
    shrink,
)


class ResNet18(nn.Module):
    def __init__(self, width: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        layers, cin = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2**i
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(F.relu(self.bn(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def ours(
    model: nn.Module, x: torch.Tensor, ratio: float, round_to: int = 8
) -> tuple[nn.Module, float]:
    """Masks the lowest-L1 channels of every group, then shrinks; returns (model, max rel error)."""
    masked = copy.deepcopy(model)
    groups = build_groups(masked, x, prune_first_conv=True, prune_downsample_convs=True)
    keep = {}
    for group in groups:
        n_keep = round_keep(group.size, round(group.size * (1 - ratio)), round_to)
        k = torch.zeros(group.size, dtype=torch.bool)
        k[channel_norms(masked, group, p=1).topk(n_keep).indices] = True
        keep[group.name] = k
        apply_channel_mask(masked, group, k)
    small = shrink(masked, groups, keep, example_inputs=x).eval()
    with torch.no_grad():
        want, got = masked(x), small(x)
    return small, float((want - got).abs().max() / want.abs().max())


def torch_pruning(model: nn.Module, x: torch.Tensor, ratio: float, round_to: int = 8) -> nn.Module:
    small = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MagnitudePruner(
            small,
            x,
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=ratio,
            ignored_layers=[small.fc],
            round_to=round_to,
        )
        pruner.step()
    return small.eval()


def deploy(model: nn.Module) -> nn.Module:
    """BatchNorm folded into the convolutions, weights in channels-last layout."""
    return fuse(copy.deepcopy(model)).to(memory_format=torch.channels_last)


def timings(
    models: dict[str, nn.Module], x: torch.Tensor, reps: int, channels_last: bool = False
) -> dict[str, list[float]]:
    """Seconds per forward, one per round; models take turns so that load on the machine hits
    all alike."""
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model(x)  # warm-up: allocator and kernel selection
        for _ in range(reps):
            for name, model in models.items():
                start = time.perf_counter()
                model(x)
                times[name].append(time.perf_counter() - start)
    return times


def latencies(
    models: dict[str, nn.Module], x: torch.Tensor, reps: int, channels_last: bool = False
) -> dict[str, float]:
    """Median seconds per forward of each model (see :func:`timings`)."""
    return {n: statistics.median(t) for n, t in timings(models, x, reps, channels_last).items()}


def focus(
    dense: nn.Module,
    x1: torch.Tensor,
    x64: torch.Tensor,
    ratios: tuple[float, ...],
    round_to: int,
    rounds: int,
) -> None:
    """Many rounds of a few models: each round's dense time over the pruned model's, divided by
    the MAC reduction, so that slow drifts of the machine cancel within a round."""
    dense_macs = count_macs_params(dense, x1)[0]
    models = {"dense": deploy(dense)}
    reduction = {}
    for ratio in ratios:
        small = ours(dense, x1, ratio, round_to)[0]
        reduction[f"{ratio:.0%}"] = dense_macs / count_macs_params(small, x1)[0]
        models[f"{ratio:.0%}"] = deploy(small)
    times = timings(models, x64, rounds, channels_last=True)
    print(f"deploy setting, batch 64, {torch.get_num_threads()} threads, {rounds} rounds\n")
    head = "| MAC reduction | speed-up / MAC reduction: median | IQR |"
    print(f"| ours, round_to {round_to} {head}")
    print("|---|---:|---:|---|")
    for name, red in reduction.items():
        per = [d / p / red for d, p in zip(times["dense"], times[name])]
        q1, mid, q3 = statistics.quantiles(per, n=4)
        print(f"| {name} | {red:.2f}x | {mid:.2f} | {q1:.2f}-{q3:.2f} |")
    print(f"\ndense: median {statistics.median(times['dense']) * 1e3:.1f} ms")


def _recipe(**params: object) -> dict[str, object]:
    return {
        "compression": {
            "algorithm": "filter_pruning",
            "params": {
                "filter_importance": "L1",
                "prune_first_conv": True,
                "prune_downsample_convs": True,
                "schedule": "baseline",
                "num_init_steps": 1,
                **params,
            },
        }
    }


def _pruned(dense: nn.Module, x: torch.Tensor, table: dict | None, **params: object) -> tuple:
    """(stripped model, importance kept, table) of our filter pruning with ``params``; the
    latency table is measured once and handed to later runs, as a resume would."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctrl, _ = compress.create_compressed_model(copy.deepcopy(dense), _recipe(**params), x)
    algo = ctrl.algorithms[0]
    if "pruning_latency_target" in params:
        algo.latency_table = table
        table = algo.latency()
    for _ in range(2):  # epoch 0: num_init_steps; epoch 1: the target
        ctrl.scheduler.epoch_step()
    scores = algo.scores()
    kept = total = 0.0
    for name, s in scores.items():
        s = s / s.norm()
        kept += float(s[algo.keep[name]].sum())
        total += float(s.sum())
    return ctrl.strip().eval(), kept / total, table


def _tp_at_macs(dense: nn.Module, x: torch.Tensor, macs: int) -> nn.Module:
    """Torch-Pruning (L1, round_to 8) at the ratio whose MACs come closest to ``macs``."""
    lo, hi, best = 0.0, 0.95, (float("inf"), dense)
    for _ in range(12):
        mid = (lo + hi) / 2
        small = torch_pruning(dense, x, mid, 8)
        got = count_macs_params(small, x)[0]
        best = min(best, (abs(got - macs), small), key=lambda b: b[0])
        lo, hi = (mid, hi) if got > macs else (lo, mid)
    return best[1]


def latency_target(dense: nn.Module, x1: torch.Tensor, batch: int, rounds: int) -> None:
    """Our latency target beside our FLOPs target and Torch-Pruning at the same MACs."""
    dense_macs = count_macs_params(dense, x1)[0]
    xb = torch.randn(batch, *x1.shape[1:])
    models: dict[str, nn.Module] = {"dense": dense}
    info: dict[str, tuple[float, str]] = {}
    table = None
    start = time.perf_counter()
    for target in (0.3, 0.5, 0.7):
        small, kept, table = _pruned(
            dense, x1, table, pruning_latency_target=target, latency_batch_size=batch
        )
        if target == 0.3:
            print(f"latency table measured in {time.perf_counter() - start:.0f} s")
        macs = count_macs_params(small, x1)[0]
        models[f"ours latency {target:.0%}"] = small
        info[f"ours latency {target:.0%}"] = (target, f"{kept:.3f}")
        flops = 1 - macs / dense_macs
        small, kept, _ = _pruned(dense, x1, None, pruning_flops_target=round(flops, 4))
        models[f"ours FLOPs {flops:.1%}"] = small
        info[f"ours FLOPs {flops:.1%}"] = (target, f"{kept:.3f}")
        models[f"torch-pruning at {flops:.1%} MACs"] = _tp_at_macs(dense, x1, macs)
        info[f"torch-pruning at {flops:.1%} MACs"] = (target, "-")
    times = timings(models, xb, rounds)
    print(
        f"\nResNet-18 width {dense.stem.out_channels}, eager, batch {batch}, "
        f"{torch.get_num_threads()} threads, {rounds} rounds taking turns\n"
    )
    print(
        "| model | latency target | speed-up: median (range) | latency removed | "
        "speed-up / target's | importance kept | MACs (M) | MAC reduction |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, model in models.items():
        if name == "dense":
            continue
        target, kept = info[name]
        per = [d / p for d, p in zip(times["dense"], times[name], strict=True)]
        mid = statistics.median(per)
        macs = count_macs_params(model, x1)[0]
        print(
            f"| {name} | {target:.0%} | {mid:.2f}x ({min(per):.2f}-{max(per):.2f}) | "
            f"{1 - 1 / mid:.1%} | {mid * (1 - target):.2f} | {kept} | {macs / 1e6:.1f} | "
            f"{dense_macs / macs:.2f}x |"
        )
    print(f"\ndense: median {statistics.median(times['dense']) * 1e3:.1f} ms")
    assert table is not None
    widths = {
        n: w
        for n, w in (getattr(models["ours latency 70%"], "compress_latency_table", {}) or {})
        .get("chosen", {})
        .items()
    }
    print("\n" + latency_widths.text(table, widths))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="narrow model, few repetitions")
    parser.add_argument("--width", type=int, default=32, help="stem width (64: ResNet-18)")
    parser.add_argument(
        "--round-to", type=int, nargs="+", default=[8, 16], help="kept widths are multiples of it"
    )
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads"
    )
    parser.add_argument(
        "--focus",
        type=int,
        metavar="ROUNDS",
        help="only dense and ours (first --round-to) in the deploy setting at batch 64, for "
        "ROUNDS rounds: the per-round speed-up / MAC reduction, median and quartiles",
    )
    parser.add_argument(
        "--latency",
        type=int,
        metavar="ROUNDS",
        help="pruning_latency_target at 30/50/70%% beside the FLOPs target and Torch-Pruning at "
        "the same MACs, eager at --batch, ROUNDS rounds",
    )
    parser.add_argument("--batch", type=int, default=64, help="batch of --latency")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    width, reps1, reps64 = (16, 10, 3) if args.quick else (args.width, 30, 15)
    ratios = (0.3, 0.5, 0.7)

    torch.manual_seed(0)
    dense = ResNet18(width).eval()
    for m in dense.modules():  # trained-looking statistics, so L1 ranks are not all ties
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
    x1 = torch.randn(1, 3, 32, 32)
    x64 = torch.randn(64, 3, 32, 32)
    if args.latency:
        latency_target(dense, x1, args.batch, args.latency)
        return
    if args.focus:
        focus(dense, x1, x64, ratios, args.round_to[0], args.focus)
        return

    models: dict[str, nn.Module] = {"dense": dense}
    errors: dict[str, float] = {}
    for ratio in ratios:
        for round_to in args.round_to:
            name = f"{ratio:.0%}, round_to {round_to}"
            small, errors[f"ours {name}"] = ours(dense, x1, ratio, round_to)
            models[f"ours {name}"] = small
            models[f"torch-pruning {name}"] = torch_pruning(dense, x1, ratio, round_to)
    deployed = {name: deploy(model) for name, model in models.items()}
    with torch.inference_mode():
        worst = max(
            float((deployed[n](x1) - m(x1)).abs().max() / m(x1).abs().max())
            for n, m in models.items()
        )

    speedups = {}
    for setting, variants, cl in (("eager", models, False), ("deploy", deployed, True)):
        t1 = latencies(variants, x1, reps1, cl)
        t64 = latencies(variants, x64, reps64, cl)
        speedups[setting] = {
            name: (t1["dense"] / t1[name], t64["dense"] / t64[name]) for name in models
        }
        speedups[setting]["dense ms"] = (t1["dense"] * 1e3, t64["dense"] * 1e3)

    dense_macs, dense_params = count_macs_params(dense, x1)
    print(f"ResNet-18 (width {width}), 32x32 input, {torch.get_num_threads()} CPU threads\n")
    print(
        "| model | MACs (M) | MAC reduction | params (M) | eager b1 | eager b64 "
        "| eager b64 / MAC red. | deploy b1 | deploy b64 | deploy b64 / MAC red. |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, model in models.items():
        macs, params = count_macs_params(model, x1)
        reduction = dense_macs / macs
        cells = [name, f"{macs / 1e6:.1f}", f"{reduction:.2f}x", f"{params / 1e6:.2f}"]
        for setting in ("eager", "deploy"):
            s1, s64 = speedups[setting][name]
            cells += [f"{s1:.2f}x", f"{s64:.2f}x", f"{s64 / reduction:.2f}"]
        print("| " + " | ".join(cells) + " |")
    e1, e64 = speedups["eager"]["dense ms"]
    d1, d64 = speedups["deploy"]["dense ms"]
    print(
        f"\ndense: {dense_params / 1e6:.2f}M params; eager b1 {e1:.1f} ms, b64 {e64:.0f} ms; "
        f"deploy b1 {d1:.1f} ms, b64 {d64:.0f} ms"
    )
    print(f"masked vs shrunk, max relative difference: {max(errors.values()):.1e}")
    print(f"deploy vs eager, max relative difference: {worst:.1e}")


if __name__ == "__main__":
    main()
