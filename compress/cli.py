"""The ``compress`` command: validate a recipe, print its schedule, inspect an exported file.

    compress validate configs/magnitude_sparsity.json
    compress schedule configs/magnitude_sparsity.json --epochs 40 --steps-per-epoch 20
    compress inspect exports/digits/model.sparse.pt

Errors print one line and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from compress.config import Config, load_config
from compress.errors import CompressError
from compress.schedules import SCHEDULES
from compress.stats import table


def _summary(cfg: Config) -> str:
    parts = []
    for a in cfg.algorithms:
        p = a.params
        if a.name in ("magnitude_sparsity", "rb_sparsity") and p["schedule"] == "multistep":
            parts.append(
                f"{a.name} (multistep: levels {p['multistep_sparsity_levels']} "
                f"from epochs {[0, *p['multistep_steps']]})"
            )
        elif a.name in ("magnitude_sparsity", "rb_sparsity"):
            parts.append(
                f"{a.name} ({p['schedule']}: {a.options['sparsity_init']} -> "
                f"{p['sparsity_target']} by epoch {p['sparsity_target_epoch']})"
            )
        elif a.name == "filter_pruning":
            target = p.get("pruning_target", p.get("pruning_flops_target"))
            kind = "FLOPs" if "pruning_flops_target" in p else "filters"
            parts.append(
                f"{a.name} ({p['schedule']}: {target} of {kind} after {p['pruning_steps']} epochs)"
            )
        else:
            parts.append(a.name)
    return f"{cfg.source}: valid: " + " + ".join(parts)


def schedule_rows(cfg: Config, epochs: int, steps_per_epoch: int | None) -> list[dict[str, Any]]:
    """The level of each scheduled algorithm at the start of every epoch (and, with per-step
    updates and steps_per_epoch, at the end of it)."""
    rows = []
    for epoch in range(epochs):
        row: dict[str, Any] = {"epoch": epoch}
        for a in cfg.algorithms:
            fn = SCHEDULES.get(a.name)
            if fn is None:
                continue
            init = a.options.get("sparsity_init", a.options.get("pruning_init", 0.0))
            params = dict(a.params)
            if a.name == "filter_pruning" and "pruning_target" not in params:
                params["pruning_target"] = params["pruning_flops_target"]
            if a.name != "filter_pruning" and params["schedule"] == "adaptive":
                row[a.name] = "adaptive"
                continue
            freeze = params.get("sparsity_freeze_epoch")
            row[a.name] = round(fn(params, init, epoch), 6)
            if params.get("update_per_optimizer_step") and (
                steps_per_epoch or params["steps_per_epoch"]
            ):
                row[f"{a.name} (epoch end)"] = round(fn(params, init, epoch + 1), 6)
            if freeze is not None and epoch >= freeze:
                row["frozen"] = "yes"
        rows.append(row)
    return rows


def _inspect(path: Path) -> str:
    from compress.export import SPARSE_FORMAT, read_sparse, safe_load

    if path.suffix == ".pt2":
        try:
            program = torch.export.load(str(path))
        except Exception as e:
            raise CompressError(
                f"{path}: not a torch.export program ({str(e).splitlines()[0]})"
            ) from None
        state = dict(program.state_dict)
    else:
        payload = safe_load(path)
        if isinstance(payload, dict) and payload.get("format") == SPARSE_FORMAT:
            state, _ = read_sparse(path)
        elif isinstance(payload, dict) and payload.get("format") == "compress.pruned":
            state = payload["state_dict"]
        elif isinstance(payload, dict) and "state_dict" in payload:  # a Lightning checkpoint
            state = payload["state_dict"]
        elif isinstance(payload, dict) and all(
            isinstance(v, torch.Tensor) for v in payload.values()
        ):
            state = payload
        else:
            raise CompressError(
                f"{path}: no weights found (not an export or checkpoint of this library)"
            )
    return inspect_state(state, str(path))


def inspect_state(state: dict[str, torch.Tensor], name: str) -> str:
    """Per-tensor sparsity and totals of a state_dict (weights of 2 or more dimensions)."""
    rows = []
    total = zeros = 0
    for key, t in state.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() < 2:
            continue
        z = int((t == 0).sum())
        rows.append(
            {"weight": key, "shape": list(t.shape), "params": t.numel(), "sparsity": z / t.numel()}
        )
        total += t.numel()
        zeros += z
    params = sum(
        t.numel() for t in state.values() if isinstance(t, torch.Tensor) and t.is_floating_point()
    )
    summary = {
        "file": name,
        "params": params,
        "weights": total,
        "sparsity": zeros / total if total else 0.0,
    }
    return table(rows) + "\n" + table([summary])


def _keys(readme: str | None) -> None:
    from compress.config import keys_markdown

    text = keys_markdown()
    if readme is None:
        print(text)
        return
    path = Path(readme)
    old = path.read_text()
    begin, end = "<!-- keys:begin -->", "<!-- keys:end -->"
    if begin not in old or end not in old:
        raise CompressError(f"{path}: no '{begin}' ... '{end}' section")
    head, rest = old.split(begin, 1)
    path.write_text(f"{head}{begin}\n{text}\n{end}{rest.split(end, 1)[1]}")
    print(f"{path}: key table updated")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="compress", description="Compression recipes and exports."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="check a recipe against the schema")
    v.add_argument("recipe")
    s = sub.add_parser("schedule", help="print the level per epoch of a recipe")
    s.add_argument("recipe")
    s.add_argument("--epochs", type=int, default=None)
    s.add_argument("--steps-per-epoch", type=int, default=None)
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i = sub.add_parser("inspect", help="sparsity and params of an export or checkpoint")
    i.add_argument("file")
    k = sub.add_parser("keys", help="print the recipe keys as a Markdown table (from the schema)")
    k.add_argument("--write-readme", metavar="README", nargs="?", const="README.md")
    args = parser.parse_args(argv)
    try:
        if args.command == "validate":
            print(_summary(load_config(args.recipe)))
        elif args.command == "schedule":
            cfg = load_config(args.recipe)
            epochs = args.epochs or cfg.data.get("epochs")
            if not epochs:
                raise CompressError("schedule: give --epochs (the recipe has no 'epochs')")
            rows = schedule_rows(cfg, int(epochs), args.steps_per_epoch)
            print(json.dumps(rows) if args.json else table(rows))
        elif args.command == "inspect":
            print(_inspect(Path(args.file)))
        elif args.command == "keys":
            _keys(args.write_readme)
    except CompressError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
