"""Reads a ``torch.export`` archive (``.pt2``) as a zip, without unpickling or evaluating anything.

``torch.export.load`` trusts the file: it unpickles the sample-inputs record and weights
marked as pickled (falling back to ``weights_only=False``) and turns the shape expressions
of the JSON graph into sympy expressions with ``sympify`` (``eval``). A crafted ``.pt2``
therefore runs code when torch loads it. :func:`read_pt2` reads only what ``compress inspect``
needs: the raw weight records (checked against their declared dtype, shape and byte count
before anything is allocated) and the JSON graph, whose matmul and convolution nodes are
evaluated one by one on ``meta`` tensors of their recorded shapes under
``torch.utils.flop_counter`` to count MACs. Only ``torch.ops.aten`` operators are looked up.

Example:
    >>> import tempfile, torch
    >>> from compress.deploy.export import export
    >>> net = torch.nn.Linear(4, 2)
    >>> path = export(net, tempfile.mkdtemp() + "/net", ["pt2"], torch.randn(3, 4))["pt2"]
    >>> state, macs = read_pt2(path)
    >>> sorted(state), macs  # a batch of 3 times 4 x 2
    (['bias', 'weight'], 24)
"""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from compress.deploy.files import check_tensor, check_zip
from compress.errors import CompressError

__all__ = ["read_pt2"]

# torch.export's serialized ScalarType codes (torch/_export/serde/schema.py), float and int
# types only: a weight of any other code is refused.
_DTYPES = {
    1: torch.uint8,
    2: torch.int8,
    3: torch.int16,
    4: torch.int32,
    5: torch.int64,
    6: torch.float16,
    7: torch.float32,
    8: torch.float64,
    12: torch.bool,
    13: torch.bfloat16,
}
# Nodes evaluated on meta tensors to count MACs (the ops torch's flop counter knows).
_COUNTED = {
    "linear",
    "mm",
    "addmm",
    "bmm",
    "baddbmm",
    "matmul",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "convolution",
    "scaled_dot_product_attention",
}
MAX_WEIGHT_RECORDS = 100_000
# The JSON of an archive (graph, weights config) is refused above these sizes before it is
# parsed: parsing makes a Python object per container, about 100 bytes each, so 200 MB of
# '[{}, ...]' would take 5 GB. A BERT-base graph is about 2 MB with 1 container per 30 bytes.
MAX_JSON_BYTES = 64 * 2**20
MAX_JSON_CONTAINERS = 2_000_000


def read_pt2(path: str | Path) -> tuple[dict[str, torch.Tensor], int | None]:
    """The weights (parameters and buffers, by their state_dict names) of a ``.pt2`` archive
    and its MACs at the exported example shapes (None if the graph has no counted node).
    Raises ``CompressError`` naming the file for anything that is not a plain archive."""
    path = Path(path)
    check_zip(path)  # a regular file; records stored once, uncompressed, CRCs checked
    if not zipfile.is_zipfile(path):
        raise CompressError(f"{path}: not a torch.export archive (not a zip file)")
    try:
        with zipfile.ZipFile(path) as z:
            return _read(z, path)
    except CompressError:
        raise
    except (KeyError, ValueError, TypeError, AttributeError, RuntimeError, zipfile.BadZipFile) as e:
        raise CompressError(f"{path}: not a readable torch.export archive ({e!r})") from None


def _read(z: zipfile.ZipFile, path: Path) -> tuple[dict[str, torch.Tensor], int | None]:
    infos = {i.filename: i for i in z.infolist()}
    graphs = [n for n in infos if n.endswith("models/model.json")]
    if len(graphs) != 1:
        raise CompressError(f"{path}: not a torch.export archive (no single models/model.json)")
    root = graphs[0].removesuffix("models/model.json")
    config = _json(z, infos, root + "data/weights/model_weights_config.json", path)["config"]
    constants = _json(z, infos, root + "data/constants/model_constants_config.json", path)
    if constants.get("config"):
        raise CompressError(
            f"{path}: the archive holds constants ({sorted(constants['config'])[:3]}), which "
            "only unpickling can read; refused"
        )
    if not isinstance(config, dict) or len(config) > MAX_WEIGHT_RECORDS:
        raise CompressError(f"{path}: the weights config is not a table of weights")
    state = {}
    for name, meta in config.items():
        if meta.get("use_pickle", True):
            raise CompressError(
                f"{path}: weight {name!r} is stored as a pickle, which can run code when "
                "loaded; refused (files written by this library store raw tensors)"
            )
        record = root + "data/weights/" + str(meta["path_name"])
        state[str(name)] = _tensor(z, infos, record, meta["tensor_meta"], f"{path}: {name!r}")
    graph = _json(z, infos, graphs[0], path)["graph_module"]["graph"]
    try:
        return state, _macs(graph)
    except (CompressError, KeyError, ValueError, TypeError, AttributeError, RuntimeError):
        return state, None  # a graph this reader does not follow: no MACs, weights still shown


