"""Data-dependent filter scores for ``filter_importance: nuclear_norm``: the nuclear norm of
every channel's feature maps over calibration batches, taken with forward hooks on the layers
that produce each group's channels. The model is in eval mode meanwhile (BatchNorm statistics do
not move) and its own channel masks are lifted (else a pruned channel could never return). A
model sharded by FSDP2 runs its forward passes as in training (every rank, feature maps whole
per sample) and is resharded after them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from compress import distributed, masks
from compress.analysis.outputs import on_device
from compress.pruning.importance import feature_map_nuclear_norms
from compress.pruning.structured import INPUT_OWNER, OWNER, ChannelGroup

__all__ = ["channel_masks", "nuclear_scores"]


def nuclear_scores(
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    batches: Iterable[torch.Tensor | tuple[torch.Tensor, ...]],
) -> dict[str, torch.Tensor]:
    """One score per channel of every group: the nuclear norm of its feature maps, summed over
    ``batches`` (model inputs: a tensor, or a tuple passed as positional arguments)."""
    scores = {g.name: torch.zeros(g.size) for g in groups}
    hooks = []
    for group in groups:
        for m in group.members:
            module = model.get_submodule(m.module_name)
            if m.role != "producer" or m.param_name != "weight":
                continue
            dim = 1 if isinstance(module, nn.modules.conv._ConvNd) else -1

            def hook(mod, args, out, s=scores[group.name], m=m, dim=dim):  # type: ignore[no-untyped-def]
                norms = feature_map_nuclear_norms(out, dim).cpu()
                s.index_add_(0, m.channel, norms[m.index])

            hooks.append(module.register_forward_hook(hook))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # calibration must not move BatchNorm statistics
    # Our own masks are lifted while measuring, else a pruned channel could never return.
    saved = [(mask, mask.clone()) for mask in channel_masks(model, groups)]
    for mask, _ in saved:
        mask.fill_(1)
    try:
        with torch.no_grad():
            for batch in batches:
                args = (batch,) if isinstance(batch, torch.Tensor) else tuple(batch)
                model(*on_device(args, device))
    finally:
        # FSDP2 keeps the root's gathered parameters after a forward pass (for the backward
        # pass training would run next); the masks and scores that follow read the shards
        distributed.reshard(model)
        model.train(was_training)
        for h in hooks:
            h.remove()
        for mask, values in saved:
            mask.copy_(values)
    return scores


def channel_masks(model: nn.Module, groups: Sequence[ChannelGroup]) -> list[torch.Tensor]:
    """The channel masks (owners OWNER and INPUT_OWNER) on the members of ``groups``, each once."""
    found = {}
    for group in groups:
        for m in group.members:
            module = model.get_submodule(m.module_name)
            for owner in (OWNER, INPUT_OWNER):
                mask = masks.get_mask(module, m.param_name, owner)
                if mask is not None:
                    found[id(mask)] = mask
    return list(found.values())
