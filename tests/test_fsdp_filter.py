"""Filter pruning under FSDP2 on 2 CPU processes (gloo): through the callback with Lightning's
``ModelParallelStrategy`` it ends with the filters, weights and export the same data and seeds
give under DDP; through the core API with ``fully_shard`` applied first it keeps the channels
one process keeps; SCOP is refused with the reason (latency targets:
``tests/test_fsdp_latency.py``).

The fits reuse ``tests/test_fsdp.py``'s module, fit and two-process runners.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from test_fsdp import MLP, _spawn_connected, run_script

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
}

_BOTH = """
import test_fsdp_filter
recipe = test_fsdp_filter.RECIPES[{name!r}]
test_fsdp.fit(out, {name!r}, "ddp", recipe=recipe)
test_fsdp.fit(out, {name!r}, "fsdp", recipe=recipe)
"""

_RESUMED = """
import test_fsdp_filter
recipe = test_fsdp_filter.RECIPES["L1"]
test_fsdp.fit(out, "L1", "fsdp", recipe=recipe, distributed_checkpoint=True)
saved = sorted((out / "fsdp" / "ckpt").glob("epoch=0-*"))[0]
test_fsdp.fit(
    out, "L1", "fsdp", tag="_resumed", resume=saved, distributed_checkpoint=True, recipe=recipe
)
"""


def _pruned_rows(masks: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """Per weight, the rows (filters) its masks remove whole."""
    return {
        k: (~m).reshape(m.shape[0], -1).all(1).nonzero().flatten().tolist()
        for k, m in masks.items()
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_fsdp2_filter_pruning_ends_as_ddp(name: str, tmp_path: Path) -> None:
    run_script(tmp_path, _BOTH.format(name=name))
    ddp, fsdp = torch.load(tmp_path / "ddp.pt"), torch.load(tmp_path / "fsdp.pt")
    # producers' rows and biases, consumers' columns
    assert sorted(ddp["masks"]) == sorted(fsdp["masks"])
    assert {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "head.weight"} <= set(ddp["masks"])
    assert all(fsdp["layout"][k][3] for k in fsdp["layout"])  # sharded like their weights
    pruned = _pruned_rows(ddp["masks"])
    assert _pruned_rows(fsdp["masks"]) == pruned
    assert len(pruned["fc1.weight"]) + len(pruned["fc2.weight"]) >= 72 // 4  # it really pruned
    same = sum(int((ddp["masks"][k] == fsdp["masks"][k]).sum()) for k in ddp["masks"])
    total = sum(m.numel() for m in ddp["masks"].values())
    assert same / total >= 0.999
    assert sorted(ddp["weights"]) == sorted(fsdp["weights"])
    for k, w in ddp["weights"].items():
        torch.testing.assert_close(fsdp["weights"][k], w, atol=1e-4, rtol=0)
    # The export (the smaller model, gathered once on rank 0 and stripped there) equals DDP's.
    from compress.deploy.export import read_sparse

    a, _ = read_sparse(tmp_path / "ddp" / "exports" / "model.sparse.pt")
    b, _ = read_sparse(tmp_path / "fsdp" / "exports" / "model.sparse.pt")
    assert sorted(a) == sorted(b)
    assert a["fc1.weight"].shape[0] == 48 - len(pruned["fc1.weight"])
    for k in a:
        assert a[k].shape == b[k].shape, k
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=0)


def _core(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    import compress
    from compress import distributed, masks

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    dist.barrier()
    Path(f"{out}.up{rank}").touch()  # connected: an abort from here on is a failure
    said: dict[str, Any] = {}

    def sharded(net: MLP) -> MLP:
        for layer in (net.fc1, net.fc2, net.head):
            fully_shard(layer)
        fully_shard(net)
        return net

    # fully_shard first, then create_compressed_model; the same batches on both ranks, so the
    # averaged gradients are one process's
    recipe = {"compression": RECIPES["L1"]}
    torch.manual_seed(0)
    net, ref = MLP(), MLP()
    ref.load_state_dict(net.state_dict())
    x = torch.randn(32, 16)
    ctrl, net = compress.create_compressed_model(sharded(net), recipe, x[:2])
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
    # what sharding refuses, by name
    for key, params in (("scop", {"filter_importance": "scop", "num_init_steps": 1}),):
        options = {k: v for k, v in RECIPES["L1"]["params"].items() if k != "pruning_target"}
        refused = {**RECIPES["L1"], "params": {**options, **params}}
        try:
            compress.create_compressed_model(sharded(MLP()), {"compression": refused}, x[:2])
        except CompressError as e:
            said[key] = str(e)
    # the other order: masks attached before fully_shard, refused at the next update
    ctrl, net = compress.create_compressed_model(MLP(), recipe, x[:2])
    sharded(net)
    try:
        ctrl.scheduler.epoch_step()
    except CompressError as e:
        said["after"] = str(e)
    if rank == 0:
        Path(out).write_text(json.dumps(said))
    dist.barrier()  # neither rank closes its connections while the other still uses them
    dist.destroy_process_group()


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
    assert "'scop' does not run on a sharded model" in said["scop"]
    assert "use 'L1', 'L2', 'geometric_median' or 'nuclear_norm'" in said["scop"]
    assert "apply fully_shard first, then create_compressed_model" in said["after"]


@pytest.mark.slow
def test_fsdp2_filter_pruning_resumes_bitwise(tmp_path: Path) -> None:
    """Resumed from the distributed checkpoint of epoch 0 (the filters move at the next epoch
    start, and pruned filters' stored values come back with them), a sharded fit ends bitwise
    where the uninterrupted one did."""
    run_script(tmp_path, _RESUMED)
    assert (tmp_path / "fsdp" / "ckpt" / "epoch=0-step=4.ckpt").is_dir()
    whole, resumed = torch.load(tmp_path / "fsdp.pt"), torch.load(tmp_path / "fsdp_resumed.pt")
    assert _pruned_rows(whole["masks"])["fc1.weight"]
    for part in ("masks", "weights"):
        assert sorted(resumed[part]) == sorted(whole[part])
        for k, t in whole[part].items():
            assert torch.equal(resumed[part][k], t), (part, k)
