"""Filter pruning of mixture-of-experts widths: the intermediate channels of every expert of a
layer whose experts are fused 3-D parameters (:mod:`compress.experts`: transformers 5's
``MixtralExperts``, ``Qwen2MoeExperts``).

Such a layer holds ``gate_up_proj`` [experts, 2 x width, hidden] (the gate rows, then the up
rows) and ``down_proj`` [experts, hidden, width]. Intermediate channel ``i`` of expert ``e`` is
gate row ``i``, up row ``width + i`` and down column ``i`` of expert ``e``: masking its two rows
makes ``act(gate) * up`` exactly 0 there, so removing it changes nothing. These are not channel
groups Torch-Pruning traces; filter pruning handles them here:

- each expert's channels are scored by the recipe's ``filter_importance`` on its own gate and up
  rows (:data:`compress.pruning.importance.ROW_SCORES`, the two scores added; the data-dependent
  criteria ``nuclear_norm`` and ``scop`` score them by L2), and every expert keeps its best
  channels;
- every expert of every layer keeps the SAME number of channels: the filter ratio the groups
  are pruned at, rounded as the recipe rounds (``round_to``, ``rounding``), so that the config's
  one width key (``intermediate_size`` for Mixtral, ``moe_intermediate_size`` for Qwen2-MoE)
  states it and ``save_pretrained`` rebuilds the small model;
- the choice is masked during training (:func:`compress.masks.attach`, the owners of channel
  masks) and :func:`shrink` removes it at ``strip()``, writing the width into the config.

Left whole, each with an :class:`~compress.pruning.channel_groups.Excluded` row the coverage
warning lists before training: layers out of scope; every layer of a model whose config states
one width for them when some are out of scope, or when no config key states it (then
``prune_beyond_config: true`` prunes them, with the ``pruned`` export); layers of another
layout; all of them under ``pruning_latency_target``, whose table times the traced groups only.
``pruning_flops_target`` counts them: its searches see the experts' MACs at each filter ratio.

Example:
    >>> from torch import nn
    >>> state = build(nn.Linear(2, 2), {}, {}, {}, [], path="compression")
    >>> state.names
    []
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compress import masks
from compress.errors import CompressError
from compress.experts import expert_modules
from compress.pruning.allocation import kept_count, top
from compress.pruning.channel_groups import Excluded
from compress.pruning.importance import ROW_SCORES
from compress.pruning.structured import INPUT_OWNER, OWNER
from compress.recipe import scopes

__all__ = [
    "Experts",
    "apply",
    "build",
    "choose",
    "counted",
    "fit_shapes",
    "least",
    "load",
    "pruned",
    "rows",
    "shrink",
    "sizes",
    "state_dict",
]

_PARAMS = ("gate_up_proj", "down_proj")
_KEYS = ("moe_intermediate_size", "intermediate_size")
"""The config keys that may state the experts' width, the more specific first."""


@dataclass
class Experts:
    """The mixture-of-experts layers filter pruning prunes: their names, full widths, MACs and
    elements per fused parameter (``<layer>.gate_up_proj``), the config key that states the
    width, and the channels each expert keeps now ([experts, width] per layer)."""

    names: list[str]
    width: dict[str, int] = field(default_factory=dict)
    macs: dict[str, int] = field(default_factory=dict)
    numel: dict[str, int] = field(default_factory=dict)
    key: str | None = None
    keep: dict[str, torch.Tensor] = field(default_factory=dict)


def _layout(module: nn.Module) -> int | None:
    """The width of a layer of the fused layout above; None for any other layout (biases,
    other parameters, transposed matrices)."""
    params = dict(module.named_parameters(recurse=False))
    if set(params) != set(_PARAMS):
        return None
    gu, down = params["gate_up_proj"], params["down_proj"]
    n, two_width, hidden = gu.shape
    width = two_width // 2
    if two_width % 2 or tuple(down.shape) != (n, hidden, width):
        return None
    return width


def _param(module: nn.Module, name: str) -> nn.Parameter:
    param = module._parameters[name]
    assert param is not None  # _layout checked that both are set
    return param


def _config_key(model: nn.Module, width: int) -> str | None:
    config = getattr(model, "config", None)
    return next((k for k in _KEYS if getattr(config, k, None) == width), None)


