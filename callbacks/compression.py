"""``CompressionCallback``: all the Lightning glue. The user's LightningModule is unchanged.

Example:
    trainer = pl.Trainer(callbacks=[CompressionCallback("configs/magnitude_sparsity.json",
                                                        export_dir="exports/")])
    trainer.fit(lit_module, datamodule)
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import nn

import compress
from callbacks import accuracy_aware as aa_glue
from compress import accuracy_aware, masks
from compress.controller import CompressionController
from compress.deploy.export import FORMATS
from compress.errors import CompressError, ConfigError
from compress.recipe.config import Config, load_config


class CompressionCallback(pl.Callback):
    """Compresses the LightningModule (or its ``model_attr`` submodule) while it trains.

    - ``setup``: builds the controller. Example inputs come from ``example_input_array``, else
      the recipe's ``input_info``, else the first training batch.
    - Steps the scheduler at every epoch start and after every optimizer step (so gradient
      accumulation counts once per optimizer step), and adds ``ctrl.loss()`` to the loss that
      ``training_step`` returns.
    - Logs ``compression/level`` on the progress bar and per-layer sparsity at epoch end.
    - Saves the controller state in its own checkpoint entry and restores it on resume.
    - At fit end, on rank zero, strips the model and exports it to ``export_dir``.

    Args:
        recipe: a recipe path, dict or ``Config``.
        export_dir: where to export at fit end; nothing is exported when None.
        export_formats: formats for ``compress.export``.
        model_attr: name of the submodule to compress (e.g. ``"model"``); the whole
            LightningModule when None. Scopes in the recipe are relative to it.
        export_name: file name prefix of the exports.
        verbose: print the statistics table at fit end.
        monitor: the logged validation metric accuracy-aware training watches (required when
            the recipe has ``accuracy_aware_training``); ``mode``: "max" or "min" for it.
        teacher: the model ``knowledge_distillation`` distils from (default: a frozen copy of
            the model as it was when compression started).
        reference_metric: the uncompressed model's ``monitor``; by default recorded from a
            ``trainer.validate`` run before ``fit``.
    """

    def __init__(
        self,
        recipe: str | Path | Mapping[str, Any] | Config,
        *,
        export_dir: str | Path | None = None,
        export_formats: Sequence[str] = ("sparse",),
        model_attr: str | None = None,
        export_name: str = "model",
        verbose: bool = True,
        monitor: str | None = None,
        mode: Literal["max", "min"] = "max",
        teacher: nn.Module | None = None,
        reference_metric: float | None = None,
    ) -> None:
        self.config = load_config(recipe)
        self.monitor, self.teacher = monitor, teacher
        if mode not in ("max", "min"):
            raise ConfigError(f"mode: {mode!r} is not allowed; one of 'max', 'min'")
        self._aa = accuracy_aware.from_config(self.config, mode=mode, reference=reference_metric)
        if self._aa is not None and monitor is None:
            raise ConfigError(
                "monitor: the recipe has accuracy_aware_training; name the logged validation "
                'metric it watches, e.g. CompressionCallback(recipe, monitor="val_acc")'
            )
        if isinstance(export_formats, str):
            raise ConfigError(
                f"export_formats: got the string {export_formats!r}; give a list, "
                f"e.g. [{export_formats!r}]"
            )
        unknown = [f for f in export_formats if f not in FORMATS]
        if unknown:
            raise ConfigError(f"export_formats: {unknown} not supported; one of {list(FORMATS)}")
        self.export_dir = Path(export_dir) if export_dir is not None else None
        self.export_formats = tuple(export_formats)
        self.model_attr = model_attr
        self.export_name = export_name
        self.verbose = verbose
        self.ctrl: CompressionController | None = None
        self.exported: dict[str, Path] = {}
        self._pending_state: Mapping[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return "CompressionCallback"

    # --- building ----------------------------------------------------------------------------

    def _target(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.model_attr is None:
            return pl_module
        target = getattr(pl_module, self.model_attr, None)
        if not isinstance(target, nn.Module):
            raise ConfigError(
                f"model_attr: the LightningModule has no submodule {self.model_attr!r}; "
                f"its children are {[n for n, _ in pl_module.named_children()]}"
            )
        return target

    def _example_inputs(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        example = pl_module.example_input_array
        if example is not None:
            return example
        recipe_inputs = self.config.example_inputs()
        if recipe_inputs is not None:
            return recipe_inputs
        return first_batch_inputs(trainer)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.ctrl is not None:
            return
        inputs = self._example_inputs(trainer, pl_module)
        if isinstance(inputs, torch.Tensor):
            inputs = (inputs,)
        target = self._target(pl_module)
        self.ctrl, _ = compress.create_compressed_model(
            target, self.config, inputs, teacher=self.teacher
        )
        if self._aa is not None:
            self._aa.attach(self.ctrl)
        calibrate(self.ctrl, trainer)
        if self._pending_state is not None:
            self.ctrl.load_state_dict(self._pending_state)
            self._pending_state = None
        if any(a.loss() is not None for a in self.ctrl.algorithms):
            _add_loss(pl_module, self.ctrl)

    # --- scheduling and logging --------------------------------------------------------------

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync_epoch(trainer)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Lightning does not call on_train_epoch_start for the first epoch after resuming from a
        # checkpoint saved mid-epoch or at an epoch's last batch; the first batch catches up.
        self._sync_epoch(trainer)

    def _sync_epoch(self, trainer: pl.Trainer) -> None:
        assert self.ctrl is not None
        # Resuming mid-epoch re-enters the same epoch: the scheduler is already there.
        if self.ctrl.scheduler.epoch != trainer.current_epoch:
            self.ctrl.scheduler.epoch_step(trainer.current_epoch)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        assert self.ctrl is not None
        # global_step counts optimizer steps, so accumulation and skipped steps are respected.
        while self.ctrl.scheduler.global_step < trainer.global_step:
            self.ctrl.scheduler.step()
        check_finite_weights(self.ctrl, trainer.current_epoch, trainer.global_step)
        pl_module.log("compression/level", self.ctrl.compression_level, prog_bar=True, on_step=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.ctrl is not None
        pl_module.log_dict(layer_metrics(self.ctrl), on_step=False, on_epoch=True)

    # --- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        if self.ctrl is None:
            return {}
        if self._aa is not None:
            return {"controller": self.ctrl.state_dict(), "accuracy_aware": self._aa.state_dict()}
        return {"controller": self.ctrl.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._aa is not None and "accuracy_aware" in state_dict:
            self._aa.load_state_dict(state_dict["accuracy_aware"])
        state = state_dict.get("controller")
        if state is None:
            return
        if self.ctrl is None:
            self._pending_state = state
        else:
            self.ctrl.load_state_dict(state)

    # --- accuracy-aware training ---------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._aa is not None:
            aa_glue.check_reference(self._aa)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._aa is not None and self.monitor is not None:
            fitting = trainer.state.fn == "fit" and self.ctrl is not None
            aa_glue.on_validation_end(self._aa, trainer, self.monitor, fitting)

    # --- export ----------------------------------------------------------------------------------

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.ctrl is not None
        if self.verbose:
            rank_zero_info(str(self.ctrl.statistics()))
        if self.export_dir is None or not trainer.is_global_zero:
            return
        plain = self.ctrl.strip()
        inputs = self.ctrl.example_inputs
        if inputs is not None:
            device = next(plain.parameters()).device
            inputs = tuple(t.to(device) for t in inputs)
        self.exported = compress.export(
            plain, self.export_dir / self.export_name, self.export_formats, example_inputs=inputs
        )
        rank_zero_info(f"compression: exported {', '.join(str(p) for p in self.exported.values())}")


def check_finite_weights(ctrl: CompressionController, epoch: int, step: int) -> None:
    """Names the compressed layer whose weight became NaN or Inf, at the optimizer step it
    happened (masks are recomputed only at schedule events, which may be an epoch later).
    One ``isfinite`` reduction per compressed weight."""
    seen: set[int] = set()
    for name, module, pname, _ in masks.iter_masked(ctrl.model):
        weight = module._parameters.get(pname)
        if weight is None or id(weight) in seen:
            continue
        seen.add(id(weight))
        if not bool(torch.isfinite(weight).all()):
            raise CompressError(
                f"layer {name!r}: the {pname} holds NaN or Inf after optimizer step {step} "
                f"(epoch {epoch}); lower the learning rate or check the loss"
            )


def layer_metrics(ctrl: CompressionController) -> dict[str, float]:
    """``compression/<algorithm>/<layer>/sparsity`` for every layer, plus the totals."""
    stats = ctrl.statistics().to_dict()
    out = {"compression/sparsity": float(stats["model"]["sparsity of compressed layers"])}
    for algo in stats["algorithms"]:
        for row in algo.get("layers", ()):
            if "sparsity" in row:
                out[f"compression/{algo['algorithm']}/{row['layer']}/sparsity"] = float(
                    row["sparsity"]
                )
    if "effective sparsity of compressed layers" in stats["model"]:
        eff = stats["model"]["effective sparsity of compressed layers"]
        out["compression/effective_sparsity"] = float(eff)
    return out


def first_batch_inputs(trainer: pl.Trainer) -> tuple[torch.Tensor, ...]:
    """The model inputs of the first training batch: the first element of a tuple/list batch,
    the batch itself when it is a tensor."""
    source = trainer.fit_loop._data_source  # the loader given to fit() or by the datamodule
    loader = source.dataloader()
    batch = next(iter(loader))
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return (batch[0],)
    raise ConfigError(
        "cannot take example inputs from the first batch (it is neither a tensor nor a "
        "(inputs, targets) tuple); set example_input_array on the LightningModule or "
        "input_info in the recipe"
    )


def _add_loss(pl_module: pl.LightningModule, ctrl: CompressionController) -> None:
    """Makes ``training_step`` return its loss plus ``ctrl.loss()``, without changing the class."""
    step = pl_module.training_step

    @functools.wraps(step)
    def training_step(*args: Any, **kwargs: Any) -> Any:
        out = step(*args, **kwargs)
        extra = ctrl.loss()
        pl_module.log("compression/loss", extra.detach(), on_step=True)
        if isinstance(out, torch.Tensor):
            return out + extra.to(out.device)
        if isinstance(out, Mapping) and "loss" in out:
            return {**out, "loss": out["loss"] + extra.to(out["loss"].device)}
        return out

    pl_module.training_step = training_step  # type: ignore[method-assign]


def calibrate(ctrl: CompressionController, trainer: pl.Trainer) -> None:
    """Feeds training batches to algorithms whose importance reads feature maps (filter
    pruning's ``nuclear_norm``: ``params.calibration_batches`` batches), before training."""
    for algo in ctrl.algorithms:
        if not getattr(algo, "needs_calibration", False):
            continue
        loader = trainer.fit_loop._data_source.dataloader()
        batches = itertools.islice(loader, int(algo.params["calibration_batches"]))
        algo.calibrate(b[0] if isinstance(b, (list, tuple)) else b for b in batches)  # type: ignore[attr-defined]
