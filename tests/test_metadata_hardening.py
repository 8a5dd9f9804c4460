"""Metadata as hostile input and as output: safe reads, validate-before-use, no output over an input.

Every test here failed on the code before the hardening issue (a hang, exit 1, a
pass it should not have been, or a clobbered disk) and passes now.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Required, get_origin, get_type_hints

import pytest
from conftest import SAMPLE, sparse_raw
from jsonschema import Draft202012Validator

from imagetool import metadata, preflight
from imagetool.errors import UsageProblem
from imagetool.metadata import registration, schema, schema_errors
from imagetool.policy import MAX_JSON_DEPTH, MAX_METADATA_BYTES

REG = ["--name", "web-1", "--arch", "x86_64", "--username", "ubuntu"]
ROOT = Path(__file__).resolve().parent.parent


def checks(result: Any) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in result.json["checks"]}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A compressed qcow2 and its `available` metadata, as prepare writes them."""
    from imagetool.cli import main

    directory = tmp_path_factory.mktemp("prepared")
    out = directory / "web.qcow2"
    assert main(["prepare", str(SAMPLE), *REG, "-o", str(out), "--progress", "none"]) == 0
    return out, directory / "web.qcow2.json"


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    copy = tmp_path / "a.raw"
    shutil.copyfile(SAMPLE, copy)
    return copy


def edited(meta: Path, where: Path, change: Callable[[dict[str, Any]], object]) -> Path:
    doc = json.loads(meta.read_text())
    change(doc)
    out = where / "edited.json"
    out.write_text(json.dumps(doc))
    return out


# --- 1. every file is read the safe way -----------------------------------------------------------


@pytest.mark.timeout(10)
def test_metadata_fifo_fails_the_schema_check_at_once(cli, raw, tmp_path):
    fifo = tmp_path / "meta.fifo"
    os.mkfifo(fifo)
    started = time.monotonic()
    read = preflight._read_metadata(str(fifo))  # nobody writes: the old read blocked forever
    assert time.monotonic() - started < 0.5
    assert read.problem is not None and "not_regular_file" in read.problem
    result = cli("preflight", raw, "--metadata", fifo, "--json")
    assert result.code == 3
    schema_check = checks(result)["metadata_schema"]
    assert schema_check["status"] == "fail" and schema_check["code"] == "bad_metadata"
    assert "FIFO" in schema_check["message"]


@pytest.mark.timeout(10)
def test_metadata_dev_zero_is_refused_without_reading(cli, raw):
    result = cli("preflight", raw, "--metadata", "/dev/zero", "--json")
    assert result.code == 3
    assert checks(result)["metadata_schema"]["code"] == "bad_metadata"
    assert "character device" in checks(result)["metadata_schema"]["message"]


def test_metadata_over_the_size_cap_is_refused(cli, raw, tmp_path):
    big = tmp_path / "big.json"
    big.write_bytes(b"{" + b" " * (2 << 20) + b"}")  # valid JSON, 2 MiB
    assert big.stat().st_size > MAX_METADATA_BYTES
    result = cli("preflight", raw, "--metadata", big, "--json")
    assert result.code == 3
    assert "too_big" in checks(result)["metadata_schema"]["message"]


def test_metadata_symlink_is_refused(cli, prepared, tmp_path):
    image, meta = prepared
    link = tmp_path / "link.json"
    link.symlink_to(meta)  # a good document behind a link: still not read through it
    result = cli("preflight", image, "--metadata", link, "--json")
    assert result.code == 3
    assert checks(result)["metadata_schema"]["status"] == "fail"
    assert "symlink" in checks(result)["metadata_schema"]["message"]


def test_metadata_that_is_not_utf8_fails_the_schema_check(cli, prepared, tmp_path):
    image, meta = prepared
    bad = tmp_path / "latin1.json"
    bad.write_bytes(meta.read_bytes().replace(b'"web-1"', b'"w\xe9b-1"'))
    result = cli("preflight", image, "--metadata", bad, "--json")
    assert result.code == 3  # was an EnvironmentProblem, exit 5: the file is there, it is just not UTF-8
    assert checks(result)["metadata_schema"]["code"] == "bad_metadata"
    assert "not UTF-8" in checks(result)["metadata_schema"]["message"]