def build(
    model: nn.Module,
    options: Mapping[str, Any],
    params: Mapping[str, Any],
    macs: Mapping[str, int],
    excluded: list[Excluded],
    *,
    path: str,
) -> Experts:
    """The mixture-of-experts layers of ``model`` that filter pruning with the recipe's
    ``options`` (scopes) and ``params`` prunes; the others join ``excluded`` with why. ``macs``
    are the model's MACs per module and fused parameter
    (:func:`compress.analysis.summary.layer_macs`)."""
    found = expert_modules(model)
    if not found:
        return Experts([])
    kinds = tuple({type(m) for _, m in found})
    selected = {
        n
        for n, _ in scopes.select(
            model,
            kinds,
            ignored=options.get("ignored_scopes"),
            target=options.get("target_scopes"),
            validate=False,  # the groups' selection validated them
            path=path,
        )
    }
    names, width = [], {}
    for name, module in found:
        w = _layout(module)
        if w is None:
            excluded.append(Excluded(name, "expert layout", "fused experts of another layout"))
        elif name in selected and all(f"{name}.{p}" in selected for p in _PARAMS):
            names.append(name)
            width[name] = w
        else:
            excluded.append(Excluded(name, "out of scope", "the scopes leave these experts out"))
    target = "pruning_latency_target" if params.get("pruning_latency_target") else None
    beyond = bool(params.get("prune_beyond_config"))
    keys = {_config_key(model, w) for w in width.values()}
    stated = keys.pop() if len(keys) == 1 else None  # the key of every pruned layer's width
    key = stated if len(names) == len(found) else None  # which states it when all are pruned
    why = None
    if target:
        why = f"{target}'s table times the traced channel groups only", "latency target"
    elif not beyond and getattr(model, "config", None) is not None:
        if stated is None:
            why = "no config key states their width (save_pretrained would not rebuild)", "config"
        elif key is None:
            why = f"{stated} states one width for all {len(found)} expert layers", "config"
    if why is not None and names:
        excluded.extend(Excluded(n, why[1], why[0]) for n in names)
        return Experts([])
    return Experts(
        names,
        width,
        {f"{n}.{p}": int(macs.get(f"{n}.{p}", 0)) for n in names for p in _PARAMS},
        {f"{n}.{p}": _param(model.get_submodule(n), p).numel() for n in names for p in _PARAMS},
        key,
        {n: torch.ones(_experts(model, n), width[n], dtype=torch.bool) for n in names},
    )


def _experts(model: nn.Module, name: str) -> int:
    return int(_param(model.get_submodule(name), "gate_up_proj").shape[0])


def scores(module: nn.Module, criterion: str) -> torch.Tensor:
    """[experts, width]: each expert's channels scored on its gate and up rows, the two added."""
    fn = ROW_SCORES.get(criterion, ROW_SCORES["L2"])
    gu = _param(module, "gate_up_proj").detach().float()
    width = gu.shape[1] // 2
    return torch.stack([fn(gu[e, :width]) + fn(gu[e, width:]) for e in range(gu.shape[0])])


def _kept(state: Experts, name: str, ratio: float, params: Mapping[str, Any], rounding: str) -> int:
    """The channels every expert of layer ``name`` keeps at filter ratio ``ratio``."""
    return kept_count(state.width[name], ratio, params["round_to"], rounding=rounding)


def choose(
    model: nn.Module,
    state: Experts,
    ratio: float,
    params: Mapping[str, Any],
    rounding: str,
) -> None:
    """Every expert of every layer keeps its best ``kept_count(width, ratio)`` channels, by the
    recipe's ``filter_importance`` and ``round_to`` (``params``)."""
    for name in state.names:
        n = _kept(state, name, ratio, params, rounding)
        ranked = scores(model.get_submodule(name), params["filter_importance"])
        state.keep[name] = torch.stack([top(s, n) for s in ranked])


def counted(
    state: Experts, ratio: float, params: Mapping[str, Any], rounding: str
) -> dict[str, torch.Tensor]:
    """Keep masks with the counts :func:`choose` keeps at ``ratio`` (the first channels), for
    the FLOPs searches, which count channels and need not score them."""
    out = {}
    for name, k in state.keep.items():
        out[name] = (
            torch.arange(k.shape[1]) < _kept(state, name, ratio, params, rounding)
        ).expand_as(k)
    return out


def apply(model: nn.Module, state: Experts) -> None:
    """Masks the gate and up rows and the down columns of the channels ``state`` drops."""
    for name in state.names:
        module = model.get_submodule(name)
        keep = state.keep[name].to(masks.MASK_DTYPE)
        gu = masks.attach(module, "gate_up_proj", owner=OWNER)
        down = masks.attach(module, "down_proj", owner=INPUT_OWNER)
        with torch.no_grad():
            gu.copy_(torch.cat([keep, keep], 1)[:, :, None].expand_as(gu))
            down.copy_(keep[:, None, :].expand_as(down))


def pruned(state: Experts) -> bool:
    return any(not k.all() for k in state.keep.values())


