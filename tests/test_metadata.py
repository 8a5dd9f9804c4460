"""`imagetool metadata`: the document, its schema, every validation error, the register line."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
from conftest import SAMPLE, make_qcow2, qemu_img

from imagetool.metadata import URL_PLACEHOLDER, registration, schema_errors

GOLDEN = Path(__file__).parent / "golden" / "sample.raw.json"
BASE = ["--name", "sample", "--arch", "x86_64"]


@pytest.fixture
def sample(tmp_path) -> Path:
    copy = tmp_path / "sample.raw"
    shutil.copyfile(SAMPLE, copy)
    return copy


def test_golden_document_for_the_sample(cli, sample):
    result = cli(
        "metadata",
        sample,
        "--name",
        "sample-1.0",
        "--arch",
        "x86_64",
        "--username",
        "ubuntu",
        "--description",
        "golden sample",
        "--min-ram",
        "512",
        "--server-disk",
        "20G",
        "--url",
        "https://example.com/images/sample.raw",
        "--json",
    )
    assert result.code == 0, result.err
    doc = result.json
    written = json.loads((sample.parent / "sample.raw.json").read_text())
    assert written == doc
    assert schema_errors(doc) == []
    assert doc["tool"]["qemu_img"] and doc["tool"]["imagetool"]
    golden_part = {k: v for k, v in doc.items() if k != "tool"}
    # the fingerprint is this copy's inode and times, sealed with this user's key: not golden
    assert set(golden_part["image"].pop("fingerprint")) == {
        "device",
        "inode",
        "size",
        "mtime_ns",
        "ctime_ns",
        "seal",
    }
    # key order is part of the contract: compare the serialised text, not just the dicts
    assert json.dumps(golden_part, indent=2) + "\n" == GOLDEN.read_text()


def test_registration_is_exactly_the_api_body(cli, sample):
    doc = cli("metadata", sample, *BASE, "--json").json
    assert doc["registration"] == {
        "name": "sample",
        "arch": "x86_64",
        "compatibility_mode": False,
        "public": False,
    }  # unset optional keys are left out
    doc = cli("metadata", sample, *BASE, "--mode", "compatibility", "--public", "--force", "--json").json
    assert doc["registration"]["compatibility_mode"] is True and doc["registration"]["public"] is True


def test_sizes_in_bytes_and_library_mib(cli, sample):
    image = cli("metadata", sample, *BASE, "--json").json["image"]
    assert image["virtual_size"] == 64 << 20 and image["virtual_size_mib"] == 64
    assert image["disk_size"] == 1794048 and image["disk_size_mib"] == 2  # rounded up
    assert image["official"] is False and image["format"] == "raw"


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["--arch", "x86_64"], "bad_name", "--name must not be empty"),
        (["--name", "  ", "--arch", "x86_64"], "bad_name", "--name must not be empty"),
        (["--name", "a\x07b", "--arch", "x86_64"], "bad_name", "control characters"),
        (["--name", "n"], "bad_arch", "--arch is required"),
        (["--name", "n", "--arch", "arm64"], "bad_arch", "'arm64' is not x86_64 or i686"),
        (["--name", "n", "--arch", "x86_64", "--mode", "fast"], "bad_mode", "--mode 'fast'"),
        (["--name", "n", "--arch", "x86_64", "--username", "Root!"], "bad_username", "valid login name"),
        (["--name", "n", "--arch", "x86_64", "--username", "-x"], "bad_username", "valid login name"),
        (["--name", "n", "--arch", "x86_64", "--min-ram", "0"], "bad_min_ram", "positive"),
        (["--name", "n", "--arch", "x86_64", "--url", "ftp://h/x"], "bad_url", "not an http(s) URL"),
        (["--name", "n", "--arch", "x86_64", "--url", "https://"], "bad_url", "not an http(s) URL"),
        (["--name", "n", "--arch", "x86_64", "--server-disk", "big"], "bad_size", "'big' is not a size"),
    ],
)
def test_validation_errors(cli, sample, args, code, words):
    result = cli("metadata", sample, *args, "--json")
    assert result.code == 2
    assert result.json["error"]["code"] == code
    assert words in result.err
    assert not (sample.parent / "sample.raw.json").exists()


@pytest.mark.parametrize(("given", "mapped"), [("amd64", "x86_64"), ("i386", "i686"), ("X86_64", "x86_64")])
def test_common_arch_spellings_are_mapped_with_a_note(cli, sample, given, mapped):
    result = cli("metadata", sample, "--name", "n", "--arch", given, "--json")
    assert result.code == 0
    assert result.json["registration"]["arch"] == mapped
    if given.lower() != mapped:
        assert f"arch '{given}' was read as '{mapped}'" in result.err


@pytest.mark.parametrize("name", ["plain", "with space", 'it\'s "quoted"', "$(rm -rf /)", "semi;colon`x`"])
def test_register_command_round_trips_through_shlex(name):
    reg = registration(
        name=name,
        arch="i686",
        mode="compatibility",
        username="core",
        public=True,
        description="d 'x'",
        min_ram=1024,
        url=None,
    )
    argv = shlex.split(reg.register_command())
    assert argv == [
        "brightbox",
        "images",
        "register",
        "-a",
        "i686",
        "-n",
        name,
        "-d",
        "d 'x'",
        "-u",
        "core",
        "-m",
        "compatibility",
        "-p",
        "true",
        "--min-ram",
        "1024",
        "--url",
        URL_PLACEHOLDER,
    ]


def test_register_command_uses_the_given_url(cli, sample):
    url = "https://orbit.brightbox.com/v1/acc-x/images/s.qcow2?temp_url_sig=ab&temp_url_expires=1"
    doc = cli("metadata", sample, *BASE, "--url", url, "--json").json
    assert shlex.split(doc["register_command"])[-2:] == ["--url", url]
    assert doc["registration"]["http_url"] == url


def test_existing_metadata_needs_force(cli, sample):
    target = sample.parent / "sample.raw.json"
    target.write_text("keep me")
    result = cli("metadata", sample, *BASE)
    assert result.code == 2 and "pass --force" in result.err
    assert target.read_text() == "keep me"
    assert cli("metadata", sample, *BASE, "--force").code == 0
    assert json.loads(target.read_text())["schema"] == "imagetool.metadata/1"


def test_unsafe_image_gets_no_metadata(cli, tmp_path):
    image = make_qcow2(tmp_path / "b.qcow2", "1M", "-b", str(tmp_path / "x"), "-F", "raw", "-u")
    result = cli("metadata", image, *BASE, "--json")
    assert result.code == 3
    assert not (tmp_path / "b.qcow2.json").exists()


def test_formats_the_library_does_not_take_are_refused(cli, tmp_path):
    image = tmp_path / "d.vdi"
    qemu_img("create", "-q", "-f", "vdi", image, "8M")
    result = cli("metadata", image, *BASE)
    assert result.code == 3 and "run imagetool convert first" in result.err
    assert not (tmp_path / "d.vdi.json").exists()


def test_server_disk_fit(cli, sample):
    doc = cli("metadata", sample, *BASE, "--server-disk", "32M", "--json").json
    assert doc["fits"] == {"min_disk_mib": 64, "server_disk_mib": 32, "fits_server_disk": False}


def test_schema_rejects_what_the_api_would(sample):
    good = json.loads(GOLDEN.read_text()) | {"tool": {"imagetool": "x", "qemu_img": "y", "checks": []}}
    assert schema_errors(good) == []
    for mutate in (
        lambda d: d["registration"].update(arch="arm64"),
        lambda d: d["registration"].update(source="old-ftp-name"),
        lambda d: d["registration"].update(public="false"),
        lambda d: d["registration"].update(disk_size=12),
        lambda d: d["image"].pop("sha256"),
        lambda d: d["status"].update(state="deprecated"),
    ):
        bad = json.loads(json.dumps(good))
        mutate(bad)
        assert schema_errors(bad), mutate
