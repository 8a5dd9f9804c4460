"""Real guest disks for tests/test_guest.py, built from folder trees in a second or less.

Filesystems come from the real tools (mkfs.ext4 -d, mkfs.xfs -p protofile, mkfs.btrfs
--rootdir, mkfs.vfat + mcopy); partition tables (MBR, GPT with its CRCs) are written here
with struct, so no partitioning tool is needed; qcow2 comes from qemu-img. Programs are a
copied host binary (64-bit x86) and crafted ELF headers (a runnable 32-bit x86 one, and
an aarch64 one); initramfs archives are newc cpio (the cpio tool when present, else
written here) compressed each way the kernel reads.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import shutil
import struct
import subprocess
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

MiB = 1 << 20
VERSION = "6.1.0-9-amd64"
DRIVER_PATHS = {
    "virtio_blk": "drivers/block",
    "virtio_scsi": "drivers/scsi",
    "virtio_net": "drivers/net",
    "virtio_pci": "drivers/virtio",
}


def need(tool: str, package: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is missing (Debian package {package})")


def elf32_i386() -> bytes:
    """A complete, runnable 32-bit x86 ELF: exit(0) through int 0x80."""
    code = b"\x31\xdb\xb8\x01\x00\x00\x00\xcd\x80"  # xor ebx,ebx; mov eax,1; int 0x80
    base, header, phdr = 0x08048000, 52, 32
    ident = b"\x7fELF\x01\x01\x01" + bytes(9)
    ehdr = ident + struct.pack(
        "<HHIIIIIHHHHHH", 2, 3, 1, base + header + phdr, header, 0, 0, header, phdr, 1, 0, 0, 0
    )
    size = header + phdr + len(code)
    ph = struct.pack("<IIIIIIII", 1, 0, base, base, size, size, 5, 0x1000)
    return ehdr + ph + code


def elf64(machine: int) -> bytes:
    """A 64-bit little-endian ELF header and one program header for `machine` (183 = aarch64)."""
    ident = b"\x7fELF\x02\x01\x01" + bytes(9)
    ehdr = ident + struct.pack("<HHIQQQIHHHHHH", 2, machine, 1, 0x400078, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    ph = struct.pack("<IIQQQQQQ", 1, 5, 0, 0x400000, 0x400000, 0x80, 0x80, 0x10000)
    return ehdr + ph + b"\x00" * 8


def bzimage(is_64: bool) -> bytes:
    """The start of an x86 bzImage: boot protocol 2.15, XLF_KERNEL_64 set for a 64-bit kernel."""
    head = bytearray(0x400)
    head[0x1FE:0x200] = b"\x55\xaa"
    head[0x202:0x206] = b"HdrS"
    head[0x206:0x208] = (0x020F).to_bytes(2, "little")
    head[0x236:0x238] = (0x7F if is_64 else 0x00).to_bytes(2, "little")
    return bytes(head)


def newc(members: list[tuple[str, bytes]], *, with_tool: bool = True) -> bytes:
    """A newc cpio archive of regular files (and their parent directories), ending in TRAILER!!!."""
    if with_tool and shutil.which("cpio"):
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            names = []
            for name, data in members:
                path = Path(tmp, name)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
                names.append(name)
            listing = "".join(f"{n}\n" for n in names).encode()
            done = subprocess.run(
                ["cpio", "--quiet", "-o", "-H", "newc"],
                input=listing,
                cwd=tmp,
                capture_output=True,
                check=True,
            )
            return done.stdout
    blob = bytearray()
    for ino, (name, data) in enumerate([*members, ("TRAILER!!!", b"")], 1):
        raw = name.encode() + b"\0"
        mode = 0o100644 if name != "TRAILER!!!" else 0
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw), 0]
        blob += b"070701" + b"".join(b"%08X" % f for f in fields) + raw
        blob += b"\0" * (-len(blob) % 4) + data + b"\0" * (-len(data) % 4)
    return bytes(blob) + b"\0" * (-len(blob) % 512)


def compress(data: bytes, kind: str) -> bytes:
    if kind == "none":
        return data
    if kind == "gzip":
        return gzip.compress(data, 6)
    if kind == "xz":
        return lzma.compress(data, lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    if kind == "lzma":
        return lzma.compress(data, lzma.FORMAT_ALONE)
    if kind == "bzip2":
        return bz2.compress(data)
    if kind == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=3).compress(data)
    if kind == "lz4":
        need("lz4", "lz4")
        return subprocess.run(["lz4", "-l", "-q", "-c"], input=data, capture_output=True, check=True).stdout
    raise ValueError(kind)


def initramfs(
    modules: list[str], *, kind: str = "zstd", early: bool = False, version: str = VERSION, filler: int = 0
) -> bytes:
    """An initramfs holding `modules` (by driver name), optionally after an uncompressed early cpio."""
    members = [
        ("init", b"#!/bin/sh\nexec /sbin/init\n"),
        ("usr/bin/busybox", os.urandom(filler) if filler else b"x"),
    ]
    for name in modules:
        members.append(
            (f"usr/lib/modules/{version}/kernel/{DRIVER_PATHS[name]}/{name}.ko", b"\x7fELF" + bytes(200))
        )
    main = compress(newc(members), kind)
    if not early:
        return main
    microcode = newc([("kernel/x86/microcode/GenuineIntel.bin", b"\x01" * 1000)])
    return microcode + main


@dataclass
class Guest:
    """What to put in a guest's folder tree; `build()` writes it."""

    arch: str = "x86_64"  # x86_64 (the host's /bin/dash), i686, aarch64
    merged_usr: bool = True
    os_release: str | None = (
        'NAME="Debian GNU/Linux"\nID=debian\nVERSION_ID="12"\nPRETTY_NAME="Debian GNU/Linux 12"\n'
    )
    version: str = VERSION
    config: dict[str, str] | None = field(
        default_factory=lambda: {"VIRTIO_BLK": "m", "SCSI_VIRTIO": "m", "VIRTIO_NET": "m", "VIRTIO_PCI": "m"}
    )
    modules: dict[str, str] = field(
        default_factory=lambda: {
            "virtio_blk": ".ko.xz",
            "virtio_scsi": ".ko.xz",
            "virtio_net": ".ko.xz",
            "virtio_pci": ".ko.xz",
        }
    )
    builtin: list[str] = field(default_factory=list)  # modules.builtin lines
    initrd: bytes | None = None
    kernel_64: bool = True
    cloud_cfg: str | None = (
        "system_info:\n  default_user:\n    name: debian\n    groups: [sudo]\nusers:\n  - default\n"
    )
    cloud_cfg_d: dict[str, str] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)  # extra files, path -> bytes
    links: dict[str, str] = field(default_factory=dict)  # extra symlinks, path -> target
    boot_separate: bool = False  # keep /boot out of the tree (see boot_tree())

    def build(self, root: Path) -> Path:
        root.mkdir(parents=True, exist_ok=True)
        usr = root / "usr"
        for d in ("bin", "sbin", "lib"):
            (usr / d).mkdir(parents=True, exist_ok=True)
            if self.merged_usr:
                (root / d).symlink_to(f"usr/{d}")
            else:
                (root / d).mkdir(exist_ok=True)
        bindir = usr / "bin" if self.merged_usr else root / "bin"
        if self.arch == "x86_64":
            shutil.copy("/bin/dash", bindir / "dash")
        elif self.arch == "i686":
            (bindir / "dash").write_bytes(elf32_i386())
            (bindir / "dash").chmod(0o755)
        else:
            (bindir / "dash").write_bytes(elf64(183))
        (bindir / "sh").symlink_to("dash")
        (root / "etc").mkdir(exist_ok=True)
        if self.os_release is not None:
            (usr / "lib" / "os-release").write_text(self.os_release)
            (root / "etc" / "os-release").symlink_to("../usr/lib/os-release")
        if not self.boot_separate:
            self.boot_tree(root / "boot")
        modules_dir = (usr / "lib" if self.merged_usr else root / "lib") / "modules" / self.version
        modules_dir.mkdir(parents=True, exist_ok=True)
        for name, ext in self.modules.items():
            path = modules_dir / "kernel" / DRIVER_PATHS[name] / f"{name}{ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"module " + name.encode())
        if self.builtin:
            (modules_dir / "modules.builtin").write_text("".join(f"{line}\n" for line in self.builtin))
        if self.cloud_cfg is not None:
            (root / "etc" / "cloud" / "cloud.cfg.d").mkdir(parents=True, exist_ok=True)
            (root / "etc" / "cloud" / "cloud.cfg").write_text(self.cloud_cfg)
            for name, text in self.cloud_cfg_d.items():
                (root / "etc" / "cloud" / "cloud.cfg.d" / name).write_text(text)
        for path, data in self.files.items():
            target = root / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        for path, target in self.links.items():
            link = root / path.lstrip("/")
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(target)
        return root

    def boot_tree(self, boot: Path) -> Path:
        boot.mkdir(parents=True, exist_ok=True)
        (boot / f"vmlinuz-{self.version}").write_bytes(bzimage(self.kernel_64))
        if self.config is not None:
            lines = [
                f"CONFIG_{k}={v}" if v != "n" else f"# CONFIG_{k} is not set" for k, v in self.config.items()
            ]
            (boot / f"config-{self.version}").write_text(
                "# Linux kernel config\nCONFIG_64BIT=y\n" + "\n".join(lines) + "\n"
            )
        if self.initrd is not None:
            (boot / f"initrd.img-{self.version}").write_bytes(self.initrd)
        return boot


