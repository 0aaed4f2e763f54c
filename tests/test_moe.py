"""Mixture-of-experts models whose experts are fused 3-D parameters (transformers 5's
``MixtralExperts``, ``Qwen2MoeExperts``): sparsity masks every expert's matrix, statistics count
the routed expert compute, filter pruning prunes every expert's width to one kept width."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from hf_zoo import ZOO, logits

import compress
from compress.analysis.summary import layer_macs

pytest.importorskip("transformers")

EXPERTS = ("gate_up_proj", "down_proj")


def _build(name: str, recipe: dict[str, Any]) -> tuple[Any, torch.nn.Module, tuple]:
    torch.manual_seed(0)
    zoo = ZOO[name]
    model, x = zoo.build(), zoo.inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fx cannot trace these models for effective sparsity
        ctrl, model = compress.create_compressed_model(model, {"compression": recipe}, x)
    return ctrl, model, x


def _outputs(model: torch.nn.Module, x: tuple) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return logits(model(*x))


def _experts(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [layer.mlp.experts for layer in model.model.layers]


def _statistics(ctrl: Any) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ctrl.statistics().to_dict()


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_magnitude_sparsity_masks_every_expert(name: str, tmp_path: Path) -> None:
    recipe = {"algorithm": "magnitude_sparsity", "sparsity_init": 0.8}
    ctrl, model, x = _build(name, recipe)
    stats = _statistics(ctrl)
    total = stats["model"]["params"]
    compressed = stats["model"]["weights in compressed layers"]
    expert_weights = sum(getattr(e, p).numel() for e in _experts(model) for p in EXPERTS)
    assert compressed > expert_weights  # the experts are among the compressed weights
    # round(0.8 * N) of the N compressed weights, which are all but the embedding and norms
    assert stats["model"]["sparsity of the model"] == pytest.approx(
        round(0.8 * compressed) / total, abs=1e-6
    )
    assert stats["model"]["sparsity of the model"] > 0.7
    layers = {row["layer"]: row for row in stats["algorithms"][0]["layers"]}
    assert "model.layers.0.mlp.experts.gate_up_proj" in layers
    # global allocation: all experts' weights under one threshold, each expert masked
    for experts in _experts(model):
        for p in EXPERTS:
            w = compress.masks.effective(experts, p)
            per_expert = (w == 0).flatten(1).float().mean(1)
            assert bool((per_expert > 0.5).all()), per_expert
    want = _outputs(model, x)
    plain = ctrl.strip()
    torch.testing.assert_close(_outputs(plain, x), want, rtol=1e-5, atol=1e-5)
    paths = compress.export(plain, tmp_path / "m", ["sparse"])
    again = compress.load_sparse(paths["sparse"], ZOO[name].build())
    torch.testing.assert_close(_outputs(again, x), want, rtol=1e-5, atol=1e-5)


def test_local_sparsity_prunes_each_expert_as_a_layer() -> None:
    recipe = {
        "algorithm": "magnitude_sparsity",
        "sparsity_init": 0.8,
        "params": {"sparsity_level_setting_mode": "local"},
    }
    ctrl, model, _ = _build("mixtral", recipe)
    for experts in _experts(model):
        for p in EXPERTS:
            w = compress.masks.effective(experts, p)
            zeros = (w == 0).flatten(1).sum(1)
            n = w[0].numel()
            assert zeros.tolist() == [round(0.8 * n)] * experts.num_experts


def test_expert_parameters_are_scopes_of_their_own() -> None:
    recipe = {
        "algorithm": "magnitude_sparsity",
        "sparsity_init": 0.5,
        "ignored_scopes": ["model.layers.*.mlp.experts.down_proj"],
    }
    ctrl, model, _ = _build("mixtral", recipe)
    names = [row["layer"] for row in _statistics(ctrl)["algorithms"][0]["layers"]]
    assert "model.layers.1.mlp.experts.gate_up_proj" in names
    assert not any(n.endswith("experts.down_proj") for n in names)
    experts = _experts(model)[0]
    assert bool((compress.masks.effective(experts, "down_proj") != 0).all())
    # a scope naming the experts module names its parameters too
    recipe["ignored_scopes"] = ["model.layers.1.mlp.experts"]
    ctrl, _, _ = _build("mixtral", recipe)
    names = [row["layer"] for row in _statistics(ctrl)["algorithms"][0]["layers"]]
    assert "model.layers.0.mlp.experts.down_proj" in names
    assert not any(n.startswith("model.layers.1.mlp.experts") for n in names)
    assert float((compress.masks.effective(experts, "gate_up_proj") == 0).float().mean()) > 0.3


def test_const_sparsity_keeps_the_zeros_of_experts() -> None:
    torch.manual_seed(0)
    model, x = ZOO["mixtral"].build(), ZOO["mixtral"].inputs()
    experts = _experts(model)[0]
    with torch.no_grad():
        experts.down_proj[experts.down_proj.abs() < 0.01] = 0.0
    zeros = experts.down_proj == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctrl, model = compress.create_compressed_model(
            model, {"compression": {"algorithm": "const_sparsity"}}, x
        )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    logits(model(*x)).pow(2).mean().backward()
    opt.step()
    plain = ctrl.strip()
    assert bool((_experts(plain)[0].down_proj[zeros] == 0).all())
    assert int(zeros.sum()) > 0


def test_rb_sparsity_learns_a_mask_per_expert(tmp_path: Path) -> None:
    recipe = {
        "algorithm": "rb_sparsity",
        "sparsity_init": 0.5,
        "params": {"sparsity_level_setting_mode": "local"},
    }
    ctrl, model, x = _build("mixtral", recipe)
    assert not any("rb_logit" in k for k in model.state_dict())  # logits are the controller's
    experts = _experts(model)[0]
    logit = experts.gate_up_proj_rb_logit
    with torch.no_grad():
        logit.copy_(torch.where(torch.rand_like(logit) < 0.5, 5.0, -5.0))
        logit[0] = torch.tensor([5.0, -5.0]).repeat(logit[0].numel() // 2).view_as(logit[0])
    # local mode: every expert is a layer of its own; expert 0 at its level gets no gradient
    ctrl.loss().backward()
    assert torch.all(logit.grad[0] == 0)
    assert bool((logit.grad[1:] != 0).any())
    model.eval()
    masked = compress.masks.effective(experts, "gate_up_proj")
    assert float((masked[0] == 0).float().mean()) == 0.5
    want = _outputs(model, x)
    plain = ctrl.strip()
    assert not hasattr(_experts(plain)[0], "gate_up_proj_rb_logit")
    torch.testing.assert_close(_experts(plain)[0].gate_up_proj, masked)
    torch.testing.assert_close(_outputs(plain, x), want, rtol=1e-5, atol=1e-5)


def test_macs_count_the_routed_experts_by_hand() -> None:
    torch.manual_seed(0)
    model, x = ZOO["mixtral"].build(), ZOO["mixtral"].inputs()
    c = model.config
    tokens, h, inter, kv = x[0].numel(), c.hidden_size, c.intermediate_size, 32
    per_token = h * h * 2 + h * kv * 2 + h * c.num_local_experts  # q, o, k, v, router
    # k experts of n per token: k / n of the dense compute of all experts
    experts = tokens * c.num_experts_per_tok * 3 * h * inter
    # (torch's FLOP counter sees no attention-score products in this model's sdpa on CPU)
    layer = tokens * per_token + experts
    want = c.num_hidden_layers * layer + tokens * h * c.vocab_size  # + lm_head
    macs = layer_macs(model, x)
    assert macs[""] == want
    assert macs["model.layers.0.mlp.experts"] == experts == 786_432
    assert macs["model.layers.0.mlp.experts.gate_up_proj"] == 2 * experts // 3
    ctrl, _, _ = _build("mixtral", {"algorithm": "magnitude_sparsity", "sparsity_init": 0.8})
    stats = _statistics(ctrl)["model"]
    assert stats["MACs"] == want
    # a masked weight saves its share of its layer's MACs
    assert stats["nonzero MACs"] < 0.3 * want


FILTER = {"algorithm": "filter_pruning", "pruning_init": 0.5, "params": {"round_to": 1}}
# (width key, full width, params before and after filter pruning at 0.5)
WIDTHS = {
    "mixtral": ("intermediate_size", 128, 234_816, 124_224),
    "qwen2_moe": ("moe_intermediate_size", 64, 186_048, 99_904),
}


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_filter_pruning_prunes_every_expert_to_one_width(name: str, tmp_path: Path) -> None:
    key, width, before, after = WIDTHS[name]
    torch.manual_seed(0)
    model, x = ZOO[name].build(), ZOO[name].inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ctrl, model = compress.create_compressed_model(model, {"compression": FILTER}, x)
        stats = ctrl.statistics().to_dict()
        want = _outputs(model, x)
        small = ctrl.strip()
    said = [str(w.message) for w in caught]
    assert not [m for m in said if "mixture-of-experts" in m or "config cannot" in m], said
    assert _params(model) == before and _params(small) == after
    for experts in _experts(small):
        assert tuple(experts.gate_up_proj.shape) == (4, width, 64)  # gate and up: width / 2 each
        assert tuple(experts.down_proj.shape) == (4, 64, width // 2)
    assert getattr(small.config, key) == width // 2
    torch.testing.assert_close(_outputs(small, x), want, rtol=1e-5, atol=1e-5)
    # statistics count the stripped model: params, and MACs with the routed experts narrower
    summary = {row[""]: row for row in stats["algorithms"][0]["summary"]}
    assert summary["params"]["current"] == after
    assert summary["MACs"]["current"] == layer_macs(small, x)[""]
    macs = layer_macs(model, x)
    expert_macs = sum(macs[f"model.layers.{i}.mlp.experts"] for i in range(2))
    assert summary["MACs"]["full"] - summary["MACs"]["current"] >= expert_macs // 2
    rows = {row["layer"]: row for row in stats["algorithms"][0]["layers"]}
    row = rows["model.layers.1.mlp.experts.down_proj"]
    assert (row["kept filters"], row["pruning level"]) == (width // 2, 0.5)
    # save_pretrained rebuilds the small model from its config
    small.save_pretrained(tmp_path / "hf")
    again = type(small).from_pretrained(tmp_path / "hf")
    assert _params(again) == after
    torch.testing.assert_close(_outputs(again, x), want, rtol=1e-5, atol=1e-5)
    # and so does the pruned file on a fresh model
    paths = compress.export(small, tmp_path / "m", ["pruned"], example_inputs=x)
    loaded = compress.load_pruned(ZOO[name].build(), paths["pruned"])
    torch.testing.assert_close(_outputs(loaded, x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("criterion", ["L1", "L2", "geometric_median"])
def test_each_expert_keeps_its_own_best_channels(criterion: str) -> None:
    from compress.pruning.importance import ROW_SCORES

    recipe = {**FILTER, "params": {"round_to": 1, "filter_importance": criterion}}
    ctrl, model, _ = _build("mixtral", recipe)
    score = ROW_SCORES[criterion]
    kept_sets = set()
    for experts in _experts(model):
        gate_up = compress.masks.effective(experts, "gate_up_proj")
        down = compress.masks.effective(experts, "down_proj")
        for e in range(experts.num_experts):
            w = experts.gate_up_proj[e].detach()
            scores = score(w[:128]) + score(w[128:])
            best = set(torch.argsort(scores, descending=True)[:64].tolist())
            kept = set(torch.nonzero(gate_up[e, :128].abs().sum(1)).flatten().tolist())
            assert kept == best
            assert kept == set(torch.nonzero(gate_up[e, 128:].abs().sum(1)).flatten().tolist())
            assert kept == set(torch.nonzero(down[e].abs().sum(0)).flatten().tolist())
            kept_sets.add(frozenset(kept))
    assert len(kept_sets) > 1  # the same width, not the same channels


def test_expert_masks_survive_the_controller_state() -> None:
    ctrl, model, x = _build("mixtral", FILTER)
    experts = _experts(model)[0]
    state = ctrl.state_dict()
    want = compress.masks.effective(experts, "gate_up_proj")
    ctrl2, model2, _ = _build("mixtral", {**FILTER, "pruning_init": 0.0})
    experts2 = _experts(model2)[0]
    with torch.no_grad():
        experts2.gate_up_proj.copy_(experts.gate_up_proj)
    assert bool((compress.masks.effective(experts2, "gate_up_proj") != 0).all())
    ctrl2.load_state_dict(state)
    torch.testing.assert_close(compress.masks.effective(experts2, "gate_up_proj"), want)


def test_experts_stay_whole_when_the_config_cannot_state_their_width(tmp_path: Path) -> None:
    # one layer's experts out of scope: moe_intermediate_size states one width for both
    recipe = {**FILTER, "ignored_scopes": ["model.layers.1.mlp.experts"]}
    with pytest.warns(UserWarning, match=r"model\.layers\.0\.mlp\.experts \(config: "):
        ctrl, model, _ = _build_warned("qwen2_moe", recipe)
    excluded = {row["group"]: row for row in _statistics(ctrl)["algorithms"][0]["excluded"]}
    assert excluded["model.layers.0.mlp.experts"]["excluded because"] == "config"
    assert excluded["model.layers.1.mlp.experts"]["excluded because"] == "out of scope"
    assert bool((compress.masks.effective(_experts(model)[0], "gate_up_proj") != 0).all())
    # prune_beyond_config: the experts in scope are pruned, the pruned file rebuilds them
    recipe["params"] = {"round_to": 1, "prune_beyond_config": True}
    ctrl, model, x = _build("qwen2_moe", recipe)
    with pytest.warns(UserWarning, match=r"config cannot describe .*'model\.layers\.\*\.mlp\.ex"):
        small = ctrl.strip()
    assert small.config.moe_intermediate_size == 64
    assert tuple(_experts(small)[0].down_proj.shape) == (4, 64, 32)
    assert tuple(_experts(small)[1].down_proj.shape) == (4, 64, 64)
    want = _outputs(small, x)
    paths = compress.export(small, tmp_path / "m", ["pruned"], example_inputs=x)
    loaded = compress.load_pruned(ZOO["qwen2_moe"].build(), paths["pruned"])
    torch.testing.assert_close(_outputs(loaded, x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_a_flops_target_counts_the_experts(allocation: str) -> None:
    params = {"round_to": 1, "pruning_flops_target": 0.4, "allocation": allocation}
    recipe = {**FILTER, "pruning_init": 0.4, "params": params}
    if allocation == "uniform":  # the experts alone: the target is met to one channel
        recipe["ignored_scopes"] = ["{re}.*self_attn.*"]
    ctrl, model, x = _build("mixtral", recipe)
    summary = {row[""]: row for row in _statistics(ctrl)["algorithms"][0]["summary"]}
    widths = {int(k[e].sum()) for k in ctrl.algorithms[0].experts.keep.values() for e in range(4)}
    assert len(widths) == 1 and widths.pop() < 128
    channel = 0.757 / 128  # the experts are 75.7% of the MACs
    most = 0.4 + channel if allocation == "uniform" else 0.5
    assert 0.4 <= summary["MACs"]["pruned"] < most
    small = ctrl.strip()
    assert summary["MACs"]["current"] == layer_macs(small, x)[""]


def test_a_latency_target_leaves_the_experts_whole_and_says_so() -> None:
    recipe = {**FILTER, "params": {"round_to": 1, "pruning_latency_target": 0.3}}
    with pytest.warns(UserWarning, match="latency target: pruning_target or pruning_flops_targ"):
        ctrl, model, _ = _build_warned("mixtral", recipe)
    assert bool((compress.masks.effective(_experts(model)[0], "down_proj") != 0).all())


def _build_warned(name: str, recipe: dict[str, Any]) -> tuple[Any, torch.nn.Module, tuple]:
    torch.manual_seed(0)
    zoo = ZOO[name]
    model, x = zoo.build(), zoo.inputs()
    ctrl, model = compress.create_compressed_model(model, {"compression": recipe}, x)
    return ctrl, model, x


def test_qwen2_moe_shared_expert_width_round_trips(tmp_path: Path) -> None:
    # the shared expert is as wide as intermediate_size, which states no layer of this model:
    # only shared_expert_intermediate_size describes its pruned width
    recipe = {
        "algorithm": "filter_pruning",
        "pruning_init": 0.5,
        "params": {"round_to": 1},
        "ignored_scopes": ["{re}.*self_attn.*"],
    }
    torch.manual_seed(0)
    model, x = ZOO["qwen2_moe"].build(), ZOO["qwen2_moe"].inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ctrl, model = compress.create_compressed_model(model, {"compression": recipe}, x)
        small = ctrl.strip()
    assert not [w for w in caught if "config cannot" in str(w.message)]
    assert small.config.shared_expert_intermediate_size == 64
    assert small.config.intermediate_size == 128
    want = _outputs(model, x)
    small.save_pretrained(tmp_path / "hf")
    again = type(small).from_pretrained(tmp_path / "hf")
    torch.testing.assert_close(_outputs(again, x), want, rtol=1e-5, atol=1e-5)


def test_a_saved_experts_entry_that_does_not_fit_is_refused_before_anything_is_applied() -> None:
    ctrl, model, x = _build("mixtral", FILTER)
    state = ctrl.state_dict()
    algo = ctrl.algorithms[0]
    before = {n: k.clone() for n, k in algo.experts.keep.items()}
    for junk in ({"nosuch.experts": torch.ones(3, dtype=torch.bool)}, "abc"):
        bad = {**state, "state": {**state["state"]}}
        bad["state"]["filter_pruning"] = {**state["state"]["filter_pruning"], "experts": junk}
        bad["state"]["filter_pruning"]["level"] = 0.1
        with pytest.raises(compress.CompressError, match="prunes the experts of"):
            ctrl.load_state_dict(bad)
        assert all(torch.equal(before[n], algo.experts.keep[n]) for n in before)
        assert algo.current != 0.1  # refused as a whole, before anything was applied
    ctrl.load_state_dict(state)
