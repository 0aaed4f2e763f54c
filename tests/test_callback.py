from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import LitClassifier, lenet, loader16, magnitude, quiet_trainer
from pytorch_lightning.loggers import TensorBoardLogger

import compress
from callbacks import CompressionCallback
from compress import masks


def trainer(tmp_path: Path, cb: pl.Callback, epochs: int = 3, **kw) -> pl.Trainer:  # type: ignore[no-untyped-def]
    return quiet_trainer(tmp_path, cb, epochs=epochs, devices=1, **kw)


RECIPE = magnitude(
    schedule="polynomial",
    sparsity_target=0.8,
    sparsity_target_epoch=2,
    power=1,
    concave=False,
    update_per_optimizer_step=True,
)


def test_fit_schedules_logs_to_tensorboard_and_exports(tmp_path: Path) -> None:
    cb = CompressionCallback(
        RECIPE, export_dir=tmp_path / "out", export_formats=["sparse", "pt2"], model_attr="model"
    )
    module = LitClassifier()
    keys = list(module.state_dict())
    t = trainer(tmp_path, cb, logger=TensorBoardLogger(tmp_path, name="tb"), log_every_n_steps=1)
    t.fit(module, loader16())
    assert cb.ctrl.scheduler.global_step == 24 and cb.ctrl.scheduler.inferred_steps_per_epoch == 8
    assert cb.ctrl.compression_level == pytest.approx(0.8)
    assert list(module.state_dict()) == keys
    assert t.callback_metrics["compression/level"] == pytest.approx(0.8)
    # TensorBoard event files hold the compression/ tags.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "compression/level" in tags
    assert "compression/magnitude_sparsity/2/sparsity" in tags
    assert acc.Scalars("compression/sparsity")[-1].value == pytest.approx(0.8, abs=1e-3)
    # Exports match the masked model.
    x = torch.randn(5, 16)
    module.eval()
    fresh = compress.load_sparse(cb.exported["sparse"], lenet(16))
    assert torch.equal(fresh(x), module(x))
    program = torch.export.load(str(cb.exported["pt2"]))
    assert torch.allclose(program.module()(x), module(x), atol=1e-6)


def test_gradient_accumulation_steps_once_per_optimizer_step(tmp_path: Path) -> None:
    cb = CompressionCallback(RECIPE, model_attr="model", verbose=False)
    trainer(tmp_path, cb, epochs=1, accumulate_grad_batches=4, logger=False).fit(
        LitClassifier(), loader16()
    )
    assert cb.ctrl.scheduler.global_step == 2


def test_example_inputs_from_first_batch(tmp_path: Path) -> None:
    cb = CompressionCallback(
        magnitude(sparsity_init=0.5),
        model_attr="model",
        verbose=False,
        export_dir=tmp_path / "o",
        export_formats=["pt2"],
    )
    trainer(tmp_path, cb, epochs=1, logger=False).fit(LitClassifier(with_example=False), loader16())
    assert cb.ctrl.example_inputs[0].shape == (8, 16)
    assert cb.exported["pt2"].exists()


def test_checkpoint_resume_restores_masks_and_schedule(tmp_path: Path) -> None:
    cb = CompressionCallback(RECIPE, model_attr="model", verbose=False)
    module = LitClassifier()
    trainer(tmp_path, cb, epochs=2, logger=False).fit(module, loader16())
    (ckpt,) = list(tmp_path.rglob("*.ckpt"))
    state = torch.load(ckpt, weights_only=True)
    assert "CompressionCallback" in state["callbacks"]
    # The checkpoint's model weights load into the plain class.
    plain = LitClassifier()
    plain.load_state_dict(state["state_dict"])

    cb2 = CompressionCallback(RECIPE, model_attr="model", verbose=False)
    module2 = LitClassifier()
    trainer(tmp_path / "r", cb2, epochs=2, logger=False).fit(module2, loader16(), ckpt_path=ckpt)
    assert cb2.ctrl.scheduler.state_dict() == cb.ctrl.scheduler.state_dict()
    for (_, _, _, a), (_, _, _, b) in zip(
        masks.iter_masked(module.model), masks.iter_masked(module2.model)
    ):
        assert torch.equal(a, b)


def test_bad_export_formats_fail_at_construction() -> None:
    with pytest.raises(compress.ConfigError, match="export_formats: got the string 'sparse'"):
        CompressionCallback(RECIPE, export_formats="sparse")  # type: ignore[arg-type]
    with pytest.raises(
        compress.ConfigError, match=r"model_attr: the LightningModule has no submodule 'net'"
    ):
        cb = CompressionCallback(RECIPE, model_attr="net")
        cb.setup(pl.Trainer(accelerator="cpu", logger=False), LitClassifier(), "fit")


def test_inspect_a_checkpoint_shows_the_masked_weights(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from compress.cli import main

    cb = CompressionCallback(magnitude(sparsity_init=0.7), model_attr="model", verbose=False)
    trainer(tmp_path, cb, epochs=1, logger=False).fit(LitClassifier(), loader16())
    (ckpt,) = list(tmp_path.rglob("*.ckpt"))
    assert main(["inspect", str(ckpt)]) == 0
    out = capsys.readouterr().out
    # The stored weights are dense; the report applies the checkpointed masks.
    assert "| model.0.weight | 300x16  | 4,800  |" in out
    assert "| 0.7000   |" in out
