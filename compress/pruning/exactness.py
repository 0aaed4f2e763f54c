"""The numerical check of channel groups: masking a group's channels must compute what removing
them computes.

:func:`exact_groups` zeroes a random half of every group's channels in a copy of the model, runs
it, removes the same channels with Torch-Pruning and runs it again; a group whose removal
crashes or changes the output is left out. One check covers many groups, so the groups that
fail are found by bisection: about ``2 log2 n`` checks for one bad group among ``n``, where one
check per group took DenseNet-121 twenty minutes.

A check costs two forward passes and a removal. Every check runs on the copy the groups were
found on, with its graph, put back as it was after each check (:func:`_workbench`), so the
model is copied and traced once in all; the forward passes run on one sample at the smallest
image size the model takes (:func:`check_inputs`), and the whole analysis runs within the
filter pruning time budget (:func:`compress.pruning.channel_groups.build_groups`).
"""

from __future__ import annotations

import gc
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from compress.pruning.attention import cache_off
from compress.pruning.deadline import TimeBudgetExceeded
from compress.pruning.structured import (
    ChannelGroup,
    Inputs,
    as_tuple,
    bare_copy,
    dependency_graph,
    leaves,
    remove_channels,
)

__all__ = ["MIN_SIDE", "Traced", "check_inputs", "exact_groups"]


@dataclass(frozen=True)
class Traced:
    """A copy of the model without masks, its dependency graph, and the shapes of the outputs
    of the forward pass the trace ran (:func:`compress.pruning.structured.dependency_graph`)."""

    model: nn.Module
    dg: tp.DependencyGraph
    outputs: list[torch.Size]


MIN_SIDE = 32
"""Image sides are halved for the checks while they stay at least this long: below the stride
of most vision backbones every feature map is one pixel, and the check gains no speed."""


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


TOGETHER = "pruned with the other groups, "
"""How the problem of a group that passes alone, but not with the others, begins."""

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


def check_inputs(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    outputs: Sequence[torch.Size],
    *,
    found: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, ...]:
    """The inputs the checks run on: one sample of ``inputs``, with every image (a 4-d or 5-d
    float tensor) halved in each spatial side again and again while the model takes it, its
    outputs keep their shapes (``outputs``, those on ``inputs``, with one sample) and no side
    gets shorter than :data:`MIN_SIDE`. A model that needs its image size (a ViT without
    interpolation) keeps it; one that refuses a single sample gets ``inputs`` as given.
    ``found``, if given, receives the model's outputs on the inputs returned (:func:`leaves`),
    where they were computed (not for ``inputs`` as given).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1))
        >>> x = torch.randn(8, 3, 224, 224)
        >>> [tuple(t.shape) for t in check_inputs(net, (x,), [torch.Size((8, 4, 1, 1))])]
        [(1, 3, 56, 56)]
    """
    batch = {t.shape[0] for t in inputs if isinstance(t, torch.Tensor) and t.dim() > 0}
    if len(batch) != 1:
        return inputs  # no tensor, or samples are not along the first dim of every input
    (n,) = batch
    want = [torch.Size((1, *s[1:])) if len(s) and s[0] == n else s for s in outputs]
    one = tuple(t[:1] if isinstance(t, torch.Tensor) and t.dim() > 0 else t for t in inputs)
    out = None
    while True:
        smaller = tuple(_halved(t) for t in one)
        if all(a is b for a, b in zip(smaller, one, strict=True)):
            break
        got = _outputs(model, smaller)
        if got is None or [t.shape for t in got] != want:
            break
        out, one = got, smaller
    if out is None:  # a full-size sample is tried last: it costs most
        out = _outputs(model, one)
        if out is None or [t.shape for t in out] != want:
            return inputs
    if found is not None:
        found[:] = out
    return one


