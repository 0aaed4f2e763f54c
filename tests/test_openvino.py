"""The OpenVINO export: IR files that OpenVINO runs to the stripped model's outputs (a CNN, a
filter-pruned ResNet-style model, BERT and ViT), checked before they are written and written as
a pair; read back by ``compress inspect`` without OpenVINO, refusing crafted files."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import LitClassifier, SmallCNN, fit_quietly, lenet, loader16, magnitude, quiet_trainer
from hf_zoo import ZOO, logits
from pytorch_lightning.callbacks import ModelCheckpoint
from test_structured import _make
from torch import nn

import compress
from callbacks import CompressionCallback
from compress.analysis.summary import layer_macs
from compress.cli import main
from compress.deploy.openvino_file import read_openvino
from compress.errors import CompressError, ConfigError

ov = pytest.importorskip("openvino")
pytestmark = pytest.mark.usefixtures("one_thread")


def run_ir(path: Path, *inputs: torch.Tensor) -> torch.Tensor:
    """The IR's first output on ``inputs``, computed by OpenVINO in float32."""
    compiled = ov.Core().compile_model(
        str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 1}
    )
    return torch.from_numpy(compiled([t.numpy() for t in inputs])[0])


def rel_error(want: torch.Tensor, got: torch.Tensor) -> float:
    return float((want - got).abs().max() / want.abs().max())


