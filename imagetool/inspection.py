"""`inspect`: the truth about one disk image, checked in an order a hostile image can't exploit.

1. open once, safely (source.py);  2. detect format from content, header safety
checks and size policy (detect.py) — nothing opens the image beyond its header
before these pass;  3. `qemu-img info`, cross-checked against our own reading;
4. `qemu-img check` for qcow2;  5. sizes, with disk_size counted exactly.
Each stage that finds a problem stops the pipeline and names it in `reasons`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from imagetool import qemu
from imagetool.detect import ACCEPTED_FORMATS, detect, normalize_format
from imagetool.errors import ImageRejected, Reason, UsageProblem, exit_code_for
from imagetool.policy import MAX_MAP_EXTENTS, MAX_VIRTUAL_SIZE
from imagetool.sizes import BLOCK, Extent, count_nonzero_bytes, count_nonzero_ranges, to_mib
from imagetool.source import Source, open_source

DEFAULT_MAX_VIRTUAL_SIZE = MAX_VIRTUAL_SIZE
SCHEMA = "imagetool.inspect/1"

_BACKING_KEYS = ("backing-filename", "full-backing-filename", "backing-filename-format")


@dataclass(frozen=True)
class Qcow2Facts:
    """The qcow2 header facts qemu-img reports, and what `qemu-img check` counted."""

    compat: str | None
    compression_type: str
    cluster_size: int | None
    lazy_refcounts: bool | None
    extended_l2: bool
    compressed_clusters: int = 0
    allocated_clusters: int = 0


@dataclass(frozen=True)
class Report:
    """Everything `inspect` found, built once; `safe` is True only when `reasons` is empty."""

    path: str
    format: str | None = None
    claimed_format: str | None = None
    partition_table: str | None = None
    magic: str | None = None
    virtual_size: int | None = None
    virtual_size_mib: int | None = None
    disk_size: int | None = None
    disk_size_mib: int | None = None
    disk_size_exact: bool | None = None
    disk_size_method: str | None = None
    file_size: int | None = None
    allocated_size: int | None = None
    qcow2: Qcow2Facts | None = None
    reasons: tuple[Reason, ...] = ()
    warnings: tuple[Reason, ...] = ()
    checks: tuple[str, ...] = ()

    @property
    def safe(self) -> bool:
        return not self.reasons and self.format is not None

    @property
    def exit_code(self) -> int:
        return int(exit_code_for(list(self.reasons)))

    def as_dict(self) -> dict[str, Any]:
        out = {"schema": SCHEMA, **asdict(self), "safe": self.safe}
        out["reasons"] = [r.as_dict() for r in self.reasons]
        out["warnings"] = [w.as_dict() for w in self.warnings]
        out["checks"] = list(self.checks)
        return out

    def rejected(self) -> ImageRejected:
        first = self.reasons[0]
        return ImageRejected(first.message, list(self.reasons), path=self.path, report=self)


@dataclass
class _Findings:
    """The report while the pipeline fills it in; frozen into a Report at the end."""

    fields: dict[str, Any]
    reasons: list[Reason] = field(default_factory=list)
    warnings: list[Reason] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    tolerate: frozenset[str] = frozenset()  # reason codes the caller accepts: kept as warnings

    def add(self, reasons: list[Reason]) -> None:
        for reason in reasons:
            kept = self.warnings if reason.code in self.tolerate else self.reasons
            if reason not in kept:
                kept.append(reason)

    def report(self) -> Report:
        return Report(
            **self.fields,
            reasons=tuple(self.reasons),
            warnings=tuple(self.warnings),
            checks=tuple(self.checks),
        )


def inspect_image(
    path: str,
    claimed_format: str | None = None,
    max_virtual_size: int = DEFAULT_MAX_VIRTUAL_SIZE,
    then: Callable[[Source, Report], None] | None = None,
) -> Report:
    """Inspect the file at `path`; an unsafe image gives a report with `safe: False`.

    `then` gets the open file and its report, to read more of it through the same
    descriptor (`inspect` looks inside the guest there).
    """
    try:
        with open_source(path) as src:
            report = inspect_source(src, claimed_format, max_virtual_size)
            if then is not None:
                then(src, report)
            return report
    except ImageRejected as exc:  # refused before it could be opened (directory, FIFO, …)
        return Report(path=path, reasons=tuple(exc.reasons), checks=("regular_file",))


def inspect_source(
    src: Source, claimed_format: str | None = None, max_virtual_size: int = DEFAULT_MAX_VIRTUAL_SIZE
) -> Report:
    """Inspect an already-open source (callers that go on to convert reuse the descriptor)."""
    return examine(src, claimed_format, max_virtual_size)[0]


def examine(
    src: Source,
    claimed_format: str | None = None,
    max_virtual_size: int = DEFAULT_MAX_VIRTUAL_SIZE,
    tolerate: frozenset[str] = frozenset(),
) -> tuple[Report, list[Extent] | None]:
    """The report, and beside it where a non-raw image's guest data lives (qemu-img map), for convert.

    `tolerate`: reason codes that are warnings for this caller (`snapshot` reads the user's
    own disk, whose internal snapshots are no hidden data to it).
    """
    claimed = normalize_format(claimed_format) if claimed_format else None
    if claimed is not None and claimed not in ACCEPTED_FORMATS:
        raise UsageProblem(
            f"--format {claimed_format!r} is not one of {', '.join(ACCEPTED_FORMATS)} (vhd means vpc)",
            code="bad_format",
        )
    found = _Findings(
        fields={
            "path": src.path,
            "claimed_format": claimed,
            "file_size": src.size,
            "allocated_size": src.allocated,
        },
        checks=["regular_file"],
        tolerate=tolerate,
    )
    header = detect(src)
    found.checks.append("header")
    found.fields.update(magic=header.magic, format=header.format, partition_table=header.partition_table)
    found.add(header.reasons)
    if header.format and claimed and header.format != claimed:
        found.add([Reason("format_mismatch", f"claimed format {claimed} but the content is {header.format}")])
    if header.format:
        found.fields.update(virtual_size=header.virtual_size, virtual_size_mib=to_mib(header.virtual_size))
        found.add(_size_policy(header.virtual_size, max_virtual_size))
    if found.reasons or header.format is None:
        src.ensure_unchanged()
        return found.report(), None

    fds = (src.fd,)
    data_map = None
    try:
        details = qemu.info(src.proc_path, header.format, fds)
        found.checks.append("qemu_info")
        found.add(_info_reasons(details, header.format, header.virtual_size, src))
        qcow2 = _qcow2_details(details)
        if not found.reasons and qcow2 is not None:
            found.checks.append("qemu_check")
            qcow2 = _check_qcow2(src, qcow2, found)
        found.fields["qcow2"] = qcow2
        if not found.reasons:
            data_map = _measure_disk_size(src, header.format, found)
    except ImageRejected as exc:  # e.g. qemu-img map is too long to be honest
        found.add(exc.reasons)
    except qemu.QemuLimitHit as exc:
        found.add([Reason("resource_limit", exc.message)])
    except qemu.QemuFailed as exc:
        found.add([Reason("corrupt", exc.message)])
    src.ensure_unchanged()  # a verdict on bytes that changed meanwhile is no verdict
    return found.report(), data_map


def _size_policy(virtual_size: int, maximum: int) -> list[Reason]:
    if virtual_size <= 0:
        return [Reason("empty", "virtual size is 0: there is no disk to write")]
    if virtual_size % 512:
        return [
            Reason(
                "unaligned",
                f"virtual size {virtual_size} is not a multiple of 512 bytes "
                "(no disk has such a size; qemu and the inspector would disagree)",
            )
        ]
    if virtual_size > maximum:
        return [
            Reason(
                "too_large",
                f"virtual size {virtual_size} bytes ({to_mib(virtual_size)} "
                f"MiB) is over the limit of {maximum} bytes ({to_mib(maximum)} MiB)",
            )
        ]
    return []


def _info_reasons(details: dict[str, Any], fmt: str, header_size: int, src: Source) -> list[Reason]:
    """Cross-check qemu-img's reading against ours and refuse what it reveals."""
    reasons = []
    specific = details.get("format-specific")
    data = specific.get("data", {}) if isinstance(specific, dict) else {}
    data = data if isinstance(data, dict) else {}
    if details.get("format") != fmt:
        reasons.append(
            Reason("format_mismatch", f"qemu-img reads it as {details.get('format')!r}, not {fmt}")
        )
    if details.get("virtual-size") != header_size:
        reasons.append(
            Reason(
                "format_mismatch",
                f"qemu-img gives virtual size {details.get('virtual-size')} "
                f"where the header says {header_size}",
            )
        )
    if any(key in details for key in _BACKING_KEYS):
        reasons.append(Reason("backing_file", "qemu-img reports a backing file"))
    if data.get("data-file") or data.get("data-file-raw"):
        reasons.append(Reason("data_file", "qemu-img reports an external data file"))
    if details.get("encrypted") or data.get("encrypt"):
        reasons.append(Reason("encrypted", "the image is encrypted"))
    if data.get("corrupt"):
        reasons.append(Reason("corrupt", "qcow2 header has the corrupt bit set"))
    if details.get("dirty-flag"):
        reasons.append(
            Reason(
                "dirty", "the image was not closed cleanly (dirty flag set); let its owner repair it first"
            )
        )
    if details.get("snapshots"):
        reasons.append(
            Reason(
                "snapshots",
                f"the image holds {len(details['snapshots'])} internal "
                "snapshot(s), which would carry hidden data",
            )
        )
    if fmt == "vmdk":
        create_type = str(data.get("create-type", "")).lower()
        if create_type not in ("monolithicsparse", "streamoptimized"):
            reasons.append(Reason("unsupported_format", f"VMDK create type {create_type!r}"))
        for extent in data.get("extents", []) or []:
            name = extent.get("filename") if isinstance(extent, dict) else None
            if name != src.proc_path:
                reasons.append(Reason("vmdk_descriptor", f"VMDK extent in another file: {name!r}"))
    return reasons


