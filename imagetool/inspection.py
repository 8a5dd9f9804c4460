"""`inspect`: the truth about one disk image, checked in an order a hostile image can't exploit.

1. open once, safely (source.py);  2. detect format from content, header safety
checks and size policy (detect.py) — nothing opens the image beyond its header
before these pass;  3. `qemu-img info`, cross-checked against our own reading;
4. `qemu-img check` for qcow2;  5. sizes, with disk_size counted exactly.
Each stage that finds a problem stops the pipeline and names it in `reasons`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from imagetool import qemu
from imagetool.detect import ACCEPTED_FORMATS, detect, normalize_format
from imagetool.errors import ImageRejected, Reason, UsageProblem, exit_code_for
from imagetool.sizes import BLOCK, Extent, TiB, count_nonzero_bytes, count_nonzero_ranges, to_mib
from imagetool.source import Source, open_source

DEFAULT_MAX_VIRTUAL_SIZE = 4 * TiB  # no server or volume in the library is bigger
SCHEMA = "imagetool.inspect/1"

_BACKING_KEYS = ("backing-filename", "full-backing-filename", "backing-filename-format")


@dataclass
class Report:
    """Everything `inspect` found; `safe` is True only when `reasons` is empty."""

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
    qcow2: dict[str, Any] | None = None
    safe: bool = False
    reasons: list[Reason] = field(default_factory=list)
    warnings: list[Reason] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    # Where a non-raw image's guest data lives (qemu-img map), kept for convert's estimate.
    data_map: list[Extent] | None = field(default=None, repr=False)

    @property
    def exit_code(self) -> int:
        return int(exit_code_for(self.reasons))

    def as_dict(self) -> dict[str, Any]:
        out = {"schema": SCHEMA, **asdict(self)}
        del out["data_map"]
        out["reasons"] = [r.as_dict() for r in self.reasons]
        out["warnings"] = [w.as_dict() for w in self.warnings]
        return out

    def rejected(self) -> ImageRejected:
        first = self.reasons[0]
        return ImageRejected(first.message, self.reasons, path=self.path, report=self)


def inspect_image(
    path: str, claimed_format: str | None = None, max_virtual_size: int = DEFAULT_MAX_VIRTUAL_SIZE
) -> Report:
    """Inspect the file at `path`; an unsafe image gives a report with `safe: False`."""
    try:
        with open_source(path) as src:
            return inspect_source(src, claimed_format, max_virtual_size)
    except ImageRejected as exc:  # refused before it could be opened (directory, FIFO, …)
        return Report(path=path, reasons=exc.reasons, checks=["regular_file"])


def inspect_source(
    src: Source, claimed_format: str | None = None, max_virtual_size: int = DEFAULT_MAX_VIRTUAL_SIZE
) -> Report:
    """Inspect an already-open source; callers that go on to convert reuse the descriptor."""
    claimed = normalize_format(claimed_format) if claimed_format else None
    if claimed is not None and claimed not in ACCEPTED_FORMATS:
        raise UsageProblem(
            f"--format {claimed_format!r} is not one of {', '.join(ACCEPTED_FORMATS)} (vhd means vpc)",
            code="bad_format",
        )
    report = Report(
        path=src.path,
        claimed_format=claimed,
        file_size=src.size,
        allocated_size=src.allocated,
        checks=["regular_file"],
    )

    found = detect(src)
    report.checks.append("header")
    report.magic = found.magic
    report.format = found.format
    report.partition_table = found.partition_table
    report.reasons.extend(found.reasons)
    if found.format and claimed and found.format != claimed:
        report.reasons.append(
            Reason("format_mismatch", f"claimed format {claimed} but the content is {found.format}")
        )
    if found.format:
        report.virtual_size = found.virtual_size
        report.virtual_size_mib = to_mib(found.virtual_size)
        report.reasons.extend(_size_policy(found.virtual_size, max_virtual_size))
    if report.reasons:
        return report

    assert found.format is not None
    fds = (src.fd,)
    try:
        details = qemu.info(src.proc_path, found.format, fds)
        report.checks.append("qemu_info")
        report.reasons.extend(_info_reasons(details, found.format, found.virtual_size, src))
        report.qcow2 = _qcow2_details(details)
        if not report.reasons and found.format == "qcow2":
            report.checks.append("qemu_check")
            _check_qcow2(src, report)
        if not report.reasons:
            _measure_disk_size(src, found.format, report)
    except qemu.QemuLimitHit as exc:
        report.reasons.append(Reason("resource_limit", exc.message))
    except qemu.QemuFailed as exc:
        report.reasons.append(Reason("corrupt", exc.message))
    report.safe = not report.reasons
    return report


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


def _qcow2_details(details: dict[str, Any]) -> dict[str, Any] | None:
    if details.get("format") != "qcow2":
        return None
    specific = details.get("format-specific")
    data = specific.get("data", {}) if isinstance(specific, dict) else {}
    return {
        "compat": data.get("compat"),
        # qemu before 5.1 has no compression-type: zlib was the only one
        "compression_type": data.get("compression-type", "zlib"),
        "cluster_size": details.get("cluster-size"),
        "lazy_refcounts": data.get("lazy-refcounts"),
        "extended_l2": data.get("extended-l2", False),
    }


def _check_qcow2(src: Source, report: Report) -> None:
    code, result = qemu.check(src.proc_path, "qcow2", (src.fd,))
    if report.qcow2 is not None:  # preflight asks whether the image is compressed
        report.qcow2["compressed_clusters"] = int(result.get("compressed-clusters", 0) or 0)
        report.qcow2["allocated_clusters"] = int(result.get("allocated-clusters", 0) or 0)
    if code == 2 or result.get("corruptions"):
        report.reasons.append(
            Reason("corrupt", f"qemu-img check found {result.get('corruptions', 'some')} corruption(s)")
        )
    elif code == 1:
        report.reasons.append(
            Reason("corrupt", f"qemu-img check could not complete: {result.get('error') or 'internal error'}")
        )
    elif code == 3:
        report.warnings.append(
            Reason(
                "leaked_clusters", f"{result.get('leaks', 'some')} leaked cluster(s): harmless wasted space"
            )
        )


def _measure_disk_size(src: Source, fmt: str, report: Report) -> None:
    """Exact non-zero data for raw; for other formats, exact where their data can be read."""
    report.checks.append("disk_size")
    if fmt == "raw":
        report.disk_size = count_nonzero_bytes(src.fd, src.size)
        report.disk_size_exact = True
        report.disk_size_method = "scan"
    else:
        report.data_map = qemu.map_extents(src.proc_path, fmt, (src.fd,))
        report.disk_size, report.disk_size_exact = _disk_size_from_map(src, report.data_map)
        report.disk_size_method = "scan" if report.disk_size_exact else "qemu-img map"
    report.disk_size_mib = to_mib(report.disk_size)


def _disk_size_from_map(src: Source, extents: list[Extent]) -> tuple[int, bool]:
    """Count non-zero 4 KiB guest blocks by reading the host bytes behind each data range.

    Exact when every data range is uncompressed (has a host offset) and 4 KiB
    aligned in both guest and host; otherwise the allocated total, an upper bound.
    """
    allocated = sum(-(-e.length // BLOCK) * BLOCK for e in extents)
    if not all(e.host is not None and e.start % BLOCK == 0 and e.host % BLOCK == 0 for e in extents):
        return allocated, False
    return count_nonzero_ranges(src.fd, ((e.host, e.length) for e in extents if e.host is not None)), True
