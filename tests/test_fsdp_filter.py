"""Filter pruning under FSDP2 on 2 CPU processes (gloo): through the callback with Lightning's
``ModelParallelStrategy`` it ends with the filters, weights and export the same data and seeds
give under DDP, on the MLP and on a small conv-BatchNorm network (magnitude sparsity too);
through the core API with ``fully_shard`` applied first it keeps the channels one process
keeps (latency targets: ``tests/test_fsdp_latency.py``).

The fits reuse ``tests/test_fsdp.py``'s modules, fit and two-process runners.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import test_fsdp
import torch
from test_fsdp import MLP, _spawn_connected, connect, disconnect, run_script, shard_mlp

from compress.errors import CompressError

_PRUNING = {"prune_first_conv": True, "pruning_steps": 2}
RECIPES: dict[str, Any] = {
    # uniform allocation, the filters of every layer at the level
    "L1": {
        "algorithm": "filter_pruning",
        "pruning_init": 0.1,
        "params": {**_PRUNING, "filter_importance": "L1", "pruning_target": 0.5},
    },
    # one global ranking of normalised scores (each weight's norm summed over the ranks),
    # MACs as the target
    "geometric_median_flops": {
        "algorithm": "filter_pruning",
        "pruning_init": 0.1,
        "params": {
            **_PRUNING,
            "filter_importance": "geometric_median",
            "allocation": "global",
            "pruning_flops_target": 0.5,
        },
    },
    # feature maps of the training batches (the forward passes of a sharded model)
    "nuclear_norm": {
        "algorithm": "filter_pruning",
        "pruning_init": 0.1,
        "params": {**_PRUNING, "filter_importance": "nuclear_norm", "pruning_target": 0.4},
    },
    # SLAMP's ranking of the (all-reduced) per-filter scores
    "L2_slamp": {
        "algorithm": "filter_pruning",
        "pruning_init": 0.1,
        "params": {
            **_PRUNING,
            "filter_importance": "L2",
            "allocation": "slamp",
            "pruning_target": 0.5,
        },
    },
    # control coefficients learned in a knockoff epoch (weights frozen), then pruned by them
    "scop": {
        "algorithm": "filter_pruning",
        "pruning_init": 0.1,
        "params": {
            **_PRUNING,
            "num_init_steps": 1,
            "filter_importance": "scop",
            "scop_lr": 0.05,
            "pruning_target": 0.5,
        },
    },
}
CNN_RECIPES: dict[str, Any] = {
    "L1": RECIPES["L1"],
    "nuclear_norm": RECIPES["nuclear_norm"],
    "scop": RECIPES["scop"],
    "magnitude": test_fsdp.RECIPES["magnitude_global"],
}

_BOTH = """
import test_fsdp_filter
recipe = test_fsdp_filter.{table}[{name!r}]
test_fsdp.fit(out, {name!r}, "ddp", recipe=recipe, net={net!r})
test_fsdp.fit(out, {name!r}, "fsdp", recipe=recipe, net={net!r})
"""

# SCOP resumed inside its knockoff phase (2 epochs), the weights training meanwhile: with
# scop_freeze_weights the user's optimizer has not stepped by then, and ModelParallelStrategy
# cannot load its empty state (the callback warns when it saves such a checkpoint)
RESUMED: dict[str, tuple[str, dict[str, Any]]] = {
    "L1": ("mlp", RECIPES["L1"]),
    "scop": (
        "cnn",
        {
            **RECIPES["scop"],
            "params": {
                **RECIPES["scop"]["params"],
                "num_init_steps": 2,
                "pruning_steps": 1,
                "scop_freeze_weights": False,
            },
        },
    ),
}
_RESUMED = """
import test_fsdp_filter
net, recipe = test_fsdp_filter.RESUMED[{name!r}]
test_fsdp.fit(out, {name!r}, "fsdp", recipe=recipe, distributed_checkpoint=True, net=net)
saved = sorted((out / "fsdp" / "ckpt").glob("epoch=0-*"))[0]
test_fsdp.fit(
    out, {name!r}, "fsdp", tag="_resumed", resume=saved, distributed_checkpoint=True,
    recipe=recipe, net=net,
)
"""


def _pruned_rows(masks: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """Per weight, the rows (filters) its masks remove whole."""
    return {
        k: (~m).reshape(m.shape[0], -1).all(1).nonzero().flatten().tolist()
        for k, m in masks.items()
    }


def _both(tmp_path: Path, name: str, net: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The DDP and the FSDP2 fit of ``name`` on ``net``, checked to end alike: the same masks
    (sharded like their weights under FSDP2), weights within 1e-4, and the same export (the
    smaller model, gathered once on rank 0 and stripped there, BatchNorm statistics included)."""
    table = "CNN_RECIPES" if net == "cnn" else "RECIPES"
    run_script(tmp_path, _BOTH.format(name=name, table=table, net=net))
    ddp, fsdp = torch.load(tmp_path / "ddp.pt"), torch.load(tmp_path / "fsdp.pt")
    assert sorted(ddp["masks"]) == sorted(fsdp["masks"])
    assert all(fsdp["layout"][k][3] for k in fsdp["layout"])  # sharded like their weights
    assert _pruned_rows(fsdp["masks"]) == _pruned_rows(ddp["masks"])
    same = sum(int((ddp["masks"][k] == fsdp["masks"][k]).sum()) for k in ddp["masks"])
    total = sum(m.numel() for m in ddp["masks"].values())
    assert same / total >= 0.999
    assert sorted(ddp["weights"]) == sorted(fsdp["weights"])
    for k, w in ddp["weights"].items():
        torch.testing.assert_close(fsdp["weights"][k], w, atol=1e-4, rtol=0)
    from compress.deploy.export import read_sparse

    a, _ = read_sparse(tmp_path / "ddp" / "exports" / "model.sparse.pt")
    b, _ = read_sparse(tmp_path / "fsdp" / "exports" / "model.sparse.pt")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        torch.testing.assert_close(b[k].float(), a[k].float(), atol=1e-4, rtol=0)
    return ddp, fsdp