def mkfs(kind: str, tree: Path | None, out: Path, size_mib: int, *, label: str | None = None) -> Path:
    """A filesystem image of `kind` holding `tree`'s contents."""
    out.unlink(missing_ok=True)
    if kind == "ext4":
        need("mkfs.ext4", "e2fsprogs")
        args = ["mkfs.ext4", "-q", "-F", "-E", "root_owner=0:0", "-U", str(uuid.uuid4())]
        args += ["-L", label] if label else []
        args += ["-d", str(tree)] if tree else []
        subprocess.run([*args, str(out), f"{size_mib}M"], check=True, capture_output=True)
    elif kind == "xfs":
        need("mkfs.xfs", "xfsprogs")
        with out.open("wb") as f:
            f.truncate(size_mib * MiB)
        args = ["mkfs.xfs", "-q", "-f"]
        if tree:
            proto = out.with_suffix(".proto")
            proto.write_text(xfs_protofile(tree))
            args += ["-p", str(proto)]
        subprocess.run(
            [*args, str(out)], check=True, capture_output=True, env={**os.environ, "TEST_DEV": "1"}
        )
    elif kind == "btrfs":
        need("mkfs.btrfs", "btrfs-progs")
        with out.open("wb") as f:
            f.truncate(size_mib * MiB)
        args = ["mkfs.btrfs", "-q", "-f"] + (["-r", str(tree)] if tree else [])
        subprocess.run([*args, str(out)], check=True, capture_output=True)
    elif kind == "vfat":
        need("mkfs.vfat", "dosfstools")
        subprocess.run(["mkfs.vfat", "-C", str(out), str(size_mib * 1024)], check=True, capture_output=True)
        if tree:
            need("mcopy", "mtools")
            entries = [str(p) for p in sorted(tree.iterdir())]
            if entries:
                subprocess.run(
                    ["mcopy", "-s", "-i", str(out), *entries, "::/"], check=True, capture_output=True
                )
    else:
        raise ValueError(kind)
    return out


