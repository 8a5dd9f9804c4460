"""`preflight`: the check a CI pipeline runs before upload. Never prompts; every check is named.

Each check ends pass, warn, fail or skip. The run fails (exit 3, or 4 when only
size limits failed) when any check fails, or any warns under `strict`.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagetool.convert import DEFAULT_LIMIT
from imagetool.errors import SIZE_REASONS, EnvironmentProblem, ExitCode, ImageRejected
from imagetool.inspection import DEFAULT_MAX_VIRTUAL_SIZE, Report, inspect_source
from imagetool.metadata import ARCHES, checksums, schema_errors
from imagetool.sizes import GiB, human
from imagetool.source import open_source

SCHEMA = "imagetool.preflight/1"
DISK_SIZE_LIMIT = 50 * GiB  # the library's documented limit for snapshots' non-zero data
_API_FIELDS = {
    "name": str,
    "description": str,
    "username": str,
    "arch": str,
    "compatibility_mode": bool,
    "public": bool,
    "min_ram": int,
    "http_url": str,
}


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


def _image_checks(report: Report, limit: int, server_disk: int | None) -> list[Check]:
    checks = []
    if report.format == "qcow2":
        checks.append(Check("format", "pass", "qcow2"))
        q = report.qcow2 or {}
        if q.get("compressed_clusters") or not q.get("allocated_clusters"):
            checks.append(
                Check(
                    "compressed",
                    "pass",
                    f"{q.get('compression_type')} compression, "
                    f"{q.get('compressed_clusters', 0)} compressed clusters",
                )
            )
        else:
            checks.append(
                Check(
                    "compressed",
                    "warn",
                    "qcow2 is not compressed: the upload is larger than it needs to be (imagetool convert)",
                    "not_compressed",
                )
            )
    elif report.format == "raw":
        checks.append(Check("format", "pass", "raw (the library takes it)"))
        checks.append(
            Check(
                "compressed",
                "warn",
                "raw is not compressed: a compressed qcow2 uploads faster (imagetool convert)",
                "not_compressed",
            )
        )
    else:
        checks.append(
            Check(
                "format",
                "fail",
                f"{report.format} is not qcow2 or raw: run imagetool convert first",
                "wrong_format",
            )
        )
    size = int(report.file_size or 0)
    if size > limit:
        checks.append(
            Check(
                "compressed_size",
                "fail",
                f"{human(size)} is over the limit of {human(limit)}",
                "compressed_too_large",
            )
        )
    else:
        checks.append(Check("compressed_size", "pass", f"{human(size)} (limit {human(limit)})"))
    data = int(report.disk_size or 0)
    if report.disk_size_method == "metadata":
        how = " (exact, from the metadata of this very file)"
    elif not report.disk_size_exact:
        how = f" (estimate from {report.disk_size_method}: an upper bound)"
    else:
        how = ""
    if data > DISK_SIZE_LIMIT:
        checks.append(
            Check(
                "disk_size",
                "warn",
                f"{human(data)} of non-zero data{how} is over the "
                f"{human(DISK_SIZE_LIMIT)} the library documents for snapshots",
                "disk_size_over_limit",
            )
        )
    else:
        checks.append(Check("disk_size", "pass", f"{human(data)} of non-zero data{how}"))
    virtual = int(report.virtual_size or 0)
    if server_disk is None:
        checks.append(Check("server_disk", "skip", "no --server-disk given"))
    elif virtual > server_disk:
        checks.append(
            Check(
                "server_disk",
                "fail",
                f"virtual size {human(virtual)} does not fit a {human(server_disk)} server disk",
                "does_not_fit",
            )
        )
    else:
        checks.append(
            Check("server_disk", "pass", f"virtual size {human(virtual)} fits {human(server_disk)}")
        )
    return checks


def _load_metadata(path: str) -> tuple[Any, str | None]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EnvironmentProblem("no such metadata file", path=path, code="not_found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EnvironmentProblem(f"cannot read metadata: {exc}", path=path, code="io_error") from None
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        return None, f"not JSON: {exc}"


def _metadata_checks(doc: Any, problem: str | None, report: Report, fd: int) -> list[Check]:
    if problem:
        return [Check("metadata_schema", "fail", problem, "bad_metadata")]
    errors = schema_errors(doc)
    checks = [
        Check("metadata_schema", "fail", "; ".join(errors[:3]), "bad_metadata")
        if errors
        else Check("metadata_schema", "pass", "validates against imagetool.metadata/1")
    ]
    image = doc.get("image", {}) if isinstance(doc, dict) else {}
    sha256, _ = checksums(fd)
    mismatches = [
        name
        for name, ours in (
            ("sha256", sha256),
            ("virtual_size", report.virtual_size),
            ("file_size", report.file_size),
        )
        if image.get(name) != ours
    ]
    checks.append(
        Check(
            "metadata_matches",
            "fail",
            f"metadata describes another file: {', '.join(mismatches)} differ",
            "metadata_mismatch",
        )
        if mismatches
        else Check("metadata_matches", "pass", "sha256 and sizes match this file")
    )
    reg = doc.get("registration", {}) if isinstance(doc, dict) else {}
    problems = [f"unknown field {k!r}" for k in reg if k not in _API_FIELDS]
    problems += [
        f"{k} is not {t.__name__}" for k, t in _API_FIELDS.items() if k in reg and not isinstance(reg[k], t)
    ]
    if reg.get("arch") not in ARCHES:
        problems.append("arch is missing or not x86_64/i686")
    if not isinstance(reg.get("compatibility_mode"), bool):
        problems.append("mode (compatibility_mode) is missing")
    if not reg.get("username"):
        problems.append("username is missing")
    state = doc.get("status", {}).get("state") if isinstance(doc, dict) else None
    if state != "available":
        problems.append(f"status is {state!r}, not 'available'")
    checks.append(
        Check("metadata_registration", "fail", "; ".join(problems), "bad_metadata")
        if problems
        else Check("metadata_registration", "pass", "arch, mode and username set; body is API-clean")
    )
    return checks


def preflight(
    image: str,
    *,
    metadata: str | None = None,
    server_disk: int | None = None,
    limit: int = DEFAULT_LIMIT,
    strict: bool = False,
    max_virtual_size: int = DEFAULT_MAX_VIRTUAL_SIZE,
) -> PreflightResult:
    result = PreflightResult(image=image, strict=strict)
    loaded = _load_metadata(metadata) if metadata else None
    try:
        src = open_source(image)
    except ImageRejected as exc:  # a directory, FIFO, …: still a named, failed check for the report
        result.checks.append(Check("inspect", "fail", exc.message, exc.code))
        return result
    with src:
        report = inspect_source(src, None, max_virtual_size)
        if not report.safe:
            codes = ", ".join(r.code for r in report.reasons)
            result.checks.append(
                Check("inspect", "fail", f"{report.reasons[0].message} ({codes})", report.reasons[0].code)
            )
            return result
        result.checks.append(Check("inspect", "pass", f"safe: {', '.join(report.checks)} passed"))
        meta_checks = _metadata_checks(*loaded, report, src.fd) if loaded is not None else []
        if loaded is not None and any(
            c.name == "metadata_matches" and c.status == "pass" for c in meta_checks
        ):
            _trust_metadata_disk_size(report, loaded[0]["image"])
        result.checks += _image_checks(report, limit, server_disk) + meta_checks
    return result


def _trust_metadata_disk_size(report: Report, image: dict[str, Any]) -> None:
    """Metadata of this very file (same sha256) may know the exact disk_size our scan can't."""
    if (
        not report.disk_size_exact
        and image.get("disk_size_exact")
        and isinstance(image.get("disk_size"), int)
    ):
        report.disk_size = image["disk_size"]
        report.disk_size_exact = True
        report.disk_size_method = "metadata"
