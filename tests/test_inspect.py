"""`imagetool inspect` on good images, and on every non-image a user can hand it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import SAMPLE, make_qcow2, qemu_img, sparse_raw

MiB = 1 << 20


def test_sample_reports_virtual_allocated_and_data_sizes_apart(cli, tmp_path):
    from fixtures_helper import fresh_sample

    sample = fresh_sample(tmp_path)
    result = cli("inspect", sample, "--json")
    assert result.code == 0, result.err
    doc = result.json
    assert doc["schema"] == "imagetool.inspect/1"
    assert doc["safe"] is True and doc["reasons"] == []
    assert doc["format"] == "raw" and doc["partition_table"] == "mbr"
    assert doc["virtual_size"] == 64 * MiB and doc["virtual_size_mib"] == 64
    assert doc["file_size"] == 64 * MiB
    assert doc["disk_size_exact"] is True
    # written zeros are allocated but not data; the tail is a hole: the three differ
    sizes = {doc["virtual_size"], doc["allocated_size"], doc["disk_size"]}
    assert len(sizes) == 3
    assert 0 < doc["disk_size"] < doc["allocated_size"] < doc["virtual_size"]


def test_committed_sample_human_output(cli):
    result = cli("inspect", SAMPLE)
    assert result.code == 0
    assert f"{SAMPLE}: safe" in result.out
    assert "raw (MBR partition table)" in result.out
    assert "67108864 bytes (64.0 MiB, 64 MiB in the library)" in result.out
    assert result.err == ""


@pytest.mark.parametrize(
    ("fmt", "opts", "expected"),
    [
        ("qcow2", [], "qcow2"),
        ("vmdk", ["-o", "subformat=monolithicSparse"], "vmdk"),
        ("vmdk", ["-o", "subformat=streamOptimized"], "vmdk"),
        ("vdi", [], "vdi"),
        ("vpc", [], "vpc"),
        ("vhdx", [], "vhdx"),
    ],
)
def test_accepted_formats(cli, tmp_path, fmt, opts, expected):
    image = tmp_path / f"disk.{fmt}"
    qemu_img("create", "-q", "-f", fmt, *opts, image, "32M")
    result = cli("inspect", image, "--json")
    assert result.code == 0, result.err
    assert result.json["format"] == expected
    assert result.json["safe"] is True
    assert result.json["virtual_size"] >= 32 * MiB


def test_qcow2_details_and_exact_disk_size(cli, tmp_path):
    raw = sparse_raw(
        tmp_path / "src.raw",
        32 * MiB,
        {0: b"\x01" * 5000, 8 * MiB: os.urandom(200_000), 20 * MiB: bytes(65536)},
    )
    qcow = tmp_path / "d.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, qcow)
    raw_doc = cli("inspect", raw, "--json").json
    doc = cli("inspect", qcow, "--json").json
    assert doc["qcow2"]["compat"] == "1.1"
    assert doc["qcow2"]["compression_type"] == "zlib"
    assert doc["qcow2"]["cluster_size"] == 65536
    # uncompressed qcow2: the data is read through qemu-img map's host offsets, exactly
    assert doc["disk_size_exact"] is True
    assert doc["disk_size"] == raw_doc["disk_size"] == 8192 + 200_704


def test_compressed_qcow2_disk_size_is_marked_estimate(cli, tmp_path):
    raw = sparse_raw(tmp_path / "src.raw", 8 * MiB, {MiB: b"text " * 20000})
    qcow = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", raw, qcow)
    doc = cli("inspect", qcow, "--json").json
    assert doc["safe"] is True
    assert doc["disk_size_exact"] is False
    assert doc["disk_size_method"] == "qemu-img map"
    assert doc["disk_size"] >= 100_000


def test_missing_file_is_environment_error(cli, tmp_path):
    missing = tmp_path / "nope.raw"
    result = cli("inspect", missing, "--json")
    assert result.code == 5
    assert result.json["schema"] == "imagetool.error/1"
    assert result.json["error"]["code"] == "not_found"
    assert result.err.strip() == f"imagetool: error: {missing}: no such file"


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("kind", "code", "words"),
    [
        ("dir", "not_regular_file", "is a directory"),
        ("fifo", "not_regular_file", "is a FIFO"),
        ("chardev", "not_regular_file", "is a character device"),
        ("symlink", "symlink", "symbolic link"),
        ("empty", "empty", "is empty"),
    ],
)
def test_non_images_are_rejected_without_reading(cli, tmp_path, kind, code, words):
    path = tmp_path / "thing"
    if kind == "dir":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)  # anything that reads it would block forever
    elif kind == "chardev":
        path = Path("/dev/zero")
    elif kind == "symlink":
        path.symlink_to(SAMPLE)
    else:
        path.touch()
    result = cli("inspect", path, "--json")
    assert result.code == 3
    doc = result.json
    assert doc["safe"] is False
    assert [r["code"] for r in doc["reasons"]] == [code]
    assert words in result.err and str(path) in result.err
    assert len(result.err.strip().splitlines()) == 1


def test_unknown_option_is_usage_error(cli):
    result = cli("inspect", "--no-such-option")
    assert result.code == 2


def test_usage_error_with_json_still_prints_one_object(cli):
    result = cli("inspect", "--json", "--no-such-option", "x")
    assert result.code == 2
    assert result.json["schema"] == "imagetool.error/1"
    assert result.json["exit_code"] == 2


def test_bad_claimed_format_is_usage_error(cli):
    result = cli("inspect", SAMPLE, "--format", "floppy", "--json")
    assert result.code == 2
    assert result.json["error"]["code"] == "bad_format"
    assert "floppy" in result.err


def test_bad_size_option_is_usage_error(cli):
    result = cli("inspect", SAMPLE, "--max-virtual-size", "lots")
    assert result.code == 2
    assert "'lots' is not a size" in result.err


def test_inspect_never_modifies_input(cli, tmp_path):
    image = make_qcow2(tmp_path / "a.qcow2")
    before = image.read_bytes(), os.stat(image).st_mtime_ns
    assert cli("inspect", image).code == 0
    assert (image.read_bytes(), os.stat(image).st_mtime_ns) == before


def test_help_lists_commands(cli):
    result = cli("--help")
    assert result.code == 0
    assert "inspect" in result.out
