"""What an initramfs holds: its cpio members, read as a stream, however it is packed.

The kernel unpacks an initramfs as a sequence: cpio archives (newc, magic `070701`,
or `070702` with checksums), zero padding, and compressed members (gzip, bzip2, lzma,
xz, lz4 legacy frames, zstd) that each hold whole cpio archives. Distributions put an
uncompressed early archive (CPU microcode) first and the compressed main one after it,
so this reads until the data ends, not until the first `TRAILER!!!`.

Nothing is unpacked to memory or disk: members' data is decompressed and discarded
while the names are checked, with caps on compressed bytes read, bytes after
decompression and members, and the look's deadline checked on every chunk. Reading
stops as soon as every wanted module has been seen.
"""

from __future__ import annotations

import bz2
import lzma
import sys
import zlib
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from imagetool.guest import limits
from imagetool.guest.budget import Budget

CHUNK = 1 << 20
_LZ4_MAGIC = b"\x02\x21\x4c\x18"
_LZ4_BLOCK = 8 << 20  # the legacy format's fixed block size
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


class InitramfsError(Exception):
    """Bytes that are not what the kernel would unpack, or a cap reached."""


def detect_compression(head: bytes) -> str | None:
    if head[:2] in (b"\x1f\x8b", b"\x1f\x9e"):
        return "gzip"
    if head[:3] == b"BZh":
        return "bzip2"
    if head[:6] == b"\xfd7zXZ\x00":
        return "xz"
    if head[:3] == b"\x5d\x00\x00":
        return "lzma"
    if head[:4] == _LZ4_MAGIC:
        return "lz4"
    if head[:4] == _ZSTD_MAGIC:
        return "zstd"
    if head[:4] == b"\x89LZO":
        return "lzo"
    return None


def module_name(member: str) -> str | None:
    """`virtio_blk` for `usr/lib/modules/6.1.0/kernel/drivers/block/virtio_blk.ko.zst`, else None."""
    base = member.rsplit("/", 1)[-1]
    for suffix in _MODULE_SUFFIXES:
        if base.endswith(suffix):
            return base[: -len(suffix)].replace("-", "_")
    return None


class _Source:
    """Bytes pulled in chunks, with peek/read/skip and push-back; `_fill` gives the next chunk."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._ended = False
        self.consumed = 0

    def _fill(self) -> bytes:
        raise NotImplementedError

    def _more(self) -> bool:
        if self._ended:
            return False
        chunk = self._fill()
        if not chunk:
            self._ended = True
            return False
        if self._pos > CHUNK:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += chunk
        return True

    def peek(self, n: int) -> bytes:
        while len(self._buf) - self._pos < n and self._more():
            pass
        return bytes(self._buf[self._pos : self._pos + n])

    def read(self, n: int) -> bytes:
        data = self.peek(n)
        self._pos += len(data)
        self.consumed += len(data)
        return data

    def skip(self, n: int) -> int:
        """Discard up to `n` bytes without keeping them; how many were there."""
        done = 0
        while done < n:
            available = len(self._buf) - self._pos
            if available == 0 and not self._more():
                break
            take = min(len(self._buf) - self._pos, n - done)
            self._pos += take
            done += take
        self.consumed += done
        return done

    def take(self, limit: int) -> bytes:
        """Up to `limit` bytes, whatever is buffered or the next chunk (input for a decompressor)."""
        if len(self._buf) == self._pos and not self._more():
            return b""
        data = bytes(self._buf[self._pos : self._pos + limit])
        self._pos += len(data)
        self.consumed += len(data)
        return data

    def unread(self, data: bytes) -> None:
        if data:
            self._buf = bytearray(data) + self._buf[self._pos :]
            self._pos = 0
            self.consumed -= len(data)

    def skip_zeros(self) -> int:
        skipped = 0
        while True:
            head = self.peek(CHUNK if skipped else 512)
            if not head:
                return skipped
            run = len(head) - len(head.lstrip(b"\x00"))
            if run == 0:
                return skipped
            self.skip(run)
            skipped += run


class _FileSource(_Source):
    """The initramfs file's bytes, at most MAX_INITRAMFS_BYTES of them."""

    def __init__(self, stream: BinaryIO, size: int, budget: Budget) -> None:
        super().__init__()
        self._stream = stream
        self._left = size
        self._read = 0
        self._budget = budget

    def _fill(self) -> bytes:
        self._budget.check()
        if self._left <= 0:
            return b""
        if self._read >= limits.MAX_INITRAMFS_BYTES:
            raise InitramfsError(f"over {limits.MAX_INITRAMFS_BYTES} bytes: the rest was not read")
        data = self._stream.read(min(CHUNK, self._left))
        if not data:
            raise InitramfsError(f"the file ends {self._left} bytes early (truncated image?)")
        self._left -= len(data)
        self._read += len(data)
        return data


