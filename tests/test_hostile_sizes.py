"""Crafted files that declare far more than they hold: a zero stride, a compressed or twice
listed record, JSON that parses into gigabytes, a device or FIFO instead of a file. Each is
refused fast with a message naming the file, never a traceback or a big allocation."""

from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ConvBNNet
from test_hostile_files import X, pt2_file, record, rewrite_zip, run_cli

from compress.deploy import pt2_file as pt2_module
from compress.deploy.export import export
from compress.deploy.files import check_tensor, safe_load
from compress.errors import CompressError

HUGE = torch.ones(1).expand(30000, 30000)  # 7.2 GB as a view of one float


def checkpoint(path: Path, **entry: Any) -> Path:
    net = ConvBNNet()
    recipe = {"compression": {"algorithm": "magnitude_sparsity"}}
    payload = {
        "state_dict": net.state_dict(),
        "callbacks": {"CompressionCallback": {"recipe": recipe, "controller": {}, **entry}},
    }
    torch.save(payload, path)
    return path


# --- tensors whose view is larger than their storage -------------------------------------------


def test_a_zero_stride_tensor_in_a_file_is_refused_before_it_is_copied(tmp_path: Path) -> None:
    plain = tmp_path / "plain.pt"
    torch.save({"w": HUGE}, plain)
    assert plain.stat().st_size < 3000
    code, text = run_cli("inspect", str(plain))
    assert code == 2 and "plain.pt: ['w']: a tensor of shape [30000, 30000]" in text
    assert "a zero stride" in text

    pruned = tmp_path / "m.pruned.pt"
    state = {**ConvBNNet().state_dict(), "conv1.weight": HUGE}
    torch.save({"format": "compress.pruned", "version": 1, "plan": {}, "state_dict": state}, pruned)
    code, text = run_cli("inspect", str(pruned))
    assert code == 2 and "['state_dict']['conv1.weight']" in text and "zero stride" in text

    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": {"fc.weight": HUGE}}, ckpt)
    code, text = run_cli("inspect", str(ckpt))
    assert code == 2 and "zero stride" in text
    # packed mask bits of a checkpoint entry: refused as the file is loaded, before expanding
    checkpoint(
        ckpt, controller={"state": {"bits": torch.zeros(1, dtype=torch.uint8).expand(10**8)}}
    )
    for args in (["inspect", str(ckpt)], ["export", str(ckpt), "--model", "conftest:ConvBNNet"]):
        code, text = run_cli(*args)
        assert code == 2 and "a tensor of shape [100000000]" in text, text


def test_overlapping_strides_larger_than_the_storage_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "overlap.pt"
    torch.save({"w": torch.ones(6000).as_strided([3000, 3000], [1, 1])}, path)
    with pytest.raises(CompressError, match=r"\(36000000 bytes\) views a storage of 24000 bytes"):
        safe_load(path)
    check_tensor(torch.ones(3, 1).expand(3, 1), "fine")  # a stride over a size of 1 is no repeat


def test_a_pt2_weight_with_zero_strides_is_refused(tmp_path: Path) -> None:
    path = pt2_file(tmp_path)
    config = json.loads(record(path, "model_weights_config.json"))
    meta = config["config"]["fc.weight"]["tensor_meta"]
    meta["sizes"] = [{"as_int": 30000}, {"as_int": 30000}]
    meta["strides"] = [{"as_int": 0}, {"as_int": 0}]
    rewrite_zip(path, {"model_weights_config.json": json.dumps(config).encode()})
    code, text = run_cli("inspect", str(path))
    assert code == 2 and "'fc.weight': a tensor of shape [30000, 30000]" in text
    assert "zero stride" in text


# --- zip records: compressed, listed twice, sizes that the file does not hold ------------------


