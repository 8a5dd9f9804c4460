"""A native writer of compressed qcow2: qemu-img's output format, at ISA-L's speed.

Follows docs/interop/qcow2.txt of QEMU's tree at commit 30afc12085c8 (the text with
the compression_type field of QEMU 5.1 and the Extended L2 Entries of 5.2, which this
writer does not use), and what qemu 7.2 does where the spec leaves a choice:

- version 3 (compat 1.1), no backing file, no snapshots, no extensions; refcount_order 4
  (16-bit refcounts); header_length 112 with compression_type at byte 104 (0 zlib,
  1 zstd, which also sets incompatible feature bit 3, as qemu does).
- A guest cluster is stored compressed when its compressed form is at most
  `cluster_size - 1` bytes (qemu compresses into a buffer of that size and writes the
  cluster whole when it does not fit), whole otherwise; all-zero clusters stay
  unallocated. The last, partial cluster is compressed padded with zeros, as qemu does.
- Compressed data is packed byte after byte, across host cluster boundaries when it
  runs on (the spec allows that). The descriptor holds the host offset and the number
  of 512-byte sectors after the one holding that offset; qemu reads through the end
  of the last sector and inflates until the cluster is full, so the tail is ignored.
- Refcounts are exact: `qemu-img check` counts one reference to every host cluster
  that the bytes [offset, end of the last sector) of each compressed cluster touch
  (qcow2-refcount.c, check_refcounts_l2), so a host cluster shared by n compressed
  clusters has refcount n. Like qemu's qcow2_alloc_bytes, packing moves on to a fresh
  cluster before a count would overflow 16 bits.

Layout, chosen for bounded memory and determinism: cluster 0 holds the header,
written last (an interrupted file has no qcow2 magic). Then guest data in guest
order: compressed clusters packed at a cursor; a whole cluster (a cluster stored
uncompressed, or an L2 table, written as soon as the clusters it maps are placed)
takes the next free host cluster, and what was left of the partly used cluster before
it stays open for later compressed clusters that fit (the smallest such gap first), so
storing a cluster whole costs almost no padding. After the data: the L1 table, the
refcount table and the refcount blocks. Memory is the clusters in flight, one L2
table, the L1 table and two bytes of refcount per host cluster.
"""

from __future__ import annotations

import functools
import math
import os
import struct
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from imagetool.codecs import Encoder, encoder

MAGIC = b"QFI\xfb"
VERSION = 3
HEADER_LENGTH = 112  # the v3 header, compression_type and its padding
REFCOUNT_ORDER = 4  # 16-bit refcounts, qemu's default
MAX_REFCOUNT = (1 << (1 << REFCOUNT_ORDER)) - 1
SECTOR = 512  # the unit of a compressed cluster's length
INCOMPAT_COMPRESSION_TYPE = 1 << 3
COMPRESSION_TYPES = {"zlib": 0, "zstd": 1}
L2_COMPRESSED = 1 << 62
COPIED = 1 << 63  # "refcount is exactly one": set on L1 entries and uncompressed clusters
MIN_CLUSTER_BITS, MAX_CLUSTER_BITS = 9, 21  # the spec's minimum; qemu opens nothing bigger than 2 MiB
MAX_L1_BYTES = 32 << 20  # qemu's limit on the L1 table
MAX_GAPS = 64  # partly filled clusters kept open for compressed clusters that fit (cheap to scan)
IN_FLIGHT_PER_THREAD = 4  # clusters queued per thread: keeps the threads busy, bounds memory
FLUSH_BYTES = 4 << 20  # contiguous output gathered before one pwrite
PROGRESS_SECONDS = 0.2  # the least time between two progress reports (the last one always comes)


