"""What qemu itself reads a file as, so that `raw` means raw to every consumer.

An image imagetool calls safe may later be opened without an explicit format
(`qemu-img` without `-f`, or any library on qemu's block layer). qemu then lets
every format driver score the first BLOCK_PROBE_BUF_SIZE (2048) bytes and opens
the best; raw scores 1, so any claim beats it. oslo's format inspector knows fewer
formats than qemu and reads some headers differently (a VMDK text descriptor must
be printable for oslo, not for qemu), so a file oslo calls raw can still be opened
as Parallels, cloop or a VMDK descriptor naming host files (CVE-2022-47951).

Each probe below follows one qemu `*_probe` function of QEMU 7.2 (the qemu-img
imagetool is tested with), over the buffer qemu builds: the first 2048 bytes,
zero-filled past the end of a short file (find_image_format in block.c reads 2048
bytes; file-posix zero-fills a short read). DMG is the exception: qemu's probe looks
only at a `.dmg` name, and a library may store the file under any name, so its
`koly` trailer, found where qemu's dmg_open looks for it, is the evidence instead.

One probe is libvirt's, not qemu's: a User-mode Linux COW header, which libvirt's own
format probe recognises and follows to a backing file.

The header readers here (VHD footer, qcow2 header) follow qemu too: a VHD's size
comes from its CHS geometry or its current_size depending on the creator app, as in
vpc_open, and a fixed VHD keeps its footer only at the end of the file.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from imagetool.source import Source

PROBE_BYTES = 2048  # BLOCK_PROBE_BUF_SIZE, include/block/block_int-common.h
# The tail qemu reads: a VHD footer is the last 512 bytes; dmg_find_koly_offset searches the last 1023.
TAIL_BYTES = 1024
SECTOR = 512


@dataclass(frozen=True)
class Evidence:
    """The bytes qemu's probes see: the zero-padded probe buffer, and the end of the file."""

    head: bytes  # exactly PROBE_BYTES
    tail: bytes  # the last min(size, TAIL_BYTES) bytes of the file
    size: int

    @classmethod
    def read(cls, src: Source) -> Evidence:
        """Two bounded reads, whatever the file's size (a 4 TiB sparse file costs the same)."""
        head = src.pread(PROBE_BYTES, 0).ljust(PROBE_BYTES, b"\0")
        tail_length = min(src.size, TAIL_BYTES)
        return cls(head, src.pread(tail_length, src.size - tail_length), src.size)


@dataclass(frozen=True)
class Claim:
    """One qemu driver that would open the file: its driver name and what it recognised."""

    format: str
    what: str


def bochs(ev: Evidence) -> bool:
    """block/bochs.c bochs_probe (QEMU 7.2): NUL-terminated magic, "Redolog"/"Growing", version 1 or 2."""
    (version,) = struct.unpack_from("<I", ev.head, 64)
    return (
        ev.head.startswith(b"Bochs Virtual HD Image\0")
        and ev.head[32:40] == b"Redolog\0"
        and ev.head[48:56] == b"Growing\0"
        and version in (0x00010000, 0x00020000)
    )


_CLOOP_V2 = b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"


def cloop(ev: Evidence) -> bool:
    """block/cloop.c cloop_probe (QEMU 7.2): the V2.0 shell-script preamble (score 2, still above raw)."""
    return ev.head.startswith(_CLOOP_V2)