# --- 2. wrong shapes and validate-before-use ----------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.update(image=[]),
        lambda d: d.update(status=[]),
        lambda d: d.update(registration="abc"),
        lambda d: d["status"].update(state=[]),
        lambda d: d["registration"].update(username=["ubuntu"]),
    ],
    ids=["image-list", "status-list", "registration-string", "state-list", "username-list"],
)
def test_metadata_of_the_wrong_shape_fails_the_schema_check(cli, prepared, tmp_path, change):
    image, meta = prepared
    result = cli("preflight", image, "--metadata", edited(meta, tmp_path, change), "--json")
    assert result.code == 3, result.err  # was 1: an internal error on bad input
    assert checks(result)["metadata_schema"]["status"] == "fail"
    assert checks(result)["metadata_matches"]["status"] == "skip"


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000 + "]" * 100_000,
        '{"a": ' * 100_000 + "1" + "}" * 100_000,
        "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1),
        "1" * 5000,  # Python refuses to convert an integer of 5000 digits: ValueError, was exit 1
        '{"schema": NaN}',
    ],
    ids=["deep-array", "deep-object", "one-too-deep", "huge-integer", "nan"],
)
def test_unparseable_metadata_fails_the_schema_check(cli, prepared, tmp_path, text):
    image, _ = prepared
    meta = tmp_path / "m.json"
    meta.write_text(text)
    result = cli("preflight", image, "--metadata", meta, "--json")
    assert result.code == 3, result.err
    assert checks(result)["metadata_schema"]["code"] == "bad_metadata"


def test_nesting_is_counted_outside_strings_only():
    deep = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert metadata.parse_document(deep.encode()) is not None
    tricky = {"text": '[[[{{{ \\" ' * 50, "list": [[["x]]]"]]]}
    assert metadata.parse_document(json.dumps(tricky).encode()) == tricky
    with pytest.raises(ValueError, match="nested 33 deep"):
        metadata.parse_document(("[" * 33 + "]" * 33).encode())


@pytest.mark.parametrize("value", [0, -5, True, "1794048", 1.5])
def test_a_bad_disk_size_in_metadata_is_never_used(cli, prepared, tmp_path, value):
    image, meta = prepared
    result = cli(
        "preflight",
        image,
        "--metadata",
        edited(meta, tmp_path, lambda d: d["image"].update(disk_size=value)),
        "--json",
    )
    assert result.code == 3
    disk = checks(result)["disk_size"]
    assert "from the metadata" not in disk["message"] and "upper bound" in disk["message"]
    failed = {name for name, c in checks(result).items() if c["status"] == "fail"}
    assert failed & {"metadata_schema", "metadata_matches"}


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda d: d["image"].update(file="other.qcow2"), "file"),
        (lambda d: d["image"].update(format="raw"), "format"),
        (
            lambda d: d["image"].update(virtual_size_mib=d["image"]["virtual_size_mib"] + 1),
            "virtual_size_mib",
        ),
        (lambda d: d["image"].update(virtual_size=d["image"]["virtual_size"] + 512), "virtual_size"),
        (lambda d: d["image"].update(file_size=d["image"]["file_size"] + 1), "file_size"),
        (lambda d: d["image"].update(sha256="0" * 64), "sha256"),
        (lambda d: d["image"].update(md5="0" * 32), "md5"),
        (lambda d: d["image"].update(compression_type="zstd"), "compression_type"),
        (lambda d: d["fits"].update(min_disk_mib=1), "fits.min_disk_mib"),
        (lambda d: d["image"].update(disk_size_mib=1), "disk_size_mib"),
        (lambda d: d["image"].update(disk_size=1 << 40, disk_size_mib=1 << 20), "disk_size"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_metadata_matches_names_every_mismatch(cli, prepared, tmp_path, change, named):
    image, meta = prepared
    result = cli("preflight", image, "--metadata", edited(meta, tmp_path, change), "--json")
    assert result.code == 3
    matches = checks(result)["metadata_matches"]
    assert matches["status"] == "fail" and matches["code"] == "metadata_mismatch"
    assert f"{named}:" in matches["message"]
    assert "from the metadata" not in checks(result)["disk_size"]["message"]


def test_every_mismatch_is_named_at_once(cli, prepared, tmp_path):
    image, meta = prepared
    renamed = tmp_path / "renamed.qcow2"
    shutil.copyfile(image, renamed)
    with renamed.open("ab") as f:
        f.write(b"\0" * 512)
    result = cli("preflight", renamed, "--metadata", meta, "--json")
    message = checks(result)["metadata_matches"]["message"]
    for name in ("file:", "file_size:", "sha256:", "md5:"):
        assert name in message


# --- 3. the exact disk_size from matching metadata, without touching the report ---------------


def test_matching_metadata_supplies_the_disk_size_check_not_the_report(cli, prepared):
    image, meta = prepared
    doc = json.loads(meta.read_text())
    result = preflight.preflight(str(image), metadata=str(meta))
    disk = next(c for c in result.checks if c.name == "disk_size")
    assert disk.status == "pass"
    assert disk.message.startswith("1.7 MiB of non-zero data (exact, from the metadata of this very file)")
    assert doc["image"]["disk_size"] == 1794048 and doc["image"]["disk_size_exact"] is True


def test_a_disk_size_other_than_the_exact_scan_is_a_mismatch_not_a_warning(cli, tmp_path):
    """For raw our own count is exact: a document claiming 60 GiB of data cannot make it warn."""
    image = sparse_raw(tmp_path / "b.raw", 1 << 20, {0: b"x" * 4096})
    assert cli("metadata", image, *REG).code == 0
    meta = image.with_name("b.raw.json")
    lie = edited(meta, tmp_path, lambda d: d["image"].update(disk_size=60 << 30, disk_size_mib=60 << 10))
    result = cli("preflight", image, "--metadata", lie, "--json")
    assert checks(result)["disk_size"] == {
        "name": "disk_size",
        "status": "pass",
        "code": None,
        "message": "4.0 KiB of non-zero data",
    }
    assert (
        "disk_size: the metadata has 64424509440, this file 4096"
        in checks(result)["metadata_matches"]["message"]
    )


# --- 4. one description of the registration body ------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        lambda r: r.update(min_ram=0),
        lambda r: r.update(min_ram=True),
        lambda r: r.update(min_ram="512"),
        lambda r: r.update(public="false"),
        lambda r: r.update(http_url="ftp://example.com/x"),
        lambda r: r.update(http_url="https://example.com/a b"),
        lambda r: r.update(username="Root!"),
        lambda r: r.update(name=""),
        lambda r: r.update(name="   "),
        lambda r: r.update(arch="amd64"),
        lambda r: r.pop("compatibility_mode"),
    ],
)
def test_preflight_checks_the_registration_against_the_schema(cli, prepared, tmp_path, change):
    image, meta = prepared
    bad = edited(meta, tmp_path, lambda d: change(d["registration"]))
    result = cli("preflight", image, "--metadata", bad, "--json")
    assert result.code == 3
    assert checks(result)["metadata_registration"]["status"] == "fail"
    assert checks(result)["metadata_schema"]["status"] == "fail"


