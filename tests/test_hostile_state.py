"""Controller states from elsewhere: validated as a whole, applied as a whole or not at all."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import ConvBNNet, lenet
from torch import nn

import compress
from compress.analysis.outputs import check_same
from compress.errors import CompressError

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))

RECIPES = {
    "magnitude_sparsity": {
        "algorithm": "magnitude_sparsity",
        "sparsity_init": 0.3,
        "params": {"sparsity_target": 0.81, "sparsity_target_epoch": 2, "sparsity_freeze_epoch": 2},
    },
    "rb_sparsity": {"algorithm": "rb_sparsity", "sparsity_init": 0.3},
    "const_sparsity": {"algorithm": "const_sparsity"},
}


def flat(state: Any) -> Any:
    """A state with its tensors as lists, for == comparison."""
    if isinstance(state, dict):
        return {k: flat(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return [flat(v) for v in state]
    return state.tolist() if isinstance(state, torch.Tensor) else state


@pytest.mark.parametrize("name", list(RECIPES))
def test_a_state_of_another_model_changes_nothing(name: str) -> None:
    recipe = {"compression": RECIPES[name]}
    other, _ = compress.create_compressed_model(lenet(48), recipe, torch.randn(2, 48))
    for _ in range(3):
        other.scheduler.epoch_step()  # frozen, at the target level
    ctrl, model = compress.create_compressed_model(ConvBNNet(), recipe, X)
    ctrl.scheduler.epoch_step()
    before = flat(ctrl.state_dict())
    with torch.no_grad():
        out = model(X)
    with pytest.raises(CompressError, match="does not fit this model"):
        ctrl.load_state_dict(other.state_dict())
    assert flat(ctrl.state_dict()) == before
    with torch.no_grad():
        assert torch.equal(model(X), out)


def test_masks_that_are_not_binary_are_refused_before_anything_is_applied() -> None:
    ctrl, _ = compress.create_compressed_model(
        ConvBNNet(), {"compression": RECIPES["magnitude_sparsity"]}, X
    )
    state = ctrl.state_dict()
    state["scheduler"]["epoch"] = 5
    state["state"]["magnitude_sparsity"]["masks"]["conv1"] = torch.full((8, 3, 3, 3), 7.0)
    before = flat(ctrl.state_dict())
    with pytest.raises(
        CompressError,
        match=r"magnitude_sparsity.masks\['conv1'\] holds values other than only 0 and 1",
    ):
        ctrl.load_state_dict(state)
    assert flat(ctrl.state_dict()) == before
    state = ctrl.state_dict()
    state["state"]["magnitude_sparsity"]["level"] = 3.0
    with pytest.raises(CompressError, match=r"magnitude_sparsity.level is 3.0, not in \[0, 1\]"):
        ctrl.load_state_dict(state)


# --- 7. no silent NaN ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["rb_sparsity", "const_sparsity", "filter_pruning"])
def test_strip_and_export_refuse_non_finite_weights_naming_the_layer(name: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    recipe = RECIPES.get(name, {"algorithm": name, "pruning_init": 0.25})
    ctrl, model = compress.create_compressed_model(ConvBNNet(), {"compression": recipe}, X)
    with torch.no_grad():
        model.conv2.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(CompressError, match=r"strip\(\): conv2.weight holds NaN or Inf"):
        ctrl.strip()
    plain = ConvBNNet()
    with torch.no_grad():
        plain.fc.bias[0] = float("inf")
    with pytest.raises(CompressError, match=r"export: fc.bias holds NaN or Inf"):
        compress.export(plain, tmp_path / "m", ["sparse"])
    assert not list(tmp_path.iterdir())


def test_models_the_masks_cannot_work_on_are_errors() -> None:
    from torch import nn
    from torch.nn.utils import prune

    recipe = {"compression": RECIPES["magnitude_sparsity"]}
    pruned = nn.Sequential(nn.Linear(4, 4))
    prune.l1_unstructured(pruned[0], "weight", amount=0.5)
    with pytest.raises(CompressError, match=r"model: 0 carries a torch.nn.utils.prune .*'weight'"):
        compress.create_compressed_model(pruned, recipe, torch.randn(1, 4))
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(CompressError, match=r"model: 0.weight is on the meta device"):
        compress.create_compressed_model(meta, recipe, torch.randn(1, 4))


# --- 5. every algorithm's own state, checked whole before any is applied ------------------------


def refused_whole(ctrl: compress.CompressionController, state: Any, message: str) -> None:
    """``state`` is refused with ``message`` and nothing of it was applied."""
    before = flat(ctrl.state_dict())
    with pytest.raises(CompressError, match=message):
        ctrl.load_state_dict(state)
    assert flat(ctrl.state_dict()) == before


def filter_recipe(**params: Any) -> dict[str, Any]:
    return {
        "compression": {
            "algorithm": "filter_pruning",
            "pruning_init": 0.25,
            "params": {"round_to": 1, "prune_first_conv": True, **params},
        }
    }


def scop_controller() -> compress.CompressionController:
    recipe = filter_recipe(schedule="baseline", num_init_steps=1, filter_importance="scop")
    ctrl, _ = compress.create_compressed_model(ConvBNNet(), recipe, X)
    return ctrl


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (lambda k: torch.full_like(k, float("nan")), r"holds NaN, Inf or values outside \[0, 1\]"),
        (lambda k: torch.full_like(k, 7.0), r"holds NaN, Inf or values outside \[0, 1\]"),
        (
            lambda k: torch.tensor([0.5]),
            r"has shape \[1\] and dtype torch.float32; a float tensor of shape \[\d+\]",
        ),
        (lambda k: k.long(), r"has shape \[\d+\] and dtype torch.int64; a float tensor"),
        (lambda k: "abc", r"is a str; a float tensor of shape"),
    ],
)
def test_scop_coefficients_off_range_or_broadcast_are_refused(value: Any, message: str) -> None:
    """Before: NaN and 7.0 were copied in, one value was broadcast over every channel."""
    ctrl = scop_controller()
    state = ctrl.state_dict()
    coeffs = state["state"]["filter_pruning"]["scop"]["coefficients"]
    layer = next(iter(coeffs))
    coeffs[layer] = value(coeffs[layer])
    refused_whole(ctrl, state, rf"filter_pruning.scop.coefficients\[{layer!r}\] {message}")


def test_scop_phase_and_generator_are_checked() -> None:
    ctrl = scop_controller()
    state = ctrl.state_dict()
    state["state"]["filter_pruning"]["scop"]["phase"] = "sideways"
    refused_whole(ctrl, state, r"filter_pruning.scop.phase is 'sideways'; one of 'waiting'")
    state = ctrl.state_dict()
    state["state"]["filter_pruning"]["scop"]["generator"] = torch.zeros(3, dtype=torch.uint8)
    refused_whole(ctrl, state, r"filter_pruning.scop.generator .*not a random generator state")


@pytest.mark.parametrize(
    "gen",
    [torch.zeros(3, dtype=torch.uint8), torch.zeros(5056), "abc"],
    ids=["3-byte", "float", "str"],
)
def test_a_damaged_rb_generator_state_is_refused_at_load(gen: Any) -> None:
    """Before: a 3-byte state was accepted and failed at the next forward."""
    ctrl, model = compress.create_compressed_model(
        ConvBNNet(), {"compression": RECIPES["rb_sparsity"]}, X
    )
    model.train()
    model(X)  # the generator exists
    state = ctrl.state_dict()
    state["state"]["rb_sparsity"]["generator"] = gen
    refused_whole(ctrl, state, r"rb_sparsity.generator .*not a random generator state")
    good = ctrl.state_dict()
    ctrl.load_state_dict(good)
    model(X)


@pytest.mark.parametrize(
    ("thresholds", "message"),
    [
        ("abc", r"is a str; a list of \d+ finite numbers"),
        ([0.1], r"holds 1 values; a list of \d+ finite numbers"),
        (["a", "b", "c", "d"], r"holds 'a'; a list of \d+ finite numbers"),
        ([float("nan")] * 4, r"holds 'nan'; a list of \d+ finite numbers"),
    ],
)
def test_magnitude_thresholds_that_are_not_numbers_are_refused(
    thresholds: Any, message: str
) -> None:
    """Before: "abc" was accepted and failed with an IndexError."""
    ctrl, _ = compress.create_compressed_model(
        ConvBNNet(), {"compression": RECIPES["magnitude_sparsity"]}, X
    )
    state = ctrl.state_dict()
    n = len(state["state"]["magnitude_sparsity"]["thresholds"])
    if isinstance(thresholds, list) and len(thresholds) == 4:
        thresholds = (thresholds * n)[:n]
    state["state"]["magnitude_sparsity"]["thresholds"] = thresholds
    refused_whole(ctrl, state, rf"magnitude_sparsity.thresholds {message}")


def test_nan_nuclear_norm_scores_are_refused() -> None:
    ctrl, _ = compress.create_compressed_model(
        ConvBNNet(), filter_recipe(filter_importance="nuclear_norm"), X
    )
    state = ctrl.state_dict()
    scores = state["state"]["filter_pruning"]["calibration"]
    assert scores, "nuclear_norm scored the channels at build"
    group = next(iter(scores))
    scores[group] = torch.full_like(scores[group], float("nan"))
    refused_whole(
        ctrl,
        state,
        rf"filter_pruning.calibration\[{group!r}\] holds NaN or Inf; a float tensor of shape",
    )
    state["state"]["filter_pruning"]["calibration"] = "abc"
    refused_whole(ctrl, state, r"filter_pruning.calibration is a str; a table of tensors")


@pytest.mark.parametrize(
    "table",
    [torch.ones(3), {"model_ms": "fast"}, {"junk": 1}, "abc"],
    ids=["tensor", "bad-model-ms", "junk", "str"],
)
def test_a_latency_table_off_its_schema_is_refused_at_load(table: Any, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Before: junk was loaded and written to the .latency.json beside the export (exit 0)."""
    ctrl, _ = compress.create_compressed_model(ConvBNNet(), filter_recipe(), X)
    state = ctrl.state_dict()
    state["state"]["filter_pruning"]["latency_table"] = table
    refused_whole(ctrl, state, r"filter_pruning.latency_table: .*; a latency table as measured")


