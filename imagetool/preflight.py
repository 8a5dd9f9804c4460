"""`preflight`: the check a CI pipeline runs before upload. Never prompts; every check is named.

Each check ends pass, warn, fail or skip. The run fails (exit 3, or 4 when only
size limits failed) when any check fails, or any warns under `strict`.

A metadata document is someone else's input: it is read the safe way (a small
regular file, UTF-8 JSON, bounded nesting), validated against the schema, and
nothing in it is used before it validates.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any, cast

from imagetool.convert import DEFAULT_LIMIT
from imagetool.errors import SIZE_REASONS, ExitCode, ImageRejected
from imagetool.fingerprint import vouches
from imagetool.inspection import DEFAULT_MAX_VIRTUAL_SIZE, Report, inspect_source
from imagetool.metadata import SCHEMA as METADATA_SCHEMA
from imagetool.metadata import (
    ImageFacts,
    MetadataDocument,
    fits,
    image_facts,
    parse_document,
    registration_problems,
    schema_errors,
    upload_problems,
    url_lasts,
)
from imagetool.policy import MAX_DISK_SIZE, MAX_METADATA_BYTES
from imagetool.sizes import human, to_mib
from imagetool.source import Source, open_source, read_small_file

SCHEMA = "imagetool.preflight/1"
# The measured facts a document must share with the file it describes.
_SAME_FACTS = (
    "file",
    "format",
    "qcow2_compat",
    "compression_type",
    "virtual_size",
    "virtual_size_mib",
    "file_size",
    "sha256",
    "md5",
)
_SHOWN_ERRORS = 3


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # pass | warn | fail | skip
    message: str
    code: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "code": self.code, "message": self.message}


@dataclass
class PreflightResult:
    image: str
    strict: bool = False
    checks: list[Check] = field(default_factory=list)

    def failing(self) -> list[Check]:
        bad = ("fail", "warn") if self.strict else ("fail",)
        return [c for c in self.checks if c.status in bad]

    @property
    def exit_code(self) -> int:
        failing = self.failing()
        if not failing:
            return int(ExitCode.OK)
        if all(c.code in SIZE_REASONS for c in failing):
            return int(ExitCode.SIZE_LIMIT)
        return int(ExitCode.REJECTED)

    def as_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "image": self.image,
            "ok": not self.failing(),
            "strict": self.strict,
            "exit_code": self.exit_code,
            "checks": [c.as_dict() for c in self.checks],
        }

    def junit(self) -> str:
        """JUnit XML, one testcase per check, that CI systems display."""
        suite = ET.Element(
            "testsuite",
            name="imagetool preflight",
            tests=str(len(self.checks)),
            failures=str(len(self.failing())),
            skipped=str(sum(c.status == "skip" for c in self.checks)),
        )
        for check in self.checks:
            case = ET.SubElement(suite, "testcase", classname="imagetool.preflight", name=check.name)
            if check in self.failing():
                ET.SubElement(case, "failure", message=check.message, type=check.code or check.status)
            elif check.status == "skip":
                ET.SubElement(case, "skipped", message=check.message)
            elif check.status == "warn":
                ET.SubElement(case, "system-out").text = f"WARNING [{check.code}]: {check.message}"
            else:
                ET.SubElement(case, "system-out").text = check.message
        root = ET.Element("testsuites")
        root.append(suite)
        ET.indent(root)
        return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


# --- the image ----------------------------------------------------------------------------------


def _format_checks(report: Report) -> list[Check]:
    if report.format == "qcow2":
        q = report.qcow2
        if q is not None and (q.compressed_clusters or not q.allocated_clusters):
            compressed = Check(
                "compressed",
                "pass",
                f"{q.compression_type} compression, {q.compressed_clusters} compressed clusters",
            )
        else:
            compressed = Check(
                "compressed",
                "warn",
                "qcow2 is not compressed: the upload is larger than it needs to be (imagetool convert)",
                "not_compressed",
            )
        return [Check("format", "pass", "qcow2"), compressed]
    if report.format == "raw":
        return [
            Check("format", "pass", "raw (the library takes it)"),
            Check(
                "compressed",
                "warn",
                "raw is not compressed: a compressed qcow2 uploads faster (imagetool convert)",
                "not_compressed",
            ),
        ]
    message = f"{report.format} is not qcow2 or raw: run imagetool convert first"
    return [Check("format", "fail", message, "wrong_format")]


def _compressed_size_check(report: Report, limit: int) -> Check:
    size = report.file_size or 0
    if size > limit:
        message = f"{human(size)} is over the limit of {human(limit)}"
        return Check("compressed_size", "fail", message, "compressed_too_large")
    return Check("compressed_size", "pass", f"{human(size)} (limit {human(limit)})")


def _disk_size_check(report: Report, from_metadata: int | None) -> Check:
    """Non-zero data against the documented limit; exact from matching metadata when our scan can't be."""
    if from_metadata is not None:
        data, how = from_metadata, " (exact, from the metadata of this very file)"
    else:
        data = report.disk_size or 0
        how = "" if report.disk_size_exact else f" (estimate from {report.disk_size_method}: an upper bound)"
    if data > MAX_DISK_SIZE:
        message = (
            f"{human(data)} of non-zero data{how} is over the "
            f"{human(MAX_DISK_SIZE)} the library documents for snapshots"
        )
        return Check("disk_size", "warn", message, "disk_size_over_limit")
    return Check("disk_size", "pass", f"{human(data)} of non-zero data{how}")


