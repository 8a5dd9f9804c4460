"""Sizes the way the image library counts them, and the exact non-zero data scan.

Units: the library's "20 GB" server disk is 20480 MiB, so a suffix here is always
binary (K=KiB, M=MiB, G=GiB, T=TiB); `50G`, `51200M` and `53687091200` are equal.
The library reports `virtual_size` and `disk_size` as whole MiB; we round up, since
a disk must be at least that big to hold the image.

`disk_size` (non-zero data) is counted in 4 KiB blocks: a block counts, whole,
when any byte in it is non-zero. Holes are skipped with SEEK_DATA/SEEK_HOLE, so a
sparse 64 GiB file costs only the reads of its data.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from imagetool.errors import UsageProblem

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

BLOCK = 4 * KiB  # the granularity of disk_size
_CHUNK = 4 * MiB  # read size of the scan: large enough that Python overhead vanishes
_ZERO_BLOCK = bytes(BLOCK)
_ZERO_CHUNK = bytes(_CHUNK)

_UNITS = {"": 1, "B": 1, "K": KiB, "M": MiB, "G": GiB, "T": TiB, "P": 1024 * TiB}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Extent:
    """Guest bytes [start, start+length) that hold data, stored at `host` in the image file.

    `host` is None where the data cannot be read directly (a compressed cluster).
    """

    start: int
    length: int
    host: int | None


def parse_size(text: str) -> int:
    """`50G` / `51200M` / `53687091200` -> bytes (binary units; see module doc)."""
    match = _SIZE_RE.match(str(text))
    if not match:
        raise UsageProblem(f"{text!r} is not a size (try 50G, 51200M or a byte count)", code="bad_size")
    number, unit = match.groups()
    value = float(number) * _UNITS[unit.upper()] if "." in number else int(number) * _UNITS[unit.upper()]
    return int(value)


def to_mib(size: int) -> int:
    """Bytes -> whole MiB, rounded up (the library's unit for virtual_size/disk_size)."""
    return -(-size // MiB)


def human(size: int | None) -> str:
    """Bytes -> a short binary-unit string for people (`1.5 GiB`)."""
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The (start, end) byte ranges that hold data, per SEEK_DATA/SEEK_HOLE.

    Filesystems without hole support report the whole file as one extent,
    which is still correct, only slower to scan.
    """
    extents: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        extents.append((start, min(end, size)))
        pos = end
    return extents


def count_zero_blocks(buf: bytes | bytearray, length: int) -> int:
    """How many whole aligned 4 KiB blocks of buf[:length] are all zero.

    `bytes.find` of a 4 KiB zero needle skips through non-zero data a block at a
    time in C, so dense data costs about one comparison per block.
    """
    zeros = 0
    pos = buf.find(_ZERO_BLOCK, 0, length)
    while pos != -1:
        block = -(-pos // BLOCK) * BLOCK  # first aligned block the zero run may cover
        while block + BLOCK <= length and buf[block : block + BLOCK] == _ZERO_BLOCK:
            zeros += 1
            block += BLOCK
        pos = buf.find(_ZERO_BLOCK, block + 1, length)
    return zeros


def _aligned_data_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of every data extent, widened to whole 4 KiB blocks, none counted twice."""
    done = 0  # extents may share a 4 KiB block
    for start, end in data_extents(fd, size):
        pos = max(start - start % BLOCK, done)
        stop = min(-(-end // BLOCK) * BLOCK, size)
        if pos < stop:
            yield pos, stop - pos
        done = max(done, stop)


def _units(ranges: Iterable[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """Split ranges into work units of at most one read buffer."""
    for offset, length in ranges:
        for pos in range(0, length, _CHUNK):
            yield offset + pos, min(_CHUNK, length - pos)


_buffers = threading.local()


def _nonzero_blocks_at(fd: int, offset: int, length: int) -> int:
    buf = getattr(_buffers, "buf", None)
    if buf is None:
        buf = _buffers.buf = bytearray(_CHUNK)
    got = os.preadv(fd, [memoryview(buf)[:length]], offset)
    if got <= 0:
        return 0
    if got == _CHUNK and buf == _ZERO_CHUNK:
        return 0
    if got < _CHUNK:
        buf[got:] = bytes(_CHUNK - got)  # a partial last block pads with zeros
    blocks = -(-got // BLOCK)
    return blocks - count_zero_blocks(buf, blocks * BLOCK)


def count_nonzero_ranges(fd: int, ranges: Iterable[tuple[int, int]]) -> int:
    """Bytes in 4 KiB blocks holding any non-zero byte, blocks counted from each range's start.

    Reads in 4 MiB units on two threads: preadv releases the GIL while the kernel
    copies, so reading and comparing overlap. A partial last block counts as a
    whole block when it has data, as it would on the library's disk.
    """
    workers = max(1, min(2, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        counts = pool.map(lambda unit: _nonzero_blocks_at(fd, *unit), _units(ranges))
        return sum(counts) * BLOCK


def count_nonzero_bytes(fd: int, size: int) -> int:
    """Exact `disk_size` of a raw file: only its data extents are read."""
    return count_nonzero_ranges(fd, _aligned_data_ranges(fd, size))
