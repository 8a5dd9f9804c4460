"""`imagetool preflight`: named checks, exit codes a pipeline can branch on, JSON and JUnit."""

from __future__ import annotations

import json
import os
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import SAMPLE, make_qcow2, qemu_img

REG = ["--name", "web-1", "--arch", "x86_64", "--username", "ubuntu"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Path]:
    from imagetool.cli import main

    directory = tmp_path_factory.mktemp("prepared")
    out = directory / "web.qcow2"
    assert main(["prepare", str(SAMPLE), *REG, "-o", str(out), "--progress", "none"]) == 0
    return out, directory / "web.qcow2.json"


def statuses(result) -> dict[str, str]:
    return {c["name"]: c["status"] for c in result.json["checks"]}


def test_prepared_image_passes_every_check(cli, prepared, tmp_path):
    image, meta = prepared
    junit = tmp_path / "preflight.xml"
    result = cli("preflight", image, "--metadata", meta, "--server-disk", "20G", "--junit", junit, "--json")
    assert result.code == 0, result.out
    assert result.json["schema"] == "imagetool.preflight/1" and result.json["ok"] is True
    assert set(statuses(result).values()) == {"pass"}
    assert {
        "inspect",
        "format",
        "compressed",
        "compressed_size",
        "disk_size",
        "server_disk",
        "metadata_schema",
        "metadata_matches",
        "metadata_registration",
        # with --metadata, the guest's files are read too (the sample has no OS: nothing to contradict)
        "guest_arch",
        "guest_mode",
        "guest_username",
    } == set(statuses(result))
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None
    assert suite.get("tests") == "12" and suite.get("failures") == "0"
    assert len(suite.findall("testcase")) == 12


def test_matching_metadata_supplies_the_exact_disk_size(cli, prepared):
    image, meta = prepared
    alone = cli("preflight", image, "--json").json
    with_meta = cli("preflight", image, "--metadata", meta, "--json").json
    message = {c["name"]: c["message"] for c in alone["checks"]}["disk_size"]
    assert "upper bound" in message  # a compressed qcow2's data can't be read exactly
    message = {c["name"]: c["message"] for c in with_meta["checks"]}["disk_size"]
    assert message.startswith("1.7 MiB of non-zero data (exact")


def test_metadata_of_another_file_fails(cli, prepared, tmp_path):
    image, meta = prepared
    other = tmp_path / "other.qcow2"
    shutil.copyfile(image, other)
    with other.open("r+b") as f:  # same size, one guest-invisible byte changed: another file
        f.seek(other.stat().st_size - 1)
        f.write(b"\x01")
    result = cli("preflight", other, "--metadata", meta, "--json")
    assert result.code == 3
    assert statuses(result)["metadata_matches"] == "fail"
    assert "sha256" in result.err


@pytest.mark.parametrize(
    ("content", "check"),
    [
        ("{not json", "metadata_schema"),
        (json.dumps({"schema": "imagetool.metadata/1"}), "metadata_schema"),
    ],
)
def test_broken_metadata_fails(cli, prepared, tmp_path, content, check):
    image, _ = prepared
    meta = tmp_path / "m.json"
    meta.write_text(content)
    result = cli("preflight", image, "--metadata", meta, "--json")
    assert result.code == 3 and statuses(result)[check] == "fail"


def test_metadata_with_api_unclean_registration_fails(cli, prepared, tmp_path):
    image, meta = prepared
    doc = json.loads(meta.read_text())
    doc["registration"]["source"] = "incoming/web.img"  # the retired FTP field: the API refuses it
    del doc["registration"]["username"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    result = cli("preflight", image, "--metadata", bad, "--json")
    assert result.code == 3
    assert statuses(result)["metadata_registration"] == "fail"
    message = next(c["message"] for c in result.json["checks"] if c["name"] == "metadata_registration")
    assert "unknown field 'source'" in message and "username is missing" in message


def test_missing_metadata_file_is_environment_error(cli, prepared, tmp_path):
    image, _ = prepared
    result = cli("preflight", image, "--metadata", tmp_path / "nope.json", "--json")
    assert result.code == 5 and result.json["error"]["code"] == "not_found"


def test_raw_passes_with_a_warning_and_strict_fails_it(cli, tmp_path):
    result = cli("preflight", SAMPLE, "--json")
    assert result.code == 0
    assert statuses(result)["compressed"] == "warn"
    junit = tmp_path / "j.xml"
    strict = cli("preflight", SAMPLE, "--strict", "--junit", junit, "--json")
    assert strict.code == 3 and strict.json["ok"] is False
    failures = ET.parse(junit).getroot().findall(".//failure")
    assert [f.get("type") for f in failures] == ["not_compressed"]


def test_uncompressed_qcow2_warns(cli, tmp_path):
    raw = tmp_path / "r.raw"
    raw.write_bytes(SAMPLE.read_bytes())
    image = tmp_path / "u.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, image)
    result = cli("preflight", image, "--json")
    assert result.code == 0 and statuses(result)["compressed"] == "warn"


@pytest.mark.parametrize(
    ("args", "check", "code"),
    [
        (["--max-compressed-size", "1M"], "compressed_size", 4),
        (["--server-disk", "32M"], "server_disk", 4),
    ],
)
def test_size_failures_exit_4(cli, prepared, args, check, code):
    image, _ = prepared
    result = cli("preflight", image, *args, "--json")
    assert result.code == code and statuses(result)[check] == "fail"


def test_other_formats_fail_the_format_check(cli, tmp_path):
    image = tmp_path / "d.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", image, "8M")
    result = cli("preflight", image, "--json")
    assert result.code == 3 and statuses(result)["format"] == "fail"


