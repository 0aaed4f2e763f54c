"""Torch-Pruning's group search with indexed lookups (compress/pruning/group_search.py) finds the
same groups, item for item, as its own scan, and a shrink through it removes the same channels."""

from __future__ import annotations

import contextlib
import re
import warnings
from typing import Any

import pytest
import torch
import torch_pruning as tp
from test_group_check import MODELS
from test_structured import ALL
from torch import nn
from torch.nn import functional as F

import compress
from compress.analysis.untouched import copy_model
from compress.pruning import channel_groups, exactness, structured
from compress.pruning.channel_groups import Excluded, build_groups
from compress.pruning.group_search import Runaway, indexed_groups, searched, widest_dim
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
            out.append(_plain(dg.get_pruning_group(module, fn, idxs)))
    return out


def _plain(group: Any) -> list[tuple[Any, ...]]:
    """A Torch-Pruning group as plain data: per item, its layer, handler and index lists."""
    return [
        (
            str(item.dep.target.name),
            getattr(item.dep.handler, "__name__", repr(item.dep.handler)),
            list(item.idxs),
            list(item.root_idxs),
        )
        for item in group.items
    ]


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


DIM, WS, HEADS = 8, 2, 2


class Windows(nn.Module):
    """torchvision's ``shifted_window_attention`` (Swin) without the shift: windows cut out by
    view/permute, projections read with ``F.linear``, a relative position bias from a table."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.table = nn.Parameter(torch.randn((2 * WS - 1) ** 2, HEADS))
        grid = torch.meshgrid(torch.arange(WS), torch.arange(WS), indexing="ij")
        coords = torch.stack(grid).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + WS - 1
        self.register_buffer("index", (rel[..., 0] * (2 * WS - 1) + rel[..., 1]).flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        n = WS * WS
        x = x.view(b, h // WS, WS, w // WS, WS, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, n, c)
        qkv = F.linear(x, self.qkv.weight, self.qkv.bias)
        q, k, v = qkv.reshape(x.size(0), n, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4)
        bias = self.table[self.index].view(n, n, -1).permute(2, 0, 1).contiguous().unsqueeze(0)
        attn = F.softmax(q.matmul(k.transpose(-2, -1)) + bias, dim=-1)
        x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), n, c)
        x = F.linear(x, self.proj.weight, self.proj.bias)
        return x.view(b, h // WS, w // WS, WS, WS, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


class WindowNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(12, DIM)
        self.attn = Windows()
        self.mlp = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM))
        self.head = nn.Linear(DIM, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = x + self.attn(x)
        x = x + self.mlp(x)
        return self.head(x.mean((1, 2)))


WINDOWS_X = torch.randn(2, 4, 4, 12, generator=torch.Generator().manual_seed(0))
RUNAWAY = r"Torch-Pruning's group search maps its channels to \d+ positions at \S+, more than " + (
    r"the widest parameter dimension \(32\)"
)


def test_a_search_that_runs_away_leaves_its_group_out_and_the_rest_prunes() -> None:
    """Through the windows Torch-Pruning maps the residual stream's channels to ever more
    positions and its search never ends; the group is left out, said, and the MLP still
    prunes, with a stripped model that computes what the masked one does."""
    torch.manual_seed(0)
    model, excluded = WindowNet().eval(), list[Excluded]()
    assert widest_dim(model) == 4 * DIM
    with pytest.warns(UserWarning, match=r"group 'embed': " + RUNAWAY):
        groups = build_groups(model, WINDOWS_X, excluded=excluded, time_budget=60)
    assert [g.name for g in groups] == ["mlp.0"]
    away = {e.group for e in excluded if re.fullmatch(RUNAWAY + r": .*", e.detail)}
    assert away == {"embed"}  # mlp.2 writes the same residual stream: not searched again
    assert _Group.add_dep.__module__ == "torch_pruning.dependency.group"  # restored
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        recipe = {"algorithm": "filter_pruning", "pruning_init": 0.5}
        ctrl, masked = compress.create_compressed_model(model, {"compression": recipe}, WINDOWS_X)
    masked.eval()
    with torch.no_grad():
        want = masked(WINDOWS_X)
        plain = ctrl.strip().eval()
        assert plain.mlp[0].out_features == 2 * DIM
        torch.testing.assert_close(plain(WINDOWS_X), want, rtol=1e-4, atol=1e-5)


def test_the_index_list_past_the_widest_dimension_raises_and_one_within_does_not() -> None:
    """A flatten before a linear layer maps 4 channels to 4 * 8 * 8 = 256 positions, the
    linear layer's input width: legitimate up to there, a runaway past it."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(256, 2))
    dg = dependency_graph(copy_model(model), torch.randn(1, 3, 8, 8))
    conv = next(m for m in dg.module2node if isinstance(m, nn.Conv2d))
    fn = dg.get_pruner_of_module(conv).prune_out_channels
    with indexed_groups(widest_dim(model)):
        assert dg.get_pruning_group(conv, fn, [0, 1, 2, 3])
    with pytest.raises(Runaway, match=r"maps its channels to 256 positions .* \(255\)"):
        with indexed_groups(255):
            dg.get_pruning_group(conv, fn, [0, 1, 2, 3])


