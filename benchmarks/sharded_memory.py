"""Peak memory per rank of a Llama trained dense or masked, under DDP or FSDP2 (2 CPU ranks, gloo).

The model is ``LlamaForCausalLM`` built from a ``LlamaConfig`` with random weights (about 58M
parameters by default: hidden 512, 8 layers, MLP 1408, vocabulary 32000, untied head). Each of
the four runs (dense / masked x DDP / FSDP2) starts two fresh processes; each rank:

1. reads its resident set (``VmRSS``) after imports and ``init_process_group``: the baseline;
2. builds the model (same seed on every rank) and wraps it: ``DistributedDataParallel``, or
   ``fully_shard`` on every decoder layer and then on the whole model (FSDP2, ``Shard(0)``);
   masked runs then call ``create_compressed_model`` with global magnitude sparsity (level 0.5
   at the first step, 0.7 at the last, a mask update after every optimizer step, so the
   distributed k-th value runs every step); then makes ``torch.optim.Adam``;
3. resets the kernel's peak counter (``echo 5 > /proc/self/clear_refs`` resets ``VmHWM``), so
   that building the whole model before sharding it (a user would build it on the meta device)
   is not counted, and reads ``VmRSS`` again: what the rank holds before training;
4. runs ``--steps`` optimizer steps (random tokens, batch 2 x 64, next-token loss), reads
   ``VmHWM``: the peak.

Figures are per rank, minus the baseline, in MiB, the larger of the two ranks: ``held`` after
step 3 (weights, masks; Adam's state is made at the first step), ``peak`` during the steps
(weights, gradients, Adam's two moments, masks, activations, FSDP2's gathered layers).
``tracemalloc`` does not see torch's allocations and torch keeps no allocator statistics on CPU;
the kernel's counters see every page. glibc's allocator is told to map every block of 64 kB
or more on its own (``MALLOC_MMAP_THRESHOLD_``), so that a freed tensor leaves the resident set
(by default the threshold grows with the blocks freed, and freed weights stay in the heap).

    python benchmarks/sharded_memory.py                 # 58M parameters, 4 steps
    python benchmarks/sharded_memory.py --layers 4      # smaller
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
RUNS = (("dense", "ddp"), ("masked", "ddp"), ("dense", "fsdp2"), ("masked", "fsdp2"))


def _status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes (``VmRSS``, ``VmHWM``)."""
    text = Path("/proc/self/status").read_text()
    found = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    assert found is not None
    return int(found.group(1)) * 1024


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _llama(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.mlp,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        max_position_embeddings=args.seq,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def _recipe(steps: int) -> dict[str, Any]:
    return {
        "compression": {
            "algorithm": "magnitude_sparsity",
            "sparsity_init": 0.5,
            "params": {
                "schedule": "polynomial",
                "power": 1,
                "sparsity_target": 0.7,
                "sparsity_target_epoch": 1,
                "update_per_optimizer_step": True,
                "steps_per_epoch": steps,
            },
        }
    }


def _rank(rank: int, port: int, kind: str, wrap: str, args: argparse.Namespace, out: str) -> None:
    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaForCausalLM  # noqa: F401  (imported before the baseline)

    import compress

    base = _status("VmRSS")
    model = _llama(args)
    params = sum(p.numel() for p in model.parameters())
    if wrap == "fsdp2":
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    ctrl = None
    if kind == "masked":
        ctrl, model = compress.create_compressed_model(model, _recipe(args.steps))
    if wrap == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    if ctrl is not None:
        ctrl.scheduler.epoch_step()
    _reset_peak()
    held = _status("VmRSS") - base
    gen = torch.Generator().manual_seed(rank)
    start = time.perf_counter()
    for _ in range(args.steps):
        tokens = torch.randint(0, args.vocab, (2, args.seq), generator=gen)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ctrl is not None:
            ctrl.scheduler.step()
    seconds = (time.perf_counter() - start) / args.steps
    peak = _status("VmHWM") - base
    level = ctrl.compression_level if ctrl is not None else 0.0
    found = torch.tensor([held, peak], dtype=torch.float64)
    every = [torch.empty_like(found) for _ in range(2)]
    dist.all_gather(every, found)
    if rank == 0:
        top = torch.stack(every).max(0).values
        row = {
            "run": f"{kind} {wrap}",
            "params": params,
            "held MiB": round(float(top[0]) / 2**20),
            "peak MiB": round(float(top[1]) / 2**20),
            "s/step": round(seconds, 2),
            "sparsity": round(level, 3),
        }
        Path(out).write_text(json.dumps(row))
    dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--mlp", type=int, default=1408)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    # read by glibc when a process starts: the ranks are new processes
    os.environ.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    out = Path(f"/tmp/sharded_memory_{os.getpid()}.json")
    rows = []
    for kind, wrap in RUNS:
        mp.spawn(_rank, args=(_port(), kind, wrap, args, str(out)), nprocs=2)
        rows.append(json.loads(out.read_text()))
        print(json.dumps(rows[-1]), flush=True)
    out.unlink()
    peak = {r["run"]: r["peak MiB"] for r in rows}
    print(f"\n{rows[0]['params'] / 1e6:.1f}M parameters, 2 ranks (gloo), Adam, {args.steps} steps")
    print("| run | held per rank (MiB) | peak per rank (MiB) | s/step | sparsity |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        cells = (r["held MiB"], r["peak MiB"], r["s/step"], r["sparsity"])
        print(f"| {r['run']} | " + " | ".join(str(c) for c in cells) + " |")
    print(
        f"\nmasked FSDP2 / dense FSDP2: {peak['masked fsdp2'] / peak['dense fsdp2']:.2f}x; "
        f"masked FSDP2 / masked DDP: {peak['masked fsdp2'] / peak['masked ddp']:.2f}x (peak)"
    )


if __name__ == "__main__":
    main()
