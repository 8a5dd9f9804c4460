"""Open an input image once, safely, and hand out that one descriptor.

Everything that later reads the image (python-magic, the format inspector, the
non-zero scan, every qemu-img call) goes through the descriptor opened here, so a
path swapped after the checks cannot change what is read, and a FIFO, device,
directory or symlink is refused before anything blocks on it.
"""

from __future__ import annotations

import errno
import fcntl
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


@dataclass(frozen=True)
class Identity:
    """What says a file is still the one we read: same inode, same size, not written since."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Identity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def above_stdio(fd: int) -> int:
    """Move a new descriptor to 3 or above: a child's stdin/stdout/stderr must never replace it.

    imagetool makes fds 0-2 safe at start (stdio.py); this keeps a library caller whose
    standard streams are closed just as safe.
    """
    if fd > 2:
        return fd
    try:
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    finally:
        os.close(fd)


def proc_path(fd: int) -> str:
    """A path any child given this fd (pass_fds) can open: the same inode, never a user's name."""
    return f"/proc/self/fd/{fd}"


@dataclass
class Source:
    """An open, regular, non-empty input file."""

    path: str
    fd: int
    size: int  # bytes in the file
    allocated: int  # bytes the filesystem really stores (st_blocks * 512)
    identity: Identity
    named: bool = True  # `path` names this file (False for our own output, not yet linked)

    @property
    def device(self) -> int:
        return self.identity.device

    @property
    def inode(self) -> int:
        return self.identity.inode

    @property
    def proc_path(self) -> str:
        return proc_path(self.fd)

    def pread(self, length: int, offset: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def ensure_unchanged(self) -> None:
        """Refuse a result computed from a file that was written, truncated or replaced meanwhile."""
        now = Identity.of(os.fstat(self.fd))
        replaced = False
        if self.named:
            try:
                st = os.lstat(self.path)
                replaced = (st.st_dev, st.st_ino) != (now.device, now.inode)
            except OSError:
                replaced = True
        if now != self.identity or replaced:
            what = "replaced or removed" if replaced else "written to"
            raise EnvironmentProblem(
                f"the input was {what} while imagetool read it; nothing was kept, run again "
                "once nothing else writes to it",
                path=self.path,
                code="source_changed",
            )

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _source(path: str, fd: int, st: os.stat_result, named: bool = True) -> Source:
    return Source(
        path=path, fd=fd, size=st.st_size, allocated=st.st_blocks * 512, identity=Identity.of(st), named=named
    )


def from_descriptor(path: str, fd: int) -> Source:
    """A Source over a duplicate of a descriptor we already own (our own output, before it is linked)."""
    dup = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    return _source(path, dup, os.fstat(dup), named=False)


def _reject(path: str, code: str, message: str) -> ImageRejected:
    return ImageRejected(message, [Reason(code, message)], path=path)


def _open_regular(path: str, allow_block_device: bool = False) -> tuple[int, os.stat_result]:
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
        fd = above_stdio(os.open(path, _OPEN_FLAGS))
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
        if not stat.S_ISREG(st.st_mode) and not (allow_block_device and stat.S_ISBLK(st.st_mode)):
            kind = _KIND_NAMES.get(stat.S_IFMT(st.st_mode), "not a regular file")
            raise _reject(path, "not_regular_file", f"is {kind}, not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def open_source(path: str, allow_block_device: bool = False) -> Source:
    """Open an input image the safe way: a regular, non-empty file, read through one descriptor.

    `allow_block_device` also takes a block device (an LVM volume an operator snapshots);
    its size is where its data ends, since st_size says 0 for a device.
    """
    fd, st = _open_regular(path, allow_block_device)
    source = _source(path, fd, st)
    if stat.S_ISBLK(st.st_mode):
        source.size = source.allocated = os.lseek(fd, 0, os.SEEK_END)
    if source.size == 0:
        os.close(fd)
        raise _reject(path, "empty", "is empty (0 bytes)")
    return source


def read_small_file(path: str, cap: int) -> bytes:
    """Read a small non-image file (a metadata document) the same safe way, at most `cap` bytes.

    A FIFO or device is refused before anything blocks on it; `/dev/zero` or a huge file
    is refused by its size instead of being read into memory.
    """
    fd, st = _open_regular(path)
    try:
        if st.st_size > cap:
            raise _reject(path, "too_big", f"is {st.st_size} bytes; a metadata file is at most {cap}")
        data = os.pread(fd, cap + 1, 0)
    except OSError as exc:
        raise EnvironmentProblem(f"cannot read: {exc.strerror}", path=path, code="io_error") from None
    finally:
        os.close(fd)
    if len(data) > cap:  # grew after fstat
        raise _reject(path, "too_big", f"is more than {cap} bytes; a metadata file is at most {cap}")
    return data
