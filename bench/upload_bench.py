#!/usr/bin/env python3
"""How fast is `imagetool upload`? Ratios against python-swiftclient's `swift upload`.

Both send the same ~2 GiB qcow2 over loopback to a real local Swift (tests/swift/swiftctl,
started here and stopped at the end), as a Static Large Object with the same segment size
and the same number of parallel segments: 1 GiB x 4 threads, then 256 MiB x 4 threads.
imagetool's time includes everything its upload always does (the preflight checks first,
the HEAD of the result, the temp URL and the metadata written); `swift upload` checks each
segment's md5 against Swift's ETag too. Every timed run starts from an empty container and
a pristine IMAGE.json (hyperfine --prepare), so neither tool can resume or skip anything.

Input: bench/work/up-2g.qcow2 (+ .json), from `imagetool prepare` of a 3 GiB sparse raw
holding 2 GiB of random (incompressible) bytes; built once and kept, the raw deleted.
Targets (issue): imagetool upload <= 1.0x the time of `swift upload`; peak RSS < 200 MB.
MB/s is 10^6 bytes of image per second of wall time. Results: bench/work/upload-bench.json.

Run: cd bench && ../.venv/bin/python upload_bench.py [RUNS]  (default 5)
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

from common import IMAGETOOL, ROOT, WORK, GiB, MiB, hyperfine, need, peak_rss_mb, table

sys.path.insert(0, str(ROOT / "tests" / "swift"))
import cluster as swift_cluster  # stdlib-only helper around tests/swift/swiftctl

SWIFT = str(ROOT / ".venv" / "bin" / "swift")
IMAGE = WORK / "up-2g.qcow2"
META = IMAGE.with_name(IMAGE.name + ".json")
PRISTINE = IMAGE.with_name(IMAGE.name + ".pristine.json")  # the document before any upload
CONTAINER = "bench-upload"
CONFIGS = [("1G", 4), ("256M", 4)]  # (segment size, threads)
TARGET_RATIO = 1.0
TARGET_RSS_MB = 200


def build_image(seed: int = 7) -> Path:
    """The qcow2 and its metadata document; kept between runs, rebuilt if either is missing."""
    if IMAGE.exists() and META.exists() and PRISTINE.exists():
        return IMAGE
    raw = WORK / "up-2g.raw"
    rng = random.Random(seed)
    with raw.open("wb") as f:
        f.truncate(3 * GiB)
        for _ in range(2 * GiB // (4 * MiB)):
            f.write(rng.randbytes(4 * MiB))
    print("imagetool prepare of 2 GiB of random data (a minute or so)...", flush=True)
    subprocess.run(
        [
            *(IMAGETOOL, "prepare", str(raw), "-o", str(IMAGE), "--name", "bench", "--arch", "x86_64"),
            *("--username", "debian", "--no-from-guest", "--force", "--progress", "none"),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    raw.unlink()
    shutil.copyfile(META, PRISTINE)
    return IMAGE


def reset() -> None:
    """Before each timed run: the document as prepare wrote it, and no objects in Swift."""
    shutil.copyfile(PRISTINE, META)
    for container in (CONTAINER, f"{CONTAINER}_segments"):
        subprocess.run([SWIFT, "delete", container], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def commands(segment: str, threads: int) -> dict[str, list[str]]:
    seg_bytes = {"1G": GiB, "256M": 256 * MiB}[segment]
    return {
        "swift upload": [
            *(SWIFT, "upload", "--segment-size", str(seg_bytes), "--segment-threads", str(threads)),
            *("--use-slo", "--object-name", IMAGE.name, CONTAINER, str(IMAGE)),
        ],
        "imagetool upload": [
            *(IMAGETOOL, "upload", str(IMAGE), "-c", CONTAINER, "--segment-size", segment),
            *("--threads", str(threads), "--set-temp-url-key", "--progress", "none", "--json"),
        ],
    }


def main() -> None:
    if sys.argv[1:2] == ["--reset"]:  # hyperfine --prepare calls back here
        reset()
        return
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    need("hyperfine")
    WORK.mkdir(parents=True, exist_ok=True)
    image = build_image()
    size = image.stat().st_size
    os.system(f"cat {image} > /dev/null")  # both tools read it from the page cache
    swift_cluster.swift_deps()
    cluster = swift_cluster.start(WORK / "swift", max_file_size=5 * GiB)
    results: list[dict[str, str | int | float]] = []
    try:
        os.environ.update(cluster.env())
        prepare = f"{sys.executable} {Path(__file__).resolve()} --reset"
        for segment, threads in CONFIGS:
            cmds = commands(segment, threads)
            medians = hyperfine({n: " ".join(c) for n, c in cmds.items()}, runs=runs, prepare=prepare)
            for name, cmd in cmds.items():
                reset()
                results.append(
                    {
                        "segment_size": segment,
                        "threads": threads,
                        "command": name,
                        "median_s": medians[name],
                        "mb_per_s": size / 1e6 / medians[name],
                        "ratio_vs_swift": medians[name] / medians["swift upload"],
                        "peak_rss_mb": peak_rss_mb(cmd),
                    }
                )
        reset()
        # what imagetool upload always runs before sending a byte: its share of the time
        checks = f"{IMAGETOOL} preflight {image} --metadata {PRISTINE}"
        preflight_s = hyperfine({"preflight": checks}, runs=runs)["preflight"]
    finally:
        cluster.down()
    rows = [("segments x threads", "command", "median", "MB/s", "vs swift upload", "peak RSS")]
    rows += [
        (
            f"{r['segment_size']} x {r['threads']}",
            str(r["command"]),
            f"{r['median_s']:.2f} s",
            f"{r['mb_per_s']:.0f}",
            f"{r['ratio_vs_swift']:.3f}x",
            f"{r['peak_rss_mb']:.0f} MB",
        )
        for r in results
    ]
    print(f"\n{image.name}: {size} bytes ({size / GiB:.2f} GiB), loopback Swift, medians of {runs} runs")
    print(table(rows))
    print(f"\nimagetool preflight alone (run first by every imagetool upload): {preflight_s:.2f} s")
    mine = [r for r in results if r["command"] == "imagetool upload"]
    ratio = max(float(r["ratio_vs_swift"]) for r in mine)
    rss = max(float(r["peak_rss_mb"]) for r in mine)
    met = {True: "met", False: "MISSED"}
    print(f"target <= {TARGET_RATIO:.1f}x swift upload: {met[ratio <= TARGET_RATIO]} ({ratio:.3f}x)")
    print(f"target peak RSS < {TARGET_RSS_MB} MB: {met[rss < TARGET_RSS_MB]} ({rss:.0f} MB)")
    out = WORK / "upload-bench.json"
    summary = {"image_bytes": size, "runs": runs, "results": results, "preflight_s": preflight_s}
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
