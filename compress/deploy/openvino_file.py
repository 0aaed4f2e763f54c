"""OpenVINO IR (``PREFIX.xml`` + ``PREFIX.bin``): written from a ``torch.export`` program and
checked against the model before it is written; read for ``compress inspect`` without OpenVINO.

Writing needs the optional ``openvino`` package (``pip install lightning-compress[openvino]``).
:func:`save_openvino` converts the program with ``openvino.convert_model`` (no ONNX step), the
batch dimension free and the other dimensions fixed at the example's, saves the weights as
float32 (OpenVINO would halve them to float16 by default), reads the written files back, runs
them on the example inputs in float32 (OpenVINO's CPU plugin computes in bfloat16 by default
on CPUs that have it) and compares every output with the model's before renaming the two
files into place.

:func:`read_openvino` builds the XML's ``xml.etree.ElementTree`` tree from expat's events,
refusing a document type or entity declaration when expat meets one (so no entity can expand)
and a file over ``MAX_XML_BYTES``; each constant's
declared offset and size are checked against its shape and the real length of the ``.bin``
before its bytes are read. Nothing in either file is executed or evaluated.

Example:
    >>> import tempfile, torch
    >>> from compress.deploy.export import export
    >>> net = torch.nn.Linear(4, 2)
    >>> paths = export(net, tempfile.mkdtemp() + "/net", ["openvino"], torch.randn(3, 4))
    >>> ir = read_openvino(paths["openvino"])
    >>> [tuple(ir.constants[name].shape) for name in ir.weights], ir.macs  # one sample: 4 x 2
    ([(2, 4)], 8)
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple
from xml.parsers import expat

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from compress.deploy.files import atomic_write_files
from compress.errors import CompressError, ConfigError

__all__ = ["read_openvino", "save_openvino"]

# An output of OpenVINO may differ from the model's by this fraction of the output's largest
# magnitude: the kernels sum in another order (measured: 1e-7 on CNNs, BERT and ViT).
OUTPUT_RTOL = 1e-4
MAX_XML_BYTES = 256 * 2**20
MAX_LAYERS = 1_000_000
# OpenVINO element types of the constants read as tensors; other types (u4, nf4, f8...) are
# checked against the .bin but not counted.
_DTYPES = {
    "f64": torch.float64,
    "f32": torch.float32,
    "f16": torch.float16,
    "bf16": torch.bfloat16,
    "i64": torch.int64,
    "i32": torch.int32,
    "i16": torch.int16,
    "i8": torch.int8,
    "u8": torch.uint8,
    "boolean": torch.bool,
}


def openvino_module() -> Any:
    """The ``openvino`` package, or a ConfigError saying which extra installs it."""
    try:
        import openvino
    except ImportError as e:
        raise ConfigError(
            f"export format 'openvino' needs the openvino package ({e}); install it with "
            "`pip install lightning-compress[openvino]`"
        ) from None
    return openvino


def save_openvino(
    model: nn.Module,
    program: torch.export.ExportedProgram,
    inputs: tuple[torch.Tensor, ...],
    path: Path,
) -> Path:
    """Converts ``program`` (``model`` exported with a free batch dimension) to OpenVINO IR at
    ``path`` (``.xml``, with its ``.bin`` beside it), after checking OpenVINO's outputs on
    ``inputs`` against ``model``'s: a CompressError and no file if they differ."""
    ov = openvino_module()
    shapes = [
        (ov.PartialShape([-1, *t.shape[1:]] if t.dim() else []), _ov_type(ov, t)) for t in inputs
    ]
    converted = ov.convert_model(program, input=shapes)
    with torch.no_grad():
        want = [t for t in tree_flatten(model(*inputs))[0] if isinstance(t, torch.Tensor)]

    def write(tmps: list[str]) -> None:
        xml, _ = tmps  # OpenVINO names the .bin after the .xml
        ov.save_model(converted, xml, compress_to_fp16=False)
        compiled = ov.Core().compile_model(xml, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        result = compiled([t.detach().cpu().numpy() for t in inputs])
        got = [torch.from_numpy(result[i]) for i in range(len(compiled.outputs))]
        check_outputs(got, want, path)

    atomic_write_files([path, path.with_suffix(".bin")], write)
    return path


def _ov_type(ov: Any, t: torch.Tensor) -> Any:
    names = {v: k for k, v in _DTYPES.items()}
    if t.dtype not in names:
        raise ConfigError(f"export format 'openvino': input dtype {t.dtype} is not supported")
    return getattr(ov.Type, names[t.dtype])


def check_outputs(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor], path: Path) -> None:
    """Raises a CompressError naming ``path`` unless every output of the runtime (``got``)
    equals the model's (``want``) within ``OUTPUT_RTOL`` of the output's largest magnitude."""
    if len(got) != len(want):
        raise CompressError(
            f"{path}: the converted model has {len(got)} outputs, the model {len(want)}; "
            "not written"
        )
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if tuple(g.shape) != tuple(w.shape):
            raise CompressError(
                f"{path}: output {i} has shape {tuple(g.shape)} in the converted model and "
                f"{tuple(w.shape)} in the model; not written"
            )
        if not w.is_floating_point():
            if not torch.equal(g.to(w.dtype), w):
                raise CompressError(f"{path}: output {i} differs from the model's; not written")
            continue
        scale = float(w.abs().max()) if w.numel() else 0.0
        error = float((g.to(w.dtype) - w).abs().max()) if w.numel() else 0.0
        if not error <= OUTPUT_RTOL * max(scale, 1e-6):  # also refuses a NaN
            raise CompressError(
                f"{path}: output {i} of the converted model differs from the model's by "
                f"{error:.3g} (largest output {scale:.3g}, allowed {OUTPUT_RTOL:g} of it); "
                "not written"
            )


