"""One module per algorithm; ``ALGORITHMS`` maps recipe names to classes."""

from compress.algorithms.base import Algorithm
from compress.algorithms.const_sparsity import ConstSparsity
from compress.algorithms.magnitude_sparsity import MagnitudeSparsity

ALGORITHMS: dict[str, type[Algorithm]] = {
    "magnitude_sparsity": MagnitudeSparsity,
    "const_sparsity": ConstSparsity,
}

__all__ = ["ALGORITHMS", "Algorithm"]
