"""Training-time sparsity and filter pruning for PyTorch, driven by NNCF-format recipes."""

from compress.errors import CompressError, ConfigError

__version__ = "0.1.0"

__all__ = ["CompressError", "ConfigError", "__version__"]
