"""knowledge_distillation: NNCF's two losses by hand, the teacher frozen and out of every file."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import ConvBNNet, LitClassifier, fit_quietly, lenet, loader16, quiet_trainer
from torch import nn

import compress
from callbacks import CompressionCallback
from compress.errors import ConfigError

X = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def kd(kind: str, **keys: float) -> dict:
    return {"algorithm": "knowledge_distillation", "type": kind, **keys}


class Fixed(nn.Module):
    """Returns the logits it is given (plus a learnable zero), so the loss is known by hand."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits + self.bias


def test_softmax_loss_matches_a_hand_computed_value() -> None:
    student = Fixed(torch.tensor([[1.0, 2.0, 3.0]]))
    teacher = Fixed(torch.tensor([[3.0, 2.0, 1.0]]))
    ctrl, model = compress.create_compressed_model(
        student, {"compression": kd("softmax", temperature=2.0, scale=0.5)}, teacher=teacher
    )
    model(torch.zeros(1))
    # T = 2: student/T = [0.5, 1, 1.5], teacher/T = [1.5, 1, 0.5]
    z = math.exp(0.5) + math.exp(1.0) + math.exp(1.5)
    q = [math.exp(1.5) / z, math.exp(1.0) / z, math.exp(0.5) / z]
    log_p = [math.log(math.exp(v) / z) for v in (0.5, 1.0, 1.5)]
    want = 0.5 * 2.0**2 * -sum(a * b for a, b in zip(q, log_p))
    assert math.isclose(ctrl.loss().item(), want, rel_tol=1e-6)
    assert float(ctrl.loss()) == 0.0  # read once per forward pass


def test_mse_loss_matches_a_hand_computed_value_and_has_a_gradient() -> None:
    student = Fixed(torch.tensor([[1.0, 2.0], [0.0, 0.0]]))
    teacher = Fixed(torch.tensor([[1.0, 0.0], [2.0, 1.0]]))
    ctrl, model = compress.create_compressed_model(
        student, {"compression": kd("mse", scale=3.0)}, teacher=teacher
    )
    model(torch.zeros(1))
    loss = ctrl.loss()
    assert math.isclose(float(loss), 3.0 * (0 + 4 + 4 + 1) / 4, rel_tol=1e-6)
    loss.backward()
    assert student.bias.grad is not None and teacher.bias.grad is None


def test_no_loss_in_eval_or_no_grad() -> None:
    ctrl, model = compress.create_compressed_model(
        lenet(16), {"compression": kd("mse")}, torch.zeros(1, 16)
    )
    with torch.no_grad():
        model(torch.randn(2, 16))
    model.eval()
    model(torch.randn(2, 16))
    assert float(ctrl.loss()) == 0.0


def test_temperature_with_mse_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"compression\.temperature: only the 'softmax' type"):
        compress.load_config({"compression": kd("mse", temperature=2.0)})


def test_teacher_is_the_model_before_compression_and_stays_frozen() -> None:
    recipe = {
        "compression": [
            {"algorithm": "filter_pruning", "pruning_init": 0.5},
            kd("softmax"),
        ]
    }
    net = ConvBNNet()
    dense = ConvBNNet()
    dense.load_state_dict(net.state_dict())
    ctrl, model = compress.create_compressed_model(net, recipe, X)
    teacher = ctrl.algorithms[0].teacher  # type: ignore[attr-defined]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        (model(X).square().mean() + ctrl.loss()).backward()
        opt.step()
        opt.zero_grad()
    dense.eval()
    with torch.no_grad():
        torch.testing.assert_close(teacher(X), dense(X))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_teacher_is_absent_from_state_dict_exports_and_checkpoints(tmp_path: Path) -> None:
    recipe = {
        "compression": [
            {"algorithm": "magnitude_sparsity", "sparsity_init": 0.5},
            kd("softmax", temperature=4.0),
        ]
    }
    module = LitClassifier()
    keys = set(module.state_dict())
    cb = CompressionCallback(
        recipe, export_dir=tmp_path / "out", export_formats=["sparse", "pt2"], verbose=False
    )
    trainer = quiet_trainer(tmp_path, cb, epochs=1, logger=False)
    fit_quietly(trainer, module, loader16())
    assert set(module.state_dict()) == keys  # no teacher.* keys
    ckpt = torch.load(next(tmp_path.rglob("*.ckpt")), weights_only=True)
    assert set(ckpt["state_dict"]) == keys
    entry = ckpt["callbacks"]["CompressionCallback"]
    kd_state = entry["controller"]["state"]["knowledge_distillation"]
    assert list(kd_state) == ["teacher_digest"]  # what identifies the teacher, not its weights
    assert isinstance(kd_state["teacher_digest"], str)
    assert not [k for k in entry.get("masked_values", {}) if "teacher" in k]
    plain = cb.ctrl.strip()  # type: ignore[union-attr]
    assert not plain._forward_hooks and not plain._forward_hooks_with_kwargs
    pt2 = torch.export.load(cb.exported["pt2"])
    n_params = sum(p.numel() for p in module.model.parameters())
    assert sum(v.numel() for v in pt2.state_dict.values()) == n_params
    assert module._forward_hooks  # the training model keeps its hook


def test_callback_teacher_argument_is_used_and_the_loss_is_added(tmp_path: Path) -> None:
    teacher = lenet(16)
    calls = []
    teacher.register_forward_hook(lambda m, a, o: calls.append(m.training))
    cb = CompressionCallback({"compression": kd("mse")}, teacher=teacher, model_attr="model")
    module = LitClassifier()
    fit_quietly(quiet_trainer(tmp_path, cb, epochs=1, logger=False), module, loader16(16))
    assert calls == [False, False]  # two training batches, teacher in eval mode
    assert cb.ctrl is not None and cb.ctrl.algorithms[0].teacher is teacher  # type: ignore[attr-defined]


def test_teacher_without_distillation_warns() -> None:
    with pytest.warns(UserWarning, match="teacher= is unused: the recipe has no knowledge_distil"):
        compress.create_compressed_model(
            lenet(16),
            {"compression": {"algorithm": "magnitude_sparsity"}},
            torch.zeros(1, 16),
            teacher=lenet(16),
        )
