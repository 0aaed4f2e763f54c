"""The path a Lightning user takes: the checkpoints Lightning writes are the compressed model,
the best one can be exported (during fit or afterwards with ``compress export``), the module is
the compressed model after fit, a second fit continues, epochs may differ in length, and a run
that falls short of the recipe says so."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from conftest import ConvBNNet, LitClassifier, fit_quietly, lenet, loader16, magnitude
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from test_resume import FILTER, MAGNITUDE, RB, Lit, assert_same_run, fit, needs_fp, needs_rb
from torch import nn
from torch._dynamo.utils import counters
from torch.utils.data import DataLoader, IterableDataset

import compress
from callbacks import CompressionCallback
from compress.cli import main
from compress.controller import unpack_bits
from compress.errors import CompressError

pytestmark = pytest.mark.usefixtures("one_thread")

PER_EPOCH = magnitude(
    sparsity_init=0.2,
    schedule="polynomial",
    sparsity_target=0.8,
    sparsity_target_epoch=2,
    sparsity_freeze_epoch=3,
    power=1,
    concave=False,
)


class ValLit(LitClassifier):
    """``LitClassifier`` with a validation accuracy, as a user's module has."""

    def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())


def trainer(root: Path, *callbacks: pl.Callback, epochs: int, **kw: Any) -> pl.Trainer:
    kw.setdefault("logger", False)
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        default_root_dir=root,
        callbacks=list(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )


def zeros(t: torch.Tensor) -> float:
    return float((t == 0).float().mean())


