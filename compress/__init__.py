"""Training-time sparsity and filter pruning for PyTorch, driven by NNCF-format recipes.

Example:
    >>> import compress
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> ctrl, net = compress.create_compressed_model(
    ...     net, {"compression": {"algorithm": "magnitude_sparsity", "sparsity_init": 0.5}})
    >>> plain = ctrl.strip()
    >>> float((plain[0].weight == 0).float().mean()) >= 0.4
    True
"""

from compress.accuracy_aware import run_accuracy_aware
from compress.analysis.effective_report import SparsityReport, sparsity_report
from compress.analysis.summary import Statistics
from compress.controller import CompressionController, create_compressed_model
from compress.deploy.export import export, load_sparse
from compress.deploy.pruned_file import load_pruned
from compress.deploy.sparse_runtime import to_sparse_runtime
from compress.errors import CompressError, ConfigError
from compress.recipe.config import Config, load_config

__version__ = "0.1.0"

__all__ = [
    "CompressError",
    "CompressionController",
    "Config",
    "ConfigError",
    "SparsityReport",
    "Statistics",
    "__version__",
    "create_compressed_model",
    "export",
    "load_config",
    "load_pruned",
    "load_sparse",
    "run_accuracy_aware",
    "sparsity_report",
    "to_sparse_runtime",
]
