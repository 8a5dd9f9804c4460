"""What an image really is, decided from its bytes before qemu-img opens it.

Three independent readings of the same bytes must agree:

- oslo.utils' format inspectors (the ones Glance, Nova and Ironic use against
  CVE-2022-47951 / CVE-2024-32498) name the format and check its header; more than
  one match is a polyglot and is refused;
- qemu's own probes (probe.py) say what qemu would open the file as without `-f`.
  A verdict stands only when no other format's probe claims the file, so a `raw`
  verdict means raw to any later consumer that probes too;
- libmagic is the third vote, and names what is not a disk image at all (archives,
  compressed data) so the message can say what to do.

When a qemu probe claims a file whose verdict is something else, the reason is
`unsupported_format` if imagetool does not accept the claimed format (Parallels,
Bochs, cloop, DMG, QED, QCOW v1, LUKS); `corrupt` if the file ends inside the
claimed format's header (a truncated qcow2); otherwise `multiple_formats`: one
reader sees raw (or another format) and qemu sees this one, which is what a
polyglot is. (`format_mismatch` is kept for a disagreement with the user's
`--format` or with qemu-img's own report.)

Deliberate divergences from oslo: a text file is a VMDK descriptor only when qemu's
probe says so (oslo takes `createType="` anywhere in the first chunk), and a fixed
VHD, whose only footer is at the end, is `vpc` rather than raw with a footer for
guest data.

Every call into an oslo inspector and every parse of untrusted header bytes goes
through `_guard`: an exception there never escapes as a crash but becomes reason
`corrupt` (or, while formats are still being tried, "not this format"). Header
checks (backing file, data file, features, encryption, header counts that make
qemu-img slow, VMDK type, MBR) run here too, so nothing beyond the header is
opened until they pass.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ParamSpec, Protocol, TypeVar

from imagetool import probe
from imagetool.errors import EnvironmentProblem, ImagetoolError, Reason
from imagetool.policy import MAX_QCOW2_L1_BYTES, MAX_QCOW2_REFCOUNT_TABLE_BYTES, MAX_QCOW2_SNAPSHOTS
from imagetool.source import Source

try:
    from oslo_utils.imageutils import format_inspector as fi
except ImportError as exc:  # a declared dependency; say what is missing rather than crash
    raise EnvironmentProblem(
        f"oslo.utils' format inspector cannot be imported ({exc}); reinstall imagetool",
        code="missing_dependency",
    ) from None

# oslo logs a warning for every format a file is not; those are answers here, not problems.
logging.getLogger(fi.__name__).setLevel(logging.CRITICAL)

# Formats imagetool converts from, by qemu-img driver name.
ACCEPTED_FORMATS = ("raw", "qcow2", "vmdk", "vdi", "vpc", "vhdx")
# What a user may say with --format; `vhd` is what most people call qemu's `vpc`.
FORMAT_ALIASES = {"vhd": "vpc", "img": "raw"}

_READ_CHUNK = 64 * 1024
_FEED_CAP = 8 * 1024 * 1024  # no inspector needs more; a header asking for more is hostile
_MAGIC_BYTES = 1024 * 1024  # libmagic needs ISO 9660 at 32 KiB and VHDX regions
_QCOW2_HEADER_BYTES = 2 * 1024 * 1024  # the first cluster at the largest cluster size: header + extensions
_QCOW2_CLUSTER_BITS = range(9, 22)  # qemu's MIN_CLUSTER_BITS..MAX_CLUSTER_BITS
_QCOW2_DATA_EXT = 0x44415441  # "DATA": external data file name header extension
_SUPPORTED_OSLO = ">=10.2,<11"

# oslo inspector name <-> qemu-img driver name
_QEMU_NAME = {"gpt": "raw", "vhd": "vpc"}
_OSLO_NAME = {"vpc": "vhd"}

_UNSUPPORTED = {
    "qed": "a QED image (a format no longer supported by QEMU's maintainers)",
    "iso": "an ISO 9660 (CD/DVD) image, not a disk image",
    "luks": "a LUKS-encrypted container",
}

# libmagic description prefix -> (qemu format name or None for "not a disk image", advice)
_MAGIC_VOTES: tuple[tuple[str, str | None, str], ...] = (
    ("QEMU QCOW Image (v1)", "qcow", ""),
    ("QEMU QCOW", "qcow2", ""),
    ("QEMU QED", "qed", ""),
    ("VMware4 disk image", "vmdk", ""),
    ("VirtualBox Disk Image", "vdi", ""),
    ("Microsoft Disk Image eXtended", "vhdx", ""),
    ("Microsoft Disk Image, Virtual Server or Virtual PC", "vpc", ""),
    ("ISO 9660", "iso", ""),
    ("LUKS encrypted file", "luks", ""),
    ("gzip compressed data", None, "gzip-compressed data: decompress it first (gunzip -k FILE)"),
    ("XZ compressed data", None, "xz-compressed data: decompress it first (unxz -k FILE)"),
    ("Zstandard compressed data", None, "zstd-compressed data: decompress it first (unzstd FILE)"),
    ("bzip2 compressed data", None, "bzip2-compressed data: decompress it first (bunzip2 -k FILE)"),
    ("LZ4 compressed data", None, "LZ4-compressed data: decompress it first (unlz4 FILE)"),
    (
        "POSIX tar archive",
        None,
        "a tar archive (an OVA is one): extract it (tar -xf FILE) and use the disk image inside",
    ),
    ("Zip archive", None, "a zip archive: extract it and use the disk image inside"),
)

# oslo safety-check name -> our stable reason code
_CHECK_REASONS = {
    "backing_file": "backing_file",
    "data_file": "data_file",
    "unknown_features": "unknown_features",
    "descriptor": "vmdk_descriptor",
    "footer": "vmdk_descriptor",
    "mbr": "mbr",
    "banned": "unsupported_format",
}

P = ParamSpec("P")
T = TypeVar("T")


class Region(Protocol):
    """An oslo CaptureRegion, as far as detect.py reads one."""

    @property
    def offset(self) -> int: ...
    @property
    def length(self) -> int: ...
    @property
    def data(self) -> bytes | bytearray: ...
    @property
    def complete(self) -> bool: ...


class OsloInspector(Protocol):
    """The part of an oslo.utils FileInspector (10.2) that detect.py uses.

    Its private stream position is deliberately not here: only `_skip` touches it,
    and checks it first.
    """

    @property
    def complete(self) -> bool: ...
    @property
    def format_match(self) -> bool: ...
    @property
    def virtual_size(self) -> int: ...
    @property
    def context_info(self) -> dict[str, int]: ...
    def region(self, name: str) -> Region: ...
    def eat_chunk(self, chunk: bytes) -> None: ...
    def finish(self) -> None: ...
    def safety_check(self) -> None: ...


@dataclass
class Detection:
    """The verdict of the header stage."""

    format: str | None = None  # qemu-img driver name, None when undecided or rejected
    partition_table: str | None = None  # "mbr" / "gpt" for a raw disk that has one
    virtual_size: int = 0  # as the header says it
    magic: str = ""  # libmagic's description
    reasons: list[Reason] = field(default_factory=list)


def normalize_format(name: str) -> str:
    name = name.strip().lower()
    return FORMAT_ALIASES.get(name, name)


class _Unreadable(Exception):
    """Untrusted bytes made a parser raise: the header cannot be read."""

    def __init__(self, fmt: str, what: str, exc: Exception) -> None:
        self.detail = " ".join(str(exc).split()) or type(exc).__name__
        super().__init__(f"{fmt} header cannot be read ({what}: {self.detail})")
        self.reason = Reason("corrupt", str(self))


def _guard(fmt: str, what: str, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """The one place a parse of untrusted bytes runs: any exception it raises becomes `_Unreadable`."""
    try:
        return fn(*args, **kwargs)
    except ImagetoolError:  # the environment's fault (a changed oslo.utils), not the image's
        raise
    except Exception as exc:
        raise _Unreadable(fmt, what, exc) from None


def _attempt(
    failed: dict[str, str], name: str, what: str, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
) -> T | None:
    """An oslo call while formats are still being tried: a failure means "not `name`", remembered why."""
    try:
        return _guard(name, what, fn, *args, **kwargs)
    except _Unreadable as exc:
        failed[name] = exc.detail
        return None


def _skip(inspector: OsloInspector, nbytes: int) -> None:
    """Tell an oslo inspector that `nbytes` went by without handing them over.

    oslo's inspectors are written for a stream and have no seek; the only position
    they keep is the private `_total_count`, which every region's offsets are
    compared with. Advancing it skips holes and data no region wants (a VMDK footer
    at the end of a 50 GB file costs one read). If a future oslo renames or retypes
    it, this fails closed (exit 5) instead of silently misplacing every region.
    """
    state = getattr(inspector, "__dict__", {})
    count = state.get("_total_count")
    if type(count) is not int:
        raise EnvironmentProblem(
            f"oslo.utils {importlib.metadata.version('oslo.utils')} changed its inspector internals; "
            f"imagetool supports oslo.utils {_SUPPORTED_OSLO}",
            code="unsupported_dependency",
        )
    state["_total_count"] = count + nbytes


def _next_needed(inspector: OsloInspector, pos: int, size: int) -> int:
    """The first offset at or after `pos` that an incomplete region of `inspector` wants."""
    wanted = size
    for name in inspector.context_info:  # public view of the region names
        region = inspector.region(name)
        if region.complete:
            continue
        if isinstance(region, fi.EndCaptureRegion):
            wanted = min(wanted, max(pos, size - region.length))
        else:
            wanted = min(wanted, max(pos, region.offset + len(region.data)))
    return wanted


def _run_inspectors(src: Source) -> tuple[dict[str, OsloInspector], dict[str, str]]:
    """Feed every inspector the bytes it asks for, skipping what none of them needs.

    Returns the inspectors and, for those that raised (not their format), why.
    """
    inspectors: dict[str, OsloInspector] = {n: cls() for n, cls in fi.ALL_FORMATS.items() if n != "raw"}
    failed: dict[str, str] = {}
    pos = fed = 0
    while pos < src.size and fed < _FEED_CAP:
        live = {n: i for n, i in inspectors.items() if n not in failed}
        wants = [_attempt(failed, n, "regions", _next_needed, i, pos, src.size) for n, i in live.items()]
        target = min((w for w in wants if w is not None), default=src.size)
        chunk = src.pread(_READ_CHUNK, target) if target < src.size else b""
        if not chunk:
            break
        for name, inspector in live.items():
            if name not in failed:
                _skip(inspector, target - pos)
                _attempt(failed, name, "reading", inspector.eat_chunk, chunk)
        pos = target + len(chunk)
        fed += len(chunk)
    for name, inspector in inspectors.items():
        if name not in failed:
            _attempt(failed, name, "finishing", inspector.finish)
    return inspectors, failed


def _is_match(inspector: OsloInspector) -> bool:
    return inspector.complete and inspector.format_match


def _matches(inspectors: dict[str, OsloInspector], failed: dict[str, str]) -> list[str]:
    return [
        name
        for name, inspector in inspectors.items()
        if name not in failed and _attempt(failed, name, "matching", _is_match, inspector)
    ]


def _magic_vote(head: bytes) -> tuple[str, str | None, str]:
    """libmagic's description, the disk format it implies (if any), and advice for non-images."""
    try:
        import magic
    except ImportError as exc:  # the Python binding loads libmagic.so at import
        raise EnvironmentProblem(
            f"libmagic is not available ({exc}); install it: apt-get install -y libmagic1",
            code="missing_dependency",
        ) from None
    description = str(_guard("image", "libmagic", magic.from_buffer, head) or "")
    for prefix, fmt, advice in _MAGIC_VOTES:
        if description.startswith(prefix):
            return description, fmt, advice
    return description, None, ""


