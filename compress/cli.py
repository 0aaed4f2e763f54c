"""The ``compress`` command: validate a recipe, print its schedule, inspect an exported file.

    compress validate configs/magnitude_sparsity.json
    compress schedule configs/magnitude_sparsity.json --epochs 40 --steps-per-epoch 20
    compress inspect exports/digits/model.sparse.pt

Errors print one line and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from compress.analysis.summary import layer_macs, table
from compress.errors import CompressError
from compress.recipe.config import Config, load_config
from compress.schedules import SCHEDULES


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
            if "pruning_latency_target" in p:
                target, kind = p["pruning_latency_target"], "latency"
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
                params["pruning_target"] = params.get(
                    "pruning_flops_target", params.get("pruning_latency_target")
                )
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


def _load_model(spec: str) -> nn.Module:
    """A fresh model from ``package.module:factory`` (a class or a function without arguments)."""
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does, so local modules are found
    try:
        factory = getattr(importlib.import_module(module_name), attr)
        return factory()
    except (ImportError, AttributeError, TypeError, ValueError) as e:
        raise CompressError(
            f"--model {spec!r}: cannot build the model ({e}); give 'package.module:Factory', "
            "a class or function that takes no arguments"
        ) from None


def _inspect(path: Path, model_spec: str | None = None, prefix: str = "") -> str:
    """Sparsity (and, given a model or a pt2 program, effective sparsity and MACs) of a file."""
    from compress.deploy.export import SPARSE_FORMAT, read_sparse
    from compress.deploy.files import safe_load

    inputs: Any = None
    program = None
    if path.suffix == ".pt2":
        try:
            program = torch.export.load(str(path))
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CompressError(f"{path}: not a torch.export program ({msg})") from None
        state = dict(program.state_dict)
        inputs = program.example_inputs[0] if program.example_inputs else None
    else:
        payload = safe_load(path)
        if isinstance(payload, dict) and payload.get("format") == SPARSE_FORMAT:
            state, inputs = read_sparse(path)
        elif isinstance(payload, dict) and payload.get("format") == "compress.pruned":
            state = payload["state_dict"]
        elif isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
            # A Lightning checkpoint: its weights are the stored ones; the masks are in the
            # callback's entry, and the report should show what the model computes.
            state = _masked_checkpoint_weights(payload)
        elif isinstance(payload, dict) and all(
            isinstance(v, torch.Tensor) for v in payload.values()
        ):
            state = payload
        else:
            raise CompressError(
                f"{path}: no weights found (not an export or checkpoint of this library)"
            )
    lines = [inspect_state(state, str(path))]
    report_path = Path(str(path).removesuffix(".sparse.pt") + ".runtime.json")
    if path.name.endswith(".sparse.pt") and report_path.is_file():
        from compress.deploy.sparse_runtime import report_from_dict

        lines.append(f"sparse runtime ({report_path.name}):")
        lines.append(str(report_from_dict(json.loads(report_path.read_text()))))
    latency_path = Path(str(path).removesuffix(".pruned.pt") + ".latency.json")
    if path.name.endswith(".pruned.pt") and latency_path.is_file():
        from compress.pruning.latency import text

        lines.append(f"{latency_path.name}: " + text(json.loads(latency_path.read_text())))
    if model_spec is not None:
        model = _load_model(model_spec)
        if isinstance(payload, dict) and payload.get("format") == "compress.pruned":
            from compress.deploy.pruned_file import load_pruned

            model = load_pruned(model, path)
        else:
            own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            try:
                model.load_state_dict(own)
            except RuntimeError as e:
                first = str(e).splitlines()[0]
                raise CompressError(
                    f"{path}: the weights do not fit --model {model_spec} ({first}); "
                    "for a Lightning checkpoint pass --prefix (e.g. 'model.')"
                ) from None
        lines.append(_model_figures(model, inputs))
    elif program is not None and inputs is not None:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            program.module()(*inputs)
        lines.append(table([{"MACs": counter.get_total_flops() // 2}]))
    return "\n".join(lines)


def _masked_checkpoint_weights(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The checkpoint's weights with the masks saved by ``CompressionCallback`` applied
    (sparsity algorithms; a layer name is matched to the state_dict key ending with it)."""
    state = dict(checkpoint["state_dict"])
    entry = (checkpoint.get("callbacks") or {}).get("CompressionCallback") or {}
    controller = entry.get("controller") or {}
    for algo in (controller.get("state") or {}).values():
        for layer, mask in (algo.get("masks") or {}).items():
            keys = [k for k in state if k == f"{layer}.weight" or k.endswith(f".{layer}.weight")]
            if len(keys) == 1 and state[keys[0]].shape == mask.shape:
                state[keys[0]] = state[keys[0]] * mask.to(state[keys[0]].dtype)
    return state


def _model_figures(model: nn.Module, inputs: Any) -> str:
    from compress.analysis.effective_report import sparsity_report

    report = sparsity_report(model, tuple(inputs) if inputs is not None else None)
    row: dict[str, Any] = {
        "params": sum(p.numel() for p in model.parameters()),
        "direct sparsity": report.direct_sparsity,
        "effective sparsity": report.effective_sparsity,
    }
    if inputs is not None:
        row["MACs"] = layer_macs(model, tuple(inputs)).get("", 0)
    return str(report) + "\n" + table([row])


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
    floats = [t for t in state.values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    summary = {
        "file": name,
        "params": sum(t.numel() for t in floats),
        "weights": total,
        "sparsity": zeros / total if total else 0.0,
    }
    return table(rows) + "\n" + table([summary])


def _keys(readme: str | None) -> None:
    from compress.recipe.config import keys_markdown

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
    i.add_argument(
        "--model",
        help="package.module:Factory building a fresh model, for effective "
        "sparsity and MACs of sparse, pruned and checkpoint files",
    )
    i.add_argument("--prefix", default="", help="state_dict key prefix to strip (e.g. 'model.')")
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
            print(_inspect(Path(args.file), args.model, args.prefix))
        elif args.command == "keys":
            _keys(args.write_readme)
    except CompressError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
