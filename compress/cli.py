"""The ``compress`` command: validate a recipe, print its schedule, inspect an exported file,
export a checkpoint written with ``CompressionCallback``.

    compress validate configs/magnitude_sparsity.json
    compress schedule configs/magnitude_sparsity.json --epochs 40 --steps-per-epoch 20
    compress inspect exports/digits/model.sparse.pt
    compress inspect exports/digits/model.xml     # OpenVINO IR, read without OpenVINO
    compress export checkpoints/best.ckpt --model mypkg.nets:Net --formats sparse,pt2

Errors print one line and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.analysis.summary import NNCF_PARAMS, conv_linear_weights, layer_macs, table
from compress.errors import CompressError, ConfigError
from compress.recipe.config import Config, load_config
from compress.schedules import (
    SCHEDULES,
    Scheduler,
    initial_level,
    moves_per_step,
    schedule_position,
    sparsity_level,
)


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
            # NNCF 2.17: the target at epoch num_init_steps + pruning_steps - 1
            start = p["num_init_steps"]
            epoch = start if p["schedule"] == "baseline" else start + max(p["pruning_steps"] - 1, 0)
            parts.append(f"{a.name} ({p['schedule']}: {target} of {kind} from epoch {epoch})")
        else:
            parts.append(a.name)
    if not parts:
        return f"{cfg.source}: valid: no 'compression' section, the model trains uncompressed"
    return f"{cfg.source}: valid: " + " + ".join(parts)


def _sparsity_levels(
    name: str, params: dict[str, Any], init: float, epoch: int, steps_per_epoch: int | None
) -> dict[str, float]:
    """The level epoch ``epoch``'s first batch trains at and, for a per-step schedule whose
    epoch length is known, its last batch: the scheduler's own timing (NNCF's)."""
    scheduler = Scheduler()
    scheduler.epoch = epoch
    scheduler.inferred_steps_per_epoch = steps_per_epoch
    scheduler.length_known = steps_per_epoch is not None  # told the length, as the callback is
    position = schedule_position(params, scheduler)
    first = (
        initial_level(params, init) if position is None else sparsity_level(params, init, position)
    )
    out = {name: round(first, 6)}
    spe = params["steps_per_epoch"] or steps_per_epoch
    if moves_per_step(params) and spe:
        scheduler.step_in_epoch = spe
        position = schedule_position(params, scheduler)
        last = init if position is None else sparsity_level(params, init, position)
        out[f"{name} (epoch end)"] = round(last, 6)
    return out


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
            if a.name == "filter_pruning":
                row[a.name] = round(fn(params, init, epoch), 6)
            else:
                row.update(_sparsity_levels(a.name, params, init, epoch, steps_per_epoch))
            if freeze is not None and epoch >= freeze:
                row["frozen"] = "yes"
        rows.append(row)
    return rows


MAX_SCHEDULE_EPOCHS = 10_000  # one table row per epoch


def check_schedule_args(epochs: int, steps_per_epoch: int | None) -> None:
    """``compress schedule`` prints a row per epoch: a number of epochs from 1 to
    ``MAX_SCHEDULE_EPOCHS``, and a positive number of steps per epoch."""
    if not 1 <= epochs <= MAX_SCHEDULE_EPOCHS:
        raise ConfigError(
            f"schedule: epochs {epochs} is not allowed; give 1 to {MAX_SCHEDULE_EPOCHS} "
            "(one row per epoch)"
        )
    if steps_per_epoch is not None and steps_per_epoch < 1:
        raise ConfigError(f"schedule: --steps-per-epoch {steps_per_epoch} must be at least 1")


def _load_model(spec: str) -> nn.Module:
    """A fresh model from ``package.module:factory`` (a class or a function without arguments)."""
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does, so local modules are found
    try:
        factory = getattr(importlib.import_module(module_name), attr)
        model = factory()
    except (ImportError, AttributeError, TypeError, ValueError) as e:
        raise CompressError(
            f"--model {spec!r}: cannot build the model ({e}); give 'package.module:Factory', "
            "a class or function that takes no arguments"
        ) from None
    if not isinstance(model, nn.Module):
        raise CompressError(
            f"--model {spec!r}: the factory returned a {type(model).__name__}, not a "
            "torch.nn.Module; give a class or function that builds the model"
        )
    return model


def _inspect(path: Path, model_spec: str | None = None, prefix: str = "") -> str:
    """Sparsity (and, given a model, a pt2 program or an OpenVINO IR, effective sparsity and
    MACs) of a file."""
    from compress.deploy.export import SPARSE_FORMAT, read_sparse
    from compress.deploy.files import safe_load

    inputs: Any = None
    graph_macs: dict[str, int] | None = None
    payload: Any = None
    weights: list[str] | None = None
    if path.suffix == ".pt2":
        from compress.deploy.pt2_file import read_pt2

        # read as a zip: torch.export.load would unpickle and eval parts of the file
        state, macs = read_pt2(path)
        graph_macs = None if macs is None else {"MACs": macs, "FLOPs (2 x MACs)": 2 * macs}
    elif path.suffix == ".xml":
        from compress.deploy.openvino_file import read_openvino

        # parsed, never run: the IR's batch dimension is free, so MACs are per sample
        state, weights, macs = read_openvino(path)
        graph_macs = (
            None
            if macs is None
            else {"MACs per sample": macs, "FLOPs per sample (2 x MACs)": 2 * macs}
        )
    else:
        payload = safe_load(path)
        if isinstance(payload, dict) and payload.get("format") == SPARSE_FORMAT:
            state, inputs = read_sparse(path)
        elif isinstance(payload, dict) and payload.get("format") == "compress.pruned":
            from compress.deploy.pruned_file import read_pruned

            state = read_pruned(path)["state_dict"]
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
    _check_keys(state, path)
    lines = [inspect_state(state, str(path), weights)]
    report_path = Path(str(path).removesuffix(".sparse.pt") + ".runtime.json")
    if path.name.endswith(".sparse.pt") and report_path.is_file():
        from compress.deploy.runtime_report import report_from_dict
        from compress.deploy.sidecars import read_sidecar

        report = report_from_dict(read_sidecar(report_path, "runtime"))
        lines.append(f"sparse runtime ({report_path.name}):")
        lines.append(str(report))
    latency_path = Path(str(path).removesuffix(".pruned.pt") + ".latency.json")
    if path.name.endswith(".pruned.pt") and latency_path.is_file():
        from compress.deploy.sidecars import read_sidecar
        from compress.pruning.latency_widths import text

        lines.append(f"{latency_path.name}: " + text(read_sidecar(latency_path, "latency")))
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
    elif graph_macs is not None:
        lines.append(table([graph_macs]))
    return "\n".join(lines)


def _check_keys(state: Mapping[Any, Any], path: Path) -> None:
    bad = [k for k in state if not isinstance(k, str)]
    if bad:
        raise CompressError(
            f"{path}: the state_dict has a key {bad[0]!r} that is not a string; "
            "the file is damaged or crafted"
        )


def _masked_checkpoint_weights(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The checkpoint's weights with the masks saved by ``CompressionCallback`` applied
    (sparsity algorithms; a layer name is matched to the state_dict key ending with it)."""
    from compress.controller import expand_state

    state = dict(checkpoint["state_dict"])
    entry = _field(_field(checkpoint, "callbacks"), "CompressionCallback")
    controller = expand_state(_field(entry, "controller"))  # masks packed to bits
    for algo in _field(controller, "state").values():
        for layer, mask in _field(algo, "masks").items():
            if not isinstance(layer, str) or not isinstance(mask, torch.Tensor):
                continue
            keys = [k for k in state if k == f"{layer}.weight" or k.endswith(f".{layer}.weight")]
            if (
                len(keys) == 1
                and isinstance(state[keys[0]], torch.Tensor)
                and state[keys[0]].shape == mask.shape
            ):
                state[keys[0]] = state[keys[0]] * mask.to(state[keys[0]].dtype)
    return state