def test_a_compressed_record_is_refused(tmp_path: Path) -> None:
    path = pt2_file(tmp_path)
    with zipfile.ZipFile(path) as z:
        records = [(i.filename, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in records:
            z.writestr(name, data)
    code, text = run_cli("inspect", str(path))
    assert code == 2 and "is compressed, which torch never writes" in text and "m.pt2" in text
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": ConvBNNet().state_dict()}, ckpt)
    with zipfile.ZipFile(ckpt) as z:
        records = [(i.filename, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(ckpt, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in records:
            z.writestr(name, data)
    with pytest.raises(CompressError, match=r"m.ckpt: record .* is compressed"):
        safe_load(ckpt)


def list_twice(path: Path, suffix: str, times: int) -> None:
    """Lists the central directory entry of the record ending with ``suffix`` ``times`` times."""
    data = path.read_bytes()
    eocd = data.rindex(b"PK\x05\x06")
    count, size, start = struct.unpack("<HII", data[eocd + 10 : eocd + 20])
    entries, pos = [], start
    for _ in range(count):
        n, m, k = struct.unpack("<HHH", data[pos + 28 : pos + 34])
        entries.append(data[pos : pos + 46 + n + m + k])
        pos += 46 + n + m + k
    one = next(e for e in entries if e[46 : 46 + struct.unpack("<H", e[28:30])[0]].endswith(suffix))
    directory = b"".join(entries) + one * (times - 1)
    tail = bytearray(data[eocd : eocd + 22])
    total = count + times - 1
    tail[8:20] = struct.pack("<HHII", total, total, len(directory), start)
    path.write_bytes(data[:start] + directory + bytes(tail))


def test_a_record_listed_many_times_is_refused(tmp_path: Path) -> None:
    path = pt2_file(tmp_path)
    list_twice(path, b"model_weights_config.json", 2000)
    code, text = run_cli("inspect", str(path))
    assert code == 2 and "overlaps the record before it (one record listed twice)" in text


def test_a_record_declaring_more_bytes_than_the_file_holds_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.ckpt"
    torch.save({"w": torch.ones(4)}, path)
    data = bytearray(path.read_bytes())
    eocd = data.rindex(b"PK\x05\x06")
    start = struct.unpack("<I", data[eocd + 16 : eocd + 20])[0]
    data[start + 20 : start + 28] = struct.pack("<II", 2**31, 2**31)  # first entry's sizes
    path.write_bytes(bytes(data))
    with pytest.raises(CompressError, match=r"m.ckpt: record .* declares 2147483648 bytes"):
        safe_load(path)


def test_json_of_a_pt2_that_would_parse_into_gigabytes_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pt2_module, "MAX_JSON_CONTAINERS", 1000)  # the same check, a small file
    for name in ("models/model.json", "model_weights_config.json"):
        path = export(ConvBNNet().eval(), tmp_path / name[:5], ["pt2"], example_inputs=X)["pt2"]
        rewrite_zip(path, {name: b"[" + b"{}," * 2000 + b"{}]"})
        code, text = run_cli("inspect", str(path))
        assert code == 2 and "holds 2002 JSON objects and lists, more than 1000" in text, text


# --- not regular files --------------------------------------------------------------------------


def test_devices_and_fifos_are_refused_without_reading(tmp_path: Path) -> None:
    code, text = run_cli("validate", "/dev/zero")
    assert code == 2 and "/dev/zero: not a regular file" in text
    fifo = tmp_path / "recipe.json"
    os.mkfifo(fifo)
    code, text = run_cli("validate", str(fifo))  # opening a FIFO would block
    assert code == 2 and "recipe.json: not a regular file" in text
    code, text = run_cli("inspect", str(fifo))
    assert code == 2 and "recipe.json: not a regular file" in text
    code, text = run_cli("inspect", "/dev/zero")
    assert code == 2 and "/dev/zero: not a regular file" in text


# --- checkpoint entries: inputs, prefix, keys, nesting (item 8) ---------------------------------


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ([[[30000, 30000], "float32"]], "hold 900000000 elements, more than 268435456"),
        ([[[1, 3], "load"]], "input dtype 'load' is not one of"),
        ([[[-1, 3], "float32"]], r"input shape \[-1, 3\] is not a list of sizes"),
        ([[[1, 3.5], "float32"]], r"input shape \[1, 3.5\] is not a list of sizes"),
        ("abc", "'abc'|abc is not a list of \\[shape, dtype\\] pairs"),
        ([[["1"], "float32"]], r"input shape \['1'\] is not a list of sizes"),
    ],
)
def test_checkpoint_entry_inputs_are_checked_before_anything_is_made(
    tmp_path: Path, inputs: Any, message: str
) -> None:
    ckpt = checkpoint(tmp_path / "m.ckpt", inputs=inputs)
    code, text = run_cli("export", str(ckpt), "--model", "conftest:ConvBNNet")
    assert code == 2 and "m.ckpt: the entry's inputs" in text, text
    assert __import__("re").search(message, text), text


@pytest.mark.parametrize("prefix", ["nosuch.", 5, "model"])
def test_a_wrong_checkpoint_prefix_is_an_error(tmp_path: Path, prefix: Any) -> None:
    ckpt = checkpoint(tmp_path / "m.ckpt", prefix=prefix, inputs=[[[1, 3, 8, 8], "float32"]])
    code, text = run_cli("export", str(ckpt), "--model", "conftest:ConvBNNet")
    assert code == 2 and "m.ckpt: the entry's prefix" in text, text


def test_an_int_key_in_a_state_dict_is_an_error(tmp_path: Path) -> None:
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": {**ConvBNNet().state_dict(), 5: torch.ones(1)}}, ckpt)
    code, text = run_cli("inspect", str(ckpt))
    assert code == 2 and "has a key 5 that is not a string" in text
    checkpoint(ckpt)
    payload = torch.load(ckpt, weights_only=True)
    payload["state_dict"][5] = torch.ones(1)
    torch.save(payload, ckpt)
    code, text = run_cli("export", str(ckpt), "--model", "conftest:ConvBNNet")
    assert code == 2 and "has a key 5 that is not a string" in text


@pytest.mark.parametrize("where", ["controller", "recipe"])
def test_a_deeply_nested_entry_is_an_error(tmp_path: Path, where: str) -> None:
    ckpt = checkpoint(tmp_path / "m.ckpt", **{where: "DEEPMARKER"})
    # pickle cannot write it (it recurses): a list in a list 100,000 deep, written as opcodes
    deep = b"]" * 100_000 + b"a" * 99_999  # EMPTY_LIST ... APPEND ...
    pkl = record(ckpt, "data.pkl")
    marker = b"X" + struct.pack("<I", 10) + b"DEEPMARKER"
    assert pkl.count(marker) == 1
    rewrite_zip(ckpt, {"data.pkl": pkl.replace(marker, deep)})
    for args in (["inspect", str(ckpt)], ["export", str(ckpt), "--model", "conftest:ConvBNNet"]):
        code, text = run_cli(*args)
        assert code == 2 and "nests more than 100 deep" in text, text


def test_keys_write_readme_into_a_missing_directory_or_onto_a_directory(tmp_path: Path) -> None:
    code, text = run_cli("keys", "--write-readme", str(tmp_path / "no" / "README.md"))
    assert code == 2 and "README.md: cannot read the README (No such file" in text
    code, text = run_cli("keys", "--write-readme", str(tmp_path))
    assert code == 2 and "cannot read the README (Is a directory" in text


def test_a_model_factory_that_builds_no_module_is_an_error(tmp_path: Path) -> None:
    ckpt = checkpoint(tmp_path / "m.ckpt")
    code, text = run_cli("export", str(ckpt), "--model", "builtins:dict")
    assert code == 2 and "the factory returned a dict, not a torch.nn.Module" in text


def test_an_integer_key_refuses_a_float() -> None:
    from compress.errors import ConfigError
    from compress.recipe.config import load_config

    recipe = {"compression": {"algorithm": "filter_pruning", "params": {"round_to": 3.0}}}
    with pytest.raises(ConfigError, match=r"params.round_to: 3.0 is not of type integer"):
        load_config(recipe)