@pytest.mark.timeout(10)
def test_rejected_input_still_writes_junit(cli, tmp_path):
    junit = tmp_path / "j.xml"
    result = cli("preflight", tmp_path, "--junit", junit, "--json")
    assert result.code == 3
    assert statuses(result) == {"inspect": "fail"}
    case = ET.parse(junit).getroot().find(".//testcase")
    assert case is not None and case.find("failure") is not None


def test_unsafe_image_fails_inspect(cli, tmp_path):
    image = make_qcow2(tmp_path / "e.qcow2", "1M", "-b", str(tmp_path / "x"), "-F", "raw", "-u")
    result = cli("preflight", image, "--json")
    assert result.code == 3 and statuses(result) == {"inspect": "fail"}


def test_checksums_of_an_unchanged_prepared_file_are_not_read_again(cli, tmp_path):
    """prepare records the qcow2's fingerprint; preflight trusts the checksums only while it holds."""
    out = tmp_path / "s.qcow2"
    assert cli("prepare", SAMPLE, "-o", out, "--name", "s", "--arch", "x86_64", "--username", "u").code == 0
    meta = f"{out}.json"
    st = out.stat()
    recorded = json.loads(Path(meta).read_text())["image"]["fingerprint"]
    numbers = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    assert tuple(recorded[k] for k in ("device", "inode", "size", "mtime_ns", "ctime_ns")) == numbers

    def matches() -> tuple[int, str]:
        result = cli("preflight", out, "--metadata", meta, "--no-guest", "--json")
        check = {c["name"]: c for c in result.json["checks"]}["metadata_matches"]
        return result.code, check["message"]

    code, message = matches()
    assert code == 0 and "not read again" in message
    doc = json.loads(Path(meta).read_text())
    lying = tmp_path / "lying.json"
    lying.write_text(
        json.dumps(doc | {"image": doc["image"] | {"sha256": "0" * 64}})
    )  # the seal no longer fits
    result = cli("preflight", out, "--metadata", lying, "--no-guest", "--json")
    assert result.code == 3 and "sha256:" in result.out
    os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))  # same times, but the ctime moves on
    code, message = matches()
    assert code == 0 and "not read again" not in message  # read and hashed: still this file
    data = bytearray(out.read_bytes())
    data[-1] ^= 0xFF  # one byte, then the mtime put back: only the ctime tells
    out.write_bytes(bytes(data))
    os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
    code, message = matches()
    assert code == 3 and "sha256" in message


def test_a_file_mapped_for_writing_is_never_sealed_nor_trusted(cli, tmp_path):
    """A writer with the file mapped changes it without moving its times: leases tell it is there."""
    import mmap

    raw = tmp_path / "m.raw"
    shutil.copyfile(SAMPLE, raw)
    reg = ("--name", "m", "--arch", "x86_64", "--username", "u")
    with raw.open("r+b") as f, mmap.mmap(f.fileno(), 0) as mapped:
        mapped[1 << 20] = 0x41  # the first write moves the times; later ones to this page do not
        assert cli("metadata", raw, *reg, "--json").code == 0
        assert "fingerprint" not in json.loads((tmp_path / "m.raw.json").read_text())["image"]
        mapped[(1 << 20) + 1] = 0x42
        result = cli("preflight", raw, "--metadata", f"{raw}.json", "--no-guest", "--json")
    assert result.code == 3 and "sha256:" in result.out  # read again: the change is seen
    assert cli("metadata", raw, *reg, "--force", "--json").code == 0  # no writer now: sealed
    assert "seal" in json.loads((tmp_path / "m.raw.json").read_text())["image"]["fingerprint"]
    with raw.open("r+b"):  # a writer merely holding it open: not trusted while it does
        result = cli("preflight", raw, "--metadata", f"{raw}.json", "--no-guest", "--json")
    assert result.code == 0 and "not read again" not in result.out


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "readable_by_others", "relative_state_home"])
def test_a_sealing_key_that_is_not_private_is_not_used(cli, tmp_path, monkeypatch, kind):
    """A FIFO must not hang it, /dev/zero must not fill memory, a key others can read forges seals."""
    state = tmp_path / "state"
    key = state / "imagetool" / "fingerprint.key"
    key.parent.mkdir(parents=True)
    monkeypatch.setenv("XDG_STATE_HOME", str(state))
    if kind == "fifo":
        os.mkfifo(key)
    elif kind == "dev_zero":
        key.symlink_to("/dev/zero")
    elif kind == "readable_by_others":
        key.write_bytes(os.urandom(32))
        key.chmod(0o644)
    else:
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("XDG_STATE_HOME", "state")  # relative: ignored, as XDG says
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        key.write_bytes(os.urandom(32))
        key.chmod(0o600)
    raw = tmp_path / "k.raw"
    shutil.copyfile(SAMPLE, raw)
    result = cli("metadata", raw, "--name", "k", "--arch", "x86_64", "--username", "u", "--json")
    assert result.code == 0, result.err
    fingerprint = result.json["image"].get("fingerprint")
    if kind == "relative_state_home":  # sealed, but with a key under HOME, not the relative one
        assert fingerprint is not None and (tmp_path / "home" / ".local" / "state" / "imagetool").is_dir()
    else:
        assert fingerprint is None


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm")
def test_files_on_tmpfs_are_never_sealed(cli, tmp_path):
    """tmpfs does not move a file's times for writes through a mapping: a seal there proves nothing."""
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        raw = Path(shm) / "t.raw"
        shutil.copyfile(SAMPLE, raw)
        result = cli("metadata", raw, "--name", "t", "--arch", "x86_64", "--username", "u", "--json")
        assert result.code == 0, result.err
        assert "fingerprint" not in result.json["image"]
