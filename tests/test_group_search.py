"""Torch-Pruning's group search with indexed lookups (compress/pruning/group_search.py) finds the
same groups, item for item, as its own scan, and a shrink through it removes the same channels."""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import pytest
import torch
import torch_pruning as tp
from test_group_check import MODELS
from test_structured import ALL
from torch import nn

from compress.analysis.untouched import copy_model
from compress.pruning import structured
from compress.pruning.channel_groups import build_groups
from compress.pruning.group_search import indexed_groups
from compress.pruning.structured import dependency_graph, shrink

_Group = tp.dependency.Group


def _groups(model: nn.Module, x: torch.Tensor) -> list[list[tuple[Any, ...]]]:
    """Every conv and linear layer's group with all its channels, as plain data."""
    dg = dependency_graph(copy_model(model), x)
    out = []
    for module in dg.module2node:
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        fn = dg.get_pruner_of_module(module).prune_out_channels
        width = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
        for idxs in (list(range(width)), [0], list(range(width - 1, -1, -2))):
            group = dg.get_pruning_group(module, fn, idxs)
            out.append(
                [
                    (
                        str(item.dep.target.name),
                        getattr(item.dep.handler, "__name__", repr(item.dep.handler)),
                        list(item.idxs),
                        list(item.root_idxs),
                    )
                    for item in group.items
                ]
            )
    return out


@pytest.mark.parametrize("name", ["densenet", "inception", "tinyvit", "timm_like", "resnet"])
def test_indexed_search_finds_the_groups_of_the_scan(name: str) -> None:
    torch.manual_seed(0)
    model, x = MODELS[name]()
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = _groups(model, x)
        with indexed_groups():
            got = _groups(model, x)
    assert got == want
    assert _Group.has_pruning_op.__module__ == "torch_pruning.dependency.group"  # restored


def test_a_shrink_through_the_indexed_search_removes_what_the_scan_removed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(0)
    model, x = MODELS["densenet"]()
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        groups = build_groups(model, x, **ALL)
        keep = {
            g.name: torch.rand(g.size, generator=torch.Generator().manual_seed(1)) < 0.5
            for g in groups
        }
        got = shrink(model, groups, keep, example_inputs=x)
        monkeypatch.setattr(structured, "indexed_groups", contextlib.nullcontext)
        want = shrink(model, groups, keep, example_inputs=x)
    assert {k: v.shape for k, v in got.state_dict().items()} == {
        k: v.shape for k, v in want.state_dict().items()
    }
    for k, v in want.state_dict().items():
        torch.testing.assert_close(got.state_dict()[k], v, rtol=0, atol=0)
    torch.testing.assert_close(got(x), want(x), rtol=0, atol=0)
