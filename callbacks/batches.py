"""What ``CompressionCallback`` takes from the trainer's training data: the model inputs of a
batch, as example inputs for tracing and as calibration batches. No state: functions of the
trainer and the network."""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from compress.controller import CompressionController
from compress.errors import ConfigError


def batch_inputs(batch: Any, model: nn.Module) -> tuple[torch.Tensor, ...]:
    """The model inputs of one training batch: the batch itself when it is a tensor, the first
    element of a tuple/list batch, and from a dict batch (a Hugging Face tokenizer's or
    collator's) the entry named as ``model.forward``'s first parameter (``input_ids``,
    ``pixel_values``)."""
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return (batch[0],)
    if isinstance(batch, Mapping):
        params = [
            p.name
            for p in inspect.signature(model.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        if params and isinstance(batch.get(params[0]), torch.Tensor):
            return (batch[params[0]],)
        raise ConfigError(
            f"cannot take example inputs from the first batch: it is a dict with keys "
            f"{sorted(map(str, batch))}, and {type(model).__name__}.forward's first parameter "
            f"({params[0] if params else 'none'}) is not one of them; set model_attr to the "
            "network the batch feeds, or example_input_array on the LightningModule, or "
            "input_info in the recipe"
        )
    raise ConfigError(
        "cannot take example inputs from the first batch (it is neither a tensor, an "
        "(inputs, targets) tuple nor a dict); set example_input_array on the LightningModule "
        "or input_info in the recipe"
    )


def first_batch_inputs(trainer: pl.Trainer, model: nn.Module) -> tuple[torch.Tensor, ...]:
    """The model inputs of the first training batch (see :func:`batch_inputs`)."""
    source = trainer.fit_loop._data_source  # the loader given to fit() or by the datamodule
    return batch_inputs(next(iter(source.dataloader())), model)


def calibrate(ctrl: CompressionController, trainer: pl.Trainer, model: nn.Module) -> None:
    """Feeds training batches to algorithms whose importance reads feature maps (filter
    pruning's ``nuclear_norm``: ``params.calibration_batches`` batches), before training."""
    for algo in ctrl.algorithms:
        if not getattr(algo, "needs_calibration", False):
            continue
        loader = trainer.fit_loop._data_source.dataloader()
        batches = itertools.islice(loader, int(algo.params["calibration_batches"]))
        algo.calibrate(batch_inputs(b, model) for b in batches)  # type: ignore[attr-defined]
