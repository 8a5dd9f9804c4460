#!/usr/bin/env python3
"""How fast is `imagetool snapshot` on a 3-deep chain? Ratios against `qemu-img convert -c` of its top.

Input: bench/work/chain/: base.raw (4 GiB virtual, 768 MiB of text/random/zeros, from
build_mixed) <- mid.qcow2 (writes 256 MiB over it) <- top.qcow2 (writes 128 MiB more),
made once with qemu-img and qemu-io. Targets (issue #9): flattening costs no more than
`qemu-img convert -c` of the top (<= 0.6x with verify off, like convert), and the chain
walk (every link opened, header-checked and described) takes under 0.1 s.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from common import IMAGETOOL, WORK, GiB, MiB, build_mixed, hyperfine, table


def build_chain() -> tuple[Path, Path]:
    directory = WORK / "chain"
    directory.mkdir(parents=True, exist_ok=True)
    base = build_mixed(directory / "base.raw", 4 * GiB, 768 * MiB, seed=3)
    mid, top = directory / "mid.qcow2", directory / "top.qcow2"
    if not top.exists():
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", str(mid)], check=True
        )
        for i in range(64):  # 256 MiB in 4 MiB pieces over the base
            subprocess.run(
                ["qemu-io", "-f", "qcow2", "-c", f"write -P {i} {i * 48}M 4M", str(mid)],
                check=True,
                capture_output=True,
            )
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", str(top)],
            check=True,
        )
        for i in range(32):
            subprocess.run(
                ["qemu-io", "-f", "qcow2", "-c", f"write -P {100 + i} {i * 96 + 2}M 4M", str(top)],
                check=True,
                capture_output=True,
            )
    return base, top


def chain_walk_seconds(top: Path, runs: int = 20) -> float:
    from imagetool.chain import open_chain

    times = []
    for _ in range(runs):
        started = time.perf_counter()
        with open_chain(str(top), []) as chain:
            chain.description()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    _, top = build_chain()
    os.system(f"cat {WORK / 'chain'}/* > /dev/null")
    out = WORK / "chain-out"
    reg = "-n bench -a x86_64 -u debian --force --progress none"
    commands = {
        "qemu-img convert -c (top)": f"qemu-img convert -c -f qcow2 -O qcow2 {top} {out}-plain.qcow2",
        "imagetool snapshot, no verify": f"{IMAGETOOL} snapshot {top} -o {out}-a.qcow2 {reg} --no-verify",
        "imagetool snapshot, verify": f"{IMAGETOOL} snapshot {top} -o {out}-b.qcow2 {reg}",
    }
    t = hyperfine(commands, runs=runs, warmup=0)
    base = t["qemu-img convert -c (top)"]
    rows = [("command", "median", "vs qemu-img convert -c")]
    rows += [(name, f"{s:.2f} s", f"{s / base:.3f}x") for name, s in t.items()]
    print(table(rows))
    walk = chain_walk_seconds(top) * 1000
    print(f"\nchain walk (3 links opened, checked, described), median of 20: {walk:.1f} ms")


if __name__ == "__main__":
    main()
