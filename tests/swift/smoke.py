"""End-to-end check of the test Swift (not a pytest test): run it by hand after changes to
swiftctl or the Swift pins, with a Python that has python-swiftclient:

    .venv/bin/python tests/swift/smoke.py

Starts two clusters at once, then against the first: tempauth v1 login, account temp-URL
key, a 20 MiB SLO upload in 4 MiB segments, a byte-exact GET through a sha256 temp URL, 401
for a tampered signature, 413 for a one-piece PUT over max_file_size, /info limits, a
stop/start of the object server, and that `down` leaves none of the recorded pids alive.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from swiftclient import client as sc
from swiftclient.exceptions import ClientException

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cluster as swift_cluster

MiB = 1 << 20
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get(url: str) -> tuple[int, bytes]:
    try:
        with OPENER.open(url, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def temp_url(c: swift_cluster.Cluster, path: str, key: str, tamper: bool = False) -> str:
    expires = int(time.time()) + 300
    sig = hmac.new(key.encode(), f"GET\n{expires}\n{path}".encode(), hashlib.sha256).hexdigest()
    if tamper:
        sig = sig[:-1] + ("0" if sig[-1] != "0" else "1")
    return f"{c.proxy_url}{path}?temp_url_sig={sig}&temp_url_expires={expires}"


def pids_alive(pids: list[int]) -> list[int]:
    """Pids that still run. A zombie (state Z) has exited; it lingers only until reaped."""
    alive = []
    for p in pids:
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        if stat[stat.rindex(")") + 2] not in "ZX":
            alive.append(p)
    return alive


def procs_mentioning(text: str) -> list[int]:
    """Live pids whose command line mentions text (e.g. a cluster directory)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmdline = (d / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if text in cmdline and pids_alive([int(d.name)]):
                found.append(int(d.name))
    return found


def main() -> int:
    base = Path(tempfile.mkdtemp(prefix="swift-smoke-"))
    t0 = time.monotonic()
    c = swift_cluster.start(base / "a", max_file_size=8 * MiB)
    t_up = time.monotonic() - t0
    c2 = swift_cluster.start(base / "b", max_file_size=16 * MiB)
    print(f"up: {t_up:.2f} s; second cluster at {c2.proxy_url}")
    assert c.proxy_url != c2.proxy_url
    state = json.loads((c.dir / "state.json").read_text())
    pids = [r["pid"] for r in state["pids"].values() if r] + [state["watchdog"]["pid"]]

    info = json.loads(get(f"{c.proxy_url}/info")[1])
    assert info["swift"]["max_file_size"] == 8 * MiB, info["swift"]
    assert json.loads(get(f"{c2.proxy_url}/info")[1])["swift"]["max_file_size"] == 16 * MiB
    assert "sha256" in info["tempurl"]["allowed_digests"]

    url, token = sc.get_auth(c.auth_url, c.user, c.key, auth_version="1")
    assert url == c.account_url, (url, c.account_url)
    key = "s3cr3t"
    sc.post_account(url, token, {"X-Account-Meta-Temp-Url-Key": key})

    # 20 MiB as an SLO of 4 MiB segments (each under max_file_size).
    data = os.urandom(20 * MiB)
    sc.put_container(url, token, "images")
    sc.put_container(url, token, "images_segments")
    manifest = []
    for i in range(0, len(data), 4 * MiB):
        seg = data[i : i + 4 * MiB]
        name = f"big.raw/{i // (4 * MiB):04d}"
        etag = sc.put_object(url, token, "images_segments", name, seg)
        manifest.append({"path": f"/images_segments/{name}", "etag": etag, "size_bytes": len(seg)})
    sc.put_object(
        url, token, "images", "big.raw", json.dumps(manifest), query_string="multipart-manifest=put"
    )
    path = "/v1/AUTH_test/images/big.raw"
    status, body = get(temp_url(c, path, key))
    assert status == 200 and hashlib.sha256(body).digest() == hashlib.sha256(data).digest(), status
    status, _ = get(temp_url(c, path, key, tamper=True))
    assert status == 401, status
    print("SLO 20 MiB via sha256 temp URL: byte-exact; tampered sig: 401")

    try:
        sc.put_object(url, token, "images", "too-big", io.BytesIO(b"\0" * (8 * MiB + 1)))
        raise AssertionError("PUT over max_file_size was accepted")
    except ClientException as e:
        assert e.http_status == 413, e
    print("one-piece PUT over max_file_size: 413")

    c.stop_server("object")
    try:
        sc.put_object(url, token, "images", "while-down", b"x")
        raise AssertionError("PUT with the object server down succeeded")
    except ClientException as e:
        assert e.http_status == 503, e
    t0 = time.monotonic()
    c.start_server("object")
    t_start = time.monotonic() - t0
    sc.put_object(url, token, "images", "after-restart", b"x")
    assert sc.get_object(url, token, "images", "after-restart")[1] == b"x"
    print(f"object server stop -> 503, start ({t_start:.2f} s) -> PUT works")

    t0 = time.monotonic()
    c.down()
    t_down = time.monotonic() - t0
    c.down()  # idempotent
    c2.down()
    assert not c.dir.exists()
    assert not pids_alive(pids), pids_alive(pids)
    assert not procs_mentioning(str(base)), procs_mentioning(str(base))
    print(f"down: {t_down:.2f} s; no recorded pid left: {pids}")
    base.rmdir()
    print("smoke OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
