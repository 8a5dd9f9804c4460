"""What an image really is, decided from its bytes before qemu-img opens it.

Detection runs every `oslo.utils` format inspector (the one Glance, Nova and
Ironic use against CVE-2022-47951 / CVE-2024-32498) over the same bytes; more
than one match is a polyglot and is refused. libmagic is a second, independent
vote and names things that are not disk images at all (archives, compressed
files) so the message can say what to do. Header safety checks (backing file,
data file, features, encryption, VMDK descriptor, MBR) run here too, so nothing
beyond the header is opened until they pass.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import struct
import sys
import types
from dataclasses import dataclass, field
from typing import Any

from imagetool.errors import EnvironmentProblem, Reason
from imagetool.source import Source

# Formats imagetool converts from, by qemu-img driver name.
ACCEPTED_FORMATS = ("raw", "qcow2", "vmdk", "vdi", "vpc", "vhdx")
# What a user may say with --format; `vhd` is what most people call qemu's `vpc`.
FORMAT_ALIASES = {"vhd": "vpc", "img": "raw"}

_READ_CHUNK = 64 * 1024
_FEED_CAP = 8 * 1024 * 1024  # no inspector needs more; a header asking for more is hostile
_MAGIC_BYTES = 1024 * 1024  # libmagic needs ISO 9660 at 32 KiB and VHDX regions

# oslo inspector name -> qemu-img driver name
_QEMU_NAME = {"gpt": "raw", "vhd": "vpc"}

_UNSUPPORTED = {
    "qed": "a QED image (a format no longer supported by QEMU's maintainers)",
    "iso": "an ISO 9660 (CD/DVD) image, not a disk image",
    "luks": "a LUKS-encrypted container",
}

# libmagic description prefix -> (our format name or None for "not a disk image", advice)
_MAGIC_VOTES: tuple[tuple[str, str | None, str], ...] = (
    ("QEMU QCOW Image (v1)", "qcow", ""),
    ("QEMU QCOW", "qcow2", ""),
    ("QEMU QED", "qed", ""),
    ("VMware4 disk image", "vmdk", ""),
    ("VirtualBox Disk Image", "vdi", ""),
    ("Microsoft Disk Image eXtended", "vhdx", ""),
    ("Microsoft Disk Image, Virtual Server or Virtual PC", "vhd", ""),
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

_QCOW2_DATA_EXT = 0x44415441  # "DATA": external data file name header extension

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


def _format_inspector() -> Any:
    """oslo.utils' format_inspector, imported on first use.

    Its package `__init__` also imports oslo's qemu-img helpers (and strutils,
    ~35 ms) that imagetool never uses, so the package is registered bare and only
    the inspector module (and its LUKS helper) is loaded.
    """
    if "oslo_utils.imageutils" not in sys.modules:
        spec = importlib.util.find_spec("oslo_utils.imageutils")
        if spec is None or spec.submodule_search_locations is None:
            raise EnvironmentProblem("oslo.utils is not installed", code="missing_dependency")
        package = types.ModuleType("oslo_utils.imageutils")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["oslo_utils.imageutils"] = package
    logging.getLogger("oslo_utils.imageutils.format_inspector").setLevel(logging.CRITICAL)
    return importlib.import_module("oslo_utils.imageutils.format_inspector")


def _next_needed(inspector: Any, fi: Any, pos: int, size: int) -> int:
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


def _run_inspectors(src: Source) -> tuple[dict[str, Any], dict[str, str]]:
    """Feed every inspector the bytes it asks for, skipping what none of them needs.

    oslo's inspectors are written for a stream; given a file we can seek, so holes
    and data between header regions (a VMDK footer at the end of a 50 GB file) are
    skipped instead of read. Returns the inspectors and, for those that failed to
    parse, why.
    """
    fi = _format_inspector()
    inspectors = {name: cls() for name, cls in fi.ALL_FORMATS.items()}
    live = {n: i for n, i in inspectors.items() if n != "raw"}
    failed: dict[str, str] = {}
    pos = fed = 0
    while live and pos < src.size and fed < _FEED_CAP:
        pending = [i for i in live.values() if not i.complete]
        if not pending:
            break
        target = min(_next_needed(i, fi, pos, src.size) for i in pending)
        if target >= src.size:
            break
        if target > pos:
            for inspector in live.values():
                # Positions are all an inspector keeps of the stream; nothing it still
                # wants lies before `target`, so advancing the count skips exactly.
                inspector._total_count += target - pos
            pos = target
        chunk = src.pread(_READ_CHUNK, pos)
        if not chunk:
            break
        for name, inspector in list(live.items()):
            try:
                inspector.eat_chunk(chunk)
            except Exception as exc:  # a parser giving up means "not this format"
                failed[name] = str(exc) or type(exc).__name__
                del live[name]
        pos += len(chunk)
        fed += len(chunk)
    for name, inspector in inspectors.items():
        if name not in failed:
            inspector.finish()
    return inspectors, failed


def _matches(inspectors: dict[str, Any], failed: dict[str, str]) -> list[str]:
    found = []
    for name, inspector in inspectors.items():
        if name == "raw" or name in failed:
            continue
        try:
            if inspector.complete and inspector.format_match:
                found.append(name)
        except Exception as exc:
            failed[name] = str(exc)
    return found


def _magic_vote(head: bytes) -> tuple[str, str | None, str]:
    """libmagic's description, the disk format it implies (if any), and advice for non-images."""
    try:
        import magic
    except ImportError as exc:  # the Python binding loads libmagic.so at import
        raise EnvironmentProblem(
            f"libmagic is not available ({exc}); install it: apt-get install -y libmagic1",
            code="missing_dependency",
        ) from None
    description = magic.from_buffer(head) or ""
    for prefix, fmt, advice in _MAGIC_VOTES:
        if description.startswith(prefix):
            return description, fmt, advice
    return description, None, ""


