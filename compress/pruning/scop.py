"""SCOP filter scores (Tang et al., "Scientific Control for Reliable Neural Network Pruning",
NeurIPS 2020): a knockoff phase learns one control coefficient ``k`` per output channel, and the
channels whose knockoff features suppress their real features (small ``k``) are pruned.

During the phase (the recipe's ``num_init_steps`` epochs) a forward pre-hook on the compressed
model appends knockoff inputs to every training batch (``permute``: the same batch in a random
order, as MindSpore Golden Stick does), and every layer that produces prunable channels mixes
the real half of its output with the knockoff half::

    real <- k * real + (1 - k) * knockoff        knockoff <- knockoff

A forward hook cuts the model's output back to the real half, so the user's loss sees its own
batch and its own batch size. The coefficients are plain tensors, not parameters of the model:
they never enter the user's optimizer or the model's ``state_dict``. Their own optimizer (SGD with
momentum 0.9, ``scop_lr``) steps at every ``scheduler.step()``; they are clipped to [0, 1]. Under
DDP and FSDP2 every rank holds all of them (the hooks mix layer outputs, which FSDP2 computes
from gathered weights) and their gradients are averaged over the data-parallel group before
each step, so every rank learns the same coefficients. With
``scop_freeze_weights`` only the coefficients learn: the model's parameters stop requiring
gradients from the first training forward of the phase until it ends, and BatchNorm running
statistics do not move (momentum 0 during each forward). When the phase ends the hooks go, and the
coefficients, summed over the producers of a channel group, are the filter scores.

Example:
    >>> from torch import nn
    >>> conv = nn.Conv2d(1, 2, 1, bias=False)
    >>> k = torch.tensor([1.0, 0.0])
    >>> out = torch.stack([torch.ones(2, 1, 1), torch.zeros(2, 1, 1)])  # real = 1, knockoff = 0
    >>> mix(out, k, real=1, channel_dim=1).flatten().tolist()
    [1.0, 0.0, 0.0, 0.0]
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.utils.hooks import RemovableHandle

from compress import distributed
from compress.algorithm import bad_state, check_generator_state, check_tensor_table
from compress.analysis.node_kinds import is_transposed_linear
from compress.errors import ConfigError
from compress.pruning.structured import ChannelGroup
from compress.schedules import Scheduler


def permute(n: int, generator: torch.Generator) -> torch.Tensor:
    """Golden Stick's knockoffs: the batch's own samples in a random order."""
    return torch.randperm(n, generator=generator)


KNOCKOFFS: dict[str, Callable[[int, torch.Generator], torch.Tensor]] = {"permute": permute}
"""``scop_knockoff``: batch size -> the batch indices the knockoff half is taken from."""

Phase = Literal["waiting", "knockoff", "done"]
_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def mix(out: torch.Tensor, k: torch.Tensor, *, real: int, channel_dim: int) -> torch.Tensor:
    """The layer output of a doubled batch (``real`` samples, then as many knockoffs) with its
    real half replaced by ``k * real + (1 - k) * knockoff`` along ``channel_dim``."""
    shape = [1] * out.dim()
    shape[channel_dim] = -1
    k = k.to(out.device, out.dtype).reshape(shape)
    x, knockoff = out[:real], out[real:]
    return torch.cat([k * x + (1.0 - k) * knockoff, knockoff])


class Scop:
    """The knockoff phase of SCOP on ``model``'s prunable layers (the producers of ``groups``).

    ``update(per_step)`` follows the controller's scheduler: the phase starts at the first epoch
    of training, steps the coefficients after every optimizer step, and ends at epoch
    ``epochs``. ``scores(groups)`` are the coefficients summed over each group's producers.
    """

    def __init__(
        self,
        model: nn.Module,
        groups: list[ChannelGroup],
        scheduler: Scheduler,
        *,
        epochs: int,
        knockoff: str,
        freeze_weights: bool,
        lr: float,
        path: str,
    ) -> None:
        if epochs < 1:
            raise ConfigError(
                f"{path}.num_init_steps: filter_importance 'scop' learns its scores in a "
                f"knockoff phase of num_init_steps epochs, but num_init_steps is {epochs}; set "
                "it to 1 or more"
            )
        self.model, self.scheduler, self.epochs = model, scheduler, epochs
        self.knockoff, self.freeze_weights = knockoff, freeze_weights
        self.coefficients: dict[str, torch.Tensor] = {}
        for g in groups:
            for m in g.members:
                module = model.get_submodule(m.module_name)
                if m.role != "producer" or m.param_name != "weight":
                    continue
                if isinstance(module, _LAYERS) or is_transposed_linear(module):
                    n = module.get_parameter("weight").shape[int(is_transposed_linear(module))]
                    self.coefficients.setdefault(
                        m.module_name, torch.full((n,), 0.5, requires_grad=True)
                    )
        if not self.coefficients:
            raise ConfigError(
                f"{path}.filter_importance: 'scop' found no conv or linear layer whose output "
                "channels can be pruned; widen the scopes or pick another criterion"
            )
        # SGD, not Adam: the size of a coefficient's gradient is the information (Adam would move
        # every coefficient alike, since every real feature beats another sample's feature).
        self.optimizer = torch.optim.SGD(list(self.coefficients.values()), lr=lr, momentum=0.9)
        # the data-parallel group their gradients are averaged over: a sharded model's (FSDP2),
        # else every rank (DDP)
        sharded: list[Any] = [p for p in model.parameters() if distributed.is_sharded(p)]
        self.group = sharded[0].device_mesh.get_group() if sharded else None
        seed = int(torch.randint(0, 2**62, (1,)))  # follows the user's torch seed
        self.generator = torch.Generator().manual_seed(seed)
        self.phase: Phase = "waiting"
        self._handles: list[RemovableHandle] = []
        self._frozen: list[str] = []  # parameters the phase stopped from requiring grad
        self._real = 0  # batch size of the real half while a doubled forward runs
        self._saved_stats: dict[int, tuple[float | None, torch.Tensor]] = {}

    # --- the phase ---------------------------------------------------------------------------

    def update(self, per_step: bool) -> None:
        if self.phase == "done":
            return
        if per_step:
            if self.phase == "knockoff":
                self._step()
            return
        if self.scheduler.epoch < 0:
            return
        if self.scheduler.epoch < self.epochs:
            self._start()
        else:
            self._finish()

    def _start(self) -> None:
        if self.phase == "knockoff":
            return
        self.phase = "knockoff"
        self._handles.append(
            self.model.register_forward_pre_hook(_fn(self._double), with_kwargs=True)
        )
        self._handles.append(self.model.register_forward_hook(_fn(self._cut)))
        for name, k in self.coefficients.items():
            module = self.model.get_submodule(name)
            dim = 1 if isinstance(module, nn.modules.conv._ConvNd) else -1
            self._handles.append(module.register_forward_hook(self._mixer(k, dim)))
        if self.freeze_weights:
            for module in self.model.modules():
                if isinstance(module, _NormBase) and module.track_running_stats:
                    self._handles.append(module.register_forward_pre_hook(_fn(self._keep_stats)))
                    self._handles.append(module.register_forward_hook(_fn(self._restore_stats)))

    def _finish(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._thaw(self.model)
        self.phase = "done"

    def _step(self) -> None:
        coefficients = list(self.coefficients.values())
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size(self.group)
            for k in coefficients:  # every rank must end with the same scores
                if k.grad is None:
                    k.grad = torch.zeros_like(k)
                torch.distributed.all_reduce(k.grad, group=self.group)
                k.grad /= world
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for k in coefficients:
                k.clamp_(0.0, 1.0)

    def _thaw(self, model: nn.Module) -> None:
        for name in self._frozen:
            model.get_parameter(name).requires_grad_(True)
        if model is self.model:
            self._frozen = []

    # --- hooks -------------------------------------------------------------------------------

    def _double(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        self._real = 0
        if not (module.training and torch.is_grad_enabled()):
            return None  # evaluation, calibration, tracing: the plain model
        n = _batch_size((args, kwargs))
        if n is None:
            return None
        if self.freeze_weights and not self._frozen:
            for name, p in self.model.named_parameters():
                if p.requires_grad:
                    p.requires_grad_(False)
                    self._frozen.append(name)
        order = KNOCKOFFS[self.knockoff](n, self.generator)
        self._real = n

        def double(t: torch.Tensor) -> torch.Tensor:
            if t.dim() == 0 or t.shape[0] != n:
                return t
            return torch.cat([t, t[order.to(t.device)]])

        return _map(double, args), _map(double, kwargs)

    def _cut(self, module: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
        n, self._real = self._real, 0
        if not n:
            return None
        return _map(lambda t: t[:n] if t.dim() > 0 and t.shape[0] == 2 * n else t, out)

    def _mixer(self, k: torch.Tensor, dim: int) -> Callable[..., torch.Tensor | None]:
        def hook(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor | None:
            n = self._real
            if not n or not isinstance(out, torch.Tensor) or out.shape[0] != 2 * n:
                return None
            return mix(out, k, real=n, channel_dim=dim)

        return hook

    def _keep_stats(self, module: nn.Module, args: Any) -> None:
        # Momentum 0 keeps the running statistics while the batch still normalises itself;
        # writing the old values back after the forward would break autograd, which saved them.
        count = getattr(module, "num_batches_tracked", None)
        if self._real and isinstance(module, _NormBase) and isinstance(count, torch.Tensor):
            self._saved_stats[id(module)] = (module.momentum, count.clone())
            module.momentum = 0.0

    def _restore_stats(self, module: nn.Module, args: Any, out: Any) -> None:
        saved = self._saved_stats.pop(id(module), None)
        count = getattr(module, "num_batches_tracked", None)
        if saved is not None and isinstance(module, _NormBase) and isinstance(count, torch.Tensor):
            module.momentum = saved[0]
            count.copy_(saved[1])

    # --- scores, state, strip ----------------------------------------------------------------

    def scores(self, groups: list[ChannelGroup]) -> dict[str, torch.Tensor]:
        """Per group channel, the sum of the coefficients of the layers that produce it."""
        out = {}
        for g in groups:
            s = torch.zeros(g.size)
            for m in g.members:
                k = self.coefficients.get(m.module_name)
                if k is not None and m.role == "producer" and m.param_name == "weight":
                    s.index_add_(0, m.channel, k.detach().cpu()[m.index])
            out[g.name] = s
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "coefficients": {n: k.detach().clone() for n, k in self.coefficients.items()},
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
        }

    def check_state(self, state: Any, where: str) -> None:
        """Checks a saved ``state_dict`` before any of it is applied: a known phase, one
        coefficient in [0, 1] per channel of every layer, an optimizer state of these
        coefficients and a CPU generator state."""
        if not isinstance(state, Mapping):
            bad_state(where, f"is a {type(state).__name__}", "SCOP's state (a dict)")
        if state.get("phase") not in ("waiting", "knockoff", "done"):
            phase = str(state.get("phase"))[:20]
            bad_state(f"{where}.phase", f"is {phase!r}", "one of 'waiting', 'knockoff', 'done'")
        shapes = {n: list(k.shape) for n, k in self.coefficients.items()}
        check_tensor_table(f"{where}.coefficients", state.get("coefficients"), shapes, unit=True)
        scratch = torch.optim.SGD([torch.zeros(s) for s in shapes.values()], lr=1.0, momentum=0.9)
        try:
            scratch.load_state_dict(copy.deepcopy(state["optimizer"]))
            finite = all(
                bool(torch.isfinite(t).all())
                for per_param in scratch.state.values()
                for t in per_param.values()
                if isinstance(t, torch.Tensor)
            )
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError):
            finite = False
        if not finite:
            bad_state(f"{where}.optimizer", "does not fit", "the SGD state of the coefficients")
        check_generator_state(f"{where}.generator", state.get("generator"), torch.device("cpu"))

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        with torch.no_grad():
            for name, k in self.coefficients.items():
                k.copy_(state["coefficients"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        if state["phase"] == "knockoff":
            self._start()  # weights freeze at the next training forward
        elif state["phase"] == "done":
            self._finish()

    def release(self, model: nn.Module) -> None:
        """Removes the phase's hooks and frozen flags from ``model``, a deep copy of the
        compressed model (``strip``), leaving the compressed model as it is."""
        ids = {h.id for h in self._handles}
        for module in model.modules():
            for attr in _HOOK_DICTS:
                hooks = getattr(module, attr, None)
                if hooks is not None:
                    for i in ids:
                        hooks.pop(i, None)
        self._thaw(model)


def _fn(method: Callable[..., Any]) -> Callable[..., Any]:
    """A plain function calling ``method``: ``copy.deepcopy`` of a model (``strip``) copies a
    bound method's object, but shares a function."""

    def call(*args: Any) -> Any:
        return method(*args)

    return call


def _map(fn: Callable[[torch.Tensor], torch.Tensor], obj: Any) -> Any:
    """``fn`` applied to every tensor in nested tuples, lists and dicts."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
        return type(obj)(*(_map(fn, x) for x in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map(fn, x) for x in obj)
    if isinstance(obj, dict):
        out = obj.copy()  # keeps the class (e.g. a ModelOutput)
        for key, value in obj.items():
            out[key] = _map(fn, value)
        return out
    return obj


def _batch_size(inputs: Any) -> int | None:
    """The leading size of the first tensor in the model's inputs."""
    found: list[int] = []

    def first(t: torch.Tensor) -> torch.Tensor:
        if not found and t.dim() > 0:
            found.append(t.shape[0])
        return t

    _map(first, inputs)
    return found[0] if found else None
