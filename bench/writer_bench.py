#!/usr/bin/env python3
"""How fast is the native qcow2 writer (imagetool/qcow2.py), and how big is what it writes?

Input: bench/work/realistic.raw, 4 GiB virtual with about 1 GiB written in pieces of
64 KiB to 4 MiB at 4 KiB-aligned places: 40% ELF binaries and libraries (real files
from /usr/lib), 25% text (C headers, Python sources), 20% random (already-compressed
files), 15% allocated zeros; built once (same seed, same bytes on the same machine).
Page cache warm. Wall times are hyperfine medians of side-by-side runs; CPU time and
peak RSS come from one more run under GNU time.

Compared: plain `qemu-img convert -c` (256 KiB clusters, the project's today), qemu-img
with its best flags (`-W -m 16`), and the writer (ISA-L deflate level 3, 2 threads,
256 KiB clusters: its defaults), plus the writer's other levels, cluster sizes, zstd and
the qemu-exact zlib encoder (the same bytes per cluster as qemu: isolates our packing).
Targets (issue): writer <= 0.15x plain qemu-img time, <= 0.3x best flags, output
<= 1.03x qemu-img's size, peak RSS < 300 MB.

    writer_bench.py [RUNS]                 the comparison (default 3 runs each)
    writer_bench.py write SRC DST [CLUSTER_SIZE CODEC LEVEL THREADS]   one conversion
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from pathlib import Path

from common import ROOT, WORK, GiB, MiB, hyperfine, need, table

sys.path.insert(0, str(ROOT))

KiB = 1024
VIRTUAL = 4 * GiB
DATA = 1 * GiB
KINDS = {"elf": 40, "text": 25, "random": 20, "zero": 15}  # percent of the data
PYTHON = str(ROOT / ".venv" / "bin" / "python")
SELF = str(Path(__file__).resolve())


def _files(roots: list[Path], keep: re.Pattern[str], limit: int) -> bytes:
    """Real file contents under `roots` (sorted, so the same on every run), up to `limit` bytes."""
    out = bytearray()
    for root in roots:
        for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
            if keep.search(path.name):
                try:
                    head = path.read_bytes()
                except OSError:
                    continue
                if head[:2] != b"\x1f\x8b":  # skip gzip: it is "random" here
                    out += head
            if len(out) >= limit:
                return bytes(out[:limit])
    return bytes(out)


def build_realistic(path: Path, seed: int = 1) -> Path:
    """The benchmark disk (see the module doc); kept between runs since building it takes a while."""
    if path.exists() and path.stat().st_size == VIRTUAL:
        return path
    rng = random.Random(seed)
    elf = _files([Path("/usr/lib/x86_64-linux-gnu"), Path("/usr/lib")], re.compile(r"\.so(\.|$)"), 320 * MiB)
    text = _files(
        [Path("/usr/include"), Path(sys.base_prefix) / "lib"], re.compile(r"\.(h|py|txt)$"), 160 * MiB
    )
    slots = VIRTUAL // (4 * MiB)
    places = sorted(rng.sample(range(slots), slots // 2))
    tmp = path.with_suffix(".tmp")
    written = {kind: 0 for kind in KINDS}
    with tmp.open("wb") as f:
        f.truncate(VIRTUAL)
        for slot in places:
            if sum(written.values()) >= DATA:
                break
            kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
            length = rng.randrange(16, 1025) * 4 * KiB
            start = slot * 4 * MiB + rng.randrange(0, (4 * MiB - length) // (4 * KiB) + 1) * 4 * KiB
            if kind in ("elf", "text"):
                pool = elf if kind == "elf" else text
                at = rng.randrange(0, len(pool) - length) & ~4095
                piece = pool[at : at + length]
            else:
                piece = rng.randbytes(length) if kind == "random" else bytes(length)
            f.seek(start)
            f.write(piece)
            written[kind] += length
    tmp.rename(path)
    print("built", path, ", ".join(f"{k} {v / MiB:.0f} MiB" for k, v in written.items()))
    return path


def write_one(src: str, dst: str, cluster_size: int, codec: str, level: int | None, threads: int) -> None:
    """One conversion, as convert.py will run it: raw data extents -> write_qcow2."""
    from imagetool.estimate import GuestReader, data_clusters
    from imagetool.qcow2 import write_qcow2
    from imagetool.sizes import Extent, data_extents

    fd = os.open(src, os.O_RDONLY)
    size = os.fstat(fd).st_size
    extents = [Extent(s, e - s, s) for s, e in data_extents(fd, size)]
    out = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    write_qcow2(
        GuestReader(fd, extents).read,
        data_clusters(extents, cluster_size),
        size,
        out,
        cluster_size=cluster_size,
        codec=codec,
        level=level,
        threads=threads,
    )
    os.close(out)


def resources(cmd: str) -> tuple[float, float]:
    """(peak RSS in MB, CPU seconds) of one run, from GNU time -v."""
    proc = subprocess.run(["/usr/bin/time", "-v", "sh", "-c", cmd], capture_output=True, text=True)
    field = dict(re.findall(r"^\s*(.+?): (.+)$", proc.stderr, re.MULTILINE))
    cpu = float(field["User time (seconds)"]) + float(field["System time (seconds)"])
    return int(field["Maximum resident set size (kbytes)"]) / 1000, cpu


def verify(src: Path, image: Path) -> str:
    check = subprocess.run(["qemu-img", "check", "-f", "qcow2", str(image)], capture_output=True, text=True)
    compare = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(src), str(image)],
        capture_output=True,
        text=True,
    )
    return "clean, identical" if check.returncode == 0 and compare.returncode == 0 else "BROKEN"


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    need("hyperfine")
    need("qemu-img")
    WORK.mkdir(parents=True, exist_ok=True)
    src = build_realistic(WORK / "realistic.raw")
    os.system(f"cat {src} > /dev/null")
    data = int(subprocess.run(["du", "-B1", str(src)], capture_output=True, text=True).stdout.split()[0])
    out = WORK / "wb"
    qemu = "qemu-img convert -c -f raw -O qcow2"
    commands = {
        "qemu-img plain": f"{qemu} -o cluster_size=256k {src} {out}-plain.qcow2",
        "qemu-img -W -m 16": f"{qemu} -W -m 16 -o cluster_size=256k {src} {out}-best.qcow2",
    }
    variants = {  # cluster size, codec, level, threads
        "writer isal-3 256K": (256 * KiB, "zlib", 3, 2),  # the defaults
        "writer isal-3 256K 1 thread": (256 * KiB, "zlib", 3, 1),
        "writer isal-2 256K": (256 * KiB, "zlib", 2, 2),
        "writer isal-1 256K": (256 * KiB, "zlib", 1, 2),
        "writer isal-3 64K": (64 * KiB, "zlib", 3, 2),
        "writer isal-3 1M": (1 * MiB, "zlib", 3, 2),
        "writer zstd-3 256K": (256 * KiB, "zstd", 3, 2),
        "writer zlib-qemu 256K": (256 * KiB, "zlib-qemu", 6, 2),
    }
    files = {
        "qemu-img plain": out.with_name("wb-plain.qcow2"),
        "qemu-img -W -m 16": out.with_name("wb-best.qcow2"),
    }
    for name, (cs, codec, level, threads) in variants.items():
        files[name] = out.with_name(f"wb-{codec}-{level}-{cs // KiB}k-{threads}.qcow2")
        commands[name] = f"{PYTHON} {SELF} write {src} {files[name]} {cs} {codec} {level} {threads}"
    seconds = hyperfine(commands, runs=runs, warmup=0)
    base, best = seconds["qemu-img plain"], seconds["qemu-img -W -m 16"]
    qemu_size = files["qemu-img plain"].stat().st_size
    rows = [
        ("command", "median", "vs plain", "vs -W -m 16", "size", "vs qemu size", "MB/s", "MB/s/core", "RSS")
    ]
    for name, wall in seconds.items():
        rss, cpu = resources(commands[name])
        size = files[name].stat().st_size
        rows.append(
            (
                name,
                f"{wall:.2f} s",
                f"{wall / base:.3f}x",
                f"{wall / best:.3f}x",
                f"{size / 1e6:.1f} MB",
                f"{size / qemu_size:.3f}x",
                f"{data / 1e6 / wall:.0f}",
                f"{data / 1e6 / cpu:.0f}",
                f"{rss:.0f} MB",
            )
        )
    print(
        f"input: {src.name}, {VIRTUAL / GiB:.0f} GiB virtual, {data / 1e6:.0f} MB allocated; {runs} runs each"
    )
    print(table(rows))
    print("writer isal-3 256K output:", verify(src, files["writer isal-3 256K"]))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "write":
        src, dst, *rest = sys.argv[2:]
        cs, codec, level, threads = (rest + ["262144", "zlib", "3", "2"][len(rest) :])[:4]
        write_one(src, dst, int(cs), codec, int(level), int(threads))
    else:
        main()