def _safety_failures(inspector: OsloInspector) -> dict[str, object]:
    try:
        inspector.safety_check()
    except fi.SafetyCheckFailed as exc:
        return dict(exc.failures)
    return {}


def _safety_reasons(inspector: OsloInspector, name: str) -> list[Reason]:
    failures = _guard(name, "safety check", _safety_failures, inspector)
    return [
        Reason(_CHECK_REASONS.get(check.removeprefix("inner_"), "unsafe"), f"{name} header: {failure}")
        for check, failure in sorted(failures.items())
    ]


def _claim_reason(
    claim: probe.Claim,
    verdict: str,
    inspectors: dict[str, OsloInspector],
    failed: dict[str, str],
    size: int,
) -> Reason:
    """Why a file some reader takes for `verdict` is refused when qemu's probe takes it for `claim`."""
    if claim.format not in ACCEPTED_FORMATS:
        return Reason(
            "unsupported_format",
            f"a format probe (qemu, libvirt) reads this as {claim.what} ({claim.format}), "
            "a format imagetool does not accept",
        )
    if verdict != "raw":
        return Reason(
            "multiple_formats",
            f"qemu also reads this {verdict} image as {claim.what} ({claim.format}): a polyglot is refused",
        )
    name = _OSLO_NAME.get(claim.format, claim.format)
    if name not in failed and not _guard(name, "completeness", lambda: inspectors[name].complete):
        return Reason("corrupt", f"{claim.format} header is truncated: the file ends at byte {size}")
    parser = f" (the {claim.format} parser: {failed[name]})" if name in failed else ""
    return Reason(
        "multiple_formats",
        f"a format probe (qemu, libvirt) reads this as {claim.what} ({claim.format}) where the "
        f"inspector sees raw{parser}: refused as ambiguous",
    )


