"""Guest paths, resolved the way the guest's kernel would, but never leaving the guest.

The filesystem readers follow no links; this module does, by its own rules: an
absolute target starts again at the guest's root, `..` at the root stays at the root,
and more than MAX_LINK_HOPS links in one lookup is a loop. A guest link to
`/etc/shadow` therefore names the guest's file, and `../../../../etc/passwd` the
guest's own /etc/passwd: nothing here ever opens a host path. Mounts (a separate
/boot, a Btrfs subvolume) are grafted into the one tree by guest path.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import BinaryIO

from imagetool.guest import limits
from imagetool.guest.budget import Budget
from imagetool.guest.filesystems import GuestPathError, Node


@dataclass(frozen=True)
class Resolved:
    """Where a guest path leads: the canonical path (no links left in it) and the links followed."""

    asked: str
    path: str
    node: Node
    links: tuple[str, ...] = ()

    def describe(self) -> str:
        """`/bin/sh` -> `/usr/bin/dash (via /bin -> usr/bin, /usr/bin/sh -> dash)` for evidence."""
        if not self.links:
            return self.path
        return f"{self.asked} = {self.path} (via {', '.join(self.links)})"


def components(path: str) -> list[str]:
    return [part for part in path.split("/") if part and part != "."]


class GuestTree:
    """The guest's directory tree: a root filesystem and what is mounted on it."""

    def __init__(self, root: Node, budget: Budget) -> None:
        self.root = root
        self.budget = budget
        self.mounts: dict[tuple[str, ...], Node] = {}
        self.mount_notes: dict[str, str] = {}

    def mount(self, path: str, node: Node, note: str) -> None:
        self.mounts[tuple(components(path))] = node
        self.mount_notes["/" + "/".join(components(path))] = note

    def resolve(self, path: str, *, follow: bool = True) -> Resolved:
        """Follow `path` from the guest root; `follow=False` leaves a final link unfollowed."""
        todo = deque(components(path))
        stack: list[tuple[str, Node]] = []
        links: list[str] = []
        hops = 0
        while todo:
            self.budget.check()
            name = todo.popleft()
            if name == "..":
                if stack:
                    stack.pop()
                continue
            here = stack[-1][1] if stack else self.root
            canonical = (*(n for n, _ in stack), name)
            where = "/" + "/".join(canonical)
            if here.kind() != "dir":
                raise GuestPathError(f"{'/' + '/'.join(canonical[:-1])} is not a directory")
            node = self.mounts.get(canonical) or here.child(name)
            if node is None:
                raise GuestPathError(f"{where}: no such file or directory")
            if node.kind() == "link" and (todo or follow):
                hops += 1
                if hops > limits.MAX_LINK_HOPS:
                    raise GuestPathError(f"{path}: more than {limits.MAX_LINK_HOPS} symbolic links (a loop)")
                target = node.readlink()
                links.append(f"{where} -> {target}")
                if target.startswith("/"):
                    stack = []
                todo.extendleft(reversed(components(target)))
                continue
            stack.append((name, node))
        final = stack[-1][1] if stack else self.root
        return Resolved(path, "/" + "/".join(n for n, _ in stack), final, tuple(links))

    def find(self, path: str) -> Resolved | None:
        """resolve(), or None when the path does not lead anywhere (missing, a loop, a bad link)."""
        try:
            return self.resolve(path)
        except GuestPathError:
            return None

    def read(self, path: str, cap: int) -> tuple[Resolved, bytes]:
        """A whole regular file of at most `cap` bytes; bigger files are refused unread."""
        found = self.resolve(path)
        if found.node.kind() != "file":
            raise GuestPathError(f"{found.describe()} is not a regular file")
        size = found.node.size()
        if size > cap:
            raise GuestPathError(f"{found.describe()} is {size} bytes, over the {cap}-byte cap: not read")
        data = found.node.open().read(size)
        if len(data) != size:
            raise GuestPathError(f"{found.describe()}: read {len(data)} of {size} bytes (truncated image?)")
        return found, data

    def head(self, path: str, length: int) -> tuple[Resolved, bytes]:
        """The first `length` bytes of a regular file (an ELF or kernel header)."""
        found = self.resolve(path)
        if found.node.kind() != "file":
            raise GuestPathError(f"{found.describe()} is not a regular file")
        return found, found.node.open().read(min(length, found.node.size()))

    def stream(self, path: str) -> tuple[Resolved, BinaryIO, int]:
        found = self.resolve(path)
        if found.node.kind() != "file":
            raise GuestPathError(f"{found.describe()} is not a regular file")
        return found, found.node.open(), found.node.size()

    def listdir(self, path: str) -> tuple[Resolved, list[str]]:
        found = self.resolve(path)
        if found.node.kind() != "dir":
            raise GuestPathError(f"{found.describe()} is not a directory")
        return found, sorted(found.node.names())
