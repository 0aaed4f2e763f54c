"""The numerical check of channel groups (compress/pruning/exactness.py): bisection finds the
groups that fail in few checks and leaves out what the per-group check left out, the checks
run on a small input and copy the model once when every group passes, and the time budget
names its key."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import pytest
import torch
from test_concat_pruning import DenseNet, InceptionNet
from test_structured import ALL, _make
from test_timm_attention import TinyViT
from timm_like import TimmLikeNet
from torch import nn

from compress import masks
from compress.analysis.untouched import copy_model
from compress.errors import CompressError
from compress.pruning import channel_groups, exactness, structured
from compress.pruning.channel_groups import build_groups
from compress.pruning.deadline import TimeBudgetExceeded
from compress.pruning.structured import ChannelGroup, apply_channel_mask, as_tuple, shrink


class Chain(nn.Module):
    """``n`` Linear layers, one group each, and after layer ``bad`` a channel shuffle (a view
    into two halves, transposed) that Torch-Pruning's mapping cannot follow: removing that
    layer's channels crashes, every other group is exact."""

    def __init__(self, n: int = 32, bad: int = 20, width: int = 8) -> None:
        super().__init__()
        self.bad = bad
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        for i, layer in enumerate(self.layers):
            x = torch.relu(layer(x))
            if i == self.bad:
                x = x.view(b, t, 2, d // 2).transpose(-2, -1).reshape(b, t, d)
        return x.mean(1)


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the checks: one call of ``_matches`` is one draw of one check."""
    calls = [0]
    real = exactness._matches

    def counted(*args: Any) -> str | None:
        calls[0] += 1
        return real(*args)

    monkeypatch.setattr(exactness, "_matches", counted)
    return calls


@pytest.mark.parametrize("bad", [0, 13, 30])
def test_one_bad_group_among_many_is_found_in_log_n_checks(
    bad: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, x = Chain(bad=bad), torch.randn(2, 4, 8)
    calls = _counting(monkeypatch)
    excluded: list[Any] = []
    with pytest.warns(UserWarning, match=f"'layers.{bad}': the shrunk model fails"):
        groups = build_groups(model, x, prune_first_conv=True, excluded=excluded)
    n = len(groups) + 1  # layers.31 is the network output
    assert n == 31
    assert [e.group for e in excluded if e.kind == "not exact"] == [f"layers.{bad}"]
    # the joint check, at most two per level of the bisection, the survivors together: 12,
    # where one check per group took 33
    assert calls[0] <= 2 * math.ceil(math.log2(n)) + 2


def _old_matches(model: nn.Module, groups: Sequence[ChannelGroup], keep: Any, x: Any) -> bool:
    """The check as it was: masks (norms too) on a copy, covered, against a shrunk copy."""
    masked = copy_model(model).eval()
    for group in groups:
        apply_channel_mask(masked, replace(group, mask_norms=True), keep[group.name])
    masks.cover(masked)
    try:
        small = shrink(masked, groups, keep, example_inputs=x).eval()
        with torch.no_grad():
            error = exactness._max_rel_error(masked(*x), small(*x))
    except Exception:  # noqa: BLE001 - a crash is one more way not to match
        return False
    return error <= 1e-4


def _old_exact_groups(model: nn.Module, groups: list[ChannelGroup], x: Any) -> list[str]:
    """The per-group check this replaces: all groups, then each alone, then those together."""
    inputs, keeps = as_tuple(x), exactness._draws(groups)

    def ok(some: Sequence[ChannelGroup]) -> bool:
        return all(_old_matches(model, some, keep, inputs) for keep in keeps)

    if ok(groups):
        return [g.name for g in groups]
    exact = [g for g in groups if ok([g])]
    return [g.name for g in exact] if len(exact) < 2 or ok(exact) else []


MODELS: dict[str, Callable[[], tuple[nn.Module, torch.Tensor]]] = {
    "attention": lambda: _make("attention"),  # two groups fail: heads from view
    "chain": lambda: (Chain(n=12, bad=5), torch.randn(2, 4, 8)),
    "resnet": lambda: _make("resnet"),
    "densenet": lambda: (DenseNet(), torch.randn(2, 3, 16, 16)),
    "inception": lambda: (InceptionNet(), torch.randn(2, 3, 16, 16)),
    "tinyvit": lambda: (TinyViT(), torch.randn(2, 3, 16, 16)),
    "timm_like": lambda: (TimmLikeNet(), torch.randn(1, 3, 16, 16)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_bisection_leaves_out_what_the_per_group_check_left_out(name: str) -> None:
    torch.manual_seed(0)
    model, x = MODELS[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = build_groups(model, x, validate=False, **ALL)
        checked = build_groups(model, x, **ALL)
    assert [g.name for g in checked] == _old_exact_groups(model, found, x)
    if name in ("attention", "chain"):
        assert len(checked) < len(found)  # the models where groups fail


def _counting_copies_and_traces(monkeypatch: pytest.MonkeyPatch) -> tuple[list[int], list[int]]:
    copies, traces = [0], [0]

    def copied(model: nn.Module) -> nn.Module:
        copies[0] += 1
        return copy_model(model)

    def traced(*args: Any, **kwargs: Any) -> Any:
        traces[0] += 1
        return structured.dependency_graph(*args, **kwargs)

    monkeypatch.setattr(structured, "copy_model", copied)
    monkeypatch.setattr(exactness, "dependency_graph", traced)
    monkeypatch.setattr(channel_groups, "dependency_graph", traced)
    return copies, traces


def test_every_group_passing_copies_the_model_once(monkeypatch: pytest.MonkeyPatch) -> None:
    copies, _ = _counting_copies_and_traces(monkeypatch)
    calls = _counting(monkeypatch)
    model, x = DenseNet(), torch.randn(2, 3, 16, 16)
    assert len(build_groups(model, x, **ALL)) == 14
    assert (copies[0], calls[0]) == (1, 1)  # the copy traced to find the groups is checked


def test_checks_run_on_one_sample_halved_down_to_32_pixels() -> None:
    pooled = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    x = torch.randn(4, 3, 150, 130)
    shapes = [torch.Size((4, 16))]
    assert exactness.check_inputs(pooled, (x,), shapes)[0].shape == (1, 3, 37, 32)
    fixed = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 62 * 62, 2))
    out = [torch.Size((4, 2))]
    one = exactness.check_inputs(fixed, (torch.randn(4, 3, 64, 64),), out)
    assert one[0].shape == (1, 3, 64, 64)  # a model that needs its size keeps it
    tokens = (torch.zeros(2, 5, dtype=torch.long), torch.ones(3, 5))
    assert exactness.check_inputs(nn.Identity(), tokens, []) is tokens  # no common batch


def test_a_budget_spent_before_the_trace_names_the_key() -> None:
    model, x = Chain(), torch.randn(2, 4, 8)
    with pytest.raises(
        CompressError,
        match=r"did not finish tracing Chain within 0 s \(filter_pruning "
        r"params\.trace_time_budget\)",
    ):
        build_groups(model, x, time_budget=0)


def test_a_budget_that_runs_out_during_the_check_names_the_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def out_of_time(*args: Any) -> None:
        raise TimeBudgetExceeded("60 s")  # what the timer raises inside a check

    # inside the check's own try: the budget must not pass for a group that fails
    monkeypatch.setattr(exactness, "remove_channels", out_of_time)
    model, x = Chain(), torch.randn(2, 4, 8)
    with pytest.raises(
        CompressError,
        match=r"did not finish checking the 31 channel groups of Chain within 60 s "
        r"\(filter_pruning params\.trace_time_budget\)",
    ):
        build_groups(model, x, prune_first_conv=True, time_budget=60)


def test_every_check_runs_on_the_one_copy_put_back(monkeypatch: pytest.MonkeyPatch) -> None:
    copies, traces = _counting_copies_and_traces(monkeypatch)
    calls = _counting(monkeypatch)
    model, x = Chain(bad=13), torch.randn(2, 4, 8)
    with pytest.warns(UserWarning, match="'layers.13': the shrunk model fails"):
        checked = build_groups(model, x, prune_first_conv=True)
    assert calls[0] > 5  # the bisection ran
    assert (copies[0], traces[0]) == (1, 1)  # where each check copied and traced the model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = build_groups(model, x, prune_first_conv=True, validate=False)
    assert [g.name for g in checked] == _old_exact_groups(model, found, x)


def test_a_copy_not_put_back_as_it_was_is_copied_again(monkeypatch: pytest.MonkeyPatch) -> None:
    copies, traces = _counting_copies_and_traces(monkeypatch)
    calls = _counting(monkeypatch)
    # a copy whose layers keep what the first check removed: its outputs change, and every
    # later check takes a new copy and traces it, as each check did before
    monkeypatch.setattr(exactness, "_restorer", lambda model, dg: lambda: None)
    model, x = Chain(bad=13), torch.randn(2, 4, 8)
    with pytest.warns(UserWarning, match="'layers.13': the shrunk model fails"):
        checked = build_groups(model, x, prune_first_conv=True)
    assert copies[0] == traces[0] == calls[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = build_groups(model, x, prune_first_conv=True, validate=False)
    assert [g.name for g in checked] == _old_exact_groups(model, found, x)


class LayerScale(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(width) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Scaled(nn.Module):
    """MLPs whose hidden channels are scaled by a parameter of a layer Torch-Pruning does not
    know (an unwrapped parameter: its graph node is given the smaller parameter when channels
    are removed)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.fc1, self.ls, self.fc2 = nn.Linear(8, width), LayerScale(width), nn.Linear(width, 8)
        self.fc3, self.fc4 = nn.Linear(8, width), nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc2(self.ls(torch.relu(self.fc1(x))))
        return self.fc4(torch.relu(self.fc3(x)))


MODELS["scaled"] = lambda: (Scaled(), torch.randn(2, 8))


class BareScaled(nn.Module):
    """The hidden channels of an MLP scaled by a parameter of the model itself (no module
    name before the parameter's)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, width), nn.Linear(width, 4)
        self.scale = nn.Parameter(torch.rand(width) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)) * self.scale)


def test_a_parameter_of_the_model_itself_is_pruned_with_its_group() -> None:
    torch.manual_seed(0)
    model, x = BareScaled(), torch.randn(2, 8)
    (group,) = build_groups(model, x, **ALL)  # was left out: the shrink kept all of scale
    assert group.name == "fc1"
    assert ("", "scale") in {(m.module_name, m.param_name) for m in group.members}
    keep = torch.arange(16) % 2 == 0
    apply_channel_mask(model, group, keep)
    small = shrink(model, [group], {group.name: keep}, example_inputs=x)
    assert small.scale.shape == (8,)
    torch.testing.assert_close(small(x), model(x))


@pytest.mark.parametrize("name", ["densenet", "inception", "tinyvit", "timm_like", "scaled"])
def test_checks_on_the_copy_put_back_pass_the_groups_that_pass(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Concats and splits (sizes Torch-Pruning changes in its graph), heads and unwrapped
    parameters: one group made to fail sends the check through a bisection, each step on the
    copy put back after the one before removed channels from it; every other group passes."""
    torch.manual_seed(0)
    model, x = MODELS[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = build_groups(model, x, validate=False, **ALL)
    forced = found[len(found) // 2].name
    real = exactness._matches

    def one_fails(copy: nn.Module, dg: Any, some: Any, keep: Any, inputs: Any) -> str | None:
        problem = real(copy, dg, some, keep, inputs)  # removes the channels all the same
        return "forced" if any(g.name == forced for g in some) else problem

    monkeypatch.setattr(exactness, "_matches", one_fails)
    copies, traces = _counting_copies_and_traces(monkeypatch)
    with pytest.warns(UserWarning, match=f"'{forced}': forced"):
        checked = build_groups(model, x, **ALL)
    assert [g.name for g in checked] == [g.name for g in found if g.name != forced]
    assert (copies[0], traces[0]) == (1, 1)


def test_the_build_pauses_the_garbage_collector_and_frees_each_copy_of_the_fallback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import gc
    import weakref

    copies: list[weakref.ref[nn.Module]] = []  # a layer of every copy
    most_alive, collecting = [0], []

    def copied(model: nn.Module) -> nn.Module:
        most_alive[0] = max(most_alive[0], sum(r() is not None for r in copies))
        collecting.append(gc.isenabled())
        clone = copy_model(model)
        copies.append(weakref.ref(clone.get_submodule("layers.0")))  # what graph nodes hold
        return clone

    monkeypatch.setattr(structured, "copy_model", copied)
    monkeypatch.setattr(exactness, "_restorer", lambda model, dg: lambda: None)
    model, x = Chain(bad=13), torch.randn(2, 4, 8)
    for enabled in (True, False):
        (gc.enable if enabled else gc.disable)()
        copies.clear()
        try:
            with pytest.warns(UserWarning, match="'layers.13': the shrunk model fails"):
                build_groups(model, x, prune_first_conv=True)
            assert gc.isenabled() is enabled  # as it was before the build
        finally:
            gc.enable()
        assert not any(collecting) and len(copies) > 5
        # the copy traced for the groups and the one the check before used: the layers of
        # each copy are held by its graph's nodes, which refer to each other in cycles
        assert most_alive[0] <= 2
