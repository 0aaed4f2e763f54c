"""``ALGORITHMS``: the recipe name of every algorithm and the class that implements it."""

from compress.algorithm import Algorithm
from compress.distillation import KnowledgeDistillation
from compress.pruning.filter_pruning import FilterPruning
from compress.sparsity.const import ConstSparsity
from compress.sparsity.magnitude import MagnitudeSparsity
from compress.sparsity.rb import RBSparsity

ALGORITHMS: dict[str, type[Algorithm]] = {
    "magnitude_sparsity": MagnitudeSparsity,
    "const_sparsity": ConstSparsity,
    "filter_pruning": FilterPruning,
    "rb_sparsity": RBSparsity,
    "knowledge_distillation": KnowledgeDistillation,
}

__all__ = ["ALGORITHMS"]
