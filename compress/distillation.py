"""Knowledge distillation (NNCF ``knowledge_distillation``): the compressed model learns to
match the outputs of its uncompressed self.

The teacher is a frozen copy of the model as it was when compression started (or the model the
user passes as ``teacher=``). A forward hook on the compressed model runs the teacher on the same
inputs, in eval mode and under ``no_grad``, whenever the model runs in training mode with
gradients on; ``loss()`` returns the distillation loss of the latest such forward pass, and the
controller adds it to ``ctrl.loss()``. The teacher is held by this object, never by the model:
it is in no ``state_dict``, checkpoint or export, and ``strip()`` removes the hook.

NNCF's losses, per pair of output tensors (student ``s``, teacher ``t``):

- ``mse``: ``scale * mean((s - t) ** 2)``, for outputs of 2 dimensions or more;
- ``softmax``: ``scale * T**2 * mean_b(sum_c(-softmax(t/T) * log_softmax(s/T)))`` for 2-D
  outputs ``[batch b, classes c]``.

Example:
    >>> import compress
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> ctrl, net = compress.create_compressed_model(net, {"compression": [
    ...     {"algorithm": "magnitude_sparsity", "sparsity_init": 0.5},
    ...     {"algorithm": "knowledge_distillation", "type": "mse"}]})
    >>> _ = net(torch.randn(4, 8))
    >>> float(ctrl.loss()) > 0
    True
"""

from __future__ import annotations

import copy
import hashlib
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from compress import distributed
from compress.algorithm import Algorithm
from compress.errors import CompressError
from compress.recipe.config import AlgorithmConfig
from compress.schedules import Scheduler


