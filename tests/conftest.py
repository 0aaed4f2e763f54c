import pytest
import torch
from torch import nn


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


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


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
