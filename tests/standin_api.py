"""A STAND-IN for the Brightbox image-library API: a local test double, not the real service.

The real API cannot run here, so the tests (and the README walk-through) talk to this small HTTP
server instead. It follows the API reference for the parts imagetool uses and nothing more:

* ``POST /token`` -- OAuth2 client credentials (HTTP Basic, or ``client_id``/``client_secret`` in a
  form-encoded or JSON body); 200 ``{"access_token", "token_type": "Bearer", "expires_in": 7200}``,
  401 ``{"error": "invalid_client"}`` for wrong credentials.
* ``POST /1.0/images`` (optionally ``?account_id=acc-xxxxx``) -- register an image from an unwrapped
  JSON body; 201 with the image in status ``creating``.
* ``GET /1.0/images/{id}`` and ``GET /1.0/images``.

Resource endpoints need ``Authorization: Bearer <token>`` (else 401 ``{"error": "invalid_token"}``);
their other 4xx answers have the API's shape ``{"error_name": "...", "errors": ["..."]}``:

* 400 ``invalid_parameters``: a body that is not a JSON object, an unknown field, a wrong type, a
  missing ``arch``;
* 422 ``validation_failed``: an ``arch`` other than ``x86_64``/``i686``, not exactly one of
  ``http_url``/``server``/``volume``, an ``http_url`` that is not http(s), and any ``server`` or
  ``volume`` at all (the stand-in has none, so every reference is unknown);
* 403 ``forbidden`` for an ``account_id`` other than its own; 404 ``missing_resource``.

What the library does with ``http_url`` happens in a background thread after the 201: the URL is
fetched with urllib into a temporary file in a directory the stand-in owns (all-zero MiB blocks are
skipped, leaving holes), ``disk_size`` follows
the MiB downloaded so far, then ``qemu-img info --output=json -f FMT`` runs with FMT ``qcow2`` when
the file starts with ``QFI\\xfb`` and ``raw`` otherwise (qemu-img never guesses). Success makes the
image ``available`` with ``virtual_size`` and ``disk_size`` (the guest bytes ``qemu-img map`` calls
data, the library's "non-zero data") in MiB, rounded up; an HTTP error, an empty
file, a raw file whose size is not a whole number of 512-byte sectors, a qcow2 with a backing file
or an external data file, or a qemu-img error makes it ``failed``. The temporary file is deleted.
Only ``creating``, ``available`` and ``failed`` are ever reached: there is no DELETE here.

Test controls, not part of the real API, live under ``/_standin/`` and need no token:
``GET /_standin/state`` and ``POST /_standin/faults`` (one-shot faults; see ``StandinAPI.arm``).

Run ``python tests/standin_api.py [--port N] [--client-id ID] [--client-secret SECRET]`` to serve in
the foreground; it prints the ``export BRIGHTBOX_API_URL=... BRIGHTBOX_CLIENT_ID=...
BRIGHTBOX_CLIENT_SECRET=...`` line to paste into a shell.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import copy
import dataclasses
import hashlib
import json
import math
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Self, cast

MiB = 1 << 20
TOKEN_LIFETIME = 7200
MAX_BODY = 1 << 20
DOWNLOAD_TIMEOUT = 30.0
QEMU_IMG_TIMEOUT = 60.0
QCOW2_MAGIC = b"QFI\xfb"
ARCHES = ("x86_64", "i686")
SOURCES = ("http_url", "server", "volume")
STATUSES = ("creating", "available", "deprecated", "unavailable", "deleting", "deleted", "failed")
_BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"
_ZERO_MIB = bytes(MiB)

# Accepted create fields and the JSON types each may hold (None: JSON null allowed).
_FIELDS: dict[str, tuple[type | None, ...]] = {
    "name": (str, None),
    "description": (str, None),
    "username": (str, None),
    "arch": (str,),
    "http_url": (str,),
    "server": (str,),
    "volume": (str,),
    "compatibility_mode": (bool,),
    "public": (bool,),
    "min_ram": (int, None),
}

# Downloads go straight to the URL (a temp URL on 127.0.0.1): no proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

_TYPE_NAMES: dict[type | None, str] = {str: "string", bool: "boolean", int: "integer", None: "null"}

POST_IMAGES_FAULTS = ("500_after_create", "drop_after_create", "500_before_create")
FAULT_KEYS = ("post_images", "token", "get_image", "times", "download_delay", "reject_download")


class _ApiError(Exception):
    """An error answer: status, JSON body and extra headers."""

    def __init__(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        super().__init__(body)
        self.status = status
        self.body = body
        self.headers = headers or {}


def _resource_error(status: int, name: str, *errors: str) -> _ApiError:
    return _ApiError(status, {"error_name": name, "errors": list(errors)})


def _oauth_error(status: int, error: str, description: str) -> _ApiError:
    headers = {}
    if status == 401:
        scheme = "Basic" if error == "invalid_client" else "Bearer"
        headers["WWW-Authenticate"] = f'{scheme} realm="standin", error="{error}"'
    return _ApiError(status, {"error": error, "error_description": description}, headers)


def _json_type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _type_ok(value: object, allowed: tuple[type | None, ...]) -> bool:
    for kind in allowed:
        if kind is None:
            if value is None:
                return True
        elif kind is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return True
        elif isinstance(value, kind):
            return True
    return False


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class _Download:
    """What the background download of one image's http_url got."""

    url: str
    http_status: int | None = None
    sha256: str | None = None
    bytes: int = 0
    format: str | None = None
    error: str | None = None
    done: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "http_status": self.http_status,
            "sha256": self.sha256,
            "bytes": self.bytes,
            "format": self.format,
            "error": self.error,
            "done": self.done,
        }


