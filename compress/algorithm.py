"""What every algorithm provides to the controller. One level deep, few methods."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import torch
from torch import nn

from compress import distributed, experts, masks
from compress.errors import CompressError, ConfigError
from compress.recipe import scopes
from compress.recipe.config import AlgorithmConfig
from compress.schedules import Scheduler, moves_per_step, schedule_epoch

SPARSIFIABLE: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
"""Layer types always sparsified; :func:`is_sparsifiable` adds matrix layers of other types."""


def is_sparsifiable(module: nn.Module, *, embeddings: bool = False) -> bool:
    """A Linear or conv layer, or any other module whose ``weight`` is a matrix parameter (say
    ``transformers.pytorch_utils.Conv1D``, which stores it transposed: magnitudes do not care).
    Embedding tables count only with ``embeddings``: their rows are looked up, not multiplied."""
    if isinstance(module, SPARSIFIABLE):
        return True
    param = module._parameters.get("weight")
    if not isinstance(param, torch.Tensor) or param.dim() != 2:
        return False
    return embeddings or not isinstance(module, (nn.Embedding, nn.EmbeddingBag))


class Algorithm:
    """Binds one recipe entry to a model. Subclasses implement ``update``; the rest has defaults.

    ``update(per_step)`` is called after every scheduler event (``per_step`` is True after an
    optimizer step, False at an epoch start or at construction).
    """

    name = ""

    def __init__(
        self,
        model: nn.Module,
        cfg: AlgorithmConfig,
        scheduler: Scheduler,
        example_inputs: tuple[torch.Tensor, ...] | None,
    ) -> None:
        self.model = model
        self.cfg = cfg
        self.params = cfg.params
        self.scheduler = scheduler
        self.example_inputs = example_inputs

    def update(self, per_step: bool) -> None:
        raise NotImplementedError

    @property
    def level(self) -> float:
        """The level the schedule asks for now."""
        return 0.0

    @property
    def has_level(self) -> bool:
        """Whether the algorithm has a level of its own (knowledge distillation has none)."""
        return type(self).level is not Algorithm.level

    def set_level(self, level: float) -> None:
        """Moves to ``level`` now, outside the schedule (accuracy-aware training)."""
        raise CompressError(f"{self.name}: its level cannot be set")

    def loss(self) -> torch.Tensor | None:
        return None

    def statistics(self) -> dict[str, Any]:
        return {"algorithm": self.name}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def check_state(self, state: Mapping[str, Any]) -> None:
        """Checks this algorithm's entry of a controller state before any of the state is
        applied (a ``CompressError`` naming the key, what it holds and what is expected); the
        controller runs every algorithm's check on the whole state first."""

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass

    def strip(self, model: nn.Module) -> nn.Module:
        """Turns a deep copy of the compressed model into a plain one (masks are folded later)."""
        return model

    def strip_differs(self) -> str | None:
        """Why the stripped model computes something other than the masked one by design (None:
        it computes the same, and ``strip()`` checks that on the example inputs)."""
        return None


# --- checks of saved state (``Algorithm.check_state``) ----------------------------------------


def bad_state(where: str, what: str, expected: str) -> NoReturn:
    raise CompressError(f"compression state: {where} {what}; {expected} is expected")


def check_tensor(where: str, value: Any, shape: Sequence[int], *, unit: bool = False) -> None:
    """``value`` is a finite float tensor of ``shape`` (with ``unit``: values in [0, 1])."""
    expected = f"a float tensor of shape {list(shape)}" + (
        " with values in [0, 1]" if unit else " of finite numbers"
    )
    if not isinstance(value, torch.Tensor):
        bad_state(where, f"is a {type(value).__name__}", expected)
    if list(value.shape) != list(shape) or not value.is_floating_point():
        bad_state(where, f"has shape {list(value.shape)} and dtype {value.dtype}", expected)
    ok = torch.isfinite(value).all()
    if unit:
        ok = ok & (value >= 0).all() & (value <= 1).all()
    if not bool(ok):
        what = "holds NaN, Inf or values outside [0, 1]" if unit else "holds NaN or Inf"
        bad_state(where, what, expected)


def check_tensor_table(
    where: str, value: Any, shapes: Mapping[str, Sequence[int]], *, unit: bool = False
) -> None:
    """``value`` maps exactly the names of ``shapes`` to finite float tensors of those shapes
    (with ``unit``: values in [0, 1])."""
    if not isinstance(value, Mapping):
        bad_state(where, f"is a {type(value).__name__}", "a table of tensors")
    if sorted(map(str, value)) != sorted(shapes):
        got, want = sorted(map(str, value))[:5], sorted(shapes)[:5]
        bad_state(where, f"has entries {got}", f"one for each of {want}")
    for name, shape in shapes.items():
        check_tensor(f"{where}[{name!r}]", value[name], shape, unit=unit)


def check_numbers(where: str, value: Any, count: int) -> None:
    """``value`` is a list of ``count`` finite numbers."""
    expected = f"a list of {count} finite numbers"
    if not isinstance(value, (list, tuple)):
        bad_state(where, f"is a {type(value).__name__}", expected)
    if len(value) != count:
        bad_state(where, f"holds {len(value)} values", expected)
    for x in value:
        if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x):
            bad_state(where, f"holds {str(x)[:20]!r}", expected)