def _qcow2_reasons(src: Source) -> list[Reason]:
    """What oslo's qcow2 checks leave out: header counts that make qemu-img slow, snapshots,
    encryption, the DATA extension."""
    data = src.pread(min(src.size, _QCOW2_HEADER_BYTES), 0)
    header = _guard("qcow2", "header", probe.Qcow2Header.parse, data)
    if header.cluster_bits not in _QCOW2_CLUSTER_BITS:
        return [Reason("corrupt", f"qcow2 cluster_bits {header.cluster_bits} is outside qemu's 9..21")]
    refcount_table = header.refcount_table_clusters
    counts = (  # header field, its value, what it makes qemu-img read and hold, the bound on that
        ("nb_snapshots", header.nb_snapshots, header.nb_snapshots, "snapshots", MAX_QCOW2_SNAPSHOTS),
        ("l1_size", header.l1_size, header.l1_size * 8, "bytes of L1 table", MAX_QCOW2_L1_BYTES),
        (
            "refcount_table_clusters",
            refcount_table,
            refcount_table << header.cluster_bits,
            "bytes of refcount table",
            MAX_QCOW2_REFCOUNT_TABLE_BYTES,
        ),
    )
    reasons = [
        Reason("header_limits", f"qcow2 header {name} is {raw}: {value} {what}, over the bound of {limit}")
        for name, raw, value, what, limit in counts
        if value > limit
    ]
    # qemu grows L1 by half again on a resize and keeps it on a shrink; far beyond what the size
    # needs (and beyond 64 Ki entries, which cost nothing) only makes qemu-img check walk, and
    # complain about, entries no guest block can use: 100 MB of stderr for a 2 MB file.
    l1_bound = max(2 * header.l1_entries_needed(), 1 << 16)
    if header.l1_size * 8 <= MAX_QCOW2_L1_BYTES and header.l1_size > l1_bound:
        reasons.append(
            Reason(
                "header_limits",
                f"qcow2 header l1_size is {header.l1_size} entries where its virtual size needs "
                f"{header.l1_entries_needed()}",
            )
        )
    if 0 < header.nb_snapshots <= MAX_QCOW2_SNAPSHOTS:
        reasons.append(
            Reason(
                "snapshots",
                f"qcow2 header lists {header.nb_snapshots} internal snapshot(s), "
                "which would carry hidden data",
            )
        )
    if header.crypt_method != 0:
        kind = {1: "AES", 2: "LUKS"}.get(header.crypt_method, f"method {header.crypt_method}")
        reasons.append(
            Reason(
                "encrypted",
                f"qcow2 image is encrypted ({kind}): its data cannot be inspected or converted without a key",
            )
        )
    if _QCOW2_DATA_EXT in _guard("qcow2", "header extensions", header.extension_types, data):
        reasons.append(Reason("data_file", "qcow2 header names an external data file"))
    return reasons


