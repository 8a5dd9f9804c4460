"""One test per threat in docs/unsafe-images.md that inspect defends against.

Each image is made on the fly; each test asserts the verdict, the reason code, the
exit code, that nothing hangs (FIFO tripwires) and that host bytes never leak.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from conftest import (
    assert_no_leak,
    canary,
    make_qcow2,
    patch,
    qemu_img,
    set_qcow2_incompatible_bits,
    sparse_raw,
)

MiB = 1 << 20
pytestmark = pytest.mark.timeout(30)


def reasons(result) -> list[str]:
    return [r["code"] for r in result.json["reasons"]]


def test_raw_claim_on_qcow2_content_is_format_mismatch(cli, tmp_path):
    """#1/#7: a guest-written qcow2 header inside a 'raw' image is not probed."""
    image = make_qcow2(tmp_path / "disk.img")
    result = cli("inspect", image, "--format", "raw", "--json")
    assert result.code == 3
    assert reasons(result) == ["format_mismatch"]
    assert "claimed format raw but the content is qcow2" in result.err


def test_qcow2_claim_on_raw_content_is_format_mismatch(cli, tmp_path):
    image = sparse_raw(tmp_path / "disk.qcow2", MiB)
    result = cli("inspect", image, "--format", "qcow2", "--json")
    assert result.code == 3 and reasons(result) == ["format_mismatch"]


def test_vhd_alias_matches_vpc(cli, tmp_path):
    image = tmp_path / "d.vhd"
    qemu_img("create", "-q", "-f", "vpc", image, "8M")
    assert cli("inspect", image, "--format", "vhd").code == 0


def test_backing_file_is_rejected_and_never_read(cli, tmp_path):
    """#2: a backing file would copy host bytes into the output."""
    host = canary(tmp_path)
    image = make_qcow2(tmp_path / "b.qcow2", "1M", "-b", str(host), "-F", "raw")
    result = cli("inspect", image, "--json")
    assert result.code == 3
    assert reasons(result) == ["backing_file"]
    assert_no_leak(tmp_path, result.out, result.err)


def test_backing_file_fifo_tripwire_does_not_hang(cli, tmp_path):
    image = make_qcow2(tmp_path / "b.qcow2", "1M", "-b", str(tmp_path / "trip"), "-F", "raw", "-u")
    os.mkfifo(tmp_path / "trip")
    result = cli("inspect", image, "--json")
    assert result.code == 3 and reasons(result) == ["backing_file"]


def test_external_data_file_is_rejected(cli, tmp_path):
    """#3 (CVE-2024-32498): the data-file bit and the DATA header extension."""
    data = tmp_path / "data.bin"
    image = make_qcow2(tmp_path / "d.qcow2", "1M", "-o", f"data_file={data}")
    data.unlink()
    os.mkfifo(data)  # a tripwire: opening it would hang
    result = cli("inspect", image, "--json")
    assert result.code == 3
    assert "data_file" in reasons(result)


def test_data_extension_without_feature_bit_is_rejected(cli, tmp_path):
    data = tmp_path / "data.bin"
    image = make_qcow2(tmp_path / "d.qcow2", "1M", "-o", f"data_file={data}")
    with image.open("r+b") as f:  # clear the incompatible data-file bit, keep the extension
        f.seek(72)
        (bits,) = struct.unpack(">Q", f.read(8))
        f.seek(72)
        f.write(struct.pack(">Q", bits & ~0x4))
    result = cli("inspect", image, "--json")
    assert result.code == 3
    assert reasons(result) == ["data_file"]
    assert "external data file" in result.json["reasons"][0]["message"]


def _descriptor_vmdk(tmp_path: Path, create_type: str, extent: str) -> Path:
    path = tmp_path / "desc.vmdk"
    path.write_text(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
        f'createType="{create_type}"\n\n# Extent description\n{extent}\n\n'
        '# The Disk Data Base\nddb.virtualHWVersion = "4"\n'
    )
    return path


def test_vmdk_flat_descriptor_pointing_at_host_file_is_unsupported(cli, tmp_path):
    """#5 (CVE-2022-47951): a text descriptor whose extent is a host file."""
    host = canary(tmp_path)
    image = _descriptor_vmdk(tmp_path, "monolithicFlat", f'RW 128 FLAT "{host}" 0')
    result = cli("inspect", image, "--json")
    assert result.code == 3
    assert reasons(result) == ["unsupported_format"]
    assert "monolithicflat" in result.json["reasons"][0]["message"]
    assert_no_leak(tmp_path, result.out, result.err)


