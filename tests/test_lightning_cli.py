"""One ``CompressionCallback`` for ``pytorch_lightning`` and ``lightning``: a ``lightning``
Trainer fit, and a ``LightningCLI`` of each namespace with the callback in its YAML."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import lenet, loader16
from torch import nn

from callbacks import CompressionCallback

L = pytest.importorskip("lightning")
pytest.importorskip("jsonargparse")
pytest.importorskip("docstring_parser")  # jsonargparse[signatures], which LightningCLI needs

RECIPE = {
    "compression": {
        "algorithm": "magnitude_sparsity",
        "sparsity_init": 0.5,
        "params": {"sparsity_target": 0.5, "sparsity_target_epoch": 1},
    }
}


def _step(module: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(module(x), y)


class _Net:
    """The module's body; PLNet and LNet put it on each namespace's LightningModule."""

    def __init__(self) -> None:
        super().__init__()
        self.model = lenet(16)
        self.example_input_array = torch.zeros(1, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        return _step(self, batch)  # type: ignore[arg-type]

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.SGD(self.parameters(), lr=0.05)  # type: ignore[attr-defined]

    def train_dataloader(self):  # type: ignore[no-untyped-def]
        return loader16()


class PLNet(_Net, pl.LightningModule):
    pass


class LNet(_Net, L.LightningModule):
    """The same module, written against ``import lightning as L``."""


def test_the_callback_is_a_callback_of_both_namespaces() -> None:
    assert issubclass(CompressionCallback, pl.Callback)
    assert issubclass(CompressionCallback, L.pytorch.Callback)


def test_fit_with_a_lightning_trainer(tmp_path: Path) -> None:
    cb = CompressionCallback(RECIPE, model_attr="model", verbose=False, export_dir=tmp_path / "o")
    module = LNet()
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module)
    assert cb.ctrl is None  # not passed to the trainer: the next lines pass it
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[cb],
    )
    trainer.fit(module)
    assert cb.ctrl is not None and cb.ctrl.compression_level == pytest.approx(0.5)
    sd = module.state_dict()
    w = torch.cat([sd[f"model.{i}.weight"].flatten() for i in (0, 2, 4)])
    assert float((w == 0).float().mean()) == pytest.approx(0.5, abs=1e-3)
    assert (tmp_path / "o" / "model.sparse.pt").exists()


def _yaml(tmp_path: Path) -> Path:
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(RECIPE))
    (tmp_path / "cfg").mkdir()
    config = tmp_path / "cfg" / "config.yaml"
    config.write_text(
        f"""
trainer:
  max_epochs: 1
  accelerator: cpu
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  enable_checkpointing: false
  default_root_dir: {tmp_path / "run"}
  callbacks:
    - class_path: callbacks.CompressionCallback
      init_args:
        recipe: {recipe}
        model_attr: model
        export_dir: {tmp_path / "exports"}
        export_formats: [sparse]
        verbose: false
"""
    )
    return config


@pytest.mark.parametrize("namespace", ["lightning.pytorch", "pytorch_lightning"])
def test_lightning_cli_from_yaml(namespace: str, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    import importlib

    cli_module = importlib.import_module(f"{namespace}.cli")
    model_class = LNet if namespace == "lightning.pytorch" else PLNet
    config = _yaml(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli_module.LightningCLI(
            model_class, args=["fit", "--config", str(config), "--print_config"]
        )
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path: callbacks.CompressionCallback" in printed
    assert "export_from: final" in printed and "model_attr: model" in printed

    cli = cli_module.LightningCLI(model_class, args=["fit", "--config", str(config)])
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, CompressionCallback)]
    assert cb.ctrl is not None and cb.ctrl.compression_level == pytest.approx(0.5)
    assert (tmp_path / "exports" / "model.sparse.pt").exists()
    # LightningCLI saved the config it ran, callback included.
    (saved,) = (tmp_path / "run").rglob("config.yaml")
    assert "class_path: callbacks.CompressionCallback" in saved.read_text()
