"""A file's fingerprint, sealed with its checksums, so that an unchanged file is not hashed twice.

Hashing a 40 GB image takes minutes; `prepare` has just done it, and `upload`
(through preflight) would do it again. The fingerprint says the file is still the
one that was hashed: same device and inode, size, mtime and ctime (any write,
truncation or utime moves the ctime, and its owner cannot set it back). The seal,
an HMAC with a key that only this user on this machine holds, says these
checksums were computed by imagetool for that file: a document edited by hand,
or copied from elsewhere, does not carry a valid seal and its file is read again.

One writer escapes the times: a process that already has the file mapped and
dirtied a page keeps writing to it without moving them. So a file is sealed, and
a seal trusted, only while no process has it open for writing or mapped writable
(a read lease, F_SETLEASE, is granted only then); any later writer must open or
map it anew, and its first write moves the times -- on the filesystems where a
write through a mapping does (ext2/3/4, xfs, btrfs). tmpfs never moves them for
one, so files elsewhere are neither sealed nor trusted: they are simply hashed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import stat
from pathlib import Path
from typing import TypedDict

from imagetool.source import Identity

_KEY_BYTES = 32
# Filesystems whose first write through a fresh mapping moves mtime and ctime (page_mkwrite).
_TIMES_TRACK_MAPPED_WRITES = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs"})


class Fingerprint(TypedDict):
    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int
    seal: str  # HMAC-SHA256 over the five numbers and the checksums


def _key_path() -> Path:
    """XDG_STATE_HOME/imagetool/fingerprint.key; a relative XDG_STATE_HOME is ignored, as XDG says."""
    state = os.environ.get("XDG_STATE_HOME", "")
    if not os.path.isabs(state):
        state = os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "imagetool" / "fingerprint.key"


def _read_key(path: Path) -> bytes | None:
    """The key, only from a regular file of this user that nobody else can read (else no key)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        private = stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077
        data = os.read(fd, _KEY_BYTES + 1) if private and st.st_size == _KEY_BYTES else b""
    except OSError:
        return None
    finally:
        os.close(fd)
    return data if len(data) == _KEY_BYTES else None


def _key(create: bool) -> bytes | None:
    """This user's sealing key (made on first use, mode 0600); None when it cannot be had."""
    path = _key_path()
    key = _read_key(path)
    if key is not None or not create:
        return key
    temp = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, secrets.token_bytes(_KEY_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(temp, path)  # whole or not at all; another run's key, made meanwhile, wins
    except OSError:  # a full or read-only home: no seal, and checkers hash (never a failure)
        pass
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temp)
    return _read_key(path)


def _filesystem(device: int) -> str | None:
    """The type of the filesystem on `device` (from /proc/self/mountinfo), if it can be told."""
    wanted = f"{os.major(device)}:{os.minor(device)}"
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) > 2 and fields[2] == wanted and " - " in line:
                    return line.split(" - ", 1)[1].split()[0]
    except OSError:
        pass
    return None


def writers(fd: int) -> bool | None:
    """Whether some process has the file open for writing or mapped writable, by a read lease.

    The kernel grants a read lease only when none has (released at once here): False.
    True when one has (EAGAIN); None when leases are not to be had (another owner's file,
    a filesystem without them).
    """
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except BlockingIOError:
        return True
    except OSError:
        return None
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    return False


def no_writer(fd: int) -> bool:
    """Whether the file may be sealed, or its seal trusted: no writer now, on a filesystem whose
    times tell a later one (otherwise it is simply hashed)."""
    try:
        tracked = _filesystem(os.fstat(fd).st_dev) in _TIMES_TRACK_MAPPED_WRITES
    except OSError:
        return False
    return tracked and writers(fd) is False


def _seal(key: bytes, identity: Identity, sha256: str, md5: str) -> str:
    numbers = [identity.device, identity.inode, identity.size, identity.mtime_ns, identity.ctime_ns]
    message = json.dumps([*numbers, sha256, md5], separators=(",", ":")).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def sealed(fd: int, identity: Identity, sha256: str, md5: str) -> Fingerprint | None:
    """The fingerprint of the file these checksums were computed from, or None.

    None without a key, or while a writer has the file open: the caller checks the same
    before it hashes, so no writer was there from the start of the hashing to now.
    """
    key = _key(create=True) if no_writer(fd) else None
    if key is None:
        return None
    return {
        "device": identity.device,
        "inode": identity.inode,
        "size": identity.size,
        "mtime_ns": identity.mtime_ns,
        "ctime_ns": identity.ctime_ns,
        "seal": _seal(key, identity, sha256, md5),
    }


def vouches(recorded: object, fd: int, identity: Identity, sha256: object, md5: object) -> bool:
    """Whether a recorded fingerprint proves these checksums are this unchanged, unwritten file's."""
    if not isinstance(recorded, dict) or not isinstance(sha256, str) or not isinstance(md5, str):
        return False
    seal = recorded.get("seal")
    if not isinstance(seal, str) or not no_writer(fd):
        return False
    key = _key(create=False)
    return key is not None and hmac.compare_digest(seal, _seal(key, identity, sha256, md5))