class _Zlib:
    """zlib's decompressor with the interface lzma, bz2 and zstd share (needs_input, max_length)."""

    def __init__(self) -> None:
        self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._tail = b""

    @property
    def eof(self) -> bool:
        return self._d.eof

    @property
    def unused_data(self) -> bytes:
        return self._d.unused_data

    @property
    def needs_input(self) -> bool:
        return not self._tail

    def decompress(self, data: bytes, max_length: int) -> bytes:
        out = self._d.decompress(self._tail + data, max_length)
        self._tail = self._d.unconsumed_tail
        return out


class _Lz4Legacy:
    """The kernel's lz4 format (`lz4 -l`): a magic, then blocks of <= 8 MiB each behind a 4-byte size."""

    def __init__(self) -> None:
        from dissect.util.compression import lz4  # type: ignore[import-untyped]

        self._lz4 = lz4
        self._in = b""
        self.eof = False
        self.unused_data = b""
        self.needs_input = True

    def decompress(self, data: bytes, max_length: int) -> bytes:
        self._in += data
        while True:
            if self._in[:4] == _LZ4_MAGIC:
                self._in = self._in[4:]
                continue
            if len(self._in) < 4:
                self.needs_input = True
                return b""
            size = int.from_bytes(self._in[:4], "little")
            if size == 0 or size > _LZ4_BLOCK + _LZ4_BLOCK // 255 + 16:
                self.eof, self.unused_data, self._in = True, self._in, b""
                return b""
            if len(self._in) < 4 + size:
                self.needs_input = True
                return b""
            block, self._in = self._in[4 : 4 + size], self._in[4 + size :]
            self.needs_input = len(self._in) < 4
            return bytes(self._lz4.decompress(block, _LZ4_BLOCK))

    def at_clean_end(self) -> bool:
        return not self._in.strip(b"\x00")  # nothing left but padding


def _decompressor(kind: str) -> Any:
    if kind == "gzip":
        return _Zlib()
    if kind == "xz":
        return lzma.LZMADecompressor(lzma.FORMAT_XZ)
    if kind == "lzma":
        return lzma.LZMADecompressor(lzma.FORMAT_ALONE)
    if kind == "bzip2":
        return bz2.BZ2Decompressor()
    if kind == "zstd":
        if sys.version_info >= (3, 14):
            from compression import zstd  # type: ignore[import-not-found, unused-ignore]
        else:
            from backports import zstd  # type: ignore[import-not-found, unused-ignore]
        return zstd.ZstdDecompressor()
    if kind == "lz4":
        return _Lz4Legacy()
    raise InitramfsError(f"{kind} compression is not read by imagetool")


class _Unpacked(_Source):
    """One compressed member's output, chunk by chunk; leftover input goes back to the file source."""

    def __init__(self, raw: _Source, kind: str, scan: InitramfsScan) -> None:
        super().__init__()
        self._raw = raw
        self._kind = kind
        self._dec: Any = _decompressor(kind)
        self._scan = scan
        self.truncated = False

    def _fill(self) -> bytes:
        while self._dec is not None:
            if self._dec.eof:
                rest = bytes(self._dec.unused_data)
                if self._kind == "zstd" and (rest + self._raw.peek(4))[:4] == _ZSTD_MAGIC:
                    self._dec = _decompressor("zstd")  # concatenated frames: one stream
                    self._raw.unread(rest)
                    continue
                self._raw.unread(rest)
                self._dec = None
                return b""
            data = self._raw.take(CHUNK) if self._dec.needs_input else b""
            if not data and self._dec.needs_input:
                if not (isinstance(self._dec, _Lz4Legacy) and self._dec.at_clean_end()):
                    self.truncated = True
                self._dec = None
                return b""
            out = bytes(self._dec.decompress(data, CHUNK))
            if out:
                self._scan.unpacked_bytes += len(out)
                if self._scan.unpacked_bytes > limits.MAX_INITRAMFS_UNPACKED:
                    cap = limits.MAX_INITRAMFS_UNPACKED
                    raise InitramfsError(f"over {cap} bytes after decompression: the rest was not read")
                return out
        return b""


