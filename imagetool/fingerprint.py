"""A file's fingerprint, sealed with its checksums, so that an unchanged file is not hashed twice.

Hashing a 40 GB image takes minutes; `prepare` has just done it, and `upload`
(through preflight) would do it again. The fingerprint says the file is still the
one that was hashed: same device and inode, size, mtime and ctime (any write,
truncation or utime moves the ctime, and its owner cannot set it back). The seal,
an HMAC with a key that only this user on this machine holds, says these
checksums were computed by imagetool for that file: a document edited by hand,
or copied from elsewhere, does not carry a valid seal and its file is read again.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path
from typing import TypedDict

from imagetool.source import Identity

_KEY_BYTES = 32


class Fingerprint(TypedDict):
    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int
    seal: str  # HMAC-SHA256 over the five numbers and the checksums


def _key_path() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "imagetool" / "fingerprint.key"


def _key(create: bool) -> bytes | None:
    """This user's sealing key (made on first use, mode 0600); None when it cannot be had."""
    path = _key_path()
    with contextlib.suppress(OSError):
        data = path.read_bytes()
        if len(data) == _KEY_BYTES:
            return data
    if not create:
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:  # another run made it first
        return _key(create=False)
    except OSError:
        return None  # no writable home: no seal, and checkers simply hash
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(_KEY_BYTES))
    return _key(create=False)


def _seal(key: bytes, identity: Identity, sha256: str, md5: str) -> str:
    numbers = [identity.device, identity.inode, identity.size, identity.mtime_ns, identity.ctime_ns]
    message = json.dumps([*numbers, sha256, md5], separators=(",", ":")).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def sealed(identity: Identity, sha256: str, md5: str) -> Fingerprint | None:
    """The fingerprint of the file these checksums were computed from, or None without a key."""
    key = _key(create=True)
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


def vouches(recorded: object, identity: Identity, sha256: object, md5: object) -> bool:
    """Whether a recorded fingerprint proves these checksums are this unchanged file's."""
    if not isinstance(recorded, dict) or not isinstance(sha256, str) or not isinstance(md5, str):
        return False
    key = _key(create=False)
    seal = recorded.get("seal")
    return (
        key is not None
        and isinstance(seal, str)
        and hmac.compare_digest(seal, _seal(key, identity, sha256, md5))
    )
