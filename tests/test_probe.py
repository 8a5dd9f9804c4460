"""imagetool/probe.py reads files the way qemu 7.2 does: every probe is checked against qemu-img itself.

The builders here write each format's header faithfully (or let qemu-img create it);
tests/test_detect.py reuses them for the CLI-level tests.
"""

from __future__ import annotations

import json
import struct
import subprocess
import time
from pathlib import Path

import pytest
from conftest import make_qcow2, qemu_img, sparse_raw

from imagetool import probe
from imagetool.source import open_source

MiB = 1 << 20
pytestmark = pytest.mark.timeout(60)


def bochs_image(path: Path) -> Path:
    """A Bochs "growing" redolog, as bximage writes one: header, one catalog entry, 1 MiB."""
    header = bytearray(512)
    header[0:23] = b"Bochs Virtual HD Image\0"
    header[32:40] = b"Redolog\0"
    header[48:56] = b"Growing\0"
    struct.pack_into("<II", header, 64, 0x00020000, 512)  # version 2, header size
    struct.pack_into("<IIIIQ", header, 72, 1, 512, 65536, 0, 65536)  # catalog, bitmap, extent, -, disk
    return sparse_raw(path, MiB, {0: bytes(header) + b"\xff\xff\xff\xff"})


def cloop_image(path: Path) -> Path:
    """A cloop V2.0 image with no blocks: its shell preamble, block size and one offset."""
    preamble = b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
    return sparse_raw(path, MiB, {0: preamble, 128: struct.pack(">IIQ", 65536, 0, 144)})


def dmg_image(path: Path, size: int = MiB, koly_at: int | None = None) -> Path:
    """Disk data followed by a UDIF `koly` trailer (signature, version 4, header size 512)."""
    trailer = b"koly" + struct.pack(">II", 4, 512)
    return sparse_raw(path, size, {size - 512 if koly_at is None else koly_at: trailer})


def luks_image(path: Path) -> Path:
    """A LUKS1 header with every key slot disabled (qemu's own create benchmarks PBKDF: slow, flaky)."""
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
    for slot in range(8):
        struct.pack_into(">II32sII", header, 208 + 48 * slot, 0x0000DEAD, 0, bytes(32), 8 + slot * 512, 4000)
    return sparse_raw(path, 4096 * 512, {0: bytes(header)})


def descriptor(path: Path, head: bytes, create_type: str, extent: str) -> Path:
    """A VMDK text descriptor whose first bytes are `head` (comments, say)."""
    body = (
        f'version=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="{create_type}"\n\n'
        f'# Extent description\n{extent}\n\n# The Disk Data Base\nddb.virtualHWVersion = "4"\n'
    )
    path.write_bytes(head + body.encode())
    return path


def vhd_checksum(footer: bytes | bytearray) -> int:
    return ~(sum(footer) - sum(footer[64:68])) & 0xFFFFFFFF


def patch_vhd_footers(path: Path, **fields: object) -> None:
    """Rewrite fields of every footer copy (start and end), with a correct checksum, as a VHD tool would."""
    layout = {
        "creator_app": (28, ">4s"),
        "orig_size": (40, ">Q"),
        "current_size": (48, ">Q"),
        "chs": (56, ">HBB"),
    }
    size = path.stat().st_size
    with path.open("r+b") as f:
        for offset in (0, size - 512):
            f.seek(offset)
            footer = bytearray(f.read(512))
            if not footer.startswith(b"conectix"):
                continue
            for name, value in fields.items():
                at, fmt = layout[name]
                struct.pack_into(fmt, footer, at, *(value if isinstance(value, tuple) else (value,)))
            struct.pack_into(">I", footer, 64, vhd_checksum(footer))
            f.seek(offset)
            f.write(footer)


def evidence(path: Path) -> probe.Evidence:
    with open_source(str(path)) as src:
        return probe.Evidence.read(src)


def claimed(path: Path) -> list[str]:
    return [c.format for c in probe.claims(evidence(path))]


def qemu_probe(path: Path) -> str | None:
    """What qemu-img opens the file as when it probes: a format name, or None when the claiming driver
    then refused the file (raw never refuses, so None still means "not raw")."""
    proc = subprocess.run(["qemu-img", "info", "--output=json", str(path)], capture_output=True, text=True)
    return json.loads(proc.stdout)["format"] if proc.returncode == 0 else None


def _qemu_made(fmt: str, *opts: str):
    def make(path: Path) -> Path:
        qemu_img("create", "-q", "-f", fmt, *opts, path, "8M")
        return path

    return make


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        pytest.param(bochs_image, "bochs", id="bochs"),
        pytest.param(cloop_image, "cloop", id="cloop"),
        *(
            pytest.param(_qemu_made(f), f, id=f)
            for f in ("parallels", "qcow", "qcow2", "qed", "vdi", "vhdx", "vpc")
        ),
        pytest.param(_qemu_made("vmdk"), "vmdk", id="vmdk-sparse"),
        pytest.param(luks_image, "luks", id="luks"),
        pytest.param(lambda p: sparse_raw(p, MiB, {0: b"COWD\1\0\0\0"}), "vmdk", id="vmdk3-cowd"),
        pytest.param(
            lambda p: descriptor(p, b"# \x01\xfe binary\n", "monolithicFlat", 'RW 1 FLAT "x" 0'),
            "vmdk",
            id="vmdk-text-descriptor-with-binary",
        ),
    ],
)
def test_each_probe_claims_what_qemu_opens(tmp_path, make, expected):
    image = make(tmp_path / "image")
    assert claimed(image) == [expected]
    assert qemu_probe(image) in (expected, None)  # None: qemu's `expected` driver took it, then refused it