@dataclass
class _Faults:
    post_images: str | None = None
    token: int | None = None
    get_image: int | None = None
    get_image_times: int = 0
    download_delay: float = 0.0
    reject_download: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "post_images": self.post_images,
            "token": self.token,
            "get_image": self.get_image if self.get_image_times else None,
            "times": self.get_image_times,
            "download_delay": self.download_delay,
            "reject_download": self.reject_download,
        }


@dataclass
class _Counters:
    post_images_requests: int = 0
    images_created: int = 0
    tokens_issued: int = 0
    token_requests: int = 0


@dataclass
class _Store:
    images: dict[str, dict[str, Any]] = field(default_factory=dict)
    downloads: dict[str, _Download] = field(default_factory=dict)
    tokens: dict[str, float] = field(default_factory=dict)
    counters: _Counters = field(default_factory=_Counters)
    faults: _Faults = field(default_factory=_Faults)
    bodies: list[object] = field(default_factory=list)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    api: StandinAPI


class StandinAPI:
    """The stand-in server. ``start()`` binds 127.0.0.1 (port 0: any free port) and serves in a daemon
    thread; ``url`` is its base URL; ``state()`` and ``arm(**faults)`` are the test controls."""

    def __init__(
        self,
        client_id: str = "cli-test1",
        client_secret: str = "s3cret-standin",
        workdir: Path | None = None,
        account: str = "acc-tests",
        port: int = 0,
        verbose: bool = False,
    ) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.account = account
        self.port = port
        self.verbose = verbose
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="standin-api-")) if workdir is None else Path(workdir)
        self.download_dir = self.workdir / "standin-downloads"
        self._lock = threading.Lock()
        self._store = _Store()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._workers: list[threading.Thread] = []

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("StandinAPI is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> Self:
        if self._server is not None:
            raise RuntimeError("StandinAPI already started")
        self.download_dir.mkdir(parents=True, exist_ok=True)
        server = _Server(("127.0.0.1", self.port), _Handler)
        server.api = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, args=(0.05,), name="standin-api", daemon=True
        )
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._lock:
            workers = list(self._workers)
        deadline = time.monotonic() + timeout
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- test controls ---------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """What ``GET /_standin/state`` answers."""
        with self._lock:
            store = self._store
            return {
                **dataclasses.asdict(store.counters),
                "images": {img_id: image["status"] for img_id, image in store.images.items()},
                "downloads": {img_id: dl.as_dict() for img_id, dl in store.downloads.items()},
                "pending_faults": store.faults.as_dict(),
                "bodies": list(store.bodies),  # every POST /1.0/images body, as it arrived
            }

    def arm(self, **faults: object) -> None:
        """Arm one-shot faults (what ``POST /_standin/faults`` does); raises ValueError on bad input.

        post_images="500_after_create" | "drop_after_create" | "500_before_create"; token=STATUS
        (next /token answers STATUS once); get_image=STATUS, times=N (next N GETs of one image answer
        STATUS; N defaults to 1); download_delay=SECONDS (next download waits that long first);
        reject_download=True (next image fails whatever it downloads).
        """
        unknown = sorted(set(faults) - set(FAULT_KEYS))
        if unknown:
            raise ValueError(f"unknown fault(s): {', '.join(unknown)}")
        if "times" in faults and "get_image" not in faults:
            raise ValueError("'times' goes with 'get_image'")
        with self._lock:
            pending = self._store.faults
            if "post_images" in faults:
                value = faults["post_images"]
                if value is not None and value not in POST_IMAGES_FAULTS:
                    raise ValueError(f"post_images must be one of {', '.join(POST_IMAGES_FAULTS)}")
                pending.post_images = value
            if "token" in faults:
                pending.token = None if faults["token"] is None else _status_arg("token", faults["token"])
            if "get_image" in faults:
                status = _status_arg("get_image", faults["get_image"])
                times = faults.get("times", 1)
                if not isinstance(times, int) or isinstance(times, bool) or times < 0:
                    raise ValueError("times must be a non-negative integer")
                pending.get_image, pending.get_image_times = status, times
            if "download_delay" in faults:
                delay = faults["download_delay"]
                if not isinstance(delay, int | float) or isinstance(delay, bool) or delay < 0:
                    raise ValueError("download_delay must be a non-negative number of seconds")
                pending.download_delay = float(delay)
            if "reject_download" in faults:
                if not isinstance(faults["reject_download"], bool):
                    raise ValueError("reject_download must be a boolean")
                pending.reject_download = faults["reject_download"]

    # -- the API ---------------------------------------------------------------------------------

    def issue_token(self, client_id: str | None, client_secret: str | None, grant_type: str | None) -> Any:
        with self._lock:
            self._store.counters.token_requests += 1
            fault, self._store.faults.token = self._store.faults.token, None
        if fault is not None:
            raise _oauth_error(fault, "server_error", f"stand-in fault: /token answers {fault}")
        if client_id is None or client_secret is None:
            raise _oauth_error(401, "invalid_client", "Client authentication is required")
        id_ok = secrets.compare_digest(client_id.encode(), self.client_id.encode())
        secret_ok = secrets.compare_digest(client_secret.encode(), self.client_secret.encode())
        if not (id_ok and secret_ok):
            raise _oauth_error(401, "invalid_client", "Client authentication failed")
        if grant_type is None:
            raise _oauth_error(400, "invalid_request", "grant_type is required")
        if grant_type != "client_credentials":
            raise _oauth_error(400, "unsupported_grant_type", f"grant_type {grant_type!r} is not supported")
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._store.tokens[token] = time.monotonic() + TOKEN_LIFETIME
            self._store.counters.tokens_issued += 1
        return {"access_token": token, "token_type": "Bearer", "expires_in": TOKEN_LIFETIME}

    def check_token(self, authorization: str | None) -> None:
        if not authorization:
            raise _oauth_error(401, "invalid_token", "An access token is required (Authorization: Bearer)")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _oauth_error(401, "invalid_token", "Authorization must be 'Bearer <token>'")
        with self._lock:
            expiry = self._store.tokens.get(token)
        if expiry is None:
            raise _oauth_error(401, "invalid_token", "The access token is invalid")
        if expiry < time.monotonic():
            raise _oauth_error(401, "invalid_token", "The access token expired")

    def check_account(self, query: dict[str, list[str]]) -> None:
        for account in query.get("account_id", []):
            if account != self.account:
                raise _resource_error(403, "forbidden", f"You do not have access to account {account}")

    def count_post(self) -> str | None:
        """Count one POST /1.0/images; return (and disarm) the pending post_images fault."""
        with self._lock:
            self._store.counters.post_images_requests += 1
            fault, self._store.faults.post_images = self._store.faults.post_images, None
        return fault

    def create_image(self, body: object) -> dict[str, Any]:
        with self._lock:
            self._store.bodies.append(body)
        params = _validate(body)
        url = cast(str, params["http_url"])
        now = _now()
        with self._lock:
            img_id = self._new_id()
            image: dict[str, Any] = {
                "id": img_id,
                "resource_type": "image",
                "url": f"{self.url}/1.0/images/{img_id}",
                "name": params.get("name"),
                "description": params.get("description"),
                "username": params.get("username"),
                "arch": params["arch"],
                "status": "creating",
                "locked": False,
                "source_type": "upload",
                "source_trigger": "manual",
                "compatibility_mode": params.get("compatibility_mode", False),
                "public": params.get("public", False),
                "official": False,
                "owner": self.account,
                "ancestor": None,
                "licence_name": None,
                "min_ram": params.get("min_ram"),
                "virtual_size": 0,
                "disk_size": 0,
                "created_at": now,
            }
            self._store.images[img_id] = image
            self._store.downloads[img_id] = _Download(url=url)
            self._store.counters.images_created += 1
            faults = self._store.faults
            delay, faults.download_delay = faults.download_delay, 0.0
            reject, faults.reject_download = faults.reject_download, False
            worker = threading.Thread(
                target=self._fetch, args=(img_id, url, delay, reject), name=f"standin-{img_id}", daemon=True
            )
            self._workers.append(worker)
            snapshot = copy.deepcopy(image)
        worker.start()
        return snapshot

    def get_image(self, img_id: str) -> dict[str, Any]:
        with self._lock:
            faults = self._store.faults
            if faults.get_image is not None and faults.get_image_times > 0:
                faults.get_image_times -= 1
                status = faults.get_image
                if faults.get_image_times == 0:
                    faults.get_image = None
                raise _resource_error(status, "service_unavailable", f"stand-in fault: answering {status}")
            image = self._store.images.get(img_id)
            if image is None:
                raise _resource_error(404, "missing_resource", f"Image {img_id} not found")
            return copy.deepcopy(image)

    def list_images(self) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(list(self._store.images.values()))

    def _new_id(self) -> str:
        while True:
            img_id = "img-" + "".join(secrets.choice(_BASE36) for _ in range(5))
            if img_id not in self._store.images:
                return img_id

    # -- what the library does with http_url -----------------------------------------------------

    def _update(self, img_id: str, **changes: Any) -> None:
        with self._lock:
            self._store.images[img_id].update(changes)

    def _record(self, img_id: str, **changes: Any) -> None:
        with self._lock:
            record = self._store.downloads[img_id]
            for key, value in changes.items():
                setattr(record, key, value)

    def _fetch(self, img_id: str, url: str, delay: float, reject: bool) -> None:
        fd, name = tempfile.mkstemp(prefix=f"{img_id}-", suffix=".part", dir=self.download_dir)
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                if delay:
                    time.sleep(delay)
                self._download(img_id, url, out)
            with path.open("rb") as f:
                magic = f.read(4)
            fmt = "qcow2" if magic == QCOW2_MAGIC else "raw"
            self._record(img_id, format=fmt)
            size = path.stat().st_size
            if size == 0:
                raise _ImageFailed("not a disk image: the download is empty")
            if fmt == "raw" and size % 512:  # qemu-img would round it up to a sector and say nothing
                raise _ImageFailed(
                    f"not a disk image: {size} bytes is not a whole number of 512-byte sectors"
                )
            virtual = _qemu_img_info(path, fmt)
            actual = _data_bytes(path, fmt)
            if reject:
                raise _ImageFailed("rejected by the stand-in's reject_download fault")
            self._update(
                img_id,
                status="available",
                virtual_size=math.ceil(virtual / MiB),
                disk_size=math.ceil(actual / MiB),
            )
        except _ImageFailed as exc:
            self._record(img_id, error=str(exc))
            self._update(img_id, status="failed")
        except Exception as exc:  # anything unexpected fails the image, as the library would
            self._record(img_id, error=f"{type(exc).__name__}: {exc}")
            self._update(img_id, status="failed")
        finally:
            self._record(img_id, done=True)
            path.unlink(missing_ok=True)

    def _download(self, img_id: str, url: str, out: Any) -> None:
        digest = hashlib.sha256()
        total = 0
        request = urllib.request.Request(url, headers={"User-Agent": "brightbox-standin/1"})
        try:
            response = _OPENER.open(request, timeout=DOWNLOAD_TIMEOUT)
        except urllib.error.HTTPError as exc:
            exc.close()
            self._record(img_id, http_status=exc.code)
            raise _ImageFailed(f"download answered HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise _ImageFailed(f"download failed: {exc}") from None
        with response:
            self._record(img_id, http_status=response.status)
            buf = bytearray()
            while True:
                chunk = response.read(MiB - len(buf))
                if chunk:
                    buf += chunk
                    digest.update(chunk)
                    total += len(chunk)
                if len(buf) == MiB or (not chunk and buf):
                    if buf == _ZERO_MIB:
                        out.seek(len(buf), os.SEEK_CUR)  # leave a hole: zeros are not data
                    else:
                        out.write(buf)
                    buf.clear()
                    self._record(img_id, bytes=total)
                    self._update(img_id, disk_size=total // MiB)
                if not chunk:
                    break
            out.truncate(total)
        self._record(img_id, bytes=total, sha256=digest.hexdigest())
        self._update(img_id, disk_size=total // MiB)


class _ImageFailed(Exception):
    pass


def _status_arg(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 100 <= value <= 599:
        raise ValueError(f"{name} must be an HTTP status code")
    return value


def _qemu_img(verb: str, path: Path, fmt: str) -> object:
    """`qemu-img VERB --output=json -f FMT PATH` (never probed), parsed; _ImageFailed if it fails."""
    try:
        proc = subprocess.run(
            ["qemu-img", verb, "--output=json", "-f", fmt, str(path)],
            capture_output=True,
            text=True,
            timeout=QEMU_IMG_TIMEOUT,
        )
        if proc.returncode != 0:
            raise _ImageFailed(f"qemu-img {verb} -f {fmt}: {proc.stderr.strip()}")
        return json.loads(proc.stdout)
    except (OSError, subprocess.TimeoutExpired, ValueError) as exc:
        raise _ImageFailed(f"qemu-img {verb}: {exc}") from None


def _qemu_img_info(path: Path, fmt: str) -> int:
    """The virtual size of PATH read as FMT; refuses what the library would."""
    info = _qemu_img("info", path, fmt)
    if not isinstance(info, dict):
        raise _ImageFailed("qemu-img info gave no JSON object")
    if info.get("format") != fmt:
        raise _ImageFailed(f"qemu-img read it as {info.get('format')!r}, not {fmt}")
    if "backing-filename" in info or "full-backing-filename" in info:
        raise _ImageFailed("the qcow2 has a backing file")
    specific = info.get("format-specific", {})
    data = specific.get("data") if isinstance(specific, dict) else None
    if isinstance(data, dict) and data.get("data-file"):
        raise _ImageFailed("the qcow2 has an external data file")
    virtual = info.get("virtual-size")
    if not isinstance(virtual, int) or virtual <= 0:
        raise _ImageFailed("not a disk image: no virtual size")
    return virtual


def _data_bytes(path: Path, fmt: str) -> int:
    """Guest bytes that hold data (qemu-img map: data and not zero): the library's "non-zero data"."""
    extents = _qemu_img("map", path, fmt)
    if not isinstance(extents, list):
        raise _ImageFailed("qemu-img map gave no JSON list")
    return sum(e["length"] for e in extents if e.get("data") and not e.get("zero"))


def _validate(body: object) -> dict[str, Any]:
    """The create body's fields, or a 400/422 error with every problem found at that level."""
    if not isinstance(body, dict):
        raise _resource_error(400, "invalid_parameters", "The request body must be a JSON object")
    errors = [f"Unknown parameter: {key}" for key in body if key not in _FIELDS]
    for key, value in body.items():
        allowed = _FIELDS.get(key)
        if allowed is not None and not _type_ok(value, allowed):
            kinds = " or ".join(_TYPE_NAMES[k] for k in allowed)
            errors.append(f"Parameter {key} must be {kinds}, not {_json_type_name(value)}")
    if "arch" not in body:
        errors.append("Missing parameter: arch")
    if errors:
        raise _resource_error(400, "invalid_parameters", *errors)

    if body["arch"] not in ARCHES:
        errors.append(f"arch must be one of {', '.join(ARCHES)}")
    given = [key for key in SOURCES if key in body]
    if len(given) != 1:
        errors.append(f"Exactly one of {', '.join(SOURCES)} is required (got {len(given)})")
    elif given[0] == "http_url":
        scheme = urllib.parse.urlsplit(body["http_url"]).scheme
        if scheme not in ("http", "https"):
            errors.append("http_url must be an http or https URL")
    else:
        errors.append(f"{given[0]} {body[given[0]]} not found")  # the stand-in has no servers or volumes
    if isinstance(body.get("min_ram"), int) and body["min_ram"] < 0:
        errors.append("min_ram must not be negative")
    if errors:
        raise _resource_error(422, "validation_failed", *errors)
    return dict(body)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "BrightboxStandin/1"
    sys_version = ""

    @property
    def api(self) -> StandinAPI:
        return cast(_Server, self.server).api

    def log_message(self, format: str, *args: Any) -> None:
        if self.api.verbose:
            super().log_message(format, *args)

    def _send(self, status: int, body: object, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body, indent=None).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise _resource_error(411, "length_required", "Send a Content-Length, not chunked encoding")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            raise _resource_error(400, "bad_request", "Bad Content-Length") from None
        if length < 0 or length > MAX_BODY:
            self.close_connection = True
            raise _resource_error(413, "request_too_large", "The request body is too large")
        return self.rfile.read(length)

    def _json_body(self, raw: bytes) -> object:
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _resource_error(400, "invalid_parameters", "The request body is not valid JSON") from None

    def _dispatch(self, method: str) -> None:
        parts = urllib.parse.urlsplit(self.path)
        path = parts.path.rstrip("/") or "/"
        query = urllib.parse.parse_qs(parts.query)
        try:
            raw = self._body() if method == "POST" else b""
            if path == "/token":
                self._require(method, "POST")
                self._send(200, self._token(raw))
            elif path == "/1.0/images":
                self._require(method, "GET", "POST")
                self.api.check_token(self.headers.get("Authorization"))
                self.api.check_account(query)
                if method == "GET":
                    self._send(200, self.api.list_images())
                else:
                    self._post_image(raw)
            elif path.startswith("/1.0/images/") and path.count("/") == 3:
                self._require(method, "GET")
                self.api.check_token(self.headers.get("Authorization"))
                self.api.check_account(query)
                self._send(200, self.api.get_image(path.rsplit("/", 1)[1]))
            elif path == "/_standin/state":
                self._require(method, "GET")
                self._send(200, self.api.state())
            elif path == "/_standin/faults":
                self._require(method, "POST")
                faults = self._json_body(raw)
                if not isinstance(faults, dict):
                    raise _resource_error(400, "invalid_parameters", "Send a JSON object of faults")
                try:
                    self.api.arm(**faults)
                except ValueError as exc:
                    raise _resource_error(400, "invalid_parameters", str(exc)) from None
                self._send(200, self.api.state()["pending_faults"])
            else:
                raise _resource_error(404, "missing_resource", f"No route for {method} {parts.path}")
        except _ApiError as exc:
            self._send(exc.status, exc.body, exc.headers)
        except _Dropped:
            self.close_connection = True

    def _require(self, method: str, *allowed: str) -> None:
        if method not in allowed:
            raise _ApiError(
                405,
                {"error_name": "method_not_allowed", "errors": [f"{method} is not allowed here"]},
                {"Allow": ", ".join(allowed)},
            )

    def _token(self, raw: bytes) -> Any:
        content_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        params: dict[str, str] = {}
        if content_type == "application/json" or raw.lstrip().startswith(b"{"):
            body = self._json_body(raw)
            if not isinstance(body, dict):
                raise _oauth_error(400, "invalid_request", "The request body must be a JSON object")
            params = {k: v for k, v in body.items() if isinstance(v, str)}
        else:
            try:
                form = urllib.parse.parse_qs(raw.decode(), keep_blank_values=True, strict_parsing=bool(raw))
            except (UnicodeDecodeError, ValueError):
                raise _oauth_error(400, "invalid_request", "The body is not form-encoded") from None
            params = {k: v[0] for k, v in form.items()}
        client_id, client_secret = params.get("client_id"), params.get("client_secret")
        authorization = self.headers.get("Authorization", "")
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(credentials.strip(), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise _oauth_error(401, "invalid_client", "Malformed Basic credentials") from None
            if ":" not in decoded:
                raise _oauth_error(401, "invalid_client", "Malformed Basic credentials")
            user, _, password = decoded.partition(":")
            client_id, client_secret = urllib.parse.unquote(user), urllib.parse.unquote(password)
        return self.api.issue_token(client_id, client_secret, params.get("grant_type"))

    def _post_image(self, raw: bytes) -> None:
        fault = self.api.count_post()
        if fault == "500_before_create":
            raise _resource_error(500, "internal_server_error", "stand-in fault: 500 before create")
        image = self.api.create_image(self._json_body(raw))
        if fault == "500_after_create":
            raise _resource_error(500, "internal_server_error", "stand-in fault: 500 after create")
        if fault == "drop_after_create":
            raise _Dropped
        self._send(201, image, {"Location": image["url"]})

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")


class _Dropped(Exception):
    """Close the connection without answering."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve the STAND-IN Brightbox image-library API locally.")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: any free port)")
    parser.add_argument("--client-id", default="cli-test1")
    parser.add_argument("--client-secret", default="s3cret-standin")
    parser.add_argument("--account", default="acc-tests")
    parser.add_argument("--workdir", type=Path, help="where downloads go (default: a new temp directory)")
    parser.add_argument("--verbose", action="store_true", help="log each request to stderr")
    args = parser.parse_args(argv)
    api = StandinAPI(
        client_id=args.client_id,
        client_secret=args.client_secret,
        workdir=args.workdir,
        account=args.account,
        port=args.port,
        verbose=args.verbose,
    )
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))  # stop() still runs
    api.start()
    print("# Stand-in Brightbox image-library API (a local test double, not the real service).")
    exports = {
        "BRIGHTBOX_API_URL": api.url,
        "BRIGHTBOX_CLIENT_ID": api.client_id,
        "BRIGHTBOX_CLIENT_SECRET": api.client_secret,
    }
    print("export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in exports.items()), flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        api.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
