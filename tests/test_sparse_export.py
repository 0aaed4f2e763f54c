"""The sparse export feeds the sparse runtime: file -> runtime model, and the callback's
"sparse_runtime" format with its report."""

import functools
from pathlib import Path

import pytorch_lightning as pl
import torch
from conftest import LitClassifier, loader16, magnitude
from torch import nn

import compress
from callbacks import CompressionCallback
from compress.cli import main
from compress.deploy import sparse_runtime
from compress.deploy.sparse_layers import SparseLinear, SparseMatmul


def wide() -> nn.Module:
    return nn.Sequential(
        nn.Linear(16, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 2)
    )


def test_sparse_file_to_runtime_model(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # Planned times, not the clock: anything holding a sparse kernel is 4x faster.
    monkeypatch.setattr(
        sparse_runtime,
        "median_timer",
        lambda fn: 0.25 if any(isinstance(m, SparseMatmul) for m in fn.func.modules()) else 1.0,
    )
    x = torch.randn(4, 16)
    ctrl, net = compress.create_compressed_model(wide(), magnitude(sparsity_init=0.95), x)
    plain = ctrl.strip().eval()
    path = compress.export(plain, tmp_path / "m", ["sparse"], example_inputs=x)["sparse"]

    # min_speedup=0 converts every layer that the runtime supports, whatever the timing: here
    # a timer that calls anything sparse slower, the worst a loaded machine can report.
    def sparse_is_slower(fn: functools.partial) -> float:  # type: ignore[type-arg]
        return 2.0 if any(isinstance(m, SparseLinear) for m in fn.func.modules()) else 1.0

    fast = compress.load_sparse(path, wide(), runtime=True, min_speedup=0, timer=sparse_is_slower)
    assert any(isinstance(m, SparseLinear) for m in fast.modules())
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)
    assert {r.name for r in fast.runtime_report.layers} == {"0", "2", "4"}


def test_callback_sparse_runtime_export_and_inspect(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    cb = CompressionCallback(
        magnitude(sparsity_init=0.95),
        export_dir=tmp_path,
        export_formats=["sparse_runtime"],
        model_attr="model",
        verbose=False,
    )
    pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[cb],
    ).fit(LitClassifier(model=wide(), batch=8), loader16())
    path = cb.exported["sparse_runtime"]
    report = tmp_path / "model.runtime.json"
    assert path.name == "model.sparse.pt" and report.is_file()
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "sparse runtime (model.runtime.json):" in out
    for name in ("0", "2", "4"):
        assert f"| {name} | linear | " in out
    assert "of 3 candidate layers converted (min_speedup=1.1)" in out
