"""What Lightning users tripped on (issue 26): RB in a second fit and under manual optimization,
two optimizers with a per-step schedule, another pruner on the same model, a compiled network
without ``model_attr``, the statistics of combined recipes, and messages that were not true."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import LitClassifier, fit_quietly, lenet, loader16, magnitude, quiet_trainer
from torch import nn
from torch.nn.utils import parametrize

import compress
from callbacks import CompressionCallback
from compress.errors import CompressError

pytestmark = pytest.mark.usefixtures("one_thread")

# RB whose logits learn fast enough to drop a quarter of the weights in 64 Adam steps
RB = {
    "compression": {
        "algorithm": "rb_sparsity",
        "sparsity_init": 0.3,
        "compression_lr_multiplier": 30,
        "params": {
            "schedule": "polynomial",
            "power": 1,
            "sparsity_target": 0.6,
            "sparsity_target_epoch": 4,
            "sparsity_freeze_epoch": 8,
        },
    }
}


def trainer(root: Path, *callbacks: Any, epochs: int, **kw: Any) -> Any:
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    return quiet_trainer(root, *callbacks, epochs=epochs, devices=1, **kw)


def weights(module: LitClassifier) -> torch.Tensor:
    return torch.cat([module.model[i].weight.detach().flatten() for i in (0, 2, 4)])


# --- 1. RB in a second fit ----------------------------------------------------------------------


def test_a_second_fit_never_revives_weights_rb_dropped(tmp_path: Path) -> None:
    cb = CompressionCallback(RB, model_attr="model", verbose=False)
    module = LitClassifier(optimizer=torch.optim.Adam, lr=1e-2)
    fit_quietly(trainer(tmp_path, cb, epochs=2), module, loader16(256))
    dropped = weights(module) == 0
    assert int(dropped.sum()) > 5000  # 9,138 of 35,800
    state = cb.ctrl.state_dict()

    fit_quietly(trainer(tmp_path / "2", cb, epochs=2), module, loader16(256))
    after = weights(module)
    assert int((after[dropped] != 0).sum()) == 0  # 1,780 came back before the fix
    rb = cb.ctrl.algorithms[0]
    assert not rb.frozen and rb.sparsity() == pytest.approx(float((after == 0).float().mean()))
    # the fixed zeros travel in the controller state
    rb.load_state_dict(state["state"]["rb_sparsity"])
    assert rb.sparsity() == pytest.approx(float(dropped.float().mean()))


# --- 2. manual optimization ---------------------------------------------------------------------


class ManualLit(LitClassifier):
    """A module that optimizes by hand, with ``manual_backward`` or a plain ``backward``."""

    def __init__(self, plain_backward: bool = False, **kw: Any) -> None:
        super().__init__(optimizer=torch.optim.Adam, lr=1e-2, **kw)
        self.automatic_optimization = False
        self.plain_backward = plain_backward

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        opt = self.optimizers()
        opt.zero_grad()
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        if self.plain_backward:
            loss.backward()
        else:
            self.manual_backward(loss)
        opt.step()


def test_manual_optimization_backpropagates_the_compression_loss(tmp_path: Path) -> None:
    sparsity = {}
    for module in (ManualLit(), LitClassifier(optimizer=torch.optim.Adam, lr=1e-2)):
        torch.manual_seed(0)
        module.model.load_state_dict(LitClassifier().model.state_dict())
        cb = CompressionCallback(RB, model_attr="model", verbose=False)
        fit_quietly(trainer(tmp_path, cb, epochs=2), module, loader16(256))
        sparsity[module.automatic_optimization] = cb.ctrl.algorithms[0].sparsity()
    # the same training either way; 0.0000 by hand before (the loss reached no backward)
    assert sparsity[False] == sparsity[True] > 0.25


def test_a_compression_loss_no_backward_saw_is_named(tmp_path: Path) -> None:
    cb = CompressionCallback(RB, model_attr="model", verbose=False)
    with pytest.warns(UserWarning, match=r"compression loss \(ctrl.loss\(\)\) never reached a "):
        trainer(tmp_path, cb, epochs=1).fit(ManualLit(plain_backward=True), loader16())
    assert "never reached a backward pass" in cb.shortfall[0]
    assert not any("compression_lr_multiplier" in line for line in cb.shortfall)


# --- 3. two optimizers with a per-step schedule -------------------------------------------------


class TwoOptimizers(LitClassifier):
    """Two optimizers stepped in every manual ``training_step``: Lightning counts two steps."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        for opt in self.optimizers():
            opt.zero_grad()
            self.manual_backward(nn.functional.cross_entropy(self(x), y))
            opt.step()

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        first, rest = self.model[0].parameters(), list(self.model[1:].parameters())
        return torch.optim.SGD(first, lr=0.05), torch.optim.SGD(rest, lr=0.05)


