"""Compares what two forms of one model compute: the masked model and ``strip()``'s plain one,
the plain model and its export. A difference beyond a tolerance scaled to the output is a
``CompressError`` naming the largest difference, raised before anything is written.

Example:
    >>> import torch
    >>> net = torch.nn.Linear(4, 2)
    >>> x = (torch.randn(3, 4),)
    >>> check_same(outputs(net, x), outputs(net, x), "strip()")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from compress.errors import CompressError

__all__ = ["check_finite_outputs", "check_same", "leaves", "on_device", "outputs", "tolerance"]

RTOL = 1e-4
"""Relative to the largest output value, for float32; wider for lower precisions (16 ulps)."""


def leaves(out: object) -> list[torch.Tensor]:
    """The tensors of a model output (a tensor, or tuples, lists and dicts of them; Hugging
    Face's ``ModelOutput`` is a dict), in order; other values (caches) are left out."""
    if isinstance(out, torch.Tensor):
        return [out if out.is_floating_point() else out.float()]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in leaves(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in leaves(v)]
    return []


def on_device(
    inputs: Sequence[torch.Tensor | None], device: torch.device | str
) -> tuple[torch.Tensor, ...]:
    """``inputs`` moved to ``device``; a ``None`` among them (Whisper's positional
    ``attention_mask=None``) stays ``None``."""
    return tuple(t if t is None else t.to(device) for t in inputs)  # type: ignore[misc]


def outputs(model: nn.Module, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The output tensors of ``model`` on ``inputs`` in eval mode, without autograd; every
    module's training flag is restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            return [t.detach() for t in leaves(model(*inputs))]
    finally:
        for m, mode in modes:
            m.training = mode


def tolerance(want: torch.Tensor) -> float:
    """The largest difference allowed from ``want``: ``RTOL`` (or 16 ulps of a lower precision)
    of its largest absolute value."""
    eps = torch.finfo(want.dtype).eps if want.is_floating_point() else 0.0
    scale = float(want.abs().max()) if want.numel() else 0.0
    return max(RTOL, 16 * eps) * max(scale, 1e-6)


def check_same(
    want: list[torch.Tensor],
    got: list[torch.Tensor],
    what: str,
    against: str = "the masked model",
) -> None:
    """Raises ``CompressError`` when ``got`` (``what``'s output tensors) differs from ``want``
    (``against``'s) by more than :func:`tolerance` in any tensor, naming the largest
    difference and where it is."""
    if len(want) != len(got):
        raise CompressError(
            f"{what}: gives {len(got)} output tensors, {against} {len(want)}; nothing is written"
        )
    for k, (a, b) in enumerate(zip(want, got, strict=True)):
        if a.shape != b.shape:
            raise CompressError(
                f"{what}: output {k} has shape {tuple(b.shape)}, {against} "
                f"{tuple(a.shape)}; nothing is written"
            )
        if not a.numel():
            continue
        if not bool(torch.isfinite(a).all()):  # NaN == NaN would pass any comparison
            raise CompressError(
                f"{what}: {against}'s output {k} holds NaN or Inf, nothing to compare with; "
                "nothing is written"
            )
        diff = (a.float() - b.float().to(a.device)).abs()
        diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
        worst = int(diff.argmax())
        tol = tolerance(a)
        if float(diff.flatten()[worst]) > tol:
            where = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape))
            raise CompressError(
                f"{what}: output {k} differs from {against}'s by "
                f"{float(diff.flatten()[worst]):.3g} at {list(where)} (output scale "
                f"{float(a.abs().max()):.3g}, tolerance {tol:.2g}); nothing is written"
            )


def non_finite(model: nn.Module) -> list[str]:
    """The parameters and buffers of ``model`` (non-persistent buffers too, which no
    ``state_dict`` holds) that hold NaN or Inf."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return [
        name
        for name, t in tensors
        if t.is_floating_point() and t.device.type != "meta" and not bool(torch.isfinite(t).all())
    ]


def first_non_finite(out: Sequence[torch.Tensor]) -> int | None:
    """The index of the first output tensor holding NaN or Inf (None: all are finite)."""
    return next((k for k, t in enumerate(out) if not bool(torch.isfinite(t).all())), None)


def check_finite_outputs(
    out: Sequence[torch.Tensor], model: nn.Module, what: str, whose: str, note: str = ""
) -> None:
    """Raises ``CompressError`` when an output of ``model`` on the example inputs holds NaN or
    Inf, naming the first parameter or buffer of ``model`` that does (a non-persistent buffer
    passes every ``state_dict`` check)."""
    k = first_non_finite(out)
    if k is None:
        return
    names = non_finite(model)
    culprit = (
        f" ({names[0]} holds NaN or Inf)"
        if names
        else " (no weight or buffer does: the outputs overflow, the weights diverged)"
    )
    raise CompressError(
        f"{what}: {whose}'s output {k} holds NaN or Inf on the example inputs{culprit}{note}; "
        "nothing is written"
    )