class OutputTooBig(Exception):
    """The output grew past `limit`; `size` is what it had reached (the finished file is bigger)."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"qcow2 output reached {size} bytes, over the limit of {limit}")
        self.size = size
        self.limit = limit


@dataclass(frozen=True)
class WriteResult:
    """What was written; `size` = metadata + compressed + uncompressed + padding bytes."""

    size: int  # bytes of the file
    virtual_size: int
    cluster_size: int
    codec: str
    compression_type: str  # the header's: "zlib" or "zstd"
    level: int
    compressed_clusters: int
    uncompressed_clusters: int  # data that did not shrink below cluster_size - 1, stored whole
    zero_clusters: int  # listed as possibly holding data, but all zero: left unallocated
    compressed_bytes: int
    metadata_bytes: int  # header, L1, L2 tables, refcount table and blocks
    padding_bytes: int  # tails of host clusters that the next compressed cluster did not fit in


@dataclass(frozen=True)
class _Encoded:
    """One guest cluster ready to place: compressed bytes, the whole cluster, or nothing (zeros)."""

    index: int
    data: bytes | None
    compressed: bool


class _Packer:
    """Host space for compressed clusters (byte-packed) and whole clusters (aligned), and refcounts.

    `top` is the first host cluster not yet taken; `cursor` is where compressed bytes go
    at the top, running on into new clusters. A whole cluster is placed at the top, so
    the rest of a partly filled cluster before it becomes a gap; a compressed cluster
    goes into the smallest open gap it fits in (the oldest of equals) before the top.
    At most MAX_GAPS stay open: the oldest is given up (as padding) past that.
    """

    def __init__(self, cluster_size: int, max_refcount: int = MAX_REFCOUNT) -> None:
        self.cluster_size = cluster_size
        self.max_refcount = max_refcount
        self.top = 1  # cluster 0 is the header
        self.cursor = cluster_size
        self.gaps: list[list[int]] = []  # [start, end) in one host cluster each, oldest first
        self.padding = 0
        self.refcounts = array("H", [1])

    def _take(self, first: int, last: int) -> None:
        """One more reference to host clusters first..last."""
        if len(self.refcounts) <= last:
            self.refcounts.frombytes(bytes(2 * (last + 1 - len(self.refcounts))))
        for cluster in range(first, last + 1):
            self.refcounts[cluster] += 1

    def _full(self, offset: int) -> bool:
        """Whether the host cluster holding `offset` can take no more references."""
        return self.refcounts[offset // self.cluster_size] >= self.max_refcount

    def _close_top(self) -> None:
        """Leave the partly filled cluster at the top: its rest becomes a gap."""
        end = self.top * self.cluster_size
        if self.cursor < end:
            self.gaps.append([self.cursor, end])
            if len(self.gaps) > MAX_GAPS:
                start, stop = self.gaps.pop(0)
                self.padding += stop - start
        self.cursor = end

    def whole(self) -> int:
        """The host offset of a new whole cluster."""
        self._close_top()
        index = self.top
        self.top += 1
        self.cursor = self.top * self.cluster_size
        self._take(index, index)
        return index * self.cluster_size

    def compressed(self, length: int) -> int:
        """The host offset of `length` compressed bytes."""
        size = self.cluster_size
        fitting = [g for g in self.gaps if g[1] - g[0] >= length and not self._full(g[0])]
        if fitting:
            gap = min(fitting, key=lambda g: g[1] - g[0])
            offset = gap[0]
            gap[0] += length
            if gap[0] == gap[1]:
                self.gaps.remove(gap)
        else:
            if self.cursor % size and self._full(self.cursor):  # no gap: nothing more can go there
                self.padding += self.top * size - self.cursor
                self.cursor = self.top * size
            offset = self.cursor
            self.cursor += length
            self.top = max(self.top, (self.cursor - 1) // size + 1)
        self._take(offset // size, (offset + length - 1) // size)
        return offset

    def metadata(self, clusters: int) -> int:
        """The host offset of `clusters` consecutive clusters at the end, once all data is placed."""
        self._close_top()
        self.padding += sum(end - start for start, end in self.gaps)
        self.gaps = []
        first = self.top
        self.top += clusters
        self.cursor = self.top * self.cluster_size
        self._take(first, self.top - 1)
        return first * self.cluster_size


class _Output:
    """pwrite()s to `fd`, gathering contiguous pieces into one write."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.start = 0
        self.buffer = bytearray()

    def write(self, offset: int, data: bytes) -> None:
        if offset != self.start + len(self.buffer) or len(self.buffer) >= FLUSH_BYTES:
            self.flush()
            self.start = offset
        self.buffer += data

    def flush(self) -> None:
        view = memoryview(self.buffer)
        offset = self.start
        while view:
            done = os.pwrite(self.fd, view, offset)
            view, offset = view[done:], offset + done
        self.start += len(self.buffer)
        self.buffer = bytearray()


def _check(virtual_size: int, cluster_size: int, threads: int) -> int:
    """cluster_bits for these options; ValueError for options qemu could not open or we cannot run."""
    bits = cluster_size.bit_length() - 1
    if cluster_size != 1 << bits or not MIN_CLUSTER_BITS <= bits <= MAX_CLUSTER_BITS:
        raise ValueError(f"cluster_size must be a power of two from 512 to 2 MiB, not {cluster_size}")
    if virtual_size < 0 or virtual_size % SECTOR:
        raise ValueError(f"virtual_size must be a multiple of {SECTOR} bytes (qemu rounds a raw disk up)")
    if _l1_size(virtual_size, cluster_size) * 8 > MAX_L1_BYTES:
        raise ValueError(f"virtual_size {virtual_size} needs an L1 table bigger than qemu opens")
    if threads < 1:
        raise ValueError("threads must be at least 1")
    return bits


@functools.cache
def _zeros(size: int) -> bytes:
    """A zero cluster to compare with (memcmp: far faster than counting zero bytes)."""
    return bytes(size)


