"""Exact resume: a fit interrupted and resumed from its checkpoint ends bitwise equal to an
uninterrupted fit, for every algorithm, from an epoch-end and from a mid-epoch checkpoint.

What "equal" covers: every model tensor (weights, BatchNorm statistics), every mask buffer, the
whole controller state (scheduler position, masks, thresholds, RB logits and noise generator,
pruning ratios) and the sequence of batches trained on.

Why the data loader here is not ``DataLoader(shuffle=True)``: Lightning saves the loop counters
but not the position of a plain ``RandomSampler``. On resume the sampler starts a fresh
permutation (from the generator's seed, or from the global RNG, which the checkpoint does not
hold), so the resumed epoch sees other batches and the weights diverge at the first step. This is
Lightning's data-loader state, not the compression state. ``EpochSampler`` shows the fix a user
needs for bitwise resume: a permutation that is a function of (seed, epoch), and a loader with
``state_dict``/``load_state_dict``, which Lightning saves in the checkpoint ("combined_loader")
and restores before it iterates. Lightning does not prefetch from a sized loader, so the number
of samples the sampler has yielded is exactly the number trained on.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from conftest import ConvBNNet, fit_quietly, quiet_trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from callbacks import CompressionCallback
from compress import masks
from compress.algorithms import ALGORITHMS

N_SAMPLES, BATCH = 64, 8  # 8 optimizer steps per epoch
EPOCHS = 4


class EpochSampler(Sampler[int]):
    """A shuffling sampler that can resume mid-epoch: the order is a function of
    (seed, epoch), and the state is (epoch, samples consumed)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed = n, seed
        self.epoch = 0
        self.skip = 0
        self.yielded = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.skip = 0
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=gen).tolist()
        start, self.skip = self.skip, 0
        self.yielded = start
        for i in order[start:]:
            self.yielded += 1
            yield i

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.yielded}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        # Lightning iterates once before it calls set_epoch on resume, so the epoch comes from
        # the state; a finished epoch resumes at the start of the next one.
        if state["consumed"] >= self.n:
            self.epoch, self.skip = state["epoch"] + 1, 0
        else:
            self.epoch, self.skip = state["epoch"], state["consumed"]


class ResumableLoader(DataLoader):
    """A DataLoader that Lightning saves and restores (it has state_dict/load_state_dict)."""

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()  # type: ignore[attr-defined]

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.sampler.load_state_dict(state)  # type: ignore[attr-defined]


def resumable_loader(n: int = N_SAMPLES, batch: int = BATCH) -> ResumableLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 8, 8, generator=gen)
    y = (x.mean((1, 2, 3)) > 0).long()
    return ResumableLoader(
        TensorDataset(x, y, torch.arange(n)), batch_size=batch, sampler=EpochSampler(n)
    )


class Lit(pl.LightningModule):
    """A user's module: the compression callback never changes its code."""

    def __init__(self, presparse: bool = False) -> None:
        super().__init__()
        self.model = ConvBNNet()
        if presparse:  # const_sparsity keeps zeros the model already has
            with torch.no_grad():
                for layer in (self.model.conv1, self.model.conv2, self.model.fc):
                    w = layer.weight
                    w[w.abs() < w.abs().flatten().median()] = 0.0
        self.example_input_array = torch.zeros(2, 3, 8, 8)
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y, idx = batch
        self.seen.extend(idx.tolist())
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)


