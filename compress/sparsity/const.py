"""Const sparsity (NNCF ``const_sparsity``): the zeros a model already has stay zero.

The masks are taken from the weights once, at construction, and never change. Because the mask
multiplies the weight in forward, the pruned weights get zero gradient, and whatever an
optimizer does to the stored values (momentum, weight decay, Adam) never reaches the output; the
exported model has exact zeros there.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from compress import distributed
from compress.algorithm import (
    Algorithm,
    attach_weight_masks,
    param_name,
    sparsity_rows,
    weight,
    weight_layers,
)
from compress.sparsity.magnitude import load_masks


class ConstSparsity(Algorithm):
    name = "const_sparsity"

    def __init__(self, model, cfg, scheduler, example_inputs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(model, cfg, scheduler, example_inputs)
        self.entries = attach_weight_masks(weight_layers(model, cfg))
        for name, module, mask in self.entries:
            mask.copy_(weight(module, param_name(name, module)).detach() != 0)

    @property
    def level(self) -> float:
        total = sum(m.numel() for _, _, m in self.entries)
        return 1.0 - sum(distributed.scalar(m.count_nonzero()) for _, _, m in self.entries) / total

    def update(self, per_step: bool) -> None:
        pass

    def statistics(self) -> dict[str, Any]:
        return {"algorithm": self.name, "level": self.level, "layers": sparsity_rows(self.entries)}

    def state_dict(self) -> dict[str, Any]:
        return {"masks": {name: mask.bool().clone() for name, _, mask in self.entries}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        load_masks(self.entries, state["masks"], self.name)
