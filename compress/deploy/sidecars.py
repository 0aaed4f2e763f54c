"""The JSON files written beside exports, read back against their schemas: ``.latency.json``
(beside a ``.pruned.pt``: the measured latency table and the chosen widths) and
``.runtime.json`` (beside a ``.sparse.pt``: what the sparse runtime measured and converted).

A file larger than ``MAX_SIDECAR_BYTES``, not JSON, or off its schema (``"ms": []``,
``"size": 0``, ``"sparsity": "x"``, ``NaN``) is a ``CompressError`` naming the file and the
field, before any value is used.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from pathlib import Path
from typing import Any, Literal, NoReturn

from compress.deploy.files import read_bytes
from compress.errors import CompressError

# A table of a model with thousands of layers is a few hundred kB.
MAX_SIDECAR_BYTES = 4 * 2**20

Kind = Literal["latency", "runtime"]


@functools.cache
def sidecar_schema(kind: Kind) -> dict[str, Any]:
    text = resources.files("compress.deploy").joinpath(f"schema/{kind}.schema.json").read_text()
    return dict(json.loads(text))


def read_sidecar(path: Path, kind: Kind) -> dict[str, Any]:
    """The contents of ``path``, checked against ``schema/<kind>.schema.json`` (and, for a
    latency table, the groups its curves name and one time per width)."""
    data = read_bytes(path, MAX_SIDECAR_BYTES)
    try:
        d = json.loads(data, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        _refuse(path, f"not JSON ({type(e).__name__}: {e})")
    problem = sidecar_problem(d, kind)
    if problem is not None:
        _refuse(path, problem)
    return dict(d)


def sidecar_problem(data: Any, kind: Kind) -> str | None:
    """What is wrong with ``data`` as the contents of a ``kind`` side-car (None: nothing), for
    a file read back and for a latency table kept in a controller state alike."""
    from compress.recipe.config import _Validator
    from compress.recipe.messages import message

    try:  # only JSON data: a tensor, NaN or a nesting too deep for the validator is refused
        json.dumps(data, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as e:
        return f"not JSON data ({type(e).__name__}: {str(e)[:80]})"
    errors = sorted(
        _Validator(sidecar_schema(kind)).iter_errors(data),
        key=lambda e: (len(e.path), list(map(str, e.path))),
    )
    if errors:
        return message(errors[0], "").replace("(recipe)", "(top level)", 1)
    return _table_problem(data) if kind == "latency" else None


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a number a measurement can have")


def _refuse(path: Path, what: str) -> NoReturn:
    raise CompressError(f"{path}: {what}; delete it or export again") from None


def _table_problem(table: dict[str, Any]) -> str | None:
    cal: dict[str, Any] = table.get("calibration") or {}
    for key in ("table_ratio", "measured_ratio"):
        if cal and len(cal[key]) != len(cal["scales"]):
            return f"calibration.{key}: {len(cal[key])} values for the {len(cal['scales'])} scales"
    groups = table["groups"]
    for g, info in groups.items():
        widths = info["widths"]
        if any(b <= a for a, b in zip(widths, widths[1:])) or widths[-1] > info["size"]:
            return f"groups.{g}.widths: {widths} are not increasing up to the size {info['size']}"
    for name, entry in table["layers"].items():
        curves = [("out", entry["out"])] if entry["out"] else []
        curves += [(f"in[{i}]", c) for i, c in enumerate(entry["in"])]
        for where, curve in curves:
            info = groups.get(curve["group"])
            if info is None:
                return f"layers.{name}.{where}.group: {curve['group']!r} is not in groups"
            if len(curve["ms"]) != len(info["widths"]):
                return (
                    f"layers.{name}.{where}.ms: {len(curve['ms'])} times for the "
                    f"{len(info['widths'])} widths of group {curve['group']!r}"
                )
    return None
