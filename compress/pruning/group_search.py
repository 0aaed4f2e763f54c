"""Torch-Pruning's group search with its two lookups indexed: the same groups, found faster.

``DependencyGraph.get_pruning_group`` walks the graph from a root and, for every dependency it
reaches, asks whether the group already holds that operation (``Group.has_pruning_op``), a scan
of every item so far; it then merges the items of one layer and handler
(``Group.add_and_merge``), another scan per item. Both are quadratic in the size of the group:
on MobileViTv2 (timm ``mobilevitv2_050``), whose ``qkv_proj`` groups grow to thousands of items,
they took 175 of the 198 s the build took. Inside :func:`indexed_groups` both look items up by
(layer node, handler) instead, and compare indices only with the items of that layer and handler,
in the order the scan did, so the answers are the same ones.

Both index an item when it is added: the search only adds items (``add_dep``) to the group it
asks ``has_pruning_op`` of, and only merges (``add_and_merge``) into a new group. A handler that
cannot be hashed falls back to the scan.

Given ``widest``, the search also stops where it runs away: Torch-Pruning maps channels through
a reshape as a flatten with a stride, and through Swin's window partition and relative position
bias (torchvision ``swin_t``) that multiplies one channel into 32, then 32768, then a million
positions, round after round; one group never finished. No channel index of a layer exceeds the
widest dimension of any parameter (a flatten before a linear layer ends at its input width), so
a longer index list means the mapping is wrong, and :class:`Runaway` leaves the group out.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch_pruning as tp
from torch import nn
from torch_pruning._helpers import GroupItem

__all__ = ["Runaway", "indexed_groups", "repeats_heads", "searched", "widest_dim"]

_Group = tp.dependency.Group


class Runaway(Exception):
    """Torch-Pruning's group search mapped channels to more positions than any layer has;
    ``reached`` holds the dependencies it had added by then (the searches from the layers whose
    output channels they prune would run away the same way)."""

    def __init__(self, message: str, reached: list[Any]) -> None:
        super().__init__(message)
        self.reached = reached


def widest_dim(model: nn.Module) -> int:
    """The longest dimension of any parameter of ``model`` (1 without parameters)."""
    return max((max(p.shape, default=1) for p in model.parameters()), default=1)


@contextmanager
def indexed_groups(widest: int | None = None) -> Iterator[None]:
    """Inside the block, Torch-Pruning's groups answer ``has_pruning_op`` and do
    ``add_and_merge`` through an index by (target node, handler); with ``widest``, a search
    that maps channels to more than ``widest`` positions raises :class:`Runaway`."""
    scan, merge, add = _Group.has_pruning_op, _Group.add_and_merge, _Group.add_dep

    def add_dep(self: Any, dep: Any, idxs: Any) -> None:
        if widest is not None and len(idxs) > widest:
            raise Runaway(
                f"Torch-Pruning's group search maps its channels to {len(idxs)} positions at "
                f"{dep.target.name}, more than the widest parameter dimension ({widest}): it "
                "cannot follow a reshape there (a window partition, say)",
                [item.dep for item in self._group],
            )
        add(self, dep, idxs)

    def has_pruning_op(self: Any, dep: Any, idxs: Any) -> bool:
        indexed, seen = self.__dict__.setdefault("_compress_index", [0, {}])
        items = self._group
        try:  # the index lists of a layer and handler, as tuples: equal lists, equal tuples
            for item_dep, item_idxs in items[indexed:]:
                seen.setdefault((item_dep.target, item_dep.handler), set()).add(tuple(item_idxs))
            self._compress_index[0] = len(items)
            return tuple(idxs) in seen.get((dep.target, dep.handler), ())
        except TypeError:  # a handler or an index that cannot be hashed
            return bool(scan(self, dep, idxs))

    def add_and_merge(self: Any, dep: Any, idxs: Any) -> None:
        where = self.__dict__.setdefault("_compress_merge", {})
        try:
            i = where.get((dep.target, dep.handler))
        except TypeError:
            merge(self, dep, idxs)
            return
        if i is None:
            where[(dep.target, dep.handler)] = len(self._group)
            self.add_dep(dep, idxs)
            return
        # what the scan does at the first item of this layer and handler, which is item i: its
        # indices then these, each idx once, first come first kept; the merged list and the
        # idx seen are kept per item, so a merge costs the new indices only
        merged_at = self.__dict__.setdefault("_compress_merged", {})
        first = self._group[i]
        if i not in merged_at:
            merged_at[i] = ([], set())
            idxs = list(first.idxs) + list(idxs)
        merged, visited = merged_at[i]
        for index in idxs:
            if index.idx not in visited:
                merged.append(index)
                visited.add(index.idx)
        self._group[i] = GroupItem(dep=first.dep, idxs=merged)

    _Group.has_pruning_op, _Group.add_and_merge = has_pruning_op, add_and_merge
    _Group.add_dep = add_dep
    try:
        yield
    finally:
        _Group.has_pruning_op, _Group.add_and_merge, _Group.add_dep = scan, merge, add


_OPS = tp.ops.OPTYPE
_MAPPING_STATE = {
    _OPS.CONCAT: ("concat_sizes",),
    _OPS.SPLIT: ("split_sizes", "offsets"),
    _OPS.SLICE: ("start", "end", "step"),
}
"""The attributes of Torch-Pruning's concat, split and slice nodes that their index mappings
follow (its pruners change them as channels are removed; a concat's offsets are computed
from its sizes when the mappings are)."""


def searched(
    dg: tp.DependencyGraph, module: nn.Module, fn: Any, idxs: list[int]
) -> tp.dependency.Group:
    """``dg.get_pruning_group(module, fn, idxs)``, searched again only when the graph may map
    the channels differently than when it was last searched.

    A search's result follows from the index mappings it met, and those of the concat, split
    and slice nodes it reached follow from their sizes; the search is kept on ``dg`` with
    those sizes, and given again while they are the same. The numerical check removes the same
    channels of a group in check after check of its bisection, on one graph put back each time
    (:mod:`compress.pruning.exactness`): on MobileViTv2 the attention groups that fail were
    searched again in up to six checks, at 0.1-0.15 s each. Searches that reach an unbind, or an
    expand of grouped-query attention (:func:`repeats_heads`), whose mappings follow channel
    counts inferred from the layers around them, are never kept."""
    kept = dg.__dict__.setdefault("_compress_searches", {})
    key = (module, fn, tuple(idxs))
    for state, items in kept.get(key, ()):
        if all(_mapping_state(node) == before for node, before in state):
            group = tp.dependency.Group()
            group._DG = dg
            group._group = [_copied(item) for item in items]
            return group
    group = dg.get_pruning_group(module, fn, idxs)
    reached = {item.dep.target for item in group.items}
    if not any(node.type == _OPS.UNBIND or repeats_heads(node) for node in reached):
        state = [(node, _mapping_state(node)) for node in reached if node.type in _MAPPING_STATE]
        kept.setdefault(key, []).append((state, [_copied(item) for item in group.items]))
    return group


def repeats_heads(node: Any) -> bool:
    """An expand node to 5 dims: the only one Torch-Pruning gives an index mapping (grouped-query
    attention repeating its key and value heads); its update returns at once for the others,
    seeing the traced sizes, which do not change."""
    if node.type != _OPS.EXPAND:
        return False
    sizes = getattr(node.grad_fn, "_saved_self_sym_sizes", None)
    return sizes is not None and len(sizes) == 5


def _mapping_state(node: Any) -> tuple[object, ...]:
    values = (getattr(node.module, name, None) for name in _MAPPING_STATE[node.type])
    return tuple(tuple(v) if isinstance(v, list) else v for v in values)


def _copied(item: Any) -> Any:
    """A group item with index lists of its own: a pruner may sort them in place."""
    copy = GroupItem(dep=item.dep, idxs=list(item.idxs))
    copy.root_idxs = list(item.root_idxs)
    return copy
