"""RB sparsity (NNCF ``rb_sparsity``): every weight learns whether to stay, under a density loss.

Each masked weight ``W`` gets a logit tensor ``s`` of its shape, initialised to
``log(0.99 / 0.01)`` (keep-probability 0.99). The forward pass uses ``W * m`` with

- training: ``m = sigmoid(s + logit(u)) > 0.5``, ``u ~ U(0, 1)``: a Bernoulli(sigmoid(s)) mask
  drawn once per forward pass, with NNCF's straight-through gradient
  ``d(W * m)/ds = W * sigmoid'(s + logit(u))``;
- eval mode, or without autograd (statistics, folding): ``m = sigmoid(s) > 0.5``;
- every ``sigmoid(.) > 0.5`` is computed as NNCF computes it, in the logits' dtype: in float32 a
  logit in (0, about 6e-8) gives exactly 0.5 and drops its weight;
- frozen (from ``sparsity_freeze_epoch``): the deterministic mask at freezing time, fixed;
- ``fix_dropped`` (the Lightning callback's fit end): the weights the deterministic mask drops
  then stay dropped, while the logits of the others keep learning.

The loss is NNCF's ``SparseLoss``: ``((density - (1 - level)) / 0.05) ** 2`` where density is
the fraction of weights of the deterministic mask, with the same straight-through gradient.
``global`` mode counts all compressed weights together; ``local`` mode averages the per-layer
losses, so every layer reaches the level (NNCF's own local mode sets no level at all).

Design choices, and why:

- The mask buffer of ``masks.attach`` multiplies the weight after ``fn``; a zero there would cut
  the straight-through gradient to the logits of dropped weights, so they could never come
  back. While the logits learn, the buffer is therefore all ones, declared so
  (``masks.declare_ones``: the forward pass skips multiplying by it), and ``fn`` applies the
  mask; at freezing (and in ``strip``) the deterministic mask is written into the buffer.
- ``compression_lr_multiplier`` (k) must work with Adam, which ignores a gradient's scale. The
  stored parameter is ``s / k`` and receives the gradient of ``s`` itself, so every optimizer
  step moves ``s`` k times as far: with SGD this equals NNCF's k-scaled gradient (weight decay
  included), with Adam it is what the name promises.
- The logits are ``nn.Parameter`` s on the masked module, so ``configure_optimizers`` picks them
  up, but hooks keep them out of ``model.state_dict()`` (and let a plain checkpoint load
  strictly); they travel in ``ctrl.state_dict()``.
- The noise comes from a generator owned by the algorithm with a fixed seed, so DDP ranks draw
  identical masks; its state is saved for an exact resume. No noise is drawn without autograd,
  so statistics computed on one rank never desynchronise the ranks.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from compress import distributed, masks
from compress.algorithm import (
    Algorithm,
    bad_state,
    check_flag,
    check_fraction,
    check_generator_state,
    matrices,
    param_name,
    sparsity_event,
    sparsity_rows,
    weight_layers,
)
from compress.errors import CompressError
from compress.schedules import (
    adaptive_level,
    initial_level,
    schedule_position,
    sparsity_level,
)
from compress.sparsity.magnitude import load_masks
from compress.sparsity.rb_mask import (
    DENSITY_SCALE,
    INIT_LOGIT,
    KeptCount,
    RBLayer,
    Shared,
    drop_logit,
    keep_logit,
    logit_name,
    positive,
    rb_weight,
    scaled,
    state_key,
)


class RBSparsity(Algorithm):
    name = "rb_sparsity"

    def __init__(self, model, cfg, scheduler, example_inputs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(model, cfg, scheduler, example_inputs)
        scale = float(cfg.options.get("compression_lr_multiplier") or 1.0)
        self.shared = Shared(scale=scale)
        self.init = float(cfg.options["sparsity_init"])
        self.current = self.init  # the level the loss pulls the masks to
        self.scheduled = initial_level(self.params, self.init)  # the level NNCF reports
        self.reached_epochs = 0
        # whether the mask buffers hold zeros while the logits learn (``fix_dropped``)
        self.fixed = False
        # (layer name, a module holding the weight, its logit, its mask buffer), one per weight
        self.entries: list[tuple[str, nn.Module, nn.Parameter, torch.Tensor]] = []
        self._attach(weight_layers(model, cfg))

    # --- building ----------------------------------------------------------------------------

    def _attach(self, layers: list[tuple[str, nn.Module]]) -> None:
        """Adds a logit per distinct weight; modules sharing a weight share logit and mask."""
        by_param: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
        for name, module in layers:
            pname = param_name(name, module)  # "weight", or a fused expert parameter
            weight = module._parameters[pname]
            assert weight is not None  # weight_layers selects layers that have one
            key = id(weight)
            if key in by_param:
                theta, mask = by_param[key]
                self._attach_one(module, pname, theta, mask)
                continue
            theta = nn.Parameter(torch.full_like(weight, INIT_LOGIT / self.shared.scale))
            mask = self._attach_one(module, pname, theta, None)
            by_param[key] = (theta, mask)
            self.entries.append((name, module, theta, mask))

    def _attach_one(
        self, module: nn.Module, pname: str, theta: nn.Parameter, mask: torch.Tensor | None
    ) -> torch.Tensor:
        module.register_parameter(logit_name(pname), theta)
        ids = (
            module._register_state_dict_hook(functools.partial(drop_logit, param=pname)).id,
            module.register_load_state_dict_pre_hook(functools.partial(keep_logit, param=pname)).id,
        )
        module.__dict__[state_key(pname)] = RBLayer(shared=self.shared, hook_ids=ids)
        fn = rb_weight if pname == "weight" else functools.partial(rb_weight, param=pname)
        mask = masks.attach(module, pname, owner=self.name, fn=fn, mask=mask)
        masks.declare_ones(module, pname, self.name)
        return mask

    # --- schedule ----------------------------------------------------------------------------

    @property
    def level(self) -> float:
        """The schedule's level now, as NNCF reports it (it keeps following the schedule after
        ``sparsity_freeze_epoch``, when the loss is off)."""
        return self.scheduled

    @property
    def frozen(self) -> bool:
        return self.shared.frozen

    def update(self, per_step: bool) -> None:
        event = sparsity_event(self, self.frozen, per_step)
        if event in ("init", "skip"):
            return
        p = self.params
        if p["schedule"] == "adaptive":  # once per epoch start: it never moves per step
            self.scheduled, self.reached_epochs = adaptive_level(
                self.scheduled,
                self.reached_epochs,
                self.loss_sparsity(),
                target=p["sparsity_target"],
                step=p["step"],
                eps=p["eps"],
                patience=p["patience"],
            )
        else:
            position = schedule_position(p, self.scheduler)
            assert position is not None  # sparsity_event skips before the first epoch
            self.scheduled = sparsity_level(p, self.init, position)
        if event == "freeze":
            self.freeze()
        if event == "update":
            self.current = self.scheduled

    def set_level(self, level: float) -> None:
        """Moves the level now (accuracy-aware training): the density loss pulls the learned
        masks there."""
        if self.frozen:
            raise CompressError(
                "rb_sparsity is frozen (sparsity_freeze_epoch reached): its level cannot move; "
                "raise params.sparsity_freeze_epoch above the accuracy-aware epochs"
            )
        self.current = self.scheduled = level

    def freeze(self) -> None:
        """Fixes every mask at its deterministic value; the loss turns off."""
        self._declare_ones(False)
        for _, _, theta, mask in self.entries:
            mask.mul_(self._keep(theta))
        self.shared.frozen = True
        reached = self.sparsity()
        if abs(reached - self.current) > 0.05:
            warnings.warn(
                f"{self.cfg.path}: rb_sparsity froze at sparsity {reached:.3f}, far from the "
                f"level {self.current:.3f}: the logits did not learn enough before "
                "sparsity_freeze_epoch. Raise compression_lr_multiplier (the logits' learning "
                "rate relative to the optimizer's) or train longer before freezing",
                stacklevel=2,
            )

    def fix_dropped(self) -> None:
        """Fixes at zero the weights the deterministic masks drop now; the logits of the others
        keep learning. The Lightning callback calls it at fit end, where the module becomes the
        compressed model, so that a second fit never revives a weight the first one removed."""
        if self.frozen or self.sparsity() == 0.0:  # nothing dropped: the buffers stay ones
            return
        self._declare_ones(False)
        with torch.no_grad():
            for _, _, theta, mask in self.entries:
                mask.mul_(self._keep(theta))
        self.fixed = True

    def _declare_ones(self, ones: bool) -> None:
        """Whether the forward pass may skip the mask buffers (all ones while learning), for
        every module, tied ones included."""
        for module in self.model.modules():
            for pname in masks.masked_names(module):
                if state_key(pname) in module.__dict__:
                    masks.declare_ones(module, pname, self.name, ones)

    # --- masks, loss, statistics ---------------------------------------------------------

    def _keep(self, theta: torch.Tensor) -> torch.Tensor:
        """NNCF's deterministic mask, ``sigmoid(logit) > 0.5`` (not ``logit > 0``: see
        :func:`compress.sparsity.rb_mask.positive`)."""
        return positive(scaled(theta.detach(), self.shared.scale)).bool()

    def current_masks(self) -> list[torch.Tensor]:
        """The deterministic (eval-mode) binary masks, one per weight."""
        if self.frozen:
            return [mask.bool() for _, _, _, mask in self.entries]
        if self.fixed:
            return [self._keep(theta) & mask.bool() for _, _, theta, mask in self.entries]
        return [self._keep(theta) for _, _, theta, _ in self.entries]

    def sparsity(self) -> float:
        """The fraction of compressed weights the deterministic masks drop."""
        current = self.current_masks()
        kept = sum(distributed.scalar(m.count_nonzero()) for m in current)
        return 1.0 - kept / sum(m.numel() for m in current)

    def loss_sparsity(self) -> float:
        """The sparsity as NNCF's loss computes it, in float32: ``1 - kept / n``. The adaptive
        schedule compares it with ``level - eps``, where a float64 count would decide
        differently at the boundary."""
        with torch.no_grad():
            kept = torch.zeros((), dtype=torch.float32)
            for mask in self.current_masks():
                kept = kept + mask.float().sum()
            return float(1 - kept / sum(m.numel() for m in self.current_masks()))

    def loss(self) -> torch.Tensor | None:
        """NNCF's density loss; None once frozen. ``local``: the mean of per-layer losses."""
        if self.frozen:
            return None
        target = 1.0 - self.current
        scale = self.shared.scale
        if self.params["sparsity_level_setting_mode"] == "local":
            # every expert's matrix of a fused expert parameter is a layer of its own
            pairs = [
                (t, m if self.fixed else None)
                for name, module, theta, mask in self.entries
                for t, m in zip(matrices(name, module, theta), matrices(name, module, mask))
            ]
            kept = [_kept(theta, scale, fixed) for theta, fixed in pairs]
            sizes = [theta.numel() for theta, _ in pairs]
            losses = [((k / n - target) / DENSITY_SCALE) ** 2 for k, n in zip(kept, sizes)]
            return torch.stack(losses).mean()
        kept = [_kept(t, scale, mask if self.fixed else None) for _, _, t, mask in self.entries]
        sizes = [theta.numel() for _, _, theta, _ in self.entries]
        density = torch.stack(kept).sum() / sum(sizes)
        return ((density - target) / DENSITY_SCALE) ** 2

    def statistics(self) -> dict[str, Any]:
        rows = sparsity_rows(
            [
                (name, module, m)
                for (name, module, _, _), m in zip(self.entries, self.current_masks())
            ]
        )
        with torch.no_grad():
            probs = [torch.sigmoid(theta * self.shared.scale) for _, _, theta, _ in self.entries]
            for row, prob in zip(rows, probs):
                row["mean keep prob"] = distributed.scalar(prob.mean())
            total = sum(p.numel() for p in probs)
            mean_sparse_prob = 1.0 - sum(distributed.scalar(p.sum()) for p in probs) / total
        return {
            "algorithm": self.name,
            "level": self.scheduled,
            "frozen": self.frozen,
            "sparsity": self.sparsity(),
            "mean sparse prob": mean_sparse_prob,
            "layers": rows,
        }

    # --- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        gen = self.shared.generator
        gen_state = gen.get_state() if gen is not None else self.shared.pending_state
        return {
            "level": self.current,
            "scheduled": self.scheduled,
            "frozen": self.frozen,
            "reached_epochs": self.reached_epochs,
            "logits": {name: theta.detach().clone() for name, _, theta, _ in self.entries},
            "masks": {name: m.clone() for (name, *_), m in zip(self.entries, self.current_masks())},
            # the buffers fix_dropped wrote (while the logits still learn)
            "fixed": {name: m.bool() for name, _, _, m in self.entries} if self.fixed else {},
            "generator": None if gen_state is None else gen_state.clone(),
        }

    def check_state(self, state: Mapping[str, Any]) -> None:
        check_fraction(f"{self.name}.scheduled", state.get("scheduled", state.get("level")))
        check_flag(f"{self.name}.frozen", state.get("frozen"))
        epochs = state.get("reached_epochs", 0)
        if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 0:
            bad_state(f"{self.name}.reached_epochs", f"is {str(epochs)[:20]!r}", "a count")
        gen = state.get("generator")
        if gen is not None and self.entries:  # the noise is drawn on the logits' device
            check_generator_state(f"{self.name}.generator", gen, self.entries[0][2].device)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.current = float(state["level"])
        self.scheduled = float(state.get("scheduled", self.current))
        self.reached_epochs = int(state.get("reached_epochs", 0))
        frozen = bool(state["frozen"])
        fixed = {} if frozen else state.get("fixed") or {}
        if frozen or fixed:  # before any zero is written
            self._declare_ones(False)
        with torch.no_grad():
            load_masks([(n, m, t) for n, m, t, _ in self.entries], state["logits"], self.name)
            for name, _, _, mask in self.entries:
                if frozen:
                    saved = state["masks"][name].to(mask.dtype)
                    mask.copy_(distributed.shard_like(saved, mask))
                elif name in fixed:
                    mask.copy_(distributed.shard_like(fixed[name].to(mask.dtype), mask))
                else:
                    mask.fill_(1)
        self.shared.frozen = frozen
        self.fixed = bool(fixed)
        if not frozen and not fixed:  # once the buffers hold ones
            self._declare_ones(True)
        gen_state = state.get("generator")
        self.shared.generator = None
        self.shared.pending_state = None if gen_state is None else gen_state.clone()

    # --- strip -----------------------------------------------------------------------------

    def strip(self, model: nn.Module) -> nn.Module:
        """Writes the deterministic masks into the mask buffers (``masks.fold`` then folds them)
        and removes the logits, their hooks and the noise state from the copy."""
        for module in model.modules():
            for pname in masks.masked_names(module):
                layer: RBLayer | None = module.__dict__.pop(state_key(pname), None)
                if layer is None:
                    continue
                theta = module._parameters.pop(logit_name(pname))
                mask = masks.get_mask(module, pname, self.name)
                if mask is None or theta is None:
                    raise CompressError(f"rb_sparsity: {type(module).__name__} lost its RB mask")
                masks.declare_ones(module, pname, self.name, False)
                if not layer.shared.frozen:
                    mask.mul_(self._keep(theta))
                state_id, load_id = layer.hook_ids
                module._state_dict_hooks.pop(state_id, None)
                module._load_state_dict_pre_hooks.pop(load_id, None)
        return model


def _kept(theta: torch.Tensor, scale: float, fixed: torch.Tensor | None) -> torch.Tensor:
    """The number of kept weights of one layer (straight-through to ``theta``), those ``fixed``
    drops counted as dropped; of a sharded ``theta``, counted on each rank's shard and summed
    over the ranks."""
    if distributed.is_sharded(theta):
        local = None if fixed is None else distributed.local(fixed)
        return distributed.summed(KeptCount.apply(distributed.local(theta), scale, local), theta)
    return KeptCount.apply(theta, scale, fixed)
