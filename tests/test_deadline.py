"""The time budget of the dependency trace (``compress/pruning/deadline.py``): a watchdog thread
raises in the block once the budget is spent. Nothing here asserts a duration: the blocks
either end (the budget stopped them) or the test hangs."""

from __future__ import annotations

import cProfile
import threading
import time

import pytest

from compress.pruning.deadline import TimeBudgetExceeded, deadline


def _spin() -> None:
    """Pure Python that never ends, with calls and without."""
    n = 0
    while True:
        n += 1
        if n % 1000 == 0:
            (lambda: None)()


def _watchdogs() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "compress-deadline"]


def test_an_endless_block_stops_with_the_budget_named() -> None:
    with pytest.raises(TimeBudgetExceeded, match=r"^0\.05 s$"):
        with deadline(0.05):
            _spin()
    assert _watchdogs() == []


def test_a_loop_without_calls_stops() -> None:
    n = 0
    with pytest.raises(TimeBudgetExceeded):
        with deadline(0.05):
            while n >= 0:
                n += 1


def test_a_block_that_catches_the_exception_gets_it_again() -> None:
    caught = []
    with pytest.raises(TimeBudgetExceeded):
        with deadline(0.05):
            try:
                _spin()
            except Exception as err:  # noqa: BLE001 - what careless code in the block does
                caught.append(err)
            _spin()
    assert len(caught) == 1 and isinstance(caught[0], TimeBudgetExceeded)


def test_a_block_that_swallows_the_exception_and_ends_raises_on_leaving() -> None:
    with pytest.raises(TimeBudgetExceeded, match=r"^0\.05 s$"):
        with deadline(0.05):
            try:
                _spin()
            except Exception:  # noqa: BLE001, S110
                pass


def test_nothing_lands_after_a_block_that_ended_in_time() -> None:
    with deadline(0.05):
        pass
    assert _watchdogs() == []
    end, n = time.monotonic() + 0.3, 0
    while True:  # Python work past the budget: nothing may interrupt it
        n += 1  # at least once, however late the process is scheduled
        if time.monotonic() >= end:
            break
    assert n > 0


def test_the_inner_of_two_budgets_stops_only_its_block() -> None:
    with deadline(60):
        with pytest.raises(TimeBudgetExceeded, match=r"^0\.05 s$"):
            with deadline(0.05):
                _spin()
        x = sum(range(1000))  # the outer block goes on
    assert x == 499500
    assert _watchdogs() == []


def test_an_exception_of_the_block_passes_unchanged() -> None:
    with pytest.raises(TimeBudgetExceeded, match="^raised by the block$"):
        with deadline(60):
            raise TimeBudgetExceeded("raised by the block")
    with pytest.raises(ValueError, match="other"):
        with deadline(60):
            raise ValueError("other")
    assert _watchdogs() == []


def test_no_budget_starts_no_watchdog_and_a_spent_one_raises_at_once() -> None:
    with deadline(None):
        assert _watchdogs() == []
    ran = []
    with pytest.raises(TimeBudgetExceeded, match="^0 s$"):
        with deadline(0):
            ran.append(1)
    assert ran == []


@pytest.mark.parametrize("spent", [True, False])
def test_a_budget_under_a_profiler_returns(spent: bool) -> None:
    """cProfile once made the stop spin forever at the next call, whether the budget ran out
    or not (clearing the pending exception with NULL signalled one that was not there)."""
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        if spent:
            with pytest.raises(TimeBudgetExceeded, match="0.05 s"), deadline(0.05):
                while True:
                    (lambda: None)()
        else:
            with deadline(100):
                (lambda: None)()
    finally:
        profiler.disable()
    assert profiler.getstats()  # the profiler ran through the block
