"""`imagetool convert`: real conversions, every refusal, and that nothing is ever left behind."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import (
    SAMPLE,
    make_qcow2,
    qemu_img,
    slow_input,
    sparse_raw,
    start_slow_convert,
    wait_until_writing,
)

from imagetool import convert as convert_mod
from imagetool import qemu
from imagetool.sizes import GiB, MiB, parse_size

pytestmark = pytest.mark.timeout(60)


def children_named(parent: int, name: str) -> list[int]:
    """Pids of `parent`'s child processes whose command is `name` (read from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process ended meanwhile
            continue
        comm, rest = text.split("(", 1)[1].rsplit(")", 1)
        fields = rest.split()
        if int(fields[1]) == parent and comm == name:
            found.append(int(stat.parent.name))
    return found


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if "imagetool-tmp" in p.name)


def identical(a: Path, fmt_a: str, b: Path) -> bool:
    proc = subprocess.run(
        ["qemu-img", "compare", "-f", fmt_a, "-F", "qcow2", str(a), str(b)], capture_output=True
    )
    return proc.returncode == 0


def qemu_info(path: Path) -> dict:
    out = subprocess.run(
        ["qemu-img", "info", "--output=json", "-f", "qcow2", str(path)],
        capture_output=True,
        check=True,
        text=True,
    ).stdout
    return json.loads(out)