_SPARSITY = {
    "schedule": "polynomial",
    "power": 1,
    "concave": False,
    "sparsity_target": 0.7,
    "sparsity_target_epoch": 3,
    "sparsity_freeze_epoch": 3,
}
MAGNITUDE = {"algorithm": "magnitude_sparsity", "sparsity_init": 0.1, "params": _SPARSITY}
MAGNITUDE_PER_STEP = {
    "algorithm": "magnitude_sparsity",
    "params": {
        **_SPARSITY,
        "update_per_optimizer_step": True,
        "weight_importance": "abs",
        "pruned_weights_gradient": "straight_through",
    },
}
CONST = {"algorithm": "const_sparsity"}
RB = {
    "algorithm": "rb_sparsity",
    "sparsity_init": 0.05,
    "params": {**_SPARSITY, "schedule": "exponential", "sparsity_target": 0.5},
}
FILTER = {
    "algorithm": "filter_pruning",
    "pruning_init": 0.1,
    "params": {
        "schedule": "exponential",
        "pruning_target": 0.5,
        "pruning_steps": 3,
        "prune_first_conv": True,
        "round_to": 1,
    },
}
# The knockoff phase covers epochs 0 and 1: the mid-epoch checkpoint (step 12) is inside it.
SCOP = {
    "algorithm": "filter_pruning",
    "pruning_init": 0.5,
    "params": {
        "schedule": "baseline",
        "pruning_target": 0.5,
        "num_init_steps": 2,
        "filter_importance": "scop",
        "prune_first_conv": True,
        "round_to": 1,
    },
}
SCOP_TRAINING = {**SCOP, "params": {**SCOP["params"], "scop_freeze_weights": False}}

needs_rb = pytest.mark.skipif("rb_sparsity" not in ALGORITHMS, reason="rb_sparsity not landed")
needs_fp = pytest.mark.skipif(
    "filter_pruning" not in ALGORITHMS, reason="filter_pruning not landed"
)

# (id, compression section, model has zeros to keep)
CASES = [
    pytest.param(MAGNITUDE, False, id="magnitude"),
    pytest.param(MAGNITUDE_PER_STEP, False, id="magnitude-per-step"),
    pytest.param(CONST, True, id="const"),
    pytest.param(FILTER, False, id="filter_pruning", marks=needs_fp),
    pytest.param(RB, False, id="rb_sparsity", marks=needs_rb),
    pytest.param(SCOP, False, id="scop", marks=needs_fp),
    pytest.param(SCOP_TRAINING, False, id="scop-weights-train", marks=needs_fp),
    pytest.param([CONST, MAGNITUDE_PER_STEP], True, id="const+magnitude"),
    pytest.param([FILTER, MAGNITUDE], False, id="filter_pruning+magnitude", marks=needs_fp),
    pytest.param([FILTER, RB], False, id="filter_pruning+rb", marks=needs_rb),
]


pytestmark = pytest.mark.usefixtures("one_thread")


def fit(
    root: Path,
    section: Any,
    presparse: bool,
    *,
    epochs: int = EPOCHS,
    ckpt_path: Path | None = None,
    checkpoints: list[pl.Callback] | None = None,
) -> tuple[Lit, CompressionCallback]:
    pl.seed_everything(0, verbose=False)
    module = Lit(presparse)
    cb = CompressionCallback({"compression": section}, model_attr="model", verbose=False)
    trainer = quiet_trainer(
        root, cb, *(checkpoints or []), epochs=epochs, devices=1, deterministic=True, logger=False
    )
    fit_quietly(trainer, module, resumable_loader(), ckpt_path=ckpt_path)
    return module, cb