def masked_weights(sd: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([sd[f"model.{i}.weight"].flatten() for i in (0, 2, 4)])


# --- 1. faithful checkpoints, 2. the best model exported ---------------------------------------


FRESH = """
import torch
from torch import nn
sd = torch.load({path!r}, weights_only=True)["state_dict"]
net = nn.Sequential(
    nn.Linear(16, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)
)
net.load_state_dict({{k.removeprefix("model."): v for k, v in sd.items()}})
x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
accuracy = (net(x).argmax(1) == (x[:, 0] > 0).long()).float().mean()
w = torch.cat([net[i].weight.flatten() for i in (0, 2, 4)])
print(float(accuracy), float((w == 0).float().mean()))
"""


def test_best_checkpoint_loads_as_the_masked_model_that_scored(tmp_path: Path) -> None:
    # mode="min": the worst epoch is "best", so the best model is not the final one.
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_acc", mode="min")
    cb = CompressionCallback(
        PER_EPOCH,
        model_attr="model",
        verbose=False,
        export_dir=tmp_path / "out",
        export_from="best",
        export_formats=["sparse", "pt2"],
    )
    module = ValLit()
    fit_quietly(
        trainer(tmp_path, cb, best, epochs=4), module, loader16(), val_dataloaders=loader16()
    )

    state = torch.load(best.best_model_path, weights_only=True)
    level = state["callbacks"]["CompressionCallback"]["controller"]["state"]["magnitude_sparsity"]
    assert level["level"] < 0.8  # an earlier epoch than the last
    # The checkpoint's weights are the masked ones: the scheduled sparsity, in the plain class.
    assert zeros(masked_weights(state["state_dict"])) == pytest.approx(level["level"], abs=1e-3)
    reloaded = ValLit.load_from_checkpoint(best.best_model_path)
    (scores,) = trainer(tmp_path / "v", epochs=1).validate(reloaded, loader16(), verbose=False)
    assert scores["val_acc"] == pytest.approx(float(best.best_model_score), abs=1e-6)
    # In a fresh process with torch alone (neither Lightning nor this library): the same score.
    script = FRESH.format(path=str(best.best_model_path))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    accuracy, sparsity = map(float, out.stdout.split())
    assert accuracy == pytest.approx(float(best.best_model_score), abs=1e-6)
    assert sparsity == pytest.approx(level["level"], abs=1e-3)
    # export_from="best" exported that model, not the final one.
    x = torch.randn(5, 16)
    reloaded.eval()
    exported = compress.load_sparse(cb.exported["sparse"], lenet(16))
    assert torch.equal(exported(x), reloaded.model(x))
    program = torch.export.load(str(cb.exported["pt2"]))
    assert torch.allclose(program.module()(x), reloaded.model(x), atol=1e-6)
    assert zeros(masked_weights(module.state_dict())) == pytest.approx(0.8, abs=1e-3)


def test_compress_export_turns_a_checkpoint_into_the_exports(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    last = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last")
    cb = CompressionCallback(PER_EPOCH, model_attr="model", verbose=False)
    fit_quietly(trainer(tmp_path, cb, last, epochs=2), ValLit(), loader16())
    (tmp_path / "nets.py").write_text(
        "from torch import nn\n"
        "def net():\n"
        "    return nn.Sequential(nn.Linear(16, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),"
        " nn.Linear(100, 10))\n"
    )
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    out = tmp_path / "exports" / "m"
    assert (
        main(
            [
                "export",
                str(ckpt),
                "--model",
                "nets:net",
                "--formats",
                "sparse,pt2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    reloaded = ValLit.load_from_checkpoint(ckpt).eval()
    x = torch.randn(5, 16)
    assert torch.equal(compress.load_sparse(f"{out}.sparse.pt", lenet(16))(x), reloaded(x))
    program = torch.export.load(f"{out}.pt2")
    assert torch.allclose(program.module()(x), reloaded(x), atol=1e-6)
    # The LightningModule itself as the factory works too; a plain checkpoint is refused.
    monkeypatch.setattr("conftest.ValLit", ValLit, raising=False)
    assert main(["export", str(ckpt), "--model", "conftest:ValLit", "--out", str(out) + "2"]) == 0
    torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
    assert main(["export", str(tmp_path / "plain.ckpt"), "--model", "nets:net"]) == 2


@needs_fp
def test_compress_export_of_a_filter_pruning_checkpoint_shrinks(tmp_path: Path) -> None:
    from compress.cli import export_checkpoint

    last = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last")
    cb = CompressionCallback({"compression": FILTER}, model_attr="model", verbose=False)
    module = Lit()
    loader = DataLoader(
        torch.utils.data.TensorDataset(
            torch.randn(32, 3, 8, 8), torch.randint(0, 2, (32,)), torch.arange(32)
        ),
        batch_size=8,
    )
    fit_quietly(trainer(tmp_path, cb, last, epochs=3), module, loader)
    paths = export_checkpoint(tmp_path / "ckpt" / "last.ckpt", ConvBNNet(), ["pt2"], tmp_path / "m")
    program = torch.export.load(str(paths["pt2"]))
    x = torch.randn(2, 3, 8, 8)
    module.eval()
    assert torch.allclose(program.module()(x), module(x), atol=1e-5)
    shrunk = dict(program.state_dict)
    assert shrunk["conv1.weight"].shape[0] < 8


def test_the_checkpoint_entry_is_compact_and_keeps_masked_values_only_while_masks_move(
    tmp_path: Path,
) -> None:
    every = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
    cb = CompressionCallback(PER_EPOCH, model_attr="model", verbose=False)
    fit_quietly(trainer(tmp_path, cb, every, epochs=4), LitClassifier(), loader16())
    for epoch, moving in [(0, True), (2, True), (3, False)]:
        state = torch.load(tmp_path / "ckpt" / f"epoch={epoch}.ckpt", weights_only=True)
        entry = state["callbacks"]["CompressionCallback"]
        masks = entry["controller"]["state"]["magnitude_sparsity"]["masks"]
        packed = masks["0"]
        assert packed["packed_bits"].dtype == torch.uint8 and packed["packed_bits"].numel() == 600
        mask = unpack_bits(packed)
        assert mask.shape == (300, 16)
        assert torch.equal(mask, state["state_dict"]["model.0.weight"] != 0)
        assert ("masked_values" in entry) == moving
        if moving:
            values = entry["masked_values"]["0.weight"]
            assert values["values"].numel() == int((~mask).sum())


@pytest.mark.parametrize(
    "section", [pytest.param(MAGNITUDE, id="magnitude"), pytest.param(RB, id="rb", marks=needs_rb)]
)
def test_resume_from_a_frozen_checkpoint_without_masked_values_is_still_exact(
    section: Any, tmp_path: Path
) -> None:
    every = ModelCheckpoint(
        dirpath=tmp_path / "steps", every_n_train_steps=6, save_top_k=-1, filename="{step}"
    )
    ref = fit(tmp_path / "full", section, False, checkpoints=[every])
    ckpt = tmp_path / "steps" / "step=30.ckpt"  # epoch 3: the masks are frozen
    assert (
        "masked_values"
        not in torch.load(ckpt, weights_only=True)["callbacks"]["CompressionCallback"]
    )
    assert_same_run(ref, fit(tmp_path / "resumed", section, False, ckpt_path=ckpt))


# --- 3. after fit the module is the compressed model -----------------------------------------


@needs_fp
def test_after_fit_the_module_is_the_masked_model_and_agrees_with_the_export(
    tmp_path: Path,
) -> None:
    cb = CompressionCallback(
        {"compression": FILTER},
        model_attr="model",
        verbose=False,
        export_dir=tmp_path / "o",
        export_formats=["pt2"],
    )
    module = Lit()
    loader = DataLoader(
        torch.utils.data.TensorDataset(
            torch.randn(32, 3, 8, 8), torch.randint(0, 2, (32,)), torch.arange(32)
        ),
        batch_size=8,
    )
    fit_quietly(trainer(tmp_path, cb, epochs=3, enable_checkpointing=False), module, loader)
    sd = module.state_dict()
    pruned_filters = int((sd["model.conv1.weight"].flatten(1).abs().sum(1) == 0).sum())
    assert pruned_filters > 0  # masked, not shrunk: the shapes are the plain ones
    assert sd["model.conv1.weight"].shape == (8, 3, 3, 3)
    x = torch.randn(4, 3, 8, 8)
    (predicted,) = trainer(tmp_path / "p", epochs=1).predict(module, DataLoader(x, batch_size=4))
    program = torch.export.load(str(cb.exported["pt2"]))
    assert torch.allclose(predicted, program.module()(x), atol=1e-5)
    plain = Lit().eval()
    plain.load_state_dict(sd)
    assert torch.allclose(plain(x), predicted, atol=1e-5)


# --- 4. a second fit continues ----------------------------------------------------------------


class Levels(pl.Callback):
    def __init__(self, cb: CompressionCallback) -> None:
        self.cb, self.levels = cb, []

    def on_train_batch_end(self, *args: Any) -> None:
        assert self.cb.ctrl is not None
        self.levels.append(self.cb.ctrl.compression_level)


def test_a_second_fit_continues_the_schedule_and_never_revives_pruned_weights(
    tmp_path: Path,
) -> None:
    recipe = magnitude(
        schedule="polynomial",
        sparsity_target=0.8,
        sparsity_target_epoch=4,
        power=1,
        concave=False,
        update_per_optimizer_step=True,
        pruned_weights_gradient="straight_through",
    )
    cb = CompressionCallback(recipe, model_attr="model", verbose=False)
    probe = Levels(cb)
    module = LitClassifier()
    # The first fit stops mid-epoch (max_steps): 1.5 epochs of 8 steps.
    fit_quietly(trainer(tmp_path, cb, probe, epochs=2, max_steps=12), module, loader16())
    assert cb.ctrl.compression_level == pytest.approx(0.3)
    pruned = masked_weights(module.state_dict()) == 0
    stored_zero = torch.cat([module.model[i].weight.flatten() for i in (0, 2, 4)]) == 0
    assert torch.equal(pruned, stored_zero)  # the stored weights are the masked ones

    fit_quietly(trainer(tmp_path / "2", cb, probe, epochs=2), module, loader16())
    assert cb.ctrl.scheduler.epoch == 3 and cb.ctrl.scheduler.global_step == 12 + 16
    assert cb.ctrl.compression_level == pytest.approx(0.8)
    assert probe.levels == sorted(probe.levels)  # never lowered
    after = masked_weights(module.state_dict())
    assert bool((after[pruned] == 0).all())


# --- 7. epochs of any length ----------------------------------------------------------------


class Uneven(IterableDataset):
    """Epoch 0 has 17 batches of 4, epoch 1 has 9, and so on alternately."""

    def __init__(self) -> None:
        self.epoch = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = 17 if self.epoch % 2 == 0 else 9
        self.epoch += 1
        gen = torch.Generator().manual_seed(self.epoch)
        for _ in range(n):
            x = torch.randn(4, 16, generator=gen)
            yield x, (x[:, 0] > 0).long()


@pytest.mark.parametrize(
    "recipe",
    [
        pytest.param(PER_EPOCH, id="per-epoch"),
        pytest.param({"compression": {"algorithm": "const_sparsity"}}, id="const"),
        pytest.param(
            magnitude(sparsity_target_epoch=3, update_per_optimizer_step=True, steps_per_epoch=12),
            id="per-step-with-steps_per_epoch",
        ),
    ],
)
def test_epochs_of_any_length(recipe: dict, tmp_path: Path) -> None:
    cb = CompressionCallback(recipe, model_attr="model", verbose=False)
    fit_quietly(
        trainer(tmp_path, cb, epochs=4), LitClassifier(), DataLoader(Uneven(), batch_size=None)
    )
    assert cb.ctrl.scheduler.global_step == 17 + 9 + 17 + 9


def test_a_per_step_schedule_without_a_known_epoch_length_says_what_to_set(tmp_path: Path) -> None:
    cb = CompressionCallback(
        magnitude(sparsity_target_epoch=3, update_per_optimizer_step=True),
        model_attr="model",
        verbose=False,
    )
    with pytest.raises(compress.CompressError, match="set params.steps_per_epoch"):
        fit_quietly(
            trainer(tmp_path, cb, epochs=3), LitClassifier(), DataLoader(Uneven(), batch_size=None)
        )


def test_a_per_step_schedule_takes_the_epoch_length_from_lightning(tmp_path: Path) -> None:
    cb = CompressionCallback(
        magnitude(
            sparsity_target=0.5,
            sparsity_target_epoch=2,
            update_per_optimizer_step=True,
            power=1,
            concave=False,
        ),
        model_attr="model",
        verbose=False,
    )
    probe = Levels(cb)
    # The last epoch is cut short: the count is Lightning's (8 steps), not the last epoch's.
    fit_quietly(trainer(tmp_path, cb, probe, epochs=1), LitClassifier(), loader16())
    assert cb.ctrl.scheduler.inferred_steps_per_epoch == 8
    assert probe.levels[0] == pytest.approx(0.5 / 16)


# --- 8. no silent shortfall -----------------------------------------------------------------


def test_early_stopping_before_the_target_warns(tmp_path: Path) -> None:
    stop = EarlyStopping(monitor="val_acc", mode="max", patience=0, min_delta=1.0)
    cb = CompressionCallback(PER_EPOCH, model_attr="model", verbose=False)
    with pytest.warns(
        UserWarning,
        match=r"magnitude_sparsity reached level 0\.5000, below the recipe's target 0\.8000",
    ):
        trainer(tmp_path, cb, stop, epochs=6, enable_checkpointing=False).fit(
            ValLit(), loader16(), val_dataloaders=loader16()
        )
    assert cb.shortfall and "epoch 1" in cb.shortfall[0]


def test_max_steps_before_the_target_warns(tmp_path: Path) -> None:
    cb = CompressionCallback(PER_EPOCH, model_attr="model", verbose=False)
    with pytest.warns(UserWarning, match="below the recipe's target 0.8000"):
        trainer(tmp_path, cb, epochs=10, max_steps=10, enable_checkpointing=False).fit(
            LitClassifier(), loader16()
        )


@needs_rb
def test_rb_masks_that_lag_their_level_warn(tmp_path: Path) -> None:
    """16 SGD steps move RB's logits too little to drop a weight: said, with both numbers."""
    rb = {"algorithm": "rb_sparsity", "sparsity_init": 0.5, "params": {"sparsity_target": 0.5}}
    cb = CompressionCallback({"compression": rb}, model_attr="model", verbose=False)
    with pytest.warns(
        UserWarning,
        match=r"rb_sparsity's masks are 0\.0000 sparse where its "
        r"schedule is at level 0\.5000 after 16 optimizer steps",
    ):
        trainer(tmp_path, cb, epochs=2, enable_checkpointing=False).fit(
            LitClassifier(lr=1e-2), loader16()
        )
    assert len(cb.shortfall) == 1


def test_a_dict_batch_without_the_forward_input_says_what_to_set(tmp_path: Path) -> None:
    rows = [{"features": torch.randn(16), "target": torch.tensor(0)} for _ in range(8)]
    cb = CompressionCallback(PER_EPOCH, model_attr="model", verbose=False)
    with pytest.raises(
        compress.ConfigError,
        match=r"a dict with keys \['features', 'target'\], and Sequential.forward's first "
        r"parameter \(input\) is not one of them; set model_attr",
    ):
        trainer(tmp_path, cb, epochs=1).fit(
            LitClassifier(with_example=False), DataLoader(rows, batch_size=4)
        )


def test_fast_dev_run_exports_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cb = CompressionCallback(PER_EPOCH, model_attr="model", verbose=False, export_dir=out)
    fit_quietly(
        trainer(tmp_path, cb, epochs=4, enable_checkpointing=False), LitClassifier(), loader16()
    )
    before = (out / "model.sparse.pt").read_bytes()
    dev = CompressionCallback(PER_EPOCH, model_attr="model", verbose=False, export_dir=out)
    fit_quietly(trainer(tmp_path, dev, epochs=4, fast_dev_run=True), LitClassifier(), loader16())
    assert dev.exported == {} and dev.shortfall == []
    assert (out / "model.sparse.pt").read_bytes() == before
    # A fit that takes no optimizer step (no training batch) exports nothing either.
    idle = CompressionCallback(PER_EPOCH, model_attr="model", verbose=False, export_dir=out)
    fit_quietly(
        trainer(tmp_path, idle, epochs=4, limit_train_batches=0), LitClassifier(), loader16()
    )
    assert idle.exported == {} and idle.shortfall == []
    assert (out / "model.sparse.pt").read_bytes() == before


# --- 9. metrics for every algorithm -------------------------------------------------------------


@needs_fp
def test_filter_pruning_logs_kept_filters_levels_macs_and_params(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cb = CompressionCallback(
        {"compression": [FILTER, MAGNITUDE]}, model_attr="model", verbose=False
    )
    loader = DataLoader(
        torch.utils.data.TensorDataset(
            torch.randn(32, 3, 8, 8), torch.randint(0, 2, (32,)), torch.arange(32)
        ),
        batch_size=8,
    )
    logger = TensorBoardLogger(tmp_path, name="tb")
    fit_quietly(
        trainer(
            tmp_path, cb, epochs=2, logger=logger, log_every_n_steps=1, enable_checkpointing=False
        ),
        Lit(),
        loader,
    )
    (events,) = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in (
        "compression/filter_pruning/conv1/kept_filters",
        "compression/filter_pruning/conv1/pruning_level",
        "compression/filter_pruning/macs",
        "compression/filter_pruning/macs_full",
        "compression/filter_pruning/params",
        "compression/filter_pruning/params_full",
        "compression/filter_pruning/level",
        "compression/magnitude_sparsity/level",
        "compression/level",
    ):
        assert tag in tags, tag
    stats = cb.ctrl.statistics().to_dict()["algorithms"][0]
    (macs,) = [r for r in stats["summary"] if r[""] == "MACs"]
    assert acc.Scalars("compression/filter_pruning/macs")[-1].value == pytest.approx(
        macs["current"]
    )
    assert acc.Scalars("compression/filter_pruning/macs")[-1].value < macs["full"]
    assert acc.Scalars("compression/filter_pruning/level")[-1].value == pytest.approx(
        cb.ctrl.algorithms[0].level
    )


def test_train_loader_of_the_module_itself(tmp_path: Path) -> None:
    """Sanity: a module without example_input_array takes its inputs from the first batch."""
    cb = CompressionCallback(PER_EPOCH, model_attr="model", verbose=False)
    fit_quietly(trainer(tmp_path, cb, epochs=1), LitClassifier(with_example=False), loader16())
    assert isinstance(cb.ctrl.model, nn.Module)


# --- 6. torch.compile ----------------------------------------------------------------------------


class CompiledLit(LitClassifier):
    """A user's module that compiles its network in ``__init__``."""

    def __init__(self) -> None:
        super().__init__(model=torch.compile(lenet(16), backend="eager"))


def test_a_compiled_network_is_compressed_and_exported_under_its_plain_names(
    tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    last = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last")
    cb = CompressionCallback(
        PER_EPOCH,
        model_attr="model",
        verbose=False,
        export_dir=tmp_path / "out",
        export_formats=["sparse", "pt2"],
    )
    module = CompiledLit()
    torch._dynamo.reset()
    module(torch.randn(8, 16))  # a graph traced without masks, which must not be reused
    counters.clear()
    fit_quietly(trainer(tmp_path, cb, last, epochs=3), module, loader16())
    assert cb.ctrl.compression_level == pytest.approx(0.8)
    # Masked training under compile: one graph for the whole masked network (its own, as the
    # hooks are guarded), kept while the masks move every epoch (they change in place), no
    # graph break.
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["graph_break"].values()) == 0
    assert "model._orig_mod.0.weight" in module.state_dict()
    x = torch.randn(5, 16)
    module.eval()
    plain = compress.load_sparse(cb.exported["sparse"], lenet(16))  # plain names
    assert torch.equal(plain(x), module(x))
    program = torch.export.load(str(cb.exported["pt2"]))
    assert torch.allclose(program.module()(x), module(x), atol=1e-6)
    # compress export of its checkpoint into the plain network
    (tmp_path / "nets.py").write_text(
        "from torch import nn\n"
        "def net():\n"
        "    return nn.Sequential(nn.Linear(16, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),"
        " nn.Linear(100, 10))\n"
    )
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "cli" / "m"
    args = ["export", str(tmp_path / "ckpt" / "last.ckpt"), "--model", "nets:net"]
    assert main([*args, "--out", str(out)]) == 0
    assert torch.equal(compress.load_sparse(f"{out}.sparse.pt", lenet(16))(x), module(x))


class _Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


class _SwapBest(pl.Callback):
    """Replaces the best checkpoint with a pickle payload once training ends, before the
    export reads it (an attacker with write access to the checkpoint directory)."""

    def __init__(self, best: ModelCheckpoint, marker: Path) -> None:
        self.best, self.marker = best, marker

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = torch.load(self.best.best_model_path, weights_only=True)
        state["hyper_parameters"] = {"x": _Payload(self.marker)}
        torch.save(state, self.best.best_model_path)


def test_export_from_best_never_unpickles_the_checkpoint(tmp_path: Path) -> None:
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_acc", mode="min")
    marker = tmp_path / "ran"
    cb = CompressionCallback(
        PER_EPOCH,
        model_attr="model",
        verbose=False,
        export_dir=tmp_path / "out",
        export_from="best",
        export_formats=["sparse"],
    )
    with pytest.raises(CompressError, match="refused to load: the file holds Python objects"):
        fit_quietly(
            trainer(tmp_path, _SwapBest(best, marker), cb, best, epochs=2),
            ValLit(),
            loader16(),
            val_dataloaders=loader16(),
        )
    assert not marker.exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_no_load_in_the_project_unpickles_objects() -> None:
    root = Path(__file__).resolve().parent.parent
    offenders = [
        f"{path.relative_to(root)}:{i}"
        for path in root.rglob("*.py")
        if ".venv" not in path.parts and path.name != "test_lightning_path.py"
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"(?<!`)weights_only\s*=\s*False", line)
    ]  # a docstring may name the opposite in backquotes
    assert offenders == []