def test_vmdk_sparse_with_path_in_extent_is_rejected(cli, tmp_path):
    image = tmp_path / "sparse-disk-with-a-long-name.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=monolithicSparse", image, "8M")
    blob = bytearray(image.read_bytes())
    start = blob.index(b'RW 16384 SPARSE "')
    old = blob[start : blob.index(b"\n", start)]
    new = b'RW 16384 SPARSE "/etc/passwd"'
    assert len(new) <= len(old)
    blob[start : start + len(old)] = new.ljust(len(old), b" ")
    image.write_bytes(bytes(blob))
    result = cli("inspect", image, "--json")
    assert result.code == 3
    assert reasons(result) == ["vmdk_descriptor"]


def test_polyglot_qcow2_inside_iso_is_multiple_formats(cli, tmp_path):
    """#6: a qcow2 header in an ISO 9660 system area."""
    image = make_qcow2(tmp_path / "poly.iso", "1M")
    with image.open("r+b") as f:
        f.truncate(64 * 1024)
        f.seek(32 * 1024)
        pvd = bytearray(2048)
        pvd[0:6] = b"\x01CD001"
        struct.pack_into("<I", pvd, 80, 32)  # volume space size, little-endian half
        struct.pack_into(">I", pvd, 84, 32)
        struct.pack_into("<H", pvd, 128, 2048)
        struct.pack_into(">H", pvd, 130, 2048)
        f.write(bytes(pvd))
    result = cli("inspect", image, "--json")
    assert result.code == 3
    assert reasons(result) == ["multiple_formats"]
    assert "iso" in result.json["reasons"][0]["message"]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda p: set_qcow2_incompatible_bits(p, 1 << 5), "Unknown QCOW2 features"),
        (lambda p: patch(p, 4, struct.pack(">I", 4)), "Unsupported qcow2 version"),
    ],
)
def test_unknown_qcow2_features_and_versions(cli, tmp_path, mutate, message):
    """#8"""
    image = make_qcow2(tmp_path / "f.qcow2")
    mutate(image)
    result = cli("inspect", image, "--json")
    assert result.code == 3
    assert reasons(result) == ["unknown_features"]
    assert message in result.json["reasons"][0]["message"]


def test_extended_l2_is_refused_like_glance(cli, tmp_path):
    image = make_qcow2(tmp_path / "x.qcow2", "1M", "-o", "extended_l2=on")
    result = cli("inspect", image, "--json")
    assert result.code == 3 and reasons(result) == ["unknown_features"]


@pytest.mark.parametrize(("method", "name"), [(1, "AES"), (2, "LUKS")])
def test_encrypted_qcow2_is_rejected(cli, tmp_path, method, name):
    """#9: the header's crypt_method, set as qemu-img would (its LUKS key benchmark is flaky here)."""
    image = make_qcow2(tmp_path / "e.qcow2")
    patch(image, 32, struct.pack(">I", method))
    result = cli("inspect", image, "--json")
    assert result.code == 3
    assert reasons(result) == ["encrypted"]
    assert name in result.json["reasons"][0]["message"]


def test_luks_container_is_unsupported(cli, tmp_path):
    """A LUKS1 header (written here: qemu's own LUKS create benchmarks PBKDF and is flaky under load)."""
    header = bytearray(592)
    struct.pack_into(
        ">6sH32s32s32sII20s32sI40s",
        header,
        0,
        b"LUKS\xba\xbe",
        1,
        b"aes",
        b"xts-plain64",
        b"sha256",
        4096,
        64,
        bytes(20),
        bytes(32),
        1000,
        b"c0ffee00-0000-4000-8000-000000000000",
    )
    for slot in range(8):  # all key slots disabled
        struct.pack_into(">II32sII", header, 208 + 48 * slot, 0x0000DEAD, 0, bytes(32), 8 + slot * 512, 4000)
    image = tmp_path / "l.luks"
    image.write_bytes(bytes(header) + bytes(4096 * 512 - len(header)))
    result = cli("inspect", image, "--json")
    assert result.code == 3 and reasons(result) == ["unsupported_format"]
    assert "LUKS" in result.err


