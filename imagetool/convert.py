"""`convert`: any input the inspector accepts -> sparse, compressed qcow2, atomically.

The pipeline: inspect (an unsafe input is refused before qemu-img opens it for
conversion) -> predict the compressed size and refuse a doomed job (gate 1) ->
check free space -> create a fresh temp file (O_EXCL) beside the target ->
`qemu-img convert` into it while watching its size (gate 2) -> fsync, confirm the
size (gate 3) -> verify (inspect, check, compare) -> rename into place. Any
failure, Ctrl-C or SIGTERM removes the temp file; the target is never touched
until the final rename.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagetool import qemu
from imagetool.errors import (
    EnvironmentProblem,
    ImagetoolError,
    Interrupted,
    Reason,
    SizeLimitExceeded,
    UsageProblem,
)
from imagetool.estimate import Estimate, GuestReader, ceiling, estimate
from imagetool.inspection import DEFAULT_MAX_VIRTUAL_SIZE, Report, inspect_source
from imagetool.progress import Callback, Progress
from imagetool.sizes import Extent, GiB, MiB, data_extents, human
from imagetool.source import Source, from_descriptor, open_source

DEFAULT_LIMIT = 50 * GiB  # the library fails images whose compressed image is bigger
CLUSTER_SIZE = 256 * 1024  # measured: 0.55x plain qemu-img time, +0.7% size vs 64 KiB
COMPRESSIONS = ("zlib", "zstd", "none")
SCHEMA = "imagetool.convert/1"
_POLL = 0.2  # seconds between looks at qemu-img's progress and the output's size
_LOCKED = re.compile(r'Failed to get (?:shared )?"\w+" lock')
_PERCENT = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


@dataclass
class ConvertResult:
    source: str
    output: str | None
    compression: str
    cluster_size: int
    virtual_size: int
    disk_size: int | None
    output_size: int | None = None
    limit: int = DEFAULT_LIMIT
    estimate: Estimate | None = None
    verified: bool = False
    seconds: float = 0.0
    warnings: list[Reason] = field(default_factory=list)
    input_report: Report | None = None
    output_report: Report | None = None  # the verified output's inspection

    def as_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "ok": True,
            "source": self.source,
            "output": self.output,
            "format": "qcow2",
            "compression": self.compression,
            "cluster_size": self.cluster_size,
            "virtual_size": self.virtual_size,
            "disk_size": self.disk_size,
            "output_size": self.output_size,
            "limit": self.limit,
            "estimate": self.estimate.as_dict() if self.estimate else None,
            "verified": self.verified,
            "seconds": round(self.seconds, 3),
            "warnings": [w.as_dict() for w in self.warnings],
        }


def default_output(source: str) -> Path:
    return Path(source).with_suffix(".qcow2")


def _check_output(src: Source, output: Path, force: bool) -> None:
    """Refuse outputs that would lose data or follow a link, before any work is done."""
    try:
        st = os.lstat(output)
    except FileNotFoundError:
        st = None
    if st is not None:
        if stat.S_ISLNK(st.st_mode):
            raise UsageProblem(
                "output is a symbolic link; give a real path", path=str(output), code="output_symlink"
            )
        if (st.st_dev, st.st_ino) == (src.device, src.inode):
            raise UsageProblem(
                "output is the input itself; choose another -o", path=str(output), code="output_is_input"
            )
        if stat.S_ISDIR(st.st_mode):
            raise UsageProblem(
                "output is a directory; name a file", path=str(output), code="output_is_directory"
            )
        if not force:
            raise UsageProblem(
                "output exists; pass --force to replace it", path=str(output), code="output_exists"
            )
    if not output.parent.is_dir():
        raise EnvironmentProblem(
            f"directory {output.parent} does not exist", path=str(output), code="no_directory"
        )
    if not os.access(output.parent, os.W_OK):
        raise EnvironmentProblem(
            f"directory {output.parent} is not writable", path=str(output), code="permission_denied"
        )


def _guest_extents(src: Source, report: Report) -> list[Extent]:
    """Where the guest's data lives in the input file (host None: only qemu can read it)."""
    if report.format == "raw":
        return [Extent(s, e - s, s) for s, e in data_extents(src.fd, src.size)]
    return report.data_map or []


def predict(src: Source, report: Report, compression: str, limit: int | None = None) -> Estimate | None:
    """Predict the output size; with `limit`, skip sampling when even the ceiling fits under it.

    None when the data cannot be sampled (a compressed input) and the ceiling does not fit.
    """
    extents = _guest_extents(src, report)
    virtual_size = int(report.virtual_size or 0)
    most = ceiling(extents, virtual_size, CLUSTER_SIZE, compression)
    if limit is not None and most.high <= limit:
        return most
    if any(e.host is None for e in extents):
        return None
    reader = GuestReader(src.fd, extents)
    return estimate(reader, virtual_size, CLUSTER_SIZE, compression, seed=src.size)


