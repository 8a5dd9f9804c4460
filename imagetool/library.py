"""The image library's API (Brightbox): OAuth2 client credentials, create an image, read it back.

docs/registration-api.md has the facts this follows. `requests` (already here
through python-swiftclient) with timeouts; requests that cannot create anything
(the token, a GET) are retried with backoff on a connection error or a 5xx. The
POST that creates an image is never retried blindly: register.py first looks
for an image that an unanswered POST may have made.

Credentials: BRIGHTBOX_CLIENT_ID / BRIGHTBOX_CLIENT_SECRET / BRIGHTBOX_API_URL,
else the brightbox-cli config file the user already has (~/.brightbox/config,
its default client). The secret and the token never appear in a message.
"""

from __future__ import annotations

import configparser
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

from imagetool.errors import EnvironmentProblem, ImageRejected, ImagetoolError, Reason
from imagetool.swift import Secrets, network_reason

DEFAULT_API_URL = "https://api.gb1.brightbox.com"
TIMEOUT = (10.0, 60.0)  # connect, read (seconds)
BACKOFF = (0.5, 1.0, 2.0, 4.0, 8.0)  # waits between tries of a request that is safe to repeat
_MAX_ERROR_TEXT = 300
_HOW_TO_AUTH = (
    "set BRIGHTBOX_CLIENT_ID, BRIGHTBOX_CLIENT_SECRET (and BRIGHTBOX_API_URL), "
    "or configure the brightbox CLI (brightbox config client_add)"
)


class Unanswered(EnvironmentProblem):
    """The API did not answer (network error or 5xx after the retries): a POST may or may not have worked."""

    code = "api_unreachable"


@dataclass(frozen=True)
class ApiCredentials:
    api_url: str
    client_id: str
    secret: str
    source: str  # where they came from, for messages


def credentials(environ: Mapping[str, str], home: Path | None = None) -> ApiCredentials:
    """The API client to use: the environment first, then brightbox-cli's config file."""
    client_id, secret = environ.get("BRIGHTBOX_CLIENT_ID"), environ.get("BRIGHTBOX_CLIENT_SECRET")
    if client_id or secret:
        if not (client_id and secret):
            raise EnvironmentProblem(
                "BRIGHTBOX_CLIENT_ID and BRIGHTBOX_CLIENT_SECRET must be set together", code="no_credentials"
            )
        api_url = environ.get("BRIGHTBOX_API_URL") or DEFAULT_API_URL
        return ApiCredentials(_checked_url(api_url), client_id, secret, "BRIGHTBOX_CLIENT_ID")
    config = (home or Path(environ.get("HOME", "~")).expanduser()) / ".brightbox" / "config"
    found = _from_cli_config(config)
    if found is None:
        raise EnvironmentProblem("no image-library API credentials: " + _HOW_TO_AUTH, code="no_credentials")
    return found


