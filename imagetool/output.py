"""Every file imagetool writes goes through here: checked, written beside its target, then linked.

The rules, the same for a 50 GB qcow2, a metadata document and a JUnit report:
- no output may be one of the command's inputs (same device and inode: the same
  file, a hard link to it, or a path through a symlinked directory) — not even
  with --force; an output that is itself a symbolic link is refused;
- an existing output is replaced only with --force;
- the data goes to a new, uniquely named temp file in the target's directory
  (`.imagetool-tmp-…`), locked (flock) by its writer, fsynced, then linked (or,
  with --force, renamed) into place and the directory fsynced: a reader sees the
  old file or the new one, never half of one;
- a failure, Ctrl-C or signal removes the temp file; one left by a process that
  was killed (SIGKILL, power loss) is no longer locked, so the next run that
  writes into that directory removes it (a writer that finds its new temp file
  removed in the instant before it locked it simply makes another);
- every OS error becomes a one-line EnvironmentProblem (exit 5), or a
  UsageProblem (exit 2) when the name itself is wrong.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import stat
from collections.abc import Collection, Iterator
from pathlib import Path

from imagetool.errors import EnvironmentProblem, ImagetoolError, UsageProblem
from imagetool.source import above_stdio, proc_path

TEMP_PREFIX = ".imagetool-tmp-"
NAME_MAX = 255
FileKey = tuple[int, int]  # (st_dev, st_ino)


def key_of(path: str | os.PathLike[str]) -> FileKey | None:
    """The (device, inode) of an existing file, following links; None when there is none."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def os_error(exc: OSError, path: str | os.PathLike[str], doing: str = "write") -> ImagetoolError:
    """Name an OS error the way a user can act on it, with the contract's exit code."""
    where = str(path)
    codes = {
        errno.ENOSPC: ("disk_full", "no space left on the device"),
        errno.EDQUOT: ("disk_full", "disk quota exceeded"),
        errno.EROFS: ("read_only", "the file system is read-only"),
        errno.EACCES: ("permission_denied", "permission denied"),
        errno.EPERM: ("permission_denied", "operation not permitted"),
        errno.EFBIG: ("file_too_big", "the file size limit was reached (ulimit -f?)"),
        errno.ENOENT: ("no_directory", "its directory does not exist"),
        errno.ENOTDIR: ("no_directory", "a part of the path is not a directory"),
        errno.EIO: ("io_error", "input/output error on the device"),
    }
    if exc.errno == errno.ENAMETOOLONG:
        return UsageProblem("the file name is too long", path=where, code="name_too_long")
    code, what = codes.get(exc.errno or 0, ("io_error", exc.strerror or str(exc)))
    return EnvironmentProblem(f"cannot {doing}: {what}", path=where, code=code)


def check_target(target: Path, *, force: bool, inputs: Collection[FileKey]) -> None:
    """Refuse an output that would lose data or cannot be written, before any work is done."""
    name = os.fsencode(target.name)
    if not name or target.name in (".", ".."):
        raise UsageProblem("the output must name a file", path=str(target), code="bad_output")
    if len(name) > NAME_MAX:
        raise UsageProblem(
            f"the file name is {len(name)} bytes; at most {NAME_MAX} fit in a directory",
            path=str(target),
            code="name_too_long",
        )
    try:
        st: os.stat_result | None = os.lstat(target)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise os_error(exc, target, "look at the output") from None
    if st is not None:
        if stat.S_ISLNK(st.st_mode):
            raise UsageProblem(
                "the output is a symbolic link; give a real path", path=str(target), code="output_symlink"
            )
        if (st.st_dev, st.st_ino) in inputs:
            raise UsageProblem(
                "the output is the input itself, or a link to it; choose another output",
                path=str(target),
                code="output_is_input",
            )
        if stat.S_ISDIR(st.st_mode):
            raise UsageProblem(
                "the output is a directory; name a file", path=str(target), code="output_is_directory"
            )
        if not stat.S_ISREG(st.st_mode):
            raise UsageProblem(
                "the output exists and is not a regular file", path=str(target), code="bad_output"
            )
        if not force:
            raise UsageProblem(
                "the output exists; pass --force to replace it", path=str(target), code="output_exists"
            )
    _check_directory(target)


