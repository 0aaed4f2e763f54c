"""Keeps a Hugging Face model's config in step with the widths filter pruning leaves, so that
``save_pretrained`` then ``from_pretrained`` rebuilds the small model.

A config holds one width per kind for every layer: ``intermediate_size`` (``n_inner`` in
GPT-2: the MLP hidden width) and the number of attention heads. When every layer kept the same
width it is written to the config; heads are written with ``head_dim`` (the original head
size), which ViT, Llama and others read from the config. The updated config is checked by
building the model from it on the meta device: when that model's parameter shapes are not the
pruned ones (BERT and GPT-2 derive the head size from ``hidden_size / num_attention_heads``),
or the layers kept different widths, the config is left as it was and a warning says why and
what rebuilds the model instead (the ``pruned`` export, or attention kept whole).

Example:
    >>> from torch import nn
    >>> before = widths(nn.Linear(2, 2))  # a model without a config: nothing to track
    >>> before
    {}
"""

from __future__ import annotations

import copy
import re
import warnings
from typing import Any

import torch
from torch import nn

from compress.analysis.node_kinds import is_transposed_linear
from compress.pruning.hf_layers import out_width

__all__ = ["config_warning", "unstated", "update_config", "widths"]

_INTERMEDIATE = ("intermediate_size", "n_inner", "hidden_dim", "d_ff")
"""The config keys of the MLP width: most models, GPT-2, DistilBERT, T5."""
_HEADS = ("q_proj", "query", "c_attn")
_SCOPED = (
    ("shared_expert", "shared_expert_intermediate_size"),  # Qwen2-MoE
    ("encoder", "encoder_ffn_dim"),  # Whisper, BART, Marian: one MLP width per stack
    ("decoder", "decoder_ffn_dim"),
)
"""Layers (by a part of their name) whose width a key of their own states, in a config that has
that key: no other key states them."""
_FUSED_ATTENTION = ("qkv_proj", "query_key_value", "Wqkv")
"""Fused q, k and v projections (Phi-3, Falcon, MPT): never an MLP width, whatever their width
(Phi-3's 4 query and 2 key/value heads of 8 are 64 wide, as its intermediate_size can be)."""
_FUSED = {"gate_up_proj": 2}
"""Layers that hold several MLP projections side by side (Phi-3's gate and up): their width is
this many times the config's."""


def _fused(name: str) -> int:
    return _FUSED.get(name.rpartition(".")[2], 1)


def _config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    return config if hasattr(config, "to_dict") else None


