"""``pruning_latency_target`` under FSDP2 on 2 CPU processes (gloo): the latency table is
measured once, on rank 0, on the model gathered there, and sent to every rank, so that every
rank chooses the same widths; the fit ends with the masks and export DDP gives with the same
table, and a table from a loaded state is used as it is.

No test times anything: ``latency.default_timer`` is replaced by the planned timer of
``tests/test_latency_pruning.py``, counted per rank. The fits and two-process runners are
``tests/test_fsdp.py``'s.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from test_fsdp import MLP, _spawn_connected, connect, disconnect, run_script, shard_mlp
from test_fsdp_filter import RECIPES, _pruned_rows
from test_latency_pruning import blocked_timer

_L1 = RECIPES["L1"]
RECIPE: dict[str, Any] = {
    **_L1,
    # from 0: a level above 0 when the controller is built would measure the table then, before
    # a state (and its table) could be loaded
    "pruning_init": 0.0,
    "params": {
        **{k: v for k, v in _L1["params"].items() if k != "pruning_target"},
        "pruning_latency_target": 0.5,
    },
}

CALLS: Counter[str] = Counter()
"""What this process measured, by ``"<phase> <what> rank <r>"``."""
PHASE = [""]


def count_measuring() -> None:
    """Planned times (``blocked_timer``) in place of the timer, and every table measured, every
    time taken and every gather of the whole model counted in ``CALLS`` with the rank."""
    import torch.distributed as dist

    from compress import distributed
    from compress.pruning import latency

    def counted(what: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kw: Any) -> Any:
            rank = dist.get_rank() if dist.is_initialized() else 0
            CALLS[f"{PHASE[0]} {what} rank {rank}"] += 1
            return fn(*args, **kw)

        return wrapper

    latency.default_timer = counted("time", blocked_timer)
    latency.measure_table = counted("table", latency.measure_table)
    distributed.unsharded_copy = counted("gather", distributed.unsharded_copy)


def _plain(table: dict[str, Any]) -> dict[str, Any]:
    """The table without ``sample_ms``, the one figure timed for real (the length of a sample,
    which the planned timer does not use)."""
    return {k: v for k, v in table.items() if k != "sample_ms"}


_BOTH = """
import json, os
import test_fsdp_latency as t
t.count_measuring()
for strategy in ("ddp", "fsdp"):
    t.PHASE[0] = strategy
    test_fsdp.fit(out, "latency", strategy, recipe=t.RECIPE)
(out / f"calls{os.getpid()}.json").write_text(json.dumps(t.CALLS))
"""


def _table(run: Path) -> dict[str, Any]:
    """The latency table in the callback's entry of the last full checkpoint of ``run``."""
    ckpt = torch.load(run / "ckpt" / "last.ckpt")
    (entry,) = [v for k, v in ckpt["callbacks"].items() if "CompressionCallback" in k]
    table: dict[str, Any] = entry["controller"]["state"]["filter_pruning"]["latency_table"]
    return table


