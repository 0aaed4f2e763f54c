import os
from pathlib import Path

import pytest
import torch
from conftest import SmallCNN, lenet, magnitude
from torch import nn

import compress
from compress.deploy.files import atomic_write
from compress.errors import CompressError, ConfigError


def _stripped(level: float = 0.9) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    x = torch.randn(4, 64)
    net = nn.Sequential(
        nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )
    ctrl, net = compress.create_compressed_model(net, magnitude(sparsity_init=level), x)
    return ctrl.strip().eval(), net.eval(), x


def test_sparse_file_is_small_exact_and_weights_only(tmp_path: Path) -> None:
    plain, masked, x = _stripped(0.9)
    path = compress.export(plain, tmp_path / "m", ["sparse"])["sparse"]
    torch.save(plain.state_dict(), tmp_path / "dense.pt")
    assert path.stat().st_size <= 0.15 * (tmp_path / "dense.pt").stat().st_size
    torch.load(path, weights_only=True)
    fresh = nn.Sequential(
        nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )
    compress.load_sparse(path, fresh)
    for k, v in plain.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)
    assert torch.equal(fresh(x), masked(x))


def test_pt2_loads_without_the_library_and_matches(tmp_path: Path) -> None:
    x = torch.randn(2, 3, 8, 8)
    ctrl, net = compress.create_compressed_model(SmallCNN(), magnitude(sparsity_init=0.6), x)
    plain = ctrl.strip().eval()
    path = compress.export(plain, tmp_path / "cnn", ["pt2"], example_inputs=x)["pt2"]
    program = torch.export.load(str(path))
    assert torch.allclose(program.module()(x), net.eval()(x), atol=1e-6)


def test_onnx_runs_in_onnxruntime_and_matches(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    plain, masked, x = _stripped(0.8)
    path = compress.export(plain, tmp_path / "m", ["onnx"], example_inputs=x)["onnx"]
    sess = ort.InferenceSession(str(path))
    (out,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    assert torch.allclose(torch.from_numpy(out), masked(x), atol=1e-5)


def test_formats_needing_inputs_say_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"export formats \['pt2'\] need example_inputs"):
        compress.export(lenet(), tmp_path / "m", ["pt2"])
    with pytest.raises(ConfigError, match="'zip'.*not supported"):
        compress.export(lenet(), tmp_path / "m", ["zip"])


def test_load_sparse_of_another_model_names_the_file(tmp_path: Path) -> None:
    path = compress.export(lenet(), tmp_path / "m", ["sparse"])["sparse"]
    with pytest.raises(CompressError, match=f"{path}: the file is of a different model: 0.weight"):
        compress.load_sparse(path, lenet(inputs=32))
    with pytest.raises(CompressError, match="keys missing from the file"):
        compress.load_sparse(path, SmallCNN())


def test_not_a_sparse_file_and_truncated_file(tmp_path: Path) -> None:
    dense = tmp_path / "dense.pt"
    torch.save(lenet().state_dict(), dense)
    with pytest.raises(CompressError, match="not a sparse export of this library"):
        compress.load_sparse(dense, lenet())
    path = compress.export(lenet(), tmp_path / "m", ["sparse"])["sparse"]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CompressError, match=f"{path}: not a readable file of this library"):
        compress.load_sparse(path, lenet())


class _Boom:
    def __reduce__(self):  # noqa: D105
        return (os.system, ("touch /tmp/compress_pwned",))


def test_pickle_payload_is_refused_not_executed(tmp_path: Path) -> None:
    path = tmp_path / "evil.sparse.pt"
    torch.save({"format": "compress.sparse", "tensors": _Boom()}, path)
    if os.path.exists("/tmp/compress_pwned"):
        os.remove("/tmp/compress_pwned")
    with pytest.raises(CompressError, match="refused to load"):
        compress.load_sparse(path, lenet())
    assert not os.path.exists("/tmp/compress_pwned")


def test_atomic_write_keeps_the_previous_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"previous")

    def fail(tmp: str) -> None:
        Path(tmp).write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(CompressError, match=r"out.bin: the export failed \(.*disk full"):
        atomic_write(target, fail)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]
