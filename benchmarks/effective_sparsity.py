"""Direct vs effective sparsity of LeNet-300-100 on digits, and the recipes for the accuracy goals.

Reproduces the finding of Vysogorets & Kempe, "Connectivity Matters" (arXiv 2107.02306), on our
own small setup: LeNet-300-100 (64-300-100-10) on scikit-learn's digits (70/30 stratified split,
pixels in [0, 1], Adam 1e-3, 40 epochs, batch 64), pruned at direct compression 10x, 100x and
1000x (compression = 1 / (1 - sparsity)) with every layerwise allocation. Plain PyTorch loops,
no Lightning, one thread per process.

    python benchmarks/effective_sparsity.py paper            # random and magnitude pruning
    python benchmarks/effective_sparsity.py paper --seeds 0 1 2 --out rows.jsonl \
        --plot docs/effective_sparsity.png                   # and the figure (extra "plot")
    python benchmarks/effective_sparsity.py plot --rows rows.jsonl --plot out.png  # redraw
    python benchmarks/effective_sparsity.py goals            # the shipped configs/lenet_*.json
    python benchmarks/effective_sparsity.py goals --recipe configs/lenet_sparsity_98.json

Settings (``--setting``):

- ``init``: the paper's pruning at initialization. The mask is drawn once, before training
  (``sparsity_init`` = level, frozen at epoch 0), and the sparse network is trained with it fixed.
- ``gradual``: magnitude pruning during training, polynomial schedule updated every optimizer
  step, from 0 to the level by epoch 30, masks frozen from epoch 30.

Each run prints one JSON line; the tables (mean over seeds) are printed at the end.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import compress  # noqa: E402
from compress.analysis.effective_report import sparsity_report  # noqa: E402
from examples.digits import accuracy, digits_loaders, lenet_300_100  # noqa: E402

EPOCHS = 40
EXAMPLE = torch.zeros(1, 64)
LEVELS = (0.9, 0.99, 0.999)  # direct compression 10x, 100x, 1000x
ALLOCATIONS = ("uniform", "erk", "igq", "global")
GOAL_RECIPES = ("configs/lenet_sparsity_98.json", "configs/lenet_sparsity_995.json")


def compression(sparsity: float) -> float:
    """1 / (1 - sparsity); infinite when nothing is left."""
    return float("inf") if sparsity >= 1.0 else 1.0 / (1.0 - sparsity)


def recipe(
    *, importance: str, allocation: str, level: float, setting: str, target_type: str = "direct"
) -> dict[str, Any]:
    """A magnitude_sparsity recipe for one cell of the paper grid."""
    params: dict[str, Any] = {
        "weight_importance": importance,
        "layerwise_allocation": allocation,
        "sparsity_target": level,
        "sparsity_target_type": target_type,
    }
    if setting == "init":
        init = level
        params |= {"sparsity_target_epoch": 1, "sparsity_freeze_epoch": 0}
    elif setting == "gradual":
        init = 0.0
        params |= {
            "schedule": "polynomial",
            "power": 3,
            "concave": True,
            "sparsity_target_epoch": 30,
            "sparsity_freeze_epoch": 30,
            "update_per_optimizer_step": True,
        }
    else:
        raise ValueError(f"setting {setting!r} is not 'init' or 'gradual'")
    return {
        "epochs": EPOCHS,
        "compression": {"algorithm": "magnitude_sparsity", "sparsity_init": init, "params": params},
    }


def train(
    config: Mapping[str, Any] | None, seed: int, epochs: int = EPOCHS
) -> tuple[nn.Module, float]:
    """Trains LeNet-300-100 on digits under ``config`` (None: dense); returns the plain model
    (masks folded in) and its test accuracy. ``seed`` sets the split, the init and the order."""
    torch.manual_seed(seed)
    train_loader, test_loader = digits_loaders(batch_size=64, seed=seed)
    model = lenet_300_100()
    ctrl = None
    if config is not None:
        ctrl, model = compress.create_compressed_model(model, config, example_inputs=EXAMPLE)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        if ctrl is not None:
            ctrl.scheduler.epoch_step()
        model.train()
        for x, y in train_loader:
            loss = nn.functional.cross_entropy(model(x), y)
            if ctrl is not None:
                loss = loss + ctrl.loss()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if ctrl is not None:
                ctrl.scheduler.step()
    plain = ctrl.strip() if ctrl is not None else model
    return plain, accuracy(plain, test_loader)


def run(job: Mapping[str, Any]) -> dict[str, Any]:
    """One training run; ``job`` holds ``seed``, ``config`` (or None) and labels to report."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    model, acc = train(job["config"], job["seed"])
    report = sparsity_report(model, EXAMPLE)
    labels = {k: v for k, v in job.items() if k != "config"}
    return labels | {
        "accuracy": acc,
        "direct_sparsity": report.direct_sparsity,
        "effective_sparsity": report.effective_sparsity,
        "layers_direct": [round(layer.direct_sparsity, 5) for layer in report.layers],
        "layers_effective": [round(layer.effective_sparsity, 5) for layer in report.layers],
        "seconds": round(time.perf_counter() - start, 1),
    }


