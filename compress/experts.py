"""Mixture-of-experts layers that hold their experts as fused 3-D parameters.

In transformers 5, ``MixtralExperts`` and ``Qwen2MoeExperts`` (and the other ``*Experts``
classes) keep every expert's matrix in one parameter: ``gate_up_proj`` [experts, 2 * inter,
hidden] and ``down_proj`` [experts, hidden, inter]. Their forward reads ``self.gate_up_proj``,
so a mask on the parameter (``masks.attach(experts, "gate_up_proj")``) is what every expert
computes with. Sparsity treats each expert's matrix as a layer of its own; these parameters go
by ``<experts module>.<parameter>`` in scopes and statistics
(``model.layers.0.mlp.experts.gate_up_proj``).

Each token runs ``num_experts_per_tok`` (k) of the n experts, so a forward pass over T tokens
costs T * k * (one expert's weights) MACs: k / n of the dense compute of all experts.

Example:
    >>> from torch import nn
    >>> expert_params(nn.Linear(2, 2))
    []
"""

from __future__ import annotations

import torch
from torch import nn


def expert_params(module: nn.Module) -> list[str]:
    """The names of ``module``'s fused expert matrices: its 3-D parameters whose first dim is
    its ``num_experts``; [] for any other module."""
    n = getattr(module, "num_experts", None)
    if not isinstance(n, int) or isinstance(n, bool):
        return []
    return [
        name
        for name, p in module._parameters.items()
        if isinstance(p, torch.Tensor) and p.dim() == 3 and p.shape[0] == n
    ]


def top_k(module: nn.Module) -> int:
    """How many experts each token runs: the config's ``num_experts_per_tok``; all of them
    when the module does not say."""
    config = getattr(module, "config", None)
    k = getattr(config, "num_experts_per_tok", None)
    n = int(module.num_experts)  # type: ignore[arg-type]
    return min(int(k), n) if isinstance(k, int) and k > 0 else n


def expert_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module of ``model`` holding fused expert parameters."""
    return [(n, m) for n, m in model.named_modules() if expert_params(m)]


def routed_macs(module: nn.Module, tokens: int) -> dict[str, int]:
    """MACs of ``tokens`` tokens through the experts: per fused parameter, tokens * k * (one
    expert's matrix)."""
    k = top_k(module)
    out = {}
    for name in expert_params(module):
        p = module._parameters[name]
        assert p is not None
        out[name] = tokens * k * (p[0].numel())
    return out
