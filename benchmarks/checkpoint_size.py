"""What a Lightning checkpoint written with ``CompressionCallback`` holds, and its size.

LeNet-300-100 (64 inputs, as on scikit-learn's digits) trains with Adam under
``configs/magnitude_sparsity.json`` (0.9 by epoch 20, frozen from epoch 30) on random data
(sizes do not depend on the data), with a checkpoint at every epoch. For the checkpoints of
epochs 0 and 25 (masks still move) and 30 (frozen) the table gives the serialized size of the whole
file, of ``state_dict`` and of the callback's entry, and the same for the earlier layout
(stored dense weights, masks as one byte per weight in the entry), rebuilt from the same
checkpoint. Sizes are exact byte counts, not timings: one run is enough.

    python benchmarks/checkpoint_size.py
"""

from __future__ import annotations

import io
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from callbacks import CompressionCallback  # noqa: E402
from compress.controller import expand_state  # noqa: E402

RECIPE = Path(__file__).resolve().parent.parent / "configs" / "magnitude_sparsity.json"


class Lit(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(
            nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)
        )
        self.example_input_array = torch.zeros(1, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def size(obj: Any) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.tell()


def earlier_layout(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The same checkpoint as the callback wrote it before: stored (dense) weights under
    ``state_dict``, the controller state with one byte per mask element, nothing else."""
    entry = ckpt["callbacks"]["CompressionCallback"]
    old = dict(ckpt)
    old["state_dict"] = dict(ckpt["state_dict"])
    for key, saved in entry.get("masked_values", {}).items():
        full = old["state_dict"][f"model.{key}"].clone()
        full[expand_state(saved["where"])] = saved["values"]
        old["state_dict"][f"model.{key}"] = full
    old["callbacks"] = {
        **ckpt["callbacks"],
        "CompressionCallback": {"controller": expand_state(entry["controller"])},
    }
    return old


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(1257, 64)
    loader = DataLoader(TensorDataset(x, torch.randint(0, 10, (1257,))), batch_size=64)
    with tempfile.TemporaryDirectory() as tmp:
        every = ModelCheckpoint(dirpath=tmp, save_top_k=-1, filename="{epoch}")
        cb = CompressionCallback(RECIPE, model_attr="model", verbose=False)
        trainer = pl.Trainer(
            max_epochs=31,
            accelerator="cpu",
            callbacks=[cb, every],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(Lit(), loader)
        print(
            "| checkpoint | layout | file | state_dict | callback entry | of which masked values |"
        )
        print("|---|---|---:|---:|---:|---:|")
        for epoch in (0, 25, 30):
            ckpt = torch.load(Path(tmp) / f"epoch={epoch}.ckpt", weights_only=True)
            level = expand_state(ckpt["callbacks"]["CompressionCallback"]["controller"])
            sparsity = level["state"]["magnitude_sparsity"]["level"]
            for name, c in (("earlier", earlier_layout(ckpt)), ("now", ckpt)):
                entry = c["callbacks"]["CompressionCallback"]
                values = size(entry["masked_values"]) if "masked_values" in entry else 0
                print(
                    f"| epoch {epoch} (sparsity {sparsity:.2f}) | {name} | {size(c):,} | "
                    f"{size(c['state_dict']):,} | {size(entry):,} | {values:,} |"
                )


if __name__ == "__main__":
    main()
