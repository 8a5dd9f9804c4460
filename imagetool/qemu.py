"""The one place imagetool runs qemu-img.

Every call: an explicit input format (`-f`), the input as `/proc/self/fd/N` of a
descriptor we opened (never a user string, so `json:{…}` or `nbd:` names cannot
reach qemu), no shell, stdin closed, `LC_ALL=C`, and resource limits (address
space, CPU seconds, wall clock) so a hostile image cannot exhaust the machine.
A call killed by a limit becomes `QemuLimitHit`, which callers report as the
`resource_limit` rejection.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import resource
import shutil
import signal
import subprocess
from dataclasses import dataclass
from typing import Any

from imagetool.errors import EnvironmentProblem, ImagetoolError
from imagetool.sizes import Extent

QEMU_IMG = "qemu-img"

GiB = 1 << 30


@dataclass(frozen=True)
class Limits:
    """Resource limits for one qemu-img run (Nova uses 2 GiB / 30 s CPU for `info`)."""

    address_space: int = 2 * GiB
    cpu_seconds: int = 30
    wall_seconds: float = 60.0


INFO_LIMITS = Limits()
# `check` walks every refcount and L2 table: CPU grows with the image, so allow more.
CHECK_LIMITS = Limits(cpu_seconds=300, wall_seconds=600.0)
# convert/compare read the whole image: no CPU or wall bound beyond the caller's.
BULK_LIMITS = Limits(address_space=4 * GiB, cpu_seconds=0, wall_seconds=0.0)


# How qemu-img dies when RLIMIT_AS bites: at load time (ld.so) or at an allocation.
_OUT_OF_MEMORY = (
    "Cannot allocate memory",
    "failed to map segment",
    "Failed to allocate",
    "Out of memory",
    "out of memory",
)


class QemuLimitHit(ImagetoolError):
    """qemu-img was killed by a resource limit or timed out."""

    code = "resource_limit"


class QemuFailed(ImagetoolError):
    """qemu-img exited non-zero; `stderr` holds its last words."""

    code = "qemu_failed"

    def __init__(self, message: str, returncode: int, stderr: str) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stderr = stderr


def binary() -> str:
    path = shutil.which(QEMU_IMG)
    if path is None:
        raise EnvironmentProblem(
            "qemu-img is not installed (apt-get install -y qemu-utils)", code="missing_dependency"
        )
    return path


def _limiter(limits: Limits):  # type: ignore[no-untyped-def]
    def apply() -> None:
        if limits.address_space:
            resource.setrlimit(resource.RLIMIT_AS, (limits.address_space, limits.address_space))
        if limits.cpu_seconds:
            resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "TMPDIR")}
    env["LC_ALL"] = "C"
    env["MALLOC_ARENA_MAX"] = "3"  # as Ironic does: keeps convert's address space in bounds
    return env


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def popen(args: list[str], fds: tuple[int, ...], limits: Limits, **kwargs: Any) -> subprocess.Popen[bytes]:
    """Start qemu-img in its own process group (so it can be stopped whole)."""
    return subprocess.Popen(
        [binary(), *args],
        stdin=subprocess.DEVNULL,
        pass_fds=fds,
        env=environment(),
        preexec_fn=_limiter(limits),
        start_new_session=True,
        **kwargs,
    )


def run(
    args: list[str], fds: tuple[int, ...] = (), limits: Limits | None = None, ok_codes: tuple[int, ...] = (0,)
) -> subprocess.CompletedProcess[str]:
    """Run qemu-img to completion under `limits` (default: INFO_LIMITS); raise on a limit hit."""
    limits = limits or INFO_LIMITS
    proc = popen(args, fds, limits, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=limits.wall_seconds or None)
    except subprocess.TimeoutExpired:
        stop(proc)
        raise QemuLimitHit(
            f"qemu-img {args[0]} took longer than {limits.wall_seconds:g} s and was stopped"
        ) from None
    except BaseException:
        stop(proc)
        raise
    stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
    if proc.returncode in (-signal.SIGKILL, -signal.SIGXCPU) or (
        proc.returncode != 0 and any(sign in stderr for sign in _OUT_OF_MEMORY)
    ):
        raise QemuLimitHit(
            f"qemu-img {args[0]} was stopped by a resource limit "
            f"({limits.address_space >> 20} MiB memory, {limits.cpu_seconds} s CPU)"
        )
    if proc.returncode not in ok_codes:
        raise QemuFailed(
            f"qemu-img {args[0]} failed: {_last_line(stderr) or 'no message'}", proc.returncode, stderr
        )
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Kill qemu-img's whole process group and reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise QemuFailed(f"qemu-img {what} printed something that is not JSON", 0, text) from None


@functools.cache
def version() -> str:
    out = run(["--version"]).stdout
    first = out.splitlines()[0] if out else ""
    return first.removeprefix("qemu-img version ").strip()


def info(path: str, fmt: str, fds: tuple[int, ...]) -> dict[str, Any]:
    """`qemu-img info` in shared read-only mode; never follows the backing chain."""
    out = run(["info", "-f", fmt, "--output=json", "--force-share", path], fds).stdout
    data = _json(out, "info")
    if not isinstance(data, dict):
        raise QemuFailed("qemu-img info did not print a JSON object", 0, out)
    return data


def check(path: str, fmt: str, fds: tuple[int, ...]) -> tuple[int, dict[str, Any]]:
    """`qemu-img check` (read-only, never `-r`): its exit code (0/2/3 or 1) and report."""
    proc = run(
        ["check", "-f", fmt, "--output=json", "--force-share", path],
        fds,
        CHECK_LIMITS,
        ok_codes=(0, 1, 2, 3, 63),
    )
    try:
        report = json.loads(proc.stdout) if proc.stdout.strip() else {}
    except json.JSONDecodeError:
        report = {}
    if proc.returncode == 1 and not report:
        report = {"error": _last_line(proc.stderr)}
    return proc.returncode, report if isinstance(report, dict) else {}


def map_extents(path: str, fmt: str, fds: tuple[int, ...]) -> list[Extent]:
    """`qemu-img map`: the guest ranges that hold data, and where (None when compressed)."""
    out = run(["map", "-f", fmt, "--output=json", "--force-share", path], fds, CHECK_LIMITS).stdout
    data = _json(out, "map")
    extents = []
    for entry in data if isinstance(data, list) else []:
        if not isinstance(entry, dict) or not entry.get("data") or entry.get("zero"):
            continue
        start, length, host = entry.get("start"), entry.get("length"), entry.get("offset")
        if isinstance(start, int) and isinstance(length, int):
            extents.append(Extent(start, length, host if isinstance(host, int) else None))
    return extents


def create(path: str, fmt: str, size: int, options: dict[str, str], fds: tuple[int, ...]) -> None:
    """`qemu-img create` onto a file we already opened (O_EXCL), so no name is followed."""
    opts = ",".join(f"{k}={v}" for k, v in options.items())
    run(["create", "-q", "-f", fmt, "-o", opts, path, str(size)], fds)


def start_convert(
    src: str, src_fmt: str, dst: str, *, compress: bool, coroutines: int, fds: tuple[int, ...]
) -> subprocess.Popen[bytes]:
    """Start `qemu-img convert` into an already created qcow2, reporting progress on stdout.

    `-W` lets compression run on every core (writes land out of order; qcow2
    compressed writes are serialised safely by qemu); `-S 4k` leaves zero blocks
    unallocated; `--target-is-zero` skips writing zeros into the fresh image.
    """
    args = [
        "convert",
        "-p",
        "-n",
        "--target-is-zero",
        "-W",
        "-m",
        str(coroutines),
        "-S",
        "4k",
        "-f",
        src_fmt,
        "-O",
        "qcow2",
    ]
    if compress:
        args.append("-c")
    return popen([*args, src, dst], fds, BULK_LIMITS, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def compare(path_a: str, fmt_a: str, path_b: str, fmt_b: str, fds: tuple[int, ...]) -> bool:
    """`qemu-img compare` in strict mode: True when the guest contents are identical."""
    proc = run(
        ["compare", "-f", fmt_a, "-F", fmt_b, "--force-share", path_a, path_b],
        fds,
        BULK_LIMITS,
        ok_codes=(0, 1),
    )
    return proc.returncode == 0
