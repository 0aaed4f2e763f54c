import math

import pytest

from compress.errors import CompressError
from compress.schedules import (
    Scheduler,
    exponential,
    exponential_with_bias_coefficients,
    multistep,
    polynomial,
    pruning_level,
    sparsity_level,
)


@pytest.mark.parametrize(
    "epoch, concave, expected",
    [
        (0, True, 0.1),
        (0, False, 0.1),
        (5, True, 0.9 - 0.8 * 0.5**3),  # concave at half way
        (5, False, 0.1 + 0.8 * 0.5**3),
        (10, True, 0.9),
        (10, False, 0.9),
        (15, True, 0.9),  # clipped past the target epoch
        (-1, False, 0.1),  # clipped before the start
    ],
)
def test_polynomial_boundaries(epoch: float, concave: bool, expected: float) -> None:
    got = polynomial(epoch, init=0.1, target=0.9, target_epoch=10, power=3, concave=concave)
    assert got == pytest.approx(expected, abs=1e-12)


def test_exponential_is_geometric_in_density_and_reaches_the_target() -> None:
    f = lambda e: exponential(e, init=0.0, target=0.99, target_epoch=4)  # noqa: E731
    assert f(0) == 0.0
    assert 1 - f(2) == pytest.approx(0.1)  # density sqrt(0.01)
    assert f(4) == 0.99  # exactly the target ratio, not an epoch count
    assert f(40) == 0.99


def test_multistep_by_bisect() -> None:
    levels = [0.1, 0.3, 0.5]
    assert [multistep(e, steps=[2, 4], levels=levels) for e in (0, 1.99, 2, 3, 4, 100)] == [
        0.1,
        0.1,
        0.3,
        0.3,
        0.5,
        0.5,
    ]


def test_sparsity_level_dispatches_on_schedule() -> None:
    params = {
        "schedule": "polynomial",
        "sparsity_target": 0.5,
        "sparsity_target_epoch": 2,
        "power": 1,
        "concave": False,
    }
    assert sparsity_level(params, 0.0, 1) == 0.25


def test_per_step_progress_and_inferred_steps_per_epoch() -> None:
    s = Scheduler()
    s.epoch_step()
    assert s.progress(None, True) == 0.0
    for _ in range(4):
        s.step()
    assert s.progress(None, True) == 0.0  # unknown steps per epoch in epoch 0, as NNCF
    assert s.progress(8, True) == 0.5
    s.epoch_step()
    assert s.inferred_steps_per_epoch == 4
    s.step()
    assert s.progress(None, True) == 1.25
    assert s.progress(None, False) == 1.0


def test_changed_step_count_is_a_clear_error() -> None:
    s = Scheduler()
    s.epoch_step()
    for _ in range(4):
        s.step()
    s.epoch_step()
    s.step()
    with pytest.raises(
        CompressError, match="epoch 1 had 1 optimizer steps, but the first epoch had 4"
    ):
        s.epoch_step()


def test_exponential_with_bias_solves_nncf_equations() -> None:
    init, target, last = 0.1, 0.6, 39
    coefficients = exponential_with_bias_coefficients(init, target, last)
    assert coefficients is not None
    a, b, k = coefficients
    assert a + b == pytest.approx(init)
    assert a * math.exp(-k * last) + b == pytest.approx(target)
    assert a * math.exp(-k * last / 8) + b == pytest.approx(0.75 * target)
    # no solution with k > 0 (NNCF divides by zero or returns noise): the straight line
    assert exponential_with_bias_coefficients(0.5, 0.5, 4) is None
    assert exponential_with_bias_coefficients(0.5, 0.6, 4) is None  # init above 3/4 of target
    assert exponential_with_bias_coefficients(0.1, 0.5, 0) is None  # pruning_steps 1
    params = {"schedule": "exponential_with_bias", "pruning_target": 0.6, "num_init_steps": 0}
    line = [pruning_level({**params, "pruning_steps": 5}, 0.5, e) for e in range(5)]
    assert line == pytest.approx([0.5, 0.525, 0.55, 0.575, 0.6])
    assert pruning_level({**params, "pruning_steps": 1}, 0.1, 0) == 0.6


def test_pruning_level_boundaries() -> None:
    params = {
        "pruning_target": 0.5,
        "num_init_steps": 2,
        "pruning_steps": 4,
        "schedule": "exponential",
    }
    assert pruning_level(params, 0.1, 0) == 0.0
    assert pruning_level(params, 0.1, 1.9) == 0.0
    assert pruning_level(params, 0.1, 2) == pytest.approx(0.1)
    # NNCF 2.17: the target at e = pruning_steps - 1 = 3, i.e. epoch 5
    assert 1 - pruning_level(params, 0.1, 4) == pytest.approx(0.9 * (0.5 / 0.9) ** (2 / 3))
    assert pruning_level(params, 0.1, 4.9) < 0.5
    assert pruning_level(params, 0.1, 5) == pruning_level(params, 0.1, 6) == 0.5
    assert pruning_level({**params, "schedule": "baseline"}, 0.1, 2) == 0.5
    wb = {**params, "schedule": "exponential_with_bias"}
    assert pruning_level(wb, 0.1, 2) == pytest.approx(0.1)
    assert pruning_level(wb, 0.1, 5) == pytest.approx(0.5)
    assert pruning_level(wb, 0.1, 6) == 0.5
    assert 0.1 < pruning_level(wb, 0.1, 3) < 0.5


