"""A VM disk and its backing chain, followed only under explicit trust, for `snapshot`.

An operator's disk is often a qcow2 overlay on a base image. Its header names the base
by path, and qemu would open whatever it names — a file anywhere, `json:{…}`, `nbd:…` —
and guess its format. So the chain is walked here, by imagetool, before qemu-img sees
any of it: every link must be a local regular file (or, with --allow-device, a block
device) whose real path lies in the disk's own directory or an --allow-backing-dir,
raw or qcow2, with no data file or other unsafe header, no loop, at most
MAX_CHAIN_DEPTH links. Each link is opened once, here; qemu-img then gets one `json:`
description naming every node's driver and every file as `/proc/self/fd/N`, with
`"backing": null` at the bottom, so nothing in any header can make it open anything else.
"""

from __future__ import annotations

import json
import os
import re
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagetool.detect import detect
from imagetool.errors import ImageRejected, Reason
from imagetool.policy import MAX_CHAIN_DEPTH
from imagetool.source import Source, open_source

CHAIN_FORMATS = ("raw", "qcow2")
_BACKING_FORMAT_EXT = 0xE2792ACA  # qcow2 header extension: the backing file's format name
_QCOW2_MAX_BACKING_NAME = 1023  # qemu refuses longer names
# Header reasons a link of the user's own chain may have: its backing file is what is being
# validated here, and internal snapshots are the user's (only --snapshot reads one).
TOLERATED = frozenset({"backing_file", "snapshots"})
_PROTOCOL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


@dataclass(frozen=True)
class Link:
    """One validated file of the chain, as the metadata records it."""

    file: str  # its real path
    format: str
    virtual_size: int
    file_size: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "format": self.format,
            "virtual_size": self.virtual_size,
            "file_size": self.file_size,
        }


@dataclass
class Chain:
    """The open links, top first. Close it (or use it as a context manager) to release them."""

    sources: list[Source] = field(default_factory=list)
    links: list[Link] = field(default_factory=list)

    @property
    def top(self) -> Source:
        return self.sources[0]

    @property
    def fds(self) -> tuple[int, ...]:
        return tuple(s.fd for s in self.sources)

    def description(self) -> str:
        """The `json:` filename qemu-img gets: every driver named, every file by descriptor."""
        node: dict[str, Any] | None = None
        for source, link in reversed(list(zip(self.sources, self.links, strict=True))):
            protocol = "host_device" if stat.S_ISBLK(os.fstat(source.fd).st_mode) else "file"
            upper: dict[str, Any] = {
                "driver": link.format,
                "file": {"driver": protocol, "filename": source.proc_path},
            }
            if link.format == "qcow2":
                upper["backing"] = node  # None at the bottom: "backing": null, open nothing more
            node = upper
        return "json:" + json.dumps(node, separators=(",", ":"))

    def top_description(self) -> str:
        """The top alone, `"backing": null`: what `qemu-img info` takes (it opens no backing file,
        and refuses backing options it would not use)."""
        return Chain(self.sources[:1], self.links[:1]).description()

    def ensure_unchanged(self) -> None:
        for source in self.sources:
            source.ensure_unchanged()

    def close(self) -> None:
        for source in self.sources:
            source.close()

    def __enter__(self) -> Chain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _refuse(path: str, code: str, message: str) -> ImageRejected:
    return ImageRejected(message, [Reason(code, message)], path=path)


def _qcow2_backing(src: Source) -> tuple[str | None, str | None]:
    """The backing file name and the backing format its header gives (either may be missing)."""
    header = src.pread(4096, 0)
    offset, size = struct.unpack_from(">QI", header, 8)
    if offset == 0 or size == 0:
        return None, None
    if size > _QCOW2_MAX_BACKING_NAME:
        raise _refuse(src.path, "corrupt", f"qcow2 backing file name is {size} bytes; qemu allows 1023")
    raw = src.pread(size, offset)
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _refuse(src.path, "corrupt", "qcow2 backing file name is not UTF-8") from None
    return name, _backing_format(header)


