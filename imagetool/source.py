"""Open an input image once, safely, and hand out that one descriptor.

Everything that later reads the image (python-magic, the format inspector, the
non-zero scan, every qemu-img call) goes through the descriptor opened here, so a
path swapped after the checks cannot change what is read, and a FIFO, device,
directory or symlink is refused before anything blocks on it.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from imagetool.errors import EnvironmentProblem, ImageRejected, Reason

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

_KIND_NAMES = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


@dataclass
class Source:
    """An open, regular, non-empty input file."""

    path: str
    fd: int
    size: int  # bytes in the file
    allocated: int  # bytes the filesystem really stores (st_blocks * 512)
    device: int
    inode: int

    @property
    def proc_path(self) -> str:
        """A path any child given this fd (pass_fds) can open: the same inode, not the name."""
        return f"/proc/self/fd/{self.fd}"

    def pread(self, length: int, offset: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def from_descriptor(path: str, fd: int) -> Source:
    """A Source over a duplicate of a descriptor we already own (e.g. our own output file)."""
    dup = os.dup(fd)
    st = os.fstat(dup)
    return Source(
        path=path, fd=dup, size=st.st_size, allocated=st.st_blocks * 512, device=st.st_dev, inode=st.st_ino
    )


def _reject(path: str, code: str, message: str) -> ImageRejected:
    return ImageRejected(message, [Reason(code, message)], path=path)


def open_source(path: str) -> Source:
    """Open `path` read-only without following links or blocking; refuse anything but a file."""
    try:
        lst = os.lstat(path)
    except FileNotFoundError:
        raise EnvironmentProblem("no such file", path=path, code="not_found") from None
    except PermissionError:
        raise EnvironmentProblem("permission denied", path=path, code="permission_denied") from None
    except OSError as exc:
        raise EnvironmentProblem(f"cannot stat: {exc.strerror}", path=path, code="io_error") from None
    if stat.S_ISLNK(lst.st_mode):
        raise _reject(path, "symlink", "is a symbolic link; give the real file's path")
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except PermissionError:
        raise EnvironmentProblem("permission denied", path=path, code="permission_denied") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # swapped for a link between lstat and open
            raise _reject(path, "symlink", "is a symbolic link; give the real file's path") from None
        if exc.errno in (errno.ENXIO, errno.ENODEV):  # sockets, devices without a driver
            raise _reject(path, "not_regular_file", "is not a regular file") from None
        raise EnvironmentProblem(f"cannot open: {exc.strerror}", path=path, code="io_error") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = _KIND_NAMES.get(stat.S_IFMT(st.st_mode), "not a regular file")
            raise _reject(path, "not_regular_file", f"is {kind}, not a disk image file")
        if st.st_size == 0:
            raise _reject(path, "empty", "is empty (0 bytes)")
    except BaseException:
        os.close(fd)
        raise
    return Source(
        path=path, fd=fd, size=st.st_size, allocated=st.st_blocks * 512, device=st.st_dev, inode=st.st_ino
    )
