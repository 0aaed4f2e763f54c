"""Scopes, statistics and distillation compared with NNCF 2.17's own outputs.

The fixture ``tests/fixtures/nncf217/scopes.json`` is recorded from NNCF 2.17 by
``tools/record_nncf.py scopes`` on the seeded models of ``tests/nncf217_models.py``; NNCF is not
needed here. Where ours differs on purpose, ``DIFFERENCES`` names the case and
docs/nncf_differences.md says why.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from nncf217_models import MODELS, example_input, seeded

import compress
from compress import masks
from compress.errors import ConfigError
from compress.recipe import scopes

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "nncf217" / "scopes.json").read_text())
SPARSITY = {"algorithm": "magnitude_sparsity", "sparsity_init": 0.5}
PRUNING = {
    "algorithm": "filter_pruning",
    "pruning_init": 0.5,
    "params": {"prune_first_conv": True, "prune_downsample_convs": True},
}

# Scopes NNCF refuses (a ValidationError: no node has that name) and ours accepts on purpose:
# a module name, a regex written against module names, and NNCF's scope without the operation
# (which names the layer, or every layer inside a container).
DIFFERENCES = {
    ("magnitude_sparsity", "lenet300", ("LeNet300/NNCFLinear[fc1]",), ()): ["fc2", "fc3"],
    ("magnitude_sparsity", "lenet300", ("fc1",), ()): ["fc2", "fc3"],
    (
        "magnitude_sparsity",
        "resnet",
        ("ResNet/Sequential[layer1]/BasicBlock[0]/NNCFConv2d[conv1]",),
        (),
    ): [
        "conv1",
        "fc",
        "layer1.0.conv2",
        "layer2.0.conv1",
        "layer2.0.conv2",
        "layer2.0.shortcut.0",
        "layer3.0.conv1",
        "layer3.0.conv2",
        "layer3.0.shortcut.0",
    ],
    ("magnitude_sparsity", "resnet", ("ResNet/Sequential[layer1]",), ()): [
        "conv1",
        "fc",
        "layer2.0.conv1",
        "layer2.0.conv2",
        "layer2.0.shortcut.0",
        "layer3.0.conv1",
        "layer3.0.conv2",
        "layer3.0.shortcut.0",
    ],
    ("magnitude_sparsity", "resnet", ("layer1.0.conv1",), ()): [
        "conv1",
        "fc",
        "layer1.0.conv2",
        "layer2.0.conv1",
        "layer2.0.conv2",
        "layer2.0.shortcut.0",
        "layer3.0.conv1",
        "layer3.0.conv2",
        "layer3.0.shortcut.0",
    ],
    ("magnitude_sparsity", "resnet", ("{re}layer1\\.0\\.conv1",), ()): [
        "conv1",
        "fc",
        "layer1.0.conv2",
        "layer2.0.conv1",
        "layer2.0.conv2",
        "layer2.0.shortcut.0",
        "layer3.0.conv1",
        "layer3.0.conv2",
        "layer3.0.shortcut.0",
    ],
    ("filter_pruning", "plain_cnn", ("PlainCNN/NNCFConv2d[conv2]",), ()): ["conv1", "conv3"],
    (
        "filter_pruning",
        "resnet",
        ("ResNet/Sequential[layer1]/BasicBlock[0]/NNCFConv2d[conv1]",),
        (),
    ): [
        "conv1",
        "layer1.0.conv2",
        "layer2.0.conv1",
        "layer2.0.conv2",
        "layer2.0.shortcut.0",
        "layer3.0.conv1",
        "layer3.0.conv2",
        "layer3.0.shortcut.0",
    ],
}


def _key(case: dict[str, Any]) -> tuple[str, str, tuple[str, ...], tuple[str, ...]]:
    return (
        case["algorithm"],
        case["model"],
        tuple(case["ignored_scopes"] or ()),
        tuple(case["target_scopes"] or ()),
    )


def _section(case: dict[str, Any]) -> dict[str, Any]:
    section = copy.deepcopy(SPARSITY if case["algorithm"] == "magnitude_sparsity" else PRUNING)
    for key in ("ignored_scopes", "target_scopes"):
        if case[key] is not None:
            section[key] = case[key]
    return section


def _selected(ctrl: compress.CompressionController, model: torch.nn.Module) -> list[str]:
    algo = ctrl.algorithms[0]
    if algo.name == "filter_pruning":
        groups = algo.groups  # type: ignore[attr-defined]
        return sorted(
            {m.module_name for g in groups for m in g.members if m.role == "producer"}
            & {n for n, _ in model.named_modules()}
        )
    return sorted(n for n, _, p, _ in masks.iter_masked(model) if p == "weight")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_node_names_are_nncfs(name: str) -> None:
    """Each layer NNCF wraps has the node name NNCF gives it, and every name we derive for a
    layer is a node of NNCF's graph."""
    recorded = FIXTURE["nodes"][name]
    ours = {n.path: n.node for n, _ in scopes.nncf_names(seeded(name)) if n.node}
    assert {p: ours[p] for p in recorded["layers"]} == recorded["layers"]
    assert set(ours.values()) <= set(recorded["graph"])


