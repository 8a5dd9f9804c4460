"""`imagetool prepare`: the whole job, and its metadata lifecycle creating -> available/failed."""

from __future__ import annotations

import json
import random
import shlex
import time
from pathlib import Path

import pytest
from conftest import SAMPLE, make_qcow2, qemu_img, slow_input, sparse_raw, start_imagetool

from imagetool.metadata import schema_errors
from imagetool.sizes import MiB

pytestmark = pytest.mark.timeout(90)
REG = ["--name", "web-1", "--arch", "x86_64", "--username", "ubuntu"]


def stray(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if "imagetool-tmp" in p.name or p.suffix == ".qcow2")


def test_prepare_writes_qcow2_and_available_metadata(cli, tmp_path):
    src = tmp_path / "disk.raw"
    src.write_bytes(SAMPLE.read_bytes())
    result = cli("prepare", src, *REG, "--server-disk", "20G")
    assert result.code == 0, result.err
    qcow2, meta = tmp_path / "disk.qcow2", tmp_path / "disk.qcow2.json"
    doc = json.loads(meta.read_text())
    assert schema_errors(doc) == []
    assert doc["status"] == {"state": "available"}
    assert doc["image"]["file"] == "disk.qcow2" and doc["image"]["format"] == "qcow2"
    assert doc["image"]["file_size"] == qcow2.stat().st_size
    # disk_size comes from the exact scan of the raw input, not the qcow2's upper bound
    assert doc["image"]["disk_size"] == 1794048 and doc["image"]["disk_size_exact"] is True
    assert doc["fits"]["fits_server_disk"] is True
    assert {"header", "qemu_info", "convert", "verify"} <= set(doc["tool"]["checks"])
    last = result.out.strip().splitlines()[-1]
    assert shlex.split(last)[:3] == ["brightbox", "images", "register"]


def test_prepare_json_is_the_document(cli, tmp_path):
    result = cli("prepare", SAMPLE, *REG, "-o", tmp_path / "x.qcow2", "--json")
    assert result.code == 0
    assert result.json == json.loads((tmp_path / "x.qcow2.json").read_text())


def test_metadata_says_creating_while_it_works(tmp_path):
    meta = tmp_path / "big.qcow2.json"
    proc = start_imagetool(
        "prepare", slow_input(tmp_path), *REG, "--engine", "qemu", "--threads", "1", "--progress", "none"
    )
    states = []
    while proc.poll() is None:
        if meta.exists():
            doc = json.loads(meta.read_text())  # never half-written: always parses
            assert schema_errors(doc) == []
            states.append((doc["status"]["state"], doc["status"].get("disk_size")))
        time.sleep(0.05)
    assert proc.returncode == 0, proc.stderr.read()
    assert states[0][0] == "creating"
    growing = [size for state, size in states if state == "creating" and size]
    assert growing and growing == sorted(growing)
    assert json.loads(meta.read_text())["status"]["state"] == "available"


def test_failure_mid_way_ends_failed_without_stray_qcow2(cli, tmp_path):
    rng = random.Random(2)
    raw = sparse_raw(tmp_path / "r.raw", 97 * MiB, {0: b"text " * 200_000, MiB: rng.randbytes(96 * MiB)})
    src = tmp_path / "in.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", raw, src)  # compressed: no prediction
    raw.unlink()
    out = tmp_path / "out.qcow2"
    result = cli("prepare", src, *REG, "-o", out, "--max-compressed-size", "8M")
    assert result.code == 4, result.err
    doc = json.loads((tmp_path / "out.qcow2.json").read_text())
    assert schema_errors(doc) == []
    assert doc["status"]["state"] == "failed"
    assert doc["status"]["reason"]["code"] == "compressed_too_large"
    assert stray(tmp_path) == ["in.qcow2"]


def test_unsafe_input_creates_nothing(cli, tmp_path):
    src = make_qcow2(tmp_path / "evil.qcow2", "1M", "-b", str(tmp_path / "nope"), "-F", "raw", "-u")
    result = cli("prepare", src, *REG, "-o", tmp_path / "out.qcow2")
    assert result.code == 3 and "[backing_file]" in result.err
    # inspection comes before any file is created: nothing to clean up, nothing to block a rerun
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.qcow2"]


def test_bad_registration_writes_nothing(cli, tmp_path):
    result = cli("prepare", SAMPLE, "--name", "x", "--arch", "sparc", "-o", tmp_path / "o.qcow2")
    assert result.code == 2 and "--arch 'sparc'" in result.err
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(cli, tmp_path):
    out = tmp_path / "o.qcow2"
    out.write_bytes(b"precious")
    result = cli("prepare", SAMPLE, *REG, "-o", out)
    assert result.code == 2 and "pass --force" in result.err
    assert out.read_bytes() == b"precious" and not (tmp_path / "o.qcow2.json").exists()