def assert_identical(a: Any, b: Any, where: str = "") -> None:
    """Bitwise equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: tensors differ"
    elif isinstance(a, Mapping):
        assert isinstance(b, Mapping) and sorted(a) == sorted(b), f"{where}: keys differ"
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def mask_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{mod}.{name}#{i}": mask
        for i, (mod, _, name, mask) in enumerate(masks.iter_masked(module))
    }


def assert_same_run(ref: tuple[Lit, CompressionCallback], got: tuple[Lit, CompressionCallback]):  # type: ignore[no-untyped-def]
    (ref_module, ref_cb), (module, cb) = ref, got
    assert ref_module.seen[-len(module.seen) :] == module.seen, "the resumed run saw other data"
    assert_identical(ref_module.state_dict(), module.state_dict(), "model")
    assert_identical(mask_buffers(ref_module.model), mask_buffers(module.model), "masks")
    assert_identical(ref_cb.ctrl.state_dict(), cb.ctrl.state_dict(), "controller")
    assert cb.ctrl.scheduler.global_step == EPOCHS * N_SAMPLES // BATCH
    assert cb.ctrl.scheduler.epoch == EPOCHS - 1


@pytest.mark.parametrize(("section", "presparse"), CASES)
def test_resume_is_bitwise_exact(section: Any, presparse: bool, tmp_path: Path) -> None:
    every = ModelCheckpoint(
        dirpath=tmp_path / "steps", every_n_train_steps=6, save_top_k=-1, filename="{step}"
    )
    ref = fit(tmp_path / "full", section, presparse, checkpoints=[every])
    plain_keys = sorted(Lit().state_dict())
    assert sorted(ref[0].state_dict()) == plain_keys

    # 1. A run that stops after epoch 2 and is resumed from its last checkpoint.
    stop = ModelCheckpoint(dirpath=tmp_path / "stopped", filename="last")
    fit(tmp_path / "stopped", section, presparse, epochs=2, checkpoints=[stop])
    epoch_end = tmp_path / "stopped" / "last.ckpt"
    # 2. Mid-epoch (epoch 1, after batch 4 of 8) and 3. at the last batch of epoch 2, both
    # written by ModelCheckpoint(every_n_train_steps=...) in the uninterrupted run.
    mid_epoch = tmp_path / "steps" / "step=12.ckpt"
    last_batch = tmp_path / "steps" / "step=24.ckpt"

    for ckpt in (epoch_end, mid_epoch, last_batch):
        state = torch.load(ckpt, weights_only=True)
        # The checkpoint's weights load into the plain class: original keys only.
        assert sorted(state["state_dict"]) == [
            f"model.{k}" for k in sorted(ConvBNNet().state_dict())
        ]
        Lit().load_state_dict(state["state_dict"])
        assert "controller" in state["callbacks"]["CompressionCallback"]
        got = fit(tmp_path / f"resumed-{ckpt.stem}", section, presparse, ckpt_path=ckpt)
        assert_same_run(ref, got)


@needs_rb
def test_rb_noise_generator_state_travels_in_the_checkpoint(tmp_path: Path) -> None:
    every = ModelCheckpoint(
        dirpath=tmp_path / "steps", every_n_train_steps=5, save_top_k=-1, filename="{step}"
    )
    fit(tmp_path / "full", RB, False, epochs=1, checkpoints=[every])
    a = torch.load(tmp_path / "steps" / "step=5.ckpt", weights_only=True)
    state = a["callbacks"]["CompressionCallback"]["controller"]["state"]["rb_sparsity"]
    leaves = list(_leaves(state))
    generators = [v for v in leaves if isinstance(v, torch.Tensor) and v.dtype == torch.uint8]
    assert generators, "no RNG state (a uint8 tensor) in the rb_sparsity checkpoint state"


def _leaves(obj: Any) -> Iterator[Any]:
    if isinstance(obj, Mapping):
        for v in obj.values():
            yield from _leaves(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _leaves(v)
    else:
        yield obj


def test_a_plain_shuffled_loader_is_why_resume_needs_a_resumable_sampler(tmp_path: Path) -> None:
    """Documents the limit: with DataLoader(shuffle=True) the resumed epoch sees a different
    order than the uninterrupted one (Lightning does not save the sampler), so only the
    compression state, not the training, can be exact."""

    def plain_loader() -> DataLoader:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(N_SAMPLES, 3, 8, 8, generator=gen)
        ds = TensorDataset(x, (x.mean((1, 2, 3)) > 0).long(), torch.arange(N_SAMPLES))
        return DataLoader(
            ds, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(0)
        )

    def run(epochs: int, ckpt: Path | None, root: Path) -> Lit:
        pl.seed_everything(0, verbose=False)
        module = Lit()
        cb = CompressionCallback({"compression": MAGNITUDE}, model_attr="model", verbose=False)
        last = ModelCheckpoint(dirpath=root, filename="last")
        trainer = quiet_trainer(root, cb, last, epochs=epochs, deterministic=True, logger=False)
        fit_quietly(trainer, module, plain_loader(), ckpt_path=ckpt)
        return module

    full = run(2, None, tmp_path / "a")
    run(1, None, tmp_path / "b")
    resumed = run(2, tmp_path / "b" / "last.ckpt", tmp_path / "c")
    assert resumed.seen != full.seen[N_SAMPLES:]  # epoch 1 replays epoch 0's order
    assert resumed.seen == full.seen[:N_SAMPLES]
