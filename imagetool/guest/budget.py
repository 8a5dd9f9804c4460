"""The time and read budget of one look, and the exceptions that end it early.

`Stopped` derives from BaseException on purpose: the filesystem libraries catch
`Exception` in places (trying one partition scheme after another, say), and a
deadline must not be swallowed there. Each step of a look catches `Exception` (a
library's complaint about bad bytes) and records it as evidence; a `Stopped` ends
the look, which then reports what it had found and why it stopped.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from imagetool.guest import limits


class Stopped(BaseException):
    """The look ran out of time or of image reads."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class OutOfTime(Stopped):
    pass


class OutOfReads(Stopped):
    pass


class ReadTooLarge(Exception):
    """One read asked for more than any honest structure needs (limits.MAX_SINGLE_READ)."""


class Budget:
    """A deadline and a count of image bytes, checked by every loop and every image read."""

    def __init__(self, time_limit: float, max_image_bytes: int = limits.MAX_IMAGE_BYTES) -> None:
        self.time_limit = time_limit
        self.started = time.monotonic()
        self.deadline = self.started + time_limit
        self.max_image_bytes = max_image_bytes
        self.image_bytes = 0
        self.image_reads = 0
        self.guest_bytes = 0

    def check(self) -> None:
        if time.monotonic() > self.deadline:
            raise OutOfTime(f"the time limit of {self.time_limit:g} s was reached")

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def charge(self, nbytes: int) -> None:
        """Count a read from the image before it is made; refuse it past the budget or the deadline."""
        self.check()
        if nbytes > limits.MAX_SINGLE_READ:
            raise ReadTooLarge(f"a read of {nbytes} bytes from the image (at most {limits.MAX_SINGLE_READ})")
        self.image_reads += 1
        self.image_bytes += nbytes
        if self.image_bytes > self.max_image_bytes:
            raise OutOfReads(f"more than {self.max_image_bytes} bytes were read from the image")

    def charge_guest(self, nbytes: int) -> None:
        """Count bytes asked of the guest disk (after qcow2), zeros of unallocated clusters included."""
        self.check()
        if nbytes > limits.MAX_SINGLE_READ:
            raise ReadTooLarge(
                f"a read of {nbytes} bytes from the guest disk (at most {limits.MAX_SINGLE_READ})"
            )
        self.guest_bytes += nbytes
        if self.guest_bytes > limits.MAX_GUEST_BYTES:
            raise OutOfReads(f"more than {limits.MAX_GUEST_BYTES} bytes were read from the guest disk")


class ReaderLog(logging.Handler):
    """Collects what the readers log about bad structures (they log, then carry on) as evidence.

    Without it Python's last-resort handler would print their warnings on stderr, past
    imagetool's one-line error contract.
    """

    def __init__(self, limit: int = 20) -> None:
        super().__init__(logging.WARNING)
        self.limit = limit
        self.lines: list[str] = []
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.lines) < self.limit:
            self.lines.append(f"{record.name}: {record.getMessage()}"[:300])
        else:
            self.dropped += 1


@contextmanager
def reader_log(names: tuple[str, ...] = ("dissect",)) -> Iterator[ReaderLog]:
    handler = ReaderLog()
    loggers = [logging.getLogger(name) for name in names]
    saved = [logger.propagate for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.propagate = False
    try:
        yield handler
    finally:
        for logger, propagate in zip(loggers, saved, strict=True):
            logger.removeHandler(handler)
            logger.propagate = propagate


@contextmanager
def watchdog(budget: Budget, grace: float = 1.0) -> Iterator[str]:
    """A backstop for a reader loop that never reads the image (a cycle in cached metadata).

    Every image read and every loop of ours checks the deadline; this catches the rest
    (a crafted Btrfs chunk tree makes dissect.btrfs search its cached nodes forever).
    In the main thread, when nobody else uses SIGALRM or the real-time timer: SIGALRM at
    the deadline plus `grace` raises OutOfTime, and both are restored on the way out.
    Elsewhere (another thread, or SIGALRM taken): a trace function on Python calls only
    (no line events: cheap) checks the deadline every 4096 calls, unless a debugger or
    coverage tool already traces. Yields which backstop is armed: "alarm", "trace" or "none".
    """
    main = threading.current_thread() is threading.main_thread()
    if (
        main
        and signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, signal.SIG_IGN, None)
        and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    ):

        def fire(signum: int, frame: FrameType | None) -> None:
            raise OutOfTime(f"the time limit of {budget.time_limit:g} s was reached (watchdog)")

        previous = signal.signal(signal.SIGALRM, fire)
        try:
            signal.setitimer(signal.ITIMER_REAL, max(budget.remaining(), 0.0) + grace)
            yield "alarm"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        return
    if sys.gettrace() is not None:
        yield "none"
        return
    calls = 0
    end = budget.deadline + grace

    def trace(frame: FrameType, event: str, arg: object) -> None:
        nonlocal calls
        calls += 1
        if calls % 4096 == 0 and time.monotonic() > end:
            raise OutOfTime(f"the time limit of {budget.time_limit:g} s was reached (watchdog)")

    sys.settrace(trace)
    try:
        yield "trace"
    finally:
        sys.settrace(None)
