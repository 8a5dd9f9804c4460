"""The one place imagetool runs qemu-img.

Every call: an explicit input format (`-f`), the input as `/proc/self/fd/N` of a
descriptor we opened (never a user string, so `json:{…}` or `nbd:` names cannot
reach qemu), no shell, stdin closed, `LC_ALL=C`, and resource limits (address
space, CPU seconds, wall clock) so a hostile image cannot exhaust the machine.
A call killed by a limit becomes `QemuLimitHit`, which callers report as the
`resource_limit` rejection.

Limits and the parent-death signal are applied by exec'ing util-linux's
`setpriv --pdeathsig KILL` and `prlimit` in front of qemu-img (no `preexec_fn`,
which is unsafe in a process with threads): if imagetool dies — SIGKILL, a
closed terminal — qemu-img dies with it instead of writing on alone.
What qemu-img prints is read here too: its progress, and which failure its
stderr describes (a read error of the input is the image's fault; a write error
is the disk's), with qemu's advice lines ("qemu-img check -r all …") left out.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from imagetool.errors import EnvironmentProblem, ExitCode, ImageRejected, ImagetoolError, Reason
from imagetool.policy import MAX_MAP_EXTENTS
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
    """qemu-img was killed by a resource limit or timed out: the image asked for too much."""

    exit_code = ExitCode.REJECTED
    code = "resource_limit"


class QemuFailed(EnvironmentProblem):
    """qemu-img exited non-zero; `stderr` holds its last words. Callers say whose fault it was."""

    code = "qemu_failed"

    def __init__(self, message: str, returncode: int, stderr: str) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stderr = stderr


def _which(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise EnvironmentProblem(
            f"{name} is not installed (apt-get install -y {package})", code="missing_dependency"
        )
    return path


def binary() -> str:
    return _which(QEMU_IMG, "qemu-utils")


def _bound(kind: int, wanted: int) -> str:
    """`soft:hard` for prlimit: ours, but never above what this process may already use.

    A caller's own `ulimit -v`/`-t` may be lower than our bound; asking for more would make
    prlimit fail (EPERM) and every image look broken.
    """
    soft, hard = resource.getrlimit(kind)
    value = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    value = value if soft == resource.RLIM_INFINITY else min(value, soft)
    return f"{value}:{value}"


def _command(args: list[str], limits: Limits) -> list[str]:
    """qemu-img behind setpriv (dies with us) and prlimit (bounded), exec'd, never forked twice."""
    bounds = ["--core=0"]
    if limits.address_space:
        bounds.append(f"--as={_bound(resource.RLIMIT_AS, limits.address_space)}")
    if limits.cpu_seconds:
        bounds.append(f"--cpu={_bound(resource.RLIMIT_CPU, limits.cpu_seconds)}")
    return [
        _which("setpriv", "util-linux"),
        "--pdeathsig",
        "KILL",
        "--",
        _which("prlimit", "util-linux"),
        *bounds,
        "--",
        binary(),
        *args,
    ]


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "TMPDIR")}
    env["LC_ALL"] = "C"
    env["MALLOC_ARENA_MAX"] = "3"  # as Ironic does: keeps convert's address space in bounds
    return env


# qemu's advice, printed after the cause: never the reason itself.
_ADVICE = re.compile(r"^(qemu-img check -r|You can force-remove|Try '|Use '|Note:)", re.IGNORECASE)
_OPEN_PREFIX = re.compile(r"^Could not open '[^']*': ")


def cause(stderr: str) -> str:
    """The line of qemu-img's stderr that says what went wrong, without its advice or our fd path."""
    for raw in stderr.splitlines():
        line = raw.strip().removeprefix("qemu-img:").strip()
        if line and not _ADVICE.match(line):
            return _OPEN_PREFIX.sub("", line)
    return ""


def popen(args: list[str], fds: tuple[int, ...], limits: Limits, **kwargs: Any) -> subprocess.Popen[bytes]:
    """Start qemu-img in its own process group (so it can be stopped whole)."""
    command = _command(args, limits)
    try:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            pass_fds=fds,
            env=environment(),
            start_new_session=True,
            **kwargs,
        )
    except OSError as exc:  # EMFILE under `ulimit -n`, EAGAIN under a process limit, ENOMEM
        raise EnvironmentProblem(
            f"cannot start qemu-img: {exc.strerror or exc}", code="cannot_start"
        ) from None