CASES = FIXTURE["cases"]


@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_scopes_select_what_nncf_selects(case: dict[str, Any]) -> None:
    model = seeded(case["model"])
    recipe = {"compression": _section(case)}
    key = _key(case)
    x = example_input(case["model"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if "error" in case and key not in DIFFERENCES:
            with pytest.raises(
                ConfigError, match="matches no module of the model; (closest|names look like)"
            ):
                compress.create_compressed_model(model, recipe, example_inputs=x)
            return
        ctrl, model = compress.create_compressed_model(model, recipe, example_inputs=x)
    expected = DIFFERENCES.get(key, case.get("selected"))
    assert _selected(ctrl, model) == expected


def test_the_parity_table_of_scopes() -> None:
    """The counts docs/nncf_differences.md states."""
    different = [c for c in CASES if _key(c) in DIFFERENCES]
    assert all("error" in c for c in different)  # ours accepts only what NNCF refuses
    assert (len(CASES), len(CASES) - len(different), len(different)) == (42, 34, 8)


def test_an_unmatched_nncf_name_says_the_closest_names() -> None:
    recipe = {"compression": {**SPARSITY, "ignored_scopes": ["LeNet300/NNCFLinear[fc9]/linear_0"]}}
    with pytest.raises(
        ConfigError,
        match=r"compression\.ignored_scopes: 'LeNet300/NNCFLinear\[fc9\]/linear_0' matches no "
        r"module of the model; closest: \[.*'LeNet300/NNCFLinear\[fc1\]/linear_0'\]",
    ):
        compress.create_compressed_model(seeded("lenet300"), recipe)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_statistics_name_nncfs_figures(name: str) -> None:
    """NNCF's sparsity figures at level 0.5, and its FLOPs (2 x MACs) and parameters (conv and
    linear weights) from its filter pruning statistics, under the names ours gives them."""
    recorded = FIXTURE["statistics"][name]
    ctrl, _ = compress.create_compressed_model(
        seeded(name), {"compression": SPARSITY}, example_inputs=example_input(name)
    )
    stats = ctrl.statistics().to_dict()
    model = stats["model"]
    assert model["sparsity of compressed layers"] == recorded["sparsity_level_for_layers"]
    assert model["sparsity of the model"] == pytest.approx(recorded["sparsity_level"], abs=1e-12)
    rows = {r["layer"]: r["weight's percentage"] for r in stats["algorithms"][0]["layers"]}
    assert rows == pytest.approx(recorded["weight_percentage"], abs=1e-9)
    if "full_flops" in recorded:
        assert model["FLOPs (2 x MACs)"] == recorded["full_flops"] == 2 * model["MACs"]
        assert model["conv/linear weights (NNCF's params)"] == recorded["full_params_num"]
        assert model["params"] > recorded["full_params_num"]  # ours: every parameter


KD = FIXTURE["distillation"]


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """The recorder's change of the student after the teacher was copied."""
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for pname in sorted(params):
            params[pname].add_(torch.randn(params[pname].shape, generator=gen) * 0.05)


@pytest.mark.parametrize(
    "case", KD, ids=[f"{c['model']}-{c['type']}-{i}" for i, c in enumerate(KD)]
)
def test_distillation_loss_is_nncfs_with_the_teacher_in_eval_mode(case: dict[str, Any]) -> None:
    """NNCF's loss formulas (mse; softmax cross-entropy with temperature; scale) give NNCF's
    value. NNCF runs its teacher in train mode (BatchNorm on batch statistics); ours in eval
    mode: equal without BatchNorm, and equal to NNCF with its teacher put in eval mode."""
    section = {k: case[k] for k in ("algorithm", "type", "scale", "temperature") if k in case}
    model = seeded(case["model"])
    ctrl, model = compress.create_compressed_model(model, {"compression": section})
    _perturb(model, seed=3)
    shape = MODELS[case["model"]][1]
    batch = torch.randn((4, *shape[1:]), generator=torch.Generator().manual_seed(7))
    model.train()
    model(batch)
    loss = float(ctrl.loss())
    assert loss == pytest.approx(case["loss_teacher_eval"], rel=1e-5)
    same_in_train_mode = loss == pytest.approx(case["loss_teacher_train"], rel=1e-5)
    assert same_in_train_mode == (case["model"] == "lenet300")  # only it has no BatchNorm
    # A second read without a forward pass: NNCF gives the same loss again, ours zero (the
    # loss of one forward pass is added once; docs/nncf_differences.md)
    assert case["loss_read_again"] == case["loss_teacher_train"]
    assert float(ctrl.loss()) == 0.0
