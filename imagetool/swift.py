"""Orbit (OpenStack Swift) through python-swiftclient: credentials, the cluster's limits, temp URLs.

The facts this follows are in docs/orbit-upload.md. Credentials come the way
Swift users already keep them: `ST_AUTH`/`ST_USER`/`ST_KEY` (v1 auth, what Orbit
documents), the `OS_*` variables for Keystone, or `OS_STORAGE_URL` with
`OS_AUTH_TOKEN`. No key, password, token or temp-URL key is ever printed: every
message that leaves this module passes `Secrets.redact`, and swiftclient's own
logger is silenced (it logs failed requests, headers included).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import secrets as random_secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import quote, urlsplit

from imagetool.errors import EnvironmentProblem, ImagetoolError, UsageProblem

logging.getLogger("swiftclient").addHandler(logging.NullHandler())
logging.getLogger("swiftclient").propagate = False

DEFAULT_MAX_FILE_SIZE = 5 * 1024**3  # Swift's default when /info does not say
DEFAULT_MAX_SEGMENTS = 1000
DIGESTS = ("sha512", "sha256", "sha1")  # strongest first; Orbit's docs sign with sha1
READ_ONLY_CONTAINERS = frozenset({"images"})  # Orbit's library copies: downloadable, never writable
TIMEOUT = 60.0  # seconds without a byte before a request is abandoned (then retried)
_HOW_TO_AUTH = (
    "set ST_AUTH, ST_USER and ST_KEY (Orbit: ST_AUTH=https://orbit.brightbox.com/v1/acc-xxxxx, "
    "ST_USER=your API client id, ST_KEY=its secret), or OS_AUTH_URL/OS_USERNAME/OS_PASSWORD for Keystone"
)


@dataclass
class Secrets:
    """Every secret this run holds, so that any text can be scrubbed of them before it is shown."""

    values: set[str] = field(default_factory=set)

    def add(self, value: str | None) -> None:
        """The secret, and the escaped forms a library's message may show it in (repr of str, bytes)."""
        if value and len(value) >= 4:  # shorter "secrets" would blank out ordinary words
            self.values |= {value, repr(value)[1:-1], repr(value.encode("utf-8", "surrogateescape"))[2:-1]}

    def redact(self, text: str) -> str:
        for value in sorted(self.values, key=len, reverse=True):
            text = text.replace(value, "***")
        return text


@dataclass(frozen=True)
class Credentials:
    """What swiftclient's Connection needs, and where it came from (for messages, never the secret)."""

    options: Mapping[str, Any]
    source: str  # e.g. "ST_AUTH (v1)"
    secrets: Secrets


def credentials(environ: Mapping[str, str]) -> Credentials:
    """Swift credentials from the environment, in swift's own order: ST_* first, then OS_*."""
    secrets = Secrets()
    get = environ.get
    if get("ST_AUTH"):
        user, key = get("ST_USER"), get("ST_KEY")
        if not user or not key:
            raise EnvironmentProblem(
                "ST_AUTH is set but ST_USER or ST_KEY is not: " + _HOW_TO_AUTH, code="no_credentials"
            )
        secrets.add(key)
        v1 = {"authurl": get("ST_AUTH"), "user": user, "key": key, "auth_version": "1"}
        return Credentials(v1, "ST_AUTH (v1 auth)", secrets)
    if get("OS_STORAGE_URL") and get("OS_AUTH_TOKEN"):
        secrets.add(get("OS_AUTH_TOKEN"))
        preauth = {"preauthurl": get("OS_STORAGE_URL"), "preauthtoken": get("OS_AUTH_TOKEN")}
        return Credentials(preauth, "OS_STORAGE_URL and OS_AUTH_TOKEN", secrets)
    if get("OS_AUTH_URL"):
        secrets.add(get("OS_PASSWORD"))
        os_options = {
            name: get(f"OS_{name.upper()}")
            for name in (
                "project_name",
                "project_id",
                "tenant_name",
                "tenant_id",
                "user_domain_name",
                "user_domain_id",
                "project_domain_name",
                "project_domain_id",
                "region_name",
            )
            if get(f"OS_{name.upper()}")
        }
        options: dict[str, Any] = {
            "authurl": get("OS_AUTH_URL"),
            "user": get("OS_USERNAME"),
            "key": get("OS_PASSWORD"),
            "auth_version": get("OS_IDENTITY_API_VERSION") or "3",
            "os_options": os_options,
        }
        return Credentials(options, "OS_AUTH_URL (Keystone)", secrets)
    raise EnvironmentProblem("no Swift credentials: " + _HOW_TO_AUTH, code="no_credentials")


_ERRNO = re.compile(r"\[Errno -?\d+\] ([^'\")]+)")


