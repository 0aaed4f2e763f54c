"""Save and load the exported formats. Every file is written atomically and loads without
unpickling arbitrary objects (``torch.load(weights_only=True)`` or ``torch.export.load``).

Formats of ``export``:

- ``sparse`` (``PREFIX.sparse.pt``): each weight as its nonzero values plus a packed bitmask
  (one bit per element); tensors that are not sparse enough are stored dense. Restore with
  ``load_sparse(path, model)``.
- ``pt2`` (``PREFIX.pt2``): ``torch.export`` program; needs example inputs. The archive holds
  raw weights and the JSON graph, no pickle (the example inputs are not stored).
- ``onnx`` (``PREFIX.onnx``): ONNX via ``torch.onnx.export``; needs example inputs.
- ``openvino`` (``PREFIX.xml`` + ``PREFIX.bin``): OpenVINO IR converted from the ``torch.export``
  program, checked against the model on the example inputs before it is written; needs example
  inputs and ``pip install lightning-compress[openvino]`` (see ``openvino_file.py``).
"""

from __future__ import annotations

import importlib.util
import io
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compress.analysis.outputs import check_finite_outputs, check_same, leaves, outputs
from compress.deploy.files import atomic_write, safe_load, save_bytes, stored_inputs, torch_save
from compress.errors import CompressError, ConfigError
from compress.masks import check_finite, masked_names
from compress.pruning.attention import cache_off

SPARSE_FORMAT = "compress.sparse"
FORMATS = ("sparse", "pt2", "onnx", "openvino", "pruned", "sparse_runtime")
_SUFFIX = {
    "sparse": ".sparse.pt",
    "pt2": ".pt2",
    "onnx": ".onnx",
    "openvino": ".xml",
    "pruned": ".pruned.pt",
    "sparse_runtime": ".sparse.pt",
}


def pack(tensor: torch.Tensor) -> dict[str, Any]:
    """One tensor in the sparse format: values + bitmask when that is smaller, else dense."""
    t = tensor.detach().cpu()
    nonzero = t != 0
    nnz = int(nonzero.sum())
    dense_bytes = t.numel() * t.element_size()
    sparse_bytes = nnz * t.element_size() + (t.numel() + 7) // 8
    if not t.is_floating_point() or t.numel() < 64 or sparse_bytes >= dense_bytes:
        return {"dense": t.clone()}
    bits = np.packbits(nonzero.flatten().numpy())
    return {"shape": list(t.shape), "values": t[nonzero].clone(), "bitmask": torch.from_numpy(bits)}


def unpack(entry: Mapping[str, Any]) -> torch.Tensor:
    """Inverse of ``pack``. The declared shape is checked against the bitmask's byte count
    before anything of that shape is allocated."""
    if "dense" in entry:
        if not isinstance(entry["dense"], torch.Tensor):
            raise ValueError(f"'dense' holds a {type(entry['dense']).__name__}, not a tensor")
        return entry["dense"]
    shape = declared_shape(entry)
    n = math.prod(shape)
    bitmask, values = entry["bitmask"], entry["values"]
    if not isinstance(bitmask, torch.Tensor) or bitmask.dtype != torch.uint8:
        raise ValueError("the bitmask is not a uint8 tensor")
    if not isinstance(values, torch.Tensor) or values.dim() != 1:
        raise ValueError("the values are not a 1-D tensor")
    if bitmask.numel() != (n + 7) // 8:
        raise ValueError(
            f"shape {shape} needs a bitmask of {(n + 7) // 8} bytes; the file holds "
            f"{bitmask.numel()}"
        )
    bits = np.unpackbits(bitmask.numpy(), count=n).astype(bool)
    if int(bits.sum()) != values.numel():
        raise ValueError(f"bitmask has {int(bits.sum())} ones for {values.numel()} values")
    out = torch.zeros(n, dtype=values.dtype)
    out[torch.from_numpy(bits)] = values
    return out.reshape(shape)


def save_sparse(
    model: nn.Module, path: str | Path, example_inputs: Sequence[torch.Tensor] | None = None
) -> Path:
    """Writes the model's state_dict in the sparse format, with the example inputs' shapes
    (so that ``load_sparse(..., runtime=True)`` can time the layers). Every packed tensor is
    unpacked and compared with the model's before the file is written."""
    tensors = {}
    for key, value in model.state_dict().items():
        tensors[key] = pack(value)
        if not torch.equal(unpack(tensors[key]), value.detach().cpu()):
            raise CompressError(f"sparse export: {key} does not unpack to its values; not written")
    payload: dict[str, Any] = {"format": SPARSE_FORMAT, "version": 1, "tensors": tensors}
    if example_inputs is not None:
        payload["input_shapes"] = [list(t.shape) for t in example_inputs]
        payload["input_dtypes"] = [str(t.dtype).removeprefix("torch.") for t in example_inputs]
    return torch_save(path, payload)


