"""`imagetool register` and `publish`: real up to the API boundary.

The image goes to the real Swift on 127.0.0.1; the image API is the stand-in
(tests/standin_api.py), which downloads the temp URL from that Swift and runs
qemu-img info on what it got, as the library does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import sparse_raw
from test_upload import all_text, container, copy_of, doc_of, held_lock

from imagetool import library, register
from imagetool.durations import iso

SECRET_MARK = "s3cret-standin"


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The retry and poll schedules, shortened: the tests check what happens, not how long it waits."""
    monkeypatch.setattr(library, "BACKOFF", (0.05, 0.05))
    monkeypatch.setattr(register, "POLL", (0.1,))
    monkeypatch.setattr(register, "POST_WAITS", (0.05, 0.05))


def uploaded(cli: Any, images: dict[str, Path], tmp_path: Path, *extra: str) -> Path:
    image = copy_of(images, "small", tmp_path)
    result = cli("upload", image, "-c", container(), "--set-temp-url-key", "--json", *extra)
    assert result.code == 0, result.err
    return image


def test_register_and_wait_ends_available_with_the_librarys_sizes(cli, swift_env, standin, images, tmp_path):
    image = uploaded(cli, images, tmp_path)
    meta = f"{image}.json"
    result = cli("register", meta, "--wait", "--json")
    assert result.code == 0, result.err
    out = result.json
    assert out["schema"] == "imagetool.register/1" and out["status"] == "available" and out["created"] is True
    doc = doc_of(image)
    assert doc["library"]["image_id"] == out["image_id"] and doc["library"]["status"] == "available"
    assert doc["library"]["virtual_size_mib"] == doc["image"]["virtual_size_mib"] == 64
    state = standin.state()
    assert state["post_images_requests"] == 1 and state["images_created"] == 1
    download = state["downloads"][out["image_id"]]
    assert download["http_status"] == 200 and download["sha256"] == doc["image"]["sha256"]
    assert SECRET_MARK not in all_text(tmp_path, result.out, result.err)


def test_register_twice_never_creates_a_second_image(cli, swift_env, standin, images, tmp_path):
    meta = f"{uploaded(cli, images, tmp_path)}.json"
    first = cli("register", meta, "--json")
    assert first.code == 0 and first.json["status"] == "creating"
    again = cli("register", meta, "--wait", "--json")
    assert again.code == 0, again.err
    assert again.json["image_id"] == first.json["image_id"] and again.json["created"] is False
    assert again.json["status"] == "available"
    assert standin.state()["post_images_requests"] == 1


def test_the_body_sent_is_exactly_the_documents_registration(cli, swift_env, standin, images, tmp_path):
    meta = f"{uploaded(cli, images, tmp_path)}.json"
    result = cli("register", meta, "--json")
    assert result.code == 0, result.err
    registration = json.loads(Path(meta).read_text())["registration"]
    assert standin.state()["bodies"] == [registration]  # unwrapped, unset keys left out, http_url set
    assert set(registration) == {"name", "username", "arch", "compatibility_mode", "public", "http_url"}


def test_wrong_api_credentials_exit_5_and_the_secret_is_nowhere(
    cli, swift_env, standin, images, tmp_path, monkeypatch
):
    meta = f"{uploaded(cli, images, tmp_path)}.json"
    before = Path(meta).read_bytes()
    secret = "not-the-s3cret-Wq7"
    monkeypatch.setenv("BRIGHTBOX_CLIENT_SECRET", secret)
    result = cli("register", meta, "--json")
    assert result.code == 5 and result.json["error"]["code"] == "api_unauthorized"
    assert "check your API client credentials" in result.err
    assert secret not in all_text(tmp_path, result.out, result.err)
    assert Path(meta).read_bytes() == before
    assert standin.state()["post_images_requests"] == 0