def _qcow2_details(details: dict[str, Any]) -> Qcow2Facts | None:
    if details.get("format") != "qcow2":
        return None
    specific = details.get("format-specific")
    data = specific.get("data", {}) if isinstance(specific, dict) else {}
    data = data if isinstance(data, dict) else {}
    cluster_size = details.get("cluster-size")
    return Qcow2Facts(
        compat=str(data["compat"]) if "compat" in data else None,
        # qemu before 5.1 has no compression-type: zlib was the only one
        compression_type=str(data.get("compression-type", "zlib")),
        cluster_size=cluster_size if isinstance(cluster_size, int) else None,
        lazy_refcounts=bool(data["lazy-refcounts"]) if "lazy-refcounts" in data else None,
        extended_l2=bool(data.get("extended-l2", False)),
    )


def _count(result: dict[str, Any], key: str) -> int:
    value = result.get(key, 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _check_qcow2(src: Source, qcow2: Qcow2Facts, found: _Findings) -> Qcow2Facts:
    """`qemu-img check`: corruption rejects, leaks warn; its counts tell preflight about compression."""
    code, result = qemu.check(src.proc_path, "qcow2", (src.fd,))
    if code == 2 or _count(result, "corruptions"):
        found.add(
            [Reason("corrupt", f"qemu-img check found {result.get('corruptions', 'some')} corruption(s)")]
        )
    elif code == 1:
        found.add(
            [
                Reason(
                    "corrupt", f"qemu-img check could not complete: {result.get('error') or 'internal error'}"
                )
            ]
        )
    elif code == 3:
        found.warnings.append(
            Reason(
                "leaked_clusters", f"{result.get('leaks', 'some')} leaked cluster(s): harmless wasted space"
            )
        )
    # Each fragmented cluster that is not compressed starts a `qemu-img map` line of its own, so
    # check's count alone can show the map is over the bound: refused without running map.
    fragmented = _count(result, "fragmented-clusters") - _count(result, "compressed-clusters")
    if fragmented > MAX_MAP_EXTENTS:
        found.add(
            [
                Reason(
                    "too_fragmented",
                    f"qemu-img check counts {fragmented} fragmented clusters, so its map has more than "
                    f"{MAX_MAP_EXTENTS} ranges: too fragmented to inspect in bounded time "
                    "(a crafted image, or one to defragment with qemu-img convert first)",
                )
            ]
        )
    return replace(
        qcow2,
        compressed_clusters=_count(result, "compressed-clusters"),
        allocated_clusters=_count(result, "allocated-clusters"),
    )


def _measure_disk_size(src: Source, fmt: str, found: _Findings) -> list[Extent] | None:
    """Exact non-zero data for raw; for other formats, exact where their data can be read."""
    found.checks.append("disk_size")
    data_map = None
    if fmt == "raw":
        size, exact = count_nonzero_bytes(src.fd, src.size), True
    else:
        data_map = qemu.map_extents(src.proc_path, fmt, (src.fd,))
        found.add(_beyond_the_end(src, data_map))
        size, exact = _disk_size_from_map(src, data_map)
    found.fields.update(
        disk_size=size,
        disk_size_mib=to_mib(size),
        disk_size_exact=exact,
        disk_size_method="scan" if exact else "qemu-img map",
    )
    return data_map


def _beyond_the_end(src: Source, extents: list[Extent]) -> list[Reason]:
    """A table that points past the end of the file: the image was truncated.

    qemu reads such clusters as zeros, so conversion and even `qemu-img compare` would
    pass with the lost data silently zero-filled.
    """
    for e in extents:
        if e.host is not None and e.host + e.length > src.size:
            return [
                Reason(
                    "corrupt",
                    f"guest data at offset {e.start} is stored at bytes {e.host}-{e.host + e.length} of a "
                    f"{src.size}-byte file: the image is truncated",
                )
            ]
    return []


def _disk_size_from_map(src: Source, extents: list[Extent]) -> tuple[int, bool]:
    """Count non-zero 4 KiB guest blocks by reading the host bytes behind each data range.

    Exact when every data range is uncompressed (has a host offset) and 4 KiB
    aligned in both guest and host; otherwise the allocated total, an upper bound.
    """
    allocated = sum(-(-e.length // BLOCK) * BLOCK for e in extents)
    if not all(e.host is not None and e.start % BLOCK == 0 and e.host % BLOCK == 0 for e in extents):
        return allocated, False
    return count_nonzero_ranges(src.fd, ((e.host, e.length) for e in extents if e.host is not None)), True