def declared_shape(entry: Mapping[str, Any]) -> tuple[int, ...]:
    """The shape an entry of the sparse format declares (read, not allocated)."""
    if "dense" in entry:
        dense = entry["dense"]
        if not isinstance(dense, torch.Tensor):
            raise ValueError(f"'dense' holds a {type(dense).__name__}, not a tensor")
        return tuple(dense.shape)
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
    ):
        raise ValueError(f"shape {shape!r} is not a list of sizes")
    return tuple(shape)


def read_sparse(
    path: str | Path, expected: Mapping[str, tuple[int, ...]] | None = None
) -> tuple[dict[str, torch.Tensor], list[torch.Tensor] | None]:
    """The dense state_dict stored in a sparse file, and zero example inputs if it has shapes.

    With ``expected`` (key -> shape, from the target model), the file's keys and declared
    shapes are checked against it before any tensor is rebuilt."""
    payload = safe_load(path)
    if not isinstance(payload, dict) or payload.get("format") != SPARSE_FORMAT:
        raise CompressError(
            f"{path}: not a sparse export of this library (no '{SPARSE_FORMAT}' tag)"
        )
    try:
        tensors = payload["tensors"]
        if not isinstance(tensors, dict) or not all(isinstance(v, dict) for v in tensors.values()):
            raise ValueError("'tensors' is not a table of packed tensors")
        if expected is not None:
            _check_against(path, {k: declared_shape(v) for k, v in tensors.items()}, expected)
        state = {k: unpack(v) for k, v in tensors.items()}
        return state, stored_inputs(payload, path)
    except (KeyError, ValueError, TypeError, AttributeError, RuntimeError) as e:
        raise CompressError(f"{path}: the sparse file is damaged ({e})") from None


def _check_against(
    path: str | Path, declared: Mapping[str, tuple[int, ...]], own: Mapping[str, tuple[int, ...]]
) -> None:
    missing, extra = sorted(set(own) - set(declared)), sorted(set(declared) - set(own))
    if missing or extra:
        raise CompressError(
            f"{path}: the file is of a different model: keys missing from the file "
            f"{missing[:5]}, keys the model lacks {extra[:5]}"
        )
    for k, shape in declared.items():
        if tuple(shape) != tuple(own[k]):
            raise CompressError(
                f"{path}: the file is of a different model: {k} has shape {tuple(shape)} "
                f"in the file and {tuple(own[k])} in the model"
            )


def load_sparse(
    path: str | Path,
    model: nn.Module,
    *,
    runtime: bool = False,
    example_inputs: Sequence[torch.Tensor] | None = None,
    min_speedup: float = 1.1,
    timer: Callable[[Callable[[], object]], float] | None = None,
) -> nn.Module:
    """Restores the weights saved by the ``sparse`` export into ``model`` (same class) exactly.

    With ``runtime=True`` returns ``to_sparse_runtime(model, inputs)``, timed on
    ``example_inputs`` or on zeros of the input shapes stored in the file, so sparse-enough
    layers compute with sparse kernels. ``min_speedup`` and ``timer`` are passed on
    (``min_speedup=0`` converts every supported layer, whatever the timing).
    """
    own = model.state_dict()
    state, stored = read_sparse(path, {k: tuple(v.shape) for k, v in own.items()})
    model.load_state_dict(state)
    if not runtime:
        return model
    inputs = example_inputs if example_inputs is not None else stored
    if inputs is None:
        raise CompressError(
            f"{path}: runtime=True needs example_inputs; the file stores no input shapes"
        )
    from compress.deploy.sparse_runtime import to_sparse_runtime

    return to_sparse_runtime(model, tuple(inputs), min_speedup=min_speedup, timer=timer)


def export(
    model: nn.Module,
    path_prefix: str | Path,
    formats: Sequence[str] = ("sparse",),
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
) -> dict[str, Path]:
    """Writes ``model`` (usually ``ctrl.strip()``) in each format; returns format -> path.

    Example:
        >>> import tempfile, torch
        >>> net = torch.nn.Linear(4, 2)
        >>> paths = export(net, tempfile.mkdtemp() + "/net", ["sparse"])
        >>> sorted(paths)
        ['sparse']
    """
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ConfigError(f"export formats: {unknown} not supported; one of {list(FORMATS)}")
    inputs = _as_tuple(example_inputs)
    needs_inputs = [f for f in formats if f != "sparse"]
    if needs_inputs and inputs is None:
        raise ConfigError(f"export formats {needs_inputs} need example_inputs")
    if "openvino" in formats:  # before any file is written
        from compress.deploy.openvino_file import openvino_module

        openvino_module()
    check_finite(model, "export")
    check_stripped(model)
    if needs_inputs and inputs is not None:  # what the exported programs are compared with
        check_finite_outputs(outputs(model, inputs), model, "export", "the model")
    prefix = str(path_prefix)
    out: dict[str, Path] = {}
    was_training = model.training
    model.eval()
    # A Hugging Face decoder's key/value cache is for generation; the exported forward pass
    # returns its outputs without it (torch.export cannot return a cache object).
    try:
        with cache_off(model):
            for fmt in formats:
                path = Path(prefix + _SUFFIX[fmt])
                if fmt == "sparse":
                    out[fmt] = save_sparse(model, path, inputs)
                    continue
                assert inputs is not None  # checked above for every format but "sparse"
                if fmt == "pt2":
                    out[fmt] = _export_pt2(model, path, inputs)
                elif fmt == "onnx":
                    out[fmt] = _export_onnx(model, path, inputs)
                elif fmt == "openvino":
                    from compress.deploy.openvino_file import save_openvino

                    out[fmt] = save_openvino(model, _program(model, inputs), inputs, path)
                elif fmt == "pruned":
                    out[fmt] = _export_pruned(model, path, inputs)
                elif fmt == "sparse_runtime":
                    out[fmt] = _export_sparse_runtime(model, path, inputs)
    finally:
        model.train(was_training)
    return out


