"""Crafted ``.latency.json`` and ``.runtime.json`` files beside exports: each is a CompressError
naming the file and the field, never a raw IndexError, ZeroDivisionError, ValueError or
TypeError, and a 10 MB file is refused before it is parsed."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
from test_hostile_files import run_cli, sparse_file

from compress.deploy.runtime_report import report_from_dict
from compress.deploy.sidecars import MAX_SIDECAR_BYTES, read_sidecar
from compress.errors import CompressError
from compress.pruning.latency_widths import text

TABLE: dict[str, Any] = {
    "backend": "torch",
    "batch_size": 1,
    "model_ms": 3.0,
    "rest_ms": 1.0,
    "volume_total": 96,
    "groups": {"0": {"size": 4, "widths": [2, 4], "volume": 32}},
    "layers": {
        "0": {"ms": 1.0, "out": {"group": "0", "ms": [0.6, 1.0]}, "in": []},
        "2": {"ms": 1.0, "out": None, "in": [{"group": "0", "ms": [0.5, 1.0]}]},
    },
    "chosen": {"0": 2},
}


def write(tmp_path: Path, name: str, content: Any) -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def changed(path: str, value: Any) -> dict[str, Any]:
    table = copy.deepcopy(TABLE)
    *parents, last = path.split(".")
    node = table
    for key in parents:
        node = node[key]
    node[last] = value
    return table


def test_a_valid_table_reads_back(tmp_path: Path) -> None:
    table = read_sidecar(write(tmp_path, "m.latency.json", TABLE), "latency")
    assert text(table).startswith("latency table (torch, batch 1): model 3.000 ms measured")


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("layers.0.out.ms", [], r"layers\.0\.out\.ms: \[\]: \[\] should be non-empty"),
        ("groups.0.widths", [], r"groups\.0\.widths: \[\]: \[\] should be non-empty"),
        ("groups.0.size", 0, r"groups\.0\.size: 0 must be >= 1"),
        ("model_ms", "1", r"model_ms: \"1\" is not of type number"),
        ("groups.0.widths", [4, 2], r"groups\.0\.widths: \[4, 2\] are not increasing up to"),
        ("groups.0.widths", [2, 2], r"groups\.0\.widths: \[2, 2\] are not increasing"),
        ("layers.0.out.ms", [1.0], r"layers\.0\.out\.ms: 1 times for the 2 widths of group"),
        ("layers.2.in", [{"group": "9", "ms": [1]}], r"layers\.2\.in\[0\]\.group: '9' is not"),
    ],
)
def test_a_crafted_latency_table_names_the_file_and_field(
    path: str, value: Any, message: str, tmp_path: Path
) -> None:
    """Before: 'ms': [] and 'widths': [] were IndexError, 'size': 0 ZeroDivisionError."""
    file = write(tmp_path, "m.latency.json", changed(path, value))
    with pytest.raises(CompressError, match=rf"m\.latency\.json: {message}.*export again"):
        read_sidecar(file, "latency")


def test_nan_and_a_10_mb_table_are_refused_before_use(tmp_path: Path) -> None:
    file = write(tmp_path, "m.latency.json", json.dumps(TABLE).replace("3.0", "NaN", 1))
    with pytest.raises(CompressError, match=r"not JSON \(ValueError: NaN is not a number"):
        read_sidecar(file, "latency")
    big = changed("groups", {f"g{i}": {"size": 4, "widths": [2, 4]} for i in range(400_000)})
    file = write(tmp_path, "m.latency.json", big)
    assert file.stat().st_size > 10 * 2**20
    with pytest.raises(CompressError, match=rf"bytes, more than the {MAX_SIDECAR_BYTES} read"):
        read_sidecar(file, "latency")


REPORT: dict[str, Any] = {
    "min_speedup": 1.1,
    "sparse_threads": 0,
    "layers": [
        {
            "name": "fc",
            "kind": "linear",
            "shape": [4, 8],
            "sparsity": 0.9,
            "dense_ms": 1.0,
            "sparse_ms": 0.5,
            "speedup": 2.0,
            "converted": True,
            "layout": "csr",
            "reason": "",
        }
    ],
}


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("sparsity", "x", r"layers\[0\]\.sparsity: \"x\" is not of type number"),
        ("min_speedup", "abc", r"min_speedup: \"abc\" is not of type number"),
        ("dense_ms", "1", r"layers\[0\]\.dense_ms: \"1\" is not of type"),
        ("sparse_threads", "x", r"sparse_threads: \"x\" is not of type integer"),
        ("shape", [4, -1], r"layers\[0\]\.shape\[1\]: -1 must be >= 0"),
    ],
)
def test_a_crafted_runtime_report_names_the_file_and_field(
    key: str, value: Any, message: str, tmp_path: Path
) -> None:
    """Before: each was a raw ValueError or TypeError from ``compress inspect``."""
    report = copy.deepcopy(REPORT)
    (report if key in report else report["layers"][0])[key] = value
    path = sparse_file(tmp_path)
    write(tmp_path, "m.runtime.json", report)
    code, out = run_cli("inspect", str(path))
    assert code == 2
    assert re.search(rf"m\.runtime\.json: {message}.*export again", out), out


def test_a_valid_runtime_report_is_shown(tmp_path: Path) -> None:
    path = sparse_file(tmp_path)
    write(tmp_path, "m.runtime.json", REPORT)
    assert report_from_dict(read_sidecar(tmp_path / "m.runtime.json", "runtime")).converted == [
        "fc"
    ]
    code, out = run_cli("inspect", str(path))
    assert code == 0 and "1 of 1 candidate layers converted (min_speedup=1.1)" in out
