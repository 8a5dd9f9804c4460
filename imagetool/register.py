"""`register`: ask the image library to fetch the uploaded image, and follow it to `available`.

The body sent is exactly the document's `registration` (http_url included: the
temp URL `upload` signed). The document records the library's answer in its own
words (`library`: image id, status, sizes in MiB), so a rerun never registers
twice: an image id on record is followed, not created again. Before the one
POST, the document says `registering` with the time; if that POST gets no
answer (or the process dies), the next attempt first looks for an image of this
name made since then and adopts it instead of creating a second one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from imagetool.durations import iso, parse_iso
from imagetool.errors import EnvironmentProblem, ImageRejected, ImagetoolError, Reason
from imagetool.library import ApiCredentials, Client, Unanswered, credentials
from imagetool.metadata import (
    LibraryRecord,
    MetadataDocument,
    exclusive,
    read_document,
    save_document,
    upload_problems,
    url_lasts,
)
from imagetool.output import key_of
from imagetool.swift import Secrets, etag, head_url

SCHEMA = "imagetool.register/1"
DEFAULT_TIMEOUT = 30 * 60
POLL = (2.0, 4.0, 8.0, 15.0)  # waits between looks while `creating` (the last one repeats)
POST_WAITS = (2.0, 4.0)  # waits between tries of a POST that provably made nothing
ADOPT_SKEW = timedelta(minutes=5)  # clock difference allowed between us and the API's created_at
ADOPT_WINDOW = timedelta(minutes=10)  # an unanswered POST's image is created within this of sending it
DISK_SIZE_SLACK_MIB = 2
# The body's fields the API shows back (http_url is create-only): what an adopted image must match.
ECHOED = ("name", "description", "username", "arch", "compatibility_mode", "public", "min_ram")
DONE = frozenset({"available", "failed", "deprecated", "unavailable", "deleting", "deleted"})

StatusCallback = Callable[[Mapping[str, Any]], None]


@dataclass(frozen=True)
class RegisterResult:
    metadata: str
    image_id: str
    status: str
    created: bool  # this run created the image (False: one on record, or adopted)
    adopted: bool  # found an image an unanswered POST had made, and took it
    waited: bool
    virtual_size_mib: int | None
    disk_size_mib: int | None
    warnings: list[Reason] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "ok": self.status != "failed",
            "metadata": self.metadata,
            "image_id": self.image_id,
            "status": self.status,
            "created": self.created,
            "adopted": self.adopted,
            "waited": self.waited,
            "virtual_size_mib": self.virtual_size_mib,
            "disk_size_mib": self.disk_size_mib,
            "warnings": [w.as_dict() for w in self.warnings],
        }


def _not_ready(path: Path, why: str, code: str) -> ImageRejected:
    return ImageRejected(why, [Reason(code, why)], path=str(path))


def check_ready(path: Path, doc: MetadataDocument, now: datetime) -> None:
    """What registering needs of the document: what an upload needs, the upload, a URL that lasts."""
    problems = upload_problems(doc)
    if problems:
        raise _not_ready(path, "; ".join(problems), "not_ready")
    upload = doc.get("upload")
    if "http_url" not in doc["registration"] or upload is None:
        raise _not_ready(path, "not uploaded yet: run imagetool upload first", "not_uploaded")
    if not url_lasts(upload, now):
        raise EnvironmentProblem(
            f"the temp URL expires at {upload['expires_at']}, too soon for the library's download: "
            "run imagetool upload again to sign a new one",
            path=str(path),
            code="url_expired",
        )


def _record(doc: MetadataDocument, api: str, image: Mapping[str, Any] | None, **extra: Any) -> None:
    record: LibraryRecord = {"api": api, "status": "registering"}
    if image is not None:
        record["status"] = str(image["status"])
        record["image_id"] = str(image["id"])
        record["checked_at"] = iso(datetime.now(UTC))
        for ours, theirs in (("virtual_size_mib", "virtual_size"), ("disk_size_mib", "disk_size")):
            value = image.get(theirs)
            if isinstance(value, int) and value >= 0:
                record[ours] = value  # type: ignore[literal-required]
    record.update(extra)  # type: ignore[typeddict-item]
    doc["library"] = record


def _adoptable(
    client: Client, body: Mapping[str, Any], since: datetime, known: set[str]
) -> list[dict[str, Any]]:
    """Images an unanswered POST of this body may have made: every field of the body the API shows
    back equal, created in the minutes after `since` (the POST's time), and not there before it."""
    found = []
    for image in client.images():
        created = parse_iso(str(image.get("created_at", "")))
        if image.get("id") in known or created is None:
            continue
        if not since - ADOPT_SKEW <= created <= since + ADOPT_WINDOW:
            continue
        if all(_blank(image.get(key)) == _blank(body.get(key)) for key in ECHOED):
            found.append(image)
    return found


def _blank(value: object) -> object:
    """An unset field reads back as null or "": both mean "not given"."""
    return None if value in (None, "") else value


def check_object(path: Path, doc: MetadataDocument, secrets: Secrets) -> None:
    """The object behind the temp URL must still be this image: the library downloads whatever is there.

    Another upload under the same name, or a temp-URL key changed since, would make the
    library register other bytes, or fail; both are said before the POST.
    """
    url, image = doc["registration"]["http_url"], doc["image"]
    secrets.add(url.partition("temp_url_sig=")[2].partition("&")[0])  # a bearer link: not in errors
    assert "upload" in doc  # check_ready saw to it
    status, headers = head_url(url, secrets)
    if status != 200:
        raise EnvironmentProblem(
            f"the temp URL answers {status} (expired, its key changed, or the object is gone): "
            "run imagetool upload again",
            path=str(path),
            code="url_not_working",
        )
    # The ETag, not X-Object-Meta-Sha256: the tempurl middleware strips object metadata from
    # what it serves. One piece: the image's md5; a large object: md5 of its segments' md5s.
    stored_etag = etag(headers)
    stored_size = headers.get("content-length")
    if stored_etag != doc["upload"]["etag"] or stored_size != str(image["file_size"]):
        message = (
            f"the object behind the temp URL is not this image (ETag {stored_etag}, {stored_size} bytes): "
            "another upload replaced it; run imagetool upload again"
        )
        raise ImageRejected(message, [Reason("url_not_this_image", message)], path=str(path))


def _create(
    client: Client, body: Mapping[str, Any], since: datetime, known: set[str], sleep: Callable[[float], None]
) -> tuple[dict[str, Any], bool]:
    """POST the body; after no answer, adopt what it made or try again. (image, adopted).

    `known`: the images there were before the first POST, never adopted.
    """
    for attempt in range(len(POST_WAITS) + 1):
        try:
            return client.create_image(body), False
        except Unanswered:
            made = _adoptable(client, body, since, known)
            if len(made) == 1:
                return made[0], True
            if len(made) > 1:
                ids = ", ".join(str(m.get("id")) for m in made)
                raise EnvironmentProblem(
                    f"no answer to the registration, and several new images match it ({ids}): check them "
                    "with brightbox images list",
                    code="ambiguous",
                ) from None
            if attempt == len(POST_WAITS):
                raise
            sleep(POST_WAITS[attempt])
    raise AssertionError("unreachable")


def register(
    metadata: str,
    *,
    wait: bool = False,
    timeout: int = DEFAULT_TIMEOUT,
    environ: Mapping[str, str] | None = None,
    on_status: StatusCallback | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> RegisterResult:
    path = Path(metadata)
    doc = read_document(path)
    creds = credentials(os.environ if environ is None else environ)
    with exclusive(path):
        doc = read_document(path)  # what it says now that no other run can change it
        try:
            return _register(path, doc, creds, wait, timeout, on_status, sleep)
        except ImagetoolError as exc:
            exc.path = exc.path or metadata  # every failure names the document it was about
            raise


def _register(
    path: Path,
    doc: MetadataDocument,
    creds: ApiCredentials,
    wait: bool,
    timeout: int,
    on_status: StatusCallback | None,
    sleep: Callable[[float], None],
) -> RegisterResult:
    inputs = {key for key in [key_of(path.parent / doc["image"]["file"])] if key is not None}
    body = doc["registration"]
    client = Client(creds, sleep=sleep)
    previous = doc.get("library")
    created = adopted = False
    following = previous is not None and "image_id" in previous and previous["status"] != "failed"
    try:
        if not following:  # the document's own problems first, before the API is asked anything
            check_ready(path, doc, datetime.now(UTC))
            check_object(path, doc, client.secrets)
        client.login()
        image: dict[str, Any] | None = None
        if following:
            assert previous is not None
            image = client.image(previous["image_id"])  # on record: followed, never created again
        else:
            since = parse_iso(previous.get("attempt_started", "")) if previous else None
            if previous is not None and previous["status"] == "registering" and since is not None:
                # an earlier run's POST may have made it: only an image not there before that POST
                made = _adoptable(client, body, since, set(previous.get("known_images", [])))
                if len(made) == 1:
                    image, adopted = made[0], True
            if image is None:
                known = sorted(str(found.get("id")) for found in client.images())
                since = datetime.now(UTC)
                _record(doc, client.host, None, attempt_started=iso(since), known_images=known)
                save_document(path, doc, inputs=inputs)
                image, adopted = _create(client, body, since, set(known), sleep)
                created = not adopted
        _record(doc, client.host, image)
        save_document(path, doc, inputs=inputs)
        if on_status is not None:
            on_status(image)
        if wait:
            image = _follow(client, image, timeout, on_status, sleep)
            _record(doc, client.host, image)
            save_document(path, doc, inputs=inputs)
    finally:
        client.close()
    result = RegisterResult(
        metadata=str(path),
        image_id=str(image["id"]),
        status=str(image["status"]),
        created=created,
        adopted=adopted,
        waited=wait,
        virtual_size_mib=doc["library"].get("virtual_size_mib"),
        disk_size_mib=doc["library"].get("disk_size_mib"),
        warnings=_size_warnings(doc, image) if image["status"] == "available" else [],
    )
    if result.status == "failed":
        message = f"the library could not make {result.image_id} from the upload (status failed)"
        raise ImageRejected(message, [Reason("registration_failed", message)], path=str(path))
    return result


def _follow(
    client: Client,
    image: dict[str, Any],
    timeout: int,
    on_status: StatusCallback | None,
    sleep: Callable[[float], None],
) -> dict[str, Any]:
    """Poll with backoff until the library has finished with the image, or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    step = 0
    while image["status"] not in DONE:
        if time.monotonic() >= deadline:
            raise EnvironmentProblem(
                f"{image['id']} is still {image['status']} after {timeout} s: run imagetool register --wait "
                "again to keep following it (it will not register twice)",
                code="timeout",
            )
        sleep(min(POLL[min(step, len(POLL) - 1)], max(0.0, deadline - time.monotonic())))
        step += 1
        image = client.image(str(image["id"]))
        if on_status is not None:
            on_status(image)
    return image


def _size_warnings(doc: MetadataDocument, image: Mapping[str, Any]) -> list[Reason]:
    """The library's sizes (MiB) against ours: a difference worth a look, never a failure.

    virtual_size must be equal. disk_size is measured two ways (ours: non-zero bytes; the
    library's: its own count, whole blocks at least), so only a gap over 2 MiB and 5% is said.
    """
    warnings = []
    for field_name in ("virtual_size", "disk_size"):
        ours, theirs = doc["image"].get(f"{field_name}_mib"), image.get(field_name)
        if not isinstance(theirs, int) or not isinstance(ours, int):
            continue
        gap = abs(ours - theirs)
        if gap and (field_name == "virtual_size" or gap > max(DISK_SIZE_SLACK_MIB, ours // 20)):
            warnings.append(
                Reason(
                    f"{field_name}_differs",
                    f"the library measured {field_name} {theirs} MiB, imagetool {ours} MiB",
                )
            )
    return warnings