def _vhd_reasons(footer: probe.VhdFooter, fixed: bool, size: int) -> list[Reason]:
    """A VHD footer qemu would refuse, or a fixed VHD whose data cannot be all in the file."""
    where = "at the end of the file" if fixed else "at the start of the file"
    if not footer.checksum_ok:
        return [Reason("corrupt", f"vpc footer {where} has a bad checksum")]
    if fixed and footer.disk_type != probe.VHD_FIXED:
        return [
            Reason(
                "corrupt",
                f"vpc footer only at the end of the file says disk type {footer.disk_type}, not fixed (2)",
            )
        ]
    if fixed and footer.virtual_size > size - probe.SECTOR:
        return [
            Reason(
                "corrupt",
                f"fixed vpc image claims {footer.virtual_size} bytes but holds {size - probe.SECTOR} "
                "before its footer",
            )
        ]
    return []


def _vmdk_type(inspector: OsloInspector) -> str:
    return str(getattr(inspector, "vmdktype", "formatnotfound"))


def _virtual_size(inspector: OsloInspector) -> int:
    return int(inspector.virtual_size)


def _first_per_code(reasons: list[Reason]) -> list[Reason]:
    """Two checks that find the same thing (the data-file bit and the DATA extension) name it once."""
    first: dict[str, Reason] = {}
    for reason in reasons:
        first.setdefault(reason.code, reason)
    return list(first.values())


def detect(src: Source) -> Detection:
    """Decide the format from content alone and run the header safety checks."""
    head = src.pread(_MAGIC_BYTES, 0)
    result = Detection()
    try:
        result.magic, magic_format, advice = _magic_vote(head)
        inspectors, failed = _run_inspectors(src)
        choice = _choose(src, inspectors, failed, magic_format, advice, result)
        if choice is not None:
            _check_header(src, head, inspectors, choice, result)
    except _Unreadable as exc:
        result.format = None
        result.reasons.append(exc.reason)
    result.reasons = _first_per_code(result.reasons)
    return result


