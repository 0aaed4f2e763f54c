"""Torch-Pruning for transformers' ``Conv1D`` (GPT-2's layers) and GPT-2's fused attention.

``transformers.pytorch_utils.Conv1D`` is a Linear whose weight is stored ``(in, out)``.
Torch-Pruning prunes such a layer through its extension point, a customised pruner
(:class:`Conv1DPruner`), so no module of the user's model is replaced. GPT-2 computes q, k
and v with one ``Conv1D`` of ``3 * hidden`` outputs and splits them along the last dim;
Torch-Pruning maps channels through a split along dim 1 only, so :func:`map_last_dim_splits`
adds the same index mapping for splits along the last dim, which couples channel ``i`` of q,
k and v (and the output projection's input ``i``), and keeps the channel order through the
views that split each part into heads. After the surgery :func:`fit_attention` sets
the attention block's ``split_size`` and ``num_heads`` to what the smaller ``c_attn`` holds.

Example:
    >>> from torch import nn
    >>> pruners(nn.Linear(2, 2))  # no transformers Conv1D in the model: nothing to add
    {}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch_pruning as tp
from torch import nn
from torch_pruning.dependency import shape_infer
from torch_pruning.dependency.index_mapping import _SplitIndexMapping

from compress.analysis.node_kinds import is_transposed_linear

__all__ = [
    "Conv1DPruner",
    "fit_attention",
    "map_last_dim_splits",
    "matrix_layer_types",
    "out_width",
    "pruners",
]


class Conv1DPruner(tp.pruner.function.BasePruningFunc):
    """Torch-Pruning's pruner for a ``Conv1D``: output channels are weight columns and bias
    entries, input channels weight rows."""

    TARGET_MODULES = None  # any Conv1D-like layer: weight (nx, nf), bias (nf,)

    def prune_out_channels(self, layer: Any, idxs: Sequence[int]) -> nn.Module:
        keep = sorted(set(range(layer.nf)) - set(idxs))
        layer.nf = len(keep)
        layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 1)
        if layer.bias is not None:
            layer.bias = self._prune_parameter_and_grad(layer.bias, keep, 0)
        return layer

    def prune_in_channels(self, layer: Any, idxs: Sequence[int]) -> nn.Module:
        keep = sorted(set(range(layer.nx)) - set(idxs))
        layer.nx = len(keep)
        layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 0)
        return layer

    def get_out_channels(self, layer: Any) -> int:
        return int(layer.nf)

    def get_in_channels(self, layer: Any) -> int:
        return int(layer.nx)


def matrix_layer_types(model: nn.Module) -> tuple[type[nn.Module], ...]:
    """The ``Conv1D`` class when ``model`` holds one, for scope selection; else ``()``."""
    return tuple({type(m) for m in model.modules() if is_transposed_linear(m)})


def pruners(model: nn.Module) -> dict[type[nn.Module], Conv1DPruner]:
    """Customised pruners for Torch-Pruning's ``build_dependency``, by layer type."""
    return {kind: Conv1DPruner() for kind in matrix_layer_types(model)}


def map_last_dim_splits(dg: tp.DependencyGraph) -> None:
    """Index mapping for splits along the last dim of a tensor (Torch-Pruning maps dim 1 only),
    so a fused q/k/v projection's channel ``i`` of each part is coupled, not its ``i``-th
    output three times."""
    for node in dg.module2node.values():
        grad_fn: Any = node.grad_fn
        if node.type != tp.ops.OPTYPE.SPLIT or not node.enable_index_mapping:
            continue
        sizes = getattr(grad_fn, "_saved_self_sym_sizes", None)
        dim = getattr(grad_fn, "_saved_dim", None)
        offsets = node.module.offsets
        if sizes is None or dim is None or offsets is None or len(sizes) < 3:
            continue
        if dim not in (-1, len(sizes) - 1) or not _channels_last(dg, node, sizes):
            continue
        # One dependency per part, in order: two parts may feed the same op (q * k).
        done: set[int] = set()
        for i, out_node in enumerate(node.outputs):
            span = offsets[i : i + 2]
            for deps, target, reverse in (
                (node.dependencies, out_node, False),
                (out_node.dependencies, node, True),
            ):
                dep = next((d for d in deps if d.target is target and id(d) not in done), None)
                if dep is not None:
                    done.add(id(dep))
                    dep.index_mapping[0] = _SplitIndexMapping(offset=span, reverse=reverse)
            if out_node.type == tp.ops.OPTYPE.RESHAPE:
                _keep_channel_order(out_node, span[1] - span[0])


def _keep_channel_order(node: Any, part: int) -> None:
    """A view of one part that splits its last dim into heads, ``(B, T, part)`` to ``(B, T, H,
    head_dim)``, keeps the channel order. Torch-Pruning's reshape mapping infers the part's
    width through the split (the whole fused layer's) and would map channel ``i`` to ``3i``;
    the view is marked element-wise (channel ``i`` stays ``i``) and that mapping dropped."""
    sizes = getattr(node.grad_fn, "_saved_self_sym_sizes", None)
    if sizes is None or len(sizes) < 3 or sizes[-1] != part:
        return
    node.type = tp.ops.OPTYPE.ELEMENTWISE  # Torch-Pruning re-maps RESHAPE nodes on every query
    for dep in node.dependencies:
        if dep.target.type != tp.ops.OPTYPE.SPLIT:  # the split's own mapping stays
            dep.index_mapping[0] = None
    for other in node.outputs:
        for dep in other.dependencies:
            if dep.target is node:
                dep.index_mapping[0] = None


def _channels_last(dg: tp.DependencyGraph, node: Any, sizes: Sequence[int]) -> bool:
    """Whether the split's input holds its channels in the last dim (a Linear's output), not
    in dim 1 (a conv's): the channels Torch-Pruning infers for it fill the last dim only."""
    if sizes[1] == sizes[-1] or node.module.offsets[-1] != sizes[-1]:
        return False
    found = [shape_infer.infer_out_channels_recursively(dg, n, [0]) for n in node.inputs]
    return any(c == sizes[-1] for c in found)


def fit_attention(model: nn.Module) -> None:
    """GPT-2's attention splits ``c_attn``'s output by its ``split_size`` attribute: after heads
    are removed, it and ``num_heads`` follow the smaller ``c_attn``. timm's ``Attention``
    reshapes its fused ``qkv`` by ``num_heads`` and ``head_dim`` and its output by
    ``attn_dim``: they follow the smaller ``qkv``."""
    for module in model.modules():
        block: Any = module
        qkv, head_dim = getattr(block, "qkv", None), getattr(block, "head_dim", None)
        if isinstance(qkv, nn.Linear) and isinstance(block.__dict__.get("num_heads"), int):
            if isinstance(head_dim, int) and head_dim > 0:
                block.num_heads = qkv.out_features // (3 * head_dim)
                if isinstance(block.__dict__.get("attn_dim"), int):
                    block.attn_dim = block.num_heads * head_dim
        c_attn = getattr(block, "c_attn", None)
        split, head_dim = getattr(block, "split_size", None), getattr(block, "head_dim", None)
        if not (isinstance(c_attn, nn.Module) and is_transposed_linear(c_attn)):
            continue
        if not isinstance(split, int):
            continue
        parts = 2 if getattr(block, "is_cross_attention", False) else 3
        block.split_size = out_width(c_attn) // parts
        if isinstance(head_dim, int) and head_dim > 0:
            block.num_heads = block.split_size // head_dim


def out_width(module: nn.Module) -> int:
    """A ``Conv1D``'s number of outputs."""
    layer: Any = module
    return int(layer.nf)
