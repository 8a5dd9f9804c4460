"""Progress of a long job, as a value, and the ways to show it.

Operations report `Progress` values to a callback; the CLI picks a renderer: a
tqdm bar on a terminal, JSON lines on stderr for orchestrators, or nothing. No
`\\r` ever reaches a log that is not a terminal.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from imagetool.errors import UsageProblem

MODES = ("auto", "bar", "json", "none")


@dataclass(frozen=True)
class Progress:
    done: int  # bytes of the guest disk processed
    total: int  # bytes of the guest disk
    elapsed: float  # seconds since the job started
    output_bytes: int  # size of the output so far

    @property
    def rate(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        return (self.total - self.done) / self.rate if self.rate > 0 else None


Callback = Callable[[Progress], None]


class JsonLines:
    """One JSON object per update on stderr: {"done":…, "total":…, "rate":…, …}."""

    def __call__(self, p: Progress) -> None:
        line = {
            "done": p.done,
            "total": p.total,
            "rate": round(p.rate),
            "eta": None if p.eta is None else round(p.eta, 1),
            "elapsed": round(p.elapsed, 2),
            "output_bytes": p.output_bytes,
        }
        with contextlib.suppress(OSError, ValueError):  # a hung-up terminal must not fail the job
            sys.stderr.write(json.dumps(line) + "\n")
            sys.stderr.flush()

    def close(self) -> None:
        pass


class Bar:
    """A tqdm bar in bytes (rate and ETA included), drawn on stderr once the total is known."""

    def __init__(self, description: str) -> None:
        self.description = description
        self.bar: Any = None

    def __call__(self, p: Progress) -> None:
        with contextlib.suppress(OSError, ValueError):  # a hung-up terminal must not fail the job
            if self.bar is None:
                from tqdm import tqdm  # imported only when a bar is shown

                self.bar = tqdm(
                    total=p.total,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=self.description,
                    file=sys.stderr,
                    dynamic_ncols=True,
                )
            self.bar.update(p.done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            with contextlib.suppress(OSError, ValueError):
                self.bar.close()


class Silent:
    def __call__(self, p: Progress) -> None:
        pass

    def close(self) -> None:
        pass


def renderer(mode: str, description: str) -> Bar | JsonLines | Silent:
    if mode not in MODES:
        raise UsageProblem(f"--progress {mode!r} is not one of {', '.join(MODES)}", code="bad_progress")
    if mode == "auto":
        mode = "bar" if sys.stderr.isatty() else "none"
    if mode == "bar":
        return Bar(description)
    if mode == "json":
        return JsonLines()
    return Silent()
