"""Partitions of the guest disk (GPT, MBR with logical partitions), or the whole disk when it has none.

dissect.volume parses the tables. Its GPT sizes end one sector early (it counts
last_lba - first_lba), so a GPT partition is widened by one sector, never past the disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO, cast

from imagetool.guest import limits
from imagetool.guest.budget import Budget
from imagetool.guest.text import short_error


@dataclass(frozen=True)
class Volume:
    """A byte range of the disk that may hold a filesystem."""

    number: int | None  # partition number; None for the whole disk
    offset: int
    size: int
    scheme: str  # "gpt", "mbr", "none"
    type: str  # the partition type, as the table names it
    partuuid: str | None = None  # GPT partition GUID, or MBR "<disk signature>-<nn>" (fstab's PARTUUID=)
    partlabel: str | None = None  # GPT partition name (fstab's PARTLABEL=)

    def describe(self) -> str:
        if self.number is None:
            return f"whole disk ({self.size} bytes, no partition table)"
        return (
            f"{self.scheme.upper()} partition {self.number} ({self.type}) at byte {self.offset}, "
            f"{self.size} bytes"
        )


def find_volumes(disk: BinaryIO, disk_size: int, budget: Budget) -> tuple[list[Volume], list[str]]:
    """The partitions of `disk`, or the whole disk; and evidence lines saying what was found."""
    from dissect.volume.disk import Disk  # type: ignore[import-untyped]
    from dissect.volume.disk.schemes import GPT, MBR  # type: ignore[import-untyped]

    evidence: list[str] = []
    disk.seek(0)
    head = disk.read(1024)
    bad = _bad_gpt_header(head)
    if bad:
        evidence.append(f"GPT header at LBA 1 {bad}: the partition table is not read")
        return [], evidence
    disk.seek(0)
    try:
        table = Disk(disk)
    except Exception as exc:  # no scheme matched: a filesystem on the whole disk, or nothing
        evidence.append(f"no partition table ({short_error(exc)}): reading the whole disk")
        return [Volume(None, 0, disk_size, "none", "whole disk")], evidence
    scheme = table.scheme
    if isinstance(scheme, GPT):
        name = "gpt"
    elif isinstance(scheme, MBR):
        name = "mbr"
    else:
        evidence.append(f"partition table {type(scheme).__name__} is not one imagetool reads")
        return [], evidence
    signature = table.serial if name == "mbr" else None
    found: list[Volume] = []
    for part in table.partitions[: limits.MAX_VOLUMES]:
        budget.check()
        offset, size = int(part.offset), int(part.size)
        if name == "gpt":
            size = min(size + table.sector_size, max(disk_size - offset, 0))
        if size <= 0 or offset >= disk_size:
            evidence.append(f"{name.upper()} partition {part.number} lies outside the disk: skipped")
            continue
        if name == "gpt":
            partuuid = str(part.guid).lower() if part.guid else None
            label = part.name.rstrip("\x00") if isinstance(part.name, str) else None
        else:
            partuuid = f"{int(signature):08x}-{int(part.number):02x}" if signature else None
            label = None
        found.append(
            Volume(
                number=int(part.number),
                offset=offset,
                size=min(size, disk_size - offset),
                scheme=name,
                type=str(part.type_str),
                partuuid=partuuid,
                partlabel=label or None,
            )
        )
    if len(table.partitions) > limits.MAX_VOLUMES:
        evidence.append(f"{len(table.partitions)} partitions: only the first {limits.MAX_VOLUMES} are read")
    evidence.append(f"{name.upper()} partition table with {len(found)} partition(s)")
    return found, evidence


def _bad_gpt_header(head: bytes) -> str | None:
    """Why a GPT header is not worth handing to the reader (its loop trusts these counts), or None.

    The UEFI specification's arrays hold 128 entries of 128 bytes; an entry size is 128 times
    a power of two. A header claiming millions of entries (or entries of 0 bytes) would make
    the reader loop for minutes over the same bytes.
    """
    if len(head) < 1024 or head[510:512] != b"\x55\xaa" or head[512:520] != b"EFI PART":
        return None
    count = int.from_bytes(head[512 + 80 : 512 + 84], "little")
    size = int.from_bytes(head[512 + 84 : 512 + 88], "little")
    if not 0 < count <= limits.MAX_GPT_ENTRIES:
        return f"claims {count} partition entries (at most {limits.MAX_GPT_ENTRIES})"
    if size < 128 or size > 4096 or size & (size - 1):
        return f"claims partition entries of {size} bytes (128, 256, ... 4096)"
    return None


def volume_stream(disk: BinaryIO, volume: Volume) -> BinaryIO:
    """A stream of one volume's bytes (reads past its end return nothing)."""
    from dissect.util.stream import RangeStream  # type: ignore[import-untyped]

    return cast(BinaryIO, RangeStream(disk, volume.offset, volume.size))
