#!/usr/bin/env python3
"""How fast is `imagetool inspect`? Ratios against `cat` and `qemu-img map`, same input, same run.

Images (generated under bench/work, never committed):
- dense-8g.raw: 8 GiB, every byte written (text, random and zero pieces), page cache warm;
- sparse-64g.raw: 64 GiB with nothing written.
Targets (issue #2): inspect <= 2x cat on the dense image; --help < 0.3 s; the sparse image
under 1 s in all; peak memory under 100 MB.
"""

from __future__ import annotations

import os

from common import IMAGETOOL, WORK, GiB, build_mixed, hyperfine, peak_rss_mb, table


def main() -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    dense = build_mixed(WORK / "dense-8g.raw", 8 * GiB, 8 * GiB)
    sparse = WORK / "sparse-64g.raw"
    if not sparse.exists():
        with sparse.open("wb") as f:
            f.truncate(64 * GiB)
    os.system(f"cat {dense} > /dev/null")  # warm the page cache

    t = hyperfine(
        {
            "cat": f"cat {dense}",
            "imagetool inspect": f"{IMAGETOOL} inspect {dense}",
            "qemu-img map": f"qemu-img map -f raw --output=json {dense}",
        },
        runs=7,
    )
    s = hyperfine(
        {
            "imagetool --help": f"{IMAGETOOL} --help",
            "inspect sparse 64 GiB": f"{IMAGETOOL} inspect {sparse}",
        },
        runs=10,
    )
    rss = peak_rss_mb([IMAGETOOL, "inspect", str(dense)])
    rows = [
        ("measure", "median", "ratio"),
        ("cat dense 8 GiB", f"{t['cat']:.3f} s", "1.00"),
        (
            "imagetool inspect dense 8 GiB",
            f"{t['imagetool inspect']:.3f} s",
            f"{t['imagetool inspect'] / t['cat']:.2f}x cat",
        ),
        (
            "qemu-img map dense 8 GiB",
            f"{t['qemu-img map']:.3f} s",
            f"{t['qemu-img map'] / t['cat']:.2f}x cat",
        ),
        ("imagetool --help", f"{s['imagetool --help']:.3f} s", "target < 0.3 s"),
        ("inspect sparse 64 GiB", f"{s['inspect sparse 64 GiB']:.3f} s", "target < 1 s"),
        ("peak RSS inspect dense", f"{rss:.0f} MB", "target < 100 MB"),
    ]
    print(table(rows))


if __name__ == "__main__":
    main()
