"""Size arithmetic and the exact non-zero scan, against independent counts."""

from __future__ import annotations

import os
import random
import tracemalloc
from pathlib import Path

import pytest
from conftest import sparse_raw
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagetool import sizes
from imagetool.errors import UsageProblem
from imagetool.sizes import (
    BLOCK,
    GiB,
    MiB,
    count_nonzero_bytes,
    count_nonzero_ranges,
    count_zero_blocks,
    parse_size,
    to_mib,
)


def naive_nonzero(data: bytes) -> int:
    """The definition, written the slow obvious way."""
    return sum(BLOCK for i in range(0, len(data), BLOCK) if any(data[i : i + BLOCK]))


def scan(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return count_nonzero_bytes(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def test_library_units_are_binary():
    assert parse_size("50G") == parse_size("51200M") == parse_size("53687091200") == 50 * GiB
    assert parse_size("50GiB") == parse_size("50gb") == 50 * GiB
    assert parse_size("4T") == 4096 * GiB
    assert parse_size("1.5G") == 1536 * MiB


@pytest.mark.parametrize("text", ["", "G", "-1G", "5X", "1e9", "lots"])
def test_bad_sizes(text):
    with pytest.raises(UsageProblem):
        parse_size(text)


@given(st.integers(min_value=0, max_value=1 << 50), st.sampled_from(["", "K", "M", "G", "T"]))
def test_parse_size_matches_multiplier(n, unit):
    factor = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[unit]
    if n * factor < 1 << 63:
        assert parse_size(f"{n}{unit}") == n * factor
    else:  # more than a file offset can hold
        with pytest.raises(UsageProblem):
            parse_size(f"{n}{unit}")


@given(st.integers(min_value=0, max_value=1 << 60))
def test_to_mib_rounds_up(n):
    mib = to_mib(n)
    assert mib * MiB >= n > (mib - 1) * MiB or n == mib == 0


@given(st.lists(st.tuples(st.integers(0, 64 * 1024), st.binary(min_size=1, max_size=9000)), max_size=12))
@settings(max_examples=200, deadline=None)
def test_count_zero_blocks_matches_definition(writes):
    buf = bytearray(64 * 1024 + 9000)
    for offset, data in writes:
        buf[offset : offset + len(data)] = data
    length = len(buf) // BLOCK * BLOCK
    expected = sum(1 for i in range(0, length, BLOCK) if not any(buf[i : i + BLOCK]))
    assert count_zero_blocks(bytes(buf), length) == expected


def test_scan_counts_data_not_zeros_or_holes(tmp_path):
    rng = random.Random(7)
    writes = {
        0: b"\x01",  # one byte: a whole 4 KiB block
        BLOCK * 3 + 4000: b"xy" * 100,  # straddles two blocks
        MiB: bytes(3 * MiB),  # allocated zeros: not data
        5 * MiB: rng.randbytes(MiB + 123),
        9 * MiB - 1: b"\xff",
    }
    image = sparse_raw(tmp_path / "mix.raw", 16 * MiB + 1000, writes)  # partial last block
    with image.open("r+b") as f:
        f.seek(16 * MiB + 999)
        f.write(b"!")
    assert scan(image) == naive_nonzero(image.read_bytes())
    assert os.stat(image).st_blocks * 512 > scan(image)  # written zeros are allocated


@given(st.data())
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_scan_matches_definition_on_random_sparse_files(tmp_path, data):
    size = data.draw(st.integers(1, 3 * MiB))
    writes = data.draw(
        st.dictionaries(
            st.integers(0, size - 1),
            st.one_of(st.binary(min_size=1, max_size=20000), st.builds(bytes, st.integers(1, 70000))),
            max_size=8,
        )
    )
    image = sparse_raw(tmp_path / "r.raw", size, writes)
    assert scan(image) == naive_nonzero(image.read_bytes())


def test_big_sparse_file_costs_nothing(tmp_path):
    image = sparse_raw(tmp_path / "big.raw", 64 * GiB, {32 * GiB: b"data"})
    assert scan(image) == BLOCK


def ranges_by_definition(data: bytes, ranges: list[tuple[int, int]]) -> int:
    """Each range on its own, blocks from its start; bytes past the end of the file are zeros."""
    return sum(naive_nonzero(data[offset : offset + length]) for offset, length in ranges)


def count_ranges(path: Path, ranges: list[tuple[int, int]]) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return count_nonzero_ranges(fd, iter(ranges))
    finally:
        os.close(fd)


@given(st.data())
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_ranges_count_each_range_from_its_own_start(tmp_path, data):
    """Mapped ranges: unsorted, overlapping, unaligned, past the end of the file, longer than a read."""
    size = data.draw(st.integers(1, 9 * MiB))
    writes = data.draw(
        st.dictionaries(
            st.integers(0, size - 1),
            st.one_of(st.binary(min_size=1, max_size=9000), st.builds(bytes, st.integers(1, 70000))),
            max_size=10,
        )
    )
    image = sparse_raw(tmp_path / "m.raw", size, writes)
    offsets = st.integers(0, size + BLOCK)
    ranges = data.draw(
        st.lists(
            st.tuples(offsets, st.one_of(st.integers(1, 3 * BLOCK), st.integers(1, 9 * MiB))), max_size=12
        )
    )
    ranges += [ranges[0]] * data.draw(st.integers(0, 3)) if ranges else []  # shared host bytes
    assert count_ranges(image, ranges) == ranges_by_definition(image.read_bytes(), ranges)


@pytest.mark.parametrize("gap", [0, BLOCK, 64 * 1024, 8 * MiB])
def test_gap_changes_the_reads_not_the_count(tmp_path, monkeypatch, gap):
    rng = random.Random(gap)
    writes = {
        rng.randrange(32 * MiB): rng.choice([rng.randbytes(5000), b"\x07", bytes(9000)]) for _ in range(300)
    }
    image = sparse_raw(tmp_path / "g.raw", 32 * MiB + 77, writes)
    ranges = [(rng.randrange(32 * MiB), rng.randrange(1, 3 * BLOCK)) for _ in range(500)]
    ranges.sort()
    expected = naive_nonzero(image.read_bytes()), ranges_by_definition(image.read_bytes(), ranges)
    monkeypatch.setattr(sizes, "GAP", gap)
    assert (scan(image), count_ranges(image, ranges)) == expected


def test_many_ranges_cost_little_memory(tmp_path):
    """Work is queued a few batches at a time: 40,000 ranges never sit in memory at once."""
    image = sparse_raw(tmp_path / "f.raw", 64 * MiB, {i: b"\x01" for i in range(0, 64 * MiB, 32 * 1024)})
    fd = os.open(image, os.O_RDONLY)
    try:
        ranges = ((i % (64 * MiB), 512) for i in range(0, 40_000 * 4096, 4096))  # a generator
        tracemalloc.start()
        try:
            counted = count_nonzero_ranges(fd, ranges)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    finally:
        os.close(fd)
    assert counted == sum(BLOCK for i in range(40_000) if i * 4096 % (32 * 1024) == 0)
    assert peak < 8 * MiB + 2 * sizes._CHUNK  # the two threads' read buffers, and little else
