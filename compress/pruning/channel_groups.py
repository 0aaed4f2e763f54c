"""Channel groups from Torch-Pruning's ``DependencyGraph``, named so that a file can refer to them.

Torch-Pruning's ``DependencyGraph`` finds which output channels are coupled (residual adds,
concat, split, depthwise convs, norms, Linear after flatten). :func:`build_groups` turns each of
its groups into a plain :class:`~compress.pruning.structured.ChannelGroup` that names parameters by
module name; with ``validate`` it keeps only the groups whose masked model computes what their
shrunk model computes (:func:`compress.pruning.exactness.exact_groups`). A group is named by
its root module, a stable id across fresh instances of the same class, so the ``pruned`` file
(:mod:`compress.deploy.pruned_file`) stores the kept channels per group name and rebuilds the
small model from a fresh instance by finding its groups again.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    >>> x = torch.randn(1, 3, 8, 8)
    >>> [g.name for g in build_groups(model, x, prune_first_conv=True)]
    ['0']
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from compress.analysis.node_kinds import is_transposed_linear
from compress.errors import CompressError
from compress.pruning import hf_layers
from compress.pruning.deadline import TimeBudgetExceeded, deadline
from compress.pruning.exactness import Traced, exact_groups
from compress.pruning.group_members import Skip, map_group
from compress.pruning.group_search import Runaway, indexed_groups, widest_dim
from compress.pruning.structured import (
    ChannelGroup,
    Inputs,
    Member,
    bare_copy,
    dependency_graph,
    mappings_as_traced,
)

__all__ = ["Excluded", "build_groups"]

Layer = nn.modules.conv._ConvNd | nn.Linear
"""The layers a group can be built around; ``prunable`` of :func:`build_groups` picks among them."""


@dataclass(frozen=True)
class Excluded:
    """A set of coupled channels that is left whole, and why.

    ``kind`` is one of ``first conv``, ``downsample conv``, ``out of scope`` (the options exclude
    it), ``network output`` (its channels are outputs of the model), ``not mapped`` (a norm or
    attention coupling whose masking would not equal removal, or a group search that ran away,
    :class:`compress.pruning.group_search.Runaway`), ``not exact`` (the numerical check
    failed), ``overlap``, ``trace failure``, ``single channel``, ``unsupported layer`` (a matrix
    layer of a type other than conv, Linear and transformers' ``Conv1D``).
    """

    group: str
    kind: str
    detail: str


def _is_named(name: str, names: Collection[str]) -> bool:
    return any(name == n or name.startswith(n + ".") for n in names)


def _input_layers(dg: tp.DependencyGraph) -> set[nn.Module]:
    """Convs and linear layers with no parametric layer upstream: they see the network input
    (NNCF's "first conv", which is the first prunable layer of any kind: LeNet's fc1)."""
    parametric = (nn.modules.conv._ConvNd, nn.Linear, nn.Embedding, nn.MultiheadAttention)
    found: set[nn.Module] = set()
    for module, node in dg.module2node.items():
        if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            continue
        stack, seen, upstream = list(node.inputs), set(), False
        while stack and not upstream:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            upstream = isinstance(n.module, parametric)
            stack.extend(n.inputs)
        if not upstream:
            found.add(module)
    return found


def _producer_modules(model: nn.Module, members: Sequence[Member]) -> list[tuple[str, nn.Module]]:
    names = {m.module_name for m in members if m.role in ("producer", "norm")}
    return [(n, model.get_submodule(n)) for n in sorted(names) if n]


def _check_flags(
    model: nn.Module,
    members: Sequence[Member],
    *,
    ignored: Collection[str],
    input_layers: set[nn.Module],
    prune_first_conv: bool,
    prune_downsample_convs: bool,
    prunable: tuple[type[Layer], ...],
) -> None:
    """Raises a silent Skip when the user's options exclude the group (NNCF semantics)."""
    for name, module in _producer_modules(model, members):
        if _is_named(name, ignored):
            raise Skip(
                f"coupled to {name!r}, which is out of scope", warn=False, kind="out of scope"
            )
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            if not isinstance(module, prunable):
                raise Skip(f"{name!r} is not a prunable type", warn=False, kind="out of scope")
        if not prune_first_conv and module in input_layers:
            raise Skip(f"{name!r} is the first conv", warn=False, kind="first conv")
        if not isinstance(module, nn.modules.conv._ConvNd):
            continue
        # NNCF: any strided conv, depthwise included (its group is then left whole)
        if not prune_downsample_convs and max(module.stride) > 1:
            raise Skip(f"{name!r} is a downsample conv", warn=False, kind="downsample conv")


def build_groups(
    model: nn.Module,
    example_inputs: Inputs,
    *,
    ignored: Collection[str] = (),
    prune_first_conv: bool = False,
    prune_downsample_convs: bool = False,
    prune_batch_norms: bool = True,
    prunable: tuple[type[Layer], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear),
    validate: bool = True,
    time_budget: float | None = None,
    excluded: list[Excluded] | None = None,
    macs: dict[str, int] | None = None,
) -> list[ChannelGroup]:
    """One :class:`ChannelGroup` per set of coupled output channels that may be pruned.

    Groups whose channels reach the network output are never returned. ``ignored`` names
    modules (a container name covers its children) whose output channels stay. With
    ``prune_first_conv=False`` convs and linear layers that consume the network input keep their
    channels; with ``prune_downsample_convs=False`` convs with stride > 1 do, depthwise ones
    included (as NNCF 2.17). ``prune_batch_norms=False`` leaves norm affines unmasked, as in
    NNCF: a pruned channel is then the constant ``beta - gamma * mean / std`` after the norm
    during training, and the shrunk model, which has no such channel, differs by it.

    A group Torch-Pruning cannot give, or that cannot be mapped exactly (see
    :mod:`compress.pruning.group_members`), is left out, and one warning lists all such groups
    with the reason. With ``validate`` the groups are also checked numerically: a random half
    of every group's channels is zeroed in a copy, then removed, and a group whose removal
    crashes or changes the output (hand-written attention whose heads come from ``view``, say)
    is left out the same way (:func:`compress.pruning.exactness.exact_groups`).

    Every group left out, warned of or not, is appended to ``excluded`` with its reason;
    ``macs``, if given, receives the MACs of each module (as
    :func:`compress.analysis.summary.layer_macs` counts them) from the trace's forward pass,
    and stays empty when that pass fails. The
    trace, the group search and the check stop with a ``CompressError`` that says which after
    ``time_budget`` seconds (None: no budget; 0: spent before it starts).

    Example:
        >>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 2))
        >>> x = torch.randn(1, 3, 8, 8)
        >>> [(g.name, g.size) for g in build_groups(m, x, prune_first_conv=True)]
        [('0', 8)]
    """
    out = [] if excluded is None else excluded
    try:
        with deadline(time_budget), _collector_paused():
            return _build(
                model,
                example_inputs,
                ignored=ignored,
                prune_first_conv=prune_first_conv,
                prune_downsample_convs=prune_downsample_convs,
                prune_batch_norms=prune_batch_norms,
                prunable=prunable,
                validate=validate,
                excluded=out,
                macs=macs,
            )
    except _CheckOutOfTime as err:
        raise CompressError(
            f"filter pruning did not finish checking the {err.groups} channel groups of "
            f"{type(model).__name__} within {time_budget:g} s (filter_pruning "
            "params.trace_time_budget), after tracing it: each check removes channels from a "
            "copy of the model and runs it on one sample; raise the budget, or leave blocks "
            "out with ignored_scopes"
        ) from None
    except TimeBudgetExceeded:
        raise CompressError(
            f"Torch-Pruning did not finish tracing {type(model).__name__} within "
            f"{time_budget:g} s (filter_pruning params.trace_time_budget): some graphs make its "
            "group search explode; exclude the blocks it cannot handle with ignored_scopes, or "
            "raise the budget"
        ) from None


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off inside the block (as it was after). The group
    searches make millions of small objects that live until the search ends (MobileViTv2), and
    each collection they set off walked every object of the process, the model's included: a
    fifth to two fifths of the build (MobileViTv2 2.9 -> 1.8 s, DenseNet-121 1.45 -> 1.2 s,
    LeViT-128S 1.18 -> 0.96 s, each alone in its process). What the build throws away is freed
    by reference counting, but for a copy of the model and its graph, which refer to each
    other: :mod:`compress.pruning.exactness` collects before it makes another."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class _CheckOutOfTime(TimeBudgetExceeded):
    """The budget ran out while the groups were checked numerically, after the trace."""

    def __init__(self, groups: int) -> None:
        super().__init__(f"checking {groups} groups")
        self.groups = groups


def _build(
    model: nn.Module,
    example_inputs: Inputs,
    *,
    ignored: Collection[str],
    prune_first_conv: bool,
    prune_downsample_convs: bool,
    prune_batch_norms: bool,
    prunable: tuple[type[Layer], ...],
    validate: bool,
    excluded: list[Excluded],
    macs: dict[str, int] | None,
) -> list[ChannelGroup]:
    clone, outputs = bare_copy(model), list[torch.Size]()
    try:
        dg = dependency_graph(clone, example_inputs, outputs=outputs, macs=macs)
    except TimeBudgetExceeded:
        raise
    except Exception as err:  # noqa: BLE001 - any tracing failure means "nothing to prune"
        reason = f"{type(err).__name__}: {err}" + _trace_cause(err)
        excluded.append(Excluded("", "trace failure", reason))
        warnings.warn(
            f"Torch-Pruning could not trace {type(model).__name__} ({reason}): filter pruning "
            "finds no channel groups and prunes nothing",
            stacklevel=3,
        )
        return []
    input_layers = _input_layers(dg)
    visited: set[nn.Module] = set()
    groups: list[ChannelGroup] = []
    claimed: dict[tuple[str, str, int], set[int]] = {}
    problems: list[str] = []
    # nothing is removed during the search; a search that runs away leaves its group out
    with mappings_as_traced(dg), indexed_groups(widest_dim(clone)):
        for name, module in clone.named_modules():
            layer = isinstance(module, prunable) or is_transposed_linear(module)
            if module in visited or module not in dg.module2node or not layer:
                continue
            if _is_named(name, ignored):
                excluded.append(Excluded(name, "out of scope", f"{name!r} is out of scope"))
                continue
            try:
                fn = dg.get_pruner_of_module(module).prune_out_channels
                tp_group = dg.get_pruning_group(module, fn, _root_channels(dg, module, fn))
                visited.update(
                    item.dep.target.module
                    for item in tp_group.items
                    if dg.is_out_channel_pruning_fn(item.dep.handler)
                )
                members, size = map_group(dg, tp_group, clone)
                _check_flags(
                    clone,
                    members,
                    ignored=ignored,
                    input_layers=input_layers,
                    prune_first_conv=prune_first_conv,
                    prune_downsample_convs=prune_downsample_convs,
                    prunable=prunable,
                )
                _claim(claimed, members)
            except Skip as skip:
                excluded.append(Excluded(name, skip.kind, str(skip)))
                if skip.warn:
                    problems.append(f"group {name!r}: {skip}")
                continue
            except Runaway as err:  # the layers it reached would run away too: not searched again
                visited.update(
                    dep.target.module
                    for dep in err.reached
                    if dg.is_out_channel_pruning_fn(dep.handler)
                )
                excluded.append(Excluded(name, "not mapped", str(err)))
                problems.append(f"group {name!r}: {err}")
                continue
            except TimeBudgetExceeded:
                raise
            except Exception as err:  # noqa: BLE001 - Torch-Pruning failures must not crash training
                reason = f"Torch-Pruning failed ({type(err).__name__}: {err})"
                excluded.append(Excluded(name, "trace failure", reason))
                problems.append(f"group {name!r}: {reason}")
                continue
            if size > 1:
                groups.append(ChannelGroup(name, size, tuple(members), prune_batch_norms))
            else:
                excluded.append(Excluded(name, "single channel", "one channel: nothing to remove"))
    for name, module in clone.named_modules():
        weight = module._parameters.get("weight")
        if (
            isinstance(weight, torch.Tensor)
            and weight.dim() == 2
            and not isinstance(module, (nn.Linear, nn.Embedding, nn.EmbeddingBag))
            and not is_transposed_linear(module)
        ):
            detail = f"{type(module).__name__} layers are not pruned by filter pruning"
            excluded.append(Excluded(name, "unsupported layer", detail))
    if validate:
        n_problems, found = len(problems), groups
        try:
            traced = Traced(clone, dg, outputs)
            groups = exact_groups(model, found, example_inputs, problems, traced=traced)
        except TimeBudgetExceeded:
            raise _CheckOutOfTime(len(found)) from None
        dropped = [g.name for g in found if g not in groups]
        for name, problem in zip(dropped, problems[n_problems:], strict=True):
            excluded.append(Excluded(name, "not exact", problem))
    if problems:
        warnings.warn(
            "These channel groups are left unpruned: " + "; ".join(problems), stacklevel=3
        )
    return groups


def _trace_cause(err: BaseException) -> str:
    """What in the model a Torch-Pruning failure points at, where its traceback says."""
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "update_reshape_index_mapping":
            return (
                "; Torch-Pruning cannot follow channels through a reshape of the channel "
                "dimension, such as ShuffleNet's channel shuffle "
                "(x.view(b, groups, c // groups, h, w)); a sparsity algorithm compresses it"
            )
        tb = tb.tb_next
    return ""


def _root_channels(dg: tp.DependencyGraph, module: nn.Module, fn: object) -> list[int]:
    """The root channels to ask Torch-Pruning for: all of them, or for a fused projection
    (GPT-2's ``c_attn``: q, k and v in one layer, split along the last dim) those of its first
    part. Channel 0 coupled to channels ``p, 2p, ...`` of its own layer means ``p`` channels
    per part; asked for all channels at once, Torch-Pruning would merge each coupled channel
    with its own root and lose the coupling."""
    width = _width(module)
    probe = dg.get_pruning_group(module, fn, [0])
    own = sorted(
        {
            int(i)
            for item in probe.items
            if item.dep.target.module is module and dg.is_out_channel_pruning_fn(item.dep.handler)
            for i in item.idxs
        }
    )
    if len(own) > 1 and own == list(range(0, width, own[1])):
        return list(range(own[1]))
    return list(range(width))


def _width(module: nn.Module) -> int:
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels
    if isinstance(module, nn.Linear):
        return module.out_features
    return hf_layers.out_width(module)  # transformers' Conv1D


def _claim(claimed: dict[tuple[str, str, int], set[int]], members: Sequence[Member]) -> None:
    """Output-side slices belong to one group only, else two groups would fight over a mask.
    ``claimed`` holds the positions taken so far per (module, parameter, dim)."""
    keys: dict[tuple[str, str, int], set[int]] = {}
    for m in members:
        if m.role in ("producer", "norm"):
            keys.setdefault((m.module_name, m.param_name, m.dim), set()).update(m.index.tolist())
    if any(not positions.isdisjoint(claimed.get(key, ())) for key, positions in keys.items()):
        raise Skip("its output channels overlap another group", kind="overlap")
    for key, positions in keys.items():
        claimed.setdefault(key, set()).update(positions)
