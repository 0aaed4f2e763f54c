"""Lightning DDP on 2 CPU processes (gloo): masks, RB noise, controller state and statistics agree
on both ranks after every scheduler step, and only rank 0 writes exports and TensorBoard logs.

Each rank writes what it saw to ``tmp_path/rank{r}.json`` (hashes per optimizer step, statistics
per epoch, what it exported); the test compares the two files. Masks are compared right after
the callback steps the scheduler, i.e. as each rank computed them and before DDP broadcasts
rank 0's buffers at the next forward pass (which would otherwise hide a disagreement).

``ddp_spawn`` runs in the default test run; ``ddp`` (which launches the other rank by running
the script again, so it cannot re-run pytest) runs a small script in a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from conftest import fit_quietly, quiet_trainer
from pytorch_lightning.loggers import TensorBoardLogger
from test_resume import (
    CONST,
    FILTER,
    MAGNITUDE,
    MAGNITUDE_PER_STEP,
    RB,
    SCOP,
    SCOP_TRAINING,
    Lit,
    needs_fp,
    needs_rb,
)
from torch.utils.data import DataLoader, TensorDataset

from callbacks import CompressionCallback
from compress import masks

ROOT = Path(__file__).resolve().parent.parent
STEPS_PER_EPOCH = 4  # 64 samples, batch 8, 2 ranks
EPOCHS = 4


def _digest(obj: Any, h: Any = None) -> str:
    """A hash of nested dicts/lists of tensors and plain values, in a fixed order."""
    top = h is None
    h = h or hashlib.sha256()
    if isinstance(obj, torch.Tensor):
        h.update(str(obj.dtype).encode())
        h.update(obj.detach().cpu().contiguous().numpy().tobytes())
    elif isinstance(obj, Mapping):
        for k in sorted(obj, key=str):
            h.update(str(k).encode())
            _digest(obj[k], h)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _digest(v, h)
    else:
        h.update(repr(obj).encode())
    return h.hexdigest() if top else ""


class RankProbe(pl.Callback):
    """Records, on each rank, what the compression callback left after every optimizer step."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.steps: list[dict[str, Any]] = []
        self.epochs: list[Any] = []

    @staticmethod
    def _cb(trainer: pl.Trainer) -> CompressionCallback:
        return next(c for c in trainer.callbacks if isinstance(c, CompressionCallback))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        ctrl = self._cb(trainer).ctrl
        model = pl_module.model
        noise = [
            layer.uniform
            for m in model.modules()
            if (layer := m.__dict__.get("_compress_rb")) is not None and layer.uniform is not None
        ]
        self.steps.append(
            {
                "step": ctrl.scheduler.global_step,
                "level": ctrl.compression_level,
                # Mask buffers and the zero pattern the forward pass sees (RB keeps its
                # learned mask in the logits until it freezes).
                "masks": _digest(
                    [m for *_, m in masks.iter_masked(model)]
                    + [masks.effective(mod, n) == 0 for _, mod, n, _ in masks.iter_masked(model)]
                ),
                "weights": _digest(dict(model.named_parameters())),
                "controller": _digest(ctrl.state_dict()),
                "rb_noise": _digest(noise) if noise else None,
            }
        )

    def on_train_epoch_end(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        self.epochs.append(self._cb(trainer).ctrl.statistics().to_dict())

    def on_fit_end(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        cb = self._cb(trainer)
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "steps": self.steps,
            "statistics": self.epochs,
            "exported": sorted(cb.exported),
            # after the compression callback's on_fit_end: the module is the compressed model
            "state_dict": _digest(pl_module.state_dict()),
        }
        path = self.out_dir / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps(record, default=str))


def ddp_loader() -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 8, 8, generator=gen)
    ds = TensorDataset(x, (x.mean((1, 2, 3)) > 0).long(), torch.arange(64))
    return DataLoader(ds, batch_size=8)


def fit_ddp(tmp_path: Path, section: Any, strategy: str = "ddp_spawn") -> pl.LightningModule:
    cb = CompressionCallback(
        {"compression": section},
        model_attr="model",
        verbose=False,
        export_dir=tmp_path / "exports",
    )
    trainer = quiet_trainer(
        tmp_path,
        cb,
        RankProbe(tmp_path),
        epochs=EPOCHS,
        devices=2,
        strategy=strategy,
        deterministic=True,
        logger=TensorBoardLogger(tmp_path, name="tb"),
        log_every_n_steps=1,
        enable_checkpointing=False,
    )
    pl.seed_everything(0, verbose=False)
    module = Lit(presparse=_presparse(section))
    fit_quietly(trainer, module, ddp_loader())
    return module