def dmg(ev: Evidence) -> bool:
    """block/dmg.c (QEMU 7.2): a `koly` UDIF trailer where dmg_find_koly_offset searches.

    dmg_probe itself only checks for a `.dmg` name (score 2); dmg_open then looks for
    `koly` starting within the last 1023 bytes of the size rounded up to 512 (so a
    DMG padded to 512 bytes is found too), a whole trailer before the end.
    """
    length = -(-ev.size // SECTOR) * SECTOR  # bdrv_getlength rounds up to whole sectors
    if length < SECTOR:
        return False
    start = length - 1023 if length > 1023 else 0
    padded = ev.tail + bytes(length - ev.size)  # covers [length - len(padded), length)
    first = start - (length - len(padded))
    return b"koly" in padded[first : first + min(length, 515)]


def parallels(ev: Evidence) -> bool:
    """block/parallels.c parallels_probe (QEMU 7.2): either magic, then version 2."""
    (version,) = struct.unpack_from("<I", ev.head, 16)
    return ev.head[:16] in (b"WithoutFreeSpace", b"WithouFreSpacExt") and version == 2


def _qcow_version(ev: Evidence) -> int | None:
    return struct.unpack_from(">I", ev.head, 4)[0] if ev.head.startswith(b"QFI\xfb") else None


def qcow(ev: Evidence) -> bool:
    """block/qcow.c qcow_probe (QEMU 7.2): qcow magic, version exactly 1."""
    return _qcow_version(ev) == 1


def qcow2(ev: Evidence) -> bool:
    """block/qcow2.c qcow2_probe (QEMU 7.2): qcow magic, any version from 2 up (3, and unknown ones)."""
    version = _qcow_version(ev)
    return version is not None and version >= 2


def qed(ev: Evidence) -> bool:
    """block/qed.c bdrv_qed_probe (QEMU 7.2): little-endian magic "QED\\0"."""
    return ev.head.startswith(b"QED\0")


def vdi(ev: Evidence) -> bool:
    """block/vdi.c vdi_probe (QEMU 7.2): signature 0xbeda107f at offset 64."""
    (signature,) = struct.unpack_from("<I", ev.head, 64)
    return bool(signature == 0xBEDA107F)


def vhdx(ev: Evidence) -> bool:
    """block/vhdx.c vhdx_probe (QEMU 7.2): the file identifier "vhdxfile"."""
    return ev.head.startswith(b"vhdxfile")


def vmdk_sparse(ev: Evidence) -> bool:
    """block/vmdk.c vmdk_probe (QEMU 7.2), binary case: VMDK3 "COWD" or VMDK4 "KDMV" magic."""
    return ev.head[:4] in (b"COWD", b"KDMV")


_VMDK_VERSION_LINES = tuple(f"version={n}{end}".encode() for n in (1, 2, 3) for end in ("\n", "\r\n"))


def vmdk_descriptor(ev: Evidence) -> bool:
    """block/vmdk.c vmdk_probe (QEMU 7.2), text case: the first line not a comment is `version=N`.

    Only `#` comment lines and lines of spaces may come before it; a blank line
    without spaces, or any other text, ends the probe. Nothing else need be
    printable: this is how a descriptor with binary bytes in its first sector
    reaches qemu while oslo's inspector calls it raw.
    """
    buf, pos, end = ev.head, 0, len(ev.head)
    while pos < end:
        if buf[pos] == ord("#"):
            newline = buf.find(b"\n", pos)
            pos = end if newline < 0 else newline + 1
            continue
        if buf[pos] == ord(" "):
            while pos < end and buf[pos] == ord(" "):
                pos += 1
            if pos < end and buf[pos] == ord("\r"):
                pos += 1
            if pos == end or buf[pos] != ord("\n"):
                return False
            pos += 1
            continue
        return buf.startswith(_VMDK_VERSION_LINES, pos)
    return False


def vpc(ev: Evidence) -> bool:
    """block/vpc.c vpc_probe (QEMU 7.2): the footer copy "conectix" at offset 0 (a dynamic VHD)."""
    return ev.head.startswith(b"conectix")


def luks(ev: Evidence) -> bool:
    """crypto/block-luks.c qcrypto_block_luks_has_format (QEMU 7.2), via block/crypto.c: magic, version 1."""
    (version,) = struct.unpack_from(">H", ev.head, 6)
    return ev.head.startswith(b"LUKS\xba\xbe") and version == 1


def uml_cow(ev: Evidence) -> bool:
    """libvirt's storage probe (src/storage_file/storage_file_probe.c, "cow"): a User-mode Linux COW
    file, magic "OOOM" and version 2, whose header names a backing file libvirt then opens.

    Not a qemu format: the one libvirt probes that qemu does not, so a raw verdict holds there too.
    """
    (version,) = struct.unpack_from(">I", ev.head, 4)
    return ev.head.startswith(b"OOOM") and version == 2


# qemu driver name, what its probe recognised (for messages), the probe.
PROBES: tuple[tuple[str, str, Callable[[Evidence], bool]], ...] = (
    ("bochs", "a Bochs disk image", bochs),
    ("cloop", "a compressed loop image", cloop),
    ("dmg", "an Apple disk image with a koly trailer", dmg),
    ("parallels", "a Parallels disk image", parallels),
    ("qcow", "a QCOW version 1 image", qcow),
    ("qcow2", "a qcow2 image", qcow2),
    ("qed", "a QED image", qed),
    ("vdi", "a VDI image", vdi),
    ("vhdx", "a VHDX image", vhdx),
    ("vmdk", "a VMDK sparse extent", vmdk_sparse),
    ("vmdk", "a VMDK text descriptor naming files it would open", vmdk_descriptor),
    ("vpc", "a VHD image", vpc),
    ("luks", "a LUKS-encrypted container", luks),
    ("cow", "a User-mode Linux COW image (libvirt opens the backing file it names)", uml_cow),
)


def claims(ev: Evidence) -> list[Claim]:
    """Every qemu driver whose probe would take this file over raw."""
    return [Claim(name, what) for name, what, probe in PROBES if probe(ev)]


# Creator apps whose VHDs are sized by current_size; qemu sizes every other one by CHS (vpc_open).
_SIZED_BY_CURRENT_SIZE = (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0")
_VHD_MAX_GEOMETRY = 65535 * 16 * 255
VHD_FIXED = 2


@dataclass(frozen=True)
class VhdFooter:
    """The fields of a 512-byte VHD footer that decide how qemu opens and sizes the image."""

    creator_app: bytes
    current_size: int
    cylinders: int
    heads: int
    sectors_per_track: int
    disk_type: int
    checksum_ok: bool

    @classmethod
    def parse(cls, block: bytes) -> VhdFooter:
        """The footer in `block`, which must be 512 bytes starting with the "conectix" cookie."""
        if len(block) != SECTOR or not block.startswith(b"conectix"):
            raise ValueError("no 512-byte VHD footer with a conectix cookie")
        creator_app, current_size, cylinders, heads, sectors = struct.unpack_from(">4s16xQHBB", block, 28)
        disk_type, checksum = struct.unpack_from(">II", block, 60)
        # vpc_checksum: the one's complement of the byte sum, with the checksum field zeroed
        computed = ~(sum(block) - sum(block[64:68])) & 0xFFFFFFFF
        return cls(creator_app, current_size, cylinders, heads, sectors, disk_type, computed == checksum)

    @property
    def virtual_size(self) -> int:
        """Bytes as qemu's vpc_open counts them: by CHS geometry, unless the creator app or a maximal
        geometry says current_size."""
        sectors = self.cylinders * self.heads * self.sectors_per_track
        if self.creator_app in _SIZED_BY_CURRENT_SIZE or sectors == _VHD_MAX_GEOMETRY:
            sectors = self.current_size // SECTOR
        return sectors * SECTOR


def fixed_vhd_footer(ev: Evidence) -> VhdFooter | None:
    """A footer only at the end of the file: vpc_open then takes the image for a fixed VHD."""
    last = ev.tail[-SECTOR:]
    if ev.head.startswith(b"conectix") or ev.size < SECTOR or not last.startswith(b"conectix"):
        return None
    return VhdFooter.parse(last)


QCOW2_V2_HEADER = 72
QCOW2_V3_HEADER = 104


@dataclass(frozen=True)
class Qcow2Header:
    """The qcow2 header fields (docs/interop/qcow2.txt) that bound the work qemu-img will do."""

    cluster_bits: int
    crypt_method: int
    l1_size: int
    refcount_table_clusters: int
    nb_snapshots: int
    header_length: int  # where header extensions start
    virtual_size: int

    @classmethod
    def parse(cls, data: bytes) -> Qcow2Header:
        """The header at the start of `data`; ValueError when `data` ends inside it."""
        version = struct.unpack_from(">I", data, 4)[0] if len(data) >= 8 else 0
        needed = QCOW2_V2_HEADER if version == 2 else QCOW2_V3_HEADER
        if len(data) < needed:
            raise ValueError(f"truncated: the file ends at byte {len(data)}, inside its {needed}-byte header")
        cluster_bits, crypt_method, l1_size = struct.unpack_from(">I8xII", data, 20)
        refcount_table_clusters, nb_snapshots = struct.unpack_from(">II", data, 56)
        header_length = QCOW2_V2_HEADER if version == 2 else struct.unpack_from(">I", data, 100)[0]
        (virtual_size,) = struct.unpack_from(">Q", data, 24)
        return cls(
            cluster_bits,
            crypt_method,
            l1_size,
            refcount_table_clusters,
            nb_snapshots,
            header_length,
            virtual_size,
        )

    def l1_entries_needed(self) -> int:
        """L1 entries the virtual size needs: one per L2 table of cluster_size / 8 entries."""
        covered = (1 << self.cluster_bits) * ((1 << self.cluster_bits) // 8)
        return -(-self.virtual_size // covered)

    def extension_types(self, data: bytes) -> list[int]:
        """The header extensions' types, walked as qemu does: from the header's end to the first cluster's."""
        types = []
        offset, end = self.header_length, min(len(data), 1 << min(max(self.cluster_bits, 9), 21))
        while offset + 8 <= end:
            ext_type, ext_len = struct.unpack_from(">II", data, offset)
            if ext_type == 0:  # the end-of-extensions marker
                break
            types.append(ext_type)
            offset += 8 + (ext_len + 7) // 8 * 8
        return types
