"""detect.py's verdicts through the CLI: `raw` means raw to qemu too, VHDs are sized as qemu sizes them,
no oslo parser crash reaches the user, and qemu-img never sees a header whose counts would make it slow."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import SAMPLE, assert_no_leak, canary, make_qcow2, patch, qemu_img, sparse_raw
from test_probe import (
    bochs_image,
    cloop_image,
    descriptor,
    dmg_image,
    patch_vhd_footers,
    qemu_size,
    vhd_checksum,
)

from imagetool.policy import MAX_QCOW2_L1_BYTES, MAX_QCOW2_REFCOUNT_TABLE_BYTES, MAX_QCOW2_SNAPSHOTS

MiB = 1 << 20
pytestmark = pytest.mark.timeout(60)


def reasons(result) -> list[str]:
    return [r["code"] for r in result.json["reasons"]]


# 1. "raw" must mean raw to qemu too


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (bochs_image, "Bochs"),
        (cloop_image, "cloop"),
        (dmg_image, "Apple disk image"),
        (lambda p: dmg_image(p, size=MiB + 512, koly_at=MiB - 300), "Apple disk image"),  # padded to 512
    ],
)
def test_formats_only_qemu_knows_are_unsupported(cli, tmp_path, make, name):
    image = make(tmp_path / "disk.img")
    result = cli("inspect", image, "--json")
    assert result.code == 3, result.err
    assert reasons(result) == ["unsupported_format"]
    assert name in result.json["reasons"][0]["message"]


def test_descriptor_with_binary_first_sector_is_refused(cli, tmp_path):
    """CVE-2022-47951 past oslo: a non-printable comment hides the descriptor from it, not from qemu."""
    host = canary(tmp_path)
    image = descriptor(
        tmp_path / "d.img", b"# \x00\x01\x02\xff\n" * 4, "monolithicFlat", f'RW 128 FLAT "{host}" 0'
    )
    with image.open("ab") as f:
        f.truncate(4096)
    result = cli("inspect", image, "--json")
    assert result.code == 3
    assert reasons(result) == ["multiple_formats"]
    assert "VMDK text descriptor" in result.json["reasons"][0]["message"]
    assert_no_leak(tmp_path, result.out, result.err)


@pytest.mark.parametrize(
    "first_sector",
    [
        b"COWD\x01\x00\x00\x00",  # a VMDK3 sparse extent header
        b"KDMV\x01\x00\x00\x00" + bytes(20) + struct.pack("<Q", 0),  # a VMDK4 extent with no descriptor
    ],
)
def test_raw_disk_with_another_formats_magic_is_multiple_formats(cli, tmp_path, first_sector):
    """oslo's VMDK parser rejects these headers and calls the disk raw; qemu opens it as a VMDK."""
    image = sparse_raw(tmp_path / "d.raw", MiB, {0: first_sector, 510: b"\x55\xaa"})
    result = cli("inspect", image, "--json")
    assert result.code == 3
    assert reasons(result) == ["multiple_formats"]
    assert "vmdk" in result.json["reasons"][0]["message"]


def test_fixed_vhd_holding_a_qcow2_header_is_multiple_formats(cli, tmp_path):
    image = tmp_path / "f.vhd"
    qemu_img("create", "-q", "-f", "vpc", "-o", "subformat=fixed", image, "8M")
    patch(image, 0, b"QFI\xfb\x00\x00\x00\x03")
    result = cli("inspect", image, "--json")
    assert result.code == 3 and reasons(result) == ["multiple_formats"]
    assert "qcow2" in result.json["reasons"][0]["message"]


# 2. VHD as qemu reads it


def test_virtual_pc_vhd_is_sized_by_chs_like_qemu(cli, tmp_path):
    """Virtual PC's own VHDs: current_size says 32 MiB, qemu (and Virtual PC) use the CHS geometry."""
    image = tmp_path / "vpc.vhd"
    qemu_img("create", "-q", "-f", "vpc", image, "32M")
    patch_vhd_footers(image, creator_app=b"vpc ", orig_size=32 * MiB, current_size=32 * MiB, chs=(963, 4, 17))
    result = cli("inspect", image, "--json")
    assert result.code == 0, result.err
    assert result.json["format"] == "vpc"
    assert result.json["virtual_size"] == qemu_size(image, "vpc") == 963 * 4 * 17 * 512


