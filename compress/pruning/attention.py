"""What Torch-Pruning's dependency graph needs to be told about Hugging Face attention blocks.

Two things in a Llama-style block (Llama, Mistral, Qwen2, Qwen3, Gemma2: the models that copy
Llama's ``modeling`` code) defeat the graph:

- **Rotary embeddings.** ``rotate_half(x)`` is ``cat(-x[..., d/2:], x[..., :d/2])``: a permutation
  of each head's channels that the graph follows round and round the query/key cycle, finding a
  new ordering of the same indices each time, so the group search never finishes. Filter pruning
  removes whole heads, and the rotation never leaves a head, so :func:`rotary_as_identity` lets
  the trace see ``rotate_half`` as the identity. The real model, rotation included, is what the
  numerical check of every group and the shrunk model run.
- **Grouped-query attention.** The graph couples queries, keys and values position by position
  through the attention op, as if the key and value projections were as wide as the query
  projection. With ``num_key_value_groups`` query heads per key/value head they are narrower, so
  :func:`grouped_query_heads` maps their positions itself: a key/value head goes with the query
  heads that read it, and those are kept or removed together (Torch-Pruning's ``num_heads``
  grouping, with the layout read from the block instead of given by hand).

A third thing is told rather than fixed: a parameter every head shares (Qwen3's per-head query
and key norms, ``head_dim`` elements) stays whole when whole heads go
(:func:`per_head_parameter`). And a decoder's key/value cache, which GPT-2 and Llama return by
default and on which Torch-Pruning's trace fails, is off while tracing and exporting
(:func:`cache_off`), as in training.

``rotary_as_identity`` patches the module that defines the model's layers while the trace runs,
so no forward pass of that module should run in another thread meanwhile.

Example:
    >>> from torch import nn
    >>> with rotary_as_identity(nn.Linear(2, 2)):  # nothing to patch in a plain layer
    ...     pass
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType
from typing import Any, Literal

import torch
from torch import nn

__all__ = ["Item", "grouped_query_heads", "per_head_parameter", "rotary_as_identity"]

Item = tuple[str, str, int, Literal["producer", "norm", "consumer", "other"], list[int], list[int]]
"""(module name, parameter name, dim, role, positions, root channels) of one group member."""


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


@contextmanager
def rotary_as_identity(model: nn.Module) -> Iterator[None]:
    """Inside the block, ``rotate_half`` of every module that defines the model's layers returns
    its input. Only for tracing: the rotation permutes channels within a head, which the
    dependency graph cannot follow to an end (see the module docstring)."""
    patched: dict[ModuleType, object] = {}
    for layer in model.modules():
        source = sys.modules.get(type(layer).__module__)
        if source is None or source in patched:
            continue
        rotate = getattr(source, "rotate_half", None)
        if callable(rotate):
            patched[source] = rotate
            source.rotate_half = _same  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for source, rotate in patched.items():
            source.rotate_half = rotate  # type: ignore[attr-defined]


@contextmanager
def cache_off(model: nn.Module) -> Iterator[None]:
    """Inside the block, Hugging Face models run without their key/value cache (every
    ``config.use_cache`` among the model's modules is False), as in training. Only for tracing:
    Torch-Pruning's trace fails on the cache that GPT-2 returns by default."""
    configs: dict[int, Any] = {}
    for layer in model.modules():
        config: Any = getattr(layer, "config", None)
        if getattr(config, "use_cache", None) is True:
            configs[id(config)] = config
    for config in configs.values():
        config.use_cache = False
    try:
        yield
    finally:
        for config in configs.values():
            config.use_cache = True


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def _layout(model: nn.Module, block_name: str) -> tuple[int, int] | None:
    """(head_dim, query heads per key/value head) of a grouped-query attention block, or None."""
    block = _block(model, block_name)
    head, rep = getattr(block, "head_dim", None), getattr(block, "num_key_value_groups", None)
    if isinstance(head, int) and isinstance(rep, int) and head > 0 and rep > 1:
        return head, rep
    return None


def per_head_parameter(model: nn.Module, owner: str, param: torch.Tensor) -> bool:
    """Whether ``param`` of module ``owner`` is shared by every head of its attention block, as
    the weight of Qwen3's per-head query and key norms is (``head_dim`` elements): removing whole
    heads leaves it as it is, and a norm over one head's channels sees a removed head as zeros."""
    head = getattr(_block(model, _parent(owner)), "head_dim", None)
    return isinstance(head, int) and param.dim() == 1 and param.numel() == head


def _block(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _width(model: nn.Module, name: str) -> int | None:
    layer = model.get_submodule(name)
    return layer.out_features if isinstance(layer, nn.Linear) else None


def grouped_query_heads(
    model: nn.Module, items: Sequence[Item]
) -> tuple[list[Item], list[tuple[int, int]]]:
    """``items`` with the key and value projections of grouped-query attention blocks mapped to
    the query heads that read them, and the pairs of root channels that must stay together: all
    the channels of the query heads that share one key/value head. A key/value head is then one
    unit with its query heads, which keeps ``num_attention_heads / num_key_value_heads`` whole
    and q, k, v and the output projection consistent.

    Raises ``ValueError`` when the block's projections are not laid out as expected (the query
    projection is not the group's full width), so the group is left out.
    """
    blocks: dict[str, tuple[int, int]] = {}
    for name, _, _, role, _, _ in items:
        layout = _layout(model, _parent(name)) if role == "producer" else None
        if layout is not None:
            blocks[_parent(name)] = layout
    if not blocks:
        return list(items), []
    out = list(items)
    ties: list[tuple[int, int]] = []
    for block, (head, rep) in blocks.items():
        mine = [
            k
            for k, (name, _, dim, role, _, _) in enumerate(out)
            if role == "producer" and dim == 0 and _parent(name) == block
        ]
        if len(mine) < 2:  # an output projection alone (the residual stream's group)
            continue
        widths = {k: _width(model, out[k][0]) for k in mine}
        q_width = max((w for w in widths.values() if w is not None), default=0)
        query = next((k for k in mine if widths[k] == q_width and out[k][1] == "weight"), None)
        if query is None or q_width % (head * rep):
            raise ValueError(f"attention block {block!r} has no query projection in the group")
        root_of = dict(zip(out[query][4], out[query][5], strict=True))
        if sorted(root_of) != list(range(q_width)):
            raise ValueError(
                f"attention block {block!r}: the group covers only part of the query heads"
            )
        unit = head * rep  # the query channels that read one key/value head
        ties.extend((root_of[c], root_of[c - c % unit]) for c in range(q_width))
        kv_width = q_width // rep
        for k in mine:
            if widths[k] != kv_width:
                continue
            name, param, dim, role, _, _ = out[k]
            positions = list(range(kv_width))
            roots = [root_of[(p // head) * unit + p % head] for p in positions]
            out[k] = (name, param, dim, role, positions, roots)
    return out, ties
