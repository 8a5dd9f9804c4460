"""One small interface over the filesystem readers: ext2/3/4, XFS, Btrfs, FAT (EFI) and NTFS.

Each dissect reader has its own node API; `Node` wraps them so path resolution
(files.py) is written once. Nothing here follows a symlink: the readers hand back
link text, and files.py decides, inside the guest, where it leads. Every read the
readers make goes through the counted image stream, and every directory walk here
checks the budget, so a hostile directory or link ends the step, not the process.
"""

from __future__ import annotations

import stat
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, Literal, cast

from imagetool.guest import limits
from imagetool.guest.budget import Budget

Kind = Literal["dir", "file", "link", "other"]

_KINDS: dict[int, Kind] = {stat.S_IFDIR: "dir", stat.S_IFREG: "file", stat.S_IFLNK: "link"}


class GuestPathError(Exception):
    """A guest path that cannot be followed: missing, a loop, too long, not a file, too big."""


class Node:
    """A file, directory or link of one guest filesystem; children are cached once listed."""

    __slots__ = ("_children", "_kind", "fs", "handle")

    def __init__(self, fs: GuestFilesystem, handle: Any) -> None:
        self.fs = fs
        self.handle = handle
        self._kind: Kind | None = None
        self._children: dict[str, Node] | None = None

    def kind(self) -> Kind:
        if self._kind is None:
            self._kind = self.fs.kind_of(self.handle)
        return self._kind

    def size(self) -> int:
        return self.fs.size_of(self.handle)

    def child(self, name: str) -> Node | None:
        """The entry `name` of this directory, or None."""
        key = name.upper() if self.fs.case_insensitive else name
        if self._children is None:
            direct = self.fs.lookup(self.handle, name)
            if direct is not NotImplemented:
                return None if direct is None else Node(self.fs, direct)
            self._children = self._list()
        return self._children.get(key)

    def names(self) -> list[str]:
        """The names in this directory (without . and ..), at most MAX_DIR_ENTRIES of them."""
        if self._children is None:
            self._children = self._list()
        names = (self.fs.display_name(node.handle, key) for key, node in self._children.items())
        return list(dict.fromkeys(names))

    def _list(self) -> dict[str, Node]:
        if self.kind() != "dir":
            raise GuestPathError("not a directory")
        children: dict[str, Node] = {}
        budget = self.fs.budget
        for count, (name, handle) in enumerate(self.fs.entries(self.handle)):
            if count % 256 == 0:
                budget.check()
            if count >= limits.MAX_DIR_ENTRIES:
                raise GuestPathError(f"a directory with more than {limits.MAX_DIR_ENTRIES} entries")
            if name in (".", "..") or not name or "/" in name or "\x00" in name:
                continue
            key = name.upper() if self.fs.case_insensitive else name
            children.setdefault(key, Node(self.fs, handle))
        return children

    def readlink(self) -> str:
        if self.kind() != "link":
            raise GuestPathError("not a symbolic link")
        size = self.size()
        if size <= 0 or size > limits.MAX_LINK_TARGET:
            raise GuestPathError(f"a symbolic link of {size} bytes (at most {limits.MAX_LINK_TARGET})")
        target = self.fs.link_of(self.handle, size)
        if not target or "\x00" in target:
            raise GuestPathError("an empty or NUL-bearing symbolic link")
        return target

    def open(self) -> BinaryIO:
        return self.fs.open(self.handle)