def _presparse(section: Any) -> bool:
    items = section if isinstance(section, list) else [section]
    return any(a["algorithm"] == "const_sparsity" for a in items)


def check_ranks(tmp_path: Path, section: Any) -> None:
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert (r0["world_size"], r1["world_size"]) == (2, 2)
    assert len(r0["steps"]) == len(r1["steps"]) == EPOCHS * STEPS_PER_EPOCH
    for a, b in zip(r0["steps"], r1["steps"]):
        assert a == b, f"ranks disagree after optimizer step {a['step']}"
    # The schedule really moved and the masks really changed during the run.
    levels = [s["level"] for s in r0["steps"]]
    assert levels[-1] > 0.0
    if section is RB:
        # A few steps do not move RB logits across zero: no mask flips yet, but the logits
        # (in the controller state) move every step, identically on both ranks.
        assert len({s["controller"] for s in r0["steps"]}) == len(r0["steps"])
    elif not _presparse(section) or isinstance(section, list):
        assert len({s["masks"] for s in r0["steps"]}) > 1
    if "rb_sparsity" in json.dumps(section):
        assert all(s["rb_noise"] for s in r0["steps"][:4])
        assert len({s["rb_noise"] for s in r0["steps"]}) > 1  # fresh noise every step
    assert r0["statistics"] == r1["statistics"]
    assert len(r0["statistics"]) == EPOCHS
    # Exports and TensorBoard logs: rank 0 only.
    assert r0["exported"] == ["sparse"] and r1["exported"] == []
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == ["model.sparse.pt"]
    events = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert len(events) == 1


pytestmark = pytest.mark.usefixtures("one_thread")


# One 2-process fit costs ~30 s here (two interpreters import torch and Lightning): the default
# run covers the hardest combination (learned masks with noise, plus structured masks); the rest
# run under -m slow.
DEFAULT = [pytest.param([FILTER, RB], id="filter_pruning+rb", marks=needs_rb)]
SLOW = [
    pytest.param(
        [CONST, MAGNITUDE_PER_STEP], id="const+magnitude-per-step", marks=pytest.mark.slow
    ),
    pytest.param(MAGNITUDE, id="magnitude", marks=pytest.mark.slow),
    pytest.param(FILTER, id="filter_pruning", marks=[needs_fp, pytest.mark.slow]),
    pytest.param(RB, id="rb_sparsity", marks=[needs_rb, pytest.mark.slow]),
    pytest.param(SCOP, id="scop", marks=[needs_fp, pytest.mark.slow]),
    pytest.param(SCOP_TRAINING, id="scop-weights-train", marks=[needs_fp, pytest.mark.slow]),
    pytest.param(
        [FILTER, MAGNITUDE], id="filter_pruning+magnitude", marks=[needs_fp, pytest.mark.slow]
    ),
]


@pytest.mark.parametrize("section", DEFAULT + SLOW)
def test_ddp_spawn_ranks_agree(section: Any, tmp_path: Path) -> None:
    module = fit_ddp(tmp_path, section)
    check_ranks(tmp_path, section)
    # The main process holds rank 0's compressed weights, those of the export.
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    assert _digest(module.state_dict()) == r0["state_dict"]
    from compress.deploy.export import read_sparse

    exported, _ = read_sparse(tmp_path / "exports" / "model.sparse.pt")
    conv1 = module.state_dict()["model.conv1.weight"]
    kept = int((conv1.flatten(1).abs().sum(1) != 0).sum())
    assert exported["conv1.weight"].shape[0] == kept


_SCRIPT = """
import sys
from pathlib import Path
sys.path[:0] = [{root!r}, {tests!r}]
import json
import torch
torch.set_num_threads(1)
import test_ddp
out = Path({out!r})
test_ddp.fit_ddp(out, json.loads({section!r}), strategy="ddp")
# Both ranks close the process group before exiting: left to interpreter exit, gloo's threads
# were seen to abort a rank ("terminate called without an active exception") after the fit.
import torch.distributed as dist
if dist.is_initialized():
    dist.barrier()
    dist.destroy_process_group()
"""


@pytest.mark.slow
@needs_rb
def test_ddp_subprocess_launcher_ranks_agree(tmp_path: Path) -> None:
    section = [FILTER, RB]
    script = tmp_path / "run_ddp.py"
    script.write_text(
        textwrap.dedent(
            _SCRIPT.format(
                root=str(ROOT),
                tests=str(ROOT / "tests"),
                out=str(tmp_path),
                section=json.dumps(section),
            )
        )
    )
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_ranks(tmp_path, section)