def _gate_before(est: Estimate | None, limit: int, path: str) -> list[Reason]:
    if est is None:
        return [
            Reason(
                "no_estimate",
                "the compressed size cannot be predicted for this input "
                "(its data is itself compressed); the limit is enforced while converting",
            )
        ]
    if est.low > limit:
        raise SizeLimitExceeded(
            f"predicted compressed size {human(est.bytes)} (at least {human(est.low)}) is over "
            f"the limit of {human(limit)}; nothing was written",
            path=path,
        )
    if est.high > limit:
        return [
            Reason(
                "may_exceed_limit",
                f"predicted compressed size {human(est.bytes)} could reach {human(est.high)}, "
                f"over the limit of {human(limit)}; converting anyway, the limit is watched",
            )
        ]
    return []


def _check_free_space(directory: Path, needed: int) -> None:
    vfs = os.statvfs(directory)
    free = vfs.f_bavail * vfs.f_frsize
    if needed > free:
        raise EnvironmentProblem(
            f"not enough free space in {directory}: the output may need up to {human(needed)}, "
            f"{human(free)} is free",
            code="disk_full",
        )


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum: int, frame: object) -> None:
        raise Interrupted()

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _temp_beside(output: Path) -> Iterator[tuple[int, Path]]:
    """A new, exclusively created temp file in the output's directory; removed unless renamed."""
    fd, name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".imagetool-tmp", dir=output.parent)
    path = Path(name)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would outlive the rename: use what any new file gets
    try:
        yield fd, path
    finally:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _install(tmp: Path, output: Path, force: bool) -> None:
    """Move the finished temp file into place: replace only with --force, never clobber else."""
    if force:
        os.replace(tmp, output)
    else:
        try:
            os.link(tmp, output)  # fails if something appeared at `output` meanwhile
        except FileExistsError:
            raise UsageProblem(
                "output appeared while converting; pass --force to replace it",
                path=str(output),
                code="output_exists",
            ) from None
        tmp.unlink()
    dir_fd = os.open(output.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _supports_direct_io(path: str) -> bool:
    """O_DIRECT works on most filesystems, not on tmpfs: ask the one we write to."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_DIRECT))
    except OSError:
        return False
    return True


def _qemu_error(stderr: str, output: Path) -> ImagetoolError:
    text = stderr.strip().splitlines()[-1] if stderr.strip() else "no message"
    if "No space left" in stderr or "Disk quota" in stderr:
        return EnvironmentProblem(
            f"disk full while writing the output ({text})", path=str(output), code="disk_full"
        )
    if _LOCKED.search(stderr):  # not a bare "lock": "block" appears in ordinary I/O errors
        return EnvironmentProblem(f"the input is in use by another process ({text})", code="locked")
    return EnvironmentProblem(f"qemu-img convert failed: {text}", path=str(output), code="convert_failed")


def _run_convert(
    src: Source,
    report: Report,
    tmp_fd: int,
    *,
    compress: bool,
    coroutines: int,
    limit: int,
    output: Path,
    progress: Callback | None,
) -> None:
    """Run qemu-img convert; watch progress and the output size; stop it past the limit."""
    tmp_proc = f"/proc/self/fd/{tmp_fd}"
    proc = qemu.start_convert(
        src.proc_path,
        str(report.format),
        tmp_proc,
        compress=compress,
        coroutines=coroutines,
        fds=(src.fd, tmp_fd),
    )
    total = int(report.virtual_size or 0)
    percent = [0.0]
    stderr_chunks: list[bytes] = []

    def read_progress() -> None:
        assert proc.stdout is not None
        for chunk in iter(lambda: proc.stdout.read1(4096), b""):  # type: ignore[union-attr]
            found = _PERCENT.findall(chunk)
            if found:
                percent[0] = float(found[-1])

    def read_stderr() -> None:
        assert proc.stderr is not None
        stderr_chunks.append(proc.stderr.read())

    readers = [
        threading.Thread(target=read_progress, daemon=True),
        threading.Thread(target=read_stderr, daemon=True),
    ]
    for t in readers:
        t.start()
    started = time.monotonic()
    try:
        while proc.poll() is None:
            written = os.fstat(tmp_fd).st_size
            if written > limit:  # gate 2: don't spend an hour on a doomed job
                qemu.stop(proc)
                raise SizeLimitExceeded(
                    f"output grew past the limit of {human(limit)} at {percent[0]:.0f}% of the "
                    f"disk; stopped, nothing was written",
                    path=str(output),
                )
            if progress:
                done = int(total * percent[0] / 100)
                progress(Progress(done, total, time.monotonic() - started, written))
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=_POLL)
    finally:
        qemu.stop(proc)
        for t in readers:
            t.join(timeout=5)
    if progress and proc.returncode == 0:
        progress(Progress(total, total, time.monotonic() - started, os.fstat(tmp_fd).st_size))
    if proc.returncode != 0:
        raise _qemu_error(b"".join(stderr_chunks).decode(errors="replace"), output)


def _verify(src: Source, report: Report, tmp_fd: int, tmp: Path) -> Report:
    """The output must pass the inspector (with a clean check) and match the input exactly."""
    out_src = from_descriptor(str(tmp), tmp_fd)
    with out_src:
        out = inspect_source(out_src, "qcow2", max(DEFAULT_MAX_VIRTUAL_SIZE, report.virtual_size or 0))
        problems = out.reasons + [w for w in out.warnings if w.code == "leaked_clusters"]
        if problems:
            raise ImagetoolError(
                f"verification failed: the output is not clean qcow2: {problems[0].message}",
                code="verify_failed",
            )
        if out.virtual_size != report.virtual_size:
            raise ImagetoolError("verification failed: output and input sizes differ", code="verify_failed")
        same = qemu.compare(
            src.proc_path, str(report.format), out_src.proc_path, "qcow2", (src.fd, out_src.fd)
        )
    if not same:
        raise EnvironmentProblem(
            "verification failed: the output differs from the input "
            "(was the input written to while converting?)",
            path=src.path,
            code="verify_failed",
        )
    return out


def convert(
    source: str,
    output: str | None = None,
    *,
    compression: str = "zlib",
    coroutines: int = 8,
    limit: int = DEFAULT_LIMIT,
    verify: bool = True,
    force: bool = False,
    estimate_only: bool = False,
    claimed_format: str | None = None,
    max_virtual_size: int = DEFAULT_MAX_VIRTUAL_SIZE,
    progress: Callback | None = None,
    on_start: Callable[[Report], None] | None = None,
) -> ConvertResult:
    """Convert `source` to compressed qcow2 at `output` (default: SOURCE.qcow2).

    `on_start` is called with the input's inspection once every check before
    writing has passed (prepare records the job as `creating` there).
    """
    if compression not in COMPRESSIONS:
        raise UsageProblem(
            f"--compression {compression!r} is not one of {', '.join(COMPRESSIONS)}", code="bad_compression"
        )
    if not 1 <= coroutines <= 16:
        raise UsageProblem("--threads must be between 1 and 16", code="bad_threads")
    started = time.monotonic()
    with open_source(source) as src:
        report = inspect_source(src, claimed_format, max_virtual_size)
        if not report.safe:
            raise report.rejected()
        target = Path(output) if output else default_output(source)
        if not estimate_only:
            _check_output(src, target, force)
        est = predict(src, report, compression, None if estimate_only else limit)
        result = ConvertResult(
            source=source,
            output=None if estimate_only else str(target),
            compression=compression,
            cluster_size=CLUSTER_SIZE,
            virtual_size=int(report.virtual_size or 0),
            disk_size=report.disk_size,
            limit=limit,
            estimate=est,
            input_report=report,
        )
        result.warnings += report.warnings
        gate = _gate_before(est, limit, source)
        if estimate_only:
            result.warnings += [w for w in gate if w.code != "no_estimate"]
            result.seconds = time.monotonic() - started
            return result
        result.warnings += gate
        _check_free_space(target.parent, min(est.high if est else src.allocated, limit) + 4 * MiB)
        if on_start:
            on_start(report)
        with _sigterm_unwinds(), _temp_beside(target) as (tmp_fd, tmp):
            options = {"cluster_size": str(CLUSTER_SIZE), "compat": "1.1"}
            if compression != "none":
                options["compression_type"] = compression
            qemu.create(f"/proc/self/fd/{tmp_fd}", "qcow2", result.virtual_size, options, (tmp_fd,))
            _run_convert(
                src,
                report,
                tmp_fd,
                compress=compression != "none",
                coroutines=coroutines,
                limit=limit,
                output=target,
                progress=progress,
            )
            os.fsync(tmp_fd)
            result.output_size = os.fstat(tmp_fd).st_size
            if result.output_size > limit:  # gate 3: confirm
                raise SizeLimitExceeded(
                    f"output is {human(result.output_size)}, over the limit of {human(limit)}; removed",
                    path=str(target),
                )
            if verify:
                result.output_report = _verify(src, report, tmp_fd, tmp)
                result.verified = True
            _install(tmp, target, force)
    result.seconds = time.monotonic() - started
    return result