def _field(d: Any, key: str) -> dict[str, Any]:
    """``d[key]`` if both are dicts, else an empty dict: a checkpoint's optional sections may be
    missing or of another shape, and then carry no masks."""
    value = d.get(key) if isinstance(d, dict) else None
    return value if isinstance(value, dict) else {}


def _checkpoint(path: Path) -> Any:
    """A full checkpoint file, or the directory of a distributed checkpoint Lightning wrote
    (``ModelParallelStrategy(save_distributed_checkpoint=True)``): its ``meta.pt`` (callbacks,
    loops) with the model's tensors read whole from the shards, in this one process."""
    from compress.deploy.files import safe_load

    if not path.is_dir():
        return safe_load(path)
    if not (path / ".metadata").is_file() or not (path / "meta.pt").is_file():
        raise CompressError(
            f"{path}: a directory, not a distributed checkpoint written by Lightning "
            "(no .metadata and meta.pt in it)"
        )
    from compress.deploy.dcp_file import read_state_dict

    payload = safe_load(path / "meta.pt")
    if isinstance(payload, dict):
        payload["state_dict"] = read_state_dict(path)
    return payload


def _weights_only(payload: Any) -> bool:
    """Whether ``payload`` is a Lightning checkpoint written with ``save_weights_only``: weights
    and loop counters, without the callbacks' and optimizers' states."""
    return (
        isinstance(payload, dict)
        and isinstance(payload.get("state_dict"), dict)
        and "pytorch-lightning_version" in payload
        and "callbacks" not in payload
        and "optimizer_states" not in payload
    )


