"""Hugging Face models from small configs under every sparsity algorithm and filter pruning:
build, a few steps, statistics, strip equals the masked model, pt2 export, save_pretrained."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hf_zoo import ZOO, logits

import compress

pytest.importorskip("transformers")

SPARSITY: list[dict[str, Any]] = [
    {"algorithm": "magnitude_sparsity", "sparsity_init": 0.5},
    {"algorithm": "rb_sparsity", "sparsity_init": 0.5},
    {"algorithm": "const_sparsity"},
]


def _train(ctrl: compress.CompressionController, model: torch.nn.Module, x: tuple) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(2):
        loss = logits(model(*x)).pow(2).mean() + ctrl.loss()
        loss.backward()
        opt.step()
        opt.zero_grad()
        ctrl.scheduler.step()


def _outputs(model: torch.nn.Module, x: tuple) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return logits(model(*x))


@pytest.mark.parametrize("algo", SPARSITY, ids=lambda a: a["algorithm"])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_sparsity_on_hf_models(name: str, algo: dict[str, Any]) -> None:
    torch.manual_seed(0)
    zoo = ZOO[name]
    model, x = zoo.build(), zoo.inputs()
    # The output layer of the language models is tied to the embedding: out of scope here.
    recipe = {**algo, "ignored_scopes": ["lm_head"]} if name in ("gpt2", "llama") else algo
    ctrl, model = compress.create_compressed_model(model, {"compression": recipe}, x)
    _train(ctrl, model, x)
    stats = ctrl.statistics().to_dict()["model"]
    layers = ctrl.algorithms[0].statistics()["layers"]
    if name == "gpt2":  # transformers' Conv1D blocks are compressed, not only Linear layers
        assert any(row["layer"].endswith("attn.c_attn") for row in layers)
    if algo["algorithm"] == "magnitude_sparsity":
        assert stats["sparsity of compressed layers"] == pytest.approx(0.5, abs=0.01)
    want = _outputs(model, x)
    plain = ctrl.strip()
    torch.testing.assert_close(_outputs(plain, x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ZOO))
def test_stripped_hf_models_export_and_round_trip(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    zoo = ZOO[name]
    model, x = zoo.build(), zoo.inputs()
    recipe = (
        {**SPARSITY[0], "ignored_scopes": ["lm_head"]} if name in ("gpt2", "llama") else SPARSITY[0]
    )
    ctrl, model = compress.create_compressed_model(model, {"compression": recipe}, x)
    _train(ctrl, model, x)
    want = _outputs(model, x)
    plain = ctrl.strip()
    plain.save_pretrained(tmp_path / "hf")
    again = type(plain).from_pretrained(tmp_path / "hf")
    torch.testing.assert_close(_outputs(again, x), want, rtol=1e-5, atol=1e-5)
    paths = compress.export(plain, tmp_path / "m", ["pt2"], example_inputs=x)
    program = torch.export.load(paths["pt2"]).module()
    torch.testing.assert_close(logits(program(*x)), want, rtol=1e-4, atol=1e-4)
