"""Crafted files: no code runs from a .pt2, no allocation a file's header asks for without a
check, errors instead of tracebacks."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import ConvBNNet
from torch import nn

from compress import cli
from compress.deploy.export import export, load_sparse, save_sparse
from compress.errors import CompressError

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


class _Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def run_cli(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = cli.main(list(args))
    text = out.getvalue()
    assert "Traceback" not in text
    return code, text


def rewrite_zip(path: Path, change: dict[str, bytes | None]) -> None:
    """Rewrites the records whose name ends with a key of ``change`` (None: unchanged)."""
    with zipfile.ZipFile(path) as z:
        records = [(i.filename, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in records:
            for suffix, new in change.items():
                if name.endswith(suffix) and new is not None:
                    data = new
            z.writestr(name, data)


def record(path: Path, suffix: str) -> bytes:
    with zipfile.ZipFile(path) as z:
        return z.read(next(n for n in z.namelist() if n.endswith(suffix)))


def pt2_file(tmp_path: Path) -> Path:
    return export(ConvBNNet().eval(), tmp_path / "m", ["pt2"], example_inputs=X)["pt2"]


# --- 1. no code from a .pt2 --------------------------------------------------------------------


def test_our_pt2_holds_no_pickle_and_still_loads_with_torch(tmp_path: Path) -> None:
    net = ConvBNNet().eval()
    path = export(net, tmp_path / "m", ["pt2"], example_inputs=X)["pt2"]
    assert record(path, "data/sample_inputs/model.pt") == b""
    config = json.loads(record(path, "model_weights_config.json"))["config"]
    assert config and not any(meta["use_pickle"] for meta in config.values())
    with zipfile.ZipFile(path) as z:  # no record starts with a pickle protocol header
        assert not [n for n in z.namelist() if z.read(n)[:1] == b"\x80"]
    program = torch.export.load(str(path))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(X), net(X))


def test_inspect_of_a_pt2_with_pickled_sample_inputs_never_runs_them(tmp_path: Path) -> None:
    path, marker = pt2_file(tmp_path), tmp_path / "pwned"
    rewrite_zip(path, {"data/sample_inputs/model.pt": pickle.dumps(_Payload(marker))})
    code, text = run_cli("inspect", str(path))
    assert not marker.exists(), "the payload ran"
    assert code == 0 and "conv1.weight" in text and "MACs" in text


def test_inspect_refuses_a_pt2_weight_stored_as_a_pickle(tmp_path: Path) -> None:
    path, marker = pt2_file(tmp_path), tmp_path / "pwned"
    config = json.loads(record(path, "model_weights_config.json"))
    config["config"]["fc.weight"]["use_pickle"] = True
    name = config["config"]["fc.weight"]["path_name"]
    rewrite_zip(
        path,
        {
            "model_weights_config.json": json.dumps(config).encode(),
            f"data/weights/{name}": pickle.dumps(_Payload(marker)),
        },
    )
    code, text = run_cli("inspect", str(path))
    assert not marker.exists(), "the payload ran"
    assert code == 2 and re.search(r"'fc.weight' is stored as a pickle.*refused", text), text


def test_inspect_never_evaluates_the_shape_expressions_of_a_pt2(tmp_path: Path) -> None:
    """torch's deserializer hands ``expr_str`` to sympy.sympify, which is eval."""
    path, marker = pt2_file(tmp_path), tmp_path / "pwned"
    text = record(path, "models/model.json").decode()
    evil = f"__import__('os').system('touch {marker}')"
    text = re.sub(r"Symbol\('s\d+'[^)]*\)", lambda _: evil, text)
    assert evil in text
    rewrite_zip(path, {"models/model.json": text.encode()})
    code, out = run_cli("inspect", str(path))
    assert not marker.exists(), "the expression was evaluated"
    assert code == 0 and "MACs" in out