def _json(z: zipfile.ZipFile, infos: dict[str, zipfile.ZipInfo], name: str, path: Path) -> Any:
    info = infos.get(name)
    if info is None:
        raise CompressError(f"{path}: not a torch.export archive (no {name.split('/', 1)[-1]})")
    if info.file_size > MAX_JSON_BYTES:
        raise CompressError(
            f"{path}: {name} declares {info.file_size} bytes, more than {MAX_JSON_BYTES}; refused"
        )
    data = z.read(info)
    containers = data.count(b"{") + data.count(b"[")
    if containers > MAX_JSON_CONTAINERS:
        raise CompressError(
            f"{path}: {name} holds {containers} JSON objects and lists, more than "
            f"{MAX_JSON_CONTAINERS}; the file is damaged or crafted; refused"
        )
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CompressError(f"{path}: {name} is not valid JSON ({type(e).__name__})") from None


def _ints(values: list[Any], what: str) -> list[int]:
    out = []
    for v in values:
        if "as_int" in v:
            out.append(int(v["as_int"]))
        elif "as_expr" in v and "as_int" in (v["as_expr"].get("hint") or {}):
            out.append(int(v["as_expr"]["hint"]["as_int"]))  # a symbolic size: its example value
        else:
            raise CompressError(f"{what}: size {v!r} has no integer value")
        if out[-1] < 0:
            raise CompressError(f"{what}: negative size {out[-1]}")
    return out


def _tensor(
    z: zipfile.ZipFile,
    infos: dict[str, zipfile.ZipInfo],
    record: str,
    meta: dict[str, Any],
    what: str,
) -> torch.Tensor:
    """A weight record as a tensor, its declared shape checked against its byte count first."""
    dtype = _DTYPES.get(meta["dtype"])
    if dtype is None:
        raise CompressError(f"{what}: dtype code {meta['dtype']!r} is not a plain tensor type")
    sizes = _ints(meta["sizes"], what)
    strides = _ints(meta["strides"], what)
    offset = _ints([meta["storage_offset"]], what)[0]
    info = infos.get(record)
    if info is None:
        raise CompressError(f"{what}: its record {record.rsplit('/', 1)[-1]} is missing")
    item = torch.empty((), dtype=dtype).element_size()
    stored = info.file_size // item
    # the last element the view reaches must lie inside the record
    extent = offset + sum((s - 1) * st for s, st in zip(sizes, strides, strict=True)) + 1
    if info.file_size % item or (math.prod(sizes) and extent > stored):
        raise CompressError(
            f"{what}: declares shape {sizes} of {dtype} (up to element {extent}), but its "
            f"record holds {info.file_size} bytes; the file is damaged or crafted"
        )
    data = bytearray(z.read(info))
    flat = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
    view = torch.as_strided(flat, sizes, strides, offset)  # no copy yet
    check_tensor(view, what)  # a zero stride would make the copy far larger than the record
    return view.clone()


def _macs(graph: dict[str, Any]) -> int | None:
    """MACs of the graph's matmul and convolution nodes at their recorded shapes."""
    values = graph["tensor_values"]
    counter = FlopCounterMode(display=False)
    counted = False
    with counter:
        for node in graph["nodes"]:
            target = str(node["target"])
            parts = target.split(".")
            if len(parts) != 5 or parts[:3] != ["torch", "ops", "aten"]:
                continue
            if parts[3] not in _COUNTED:
                continue
            op = getattr(getattr(torch.ops.aten, parts[3]), parts[4])
            positional, kwargs = [], {}
            for a in node["inputs"]:
                if a["kind"] == 2:  # keyword-only
                    kwargs[a["name"]] = _arg(a["arg"], values)
                else:
                    positional.append(_arg(a["arg"], values))
            op(*positional, **kwargs)
            counted = True
    return counter.get_total_flops() // 2 if counted else None


def _arg(arg: dict[str, Any], values: dict[str, Any]) -> Any:
    """A node argument: tensors become ``meta`` tensors of their recorded shape (no memory)."""
    ((kind, v),) = arg.items()
    if kind == "as_tensor":
        meta = values[v["name"]]
        dtype = _DTYPES.get(meta["dtype"], torch.float32)
        return torch.empty(_ints(meta["sizes"], v["name"]), dtype=dtype, device="meta")
    if kind == "as_none":
        return None
    if kind in ("as_int", "as_float", "as_bool", "as_string", "as_ints", "as_floats", "as_bools"):
        return v
    if kind == "as_sym_int":
        return _ints([v], "symbolic int")[0] if "as_expr" in v else int(v["as_int"])
    if kind == "as_optional_tensor":
        return None if "as_none" in v else _arg({"as_tensor": v["as_tensor"]}, values)
    raise CompressError(f"graph argument of kind {kind!r} is not supported")
