"""The guest's /etc/os-release (or /usr/lib/os-release): which distribution and version.

The format is shell-like `KEY=value` lines (os-release(5)); values may be quoted with
single or double quotes and use backslash escapes inside double quotes.
"""

from __future__ import annotations

import shlex

from imagetool.guest import limits
from imagetool.guest.facts import CERTAIN, Answer, unknown
from imagetool.guest.files import GuestTree
from imagetool.guest.filesystems import GuestPathError
from imagetool.guest.text import printable, short_error

PATHS = ("/etc/os-release", "/usr/lib/os-release")
FIELDS = ("NAME", "VERSION_ID", "ID", "PRETTY_NAME")


def parse_os_release(text: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, raw = line.partition("=")
        if not key.isidentifier():
            continue
        try:
            parts = shlex.split(raw, posix=True)
        except ValueError:
            continue
        values[key] = parts[0] if len(parts) == 1 else " ".join(parts)
    return values


def read_os(tree: GuestTree) -> tuple[Answer, dict[str, str]]:
    """The `os` answer and the parsed fields (for the username convention)."""
    notes: list[str] = []
    for path in PATHS:
        try:
            found, data = tree.read(path, limits.MAX_CONFIG_BYTES)
        except GuestPathError as exc:
            notes.append(str(exc))
            continue
        except Exception as exc:
            notes.append(f"{path}: {short_error(exc)}")
            continue
        values = parse_os_release(data.decode("utf-8", "replace"))
        extra = tuple((key.lower(), values.get(key)) for key in FIELDS)
        shown = " ".join(f"{k}={printable(values[k])!r}" for k in FIELDS if k in values)
        evidence = (*notes, f"{found.describe()}: {shown or 'no NAME, ID, VERSION_ID or PRETTY_NAME'}")
        value = values.get("PRETTY_NAME") or " ".join(
            v for v in (values.get("NAME"), values.get("VERSION_ID")) if v
        )
        if not value:
            return unknown(*evidence, extra=extra), values
        return Answer(value, CERTAIN, evidence, extra), values
    return unknown(*notes, extra=tuple((key.lower(), None) for key in FIELDS)), {}