def _backing_format(header: bytes) -> str | None:
    """The qcow2 header extension naming the backing file's format, if there is one."""
    (version,) = struct.unpack_from(">I", header, 4)
    offset = 72 if version == 2 else struct.unpack_from(">I", header, 100)[0]
    while offset + 8 <= len(header):
        kind, length = struct.unpack_from(">II", header, offset)
        if kind == 0:
            return None
        if kind == _BACKING_FORMAT_EXT:
            return header[offset + 8 : offset + 8 + length].decode("ascii", "replace")
        offset += 8 + (length + 7) // 8 * 8
    return None


def _inside(path: str, directories: list[str]) -> bool:
    return any(os.path.commonpath([path, d]) == d for d in directories)


def _next_path(link: Source, name: str, allowed: list[str]) -> str:
    """Where a backing name points, checked: local, inside the allowed directories."""
    if name.startswith("json:") or _PROTOCOL.match(name):
        raise _refuse(
            link.path,
            "backing_protocol",
            f"its backing file {name[:80]!r} is a qemu protocol or json: description, not a local file",
        )
    if "\0" in name:
        raise _refuse(link.path, "corrupt", "its backing file name holds a NUL byte")
    here = os.path.dirname(os.path.realpath(link.path))
    real = os.path.realpath(os.path.join(here, name))  # qemu resolves relative names from the link
    if not _inside(real, allowed):
        raise _refuse(
            link.path,
            "backing_outside",
            f"its backing file {real} is outside the disk's directory and every --allow-backing-dir",
        )
    return real


def _check_link(src: Source, depth: int) -> tuple[str, int]:
    """The link's format and virtual size, from its header; refuse what no chain may hold."""
    found = detect(src)
    reasons = [r for r in found.reasons if r.code not in TOLERATED]
    if reasons:
        where = "the disk" if depth == 0 else f"backing file {depth}"
        raise ImageRejected(f"{where}: {reasons[0].message}", reasons, path=src.path)
    if found.format not in CHAIN_FORMATS:
        raise _refuse(
            src.path,
            "unsupported_format",
            f"is {found.format or 'of no known format'}; a snapshot chain holds raw and qcow2 only",
        )
    return found.format, found.virtual_size


def open_chain(
    disk: str, allowed_dirs: list[str], *, allow_device: bool = False, follow: bool = True
) -> Chain:
    """Open and validate `disk` and every backing file it leads to; refuse the first bad link.

    `follow=False` opens the top alone (what `--list` reads: its own snapshot table).
    """
    allowed = [os.path.realpath(disk if os.path.isdir(disk) else os.path.dirname(disk) or ".")]
    allowed += [os.path.realpath(d) for d in allowed_dirs]
    chain = Chain()
    seen: set[tuple[int, int]] = set()
    path: str | None = disk
    try:
        while path is not None:
            depth = len(chain.sources)
            if depth >= MAX_CHAIN_DEPTH:
                raise _refuse(disk, "chain_too_deep", f"its backing chain is deeper than {MAX_CHAIN_DEPTH}")
            src = open_source(path, allow_block_device=allow_device)
            chain.sources.append(src)
            if (src.device, src.inode) in seen:
                raise _refuse(path, "backing_loop", "its backing chain loops back to a file already in it")
            seen.add((src.device, src.inode))
            fmt, virtual_size = _check_link(src, depth)
            name, named_format = _qcow2_backing(src) if fmt == "qcow2" else (None, None)
            path = _next_path(src, name, allowed) if name is not None and follow else None
            chain.links.append(Link(os.path.realpath(src.path), fmt, virtual_size, src.size))
            if path is not None and named_format is not None and named_format not in CHAIN_FORMATS:
                raise _refuse(
                    src.path, "unsupported_format", f"its backing format {named_format!r} is not raw or qcow2"
                )
    except BaseException:
        chain.close()
        raise
    _check_named_formats(chain)
    return chain


def _check_named_formats(chain: Chain) -> None:
    """A backing format named in a header must be what the backing file really is."""
    for upper, lower in zip(chain.sources, chain.links[1:], strict=False):
        _, named = _qcow2_backing(upper)
        if named is not None and named != lower.format:
            chain.close()
            raise _refuse(
                upper.path,
                "format_mismatch",
                f"its header says the backing file is {named}, but {Path(lower.file).name} is {lower.format}",
            )
