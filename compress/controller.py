"""The compression controller: binds a recipe's algorithms and one scheduler to a model."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress import distributed, experts, masks
from compress.algorithm import Algorithm, bad_state, is_sparsifiable
from compress.algorithms import ALGORITHMS
from compress.analysis import untouched
from compress.analysis.effective import active_weights
from compress.analysis.outputs import (
    check_finite_outputs,
    check_same,
    first_non_finite,
    on_device,
    outputs,
)
from compress.analysis.summary import Statistics, model_summary
from compress.deploy.files import check_loaded
from compress.deploy.sidecars import sidecar_problem
from compress.distillation import KnowledgeDistillation, check_teacher
from compress.errors import CompressError
from compress.recipe.config import Config, load_config
from compress.schedules import Scheduler, moves_per_step

STATE_VERSION = 1
# Distillation first: its teacher is copied before anything is masked. Structured pruning next:
# sparsity then works on the channels that remain (NNCF's order).
_ORDER = (
    "knowledge_distillation",
    "filter_pruning",
    "const_sparsity",
    "magnitude_sparsity",
    "rb_sparsity",
)


class CompressionController:
    """What ``create_compressed_model`` returns beside the model.

    ``scheduler.epoch_step()`` at each epoch start and ``scheduler.step()`` after each optimizer
    step move every algorithm's level (each batch then trains at the level NNCF 2.17's loop, which
    calls ``step()`` before the batch, gives it: see ``Scheduler``); ``loss()`` is added to the
    task loss; ``statistics()``, ``state_dict()``/``load_state_dict()`` and ``strip()`` do what
    their names say.
    """

    def __init__(
        self,
        model: nn.Module,
        config: Config,
        example_inputs: tuple[torch.Tensor, ...] | None,
        teacher: nn.Module | None = None,
    ) -> None:
        self.model = model
        self.config = config
        self.example_inputs = example_inputs
        self.scheduler = Scheduler()
        ordered = sorted(config.algorithms, key=lambda a: _ORDER.index(a.name))
        self.algorithms: list[Algorithm] = [
            ALGORITHMS[a.name](model, a, self.scheduler, example_inputs)
            if a.name != "knowledge_distillation"
            else KnowledgeDistillation(model, a, self.scheduler, example_inputs, teacher=teacher)
            for a in ordered
        ]
        if not ordered:
            warnings.warn(
                f"{config.source}: the recipe has no 'compression' section; the model trains "
                "uncompressed (as NNCF trains the baseline). Add an algorithm to compress it",
                stacklevel=3,
            )
        if teacher is not None and "knowledge_distillation" not in [a.name for a in ordered]:
            warnings.warn(
                "teacher= is unused: the recipe has no knowledge_distillation algorithm; add "
                '{"algorithm": "knowledge_distillation", "type": "softmax"} to its compression',
                stacklevel=3,
            )
        # a module sharing a masked weight (a tied embedding) reads it masked too, and so does
        # a module that reads a masked weight of its child without calling the child
        # (nn.MultiheadAttention's out_proj)
        masks.tie(model)
        masks.cover(model)
        self.scheduler.on_change = self._on_change
        # Only a per-step schedule without params.steps_per_epoch needs the epoch length.
        self.scheduler.infer_steps_per_epoch = any(
            a.name in ("magnitude_sparsity", "rb_sparsity")
            and moves_per_step(a.params)
            and not a.params["steps_per_epoch"]
            for a in self.algorithms
        )
        self._on_change(False)

    def _on_change(self, per_step: bool) -> None:
        distributed.check_placed((m, n, b) for _, m, n, b in masks.iter_masked(self.model))
        for algo in self.algorithms:
            algo.update(per_step)

    def set_level(self, algo: Algorithm, level: float) -> None:
        """Moves ``algo`` to ``level`` now, outside the schedule (accuracy-aware training)."""
        algo.set_level(level)

    def fix_dropped(self) -> None:
        """Fixes at zero the weights that learned masks (RB) drop now, so that further training
        never brings them back; the other masks already keep their zeros."""
        for algo in self.algorithms:
            fix = getattr(algo, "fix_dropped", None)
            if fix is not None:
                fix()

    @property
    def compression_level(self) -> float:
        """The current level of the last algorithm that has one (sparsity when a sparsity
        algorithm is used); knowledge distillation has none."""
        leveled = [a for a in self.algorithms if a.has_level]
        return leveled[-1].level if leveled else 0.0

    def loss(self) -> torch.Tensor:
        """The sum of the algorithms' losses (zero for algorithms without one)."""
        losses = [x for x in (a.loss() for a in self.algorithms) if x is not None]
        if not losses:
            return torch.zeros(())
        return torch.stack([x.reshape(()) for x in losses]).sum()

    def statistics(self) -> Statistics:
        weights = {
            name: masks.effective(module, "weight")
            for name, module, pname, _ in masks.iter_masked(self.model)
            if pname == "weight" and is_sparsifiable(module, embeddings=True)
        }
        fused = {  # fused mixture-of-experts weights, by the names sparsity gives them
            f"{name}.{pname}": masks.effective(module, pname)
            for name, module, pname, _ in masks.iter_masked(self.model)
            if pname in experts.expert_params(module)
        }
        weights |= fused
        sharded = any(distributed.is_sharded(w) for w in weights.values())
        if sharded:  # which weights are zero, gathered as one byte each; no effective sparsity
            weights = {n: distributed.full((w != 0).to(torch.uint8)) for n, w in weights.items()}
        summary = model_summary(self.model, self.example_inputs, weights)
        if weights and not sharded:
            active = active_weights(self.model, self.example_inputs)
            alive = sum(
                int(active[f"{n}.weight"].sum()) for n in weights if f"{n}.weight" in active
            )
            # outside the path analysis: their nonzero weights count as active
            alive += sum(int(w.count_nonzero()) for w in fused.values())
            n_weights = summary["weights in compressed layers"]
            summary["effective sparsity of compressed layers"] = 1.0 - alive / n_weights
        return Statistics(model=summary, algorithms=tuple(a.statistics() for a in self.algorithms))

    def state_dict(self, *, rank_zero_only: bool = False) -> dict[str, Any]:
        """The scheduler position and every algorithm's state. Sharded masks and logits are
        saved whole, loadable at any rank count: on every rank, or with ``rank_zero_only`` on
        rank 0 only (None in their place elsewhere; for a file rank 0 writes)."""
        gather = distributed.whole_on_rank_zero if rank_zero_only else distributed.whole
        return {
            "version": STATE_VERSION,
            "algorithms": [a.name for a in self.algorithms],
            "scheduler": self.scheduler.state_dict(),
            "state": gather({a.name: a.state_dict() for a in self.algorithms}),
        }

    def load_state_dict(
        self, state: Mapping[str, Any], *, accept_new_teacher: bool = False
    ) -> None:
        """Restores the scheduler position, masks and algorithm state saved by ``state_dict``.

        A state distilled from another teacher (``knowledge_distillation``: its weights' digest)
        is refused unless ``accept_new_teacher``: the run then continues with this one."""
        check_loaded(state, "compression state")  # nesting, tensors viewing more than they hold
        if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
            raise CompressError(
                "compression state is not from this library version "
                f"(expected version {STATE_VERSION}, got {_get(state, 'version')})"
            )
        names = [a.name for a in self.algorithms]
        saved = _get(state, "algorithms")
        if (list(saved) if isinstance(saved, (list, tuple)) else saved) != names:
            raise CompressError(
                f"compression state holds {_get(state, 'algorithms')}, "
                f"but the recipe builds {names}"
            )
        check_state_values(state, names)
        for algo in self.algorithms:
            algo.check_state(state["state"][algo.name])
            if isinstance(algo, KnowledgeDistillation):
                check_teacher(algo, state["state"][algo.name], accept_new_teacher)
        _check_latency_table(state["state"])
        # Applied as a whole or not at all: a state that fails half way is rolled back.
        backup = self.state_dict()
        try:
            self._apply_state(state)
        except Exception as e:
            self._apply_state(backup)
            if isinstance(e, CompressError):
                raise
            raise CompressError(
                f"compression state does not fit this model ({type(e).__name__}: {e}); "
                "nothing was changed"
            ) from None

    def _apply_state(self, state: Mapping[str, Any]) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        for algo in self.algorithms:
            algo.load_state_dict(state["state"][algo.name])

    def strip(self, *, copy_model: bool = True, source: nn.Module | None = None) -> nn.Module:
        """A plain ``nn.Module``: no hooks, no mask buffers, masks folded into the weights and,
        with filter pruning, pruned channels removed. The compressed model is left as it is
        unless ``copy_model`` is False. ``source`` is a copy to strip instead (of a sharded
        model, ``distributed.unsharded_copy``), masks included."""
        inputs = self._check_inputs()
        want = outputs(source or self.model, inputs) if inputs is not None else None
        if source is not None:
            model = source
        else:
            model = untouched.copy_model(self.model) if copy_model else self.model
        # Unwound in reverse order: sparsity algorithms settle their masks (RB drops its logits)
        # before filter pruning rebuilds the layers with fewer channels.
        for algo in reversed(self.algorithms):
            model = algo.strip(model)
        masks.fold(model)
        masks.check_finite(model, "strip()")
        if want is not None and inputs is not None:
            try:
                got = outputs(model, inputs)
            except Exception as err:  # noqa: BLE001 - a stripped model that fails is not returned
                raise CompressError(
                    f"strip(): the stripped model fails on the example inputs "
                    f"({type(err).__name__}: {err}); please report the model"
                ) from None
            # a NaN in a pruned channel: the masked model multiplies it by 0 (NaN), the
            # stripped one drops it (finite); the weights diverged all the same
            note = (
                "; the stripped model's outputs are finite: the NaN or Inf sits in what strip() "
                "removes (pruned channels), which the masked model multiplies by 0"
                if first_non_finite(got) is None
                else ""
            )
            check_finite_outputs(want, source or self.model, "strip()", "the masked model", note)
            check_finite_outputs(got, model, "strip()", "the stripped model")
            check_same(want, got, "strip()")
        return model

    def _check_inputs(self) -> tuple[torch.Tensor, ...] | None:
        """The example inputs, on the model's device, when ``strip()`` can check its result
        against the masked model: there are some, and no algorithm changes the output on
        purpose (a warning says which)."""
        if not self.example_inputs:
            return None
        for algo in self.algorithms:
            reason = algo.strip_differs()
            if reason is not None:
                warnings.warn(
                    f"strip(): the stripped model is not checked against the masked one: "
                    f"{algo.name}: {reason}",
                    stacklevel=3,
                )
                return None
        param = next(self.model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        return on_device(self.example_inputs, device)


def check_state_values(state: Mapping[str, Any], names: list[str]) -> None:
    """Checks what a state holds before any of it is applied: every algorithm's entry is there,
    masks hold only 0 and 1, levels lie in [0, 1], logits and scheduler counters are finite."""
    entries, sched = state.get("state"), state.get("scheduler")
    if not isinstance(entries, Mapping) or not isinstance(sched, Mapping):
        raise CompressError("compression state has no 'state' and 'scheduler' sections")
    for key in ("epoch", "step_in_epoch", "global_step"):
        if not isinstance(sched.get(key), int) or isinstance(sched.get(key), bool):
            raise CompressError(f"compression state: scheduler.{key} is {sched.get(key)!r}")
    for name in names:
        entry = entries.get(name)
        if not isinstance(entry, Mapping):
            raise CompressError(f"compression state has no entry for {name}")
        level = entry.get("level", 0.0)
        if not isinstance(level, (int, float)) or not 0.0 <= level <= 1.0:
            raise CompressError(f"compression state: {name}.level is {level!r}, not in [0, 1]")
        for kind in ("masks", "keep", "logits", "fixed"):
            tensors = entry.get(kind, {})
            if not isinstance(tensors, Mapping) or not all(
                isinstance(t, torch.Tensor) for t in tensors.values()
            ):
                raise CompressError(f"compression state: {name}.{kind} is not a table of tensors")
            for layer, t in tensors.items():
                if kind == "logits":
                    bad = not t.is_floating_point() or not bool(torch.isfinite(t).all())
                else:
                    bad = t.dtype != torch.bool and not bool(((t == 0) | (t == 1)).all())
                if bad:
                    allowed = "finite numbers" if kind == "logits" else "only 0 and 1"
                    raise CompressError(
                        f"compression state: {name}.{kind}[{layer!r}] holds values other than "
                        f"{allowed}; nothing was changed"
                    )


def _check_latency_table(entries: Mapping[str, Any]) -> None:
    """Filter pruning's latency table, against the schema its ``.latency.json`` is read with
    (here: pruning may not import deploy)."""
    table = _get(entries.get("filter_pruning"), "latency_table")
    if isinstance(entries.get("filter_pruning"), Mapping) and table is not None:
        problem = sidecar_problem(table, "latency")
        if problem is not None:
            bad_state(
                "filter_pruning.latency_table:",
                problem,
                "a latency table as measured for pruning_latency_target (deploy/schema)",
            )


_BITS = "packed_bits"


def pack_bits(mask: torch.Tensor) -> dict[str, Any]:
    """A bool tensor as one bit per element: ``{"packed_bits": uint8, "shape": [...]}``.

    Example:
        >>> m = torch.tensor([[True, False, True]])
        >>> torch.equal(unpack_bits(pack_bits(m)), m)
        True
    """
    flat = mask.detach().reshape(-1).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)]).reshape(-1, 8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=flat.device)
    return {_BITS: (flat * weights).sum(1, dtype=torch.uint8).cpu(), "shape": list(mask.shape)}