def _safety_reasons(inspector: Any, name: str) -> list[Reason]:
    fi = _format_inspector()
    try:
        inspector.safety_check()
    except fi.SafetyCheckFailed as exc:
        reasons = []
        for check, failure in sorted(exc.failures.items()):
            code = _CHECK_REASONS.get(check.removeprefix("inner_"), "unsafe")
            reasons.append(Reason(code, f"{name} header: {failure}"))
        return reasons
    except fi.ImageFormatError as exc:
        return [Reason("corrupt", f"{name} header cannot be checked: {exc}")]
    return []


def _qcow2_reasons(src: Source) -> list[Reason]:
    """What oslo's qcow2 checks leave out: version 1, encryption, the DATA extension."""
    header = src.pread(min(src.size, 2 * 1024 * 1024), 0)
    if len(header) < 104:
        return [Reason("corrupt", "qcow2 header is truncated")]
    (version,) = struct.unpack_from(">I", header, 4)
    if version == 1:
        return [
            Reason(
                "unsupported_format",
                "this is a QCOW version 1 image, which is obsolete; "
                "convert it elsewhere with a trusted qemu-img first",
            )
        ]
    reasons = []
    (cluster_bits,) = struct.unpack_from(">I", header, 20)
    (crypt_method,) = struct.unpack_from(">I", header, 32)
    if crypt_method != 0:
        kind = {1: "AES", 2: "LUKS"}.get(crypt_method, f"method {crypt_method}")
        reasons.append(
            Reason(
                "encrypted",
                f"qcow2 image is encrypted ({kind}); its data cannot "
                "be inspected or converted without the key",
            )
        )
    ext_offset = 72 if version == 2 else struct.unpack_from(">I", header, 100)[0]
    end = min(len(header), 1 << min(max(cluster_bits, 9), 21))
    while ext_offset + 8 <= end:
        ext_type, ext_len = struct.unpack_from(">II", header, ext_offset)
        if ext_type == 0:
            break
        if ext_type == _QCOW2_DATA_EXT:
            reasons.append(Reason("data_file", "qcow2 header names an external data file"))
        ext_offset += 8 + (ext_len + 7) // 8 * 8
    return reasons


def detect(src: Source) -> Detection:
    """Decide the format from content alone and run the header safety checks."""
    inspectors, failed = _run_inspectors(src)
    found = _matches(inspectors, failed)
    head = src.pread(_MAGIC_BYTES, 0)
    description, magic_format, advice = _magic_vote(head)
    result = Detection(magic=description)

    if set(found) == {"iso", "gpt"}:  # a hybrid ISO: a bootable CD image, not a disk
        found = ["iso"]
    if len(found) > 1:
        names = ", ".join(sorted(found))
        result.reasons.append(
            Reason(
                "multiple_formats",
                f"content matches several formats at once ({names}): a polyglot image is refused",
            )
        )
        return result

    oslo_name = found[0] if found else "raw"
    if oslo_name == "raw" and magic_format is None and advice:
        result.reasons.append(Reason("unsupported_format", f"this is {advice}"))
        return result
    if oslo_name in _UNSUPPORTED:
        result.reasons.append(Reason("unsupported_format", f"this is {_UNSUPPORTED[oslo_name]}"))
        return result
    oslo_family = "qcow2" if magic_format == "qcow" else magic_format
    if magic_format and oslo_family != oslo_name:
        if oslo_name == "raw" and magic_format in failed:
            result.reasons.append(
                Reason(
                    "corrupt",
                    f"looks like {magic_format} ({description}) "
                    f"but its header does not parse: {failed[magic_format]}",
                )
            )
        else:
            result.reasons.append(
                Reason(
                    "multiple_formats",
                    f"libmagic sees {description!r} where the format "
                    f"inspector sees {oslo_name}: refused as ambiguous",
                )
            )
        return result

    inspector = inspectors[oslo_name]
    result.format = _QEMU_NAME.get(oslo_name, oslo_name)
    if oslo_name == "gpt":
        result.partition_table = "gpt" if _has_protective_mbr(head) else "mbr"
    if oslo_name == "qcow2":
        result.reasons.extend(_qcow2_reasons(src))
        if any(r.code == "unsupported_format" for r in result.reasons):
            result.format = None
            return result
    if oslo_name == "vmdk":
        vmdk_type = getattr(inspector, "vmdktype", "formatnotfound")
        if vmdk_type not in ("monolithicsparse", "streamoptimized"):
            result.reasons.append(
                Reason(
                    "unsupported_format",
                    f"VMDK of type {vmdk_type!r} keeps its data in other files; only "
                    "monolithicSparse and streamOptimized VMDKs are accepted",
                )
            )
            result.format = None
            return result
    result.reasons.extend(r for r in _safety_reasons(inspector, oslo_name) if r not in result.reasons)
    result.virtual_size = src.size if oslo_name in ("raw", "gpt") else int(inspector.virtual_size)
    return result


def _has_protective_mbr(head: bytes) -> bool:
    return any(head[446 + 16 * i + 4] == 0xEE for i in range(4))
