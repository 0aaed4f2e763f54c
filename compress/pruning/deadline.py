"""A time budget for a block of pure-Python work that might never finish (a dependency trace).

No thread is started (a Python thread cannot be killed): in the main thread a ``SIGALRM`` timer
interrupts the block; elsewhere (a worker thread, or a platform without ``setitimer``) a trace
function checks the clock at every Python call. Either way the block is interrupted with
:class:`TimeBudgetExceeded` at the next Python bytecode after the budget runs out, and the
previous handler, timer and trace function are restored.

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

import signal
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
def _alarm(seconds: float) -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise TimeBudgetExceeded(f"{seconds:g} s")

    previous = signal.signal(signal.SIGALRM, handler)
    outer, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer > 0:  # someone else's timer was running: give it back what is left of it
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - start), 1e-3))


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
