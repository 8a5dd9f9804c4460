"""`imagetool upload` against a real OpenStack Swift on 127.0.0.1 (tests/swift), no mocks.

The test cluster's max_file_size is 8 MiB, so images above it go up as Static
Large Objects; `--segment-size 1M` makes many segments of a small image.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest


def copy_of(images: dict[str, Path], which: str, tmp_path: Path) -> Path:
    """The prepared image and its JSON, copied into this test's directory."""
    source = images[which]
    target = tmp_path / source.name
    shutil.copyfile(source, target)
    shutil.copyfile(f"{source}.json", f"{target}.json")
    return target


def container() -> str:
    return f"c-{uuid.uuid4().hex[:12]}"


def doc_of(image: Path) -> dict[str, Any]:
    return json.loads(Path(f"{image}.json").read_text())


def fetch(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def swift_request(
    cluster: Any, method: str, path: str = "", **headers: str
) -> tuple[int, dict[str, str], bytes]:
    """A plain HTTP request to the test account (tempauth v1 login first): what a user would see."""
    login = urllib.request.Request(
        cluster.auth_url, headers={"X-Auth-User": cluster.user, "X-Auth-Key": cluster.key}
    )
    with urllib.request.urlopen(login, timeout=30) as response:
        token, storage = response.headers["X-Auth-Token"], response.headers["X-Storage-Url"]
    request = urllib.request.Request(
        f"{storage}{path}", method=method, headers={"X-Auth-Token": token, **headers}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), b""


def listing(cluster: Any, name: str) -> list[dict[str, Any]]:
    status, _, body = swift_request(cluster, "GET", f"/{name}?format=json")
    return json.loads(body) if status == 200 else []


def account_key(cluster: Any) -> str:
    _, headers, _ = swift_request(cluster, "HEAD")
    return {k.lower(): v for k, v in headers.items()}.get("x-account-meta-temp-url-key", "")


def all_text(tmp_path: Path, *streams: str) -> str:
    """Every stream and every file under tmp_path, for grepping secrets."""
    files = [p.read_bytes().decode("utf-8", "replace") for p in tmp_path.rglob("*") if p.is_file()]
    return "\n".join([*streams, *files])


def test_one_piece_upload_signs_a_url_that_returns_exactly_the_image(
    cli, swift_env, swift_cluster, images, tmp_path
):
    image = copy_of(images, "small", tmp_path)
    c = container()
    result = cli("upload", image, "--container", c, "--set-temp-url-key", "--json")
    assert result.code == 0, result.err
    out = result.json
    assert out["schema"] == "imagetool.upload/1" and out["ok"] is True
    assert out["record"]["segments"] == 0 and out["record"]["segment_container"] is None
    assert out["sent_segments"] == 1
    doc = doc_of(image)
    url = doc["registration"]["http_url"]
    assert url == out["url"] and doc["upload"] == out["record"]
    assert doc["upload"]["etag"] == doc["image"]["md5"]  # one piece: Swift's ETag is the file's md5
    assert doc["upload"]["digest"] == "sha512"  # the strongest digest the cluster's /info allows
    assert "--url " + f"'{url}'" in doc["register_command"] and "ACCOUNT" not in doc["register_command"]
    assert out["register_command"] == doc["register_command"]  # printed complete, runnable
    checked = cli("preflight", image, "--metadata", f"{image}.json", "--no-guest", "--json")
    assert (
        checked.code == 0 and {c["name"]: c["status"] for c in checked.json["checks"]}["upload_url"] == "pass"
    )
    status, body = fetch(url)
    assert status == 200 and sha256(body) == doc["image"]["sha256"] == sha256(image.read_bytes())
    key = account_key(swift_cluster)
    assert len(key) == 64
    assert key not in all_text(tmp_path, result.out, result.err)  # the temp-URL key is never written
    assert swift_env["ST_KEY"] not in json.dumps(doc)


def test_big_image_becomes_a_static_large_object(cli, swift_env, swift_cluster, images, tmp_path):
    image = copy_of(images, "big", tmp_path)
    c = container()
    result = cli(
        "upload", image, "-c", c, "--segment-size", "4M", "--threads", "3", "--set-temp-url-key", "--json"
    )
    assert result.code == 0, result.err
    record = result.json["record"]
    size = image.stat().st_size
    assert record["segments"] == -(-size // (4 << 20)) == result.json["sent_segments"]
    assert record["segment_container"] == f"{c}_segments"
    stored = listing(swift_cluster, f"{c}_segments")
    assert len(stored) == record["segments"] and sum(s["bytes"] for s in stored) == size
    status, body = fetch(doc_of(image)["registration"]["http_url"])
    assert status == 200 and body == image.read_bytes()


def test_over_the_clusters_object_limit_segments_even_with_a_bigger_segment_size(
    cli, swift_env, images, tmp_path
):
    image = copy_of(images, "big", tmp_path)
    result = cli("upload", image, "-c", container(), "--set-temp-url-key", "--json")  # default 1G segments
    assert result.code == 0, result.err
    assert result.json["record"]["segments"] == -(-image.stat().st_size // (8 << 20))  # the cluster's 8 MiB


def test_tampered_or_expired_url_is_refused_by_swift(cli, swift_env, images, tmp_path, monkeypatch):
    from imagetool import upload

    monkeypatch.setattr(upload, "SHORTEST_EXPIRY", timedelta(0))  # a URL that expires while we watch
    image = copy_of(images, "small", tmp_path)
    result = cli("upload", image, "-c", container(), "--expires", "1s", "--set-temp-url-key", "--json")
    assert result.code == 0, result.err
    url = result.json["url"]
    signature = url.split("temp_url_sig=")[1].split("&")[0]
    tampered = url.replace(signature, signature[:-2] + ("AA" if not signature.endswith("AA") else "BB"))
    assert fetch(tampered)[0] == 401
    time.sleep(max(0.0, int(url.rsplit("temp_url_expires=", 1)[1]) + 1 - time.time()))
    assert fetch(url)[0] == 401
    checked = cli("preflight", image, "--metadata", f"{image}.json", "--no-guest", "--strict", "--json")
    assert checked.code == 3
    assert {c["name"]: c["code"] for c in checked.json["checks"]}["upload_url"] == "url_expired"


def test_rerun_of_a_finished_upload_sends_nothing_and_signs_anew(cli, swift_env, images, tmp_path):
    image = copy_of(images, "big", tmp_path)
    c = container()
    first = cli("upload", image, "-c", c, "--segment-size", "4M", "--set-temp-url-key", "--json")
    assert first.code == 0, first.err
    again = cli("upload", image, "-c", c, "--segment-size", "4M", "--expires", "3d", "--json")
    assert again.code == 0, again.err
    assert again.json["reused"] is True and again.json["sent_bytes"] == 0
    assert again.json["record"]["expires_at"] != first.json["record"]["expires_at"]
    assert fetch(again.json["url"])[1] == image.read_bytes()


def test_verify_download_streams_it_back_through_the_temp_url(cli, swift_env, images, tmp_path):
    image = copy_of(images, "small", tmp_path)
    result = cli("upload", image, "-c", container(), "--verify-download", "--set-temp-url-key", "--json")
    assert result.code == 0, result.err
    assert result.json["record"]["verified_download"] is True


def _start_upload(image: Path, c: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "imagetool", "upload", str(image), "-c", c, "--segment-size", "1M",
         "--threads", "1", "--progress", "json", "--set-temp-url-key", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _wait_for_bytes(proc: subprocess.Popen[str], at_least: int) -> None:
    assert proc.stderr is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            raise AssertionError(f"the upload ended first: {proc.wait()}")
        if line.startswith("{") and json.loads(line)["done"] >= at_least:
            return
    raise AssertionError("the upload never got that far")


def test_upload_killed_midway_resumes_and_sends_only_the_missing_segments(cli, swift_env, images, tmp_path):
    image = copy_of(images, "big", tmp_path)
    c = container()
    segments = -(-image.stat().st_size // (1 << 20))
    proc = _start_upload(image, c)
    _wait_for_bytes(proc, 6 << 20)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert "upload" not in doc_of(image)  # nothing recorded: the upload did not finish
    result = cli("upload", image, "-c", c, "--segment-size", "1M", "--threads", "1", "--json")
    assert result.code == 0, result.err
    out = result.json
    assert out["kept_segments"] >= 5 and out["sent_segments"] == segments - out["kept_segments"]
    assert out["record"]["segments"] == segments
    assert fetch(out["url"])[1] == image.read_bytes()


def test_swift_stopped_midway_fails_with_exit_5_then_resumes(cli, swift_env, swift_cluster, images, tmp_path):
    image = copy_of(images, "big", tmp_path)
    c = container()
    proc = _start_upload(image, c, "--retries", "0", "--json")
    _wait_for_bytes(proc, 4 << 20)
    swift_cluster.stop_server("object")
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        swift_cluster.start_server("object")
    assert proc.returncode == 5, err
    failure = json.loads(out)
    assert failure["ok"] is False and failure["error"]["code"].startswith("swift_")
    assert "Traceback" not in err
    result = cli("upload", image, "-c", c, "--segment-size", "1M", "--threads", "1", "--json")
    assert result.code == 0, result.err
    assert result.json["kept_segments"] >= 3
    assert fetch(result.json["url"])[1] == image.read_bytes()


def test_wrong_credentials_exit_5_and_the_secret_appears_nowhere(
    cli, swift_env, images, tmp_path, monkeypatch
):
    secret = "WRONG-s3cr3t-Zq9xK"
    monkeypatch.setenv("ST_KEY", secret)
    image = copy_of(images, "small", tmp_path)
    before = Path(f"{image}.json").read_bytes()
    result = cli("upload", image, "-c", container(), "--retries", "0", "--json")
    assert result.code == 5
    assert result.json["error"]["code"] == "swift_unauthorized"
    assert "check your Swift credentials" in result.err
    assert secret not in all_text(tmp_path, result.out, result.err)
    assert Path(f"{image}.json").read_bytes() == before


def test_no_credentials_exit_5(cli, images, tmp_path, monkeypatch):
    for name in [n for n in os.environ if n.startswith(("ST_", "OS_"))]:
        monkeypatch.delenv(name)
    result = cli("upload", copy_of(images, "small", tmp_path), "-c", "x", "--json")
    assert result.code == 5 and result.json["error"]["code"] == "no_credentials"
    assert "ST_AUTH" in result.err


def test_an_account_without_a_temp_url_key_is_told_how_then_can_have_one(
    cli, swift_cluster, images, tmp_path, monkeypatch
):
    key = swift_cluster.users["other:user"]
    for name, value in (("ST_AUTH", swift_cluster.auth_url), ("ST_USER", "other:user"), ("ST_KEY", key)):
        monkeypatch.setenv(name, value)
    image = copy_of(images, "small", tmp_path)
    c = container()
    refused = cli("upload", image, "-c", c, "--json")
    assert refused.code == 5 and refused.json["error"]["code"] == "no_temp_url_key"
    assert "--set-temp-url-key" in refused.err and "upload" not in doc_of(image)
    done = cli("upload", image, "-c", c, "--set-temp-url-key", "--json")
    assert done.code == 0 and done.json["temp_url_key_set"] is True
    assert fetch(done.json["url"])[0] == 200


def test_what_preflight_fails_is_refused_before_a_byte_is_sent(
    cli, swift_env, swift_cluster, images, tmp_path
):
    image = copy_of(images, "small", tmp_path)
    meta = Path(f"{image}.json")
    doc = json.loads(meta.read_text())
    doc["image"]["sha256"] = "0" * 64
    meta.write_text(json.dumps(doc))
    c = container()
    result = cli("upload", image, "-c", c, "--set-temp-url-key", "--json")
    assert result.code == 3 and result.json["error"]["code"] == "metadata_mismatch"
    assert "preflight fails: metadata_matches" in result.err
    assert swift_request(swift_cluster, "HEAD", f"/{c}")[0] == 404  # not even the container was made


def test_an_unfinished_document_is_refused(cli, swift_env, images, tmp_path):
    image = copy_of(images, "small", tmp_path)
    meta = Path(f"{image}.json")
    doc = json.loads(meta.read_text())
    doc["status"] = {"state": "failed", "reason": {"code": "x", "message": "y"}}
    meta.write_text(json.dumps(doc))
    result = cli("upload", image, "-c", container(), "--json")
    assert result.code == 3 and "status is 'failed'" in result.err


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (("-c", "images"), "bad_container"),
        (("-c", "a/b"), "bad_container"),
        (("-c", "ok", "--segment-container", "ok"), "bad_container"),
        (("-c", "ok", "--expires", "yesterday"), "bad_time"),
        (("-c", "ok", "--expires", "2020-01-01T00:00Z"), "bad_time"),
        (("-c", "ok", "--expires", "31d"), "bad_time"),  # a bearer link to a private image: 30 days at most
        (("-c", "ok", "--expires", "99999999d"), "bad_time"),
        (("-c", "ok", "--expires", "0m"), "bad_duration"),
        (("-c", "ok", "--expires", "5m"), "bad_time"),  # register could never use it
        (("-c", "ok", "--object", "../victim/x"), "bad_object"),  # HTTP collapses it: another container
        (("-c", "ok", "--object", "."), "bad_object"),
        (("-c", "ok", "--object", "a/../../images/x"), "bad_object"),
        (("-c", ".."), "bad_container"),
        (("-c", "ok", "--object", "a\u202eb"), "bad_object"),
        (("-c", "ok", "--object", "/x"), "bad_object"),  # an empty path segment: proxies collapse it
        (("-c", "ok", "--object", "a//x"), "bad_object"),  # bidi override: not text for the document
        (("-c", "ok", "--threads", "0"), "bad_threads"),
        (("-c", "ok", "--segment-size", "1K"), "bad_segment_size"),
        (("-c", "ok", "--object", "a\x1bb"), "bad_object"),
    ],
)
def test_usage_errors_exit_2_before_anything_is_read(cli, images, tmp_path, args, code):
    image = copy_of(images, "small", tmp_path)
    before = Path(f"{image}.json").read_bytes()
    result = cli("upload", image, *args, "--json")
    assert result.code == 2, result.err
    assert result.json["error"]["code"] == code
    assert Path(f"{image}.json").read_bytes() == before


def test_object_names_with_spaces_and_unicode_survive_signing(cli, swift_env, images, tmp_path):
    image = copy_of(images, "small", tmp_path)
    result = cli(
        "upload", image, "-c", container(), "--object", "my image ü?#.qcow2", "--set-temp-url-key", "--json"
    )
    assert result.code == 0, result.err
    assert fetch(result.json["url"])[1] == image.read_bytes()


def test_a_new_image_under_the_same_name_removes_the_old_ones_segments(
    cli, swift_env, swift_cluster, images, tmp_path
):
    big, small = copy_of(images, "big", tmp_path), copy_of(images, "small", tmp_path)
    c = container()
    first = cli(
        "upload",
        big,
        "-c",
        c,
        "--object",
        "app.qcow2",
        "--segment-size",
        "4M",
        "--set-temp-url-key",
        "--json",
    )
    assert first.code == 0, first.err
    assert len(listing(swift_cluster, f"{c}_segments")) == first.json["record"]["segments"] > 1
    second = cli("upload", small, "-c", c, "--object", "app.qcow2", "--json")
    assert second.code == 0, second.err
    assert second.json["removed_segments"] == first.json["record"]["segments"]
    assert listing(swift_cluster, f"{c}_segments") == []
    assert fetch(second.json["url"])[1] == small.read_bytes()


def test_a_shared_segment_container_never_loses_another_objects_segments(cli, swift_env, images, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    first, second = copy_of(images, "big", a), copy_of(images, "small", b)
    shared, ca, cb = container(), container(), container()
    one = cli("upload", first, "-c", ca, "--segment-container", shared, "--segment-size", "4M",
              "--set-temp-url-key", "--json")  # fmt: skip
    assert one.code == 0, one.err
    two = cli("upload", second, "-c", cb, "--segment-container", shared, "--object", first.name, "--json")
    assert two.code == 0, two.err
    assert two.json["removed_segments"] == 0
    assert fetch(one.json["url"])[1] == first.read_bytes()


def test_a_forged_upload_record_is_not_trusted(cli, swift_env, images, tmp_path):
    small = copy_of(images, "small", tmp_path)
    big = copy_of(images, "big", tmp_path)
    c = container()
    done = cli("upload", small, "-c", c, "--object", "x", "--set-temp-url-key", "--json")
    assert done.code == 0, done.err
    meta = Path(f"{big}.json")
    doc = json.loads(meta.read_text())
    doc["upload"] = dict(done.json["record"], md5=doc["image"]["md5"])  # "this image is already there"
    meta.write_text(json.dumps(doc))
    again = cli("upload", big, "-c", c, "--object", "x", "--json")
    assert again.code == 0, again.err
    assert again.json["reused"] is False
    assert fetch(again.json["url"])[1] == big.read_bytes()


def test_upload_keeps_what_register_recorded(cli, swift_env, images, tmp_path):
    image = copy_of(images, "small", tmp_path)
    c = container()
    assert cli("upload", image, "-c", c, "--set-temp-url-key").code == 0
    meta = Path(f"{image}.json")
    doc = json.loads(meta.read_text())
    doc["library"] = {"api": "api.example", "status": "creating", "image_id": "img-abcde"}
    meta.write_text(json.dumps(doc))
    assert cli("upload", image, "-c", c, "--expires", "3d").code == 0
    assert json.loads(meta.read_text())["library"]["image_id"] == "img-abcde"


def held_lock(meta: Path) -> Any:
    """The lock a running upload or register holds on a document, taken here (close to release)."""
    import fcntl
    import hashlib

    name = hashlib.sha256(os.fsencode(meta.name)).hexdigest()[:16]
    held = (meta.parent / f".imagetool-lock-{name}").open("a")
    fcntl.flock(held, fcntl.LOCK_EX)
    return held


def test_a_second_run_on_the_same_image_is_told_busy(cli, swift_env, images, tmp_path):
    image = copy_of(images, "small", tmp_path)
    with held_lock(Path(f"{image}.json")):
        result = cli("upload", image, "-c", container(), "--set-temp-url-key", "--json")
    assert result.code == 5 and result.json["error"]["code"] == "busy"
    assert "upload" not in doc_of(image)


def test_the_image_changed_after_preflight_is_never_sent(
    cli, swift_env, swift_cluster, images, tmp_path, monkeypatch
):
    from imagetool import upload

    image = copy_of(images, "small", tmp_path)
    checked = upload._refuse_what_preflight_fails

    def check_then_write(path: str, meta: Path) -> None:  # the fault: a writer right after the check
        checked(path, meta)
        with open(path, "r+b") as f:
            f.seek(1 << 20)
            f.write(b"EVIL")

    monkeypatch.setattr(upload, "_refuse_what_preflight_fails", check_then_write)
    c = container()
    result = cli("upload", image, "-c", c, "--set-temp-url-key", "--json")
    assert result.code == 5 and result.json["error"]["code"] == "source_changed"
    assert "upload" not in doc_of(image)
    assert swift_request(swift_cluster, "HEAD", f"/{c}")[0] == 404


def test_an_object_name_too_long_for_segments_is_refused_before_sending(
    cli, swift_env, swift_cluster, images, tmp_path
):
    image = copy_of(images, "big", tmp_path)
    c = container()
    result = cli("upload", image, "-c", c, "--object", "x" * 1000, "--set-temp-url-key", "--json")
    assert result.code == 2 and result.json["error"]["code"] == "bad_object"
    assert swift_request(swift_cluster, "HEAD", f"/{c}")[0] == 404


def test_the_same_object_name_in_two_containers_sharing_segments_stays_whole(
    cli, swift_env, images, tmp_path
):
    big, small = copy_of(images, "big", tmp_path), copy_of(images, "small", tmp_path)
    shared, c3, c4 = container(), container(), container()
    seg = ("--object", "x", "--segment-container", shared, "--segment-size", "4M")
    first = cli("upload", big, "-c", c3, *seg, "--set-temp-url-key", "--json")
    assert first.code == 0, first.err
    other_doc = tmp_path / "other.json"
    shutil.copyfile(f"{big}.json", other_doc)
    second = cli("upload", big, "--metadata", other_doc, "-c", c4, *seg, "--json")
    assert second.code == 0 and second.json["kept_segments"] == 0  # c4's segments are its own
    third = cli("upload", small, "-c", c4, *seg, "--json")  # c4/x replaced by another image
    assert third.code == 0 and third.json["removed_segments"] == second.json["record"]["segments"]
    assert fetch(first.json["url"])[1] == big.read_bytes()  # c3/x untouched


def test_a_large_object_whose_segments_are_gone_is_sent_again(
    cli, swift_env, swift_cluster, images, tmp_path
):
    image = copy_of(images, "big", tmp_path)
    c = container()
    first = cli("upload", image, "-c", c, "--segment-size", "4M", "--set-temp-url-key", "--json")
    assert first.code == 0, first.err
    victim = listing(swift_cluster, f"{c}_segments")[0]["name"]
    assert swift_request(swift_cluster, "DELETE", f"/{c}_segments/{urllib.request.quote(victim)}")[0] == 204
    again = cli("upload", image, "-c", c, "--segment-size", "4M", "--json")
    assert again.code == 0, again.err
    assert again.json["reused"] is False and again.json["sent_segments"] == 1  # only the lost one
    assert fetch(again.json["url"])[1] == image.read_bytes()


def test_an_image_another_process_has_mapped_for_writing_is_not_sent(
    cli, swift_env, swift_cluster, images, tmp_path
):
    """Its writes through the mapping would not move the file's times: nothing after the fact could tell."""
    import mmap

    image = copy_of(images, "big", tmp_path)
    c = container()
    with image.open("r+b") as f, mmap.mmap(f.fileno(), 0):
        result = cli("upload", image, "-c", c, "--set-temp-url-key", "--json")
    assert result.code == 5 and result.json["error"]["code"] == "image_in_use"
    assert swift_request(swift_cluster, "HEAD", f"/{c}")[0] == 404


def test_a_segment_size_over_the_clusters_limit_still_uploads(cli, swift_env, images, tmp_path):
    image = copy_of(images, "big", tmp_path)
    result = cli("upload", image, "-c", container(), "--segment-size", "16M", "--set-temp-url-key", "--json")
    assert result.code == 0, result.err  # the prehash was cut at 16M, the plan at the cluster's 8M
    assert result.json["record"]["segments"] == -(-image.stat().st_size // (8 << 20))
    assert fetch(result.json["url"])[1] == image.read_bytes()


def test_a_key_with_a_control_character_is_not_echoed_in_any_form(
    cli, swift_env, images, tmp_path, monkeypatch
):
    monkeypatch.setenv("ST_KEY", "testing\r")  # a CRLF key file: libraries show it as 'testing\\r'
    result = cli("upload", copy_of(images, "small", tmp_path), "-c", container(), "--retries", "0", "--json")
    assert result.code == 5
    assert "testing" not in result.out + result.err
