"""`convert`: any input the inspector accepts -> sparse, compressed qcow2, atomically.

The pipeline: inspect (an unsafe input is refused before qemu-img opens it for
conversion) -> predict the compressed size and refuse a doomed job (gate 1) ->
check free space -> a fresh temp file beside the target (output.py) ->
`qemu-img convert` into it while watching its size (gate 2) -> fsync, confirm the
size (gate 3) -> the input must be the very file it was (same inode, size,
mtime, ctime) -> verify (inspect, check, compare) -> the input unchanged again ->
link into place. Any failure, Ctrl-C or signal removes the temp file; the target
is never touched until the final link.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from imagetool import output as outputs
from imagetool import qcow2, qemu
from imagetool.codecs import encoder
from imagetool.errors import EnvironmentProblem, Reason, SizeLimitExceeded, UsageProblem, VerifyFailed
from imagetool.estimate import Estimate, GuestReader, ceiling, data_clusters, estimate
from imagetool.inspection import DEFAULT_MAX_VIRTUAL_SIZE, Report, examine, inspect_source
from imagetool.policy import MAX_COMPRESSED_SIZE, MIN_COMPRESSED_SIZE
from imagetool.progress import Callback, Progress
from imagetool.sizes import Extent, MiB, apart, data_extents, human, over_limit
from imagetool.source import Source, from_descriptor, open_source

DEFAULT_LIMIT = MAX_COMPRESSED_SIZE
CLUSTER_SIZE = 256 * 1024  # measured: 0.55x plain qemu-img time, +0.7% size vs 64 KiB
COMPRESSIONS = ("zlib", "zstd", "none")
ENGINES = ("native", "qemu")
QEMU_COROUTINES = 8  # qemu-img's -m default, and what measured best with -W here


@dataclass(frozen=True)
class Writer:
    """Who writes the output's clusters: imagetool's own qcow2 writer, or qemu-img convert.

    The native writer (qcow2.py) reads the guest data where it knows where it lives
    (raw extents, uncompressed clusters through qemu-img map's host offsets) and
    compresses on `threads` threads with ISA-L or zstd; anything it cannot read, and
    `--compression none`, goes to qemu-img. `codec` names the encoder (imagetool.codecs)
    the estimate must sample with, so the prediction is for the bytes really written.
    """

    engine: str
    compression: str
    level: int | None
    threads: int

    @property
    def codec(self) -> str:
        if self.compression == "zlib" and self.engine == "qemu":
            return "zlib-qemu"
        return self.compression


SCHEMA = "imagetool.convert/1"
_POLL = 0.2  # seconds between looks at qemu-img's progress and the output's size


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
    output_key: outputs.FileKey | None = None  # (device, inode) of the file put in place
    writer: Writer | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "ok": True,
            "source": self.source,
            "output": self.output,
            "format": "qcow2",
            "compression": self.compression,
            "engine": self.writer.engine if self.writer else None,
            "level": self.writer.level if self.writer else None,
            "threads": self.writer.threads if self.writer else None,
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


def guest_extents(src: Source, report: Report, data_map: list[Extent] | None) -> list[Extent]:
    """Where the guest's data lives in the input file (host None: only qemu can read it)."""
    if report.format == "raw":
        return [Extent(s, e - s, s) for s, e in data_extents(src.fd, src.size)]
    return data_map or []


def predict(
    fds: tuple[int, ...],
    report: Report,
    extents: list[Extent],
    writer: Writer,
    limit: int | None = None,
) -> Estimate | None:
    """Predict the output size; with `limit`, skip sampling when even the ceiling fits under it.

    None when the data cannot be sampled (a compressed input) and the ceiling does not fit.
    """
    virtual_size = int(report.virtual_size or 0)
    most = ceiling(extents, virtual_size, CLUSTER_SIZE, writer.compression)
    if limit is not None and most.high <= limit:
        return most
    if any(e.host is None for e in extents):
        return None
    reader = GuestReader(fds, extents)
    return estimate(reader, virtual_size, CLUSTER_SIZE, writer.codec, seed=virtual_size, level=writer.level)


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
        low, most = apart(est.low, limit)
        raise SizeLimitExceeded(
            f"predicted compressed size {human(est.bytes)} (at least {low}) is over the limit of {most}; "
            "nothing was written",
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


def _run_convert(inp: Input, out: outputs.Pending, writer: Writer, opts: Options) -> None:
    """Run qemu-img convert; report progress, watch the output size, stop it past the limit."""
    total = int(inp.report.virtual_size or 0)
    started = time.monotonic()
    job = qemu.ConvertJob(
        inp.qemu_name,
        inp.qemu_format,
        out.proc_path,
        compress=opts.compression != "none",
        coroutines=writer.threads,
        fds=(*inp.fds, out.fd),
        snapshot=inp.snapshot,
    )
    with job:
        while job.running(_POLL):
            written = out.size()
            if written > opts.limit:  # gate 2: don't spend an hour on a doomed job
                raise SizeLimitExceeded(
                    f"output grew past the limit of {human(opts.limit)} at {job.percent:.0f}% of the "
                    "disk; stopped, nothing was written",
                    path=str(out.target),
                )
            if opts.progress:
                done = int(total * job.percent / 100)
                opts.progress(Progress(done, total, time.monotonic() - started, written))
    failure = job.failure(inp.source, str(out.target))
    if failure is not None:
        raise failure
    if opts.progress:
        opts.progress(Progress(total, total, time.monotonic() - started, out.size()))


def _verify(inp: Input, out: outputs.Pending) -> tuple[Report, bool]:
    """The output must pass the inspector (with a clean check) and hold exactly the input's disk.

    Returns the output's report and whether it was compared (an internal snapshot can't be).
    """
    report = inp.report
    with from_descriptor(str(out.target), out.fd) as written:
        result = inspect_source(written, "qcow2", max(DEFAULT_MAX_VIRTUAL_SIZE, report.virtual_size or 0))
        problems = [*result.reasons, *(w for w in result.warnings if w.code == "leaked_clusters")]
        if problems:
            raise VerifyFailed(f"verification failed: the output is not clean qcow2: {problems[0].message}")
        if result.virtual_size != report.virtual_size:
            raise VerifyFailed("verification failed: output and input virtual sizes differ")
        if inp.snapshot is not None:
            return result, False
        try:
            same = qemu.compare(
                inp.qemu_name, inp.qemu_format, written.proc_path, "qcow2", (*inp.fds, written.fd)
            )
        except qemu.QemuFailed as exc:
            raise VerifyFailed(f"verification failed: {exc.message}") from None
    if not same:
        raise VerifyFailed("verification failed: the output differs from the input", path=inp.source)
    return result, True


def check_options(
    compression: str, threads: int | None, limit: int, engine: str = "native", level: int | None = None
) -> None:
    """Refuse bad options before any file is opened (prepare validates with this too)."""
    if compression not in COMPRESSIONS:
        raise UsageProblem(
            f"--compression {compression!r} is not one of {', '.join(COMPRESSIONS)}", code="bad_compression"
        )
    if engine not in ENGINES:
        raise UsageProblem(f"--engine {engine!r} is not one of {', '.join(ENGINES)}", code="bad_engine")
    if threads is not None and not 1 <= threads <= 16:
        raise UsageProblem("--threads must be between 1 and 16", code="bad_threads")
    if level is not None:
        if engine == "qemu" or compression == "none":
            raise UsageProblem(
                "--level applies to the native writer's zlib or zstd (qemu-img has one level)",
                code="bad_level",
            )
        try:
            encoder(compression, level)
        except ValueError as exc:
            raise UsageProblem(f"--level {level}: {exc}", code="bad_level") from None
    if limit < MIN_COMPRESSED_SIZE:
        raise UsageProblem(
            f"--max-compressed-size {limit} bytes is below {human(MIN_COMPRESSED_SIZE)}: "
            "no qcow2 is that small",
            code="bad_size",
        )


def choose_writer(
    engine: str, compression: str, level: int | None, threads: int | None, extents: list[Extent]
) -> Writer:
    """The native writer where it can read every data range itself; qemu-img otherwise."""
    native = engine == "native" and compression != "none" and all(e.host is not None for e in extents)
    if native:
        return Writer("native", compression, level, threads or min(16, os.cpu_count() or 1))
    return Writer("qemu", compression, None, threads or QEMU_COROUTINES)


def _write_native(
    inp: Input,
    out: outputs.Pending,
    writer: Writer,
    limit: int,
    progress: Callback | None,
) -> None:
    """The native writer: the guest data read through the input's descriptors, clusters compressed
    on `writer.threads` threads, written in order into the temp file; past `limit` it stops."""
    report, extents = inp.report, inp.extents
    total = int(report.virtual_size or 0)
    started = time.monotonic()
    done = [0]
    reader = GuestReader(inp.fds, extents)

    def read(offset: int, length: int) -> bytes:
        try:
            return reader.read(offset, length)
        except OSError as exc:
            raise outputs.os_error(exc, inp.source, "read the input") from None

    def report_progress(guest_done: int, written: int) -> None:
        done[0] = guest_done
        if progress:
            progress(Progress(guest_done, total, time.monotonic() - started, written))

    try:
        qcow2.write_qcow2(
            read,
            data_clusters(extents, CLUSTER_SIZE),
            total,
            out.fd,
            cluster_size=CLUSTER_SIZE,
            codec=writer.codec,
            level=writer.level,
            threads=writer.threads,
            on_progress=report_progress,
            limit=limit,
        )
    except qcow2.OutputTooBig:
        percent = 100 * done[0] // max(1, total)
        raise SizeLimitExceeded(
            f"output grew past the limit of {human(limit)} at {percent}% of the disk; stopped, "
            "nothing was written",
            path=str(out.target),
        ) from None
    except OSError as exc:
        raise outputs.os_error(exc, out.target) from None


@dataclass(frozen=True)
class Options:
    """How to convert: the same for `convert`, `prepare` and `snapshot`."""

    compression: str = "zlib"
    threads: int | None = None
    engine: str = "native"
    level: int | None = None
    limit: int = DEFAULT_LIMIT
    verify: bool = True
    force: bool = False
    estimate_only: bool = False
    progress: Callback | None = None
    on_start: Callable[[Report], None] | None = None
    before_commit: Callable[[Source, Report | None], None] | None = None

    def check(self) -> None:
        check_options(self.compression, self.threads, self.limit, self.engine, self.level)


@dataclass(frozen=True)
class Input:
    """What a conversion reads: its inspection, where its guest data lives, how qemu-img names it.

    One file (`convert`) or a validated backing chain (`snapshot`); either way every file
    in `sources` was opened by imagetool, none may be replaced by the output, and all must
    be unchanged when the output is kept.
    """

    source: str  # as the user named it
    report: Report
    extents: list[Extent]  # host None where only qemu-img can read the data
    qemu_name: str  # /proc/self/fd/N of the file, or a chain's json: description
    qemu_format: str | None  # None with a json: description (it names every driver)
    sources: tuple[Source, ...]
    snapshot: str | None = None  # an internal snapshot's id to export instead of the current state

    @property
    def fds(self) -> tuple[int, ...]:
        return tuple(s.fd for s in self.sources)

    @property
    def keys(self) -> set[outputs.FileKey]:
        return {(s.device, s.inode) for s in self.sources}

    def ensure_unchanged(self) -> None:
        for source in self.sources:
            source.ensure_unchanged()


def convert(
    source: str,
    output: str | None = None,
    *,
    compression: str = "zlib",
    threads: int | None = None,
    engine: str = "native",
    level: int | None = None,
    limit: int = DEFAULT_LIMIT,
    verify: bool = True,
    force: bool = False,
    estimate_only: bool = False,
    claimed_format: str | None = None,
    max_virtual_size: int = DEFAULT_MAX_VIRTUAL_SIZE,
    progress: Callback | None = None,
    on_start: Callable[[Report], None] | None = None,
    before_commit: Callable[[Source, Report | None], None] | None = None,
) -> ConvertResult:
    """Convert `source` to compressed qcow2 at `output` (default: SOURCE.qcow2).

    `on_start` is called with the input's inspection once every check before
    writing has passed (prepare records the job as `creating` there);
    `before_commit` with the finished output (and its verified report) before it is
    put in place, so a caller can measure it while a failure still removes it.
    """
    opts = Options(
        compression,
        threads,
        engine,
        level,
        limit,
        verify,
        force,
        estimate_only,
        progress,
        on_start,
        before_commit,
    )
    opts.check()
    with open_source(source) as src:
        target = Path(output) if output is not None else default_output(source)
        if not estimate_only:
            outputs.check_target(target, force=force, inputs={(src.device, src.inode)})
        report, data_map = examine(src, claimed_format, max_virtual_size)
        if not report.safe:
            raise report.rejected()
        extents = guest_extents(src, report, data_map)
        inp = Input(source, report, extents, src.proc_path, report.format, (src,))
        return convert_input(inp, target, opts)


def convert_input(inp: Input, target: Path, opts: Options) -> ConvertResult:
    """The pipeline every conversion shares: predict (gate 1), write (gate 2), confirm (gate 3),
    the inputs unchanged, verify, the inputs unchanged again, link into place."""
    started = time.monotonic()
    report = inp.report
    writer = choose_writer(opts.engine, opts.compression, opts.level, opts.threads, inp.extents)
    if inp.snapshot is not None:  # qemu-img reads a snapshot's state; qemu-img map shows today's
        writer = replace(writer, engine="qemu", level=None, threads=opts.threads or QEMU_COROUTINES)
    est = predict(inp.fds, report, inp.extents, writer, None if opts.estimate_only else opts.limit)
    result = ConvertResult(
        source=inp.source,
        output=None if opts.estimate_only else str(target),
        compression=opts.compression,
        cluster_size=CLUSTER_SIZE,
        virtual_size=int(report.virtual_size or 0),
        disk_size=report.disk_size,
        limit=opts.limit,
        estimate=est,
        input_report=report,
        writer=writer,
    )
    result.warnings += report.warnings
    gate = _gate_before(est, opts.limit, inp.source)
    if opts.estimate_only:
        result.warnings += [w for w in gate if w.code != "no_estimate"]
        result.seconds = time.monotonic() - started
        return result
    result.warnings += gate
    allocated = sum(s.allocated for s in inp.sources)
    _check_free_space(target.parent, min(est.high if est else allocated, opts.limit) + 4 * MiB)
    if opts.on_start:
        opts.on_start(report)
    with outputs.pending(target, force=opts.force, inputs=inp.keys) as out:
        if writer.engine == "native":
            _write_native(inp, out, writer, opts.limit, opts.progress)
        else:
            options = {"cluster_size": str(CLUSTER_SIZE), "compat": "1.1"}
            if opts.compression != "none":
                options["compression_type"] = opts.compression
            qemu.create(out.proc_path, "qcow2", result.virtual_size, options, (out.fd,))
            _run_convert(inp, out, writer, opts)
        os.fsync(out.fd)
        result.output_size = out.size()
        if result.output_size > opts.limit:  # gate 3: confirm
            raise SizeLimitExceeded(
                f"output is {over_limit(result.output_size, opts.limit)}; removed", path=str(target)
            )
        inp.ensure_unchanged()
        if opts.verify:
            result.output_report, compared = _verify(inp, out)
            result.verified = True
            if not compared:
                result.warnings.append(
                    Reason(
                        "not_compared",
                        "qemu-img can read an internal snapshot only by converting it: the output was "
                        "inspected and checked, not compared",
                    )
                )
            inp.ensure_unchanged()
        if opts.before_commit:
            with from_descriptor(str(target), out.fd) as written:
                opts.before_commit(written, result.output_report)
        st = os.fstat(out.fd)
        out.commit()
        result.output_key = (st.st_dev, st.st_ino)
    result.seconds = time.monotonic() - started
    return result
