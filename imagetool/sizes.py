"""Sizes the way the image library counts them, and the exact non-zero data scan.

Units: the library's "20 GB" server disk is 20480 MiB, so a suffix here is always
binary (K=KiB, M=MiB, G=GiB, T=TiB); `50G`, `51200M` and `53687091200` are equal.
The library reports `virtual_size` and `disk_size` as whole MiB; we round up, since
a disk must be at least that big to hold the image.

`disk_size` (non-zero data) is counted in 4 KiB blocks: a block counts, whole,
when any byte in it is non-zero. Holes are skipped with SEEK_DATA/SEEK_HOLE, so a
sparse 64 GiB file costs only the reads of its data. The cost follows the bytes read
plus a few microseconds per extent (4 MiB reads, ranges that touch sharing one, on two
threads), and memory is bounded whatever the number of extents: ranges are streamed, a
few batches at a time, into one 4 MiB buffer per thread.
"""

from __future__ import annotations

import os
import re
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal

from imagetool.errors import UsageProblem

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

BLOCK = 4 * KiB  # the granularity of disk_size
_CHUNK = 4 * MiB  # the longest read of the scan: large enough that Python overhead vanishes
# Ranges at most this far apart share one read (ranges that touch or overlap always do).
# Measured (bench/disk_size_bench.py --gaps, 4 KiB ranges, page cache warm): a read of its
# own costs ~1 us more than sharing one, and each range costs its own Python (3-7 us) either
# way, so a shared read pays off only while the gap costs under ~1 us to read: shared/separate
# was 0.84-1.13 with 4 KiB gaps, 1.00-1.25 with 8 KiB, 1.2-1.3 with 12 KiB, 1.7-2.5 with 28 KiB.
# Cold holes cost more still (the kernel zero-fills a page cache page for each).
GAP = BLOCK
_RANGES_PER_BATCH = 1024  # ranges one thread takes at a time: bounds the memory of queued work
_IN_FLIGHT = 2  # batches queued per thread
_ZERO_BLOCK = bytes(BLOCK)
_ZERO_BYTES = _CHUNK
_ZEROS = memoryview(bytes(_ZERO_BYTES))  # compared against in place (startswith), never copied

_MAX_SIZE_TEXT = 32  # characters: a longer "size" is a typo or an attack
_MAX_SIZE = (1 << 63) - 1  # what a file offset can hold
_UNITS = {"": 1, "B": 1, "K": KiB, "M": MiB, "G": GiB, "T": TiB, "P": 1024 * TiB}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE | re.ASCII)


@dataclass(frozen=True, slots=True)
class Extent:
    """Guest bytes [start, start+length) that hold data, stored at `host` in the image file.

    `host` is None where the data cannot be read directly (a compressed cluster); `layer`
    says which file of a backing chain holds it (0: the image itself).
    """

    start: int
    length: int
    host: int | None
    layer: int = 0


def parse_size(text: str) -> int:
    """`50G` / `51200M` / `53687091200` / `1.5G` -> bytes (binary units; see module doc).

    Decimal arithmetic, and a bound on the text and the value: no float overflow, no
    4,300-digit integer conversion, nothing a file offset could not hold.
    """
    text = str(text)
    shown = repr(text if len(text) <= _MAX_SIZE_TEXT else text[:_MAX_SIZE_TEXT] + "...")
    match = _SIZE_RE.match(text) if len(text) <= _MAX_SIZE_TEXT else None
    if not match:
        raise UsageProblem(f"{shown} is not a size (try 50G, 51200M or a byte count)", code="bad_size")
    number, unit = match.groups()
    value = int(Decimal(number) * _UNITS[unit.upper()])
    if value > _MAX_SIZE:
        raise UsageProblem(f"{shown} is more than any disk holds (at most 8 EiB)", code="bad_size")
    return value


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


