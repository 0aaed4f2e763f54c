"""NNCF 2.17's global magnitude mask (level 0.9) on the model of ``mask_update.py``.

Runs in its own virtual environment, since NNCF pins its own dependencies:

    python3 -m venv /tmp/nncf217
    /tmp/nncf217/bin/pip install torch==2.13.0 nncf==2.17.0
    NNCF_TORCH_LEGACY_TRACING=1 /tmp/nncf217/bin/python benchmarks/nncf_mask_update.py

Each measurement is a fresh subprocess that builds the same Linear chain, wraps it with
``nncf.torch.create_compressed_model`` (``magnitude_sparsity``, ``sparsity_init`` 0, NNCF's
defaults otherwise: ``normed_abs`` importance, global mode) and times one
``ctrl.set_sparsity_level(0.9)``, with peak extra memory measured as in ``mask_update.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mask_update import LEVEL, SIZES, linear_chain, measure, n_weights  # noqa: E402


def setup(size: int) -> tuple[int, Callable[[], object]]:
    os.environ.setdefault("NNCF_TORCH_LEGACY_TRACING", "1")
    from nncf import NNCFConfig
    from nncf.torch import create_compressed_model

    model = linear_chain(size)
    total = n_weights(model)
    config = NNCFConfig.from_dict(
        {
            "input_info": {"sample_size": [1, model[0].in_features]},
            "compression": {"algorithm": "magnitude_sparsity", "sparsity_init": 0.0},
        }
    )
    ctrl, _ = create_compressed_model(model, config)
    return total, lambda: ctrl.set_sparsity_level(LEVEL)


def worker(size: int) -> None:
    total, call = setup(size)
    out = measure(call)
    print(json.dumps({"method": "NNCF 2.17", "size": size, "weights": total, **out}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="only up to 25M weights")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--worker", type=int, metavar="SIZE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        worker(args.worker)
        return
    sizes = [s for s in SIZES if not args.quick or s <= 25_000_000]
    print("| weights | method | median time (s) | median peak extra memory (MB) | repeats |")
    print("|---:|---|---:|---:|---:|")
    for size in sizes:
        runs = []
        for _ in range(args.repeats):
            cmd = [sys.executable, __file__, "--worker", str(size), "--threads", str(args.threads)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode:
                sys.exit(f"NNCF at {size}: {res.stderr.strip()[-2000:]}")
            runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
        t = statistics.median(r["seconds"] for r in runs)
        mem = statistics.median(r["peak_extra_mb"] for r in runs)
        print(
            f"| {runs[0]['weights'] / 1e6:.1f}M | NNCF 2.17 | {t:.3f} | {mem:.0f} | {len(runs)} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
