"""Holding SIGTERM and SIGINT over the spawn of a child process and its record."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGTERM and SIGINT take effect at the end of the block. A handler that raises
    (`xdc cluster up`'s, a drill's) could otherwise land between a child's spawn and its
    record (inside Popen, after the fork, or before its result is stored): that child is
    then known to nobody and outlives the cleanup that follows. Python runs signal
    handlers in the main thread: elsewhere this holds nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    held = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    held = {sig: h for sig, h in held.items() if h is not None}  # None: not set from Python
    for sig in held:
        signal.signal(sig, lambda signum, _frame: got.append(signum))
    try:
        yield
    finally:
        for sig, h in held.items():
            signal.signal(sig, h)
        for signum in got[:1]:
            signal.raise_signal(signum)