def text_blob(rng: random.Random, size: int) -> bytes:
    words = [rng.randbytes(rng.randrange(2, 8)).hex() for _ in range(300)]
    out = " ".join(rng.choices(words, k=size // 4)).encode()
    return out[:size]


@pytest.fixture
def mixed(tmp_path) -> Path:
    rng = random.Random(3)
    return sparse_raw(
        tmp_path / "mixed.raw",
        256 * MiB,
        {
            0: text_blob(rng, 3 * MiB),
            40 * MiB: rng.randbytes(2 * MiB),
            100 * MiB: bytes(4 * MiB),  # allocated zeros
            200 * MiB + 12345: text_blob(rng, MiB),
        },
    )


@pytest.mark.parametrize("compression", ["zlib", "zstd", "none"])
def test_round_trip_each_compression(cli, tmp_path, mixed, compression):
    out = tmp_path / "out.qcow2"
    result = cli("convert", mixed, "-o", out, "--compression", compression, "--json")
    assert result.code == 0, result.err
    doc = result.json
    assert doc["schema"] == "imagetool.convert/1"
    assert doc["verified"] is True and doc["output"] == str(out)
    assert doc["output_size"] == out.stat().st_size
    assert identical(mixed, "raw", out)
    info = qemu_info(out)
    assert info["virtual-size"] == 256 * MiB
    expected_type = "zlib" if compression == "none" else compression
    assert info["format-specific"]["data"]["compression-type"] == expected_type
    assert leftovers(tmp_path) == []


def test_holes_stay_holes_and_output_is_compressed(cli, tmp_path, mixed):
    out = tmp_path / "out.qcow2"
    assert cli("convert", mixed, "-o", out).code == 0
    mapping = json.loads(
        subprocess.run(
            ["qemu-img", "map", "--output=json", "-f", "qcow2", str(out)],
            capture_output=True,
            check=True,
            text=True,
        ).stdout
    )
    data = sum(e["length"] for e in mapping if e["data"])
    assert data <= 8 * MiB  # the 4 MiB of written zeros and the holes hold nothing
    assert out.stat().st_size < 6 * MiB  # text compressed, random data as is
    check = subprocess.run(["qemu-img", "check", "-f", "qcow2", str(out)], capture_output=True)
    assert check.returncode == 0


def test_default_output_name_and_human_summary(cli, tmp_path):
    src = tmp_path / "disk.raw"
    src.write_bytes(SAMPLE.read_bytes())
    result = cli("convert", src)
    assert result.code == 0, result.err
    assert (tmp_path / "disk.qcow2").exists()
    assert f"{src} -> {tmp_path / 'disk.qcow2'}" in result.out and "verified" in result.out


def test_output_mode_follows_the_umask(cli, tmp_path):
    out = tmp_path / "o.qcow2"
    old = os.umask(0o022)
    try:
        assert cli("convert", SAMPLE, "-o", out).code == 0
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o644


def test_input_is_never_modified(cli, tmp_path, mixed):
    before = mixed.read_bytes()
    assert cli("convert", mixed, "-o", tmp_path / "o.qcow2").code == 0
    assert mixed.read_bytes() == before


def test_other_input_formats_convert(cli, tmp_path, mixed):
    vmdk = tmp_path / "in.vmdk"
    qemu_img("convert", "-f", "raw", "-O", "vmdk", mixed, vmdk)
    out = tmp_path / "out.qcow2"
    assert cli("convert", vmdk, "-o", out).code == 0
    assert identical(mixed, "raw", out)


def test_default_limit_is_exactly_50_gib():
    assert convert_mod.DEFAULT_LIMIT == 50 * GiB == parse_size("50G") == parse_size("51200M")
    assert parse_size("53687091200") == 50 * GiB


def _random_compressed_qcow2(tmp_path: Path, size: int) -> Path:
    """Mostly incompressible data, behind compressed text clusters: no estimate is possible."""
    rng = random.Random(5)
    raw = sparse_raw(tmp_path / "rand.raw", size + MiB, {0: text_blob(rng, MiB), MiB: rng.randbytes(size)})
    qcow = tmp_path / "rand.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", raw, qcow)
    raw.unlink()
    return qcow


def test_gate_before_refuses_without_writing(cli, tmp_path):
    src = sparse_raw(tmp_path / "r.raw", 64 * MiB, {0: random.Random(1).randbytes(32 * MiB)})
    out = tmp_path / "out.qcow2"
    result = cli("convert", src, "-o", out, "--max-compressed-size", "8M", "--json")
    assert result.code == 4
    assert result.json["error"]["code"] == "compressed_too_large"
    assert "predicted compressed size" in result.err and "nothing was written" in result.err
    assert not out.exists() and leftovers(tmp_path) == []


def test_estimate_only_warns_when_the_bound_straddles_the_limit(cli, tmp_path):
    src = sparse_raw(tmp_path / "r.raw", 64 * MiB, {0: random.Random(1).randbytes(32 * MiB)})
    result = cli("convert", src, "--estimate-only", "--json")
    assert result.code == 0
    est = result.json["estimate"]
    assert est["method"] != "ceiling" and est["low"] < est["bytes"] < est["high"]
    between = str((est["low"] + est["high"]) // 2)
    straddling = cli("convert", src, "--estimate-only", "--json", "--max-compressed-size", between)
    assert straddling.code == 0
    assert [w["code"] for w in straddling.json["warnings"]] == ["may_exceed_limit"]
    assert "may_exceed_limit" in straddling.err
    assert not (tmp_path / "r.qcow2").exists()


def test_gate_during_stops_qemu_img(cli, tmp_path):
    """No prediction for a compressed input: the growing output is caught mid-way."""
    src = _random_compressed_qcow2(tmp_path, 96 * MiB)
    out = tmp_path / "out.qcow2"
    result = cli("convert", src, "-o", out, "--max-compressed-size", "8M", "--json")
    assert result.code == 4, result.err
    assert "grew past the limit" in result.err
    assert not out.exists() and leftovers(tmp_path) == []


def test_gate_after_confirms_final_size(cli, tmp_path, monkeypatch):
    """A job that finishes between two looks is still caught by the final check."""
    monkeypatch.setattr(convert_mod, "_POLL", 30.0)
    src = _random_compressed_qcow2(tmp_path, 4 * MiB)
    out = tmp_path / "out.qcow2"
    result = cli("convert", src, "-o", out, "--max-compressed-size", "3M", "--json")
    assert result.code == 4, result.err
    assert "over the limit" in result.err and "removed" in result.err
    assert not out.exists() and leftovers(tmp_path) == []


def test_unsafe_input_is_refused_before_conversion(cli, tmp_path):
    base = tmp_path / "base.raw"
    base.write_bytes(b"host secret" * 100 + bytes(1500 * 512 - 1100))
    src = make_qcow2(tmp_path / "b.qcow2", "1M", "-b", str(base), "-F", "raw")
    out = tmp_path / "out.qcow2"
    result = cli("convert", src, "-o", out, "--json")
    assert result.code == 3
    assert [r["code"] for r in result.json["error"]["reasons"]] == ["backing_file"]
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("setup", "code", "words"),
    [
        ("exists", 2, "output exists; pass --force"),
        ("symlink", 2, "output is a symbolic link"),
        ("same", 2, "output is the input itself"),
        ("directory", 2, "output is a directory"),
        ("no_parent", 5, "does not exist"),
    ],
)
def test_bad_output_paths(cli, tmp_path, setup, code, words):
    src = tmp_path / "in.raw"
    src.write_bytes(SAMPLE.read_bytes())
    out = tmp_path / "out.qcow2"
    if setup == "exists":
        out.write_bytes(b"precious")
    elif setup == "symlink":
        (tmp_path / "victim").write_bytes(b"precious")
        out.symlink_to(tmp_path / "victim")
    elif setup == "same":
        out = src
    elif setup == "directory":
        out.mkdir()
    else:
        out = tmp_path / "missing" / "out.qcow2"
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and not p.is_symlink()}
    result = cli("convert", src, "-o", out, "--json")
    assert result.code == code
    assert words in result.err and result.json["schema"] == "imagetool.error/1"
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and not p.is_symlink()}
    assert after == before and leftovers(tmp_path) == []