def unpack_bits(packed: Mapping[str, Any]) -> torch.Tensor:
    """The bool tensor ``pack_bits`` packed; a damaged entry is a ``CompressError``."""
    bits, shape = packed.get(_BITS), packed.get("shape")
    if (
        not isinstance(bits, torch.Tensor)
        or bits.dtype != torch.uint8
        or not isinstance(shape, (list, tuple))
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
        or math.prod(shape) > bits.numel() * 8
    ):
        raise CompressError(
            "compression state: a packed mask is damaged (its bits do not hold its shape)"
        )
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8)
    flat = ((bits.reshape(-1, 1) >> shifts) & 1).reshape(-1).bool()
    return flat[: math.prod(shape)].reshape(shape)


def compact_state(state: Any) -> Any:
    """``state`` (from ``CompressionController.state_dict``) with every bool tensor packed to
    one bit per element (masks take 1/8 of their bytes); ``expand_state`` undoes it."""
    if isinstance(state, torch.Tensor) and state.dtype == torch.bool:
        return pack_bits(state)
    if isinstance(state, Mapping):
        return {k: compact_state(v) for k, v in state.items()}
    if isinstance(state, list):
        return [compact_state(v) for v in state]
    return state


def expand_state(state: Any) -> Any:
    """The inverse of ``compact_state`` (a state that was never compacted passes unchanged)."""
    if isinstance(state, Mapping):
        if _BITS in state:
            return unpack_bits(state)
        return {k: expand_state(v) for k, v in state.items()}
    if isinstance(state, list):
        return [expand_state(v) for v in state]
    return state