def export_checkpoint(
    path: Path, model: nn.Module, formats: Sequence[str], out: Path
) -> dict[str, Path]:
    """Exports the model of a checkpoint written with ``CompressionCallback`` (a file, or a
    distributed checkpoint's directory): ``model`` is a fresh instance of the LightningModule
    or of the compressed network (the callback's ``model_attr`` submodule); the recipe, masks
    and example input shapes come from the callback's entry."""
    from compress.controller import create_compressed_model, expand_state
    from compress.deploy.export import FORMATS, export
    from compress.deploy.files import zero_inputs

    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise CompressError(f"--formats: {unknown} not supported; one of {list(FORMATS)}")
    payload = _checkpoint(path)
    entry = _field(_field(payload, "callbacks"), "CompressionCallback")
    if _weights_only(payload):
        raise CompressError(
            f"{path}: a weights-only checkpoint (ModelCheckpoint(save_weights_only=True)): "
            "Lightning leaves out every callback's state there, the recipe and masks of "
            "CompressionCallback included, so it cannot be exported. Its state_dict is the "
            "masked model already (MyLit.load_from_checkpoint gives it); to export, pass a "
            "checkpoint written without save_weights_only, or use the export the callback "
            "writes at fit end (CompressionCallback(recipe, export_dir=...))"
        )
    if "recipe" not in entry or "controller" not in entry:
        raise CompressError(
            f"{path}: not a checkpoint written with CompressionCallback (no "
            "'CompressionCallback' entry with a recipe and controller state)"
        )
    attr = entry.get("model_attr")
    prefix = entry.get("prefix", f"{attr}." if attr else "")
    weights = payload.get("state_dict")
    if not isinstance(weights, dict):
        raise CompressError(f"{path}: the checkpoint has no 'state_dict' of weights")
    _check_keys(weights, path)
    if not isinstance(prefix, str) or (prefix and not prefix.endswith(".")):
        raise CompressError(
            f"{path}: the entry's prefix {str(prefix)[:40]!r} is not a key prefix such as 'model.'"
        )
    inputs = tuple(zero_inputs(entry.get("inputs", []), f"{path}: the entry's inputs"))
    target = model
    if sorted(model.state_dict()) == sorted(weights):  # the factory built the LightningModule
        try:
            target = model.get_submodule(prefix[:-1]) if prefix else model
        except AttributeError:
            raise CompressError(
                f"{path}: the entry's prefix {prefix!r} names no submodule of --model"
            ) from None
    else:  # the compressed network, under its plain names
        weights = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise CompressError(f"{path}: the weights do not fit --model ({first})") from None
    ctrl, _ = create_compressed_model(target, entry["recipe"], inputs or None)
    # the teacher is a copy of the trained weights here, and no export uses it
    ctrl.load_state_dict(expand_state(entry["controller"]), accept_new_teacher=True)
    return export(ctrl.strip(), out, formats, example_inputs=inputs or None)


