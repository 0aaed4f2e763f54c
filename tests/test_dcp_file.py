"""A distributed checkpoint directory is read without unpickling code from its ``.metadata``."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from compress.deploy.dcp_file import read_state_dict
from compress.errors import CompressError


def _saved(path: Path) -> dict[str, torch.Tensor]:
    state = {"a": torch.randn(3, 2), "mask": torch.tensor([1, 0, 1], dtype=torch.uint8)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"state_dict": state}, checkpoint_id=path)
    return state


def test_the_tensors_of_a_distributed_checkpoint_are_read_whole(tmp_path: Path) -> None:
    state = _saved(tmp_path / "ckpt")
    got = read_state_dict(tmp_path / "ckpt")
    assert got.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(got[key], value) and got[key].dtype == value.dtype


class _Payload:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (Path(MARKER),))


MARKER = ""


def test_a_metadata_file_that_would_run_code_is_refused(tmp_path: Path) -> None:
    global MARKER
    _saved(tmp_path / "ckpt")
    MARKER = str(tmp_path / "ran")
    (tmp_path / "ckpt" / ".metadata").write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(CompressError, match=r"\.metadata: not a checkpoint's metadata .*touch"):
        read_state_dict(tmp_path / "ckpt")
    assert not (tmp_path / "ran").exists()
    (tmp_path / "ckpt" / ".metadata").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CompressError, match=r"holds dict, not Metadata"):
        read_state_dict(tmp_path / "ckpt")