@pytest.mark.parametrize(
    "make",
    [
        lambda p: sparse_raw(p, MiB, {0: b"an ordinary disk\n", 510: b"\x55\xaa"}),
        lambda p: sparse_raw(p, MiB, {0: b'notes\ncreateType="monolithicFlat"\n'}),
        lambda p: dmg_image(p, koly_at=MiB - 1100),  # before dmg_open's search window
    ],
)
def test_no_probe_claims_what_qemu_opens_as_raw(tmp_path, make):
    image = make(tmp_path / "image")
    assert claimed(image) == []
    assert qemu_probe(image) == "raw"


@pytest.mark.parametrize(
    "text",
    [
        b"version=1\n",
        b"version=3\r\n",
        b"# comment\n# another\nversion=2\n",
        b"   \n  \r\nversion=1\n",
        b"\nversion=1\n",  # a bare blank line ends qemu's probe
        b"version=4\n",
        b" x\nversion=1\n",
        b'createType="monolithicSparse"\nversion=1\n',
        b"# " + b"x" * 3000 + b"\nversion=1\n",  # the version line is past the 2048-byte buffer
    ],
)
def test_vmdk_text_probe_matches_qemu(tmp_path, text):
    image = tmp_path / "d.txt"
    image.write_bytes(text + b'CID=fffffffe\ncreateType="monolithicFlat"\nRW 1 FLAT "absent" 0\n')
    ours = "vmdk" in claimed(image)
    assert ours == (qemu_probe(image) != "raw")


def test_dmg_koly_found_where_qemu_looks_for_it(tmp_path):
    """qemu finds the trailer by content once the file is named .dmg; a padded DMG's trailer is found too."""
    for koly_at in (MiB - 512, MiB - 1000):
        image = dmg_image(tmp_path / "x.img", koly_at=koly_at)
        assert claimed(image) == ["dmg"]
        named = image.rename(tmp_path / "x.dmg")
        assert qemu_probe(named) != "raw"
        assert qemu_probe(named.rename(tmp_path / "x.img")) == "raw"  # qemu's probe itself goes by name


def qemu_size(path: Path, fmt: str) -> int:
    proc = subprocess.run(
        ["qemu-img", "info", "-f", fmt, "--output=json", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(json.loads(proc.stdout)["virtual-size"])


@pytest.mark.parametrize(
    "fields",
    [
        {},  # qemu-img's own: creator "qemu", sized by CHS
        {"creator_app": b"vpc ", "orig_size": 32 * MiB, "current_size": 32 * MiB, "chs": (963, 4, 17)},
        {"creator_app": b"win ", "orig_size": 32 * MiB, "current_size": 32 * MiB, "chs": (963, 4, 17)},
        {"creator_app": b"tap\0", "current_size": 20 * MiB},
        {"creator_app": b"vpc ", "current_size": 16 * MiB, "chs": (65535, 16, 255)},  # maximal CHS
    ],
)
@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_vhd_size_is_qemus(tmp_path, fields, subformat):
    image = tmp_path / "d.vhd"
    qemu_img("create", "-q", "-f", "vpc", "-o", f"subformat={subformat}", image, "32M")
    patch_vhd_footers(image, **fields)
    fixed = probe.fixed_vhd_footer(evidence(image))
    assert (fixed is not None) == (subformat == "fixed")
    footer = fixed or probe.VhdFooter.parse(image.read_bytes()[:512])
    assert footer.checksum_ok
    assert footer.virtual_size == qemu_size(image, "vpc")


def test_qcow2_header_fields(tmp_path):
    image = make_qcow2(tmp_path / "q.qcow2", "64M", "-o", "cluster_size=4096")
    header = probe.Qcow2Header.parse(image.read_bytes()[:2048])
    assert (header.cluster_bits, header.nb_snapshots, header.crypt_method) == (12, 0, 0)
    assert header.header_length == 112  # qemu 7.2 writes the v3 header with compression_type, padded
    assert header.l1_size * (1 << 9) * (1 << 12) >= 64 * MiB  # 512 L2 entries of 4 KiB per L1 entry
    with pytest.raises(ValueError, match="truncated"):
        probe.Qcow2Header.parse(image.read_bytes()[:80])


def test_probing_a_4_tib_sparse_file_reads_only_its_ends(tmp_path):
    image = sparse_raw(tmp_path / "huge.raw", 4 << 40, {(4 << 40) - 512: b"conectix"})
    start = time.monotonic()
    ev = evidence(image)
    assert len(ev.head) == probe.PROBE_BYTES and len(ev.tail) == probe.TAIL_BYTES
    assert probe.claims(ev) == []
    assert time.monotonic() - start < 0.5
