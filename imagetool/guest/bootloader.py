"""Which kernel the guest boots by default, when its GRUB configuration says so cheaply.

GRUB 2's generated grub.cfg names a default entry (`set default="0"`, an entry id or
title, `N>M` for an entry of a submenu, or `${saved_entry}` from grubenv) and each
entry's `linux` line names the kernel image. Fedora-style configurations (`blscfg`)
keep one file per entry in /boot/loader/entries/ and sort them newest first. When none
of this is readable, the caller takes the newest kernel.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

from imagetool.guest import limits
from imagetool.guest.files import GuestTree
from imagetool.guest.text import printable, short_error

GRUB_CONFIGS = ("/boot/grub/grub.cfg", "/boot/grub2/grub.cfg")
GRUBENVS = ("/boot/grub/grubenv", "/boot/grub2/grubenv")


@dataclass
class _Entry:
    title: str
    ident: str | None
    kernel: str | None = None
    children: list[_Entry] = field(default_factory=list)
    submenu: bool = False


def _words(line: str) -> list[str]:
    try:
        return shlex.split(line, comments=False, posix=True)
    except ValueError:
        return line.split()


def parse_grub_cfg(text: str) -> tuple[list[str], list[_Entry], bool]:
    """(default values in order, top-level entries, uses blscfg)."""
    defaults: list[str] = []
    top: list[_Entry] = []
    stack: list[_Entry] = []
    bls = False
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        words = _words(line)
        if not words:
            continue
        if words[0] in ("menuentry", "submenu"):
            ident = None
            if "--id" in words and words.index("--id") + 1 < len(words):
                ident = words[words.index("--id") + 1]
            entry = _Entry(words[1] if len(words) > 1 else "", ident, submenu=words[0] == "submenu")
            (stack[-1].children if stack else top).append(entry)
            if line.endswith("{"):
                stack.append(entry)
            continue
        if words[0] == "}" and stack:
            stack.pop()
            continue
        if words[0] in ("linux", "linux16", "linuxefi") and stack and len(words) > 1:
            if stack[-1].kernel is None:
                stack[-1].kernel = words[1]
            continue
        if words[0] == "blscfg":
            bls = True
        match = re.match(r"^set\s+default=(.*)$", line)
        if match and not stack:
            value = _words(match.group(1))
            if value and "next_entry" not in value[0]:
                defaults.append(value[0])
    return defaults, top, bls


def _pick(entries: list[_Entry], selector: str) -> _Entry | None:
    first, _, rest = selector.partition(">")
    chosen: _Entry | None = None
    if first.isdigit():
        index = int(first)
        chosen = entries[index] if index < len(entries) else None
    else:
        chosen = next((e for e in entries if first in (e.ident, e.title)), None)
    if chosen is not None and rest:
        return _pick(chosen.children, rest)
    if chosen is not None and chosen.submenu:
        return _pick(chosen.children, "0")
    return chosen


def _grubenv(tree: GuestTree) -> dict[str, str]:
    for path in GRUBENVS:
        try:
            _, data = tree.read(path, limits.MAX_CONFIG_BYTES)
        except Exception:
            continue
        values: dict[str, str] = {}
        for line in data.decode("utf-8", "replace").splitlines():
            if "=" in line and not line.startswith("#"):
                key, _, value = line.partition("=")
                values[key.strip()] = value.strip()
        return values
    return {}


def version_key(text: str) -> list[tuple[int, int, str]]:
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.findall(r"\d+|[A-Za-z]+", text)]


def _bls_default(tree: GuestTree, saved: str | None, evidence: list[str]) -> str | None:
    try:
        found, names = tree.listdir("/boot/loader/entries")
    except Exception as exc:
        evidence.append(f"/boot/loader/entries: {short_error(exc)}")
        return None
    entries: list[tuple[str, str, str]] = []  # (id, version, kernel)
    for name in names[: limits.MAX_KERNELS * 4]:
        if not name.endswith(".conf"):
            continue
        try:
            _, data = tree.read(f"{found.path}/{name}", limits.MAX_CONFIG_BYTES)
        except Exception:
            continue
        fields: dict[str, str] = {}
        for line in data.decode("utf-8", "replace").splitlines():
            parts = line.strip().split(None, 1)
            if len(parts) == 2:
                fields.setdefault(parts[0], parts[1])
        if "linux" in fields:
            entries.append((name[: -len(".conf")], fields.get("version", name), fields["linux"]))
    if not entries:
        return None
    chosen = next((e for e in entries if saved and e[0] == saved), None)
    if chosen is not None:
        evidence.append(f"boot loader entry {printable(chosen[0])} (grubenv saved_entry) boots {chosen[2]}")
    else:
        chosen = max(entries, key=lambda e: version_key(e[1]))
        evidence.append(f"{found.path}: newest entry {printable(chosen[0])} boots {printable(chosen[2])}")
    return chosen[2]


def default_kernel_path(tree: GuestTree) -> tuple[str | None, list[str]]:
    """The kernel image path GRUB boots by default (as grub.cfg writes it), and the evidence."""
    evidence: list[str] = []
    for path in GRUB_CONFIGS:
        try:
            found, data = tree.read(path, limits.MAX_CONFIG_BYTES)
        except Exception:
            continue
        defaults, entries, bls = parse_grub_cfg(data.decode("utf-8", "replace"))
        selector = defaults[-1] if defaults else "0"
        env = _grubenv(tree) if "saved_entry" in selector or bls else {}
        if "saved_entry" in selector:
            selector = env.get("saved_entry") or "0"
        if bls and not entries:
            return _bls_default(tree, env.get("saved_entry"), evidence), evidence
        entry = _pick(entries, selector)
        if entry is None or entry.kernel is None:
            evidence.append(f"{found.path}: default {printable(selector)!r} names no kernel entry")
            return None, evidence
        evidence.append(
            f"{found.path}: default {printable(selector)!r} is {printable(entry.title)!r}, "
            f"linux {printable(entry.kernel)}"
        )
        return entry.kernel, evidence
    return None, evidence