def weights(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def stripped(model: nn.Module, recipe: dict[str, Any], x: torch.Tensor) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctrl, _ = compress.create_compressed_model(model, recipe, x)
        ctrl.scheduler.epoch_step()  # epoch 0: a baseline schedule is at its target from here
    return ctrl.strip().eval()


def test_sparse_cnn_runs_in_openvino_at_any_batch_and_inspects_alike(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    x = torch.randn(2, 3, 8, 8)
    plain = stripped(SmallCNN(), magnitude(sparsity_init=0.6), x)
    paths = compress.export(plain, tmp_path / "cnn", ["openvino"], example_inputs=x)
    assert paths["openvino"] == tmp_path / "cnn.xml" and (tmp_path / "cnn.bin").is_file()
    with torch.no_grad():
        for batch in (1, 2, 5):  # the batch dimension is free
            xb = torch.randn(batch, 3, 8, 8)
            assert rel_error(plain(xb), run_ir(paths["openvino"], xb)) <= 1e-5
    # inspect: the IR's weights are the model's (BatchNorm folded keeps their zeros), its MACs
    # per sample the model's at batch 1
    ir = read_openvino(paths["openvino"])
    own = [m.weight for m in plain.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert sorted(tuple(ir.constants[k].shape) for k in ir.weights) == sorted(
        tuple(w.shape) for w in own
    )
    zeros = sum(int((w == 0).sum()) for w in own)
    assert sum(int((ir.constants[k] == 0).sum()) for k in ir.weights) == zeros
    assert ir.macs == layer_macs(plain, (x[:1],))[""]
    assert main(["inspect", str(paths["openvino"])]) == 0
    out = capsys.readouterr().out
    assert f"| {zeros / sum(w.numel() for w in own):.4f} " in out
    assert f"| {ir.macs:,} " in out and "MACs per sample" in out


def test_filter_pruned_resnet_is_exported_shrunk(tmp_path: Path) -> None:
    model, x = _make("resnet")
    recipe = {
        "compression": {
            "algorithm": "filter_pruning",
            "params": {
                "pruning_target": 0.5,
                "schedule": "baseline",
                "round_to": 1,
                "prune_first_conv": True,
                "prune_downsample_convs": True,
            },
        }
    }
    plain = stripped(model, recipe, x)
    paths = compress.export(plain, tmp_path / "m", ["pruned", "openvino"], example_inputs=x)
    with torch.no_grad():
        assert rel_error(plain(x), run_ir(paths["openvino"], x)) <= 1e-5
    ir = read_openvino(paths["openvino"])
    shrunk, dense = weights(plain), weights(_make("resnet")[0])
    assert sum(ir.constants[k].numel() for k in ir.weights) == shrunk < 0.5 * dense
    assert ir.macs == layer_macs(plain, (x[:1],))[""]


@pytest.mark.parametrize("name", ["bert", "vit"])
def test_hugging_face_model_runs_in_openvino(name: str, tmp_path: Path) -> None:
    zoo = ZOO[name]
    torch.manual_seed(0)
    inputs = zoo.inputs()
    plain = stripped(zoo.build(), magnitude(sparsity_init=0.5), inputs[0])
    path = compress.export(plain, tmp_path / name, ["openvino"], example_inputs=inputs)["openvino"]
    with torch.no_grad():
        want = logits(plain(*inputs))
    assert rel_error(want, run_ir(path, *inputs)) <= 1e-5
    assert read_openvino(path).macs


class ExportsOtherwise(nn.Module):
    """Computes something else when exported: a conversion that changes the result."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return y * 1.001 if torch.compiler.is_exporting() else y


def test_an_ir_that_computes_otherwise_is_not_written(tmp_path: Path) -> None:
    x = torch.randn(2, 4)
    with pytest.raises(CompressError, match=r"m.xml: output 0 of the converted model differs"):
        compress.export(ExportsOtherwise(), tmp_path / "m", ["openvino"], example_inputs=x)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_second_rename_puts_the_previous_pair_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = torch.randn(2, 64)
    compress.export(lenet(), tmp_path / "m", ["openvino"], example_inputs=x)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(before) == ["m.bin", "m.xml"]
    replace, calls = os.replace, []

    def second_fails(src: str, dst: str) -> None:
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("simulated crash between the renames")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", second_fails)
    with pytest.raises(CompressError, match="simulated crash between the renames"):
        compress.export(lenet(), tmp_path / "m", ["openvino"], example_inputs=x)
    assert [Path(c).name for c in calls] == ["m.xml", "m.bin"]  # the .xml had been replaced
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_without_openvino_the_format_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError
    with pytest.raises(ConfigError, match=r"pip install lightning-compress\[openvino\]"):
        compress.export(lenet(), tmp_path / "m", ["sparse", "openvino"], torch.zeros(1, 64))
    assert list(tmp_path.iterdir()) == []  # refused before the sparse file was written
    with pytest.raises(ConfigError, match=r"lightning-compress\[openvino\]"):  # before fit
        CompressionCallback(magnitude(), export_dir=tmp_path, export_formats=["openvino"])


def test_compress_export_writes_openvino_from_a_checkpoint(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    last = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last")
    cb = CompressionCallback(magnitude(sparsity_init=0.5), model_attr="model", verbose=False)
    fit_quietly(
        quiet_trainer(tmp_path, cb, last, epochs=1, logger=False), LitClassifier(), loader16()
    )
    (tmp_path / "nets.py").write_text(
        "from conftest import lenet\ndef net():\n    return lenet(16)\n"
    )
    monkeypatch.chdir(tmp_path)
    ckpt, out = tmp_path / "ckpt" / "last.ckpt", tmp_path / "exports" / "m"
    args = ["export", str(ckpt), "--model", "nets:net", "--formats", "openvino", "--out", str(out)]
    assert main(args) == 0
    reloaded = LitClassifier.load_from_checkpoint(ckpt).eval()
    x = torch.randn(5, 16)
    with torch.no_grad():
        assert rel_error(reloaded(x), run_ir(Path(f"{out}.xml"), x)) <= 1e-5
    weights = [reloaded.model[i].weight for i in (0, 2, 4)]
    ir = read_openvino(f"{out}.xml")
    assert (
        sum(int((ir.constants[k] == 0).sum()) for k in ir.weights)
        == sum(int((w == 0).sum()) for w in weights)
        > 0
    )


# --- crafted files -------------------------------------------------------------------------


@pytest.fixture
def ir(tmp_path: Path) -> Path:
    return compress.export(lenet(), tmp_path / "m", ["openvino"], torch.zeros(1, 64))["openvino"]


def test_inspect_refuses_entities_without_expanding_them(ir: Path) -> None:
    laughs = '<!DOCTYPE net [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]>'
    text = ir.read_text()
    ir.write_text(text.replace('<?xml version="1.0"?>', '<?xml version="1.0"?>' + laughs, 1))
    with pytest.raises(CompressError, match="m.xml: the XML declares a document type"):
        read_openvino(ir)
    # the same in UTF-16, where the bytes "<!DOCTYPE" do not occur
    utf16 = ir.read_text().replace(
        '<?xml version="1.0"?>', '<?xml version="1.0" encoding="UTF-16"?>'
    )
    ir.write_bytes(utf16.encode("utf-16"))
    with pytest.raises(CompressError, match="m.xml: the XML declares a document type"):
        read_openvino(ir)


def test_inspect_refuses_a_constant_beyond_the_bin(ir: Path) -> None:
    ir.with_suffix(".bin").write_bytes(ir.with_suffix(".bin").read_bytes()[:1000])
    with pytest.raises(CompressError, match=r"declares bytes \d+ to \d+, but the .bin holds 1000"):
        read_openvino(ir)
    assert main(["inspect", str(ir)]) == 2


def test_inspect_refuses_a_shape_larger_than_its_bytes(ir: Path) -> None:
    text = ir.read_text()
    ir.write_text(text.replace('shape="300, 64"', 'shape="300000, 64000"', 1))
    with pytest.raises(CompressError, match=r"declares shape \[300000, 64000\] of f32 in 76800"):
        read_openvino(ir)


def test_inspect_of_a_lone_xml_or_not_an_ir(ir: Path) -> None:
    ir.with_suffix(".bin").unlink()
    with pytest.raises(CompressError, match=r"m.bin: no such file"):
        read_openvino(ir)
    ir.with_suffix(".bin").write_bytes(b"")
    ir.write_text("<html><body/></html>")
    with pytest.raises(CompressError, match="not an OpenVINO IR"):
        read_openvino(ir)
    ir.write_text("<net><layers>")
    with pytest.raises(CompressError, match="not valid XML"):
        read_openvino(ir)
