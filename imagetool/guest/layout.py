"""Which filesystem is the guest's root, and what its fstab mounts beside it (/boot, /usr).

Every volume is identified by its magic bytes; readable filesystems are opened. The
root is the one holding an os-release file (on Btrfs, the top level or a subvolume such
as Fedora's `root` or Ubuntu's `@`); a Windows root holds Windows/System32. The root's
/etc/fstab then says which filesystem is /boot (or /usr): matched by UUID, LABEL,
PARTUUID, PARTLABEL or device name. Without a usable fstab line, a filesystem whose top
holds kernels (vmlinuz-*) or a boot loader directory is taken as /boot, and the evidence
says it was a guess.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import BinaryIO, Literal

from imagetool.guest import limits
from imagetool.guest.budget import Budget
from imagetool.guest.files import GuestTree
from imagetool.guest.filesystems import BtrfsFilesystem, GuestFilesystem, Node, identify, open_filesystem
from imagetool.guest.text import short_error
from imagetool.guest.volumes import Volume, find_volumes, volume_stream

GuestKind = Literal["linux", "windows"]

# Mount points whose contents the look reads, besides the root.
_WANTED_MOUNTS = ("/usr", "/boot", "/boot/efi")
_DEVICE_NUMBER = re.compile(r"^/dev/(?:[shv]d[a-z]|xvd[a-z])(\d+)$|^/dev/(?:nvme\d+n\d+|mmcblk\d+)p(\d+)$")
_UNREADABLE = {
    "luks": "LUKS encrypted volume: its contents cannot be read",
    "lvm2": "LVM2 physical volume: logical volumes are not read by imagetool",
    "swap": "swap space",
}


@dataclass
class Mountable:
    volume: Volume
    fs: GuestFilesystem

    def describe(self) -> str:
        return f"{self.volume.describe()}: {self.fs.describe()}"


@dataclass
class Layout:
    tree: GuestTree | None = None
    kind: GuestKind | None = None
    root: Mountable | None = None
    evidence: list[str] = field(default_factory=list)


def build_layout(disk: BinaryIO, disk_size: int, budget: Budget) -> Layout:
    layout = Layout()
    volumes, notes = find_volumes(disk, disk_size, budget)
    layout.evidence.extend(notes)
    opened: list[Mountable] = []
    for volume in volumes:
        budget.check()
        stream = volume_stream(disk, volume)
        try:
            kind = identify(stream)
        except Exception as exc:
            layout.evidence.append(f"{volume.describe()}: unreadable ({short_error(exc)})")
            continue
        if kind is None:
            layout.evidence.append(f"{volume.describe()}: no filesystem recognised")
            continue
        if kind in _UNREADABLE:
            layout.evidence.append(f"{volume.describe()}: {_UNREADABLE[kind]}")
            continue
        try:
            fs = open_filesystem(kind, stream, budget)
        except Exception as exc:
            layout.evidence.append(
                f"{volume.describe()}: {kind} found but it does not open ({short_error(exc)})"
            )
            continue
        if fs is None:
            continue
        opened.append(Mountable(volume, fs))
        layout.evidence.append(f"{volume.describe()}: {fs.describe()}")
    _choose_root(layout, opened, budget)
    if layout.tree is not None and layout.kind == "linux" and layout.root is not None:
        _mount_from_fstab(layout, opened, budget)
        _guess_boot(layout, opened)
    return layout


def _choose_root(layout: Layout, opened: list[Mountable], budget: Budget) -> None:
    for item in opened:
        candidates: list[tuple[str, Node]] = [("", item.fs.root)]
        if isinstance(item.fs, BtrfsFilesystem):
            try:
                candidates += item.fs.subvolumes()
            except Exception as exc:
                layout.evidence.append(f"{item.describe()}: subvolumes unreadable ({short_error(exc)})")
        for subvol, node in candidates:
            tree = GuestTree(node, budget)
            where = f"{item.describe()}" + (f", subvolume {subvol}" if subvol else "")
            try:
                release = tree.find("/etc/os-release") or tree.find("/usr/lib/os-release")
                windows = None if release else tree.find("/Windows/System32")
            except Exception as exc:
                layout.evidence.append(f"{where}: unreadable ({short_error(exc)})")
                continue
            if release is None and windows is None:
                continue
            if layout.tree is not None:
                layout.evidence.append(f"another system root on {where}: not read")
                continue
            layout.tree, layout.root = tree, item
            layout.kind = "linux" if release else "windows"
            marker = release.path if release else "/Windows/System32"
            layout.evidence.append(f"root filesystem: {where} (holds {marker})")
    if layout.tree is None:
        layout.evidence.append("no filesystem holds an operating system (no os-release, no Windows/System32)")


@dataclass(frozen=True)
class FstabEntry:
    spec: str
    mountpoint: str
    fstype: str
    options: tuple[str, ...]
    line: int


def parse_fstab(text: str) -> list[FstabEntry]:
    entries: list[FstabEntry] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        fields = line.split()
        if len(fields) < 3:
            continue
        spec, mountpoint = _unescape(fields[0]), _unescape(fields[1])
        options = tuple(fields[3].split(",")) if len(fields) > 3 else ()
        entries.append(FstabEntry(spec, mountpoint.rstrip("/") or "/", fields[2], options, number))
    return entries


def _unescape(value: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), value)


def _match(spec: str, opened: list[Mountable]) -> Mountable | None:
    key, _, value = spec.partition("=")
    by_path = re.match(r"^/dev/disk/by-(uuid|label|partuuid|partlabel)/(.+)$", spec)
    if by_path:
        key, value = by_path.group(1).upper(), by_path.group(2)
    number = _DEVICE_NUMBER.match(spec)
    for item in opened:
        if key == "UUID" and item.fs.uuid and item.fs.uuid.lower() == value.strip('"').lower():
            return item
        if key == "LABEL" and item.fs.label == value.strip('"'):
            return item
        if key == "PARTUUID" and item.volume.partuuid == value.strip('"').lower():
            return item
        if key == "PARTLABEL" and item.volume.partlabel == value.strip('"'):
            return item
        if number and item.volume.number == int(number.group(1) or number.group(2)):
            return item
    return None


def _mount_from_fstab(layout: Layout, opened: list[Mountable], budget: Budget) -> None:
    assert layout.tree is not None and layout.root is not None
    tree = layout.tree
    try:
        found, data = tree.read("/etc/fstab", limits.MAX_CONFIG_BYTES)
    except Exception as exc:
        layout.evidence.append(f"/etc/fstab not read ({short_error(exc)})")
        return
    for entry in parse_fstab(data.decode("utf-8", "replace")):
        budget.check()
        if entry.mountpoint not in _WANTED_MOUNTS:
            continue
        item = _match(entry.spec, opened)
        where = f"{found.path} line {entry.line}: {entry.spec} on {entry.mountpoint}"
        if item is None:
            layout.evidence.append(f"{where}: no filesystem in the image matches")
            continue
        node = item.fs.root
        subvol = next((o.split("=", 1)[1] for o in entry.options if o.startswith("subvol=")), None)
        if subvol and isinstance(item.fs, BtrfsFilesystem):
            try:
                node = item.fs.subvolume(subvol) or node
            except Exception as exc:
                layout.evidence.append(f"{where}: subvolume {subvol} unreadable ({short_error(exc)})")
        tree.mount(entry.mountpoint, node, f"{where} = {item.describe()}")
        layout.evidence.append(f"mounted {entry.mountpoint}: {where} = {item.describe()}")


def _has_kernels(node: Node) -> bool:
    try:
        names = node.names()
    except Exception:
        return False
    return any(n.startswith(("vmlinuz", "initrd", "initramfs")) for n in names) or any(
        n in ("grub", "grub2", "loader") for n in names
    )


def _guess_boot(layout: Layout, opened: list[Mountable]) -> None:
    """No fstab line for /boot: a separate filesystem holding kernels is taken as /boot."""
    assert layout.tree is not None
    tree = layout.tree
    if ("boot",) in tree.mounts:
        return
    boot = tree.find("/boot")
    if boot is not None and boot.node.kind() == "dir" and _has_kernels(boot.node):
        return
    for item in opened:
        if item is layout.root or item.fs.root in tree.mounts.values():
            continue
        if _has_kernels(item.fs.root):
            tree.mount("/boot", item.fs.root, f"guessed: {item.describe()}")
            layout.evidence.append(
                f"/boot is empty on the root and fstab names no /boot: {item.describe()} holds kernels "
                "or a boot loader, taken as /boot (a guess)"
            )
            return