def _model_figures(model: nn.Module, inputs: Any) -> str:
    from compress.analysis.effective_report import sparsity_report

    report = sparsity_report(model, tuple(inputs) if inputs is not None else None)
    row: dict[str, Any] = {
        "params": sum(p.numel() for p in model.parameters()),
        NNCF_PARAMS: conv_linear_weights(model),
        "direct sparsity": report.direct_sparsity,
        "effective sparsity": report.effective_sparsity,
    }
    if inputs is not None:
        row["MACs"] = layer_macs(model, tuple(inputs)).get("", 0)
        row["FLOPs (2 x MACs)"] = 2 * row["MACs"]
    return str(report) + "\n" + table([row])


def inspect_state(
    state: dict[str, torch.Tensor], name: str, weights: Sequence[str] | None = None
) -> str:
    """Per-tensor sparsity and totals of a state_dict: of the tensors named in ``weights``, or
    by default of the floating-point ones of 2 or more dimensions."""
    rows = []
    total = zeros = 0
    for key, t in state.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            continue
        if (t.dim() < 2) if weights is None else (key not in weights):
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
    from compress.deploy.files import save_bytes
    from compress.recipe.config import keys_markdown

    text = keys_markdown()
    if readme is None:
        print(text)
        return
    path = Path(readme)
    try:
        old = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise CompressError(
            f"{path}: cannot read the README ({getattr(e, 'strerror', None) or e}); "
            "give the path of a README.md with a key table section"
        ) from None
    begin, end = "<!-- keys:begin -->", "<!-- keys:end -->"
    if begin not in old or end not in old:
        raise CompressError(f"{path}: no '{begin}' ... '{end}' section")
    head, rest = old.split(begin, 1)
    save_bytes(path, f"{head}{begin}\n{text}\n{end}{rest.split(end, 1)[1]}".encode())
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
    e = sub.add_parser("export", help="export a checkpoint written with CompressionCallback")
    e.add_argument("checkpoint")
    e.add_argument(
        "--model",
        required=True,
        help="package.module:Factory building a fresh LightningModule or compressed network",
    )
    e.add_argument(
        "--formats", default="sparse", help="comma-separated, e.g. sparse,pt2,onnx,openvino"
    )
    e.add_argument("--out", help="output path prefix (default: the checkpoint's, no suffix)")
    k = sub.add_parser("keys", help="print the recipe keys as a Markdown table (from the schema)")
    k.add_argument("--write-readme", metavar="README", nargs="?", const="README.md")
    args = parser.parse_args(argv)
    try:
        if args.command == "validate":
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                cfg = load_config(args.recipe)
            for w in caught:  # one line each, without the source line Python would add
                print(f"warning: {w.message}", file=sys.stderr)
            print(_summary(cfg))
        elif args.command == "schedule":
            cfg = load_config(args.recipe)
            epochs = args.epochs if args.epochs is not None else cfg.data.get("epochs")
            if epochs is None:
                raise CompressError("schedule: give --epochs (the recipe has no 'epochs')")
            check_schedule_args(int(epochs), args.steps_per_epoch)
            rows = schedule_rows(cfg, int(epochs), args.steps_per_epoch)
            print(json.dumps(rows) if args.json else table(rows))
        elif args.command == "inspect":
            print(_inspect(Path(args.file), args.model, args.prefix))
        elif args.command == "export":
            ckpt = Path(args.checkpoint)
            out = Path(args.out) if args.out else ckpt.with_suffix("")
            formats = [f.strip() for f in args.formats.split(",") if f.strip()]
            written = export_checkpoint(ckpt, _load_model(args.model), formats, out)
            print("\n".join(f"{fmt}: {p}" for fmt, p in written.items()))
        elif args.command == "keys":
            _keys(args.write_readme)
    except CompressError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