class IRContents(NamedTuple):
    """What :func:`read_openvino` finds in an IR."""

    constants: dict[str, torch.Tensor]  # the float constants, by layer name
    weights: list[str]  # those that are the weights of a convolution or matmul
    macs: int | None  # for one sample (dynamic dimensions as 1); None if no layer is counted


def read_openvino(path: str | Path) -> IRContents:
    """The float constants of an IR, which of them are weights, and its MACs. Raises
    ``CompressError`` naming the file for anything that is not a plain IR."""
    path = Path(path)
    bin_path = path.with_suffix(".bin")
    for p in (path, bin_path):
        if not p.is_file():
            raise CompressError(f"{p}: no such file")
    if path.stat().st_size > MAX_XML_BYTES:
        raise CompressError(f"{path}: {path.stat().st_size} bytes of XML; refused")
    root = _parse(path.read_bytes(), path)
    layers = root.find("layers")
    if root.tag != "net" or layers is None:
        raise CompressError(f"{path}: not an OpenVINO IR (no <net> with <layers>)")
    if len(layers) > MAX_LAYERS:
        raise CompressError(f"{path}: {len(layers)} layers; refused")
    data = bin_path.read_bytes()
    try:
        constants, ids = _constants(layers, data, path)
        weights = _weight_ids(root, layers)
        return IRContents(constants, [k for k, i in ids.items() if i in weights], _macs(layers))
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise CompressError(f"{path}: not a readable OpenVINO IR ({e!r})") from None


class _Declaration(Exception):
    """A document type or entity declaration met while parsing."""


def _parse(text: bytes, path: Path) -> ET.Element:
    """The XML's element tree, built from expat's events; any document type or entity
    declaration is refused as the parser meets it (in whatever encoding the document is), so
    that no entity is ever expanded."""

    def refuse(*_args: object) -> None:
        raise _Declaration

    builder = ET.TreeBuilder()
    parser = expat.ParserCreate()
    parser.StartElementHandler = builder.start
    parser.EndElementHandler = builder.end
    parser.CharacterDataHandler = builder.data
    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.UnparsedEntityDeclHandler = refuse
    parser.ExternalEntityRefHandler = refuse  # type: ignore[assignment]
    try:
        parser.Parse(text, True)
        return builder.close()
    except _Declaration:
        raise CompressError(
            f"{path}: the XML declares a document type or entities, which an OpenVINO IR never "
            "does; refused"
        ) from None
    except (expat.ExpatError, AssertionError) as e:  # TreeBuilder asserts on no root
        raise CompressError(f"{path}: not valid XML ({e})") from None