class ScaledNet(nn.Module):
    """ConvBNNet times a non-persistent buffer: no state_dict holds it, forward reads it."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.net = ConvBNNet()
        self.register_buffer("scale", torch.tensor(scale), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.scale


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_non_persistent_buffer_stops_strip_and_exports(bad: float, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Before: strip() passed (NaN compared equal to NaN) and the pt2 program output NaN."""
    ctrl, _ = compress.create_compressed_model(
        ScaledNet(bad), {"compression": RECIPES["magnitude_sparsity"]}, X
    )
    with pytest.raises(
        CompressError,
        match=r"strip\(\): the masked model's output 0 holds NaN or Inf on the example inputs "
        r"\(scale holds NaN or Inf\)",
    ):
        ctrl.strip()
    for fmt in ("pt2", "onnx"):
        with pytest.raises(
            CompressError, match=r"export: the model's output 0 holds NaN .*\(scale holds NaN"
        ):
            compress.export(ScaledNet(bad), tmp_path / "m", [fmt], X)
    assert not list(tmp_path.iterdir())
    compress.export(ScaledNet(2.0), tmp_path / "m", ["pt2"], X)  # a finite one is written
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt2"]


def test_nan_only_in_a_pruned_filter_is_said_not_hidden() -> None:
    """Before: the masked model gave NaN, the stripped one finite outputs, without a word."""
    ctrl, model = compress.create_compressed_model(ConvBNNet(), filter_recipe(), X)
    algo = ctrl.algorithms[0]
    group, keep = next((n, k) for n, k in algo.keep.items() if not k.all())  # type: ignore[attr-defined]
    pruned = int((~keep).nonzero()[0])
    producer = next(
        m
        for g in algo.groups
        if g.name == group
        for m in g.members
        if m.role == "producer"  # type: ignore[attr-defined]
    )
    with torch.no_grad():
        model.get_submodule(producer.module_name).weight[pruned] = float("nan")
        assert torch.isnan(model.eval()(X)).all()  # eval: the BatchNorm statistics stay
    with pytest.raises(
        CompressError,
        match=r"strip\(\): the masked model's output 0 holds NaN or Inf on the example inputs "
        rf"\({producer.module_name}.weight holds NaN or Inf\); the stripped model's outputs are "
        r"finite: the NaN or Inf sits in what strip\(\) removes",
    ):
        ctrl.strip()


def test_the_comparison_refuses_a_nan_reference() -> None:
    """Before: NaN in both outputs compared as equal."""
    nan = [torch.tensor([1.0, float("nan")])]
    with pytest.raises(CompressError, match=r"strip\(\): the masked model's output 0 holds NaN"):
        check_same(nan, [t.clone() for t in nan], "strip()")