def _out(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.out_features
    return out_width(module) if is_transposed_linear(module) else None


def widths(model: nn.Module) -> dict[str, tuple[str, int]]:
    """Per Linear (or GPT-2 ``Conv1D``) layer whose width the config states: (config key, the
    width the key gives: the out width, halved for a fused gate and up projection). Read before
    pruning, so the layers are found by the width the config gives them."""
    config = _config(model)
    if config is None:
        return {}
    keys = {
        getattr(config, k): k for k in _INTERMEDIATE if isinstance(getattr(config, k, None), int)
    }
    if hasattr(config, "n_inner") and config.n_inner is None:  # GPT-2: None means 4 * n_embd
        keys.setdefault(4 * config.hidden_size, "n_inner")
    heads = getattr(config, "num_attention_heads", None)
    own = [(part, k) for part, k in _SCOPED if isinstance(getattr(config, k, None), int)]
    out = {}
    for name, module in model.named_modules():
        width = _out(module)
        if width is None:
            continue
        scoped = [k for part, k in own if part in name.split(".")]
        width //= _fused(name)
        if scoped:  # Qwen2-MoE's shared expert, Whisper's encoder: only their own key
            if getattr(config, scoped[0]) == width:
                out[name] = (scoped[0], width)
        elif name.rpartition(".")[2] in _HEADS and isinstance(heads, int):
            out[name] = ("num_attention_heads", width)
        elif width in keys and name.rpartition(".")[2] not in _FUSED_ATTENTION:
            out[name] = (keys[width], width)
    return out


def update_config(
    model: nn.Module, before: dict[str, tuple[str, int]], *, pruned: bool = True
) -> None:
    """Writes the widths ``model`` kept (layers named in ``before``) into its config, or warns
    that its config cannot describe them and leaves it as it was. ``pruned``: whether any
    channel was removed; then the model built from the config is checked even when no width
    the config states changed (a layer no key states was cut)."""
    config = _config(model)
    if config is None or not (before or pruned):
        return
    kept: dict[str, set[int]] = {}
    full: dict[str, int] = {}
    changed: set[str] = set()
    for name, (key, width) in before.items():
        try:
            now = model.get_submodule(name)
        except AttributeError:
            continue
        value = _out(now)
        assert value is not None
        value //= _fused(name)
        kept.setdefault(key, set()).add(value)
        full[key] = width
        if value != width:
            changed.add(key)
    updates: dict[str, Any] = {}
    problems = []
    # Layers are found by width: when intermediate_size equals hidden_size, the projections
    # back to the hidden size match too and keep it. One pruned width beside the full one is
    # therefore tried, and the rebuild check below decides.
    mixed: list[str] = []
    for key in sorted(changed):
        values = kept[key]
        narrower = values - {full[key]}
        if len(values) > 1:
            mixed.append(f"{key}: the layers keep different widths ({sorted(values)}){_hint(key)}")
        if len(narrower) != 1:
            problems.append(mixed.pop())
            continue
        (value,) = narrower
        if key != "num_attention_heads":
            updates[key] = value
            continue
        head = full[key] // config.num_attention_heads  # the projection's channels per head
        updates |= _head_updates(config, value // head)
    layers: list[str] = []
    if not problems and (updates or pruned):
        problem, layers = _rebuild_problem(model, config, updates)
        if problem is None:
            for key, value in updates.items():
                setattr(config, key, value)
            return
        problems += mixed or [problem]
    if problems:
        scopes = sorted({re.sub(r"\.\d+\.", ".*.", n) for n in layers})
        keep_whole = (
            f", or keep the layers whose widths the config cannot state whole with "
            f"ignored_scopes: {scopes}"
            if scopes
            else ""
        )
        warnings.warn(
            f"{type(model).__name__}'s config cannot describe the pruned widths ("
            + "; ".join(problems)
            + "): the config is left as it was and save_pretrained will not rebuild this model; "
            "use the 'pruned' export (compress.export(..., formats=['pruned']), then "
            f"compress.load_pruned on a fresh model){keep_whole}",
            stacklevel=3,
        )


def unstated(model: nn.Module, group_names: list[str]) -> list[str]:
    """The groups of ``group_names`` (root layer names) whose pruned widths a Hugging Face
    model's config cannot state, so that ``save_pretrained`` would not rebuild the model; none
    without a config. A group's width is stated when a config key gives it (``intermediate_size``
    and its kin; heads, where the config reads ``head_dim`` instead of deriving the head size
    from ``hidden_size / num_attention_heads`` as BERT and GPT-2 do)."""
    config = _config(model)
    if config is None:
        return []
    stated = widths(model)
    cannot = [n for n in group_names if n not in stated]
    heads = [n for n in group_names if stated.get(n, ("",))[0] == "num_attention_heads"]
    if heads and not _fewer_heads_stated(model, config, heads[0]):
        cannot += heads
    return cannot


def config_warning(model: nn.Module, group_names: list[str]) -> str | None:
    """Before training, with ``prune_beyond_config: true``: the groups of ``group_names`` whose
    widths the config cannot state (:func:`unstated`), and that the export is then the
    ``pruned`` file; None when the config states every pruned width."""
    cannot = unstated(model, group_names)
    if not cannot:
        return None
    return (
        f"{type(model).__name__}'s config cannot state the widths of {scopes(cannot)} once "
        "pruned (prune_beyond_config: true): save_pretrained will not rebuild the pruned model; "
        "export it with formats=['pruned'] (compress.load_pruned rebuilds the small model on a "
        "fresh instance)"
    )


def scopes(names: list[str]) -> list[str]:
    """Layer names with their block indices as ``*``: one scope per kind of layer."""
    return sorted({re.sub(r"\.\d+\.", ".*.", n) for n in names})


def _fewer_heads_stated(model: nn.Module, config: Any, name: str) -> bool:
    """Whether a model built from ``config`` stating half the heads has half the heads' width
    in layer ``name``."""
    heads = config.num_attention_heads
    fewer = max(heads // 2, 1)
    try:
        half = _out(_built(model, config, _head_updates(config, fewer)).get_submodule(name))
    except Exception:  # noqa: BLE001 - any failure means the config cannot state it
        return False
    width = _out(model.get_submodule(name))
    return half is not None and width is not None and half * heads == width * fewer


def _head_updates(config: Any, kept: int) -> dict[str, Any]:
    """The config keys that state ``kept`` attention heads of the original head size (and the
    key/value heads that go with them under grouped-query attention)."""
    heads = config.num_attention_heads
    updates: dict[str, Any] = {"num_attention_heads": kept}
    if getattr(config, "head_dim", None) is None:
        updates["head_dim"] = config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None)
    if kv_heads is not None:
        updates["num_key_value_heads"] = max(kept // (heads // kv_heads), 1)
    return updates


def _built(model: nn.Module, config: Any, updates: dict[str, Any]) -> nn.Module:
    """``model``'s class built from ``config`` with ``updates``, on the meta device (no memory,
    no init cost)."""
    trial = copy.deepcopy(config)
    for key, value in updates.items():
        setattr(trial, key, value)
    with torch.device("meta"):
        return type(model)(trial)


def _hint(key: str) -> str:
    if key != "num_attention_heads":
        return ""
    return (
        "; one ratio for every attention block (allocation 'uniform', no layer_ratios on them) "
        "keeps them equal"
    )


def _rebuild_problem(
    model: nn.Module, config: Any, updates: dict[str, Any]
) -> tuple[str | None, list[str]]:
    """(None, []) when the model built from ``config`` with ``updates`` has the parameter shapes
    of ``model``; else the first shape that differs, and the layers whose outputs were cut where
    the config cannot say so (their out width differs; else their bias, or their weight when no
    bias does)."""
    try:
        fresh = _built(model, config, updates)
    except Exception as err:  # noqa: BLE001 - any failure means the config does not describe it
        return f"the model class does not build from it ({type(err).__name__}: {err})", []
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    wrong = [k for k in want if got.get(k) != want[k]]
    if not wrong:
        return None, []
    key = wrong[0]
    why = (
        ": the model derives the head size from hidden_size / num_attention_heads"
        if "num_attention_heads" in updates
        else ""
    )
    layers = [
        n for n in dict.fromkeys(k.rpartition(".")[0] for k in wrong) if _cut(n, model, fresh)
    ]
    if not layers:
        cut = [k for k in wrong if k.endswith(".bias")] or wrong
        layers = [k.rpartition(".")[0] for k in cut]
    return (
        f"a model built from it has {key} of shape {got.get(key)}, the pruned model "
        f"{want[key]}{why}",
        layers,
    )


def _cut(name: str, model: nn.Module, fresh: nn.Module) -> bool:
    """Whether layer ``name`` has fewer outputs in ``model`` than in ``fresh``."""
    try:
        now, full = _out(model.get_submodule(name)), _out(fresh.get_submodule(name))
    except AttributeError:
        return False
    return now is not None and full is not None and now < full