def test_truncated_qcow2_is_corrupt(cli, tmp_path):
    """#10: info and convert succeed on it; only check notices."""
    raw = sparse_raw(tmp_path / "src.raw", 4 * MiB, {0: os.urandom(3 * MiB)})
    image = tmp_path / "t.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, image)
    with image.open("r+b") as f:
        f.truncate(os.path.getsize(image) // 2)
    result = cli("inspect", image, "--json")
    assert result.code == 3
    assert reasons(result) == ["corrupt"]


def test_corrupt_bit_is_rejected(cli, tmp_path):
    image = make_qcow2(tmp_path / "c.qcow2")
    set_qcow2_incompatible_bits(image, 1 << 1)
    result = cli("inspect", image, "--json")
    assert result.code == 3 and "corrupt" in reasons(result)


def test_dirty_image_is_rejected(cli, tmp_path):
    """#18"""
    image = make_qcow2(tmp_path / "d.qcow2", "64M", "-o", "lazy_refcounts=on")
    set_qcow2_incompatible_bits(image, 1 << 0)
    result = cli("inspect", image, "--json")
    assert result.code == 3 and reasons(result) == ["dirty"]


def test_resource_limit_hit_is_a_rejection_not_a_crash(cli, tmp_path, monkeypatch):
    """#11: a qemu-img that runs past its wall-clock limit is stopped and reported."""
    from imagetool import qemu

    image = make_qcow2(tmp_path / "a.qcow2")
    fake = tmp_path / "bin" / "qemu-img"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexec sleep 30\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    monkeypatch.setattr(qemu, "INFO_LIMITS", qemu.Limits(wall_seconds=0.5))
    result = cli("inspect", image, "--json")
    assert result.code == 3
    assert reasons(result) == ["resource_limit"]


def test_memory_limit_kills_qemu_img(cli, tmp_path, monkeypatch):
    from imagetool import qemu

    monkeypatch.setattr(qemu, "INFO_LIMITS", qemu.Limits(address_space=8 << 20))
    image = make_qcow2(tmp_path / "a.qcow2")
    result = cli("inspect", image, "--json")
    assert result.code == 3
    assert reasons(result) == ["resource_limit"]


@pytest.mark.parametrize(
    "make",
    [
        lambda p: make_qcow2(p, "8T"),
        lambda p: sparse_raw(p, 5 << 40),
    ],
)
def test_virtual_size_bomb_is_a_size_limit(cli, tmp_path, make):
    """#12: a tiny file claiming terabytes; exit 4, decided from the header alone."""
    image = make(tmp_path / "bomb.img")
    result = cli("inspect", image, "--json")
    assert result.code == 4
    assert reasons(result) == ["too_large"]
    assert "over the limit" in result.err


def test_max_virtual_size_is_configurable(cli, tmp_path):
    image = make_qcow2(tmp_path / "a.qcow2", "2G")
    assert cli("inspect", image, "--max-virtual-size", "1G").code == 4
    assert cli("inspect", image, "--max-virtual-size", "2G").code == 0


@pytest.mark.parametrize("name", ["nbd:127.0.0.1:9", 'json:{"driver":"file"}', "-f"])
def test_hostile_file_names_are_just_names(cli, tmp_path, monkeypatch, name):
    """#14: qemu-img only ever sees /proc/self/fd/N."""
    monkeypatch.chdir(tmp_path)
    sparse_raw(tmp_path / name, MiB, {0: b"data"})
    result = cli("inspect", "--json", "--", name)
    assert result.code == 0, result.err
    assert result.json["format"] == "raw"


@pytest.mark.parametrize(("fmt", "what"), [("qed", "QED"), ("parallels", "Parallels")])
def test_banned_formats(cli, tmp_path, fmt, what):
    """#16: QED is refused by name; Parallels, which oslo does not know, by qemu's own probe."""
    image = tmp_path / f"x.{fmt}"
    qemu_img("create", "-q", "-f", fmt, image, "8M")
    result = cli("inspect", image, "--json")
    assert result.code == 3 and reasons(result) == ["unsupported_format"]
    assert what in result.err


def test_qcow_v1_is_unsupported(cli, tmp_path):
    image = tmp_path / "old.qcow"
    qemu_img("create", "-q", "-f", "qcow", image, "8M")
    result = cli("inspect", image, "--json")
    assert result.code == 3 and reasons(result) == ["unsupported_format"]
    assert "QCOW version 1" in result.err


def test_iso_is_unsupported(cli, tmp_path):
    image = sparse_raw(tmp_path / "cd.iso", MiB)
    pvd = bytearray(2048)
    pvd[0:6] = b"\x01CD001"
    struct.pack_into("<I", pvd, 80, 512)
    struct.pack_into(">I", pvd, 84, 512)
    struct.pack_into("<H", pvd, 128, 2048)
    struct.pack_into(">H", pvd, 130, 2048)
    patch(image, 32 * 1024, bytes(pvd))
    result = cli("inspect", image, "--json")
    assert result.code == 3 and reasons(result) == ["unsupported_format"]
    assert "ISO 9660" in result.err


def test_internal_snapshots_are_rejected(cli, tmp_path):
    """#17"""
    image = make_qcow2(tmp_path / "s.qcow2")
    qemu_img("snapshot", "-c", "before-upgrade", image)
    result = cli("inspect", image, "--json")
    assert result.code == 3 and reasons(result) == ["snapshots"]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (struct.pack("<B3sB3sII", 0x42, b"\0\2\0", 0x83, b"\0\0\0", 2048, 2048), "boot flag"),
        (bytes(16), "no partitions"),
    ],
)
def test_malformed_mbr_is_rejected(cli, tmp_path, entry, message):
    """#19"""
    image = sparse_raw(tmp_path / "m.raw", MiB, {446: entry, 510: b"\x55\xaa"})
    result = cli("inspect", image, "--json")
    assert result.code == 3 and reasons(result) == ["mbr"]
    assert message in result.json["reasons"][0]["message"]