def _from_cli_config(path: Path) -> ApiCredentials | None:
    """The default client of brightbox-cli's config (INI: [core] default_client, a section a client)."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        if not parser.read(path, encoding="utf-8"):
            return None
    except (configparser.Error, UnicodeDecodeError, OSError) as exc:
        raise EnvironmentProblem(
            f"cannot read it: {type(exc).__name__}", path=str(path), code="bad_config"
        ) from None
    clients = [name for name in parser.sections() if name != "core"]
    chosen = parser.get("core", "default_client", fallback=None) or (
        clients[0] if len(clients) == 1 else None
    )
    if chosen is None or not parser.has_section(chosen):
        return None
    section = parser[chosen]
    client_id, secret = section.get("client_id", chosen), section.get("secret")
    if not secret:
        return None
    api_url = section.get("api_url") or DEFAULT_API_URL
    return ApiCredentials(_checked_url(api_url), client_id, secret, str(path))


def _checked_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise EnvironmentProblem(f"the API URL {url!r} is not an http(s) URL", code="bad_api_url")
    return url.rstrip("/")


class Client:
    """A logged-in API client. `sleep` is a parameter so the retry schedule can be tested."""

    def __init__(self, creds: ApiCredentials, *, sleep: Callable[[float], None] = time.sleep) -> None:
        import requests

        self.creds = creds
        self.secrets = Secrets()
        self.secrets.add(creds.secret)
        self.session = requests.Session()
        self.session.headers["Accept"] = "application/json"
        self.sleep = sleep
        self.host = urlsplit(creds.api_url).netloc

    def close(self) -> None:
        self.session.close()

    # --- the requests ------------------------------------------------------------------

    def login(self) -> None:
        """Get a token for the client credentials (OAuth2 `POST /token`, safe to retry)."""
        response = self._send(
            "POST",
            "/token",
            retry=True,
            auth=(self.creds.client_id, self.creds.secret),
            data={"grant_type": "client_credentials"},
        )
        token = _json(response).get("access_token") if response.status_code == 200 else None
        if response.status_code != 200 or not isinstance(token, str) or not token:
            raise self._refused(response, "getting a token")
        self.secrets.add(token)
        self.session.headers["Authorization"] = f"Bearer {token}"

    def create_image(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """`POST /1.0/images` once: never retried here (it may have created an image)."""
        response = self._send("POST", "/1.0/images", retry=False, json=dict(body))
        if response.status_code not in (200, 201, 202):
            raise self._refused(response, "registering")
        return _image(response)

    def image(self, image_id: str) -> dict[str, Any]:
        response = self._send("GET", f"/1.0/images/{image_id}", retry=True)
        if response.status_code != 200:
            raise self._refused(response, f"reading {image_id}")
        return _image(response)

    def images(self) -> list[dict[str, Any]]:
        response = self._send("GET", "/1.0/images", retry=True)
        found = _json(response) if response.status_code == 200 else None
        if not isinstance(found, list):
            raise self._refused(response, "listing images")
        return [image for image in found if isinstance(image, dict)]

    # --- transport, retries and errors --------------------------------------------------

    def _send(self, method: str, path: str, *, retry: bool, **kwargs: Any) -> Any:
        """One request; with `retry`, tried again after each BACKOFF wait on a network error or 5xx."""
        import requests

        waits = BACKOFF if retry else ()
        for attempt in range(len(waits) + 1):
            try:
                response = self.session.request(method, self.creds.api_url + path, timeout=TIMEOUT, **kwargs)
                if response.status_code < 500 or attempt == len(waits):
                    break
                problem = f"{response.status_code} {response.reason}"
            except requests.RequestException as exc:
                problem = network_reason(exc, self.secrets)
                if attempt == len(waits):
                    raise Unanswered(f"{method} {path}: no answer from {self.host} ({problem})") from None
            self.sleep(waits[attempt])
        if response.status_code >= 500:
            raise Unanswered(
                f"{method} {path}: {self.host} answered {response.status_code} {response.reason}"
            )
        return response

    def _refused(self, response: Any, doing: str) -> ImagetoolError:
        """401/403: check the credentials (exit 5); another 4xx: the API's own words (exit 3)."""
        status = response.status_code
        if status in (401, 403):
            return EnvironmentProblem(
                f"{doing}: the API answered {status}: check your API client credentials "
                f"(client {self.creds.client_id}, from {self.creds.source})",
                code="api_unauthorized",
            )
        text = self.secrets.redact(_error_text(response))
        message = f"{doing}: the API answered {status}: {text}"
        return ImageRejected(message, [Reason("api_refused", message)])


def _json(response: Any) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _image(response: Any) -> dict[str, Any]:
    found = _json(response)
    if (
        not isinstance(found, dict)
        or not isinstance(found.get("id"), str)
        or not isinstance(found.get("status"), str)
    ):
        raise Unanswered(f"the API answered {response.status_code} without an image in its body")
    return cast(dict[str, Any], found)


def _error_text(response: Any) -> str:
    """The API's own error words (`errors`, `error_description`, …), one line, bounded."""
    body = _json(response)
    words: list[str] = []
    if isinstance(body, dict):
        for key in ("errors", "error_description", "error_name", "error", "message"):
            value = body.get(key)
            if isinstance(value, list):
                words += [str(v) for v in value]
            elif isinstance(value, str):
                words.append(value)
            if words:
                break
    text = "; ".join(words) or (response.text or response.reason or "no details")
    text = " ".join(str(text).split())
    return text if len(text) <= _MAX_ERROR_TEXT else text[: _MAX_ERROR_TEXT - 1] + "…"