def _check_scop(ddp: dict[str, Any], fsdp: dict[str, Any], layers: dict[str, str]) -> None:
    """Every rank learned the same coefficients, FSDP2 those of DDP; most moved from 0.5, and
    each producer (``layers``: coefficient name -> weight) lost its lowest-scored filters."""
    for run in (ddp, fsdp):
        first, second = run["scop"]
        assert sorted(first) == sorted(layers)
        assert all(torch.equal(first[n], second[n]) for n in first)
    for name, key in layers.items():
        k = ddp["scop"][0][name]
        torch.testing.assert_close(fsdp["scop"][0][name], k, atol=1e-6, rtol=0)
        assert int((k != 0.5).sum()) > k.numel() // 2  # (a dead unit's stays)
        pruned = _pruned_rows(ddp["masks"])[key]
        kept = [i for i in range(k.numel()) if i not in pruned]
        assert pruned and float(k[pruned].max()) <= float(k[kept].min())


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_fsdp2_filter_pruning_ends_as_ddp(name: str, tmp_path: Path) -> None:
    ddp, fsdp = _both(tmp_path, name, "mlp")
    # producers' rows and biases, consumers' columns
    assert {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "head.weight"} <= set(ddp["masks"])
    pruned = _pruned_rows(ddp["masks"])
    assert len(pruned["fc1.weight"]) + len(pruned["fc2.weight"]) >= 72 // 4  # it really pruned
    from compress.deploy.export import read_sparse

    a, _ = read_sparse(tmp_path / "ddp" / "exports" / "model.sparse.pt")
    assert a["fc1.weight"].shape[0] == 48 - len(pruned["fc1.weight"])
    if name == "scop":
        _check_scop(ddp, fsdp, {"fc1": "fc1.weight", "fc2": "fc2.weight"})


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CNN_RECIPES))
def test_fsdp2_conv_batchnorm_ends_as_ddp(name: str, tmp_path: Path) -> None:
    """Conv-BatchNorm-ReLU blocks, each one fully_shard unit: convs sharded by filters, their
    BatchNorm's weight and bias masked with them, its running statistics whole on each rank
    (rank 0's, which DDP broadcasts, are the exported ones)."""
    ddp, fsdp = _both(tmp_path, name, "cnn")
    from compress.deploy.export import read_sparse

    a, _ = read_sparse(tmp_path / "ddp" / "exports" / "model.sparse.pt")
    assert "block1.1.running_var" in a
    if name == "magnitude":
        zeros = sum(int((~m).sum()) for m in ddp["masks"].values())
        assert zeros / sum(m.numel() for m in ddp["masks"].values()) > 0.5
        return
    # filters: the conv's rows and bias, its BatchNorm's weight and bias, the next layer's
    # input channels
    pruned = _pruned_rows(ddp["masks"])
    for block, filters in (("block1", 16), ("block2", 24)):
        rows = pruned[f"{block}.0.weight"]
        for key in (f"{block}.0.bias", f"{block}.1.weight", f"{block}.1.bias"):
            assert pruned[key] == rows, key
        assert a[f"{block}.0.weight"].shape[0] == a[f"{block}.1.running_mean"].shape[0]
        assert a[f"{block}.0.weight"].shape[0] == filters - len(rows)
    assert a["block2.0.weight"].shape[1] == a["block1.0.weight"].shape[0]
    assert len(pruned["block1.0.weight"]) + len(pruned["block2.0.weight"]) >= 8
    if name == "scop":
        _check_scop(ddp, fsdp, {"block1.0": "block1.0.weight", "block2.0": "block2.0.weight"})


