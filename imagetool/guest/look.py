"""One look inside a guest: open the disk, find the root, answer arch, mode, username and os.

Steps run cheapest and most wanted first (os, kernels, arch, username), the initramfs
last, so a look that runs out of time still answers what it could. Each step catches
what the readers raise on bad bytes and turns it into evidence; only the deadline or
the read budget (`Stopped`) ends the look early. `look()` itself never raises for
anything the image contains.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

from imagetool.guest import limits
from imagetool.guest.budget import Budget, Stopped, reader_log, watchdog
from imagetool.guest.facts import Answer, DriverFacts, GuestFacts, InitramfsFacts, KernelFacts, unknown
from imagetool.guest.text import short_error
from imagetool.source import Source

READ_FORMATS = ("raw", "qcow2")
T = TypeVar("T")


@dataclass
class _Look:
    """The answers while the steps fill them in."""

    answers: dict[str, Answer] = field(default_factory=dict)
    kernels: list[KernelFacts] = field(default_factory=list)
    layout: list[str] = field(default_factory=list)
    failures: dict[str, list[str]] = field(default_factory=dict)
    step: str = "start"
    stopped: str | None = None

    def attempt(self, step: str, answers: tuple[str, ...], func: Callable[[], T]) -> T | None:
        """Run one step; a reader's exception becomes evidence for the answers that needed it."""
        self.step = step
        try:
            return func()
        except Stopped:
            raise
        except Exception as exc:  # bad bytes in the image, as the reader saw them
            for name in answers:
                self.failures.setdefault(name, []).append(f"{step} failed: {short_error(exc)}")
            return None

    def give_up(self, *evidence: str) -> None:
        for name in ("arch", "mode", "username", "os"):
            self.answers.setdefault(name, unknown(*evidence))

    def facts(self, budget: Budget) -> GuestFacts:
        final: dict[str, Answer] = {}
        for name in ("arch", "mode", "username", "os"):
            answer = self.answers.get(name)
            extra = self.failures.get(name, [])
            if answer is None:
                why = [*extra, *([f"not answered: {self.stopped}"] if self.stopped else [])]
                answer = unknown(*(why or ["not answered"]))
            elif extra:
                answer = Answer(answer.value, answer.confidence, (*extra, *answer.evidence), answer.extra)
            if name == "arch" and "supported" not in dict(answer.extra):
                answer = Answer(answer.value, answer.confidence, answer.evidence, (("supported", None),))
            final[name] = answer
        return GuestFacts(
            arch=final["arch"],
            mode=final["mode"],
            username=final["username"],
            os=final["os"],
            kernels=tuple(self.kernels),
            layout=tuple(self.layout),
            stopped=self.stopped,
            bytes_read=budget.image_bytes,
            reads=budget.image_reads,
            seconds=round(budget.elapsed(), 3),
        )


def look(src: Source, fmt: str, *, time_limit: float = limits.DEFAULT_TIME_LIMIT) -> GuestFacts:
    """Read the guest's filesystems in `src` (already inspected and safe; `fmt` raw or qcow2).

    Reads only through `src.fd`, never by path, at most `time_limit` seconds and
    limits.MAX_IMAGE_BYTES of the image. Every answer carries a confidence and evidence.
    """
    budget = Budget(time_limit)
    state = _Look()
    with reader_log() as logged:
        try:
            with watchdog(budget):
                _run(src, fmt, budget, state)
        except Stopped as exc:
            state.stopped = f"{exc.message} (during {state.step})"
        except Exception as exc:  # a bug here, not the image: still an answer, never a traceback
            state.stopped = f"internal error during {state.step}: {short_error(exc)}"
    state.layout.extend(f"reader warning: {line}" for line in logged.lines)
    if logged.dropped:
        state.layout.append(f"reader warning: {logged.dropped} more")
    return state.facts(budget)