def test_a_draft_is_valid_but_not_ready_for_upload(cli, prepared, tmp_path):
    image, meta = prepared
    draft = edited(meta, tmp_path, lambda d: d["status"].update(state="creating"))
    result = cli("preflight", image, "--metadata", draft, "--json")
    assert checks(result)["metadata_schema"]["status"] == "pass"
    registration_check = checks(result)["metadata_registration"]
    assert registration_check["status"] == "fail" and "status is 'creating'" in registration_check["message"]


def required_keys(typed: Any) -> frozenset[str]:
    """A TypedDict's required keys (its __required_keys__ misses Required[] under PEP 563)."""
    hints = get_type_hints(typed, include_extras=True)
    return frozenset(k for k, hint in hints.items() if typed.__total__ or get_origin(hint) is Required)


def test_the_types_and_the_cli_table_follow_the_schema():
    defs = schema()["$defs"]
    Draft202012Validator.check_schema(schema())
    pairs = [
        (metadata.RegistrationBody, defs["registration"]),
        (metadata.ImageFacts, defs["image"]),
        (metadata.Fits, defs["fits"]),
        (metadata.Status, defs["status"]),
        (metadata.Tool, defs["tool"]),
        (metadata.MetadataDocument, schema()),
    ]
    for typed, part in pairs:
        assert list(get_type_hints(typed)) == list(part["properties"]), typed
        assert required_keys(typed) == frozenset(part.get("required", ())), typed
    assert set(metadata._OPTIONS) == set(defs["registration"]["properties"])


@pytest.mark.parametrize(
    ("kwargs", "valid"),
    [
        ({}, True),
        ({"username": "core", "min_ram": 512, "url": "https://h.example/x?sig=1&e=2"}, True),
        ({"username": "_svc-1"}, True),
        ({"username": "a" * 33}, False),
        ({"min_ram": 0}, False),
        ({"url": "https://?x"}, False),
        ({"url": "https://h/\u00e9"}, False),
    ],
)
def test_registration_accepts_exactly_what_the_schema_does(kwargs, valid):
    args: dict[str, Any] = {"name": "n", "arch": "x86_64"} | kwargs
    try:
        body = registration(**args).body
    except UsageProblem:
        assert not valid
        return
    assert valid and metadata.registration_problems({"registration": body}) == []