class GuestFilesystem:
    """What every reader adapter provides; handles are the reader's own node objects."""

    type_name = "unknown"
    case_insensitive = False

    def __init__(self, budget: Budget, uuid: str | None, label: str | None) -> None:
        self.budget = budget
        self.uuid = uuid
        self.label = label
        self.root = Node(self, self.root_handle())

    def describe(self) -> str:
        bits = [self.type_name]
        if self.uuid:
            bits.append(f"UUID={self.uuid}")
        if self.label:
            bits.append(f"LABEL={self.label}")
        return " ".join(bits)

    def root_handle(self) -> Any:
        raise NotImplementedError

    def kind_of(self, handle: Any) -> Kind:
        raise NotImplementedError

    def size_of(self, handle: Any) -> int:
        return int(handle.size)

    def entries(self, handle: Any) -> Iterator[tuple[str, Any]]:
        raise NotImplementedError

    def lookup(self, handle: Any, name: str) -> Any:
        """A faster lookup than listing the directory, if the reader has one; else NotImplemented."""
        return NotImplemented

    def display_name(self, handle: Any, key: str) -> str:
        return key

    def link_of(self, handle: Any, size: int) -> str:
        data = cast(BinaryIO, handle.open()).read(size)
        return data.decode(errors="surrogateescape")

    def open(self, handle: Any) -> BinaryIO:
        return cast(BinaryIO, handle.open())


class ExtFilesystem(GuestFilesystem):
    type_name = "ext"

    def __init__(self, stream: BinaryIO, budget: Budget) -> None:
        from dissect.extfs import ExtFS  # type: ignore[import-untyped]

        self._fs = ExtFS(stream)
        self.type_name = {2: "ext2", 3: "ext3", 4: "ext4"}.get(int(self._fs.type), "ext")
        super().__init__(budget, str(self._fs.uuid).lower(), self._fs.volume_name or None)

    def root_handle(self) -> Any:
        return self._fs.root

    def kind_of(self, handle: Any) -> Kind:
        return _KINDS.get(int(handle.filetype), "other")

    def entries(self, handle: Any) -> Iterator[tuple[str, Any]]:
        for inode in handle.iterdir():
            yield str(inode.filename), inode


class XfsFilesystem(GuestFilesystem):
    type_name = "xfs"

    def __init__(self, stream: BinaryIO, budget: Budget) -> None:
        from dissect.xfs import XFS  # type: ignore[import-untyped]

        self._fs = XFS(stream)
        super().__init__(budget, str(self._fs.uuid).lower(), self._fs.name or None)

    def root_handle(self) -> Any:
        return self._fs.root

    def kind_of(self, handle: Any) -> Kind:
        return _KINDS.get(int(handle.filetype), "other")

    def entries(self, handle: Any) -> Iterator[tuple[str, Any]]:
        for inode in handle.iterdir():
            yield str(inode.filename), inode

    def link_of(self, handle: Any, size: int) -> str:
        # XFS v5 keeps a header before remote link text; its reader handles both forms.
        return str(handle.link)


class BtrfsFilesystem(GuestFilesystem):
    type_name = "btrfs"

    def __init__(self, stream: BinaryIO, budget: Budget) -> None:
        from dissect.btrfs import Btrfs  # type: ignore[import-untyped]

        self._fs = Btrfs(stream)
        super().__init__(budget, str(self._fs.uuid).lower(), self._fs.label or None)

    def root_handle(self) -> Any:
        return self._fs.root

    def kind_of(self, handle: Any) -> Kind:
        return _KINDS.get(int(handle.type), "other")

    def entries(self, handle: Any) -> Iterator[tuple[str, Any]]:
        for name, inode in handle.iterdir():
            yield str(name), inode

    def lookup(self, handle: Any, name: str) -> Any:
        # Directory items are indexed by a hash of the name: one B-tree search, no listing.
        try:
            return handle.subvolume.get(name, handle)
        except FileNotFoundError:
            return None

    def subvolume(self, path: str) -> Node | None:
        """The root of the subvolume at `path` (fstab's subvol=), or None."""
        wanted = path.strip("/")
        for count, sub in enumerate(self._fs.subvolumes()):
            self.budget.check()
            if count > limits.MAX_DIR_ENTRIES:
                break
            if str(sub.path).strip("/") == wanted:
                return Node(self, sub.root)
        return None

    def subvolumes(self, limit: int = 64) -> list[tuple[str, Node]]:
        """Subvolumes other than the top level, by path: where a distribution may keep its root."""
        found: list[tuple[str, Node]] = []
        for sub in self._fs.subvolumes():
            self.budget.check()
            path = str(sub.path).strip("/")
            if path:
                found.append((path, Node(self, sub.root)))
            if len(found) >= limit:
                break
        return found