def test_force_replaces_existing_output(cli, tmp_path):
    out = tmp_path / "out.qcow2"
    out.write_bytes(b"old")
    assert cli("convert", SAMPLE, "-o", out, "--force").code == 0
    assert out.read_bytes()[:4] == b"QFI\xfb"


def test_disk_full_leaves_nothing(cli, tmp_path, monkeypatch):
    """Simulated ENOSPC from qemu-img (a wrapper that fails the write like a full disk)."""
    fake = tmp_path / "bin" / "qemu-img"
    fake.parent.mkdir()
    real = subprocess.run(["which", "qemu-img"], capture_output=True, text=True).stdout.strip()
    fake.write_text(
        "#!/bin/bash\n"
        'if [ "$1" = convert ]; then\n'
        '  out="${@: -1}"; head -c 1048576 /dev/zero >> "$out"\n'
        '  echo "qemu-img: error while writing at byte 1048576: No space left on device" >&2\n'
        "  exit 1\nfi\n"
        f'exec {real} "$@"\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    out = tmp_path / "out.qcow2"
    result = cli("convert", SAMPLE, "-o", out, "--engine", "qemu", "--json")
    assert result.code == 5
    assert result.json["error"]["code"] == "disk_full"
    assert "disk full" in result.err
    assert not out.exists() and leftovers(tmp_path) == []


def test_disk_full_in_the_native_writer_leaves_nothing(cli, tmp_path, monkeypatch):
    """ENOSPC injected into the native writer's second write (a full disk can't be had on demand)."""
    from imagetool import qcow2

    real, calls = os.pwrite, [0]

    def full_after_one(fd, data, offset):
        calls[0] += 1
        if calls[0] > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(qcow2.os, "pwrite", full_after_one)
    out = tmp_path / "out.qcow2"
    result = cli("convert", SAMPLE, "-o", out, "--json")
    assert result.code == 5 and result.json["error"]["code"] == "disk_full"
    assert calls[0] > 1 and not out.exists() and leftovers(tmp_path) == []


def test_free_space_checked_up_front(cli, tmp_path, monkeypatch):
    real = os.statvfs

    class Tiny:
        def __init__(self, path):
            st = real(path)
            self.f_frsize, self.f_bavail, self.f_flag = st.f_frsize, 1, st.f_flag

    monkeypatch.setattr(convert_mod.os, "statvfs", Tiny)
    out = tmp_path / "out.qcow2"
    result = cli("convert", SAMPLE, "-o", out)
    assert result.code == 5 and "not enough free space" in result.err
    assert not out.exists() and leftovers(tmp_path) == []


def test_progress_json_lines_are_monotonic(cli, tmp_path, mixed):
    result = cli("convert", mixed, "-o", tmp_path / "o.qcow2", "--progress", "json")
    assert result.code == 0
    lines = [json.loads(line) for line in result.err.splitlines() if line.startswith("{")]
    assert lines, result.err
    assert all({"done", "total", "rate"} <= set(line) for line in lines)
    dones = [line["done"] for line in lines]
    assert dones == sorted(dones) and dones[-1] == lines[-1]["total"] == 256 * MiB
    assert "\r" not in result.err


@pytest.mark.parametrize("mode", ["auto", "none"])
def test_progress_none_and_auto_off_terminal_are_silent(cli, tmp_path, mode):
    result = cli("convert", SAMPLE, "-o", tmp_path / "o.qcow2", "--progress", mode)
    assert result.code == 0 and result.err == ""
    assert (tmp_path / "o.qcow2").exists()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--compression", "lzma"], "--compression 'lzma'"),
        (["--progress", "loud"], "--progress 'loud'"),
        (["--threads", "0"], "--threads"),
        (["--max-compressed-size", "huge"], "'huge' is not a size"),
    ],
)
def test_bad_options_are_usage_errors(cli, tmp_path, args, words):
    result = cli("convert", SAMPLE, "-o", tmp_path / "o.qcow2", *args)
    assert result.code == 2 and words in result.err
    assert leftovers(tmp_path) == [] and not (tmp_path / "o.qcow2").exists()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_interrupt_mid_run_removes_partial_output(tmp_path, sig):
    out = tmp_path / "out.qcow2"
    proc = start_slow_convert(slow_input(tmp_path), out, "--json")
    wait_until_writing(proc)
    assert leftovers(tmp_path), "conversion should be under way"
    qemu_children = children_named(proc.pid, "qemu-img")
    assert qemu_children, "qemu-img should be running"
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 128 + sig, stderr
    assert json.loads(stdout)["error"]["code"] == "interrupted"
    assert not out.exists() and leftovers(tmp_path) == []
    assert "Traceback" not in stderr
    time.sleep(0.2)
    assert [pid for pid in qemu_children if Path(f"/proc/{pid}").exists()] == []  # no orphan left


def test_qemu_errors_are_classified_by_their_real_message(tmp_path):
    def failure(stderr: str, code: int = 1):
        return qemu.convert_failure(code, stderr, "in.raw", str(tmp_path / "o.qcow2"))

    locked = failure('qemu-img: Failed to get "write" lock\nIs another process using it?')
    write_error = failure("qemu-img: error while writing at byte 7: Input/output error")
    read_error = failure("qemu-img: error while reading at byte 262144: Input/output error")
    shared = failure('qemu-img: Failed to get shared "write" lock')
    assert locked.code == shared.code == "locked" and locked.exit_code == 5
    assert write_error.code == "convert_failed" and "Input/output error" in write_error.message
    assert write_error.exit_code == 5
    assert read_error.code == "corrupt" and read_error.exit_code == 3  # the input's fault
    assert failure("qemu-img: error while writing at byte 0: File too large").code == "file_too_big"
    assert failure("", -signal.SIGKILL).code == "resource_limit"
    assert failure("", 0) is None