def test_the_budget_stops_a_search_that_runs_away_with_the_key_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without the cap, Torch-Pruning's own search on the windows never ends: the budget of
    the recipe stops it, with the model, the step and the key named."""
    monkeypatch.setattr(channel_groups, "widest_dim", lambda model: None)
    recipe = {"algorithm": "filter_pruning", "params": {"trace_time_budget": 1}}
    with pytest.raises(
        compress.CompressError,
        match=r"Torch-Pruning did not finish tracing WindowNet within 1 s \(filter_pruning "
        r"params\.trace_time_budget\): .*raise the budget",
    ):
        compress.create_compressed_model(WindowNet(), {"compression": recipe}, WINDOWS_X)


@pytest.mark.parametrize("name", ["densenet", "inception", "tinyvit", "scaled"])
def test_a_search_given_again_is_the_one_torch_pruning_makes_then(name: str) -> None:
    """Three removal passes on one graph put back between them: the second in the other order
    (concats and splits of other sizes), the third as the first. Every search ``searched``
    gives is the one Torch-Pruning makes at that point; the third pass searches again only
    the groups that reach an unbind (timm's q, k, v), whose searches are never kept."""
    torch.manual_seed(0)
    model, x = MODELS[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        groups = build_groups(model, x, validate=False, **ALL)
        copy = copy_model(model).eval()
        dg = dependency_graph(copy, x)
    keep = exactness._random_keep(groups)
    restore = exactness._restorer(copy, dg)
    made: list[int] = []
    search = dg.get_pruning_group

    def counted(*args: Any) -> Any:
        made.append(1)
        return search(*args)

    dg.get_pruning_group = counted  # type: ignore[method-assign]
    per_pass, unbound = [], set()
    for order in (groups, groups[::-1], groups):
        restore()
        made.clear()
        with structured.concats_as_sized(dg), indexed_groups(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for group in order:
                module = copy.get_submodule(group.root.module_name)
                fn = dg.get_pruner_of_module(module).prune_out_channels
                dropped = group.root.index[~keep[group.name][group.root.channel]].tolist()
                given = searched(dg, module, fn, sorted(dropped))
                fresh = tp.DependencyGraph.get_pruning_group(dg, module, fn, sorted(dropped))
                assert _plain(given) == _plain(fresh), group.name
                fresh.prune(record_history=False)
                if any(item.dep.target.type == tp.ops.OPTYPE.UNBIND for item in fresh.items):
                    unbound.add(group.name)
        per_pass.append(len(made))
    assert per_pass[0] == len(groups) and per_pass[2] == len(unbound)
    assert len(unbound) == (2 if name == "tinyvit" else 0)
