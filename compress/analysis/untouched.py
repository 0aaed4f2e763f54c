"""Analysis never changes the model it analyses.

Tracing a model can leave things behind: ``torch.fx`` stores every tensor it meets that is not a
parameter or buffer (a masked weight read inside a custom module's ``forward``, say timm's
norm-act layers) as a ``_tensor_constant*`` attribute on the traced root, and such a tensor,
being the result of an operation, breaks ``copy.deepcopy`` and thus ``strip()``.
:func:`untouched` removes whatever a block of analysis added and restores training modes.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Linear(2, 2)
    >>> with untouched(net):
    ...     net.scratch = torch.ones(1)
    ...     net.eval()  # doctest: +ELLIPSIS
    Linear(...)
    >>> hasattr(net, "scratch"), net.training
    (False, True)
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["copy_model", "untouched"]


@contextmanager
def untouched(model: nn.Module) -> Iterator[None]:
    """Within the block, tensors, parameters, buffers and submodules added to any module of
    ``model`` are removed at exit, and every module's ``training`` flag is restored."""
    before = {
        module: (
            {k for k, v in module.__dict__.items() if isinstance(v, torch.Tensor)},
            set(module._parameters),
            set(module._buffers),
            set(module._modules),
            module.training,
        )
        for module in model.modules()
    }
    try:
        yield
    finally:
        for module, (tensors, params, buffers, children, training) in before.items():
            for key in [
                k
                for k, v in module.__dict__.items()
                if isinstance(v, torch.Tensor) and k not in tensors
            ]:
                del module.__dict__[key]
            for store, known in (
                (module._parameters, params),
                (module._buffers, buffers),
                (module._modules, children),
            ):
                for key in [k for k in store if k not in known]:
                    del store[key]
            module._non_persistent_buffers_set &= set(module._buffers)
            module.training = training


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)`` for models that keep results of operations beside their
    weights: a cache of attention biases that LeViT and EfficientFormer fill in eval mode holds
    tensors with autograd history, which ``copy.deepcopy`` refuses ("Only Tensors created
    explicitly by the user (graph leaves) support the deepcopy protocol"). Those are copied
    detached: a cache, not a weight.

    Example:
        >>> net = nn.Linear(2, 2)
        >>> net.cache = {"bias": net.weight * 2}  # a result of an operation
        >>> bool(copy_model(net).cache["bias"].requires_grad)
        False
    """
    memo: dict[int, object] = {}
    for module in model.modules():
        for key, value in module.__dict__.items():
            if key not in ("_parameters", "_buffers", "_modules"):
                _detached(value, memo, depth=3)
    return copy.deepcopy(model, memo)


def _detached(value: object, memo: dict[int, object], depth: int) -> None:
    """Puts a detached copy of every non-leaf tensor found in ``value`` (containers searched
    ``depth`` levels deep) into ``memo``, the table ``copy.deepcopy`` reuses."""
    if isinstance(value, torch.Tensor):
        if value.grad_fn is not None:
            memo[id(value)] = value.detach().clone()
    elif depth and isinstance(value, dict):
        for v in value.values():
            _detached(v, memo, depth - 1)
    elif depth and isinstance(value, (list, tuple)):
        for v in value:
            _detached(v, memo, depth - 1)
