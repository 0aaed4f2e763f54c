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
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch_pruning as tp
from torch_pruning._helpers import GroupItem

__all__ = ["indexed_groups"]

_Group = tp.dependency.Group


@contextmanager
def indexed_groups() -> Iterator[None]:
    """Inside the block, Torch-Pruning's groups answer ``has_pruning_op`` and do
    ``add_and_merge`` through an index by (target node, handler)."""
    scan, merge = _Group.has_pruning_op, _Group.add_and_merge

    def has_pruning_op(self: Any, dep: Any, idxs: Any) -> bool:
        indexed, seen = self.__dict__.setdefault("_compress_index", [0, {}])
        items = self._group
        try:
            for item_dep, item_idxs in items[indexed:]:
                seen.setdefault((item_dep.target, item_dep.handler), []).append(item_idxs)
            self._compress_index[0] = len(items)
            candidates = seen.get((dep.target, dep.handler), ())
        except TypeError:  # a handler that cannot be hashed
            return bool(scan(self, dep, idxs))
        return any(c == idxs for c in candidates)

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
        # what the scan does at the first item of this layer and handler, which is item i
        first, visited, merged = self._group[i], set(), []
        for index in first.idxs + idxs:
            if index.idx not in visited:
                merged.append(index)
                visited.add(index.idx)
        self._group[i] = GroupItem(dep=first.dep, idxs=merged)

    _Group.has_pruning_op, _Group.add_and_merge = has_pruning_op, add_and_merge
    try:
        yield
    finally:
        _Group.has_pruning_op, _Group.add_and_merge = scan, merge
