"""Make the process's standard streams safe before anything else opens a file.

A pipeline may start imagetool with stdin, stdout or stderr closed (`<&-`,
`2>&-`). The first file imagetool opens — the image — would then land on fd
0-2, and a child's redirection of that fd would replace the image. So the
closed ones are pointed at /dev/null first. Text written to them never fails
on a name either: unencodable characters are escaped, not raised.
"""

from __future__ import annotations

import io
import os
import signal
import sys


def make_safe() -> None:
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free descriptor: this one
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    for name, fd in (("stdout", 1), ("stderr", 2)):
        stream = getattr(sys, name)
        if stream is None:  # Python found the fd closed at start-up
            stream = open(fd, "w", encoding="utf-8", closefd=False)  # noqa: SIM115 (lives as long as we do)
            setattr(sys, name, stream)
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    # `ulimit -f`: a write past the limit must fail with EFBIG (a clear error), not kill us.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