def _l1_size(virtual_size: int, cluster_size: int) -> int:
    return math.ceil(virtual_size / (cluster_size * (cluster_size // 8)))


def _encode(
    read: Callable[[int, int], bytes], index: int, cluster_size: int, virtual_size: int, codec: Encoder
) -> _Encoded:
    """Read one guest cluster (zero-padded past the disk's end) and compress it the way qemu would."""
    offset = index * cluster_size
    data = read(offset, min(cluster_size, virtual_size - offset))
    if len(data) < cluster_size:
        data += bytes(cluster_size - len(data))
    if data == _zeros(cluster_size):
        return _Encoded(index, None, False)
    packed = codec.compress(data)
    if len(packed) <= cluster_size - 1:
        return _Encoded(index, packed, True)
    return _Encoded(index, data, False)


def _ascending(clusters: Iterable[int], count: int) -> Iterator[int]:
    """The cluster indices as given; ValueError unless strictly ascending and inside the disk."""
    last = -1
    for index in clusters:
        if not last < index < count:
            raise ValueError(f"cluster {index} is out of order or past the disk's {count} clusters")
        last = index
        yield index


def _encoded(
    pool: ThreadPoolExecutor,
    clusters: Iterable[int],
    threads: int,
    job: Callable[[int], _Encoded],
) -> Iterator[_Encoded]:
    """`job` of every cluster, computed on the pool, yielded in order, a bounded number in flight."""
    pending: deque[Future[_Encoded]] = deque()
    for index in clusters:
        if len(pending) >= IN_FLIGHT_PER_THREAD * threads:
            yield pending.popleft().result()
        pending.append(pool.submit(job, index))
    while pending:
        yield pending.popleft().result()


def _header(
    virtual_size: int,
    cluster_bits: int,
    l1_size: int,
    l1_offset: int,
    refcount_table_offset: int,
    refcount_table_clusters: int,
    compression_type: str,
) -> bytes:
    kind = COMPRESSION_TYPES[compression_type]
    return struct.pack(
        ">4sIQIIQIIQQIIQQQQIIB7x",
        MAGIC,
        VERSION,
        0,  # backing_file_offset
        0,  # backing_file_size
        cluster_bits,
        virtual_size,
        0,  # crypt_method
        l1_size,
        l1_offset,
        refcount_table_offset,
        refcount_table_clusters,
        0,  # nb_snapshots
        0,  # snapshots_offset
        INCOMPAT_COMPRESSION_TYPE if kind else 0,
        0,  # compatible_features: no lazy refcounts
        0,  # autoclear_features
        REFCOUNT_ORDER,
        HEADER_LENGTH,
        kind,
    )


def _refcount_layout(used: int, cluster_size: int) -> tuple[int, int]:
    """(refcount table clusters, refcount blocks) covering `used` clusters plus themselves."""
    per_block = cluster_size * 8 // (1 << REFCOUNT_ORDER)
    table = blocks = 0
    while True:
        need_blocks = math.ceil((used + table + blocks) / per_block)
        need_table = math.ceil(need_blocks * 8 / cluster_size)
        if (need_table, need_blocks) == (table, blocks):
            return table, blocks
        table, blocks = need_table, need_blocks


def _big_endian(entries: array[int], length: int) -> bytes:
    """A table of 64- or 16-bit entries as the file stores it, zero-padded to `length` bytes."""
    copy = array(entries.typecode, entries)
    copy.byteswap()
    return copy.tobytes().ljust(length, b"\0")


class _Image:
    """The qcow2 being written: guest clusters placed in order, then the tables and the header."""

    def __init__(self, fd: int, virtual_size: int, cluster_size: int, cluster_bits: int) -> None:
        self.virtual_size = virtual_size
        self.cluster_size = cluster_size
        self.cluster_bits = cluster_bits
        self.out = _Output(fd)
        self.packer = _Packer(cluster_size)
        self.l1 = array("Q", bytes(8 * _l1_size(virtual_size, cluster_size)))
        self.l2 = array("Q")
        self.l2_index = -1
        self.l2_tables = 0
        self.compressed = self.uncompressed = self.zero = self.compressed_bytes = 0
        self.metadata_bytes = 0  # known once finished

    @property
    def size(self) -> int:
        """What the file takes so far: every host cluster handed out."""
        return self.packer.top * self.cluster_size

    def add(self, item: _Encoded) -> None:
        """Store one guest cluster (the clusters come in ascending order)."""
        if item.data is None:
            self.zero += 1
            return
        entries = self.cluster_size // 8
        if item.index // entries != self.l2_index:
            self._place_l2()
            self.l2, self.l2_index = array("Q", bytes(self.cluster_size)), item.index // entries
        if item.compressed:
            offset = self.packer.compressed(len(item.data))
            sectors = (offset + len(item.data) - 1) // SECTOR - offset // SECTOR
            entry = L2_COMPRESSED | sectors << (70 - self.cluster_bits) | offset
            self.compressed += 1
            self.compressed_bytes += len(item.data)
        else:
            offset = self.packer.whole()
            entry = offset | COPIED
            self.uncompressed += 1
        self.l2[item.index % entries] = entry
        self.out.write(offset, item.data)

    def _place_l2(self) -> None:
        """Write the L2 table filled so far (its clusters are all placed) and point the L1 at it."""
        if self.l2_index < 0:
            return
        offset = self.packer.whole()
        self.l1[self.l2_index] = offset | COPIED
        self.out.write(offset, _big_endian(self.l2, self.cluster_size))
        self.l2_tables += 1

    def finish(self, compression_type: str) -> int:
        """Write the last L2 table, the L1 table, the refcounts and then the header; return the size."""
        size = self.cluster_size
        self._place_l2()
        l1_clusters = max(1, math.ceil(len(self.l1) * 8 / size))
        l1_offset = self.packer.metadata(l1_clusters)
        self.out.write(l1_offset, _big_endian(self.l1, l1_clusters * size))
        table_clusters, blocks = _refcount_layout(self.packer.top, size)
        table_offset = self.packer.metadata(table_clusters)
        first_block = self.packer.metadata(blocks)
        refcounts = self.packer.refcounts
        assert len(refcounts) == self.packer.top, "every host cluster is counted"
        table = array("Q", (first_block + i * size for i in range(blocks)))
        self.out.write(table_offset, _big_endian(table, table_clusters * size))
        per_block = size * 8 // (1 << REFCOUNT_ORDER)
        for i in range(blocks):
            block = refcounts[i * per_block : (i + 1) * per_block]
            self.out.write(first_block + i * size, _big_endian(block, size))
        self.out.flush()  # everything else is on disk before the header makes it a qcow2
        self.out.write(
            0,
            _header(
                self.virtual_size,
                self.cluster_bits,
                len(self.l1),
                l1_offset,
                table_offset,
                table_clusters,
                compression_type,
            ),
        )
        self.out.flush()
        self.metadata_bytes = (1 + self.l2_tables + l1_clusters + table_clusters + blocks) * size
        return self.size


def write_qcow2(
    read: Callable[[int, int], bytes],
    clusters: Iterable[int],
    virtual_size: int,
    fd: int,
    *,
    cluster_size: int,
    codec: str = "zlib",
    level: int | None = None,
    threads: int = 2,
    on_progress: Callable[[int, int], None] | None = None,
    limit: int | None = None,
) -> WriteResult:
    """Write a compressed qcow2 of a `virtual_size`-byte disk into the empty file `fd` (O_RDWR).

    `read(offset, length)` gives guest bytes (zeros where there is no data); it is called
    from `threads` worker threads at once, so it must be thread-safe (os.pread is).
    `clusters`: ascending indices of the clusters that may hold data; the others stay
    unallocated. `codec`: a name from imagetool.codecs.CODECS, at `level` (None: its
    default). `on_progress(guest_bytes_done, bytes_written)` is called at most every
    PROGRESS_SECONDS and once at the end. As soon as the output passes `limit` bytes the
    writer stops with OutputTooBig; the file is then unusable and the caller removes it.
    The bytes written depend only on the data, cluster_size, codec, level and the
    compression library's build (not on `threads` or timing); the file is not fsynced.
    """
    image = _Image(fd, virtual_size, cluster_size, _check(virtual_size, cluster_size, threads))
    engine = encoder(codec, level)
    reported = time.monotonic()

    def job(index: int) -> _Encoded:
        return _encode(read, index, cluster_size, virtual_size, engine)

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="qcow2") as pool:
        for item in _encoded(pool, _ascending(clusters, -(-virtual_size // cluster_size)), threads, job):
            image.add(item)
            if limit is not None and image.size > limit:
                raise OutputTooBig(image.size, limit)
            if on_progress is not None and time.monotonic() - reported >= PROGRESS_SECONDS:
                on_progress(min(virtual_size, (item.index + 1) * cluster_size), image.size)
                reported = time.monotonic()
    size = image.finish(engine.compression_type)
    if limit is not None and size > limit:
        raise OutputTooBig(size, limit)
    if on_progress is not None:
        on_progress(virtual_size, size)
    return WriteResult(
        size=size,
        virtual_size=virtual_size,
        cluster_size=cluster_size,
        codec=codec,
        compression_type=engine.compression_type,
        level=engine.level,
        compressed_clusters=image.compressed,
        uncompressed_clusters=image.uncompressed,
        zero_clusters=image.zero,
        compressed_bytes=image.compressed_bytes,
        metadata_bytes=image.metadata_bytes,
        padding_bytes=image.packer.padding,
    )
