"""`convert` with the native qcow2 writer: every input it can read, and the fallbacks to qemu-img.

The writer itself (layout, descriptors, refcounts, edge cases) is tested in
test_qcow2_writer.py; here the whole command: inspect, writer choice, estimate, gate,
verify, atomic output, for each input format.
"""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest
from conftest import qemu_img, sparse_raw

MiB = 1 << 20


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A raw disk with text, random bytes, written zeros and holes; 24.5 MiB (not a cluster multiple)."""
    rng = random.Random(7)
    words = [b"kernel", b"module", b"virtio", b"qcow2", b"\n", b"usr/lib", b"0x7f45"]
    text = b" ".join(rng.choice(words) for _ in range(400_000))[: 3 * MiB]
    writes = {0: text, 5 * MiB: rng.randbytes(2 * MiB), 9 * MiB: bytes(MiB), 24 * MiB: text[: MiB // 2]}
    return sparse_raw(tmp_path_factory.mktemp("native") / "disk.raw", 24 * MiB + MiB // 2, writes)


def identical(a: Path, fmt: str, b: Path) -> bool:
    args = ["qemu-img", "compare", "-f", fmt, "-F", "qcow2", str(a), str(b)]
    return subprocess.run(args, capture_output=True).returncode == 0


def check_clean(path: Path) -> None:
    proc = subprocess.run(["qemu-img", "check", "--output=json", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert not report.get("leaks") and not report.get("corruptions")


@pytest.mark.parametrize(
    ("fmt", "options", "engine"),
    [
        ("raw", [], "native"),
        ("qcow2", ["-o", "cluster_size=65536"], "native"),
        ("vmdk", ["-o", "subformat=monolithicSparse"], "native"),
        ("vdi", [], "native"),
        ("vpc", ["-o", "subformat=dynamic"], "native"),
        ("vpc", ["-o", "subformat=fixed"], "native"),
        # qemu 7.2's VHDX driver maps data without host offsets: qemu-img reads it
        ("vhdx", [], "qemu"),
    ],
)
def test_every_uncompressed_input_is_written_natively(cli, tmp_path, disk, fmt, options, engine):
    source = disk
    if fmt != "raw":
        source = tmp_path / f"in.{fmt}"
        qemu_img("convert", "-q", "-f", "raw", "-O", fmt, *options, disk, source)
    out = tmp_path / "out.qcow2"
    result = cli("convert", source, "-o", out, "--json")
    assert result.code == 0, result.err
    doc = result.json
    assert doc["engine"] == engine and doc["verified"] is True
    assert identical(source, fmt, out)
    check_clean(out)


def test_compressed_input_falls_back_to_qemu_img(cli, tmp_path, disk):
    source = tmp_path / "c.qcow2"
    qemu_img("convert", "-q", "-c", "-f", "raw", "-O", "qcow2", disk, source)
    out = tmp_path / "out.qcow2"
    result = cli("convert", source, "-o", out, "--json")
    assert result.code == 0, result.err
    assert result.json["engine"] == "qemu" and identical(source, "qcow2", out)


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
def test_output_is_the_same_bytes_every_time(cli, tmp_path, disk, compression):
    """Deterministic: same input and options, same file (threads and timing don't matter)."""
    outputs = []
    for threads in ("1", "2"):
        out = tmp_path / f"out{threads}.qcow2"
        args = ("--compression", compression, "--threads", threads, "--no-verify")
        assert cli("convert", disk, "-o", out, *args).code == 0
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]


def test_level_and_engine_are_honoured(cli, tmp_path, disk):
    sizes = {}
    for name, args in {
        "fast": ["--level", "1"],
        "best": ["--level", "3"],
        "qemu": ["--engine", "qemu"],
    }.items():
        out = tmp_path / f"{name}.qcow2"
        result = cli("convert", disk, "-o", out, "--json", *args)
        assert result.code == 0, result.err
        assert result.json["engine"] == ("qemu" if name == "qemu" else "native")
        assert identical(disk, "raw", out)
        sizes[name] = out.stat().st_size
    assert sizes["best"] <= sizes["fast"]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--level", "7"], "--level 7"),
        (["--level", "1", "--engine", "qemu"], "--level applies to the native writer"),
        (["--engine", "fast"], "--engine 'fast'"),
        (["--compression", "none", "--level", "2"], "--level applies"),
    ],
)
def test_bad_writer_options_are_usage_errors(cli, tmp_path, disk, args, words):
    result = cli("convert", disk, "-o", tmp_path / "o.qcow2", *args)
    assert result.code == 2 and words in result.err
    assert list(tmp_path.iterdir()) == []


def test_uncompressed_output_uses_qemu_img(cli, tmp_path, disk):
    out = tmp_path / "o.qcow2"
    result = cli("convert", disk, "-o", out, "--compression", "none", "--json")
    assert result.code == 0 and result.json["engine"] == "qemu" and identical(disk, "raw", out)


def test_native_gate_during_stops_the_writer(cli, tmp_path):
    """Random data the ceiling can't clear and the estimate can't rule out: caught while writing."""
    source = sparse_raw(tmp_path / "r.raw", 64 * MiB, {0: random.Random(3).randbytes(24 * MiB)})
    out = tmp_path / "o.qcow2"
    result = cli("convert", source, "-o", out, "--max-compressed-size", "20M", "--json")
    assert result.code == 4, result.err
    assert result.json["error"]["code"] == "compressed_too_large"
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["r.raw"]


def test_qemu_io_reads_the_right_bytes(cli, tmp_path, disk):
    out = tmp_path / "o.qcow2"
    assert cli("convert", disk, "-o", out, "--no-verify").code == 0
    data = disk.read_bytes()
    for offset in (0, 5 * MiB + 4096, 9 * MiB, 24 * MiB + 512):
        expected = data[offset : offset + 512]
        proc = subprocess.run(
            ["qemu-io", "-r", "-f", "qcow2", "-c", f"read -v {offset} 512", str(out)],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
        dumped = bytes(
            int(h, 16)
            for line in proc.stdout.splitlines()
            if ":" in line
            for h in line.split(":", 1)[1].split()[:16]
        )
        assert dumped == expected, offset


def test_a_signal_mid_write_removes_everything(tmp_path, disk, monkeypatch):
    """SIGTERM while the native writer runs (raised from its own progress report): unwinds, no file."""
    import os
    import signal
    import threading

    from imagetool import qcow2, signals
    from imagetool.convert import convert
    from imagetool.errors import Interrupted

    monkeypatch.setattr(qcow2, "PROGRESS_SECONDS", 0.0)  # report after every cluster
    out = tmp_path / "o.qcow2"
    before = threading.active_count()

    def progress(p):
        if p.done < p.total:
            os.kill(os.getpid(), signal.SIGTERM)

    with signals.unwinding(), pytest.raises(Interrupted):
        convert(str(disk), str(out), threads=2, progress=progress, verify=False)
    assert list(tmp_path.iterdir()) == [] and threading.active_count() == before
