#!/usr/bin/env python3
"""How fast is `imagetool convert`? Wall-time ratios against plain `qemu-img convert -c`.

Input: bench/work/mixed.raw, 8 GiB virtual with 1.5 GiB written in 4 MiB pieces
(text, random, allocated zeros) and holes, generated once, page cache warm.
Measured side by side in one hyperfine run (medians): plain qemu-img with its
defaults; qemu-img with its best flags (-W -m 16, 256 KiB clusters); imagetool's
native writer (the default) with zlib and zstd, verify off and on; imagetool with
--engine qemu; and --estimate-only.
Targets (issue #8): native zlib no-verify <= 0.15x plain qemu-img and <= 0.3x
qemu-img's best flags; verify on <= 0.3x plain; output <= 1.03x qemu-img's size;
peak memory < 300 MB.
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
    best_flags = f"qemu-img convert -W -m 16 -c -o cluster_size=256k -f raw -O qcow2 {src} {out}-best.qcow2"
    commands = {
        "qemu-img convert -c (defaults)": f"qemu-img convert -c -f raw -O qcow2 {src} {out}-plain.qcow2",
        "qemu-img -W -m 16 (best flags)": best_flags,
        "imagetool zlib, no verify": f"{IMAGETOOL} convert {src} -o {out}-a.qcow2 --force --no-verify",
        "imagetool zlib, verify": f"{IMAGETOOL} convert {src} -o {out}-b.qcow2 --force",
        "imagetool zstd, no verify": (
            f"{IMAGETOOL} convert {src} -o {out}-c.qcow2 --force --no-verify --compression zstd"
        ),
        "imagetool --engine qemu, no verify": (
            f"{IMAGETOOL} convert {src} -o {out}-q.qcow2 --force --no-verify --engine qemu"
        ),
        "imagetool --estimate-only": f"{IMAGETOOL} convert {src} --estimate-only",
    }
    t = hyperfine(commands, runs=runs, warmup=0)
    base, best = t["qemu-img convert -c (defaults)"], t["qemu-img -W -m 16 (best flags)"]
    cores = os.cpu_count() or 1
    rows = [("command", "median", "vs plain", "vs best flags", "MB/s of data", "MB/s per core")]
    for name, seconds in t.items():
        per_core = DATA / 1e6 / seconds / (1 if "defaults" in name else cores)
        rows.append(
            (
                name,
                f"{seconds:.2f} s",
                f"{seconds / base:.3f}x",
                f"{seconds / best:.3f}x",
                f"{DATA / 1e6 / seconds:.0f}",
                f"{per_core:.0f}",
            )
        )
    print(table(rows))
    est_share = t["imagetool --estimate-only"] / t["imagetool zlib, no verify"]
    print(
        f"\nan --estimate-only run (start-up + inspection + sampling): {est_share * 100:.1f}% of a zlib run"
    )
    sizes = {p.name: p.stat().st_size for p in sorted(WORK.glob("out-*.qcow2"))}
    print("output sizes:", ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sizes.items()))
    plain = sizes["out-plain.qcow2"]
    print(f"native zlib size vs plain qemu-img: {sizes['out-a.qcow2'] / plain:.4f}x")
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
