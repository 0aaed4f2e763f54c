"""The numerical check of channel groups: masking a group's channels must compute what removing
them computes.

:func:`exact_groups` masks a random half of every group's channels in one copy of the model and
removes them (:func:`compress.pruning.structured.shrink`) in another, and leaves out the groups
whose removal crashes or changes the output.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch
from torch import nn

from compress import masks
from compress.analysis.untouched import copy_model
from compress.pruning.structured import (
    ChannelGroup,
    Inputs,
    _leaves,
    apply_channel_mask,
    as_tuple,
    shrink,
)

__all__ = ["exact_groups"]


def _random_keep(groups: Sequence[ChannelGroup], seed: int = 0) -> dict[str, torch.Tensor]:
    """About half of each group's channels, at least one kept and, in a group of two or more,
    at least one dropped (a group of three heads that kept all three would not be checked),
    drawn from a private generator."""
    gen = torch.Generator().manual_seed(seed)
    keep = {}
    for group in groups:
        k = torch.rand(group.size, generator=gen) < 0.5
        first = int(torch.randint(group.size, (1,), generator=gen))
        k[first] = True
        if k.all() and group.size > 1:
            k[(first + 1) % group.size] = False
        keep[group.name] = k
    return keep


SMALL_GROUP = 8
"""Groups of fewer channels (heads, conv-group offsets) are checked with a second draw, the
complement of the first: each of their channels is then removed once and kept once."""


def _draws(groups: Sequence[ChannelGroup], seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """The keeps the exactness check tries: :func:`_random_keep`, and where a group is smaller
    than :data:`SMALL_GROUP`, a second one keeping what the first removed in those groups (one
    draw of three heads checks only one way of removing them)."""
    first = _random_keep(groups, seed)
    small = [g for g in groups if 1 < g.size < SMALL_GROUP]
    if not small:
        return [first]
    second = dict(first)
    for group in small:
        second[group.name] = ~first[group.name]
    return [first, second]


def _matches_all(
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    keeps: Sequence[Mapping[str, torch.Tensor]],
    inputs: tuple[torch.Tensor, ...],
) -> str | None:
    """None if every draw in ``keeps`` matches (:func:`_matches`), else the first problem."""
    for keep in keeps:
        problem = _matches(model, groups, keep, inputs)
        if problem is not None:
            return problem
    return None


def _matches(
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    keep: Mapping[str, torch.Tensor],
    inputs: tuple[torch.Tensor, ...],
) -> str | None:
    """None if masking and removing ``keep`` give the same output, else what went wrong."""
    masked = copy_model(model).eval()
    for group in groups:  # norms masked whatever the option: this checks the mapping itself
        apply_channel_mask(masked, replace(group, mask_norms=True), keep[group.name])
    masks.cover(masked)
    try:
        small = shrink(masked, groups, keep, example_inputs=inputs).eval()
        with torch.no_grad():
            want, got = masked(*inputs), small(*inputs)
            error = _max_rel_error(want, got)
    except Exception as err:  # noqa: BLE001 - a crash is one more way not to match
        return f"the shrunk model fails ({type(err).__name__}: {err})"
    return None if error <= 1e-4 else f"the shrunk model's output differs by {error:.2g}"


def _max_rel_error(want: object, got: object) -> float:
    pairs = zip(_leaves(want), _leaves(got), strict=True)
    return max(float((a - b).abs().max() / a.abs().max().clamp_min(1e-12)) for a, b in pairs)


def exact_groups(
    model: nn.Module, groups: list[ChannelGroup], example_inputs: Inputs, problems: list[str]
) -> list[ChannelGroup]:
    """The groups whose masked model equals their shrunk model, with a random half of every
    group's channels pruned (and its complement where a group is small, :func:`_draws`); one
    check, then one per group only when the joint check fails,
    and one more of the groups that passed alone: groups that match alone and fail together
    (a shrink that maps one group through another's removed channels) are all left out.
    Each group left out adds its reason to ``problems``."""
    inputs = as_tuple(example_inputs)
    keeps = _draws(groups)
    if not groups or _matches_all(model, groups, keeps, inputs) is None:
        return groups
    exact = []
    for group in groups:
        problem = _matches_all(model, [group], keeps, inputs)
        if problem is None:
            exact.append(group)
        else:
            problems.append(f"group {group.name!r}: {problem}")
    joint = _matches_all(model, exact, keeps, inputs) if len(exact) > 1 else None
    if joint is None:
        return exact
    problems.extend(f"group {g.name!r}: pruned with the other groups, {joint}" for g in exact)
    return []