def frozen(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with gradients off (in place), ready to be a teacher."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# Tensors of more elements are hashed on a fixed strided subset of about this many elements (every
# k-th of the flattened tensor), so that a large teacher's digest stays cheap to compute.
DIGEST_SAMPLE = 2**20
DIGEST_SCHEME = f"sha256/strided-{DIGEST_SAMPLE}"


def teacher_digest(teacher: nn.Module) -> str:
    """What identifies a teacher: sha256 over the name, dtype, shape and bytes of every tensor of
    its ``state_dict``, in name order; a tensor of more than ``DIGEST_SAMPLE`` elements gives the
    bytes of every k-th element only. A sharded (FSDP2) tensor is gathered whole first, so the
    digest is the same on every rank and at any number of ranks (a collective: every rank calls
    this at once).

    Example:
        >>> net = nn.Linear(2, 2)
        >>> teacher_digest(net) == teacher_digest(copy.deepcopy(net))
        True
    """
    h = hashlib.sha256()
    for name, value in sorted(teacher.state_dict().items()):
        t = distributed.full(value.detach())
        h.update(f"{name}:{str(t.dtype)}:{list(t.shape)};".encode())
        flat = t.reshape(-1)
        if flat.numel() > DIGEST_SAMPLE:
            flat = flat[:: -(-flat.numel() // DIGEST_SAMPLE)]
        h.update(flat.contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return f"{DIGEST_SCHEME}:{h.hexdigest()}"


def check_teacher(algo: KnowledgeDistillation, entry: Mapping[str, Any], accept_new: bool) -> None:
    """Refuses a saved state (``entry``: the algorithm's part of the controller state) that was
    distilled from another teacher than ``algo``'s, unless ``accept_new``; warns when the state
    says nothing about its teacher (written by an earlier version)."""
    saved = entry.get("teacher_digest")
    if saved is None:
        warnings.warn(
            "knowledge_distillation: the checkpoint does not identify its teacher (written "
            "before teacher digests were kept); make sure the teacher is the one the run "
            "started with (teacher= the same pretrained model)",
            stacklevel=4,
        )
        return
    if not isinstance(saved, str):
        raise CompressError(
            f"compression state: knowledge_distillation.teacher_digest is {str(saved)[:40]!r}, "
            "not a digest"
        )
    if saved == algo.digest or accept_new:
        return
    scheme = saved.rpartition(":")[0]
    if scheme != DIGEST_SCHEME:
        why = f"its digest is of another kind ({scheme!r}, this version writes {DIGEST_SCHEME!r})"
    else:
        why = f"weights digest {algo.digest[-12:]}, the checkpoint's {saved[-12:]}"
    raise CompressError(
        "knowledge_distillation: the teacher differs from the one the run started with "
        f"({why}); resuming would distil from another model. Pass the same teacher (teacher= "
        "the same pretrained model, or, for the default teacher, a model built with the same "
        "weights the run started from), or accept_new_teacher=True (CompressionCallback or "
        "ctrl.load_state_dict) to continue with the new teacher deliberately"
    )


def mse_loss(student: torch.Tensor, teacher: torch.Tensor, scale: float) -> torch.Tensor:
    return scale * torch.nn.functional.mse_loss(student, teacher)


def softmax_loss(
    student: torch.Tensor, teacher: torch.Tensor, scale: float, temperature: float
) -> torch.Tensor:
    """Cross-entropy between the softened distributions, summed over classes, averaged over the
    batch and multiplied by ``temperature**2`` (so gradients keep their size as T grows)."""
    log_p = torch.log_softmax(student / temperature, dim=1)
    q = torch.softmax(teacher / temperature, dim=1)
    return scale * temperature**2 * -(q * log_p).sum(dim=1).mean()


def tensor_leaves(out: Any) -> list[Any]:
    """The leaves of a model output (tensor, tuple, list, dict or a dict-like ``ModelOutput``)
    in a fixed order; leaves that are not tensors are kept as None so positions line up."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [x for k in out for x in tensor_leaves(out[k])]
    if isinstance(out, (list, tuple)):
        return [x for v in out for x in tensor_leaves(v)]
    return [None]


class KnowledgeDistillation(Algorithm):
    name = "knowledge_distillation"

    def __init__(
        self,
        model: nn.Module,
        cfg: AlgorithmConfig,
        scheduler: Scheduler,
        example_inputs: tuple[torch.Tensor, ...] | None,
        *,
        teacher: nn.Module | None = None,
    ) -> None:
        super().__init__(model, cfg, scheduler, example_inputs)
        opts = cfg.options
        self.kind: str = opts["type"]
        self.scale = float(opts["scale"])
        self.temperature = float(opts["temperature"])
        # Built before any other algorithm touches the model (the controller's order), so a
        # copy is the model as it was when compression started.
        if teacher is None and any(distributed.is_sharded(p) for p in model.parameters()):
            raise CompressError(
                "knowledge_distillation: the model is sharded (fully_shard), and a sharded "
                "model cannot be copied to be its own teacher; pass teacher= a network "
                "sharded like the student (build it and fully_shard it in configure_model)"
            )
        self.teacher = frozen(teacher if teacher is not None else copy.deepcopy(model))
        self.digest = teacher_digest(self.teacher)  # kept in the state: a resume checks it
        self._latest: torch.Tensor | None = None
        self._warned: set[str] = set()
        self._handle = model.register_forward_hook(_make_hook(self), with_kwargs=True)

    def update(self, per_step: bool) -> None:
        pass

    def observe(self, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        """Runs the teacher on the student's inputs and keeps the distillation loss."""
        device = next((t.device for t in tensor_leaves(output) if t is not None), None)
        first = next(self.teacher.parameters(), None)
        if device is not None and first is not None and first.device != device:
            self.teacher.to(device)  # follows the student (Lightning moves it after setup)
        self.teacher.eval()
        with torch.no_grad():
            target = self.teacher(*args, **kwargs)
        self._latest = self.distill(output, target)

    def distill(self, student_out: Any, teacher_out: Any) -> torch.Tensor | None:
        """The loss between two model outputs: summed over the output tensors that carry a
        gradient in the student and have the shape the loss needs."""
        total: torch.Tensor | None = None
        for s, t in zip(tensor_leaves(student_out), tensor_leaves(teacher_out)):
            if s is None or t is None or not s.requires_grad or not s.is_floating_point():
                continue
            if self.kind == "softmax" and s.dim() != 2:
                self._warn_once(f"a {s.dim()}-D output is skipped (softmax needs [batch, classes])")
                continue
            if self.kind == "mse" and s.dim() < 2:
                self._warn_once(f"a {s.dim()}-D output is skipped (mse needs 2 dimensions or more)")
                continue
            t = t.to(s.dtype)
            if self.kind == "softmax":
                term = softmax_loss(s, t, self.scale, self.temperature)
            else:
                term = mse_loss(s, t, self.scale)
            total = term if total is None else total + term
        if total is None:
            self._warn_once("no output tensor to distill; the loss is zero")
        return total

    def _warn_once(self, what: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            warnings.warn(f"{self.cfg.path} (knowledge_distillation): {what}", stacklevel=3)

    def loss(self) -> torch.Tensor:
        """The loss of the latest training forward pass (zero before there is one); read once."""
        latest, self._latest = self._latest, None
        if latest is None:
            return torch.zeros(())
        return latest

    def statistics(self) -> dict[str, Any]:
        return {
            "algorithm": self.name,
            "type": self.kind,
            "scale": self.scale,
            "temperature": self.temperature,
            "teacher params": sum(p.numel() for p in self.teacher.parameters()),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"teacher_digest": self.digest}

    def strip(self, model: nn.Module) -> nn.Module:
        # A deep copy of the model holds a copy of the hook under the same id.
        model._forward_hooks.pop(self._handle.id, None)
        model._forward_hooks_with_kwargs.pop(self._handle.id, None)
        return model


def _make_hook(algo: KnowledgeDistillation) -> Any:
    # A plain function, not a bound method: deep-copying the model copies functions by reference
    # but would copy a bound method's object (the teacher and the whole algorithm).
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        if module.training and torch.is_grad_enabled():
            algo.observe(args, kwargs, out)

    return hook
