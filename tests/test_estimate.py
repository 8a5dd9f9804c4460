"""Gate 1: the predicted compressed size against real qemu-img output, on varied data."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from conftest import SAMPLE, sparse_raw

from imagetool.convert import CLUSTER_SIZE
from imagetool.estimate import GuestReader, estimate
from imagetool.sizes import Extent, MiB, data_extents

pytestmark = pytest.mark.timeout(120)


def text(rng: random.Random, size: int) -> bytes:
    words = [rng.randbytes(rng.randrange(2, 8)).hex() for _ in range(500)]
    return " ".join(rng.choices(words, k=size // 4)).encode()[:size]


def build(kind: str, path: Path) -> Path:
    rng = random.Random(kind)
    if kind == "fs":
        path.write_bytes(SAMPLE.read_bytes())
        return path
    writes: dict[int, bytes] = {}
    if kind == "text":
        writes = {0: text(rng, 24 * MiB)}
    elif kind == "random":
        writes = {0: rng.randbytes(24 * MiB)}
    elif kind == "zeros":
        writes = {0: bytes(24 * MiB), 30 * MiB: b"x"}
    else:  # a mix in uneven pieces, some straddling clusters
        pos = 0
        while pos < 60 * MiB:
            size = rng.randrange(64 * 1024, 3 * MiB)
            pick = rng.random()
            writes[pos] = (
                text(rng, size) if pick < 0.45 else rng.randbytes(size) if pick < 0.75 else bytes(size)
            )
            pos += size + rng.choice([0, 0, rng.randrange(1, 4 * MiB)])
    return sparse_raw(path, 64 * MiB, writes)


def predicted(path: Path, compression: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        reader = GuestReader(fd, [Extent(s, e - s, s) for s, e in data_extents(fd, size)])
        return estimate(reader, size, CLUSTER_SIZE, compression, seed=size)
    finally:
        os.close(fd)


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
@pytest.mark.parametrize("kind", ["text", "random", "zeros", "mix", "fs"])
def test_estimate_within_10_percent_and_bound_holds(cli, tmp_path, kind, compression):
    src = build(kind, tmp_path / f"{kind}.raw")
    est = predicted(src, compression)
    out = tmp_path / "out.qcow2"
    result = cli("convert", src, "-o", out, "--compression", compression, "--no-verify")
    assert result.code == 0, result.err
    real = out.stat().st_size
    assert est.low <= real <= est.high, (est, real)
    assert abs(est.bytes - real) <= 0.10 * real + CLUSTER_SIZE, (est.bytes, real)


@pytest.mark.parametrize(("compression", "samples"), [("zlib", 512), ("zstd", 256)])
def test_sampling_is_bounded_on_big_inputs(tmp_path, compression, samples):
    src = sparse_raw(tmp_path / "big.raw", 32 << 30, {i * 16 * MiB: b"data" for i in range(1000)})
    est = predicted(src, compression)
    assert est.clusters_with_data == 1000
    assert est.clusters_sampled == samples and est.method == "sample"
