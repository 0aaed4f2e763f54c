import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def lenet(inputs: int = 64) -> nn.Module:
    return nn.Sequential(
        nn.Linear(inputs, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)
    )


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(self.pool(x).flatten(1))


class ConvBNNet(nn.Module):
    """Two conv-BatchNorm-ReLU stages (3 -> 8 -> 16 channels) and a linear head on the channel
    means."""

    def __init__(self, classes: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


class BasicBlock(nn.Module):
    """A ResNet basic block. The shortcut is the submodule named ``skip``: empty (identity), or a
    strided 1x1 convolution, with a BatchNorm after it if ``skip_bn``, where the shape changes."""

    def __init__(
        self, cin: int, cout: int, stride: int, *, skip: str = "shortcut", skip_bn: bool = True
    ) -> None:
        super().__init__()
        self.skip = skip
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))
            if skip_bn:
                shortcut.append(nn.BatchNorm2d(cout))
        setattr(self, skip, shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + getattr(self, self.skip)(x))


class LitClassifier(pl.LightningModule):
    """``lenet(16)`` (or ``model``) trained on cross-entropy by ``optimizer`` at ``lr``."""

    def __init__(
        self,
        with_example: bool = True,
        model: nn.Module | None = None,
        batch: int = 1,
        *,
        optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        lr: float = 0.05,
    ) -> None:
        super().__init__()
        self.model = model if model is not None else lenet(16)
        if with_example:
            self.example_input_array = torch.zeros(batch, 16)
        self.optimizer_cls, self.lr = optimizer, lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return self.optimizer_cls(self.parameters(), lr=self.lr)


def loader16(n: int = 64, batch: int = 8) -> DataLoader:
    """``n`` seeded 16-feature samples for ``LitClassifier``, labelled by the sign of the first."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, generator=gen)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=batch)


def quiet_trainer(root: Path, *callbacks: pl.Callback, epochs: int, **kw: Any) -> pl.Trainer:
    """A CPU Trainer for ``epochs`` without progress bar or model summary; ``kw`` adds the rest
    (devices, logger, determinism, ...)."""
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        default_root_dir=root,
        callbacks=list(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )


def fit_quietly(trainer: pl.Trainer, module: pl.LightningModule, data: Any, **kw: Any) -> None:
    """``trainer.fit`` with warnings ("does not have many workers" and the like) ignored."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, data, **kw)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    tiny convolutions run ~100x slower with two threads on a loaded 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def magnitude(**params: object) -> dict:
    init = params.pop("sparsity_init", 0.0)
    return {
        "compression": {"algorithm": "magnitude_sparsity", "sparsity_init": init, "params": params}
    }


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``slow`` run only with ``pytest -m slow`` or COMPRESS_SLOW=1."""
    import os

    if "slow" in (config.getoption("markexpr") or "") or os.environ.get("COMPRESS_SLOW"):
        return
    skip = pytest.mark.skip(reason="slow: run with `pytest -m slow` (or COMPRESS_SLOW=1)")
    for item in items:
        if item.get_closest_marker("slow"):
            item.add_marker(skip)
