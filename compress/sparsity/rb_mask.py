"""RB sparsity's learned mask: the autograd functions, the ``masks.attach`` fn and the logit hooks.

The rules (Bernoulli mask in training with a straight-through gradient to the logits, the
deterministic mask in eval and without autograd, the fixed mask once frozen) are explained in
:mod:`compress.sparsity.rb`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compress import distributed

LOGIT = "weight_rb_logit"
"""Name of the logit parameter on a masked module (of its ``weight``; see :func:`logit_name`)."""
INIT_LOGIT = math.log(0.99 / 0.01)
DENSITY_SCALE = 0.05  # NNCF's ``p`` in SparseLoss
NOISE_EPS = 1e-6  # uniform noise is clamped to [eps, 1 - eps] before its logit, as in NNCF
SEED = 0
STATE = "_compress_rb"


def logit_name(param: str) -> str:
    """The logit parameter of the masked parameter ``param``: ``weight_rb_logit`` for a layer's
    weight, ``gate_up_proj_rb_logit`` for a fused expert parameter."""
    return f"{param}_rb_logit"


def state_key(param: str) -> str:
    """Where ``module.__dict__`` keeps the :class:`RBLayer` of the masked parameter ``param``."""
    return STATE if param == "weight" else f"{STATE}_{param}"


@dataclass(eq=False)
class Shared:
    """What every RB layer of one algorithm shares: the noise source, the multiplier, freezing."""

    scale: float
    frozen: bool = False
    generator: torch.Generator | None = None
    pending_state: torch.Tensor | None = None  # generator state to apply once the device is known

    def generator_for(self, device: torch.device) -> torch.Generator:
        """The generator on ``device``, created (seeded, or from a loaded state) on first use."""
        gen = self.generator
        if gen is None or gen.device.type != device.type:
            gen = torch.Generator(device=device)
            gen.manual_seed(SEED)
            if self.pending_state is not None:
                gen.set_state(self.pending_state)
                self.pending_state = None
            self.generator = gen
        return gen


@dataclass(eq=False)
class RBLayer:
    """Per-module state kept in ``module.__dict__`` (found by ``rb_weight``)."""

    shared: Shared
    hook_ids: tuple[int, int]
    uniform: torch.Tensor | None = field(default=None)


class LearnedMask(torch.autograd.Function):
    """``W * (sigmoid(z) > 0.5)``, ``z = scale * theta (+ noise)``; straight-through to ``theta``.

    ``theta`` receives ``dL/dz`` (not ``scale * dL/dz``): see the lr multiplier in the module
    docstring.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        weight: torch.Tensor,
        theta: torch.Tensor,
        noise: torch.Tensor | None,
        scale: float,
    ) -> torch.Tensor:
        z = scaled(theta, scale)
        if noise is not None:
            z = z + noise
        keep = positive(z)
        ctx.save_for_backward(weight, z, keep)
        return weight * keep

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        weight, z, keep = ctx.saved_tensors
        grad_weight = grad * keep if ctx.needs_input_grad[0] else None
        grad_theta = None
        if ctx.needs_input_grad[1]:
            grad_theta = sigmoid_slope(z, times=(grad, weight))
        return grad_weight, grad_theta, None, None


class KeptCount(torch.autograd.Function):
    """The number of kept weights, ``sum(sigmoid(scale * theta) > 0.5)``; straight-through to
    ``theta``. Weights that ``fixed`` (a 0/1 tensor) drops count as dropped and their logits get
    no gradient."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, theta: torch.Tensor, scale: float, fixed: torch.Tensor | None = None
    ) -> torch.Tensor:
        z = scaled(theta, scale)
        ctx.save_for_backward(z, fixed)
        keep = positive(z)
        return (keep if fixed is None else keep.mul_(fixed)).sum()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        z, fixed = ctx.saved_tensors
        out = sigmoid_slope(z).mul_(grad)
        return (out if fixed is None else out.mul_(fixed)), None, None


class Frozen(torch.autograd.Function):
    """Passes the weight through (the mask buffer applies the frozen mask) and gives the logits
    a zero gradient, so that DDP, which expects a gradient for every trainable parameter,
    still finds one."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.theta_shape = theta.shape
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        return grad, grad.new_zeros(ctx.theta_shape)


def scaled(theta: torch.Tensor, scale: float) -> torch.Tensor:
    return theta if scale == 1.0 else theta * scale


def positive(z: torch.Tensor) -> torch.Tensor:
    """NNCF's mask rule ``sigmoid(z) > 0.5``, computed in ``z``'s dtype, as 1.0 / 0.0 in that
    dtype. It is not ``z > 0``: in float32 the sigmoid of a logit in (0, about 6e-8) rounds to
    exactly 0.5, and NNCF drops that weight. Float, not bool: on CPU a bool mask is slow (``gt``
    writing bools, and a product or sum with a bool tensor, each took 4-9x as long as the float
    version; one thread, 0.15M weights)."""
    s = torch.sigmoid(z)
    return torch.gt(s, 0.5, out=s)


def sigmoid_slope(
    z: torch.Tensor, times: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """``sigmoid'(z) = s * (1 - s)``, multiplied by ``times[0] * times[1]`` if given, in two
    full-size temporaries."""
    s = torch.sigmoid(z)
    tmp = torch.rsub(s, 1.0)
    s.mul_(tmp)
    if times is not None:
        s.mul_(torch.mul(*times, out=tmp))
    return s


def rb_weight(module: nn.Module, weight: torch.Tensor, param: str = "weight") -> torch.Tensor:
    """The ``fn`` given to ``masks.attach``: the weight as the current RB mask leaves it."""
    layer: RBLayer | None = module.__dict__.get(state_key(param))
    if layer is None:  # stripped: the mask buffer holds the final mask
        return weight
    logit = module._parameters[logit_name(param)]
    assert logit is not None
    theta: torch.Tensor = logit
    shared = layer.shared
    sharded = distributed.is_sharded(theta) and not distributed.is_sharded(weight)
    if shared.frozen:
        # a zero gradient for this rank's logits (an optimizer's momentum still moves them)
        theta = distributed.local(theta)
        return Frozen.apply(weight, theta) if torch.is_grad_enabled() else weight
    if sharded:  # FSDP2 gathered the weight whole for this forward pass: the logits too
        theta = distributed.gathered(theta)
    noise = None
    if module.training and torch.is_grad_enabled():
        u = layer.uniform
        if sharded:  # the whole layer's noise, drawn alike on every rank, only for this pass
            u = torch.empty_like(theta, requires_grad=False)
        elif u is None or u.device != theta.device or u.dtype != theta.dtype:
            u = layer.uniform = torch.empty_like(theta, requires_grad=False)
        u.uniform_(generator=shared.generator_for(u.device))
        noise = torch.logit(u, eps=NOISE_EPS, out=u)
    return LearnedMask.apply(weight, theta, noise, shared.scale)


def drop_logit(
    module: nn.Module,
    state: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    param: str = "weight",
) -> None:
    """state_dict hook: the logits are the controller's state, not the model's."""
    state.pop(prefix + logit_name(param), None)


def keep_logit(
    module: nn.Module,
    state: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
    param: str = "weight",
) -> None:
    """load_state_dict pre-hook: a plain checkpoint (no logits) loads strictly and leaves the
    current logits as they are."""
    name = logit_name(param)
    theta = module._parameters.get(name)
    if theta is not None and prefix + name not in state:
        state[prefix + name] = theta.detach()