_STDOUT_CAP = 64 << 20  # info/check JSON of an image we accept is kilobytes
_STDERR_CAP = 64 << 10  # enough for any message; a crafted image can make qemu print 100 MB


def _collect(stream: IO[bytes], cap: int, into: list[bytes], overflow: list[bool]) -> None:
    """Keep the first `cap` bytes of a pipe and drain the rest, so qemu-img never blocks on it."""
    kept = 0
    for chunk in iter(lambda: stream.read(1 << 16), b""):
        if kept < cap:
            into.append(chunk[: cap - kept])
            kept += len(into[-1])
        if len(chunk) and kept >= cap:
            overflow[0] = True


def _wrapper_failure(stderr: str) -> str | None:
    """setpriv's or prlimit's own complaint (not qemu-img's): an environment problem."""
    for line in stderr.splitlines():
        if line.startswith(("prlimit:", "setpriv:")):
            return line.strip()
    return None


def run(
    args: list[str], fds: tuple[int, ...] = (), limits: Limits | None = None, ok_codes: tuple[int, ...] = (0,)
) -> subprocess.CompletedProcess[str]:
    """Run qemu-img to completion under `limits` (default: INFO_LIMITS); raise on a limit hit.

    What it prints is bounded too: stdout past 64 MiB is a resource limit, stderr is kept
    to its first 64 KiB (a crafted image made `qemu-img check` print 100 MB of complaints).
    """
    limits = limits or INFO_LIMITS
    proc = popen(args, fds, limits, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out: list[bytes] = []
    err: list[bytes] = []
    too_much = [False]
    ignored = [False]
    readers = [
        threading.Thread(target=_collect, args=(proc.stdout, _STDOUT_CAP, out, too_much), daemon=True),
        threading.Thread(target=_collect, args=(proc.stderr, _STDERR_CAP, err, ignored), daemon=True),
    ]
    for reader in readers:
        reader.start()
    try:
        proc.wait(timeout=limits.wall_seconds or None)
        for reader in readers:
            reader.join()
    except subprocess.TimeoutExpired:
        raise QemuLimitHit(
            f"qemu-img {args[0]} took longer than {limits.wall_seconds:g} s and was stopped"
        ) from None
    finally:
        stop(proc)
    stdout, stderr = b"".join(out).decode(errors="replace"), b"".join(err).decode(errors="replace")
    wrapper = _wrapper_failure(stderr)
    if wrapper:
        raise EnvironmentProblem(f"cannot run qemu-img under its limits: {wrapper}", code="cannot_start")
    if too_much[0]:
        raise QemuLimitHit(f"qemu-img {args[0]} printed more than {_STDOUT_CAP >> 20} MiB and was stopped")
    if proc.returncode in (-signal.SIGKILL, -signal.SIGXCPU, 128 + signal.SIGKILL) or (
        proc.returncode != 0 and any(sign in stderr for sign in _OUT_OF_MEMORY)
    ):
        raise QemuLimitHit(
            f"qemu-img {args[0]} was stopped by a resource limit "
            f"({limits.address_space >> 20} MiB memory, {limits.cpu_seconds} s CPU)"
        )
    if proc.returncode not in ok_codes:
        raise QemuFailed(
            f"qemu-img {args[0]} failed: {cause(stderr) or 'no message'}", proc.returncode, stderr
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


def image_args(path: str, fmt: str | None, flag: str = "-f") -> list[str]:
    """How an image is named to qemu-img: `-f FMT /proc/self/fd/N`, or a `json:` description.

    A json: description (chain.py builds them) names the driver of every node itself and
    every file by descriptor, so qemu-img still probes nothing and opens nothing by name.
    """
    if fmt is None:
        if not path.startswith("json:"):
            raise ValueError("an image without -f must be a json: description")
        return [path]
    return [flag, fmt, path]


def info(path: str, fmt: str | None, fds: tuple[int, ...], *, force_share: bool = True) -> dict[str, Any]:
    """`qemu-img info` read-only; never follows the backing chain of a file given with -f.

    Without `force_share` qemu-img takes the image's locks, which fails while a VM uses it.
    """
    shared = ["--force-share"] if force_share else []
    out = run(["info", "--output=json", *shared, *image_args(path, fmt)], fds).stdout
    data = _json(out, "info")
    if not isinstance(data, dict):
        raise QemuFailed("qemu-img info did not print a JSON object", 0, out)
    return data


def check(path: str, fmt: str | None, fds: tuple[int, ...]) -> tuple[int, dict[str, Any]]:
    """`qemu-img check` (read-only, never `-r`): its exit code (0/2/3 or 1) and report."""
    proc = run(
        ["check", "--output=json", "--force-share", *image_args(path, fmt)],
        fds,
        CHECK_LIMITS,
        ok_codes=(0, 1, 2, 3, 63),
    )
    try:
        report = json.loads(proc.stdout) if proc.stdout.strip() else {}
    except json.JSONDecodeError:
        report = {}
    if proc.returncode == 1 and not report:
        report = {"error": cause(proc.stderr)}
    return proc.returncode, report if isinstance(report, dict) else {}


class TooFragmented(ImageRejected):
    """`qemu-img map` lists more ranges than any honest image has."""

    def __init__(self, count: int) -> None:
        message = (
            f"qemu-img map lists more than {count} ranges: too fragmented to inspect in bounded time "
            "(a crafted image, or one to defragment with qemu-img convert first)"
        )
        super().__init__(message, [Reason("too_fragmented", message)])


def _map_entries(stream: IO[bytes], max_lines: int) -> Iterator[tuple[int, int, int, int]]:
    """(start, length, host, depth) of each data range `qemu-img map --output=json` prints, as it arrives.

    depth is the layer of a backing chain that holds the range (0: the image itself).

    host is -1 where the data cannot be read in place (compressed). Zero and unallocated ranges
    count as lines but are not yielded. Past `max_lines` lines: TooFragmented. A line that is not
    a map entry: QemuFailed.

    Cheap at a million lines: qemu-img prints one object per line in a fixed layout, so a chunk
    of lines is checked and split by one strict regex in C (`^…$` per line, and as many matches
    as lines), and Python only converts the numbers of data lines. A chunk in any other layout
    (another qemu's key order or spacing) is parsed line by line as JSON instead, and each
    object checked.
    """
    # [ , ] frame the array, one object per line; qemu 6.0 added "present", 8.2 "compressed".
    line_re = re.compile(
        rb'^\[?\{ "start": (\d{1,18}), "length": (\d{1,18}), "depth": (\d{1,9}),'
        rb'(?: "present": (?:true|false),)? "zero": (true|false), "data": (true|false)'
        rb'(?:, "compressed": (true|false))?'
        rb'(?:, "offset": (\d{1,18}))?\}[,\]]?\r?$',
        re.MULTILINE,
    )
    longest = 1 << 16  # bytes: no map entry is longer

    def count(value: object) -> bytes | None:
        ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 63
        return str(value).encode() if ok else None

    def from_json(line: bytes) -> tuple[bytes, ...]:
        """One line in another layout, checked and spelt as the regex's groups."""
        try:
            entry = json.loads(line.strip().lstrip(b"[").rstrip(b",]"))
        except (ValueError, RecursionError):  # not JSON, not UTF-8, nested too deep
            entry = None
        fields = entry if isinstance(entry, dict) else {}
        start, length = count(fields.get("start")), count(fields.get("length"))
        depth = count(fields.get("depth")) or b"0"
        if start is None or length is None:
            shown = line[:200].decode(errors="replace")
            raise QemuFailed("qemu-img map printed a line that is not a map entry", 0, shown)
        flags = [b"true" if fields.get(key) is True else b"false" for key in ("zero", "data", "compressed")]
        return start, length, depth, *flags, count(fields.get("offset")) or b""

    lines = 0
    pending = b""
    while True:
        chunk = stream.read(1 << 16)
        text = pending + chunk
        cut = len(text) if not chunk else text.rfind(b"\n") + 1
        text, pending = text[:cut], text[cut:]
        if len(pending) > longest:
            raise QemuFailed("qemu-img map printed a line too long to be a map entry", 0, "")
        if text:
            found = line_re.findall(text)
            lines += len(found)
            if len(found) != text.count(b"\n") + (not text.endswith(b"\n")):
                rows = [row for row in text.splitlines() if row.strip()]
                lines += len(rows) - len(found)
                found = [from_json(row) for row in rows]
            if lines > max_lines:
                raise TooFragmented(max_lines)
            for start, length, depth, zero, data, compressed, offset in found:
                if data == b"true" and zero == b"false":
                    host = int(offset) if offset and compressed != b"true" else -1
                    yield int(start), int(length), host, int(depth)
        if not chunk:
            return


def map_extents(
    path: str, fmt: str | None, fds: tuple[int, ...], max_extents: int = MAX_MAP_EXTENTS
) -> list[Extent]:
    """`qemu-img map`: the guest ranges that hold data, and where (None when compressed).

    Streamed and bounded: past `max_extents` lines qemu-img is stopped and the image refused
    (TooFragmented), so a tiny crafted qcow2 whose map has millions of lines costs seconds.
    Ranges are kept as three int64 arrays (24 bytes each) while qemu-img prints, and become
    Extents only once the whole map is known to be within bounds.
    """
    import gc
    from array import array

    args = ["map", "--output=json", "--force-share", *image_args(path, fmt)]
    proc = popen(args, fds, CHECK_LIMITS, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    errors: list[bytes] = []
    drain = threading.Thread(target=_collect, args=(proc.stderr, _STDERR_CAP, errors, [False]), daemon=True)
    drain.start()
    expired = threading.Event()

    def expire() -> None:  # the wall clock also bounds the reading, not only the wait
        expired.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    timer = threading.Timer(CHECK_LIMITS.wall_seconds, expire)
    timer.daemon = True
    timer.start()
    starts, lengths, hosts, layers = array("q"), array("q"), array("q"), array("q")
    try:
        assert proc.stdout is not None
        for start, length, host, depth in _map_entries(proc.stdout, max_extents):
            if length > 0:
                starts.append(start)
                lengths.append(length)
                hosts.append(host)
                layers.append(depth)
        proc.wait()
    finally:
        timer.cancel()
        stop(proc)
        drain.join(timeout=5)
    if expired.is_set():
        raise QemuLimitHit(f"qemu-img map took longer than {CHECK_LIMITS.wall_seconds:g} s and was stopped")
    stderr = b"".join(errors).decode(errors="replace")
    wrapper = _wrapper_failure(stderr)
    if wrapper:
        raise EnvironmentProblem(f"cannot run qemu-img under its limits: {wrapper}", code="cannot_start")
    if proc.returncode in (-signal.SIGKILL, -signal.SIGXCPU, 128 + signal.SIGKILL) or (
        proc.returncode != 0 and any(sign in stderr for sign in _OUT_OF_MEMORY)
    ):
        raise QemuLimitHit(
            f"qemu-img map was stopped by a resource limit ({CHECK_LIMITS.address_space >> 20} MiB memory, "
            f"{CHECK_LIMITS.cpu_seconds} s CPU)"
        )
    if proc.returncode != 0:
        raise QemuFailed(f"qemu-img map failed: {cause(stderr) or 'no message'}", proc.returncode, stderr)
    sizes: dict[int, int] = {}  # lengths repeat (whole clusters): one int object each
    collecting = gc.isenabled()
    gc.disable()  # up to a million new objects, none in a cycle: collecting meanwhile is 40% of it
    try:
        return [
            Extent(start, sizes.setdefault(length, length), host if host >= 0 else None, layer)
            for start, length, host, layer in zip(starts, lengths, hosts, layers, strict=True)
        ]
    finally:
        if collecting:
            gc.enable()


def create(path: str, fmt: str, size: int, options: dict[str, str], fds: tuple[int, ...]) -> None:
    """`qemu-img create` onto a file we already opened (O_EXCL), so no name is followed."""
    opts = ",".join(f"{k}={v}" for k, v in options.items())
    run(["create", "-q", "-f", fmt, "-o", opts, path, str(size)], fds)


_PERCENT = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")
_LOCKED = re.compile(r'Failed to get (?:shared )?"\w+" lock')
_READ_ERROR = re.compile(r"error while reading|Could not read|could not read", re.IGNORECASE)


class ConvertJob:
    """A running `qemu-img convert` into an already created qcow2: its progress, and why it failed.

    `-W` lets compression run on every core (writes land out of order; qcow2
    compressed writes are serialised safely by qemu); `-S 4k` leaves zero blocks
    unallocated; `--target-is-zero` skips writing zeros into the fresh image.
    """

    def __init__(
        self,
        src: str,
        src_fmt: str | None,
        dst: str,
        *,
        compress: bool,
        coroutines: int,
        fds: tuple[int, ...],
        snapshot: str | None = None,
    ) -> None:
        args = ["convert", "-p", "-n", "--target-is-zero", "-W", "-m", str(coroutines), "-S", "4k"]
        if snapshot is not None:  # an internal snapshot's state instead of the current one
            args += ["-l", f"snapshot.id={snapshot}"]
        args += ["-O", "qcow2", *(["-c"] if compress else []), *image_args(src, src_fmt), dst]
        self.percent = 0.0
        self._stderr: list[bytes] = []
        self.proc = popen(args, fds, BULK_LIMITS, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._readers = [
            threading.Thread(target=self._read_progress, daemon=True),
            threading.Thread(target=lambda: self._stderr.append(self.proc.stderr.read()), daemon=True),  # type: ignore[union-attr]
        ]
        for reader in self._readers:
            reader.start()

    def _read_progress(self) -> None:
        stdout = self.proc.stdout
        assert stdout is not None
        for chunk in iter(lambda: stdout.read1(4096), b""):  # type: ignore[attr-defined]
            found = _PERCENT.findall(chunk)
            if found:
                self.percent = float(found[-1])

    def running(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds; True while qemu-img still runs."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=timeout)
        return self.proc.returncode is None

    def close(self) -> None:
        stop(self.proc)
        for reader in self._readers:
            reader.join(timeout=5)

    def failure(self, input_path: str, output_path: str) -> ImagetoolError | None:
        """None when qemu-img succeeded; else the error its exit and stderr describe."""
        stderr = b"".join(self._stderr).decode(errors="replace")
        return convert_failure(self.proc.returncode, stderr, input_path, output_path)

    def __enter__(self) -> ConvertJob:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_locked(stderr: str) -> bool:
    """qemu's own words for an image whose lock another process (a running VM) holds."""
    return bool(_LOCKED.search(stderr))


def convert_failure(
    code: int | None, stderr: str, input_path: str, output_path: str
) -> ImagetoolError | None:
    """Whose fault a failed `qemu-img convert` was, from its exit status and stderr."""
    if code == 0:
        return None
    text = cause(stderr) or f"exit status {code}"
    wrapper = _wrapper_failure(stderr)
    if wrapper:
        return EnvironmentProblem(f"cannot run qemu-img under its limits: {wrapper}", code="cannot_start")
    if code in (-signal.SIGKILL, -signal.SIGXCPU) or any(s in stderr for s in _OUT_OF_MEMORY):
        return QemuLimitHit(f"qemu-img convert was stopped by a resource limit ({text})")
    if "No space left" in stderr or "Disk quota" in stderr:
        return EnvironmentProblem(f"disk full while writing ({text})", path=output_path, code="disk_full")
    if "File too large" in stderr or code == -signal.SIGXFSZ:
        return EnvironmentProblem(
            f"the file size limit was reached (ulimit -f?) ({text})", path=output_path, code="file_too_big"
        )
    if is_locked(stderr):  # not a bare "lock": "block" appears in ordinary I/O errors
        return EnvironmentProblem(f"the input is in use by another process ({text})", code="locked")
    if _READ_ERROR.search(stderr):  # the input's data cannot be read: the image's fault
        message = f"the image's data cannot be read ({text}): corrupt"
        return ImageRejected(message, [Reason("corrupt", message)], path=input_path)
    return EnvironmentProblem(f"qemu-img convert failed: {text}", path=output_path, code="convert_failed")


def compare(path_a: str, fmt_a: str | None, path_b: str, fmt_b: str, fds: tuple[int, ...]) -> bool:
    """`qemu-img compare`: True when the guest contents are identical, False when they differ.

    Not `-s`: a raw hole and a qcow2 unallocated cluster are both zeros, and strict
    mode would call that a difference. The callers require equal virtual sizes.
    Any other outcome (a read error: exit 2-4) raises QemuFailed.
    """
    proc = run(
        ["compare", *image_args(path_a, fmt_a)[:-1], "-F", fmt_b, "--force-share", path_a, path_b],
        fds,
        BULK_LIMITS,
        ok_codes=(0, 1),
    )
    return proc.returncode == 0
