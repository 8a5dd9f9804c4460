"""The stand-in Brightbox image-library API (tests/standin_api.py), over real HTTP."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from standin_api import StandinAPI

HERE = Path(__file__).resolve().parent
MiB = 1 << 20
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
IMAGE_KEYS = {
    "id",
    "resource_type",
    "url",
    "name",
    "description",
    "username",
    "arch",
    "status",
    "locked",
    "source_type",
    "source_trigger",
    "compatibility_mode",
    "public",
    "official",
    "owner",
    "ancestor",
    "licence_name",
    "min_ram",
    "virtual_size",
    "disk_size",
    "created_at",
}


def call(
    method: str,
    url: str,
    body: object = None,
    *,
    token: str | None = None,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """One request; the status and the decoded JSON answer (errors included)."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    hdrs = dict(headers or {})
    if body is not None:
        hdrs.setdefault("Content-Type", "application/json")
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, headers=hdrs, method=method)
    try:
        with OPENER.open(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def basic(client_id: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


def get_token(api: StandinAPI) -> str:
    status, body = call(
        "POST",
        f"{api.url}/token",
        raw=b"grant_type=client_credentials",
        headers={
            **basic(api.client_id, api.client_secret),
            "Content-Type": "application/x-www-form-urlencoded",
        },
    )
    assert status == 200, body
    token: str = body["access_token"]
    return token


def create(api: StandinAPI, token: str, **fields: object) -> tuple[int, Any]:
    return call("POST", f"{api.url}/1.0/images", {"arch": "x86_64", **fields}, token=token)


def settle(api: StandinAPI, token: str, img_id: str, timeout: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, image = call("GET", f"{api.url}/1.0/images/{img_id}", token=token)
        assert status == 200, image
        if image["status"] != "creating":
            return dict(image)
        time.sleep(0.02)
    raise AssertionError(f"{img_id} still creating after {timeout}s")


@pytest.fixture
def api(tmp_path: Path) -> Iterator[StandinAPI]:
    with StandinAPI(workdir=tmp_path / "api") as server:
        yield server


@pytest.fixture
def token(api: StandinAPI) -> str:
    return get_token(api)


class _Files(SimpleHTTPRequestHandler):
    """Serves a directory; a temp_url_sig of "bad" gets the 401 Swift gives a tampered/expired URL."""

    def do_GET(self) -> None:
        if "temp_url_sig=bad" in self.path:
            self.send_error(401, "Unauthorized")
            return
        if self.path == "/slow.raw":  # 3 MiB of data, one MiB every 0.15 s
            self.send_response(200)
            self.send_header("Content-Length", str(3 * MiB))
            self.end_headers()
            for _ in range(3):
                self.wfile.write(b"\x01" * MiB)
                self.wfile.flush()
                time.sleep(0.15)
            return
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def files(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A tiny file server on 127.0.0.1 (the Swift stand-in): its base URL and its directory."""
    root = tmp_path / "files"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Files, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def make_qcow2(path: Path, size: str = "64M") -> Path:
    proc = subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    return path


# -- /token ----------------------------------------------------------------------------------------


def test_token_with_basic_auth(api: StandinAPI) -> None:
    status, body = call(
        "POST",
        f"{api.url}/token",
        raw=b"grant_type=client_credentials",
        headers={**basic("cli-test1", "s3cret-standin"), "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert status == 200
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 7200
    assert isinstance(body["access_token"], str) and body["access_token"]
    assert api.state()["tokens_issued"] == 1


def test_token_with_credentials_in_json_or_form_body(api: StandinAPI) -> None:
    creds = {"grant_type": "client_credentials", "client_id": "cli-test1", "client_secret": "s3cret-standin"}
    assert call("POST", f"{api.url}/token", creds)[0] == 200
    form = b"grant_type=client_credentials&client_id=cli-test1&client_secret=s3cret-standin"
    assert call("POST", f"{api.url}/token", raw=form)[0] == 200
    assert (
        call(
            "POST",
            f"{api.url}/token",
            {"grant_type": "client_credentials"},
            headers=basic("cli-test1", "s3cret-standin"),
        )[0]
        == 200
    )
    assert api.state()["tokens_issued"] == 3


@pytest.mark.parametrize(
    "headers, raw",
    [
        (basic("cli-test1", "wrong"), b"grant_type=client_credentials"),
        (basic("cli-other", "s3cret-standin"), b"grant_type=client_credentials"),
        ({}, b"grant_type=client_credentials&client_id=cli-test1&client_secret=nope"),
        ({}, b"grant_type=client_credentials"),
    ],
)
def test_token_wrong_credentials_401(api: StandinAPI, headers: dict[str, str], raw: bytes) -> None:
    status, body = call("POST", f"{api.url}/token", raw=raw, headers=headers)
    assert status == 401
    assert body["error"] == "invalid_client"
    assert body["error_description"]
    assert api.state()["tokens_issued"] == 0


def test_token_wrong_grant_type_400(api: StandinAPI) -> None:
    status, body = call(
        "POST", f"{api.url}/token", raw=b"grant_type=password", headers=basic("cli-test1", "s3cret-standin")
    )
    assert (status, body["error"]) == (400, "unsupported_grant_type")


def test_configurable_credentials_and_account(tmp_path: Path) -> None:
    with StandinAPI(client_id="cli-abcde", client_secret="xyz", workdir=tmp_path, account="acc-12345") as api:
        token = get_token(api)
        status, image = create(api, token, http_url="http://127.0.0.1:9/x")
        assert status == 201
        assert image["owner"] == "acc-12345"


# -- authentication and validation of /1.0/images ---------------------------------------------------


@pytest.mark.parametrize("bearer", [None, "not-a-token"])
def test_images_need_a_valid_token(api: StandinAPI, bearer: str | None) -> None:
    status, body = call(
        "POST", f"{api.url}/1.0/images", {"arch": "x86_64", "http_url": "http://x/y"}, token=bearer
    )
    assert (status, body["error"]) == (401, "invalid_token")
    assert call("GET", f"{api.url}/1.0/images", token=bearer)[0] == 401
    assert api.state()["images_created"] == 0


@pytest.mark.parametrize(
    "body, expected",
    [
        ({"arch": "x86_64", "http_url": "http://h/x", "colour": "red"}, 400),  # unknown field
        ({"http_url": "http://h/x"}, 400),  # missing arch
        ({"arch": "x86_64", "http_url": "http://h/x", "public": "yes"}, 400),  # wrong type
        ({"arch": "x86_64", "http_url": "http://h/x", "min_ram": True}, 400),  # a bool is not an int
        ({"arch": "x86_64", "http_url": "http://h/x", "min_ram": 1.5}, 400),
        ({"image": {"arch": "x86_64", "http_url": "http://h/x"}}, 400),  # wrapped: the API wants it bare
        (["arch", "x86_64"], 400),
        ({"arch": "x86_64", "http_url": "http://h/x", "server": "srv-abcde"}, 422),  # two sources
        ({"arch": "x86_64"}, 422),  # no source
        ({"arch": "arm64", "http_url": "http://h/x"}, 422),
        ({"arch": "x86_64", "http_url": "file:///etc/passwd"}, 422),
        ({"arch": "x86_64", "server": "srv-abcde"}, 422),  # the stand-in has no servers
    ],
)
def test_create_body_validation(api: StandinAPI, token: str, body: object, expected: int) -> None:
    status, answer = call("POST", f"{api.url}/1.0/images", body, token=token)
    assert status == expected, answer
    assert isinstance(answer["error_name"], str)
    assert answer["errors"] and all(isinstance(e, str) for e in answer["errors"])
    state = api.state()
    assert (state["post_images_requests"], state["images_created"]) == (1, 0)


def test_invalid_json_400(api: StandinAPI, token: str) -> None:
    status, answer = call(
        "POST",
        f"{api.url}/1.0/images",
        raw=b"{not json",
        token=token,
        headers={"Content-Type": "application/json"},
    )
    assert status == 400 and answer["errors"]


def test_create_answers_201_creating(api: StandinAPI, token: str) -> None:
    status, image = create(
        api,
        token,
        name="debian-12",
        description="Debian 12",
        username="debian",
        http_url="http://127.0.0.1:9/never",
        compatibility_mode=True,
        public=False,
        min_ram=1024,
    )
    assert status == 201
    assert set(image) == IMAGE_KEYS  # and so no http_url
    assert re.fullmatch(r"img-[0-9a-z]{5}", image["id"])
    assert image["url"] == f"{api.url}/1.0/images/{image['id']}"
    assert image["status"] == "creating"
    expected = {
        "resource_type": "image",
        "name": "debian-12",
        "description": "Debian 12",
        "username": "debian",
        "arch": "x86_64",
        "locked": False,
        "source_type": "upload",
        "source_trigger": "manual",
        "compatibility_mode": True,
        "public": False,
        "official": False,
        "owner": "acc-tests",
        "ancestor": None,
        "licence_name": None,
        "min_ram": 1024,
    }
    assert {k: image[k] for k in expected} == expected
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", image["created_at"])
    got = settle(api, token, image["id"])
    assert "http_url" not in got
    assert got["status"] == "failed"  # nothing listens on port 9
    status, listing = call("GET", f"{api.url}/1.0/images", token=token)
    assert status == 200 and [i["id"] for i in listing] == [image["id"]]


def test_account_id_query(api: StandinAPI, token: str) -> None:
    body = {"arch": "i686", "http_url": "http://127.0.0.1:9/x"}
    assert call("POST", f"{api.url}/1.0/images?account_id=acc-tests", body, token=token)[0] == 201
    status, answer = call("POST", f"{api.url}/1.0/images?account_id=acc-other", body, token=token)
    assert status == 403 and answer["error_name"]


def test_unknown_image_404(api: StandinAPI, token: str) -> None:
    status, answer = call("GET", f"{api.url}/1.0/images/img-zzzzz", token=token)
    assert status == 404 and answer["errors"]


# -- what the library does with http_url -------------------------------------------------------------


def test_qcow2_download_becomes_available(api: StandinAPI, token: str, files: tuple[str, Path]) -> None:
    base, root = files
    qcow2 = make_qcow2(root / "disk.qcow2", "64M")
    status, image = create(api, token, http_url=f"{base}/disk.qcow2?temp_url_sig=ok&temp_url_expires=9")
    assert status == 201
    done = settle(api, token, image["id"])
    assert done["status"] == "available"
    assert done["virtual_size"] == 64
    assert done["disk_size"] == 0  # a fresh qcow2 holds no guest data
    record = api.state()["downloads"][image["id"]]
    data = qcow2.read_bytes()
    assert record["http_status"] == 200
    assert record["bytes"] == len(data)
    assert record["sha256"] == hashlib.sha256(data).hexdigest()
    assert record["format"] == "qcow2"
    assert os.listdir(api.download_dir) == []  # the temporary file is gone


def test_raw_download_sizes(api: StandinAPI, token: str, files: tuple[str, Path]) -> None:
    base, root = files
    raw = root / "disk.raw"
    with raw.open("wb") as f:  # 3 MiB of which one is data
        f.truncate(3 * MiB)
        f.seek(MiB)
        f.write(os.urandom(MiB))
    status, image = create(api, token, http_url=f"{base}/disk.raw")
    assert status == 201
    done = settle(api, token, image["id"])
    assert (done["status"], done["virtual_size"]) == ("available", 3)
    assert 1 <= done["disk_size"] <= 3  # 1 where the filesystem keeps holes
    assert api.state()["downloads"][image["id"]]["format"] == "raw"


def test_disk_size_grows_while_creating(api: StandinAPI, token: str, files: tuple[str, Path]) -> None:
    base, _ = files
    img_id = create(api, token, http_url=f"{base}/slow.raw")[1]["id"]
    seen = set()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        image = call("GET", f"{api.url}/1.0/images/{img_id}", token=token)[1]
        if image["status"] != "creating":
            break
        seen.add(image["disk_size"])
        time.sleep(0.02)
    assert (image["status"], image["virtual_size"], image["disk_size"]) == ("available", 3, 3)
    assert seen & {1, 2}, seen  # partial sizes, in whole MiB, while it downloaded


@pytest.mark.parametrize(
    "path, http_status",
    [
        ("/missing.qcow2", 404),
        ("/disk.raw?temp_url_sig=bad&temp_url_expires=1", 401),  # tampered or expired temp URL
        ("/notes.txt", 200),  # not a disk image: 13 bytes
        ("/empty.raw", 200),
    ],
)
def test_bad_downloads_fail(
    api: StandinAPI, token: str, files: tuple[str, Path], path: str, http_status: int
) -> None:
    base, root = files
    (root / "disk.raw").write_bytes(bytes(MiB))
    (root / "notes.txt").write_text("hello, world\n")
    (root / "empty.raw").write_bytes(b"")
    status, image = create(api, token, http_url=base + path)
    assert status == 201
    assert settle(api, token, image["id"])["status"] == "failed"
    record = api.state()["downloads"][image["id"]]
    assert record["http_status"] == http_status
    assert record["error"]
    assert os.listdir(api.download_dir) == []


# -- faults ---------------------------------------------------------------------------------------


def test_fault_500_after_create(api: StandinAPI, token: str) -> None:
    api.arm(post_images="500_after_create")
    status, answer = create(api, token, http_url="http://127.0.0.1:9/x")
    assert status == 500 and answer["errors"]
    state = api.state()
    assert (state["post_images_requests"], state["images_created"]) == (1, 1)
    assert len(call("GET", f"{api.url}/1.0/images", token=token)[1]) == 1
    assert create(api, token, http_url="http://127.0.0.1:9/x")[0] == 201  # one-shot


def test_fault_drop_after_create(api: StandinAPI, token: str) -> None:
    api.arm(post_images="drop_after_create")
    with pytest.raises(OSError) as caught:  # RemoteDisconnected, or URLError wrapping a reset
        create(api, token, http_url="http://127.0.0.1:9/x")
    assert not isinstance(caught.value, urllib.error.HTTPError)
    state = api.state()
    assert (state["post_images_requests"], state["images_created"]) == (1, 1)
    assert create(api, token, http_url="http://127.0.0.1:9/x")[0] == 201


def test_fault_500_before_create(api: StandinAPI, token: str) -> None:
    api.arm(post_images="500_before_create")
    assert create(api, token, http_url="http://127.0.0.1:9/x")[0] == 500
    state = api.state()
    assert (state["post_images_requests"], state["images_created"]) == (1, 0)
    assert call("GET", f"{api.url}/1.0/images", token=token)[1] == []


def test_fault_token_500_once(api: StandinAPI) -> None:
    api.arm(token=500)
    status, body = call(
        "POST",
        f"{api.url}/token",
        raw=b"grant_type=client_credentials",
        headers=basic("cli-test1", "s3cret-standin"),
    )
    assert status == 500 and body["error"]
    get_token(api)
    assert api.state()["tokens_issued"] == 1


def test_fault_get_image_503_times(api: StandinAPI, token: str) -> None:
    img_id = create(api, token, http_url="http://127.0.0.1:9/x")[1]["id"]
    api.arm(get_image=503, times=2)
    url = f"{api.url}/1.0/images/{img_id}"
    assert [call("GET", url, token=token)[0] for _ in range(3)] == [503, 503, 200]


def test_fault_download_delay_shows_creating(api: StandinAPI, token: str, files: tuple[str, Path]) -> None:
    base, root = files
    make_qcow2(root / "disk.qcow2", "8M")
    api.arm(download_delay=0.4)
    img_id = create(api, token, http_url=f"{base}/disk.qcow2")[1]["id"]
    time.sleep(0.1)
    assert call("GET", f"{api.url}/1.0/images/{img_id}", token=token)[1]["status"] == "creating"
    done = settle(api, token, img_id)
    assert (done["status"], done["virtual_size"]) == ("available", 8)


def test_fault_reject_download(api: StandinAPI, token: str, files: tuple[str, Path]) -> None:
    base, root = files
    make_qcow2(root / "disk.qcow2", "8M")
    api.arm(reject_download=True)
    first = create(api, token, http_url=f"{base}/disk.qcow2")[1]["id"]
    assert settle(api, token, first)["status"] == "failed"
    assert api.state()["downloads"][first]["http_status"] == 200
    second = create(api, token, http_url=f"{base}/disk.qcow2")[1]["id"]
    assert settle(api, token, second)["status"] == "available"


def test_control_endpoints_over_http(api: StandinAPI, token: str) -> None:
    status, pending = call("POST", f"{api.url}/_standin/faults", {"get_image": 503})
    assert status == 200 and (pending["get_image"], pending["times"]) == (503, 1)
    assert call("POST", f"{api.url}/_standin/faults", {"bogus": 1})[0] == 400
    assert call("POST", f"{api.url}/_standin/faults", {"post_images": "explode"})[0] == 400
    status, state = call("GET", f"{api.url}/_standin/state")
    assert status == 200 and state == api.state()
    assert state["tokens_issued"] == 1
    with pytest.raises(ValueError):
        api.arm(times=3)


# -- the command line ------------------------------------------------------------------------------


def test_command_line_prints_exports(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "standin_api.py"), "--client-id", "cli-cmd", "--client-secret", "p4ss"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = ""
        while not line.startswith("export "):
            line = proc.stdout.readline()
            assert line, "the stand-in exited without printing its exports"
        env = dict(word.split("=", 1) for word in shlex.split(line)[1:])
        assert env["BRIGHTBOX_CLIENT_ID"] == "cli-cmd"
        assert env["BRIGHTBOX_CLIENT_SECRET"] == "p4ss"
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", env["BRIGHTBOX_API_URL"])
        status, body = call(
            "POST",
            env["BRIGHTBOX_API_URL"] + "/token",
            raw=b"grant_type=client_credentials",
            headers=basic("cli-cmd", "p4ss"),
        )
        assert status == 200 and body["token_type"] == "Bearer"
    finally:
        proc.terminate()
        assert proc.wait(5) == 0