def check_fraction(where: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
        bad_state(where, f"is {str(value)[:20]!r}", "a number in [0, 1]")


def check_flag(where: str, value: Any) -> None:
    if not isinstance(value, bool):
        bad_state(where, f"is {str(value)[:20]!r}", "true or false")


def check_generator_state(where: str, value: Any, device: torch.device) -> None:
    """``value`` is a state a random generator on ``device`` accepts (``get_state()``)."""
    expected = f"a {device.type} generator's get_state() (a uint8 tensor)"
    ok = isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1
    if ok:
        try:
            torch.Generator(device=device).set_state(value.clone())
        except (RuntimeError, ValueError):
            ok = False
    if not ok:
        got = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        bad_state(where, f"{got} is not a random generator state", expected)


def weight(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """``module.<name>`` as the tensor it is (typed: nn.Module attributes are untyped)."""
    w = getattr(module, name)
    assert isinstance(w, torch.Tensor)
    return w


def param_name(layer: str, module: nn.Module) -> str:
    """The parameter a sparsity entry masks: ``weight``, or the fused expert parameter an entry
    named ``<experts module>.<parameter>`` stands for (``...mlp.experts.gate_up_proj``)."""
    last = layer.rpartition(".")[2]
    return last if last in experts.expert_params(module) else "weight"


def matrices(layer: str, module: nn.Module, w: torch.Tensor) -> list[torch.Tensor]:
    """The matrices sparsity allocates among: ``w`` itself, or each expert's matrix of a fused
    expert parameter (views of ``w``)."""
    return list(w.unbind(0)) if param_name(layer, module) != "weight" else [w]


def sparsity_event(algo: Algorithm, frozen: bool, per_step: bool) -> str:
    """What a sparsity schedule does at a scheduler event, as NNCF 2.17's scheduler does:

    - "init": construction (epoch -1): the masks take ``sparsity_init``;
    - "skip": nothing moves (a step of a per-epoch schedule, or before the schedule's first
      epoch);
    - "freeze": the first event of an epoch >= ``sparsity_freeze_epoch``: the masks stop moving
      (NNCF freezes before it sets that epoch's level);
    - "frozen": the masks stay, the reported level keeps following the schedule;
    - "update": the level and the masks move.
    """
    if algo.scheduler.epoch < 0 and not per_step:
        return "init"
    p = algo.params
    if per_step and not moves_per_step(p):
        return "skip"
    epoch = schedule_epoch(p, algo.scheduler)
    if epoch is None:
        return "skip"
    if frozen:
        return "frozen"
    return "freeze" if epoch >= p["sparsity_freeze_epoch"] else "update"


def weight_layers(model: nn.Module, cfg: AlgorithmConfig) -> list[tuple[str, nn.Module]]:
    """The layers a sparsity algorithm masks: Linear, conv and other matrix layers allowed by
    the scopes, one entry per distinct weight (a weight tied between modules is listed once),
    and fused expert parameters (the experts module under ``<name>.<parameter>``).
    An Embedding is masked only when ``target_scopes`` names it."""
    opts = cfg.options
    target = opts.get("target_scopes")
    layers = [
        (name, module)
        for name, module in scopes.select(
            model,
            (nn.Module,),
            ignored=opts.get("ignored_scopes"),
            target=target,
            validate=opts.get("validate_scopes", True),
            path=cfg.path,
        )
        if is_sparsifiable(module, embeddings=bool(target)) or param_name(name, module) != "weight"
    ]
    if not layers:
        raise ConfigError(
            f"{cfg.path}: no layer to compress: the model has no Linear or Conv layer "
            "inside target_scopes and outside ignored_scopes"
        )
    return layers


def attach_weight_masks(
    layers: list[tuple[str, nn.Module]],
) -> list[tuple[str, nn.Module, torch.Tensor]]:
    """Attaches one mask per distinct weight; modules sharing a weight share its mask."""
    by_param: dict[int, torch.Tensor] = {}
    out = []
    for name, module in layers:
        pname = param_name(name, module)
        key = id(module._parameters[pname])
        if key in by_param:
            masks.attach(module, pname, mask=by_param[key])
            continue
        by_param[key] = masks.attach(module, pname)
        out.append((name, module, by_param[key]))
    return out


def sparsity_rows(entries: list[tuple[str, nn.Module, torch.Tensor]]) -> list[dict[str, Any]]:
    """Per-layer statistics of masked weights; "weight's percentage" is NNCF's column: the
    layer's share of all masked weights, in percent."""
    rows = []
    total = sum(mask.numel() for _, _, mask in entries)
    for name, _, mask in entries:
        n = mask.numel()
        rows.append(
            {
                "layer": name,
                "shape": list(mask.shape),
                "params": n,
                "sparsity": 1.0 - distributed.scalar(mask.count_nonzero()) / n,
                "weight's percentage": 100.0 * n / total,
            }
        )
    return rows