@dataclass
class InitramfsScan:
    """What one read of an initramfs found."""

    groups: tuple[frozenset[str], ...]  # one module of each group must be there
    segments: list[str] = field(default_factory=list)  # "cpio (12 members)", "zstd (1165 members)"
    found: dict[str, str] = field(default_factory=dict)  # module -> member path
    modules: int = 0  # members that are kernel modules
    entries: int = 0
    unpacked_bytes: int = 0
    complete: bool = False  # read to the end of the data
    stopped_early: bool = False  # every wanted module was seen before the end
    problem: str | None = None  # why reading stopped before the end, if it did

    @property
    def wanted(self) -> frozenset[str]:
        return frozenset().union(*self.groups)

    @property
    def satisfied(self) -> bool:
        return all(group & self.found.keys() for group in self.groups)


class _Done(Exception):
    """Every wanted module was seen: stop reading."""


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


def _archive(src: _Source, scan: InitramfsScan, budget: Budget) -> int:
    """Members of one cpio archive, up to its TRAILER!!!; returns how many."""
    count = 0
    while True:
        if count % 64 == 0:
            budget.check()
        header = src.read(110)
        if len(header) < 110:
            raise InitramfsError("a cpio archive ends inside a header (truncated?)")
        if header[:6] not in (b"070701", b"070702"):
            raise InitramfsError(f"not a newc cpio header: {header[:6]!r}")
        try:
            fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        except ValueError:
            raise InitramfsError("a cpio header with non-hex fields") from None
        filesize, namesize = fields[6], fields[11]
        if not 0 < namesize <= limits.MAX_CPIO_NAME:
            raise InitramfsError(f"a cpio member name of {namesize} bytes")
        raw_name = src.read(namesize)
        src.skip(_pad4(110 + namesize))
        name = raw_name.rstrip(b"\x00").decode("utf-8", "surrogateescape")
        if name == "TRAILER!!!":
            return count
        if src.skip(filesize + _pad4(filesize)) < filesize:
            raise InitramfsError(f"member {name!r} is cut short (truncated?)")
        count += 1
        scan.entries += 1
        if scan.entries > limits.MAX_INITRAMFS_ENTRIES:
            raise InitramfsError(f"more than {limits.MAX_INITRAMFS_ENTRIES} members")
        module = module_name(name)
        if module is not None:
            scan.modules += 1
            if module in scan.wanted and module not in scan.found:
                scan.found[module] = name
                if scan.satisfied:
                    raise _Done


def _archives(src: _Source, scan: InitramfsScan, budget: Budget, label: str) -> None:
    """Every cpio archive in a decompressed member (zero padding between them)."""
    before = scan.entries
    try:
        while True:
            src.skip_zeros()
            head = src.peek(6)
            if not head:
                break
            if head[:5] != b"07070":
                raise InitramfsError(f"junk inside the {label} member: {head[:6]!r}")
            _archive(src, scan, budget)
    finally:
        scan.segments.append(f"{label} ({scan.entries - before} members)")


def scan_initramfs(
    stream: BinaryIO, size: int, groups: tuple[frozenset[str], ...], budget: Budget
) -> InitramfsScan:
    """Walk an initramfs the way the kernel unpacks it, until one module of each group is seen."""
    scan = InitramfsScan(groups)
    raw = _FileSource(stream, size, budget)
    try:
        while True:
            budget.check()
            raw.skip_zeros()
            head = raw.peek(6)
            if not head:
                scan.complete = True
                break
            if head[:5] == b"07070":
                before = scan.entries
                try:
                    _archive(raw, scan, budget)
                finally:
                    scan.segments.append(f"cpio ({scan.entries - before} members)")
                continue
            kind = detect_compression(head)
            if kind is None:
                raise InitramfsError(f"unrecognised bytes at offset {raw.consumed}: {head.hex()}")
            unpacked = _Unpacked(raw, kind, scan)
            _archives(unpacked, scan, budget, kind)
            if unpacked.truncated:
                raise InitramfsError(f"the {kind} data ends early (truncated?)")
    except _Done:
        scan.stopped_early = True
    except InitramfsError as exc:
        scan.problem = str(exc)
    except (EOFError, OSError, ValueError, lzma.LZMAError, zlib.error) as exc:
        scan.problem = f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # a decompressor's own error type (zstd)
        scan.problem = f"{type(exc).__name__}: {exc}"
    return scan
