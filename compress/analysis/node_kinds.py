"""How each op of a ``torch.fx`` graph moves channels, for the effective-sparsity sweep.

:func:`classify` sorts a traced node into one kind: ``layer`` (a prunable Linear or conv),
``pass`` (keeps channels apart: activations, pooling, BatchNorm, elementwise ops), ``mix`` (any
live input makes every output live: LayerNorm, GroupNorm, softmax), ``cat`` (channel concat),
``flatten``, ``noinfo`` (shapes and sizes only) or ``unknown``.
"""

from __future__ import annotations

import operator
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

_PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus,
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.LPPool1d, nn.LPPool2d, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
)  # fmt: skip
_MIX_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.Softmax, nn.LogSoftmax)
_PASS_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.prelu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish,
    F.hardswish, F.hardsigmoid, F.hardtanh, F.softplus, F.sigmoid, F.tanh,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
    F.batch_norm, F.instance_norm, F.interpolate,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.abs, torch.neg, torch.exp,
    torch.clamp, torch.clone, torch.add, torch.sub, torch.mul, torch.div, torch.maximum,
    torch.minimum, torch.pow, torch.where,
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
    operator.truediv, operator.itruediv, operator.neg, operator.pow,
}  # fmt: skip
_PASS_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "abs", "neg", "exp", "clamp",
    "clamp_", "clone", "contiguous", "detach", "float", "double", "half", "bfloat16", "to",
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow",
}  # fmt: skip
_MIX_FUNCTIONS = {F.layer_norm, F.group_norm, F.softmax, F.log_softmax, torch.softmax}
_MIX_METHODS = {"softmax", "log_softmax"}
_REDUCE = {torch.mean, torch.sum, torch.amax, torch.amin, "mean", "sum", "amax", "amin"}
_SQUEEZE = {torch.squeeze, torch.unsqueeze, "squeeze", "unsqueeze"}
_RESHAPE = {torch.reshape, "view", "reshape"}
_NO_INFO_FUNCTIONS = {getattr, len}  # shapes, dtypes: nothing that flows from the input values
_NO_INFO_METHODS = {"size", "dim", "numel"}


def is_transposed_linear(module: nn.Module) -> bool:
    """``transformers.pytorch_utils.Conv1D``: a Linear whose weight is stored ``(in, out)``.
    Looked up among loaded modules: a model that holds one has imported transformers."""
    hf = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(hf, "Conv1D", None)
    return conv1d is not None and isinstance(module, conv1d)


def is_prunable(module: nn.Module) -> bool:
    weight = module._parameters.get("weight")
    layer = isinstance(module, PRUNABLE) or is_transposed_linear(module)
    return layer and isinstance(weight, torch.Tensor)


def shape_of(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    shape = getattr(meta, "shape", None)  # None as well for ops returning tuples
    return None if shape is None else tuple(shape)


def _dims_keep_channels(dims: Any, node: Any) -> bool:
    """True when every dim in ``dims`` is a spatial one (>= 2), so channel axis 1 is untouched."""
    dims = dims if isinstance(dims, (tuple, list)) else (dims,)
    shape = shape_of(node)
    for d in dims:
        if not isinstance(d, int):
            return False
        if d < 0:
            if shape is None:
                return False
            d += len(shape)
        if d < 2:
            return False
    return True


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def classify(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """One of: layer, pass, mix, cat, flatten, noinfo, unknown."""
    target: Any = node.target
    if node.op == "call_module":
        module = modules[target]
        if is_layer(node, modules):
            return "layer"
        if isinstance(module, _PASS_MODULES):
            return "pass"
        if isinstance(module, _MIX_MODULES):
            return "mix"
        if isinstance(module, nn.Flatten):
            return _flatten_kind(node, module.start_dim, module.end_dim)
        return "unknown"
    if node.op == "call_function" and target in _NO_INFO_FUNCTIONS:
        return "noinfo"
    if node.op == "call_method" and target in _NO_INFO_METHODS:
        return "noinfo"
    if target in _PASS_FUNCTIONS or (node.op == "call_method" and target in _PASS_METHODS):
        return "pass"
    if target in _MIX_FUNCTIONS or (node.op == "call_method" and target in _MIX_METHODS):
        return "mix"
    if target in (torch.cat, torch.concat):
        dim = _cat_dim(node)
        return "unknown" if dim is None else "cat" if dim == 1 else "pass"
    if target in (torch.flatten, "flatten"):
        return _flatten_kind(node, _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1))
    if target in _REDUCE:
        dims = _arg(node, 1, "dim", None)
        return "pass" if dims is not None and _dims_keep_channels(dims, node.args[0]) else "unknown"
    if target in _SQUEEZE:
        dim = _arg(node, 1, "dim", None)
        squeeze_all = dim is None and target in (torch.squeeze, "squeeze")
        return "pass" if squeeze_all or _dims_keep_channels(dim, node.args[0]) else "unknown"
    if target in _RESHAPE:
        return _reshape_kind(node)
    if target is operator.getitem:
        return _getitem_kind(node, modules)
    return "unknown"


def _cat_dim(node: fx.Node) -> int | None:
    dim = _arg(node, 1, "dim", 0)
    if dim >= 0:
        return int(dim)
    shape = shape_of(node)
    return None if shape is None else dim + len(shape)


def _flatten_kind(node: fx.Node, start: int, end: int) -> str:
    if start == 1 and end == -1:
        return "flatten"
    if _dims_keep_channels((start, end), node.args[0]):
        return "pass"
    return "unknown"


def _getitem_kind(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """``x[:, :, None]`` keeps (N, C); an item of an op we do not understand stays opaque."""
    source, index = node.args[0], node.args[1]
    if isinstance(source, fx.Node) and classify(source, modules) == "unknown":
        return "pass"  # the source is already "all alive", and already named in the warning
    full = slice(None)
    if isinstance(index, tuple) and len(index) >= 2 and index[0] == full and index[1] == full:
        return "pass"
    return "unknown"


def _reshape_kind(node: fx.Node) -> str:
    """``x.view(n, -1)`` and friends flatten; a reshape keeping (N, C) is a pass-through."""
    sizes = node.args[1:]
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = tuple(sizes[0])
    if len(sizes) == 2:
        return "flatten"
    before, after = shape_of(node.args[0]), shape_of(node)
    if before is not None and after is not None and before[:2] == after[:2]:
        return "pass"
    return "unknown"


def is_layer(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return node.op == "call_module" and is_prunable(modules[str(node.target)])


def op_name(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{type(modules[str(node.target)]).__name__} ({node.target})"
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return getattr(node.target, "__name__", str(node.target))