def _constants(
    layers: ET.Element, data: bytes, path: Path
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The float constants by name, and each one's layer id."""
    state: dict[str, torch.Tensor] = {}
    ids: dict[str, str] = {}
    for layer in layers:
        if layer.get("type") != "Const":
            continue
        name = layer.get("name") or layer.get("id") or "?"
        attrs = layer.find("data")
        if attrs is None:
            raise CompressError(f"{path}: constant {name!r} has no <data>")
        element = attrs.get("element_type", "")
        shape = _sizes(attrs.get("shape", ""), f"{path}: constant {name!r}")
        offset, size = int(attrs.get("offset", "")), int(attrs.get("size", ""))
        if offset < 0 or size < 0 or offset + size > len(data):
            raise CompressError(
                f"{path}: constant {name!r} declares bytes {offset} to {offset + size}, but the "
                f".bin holds {len(data)}; the files are damaged, crafted or of two exports"
            )
        dtype = _DTYPES.get(element)
        if dtype is None:
            continue
        item = torch.empty((), dtype=dtype).element_size()
        if size != math.prod(shape) * item:
            raise CompressError(
                f"{path}: constant {name!r} declares shape {shape} of {element} in {size} bytes "
                f"(it needs {math.prod(shape) * item}); the file is damaged or crafted"
            )
        if not dtype.is_floating_point:
            continue
        raw = bytearray(data[offset : offset + size])
        flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        key = name if name not in state else f"{name}#{layer.get('id')}"
        state[key] = flat.reshape(shape)
        ids[key] = layer.get("id", "")
    return state, ids


_WEIGHTED = ("Convolution", "GroupConvolution", "MatMul")


def _weight_ids(root: ET.Element, layers: ET.Element) -> set[str]:
    """Ids of the layers whose output is the second input (the weight) of a convolution or
    matmul, by the IR's edges."""
    weight_ports = set()
    for layer in layers:
        ports = layer.find("input")
        if layer.get("type") in _WEIGHTED and ports is not None and len(ports) > 1:
            weight_ports.add((layer.get("id"), ports[1].get("id")))
    edges = root.find("edges")
    return {
        e.get("from-layer", "")
        for e in (edges if edges is not None else [])
        if (e.get("to-layer"), e.get("to-port")) in weight_ports
    }


def _sizes(text: str, what: str) -> list[int]:
    """A static shape ``"8, 3, 3, 3"`` (empty for a scalar)."""
    sizes = [int(s) for s in text.split(",") if s.strip()]
    if any(s < 0 for s in sizes):
        raise CompressError(f"{what}: shape {text!r} is not a list of sizes")
    return sizes


def _port_dims(layer: ET.Element, section: str, index: int) -> list[int]:
    """The dimensions of a layer's ``index``-th input or output port; a dynamic one (-1) is 1."""
    ports = layer.find(section)
    if ports is None or len(ports) <= index:
        raise ValueError(f"layer {layer.get('name')!r} has no {section} port {index}")
    dims = [int(d.text or "") for d in ports[index].findall("dim")]
    return [1 if d < 0 else d for d in dims]


def _macs(layers: ET.Element) -> int | None:
    """MACs of the convolution, matmul and attention layers, from their port dimensions."""
    total, counted = 0, False
    for layer in layers:
        kind = layer.get("type")
        if kind in ("Convolution", "GroupConvolution"):
            out = math.prod(_port_dims(layer, "output", 0))
            weight = _port_dims(layer, "input", 1)
            # [out, in, k...] or, grouped, [groups, out / groups, in / groups, k...]
            total += out * math.prod(weight[1 if kind == "Convolution" else 2 :])
        elif kind == "MatMul":
            a = _port_dims(layer, "input", 0)
            attrs = layer.find("data")
            transpose_a = attrs is not None and attrs.get("transpose_a") == "true"
            inner = a[-2] if transpose_a and len(a) > 1 else a[-1]
            total += math.prod(_port_dims(layer, "output", 0)) * inner
        elif kind == "ScaledDotProductAttention":
            q, k = _port_dims(layer, "input", 0), _port_dims(layer, "input", 1)
            # Q K^T, then the weights times V: (query elements + output elements) x keys
            total += (math.prod(q) + math.prod(_port_dims(layer, "output", 0))) * k[-2]
        else:
            continue
        counted = True
    return total if counted else None