def apart(size: int, limit: int) -> tuple[str, str]:
    """Two sizes for people, in bytes when their rounded figures would tie (`2.2 GiB` vs `2.2 GiB`)."""
    shown, most = human(size), human(limit)
    return (f"{size} bytes", f"{limit} bytes") if shown == most else (shown, most)


def over_limit(size: int, limit: int) -> str:
    """`3.1 GiB, over the limit of 3.0 GiB`, in bytes when the rounded figures would tie."""
    shown, most = apart(size, limit)
    return f"{shown}, over the limit of {most}"


def iter_data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """The (start, end) byte ranges that hold data, per SEEK_DATA/SEEK_HOLE, as they are found.

    Filesystems without hole support report the whole file as one extent,
    which is still correct, only slower to scan.
    """
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end if end < size else size
        pos = end


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """`iter_data_extents` as a list."""
    return list(iter_data_extents(fd, size))


def count_zero_blocks(buf: bytes | bytearray, length: int) -> int:
    """How many whole aligned 4 KiB blocks of buf[:length] are all zero."""
    return _zero_blocks(buf, 0, length - length % BLOCK)


def _zero_blocks(buf: bytes | bytearray, start: int, stop: int) -> int:
    """Whole 4 KiB blocks of buf[start:stop] that are all zero, blocks aligned to `start`.

    `(stop - start) % BLOCK == 0`. Python touches candidates only, never every block: a zero
    block ends in a zero byte, so the last byte of every block is gathered by one strided
    slice (C), and only blocks whose last byte is zero are compared whole, by `startswith`
    against zeros (memcmp, no copy). A run of zero blocks is measured in doubling, then
    halving, steps. Text never ends a block in a zero byte, random data one block in 256.
    """
    blocks = (stop - start) // BLOCK
    if blocks <= _ZERO_BYTES // BLOCK and buf.startswith(_ZEROS[: stop - start], start):
        return blocks  # all zero: one memcmp
    tails = buf[start + BLOCK - 1 : stop : BLOCK]
    zeros = 0
    block = tails.find(0)
    while block != -1:
        step = 1
        while block + step <= blocks and buf.startswith(_ZEROS[: step * BLOCK], start + block * BLOCK):
            zeros += step
            block += step
            step = min(2 * step, _ZERO_BYTES // BLOCK)
        step //= 2  # the run ends within the next `step` blocks: halve down to it
        while step:
            if block + step <= blocks and buf.startswith(_ZEROS[: step * BLOCK], start + block * BLOCK):
                zeros += step
                block += step
            step //= 2
        block = tails.find(0, block + 1)  # `block` holds data (or is past the end)
    return zeros


def _nonzero_blocks(buf: bytes | bytearray, start: int, length: int) -> int:
    """4 KiB blocks of buf[start:start+length] (aligned to start) holding a non-zero byte.

    A partial last block is judged on the bytes it has: the rest of it is not the range's.
    """
    if length <= BLOCK:  # one block: one memcmp
        return 0 if buf.startswith(_ZEROS[:length], start) else 1
    whole = start + length - length % BLOCK
    count = (whole - start) // BLOCK - _zero_blocks(buf, start, whole)
    if whole < start + length and not buf.startswith(_ZEROS[: start + length - whole], whole):
        count += 1
    return count


def _aligned_data_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of every data extent, widened to whole 4 KiB blocks, none counted twice.

    A raw file's blocks all align to offset 0, so extents sharing a block join into one range.
    """
    pos = stop = 0
    for start, end in iter_data_extents(fd, size):
        first = start - start % BLOCK
        if first > stop:
            if pos < stop:
                yield pos, stop - pos
            pos = first
        last = -(-end // BLOCK) * BLOCK
        stop = max(stop, last if last < size else size)
    if pos < stop:
        yield pos, stop - pos


# One read of the scan: (file offset, length, [start, length, start, length, ...] of the ranges
# it serves, relative to the offset). A batch is the reads one thread does in one go.
_Read = tuple[int, int, list[int]]


def _batches(ranges: Iterable[tuple[int, int]]) -> Iterator[list[_Read]]:
    """Ranges grouped into reads of at most _CHUNK bytes, and reads into batches.

    A range longer than _CHUNK is cut at multiples of _CHUNK from its start (so its blocks
    stay aligned to its start). A range that begins inside the current read (mapped ranges
    may share host bytes) or at most GAP after its end joins it when the read stays within
    _CHUNK. A batch is handed to a thread once it holds _CHUNK bytes or _RANGES_PER_BATCH
    ranges, so no batch, and no read, is unbounded.
    """
    batch: list[_Read] = []
    batch_bytes = batch_ranges = 0
    first = end = 0
    parts: list[int] = []
    for offset, length in ranges:
        while length > 0:
            size = length if length < _CHUNK else _CHUNK
            if parts and first <= offset <= end + GAP and offset + size - first <= _CHUNK:
                parts += (offset - first, size)
                if offset + size > end:
                    end = offset + size
            else:
                if parts:
                    batch.append((first, end - first, parts))
                    batch_bytes += end - first
                first, end, parts = offset, offset + size, [0, size]
            batch_ranges += 1
            if batch_bytes >= _CHUNK or batch_ranges >= _RANGES_PER_BATCH:
                batch.append((first, end - first, parts))
                yield batch
                batch, batch_bytes, batch_ranges, parts = [], 0, 0, []
            offset += size
            length -= size
    if parts:
        batch.append((first, end - first, parts))
    if batch:
        yield batch


_buffers = threading.local()


def _count_batch(fd: int, batch: list[_Read]) -> int:
    """Non-zero blocks of every range of the batch, each read once into this thread's buffer."""
    buf: bytearray | None = getattr(_buffers, "buf", None)
    if buf is None:
        buf = _buffers.buf = bytearray(_CHUNK)
    view = memoryview(buf)
    blocks = 0
    for offset, length, parts in batch:
        got = os.preadv(fd, [view[:length]], offset)  # short only at the end of the file
        if len(parts) == 2 and got == length:  # the common case: one range, read whole
            blocks += _nonzero_blocks(buf, 0, length)
            continue
        last, last_count = (-1, -1), 0
        for i in range(0, len(parts), 2):
            start, size = parts[i], min(parts[i + 1], got - parts[i])  # past the end: zeros
            if size <= 0:
                continue
            if (start, size) != last:  # ranges sharing host bytes: each counts, compared once
                last, last_count = (start, size), _nonzero_blocks(buf, start, size)
            blocks += last_count
    return blocks


def count_nonzero_ranges(fd: int, ranges: Iterable[tuple[int, int]]) -> int:
    """Bytes in 4 KiB blocks holding any non-zero byte, blocks counted from each range's start.

    Each range counts on its own (mapped ranges may overlap in the file), but nearby ranges
    share one read, so the cost follows the bytes read, not the number of ranges. Two threads:
    preadv releases the GIL while the kernel copies, so one reads while the other compares.
    At most _IN_FLIGHT batches per thread are queued, so memory stays bounded however many
    ranges there are. A partial last block counts as a whole block when it has data, as it
    would on the library's disk.
    """
    workers = max(1, min(2, os.cpu_count() or 1))
    batches = _batches(ranges)
    if workers == 1:
        return sum(_count_batch(fd, batch) for batch in batches) * BLOCK
    blocks = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[Future[int]] = deque()
        for batch in batches:
            if len(pending) >= _IN_FLIGHT * workers:
                blocks += pending.popleft().result()
            pending.append(pool.submit(_count_batch, fd, batch))
        while pending:
            blocks += pending.popleft().result()
    return blocks * BLOCK


def count_nonzero_bytes(fd: int, size: int) -> int:
    """Exact `disk_size` of a raw file: only its data extents (and one-block holes between) are read."""
    return count_nonzero_ranges(fd, _aligned_data_ranges(fd, size))