def test_fixed_vhd_is_vpc_not_raw(cli, tmp_path):
    """Its only footer is at the end: as raw, the footer would become the guest's last sector."""
    image = tmp_path / "f.vhd"
    qemu_img("create", "-q", "-f", "vpc", "-o", "subformat=fixed", image, "32M")
    result = cli("inspect", image, "--json")
    assert result.code == 0, result.err
    assert result.json["format"] == "vpc"
    assert result.json["virtual_size"] == qemu_size(image, "vpc") == image.stat().st_size - 512


@pytest.mark.parametrize(
    ("offset", "data", "message"),
    [
        (64, b"\0\0\0\0", "bad checksum"),  # a footer qemu refuses
        (60, struct.pack(">I", 3), "disk type 3"),  # "dynamic", with no header to say where its blocks are
        (48, struct.pack(">Q", 64 * MiB), "claims"),  # more data than the file holds
    ],
)
def test_broken_fixed_vhd_is_corrupt(cli, tmp_path, offset, data, message):
    image = tmp_path / "f.vhd"
    qemu_img("create", "-q", "-f", "vpc", "-o", "subformat=fixed", image, "8M")
    footer_at = image.stat().st_size - 512
    footer = bytearray(image.read_bytes()[footer_at:])
    footer[offset : offset + len(data)] = data
    footer[28:32] = b"win "  # sized by current_size
    if offset != 64:
        struct.pack_into(">I", footer, 64, vhd_checksum(footer))
    patch(image, footer_at, bytes(footer))
    result = cli("inspect", image, "--json")
    assert result.code == 3 and reasons(result) == ["corrupt"]
    assert message in result.json["reasons"][0]["message"]


# 3. a text file is a VMDK descriptor only if qemu would take it for one


def test_text_mentioning_create_type_is_raw(cli, tmp_path):
    image = tmp_path / "notes.img"
    text = b'Notes on VMDK\n\nA descriptor says createType="monolithicFlat" near its top.\n'
    image.write_bytes(text.ljust(4096, b"\n"))
    result = cli("inspect", image, "--json")
    assert result.code == 0, result.err
    assert result.json["format"] == "raw"


# 4. oslo parsers that raise are `corrupt`, not a crash


def _vhdx_with_disk_size_entry_length(path: Path, length: int) -> Path:
    """A real VHDX whose Virtual Disk Size metadata entry says it is `length` bytes long (the spec says 8)."""
    qemu_img("create", "-q", "-f", "vhdx", path, "32M")
    data = bytearray(path.read_bytes())
    metaregion = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E").bytes_le
    disk_size = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8").bytes_le
    (count,) = struct.unpack_from("<I", data, 0x30008)
    entries = [0x30010 + 32 * i for i in range(count)]
    (metadata,) = [
        struct.unpack_from("<Q", data, e + 16)[0] for e in entries if data[e : e + 16] == metaregion
    ]
    (items,) = struct.unpack_from("<H", data, metadata + 10)
    (entry,) = [
        e for e in range(metadata + 32, metadata + 32 + 32 * items, 32) if data[e : e + 16] == disk_size
    ]
    struct.pack_into("<I", data, entry + 20, length)
    path.write_bytes(bytes(data))
    return path


def test_vhdx_with_bad_disk_size_entry_is_corrupt(cli, tmp_path):
    image = _vhdx_with_disk_size_entry_length(tmp_path / "d.vhdx", 16)
    result = cli("inspect", image, "--json")
    assert result.code == 3, result.err
    assert reasons(result) == ["corrupt"]
    assert "vhdx" in result.json["reasons"][0]["message"]


def test_text_only_sparse_descriptor_is_corrupt(cli, tmp_path):
    """A monolithicSparse descriptor with no sparse header around it: oslo's size lookup raises KeyError."""
    image = descriptor(
        tmp_path / "d.vmdk", b"# Disk DescriptorFile\n", "monolithicSparse", 'RW 16384 SPARSE "d-s001.vmdk"'
    )
    result = cli("inspect", image, "--json")
    assert result.code == 3, result.err
    assert reasons(result) == ["corrupt"]
    assert "vmdk" in result.json["reasons"][0]["message"]


def test_libmagic_failing_on_the_bytes_is_corrupt(cli, tmp_path, monkeypatch):
    """libmagic raises on some inputs (a regexec error on an illegal byte sequence, say)."""
    import magic

    def fail(*args, **kwargs):
        raise magic.MagicException("regexec error 17, (illegal byte sequence)")

    monkeypatch.setattr(magic, "from_buffer", fail)
    result = cli("inspect", sparse_raw(tmp_path / "d.raw", MiB), "--json")
    assert result.code == 3, result.err
    assert reasons(result) == ["corrupt"]
    assert "libmagic" in result.json["reasons"][0]["message"]


