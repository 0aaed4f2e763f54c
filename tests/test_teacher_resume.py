"""Knowledge distillation resumes from the teacher its run started with: the controller state
keeps a digest of the teacher's weights, and a resume with another teacher is refused unless
``accept_new_teacher=True`` says it is meant; a checkpoint without a digest (older) warns."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import LitClassifier, lenet, loader16, quiet_trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

import compress
from callbacks import CompressionCallback
from compress.distillation import DIGEST_SAMPLE, teacher_digest
from compress.errors import CompressError

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = {
    "compression": [
        {"algorithm": "magnitude_sparsity", "sparsity_init": 0.3},
        {"algorithm": "knowledge_distillation", "type": "softmax", "temperature": 2.0},
    ]
}
REFUSED = r"knowledge_distillation: the teacher differs from the one the run started with"


def net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return lenet(16)


def fit(
    root: Path,
    teacher: nn.Module | None,
    *,
    student_seed: int = 0,
    ckpt_path: Path | None = None,
    **kw: Any,
) -> tuple[LitClassifier, CompressionCallback]:
    module = LitClassifier(model=net(student_seed))
    cb = CompressionCallback(RECIPE, teacher=teacher, model_attr="model", verbose=False, **kw)
    every = ModelCheckpoint(dirpath=root, save_top_k=-1, filename="{epoch}")
    trainer = quiet_trainer(root, cb, every, epochs=4, logger=False, deterministic=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Lightning's "few workers"
        warnings.filterwarnings("error", message=".*does not identify its teacher")
        trainer.fit(module, loader16(), ckpt_path=ckpt_path)
    return module, cb


def weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A 4-epoch run distilled from a "pretrained" teacher (seed 1); its epoch-1 checkpoint."""
    root = tmp_path_factory.mktemp("reference")
    module, cb = fit(root, net(1))
    assert cb.ctrl is not None
    state = cb.ctrl.state_dict()["state"]["knowledge_distillation"]
    assert state == {"teacher_digest": teacher_digest(net(1))}
    return root / "epoch=1.ckpt", weights(module)


def test_resume_with_a_freshly_built_teacher_is_refused(
    reference: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    ckpt, _ = reference
    with pytest.raises(CompressError, match=REFUSED + r".*accept_new_teacher=True"):
        fit(tmp_path, net(2), ckpt_path=ckpt)


def test_resume_with_the_same_teacher_equals_the_uninterrupted_run(
    reference: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    ckpt, want = reference
    module, _ = fit(tmp_path, net(1), ckpt_path=ckpt)
    got = weights(module)
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_accept_new_teacher_continues_with_it_and_keeps_its_digest(
    reference: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    ckpt, want = reference
    module, cb = fit(tmp_path, net(2), ckpt_path=ckpt, accept_new_teacher=True)
    assert cb.ctrl is not None
    assert cb.ctrl.scheduler.epoch == 3  # resumed, not restarted
    got = weights(module)
    assert not all(torch.equal(got[k], want[k]) for k in want)  # distilled from the new one
    saved = torch.load(tmp_path / "epoch=3.ckpt", weights_only=True)
    entry = saved["callbacks"]["CompressionCallback"]["controller"]["state"]
    assert entry["knowledge_distillation"]["teacher_digest"] == teacher_digest(net(2))


def test_a_checkpoint_without_a_digest_loads_with_a_warning(
    reference: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    ckpt, want = reference
    old = torch.load(ckpt, weights_only=True)
    del old["callbacks"]["CompressionCallback"]["controller"]["state"]["knowledge_distillation"][
        "teacher_digest"
    ]
    torch.save(old, tmp_path / "old.ckpt")
    with pytest.raises(UserWarning, match=r"the checkpoint does not identify its teacher"):
        fit(tmp_path, net(1), ckpt_path=tmp_path / "old.ckpt")


def test_default_teacher_of_a_freshly_built_module_is_refused(tmp_path: Path) -> None:
    """The issue's case: the default teacher is a copy of the module as built, before the
    checkpoint's weights load; another initialisation is another teacher."""
    fit(tmp_path / "a", None)
    ckpt = tmp_path / "a" / "epoch=1.ckpt"
    with pytest.raises(CompressError, match=REFUSED):
        fit(tmp_path / "b", None, student_seed=5, ckpt_path=ckpt)
    module, _ = fit(tmp_path / "c", None, ckpt_path=ckpt)  # built as the run was: resumes
    assert module.model[0].weight.shape == (300, 16)


def test_controller_refuses_another_teacher_and_changes_nothing() -> None:
    student = net(0)
    ctrl, _ = compress.create_compressed_model(student, RECIPE, teacher=net(1))
    ctrl.scheduler.epoch_step()
    state = ctrl.state_dict()
    other, _ = compress.create_compressed_model(net(0), RECIPE, teacher=net(2))
    with pytest.raises(CompressError, match=REFUSED + r" \(weights digest [0-9a-f]{12}, the "):
        other.load_state_dict(state)
    assert other.scheduler.epoch == -1
    other.load_state_dict(state, accept_new_teacher=True)
    assert other.scheduler.epoch == 0
    assert other.state_dict()["state"]["knowledge_distillation"] == {
        "teacher_digest": teacher_digest(net(2))
    }


def test_digest_covers_every_tensor_and_samples_large_ones() -> None:
    a = nn.Linear(4, 4)
    b = nn.Linear(4, 4)
    b.load_state_dict(a.state_dict())
    assert teacher_digest(a) == teacher_digest(b)
    with torch.no_grad():
        b.bias[3] += 1e-6
    assert teacher_digest(a) != teacher_digest(b)
    big = nn.Linear(DIGEST_SAMPLE // 512, 1024, bias=False)  # 2 * DIGEST_SAMPLE elements
    digest = teacher_digest(big)
    with torch.no_grad():
        big.weight.view(-1)[1] += 1.0  # stride 2: element 1 is not sampled
    assert teacher_digest(big) == digest
    with torch.no_grad():
        big.weight.view(-1)[2] += 1.0
    assert teacher_digest(big) != digest
