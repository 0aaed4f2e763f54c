"""Crafted files: no code runs from a .pt2, no allocation a file's header asks for without a
check, errors instead of tracebacks."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import pickle
import re
import stat
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ConvBNNet

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


# --- 2. no memory bombs ------------------------------------------------------------------------


def sparse_file(tmp_path: Path) -> Path:
    net = ConvBNNet()
    with torch.no_grad():
        net.conv2.weight[:, :6] = 0  # sparse enough to be stored as values + bitmask
    return save_sparse(net, tmp_path / "m.sparse.pt", [X])


def rewrite_payload(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    payload = torch.load(path, weights_only=True)
    change(payload)
    torch.save(payload, path)


@pytest.mark.parametrize("shape", [[30000, 30000], [10**6, 10**6]])
def test_a_sparse_header_claiming_a_huge_weight_is_refused_before_allocating(
    tmp_path: Path, shape: list[int]
) -> None:
    path = sparse_file(tmp_path)

    def huge(payload: dict[str, Any]) -> None:
        assert "bitmask" in payload["tensors"]["conv2.weight"]
        payload["tensors"]["conv2.weight"]["shape"] = shape

    rewrite_payload(path, huge)
    assert path.stat().st_size < 20_000
    # against the model: refused on the declared shape, before the tensor is rebuilt
    with pytest.raises(CompressError, match=rf"conv2.weight has shape \({shape[0]}, {shape[1]}\)"):
        load_sparse(path, ConvBNNet())
    # without a model (inspect): refused on the file's own byte count
    code, text = run_cli("inspect", str(path))
    assert code == 2 and re.search(r"needs a bitmask of \d+ bytes; the file holds 144", text), text


@pytest.mark.parametrize("kind", ["sparse", "pruned"])
def test_stored_input_shapes_of_any_size_are_refused(tmp_path: Path, kind: str) -> None:
    from compress.deploy.pruned_file import load_pruned

    path = sparse_file(tmp_path)
    if kind == "pruned":
        path = tmp_path / "m.pruned.pt"
        net = ConvBNNet()
        torch.save(
            {
                "format": "compress.pruned",
                "version": 1,
                "plan": {},
                "input_shapes": [[10**5, 3, 1000, 1000]],
                "input_dtypes": ["float32"],
                "state_dict": net.state_dict(),
            },
            path,
        )
    else:
        rewrite_payload(path, lambda p: p.update(input_shapes=[[10**5, 3, 1000, 1000]]))
    with pytest.raises(CompressError, match=r"hold 300000000000 elements, more than 268435456"):
        if kind == "pruned":
            load_pruned(ConvBNNet(), path)
        else:
            load_sparse(path, ConvBNNet(), runtime=True)


def test_a_pt2_weight_larger_than_its_record_is_refused(tmp_path: Path) -> None:
    path = pt2_file(tmp_path)
    config = json.loads(record(path, "model_weights_config.json"))
    meta = config["config"]["fc.weight"]["tensor_meta"]
    meta["sizes"] = [{"as_int": 100000}, {"as_int": 100000}]
    rewrite_zip(path, {"model_weights_config.json": json.dumps(config).encode()})
    code, text = run_cli("inspect", str(path))
    assert code == 2 and "declares shape [100000, 100000]" in text and "holds 128 bytes" in text


# --- 8. errors, not tracebacks, from damaged files ----------------------------------------------


def test_damaged_sections_of_files_give_errors_naming_the_file(tmp_path: Path) -> None:
    from compress.deploy.pruned_file import load_pruned

    ckpt = tmp_path / "list.ckpt"
    torch.save({"state_dict": ConvBNNet().state_dict(), "callbacks": [1, 2]}, ckpt)
    code, text = run_cli("inspect", str(ckpt))
    assert code == 0 and "conv1.weight" in text  # no masks to apply; the weights are shown
    code, text = run_cli("export", str(ckpt), "--model", "conftest:ConvBNNet")
    assert code == 2 and "not a checkpoint written with CompressionCallback" in text
    entry = {"CompressionCallback": {"recipe": {}, "controller": {}}}
    torch.save({"callbacks": entry}, ckpt)
    code, text = run_cli("export", str(ckpt), "--model", "conftest:ConvBNNet")
    assert code == 2 and "list.ckpt: the checkpoint has no 'state_dict' of weights" in text

    no_state = tmp_path / "no_state.pruned.pt"
    torch.save({"format": "compress.pruned", "version": 1, "plan": {}}, no_state)
    code, text = run_cli("inspect", str(no_state))
    assert code == 2 and "no 'state_dict' of tensors" in text and str(no_state) in text
    for plan in (None, {"conv1": "0-3"}, [1, 2]):
        bad = tmp_path / "bad.pruned.pt"
        payload = {"format": "compress.pruned", "version": 1, "state_dict": {}}
        if plan is not None:
            payload["plan"] = plan
        torch.save(payload, bad)
        with pytest.raises(
            CompressError, match=r"bad.pruned.pt: the pruned file has no valid 'plan'"
        ):
            load_pruned(ConvBNNet(), bad)

    path = sparse_file(tmp_path)
    report = tmp_path / "m.runtime.json"
    report.write_text('{"min_speedup": 1.1, "layers": [{"na')
    code, text = run_cli("inspect", str(path))
    assert code == 2 and "m.runtime.json: not JSON (JSONDecodeError" in text

    rewrite_payload(path, lambda p: p["tensors"].update({"conv1.weight": {"dense": 5}}))
    with pytest.raises(CompressError, match=r"sparse file is damaged \('dense' holds a int"):
        load_sparse(path, ConvBNNet())


# --- 6. full disk, unwritable places, killed writers; 12. file mode -----------------------------


@pytest.mark.parametrize("fmt", ["sparse", "pt2"])
def test_a_full_disk_is_an_error_naming_the_path_and_the_cause(
    fmt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    net = ConvBNNet().eval()
    paths = export(net, tmp_path / "m", [fmt], example_inputs=X)
    before = paths[fmt].read_bytes()

    def full_disk(self: Path, data: bytes) -> int:
        with open(self, "wb") as f:
            f.write(bytes(data)[:100])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(
        CompressError,
        match=r"m\.(sparse\.pt|pt2): the export failed \(No space left on device, errno ENOSPC\); "
        "a previous file is intact",
    ):
        export(net, tmp_path / "m", [fmt], example_inputs=X)
    monkeypatch.undo()
    assert paths[fmt].read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [paths[fmt].name]


def test_unwritable_places_are_errors_naming_the_path(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(
        CompressError,
        match=r"file/m.sparse.pt: cannot write here \(.*/file is a file, not a directory",
    ):
        export(ConvBNNet(), tmp_path / "file" / "m", ["sparse"])
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        with pytest.raises(
            CompressError, match=r"ro/m.sparse.pt: cannot write here \(Permission denied"
        ):
            export(ConvBNNet(), ro / "m", ["sparse"])


def test_temporary_files_of_killed_writers_are_cleaned_by_the_next_export(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [tmp_path / f".m.sparse.{dead.pid}.abc{i}.tmp.pt" for i in range(3)]
    for p in stale:
        p.write_bytes(b"x" * 1000)
    live = tmp_path / f".m.sparse.{os.getpid()}.zzz.tmp.pt"  # a writer still running
    live.write_bytes(b"x")
    other = tmp_path / f".n.{dead.pid}.abc.tmp.pt"  # another target's
    other.write_bytes(b"x")
    export(ConvBNNet(), tmp_path / "m", ["sparse"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [live.name, other.name, "m.sparse.pt"]
    )


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_exports_get_the_users_usual_file_mode(umask: int, tmp_path: Path) -> None:
    old = os.umask(umask)
    try:
        paths = export(ConvBNNet().eval(), tmp_path / "m", ["sparse", "pt2"], example_inputs=X)
        torch.save({}, tmp_path / "reference.pt")
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "reference.pt").stat().st_mode) == expected
    for path in paths.values():
        assert stat.S_IMODE(path.stat().st_mode) == expected, path