def _check_directory(target: Path) -> None:
    parent = target.parent
    try:
        st = os.stat(parent)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise EnvironmentProblem(
                f"directory {parent} does not exist", path=str(target), code="no_directory"
            ) from None
        raise os_error(exc, target, "look at the output directory") from None
    if not stat.S_ISDIR(st.st_mode):
        raise EnvironmentProblem(f"{parent} is not a directory", path=str(target), code="no_directory")
    if os.statvfs(parent).f_flag & os.ST_RDONLY:
        raise EnvironmentProblem(
            f"directory {parent} is on a read-only file system", path=str(target), code="read_only"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise EnvironmentProblem(
            f"directory {parent} is not writable", path=str(target), code="permission_denied"
        )


def remove_stale_temps(directory: Path) -> list[str]:
    """Remove temp files whose writer is gone: nobody holds their lock."""
    removed = []
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.startswith(TEMP_PREFIX) and _is_abandoned(entry.path):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed.append(entry.name)
    return removed


def _is_abandoned(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # its writer holds it until it exits
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _locked_temp(target: Path) -> tuple[Path, int]:
    """A new temp file beside `target`, locked; made again if a cleaner removed it before the lock."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    while True:
        path = target.parent / f"{TEMP_PREFIX}{secrets.token_hex(6)}"
        try:
            fd = above_stdio(os.open(path, flags, 0o666))  # the umask applies, as for any new file
        except OSError as exc:
            raise os_error(exc, target, "create the output") from None
        fcntl.flock(fd, fcntl.LOCK_EX)
        st = os.fstat(fd)
        if key_of(path) == (st.st_dev, st.st_ino):
            return path, fd
        os.close(fd)  # another run's clean-up took it between open and lock


class Pending:
    """A new file being written beside `target`; nothing is visible at `target` until commit()."""

    def __init__(self, target: Path, *, force: bool, inputs: Collection[FileKey]) -> None:
        check_target(target, force=force, inputs=inputs)
        remove_stale_temps(target.parent)
        self.target = target
        self.force = force
        self.inputs = inputs
        self.committed = False
        self.path, self.fd = _locked_temp(target)

    @property
    def proc_path(self) -> str:
        return proc_path(self.fd)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as exc:
            raise os_error(exc, self.target) from None

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def commit(self) -> None:
        """fsync, then put the file in place: replace only with force, never clobber otherwise."""
        try:
            os.fsync(self.fd)
            check_target(self.target, force=self.force, inputs=self.inputs)  # again: it may have changed
            if self.force:
                os.replace(self.path, self.target)
            else:
                self._link_new()
            _fsync_directory(self.target.parent)
        except OSError as exc:
            raise os_error(exc, self.target) from None
        self.committed = True

    def _link_new(self) -> None:
        try:
            os.link(self.path, self.target)  # fails if something appeared at the target meanwhile
        except FileExistsError:
            raise UsageProblem(
                "the output appeared while imagetool worked; pass --force to replace it",
                path=str(self.target),
                code="output_exists",
            ) from None
        os.unlink(self.path)

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
        if not self.committed:
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    def __enter__(self) -> Pending:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


def remove_own(target: Path, key: FileKey) -> None:
    """Remove the file this run put at `target` (after a later step failed), never anyone else's."""
    with contextlib.suppress(OSError):
        st = os.lstat(target)
        if (st.st_dev, st.st_ino) == key:
            os.unlink(target)
            _fsync_directory(target.parent)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def pending(target: Path, *, force: bool, inputs: Collection[FileKey]) -> Iterator[Pending]:
    """A Pending file, removed on any failure unless committed."""
    out = Pending(target, force=force, inputs=inputs)
    with out:
        yield out


def write_file(target: Path, data: bytes, *, force: bool, inputs: Collection[FileKey]) -> None:
    """Write a small file (metadata, a report) atomically under the same rules."""
    with pending(target, force=force, inputs=inputs) as out:
        out.write(data)
        out.commit()