def xfs_protofile(tree: Path) -> str:
    """mkfs.xfs's -p format for a folder tree: directories, files (by source path) and symlinks."""
    lines = ["/dev/null", "0 0", "d--755 0 0"]

    def walk(directory: Path, depth: int) -> None:
        for entry in sorted(directory.iterdir()):
            pad = " " * depth
            if entry.is_symlink():
                lines.append(f"{pad}{entry.name} l--777 0 0 {os.readlink(entry)}")
            elif entry.is_dir():
                lines.append(f"{pad}{entry.name} d--755 0 0")
                walk(entry, depth + 1)
                lines.append(f"{pad}$")
            else:
                lines.append(f"{pad}{entry.name} ---644 0 0 {entry}")

    walk(tree, 1)
    lines.append("$")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Part:
    image: Path
    gpt_type: str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"  # Linux filesystem
    mbr_type: int = 0x83


ESP_GPT = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"


def _guid_bytes(text: str) -> bytes:
    return uuid.UUID(text).bytes_le


def disk(out: Path, parts: list[Part], table: str | None = "gpt") -> Path:
    """A sparse raw disk: the partition table written here, each filesystem copied at 1 MiB boundaries."""
    out.unlink(missing_ok=True)
    if table is None:
        shutil.copy(parts[0].image, out)
        return out
    offsets = []
    pos = MiB
    for part in parts:
        offsets.append(pos)
        pos += -(-part.image.stat().st_size // MiB) * MiB
    total = pos + MiB
    with out.open("wb") as f:
        f.truncate(total)
        for part, offset in zip(parts, offsets, strict=True):
            with part.image.open("rb") as src:
                at = offset
                while chunk := src.read(MiB):
                    if chunk.strip(b"\0"):
                        f.seek(at)
                        f.write(chunk)
                    at += len(chunk)
        sizes = [p.image.stat().st_size for p in parts]
        if table == "mbr":
            f.seek(0)
            f.write(_mbr(offsets, sizes, [p.mbr_type for p in parts], 0x1234ABCD))
        else:
            _gpt(f, total, offsets, sizes, [p.gpt_type for p in parts])
    return out


def _mbr(offsets: list[int], sizes: list[int], types: list[int], signature: int) -> bytes:
    sector = bytearray(512)
    sector[440:444] = signature.to_bytes(4, "little")
    for i, (offset, size, kind) in enumerate(zip(offsets, sizes, types, strict=True)):
        entry = struct.pack(
            "<B3sB3sII",
            0x80 if i == 0 else 0,
            b"\xfe\xff\xff",
            kind,
            b"\xfe\xff\xff",
            offset // 512,
            -(-size // 512),
        )
        sector[446 + 16 * i : 462 + 16 * i] = entry
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def _gpt(f, total: int, offsets: list[int], sizes: list[int], types: list[str]) -> None:  # type: ignore[no-untyped-def]
    sectors = total // 512
    entries = bytearray(128 * 128)
    for i, (offset, size, kind) in enumerate(zip(offsets, sizes, types, strict=True)):
        first = offset // 512
        last = first + -(-size // 512) - 1
        name = f"part{i + 1}".encode("utf-16-le").ljust(72, b"\0")
        entries[128 * i : 128 * (i + 1)] = (
            _guid_bytes(kind)
            + uuid.UUID(int=0x1111_0000 + i + 1).bytes_le
            + struct.pack("<QQQ", first, last, 0)
            + name
        )
    entries_crc = zlib.crc32(entries)

    def header(current: int, backup: int, entries_lba: int) -> bytes:
        fields = struct.pack(
            "<8sIIIIQQQQ16sQIII",
            b"EFI PART",
            0x10000,
            92,
            0,
            0,
            current,
            backup,
            34,
            sectors - 34,
            uuid.UUID(int=0xD15C).bytes_le,
            entries_lba,
            128,
            128,
            entries_crc,
        )
        crc = zlib.crc32(fields)
        return (fields[:16] + crc.to_bytes(4, "little") + fields[20:]).ljust(512, b"\0")

    protective = bytearray(512)
    protective[446:462] = struct.pack(
        "<B3sB3sII", 0, b"\x00\x02\x00", 0xEE, b"\xff\xff\xff", 1, min(sectors - 1, 0xFFFFFFFF)
    )
    protective[510:512] = b"\x55\xaa"
    f.seek(0)
    f.write(bytes(protective) + header(1, sectors - 1, 2) + entries)
    f.seek((sectors - 33) * 512)
    f.write(entries + header(sectors - 1, 1, sectors - 33))


def qcow2(raw: Path, out: Path, *, compressed: bool = True) -> Path:
    need("qemu-img", "qemu-utils")
    out.unlink(missing_ok=True)
    args = ["qemu-img", "convert", "-O", "qcow2"] + (["-c"] if compressed else [])
    subprocess.run([*args, str(raw), str(out)], check=True, capture_output=True)
    return out
