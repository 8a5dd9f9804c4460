#!/usr/bin/env python3
"""What does the exact disk_size cost on fragmented images? Ratios against `cat`, same input, same run.

Images (generated under bench/work, never committed; sparse where they can be):
- ds-frag-4g.raw: 4 GiB sparse, 4 KiB of random data every 32 KiB (131,072 data extents);
- ds-crafted.qcow2: 36 KiB qcow2 whose map has 1,048,576 ranges, all of one data cluster
  (tests/test_fragmented.py writes it), `qemu-img check` clean; ds-crafted-N.qcow2, the same
  with just under MAX_MAP_EXTENTS ranges: accepted, it shows what the bound lets through;
- ds-dense-8g.raw: 8 GiB, every byte written, in pieces of 4 KiB to 2 MiB (not block aligned)
  of text, random bytes and written zeros (SEEK_DATA reports them as data: they must be read).
Targets (hardening issue): the fragmented raw inspected in < 2 s; the crafted qcow2 refused
(too_fragmented) in < 5 s and < 200 MB peak RSS; the dense raw <= 2x `cat`.

`--gaps` measures instead what sizes.GAP trades: per range, one read each against one read
for ranges GAP apart, for raw holes and for mapped ranges over data, at several spacings.
`--imagetool "CMD"` times another imagetool (e.g. an older tree: "env PYTHONPATH=DIR python -m
imagetool") on the same images.
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from common import IMAGETOOL, ROOT, WORK, GiB, MiB, hyperfine, need, peak_rss_mb, realistic_chunk, table

sys.path.insert(0, str(ROOT))
from imagetool.policy import MAX_MAP_EXTENTS

KiB = 1 << 10


def build_fragmented(path: Path, size: int, every: int, seed: int = 3) -> Path:
    """`size` bytes, sparse, with 4 KiB of random data at the start of every `every` bytes."""
    if path.exists() and path.stat().st_size == size:
        return path
    rng = random.Random(seed)
    pool = rng.randbytes(MiB)
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        f.truncate(size)
        for n, offset in enumerate(range(0, size, every)):
            start = n * 4 * KiB % (MiB - 4 * KiB)
            os.pwrite(f.fileno(), pool[start : start + 4 * KiB], offset)
    tmp.rename(path)
    return path


def build_crafted(path: Path, l1_entries: int = 2048) -> Path:
    """The crafted qcow2 (4 KiB clusters): l1_entries x 512 map ranges in a file of ~36 KiB."""
    if not path.exists():
        sys.path.insert(0, str(ROOT / "tests"))
        from test_fragmented import crafted_qcow2  # type: ignore[import-not-found]  # the test's builder

        crafted_qcow2(path, 12, l1_entries)
    return path


def build_dense(path: Path, size: int, seed: int = 2) -> Path:
    """Every byte written, pieces of 4 KiB-2 MiB (log-uniform, 512-byte multiples): text 5, random 3,
    zeros 2. Zero pieces are written, so they are allocated data to SEEK_DATA."""
    if path.exists() and path.stat().st_size == size:
        return path
    rng = random.Random(seed)
    pools = {kind: realistic_chunk(rng, kind, 8 * MiB) for kind in ("text", "random", "zero")}
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        pos = 0
        while pos < size:
            length = min(size - pos, int(2 ** rng.uniform(12, 21)) // 512 * 512)
            kind = rng.choices(["text", "random", "zero"], weights=[5, 3, 2])[0]
            start = rng.randrange(8 * MiB - length + 1)
            f.write(pools[kind][start : start + length])
            pos += length
    tmp.rename(path)
    return path


def cat_warm(path: Path) -> None:
    with path.open("rb") as f:
        while f.read(8 * MiB):
            pass


def gaps() -> None:
    """Per-range cost of one read each against one read spanning ranges `gap` apart."""
    from imagetool import sizes

    def timed(fn: Callable[[], object], runs: int = 5) -> float:
        results = []
        for _ in range(runs):
            began = time.perf_counter()
            fn()
            results.append(time.perf_counter() - began)
        return statistics.median(results)

    rows: list[tuple[str, ...]] = [("layout", "spacing", "one read each", "shared reads", "shared / each")]
    dense = WORK / "ds-random-1g.raw"
    if not dense.exists():
        rng = random.Random(4)
        with dense.open("wb") as f:
            for _ in range(GiB // (64 * MiB)):
                f.write(rng.randbytes(64 * MiB))
    cat_warm(dense)
    for spacing in (8, 12, 16, 24, 32):
        gap = (spacing - 4) * KiB
        raw = build_fragmented(WORK / f"ds-every{spacing}k.raw", 512 * MiB, spacing * KiB)
        cat_warm(raw)  # holes read once are cached zero pages: the warm case, as hyperfine sees it
        for layout, path in (("raw, holes between", raw), ("mapped, data between", dense)):
            fd = os.open(path, os.O_RDONLY)
            size = os.fstat(fd).st_size
            ranges = [(offset, 4 * KiB) for offset in range(0, min(size, 512 * MiB), spacing * KiB)]
            work: Callable[[], object]
            if layout.startswith("raw"):
                work = functools.partial(sizes.count_nonzero_bytes, fd, size)
            else:
                work = functools.partial(sizes.count_nonzero_ranges, fd, ranges)
            each = shared = 0.0
            for _ in range(3):  # interleaved, against the noise of a shared machine
                sizes.GAP = 0
                each += timed(work)
                sizes.GAP = gap
                shared += timed(work)
            os.close(fd)
            rows.append(
                (
                    layout,
                    f"4 KiB every {spacing} KiB",
                    f"{each / 3 / len(ranges) * 1e6:.2f} us",
                    f"{shared / 3 / len(ranges) * 1e6:.2f} us",
                    f"{shared / each:.2f}",
                )
            )
            print(" | ".join(rows[-1]), flush=True)
    print(table(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gaps", action="store_true", help="measure the read-sharing threshold instead")
    parser.add_argument("--imagetool", default=IMAGETOOL, help="the imagetool command to time")
    parser.add_argument("--runs", type=int, default=5)
    options = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    if options.gaps:
        gaps()
        return
    need("hyperfine")
    tool = options.imagetool
    frag = build_fragmented(WORK / "ds-frag-4g.raw", 4 * GiB, 32 * KiB)
    crafted = build_crafted(WORK / "ds-crafted.qcow2")
    under = build_crafted(WORK / f"ds-crafted-{MAX_MAP_EXTENTS // 512}.qcow2", MAX_MAP_EXTENTS // 512)
    dense = build_dense(WORK / "ds-dense-8g.raw", 8 * GiB)
    for image in (frag, dense):
        cat_warm(image)

    dense_t = hyperfine(
        {"cat dense": f"cat {dense}", "inspect dense": f"{tool} inspect {dense}"}, runs=options.runs
    )
    frag_t = hyperfine(
        {"cat frag": f"cat {frag}", "inspect frag": f"{tool} inspect {frag}"}, runs=options.runs
    )
    crafted_t = hyperfine(
        {"inspect crafted": f"{tool} inspect {crafted}"}, runs=options.runs, ignore_failure=True
    )
    under_t = hyperfine({"inspect under": f"{tool} inspect {under}"}, runs=3)
    verdict = subprocess.run([*shlex.split(tool), "inspect", str(crafted)], capture_output=True, text=True)
    rss = {name: peak_rss_mb([*shlex.split(tool), "inspect", str(path)]) for name, path in
           (("dense", dense), ("frag", frag), ("crafted", crafted), ("under", under))}  # fmt: skip
    rows: list[tuple[str, ...]] = [
        ("measure", "median", "ratio / target", "peak RSS"),
        ("cat dense 8 GiB", f"{dense_t['cat dense']:.3f} s", "1.00", ""),
        (
            "imagetool inspect dense 8 GiB",
            f"{dense_t['inspect dense']:.3f} s",
            f"{dense_t['inspect dense'] / dense_t['cat dense']:.2f}x cat (target <= 2x)",
            f"{rss['dense']:.0f} MB",
        ),
        ("cat fragmented 4 GiB", f"{frag_t['cat frag']:.3f} s", "1.00", ""),
        (
            "imagetool inspect fragmented 4 GiB",
            f"{frag_t['inspect frag']:.3f} s",
            f"{frag_t['inspect frag'] / frag_t['cat frag']:.2f}x cat (target < 2 s)",
            f"{rss['frag']:.0f} MB",
        ),
        (
            "imagetool inspect crafted 36 KiB qcow2",
            f"{crafted_t['inspect crafted']:.3f} s",
            f"exit {verdict.returncode} (target: exit 3 < 5 s, < 200 MB)",
            f"{rss['crafted']:.0f} MB",
        ),
        (
            f"imagetool inspect crafted, {MAX_MAP_EXTENTS // 512 * 512:,} ranges",
            f"{under_t['inspect under']:.3f} s",
            "accepted: the cost at the bound",
            f"{rss['under']:.0f} MB",
        ),
    ]
    print(table(rows))


if __name__ == "__main__":
    main()
