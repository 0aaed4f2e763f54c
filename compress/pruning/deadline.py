"""A time budget for a block of pure-Python work that might never finish (a dependency trace).

No thread is started (a Python thread cannot be killed): a trace function checks the clock at
every Python call and interrupts the block with :class:`TimeBudgetExceeded` at the first call
after the budget runs out; the previous trace function is restored. (A ``SIGALRM`` timer, used
before, crashed the process after a long test session; a loop that makes no Python call is not
interrupted.)

Example:
    >>> import time
    >>> try:
    ...     with deadline(0.05):
    ...         while True:
    ...             time.sleep(0.001) or (lambda: None)()
    ... except TimeBudgetExceeded:
    ...     print("stopped")
    stopped
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

__all__ = ["TimeBudgetExceeded", "deadline"]


class TimeBudgetExceeded(Exception):
    """The block ran longer than its budget."""


@contextmanager
def deadline(seconds: float | None) -> Iterator[None]:
    """Raises :class:`TimeBudgetExceeded` inside the block once ``seconds`` have passed
    (``None``: no budget; a value <= 0: at once, a budget spent before the block starts)."""
    if seconds is None:
        yield
        return
    if seconds <= 0:
        raise TimeBudgetExceeded(f"{seconds:g} s")
    # The clock check, not SIGALRM: an alarm landing after a long test session was seen to
    # crash the process (segmentation fault) in CI.
    with _clock_check(seconds):
        yield


@contextmanager
def _clock_check(seconds: float) -> Iterator[None]:
    end = time.monotonic() + seconds
    previous = sys.gettrace()

    def check(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call" and time.monotonic() > end:
            raise TimeBudgetExceeded(f"{seconds:g} s")

    sys.settrace(check)
    try:
        yield
    finally:
        sys.settrace(previous)
