"""One module per algorithm; ``ALGORITHMS`` maps recipe names to classes."""

from compress.algorithms.base import Algorithm
from compress.algorithms.const_sparsity import ConstSparsity
from compress.algorithms.filter_pruning import FilterPruning
from compress.algorithms.magnitude_sparsity import MagnitudeSparsity
from compress.algorithms.rb_sparsity import RBSparsity

ALGORITHMS: dict[str, type[Algorithm]] = {
    "magnitude_sparsity": MagnitudeSparsity,
    "const_sparsity": ConstSparsity,
    "filter_pruning": FilterPruning,
    "rb_sparsity": RBSparsity,
}

__all__ = ["ALGORITHMS", "Algorithm"]