def test_no_api_credentials_exit_5(cli, swift_env, images, tmp_path, monkeypatch):
    meta = f"{uploaded(cli, images, tmp_path)}.json"
    for name in ("BRIGHTBOX_CLIENT_ID", "BRIGHTBOX_CLIENT_SECRET", "BRIGHTBOX_API_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    result = cli("register", meta, "--json")
    assert result.code == 5 and result.json["error"]["code"] == "no_credentials"


def test_brightbox_cli_config_file_is_used(cli, swift_env, standin, images, tmp_path, monkeypatch):
    meta = f"{uploaded(cli, images, tmp_path)}.json"
    for name in ("BRIGHTBOX_CLIENT_ID", "BRIGHTBOX_CLIENT_SECRET", "BRIGHTBOX_API_URL"):
        monkeypatch.delenv(name)
    config = tmp_path / "home" / ".brightbox" / "config"
    config.parent.mkdir(parents=True)
    config.write_text(
        f"[core]\ndefault_client = {standin.client_id}\n\n[{standin.client_id}]\n"
        f"api_url = {standin.url}\nclient_id = {standin.client_id}\nsecret = {standin.client_secret}\n"
    )
    result = cli("register", meta, "--json")
    assert result.code == 0, result.err


def test_the_library_failing_the_image_exits_3(cli, swift_env, standin, images, tmp_path):
    meta = f"{uploaded(cli, images, tmp_path)}.json"
    standin.arm(reject_download=True)
    result = cli("register", meta, "--wait", "--json")
    assert result.code == 3 and result.json["error"]["code"] == "registration_failed"
    assert doc_of(Path(meta[: -len(".json")]))["library"]["status"] == "failed"


def test_an_api_4xx_exits_3_with_the_apis_words(cli, swift_env, standin, images, tmp_path):
    meta = f"{uploaded(cli, images, tmp_path)}.json"
    standin.arm(get_image=404)
    result = cli("register", meta, "--wait", "--json")
    assert result.code == 3 and result.json["error"]["code"] == "api_refused"
    assert "the API answered 404" in result.err


def test_an_unanswered_post_is_adopted_not_repeated(cli, swift_env, standin, images, tmp_path):
    meta = f"{uploaded(cli, images, tmp_path)}.json"
    standin.arm(post_images="drop_after_create")
    result = cli("register", meta, "--wait", "--json")
    assert result.code == 0, result.err
    assert result.json["adopted"] is True and result.json["status"] == "available"
    state = standin.state()
    assert state["post_images_requests"] == 1 and state["images_created"] == 1


def test_a_500_before_anything_was_made_is_retried_once_made(cli, swift_env, standin, images, tmp_path):
    meta = f"{uploaded(cli, images, tmp_path)}.json"
    standin.arm(post_images="500_before_create")
    result = cli("register", meta, "--json")
    assert result.code == 0, result.err
    state = standin.state()
    assert state["post_images_requests"] == 2 and state["images_created"] == 1


def test_api_unreachable_exits_5_and_records_the_attempt(cli, swift_env, images, tmp_path, monkeypatch):
    meta = f"{uploaded(cli, images, tmp_path)}.json"
    monkeypatch.setenv("BRIGHTBOX_API_URL", "http://127.0.0.1:9")  # discard: nothing listens
    monkeypatch.setenv("BRIGHTBOX_CLIENT_ID", "cli-x")
    monkeypatch.setenv("BRIGHTBOX_CLIENT_SECRET", "x-s3cret-x")
    result = cli("register", meta, "--json")
    assert result.code == 5 and result.json["error"]["code"] == "api_unreachable"
    assert "x-s3cret-x" not in result.err + result.out


def test_an_expired_url_is_refused_before_the_api_is_asked(
    cli, swift_env, standin, images, tmp_path, monkeypatch
):
    from imagetool import upload

    monkeypatch.setattr(upload, "SHORTEST_EXPIRY", timedelta(0))  # upload itself refuses a URL this short
    meta = f"{uploaded(cli, images, tmp_path, '--expires', '5m')}.json"
    result = cli("register", meta, "--json")
    assert result.code == 5 and result.json["error"]["code"] == "url_expired"
    assert "run imagetool upload again" in result.err
    assert standin.state()["post_images_requests"] == 0


def test_a_document_not_uploaded_is_refused(cli, standin, images, tmp_path):
    image = copy_of(images, "small", tmp_path)
    result = cli("register", f"{image}.json", "--json")
    assert result.code == 3 and result.json["error"]["code"] == "not_uploaded"
    assert standin.state()["post_images_requests"] == 0


def test_a_bad_document_is_refused(cli, standin, tmp_path):
    meta = tmp_path / "x.json"
    meta.write_text('{"schema": "imagetool.metadata/1"}')
    result = cli("register", meta, "--json")
    assert result.code == 3 and result.json["error"]["code"] == "bad_metadata"


# --- publish ---------------------------------------------------------------------------------


def raw_disk(tmp_path: Path) -> Path:
    return sparse_raw(tmp_path / "web.raw", 32 << 20, {1 << 20: os.urandom(1 << 20) + b"web" * 300_000})


PUBLISH = (
    "--name",
    "web",
    "--arch",
    "x86_64",
    "--username",
    "debian",
    "--no-from-guest",
    "--set-temp-url-key",
)


def test_publish_goes_from_a_raw_disk_to_an_available_image(cli, swift_env, standin, tmp_path):
    raw = raw_disk(tmp_path)
    result = cli("publish", raw, "-c", container(), *PUBLISH, "--wait", "--json")
    assert result.code == 0, result.err
    out = result.json
    assert out["schema"] == "imagetool.publish/1"
    assert out["steps"] == {"prepare": "done", "upload": "done", "register": "done"}
    assert out["status"] == "available"
    doc = json.loads((tmp_path / "web.qcow2.json").read_text())
    assert doc["library"]["image_id"] == out["image_id"] and doc["upload"]["object"] == "web.qcow2"
    again = cli("publish", raw, "-c", container(), *PUBLISH, "--json")
    assert again.code == 0, again.err
    assert again.json["steps"] == {"prepare": "skipped", "upload": "skipped", "register": "skipped"}
    assert standin.state()["post_images_requests"] == 1


def test_publish_interrupted_after_upload_then_rerun_registers_once(
    cli, swift_env, standin, tmp_path, monkeypatch
):
    raw = raw_disk(tmp_path)
    c = container()
    monkeypatch.setenv("BRIGHTBOX_API_URL", "http://127.0.0.1:9")
    failed = cli("publish", raw, "-c", c, *PUBLISH, "--json")
    assert failed.code == 5, failed.err
    doc = json.loads((tmp_path / "web.qcow2.json").read_text())
    assert "upload" in doc and "library" not in doc  # the API never answered: nothing was sent
    monkeypatch.setenv("BRIGHTBOX_API_URL", standin.url)
    again = cli("publish", raw, "-c", c, *PUBLISH, "--wait", "--json")
    assert again.code == 0, again.err
    assert again.json["steps"] == {"prepare": "skipped", "upload": "skipped", "register": "done"}
    assert standin.state()["images_created"] == 1


def test_publish_killed_during_upload_resumes_and_registers_once(swift_env, standin, tmp_path):
    raw = sparse_raw(tmp_path / "big.raw", 64 << 20, {0: os.urandom(20 << 20)})
    args = [sys.executable, "-m", "imagetool", "publish", str(raw), "-c", container(), *PUBLISH,
            "--segment-size", "1M", "--upload-threads", "1"]  # fmt: skip
    proc = subprocess.Popen([*args, "--progress", "json"], stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:  # prepare's progress counts 64 MiB of guest disk, upload's the qcow2
        if line.startswith("{") and (p := json.loads(line))["total"] != 64 << 20 and p["done"] >= 4 << 20:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert "upload" not in json.loads((tmp_path / "big.qcow2.json").read_text())
    result = subprocess.run([*args, "--json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["steps"] == {"prepare": "skipped", "upload": "done", "register": "done"}
    assert out["status"] == "creating" and out["image_id"] in standin.state()["images"]
    assert standin.state()["images_created"] == 1


def test_publish_with_other_registration_fields_needs_force(cli, swift_env, standin, tmp_path):
    raw = raw_disk(tmp_path)
    c = container()
    assert cli("publish", raw, "-c", c, *PUBLISH, "--json").code == 0
    changed = cli("publish", raw, "-c", c, *PUBLISH[:1], "other", *PUBLISH[2:], "--json")
    assert changed.code == 2 and changed.json["error"]["code"] == "changed_registration"


def test_a_run_that_died_after_its_post_is_adopted_by_the_next(cli, swift_env, standin, images, tmp_path):
    """The document says `registering` (the POST went out, its answer was never recorded): look first."""
    meta, doc = registering(cli, images, tmp_path)
    made = post_directly(standin, doc["registration"])
    result = cli("register", meta, "--json")
    assert result.code == 0, result.err
    assert result.json["adopted"] is True and result.json["image_id"] == made
    assert standin.state()["images_created"] == 1


def test_an_image_that_differs_in_any_field_is_not_adopted(cli, swift_env, standin, images, tmp_path):
    meta, doc = registering(cli, images, tmp_path)
    other = post_directly(standin, dict(doc["registration"], description="another document's image"))
    result = cli("register", meta, "--json")
    assert result.code == 0, result.err
    assert result.json["adopted"] is False and result.json["created"] is True
    assert result.json["image_id"] != other


def registering(cli: Any, images: dict[str, Path], tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """An uploaded document as a run leaves it that died after its POST went out."""
    meta = Path(f"{uploaded(cli, images, tmp_path)}.json")
    doc = json.loads(meta.read_text())
    doc["library"] = {"api": "x", "status": "registering", "attempt_started": iso(datetime.now(UTC))}
    meta.write_text(json.dumps(doc))
    return meta, doc


def post_directly(standin: Any, body: dict[str, Any]) -> str:
    """POST /1.0/images the way another client (or a run that died after sending) does: the new id."""
    import urllib.request

    token_request = urllib.request.Request(
        f"{standin.url}/token",
        data=b"grant_type=client_credentials",
        headers={
            "Authorization": "Basic " + __import__("base64").b64encode(b"cli-test1:s3cret-standin").decode()
        },
    )
    with urllib.request.urlopen(token_request) as response:
        token = json.loads(response.read())["access_token"]
    post = urllib.request.Request(
        f"{standin.url}/1.0/images",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(post) as response:
        return str(json.loads(response.read())["id"])


def test_an_object_replaced_since_the_upload_is_not_registered(cli, swift_env, standin, images, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    mine, theirs = copy_of(images, "small", a), copy_of(images, "big", b)
    c = container()
    assert cli("upload", mine, "-c", c, "--object", "disk.qcow2", "--set-temp-url-key").code == 0
    assert cli("upload", theirs, "-c", c, "--object", "disk.qcow2").code == 0  # same name, other image
    result = cli("register", f"{mine}.json", "--json")
    assert result.code == 3 and result.json["error"]["code"] == "url_not_this_image"
    assert standin.state()["post_images_requests"] == 0


def test_register_is_busy_while_another_run_holds_the_document_even_with_the_image_moved(
    cli, swift_env, standin, images, tmp_path
):
    image = uploaded(cli, images, tmp_path)
    with held_lock(Path(f"{image}.json")):
        image.rename(tmp_path / "moved.qcow2")  # the lock is the document's, not the image's
        result = cli("register", f"{image}.json", "--json")
    assert result.code == 5 and result.json["error"]["code"] == "busy"
    assert standin.state()["post_images_requests"] == 0
    assert cli("register", f"{image}.json", "--json").code == 0  # register needs only the document


def test_publish_rerun_with_another_object_name_uploads_again(cli, swift_env, standin, tmp_path):
    raw = raw_disk(tmp_path)
    c = container()
    assert cli("publish", raw, "-c", c, *PUBLISH, "--json").code == 0
    doc = json.loads((tmp_path / "web.qcow2.json").read_text())
    doc.pop("library")  # as if register had not run yet
    (tmp_path / "web.qcow2.json").write_text(json.dumps(doc))
    again = cli("publish", raw, "-c", c, *PUBLISH, "--object", "renamed.qcow2", "--json")
    assert again.code == 0, again.err
    assert again.json["steps"]["upload"] == "done"
    assert json.loads((tmp_path / "web.qcow2.json").read_text())["upload"]["object"] == "renamed.qcow2"


def test_an_image_that_was_there_before_the_post_is_never_adopted(cli, swift_env, standin, images, tmp_path):
    """Another document registered the same body earlier: a run that died after its POST must not take it."""
    meta, doc = registering(cli, images, tmp_path)
    earlier = post_directly(standin, doc["registration"])
    doc["library"]["known_images"] = [earlier]  # what register records before its POST
    meta.write_text(json.dumps(doc))
    result = cli("register", meta, "--json")
    assert result.code == 0, result.err
    assert result.json["adopted"] is False and result.json["image_id"] != earlier