class FatFilesystem(GuestFilesystem):
    type_name = "vfat"
    case_insensitive = True

    def __init__(self, stream: BinaryIO, budget: Budget) -> None:
        from dissect.fat import fat  # type: ignore[import-untyped]

        self._fs = fat.FATFS(stream)
        serial = int(self._fs.bpb_ext.BS_VolID)
        # fstab and blkid spell a FAT serial as XXXX-XXXX.
        super().__init__(budget, f"{serial >> 16:04X}-{serial & 0xFFFF:04X}", self._fs.volume_label or None)

    def root_handle(self) -> Any:
        return self._fs.root

    def kind_of(self, handle: Any) -> Kind:
        return "dir" if handle.is_directory() else "file"

    def size_of(self, handle: Any) -> int:
        return 0 if handle.is_directory() else int(handle.dirent.DIR_FileSize)

    def entries(self, handle: Any) -> Iterator[tuple[str, Any]]:
        for entry in handle.iterdir():
            if entry.is_volume_id():
                continue
            yield str(entry.name), entry
            if entry.short_name and entry.short_name != entry.name:
                yield str(entry.short_name), entry

    def display_name(self, handle: Any, key: str) -> str:
        return str(handle.name) if handle.name else key


class NtfsFilesystem(GuestFilesystem):
    type_name = "ntfs"
    case_insensitive = True

    def __init__(self, stream: BinaryIO, budget: Budget) -> None:
        from dissect.ntfs import NTFS  # type: ignore[import-untyped]

        self._fs = NTFS(stream)
        serial = int(self._fs.serial or 0)
        super().__init__(budget, f"{serial:016X}" if serial else None, self._fs.volume_name or None)

    def root_handle(self) -> Any:
        return self._fs.mft.root

    def kind_of(self, handle: Any) -> Kind:
        if handle.is_symlink() or handle.is_mount_point():
            return "other"  # reparse points may name other volumes: never followed
        return "dir" if handle.is_dir() else "file"

    def size_of(self, handle: Any) -> int:
        return 0 if handle.is_dir() else int(handle.size())

    def entries(self, handle: Any) -> Iterator[tuple[str, Any]]:
        for name, record in handle.listdir(dereference=True, ignore_dos=True).items():
            yield str(name), record


Opener = Callable[[BinaryIO, Budget], GuestFilesystem]

_OPENERS: dict[str, Opener] = {
    "ext": ExtFilesystem,
    "xfs": XfsFilesystem,
    "btrfs": BtrfsFilesystem,
    "vfat": FatFilesystem,
    "ntfs": NtfsFilesystem,
}


def identify(stream: BinaryIO) -> str | None:
    """The filesystem (or other known content) a volume starts with, from its magic bytes."""
    stream.seek(0)
    head = stream.read(4096)
    if len(head) >= 1082 and head[1080:1082] == b"\x53\xef":
        return "ext"
    if head[:4] == b"XFSB":
        return "xfs"
    if head[3:11] == b"NTFS    ":
        return "ntfs"
    if head[:6] == b"LUKS\xba\xbe":
        return "luks"
    if head[512:520] == b"LABELONE" or head[1024:1032] == b"LABELONE":
        return "lvm2"
    if len(head) >= 4096 and head[4086:4096] in (b"SWAPSPACE2", b"SWAP-SPACE"):
        return "swap"
    if (
        len(head) >= 512
        and head[510:512] == b"\x55\xaa"
        and (head[54:59] in (b"FAT12", b"FAT16") or head[82:87] == b"FAT32")
    ):
        return "vfat"
    stream.seek(0x10040)
    if stream.read(8) == b"_BHRfS_M":
        return "btrfs"
    return None


def open_filesystem(kind: str, stream: BinaryIO, budget: Budget) -> GuestFilesystem | None:
    """The reader for `kind` (from identify()), or None for content no reader here opens."""
    opener = _OPENERS.get(kind)
    return opener(stream, budget) if opener else None