def test_two_optimizers_step_a_per_step_schedule_once_per_batch(tmp_path: Path) -> None:
    recipe = magnitude(
        sparsity_target=0.5,
        sparsity_target_epoch=2,
        update_per_optimizer_step=True,
        power=1,
        concave=False,
    )
    cb = CompressionCallback(recipe, model_attr="model", verbose=False)
    module = TwoOptimizers()
    fit = trainer(tmp_path, cb, epochs=2)
    fit_quietly(fit, module, loader16())
    assert fit.global_step == 2 * 16  # Lightning's count
    assert cb.ctrl.scheduler.global_step == 16
    assert cb.ctrl.scheduler.inferred_steps_per_epoch == 8
    assert cb.ctrl.compression_level == pytest.approx(0.5 * 15 / 16)


# --- 4. another pruner on the same weights ------------------------------------------------------


def test_lightning_model_pruning_on_the_same_weights_is_named(tmp_path: Path) -> None:
    from pytorch_lightning.callbacks import ModelPruning

    cb = CompressionCallback(magnitude(sparsity_init=0.3), model_attr="model", verbose=False)
    pruning = ModelPruning("l1_unstructured", amount=0.5, verbose=0)
    module = LitClassifier()
    with pytest.raises(
        CompressError,
        match=r"layer '0': its weight is masked by this library and was then taken over by "
        r"torch.nn.utils.prune \(Lightning's ModelPruning",
    ):  # KeyError: 'weight' at the first forward of epoch 1 before
        fit_quietly(trainer(tmp_path, cb, pruning, epochs=2), module, loader16())
    assert cb.ctrl.scheduler.epoch == 0  # said before epoch 1 trains


