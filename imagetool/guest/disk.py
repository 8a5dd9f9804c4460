"""The guest's disk as one readable stream, from the caller's descriptor, every read counted.

Raw images are read with os.pread on the descriptor imagetool opened and checked; qcow2
goes through dissect.hypervisor's reader (the one measured to decompress compressed
clusters correctly), fed the same counted reader, never a path: with no path it cannot
open a backing or data file beside the image even if the header named one (the caller
has refused those already).
"""

from __future__ import annotations

import io
import os
from typing import BinaryIO, cast

from imagetool.guest.budget import Budget


class ImageReader(io.RawIOBase):
    """A seekable read-only file over a descriptor, with every read charged to the budget."""

    def __init__(self, fd: int, size: int, budget: Budget) -> None:
        super().__init__()
        self._fd = fd
        self._size = size
        self._pos = 0
        self._budget = budget

    @property
    def size(self) -> int:
        return self._size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._size + offset
        else:
            raise ValueError(f"bad whence {whence}")
        if pos < 0:
            raise OSError("negative seek position")
        self._pos = pos
        return pos

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = max(self._size - self._pos, 0)
        size = min(size, max(self._size - self._pos, 0))
        if size == 0:
            return b""
        self._budget.charge(size)
        data = os.pread(self._fd, size, self._pos)
        self._pos += len(data)
        return data

    def readinto(self, buffer: object) -> int:
        view = memoryview(cast(bytearray, buffer)).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        return self.read(-1)


class GuestDisk(io.RawIOBase):
    """The guest disk as decoded (qcow2), with every read charged to the budget before it is made."""

    def __init__(self, stream: BinaryIO, size: int, budget: Budget) -> None:
        super().__init__()
        self._stream = stream
        self._size = size
        self._pos = 0
        self._budget = budget

    @property
    def size(self) -> int:
        return self._size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}.get(whence)
        if base is None or base + offset < 0:
            raise OSError(f"bad seek ({offset}, {whence})")
        self._pos = base + offset
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        left = max(self._size - self._pos, 0)
        size = left if size is None or size < 0 else min(size, left)
        if size == 0:
            return b""
        self._budget.charge_guest(size)
        self._stream.seek(self._pos)
        data = self._stream.read(size)
        self._pos += len(data)
        return data

    def readinto(self, buffer: object) -> int:
        view = memoryview(cast(bytearray, buffer)).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        return self.read(-1)


def open_disk(fd: int, file_size: int, fmt: str, budget: Budget) -> tuple[BinaryIO, int, str]:
    """The guest disk's bytes for a verified `raw` or `qcow2` image: (stream, virtual size, description)."""
    reader = ImageReader(fd, file_size, budget)
    if fmt == "raw":
        return cast(BinaryIO, reader), file_size, f"raw, {file_size} bytes"
    if fmt == "qcow2":
        # ~120 ms of imports: only paid for qcow2 inputs.
        from dissect.hypervisor.disk.qcow2 import QCow2  # type: ignore[import-untyped]

        image = QCow2(cast(BinaryIO, reader), allow_no_backing_file=False, allow_no_data_file=False)
        stream = GuestDisk(cast(BinaryIO, image.open()), int(image.size), budget)
        compression = {0: "zlib", 1: "zstd"}.get(int(image.compression_type), str(image.compression_type))
        return (
            cast(BinaryIO, stream),
            int(image.size),
            f"qcow2 v{int(image.header.version)}, {image.cluster_size}-byte clusters, "
            f"{compression} compression, virtual size {int(image.size)} bytes",
        )
    raise ValueError(f"format {fmt!r} is not read by the guest look (only raw and qcow2)")
