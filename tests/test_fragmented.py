"""Fragmented images: a crafted qcow2 whose map has a million lines is refused in seconds, and
honest fragmented images still get their exact disk_size.

The crafted qcow2 is written here byte by byte (qcow2 v3, QEMU docs/interop/qcow2.txt): 4 KiB
clusters (512-byte ones work too, with a bigger L1 for the same count); every L1 entry points
at the same L2 table and every L2 entry at the same data cluster, so 36 KiB claims 4 GiB of
guest data in 1,048,576 separate map ranges. Refcounts hold
the real number of references (and no entry claims OFLAG_COPIED), so `qemu-img check` finds
nothing wrong: only the size of its map gives it away.
"""

from __future__ import annotations

import io
import os
import random
import struct
import subprocess
import time
from pathlib import Path

import pytest
from conftest import qemu_img, sparse_raw

from imagetool import qemu
from imagetool.policy import MAX_MAP_EXTENTS
from imagetool.sizes import BLOCK, MiB

_HEADER = struct.Struct(">4sIQIIQIIQQIIQQQQII")  # the 104-byte qcow2 v3 header
_REFCOUNT = {4: ">H", 5: ">I", 6: ">Q"}  # refcount_order -> one big-endian entry


def crafted_qcow2(path: Path, cluster_bits: int = 12, l1_entries: int = 2048) -> int:
    """Write the crafted qcow2 to `path`; return how many data ranges `qemu-img map` lists.

    Clusters, in order: header, L1 table, the one L2 table, the one data cluster, refcount
    table, refcount blocks. Refcounts are 32-bit (refcount_order 5): the data cluster has
    l1_entries x (cluster_size / 8) references, more than a 16-bit refcount holds.
    """
    cluster = 1 << cluster_bits
    per_l2 = cluster // 8
    refcount_order = 5
    per_block = cluster * 8 >> refcount_order  # refcounts in one refcount block
    l1_clusters = -(-l1_entries * 8 // cluster)
    l1, l2 = cluster, cluster * (1 + l1_clusters)
    data, table = l2 + cluster, l2 + 2 * cluster
    used = table // cluster + 1  # clusters before the refcount blocks
    blocks = 1
    while -(-(used + blocks) // per_block) > blocks:
        blocks += 1
    total = used + blocks
    assert blocks * 8 <= cluster, "one refcount table cluster is enough"
    refcounts = [1] * total
    refcounts[l2 // cluster] = l1_entries
    refcounts[data // cluster] = l1_entries * per_l2
    image = bytearray(total * cluster)
    virtual_size = l1_entries * per_l2 * cluster
    image[: _HEADER.size] = _HEADER.pack(
        b"QFI\xfb", 3, 0, 0, cluster_bits, virtual_size, 0, l1_entries, l1, table, 1, 0, 0, 0, 0, 0,
        refcount_order, _HEADER.size,
    )  # fmt: skip
    image[l1 : l1 + 8 * l1_entries] = struct.pack(">Q", l2) * l1_entries  # no OFLAG_COPIED: shared
    image[l2 : l2 + cluster] = struct.pack(">Q", data) * per_l2
    image[data : data + cluster] = b"\xa5" * cluster
    first_block = table + cluster
    for i in range(blocks):
        image[table + 8 * i : table + 8 * i + 8] = struct.pack(">Q", first_block + i * cluster)
    width = 1 << refcount_order >> 3
    for i, refcount in enumerate(refcounts):
        image[first_block + i * width : first_block + (i + 1) * width] = struct.pack(
            _REFCOUNT[refcount_order], refcount
        )
    path.write_bytes(image)
    return l1_entries * per_l2


def nonzero_blocks(data: bytes) -> int:
    """The definition, independently: 4 KiB blocks (from offset 0) holding any non-zero byte."""
    zero = bytes(BLOCK)
    return sum(BLOCK for i in range(0, len(data), BLOCK) if data[i : i + BLOCK] != zero[: len(data) - i])


def test_crafted_qcow2_is_clean_and_refused_quickly(cli, tmp_path):
    image = tmp_path / "crafted.qcow2"
    ranges = crafted_qcow2(image)
    assert image.stat().st_size == 36 * 1024
    assert ranges > MAX_MAP_EXTENTS
    check = subprocess.run(["qemu-img", "check", "-f", "qcow2", str(image)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr  # consistent: only its size is wrong
    assert "No errors were found" in check.stdout

    began = time.monotonic()
    result = cli("inspect", image, "--json")
    took = time.monotonic() - began
    assert result.code == 3, result.err
    report = result.json
    assert [r["code"] for r in report["reasons"]] == ["too_fragmented"]
    assert report["safe"] is False
    assert report["disk_size"] is None
    assert took < 10, f"refusing took {took:.1f} s"  # a hang guard: the bench measures the real cost


def test_crafted_qcow2_under_the_bound_is_inspected(cli, tmp_path):
    """A smaller crafted map is accepted, and its shared data cluster counted once per range."""
    image = tmp_path / "small-crafted.qcow2"
    ranges = crafted_qcow2(image, cluster_bits=12, l1_entries=16)  # 8,192 ranges of one cluster
    result = cli("inspect", image, "--json")
    assert result.code == 0, result.err
    assert result.json["disk_size"] == ranges * 4096
    assert result.json["disk_size_exact"] is True


def test_honest_fragmented_raw_gets_the_exact_disk_size(cli, tmp_path):
    """64 MiB, 4 KiB every 32 KiB: random data, some written zeros, some single bytes."""
    rng = random.Random(5)
    writes = {}
    for offset in range(0, 64 * MiB, 32 * 1024):
        kind = rng.choice(["random", "random", "zeros", "byte"])
        if kind == "random":
            writes[offset] = rng.randbytes(BLOCK)
        elif kind == "zeros":
            writes[offset] = bytes(BLOCK)  # allocated, but not data
        else:
            writes[offset + rng.randrange(BLOCK)] = b"\x01"
    image = sparse_raw(tmp_path / "fragmented.raw", 64 * MiB, writes)
    expected = nonzero_blocks(image.read_bytes())
    assert expected == BLOCK * sum(1 for data in writes.values() if any(data))
    result = cli("inspect", image, "--json")
    assert result.code == 0, result.err
    assert result.json["disk_size"] == expected
    assert result.json["disk_size_exact"] is True
    assert result.json["allocated_size"] > expected  # the written zeros are allocated


def test_honest_fragmented_qcow2_gets_the_exact_disk_size(cli, tmp_path):
    """Clusters written in random order: every guest cluster is its own map range, host order
    shuffled (no two ranges share a read unless near in the file), some hold written zeros."""
    image = tmp_path / "fragmented.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", image, "16M")
    rng = random.Random(9)
    slots = rng.sample(range(4096), 1500)
    commands = []
    for slot in slots:
        pattern = rng.choice([0, 0x5A, 0xC3])  # 0: written zeros, stored as data
        commands += ["-c", f"write -q -P {pattern} {slot * 4096} 4k"]
    subprocess.run(
        ["qemu-io", "-t", "unsafe", "-f", "qcow2", *commands, str(image)], check=True, capture_output=True
    )
    raw = tmp_path / "fragmented.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", image, raw)
    expected = nonzero_blocks(raw.read_bytes())
    result = cli("inspect", image, "--json")
    assert result.code == 0, result.err
    assert result.json["disk_size"] == expected
    assert result.json["disk_size_exact"] is True


def entries(text: bytes, max_lines: int = 100) -> list[tuple[int, int, int, int]]:
    return list(qemu._map_entries(io.BytesIO(text), max_lines))


LINES = (
    b'[{ "start": 0, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, '
    b'"offset": 327680},\n'
    b'{ "start": 65536, "length": 4096, "depth": 0, "present": true, "zero": true, "data": false},\n'
    b'{ "start": 69632, "length": 4096, "depth": 0, "present": true, "zero": false, "data": true, '
    b'"compressed": true, "offset": 9},\n'
    b'{ "start": 73728, "length": 8192, "depth": 0, "present": true, "zero": false, "data": true, '
    b'"compressed": false, "offset": 4096},\n'
    b'{ "start": 81920, "length": 4096, "depth": 2, "present": true, "zero": false, "data": true, '
    b'"offset": 0}]\n'
)


def test_map_lines_are_parsed_strictly():
    assert entries(LINES) == [
        (0, 65536, 327680, 0),
        (69632, 4096, -1, 0),
        (73728, 8192, 4096, 0),
        (81920, 4096, 0, 2),  # from the second backing file of a chain
    ]
    assert entries(LINES.rstrip(b"\n")) == entries(LINES)  # no final newline
    # another layout (key order, spacing) goes through JSON, with the same result
    other = b'[{"data": true, "zero": false, "length": 512, "start": 0, "offset": 1024}]\n'
    assert entries(other) == [(0, 512, 1024, 0)]


@pytest.mark.parametrize(
    "line",
    [
        b"qemu-img: something went wrong\n",
        b'{ "start": -1, "length": 512, "zero": false, "data": true}\n',
        b'{ "start": 0, "length": true, "zero": false, "data": true}\n',
        b'{ "start": 0, "length": 99999999999999999999999, "zero": false, "data": true}\n',
        b"[" * 5000 + b"\n",
        b'{ "start": 0, "length": 512' + b" " * 200_000,  # no line end in sight: not buffered forever
        b"\xff\xfe\n",
    ],
)
def test_a_malformed_map_line_fails_cleanly(line):
    with pytest.raises(qemu.QemuFailed):
        entries(LINES + line)


def test_the_bound_counts_every_line():
    hole = b'{ "start": 0, "length": 512, "depth": 0, "present": false, "zero": true, "data": false},\n'
    assert entries(hole * 10, max_lines=10) == []
    with pytest.raises(qemu.TooFragmented) as raised:
        entries(hole * 11, max_lines=10)
    assert raised.value.reasons[0].code == "too_fragmented"


def test_map_extents_is_stopped_past_the_bound(tmp_path):
    image = tmp_path / "crafted.qcow2"
    crafted_qcow2(image, cluster_bits=12, l1_entries=64)  # 32,768 ranges
    fd = os.open(image, os.O_RDONLY)
    try:
        path = f"/proc/self/fd/{fd}"
        assert len(qemu.map_extents(path, "qcow2", (fd,), max_extents=40_000)) == 32_768
        with pytest.raises(qemu.TooFragmented):
            qemu.map_extents(path, "qcow2", (fd,), max_extents=1000)
    finally:
        os.close(fd)


def test_small_clusters_make_a_big_l1_and_a_clean_image_too(tmp_path):
    """512-byte clusters: 64 map ranges per L1 entry, so the same count needs an L1 of 128 KiB."""
    image = tmp_path / "crafted-512.qcow2"
    ranges = crafted_qcow2(image, cluster_bits=9, l1_entries=16384)
    assert ranges == 1_048_576
    qemu_img("check", "-f", "qcow2", image)
    fd = os.open(image, os.O_RDONLY)
    try:
        began = time.monotonic()
        with pytest.raises(qemu.TooFragmented):
            qemu.map_extents(f"/proc/self/fd/{fd}", "qcow2", (fd,), max_extents=10_000)
        assert time.monotonic() - began < 10  # stopped early, not after a million lines
    finally:
        os.close(fd)


def test_map_extents_reports_qemu_img_failing(tmp_path):
    image = sparse_raw(tmp_path / "not.qcow2", 1 << 20, {0: b"not a qcow2 header"})
    fd = os.open(image, os.O_RDONLY)
    try:
        with pytest.raises(qemu.QemuFailed, match="qemu-img map failed"):
            qemu.map_extents(f"/proc/self/fd/{fd}", "qcow2", (fd,))
    finally:
        os.close(fd)