# 5. truncation is corrupt; one reason per finding


def test_truncated_qcow2_header_is_corrupt(cli, tmp_path):
    image = make_qcow2(tmp_path / "t.qcow2")
    with image.open("r+b") as f:
        f.truncate(80)
    result = cli("inspect", image, "--json")
    assert result.code == 3
    assert reasons(result) == ["corrupt"]
    assert "truncated" in result.json["reasons"][0]["message"]


def test_data_file_is_listed_once(cli, tmp_path):
    image = make_qcow2(tmp_path / "d.qcow2", "1M", "-o", f"data_file={tmp_path / 'data.bin'}")
    result = cli("inspect", image, "--json")
    assert result.code == 3
    assert reasons(result).count("data_file") == 1


# 6. header counts that would make qemu-img slow are refused before it runs


@pytest.mark.parametrize(
    ("offset", "value"),
    [
        (60, 65536),  # nb_snapshots: 6.7 s and 350 MiB inside qemu-img info
        (60, MAX_QCOW2_SNAPSHOTS + 1),
        (36, MAX_QCOW2_L1_BYTES // 8 + 1),  # l1_size, in 8-byte entries
        (56, MAX_QCOW2_REFCOUNT_TABLE_BYTES // 65536 + 1),  # refcount_table_clusters of 64 KiB
    ],
)
def test_header_counts_over_bounds_are_refused_before_qemu_img(cli, tmp_path, monkeypatch, offset, value):
    from imagetool import qemu

    def never(*args, **kwargs):
        raise AssertionError("qemu-img ran")

    monkeypatch.setattr(qemu, "run", never)
    image = make_qcow2(tmp_path / "s.qcow2")
    patch(image, offset, struct.pack(">I", value))
    start = time.monotonic()
    result = cli("inspect", image, "--json")
    assert time.monotonic() - start < 1
    assert result.code == 3
    assert reasons(result) == ["header_limits"]
    assert str(value) in result.json["reasons"][0]["message"]


def test_snapshot_count_in_header_is_snapshots(cli, tmp_path):
    image = make_qcow2(tmp_path / "s.qcow2")
    patch(image, 60, struct.pack(">I", 3))
    result = cli("inspect", image, "--json")
    assert result.code == 3
    assert reasons(result) == ["snapshots"]
    assert "qcow2 header lists 3" in result.json["reasons"][0]["message"]


# 7. the oslo.utils seams


def test_changed_oslo_internals_fail_closed(cli, tmp_path, monkeypatch):
    """If oslo renames the stream position detect.py advances, imagetool stops (exit 5) and says why."""
    from oslo_utils.imageutils import format_inspector as fi

    original = fi.FileInspector.__init__

    def renamed(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self._position = self.__dict__.pop("_total_count")

    monkeypatch.setattr(fi.FileInspector, "__init__", renamed)
    result = cli("inspect", sparse_raw(tmp_path / "d.raw", MiB), "--json")
    assert result.code == 5
    assert "changed its inspector internals" in result.json["error"]["message"]
    assert ">=10.2,<11" in result.json["error"]["message"]


def test_oslo_inspectors_have_what_detect_uses():
    from oslo_utils.imageutils import format_inspector as fi

    from imagetool.detect import OsloInspector

    members = [m for m in vars(OsloInspector) if not m.startswith("_")]
    assert {"complete", "format_match", "virtual_size", "eat_chunk", "safety_check"} <= set(members)
    for cls in fi.ALL_FORMATS.values():
        assert all(hasattr(cls, m) for m in members), cls
        assert type(cls().__dict__.get("_total_count")) is int


def test_oslo_imageutils_still_importable_after_detection(tmp_path):
    """imagetool used as a library must leave oslo_utils.imageutils whole for its other users."""
    image = make_qcow2(tmp_path / "a.qcow2", "1M")
    script = (
        "from imagetool.inspection import inspect_image\n"
        f"assert inspect_image({str(image)!r}).format == 'qcow2'\n"
        "from oslo_utils.imageutils import QemuImgInfo\n"
        "print(QemuImgInfo.__name__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "QemuImgInfo"


_OSLO_DETECT = """
import json, sys
from oslo_utils.imageutils import format_inspector
out = {}
for path in sys.argv[1:]:
    try:
        out[path] = str(format_inspector.detect_file_format(path))
    except format_inspector.ImageFormatError as exc:
        out[path] = "error: " + str(exc)
print(json.dumps(out))
"""

# Where imagetool deliberately reads a file differently from oslo: file name -> (oslo, imagetool).
_DIVERGENT = {
    "fixed.vhd": ("raw", "vpc"),  # oslo looks for the VHD footer only at the start
    "notes.img": ("vmdk", "raw"),  # oslo takes createType=" anywhere; qemu's probe wants version= first
}


_PARTITION = struct.pack("<B3sB3sII", 0, b"\0\2\0", 0x83, b"\0\0\0", 2048, 2048)


def _corpus(tmp_path: Path) -> list[Path]:
    images = [
        sparse_raw(tmp_path / "plain.raw", MiB, {0: os.urandom(4096)}),
        sparse_raw(tmp_path / "mbr.raw", 2 * MiB, {446: _PARTITION, 510: b"\x55\xaa"}),
        sparse_raw(tmp_path / "garbage.bin", 64 * 1024, {0: os.urandom(64 * 1024)}),
    ]
    for fmt, opts in [
        ("qcow2", []),
        ("vmdk", ["-o", "subformat=monolithicSparse"]),
        ("vmdk", ["-o", "subformat=streamOptimized"]),
        ("vdi", []),
        ("vpc", []),
        ("vhdx", []),
    ]:
        image = tmp_path / f"{fmt}{len(images)}.img"
        qemu_img("create", "-q", "-f", fmt, *opts, image, "8M")
        images.append(image)
    polyglot = make_qcow2(tmp_path / "poly.img", "1M")
    with polyglot.open("r+b") as f:  # a qcow2 header and an ISO 9660 volume descriptor
        f.truncate(64 * 1024)
        f.seek(32 * 1024)
        f.write(b"\x01CD001")
    fixed = tmp_path / "fixed.vhd"
    qemu_img("create", "-q", "-f", "vpc", "-o", "subformat=fixed", fixed, "8M")
    notes = tmp_path / "notes.img"
    notes.write_bytes(b'createType="monolithicFlat" is what a VMDK descriptor says\n'.ljust(4096, b"\n"))
    return [*images, polyglot, fixed, notes]


def test_verdicts_agree_with_oslo_detect_file_format(cli, tmp_path):
    """A differential test against oslo's own detection, run as oslo users run it (its own process)."""
    images = _corpus(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", _OSLO_DETECT, *map(str, images)], capture_output=True, text=True, check=True
    )
    oslo = {Path(k).name: {"gpt": "raw", "vhd": "vpc"}.get(v, v) for k, v in json.loads(proc.stdout).items()}
    for image in images:
        ours = cli("inspect", image, "--json").json["format"]
        if image.name in _DIVERGENT:
            assert (oslo[image.name], ours) == _DIVERGENT[image.name]
        elif oslo[image.name].startswith("error"):
            assert ours is None, image.name  # oslo's polyglot is ours too
        elif ours is not None:
            assert ours == oslo[image.name], image.name
    assert oslo["poly.img"].startswith("error")


def test_an_l1_table_far_beyond_the_virtual_size_is_refused_before_qemu_img(cli, tmp_path):
    """Within qemu's 32 MiB bound, 4 Mi L1 entries for a 64 MiB disk made `qemu-img check` print
    100 MB and take 20 s; an image grown by qemu-img resize still passes."""
    image = tmp_path / "q.qcow2"
    qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", SAMPLE, image)
    with image.open("r+b") as f:
        f.seek(36)
        f.write(struct.pack(">I", 4 << 20))
    started = time.monotonic()
    result = cli("inspect", image, "--json")
    assert result.code == 3 and [r["code"] for r in result.json["reasons"]] == ["header_limits"]
    assert time.monotonic() - started < 5
    grown = tmp_path / "grown.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", grown, "1M")
    qemu_img("resize", "-q", grown, "2T")
    assert cli("inspect", grown).code == 0


def test_a_uml_cow_header_is_not_raw(cli, tmp_path):
    """libvirt's format probe reads "OOOM" v2 as a User-mode Linux COW file and opens the backing
    file its header names: such a file is not a safe raw disk for every consumer."""
    header = struct.pack(">II", 0x4F4F4F4D, 2) + b"/etc/passwd".ljust(1024, b"\0")
    header += struct.pack(">iiQiI", 0, 0, 1 << 20, 512, 0)
    image = sparse_raw(tmp_path / "cow.raw", 1 << 20, {0: header})
    result = cli("inspect", image, "--json")
    assert result.code == 3
    assert [r["code"] for r in result.json["reasons"]] == ["unsupported_format"]
    assert "User-mode Linux COW" in result.err
