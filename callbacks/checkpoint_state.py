"""What a checkpoint written with ``CompressionCallback`` holds besides the controller state:
the masked weights under ``state_dict`` (as the model computes with them), and, while some mask
can still move, the stored values of masked-out weights that the masked ``state_dict`` loses.
No Lightning here: these are functions of the masked model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from compress import distributed, masks
from compress.controller import CompressionController, pack_bits, unpack_bits
from compress.errors import CompressError


def masks_may_move(ctrl: CompressionController) -> bool:
    """Whether the stored values of masked-out weights can still reach the model: some mask is
    not frozen yet (it may give a weight back, or lets the gradient through, straight-through).
    Const sparsity never moves its masks."""
    return any(getattr(a, "frozen", True) is False for a in ctrl.algorithms)


def _masked_params(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """``{"<module>.<param>": (module, param name)}`` for every masked parameter, once each."""
    out: dict[str, tuple[nn.Module, str]] = {}
    seen: set[int] = set()
    for mod_name, module, pname, _ in masks.iter_masked(model):
        param = module._parameters.get(pname)
        if param is None or id(param) in seen:
            continue
        seen.add(id(param))
        out[f"{mod_name}.{pname}" if mod_name else pname] = (module, pname)
    return out


def masked_values(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The stored values the masked ``state_dict`` loses: per parameter, the positions where
    the stored value differs from the masked one (bits) and those values, in order (of a
    sharded model: on rank 0, empty on the other ranks)."""
    out = {}
    for key, (module, pname) in _masked_params(model).items():
        param = module._parameters[pname]
        assert param is not None
        # sharded weights are gathered whole to rank 0, which writes the file (every rank
        # takes part); the other ranks give nothing
        stored = distributed.to_rank_zero(param.detach())
        masked = distributed.to_rank_zero(masks.effective(module, pname))
        if stored is None or masked is None:
            continue
        lost = (stored != masked) | (stored.signbit() != masked.signbit())
        if bool(lost.any()):
            out[key] = {"where": pack_bits(lost), "values": stored[lost].cpu()}
    return out


def check_masked_values(model: nn.Module, values: Any) -> dict[str, torch.Tensor]:
    """The positions of every entry of ``masked_values``, each checked against its parameter
    (``where`` of the parameter's shape, one stored value per position) before any is written."""
    if not isinstance(values, Mapping):
        raise CompressError(f"checkpoint: masked_values is a {type(values).__name__}, not a dict")
    params = _masked_params(model)
    out = {}
    for key, saved in values.items():
        if key not in params:
            raise CompressError(f"checkpoint: masked values for {key!r}, which is not masked")
        if not isinstance(saved, Mapping) or not isinstance(saved.get("where"), Mapping):
            raise CompressError(f"checkpoint: masked_values[{key!r}] has no packed 'where'")
        module, pname = params[key]
        shape = list(distributed.full(module._parameters[pname].detach()).shape)  # type: ignore[union-attr]
        where = unpack_bits(saved["where"])
        if list(where.shape) != shape:
            raise CompressError(
                f"checkpoint: masked_values[{key!r}].where has shape {list(where.shape)}, "
                f"the parameter {shape}"
            )
        stored = saved.get("values")
        count = int(where.sum())
        if not isinstance(stored, torch.Tensor) or list(stored.shape) != [count]:
            got = list(stored.shape) if isinstance(stored, torch.Tensor) else type(stored).__name__
            raise CompressError(
                f"checkpoint: masked_values[{key!r}].values is {got}; {count} values, one per "
                "position of 'where', are needed"
            )
        out[key] = where
    return out


def restore_masked_values(model: nn.Module, values: Mapping[str, Mapping[str, Any]]) -> None:
    """Writes back what ``masked_values`` saved, into the weights loaded from ``state_dict``
    (all of it checked first)."""
    params = _masked_params(model)
    checked = check_masked_values(model, values)
    for key, saved in values.items():
        module, pname = params[key]
        param = module._parameters[pname]
        assert param is not None
        where = checked[key].to(param.device)
        with torch.no_grad():
            stored = distributed.full(param.detach()).clone()
            stored[where] = saved["values"].to(param.device, param.dtype)
            param.copy_(distributed.shard_like(stored, param))


def unsaved_sharded_parameters(model: nn.Module) -> list[str]:
    """Parameters of a sharded (``fully_shard``) model that its ``state_dict`` leaves out: RB's
    logits, which the controller state holds. ``ModelParallelStrategy`` restores a full
    checkpoint parameter by parameter and, loading strictly, refuses a parameter it lacks."""
    if not any(distributed.is_sharded(p) for p in model.parameters()):
        return []
    saved = set(model.state_dict(keep_vars=True))
    return [name for name, _ in model.named_parameters() if name not in saved]


def fold_in_place(model: nn.Module) -> None:
    """Writes the masked values into the stored weights; the masks stay attached."""
    with torch.no_grad():
        for module, pname in _masked_params(model).values():
            param = module._parameters[pname]
            assert param is not None
            param.copy_(masks.effective(module, pname))


def masked_state(module: nn.Module, state: dict[str, Any], prefix: str, meta: Any) -> None:
    """A state_dict hook: a masked parameter is saved as the model computes with it.
    ``keep_vars=True`` callers (who want the live Parameters) get the stored ones."""
    for name in masks.masked_names(module):
        key = prefix + name
        if key in state and not isinstance(state[key], nn.Parameter):
            state[key] = masks.effective(module, name)


def report_masked_weights(module: nn.Module) -> None:
    """Makes ``module.state_dict()`` hold its masked parameters as the model computes with them
    (once per module)."""
    if not module.__dict__.get("_compress_state_hook"):
        module.register_state_dict_post_hook(masked_state)
        module.__dict__["_compress_state_hook"] = True