def test_a_document_without_username_gets_a_note(cli, raw):
    result = cli("metadata", raw, "--name", "n", "--arch", "x86_64")
    assert result.code == 0
    assert "username is missing" in result.err and "preflight will fail" in result.err


# --- 5. no control characters, escapes, bidi or undecodable bytes in text ---------------------

UNSAFE = ["\x1b[2J", "\x07", "\x00", "\x7f", "\x85", "\u202e", "\u2066", "\u200f", "\udcff"]


@pytest.mark.parametrize("bad", UNSAFE, ids=[f"U+{ord(c[0]):04X}" for c in UNSAFE])
@pytest.mark.parametrize(
    ("option", "code"),
    [("--name", "bad_name"), ("--description", "bad_description"), ("--username", "bad_username")],
)
def test_unsafe_text_is_a_usage_error_naming_the_option(cli, raw, option, code, bad):
    args = {"--name": "n", "--arch": "x86_64"} | {option: f"ab{bad}c"}
    result = cli("metadata", raw, *[x for kv in args.items() for x in kv], "--json")
    assert result.code == 2
    assert result.json["error"]["code"] == code
    assert result.err.count(option) == 1 and "control characters" in result.err
    assert bad not in result.err and bad not in result.out
    assert not raw.with_name("a.raw.json").exists()


def test_undecodable_bytes_on_a_real_command_line_are_refused(raw):
    proc = subprocess.run(
        [sys.executable, "-m", "imagetool", "metadata", str(raw), "--name", b"caf\xe9", "--arch", "x86_64"],
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert b"--name" in proc.stderr and b"U+DCE9" in proc.stderr
    assert not raw.with_name("a.raw.json").exists()


def test_name_whitespace_controls_are_refused_not_stripped():
    for bad in ("name\x1f", "\x85name", "name\x1c"):  # str.strip() would silently drop these
        with pytest.raises(UsageProblem, match="--name must not contain"):
            registration(name=bad, arch="x86_64")


@pytest.mark.parametrize("bad", UNSAFE, ids=[f"U+{ord(c[0]):04X}" for c in UNSAFE])
@pytest.mark.parametrize("key", ["name", "description", "username"])
def test_the_schema_refuses_unsafe_text_too(cli, prepared, tmp_path, key, bad):
    image, meta = prepared
    doc = json.loads(meta.read_text())
    doc["registration"][key] = f"ab{bad}c"
    assert any("contains U+" in e for e in schema_errors(doc))
    bad_meta = tmp_path / "bad.json"
    bad_meta.write_text(json.dumps(doc))  # ASCII with \u escapes: even a lone surrogate fits
    result = cli("preflight", image, "--metadata", bad_meta, "--json")
    assert result.code == 3 and checks(result)["metadata_schema"]["status"] == "fail"
    assert bad not in result.err


def test_schema_messages_never_carry_raw_controls(cli, prepared, tmp_path):
    image, meta = prepared
    escape = "\x1b]0;pwned\x07"
    bad = edited(meta, tmp_path, lambda d: d["registration"].update({escape: 1}))
    result = cli("preflight", image, "--metadata", bad, "--junit", tmp_path / "j.xml", "--json")
    assert result.code == 3
    assert escape not in result.out and escape not in result.err
    assert "unknown field" in checks(result)["metadata_registration"]["message"]
    assert "\x1b" not in (tmp_path / "j.xml").read_text()


# --- 6. no output may be an input --------------------------------------------------------------


def test_metadata_output_that_is_the_image_is_refused(cli, raw):
    before = sha256(raw)
    result = cli("metadata", raw, *REG, "-o", raw, "--force", "--json")
    assert result.code == 2 and result.json["error"]["code"] == "output_is_input"
    assert sha256(raw) == before


def test_metadata_output_that_is_a_hard_link_to_the_image_is_refused(cli, raw, tmp_path):
    link = tmp_path / "link.json"
    os.link(raw, link)
    before = sha256(raw)
    result = cli("metadata", raw, *REG, "-o", link, "--force", "--json")
    assert result.code == 2 and result.json["error"]["code"] == "output_is_input"
    assert sha256(raw) == before


def test_metadata_output_that_is_a_symlink_is_refused(cli, raw, tmp_path):
    link = tmp_path / "link.json"
    link.symlink_to(raw)
    result = cli("metadata", raw, *REG, "-o", link, "--force", "--json")
    assert result.code == 2 and result.json["error"]["code"] == "output_symlink"
    assert link.is_symlink() and sha256(raw) == sha256(SAMPLE)


def test_metadata_output_in_a_missing_directory(cli, raw, tmp_path):
    result = cli("metadata", raw, *REG, "-o", tmp_path / "nope" / "m.json", "--json")
    assert result.code == 5 and result.json["error"]["code"] == "no_directory"


def test_the_output_is_checked_before_the_image_is_inspected(raw, monkeypatch):
    raw.with_name("a.raw.json").write_text("keep")

    def inspected(*_: object) -> None:
        raise AssertionError("inspected before the output was checked")

    monkeypatch.setattr(metadata, "inspect_source", inspected)
    reg = registration(name="n", arch="x86_64")
    with pytest.raises(UsageProblem, match="--force"):
        metadata.write_metadata(str(raw), reg)


def _read_only_bind_works(directory: Path) -> bool:
    probe = subprocess.run(
        [
            "unshare",
            "-m",
            "sh",
            "-c",
            'mount --bind "$1" "$1" && mount -o remount,ro,bind "$1"',
            "sh",
            directory,
        ],
        capture_output=True,
    )
    return probe.returncode == 0


def test_metadata_output_in_a_read_only_directory(raw, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    if shutil.which("unshare") is None or not _read_only_bind_works(ro):
        pytest.skip(
            "no read-only bind mount here (needs unshare and CAP_SYS_ADMIN); chmod does not stop root"
        )
    script = 'mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" && shift && exec "$@"'
    command = [
        sys.executable,
        "-m",
        "imagetool",
        "metadata",
        str(raw),
        *REG,
        "-o",
        str(ro / "m.json"),
        "--json",
    ]
    # a private mount namespace: the read-only mount vanishes with the child
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, "sh", ro, *command], capture_output=True, text=True
    )
    assert proc.returncode == 5, proc.stderr
    assert json.loads(proc.stdout)["error"]["code"] == "read_only"
    assert list(ro.iterdir()) == []


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_concurrent_metadata_runs_leave_one_valid_document(tmp_path):
    image = sparse_raw(tmp_path / "small.raw", 1 << 20, {4096: b"data" * 1024})
    target = tmp_path / "m.json"
    command = [sys.executable, "-m", "imagetool", "metadata", str(image), *REG, "--force", "-o", str(target)]

    def run(_: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run(command, capture_output=True, text=True, timeout=240)

    with concurrent.futures.ThreadPoolExecutor(max_workers=12) as pool:
        runs = list(pool.map(run, range(12)))
    assert [p.returncode for p in runs] == [0] * 12, [p.stderr for p in runs if p.returncode]
    assert schema_errors(json.loads(target.read_text())) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "small.raw"]  # no temp files left