def _run(src: Source, fmt: str, budget: Budget, state: _Look) -> None:
    from imagetool.guest.arch import read_arch, read_windows_arch
    from imagetool.guest.cloudinit import read_username
    from imagetool.guest.disk import open_disk
    from imagetool.guest.kernels import (
        choose_default,
        find_kernels,
        kernel_facts,
        read_drivers,
        read_initramfs,
    )
    from imagetool.guest.layout import build_layout
    from imagetool.guest.osrelease import read_os
    from imagetool.guest.virtio import recommend_mode, recommend_windows_mode

    if fmt not in READ_FORMATS:
        state.give_up(f"format {fmt}: the guest look reads raw and qcow2 images only (convert it first)")
        return
    every = ("arch", "mode", "username", "os")
    opened = state.attempt(
        f"opening the {fmt} image", every, lambda: open_disk(src.fd, src.size, fmt, budget)
    )
    if opened is None:
        state.give_up(f"the {fmt} image could not be read")
        return
    disk, disk_size, description = opened
    state.layout.append(f"image: {description}")
    layout = state.attempt("reading partitions", every, lambda: build_layout(disk, disk_size, budget))
    if layout is None:
        state.give_up(f"the {fmt} image's partitions could not be read")
        return
    state.layout.extend(layout.evidence)
    tree = layout.tree
    if tree is None:
        state.give_up(*layout.evidence[-6:])
        return
    if layout.kind == "windows":
        state.answers["os"] = unknown("a Windows system: os-release does not exist; the version is not read")
        arch = state.attempt("arch", ("arch",), lambda: read_windows_arch(tree))
        if arch is not None:
            state.answers["arch"] = arch
        mode = state.attempt("virtio drivers", ("mode",), lambda: recommend_windows_mode(tree))
        if mode is not None:
            state.answers["mode"] = mode
        state.answers["username"] = unknown("a Windows system: cloudbase-init's configuration is not read")
        return

    os_read = state.attempt("os-release", ("os", "username"), lambda: read_os(tree))
    os_values: dict[str, str] = {}
    if os_read is not None:
        state.answers["os"], os_values = os_read

    found = state.attempt("finding kernels", ("mode",), lambda: find_kernels(tree, budget))
    kernels, kernel_notes = found if found is not None else ([], [])
    chosen = state.attempt("default kernel", ("mode",), lambda: choose_default(tree, kernels))
    default, default_notes = chosen if chosen is not None else (None, [])

    arch = state.attempt("arch", ("arch",), lambda: read_arch(tree, default.image if default else None))
    if arch is not None:
        state.answers["arch"] = arch

    user = state.attempt("cloud-init", ("username",), lambda: read_username(tree, os_values.get("ID")))
    if user is not None:
        state.answers["username"] = user

    drivers: dict[str, tuple[DriverFacts, ...]] = {}
    for kernel in kernels:
        read = state.attempt(
            f"drivers of {kernel.version}", ("mode",), partial(read_drivers, tree, kernel, budget)
        )
        drivers[kernel.version] = read or ()
        state.kernels.append(kernel_facts(kernel, kernel is default, drivers[kernel.version], None))

    stopped: Stopped | None = None
    if default is not None:
        dflt = default
        initramfs: InitramfsFacts | None
        try:
            initramfs = state.attempt(
                "initramfs", ("mode",), lambda: read_initramfs(tree, dflt, drivers[dflt.version], budget)
            )
        except Stopped as exc:  # the drivers are known: the mode can still be answered, as likely
            initramfs, stopped = InitramfsFacts(dflt.initramfs, "not_checked", evidence=(exc.message,)), exc
        if initramfs is None:
            initramfs = InitramfsFacts(dflt.initramfs, "unreadable")
        index = next(i for i, k in enumerate(state.kernels) if k.default)
        state.kernels[index] = kernel_facts(dflt, True, drivers[dflt.version], initramfs)
    default_facts = next((k for k in state.kernels if k.default), None)
    mode = recommend_mode(default_facts)
    notes = (*kernel_notes, *default_notes)
    state.answers["mode"] = Answer(mode.value, mode.confidence, (*notes, *mode.evidence), mode.extra)
    if stopped is not None:
        raise stopped