def paper_jobs(
    seeds: Iterable[int], settings: Iterable[str], target_type: str = "direct"
) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = [
        {"seed": s, "setting": "dense", "importance": "-", "allocation": "-", "level": 0.0}
        for s in seeds
    ]
    for setting, importance, level, allocation, seed in itertools.product(
        settings, ("random", "abs"), LEVELS, ALLOCATIONS, seeds
    ):
        if setting == "gradual" and importance == "random":
            continue  # random pruning is the paper's pruning-at-initialization baseline
        config = recipe(
            importance=importance,
            allocation=allocation,
            level=level,
            setting=setting,
            target_type=target_type,
        )
        jobs.append(
            {
                "seed": seed,
                "setting": setting if target_type == "direct" else f"{setting}, {target_type}",
                "importance": importance,
                "allocation": allocation,
                "level": level,
                "config": config,
            }
        )
    for job in jobs:
        job.setdefault("config", None)
    return jobs


def goal_jobs(seeds: Iterable[int], recipes: Iterable[str]) -> list[dict[str, Any]]:
    return [{"seed": s, "recipe": r, "config": str(ROOT / r)} for r in recipes for s in seeds]


def table(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> str:
    """A markdown table of the mean over seeds of every group of ``keys``."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[tuple(row[k] for k in keys)].append(row)
    head = [*keys, "seeds", "direct compr.", "effective compr.", "eff. sparsity", "accuracy"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, group in groups.items():
        direct = statistics.mean(r["direct_sparsity"] for r in group)
        effective = statistics.mean(r["effective_sparsity"] for r in group)
        accs = [r["accuracy"] for r in group]
        cells = [
            *map(str, key),
            str(len(group)),
            f"{compression(direct):.1f}x",
            f"{compression(effective):.1f}x",
            f"{effective:.4f}",
            f"{100 * statistics.mean(accs):.2f}% ("
            + ", ".join(f"{100 * a:.2f}" for a in accs)
            + ")",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str) -> None:
    """Two panels over direct compression: effective compression, and test accuracy, per
    allocation, for random pruning at initialization and gradual magnitude pruning."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit('--plot needs matplotlib: pip install -e ".[plot]"')
    groups: dict[tuple[str, str, str], dict[float, list[dict[str, Any]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for row in rows:
        if row["setting"] != "dense":
            key = (row["setting"], row["importance"], row["allocation"])
            groups[key][row["level"]].append(row)
    ceiling = 1e5  # where "nothing connected" (infinite effective compression) is drawn
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    colors = dict(zip(ALLOCATIONS, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    for (setting, importance, allocation), by_level in sorted(groups.items()):
        levels = sorted(by_level)
        direct = [compression(lvl) for lvl in levels]
        effective = [
            min(
                compression(statistics.mean(r["effective_sparsity"] for r in by_level[lvl])),
                ceiling,
            )
            for lvl in levels
        ]
        accuracy = [100 * statistics.mean(r["accuracy"] for r in by_level[lvl]) for lvl in levels]
        style = {
            "color": colors.get(allocation, "black"),
            "linestyle": "--" if importance == "random" else "-",
            "marker": "o" if setting.startswith("init") else "s",
            "label": f"{allocation}, {importance}, {setting}",
        }
        left.plot(direct, effective, **style)
        right.plot(direct, accuracy, **style)
    (diagonal,) = left.plot([10, 1000], [10, 1000], color="grey", linewidth=0.8)
    left.legend([diagonal], ["effective = direct"], fontsize=8, loc="lower right")
    left.axhline(ceiling, color="grey", linestyle=":", linewidth=0.8)
    left.text(11, ceiling * 0.6, "nothing connected", fontsize=8, color="grey")
    left.set(
        xscale="log",
        yscale="log",
        xlabel="direct compression",
        ylabel="effective compression",
        title="Effective vs direct compression",
    )
    right.set(
        xscale="log",
        xlabel="direct compression",
        ylabel="test accuracy (%)",
        title="LeNet-300-100 on digits",
    )
    right.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("paper", "goals", "plot"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--setting", nargs="+", default=["init", "gradual"])
    parser.add_argument(
        "--target-type",
        choices=("direct", "effective"),
        default="direct",
        help="paper: whether the level is met in direct or in effective sparsity",
    )
    parser.add_argument("--recipe", nargs="+", default=list(GOAL_RECIPES))
    parser.add_argument("--jobs", type=int, default=2, help="parallel processes (default 2)")
    parser.add_argument("--out", help="also write the JSON lines to this file")
    parser.add_argument("--plot", help="paper, plot: draw the figure to this PNG")
    parser.add_argument("--rows", help="plot: the JSON lines written by paper --out")
    args = parser.parse_args()

    if args.part == "plot":
        if not args.rows or not args.plot:
            parser.error("plot needs --rows FILE and --plot PNG")
        with open(args.rows) as f:
            plot([json.loads(line) for line in f if line.strip()], args.plot)
        return

    if args.part == "paper":
        jobs = paper_jobs(args.seeds, args.setting, args.target_type)
        keys: tuple[str, ...] = ("setting", "importance", "level", "allocation")
    else:
        jobs = goal_jobs(args.seeds, args.recipe)
        keys = ("recipe",)
    rows = []
    out = open(args.out, "w") if args.out else None  # noqa: SIM115
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for row in pool.map(run, jobs):
            rows.append(row)
            line = json.dumps(row)
            print(line, flush=True)
            if out:
                out.write(line + "\n")
                out.flush()
    if out:
        out.close()
    print()
    print(table(rows, keys))
    if args.plot and args.part == "paper":
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
