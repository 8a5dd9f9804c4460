#!/usr/bin/env python3
"""How fast is `imagetool convert`? Wall-time ratios against plain `qemu-img convert -c`.

Input: bench/work/mixed.raw, 8 GiB virtual with 1.5 GiB written in 4 MiB pieces
(text, random, allocated zeros) and holes, generated once, page cache warm.
Measured side by side in one hyperfine run (medians): plain qemu-img with its
defaults; qemu-img with imagetool's flags (the floor for our overhead); imagetool
with zlib and zstd, verify off and on; and imagetool --estimate-only.
Targets (issue #3): zlib no-verify <= 0.6x, zlib verify <= 0.8x, zstd no-verify
<= 0.2x plain qemu-img; peak memory < 300 MB; our own overhead < 3%.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from common import IMAGETOOL, WORK, GiB, MiB, build_mixed, hyperfine, peak_rss_mb, table

DATA = 1536 * MiB


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    WORK.mkdir(parents=True, exist_ok=True)
    src = build_mixed(WORK / "mixed.raw", 8 * GiB, DATA)
    os.system(f"cat {src} > /dev/null")
    out = WORK / "out"
    same_flags = (
        f"sh -c 'rm -f {out}-q.qcow2; qemu-img create -q -f qcow2 -o cluster_size=256k,"
        f"compression_type=zlib {out}-q.qcow2 8G && qemu-img convert -n --target-is-zero "
        f"-W -m 8 -S 4k -t none -c -f raw -O qcow2 {src} {out}-q.qcow2'"
    )
    commands = {
        "qemu-img convert -c (defaults)": f"qemu-img convert -c -f raw -O qcow2 {src} {out}-plain.qcow2",
        "qemu-img, imagetool's flags": same_flags,
        "imagetool zlib, no verify": f"{IMAGETOOL} convert {src} -o {out}-a.qcow2 --force --no-verify",
        "imagetool zlib, verify": f"{IMAGETOOL} convert {src} -o {out}-b.qcow2 --force",
        "imagetool zstd, no verify": (
            f"{IMAGETOOL} convert {src} -o {out}-c.qcow2 --force --no-verify --compression zstd"
        ),
        "imagetool zstd, verify": f"{IMAGETOOL} convert {src} -o {out}-d.qcow2 --force --compression zstd",
        "imagetool --estimate-only": f"{IMAGETOOL} convert {src} --estimate-only",
    }
    t = hyperfine(commands, runs=runs, warmup=0)
    base = t["qemu-img convert -c (defaults)"]
    rows = [("command", "median", "vs plain qemu-img", "MB/s of data")]
    for name, seconds in t.items():
        rows.append((name, f"{seconds:.2f} s", f"{seconds / base:.2f}x", f"{DATA / 1e6 / seconds:.0f}"))
    print(table(rows))
    overhead = t["imagetool zlib, no verify"] / t["qemu-img, imagetool's flags"] - 1
    est_share = t["imagetool --estimate-only"] / t["imagetool zlib, no verify"]
    print(
        f"\nimagetool overhead over the same qemu-img flags: {overhead * 100:+.1f}% "
        f"(an --estimate-only run, start-up + inspection + sampling: {est_share * 100:.1f}% of a zlib run)"
    )
    sizes = {p.name: p.stat().st_size for p in sorted(WORK.glob("out-*.qcow2"))}
    print("output sizes:", ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sizes.items()))
    for compression, out_name in (("zlib", "out-a.qcow2"), ("zstd", "out-c.qcow2")):
        doc = json.loads(
            subprocess.run(
                [IMAGETOOL, "convert", str(src), "--estimate-only", "--json", "--compression", compression],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )["estimate"]
        real = (WORK / out_name).stat().st_size
        print(
            f"prediction {compression}: {doc['bytes'] / 1e6:.1f} MB (bound {doc['low'] / 1e6:.1f}-"
            f"{doc['high'] / 1e6:.1f}) vs real {real / 1e6:.1f} MB: "
            f"{(doc['bytes'] - real) / real * 100:+.1f}%, "
            f"{'inside' if doc['low'] <= real <= doc['high'] else 'OUTSIDE'} the bound"
        )
    rss = peak_rss_mb([IMAGETOOL, "convert", str(src), "-o", f"{out}-m.qcow2", "--force"])
    print(f"peak RSS (imagetool convert, verify on, largest process): {rss:.0f} MB")


if __name__ == "__main__":
    main()