class Half(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w / 2


def test_a_parametrization_added_between_fits_is_named(tmp_path: Path) -> None:
    cb = CompressionCallback(magnitude(sparsity_init=0.3), model_attr="model", verbose=False)
    module = LitClassifier()
    fit_quietly(trainer(tmp_path, cb, epochs=1), module, loader16())
    parametrize.register_parametrization(module.model[2], "weight", Half())
    with pytest.raises(CompressError, match=r"layer '2': .* taken over by a parametrization"):
        fit_quietly(trainer(tmp_path, cb, epochs=2), module, loader16())
    # a forward pass outside the trainer says the same (it was KeyError: 'weight')
    with pytest.raises(CompressError, match=r"Linear: its weight .* by a parametrization"):
        module(torch.zeros(1, 16))


# --- 5. a compiled network without model_attr ---------------------------------------------------


class CompiledLit(LitClassifier):
    def __init__(self) -> None:
        super().__init__(model=torch.compile(lenet(16), backend="eager"))


def test_a_compiled_network_without_model_attr_exports_and_checkpoints_plain_names(
    tmp_path: Path,
) -> None:
    from pytorch_lightning.callbacks import ModelCheckpoint

    last = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last")
    cb = CompressionCallback(
        magnitude(sparsity_init=0.5),
        verbose=False,
        export_dir=tmp_path / "out",
        export_formats=["sparse", "pt2"],
    )
    module = CompiledLit()
    fit_quietly(
        trainer(tmp_path, cb, last, epochs=1, enable_checkpointing=True), module, loader16()
    )
    x = torch.randn(5, 16)
    module.eval()
    want = module(x)
    # the plain LightningModule takes the export and the checkpoint (model._orig_mod.0.weight
    # before: "the file is of a different model: keys missing")
    plain = compress.load_sparse(cb.exported["sparse"], LitClassifier()).eval()
    assert torch.equal(plain(x), want)
    program = torch.export.load(str(cb.exported["pt2"]))
    assert torch.allclose(program.module()(x), want, atol=1e-6)
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert not any("_orig_mod" in k for k in ckpt["state_dict"])
    assert torch.equal(LitClassifier.load_from_checkpoint(last.best_model_path).eval()(x), want)
    # and the compiled module resumes from it
    again = CompressionCallback(magnitude(sparsity_init=0.5), verbose=False)
    resumed = CompiledLit()
    fit_quietly(
        trainer(tmp_path / "2", again, epochs=2),
        resumed,
        loader16(),
        ckpt_path=last.best_model_path,
    )
    assert again.ctrl.scheduler.global_step == 16


# --- 6. statistics of combined recipes ----------------------------------------------------------


def _csv_columns(root: Path) -> dict[str, list[float]]:
    import csv

    (path,) = root.rglob("metrics.csv")
    rows = list(csv.DictReader(path.open()))
    return {k: [float(r[k]) for r in rows if r[k]] for k in rows[0]}


@pytest.mark.parametrize("order", ["filter_pruning+rb", "rb+filter_pruning"])
def test_filter_pruning_with_rb_counts_the_model_params_not_the_logits(
    order: str, tmp_path: Path
) -> None:
    from pytorch_lightning.loggers import CSVLogger
    from test_resume import FILTER, RB, Lit, resumable_loader

    section = [FILTER, RB] if order == "filter_pruning+rb" else [RB, FILTER]
    cb = CompressionCallback({"compression": section}, model_attr="model", verbose=False)
    module = Lit()
    full = sum(p.numel() for p in module.model.parameters())
    logger = CSVLogger(tmp_path, name="csv")
    fit_quietly(trainer(tmp_path, cb, epochs=2, logger=logger), module, resumable_loader())
    (fp,) = [a for a in cb.ctrl.statistics().to_dict()["algorithms"] if "summary" in a]
    (params,) = [r for r in fp["summary"] if r[""] == "params"]
    stripped = sum(p.numel() for p in cb.ctrl.strip().parameters())
    # 104,526 against 56,714 on the CNN before: the RB logits counted as the model's
    assert params["full"] == full
    assert params["current"] == stripped < full
    logged = _csv_columns(tmp_path / "csv")
    assert logged["compression/filter_pruning/params"][-1] == stripped
    assert logged["compression/filter_pruning/params_full"][-1] == full


def test_distillation_logs_no_level_of_its_own(tmp_path: Path) -> None:
    from pytorch_lightning.loggers import CSVLogger

    recipe = magnitude(sparsity_init=0.3)
    recipe["compression"] = [
        recipe["compression"],
        {"algorithm": "knowledge_distillation", "type": "softmax"},
    ]
    cb = CompressionCallback(recipe, model_attr="model", verbose=False)
    logger = CSVLogger(tmp_path, name="csv")
    fit = trainer(tmp_path, cb, epochs=1, logger=logger, log_every_n_steps=1)
    fit_quietly(fit, LitClassifier(), loader16())
    logged = _csv_columns(tmp_path / "csv")
    assert "compression/knowledge_distillation/level" not in logged  # a constant 0 before
    assert logged["compression/level"][-1] == pytest.approx(0.3)  # magnitude's, not 0


# --- 8. messages that are true ------------------------------------------------------------------


def test_compress_export_of_a_weights_only_checkpoint_says_what_lightning_left_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pytorch_lightning.callbacks import ModelCheckpoint

    from compress.cli import main

    weights_only = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="w", save_weights_only=True)
    cb = CompressionCallback(magnitude(sparsity_init=0.5), model_attr="model", verbose=False)
    fit = trainer(tmp_path, cb, weights_only, epochs=1, enable_checkpointing=True)
    fit_quietly(fit, LitClassifier(), loader16())
    args = ["export", str(tmp_path / "ckpt" / "w.ckpt"), "--model", "conftest:lenet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    # "not a checkpoint written with CompressionCallback" before: it was
    assert "a weights-only checkpoint (ModelCheckpoint(save_weights_only=True))" in err
    assert "pass a checkpoint written without save_weights_only" in err


def test_an_early_exit_run_that_misses_its_budget_warns(tmp_path: Path) -> None:
    from test_accuracy_aware import LevelMetric, lit_recipe

    cb = CompressionCallback(
        lit_recipe("early_exit", 0.4, maximal_relative_accuracy_degradation=1.0),
        monitor="val_acc",
        model_attr="model",
        verbose=False,
        reference_metric=2.0,  # out of reach: no epoch is within 1% of it
    )
    with pytest.warns(
        UserWarning,
        match=r"accuracy-aware training \(early_exit\): no epoch met the budget at the recipe's "
        r"level \(val_acc within 1\.9800, reference 2\.0000; the last epoch: level 0\.4000",
    ):  # an INFO line only before
        trainer(tmp_path, cb, epochs=4).fit(LevelMetric(), loader16(16, 8), loader16(8, 8))


@pytest.mark.slow  # two processes: ~25 s
def test_epoch_metrics_under_ddp_ask_for_no_sync_dist(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from test_ddp import check_ranks, fit_ddp
    from test_resume import MAGNITUDE

    fit_ddp(tmp_path, MAGNITUDE)
    check_ranks(tmp_path, MAGNITUDE)
    # six "It is recommended to use `self.log('compression/...', ..., sync_dist=True)`" before
    assert "sync_dist=True" not in capfd.readouterr().err