def test_gpt_with_extra_partitions_is_rejected(cli, tmp_path):
    gpt = struct.pack("<B3sB3sII", 0, b"\0\2\0", 0xEE, b"\xff\xff\xff", 1, 2047)
    extra = struct.pack("<B3sB3sII", 0, b"\0\0\0", 0x83, b"\0\0\0", 2048, 100)
    image = sparse_raw(tmp_path / "g.raw", 2 * MiB, {446: gpt + extra, 510: b"\x55\xaa"})
    result = cli("inspect", image, "--json")
    assert result.code == 3 and reasons(result) == ["mbr"]


def test_valid_gpt_disk_is_raw(cli, tmp_path):
    gpt = struct.pack("<B3sB3sII", 0, b"\0\2\0", 0xEE, b"\xff\xff\xff", 1, 4095)
    image = sparse_raw(tmp_path / "g.raw", 2 * MiB, {446: gpt, 510: b"\x55\xaa"})
    doc = cli("inspect", image, "--json").json
    assert doc["safe"] and doc["format"] == "raw" and doc["partition_table"] == "gpt"


@pytest.mark.parametrize("size", [1000, 512 * 7 + 3])
def test_unaligned_raw_is_rejected(cli, tmp_path, size):
    """#20: qemu rounds a 1000-byte raw up to 1024; we refuse to guess."""
    image = sparse_raw(tmp_path / "u.raw", size, {0: b"x"})
    result = cli("inspect", image, "--json")
    assert result.code == 3 and reasons(result) == ["unaligned"]


def test_unaligned_qcow2_header_size_is_rejected(cli, tmp_path):
    image = make_qcow2(tmp_path / "u.qcow2")
    patch(image, 24, struct.pack(">Q", 1000))
    result = cli("inspect", image, "--json")
    assert result.code == 3 and reasons(result) == ["unaligned"]


def test_zero_virtual_size_is_empty(cli, tmp_path):
    image = make_qcow2(tmp_path / "z.qcow2", "0")
    result = cli("inspect", image, "--json")
    assert result.code == 3 and reasons(result) == ["empty"]


@pytest.mark.parametrize(
    ("data", "advice"),
    [
        (b"\x1f\x8b\x08\x00" + bytes(60), "gunzip"),
        (b"\xfd7zXZ\x00" + bytes(60), "unxz"),
        (b"\x28\xb5\x2f\xfd" + bytes(60), "unzstd"),
    ],
)
def test_compressed_files_get_advice(cli, tmp_path, data, advice):
    image = tmp_path / "disk.img.x"
    image.write_bytes(data + bytes(512 - len(data)))
    result = cli("inspect", image, "--json")
    assert result.code == 3 and reasons(result) == ["unsupported_format"]
    assert advice in result.err


def test_ova_tar_gets_advice(cli, tmp_path):
    import tarfile

    (tmp_path / "vm.ovf").write_text("<Envelope/>")
    ova = tmp_path / "vm.ova"
    with tarfile.open(ova, "w", format=tarfile.USTAR_FORMAT) as tar:
        tar.add(tmp_path / "vm.ovf", arcname="vm.ovf")
    result = cli("inspect", ova, "--json")
    assert result.code == 3 and reasons(result) == ["unsupported_format"]
    assert "tar -xf" in result.err
