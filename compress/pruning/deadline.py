"""A time budget for a block of pure-Python work that might never finish (a dependency trace).

A watchdog thread waits for the budget to run out and then raises :class:`TimeBudgetExceeded`
in the thread that runs the block, asynchronously (``PyThreadState_SetAsyncExc``): the block
runs at full speed until then, where a trace function that checked the clock at every Python
call made the trace and the checks inside it several times slower. The exception lands at the
block's next bytecode boundary (a loop of pure Python is interrupted too; a single long call
into C, a convolution, finishes first), and again every :data:`REPEAT` seconds in case code in
the block catches it (``except Exception``). It never lands after the block: the watchdog stops
before the block is left, and one still pending is cleared. A block that ends normally after
its budget ran out (it swallowed every one) raises it on leaving. No thread is killed: the
watchdog only waits. (A ``SIGALRM`` timer, used before, crashed the process after a long test
session.)

Example:
    >>> n = 0
    >>> try:
    ...     with deadline(0.05):
    ...         while True:
    ...             n += 1
    ... except TimeBudgetExceeded:
    ...     print("stopped")
    stopped
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["REPEAT", "TimeBudgetExceeded", "deadline"]

REPEAT = 0.1
"""Seconds between two deliveries of the exception once the budget ran out."""


class TimeBudgetExceeded(Exception):
    """The block ran longer than its budget."""


_set_async_exc = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.py_object)(
    ("PyThreadState_SetAsyncExc", ctypes.pythonapi)
)


@contextmanager
def deadline(seconds: float | None) -> Iterator[None]:
    """Raises :class:`TimeBudgetExceeded` inside the block once ``seconds`` have passed
    (``None``: no budget; a value <= 0: at once, a budget spent before the block starts)."""
    if seconds is None:
        yield
        return
    if seconds <= 0:
        raise TimeBudgetExceeded(f"{seconds:g} s")
    message = f"{seconds:g} s"
    target = threading.get_ident()
    lock, wake = threading.Lock(), threading.Event()
    state = {"stopped": False, "fired": False}

    def watch() -> None:
        timeout = seconds
        while not wake.wait(timeout):
            with lock:
                if state["stopped"]:
                    return
                state["fired"] = True
                _set_async_exc(target, TimeBudgetExceeded)
            timeout = REPEAT

    watchdog = threading.Thread(target=watch, name="compress-deadline", daemon=True)
    watchdog.start()
    try:
        yield
    except TimeBudgetExceeded as err:
        if err.args:  # raised by the block itself, with its own message
            raise
        raise TimeBudgetExceeded(message) from None
    finally:
        _stop(lock, state, wake, target)
        watchdog.join()
    if state["fired"]:  # the block ended after its budget, having caught the exception
        raise TimeBudgetExceeded(message)


class _Flush(Exception):
    """Raised in the block's own thread by :func:`_stop` to take the place of a pending
    exception and be caught at once."""


def _stop(lock: threading.Lock, state: dict[str, bool], wake: threading.Event, target: int) -> None:
    """Stops the watchdog and takes back an exception it set that is still pending. One pending
    may land in here: it is caught and the stop tried again (the watchdog sets no more once
    ``stopped`` is set, under its lock).

    A pending exception is replaced by :class:`_Flush`, which lands at the next bytecode
    boundary of the loop below and is caught. Clearing it with NULL instead signals an
    asynchronous exception that is not there (CPython 3.11), and under a profiler (cProfile)
    the thread then spun at its next function call, ``watchdog.join()``, forever: a 1 s budget
    never returned, nor did swin_t's 60 s one."""
    while True:
        try:
            with lock:
                state["stopped"] = True
            wake.set()
            try:
                _set_async_exc(target, _Flush)
                while True:  # _Flush lands at a bytecode boundary of this loop
                    pass
            except _Flush:
                return
        except TimeBudgetExceeded:
            continue