def network_reason(exc: BaseException, secrets: Secrets) -> str:
    """Why a request failed, in a few words: the OS's reason (connection refused, name not known)
    rather than a library's nested repr; secrets redacted."""
    text = str(exc)
    found = _ERRNO.findall(text)
    short = found[-1].strip() if found else (text if len(text) <= 200 else type(exc).__name__)
    return secrets.redact(short or type(exc).__name__)


def failure(exc: BaseException, secrets: Secrets, doing: str) -> ImagetoolError:
    """A swiftclient or network failure as one of our errors: 401/403 says check the credentials."""
    from swiftclient.exceptions import ClientException

    status = getattr(exc, "http_status", None) if isinstance(exc, ClientException) else None
    if status in (401, 403):
        message = f"{doing}: Swift answered {status}: check your Swift credentials (ST_USER/ST_KEY or OS_*)"
        return EnvironmentProblem(message, code="swift_unauthorized")
    if isinstance(exc, ClientException) and status is not None:
        detail = f"{status} {exc.http_reason}".strip()
        return EnvironmentProblem(f"{doing}: Swift answered {detail}", code="swift_error")
    text = network_reason(exc, secrets)
    if isinstance(exc, ImportError):  # Keystone auth needs python-keystoneclient
        text = f"{text} (Keystone auth needs python-keystoneclient: pip install python-keystoneclient)"
    return EnvironmentProblem(f"{doing}: {text}", code="swift_unreachable")


@contextlib.contextmanager
def translated(secrets: Secrets, doing: str) -> Iterator[None]:
    """Turn swiftclient/requests failures inside the block into our errors, secrets redacted."""
    try:
        yield
    except ImagetoolError:
        raise
    except Exception as exc:  # swiftclient raises ClientException, requests' errors, ImportError
        raise failure(exc, secrets, doing) from None


def connect(creds: Credentials, *, retries: int = 5, like: Any = None) -> Any:
    """A swiftclient Connection (one per thread: they are not thread-safe).

    `like`: a logged-in connection whose storage URL and token this one starts with
    (no login per thread); it still logs in with the credentials when the token expires.
    """
    from swiftclient.client import Connection

    options = dict(creds.options)
    if like is not None and like.url and like.token:
        options |= {"preauthurl": like.url, "preauthtoken": like.token}
    return Connection(**options, retries=retries, starting_backoff=1, max_backoff=16, timeout=TIMEOUT)


@dataclass(frozen=True)
class Cluster:
    """What `/info` says this cluster allows (Swift's defaults where it is silent)."""

    max_file_size: int
    max_manifest_segments: int
    min_segment_size: int
    digests: tuple[str, ...]  # tempurl.allowed_digests; () without the tempurl middleware
    slo: bool

    @property
    def digest(self) -> str | None:
        """The strongest digest temp URLs may be signed with here."""
        return next((d for d in DIGESTS if d in self.digests), None)


def cluster(info: Mapping[str, Any]) -> Cluster:
    """Parse `/info` defensively: clusters differ, and a missing section means a missing feature."""

    def number(section: str, key: str, default: int) -> int:
        value = info.get(section, {}).get(key) if isinstance(info.get(section), dict) else None
        return value if isinstance(value, int) and value > 0 else default

    tempurl = info.get("tempurl")
    digests: tuple[str, ...] = ()
    if isinstance(tempurl, dict):
        allowed = tempurl.get("allowed_digests", ["sha1"])  # older clusters: sha1 only, unsaid
        digests = tuple(d for d in allowed if isinstance(d, str)) if isinstance(allowed, list) else ("sha1",)
    return Cluster(
        max_file_size=number("swift", "max_file_size", DEFAULT_MAX_FILE_SIZE),
        max_manifest_segments=number("slo", "max_manifest_segments", DEFAULT_MAX_SEGMENTS),
        min_segment_size=number("slo", "min_segment_size", 1),
        digests=digests,
        slo=isinstance(info.get("slo"), dict),
    )


def etag(headers: Mapping[str, str]) -> str:
    """An ETag header's value without the quotes Swift puts around a large object's."""
    return str(headers.get("etag", "")).strip('"')


def gone(exc: Exception) -> bool:
    """Whether a swiftclient failure is Swift saying the thing is not there (404)."""
    return getattr(exc, "http_status", None) == 404


def head(conn: Any, container: str, obj: str | None = None) -> Mapping[str, str] | None:
    """HEAD a container or an object: its headers, or None when Swift says it is not there (404)."""
    try:
        headers = conn.head_object(container, obj) if obj is not None else conn.head_container(container)
    except Exception as exc:  # swiftclient's ClientException carries the status
        if gone(exc):
            return None
        raise
    return cast(Mapping[str, str], headers)