def _server_disk_check(report: Report, server_disk: int | None) -> Check:
    virtual = report.virtual_size or 0
    if server_disk is None:
        return Check("server_disk", "skip", "no --server-disk given")
    if virtual > server_disk:
        message = f"virtual size {human(virtual)} does not fit a {human(server_disk)} server disk"
        return Check("server_disk", "fail", message, "does_not_fit")
    return Check("server_disk", "pass", f"virtual size {human(virtual)} fits {human(server_disk)}")


# --- the metadata -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Read:
    """A metadata file as read: the parsed JSON, or why the file is not a JSON document."""

    parsed: object = None
    problem: str | None = None


def _read_metadata(path: str) -> _Read:
    """Read the safe way: a FIFO, device, link or huge file is refused, never waited on or slurped.

    A missing file is an EnvironmentProblem (exit 5); one that is there but is not
    a small regular UTF-8 JSON file fails the metadata_schema check.
    """
    try:
        return _Read(parsed=parse_document(read_small_file(path, MAX_METADATA_BYTES)))
    except ImageRejected as exc:
        return _Read(problem=f"the metadata file {exc.message} ({exc.code})")
    except ValueError as exc:
        return _Read(problem=str(exc))


def _skip(name: str, why: str) -> Check:
    return Check(name, "skip", why)


def _schema_check(errors: list[str]) -> Check:
    if not errors:
        return Check("metadata_schema", "pass", f"validates against {METADATA_SCHEMA}")
    more = len(errors) - _SHOWN_ERRORS
    message = "; ".join(errors[:_SHOWN_ERRORS]) + (f" (and {more} more)" if more > 0 else "")
    return Check("metadata_schema", "fail", message, "bad_metadata")


def _registration_check(parsed: object) -> Check:
    """The body against the schema's definition of it (validation only: safe on any JSON)."""
    problems = registration_problems(parsed) + upload_problems(parsed)
    if problems:
        return Check("metadata_registration", "fail", "; ".join(problems), "bad_metadata")
    return Check("metadata_registration", "pass", "arch, mode and username set; body is API-clean")


def _disk_size_mismatches(claimed: ImageFacts, report: Report) -> list[str]:
    """A document's disk_size must agree with itself and with what this file can hold."""
    size, exact = claimed.get("disk_size"), claimed.get("disk_size_exact")
    if size is None or exact is None:
        return ["disk_size is not in the metadata"]
    problems = []
    mib = claimed.get("disk_size_mib")
    if mib != to_mib(size):
        problems.append(f"disk_size_mib: the metadata has {mib!r}, its disk_size is {to_mib(size)} MiB")
    ours = report.disk_size or 0
    if report.disk_size_exact or not exact:  # the same measurement: it must be the same figure
        if size != ours:
            problems.append(f"disk_size: the metadata has {size}, this file {ours}")
    elif size > ours:  # ours is an upper bound
        problems.append(f"disk_size: the metadata has {size}, more than this file holds (at most {ours})")
    return problems


def _mismatches(doc: MetadataDocument, ours: ImageFacts, report: Report) -> list[str]:
    """Each way a valid document describes a file other than this one, named."""
    claimed = doc["image"]
    problems = [
        f"{key}: the metadata has {claimed.get(key)!r}, this file {ours.get(key)!r}"
        if key in claimed
        else f"{key} is not in the metadata"
        for key in _SAME_FACTS
        if claimed.get(key) != ours.get(key)
    ]
    min_disk = fits(ours["virtual_size"], None)["min_disk_mib"]
    claimed_min = doc["fits"]["min_disk_mib"] if "fits" in doc else None
    if claimed_min != min_disk:
        problems.append(f"fits.min_disk_mib: the metadata has {claimed_min!r}, this file needs {min_disk}")
    return problems + _disk_size_mismatches(claimed, report)