FSDP1_REFUSED = (
    "FullyShardedDataParallel (FSDP1, Lightning's FSDPStrategy) is not supported: it flattens "
    "each wrapped unit's parameters into one 1-D FlatParameter (with use_orig_params=True every "
    "weight is a 1-D slice of its rank's shard, empty on some ranks), so no layer's weight keeps "
    "its shape for a mask; "
)
"""Why FSDP1 is refused; the caller adds what to do instead."""


def _check_model(model: nn.Module) -> None:
    """Models the masks cannot work on: weights on the meta device (no values) and modules
    reparametrized by ``torch.nn.utils.prune`` (their weight is no longer a parameter)."""
    if not isinstance(model, nn.Module):
        raise CompressError(f"model: got {type(model).__name__}; give a torch.nn.Module")
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FullyShardedDataParallel

        if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            raise CompressError(
                f"model: {FSDP1_REFUSED}shard with torch.distributed.fsdp.fully_shard (FSDP2) "
                "instead, then call create_compressed_model"
            )
    for name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if param.device.type == "meta":
                raise CompressError(
                    f"model: {name + '.' if name else ''}{pname} is on the meta device (it has "
                    "no values); materialize the model first (model.to_empty(device='cpu') and "
                    "load its weights)"
                )
            if pname.endswith("_orig") and hasattr(module, pname.removesuffix("_orig") + "_mask"):
                raise CompressError(
                    f"model: {name or type(model).__name__} carries a torch.nn.utils.prune "
                    f"reparametrization of {pname.removesuffix('_orig')!r}; HINT: call "
                    "torch.nn.utils.prune.remove(module, name) first"
                )


def _get(state: Any, key: str) -> Any:
    return state.get(key) if isinstance(state, Mapping) else type(state).__name__


def create_compressed_model(
    model: nn.Module,
    config: str | Path | Mapping[str, Any] | Config,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    teacher: nn.Module | None = None,
) -> tuple[CompressionController, nn.Module]:
    """Compresses ``model`` in place as the recipe says and returns ``(controller, model)``.

    With ``knowledge_distillation`` in the recipe, ``teacher`` is the model to distil from (by
    default a frozen copy of ``model`` as it is before compression).

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> ctrl, net = create_compressed_model(net, {"compression": {
        ...     "algorithm": "magnitude_sparsity", "sparsity_init": 0.5}})
        >>> round(ctrl.statistics().to_dict()["model"]["sparsity of compressed layers"], 2)
        0.5
    """
    _check_model(model)
    cfg = load_config(config)
    if example_inputs is None:
        inputs = cfg.example_inputs()
    elif isinstance(example_inputs, torch.Tensor):
        inputs = (example_inputs,)
    else:
        inputs = tuple(example_inputs)
    return CompressionController(model, cfg, inputs, teacher), model
