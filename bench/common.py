"""Helpers shared by the benchmarks: build inputs, time commands with hyperfine, report ratios."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(os.environ.get("BENCH_WORK", ROOT / "bench" / "work"))
IMAGETOOL = str(ROOT / ".venv" / "bin" / "imagetool")
MiB = 1 << 20
GiB = 1 << 30


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        sys.exit(f"{tool} is missing: apt-get install -y {tool}")


def realistic_chunk(rng: random.Random, kind: str, size: int) -> bytes:
    """Data that compresses like a real disk: text, binaries (random), zeros."""
    if kind == "text":
        words = [rng.randbytes(rng.randrange(2, 9)).hex() for _ in range(400)]
        out = bytearray()
        while len(out) < size:
            out += (" ".join(rng.choices(words, k=512)) + "\n").encode()
        return bytes(out[:size])
    if kind == "random":
        return rng.randbytes(size)
    return bytes(size)


def build_mixed(path: Path, virtual: int, data: int, seed: int = 1) -> Path:
    """A sparse raw disk with `data` bytes written in 4 MiB pieces: text, random and zeros.

    Kept between runs (same seed, same bytes) since writing it takes a while.
    """
    if path.exists() and path.stat().st_size == virtual:
        return path
    rng = random.Random(seed)
    piece = 4 * MiB
    pool = {k: [realistic_chunk(rng, k, piece) for _ in range(8)] for k in ("text", "random")}
    slots = virtual // piece
    chosen = sorted(rng.sample(range(slots), data // piece))
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        f.truncate(virtual)
        for slot in chosen:
            kind = rng.choices(["text", "random", "zero"], weights=[5, 3, 2])[0]
            f.seek(slot * piece)
            f.write(bytes(piece) if kind == "zero" else rng.choice(pool[kind]))
    tmp.rename(path)
    return path


def hyperfine(
    commands: dict[str, str],
    runs: int = 5,
    warmup: int = 1,
    prepare: str | None = None,
    ignore_failure: bool = False,
) -> dict[str, float]:
    """Median wall seconds of each command, measured side by side in one hyperfine run.

    `ignore_failure` times commands that are meant to exit non-zero (an image refused: exit 3).
    """
    need("hyperfine")
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        args = [
            "hyperfine",
            "-N",
            "--style",
            "none",
            "--runs",
            str(runs),
            "--warmup",
            str(warmup),
            "--export-json",
            out.name,
        ]
        if prepare:
            args[1:1] = ["--prepare", prepare]
        if ignore_failure:
            args.append("--ignore-failure")
        for name, cmd in commands.items():
            args += ["-n", name, cmd]
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
        results = json.loads(Path(out.name).read_text())["results"]
    return {r["command"]: r["median"] for r in results}


def peak_rss_mb(cmd: list[str]) -> float:
    """Peak resident memory of a command, from GNU time -v."""
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    return int(match.group(1)) / 1024 if match else float("nan")


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
        for r in [rows[0], tuple("-" * w for w in widths), *rows[1:]]
    )
