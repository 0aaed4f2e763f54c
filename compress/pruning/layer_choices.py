"""The recipe's per-layer choices of filter pruning: ``prune_channels`` (explicit channels to
prune, as NetsPresso writes them) and ``layer_ratios`` (a ratio that overrides the schedule's
target), resolved from layer names to the channel groups they fix. A group coupled to several
named layers may be set once only; a name that matches no prunable layer is a ConfigError that
says whether the layer exists but cannot be pruned or does not exist at all.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from compress.algorithm import weight
from compress.errors import ConfigError
from compress.pruning.structured import ChannelGroup, Member
from compress.recipe import rules, scopes
from compress.recipe.scopes import parse_channels

__all__ = ["layer_choices", "resolve"]


def resolve(
    model: nn.Module, layers: Mapping[str, tuple[ChannelGroup, Member]], key: str, path: str
) -> list[tuple[ChannelGroup, Member]]:
    """The (group, member) of every prunable layer in ``layers`` that ``key`` names (a module
    name, glob or '{re}' regular expression); a ConfigError when it names none."""
    found = [layers[n] for n in layers if scopes.matches(key, n)]
    if found:
        return found
    modules = [n for n, _ in model.named_modules() if n]
    if any(scopes.matches(key, n) for n in modules):
        raise ConfigError(
            f"{path}: layer {key!r} cannot be pruned (its channels reach the output, it is "
            "out of scope, or prune_first_conv/prune_downsample_convs exclude it); prunable "
            f"layers: {sorted(layers)[:8]}"
        )
    raise ConfigError(
        f"{path}: {key!r} matches no layer of the model; layers look like {modules[:4]}"
    )


def layer_choices(
    model: nn.Module,
    layers: Mapping[str, tuple[ChannelGroup, Member]],
    params: Mapping[str, Any],
    base: str,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Groups fixed by ``prune_channels`` (keep masks) and by ``layer_ratios`` (ratios)."""
    explicit: dict[str, torch.Tensor] = {}
    ratios: dict[str, float] = {}
    owner: dict[str, str] = {}

    def claim(group: ChannelGroup, path: str) -> None:
        if group.name in owner:
            raise ConfigError(
                f"{path}: group {group.name!r} is already set by {owner[group.name]} (layers "
                "joined by a residual add or concat share their channels); set it once"
            )
        owner[group.name] = path

    for key, text in params["prune_channels"].items():
        path = f'{base}.prune_channels["{key}"]'
        channels = parse_channels(text, path)
        for group, member in resolve(model, layers, key, path):
            claim(group, path)
            size = weight(model.get_submodule(member.module_name)).shape[member.dim]
            if channels and channels[-1] >= size:
                raise ConfigError(
                    f"{path}: channel {channels[-1]} is outside layer "
                    f"{member.module_name!r}, which has {size} output channels (0-{size - 1})"
                )
            keep = torch.ones(group.size, dtype=torch.bool)
            keep[member.channel[torch.isin(member.index, torch.tensor(channels))]] = False
            if not keep.any():
                raise ConfigError(
                    f"{path}: prunes all {group.size} channels of group {group.name!r}; at "
                    "least one channel must remain"
                )
            explicit[group.name] = keep
    for key, ratio in params["layer_ratios"].items():
        path = f'{base}.layer_ratios["{key}"]'
        if not 0.0 <= ratio < 1.0:
            raise ConfigError(f"{path}: {ratio} is not a ratio in [0, 1)")
        for group, _ in resolve(model, layers, key, path):
            claim(group, path)
            ratios[group.name] = float(ratio)
    groups = {group.name for group, _ in layers.values()}
    if ratios and groups <= set(owner):
        warnings.warn(
            rules.all_layers_fixed(base, params["layer_ratios"], len(groups)), stacklevel=4
        )
    return explicit, ratios
