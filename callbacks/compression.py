"""``CompressionCallback``: all the Lightning glue. The user's LightningModule is unchanged.

Example:
    trainer = pl.Trainer(callbacks=[CompressionCallback("configs/magnitude_sparsity.json",
                                                        export_dir="exports/")])
    trainer.fit(lit_module, datamodule)
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import FSDPStrategy
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import nn

import compress
from callbacks import accuracy_aware as aa_glue
from callbacks.batches import calibrate, first_batch_inputs
from callbacks.checkpoint_state import (
    check_masked_values,
    fold_in_place,
    masked_values,
    masks_may_move,
    report_masked_weights,
    restore_masked_values,
    unsaved_sharded_parameters,
)
from callbacks.run_report import check_finite_weights, layer_metrics, shortfall
from compress import accuracy_aware, distributed, masks
from compress.controller import (
    FSDP1_REFUSED,
    CompressionController,
    compact_state,
    expand_state,
)
from compress.deploy.export import FORMATS
from compress.deploy.files import check_loaded, safe_load
from compress.errors import CompressError, ConfigError
from compress.pruning import latency_widths
from compress.recipe import rules
from compress.recipe.config import Config, load_config

if TYPE_CHECKING:
    _Callback = pl.Callback
else:
    try:  # one class for both namespaces: `lightning.pytorch` checks its own Callback base
        from lightning.pytorch import Callback as _LightningCallback

        class _Callback(pl.Callback, _LightningCallback):
            pass

    except ImportError:  # `lightning` is optional
        _Callback = pl.Callback


def _overrides_configure_model(pl_module: pl.LightningModule) -> bool:
    """Whether the module's class defines ``configure_model`` itself, in either namespace.

    Lightning's ``is_overridden`` expects the module to derive from its own namespace's
    LightningModule (``lightning.pytorch`` and ``pytorch_lightning`` are distinct classes).
    """
    for cls in type(pl_module).__mro__:
        if "configure_model" in vars(cls):
            return cls.__module__.split(".")[0] not in ("lightning", "pytorch_lightning")
    return False


class CompressionCallback(_Callback):
    """Compresses the LightningModule (or its ``model_attr`` submodule) while it trains.

    - ``setup``: builds the controller (right after ``configure_model`` when the module
      overrides it, so that weights sharded there get sharded masks). Example inputs come from
      ``example_input_array``, else the recipe's ``input_info``, else the first training batch.
    - Steps the scheduler at every epoch start and after every batch that stepped an optimizer
      (so gradient accumulation counts once per optimizer step, and two optimizers stepped in
      one manual ``training_step`` count once), and adds ``ctrl.loss()`` to the loss that
      ``training_step`` returns, or under manual optimization to its first ``manual_backward``.
    - Logs ``compression/level`` on the progress bar and per-layer sparsity at epoch end.
    - Checkpoints hold, under ``state_dict``, the masked weights (the model that computes), so
      ``MyLit.load_from_checkpoint(path)`` is the compressed model without this library. The
      callback's own entry holds the controller state (masks packed to bits) and, while masks
      may still move, the stored values of masked-out weights, so resuming is bitwise exact.
    - At fit end the module's weights become the masked ones (the module is the compressed
      model) and, on rank zero, the final or the best checkpointed model is exported to
      ``export_dir``; a run that ends before the recipe's target warns. ``fast_dev_run`` and
      fits without an optimizer step export nothing.
    - A second ``fit`` with the same callback continues the schedule where it stopped.

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
        export_from: ``"final"`` (the state at fit end) or ``"best"`` (the best checkpoint of
            the trainer's ``ModelCheckpoint``, by its ``monitor``).
        accept_new_teacher: resume (``ckpt_path``) with a ``knowledge_distillation`` teacher other
            than the one the checkpoint's run started with (by default refused: the checkpoint
            keeps a digest of the teacher's weights); later checkpoints keep the new one's.
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
        export_from: Literal["final", "best"] = "final",
        accept_new_teacher: bool = False,
    ) -> None:
        self.config = load_config(recipe)
        self.monitor, self.teacher = monitor, teacher
        self.accept_new_teacher = accept_new_teacher
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
        if "openvino" in export_formats:  # said now, not after the training
            from compress.deploy.openvino_file import openvino_module

            openvino_module()
        self.export_dir = Path(export_dir) if export_dir is not None else None
        self.export_formats = tuple(export_formats)
        self.model_attr = model_attr
        self.export_name = export_name
        self.verbose = verbose
        if export_from not in ("final", "best"):
            raise ConfigError(f"export_from: got {export_from!r}; one of 'final', 'best'")
        self.export_from = export_from
        self.ctrl: CompressionController | None = None
        self.exported: dict[str, Path] = {}
        self.shortfall: list[str] = []  # what fell short of the recipe's targets at fit end
        self._pending_state: dict[str, Any] | None = None
        # epochs and optimizer steps of earlier fits, so that a second fit continues
        self._epoch_offset = 0
        self._step_offset = 0
        self._fit_start_step = 0
        self._batch_start_step = 0  # trainer.global_step when the current batch started
        self._key_prefix = ""  # of the compressed network in the LightningModule's state_dict
        self._strict_loading: bool | None = None  # the module's, while a restore is relaxed
        self._loss_feed: _LossFeed | None = None
        self._fit_start_seen = 0  # backward passes that saw the compression loss, at fit start

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
        # torch.compile(net) wraps the network: compress and export it under its plain names
        # (the compiled wrapper calls it, hooks included).
        inner = getattr(target, "_orig_mod", None)
        return inner if isinstance(inner, nn.Module) else target

    def _prefix(self, pl_module: pl.LightningModule) -> str:
        """The target's key prefix in the checkpoints' state_dict (plain names)."""
        target = self._target(pl_module)
        for name, module in pl_module.named_modules():
            if module is target:
                return plain_key(f"{name}.") if name else ""
        raise AssertionError("the target is a submodule")

    def _example_inputs(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        example = pl_module.example_input_array
        if example is not None:
            return example
        recipe_inputs = self.config.example_inputs()
        if recipe_inputs is not None:
            return recipe_inputs
        return first_batch_inputs(trainer, self._target(pl_module))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if isinstance(trainer.strategy, FSDPStrategy):  # wraps the model after this hook
            raise CompressError(
                f"strategy: {FSDP1_REFUSED}use ModelParallelStrategy and fully_shard the network "
                "in the LightningModule's configure_model (docs/sharded.md)"
            )
        if self.ctrl is not None:
            # A second fit: the new trainer counts from zero, the schedule continues.
            self._epoch_offset = max(self.ctrl.scheduler.epoch + 1, 0)
            self._step_offset = self.ctrl.scheduler.global_step
            # An epoch that max_steps or a stop cut short is over, not uneven.
            self.ctrl.scheduler.step_in_epoch = 0
            return
        if _overrides_configure_model(pl_module):
            # configure_model may build or shard (fully_shard) the network: the masks are made
            # after it, like the weights they cover, and before configure_optimizers (RB's
            # logits are parameters). Lightning has no callback hook in between.
            configure = pl_module.configure_model

            @functools.wraps(configure)
            def configure_model() -> None:
                configure()
                del pl_module.configure_model  # the class's own method again
                self._build(trainer, pl_module)

            pl_module.configure_model = configure_model  # type: ignore[method-assign]
            return
        self._build(trainer, pl_module)

    def _build(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Builds the controller for the target network (once per callback)."""
        inputs = self._example_inputs(trainer, pl_module)
        if isinstance(inputs, torch.Tensor):
            inputs = (inputs,)
        target = self._target(pl_module)
        epochs = trainer.max_epochs  # -1 with only max_steps: unknown
        if epochs != self.config.data.get("epochs"):  # the recipe's was checked when loaded
            rules.check_run_epochs(self.config.algorithms, epochs)
        self.ctrl, _ = compress.create_compressed_model(
            target, self.config, inputs, teacher=self.teacher
        )
        if self._aa is not None:
            self._aa.attach(self.ctrl)
        self._key_prefix = self._prefix(pl_module)
        compiled = _compiled_names(pl_module)
        if compiled:  # checkpoints hold plain names (on_save_checkpoint); they load back
            pl_module.register_load_state_dict_pre_hook(functools.partial(_to_compiled, compiled))
        calibrate(self.ctrl, trainer, target)
        for _, module, _, _ in masks.iter_masked(target):
            report_masked_weights(module)
        # torch.compile does not guard on module hooks by default: a graph traced without the
        # masking hooks (another instance of the class, or this one before setup) would be
        # reused, masks silently ignored. With the guards a masked module gets its own graph;
        # graphs traced before without them are dropped.
        if torch._dynamo.config.skip_nnmodule_hook_guards:
            torch._dynamo.config.skip_nnmodule_hook_guards = False
            torch._dynamo.reset()
        if self._pending_state is not None:
            self.load_state_dict(self._pending_state)
            self._pending_state = None
        if any(a.loss() is not None for a in self.ctrl.algorithms):
            self._loss_feed = _LossFeed(pl_module, self.ctrl)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # ModelParallelStrategy restores a checkpoint after this hook, a full one parameter by
        # parameter: RB's logits, left out of the state_dict (this callback's state holds them),
        # would stop a strict restore. Relaxed for that restore only; on_train_start undoes it.
        if self.ctrl is not None and pl_module.strict_loading:
            if unsaved_sharded_parameters(self.ctrl.model):
                self._strict_loading, pl_module.strict_loading = True, False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.ctrl is not None
        if self._strict_loading is not None:
            pl_module.strict_loading, self._strict_loading = self._strict_loading, None
        if self._aa is not None:
            aa_glue.check_reference(self._aa)
        masks.check_owned(self.ctrl.model)
        self._fit_start_step = self.ctrl.scheduler.global_step
        if self._loss_feed is not None:
            self._loss_feed.seen = self._loss_feed.missed = 0
        scheduler = self.ctrl.scheduler
        batches = trainer.num_training_batches
        if (
            scheduler.infer_steps_per_epoch
            and scheduler.inferred_steps_per_epoch is None
            and isinstance(batches, int)
            and batches > 0
        ):
            # Lightning steps the optimizer at an epoch's last batch even mid-accumulation.
            scheduler.inferred_steps_per_epoch = math.ceil(
                batches / trainer.accumulate_grad_batches
            )
            # known before the first epoch: a per-step schedule starts at epoch 0, as NNCF's
            # does with params.steps_per_epoch (without it NNCF measures the first epoch)
            scheduler.length_known = scheduler.epoch < 0

    # --- scheduling and logging --------------------------------------------------------------

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.ctrl is not None
        # another pruner (Lightning's ModelPruning prunes at epoch ends) on the same weights
        masks.check_owned(self.ctrl.model)
        self._sync_epoch(trainer)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Lightning does not call on_train_epoch_start for the first epoch after resuming from a
        # checkpoint saved mid-epoch or at an epoch's last batch; the first batch catches up.
        self._sync_epoch(trainer)
        self._batch_start_step = trainer.global_step

    def _sync_epoch(self, trainer: pl.Trainer) -> None:
        assert self.ctrl is not None
        # Resuming mid-epoch re-enters the same epoch: the scheduler is already there.
        epoch = trainer.current_epoch + self._epoch_offset
        if self.ctrl.scheduler.epoch != epoch:
            self.ctrl.scheduler.epoch_step(epoch)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        assert self.ctrl is not None
        # One schedule step per batch that stepped an optimizer (global_step counts them), so
        # accumulation and skipped steps are respected, and a manual training_step stepping
        # two optimizers (Lightning counts two) still counts once, as the epoch's length does.
        if trainer.global_step > self._batch_start_step:
            self.ctrl.scheduler.step()
        check_finite_weights(self.ctrl, trainer.current_epoch, trainer.global_step)
        leveled = [a for a in self.ctrl.algorithms if a.has_level]  # not distillation's
        if leveled:
            level = self.ctrl.compression_level
            pl_module.log("compression/level", level, prog_bar=True, on_step=True)
        if len(leveled) > 1:
            for algo in leveled:
                pl_module.log(f"compression/{algo.name}/level", algo.level, on_step=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.ctrl is not None
        # identical on every rank: synced with max, which is exact, so Lightning does not ask
        # for sync_dist under DDP
        pl_module.log_dict(
            layer_metrics(self.ctrl), on_step=False, on_epoch=True, sync_dist=True, reduce_fx="max"
        )

    # --- checkpoints ---------------------------------------------------------------------------

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # torch.compile's wrapper adds `_orig_mod.` to its network's keys: the checkpoint holds
        # the plain names, which load into the plain network and LightningModule
        weights = checkpoint.get("state_dict")
        if isinstance(weights, dict) and any("_orig_mod." in k for k in weights):
            checkpoint["state_dict"] = {plain_key(k): v for k, v in weights.items()}
        optimizers = checkpoint.get("optimizer_states") or []
        if any(isinstance(o, Mapping) and not o.get("state") for o in optimizers) and any(
            distributed.is_sharded(p) for p in pl_module.parameters()
        ):
            rank_zero_warn(
                f"checkpoint at epoch {trainer.current_epoch}: the optimizer has not stepped yet "
                "(SCOP's knockoff phase with scop_freeze_weights freezes every weight), and "
                "ModelParallelStrategy cannot resume a checkpoint with an empty optimizer state "
                "(lightning 2.6.6: IndexError in _rekey_optimizer_state_if_needed for a full "
                "checkpoint, 'Missing key in checkpoint state_dict' for a distributed one); "
                "resume from a checkpoint saved after the knockoff phase, or set "
                "scop_freeze_weights to false"
            )

    def state_dict(self) -> dict[str, Any]:
        """The controller state (masks as bits), the stored values of masked-out weights while
        they can still matter, and what ``compress export`` needs to rebuild the model."""
        if self.ctrl is None:
            return {}
        out: dict[str, Any] = {
            # sharded tensors whole on rank 0, which writes the checkpoint (Lightning's
            # ModelParallelStrategy writes rank 0's entry only)
            "controller": compact_state(self.ctrl.state_dict(rank_zero_only=True)),
            "recipe": json.loads(json.dumps(self.config.data, default=dict)),
            "model_attr": self.model_attr,
            "prefix": self._key_prefix,
            "inputs": [
                [list(t.shape), str(t.dtype).removeprefix("torch.")]
                for t in self.ctrl.example_inputs or ()
            ],
            "offsets": [self._epoch_offset, self._step_offset],
        }
        if masks_may_move(self.ctrl):
            out["masked_values"] = masked_values(self.ctrl.model)
        if self._aa is not None:
            out["accuracy_aware"] = self._aa.state_dict()
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Checks the whole entry (offsets, accuracy-aware state, masked values against the
        model, the controller state) before applying any of it."""
        check_loaded(state_dict, "checkpoint: the CompressionCallback entry")
        offsets = state_dict.get("offsets", [0, 0])
        if not (
            isinstance(offsets, (list, tuple))
            and len(offsets) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in offsets)
        ):
            raise CompressError(
                f"checkpoint: offsets {str(offsets)[:60]} are not two counts (epoch, step)"
            )
        aa_state = state_dict.get("accuracy_aware") if self._aa is not None else None
        if aa_state is not None:
            accuracy_aware.check_state(aa_state)
        state = state_dict.get("controller")
        if state is not None and self.ctrl is None:
            self._pending_state = state_dict
            return
        if state is not None:
            assert self.ctrl is not None
            check_masked_values(self.ctrl.model, state_dict.get("masked_values", {}))
            self.ctrl.load_state_dict(  # checks all, then applies
                expand_state(state), accept_new_teacher=self.accept_new_teacher
            )
            restore_masked_values(self.ctrl.model, state_dict.get("masked_values", {}))
            self._epoch_offset, self._step_offset = offsets
        if aa_state is not None:
            assert self._aa is not None
            self._aa.load_state_dict(aa_state)

    # --- accuracy-aware training ---------------------------------------------------------------

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._aa is not None and self.monitor is not None:
            fitting = trainer.state.fn == "fit" and self.ctrl is not None
            aa_glue.on_validation_end(self._aa, trainer, self.monitor, fitting)

    # --- fit end ---------------------------------------------------------------------------------

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.ctrl is not None
        # The module becomes the compressed model: what validate/test/predict, state_dict and
        # the export see, and where a second fit continues (pruned weights stay at zero, also
        # those RB's learned masks dropped).
        self.ctrl.fix_dropped()
        fold_in_place(self.ctrl.model)
        trained = self.ctrl.scheduler.global_step > self._fit_start_step
        dev_run = bool(getattr(trainer, "fast_dev_run", False))
        feed = self._loss_feed
        unfed = feed is not None and feed.missed > 0 and feed.seen == 0
        self.shortfall = [] if dev_run or not trained else shortfall(self.ctrl, loss_fed=not unfed)
        if unfed:
            self.shortfall.insert(0, _UNFED)
        unmet = None
        if self._aa is not None and self.monitor is not None and trained and not dev_run:
            unmet = aa_glue.unmet_budget(self._aa, self.monitor)
        if unmet is not None:
            self.shortfall.append(unmet)
        if self.verbose:
            rank_zero_info("\n".join([str(self.ctrl.statistics()), *self.shortfall]))
        for line in self.shortfall:
            rank_zero_warn(line)
        sharded = any(distributed.is_sharded(p) for p in self.ctrl.model.parameters())
        if sharded and self.export_dir is not None and self.export_from == "best":
            raise CompressError(
                "export_from='best' with a sharded model (fully_shard): the best checkpoint "
                "is not loaded back into sharded weights here; use export_from='final', or "
                "`compress export CKPT --model ...` on the best full checkpoint afterwards"
            )
        exporting = self.export_dir is not None and trained and not dev_run
        # a sharded model is gathered whole once, on rank 0; every rank takes part
        source = distributed.unsharded_copy(self.ctrl.model) if sharded and exporting else None
        if self.export_dir is None or not trainer.is_global_zero:
            return
        if dev_run or not trained:
            why = "fast_dev_run" if dev_run else "no optimizer step in this fit"
            rank_zero_info(f"compression: nothing exported ({why})")
            return
        best = getattr(trainer.checkpoint_callback, "best_model_path", "")
        if self.export_from == "best" and not best:
            rank_zero_warn(
                "compression: export_from='best' but no checkpoint was written (add a "
                "ModelCheckpoint with a monitor); exported the final state"
            )
        if self.export_from == "best" and best:
            with self._checkpointed(pl_module, Path(best)):
                self._export()
        else:
            self._export(source)
        rank_zero_info(f"compression: exported {', '.join(str(p) for p in self.exported.values())}")

    def _export(self, source: nn.Module | None = None) -> None:
        assert self.ctrl is not None and self.export_dir is not None
        plain = _uncompiled(self.ctrl.strip(source=source))
        inputs = self.ctrl.example_inputs
        if inputs is not None:
            device = next(plain.parameters()).device
            inputs = tuple(t.to(device) for t in inputs)
        self.exported = compress.export(
            plain, self.export_dir / self.export_name, self.export_formats, example_inputs=inputs
        )
        report = getattr(plain, "compress_latency_table", None)
        if report is not None:  # pruning_latency_target: what was asked, predicted, measured
            rank_zero_info(f"compression: latency: {latency_widths.speedup_line(report)}")

    @contextlib.contextmanager
    def _checkpointed(self, pl_module: pl.LightningModule, path: Path) -> Iterator[None]:
        """The model and masks of checkpoint ``path`` for the duration of the block."""
        assert self.ctrl is not None
        target = self._target(pl_module)
        tensors = dict(itertools.chain(target.named_parameters(), target.named_buffers()))
        saved = {name: t.detach().clone() for name, t in tensors.items()}
        saved_ctrl = self.ctrl.state_dict()
        checkpoint = safe_load(path)  # never unpickles objects: a swapped file runs no code
        entry = checkpoint.get("callbacks", {}).get(self.state_key, {})
        if "controller" not in entry:
            raise CompressError(f"{path}: no {self.state_key} entry; cannot export it")
        prefix = self._key_prefix
        weights = checkpoint["state_dict"]
        target.load_state_dict(
            {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        )
        # a checkpoint of this run: its teacher is this one (or one replaced on purpose)
        self.ctrl.load_state_dict(expand_state(entry["controller"]), accept_new_teacher=True)
        try:
            yield
        finally:
            self.ctrl.load_state_dict(saved_ctrl, accept_new_teacher=True)
            with torch.no_grad():
                for name, t in tensors.items():
                    t.copy_(saved[name])


def plain_key(key: str) -> str:
    """A state_dict key without the ``_orig_mod.`` that ``torch.compile``'s wrapper adds."""
    return key.replace("._orig_mod.", ".").removeprefix("_orig_mod.")


def _compiled_names(model: nn.Module) -> list[str]:
    """The plain-name prefixes (``"model."``) of the compiled submodules of ``model``."""
    return [
        plain_key(f"{name}.")
        for name, module in model.named_modules()
        if name and isinstance(getattr(module, "_orig_mod", None), nn.Module)
    ]


def _to_compiled(
    compiled: list[str], module: nn.Module, state: dict[str, Any], prefix: str, *args: Any
) -> None:
    """load_state_dict pre-hook: plain keys of a compiled submodule get back their
    ``_orig_mod.``, so the checkpoints written with plain names load (a resume)."""
    for key in [k for k in state if k.startswith(prefix) and "_orig_mod." not in k]:
        rest = key[len(prefix) :]
        for name in compiled:
            if rest.startswith(name):
                state[f"{prefix}{name}_orig_mod.{rest[len(name) :]}"] = state.pop(key)
                break


def _uncompiled(model: nn.Module) -> nn.Module:
    """``model`` (a stripped copy) with every compiled submodule replaced by the network it
    compiles, so that exports hold plain names and trace the plain network."""
    inner = getattr(model, "_orig_mod", None)
    if isinstance(inner, nn.Module):
        return _uncompiled(inner)
    for name, child in list(model.named_children()):
        plain = _uncompiled(child)
        if plain is not child:
            setattr(model, name, plain)
    return model


_UNFED = (
    "compression: the recipe's compression loss (ctrl.loss()) never reached a backward pass in "
    "this fit, so learned masks (RB) did not learn their sparsity: under manual optimization "
    "the callback adds it to the first self.manual_backward(loss) of each training_step; call "
    "self.manual_backward(loss) instead of loss.backward(), or add the callback's ctrl.loss() "
    "to the loss you backpropagate"
)


class _LossFeed:
    """Adds ``ctrl.loss()`` to the loss Lightning backpropagates, without changing the class:
    to what ``training_step`` returns under automatic optimization, and to the first
    ``manual_backward`` of each ``training_step`` under manual optimization. Counts the
    backward passes that saw it."""

    def __init__(self, pl_module: pl.LightningModule, ctrl: CompressionController) -> None:
        self.ctrl, self.module = ctrl, pl_module
        self.seen = 0  # backward passes (or returned losses) that held the compression loss
        self.missed = 0  # manual training steps that had a compression loss and no backward
        self.due = False  # a manual training_step runs and has not added the loss yet
        step, backward = pl_module.training_step, pl_module.manual_backward

        @functools.wraps(step)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            if not pl_module.automatic_optimization:
                self.due = True
                try:
                    return step(*args, **kwargs)
                finally:
                    if self.due and any(a.loss() is not None for a in ctrl.algorithms):
                        self.missed += 1
                    self.due = False
            return self._add(step(*args, **kwargs))

        @functools.wraps(backward)
        def manual_backward(loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
            if self.due:
                self.due = False
                loss = self._add(loss)
            backward(loss, *args, **kwargs)

        pl_module.training_step = training_step  # type: ignore[method-assign]
        pl_module.manual_backward = manual_backward  # type: ignore[method-assign]

    def _add(self, out: Any) -> Any:
        extra = self.ctrl.loss()
        if isinstance(out, torch.Tensor):
            out = out + extra.to(out.device)
        elif isinstance(out, Mapping) and "loss" in out:
            out = {**out, "loss": out["loss"] + extra.to(out["loss"].device)}
        else:  # None skips the step: nothing to add to
            return out
        self.seen += 1
        self.module.log("compression/loss", extra.detach(), on_step=True)
        return out