def _core(rank: int, port: int, out: str) -> None:

    import compress
    from compress import distributed, masks

    connect(rank, port, out)
    said: dict[str, Any] = {}

    # fully_shard first, then create_compressed_model; the same batches on both ranks, so the
    # averaged gradients are one process's
    recipe = {"compression": RECIPES["L1"]}
    torch.manual_seed(0)
    net, ref = MLP(), MLP()
    ref.load_state_dict(net.state_dict())
    x = torch.randn(32, 16)
    ctrl, net = compress.create_compressed_model(shard_mlp(net), recipe, x[:2])
    ctrl_ref, ref = compress.create_compressed_model(ref, recipe, x[:2])
    for model, c in ((net, ctrl), (ref, ctrl_ref)):
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(3):
            c.scheduler.epoch_step()
            for step in range(4):
                loss = model(x[step * 8 : step * 8 + 8]).square().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                c.scheduler.step()
    ours, theirs = ctrl.algorithms[0].keep, ctrl_ref.algorithms[0].keep
    said["keep"] = {k: v.tolist() for k, v in ours.items()}
    said["same keep"] = sorted(ours) == sorted(theirs) and all(
        torch.equal(ours[k], theirs[k]) for k in theirs
    )
    said["sharded masks"] = all(distributed.is_sharded(m) for *_, m in masks.iter_masked(net))
    said["same masks"] = all(
        torch.equal(distributed.full(a), b)
        for (*_, a), (*_, b) in zip(masks.iter_masked(net), masks.iter_masked(ref), strict=True)
    )
    said["weights"] = max(
        float((distributed.full(p.detach()) - q.detach()).abs().max())
        for p, q in zip(net.parameters(), ref.parameters(), strict=True)
    )
    # strip: the sharded model gathered once on rank 0, then as one process strips it
    source = distributed.unsharded_copy(net)
    if rank == 0:
        assert source is not None
        small, small_ref = ctrl.strip(source=source), ctrl_ref.strip()
        said["stripped"] = [list(p.shape) for p in small.parameters()]
        said["stripped as one process"] = said["stripped"] == [
            list(p.shape) for p in small_ref.parameters()
        ]
        said["stripped output"] = float((small(x) - small_ref(x)).abs().max())
    # the other order: masks attached before fully_shard, refused at the next update
    ctrl, net = compress.create_compressed_model(MLP(), recipe, x[:2])
    shard_mlp(net)
    try:
        ctrl.scheduler.epoch_step()
    except CompressError as e:
        said["after"] = str(e)
    if rank == 0:
        Path(out).write_text(json.dumps(said))
    disconnect(rank, out)


@pytest.mark.slow
def test_core_api_filter_pruning_under_fully_shard(tmp_path: Path) -> None:
    out = tmp_path / "said.json"
    _spawn_connected(_core, out)
    said = json.loads(out.read_text())
    assert said["same keep"], said["keep"]
    # at the target, fc2 rounded up to round_to (8)
    assert sum(said["keep"]["fc1"]) == 24 and sum(said["keep"]["fc2"]) == 16
    assert said["sharded masks"] and said["same masks"]
    assert said["weights"] < 1e-5
    assert said["stripped as one process"] and said["stripped"][0] == [24, 16]
    assert said["stripped output"] < 1e-5
    assert "apply fully_shard first, then create_compressed_model" in said["after"]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RESUMED))
def test_fsdp2_filter_pruning_resumes_bitwise(name: str, tmp_path: Path) -> None:
    """Resumed from the distributed checkpoint of epoch 0 (L1: the filters move at the next
    epoch start, and pruned filters' stored values come back with them; SCOP: in the middle of
    its knockoff phase, its coefficients, their optimizer and knockoff generator from the
    callback's state), a sharded fit ends bitwise where the uninterrupted one did."""
    run_script(tmp_path, _RESUMED.format(name=name))
    assert (tmp_path / "fsdp" / "ckpt" / "epoch=0-step=4.ckpt").is_dir()
    whole, resumed = torch.load(tmp_path / "fsdp.pt"), torch.load(tmp_path / "fsdp_resumed.pt")
    first = "block1.0.weight" if name == "scop" else "fc1.weight"
    assert _pruned_rows(whole["masks"])[first]
    for part in ("masks", "weights"):
        assert sorted(resumed[part]) == sorted(whole[part])
        for k, t in whole[part].items():
            assert torch.equal(resumed[part][k], t), (part, k)
    if name == "scop":
        for rank in range(2):
            for n, k in whole["scop"][rank].items():
                assert torch.equal(resumed["scop"][rank][n], k), n
