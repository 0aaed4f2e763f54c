"""Sizes of a pruned model: MACs and parameters counted on a model, and the parameter elements
of the model :func:`compress.pruning.structured.shrink` would build, counted from the kept
channels without shrinking. Counting without shrinking is what makes a search over pruning
ratios (a FLOPs target) cheap; :func:`count_macs_params` measures a built model to check it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from compress.pruning.structured import ChannelGroup, Inputs, as_tuple, check_keep

__all__ = ["count_macs_params", "distinct_numel", "shrunk_numel"]


def count_macs_params(model: nn.Module, example_inputs: Inputs) -> tuple[int, int]:
    """(MACs, parameters) of one forward pass, counted by ``torch.utils.flop_counter``."""
    inputs = as_tuple(example_inputs)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(*inputs)
    return counter.get_total_flops() // 2, sum(p.numel() for p in model.parameters())


def shrunk_numel(
    model: nn.Module, groups: Sequence[ChannelGroup], keep: Mapping[str, torch.Tensor]
) -> dict[str, int]:
    """Elements of every parameter (``"module.param"``) in the model :func:`shrink` would build.

    Each dimension loses the positions its groups drop. Counting without shrinking is what makes
    a search over pruning ratios (a FLOPs target) cheap: a conv or linear layer's MACs scale with
    its number of weight elements, since shrinking never changes spatial sizes.

    Example:
        >>> from compress.pruning.channel_groups import build_groups
        >>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
        >>> (g,) = build_groups(m, torch.randn(1, 3, 8, 8), prune_first_conv=True)
        >>> shrunk_numel(m, [g], {"0": torch.arange(8) < 2})
        {'0.weight': 54, '0.bias': 2, '2.weight': 8, '2.bias': 4}
    """
    dropped: dict[tuple[str, str, int], set[int]] = {}
    for group in groups:
        if group.name not in keep:
            continue
        k = check_keep(group, keep[group.name])
        for m in group.members:
            gone = m.index[~k[m.channel]]
            if gone.numel():
                dropped.setdefault((m.module_name, m.param_name, m.dim), set()).update(
                    gone.tolist()
                )
    out = {}
    for mod_name, module in model.named_modules():
        for p_name, param in module.named_parameters(recurse=False):
            out[f"{mod_name}.{p_name}" if mod_name else p_name] = math.prod(
                size - len(dropped.get((mod_name, p_name, d), ()))
                for d, size in enumerate(param.shape)
            )
    return out


def distinct_numel(model: nn.Module, numel: Mapping[str, int]) -> int:
    """The total of ``numel`` (from :func:`shrunk_numel`) with a parameter tied between modules
    (a language model's embedding and output layer) counted once.

    Example:
        >>> tied = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False))
        >>> tied[1].weight = tied[0].weight
        >>> distinct_numel(tied, {"0.weight": 4, "1.weight": 4})
        4
    """
    first: dict[int, str] = {}
    for mod_name, module in model.named_modules():
        for p_name, param in module.named_parameters(recurse=False):
            first.setdefault(id(param), f"{mod_name}.{p_name}" if mod_name else p_name)
    return sum(numel[key] for key in first.values())