def test_output_names_up_to_255_bytes(cli, raw, tmp_path):
    longest = tmp_path / ("m" * 250 + ".json")
    assert len(longest.name.encode()) == 255
    assert cli("metadata", raw, *REG, "-o", longest).code == 0
    assert json.loads(longest.read_text())["schema"] == "imagetool.metadata/1"
    too_long = tmp_path / ("m" * 251 + ".json")
    result = cli("metadata", raw, *REG, "-o", too_long, "--json")
    assert result.code == 2 and result.json["error"]["code"] == "name_too_long"


# --- 7. frozen Report and Qcow2Facts ----------------------------------------------------------


def test_metadata_of_a_qcow2_reads_its_qcow2_facts(cli, prepared, tmp_path):
    image, _ = prepared
    copy = tmp_path / "c.qcow2"
    shutil.copyfile(image, copy)
    result = cli("metadata", copy, *REG, "--json")
    assert result.code == 0, result.err  # was exit 1: 'Qcow2Facts' object has no attribute 'get'
    facts = result.json["image"]
    assert facts["qcow2_compat"] == "1.1" and facts["compression_type"] == "zlib"
    assert facts["disk_size_exact"] is False  # compressed: the qcow2 alone gives an upper bound


# --- 8. the registration API is described in this repository ----------------------------------


def test_the_registration_api_reference_is_ours():
    doc = ROOT / "docs" / "registration-api.md"
    assert doc.is_file() and "POST /1.0/images" in doc.read_text()
    assert metadata.__doc__ is not None and "docs/registration-api.md" in metadata.__doc__
    for path in ("imagetool/metadata.py", "imagetool/preflight.py", "imagetool/schemas/metadata.schema.json"):
        text = (ROOT / path).read_text()
        outside = "/".join(("shared", ""))  # the team's notes outside this repository
        assert outside not in text, path