def sizes(
    state: Experts, keep: Mapping[str, torch.Tensor] | None = None
) -> tuple[dict[str, int], float]:
    """(elements per fused parameter, MACs saved) once the dropped channels are removed; a
    layer named in ``keep`` is counted with that [experts, width] mask instead."""
    numel, saved = {}, 0.0
    for name in state.names:
        k = (keep or {}).get(name, state.keep[name])
        share = int(k.sum()) / k.numel()
        for p in (f"{name}.{p}" for p in _PARAMS):
            numel[p] = round(state.numel[p] * share)
            saved += state.macs[p] * (1.0 - share)
    return numel, saved


def least(state: Experts) -> dict[str, torch.Tensor]:
    """One channel per expert: the most pruning can remove."""
    out = {}
    for name, k in state.keep.items():
        out[name] = torch.zeros_like(k)
        out[name][:, 0] = True
    return out


def rows(state: Experts, model: nn.Module) -> list[dict[str, Any]]:
    """Statistics rows: one per fused parameter, its kept channels per expert."""
    out = []
    for name in state.names:
        kept = int(state.keep[name][0].sum())
        width = state.width[name]
        for p in _PARAMS:
            out.append(
                {
                    "layer": f"{name}.{p}",
                    "group": name,
                    "weight shape": list(_param(model.get_submodule(name), p).shape),
                    "mask shape": list(state.keep[name].shape),
                    "kept filters": kept,
                    "pruning level": 1.0 - kept / width,
                }
            )
    return out


def state_dict(state: Experts) -> dict[str, torch.Tensor]:
    return {n: k.clone() for n, k in state.keep.items()}


def check(state: Experts, saved: Any) -> None:
    """A saved ``experts`` entry (None: saved before experts were pruned) fits this model."""
    if saved is None:
        return
    if not isinstance(saved, Mapping) or (
        saved
        and (
            sorted(map(str, saved)) != sorted(state.keep)
            or any(
                not isinstance(saved[n], torch.Tensor) or tuple(saved[n].shape) != tuple(k.shape)
                for n, k in state.keep.items()
            )
        )
    ):
        names = sorted(map(str, saved))[:3] if isinstance(saved, Mapping) else type(saved).__name__
        raise CompressError(
            f"filter_pruning state does not fit this model: it prunes the experts of "
            f"{names}, the model {sorted(state.keep)[:3]} (or their widths differ)"
        )


def load(state: Experts, saved: Mapping[str, torch.Tensor] | None) -> None:
    """Restores the kept channels; a state without them (saved before experts were pruned)
    keeps every channel."""
    check(state, saved)
    saved = saved or {}
    for name, k in state.keep.items():
        state.keep[name] = torch.as_tensor(saved.get(name, k), dtype=torch.bool).clone()


def _resize(module: nn.Module, gu: torch.Tensor, down: torch.Tensor) -> None:
    for name, value in zip(_PARAMS, (gu, down)):
        grad = _param(module, name).requires_grad
        setattr(module, name, nn.Parameter(value, requires_grad=grad))
    if isinstance(getattr(module, "intermediate_dim", None), int):
        setattr(module, "intermediate_dim", down.shape[2])  # noqa: B010 (mypy: attrs are tensors)


def shrink(model: nn.Module, state: Experts) -> None:
    """Removes the dropped channels from ``model`` (masks folded) in place and writes the width
    into its config's key."""
    if not pruned(state):
        return
    kept = 0
    for name in state.names:
        module = model.get_submodule(name)
        width = state.width[name]
        gu, down = (_param(module, p).detach() for p in _PARAMS)
        index = [torch.nonzero(k).flatten() for k in state.keep[name]]
        new_gu = torch.stack([torch.cat([g[i], g[width + i]]) for g, i in zip(gu, index)])
        new_down = torch.stack([d[:, i] for d, i in zip(down, index)])
        _resize(module, new_gu.clone(), new_down.clone())
        kept = new_down.shape[2]
    config = getattr(model, "config", None)
    if state.key is not None and config is not None:
        setattr(config, state.key, kept)


def fit_shapes(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Gives ``model``'s fused expert parameters the shapes of ``state_dict``'s (a ``pruned``
    file of a model whose experts were pruned; the values are loaded after)."""
    for name, module in expert_modules(model):
        gu, down = state_dict.get(f"{name}.gate_up_proj"), state_dict.get(f"{name}.down_proj")
        if _layout(module) is None or gu is None or down is None:
            continue
        if tuple(gu.shape) != tuple(_param(module, "gate_up_proj").shape):
            _resize(module, torch.empty_like(gu), torch.empty_like(down))