def temp_url_key(conn: Any, container: str) -> str | None:
    """The container's temp-URL key (a container not made yet has none), else the account's."""
    container_headers = head(conn, container) or {}
    account_headers = conn.head_account()
    for headers, kind in ((container_headers, "container"), (account_headers, "account")):
        for suffix in ("", "-2"):
            value = headers.get(f"x-{kind}-meta-temp-url-key{suffix}")
            if value:
                return str(value)
    return None


def manifest(conn: Any, container: str, obj: str) -> list[dict[str, Any]] | None:
    """The segments a Static Large Object lists ({container, name, hash, bytes}); None for another object."""
    headers = head(conn, container, obj)
    if headers is None or str(headers.get("x-static-large-object", "")).lower() != "true":
        return None
    _, body = conn.get_object(container, obj, query_string="multipart-manifest=get")
    found = []
    for item in json.loads(body):
        path = str(item.get("name", "")).lstrip("/")
        if "/" in path:
            segment_container, name = path.split("/", 1)
            found.append({"container": segment_container, "name": name, "hash": item.get("hash"),
                          "bytes": item.get("bytes")})  # fmt: skip
    return found


def intact(conn: Any, segments: list[dict[str, Any]]) -> bool:
    """Whether every segment a manifest lists is still stored, with its size and md5.

    A HEAD of the large object itself does not look at its segments: one deleted since
    makes every download fail (409) while the HEAD still answers 200.
    """
    for segment in segments:
        headers = head(conn, segment["container"], segment["name"])
        if headers is None:
            return False
        stored = (etag(headers), int(headers.get("content-length", -1)))
        if stored != (segment["hash"], segment["bytes"]):
            return False
    return True


def set_temp_url_key(conn: Any) -> str:
    """Give the account a strong random temp-URL key (256 bits) and return it."""
    key = random_secrets.token_hex(32)
    conn.post_account({"X-Account-Meta-Temp-Url-Key": key})
    return key


def object_path(storage_url: str, container: str, obj: str) -> str:
    """The object's path as the tempurl middleware sees it (unquoted): /v1/AUTH_x/container/object."""
    return f"{urlsplit(storage_url).path.rstrip('/')}/{container}/{obj}"


def sign(storage_url: str, container: str, obj: str, key: str, expires: int, digest: str) -> str:
    """A GET temp URL for the object, valid until the unix time `expires`, signed by swiftclient.

    The signature covers the path unquoted (what Swift's tempurl middleware
    checks); the URL carries it quoted, so any object name survives the trip.
    """
    from swiftclient.utils import generate_temp_url

    path = object_path(storage_url, container, obj)
    signed = generate_temp_url(path, expires, key, "GET", absolute=True, digest=digest)
    query = signed[len(path) :]  # "?temp_url_sig=…&temp_url_expires=…"
    parts = urlsplit(storage_url)
    return f"{parts.scheme}://{parts.netloc}{quote(path)}{query}"


def head_url(url: str, secrets: Secrets) -> tuple[int, Mapping[str, str]]:
    """HEAD a temp URL the way the library will GET it (a GET signature allows HEAD): status, headers."""
    import requests

    with translated(secrets, "checking the temp URL"):
        response = requests.head(url, timeout=TIMEOUT, allow_redirects=False)
        return response.status_code, response.headers


def check_container_name(name: str, option: str = "--container") -> str:
    """Swift's rules for a container name, and Orbit's read-only `images` container."""
    too_long = len(name.encode("utf-8", "surrogateescape")) > 256
    if not name or "/" in name or name in (".", "..") or too_long:
        raise UsageProblem(
            f"{option} {name!r} is not a container name (1-256 bytes, no '/', not . or ..)",
            code="bad_container",
        )
    if name in READ_ONLY_CONTAINERS:
        raise UsageProblem(
            f"{option} {name!r} is the library's own read-only container: upload to a container of yours",
            code="bad_container",
        )
    _check_text(name, f"{option} {name!r}", "bad_container")
    return name


def check_object_name(name: str, what: str = "--object") -> str:
    """Swift's rules for an object name; `what` names where it came from (an option, a file name).

    An empty, `.` or `..` path segment is refused: HTTP clients and proxies collapse them,
    so the object would land elsewhere (another container, the read-only `images` one too).
    """
    if not name or len(name.encode("utf-8", "surrogateescape")) > 1024:
        raise UsageProblem(f"{what} must be 1-1024 bytes as an object name", code="bad_object")
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise UsageProblem(f"{what} {name!r} has an empty, . or .. path segment", code="bad_object")
    _check_text(name, what, "bad_object")
    return name


def _check_text(name: str, what: str, code: str) -> None:
    """Names go into URLs: UTF-8 text without controls (upload.py also refuses bidi marks)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageProblem(f"{what} is not UTF-8 text", code=code) from None
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in name):
        raise UsageProblem(f"{what} contains control characters", code=code)
