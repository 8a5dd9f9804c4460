"""Registration metadata: what the image library's `POST /1.0/images` takes, and what we measured.

The document keeps the two apart. `registration` is exactly the API's request
body (field names, types and units in docs/registration-api.md): nothing in it
the API would refuse, unset optional keys left out. `image` holds our
measurements, unit-labelled: sizes in bytes and in whole MiB (the library's
unit, rounded up), sha256, and md5 (what the object store's ETag will show).

`schemas/metadata.schema.json` is the one description of the document's field
names and types: `registration()` checks what a user typed against it, and
preflight checks a document it reads against it. The rules a schema cannot
say (arch spellings, what an upload needs beyond a valid draft) live here once.

Local `status.state` mirrors the library's lifecycle: `creating` while prepare
works (its `disk_size` grows, as the library's does), then `available` (ready to
register; the library itself starts the registered image at `creating`) or
`failed` with the reason.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import itertools
import json
import os
import re
import shlex
from collections.abc import Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, NoReturn, Required, TypedDict, cast

from jsonschema import Draft202012Validator, ValidationError

from imagetool import __version__, qemu
from imagetool.durations import parse_iso
from imagetool.errors import EnvironmentProblem, ImageRejected, Reason, UsageProblem
from imagetool.fingerprint import Fingerprint, no_writer, sealed, vouches
from imagetool.inspection import DEFAULT_MAX_VIRTUAL_SIZE, Report, inspect_source
from imagetool.output import FileKey, check_target, write_file
from imagetool.policy import MAX_JSON_DEPTH, MAX_METADATA_BYTES, URL_MARGIN_SECONDS
from imagetool.sizes import to_mib
from imagetool.source import Source, open_source, read_small_file
from imagetool.text import metadata_schema as schema
from imagetool.text import unsafe_character

SCHEMA = "imagetool.metadata/1"
State = Literal["creating", "available", "failed"]
MODES = ("virtio", "compatibility")  # the CLI's --mode; the body has the bool compatibility_mode
READY: State = "available"  # the local state a document must have to be uploaded
URL_PLACEHOLDER = (
    "https://orbit.brightbox.com/v1/ACCOUNT/CONTAINER/OBJECT?temp_url_sig=SIG&temp_url_expires=EXPIRES"
)
_ARCH_ALIASES = {
    "amd64": "x86_64",
    "x64": "x86_64",
    "x86-64": "x86_64",
    "i386": "i686",
    "i486": "i686",
    "i586": "i686",
    "x86": "i686",
    "ia32": "i686",
}
# How registration() names a problem with a body field: (option, error code, what the schema wants).
_OPTIONS: dict[str, tuple[str, str, str]] = {
    "name": ("--name", "bad_name", "must be non-empty text"),
    "description": ("--description", "bad_description", "must be text"),
    "username": (
        "--username",
        "bad_username",
        "is not a valid login name "
        "(lower-case letters, digits, _ and -, starting with a letter or _, at most 32)",
    ),
    "arch": ("--arch", "bad_arch", "is not x86_64 or i686"),
    "compatibility_mode": ("--mode", "bad_mode", "is not virtio or compatibility"),
    "public": ("--public/--private", "bad_public", "must be true or false"),
    "min_ram": ("--min-ram", "bad_min_ram", "must be a positive number of MB"),
    "http_url": ("--url", "bad_url", "is not an http(s) URL (printable ASCII, a host after the scheme)"),
}
_CHUNK = 8 << 20
_MESSAGE_MAX = 200  # characters of one schema error: a 1 MiB string must not become a 1 MiB message


class RegistrationBody(TypedDict, total=False):
    """The body of `POST /1.0/images`, in the order the document writes it."""

    name: Required[str]
    description: str
    username: str
    arch: Required[str]
    compatibility_mode: Required[bool]
    public: Required[bool]
    min_ram: int
    http_url: str


class ImageFacts(TypedDict, total=False):
    """What we measured; a `creating` document has only some of it."""

    file: Required[str]
    format: str
    qcow2_compat: str | None
    compression_type: str | None
    virtual_size: int
    virtual_size_mib: int
    disk_size: int
    disk_size_mib: int
    disk_size_exact: bool
    file_size: int
    sha256: str
    md5: str
    official: bool
    source_type: str  # `snapshot` for imagetool snapshot
    chain: list[dict[str, Any]]  # the files a snapshot flattened, top first
    snapshot: str | None  # the internal snapshot it exported
    fingerprint: Fingerprint  # the file the checksums were computed from, as it was then


class Fits(TypedDict, total=False):
    min_disk_mib: Required[int]
    server_disk_mib: int
    fits_server_disk: bool


class ReasonBody(TypedDict):
    code: str
    message: str


class Owner(TypedDict):
    """The process writing a `creating` document (a rerun may replace it once that one is gone)."""

    pid: int
    started: int


class Status(TypedDict, total=False):
    state: Required[State]
    disk_size: int
    owner: Owner
    reason: ReasonBody


class Tool(TypedDict):
    imagetool: str
    qemu_img: str
    checks: list[str]


class UploadRecord(TypedDict):
    """Where `upload` put the image (never a key or token: the URL's signature is all it needs)."""

    endpoint: str  # the Swift host[:port]
    container: str
    object: str
    segment_container: str | None  # None for a one-piece object
    segments: int  # 0 for a one-piece object
    etag: str  # Swift's ETag: the md5 of the object, or of its segments' md5s for a large object
    md5: str  # md5 of the whole image (the file the record describes)
    bytes: int
    uploaded_at: str
    expires_at: str  # when the signed http_url stops working
    digest: str  # what the temp URL is signed with
    verified_download: bool


def url_lasts(record: UploadRecord, now: datetime) -> bool:
    """Whether an upload's temp URL still works long enough for the library's download.

    Registration is asynchronous: the library fetches the image after the API answered,
    so the URL must outlive the request by URL_MARGIN_SECONDS.
    """
    expires = parse_iso(record["expires_at"])
    return expires is not None and expires >= now + timedelta(seconds=URL_MARGIN_SECONDS)


class LibraryRecord(TypedDict, total=False):
    """The image library's view of the registration, in the API's own words."""

    api: Required[str]  # the API host
    status: Required[str]  # `registering` until the API answered; then the API's status
    image_id: str
    attempt_started: str  # when a POST was first tried: a rerun looks for an image made since
    known_images: list[str]  # the image ids there were before that POST: never adopted
    checked_at: str
    virtual_size_mib: int
    disk_size_mib: int


class MetadataDocument(TypedDict, total=False):
    schema: Required[str]
    registration: Required[RegistrationBody]
    image: Required[ImageFacts]
    fits: Fits
    status: Required[Status]
    tool: Required[Tool]
    register_command: Required[str]
    upload: UploadRecord
    library: LibraryRecord


# --- the schema: the one description of the document ------------------------------------------


@functools.cache
def _validator(definition: str | None = None) -> Draft202012Validator:
    """A validator for the whole document, or for one of its `$defs` (e.g. `registration`)."""
    root = schema()
    target = root if definition is None else {"$defs": root["$defs"], "$ref": f"#/$defs/{definition}"}
    return Draft202012Validator(target)


def _short(text: str) -> str:
    return text if len(text) <= _MESSAGE_MAX else text[: _MESSAGE_MAX - 1] + "…"


def _where(path: Sequence[object]) -> str:
    """A JSON path people can read; keys that are not plain words are quoted (never raw)."""
    return "/".join(
        str(p) if isinstance(p, int) or (isinstance(p, str) and p.isidentifier()) else repr(p) for p in path
    )


def _messages(error: ValidationError, parents: tuple[str, ...]) -> list[str]:
    """One error in words: a missing or unknown field is named, an unsafe character is shown as U+XXXX."""
    where = _where([*parents, *error.absolute_path])
    instance = error.instance
    if error.validator == "required" and isinstance(instance, dict):
        prefix = f"{where}/" if where else ""
        required = cast(list[str], error.validator_value)
        return [f"{prefix}{name} is missing" for name in required if name not in instance]
    at = f"{where}: " if where else ""
    if error.validator == "additionalProperties" and isinstance(instance, dict):
        known = error.schema.get("properties", {}) if isinstance(error.schema, dict) else {}
        return [f"{at}unknown field {_short(repr(key))}" for key in instance if key not in known]
    if error.validator == "not" and isinstance(instance, str) and (char := unsafe_character(instance)):
        return [f"{at}contains {_character(char)}"]
    return [f"{at}{_short(error.message)}"]


def _errors(validator: Draft202012Validator, instance: object, parents: tuple[str, ...] = ()) -> list[str]:
    """Every error, in words, in path order, each once; `parents` is where `instance` sits in a document."""
    found = sorted(validator.iter_errors(instance), key=lambda e: [str(p) for p in e.absolute_path])
    return list(dict.fromkeys(m for e in found for m in _messages(e, parents)))


def schema_errors(doc: object) -> list[str]:
    """Where `doc` breaks the published schema ([] when it validates)."""
    return _errors(_validator(), doc)


def registration_problems(doc: object) -> list[str]:
    """Why `doc`'s `registration` is not a body the API takes, by the schema's definition of it."""
    body = doc.get("registration") if isinstance(doc, dict) else None
    if body is None:
        return ["registration is missing"]
    return _errors(_validator("registration"), body, parents=("registration",))


def upload_problems(doc: object) -> list[str]:
    """What an upload needs that the schema leaves optional (it also describes drafts).

    The library needs a username (the login that gets the SSH key), and only a
    finished (`available`) document describes the file to upload.
    """
    if not isinstance(doc, dict):
        return []
    problems = []
    body, status_ = doc.get("registration"), doc.get("status")
    if isinstance(body, dict) and "username" not in body:
        problems.append("registration/username is missing (the login that gets the SSH key)")
    if isinstance(status_, dict) and status_.get("state") != READY:
        problems.append(f"status is {_short(repr(status_.get('state')))}, not {READY!r}")
    return problems


# --- parsing a document someone else wrote --------------------------------------------------

_ESCAPE = re.compile(r"\\.", re.DOTALL)
_STRING = re.compile(r'"[^"]*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def _nesting(text: str) -> int:
    """How deep `[` and `{` nest in JSON text, strings skipped: found without parsing it."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", _ESCAPE.sub("", text)))
    return max(itertools.accumulate(1 if c in "[{" else -1 for c in brackets), default=0)


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


def parse_document(data: bytes) -> object:
    """JSON from untrusted bytes, bounded: UTF-8 only, nested at most MAX_JSON_DEPTH deep.

    The depth is checked before parsing: json recurses once per level (100,000
    levels raise RecursionError) and so would the schema validator.
    ValueError says why the bytes are not such a document.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text (byte {exc.start} is {data[exc.start]:#04x})") from None
    depth = _nesting(text)
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"JSON nested {depth} deep; a metadata document nests at most {MAX_JSON_DEPTH}")
    try:
        # Decimal, not float: `1.0` or `1e308` must not pass the schema as an integer (jsonschema
        # counts a whole float as one), and no metadata field is a fraction.
        return json.loads(text, parse_constant=_no_constant, parse_float=Decimal)
    except ValueError as exc:  # JSONDecodeError, NaN, an integer of thousands of digits
        raise ValueError(f"not JSON: {_short(str(exc))}") from None


# --- building a registration from what a user typed -----------------------------------------


@dataclass(frozen=True)
class Registration:
    """A registration body that validates against the schema. Build it with `registration()`."""

    body: RegistrationBody
    notes: tuple[str, ...] = ()  # e.g. "arch 'amd64' was read as 'x86_64'"

    def register_command(self) -> str:
        """The equivalent `brightbox images register …` line, safe to paste into a shell."""
        body = self.body
        args = ["brightbox", "images", "register", "-a", body["arch"], "-n", body["name"]]
        if "description" in body:
            args += ["-d", body["description"]]
        if "username" in body:
            args += ["-u", body["username"]]
        args += [
            "-m",
            "compatibility" if body["compatibility_mode"] else "virtio",
            "-p",
            "true" if body["public"] else "false",
        ]
        if "min_ram" in body:
            args += ["--min-ram", str(body["min_ram"])]
        args += ["--url", body.get("http_url", URL_PLACEHOLDER)]
        return shlex.join(args)


def _character(char: str) -> str:
    return f"U+{ord(char):04X} (a control, escape, bidi or undecodable character)"


def _refuse_unsafe(field: str, value: str | None) -> None:
    """Refuse text a terminal would act on instead of showing, before anything strips it."""
    if value is not None and (char := unsafe_character(value)) is not None:
        option, code, _ = _OPTIONS[field]
        raise UsageProblem(
            f"{option} must not contain control characters, escape sequences, bidi marks or "
            f"undecodable bytes; it has {_character(char)} at position {value.index(char)}",
            code=code,
        )


def _canonical_arch(arch: str) -> tuple[str, list[str]]:
    """The library's spelling of a common arch name, and a note when it was not already that."""
    canonical = arch.strip().lower()
    if canonical in _ARCH_ALIASES:
        return _ARCH_ALIASES[canonical], [f"arch {arch!r} was read as {_ARCH_ALIASES[canonical]!r}"]
    return canonical, []


def registration(
    *,
    name: str | None,
    arch: str | None,
    mode: str = "virtio",
    username: str | None = None,
    public: bool = False,
    description: str | None = None,
    min_ram: int | None = None,
    url: str | None = None,
) -> Registration:
    """Validate what a user typed into a Registration; every problem is one UsageProblem naming its option."""
    for field, value in (("name", name), ("description", description), ("username", username)):
        _refuse_unsafe(field, value)
    if name is None or not name.strip():
        raise UsageProblem("--name must not be empty", code="bad_name")
    if arch is None:
        raise UsageProblem("--arch is required: x86_64 (64-bit) or i686 (32-bit)", code="bad_arch")
    if mode not in MODES:
        raise UsageProblem(f"--mode {mode!r} is not virtio or compatibility", code="bad_mode")
    canonical, notes = _canonical_arch(arch)
    given: dict[str, object] = {
        "name": name.strip(),
        "description": description,
        "username": username,
        "arch": canonical,
        "compatibility_mode": mode == "compatibility",
        "public": public,
        "min_ram": min_ram,
        "http_url": url,
    }
    # in the schema's order, unset optional fields left out; validated just below
    fields = schema()["$defs"]["registration"]["properties"]
    body = cast(RegistrationBody, {key: given[key] for key in fields if given.get(key) is not None})
    error = next(_validator("registration").iter_errors(body), None)
    if error is not None:  # the body is built with every required field: the error names one
        field = str(error.absolute_path[0])
        option, code, wants = _OPTIONS[field]
        raise UsageProblem(f"{option} {_short(repr(body.get(field)))} {wants}", code=code)
    notes += [f"{p}: preflight will fail this document" for p in upload_problems({"registration": body})]
    return Registration(body=body, notes=tuple(notes))


# --- measuring an image and writing its document ----------------------------------------------


def checksums(fd: int) -> tuple[str, str]:
    """sha256 and md5 of the whole file in one read, the two hashes on two cores."""
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    offset = 0
    with ThreadPoolExecutor(max_workers=1) as pool:
        while chunk := os.pread(fd, _CHUNK, offset):
            pending = pool.submit(sha.update, chunk)  # hashlib releases the GIL on big buffers
            md5.update(chunk)
            pending.result()
            offset += len(chunk)
    return sha.hexdigest(), md5.hexdigest()


def _measured(report: Report) -> tuple[str, int, int]:
    """Format, virtual size and disk_size: a safe report has all three; anything else is a bug."""
    if report.format is None or report.virtual_size is None or report.disk_size is None:
        raise ValueError(f"{report.path}: only a safe, measured image can be described")
    return report.format, report.virtual_size, report.disk_size


def image_facts(
    src: Source, report: Report, disk_size: int | None = None, recorded: ImageFacts | None = None
) -> ImageFacts:
    """The measured `image` object; `disk_size` overrides an estimate with a known exact value.

    The checksums are read from the file, unless `recorded` (a document's facts) carries
    a fingerprint that vouches for them (fingerprint.py): the same file, unchanged since.
    """
    fmt, virtual, measured = _measured(report)
    image: ImageFacts | dict[str, Any] = recorded or {}
    quiet = False  # sealed only when hashed here with no writer about
    if vouches(image.get("fingerprint"), src.fd, src.identity, image.get("sha256"), image.get("md5")):
        sha256, md5 = image["sha256"], image["md5"]
    else:
        quiet = no_writer(src.fd)  # a writer that has it mapped may change it without moving its times
        sha256, md5 = checksums(src.fd)
    src.ensure_unchanged()  # the checksums describe a file only if nothing wrote to it meanwhile
    size = measured if disk_size is None else disk_size
    qcow2 = report.qcow2
    facts: ImageFacts = {
        "file": Path(src.path).name,
        "format": fmt,
        "qcow2_compat": qcow2.compat if qcow2 else None,
        "compression_type": qcow2.compression_type if qcow2 else None,
        "virtual_size": virtual,
        "virtual_size_mib": to_mib(virtual),
        "disk_size": size,
        "disk_size_mib": to_mib(size),
        "disk_size_exact": disk_size is not None or bool(report.disk_size_exact),
        "file_size": src.size,
        "sha256": sha256,
        "md5": md5,
        "official": False,
    }
    if quiet and (sealed_print := sealed(src.fd, src.identity, sha256, md5)) is not None:
        facts["fingerprint"] = sealed_print
    return facts


def fits(virtual_size: int, server_disk: int | None) -> Fits:
    out: Fits = {"min_disk_mib": to_mib(virtual_size)}
    if server_disk is not None:
        out["server_disk_mib"] = to_mib(server_disk)
        out["fits_server_disk"] = virtual_size <= server_disk
    return out


def status(
    state: State, *, disk_size: int | None = None, owner: Owner | None = None, reason: Reason | None = None
) -> Status:
    out: Status = {"state": state}
    if disk_size is not None:
        out["disk_size"] = disk_size
    if owner is not None:
        out["owner"] = owner
    if reason is not None:
        out["reason"] = {"code": reason.code, "message": reason.message}
    return out


def document(
    reg: Registration, image: ImageFacts, fit: Fits | None, state: Status, checks: Sequence[str]
) -> MetadataDocument:
    """The whole document in its stable key order; `fits` left out when not known yet."""
    tool: Tool = {"imagetool": __version__, "qemu_img": qemu.version(), "checks": list(checks)}
    parts: dict[str, object] = {"schema": SCHEMA, "registration": reg.body, "image": image, "fits": fit}
    parts |= {"status": state, "tool": tool, "register_command": reg.register_command()}
    return cast(MetadataDocument, {key: value for key, value in parts.items() if value is not None})


def default_metadata_path(image: str) -> Path:
    return Path(f"{image}.json")


def write_document(target: Path, doc: MetadataDocument, *, force: bool, inputs: Collection[FileKey]) -> None:
    """Write the document atomically through output.py: never over an input, a link or (unforced) a file."""
    write_file(target, (json.dumps(doc, indent=2) + "\n").encode(), force=force, inputs=inputs)


def read_document(path: Path) -> MetadataDocument:
    """A document someone may have edited, read the safe way and used only once it validates."""
    try:
        doc = parse_document(read_small_file(str(path), MAX_METADATA_BYTES))
    except ValueError as exc:
        message = f"is not a metadata document: {exc}"
        raise ImageRejected(message, [Reason("bad_metadata", message)], path=str(path)) from None
    errors = schema_errors(doc)
    if errors:
        message = f"does not validate against {SCHEMA}: " + "; ".join(errors[:3])
        raise ImageRejected(message, [Reason("bad_metadata", message)], path=str(path))
    return cast(MetadataDocument, doc)


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """One upload/register per document at a time, or exit 5 `busy`.

    An flock on a lock file beside the document (`.imagetool-lock-<hash of its name>`,
    left in place: removing it would race). Not the document itself, whose inode every
    save replaces, and not the image, which may be moved away meanwhile.
    """
    lock = path.parent / f".imagetool-lock-{hashlib.sha256(os.fsencode(path.name)).hexdigest()[:16]}"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o600)
    except OSError as exc:
        raise EnvironmentProblem(f"cannot lock: {exc.strerror}", path=str(lock), code="io_error") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise EnvironmentProblem(
                "another imagetool is uploading or registering this image: wait for it",
                path=str(path),
                code="busy",
            ) from None
        yield
    finally:
        os.close(fd)


def save_document(path: Path, doc: MetadataDocument, *, inputs: Collection[FileKey]) -> None:
    """Rewrite a document we updated (atomically, everything else kept), its register line made anew."""
    doc["register_command"] = Registration(body=doc["registration"]).register_command()
    errors = schema_errors(json.loads(json.dumps(doc)))
    if errors:  # a bug in what we added, never the user's input: it was validated on the way in
        raise ValueError(f"{path}: the updated document does not validate: {errors}")
    write_document(path, doc, force=True, inputs=inputs)


def write_metadata(
    image: str,
    reg: Registration,
    *,
    output: str | None = None,
    server_disk: int | None = None,
    force: bool = False,
    max_virtual_size: int = DEFAULT_MAX_VIRTUAL_SIZE,
) -> tuple[Path, MetadataDocument]:
    """Inspect `image`, measure it, and write its metadata document next to it (or to `output`).

    The output is checked before the image is inspected, so a wrong -o costs nothing.
    """
    target = Path(output) if output is not None else default_metadata_path(image)
    with open_source(image) as src:
        inputs = {(src.device, src.inode)}
        check_target(target, force=force, inputs=inputs)
        report = inspect_source(src, None, max_virtual_size)
        if not report.safe:
            raise report.rejected()
        if report.format not in ("qcow2", "raw"):
            message = f"the library takes qcow2 or raw; this is {report.format}: run imagetool convert first"
            raise ImageRejected(message, [Reason("unsupported_format", message)], path=image)
        facts = image_facts(src, report)
        doc = document(reg, facts, fits(facts["virtual_size"], server_disk), status(READY), report.checks)
    write_document(target, doc, force=force, inputs=inputs)
    return target, doc
