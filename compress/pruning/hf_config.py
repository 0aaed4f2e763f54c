"""Keeps a Hugging Face model's config in step with the widths filter pruning leaves, so that
``save_pretrained`` then ``from_pretrained`` rebuilds the small model.

A config holds one width per kind for every layer: ``intermediate_size`` (the MLP hidden
width) and, where the config states ``head_dim`` apart from ``hidden_size``, the number of
attention heads. When every layer kept the same width it is written to the config; when the
layers differ, or the config cannot express the change (BERT and ViT derive the head size from
``hidden_size / num_attention_heads``), a warning says that ``save_pretrained`` will not rebuild
the model and the ``pruned`` export should be used instead.

Example:
    >>> from torch import nn
    >>> before = widths(nn.Linear(2, 2))  # a model without a config: nothing to track
    >>> before
    {}
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

__all__ = ["update_config", "widths"]

_INTERMEDIATE = ("intermediate_size", "n_inner")
_HEADS = ("q_proj", "query")


def _config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    return config if hasattr(config, "to_dict") else None


def widths(model: nn.Module) -> dict[str, tuple[str, int]]:
    """Per Linear layer whose width the config states: (config key, out_features). Read before
    pruning, so the layers are found by the width the config gives them."""
    config = _config(model)
    if config is None:
        return {}
    keys = {
        getattr(config, k): k for k in _INTERMEDIATE if isinstance(getattr(config, k, None), int)
    }
    heads = getattr(config, "num_attention_heads", None)
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if name.rpartition(".")[2] in _HEADS and isinstance(heads, int):
            out[name] = ("num_attention_heads", module.out_features)
        elif module.out_features in keys:
            out[name] = (keys[module.out_features], module.out_features)
    return out


def update_config(model: nn.Module, before: dict[str, tuple[str, int]]) -> None:
    """Writes the widths ``model`` kept (layers named in ``before``) into its config, or warns
    that its config cannot describe them."""
    config = _config(model)
    if config is None or not before:
        return
    kept: dict[str, set[int]] = {}
    changed: set[str] = set()
    for name, (key, width) in before.items():
        try:
            now = model.get_submodule(name)
        except AttributeError:
            continue
        assert isinstance(now, nn.Linear)
        kept.setdefault(key, set()).add(now.out_features)
        if now.out_features != width:
            changed.add(key)
    problems = []
    for key in sorted(changed):
        values = kept[key]
        if len(values) != 1:
            problems.append(f"{key} differs between layers ({sorted(values)})")
            continue
        (value,) = values
        if key == "num_attention_heads":
            head_dim = getattr(config, "head_dim", None)
            if not isinstance(head_dim, int) or value % head_dim:
                problems.append("the config derives the head size from num_attention_heads")
                continue
            ratio = config.num_attention_heads // getattr(
                config, "num_key_value_heads", config.num_attention_heads
            )
            config.num_attention_heads = value // head_dim
            if hasattr(config, "num_key_value_heads"):
                config.num_key_value_heads = max(config.num_attention_heads // ratio, 1)
        else:
            setattr(config, key, value)
    if problems:
        warnings.warn(
            f"{type(model).__name__}'s config cannot describe the pruned widths ("
            + "; ".join(problems)
            + "): save_pretrained will not rebuild this model; use the 'pruned' export, or "
            "allocation 'uniform' with the attention blocks in ignored_scopes",
            stacklevel=3,
        )