def _upload_check(doc: MetadataDocument) -> list[Check]:
    """An uploaded document's temp URL must outlive the library's download (docs/orbit-upload.md)."""
    from datetime import UTC, datetime

    upload = doc.get("upload")
    if upload is None:
        return []
    if not url_lasts(upload, datetime.now(UTC)):
        message = f"the temp URL expires at {upload['expires_at']}: sign a new one (imagetool upload)"
        return [Check("upload_url", "warn", message, "url_expired")]
    where = f"{upload['container']}/{upload['object']}"
    return [Check("upload_url", "pass", f"uploaded to {where}; the URL works until {upload['expires_at']}")]


def _trusted_disk_size(doc: MetadataDocument, report: Report) -> int | None:
    """Metadata of this very file (checked) may know the exact disk_size our scan can't."""
    image = doc["image"]
    if report.disk_size_exact or not image.get("disk_size_exact"):
        return None
    return image.get("disk_size")


def _metadata_checks(read: _Read, src: Source, report: Report) -> tuple[list[Check], int | None]:
    """The three metadata checks, and the exact disk_size a valid, matching document supplies."""
    if read.problem is not None:
        nothing = "no document to check: the metadata file is not one"
        return [
            Check("metadata_schema", "fail", read.problem, "bad_metadata"),
            _skip("metadata_matches", nothing),
            _skip("metadata_registration", nothing),
        ], None
    errors = schema_errors(read.parsed)
    registration = _registration_check(read.parsed)
    if errors:
        not_compared = "not compared: nothing in a document that does not validate is used"
        return [_schema_check(errors), _skip("metadata_matches", not_compared), registration], None
    doc = cast(MetadataDocument, read.parsed)  # it validates: it is one
    mismatches = _mismatches(doc, image_facts(src, report, recorded=doc["image"]), report)
    if mismatches:
        message = "the metadata describes another file: " + "; ".join(mismatches)
        matches = Check("metadata_matches", "fail", message, "metadata_mismatch")
        return [_schema_check([]), matches, registration], None
    image = doc["image"]
    unread = vouches(image.get("fingerprint"), src.fd, src.identity, image.get("sha256"), image.get("md5"))
    how = " (checksums recorded for this very file, unchanged since: not read again)" if unread else ""
    matches = Check("metadata_matches", "pass", f"checksums, sizes, name and format match this file{how}")
    checks = [_schema_check([]), matches, registration, *_upload_check(doc)]
    return checks, _trusted_disk_size(doc, report)


def _guest_checks(src: Source, report: Report, read: _Read | None) -> list[Check]:
    """`--guest`: the guest's own files against the registration (docs/guest-reading.md).

    A certain contradiction fails (the server would not boot, or the key would go to
    another login); a likely one warns; what the guest does not tell passes.
    """
    from imagetool.guest import look
    from imagetool.guest.compare import compare

    facts = look(src, report.format or "")
    body: dict[str, Any] = {}
    if read is not None and read.problem is None and not schema_errors(read.parsed):
        body = dict(cast(MetadataDocument, read.parsed)["registration"])
    mode = None
    if "compatibility_mode" in body:
        mode = "compatibility" if body["compatibility_mode"] else "virtio"
    findings = compare(facts, arch=body.get("arch"), mode=mode, username=body.get("username"))
    return [Check(f"guest_{f.field}", f.severity, f.message, f.code) for f in findings]


def preflight(
    image: str,
    *,
    metadata: str | None = None,
    server_disk: int | None = None,
    limit: int = DEFAULT_LIMIT,
    strict: bool = False,
    max_virtual_size: int = DEFAULT_MAX_VIRTUAL_SIZE,
    guest: bool = False,
) -> PreflightResult:
    result = PreflightResult(image=image, strict=strict)
    read = _read_metadata(metadata) if metadata else None
    try:
        src = open_source(image)
    except ImageRejected as exc:  # a directory, FIFO, …: still a named, failed check for the report
        result.checks.append(Check("inspect", "fail", exc.message, exc.code))
        return result
    with src:
        report = inspect_source(src, None, max_virtual_size)
        if not report.safe:
            codes = ", ".join(r.code for r in report.reasons)
            first = report.reasons[0]
            result.checks.append(Check("inspect", "fail", f"{first.message} ({codes})", first.code))
            return result
        result.checks.append(Check("inspect", "pass", f"safe: {', '.join(report.checks)} passed"))
        meta_checks, exact = _metadata_checks(read, src, report) if read is not None else ([], None)
        guest_checks = _guest_checks(src, report, read) if guest else []
    result.checks += [
        *_format_checks(report),
        _compressed_size_check(report, limit),
        _disk_size_check(report, exact),
        _server_disk_check(report, server_disk),
        *meta_checks,
        *guest_checks,
    ]
    return result
