import json
import re
import subprocess
import sys
from pathlib import Path

import torch
from conftest import lenet, magnitude

import compress
from compress.cli import main

ROOT = Path(__file__).parent.parent


def test_validate_ok(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["validate", str(ROOT / "configs/magnitude_sparsity.json")]) == 0
    assert (
        "valid: magnitude_sparsity (polynomial: 0.1 -> 0.9 by epoch 20)" in capsys.readouterr().out
    )


def test_validate_error_exits_2_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "r.json"
    bad.write_text(
        json.dumps({"compression": {"algorithm": "magnitude_sparsity", "params": {"shedule": 1}}})
    )
    proc = subprocess.run(
        [sys.executable, "-m", "compress.cli", "validate", str(bad)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "unknown key 'shedule' (did you mean 'schedule'?)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_schedule_prints_levels_per_epoch(capsys) -> None:  # type: ignore[no-untyped-def]
    recipe = ROOT / "configs/resnet34_cifar10_magnitude_sparsity.json"
    assert main(["schedule", str(recipe), "--epochs", "52", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    levels = [r["magnitude_sparsity"] for r in rows]
    assert levels[9] == 0.1 and levels[10] == 0.3 and levels[40] == 0.7
    assert rows[50]["frozen"] == "yes" and "frozen" not in rows[49]


def test_inspect_sparse_export(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    ctrl, _ = compress.create_compressed_model(lenet(), magnitude(sparsity_init=0.75))
    path = compress.export(ctrl.strip(), tmp_path / "m", ["sparse"])["sparse"]
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "| 0.weight | 300x64  | 19,200 |" in out
    assert "0.7500" in out


def test_inspect_missing_and_foreign_files(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["inspect", str(tmp_path / "none.pt")]) == 2
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a zip")
    assert main(["inspect", str(junk)]) == 2
    assert "not a readable file of this library" in capsys.readouterr().err
    torch.save({"x": 1}, tmp_path / "obj.pt")
    assert main(["inspect", str(tmp_path / "obj.pt")]) == 2


def test_inspect_with_model_reports_effective_sparsity_and_macs(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    net = lenet()
    with torch.no_grad():
        net[2].weight[:, :150] = 0  # 150 hidden units reach nothing: their inputs are inactive
    path = compress.export(net, tmp_path / "m", ["sparse"], example_inputs=torch.zeros(1, 64))
    assert main(["inspect", str(path["sparse"]), "--model", "conftest:lenet"]) == 0
    out = capsys.readouterr().out
    direct, effective = 150 * 100 / 50200, (150 * 100 + 150 * 64) / 50200
    # params, NNCF's params (conv/linear weights), sparsities, MACs and FLOPs (2 x MACs)
    row = rf"\| 50,610 \| 50,200 +\| {direct:.4f} +\| {effective:.4f} +\| 50,200 \| 100,400 +\|"
    assert re.search(row, out), out


def test_inspect_pt2_counts_macs(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    path = compress.export(lenet(), tmp_path / "m", ["pt2"], example_inputs=torch.zeros(1, 64))
    assert main(["inspect", str(path["pt2"])]) == 0
    # The example batch of 1 is exported as 2 (a free batch dimension): 2 x 50,200 MACs.
    assert "| 100,400 |" in capsys.readouterr().out