def _magnitude_ctrl(**params: object):  # type: ignore[no-untyped-def]
    import torch
    from conftest import lenet

    import compress

    recipe = {"compression": {"algorithm": "magnitude_sparsity", "params": params}}
    ctrl, _ = compress.create_compressed_model(lenet(), recipe, torch.zeros(1, 16))
    return ctrl, ctrl.algorithms[0]


def test_default_power_is_nncfs() -> None:
    """Without ``power``, NNCF's 0.9: 0 -> 0.5 over 5 epochs as NNCF 2.17 gives it."""
    ctrl, algo = _magnitude_ctrl(sparsity_target=0.5, sparsity_target_epoch=5)
    levels = []
    for _ in range(6):
        ctrl.scheduler.epoch_step()
        levels.append(round(algo.level, 3))
    assert levels == [0.0, 0.091, 0.184, 0.281, 0.383, 0.5]


def test_per_step_exponential_only_when_asked() -> None:
    """NNCF moves only polynomial schedules per step; per_step_schedules "all" moves the others."""
    common = dict(
        schedule="exponential",
        sparsity_target=0.75,
        sparsity_target_epoch=2,
        update_per_optimizer_step=True,
        steps_per_epoch=2,
    )
    for mode, expected in (("polynomial", [0.0, 0.0, 0.5]), ("all", [0.0, 0.293, 0.5])):
        ctrl, algo = _magnitude_ctrl(per_step_schedules=mode, **common)
        ctrl.scheduler.epoch_step()
        seen = [round(algo.current, 3)]
        ctrl.scheduler.step()
        seen.append(round(algo.current, 3))
        ctrl.scheduler.step()
        ctrl.scheduler.epoch_step()
        seen.append(round(algo.current, 3))
        assert seen == expected, mode


def test_reported_level_follows_the_schedule_after_freezing() -> None:
    """As NNCF: from sparsity_freeze_epoch the masks stay, the reported level moves on."""
    ctrl, algo = _magnitude_ctrl(
        schedule="multistep",
        multistep_steps=[1, 2, 3],
        multistep_sparsity_levels=[0.1, 0.3, 0.4, 0.5],
        sparsity_freeze_epoch=2,
    )
    reported, masks = [], []
    for _ in range(4):
        ctrl.scheduler.epoch_step()
        reported.append(algo.level)
        masks.append(round(algo.statistics()["layers"][0]["sparsity"], 1))
    assert reported == [0.1, 0.3, 0.4, 0.5]
    assert algo.frozen and algo.current == 0.3
    assert masks[2:] == [masks[1], masks[1]]


def test_per_step_schedule_without_length_starts_an_epoch_late() -> None:
    """Without steps_per_epoch, the first epoch measures it at sparsity_init (NNCF)."""
    ctrl, algo = _magnitude_ctrl(
        sparsity_target=0.5, sparsity_target_epoch=1, power=1, update_per_optimizer_step=True
    )
    seen = []
    for _ in range(3):
        ctrl.scheduler.epoch_step()
        for _ in range(2):
            seen.append(algo.current)
            ctrl.scheduler.step()
    assert seen == [0.0, 0.0, 0.0, 0.25, 0.5, 0.5]


def test_cli_schedule_table_uses_the_schedulers_timing() -> None:
    """`compress schedule`: the first and last batch of each epoch; told the epoch length, a
    per-step schedule starts at epoch 0, else (as NNCF) one epoch late."""
    from compress.cli import schedule_rows
    from compress.recipe.config import load_config

    cfg = load_config(
        {
            "compression": {
                "algorithm": "magnitude_sparsity",
                "params": {
                    "sparsity_target": 0.4,
                    "sparsity_target_epoch": 2,
                    "power": 1,
                    "update_per_optimizer_step": True,
                },
            }
        }
    )
    told = schedule_rows(cfg, 3, 4)
    assert [r["magnitude_sparsity"] for r in told] == [0.0, 0.2, 0.4]
    assert [r["magnitude_sparsity (epoch end)"] for r in told] == [0.15, 0.35, 0.4]
    untold = schedule_rows(cfg, 3, None)
    assert [r["magnitude_sparsity"] for r in untold] == [0.0, 0.0, 0.2]
