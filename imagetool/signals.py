"""One way the whole run meets a signal: SIGINT, SIGTERM and SIGHUP all unwind as `Interrupted`.

A closed terminal or a dropped ssh session (SIGHUP) and a pipeline's `kill` (SIGTERM)
deserve the same care as Ctrl-C: clean-ups run (temp files removed, qemu-img stopped,
the metadata document marked failed) and the exit is 128+N with one line and, with
--json, one JSON object. The first signal wins: further ones are ignored so the
clean-up it started is not itself interrupted.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

from imagetool.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _unwind(signum: int, frame: FrameType | None) -> None:
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise Interrupted(signum)


def install() -> None:
    """Take over the three signals for the rest of the process (the console entry point).

    A signal the caller ignores stays ignored: `nohup imagetool …` must survive a hang-up,
    and a shell's background job ignores Ctrl-C.
    """
    for sig in SIGNALS:
        if signal.getsignal(sig) != signal.SIG_IGN:
            signal.signal(sig, _unwind)


@contextlib.contextmanager
def unwinding() -> Iterator[None]:
    """The same, for one call, restoring the caller's handlers after (the CLI used as a library)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    install()
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def number(exc: BaseException) -> int:
    """The signal behind an Interrupted (or a KeyboardInterrupt raised by Python's own handler)."""
    return exc.signum if isinstance(exc, Interrupted) else int(signal.SIGINT)


def exit_code(exc: BaseException) -> int:
    return 128 + number(exc)


def message(exc: BaseException, left: str = "nothing was left behind") -> str:
    return f"interrupted by {signal.Signals(number(exc)).name}; {left}"
