"""How long filter pruning takes to find and check the channel groups of real architectures,
beside Torch-Pruning's own ``DependencyGraph().build_dependency`` on the same model and input,
and beside that build followed by ``get_all_groups()`` (what Torch-Pruning takes to list the
groups, as its pruners do; cut at ``--cap`` seconds, as on swin_t it never ends).

Ours is ``build_groups`` as ``filter_pruning`` calls it (its default options: trace, group
search, numerical check of the groups, within ``trace_time_budget``), and the whole
``create_compressed_model`` with 50% filter pruning (:data:`RECIPE`). All run in one process,
interleaved (Torch-Pruning, then ours, for every model in each round), on copies of one model
with random weights, one intra-op thread (on a shared machine, two threads made a forward pass
100x slower under load), and the table gives medians over the rounds. Needs torchvision and
timm beside torch (a side venv):

    python benchmarks/zoo_build_time.py                      # the zoo, 3 rounds
    python benchmarks/zoo_build_time.py densenet121,timm:levit_128s --rounds 5
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import compress  # noqa: E402
from compress.errors import CompressError  # noqa: E402
from compress.pruning import exactness  # noqa: E402
from compress.pruning.channel_groups import Excluded, build_groups  # noqa: E402
from compress.pruning.deadline import TimeBudgetExceeded, deadline  # noqa: E402

ZOO = (
    "densenet121,resnet18,mobilenet_v2,googlenet,inception_v3,vit_b_16,swin_t,"
    "shufflenet_v2_x0_5,efficientnet_b0,timm:vit_tiny_patch16_224,timm:levit_128s,"
    "timm:efficientformer_l1,timm:convnext_atto,timm:mobilevitv2_050"
)
RECIPE = {"algorithm": "filter_pruning", "pruning_init": 0.5}
"""What the ``create_compressed_model`` column builds: 50% filter pruning, default options."""


def build(name: str) -> nn.Module:
    """The architecture at its own input size (224, Inception v3 299), random weights."""
    if name.startswith("timm:"):
        import timm

        return timm.create_model(name.removeprefix("timm:"), pretrained=False)
    import torchvision

    kwargs: dict[str, Any] = {}
    if name in ("inception_v3", "googlenet"):
        kwargs = {"aux_logits": False, "init_weights": True}
    return getattr(torchvision.models, name)(weights=None, **kwargs)


def torch_pruning(model: nn.Module, x: torch.Tensor) -> tuple[float, str]:
    """Seconds, and how it failed ("" if it did not: ShuffleNet's channel shuffle fails)."""
    start = time.perf_counter()
    try:
        tp.DependencyGraph().build_dependency(model, x)
    except Exception as err:  # noqa: BLE001 - reported in the table
        return time.perf_counter() - start, type(err).__name__
    return time.perf_counter() - start, ""


def torch_pruning_groups(model: nn.Module, x: torch.Tensor, cap: float) -> float | str:
    """Seconds Torch-Pruning's build and ``get_all_groups()`` take, or why there are none: past
    ``cap``, or how the build failed."""
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(), deadline(cap):
            warnings.simplefilter("ignore")
            dg = tp.DependencyGraph().build_dependency(model, x)
            list(dg.get_all_groups())
    except TimeBudgetExceeded:
        return f"over {cap:g}"
    except Exception as err:  # noqa: BLE001 - a failed build (ShuffleNet), reported
        return f"fails: {type(err).__name__}"
    return time.perf_counter() - start


def ours(model: nn.Module, x: torch.Tensor, budget: float) -> tuple[float, str]:
    """Seconds, and what came of it: groups found, left out as not exact, checks run."""
    calls = [0]
    real = exactness._matches

    def counted(*args: Any) -> str | None:
        calls[0] += 1
        return real(*args)

    exactness._matches = counted  # type: ignore[assignment]
    excluded: list[Excluded] = []
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            groups = build_groups(model, x, time_budget=budget, excluded=excluded)
        bad = sum(e.kind == "not exact" for e in excluded)
        note = f"{len(groups)} groups, {bad} not exact, {calls[0]} checks"
    except CompressError as err:
        note = str(err).split(":")[0]
    finally:
        exactness._matches = real  # type: ignore[assignment]
    return time.perf_counter() - start, note


def api(model: nn.Module, x: torch.Tensor, budget: float) -> float:
    """Seconds ``create_compressed_model`` takes with :data:`RECIPE` (what a user waits for:
    the build above plus importance, masks, MACs and statistics)."""
    recipe = {"compression": {**RECIPE, "params": {"trace_time_budget": budget}}}
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compress.create_compressed_model(model, recipe, x)
    except CompressError:
        pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="?", default=ZOO)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--budget", type=float, default=180.0, help="trace_time_budget, s")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cap", type=float, default=60.0, help="get_all_groups cut, s")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.models.split(",")
    models, inputs = {}, {}
    for name in names:
        torch.manual_seed(0)
        models[name] = build(name).eval()
        size = 299 if name == "inception_v3" else 224  # timm's zoo models here all take 224
        inputs[name] = torch.randn(args.batch, 3, size, size)
    times: dict[str, dict[str, list[float]]] = {
        n: {"tp": [], "tp groups": [], "ours": [], "api": []} for n in names
    }
    listing: dict[str, str] = {}  # why Torch-Pruning gave no groups
    notes: dict[str, str] = {}
    failed: dict[str, str] = {}
    for r in range(args.rounds):
        for name in names:
            x = inputs[name]
            theirs, failed[name] = torch_pruning(copy.deepcopy(models[name]), x)
            times[name]["tp"].append(theirs)
            listed = torch_pruning_groups(copy.deepcopy(models[name]), x, args.cap)
            if isinstance(listed, str):
                listing[name], listed = listed, math.inf
            times[name]["tp groups"].append(listed)
            seconds, notes[name] = ours(copy.deepcopy(models[name]), x, args.budget)
            times[name]["ours"].append(seconds)
            times[name]["api"].append(api(copy.deepcopy(models[name]), x, args.budget))
            print(
                f"round {r + 1} {name}: tp {theirs:.2f} s {failed[name]}, "
                f"tp + groups {times[name]['tp groups'][-1]:.2f} s, ours {seconds:.2f} s,"
                f" create_compressed_model {times[name]['api'][-1]:.2f} s, {notes[name]}",
                file=sys.stderr,
                flush=True,
            )
    print(
        "| model | build_groups s | Torch-Pruning build s | ratio | Torch-Pruning build + "
        "get_all_groups s | ratio | create_compressed_model s | ours: result |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        mine, theirs, listed, full = (
            statistics.median(times[name][k]) for k in ("ours", "tp", "tp groups", "api")
        )
        spread = f"{min(times[name]['ours']):.2f}-{max(times[name]['ours']):.2f}"
        note = (
            f"{notes[name]}; Torch-Pruning fails: {failed[name]}" if failed[name] else notes[name]
        )
        both = (
            f"{listed:.2f} | {mine / listed:.2f}"
            if math.isfinite(listed)
            else f"{listing[name]} | -"
        )
        print(
            f"| {name} | {mine:.2f} ({spread}) | {theirs:.2f} | {mine / theirs:.1f} | {both} "
            f"| {full:.2f} | {note} |"
        )


if __name__ == "__main__":
    main()