@dataclass(frozen=True)
class _Choice:
    """The format every reader agreed on, and how it was found."""

    format: str  # qemu driver name
    oslo_name: str  # the oslo inspector that matched ("raw" when none did)
    fixed_vhd: probe.VhdFooter | None  # a VHD footer only at the end of the file


def _choose(
    src: Source,
    inspectors: dict[str, OsloInspector],
    failed: dict[str, str],
    magic_format: str | None,
    advice: str,
    result: Detection,
) -> _Choice | None:
    """The one format every reader agrees on, or None with the reasons they do not."""
    found = _matches(inspectors, failed)
    evidence = probe.Evidence.read(src)
    claims = _guard("qemu probe", "probing", probe.claims, evidence)
    if "vmdk" in found and all(c.format != "vmdk" for c in claims):
        found.remove("vmdk")  # oslo saw `createType="` in text qemu would never take for a descriptor
    if set(found) == {"iso", "gpt"}:  # a hybrid ISO: a bootable CD image, not a disk
        found = ["iso"]
    fixed_vhd = _guard("vpc", "footer at the end", probe.fixed_vhd_footer, evidence)
    if len(found) > 1 or (fixed_vhd and found not in ([], ["gpt"])):  # a guest's MBR is fine in a VHD
        names = ", ".join(sorted(found) + (["fixed vpc"] if fixed_vhd else []))
        result.reasons.append(
            Reason(
                "multiple_formats",
                f"content matches several formats at once ({names}): a polyglot image is refused",
            )
        )
        return None
    oslo_name = found[0] if found else "raw"
    verdict = "vpc" if fixed_vhd else _QEMU_NAME.get(oslo_name, oslo_name)
    if verdict == "raw" and magic_format is None and advice:
        result.reasons.append(Reason("unsupported_format", f"this is {advice}"))
    elif oslo_name in _UNSUPPORTED:
        result.reasons.append(Reason("unsupported_format", f"this is {_UNSUPPORTED[oslo_name]}"))
    else:
        result.reasons.extend(
            _claim_reason(claim, verdict, inspectors, failed, src.size)
            for claim in claims
            if claim.format != verdict
        )
    if not result.reasons and magic_format and magic_format != verdict:
        result.reasons.append(
            Reason(
                "multiple_formats",
                f"libmagic sees {result.magic!r} where the format inspector sees {verdict}: "
                "refused as ambiguous",
            )
        )
    return None if result.reasons else _Choice(verdict, oslo_name, fixed_vhd)


def _check_header(
    src: Source,
    head: bytes,
    inspectors: dict[str, OsloInspector],
    choice: _Choice,
    result: Detection,
) -> None:
    """The header safety checks of the chosen format, and its virtual size as the header says it."""
    verdict = result.format = choice.format
    if verdict == "vpc":
        footer = choice.fixed_vhd or _guard("vpc", "footer", probe.VhdFooter.parse, head[: probe.SECTOR])
        result.reasons.extend(_vhd_reasons(footer, choice.fixed_vhd is not None, src.size))
        result.virtual_size = footer.virtual_size
        if choice.fixed_vhd:  # the guest's own bytes (an MBR, say) are not ours to judge
            return
    inspector = inspectors.get(choice.oslo_name)
    if inspector is None:  # raw without a partition table: no header to check
        result.virtual_size = src.size
        return
    if choice.oslo_name == "gpt":
        result.partition_table = "gpt" if _has_protective_mbr(head) else "mbr"
    if verdict == "qcow2":
        result.reasons.extend(_qcow2_reasons(src))
    if verdict == "vmdk":
        vmdk_type = _guard("vmdk", "createType", _vmdk_type, inspector)
        if vmdk_type not in ("monolithicsparse", "streamoptimized"):
            result.reasons.append(
                Reason(
                    "unsupported_format",
                    f"VMDK of type {vmdk_type!r} keeps its data in other files; only "
                    "monolithicSparse and streamOptimized VMDKs are accepted",
                )
            )
            result.format = None
            return
    result.reasons.extend(_safety_reasons(inspector, choice.oslo_name))
    if verdict == "raw":
        result.virtual_size = src.size
    elif verdict != "vpc":
        result.virtual_size = _guard(choice.oslo_name, "virtual size", _virtual_size, inspector)


def _has_protective_mbr(head: bytes) -> bool:
    return any(head[446 + 16 * i + 4] == 0xEE for i in range(4))
