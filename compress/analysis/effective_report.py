"""Direct and effective sparsity of a model's Linear/Conv weights, per layer and in total.

:func:`sparsity_report` counts, for every layer, the weights that are zero (direct sparsity) and
the weights that are not active (effective sparsity: zero, or on no path from the input to the
output, as found by :func:`compress.analysis.effective.active_weights`), and returns a
:class:`SparsityReport` that prints as a table and converts to a dict.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))
    >>> with torch.no_grad():
    ...     net[0].weight[0] = 0.0  # hidden unit 0 is cut off from the input ...
    >>> report = sparsity_report(net)
    >>> report.direct_sparsity, report.effective_sparsity  # ... so its outgoing weight is idle
    (0.375, 0.5)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compress.analysis.effective import active_weights, layer_weight, prunable_layers


@dataclass(frozen=True)
class LayerSparsity:
    """Weight counts of one layer: total, zero (direct) and not active (effective)."""

    name: str
    shape: tuple[int, ...]
    params: int
    zeros: int
    inactive: int

    @property
    def direct_sparsity(self) -> float:
        return self.zeros / self.params if self.params else 0.0

    @property
    def effective_sparsity(self) -> float:
        return self.inactive / self.params if self.params else 0.0


@dataclass(frozen=True)
class SparsityReport:
    """Direct and effective sparsity of a model's Linear/Conv weights (biases not counted).

    ``direct = zeros / params`` and ``effective = (params - active) / params``, in total and per
    layer; ``effective >= direct`` always.
    """

    layers: tuple[LayerSparsity, ...]

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def direct_sparsity(self) -> float:
        return sum(layer.zeros for layer in self.layers) / self.params if self.params else 0.0

    @property
    def effective_sparsity(self) -> float:
        return sum(layer.inactive for layer in self.layers) / self.params if self.params else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "direct_sparsity": self.direct_sparsity,
            "effective_sparsity": self.effective_sparsity,
            "params": self.params,
            "layers": {
                layer.name: {
                    "shape": list(layer.shape),
                    "params": layer.params,
                    "direct_sparsity": layer.direct_sparsity,
                    "effective_sparsity": layer.effective_sparsity,
                }
                for layer in self.layers
            },
        }

    def __str__(self) -> str:
        header = ("layer", "shape", "params", "direct", "effective")
        rows = [
            (
                layer.name,
                "x".join(map(str, layer.shape)),
                str(layer.params),
                f"{layer.direct_sparsity:.2%}",
                f"{layer.effective_sparsity:.2%}",
            )
            for layer in self.layers
        ]
        total = ("total", "", str(self.params), f"{self.direct_sparsity:.2%}")
        rows.append((*total, f"{self.effective_sparsity:.2%}"))
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

        def line(row: tuple[str, ...]) -> str:
            cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
            cells += [cell.rjust(width) for cell, width in zip(row[2:], widths[2:], strict=True)]
            return "  ".join(cells).rstrip()

        rule = "-" * len(line(tuple("-" * w for w in widths)))
        return "\n".join([line(header), rule, *map(line, rows[:-1]), rule, line(rows[-1])])


def sparsity_report(
    model: nn.Module, example_inputs: torch.Tensor | tuple[torch.Tensor, ...] | None = None
) -> SparsityReport:
    """Direct and effective sparsity of every Linear/Conv weight of ``model``.

    Works on a masked model (counts ``param * mask``) and on a plain one with stored zeros.

    Example:
        >>> report = sparsity_report(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
        >>> report.to_dict()["effective_sparsity"], report.params
        (0.0, 18)
    """
    active = active_weights(model, example_inputs)
    layers = []
    for name, module in prunable_layers(model).items():
        weight = layer_weight(module)
        params = weight.numel()
        zeros = int((weight == 0).sum())
        inactive = params - int(active[name].sum())
        layers.append(LayerSparsity(name, tuple(weight.shape), params, zeros, inactive))
    assert all(layer.inactive >= layer.zeros for layer in layers)
    return SparsityReport(tuple(layers))


__all__ = ["LayerSparsity", "SparsityReport", "sparsity_report"]