def _halved(t: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dim() not in (4, 5) or not t.is_floating_point():
        return t
    sides = t.shape[2:]
    if min(sides) // 2 < MIN_SIDE:
        return t
    return t[(slice(None), slice(None)) + tuple(slice(None, s // 2) for s in sides)]


def _shapes(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[torch.Size] | None:
    """The shapes of the model's outputs on ``inputs``, or None if it fails on them."""
    out = _outputs(model, inputs)
    return None if out is None else [t.shape for t in out]


def _outputs(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor] | None:
    """The model's outputs (:func:`leaves`) on ``inputs`` in eval mode, or None if it fails."""
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings(), cache_off(model):
            warnings.simplefilter("ignore")
            return leaves(model(*inputs))
    except TimeBudgetExceeded:
        raise
    except Exception:  # noqa: BLE001 - any failure means "not this input"
        return None


def _matches(
    model: nn.Module,
    dg: tp.DependencyGraph | None,
    groups: Sequence[ChannelGroup],
    keep: Mapping[str, torch.Tensor],
    inputs: tuple[torch.Tensor, ...],
) -> str | None:
    """None if zeroing the channels ``keep`` drops and removing them give the same output, else
    what went wrong. ``model`` (a copy without masks, ``dg`` its graph, traced here if None) is
    used up: its channels are zeroed, then removed, in place.

    Zeroed weights are what masked weights read as, wherever they are read (a masked model
    needs :func:`compress.masks.cover` for attention that reads a child's weight itself); norms
    are zeroed whatever the option, which checks the mapping itself."""
    model.eval()
    try:
        if dg is None:
            dg = dependency_graph(model, inputs)
        with torch.no_grad():
            for group in groups:
                _zero(model, group, keep[group.name])
            want = model(*inputs)
        remove_channels(dg, model, groups, keep)
        model.eval()
        with torch.no_grad():
            got = model(*inputs)
        error = _max_rel_error(want, got)
    except TimeBudgetExceeded:
        raise
    except Exception as err:  # noqa: BLE001 - a crash is one more way not to match
        return f"the shrunk model fails ({type(err).__name__}: {err})"
    return None if error <= 1e-4 else f"the shrunk model's output differs by {error:.2g}"


Bench = Callable[[], "tuple[nn.Module, tp.DependencyGraph | None]"]


def _workbench(
    model: nn.Module,
    copy: nn.Module,
    dg: tp.DependencyGraph | None,
    inputs: tuple[torch.Tensor, ...],
    reference: list[torch.Tensor],
) -> Bench:
    """What each check runs on, one call per check: ``copy`` and its graph ``dg`` (traced here
    if None), put back as they were before every check after the first (:func:`_restorer`).
    ``reference`` holds the copy's outputs on ``inputs`` (empty: computed here).
    One trace then serves every check, where each check took a copy of the model and a trace
    of it (LeViT: 8 checks of 0.2 s, 0.13 s of it the trace). Before a check runs on it, the
    copy put back must give the outputs it gave before the first check; where it does not
    (a layer that keeps state Torch-Pruning changes in some other way), every check from then
    on takes a new copy of ``model`` and traces it, as before."""
    restore: Callable[[], None] | None = None
    try:
        if dg is None:
            dg = dependency_graph(copy, inputs)
        reference = reference or _outputs(copy, inputs) or []
        if reference:
            restore = _restorer(copy, dg)
    except TimeBudgetExceeded:
        raise
    except Exception:  # noqa: BLE001 - the first check traces again and says what fails
        dg = None
    checks = 0

    def bench() -> tuple[nn.Module, tp.DependencyGraph | None]:
        nonlocal checks, restore
        checks += 1
        if checks == 1:
            return copy, dg
        if restore is not None:
            restore()
            got = _outputs(copy, inputs)
            if got is not None and _max_rel_error(reference, got) <= 1e-6:
                return copy, dg
            restore = None
        gc.collect()  # the copies before, held by their graphs' cycles (the build pauses it)
        return bare_copy(model), None

    return bench


def _restorer(model: nn.Module, dg: tp.DependencyGraph) -> Callable[[], None]:
    """A function that puts ``model`` and its dependency graph ``dg`` back as they are now.

    A check changes them in three ways: :func:`_zero` gives parameters new storage;
    Torch-Pruning sets new parameters and buffers and smaller sizes on the layers, and on the
    concat and split nodes of its graph (lists it changes in place), and gives an unwrapped
    parameter's node the new parameter; its index mappings follow the new sizes. So what is
    kept is, by reference, every attribute of every layer and graph node (the lists, dicts and
    sets among them with their contents), every parameter's storage, the graph's node tables
    and each dependency's index mappings: no tensor is copied."""
    layers = {id(m): m for m in model.modules()}
    layers |= {id(m): m for m in dg.module2node if isinstance(m, nn.Module)}
    attributes = [(m, vars(m).copy(), _contents(vars(m))) for m in layers.values()]
    storage = [(p, p.data) for p in model.parameters()]
    tables = [(t, t.copy()) for t in (dg.module2node, dg._param_to_name)]
    nodes = [(node, node.module) for node in dg.module2node.values()]
    mappings = [
        (dep.index_mapping, list(dep.index_mapping))
        for node in dg.module2node.values()
        for dep in node.dependencies
    ]

    def restore() -> None:
        for module, attrs, contents in attributes:
            vars(module).clear()
            vars(module).update(attrs)
            for container, content in contents:
                _refill(container, content)
        for param, data in storage:
            param.data = data
        for table, content in tables:
            _refill(table, content)
        for node, module in nodes:
            node.module = module
        for mapping, content in mappings:
            mapping[:] = content

    return restore


def _contents(attrs: dict[str, object]) -> list[tuple[object, object]]:
    """(container, a shallow copy of it) for every list, dict and set among ``attrs``."""
    return [(v, v.copy()) for v in attrs.values() if isinstance(v, (list, dict, set))]


def _refill(container: object, content: object) -> None:
    """Gives ``container`` (a list, dict or set) the items of ``content`` in place."""
    if isinstance(container, list):
        container[:] = content  # type: ignore[call-overload]
    else:
        container.clear()  # type: ignore[attr-defined]
        container.update(content)  # type: ignore[attr-defined]


def _zero(model: nn.Module, group: ChannelGroup, keep: torch.Tensor) -> None:
    """Zeroes the dropped channels into new storage: the parameter's old values stay for
    :func:`_restorer` to put back."""
    for member in group.members:
        if member.role == "other":
            continue
        param = model.get_submodule(member.module_name)._parameters[member.param_name]
        assert param is not None  # a member names a parameter that is set
        param.data = param.data.index_fill(member.dim, member.index[~keep[member.channel]], 0.0)


def _max_rel_error(want: object, got: object) -> float:
    pairs = zip(leaves(want), leaves(got), strict=True)
    return max(float((a - b).abs().max() / a.abs().max().clamp_min(1e-12)) for a, b in pairs)


Check = Callable[[Sequence[ChannelGroup]], "str | None"]


def exact_groups(
    model: nn.Module,
    groups: list[ChannelGroup],
    example_inputs: Inputs,
    problems: list[str],
    *,
    traced: Traced | None = None,
) -> list[ChannelGroup]:
    """The groups whose zeroed channels compute what their removal computes, with a random half
    of every group's channels dropped (and its complement where a group is small,
    :func:`_draws`).

    One check of all groups; when it fails, the groups to blame are found by bisection
    (:func:`_bisect`), with the groups of one kind side by side (:func:`_kind`), and the
    groups that are left are checked together once more: groups that match alone and fail
    together (a shrink that maps one group through another's removed channels) are then all
    left out. Each group left out adds its reason to ``problems``, in the order of ``groups``.

    ``model`` is left as it is: every check uses a copy. ``traced``, the copy of ``model`` the
    groups were found on, serves the first check and is used up by it.
    """
    if not groups:
        return groups
    given = as_tuple(example_inputs)
    if traced is None:  # the copy is traced on the inputs the checks run on
        copy, dg = bare_copy(model), None
        outputs = _shapes(copy, given) or []
    else:
        copy, dg, outputs = traced.model, traced.dg, traced.outputs
    reference: list[torch.Tensor] = []
    inputs = check_inputs(copy, given, outputs, found=reference)
    bench = _workbench(model, copy, dg, inputs, reference)
    keeps = _draws(groups)
    passed: set[frozenset[str]] = set()

    def check(some: Sequence[ChannelGroup]) -> str | None:
        for keep in keeps:
            copy, dg = bench()
            problem = _matches(copy, dg, some, keep, inputs)
            if problem is not None:
                return problem
        passed.add(frozenset(g.name for g in some))
        return None

    problem = check(groups)
    if problem is None:
        return groups
    failed: dict[str, str] = {}
    _bisect(sorted(groups, key=_kind), problem, check, failed)
    exact = [g for g in groups if g.name not in failed]
    if len(exact) > 1 and frozenset(g.name for g in exact) not in passed:
        joint = check(exact)
        if joint is not None:
            failed |= {g.name: f"{TOGETHER}{joint}" for g in exact}
            exact = []
    problems.extend(f"group {g.name!r}: {failed[g.name]}" for g in groups if g.name in failed)
    return exact


def _kind(group: ChannelGroup) -> str:
    """The group's name with its numbers replaced: the same layer of every block has one kind.
    A layer that fails mostly fails in every block, and bad groups side by side are found in
    fewer checks than bad groups spread out (one failing half, not many)."""
    return re.sub(r"\d+", "#", group.name)


def _bisect(
    groups: Sequence[ChannelGroup], problem: str, check: Check, failed: dict[str, str]
) -> None:
    """Adds to ``failed`` the groups of ``groups`` (which failed with ``problem``) to blame, each
    with its problem. The first half is checked: if it fails, it is bisected in turn and the
    second half checked; if it passes, the second half must be what fails and is bisected
    without a check of its own. One bad group among ``n`` costs at most ``2 log2 n`` checks.

    A group is blamed when the half holding it failed and the other half passed; if the two
    failed only together, that blames a group that passes alone, which is left out all the
    same (:func:`exact_groups` checks the rest together once more)."""
    if len(groups) == 1:
        failed[groups[0].name] = problem
        return
    half = len(groups) // 2
    first, second = groups[:half], groups[half:]
    first_problem = check(first)
    if first_problem is None:
        _bisect(second, problem, check, failed)
        return
    _bisect(first, first_problem, check, failed)
    second_problem = check(second)
    if second_problem is not None:
        _bisect(second, second_problem, check, failed)