def check_stripped(model: nn.Module) -> None:
    """Raises ``CompressError`` when ``model`` still carries masks: its state_dict holds the
    weights unmasked, so every format would hold a model other than the one trained."""
    for name, module in model.named_modules():
        if masked_names(module):
            raise CompressError(
                f"export: {name or type(model).__name__} still carries masks, so the files would "
                "hold its weights unmasked; export ctrl.strip()'s model"
            )


def _program(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
    """The ``torch.export`` program of ``model`` with the batch dimension free."""
    args, dims = _dynamic_batch(inputs)
    return torch.export.export(model, args, dynamic_shapes=dims)


def _export_pt2(model: nn.Module, path: Path, inputs: tuple[torch.Tensor, ...]) -> Path:
    program = _program(model, inputs)
    with torch.no_grad():
        got = leaves(program.module()(*inputs))
    check_same(outputs(model, inputs), got, "pt2 export", "the stripped model")
    # Without example inputs the archive holds no pickle: torch.export.save would store them
    # with torch.save, and loading them is what makes a third-party .pt2 unsafe.
    program.example_inputs = None
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return save_bytes(path, buffer.getbuffer())


def _as_tuple(x: torch.Tensor | Sequence[torch.Tensor] | None) -> tuple[torch.Tensor, ...] | None:
    if x is None:
        return None
    return (x,) if isinstance(x, torch.Tensor) else tuple(x)


def _dynamic_batch(inputs: tuple[torch.Tensor, ...]) -> tuple[tuple[torch.Tensor, ...], Any]:
    """Inputs and ``dynamic_shapes`` that leave the batch dimension free, so the exported model
    takes any batch size. A batch of 1 is repeated to 2 first: torch.export specialises size 1."""
    inputs = tuple(
        t.expand(2, *t.shape[1:]).contiguous()
        if t is not None and t.dim() and t.shape[0] == 1
        else t
        for t in inputs
    )
    dims = tuple({0: torch.export.Dim.AUTO} if t is not None and t.dim() else None for t in inputs)
    return inputs, dims


def _export_onnx(model: nn.Module, path: Path, inputs: tuple[torch.Tensor, ...]) -> Path:
    """The ONNX program, run by ONNX Runtime (when it is installed) and compared with the
    model before it is written."""
    args, dims = _dynamic_batch(inputs)
    program = torch.onnx.export(model, args, dynamic_shapes=dims, dynamo=True, verbose=False)
    assert program is not None  # dynamo=True without a path returns the program
    if importlib.util.find_spec("onnxruntime") is not None:
        got = [t.detach() for t in program(*args)]
        check_same(outputs(model, args), got, "onnx export", "the stripped model")
    return atomic_write(path, lambda tmp: program.save(tmp, external_data=False))


def _export_pruned(model: nn.Module, path: Path, inputs: tuple[torch.Tensor, ...]) -> Path:
    plan = getattr(model, "compress_pruning_plan", None)
    if plan is None:
        raise ConfigError(
            "export format 'pruned' needs a model stripped by a filter_pruning controller "
            "(ctrl.strip()), which carries the pruning plan"
        )
    from compress.deploy.pruned_file import save_pruned

    save_pruned(model, plan, path, inputs)
    table = getattr(model, "compress_latency_table", None)
    if table is not None:  # the measured latency table and the widths chosen from it
        import json

        text = json.dumps(table, indent=1)
        latency_path = Path(str(path).removesuffix(".pruned.pt") + ".latency.json")
        atomic_write(latency_path, lambda tmp: Path(tmp).write_text(text))
    return path


def _export_sparse_runtime(model: nn.Module, path: Path, inputs: tuple[torch.Tensor, ...]) -> Path:
    import json

    from compress.deploy.sparse_runtime import to_sparse_runtime

    save_sparse(model, path, inputs)
    report = to_sparse_runtime(model, inputs).runtime_report
    text = json.dumps(report.to_dict(), indent=2)  # type: ignore[union-attr,operator]
    report_path = Path(str(path).removesuffix(".sparse.pt") + ".runtime.json")
    atomic_write(report_path, lambda tmp: Path(tmp).write_text(text))
    return path
