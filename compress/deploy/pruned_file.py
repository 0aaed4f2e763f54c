"""The ``pruned`` file: the kept channels per group, the input signature and the small weights.

A group is named by its root module, a stable id across fresh instances of the same class, so
:func:`load_pruned` rebuilds the small model from a fresh instance by finding its groups again
(:func:`compress.pruning.channel_groups.build_groups`) and shrinking them to the saved plan.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from compress.deploy.files import (  # safe_load: CRC checked, no pickles
    safe_load,
    stored_inputs,
    torch_save,
)
from compress.errors import CompressError
from compress.pruning.channel_groups import build_groups
from compress.pruning.moe import fit_shapes
from compress.pruning.structured import Inputs, as_tuple, shrink

__all__ = ["load_pruned", "save_pruned"]

FORMAT = "compress.pruned"
VERSION = 1


def save_pruned(
    small_model: nn.Module,
    plan: Mapping[str, list[int]],
    path: str | os.PathLike,
    example_inputs: Inputs,
) -> None:
    """Writes plan, input signature and weights; loadable with ``torch.load(weights_only=True)``.

    Written to a temporary file next to ``path`` and renamed, so a crash never leaves half a file.
    """
    inputs = as_tuple(example_inputs)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "plan": {name: [int(i) for i in kept] for name, kept in plan.items()},
        "input_shapes": [list(x.shape) for x in inputs],
        "input_dtypes": [str(x.dtype).removeprefix("torch.") for x in inputs],
        "state_dict": small_model.state_dict(),
    }
    torch_save(path, payload)


def read_pruned(path: Path) -> dict:
    payload = safe_load(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CompressError(f"{path}: not a pruned model file (format is not {FORMAT!r})")
    if payload.get("version") != VERSION:
        raise CompressError(
            f"{path}: version {payload.get('version')!r}, this library reads {VERSION}"
        )
    plan = payload.get("plan")
    if not isinstance(plan, dict) or not all(
        isinstance(k, str)
        and isinstance(v, list)
        and all(isinstance(i, int) and not isinstance(i, bool) for i in v)
        for k, v in plan.items()
    ):
        raise CompressError(
            f"{path}: the pruned file has no valid 'plan' (layer name -> kept channel indices)"
        )
    state = payload.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CompressError(f"{path}: the pruned file has no 'state_dict' of tensors")
    return payload


def load_pruned(fresh_model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Rebuilds the small model saved by :func:`save_pruned` from a fresh instance of its class.

    Example:
        >>> small = load_pruned(MyNet(), "out/model.pruned.pt")  # doctest: +SKIP
    """
    path = Path(path)
    payload = read_pruned(path)
    inputs = stored_inputs(payload, path)
    if not inputs:
        raise CompressError(f"{path}: the pruned file stores no input shapes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # only the groups named in the plan matter here
        # No numerical validation: it only leaves groups out, and the plan names the groups.
        groups = build_groups(
            fresh_model, inputs, prune_first_conv=True, prune_downsample_convs=True, validate=False
        )
    by_name = {g.name: g for g in groups}
    keep = {}
    for name, kept in payload["plan"].items():
        if name not in by_name:
            raise CompressError(
                f"{path}: the plan prunes layer {name!r}, which this model cannot prune"
            )
        mask = torch.zeros(by_name[name].size, dtype=torch.bool)
        if kept and (min(kept) < 0 or max(kept) >= mask.numel()):
            raise CompressError(
                f"{path}: the plan keeps channels outside layer {name!r}'s {mask.numel()}"
            )
        mask[kept] = True
        keep[name] = mask
    try:
        small = shrink(fresh_model, groups, keep, example_inputs=inputs)
        fit_shapes(small, payload["state_dict"])  # experts' widths: not groups of the plan
        small.load_state_dict(payload["state_dict"], strict=True)
    except (RuntimeError, ValueError, KeyError, CompressError) as err:
        raise CompressError(f"{path}: does not fit this model: {err}") from None
    return small