@pytest.mark.slow
def test_fsdp2_latency_target_ends_as_ddp_with_the_table_measured_on_rank_0(
    tmp_path: Path,
) -> None:
    run_script(tmp_path, _BOTH)
    calls: Counter[str] = Counter()
    for f in tmp_path.glob("calls*.json"):
        calls.update(json.loads(f.read_text()))
    # rank 0 alone measures the table (DDP and FSDP2; FSDP2 on the model gathered once):
    # tables measured on each rank would differ and choose different widths per rank
    assert calls["ddp table rank 0"] == calls["fsdp table rank 0"] == 1
    assert calls["ddp time rank 0"] > 0 and calls["fsdp time rank 0"] > 0
    assert not [k for k in calls if k.startswith("ddp") and "rank 1" in k]
    # gathered once for the table, once for the whole-model check of the final choice and
    # once for the export at the end
    assert calls["fsdp gather rank 0"] == calls["fsdp gather rank 1"] == 3
    assert [k for k in calls if k.startswith("fsdp") and "rank 1" in k] == ["fsdp gather rank 1"]
    ddp_table, fsdp_table = _table(tmp_path / "ddp"), _table(tmp_path / "fsdp")
    assert _plain(fsdp_table) == _plain(ddp_table)
    ddp, fsdp = torch.load(tmp_path / "ddp.pt"), torch.load(tmp_path / "fsdp.pt")
    pruned = _pruned_rows(ddp["masks"])
    assert pruned["fc1.weight"] and pruned["fc2.weight"]  # the target pruned both layers
    assert _pruned_rows(fsdp["masks"]) == pruned
    assert sorted(fsdp["masks"]) == sorted(ddp["masks"])
    for k, m in ddp["masks"].items():
        assert torch.equal(fsdp["masks"][k], m), k
    for k, w in ddp["weights"].items():
        torch.testing.assert_close(fsdp["weights"][k], w, atol=1e-4, rtol=0)
    # the export (the smaller model, stripped on rank 0) equals DDP's
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

    import compress
    from compress import distributed

    connect(rank, port, out)
    count_measuring()
    said: dict[str, Any] = {}

    def trained(model: MLP, ctrl: Any, x: torch.Tensor) -> list[dict[str, list[bool]]]:
        """The kept channels after each of 3 epochs of SGD on the same batches on every rank."""
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        kept = []
        for _ in range(3):
            ctrl.scheduler.epoch_step()
            kept.append({k: v.tolist() for k, v in ctrl.algorithms[0].keep.items()})
            for step in range(4):
                loss = model(x[step * 8 : step * 8 + 8]).square().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                ctrl.scheduler.step()
        return kept

    recipe = {"compression": RECIPE}
    torch.manual_seed(0)
    net, ref = MLP(), MLP()
    ref.load_state_dict(net.state_dict())
    x = torch.randn(32, 16)
    PHASE[0] = "sharded"
    ctrl, net = compress.create_compressed_model(shard_mlp(net), recipe, x[:2])
    said["keep"] = trained(net, ctrl, x)
    PHASE[0] = "one process"  # every rank builds one process's model: the reference
    ctrl_ref, ref = compress.create_compressed_model(ref, recipe, x[:2])
    said["same keep"] = trained(ref, ctrl_ref, x) == said["keep"]
    table = ctrl.algorithms[0].latency_table
    tables: list[Any] = [None, None]
    dist.all_gather_object(tables, table)
    said["same table on every rank"] = tables[0] == tables[1]
    said["table as one process's"] = _plain(table) == _plain(ctrl_ref.algorithms[0].latency_table)
    # a table from a loaded state is used as it is: nothing measured, nothing gathered
    PHASE[0] = "loaded"
    state = ctrl.state_dict()
    again, net2 = compress.create_compressed_model(shard_mlp(MLP()), recipe, x[:2])
    again.load_state_dict(state)
    again.scheduler.epoch_step()
    said["loaded table"] = again.algorithms[0].latency_table == table
    said["loaded keep"] = {k: v.tolist() for k, v in again.algorithms[0].keep.items()}
    calls: list[Any] = [None, None]
    dist.all_gather_object(calls, dict(CALLS))
    said["calls"] = calls
    # a measurement that fails on rank 0 fails on every rank, rather than leaving rank 1 waiting
    from compress.pruning import latency

    def failing(fn: Any) -> float:
        raise RuntimeError("the timer broke")

    planned, latency.default_timer = latency.default_timer, failing
    failed, net3 = compress.create_compressed_model(shard_mlp(MLP()), recipe, x[:2])
    try:
        failed.scheduler.epoch_step()
        why = "nothing raised"
    except Exception as e:  # noqa: BLE001 - what each rank raised is compared below
        why = f"{type(e).__name__}: {e}"
    said["failures"] = [None, None]
    dist.all_gather_object(said["failures"], why)
    latency.default_timer = planned
    source = distributed.unsharded_copy(net)
    if rank == 0:
        assert source is not None
        small, small_ref = ctrl.strip(source=source), ctrl_ref.strip()
        said["stripped"] = [list(p.shape) for p in small.parameters()]
        said["stripped as one process"] = said["stripped"] == [
            list(p.shape) for p in small_ref.parameters()
        ]
        said["stripped output"] = float((small(x) - small_ref(x)).abs().max().detach())
        Path(out).write_text(json.dumps(said))
    disconnect(rank, out)


@pytest.mark.slow
def test_core_api_latency_target_under_fully_shard(tmp_path: Path) -> None:
    """``fully_shard`` first, then ``create_compressed_model``: rank 0 measures the table on the
    gathered model (one gather per rank, and one for the whole-model check of the final
    choice), both ranks keep what one process keeps with that table, and a loaded state's
    table is not measured again."""
    out = tmp_path / "said.json"
    _spawn_connected(_core, out)
    said = json.loads(out.read_text())
    calls: Counter[str] = Counter()
    for c in said["calls"]:
        calls.update(c)
    sharded = {k: n for k, n in calls.items() if k.startswith("sharded")}
    assert sharded.pop("sharded gather rank 0") == sharded.pop("sharded gather rank 1") == 2
    assert sharded.pop("sharded table rank 0") == 1 and sharded.pop("sharded time rank 0") > 0
    assert not sharded  # rank 1 measured nothing
    assert not [k for k in calls if k.startswith("loaded")]
    assert said["same table on every rank"] and said["table as one process's"]
    assert said["same keep"], said["keep"]
    final = said["keep"][-1]
    assert 0 < sum(final["fc1"]) < 48 and 0 < sum(final["fc2"]) < 24
    assert said["loaded table"] and said["loaded keep"] == final
    assert said["stripped as one process"]
    assert said["failures"] == [
        "RuntimeError: the timer broke",
        "CompressError: rank 0 failed computing what every rank needs: RuntimeError: "
        "the timer broke",
    ]
    assert said["stripped"][0] == [sum(final["fc1"]), 16]
    assert said["stripped output"] < 1e-5
