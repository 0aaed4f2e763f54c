"""Hugging Face models the zoo run broke on: Whisper's ``None`` among the example inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hf_zoo import logits, whisper, whisper_inputs

import compress
from compress.pruning.latency import _batched

pytest.importorskip("transformers")


def _logits(model: torch.nn.Module, x: tuple) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return logits(model(*x))


@pytest.mark.parametrize(
    "algo",
    [
        {"algorithm": "magnitude_sparsity", "sparsity_init": 0.5},
        {"algorithm": "filter_pruning", "pruning_init": 0.5},
    ],
    ids=lambda a: a["algorithm"],
)
def test_whisper_with_a_none_input_strips_and_exports(algo: dict[str, Any], tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = whisper_inputs()
    assert x[1] is None  # attention_mask, passed positionally
    model = whisper()
    params = sum(p.numel() for p in model.parameters())
    ctrl, model = compress.create_compressed_model(model, {"compression": algo}, x)
    want = _logits(model, x)
    small = ctrl.strip()  # was: 'NoneType' object has no attribute 'to'
    torch.testing.assert_close(_logits(small, x), want, rtol=1e-5, atol=1e-5)
    if algo["algorithm"] == "filter_pruning":
        assert sum(p.numel() for p in small.parameters()) < params
    # was: 'NoneType' object has no attribute 'dim'
    paths = compress.export(small, tmp_path / "m", ["pt2"], example_inputs=x)
    program = torch.export.load(paths["pt2"]).module()
    torch.testing.assert_close(logits(program(*x)), want, rtol=1e-4, atol=1e-4)


def test_latency_batches_leave_a_none_input_alone() -> None:
    got = _batched(None, 4)
    assert got is None
    assert _batched(torch.zeros(2, 3), 4).shape == (4, 3)
