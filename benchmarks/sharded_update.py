"""Time and collectives of one magnitude mask update, FSDP2 vs DDP (2 CPU ranks, gloo).

The model is ``LlamaForCausalLM`` from a ``LlamaConfig`` with random weights (hidden 256, 4
layers, MLP 688, vocabulary 8000 by default: 28 masked Linear layers and the head). Each rank
builds it twice with the same seed: one copy wrapped in ``DistributedDataParallel``, one
sharded by ``fully_shard`` (every decoder layer, then the whole model), and gives each a
``magnitude_sparsity`` controller (``global`` or ``local`` mode, ``normed_abs`` importance,
the recipe defaults otherwise). One update is what the controller runs at a schedule event:
``set_level(level)`` then ``warn_collapse()``, at levels alternating 0.5 and 0.6 so that the
masks move.

Timing: the variants are interleaved (DDP, FSDP2, DDP, ...) in the same two processes, each
update between two barriers; a figure is rank 0's wall time, medians and ranges over
``--repeats`` updates. Collectives are counted over one more update per variant with
``torch.profiler``: every c10d collective (``dist.all_reduce`` and the functional collectives
DTensor calls, e.g. for ``w.norm()`` of a sharded weight) is one ``c10d::`` event.

    OMP_NUM_THREADS=1 python benchmarks/sharded_update.py
    python benchmarks/sharded_update.py --mode local --layers 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sharded_memory import _llama, _port  # the same Llama config, one free port

ROOT = Path(__file__).resolve().parent.parent


def _recipe(mode: str) -> dict[str, Any]:
    return {
        "compression": {
            "algorithm": "magnitude_sparsity",
            "sparsity_init": 0.5,
            "params": {"sparsity_target": 0.7, "sparsity_level_setting_mode": mode},
        }
    }


def collectives(fn: Any) -> int:
    """How many c10d collectives ``fn()`` runs: ``torch.profiler`` events of the process
    group's ops (``c10d::allreduce_``, ``c10d::allgather_``, ...), which ``dist.all_reduce``
    and DTensor's functional collectives (``_c10d_functional::all_reduce``) both end in."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("c10d::"))


def _rank(rank: int, port: int, args: argparse.Namespace, out: str) -> None:
    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from torch.distributed.fsdp import fully_shard

    import compress

    algos = {}
    for wrap in ("ddp", "fsdp2"):
        model = _llama(args)
        if wrap == "fsdp2":
            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
        ctrl, model = compress.create_compressed_model(model, _recipe(args.mode))
        if wrap == "ddp":
            model = torch.nn.parallel.DistributedDataParallel(model)
        algos[wrap] = ctrl.algorithms[0]
    masked = len(algos["ddp"].entries)

    def update(wrap: str, level: float) -> None:
        algos[wrap].set_level(level)
        algos[wrap].warn_collapse()

    times: dict[str, list[float]] = {w: [] for w in algos}
    for i in range(args.repeats + 1):  # the first round warms up
        for wrap in algos:
            dist.barrier()
            start = time.perf_counter()
            update(wrap, 0.5 + 0.1 * (i % 2))
            dist.barrier()
            if i:
                times[wrap].append(time.perf_counter() - start)
    counts = {w: collectives(lambda w=w: update(w, 0.55)) for w in algos}  # type: ignore[misc]
    same = all(
        torch.equal(compress.distributed.full(a[2]), b[2])
        for a, b in zip(algos["fsdp2"].entries, algos["ddp"].entries)
    )
    if rank == 0:
        row = {
            "masked tensors": masked,
            "masks equal": same,
            **{
                w: {
                    "median s": round(statistics.median(t), 4),
                    "min s": round(min(t), 4),
                    "max s": round(max(t), 4),
                    "collectives": counts[w],
                }
                for w, t in times.items()
            },
        }
        Path(out).write_text(json.dumps(row))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--mlp", type=int, default=688)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--seq", type=int, default=64, help="the model's max positions")
    parser.add_argument("--mode", choices=("global", "local"), default="global")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    out = Path(f"/tmp/sharded_update_{os.getpid()}.json")
    mp.spawn(_rank, args=(_port(), args, str(out)), nprocs=2)
    row = json.loads(out.read_text())
    out.unlink()
    print(json.dumps(row))
    print(f"\n{args.mode} mode, {row['masked tensors']} masked tensors, 2 ranks (gloo)")
    print("| wrap | update s, median (range) | collectives per update |")
    print("|---|---:|---:|")
    for w in ("ddp", "fsdp2"):
        r = row[w]
        print(f"| {w} | {r['median s']} ({r['min s']}-{r['max s']}) | {r['collectives']} |")
    print(f"masks equal under FSDP2 and DDP: {row['masks equal']}")


if __name__ == "__main__":
    main()
