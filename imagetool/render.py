"""Turn results into what people read and pipelines parse; no decisions are made here."""

from __future__ import annotations

import contextlib
import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imagetool.errors import ImagetoolError, Reason
from imagetool.sizes import human
from imagetool.text import unsafe

if TYPE_CHECKING:  # rendering must not import the operations it renders (start-up time)
    from imagetool.convert import ConvertResult
    from imagetool.inspection import Report
    from imagetool.preflight import PreflightResult
    from imagetool.publish import PublishResult
    from imagetool.register import RegisterResult
    from imagetool.upload import UploadResult

ERROR_SCHEMA = "imagetool.error/1"


_emitted = False


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # a raw byte of a non-UTF-8 name (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def clean(text: str) -> str:
    """`text` with every control, bidi or undecodable character shown as an escape."""
    return unsafe().sub(_escape, text)


def _write(stream: Any, text: str) -> None:
    """Write and flush; a closed or broken stream (a hung-up terminal) is not a failure of the job."""
    with contextlib.suppress(OSError, ValueError):
        stream.write(text)
        stream.flush()


def say(text: str) -> None:
    """Human output on stdout (already built from clean() fields)."""
    _write(sys.stdout, text + "\n")


def emit_json(document: Mapping[str, Any]) -> None:
    """Write the one JSON object this run prints (ASCII: names are escaped, never raw)."""
    global _emitted
    _emitted = True
    _write(sys.stdout, json.dumps(document, indent=2) + "\n")


def json_emitted() -> bool:
    return _emitted


def error_line(message: str) -> None:
    _write(sys.stderr, f"imagetool: error: {clean(message)}\n")


def note_line(message: str) -> None:
    _write(sys.stderr, f"imagetool: note: {clean(message)}\n")


def warning_line(path: str, warning: Reason) -> None:
    _write(sys.stderr, f"imagetool: warning: {clean(f'{path}: {warning.message} [{warning.code}]')}\n")


def rejection_line(report: Report) -> None:
    """The one stderr line a rejected image gets, naming the file and the first reason."""
    if report.reasons:
        first = report.reasons[0]
        more = f" (+{len(report.reasons) - 1} more)" if len(report.reasons) > 1 else ""
        error_line(f"{report.path}: {first.message} [{first.code}]{more}")


def error_document(command: str, exc: ImagetoolError) -> dict[str, Any]:
    return {
        "schema": ERROR_SCHEMA,
        "command": command,
        "ok": False,
        "exit_code": int(exc.exit_code),
        "error": exc.as_dict(),
    }


def _size(value: int | None, mib: int | None = None) -> str:
    if value is None:
        return "-"
    extra = f", {mib} MiB in the library" if mib is not None else ""
    return f"{value} bytes ({human(value)}{extra})"


def inspect_text(report: Report) -> str:
    verdict = "safe" if report.safe else "REJECTED"
    lines = [f"{clean(report.path)}: {verdict}"]
    fmt = report.format or "-"
    if report.partition_table:
        fmt += f" ({report.partition_table.upper()} partition table)"
    rows = [
        ("format", fmt),
        ("virtual_size", _size(report.virtual_size, report.virtual_size_mib)),
        (
            "disk_size",
            _size(report.disk_size, report.disk_size_mib)
            + ("" if report.disk_size_exact in (None, True) else f" [estimate: {report.disk_size_method}]"),
        ),
        ("file_size", _size(report.file_size)),
        ("allocated_size", _size(report.allocated_size)),
    ]
    if report.qcow2:
        q = report.qcow2
        rows.append(
            (
                "qcow2",
                f"compat {q.compat}, {q.compression_type} compression, {q.cluster_size}-byte clusters",
            )
        )
    if report.magic and report.format in (None, "raw"):  # libmagic misdescribes qcow2 ("AES")
        rows.append(("libmagic", report.magic))
    lines += [f"  {name:<15}{value}" for name, value in rows]
    lines += [f"  reason: {r.code}: {clean(r.message)}" for r in report.reasons]
    lines += [f"  warning: {w.code}: {clean(w.message)}" for w in report.warnings]
    return "\n".join(lines)


def _engine(result: ConvertResult) -> str:
    writer = result.writer
    if writer is None:
        return ""
    return (
        f" by imagetool's writer on {writer.threads} threads" if writer.engine == "native" else " by qemu-img"
    )


def convert_text(result: ConvertResult) -> str:
    est = result.estimate
    if est and est.method == "ceiling":
        predicted = (
            f"at most {human(est.high)} (every data cluster stored whole): under the limit, not sampled"
        )
    else:
        predicted = (
            f"{human(est.bytes)} (between {human(est.low)} and {human(est.high)}, "
            f"{est.clusters_sampled}/{est.clusters_with_data} clusters sampled)"
            if est
            else "not available for this input"
        )
    if result.output is None or result.output_size is None:
        verdict = (
            "fits"
            if est and est.high <= result.limit
            else ("may not fit" if est and est.low <= result.limit else "unknown")
        )
        return (
            f"{clean(result.source)}: predicted {result.compression} qcow2 size {predicted}\n"
            f"  limit {human(result.limit)}: {verdict}"
        )
    lines = [
        f"{clean(result.source)} -> {clean(result.output)}: {human(result.output_size)} "
        f"({result.compression}{_engine(result)}, {result.cluster_size // 1024} KiB clusters"
        f"{', verified' if result.verified else ', not verified'})",
        f"  virtual_size   {_size(result.virtual_size)}",
        f"  disk_size      {_size(result.disk_size)}",
        f"  output_size    {_size(result.output_size)} (limit {human(result.limit)})",
        f"  predicted      {predicted}",
        f"  took           {result.seconds:.1f} s",
    ]
    return "\n".join(lines)


def metadata_text(path: Path, doc: Mapping[str, Any]) -> str:
    image, reg = doc["image"], doc["registration"]
    mode = "compatibility" if reg["compatibility_mode"] else "virtio"
    access = "public" if reg["public"] else "private"
    lines = [
        f"metadata: {clean(str(path))} (status {doc['status']['state']})",
        f"  {clean(reg['name'])}: {reg['arch']}, {mode}, {access}, user {reg.get('username') or '-'}",
        f"  virtual_size {image['virtual_size_mib']} MiB, disk_size {image['disk_size_mib']} MiB"
        f"{'' if image['disk_size_exact'] else ' (estimate)'}, file {image['file_size']} bytes",
        f"  sha256 {image['sha256']}",
        f"  md5    {image['md5']} (the object store's ETag)",
    ]
    fit = doc.get("fits", {})
    if "fits_server_disk" in fit:
        verdict = "fits" if fit["fits_server_disk"] else "does NOT fit"
        lines.append(
            f"  {verdict} a {fit['server_disk_mib']} MiB server disk (needs {fit['min_disk_mib']} MiB)"
        )
    upload, library = doc.get("upload"), doc.get("library")
    if upload is not None:
        where = "/".join(clean(upload[k]) for k in ("endpoint", "container", "object"))
        pieces = f"{upload['segments']} segments" if upload["segments"] else "one piece"
        lines.append(f"  uploaded to {where} ({pieces}), URL expires {upload['expires_at']}")
    if library is not None:
        lines.append(f"  library: {library.get('image_id', '(no answer yet)')} {library['status']}")
        return "\n".join(lines)
    step = "register it" if upload is not None else "upload it (imagetool upload) and register it"
    lines += [f"next, {step}:", f"  {clean(doc['register_command'])}"]
    return "\n".join(lines)


def snapshots_text(disk: str, found: list[dict[str, Any]]) -> str:
    """`snapshot --list`: one line per internal snapshot."""
    import datetime

    lines = [f"{clean(disk)}: {len(found)} internal snapshot(s)"]
    for snap in found:
        when, state = snap.get("date"), snap.get("vm_state_size")
        date = "-"
        if isinstance(when, int):
            date = datetime.datetime.fromtimestamp(when, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        vm_state = human(state) if isinstance(state, int) else "-"
        lines.append(f"  id {clean(snap['id']):<4} {clean(snap['name']):<24} {date}  vm state {vm_state}")
    return "\n".join(lines)


def preflight_text(result: PreflightResult) -> str:
    counts: dict[str, int] = {}
    for check in result.checks:
        counts[check.status] = counts.get(check.status, 0) + 1
    summary = ", ".join(f"{n} {status}" for status, n in counts.items())
    verdict = "PASS" if not result.failing() else "FAIL"
    lines = [f"preflight {clean(result.image)}: {verdict} ({summary})"]
    lines += [f"  {c.status:<5} {c.name:<22} {clean(c.message)}" for c in result.checks]
    return "\n".join(lines)


def upload_text(result: UploadResult) -> str:
    r = result.record
    if result.reused:
        how = "already there, identical: only the URL was signed anew"
    elif r["segments"]:
        how = (
            f"{r['segments']} segments ({result.sent_segments} sent, {result.kept_segments} kept from "
            "an earlier run), Static Large Object"
        )
    else:
        how = "one piece"
    lines = [
        f"{clean(result.image)} -> {clean(r['endpoint'])}/{clean(r['container'])}/{clean(r['object'])}: "
        f"{_size(r['bytes'])}, {how}; size and ETag confirmed"
        + (", download verified" if r["verified_download"] else ""),
        f"  temp URL       signed with {r['digest']}, expires {r['expires_at']}",
        f"  url            {clean(result.url)}",
        f"  metadata       {clean(result.metadata)} (registration.http_url and upload set)",
    ]
    if result.temp_url_key_set:
        lines.append("  temp-URL key   the account had none: a random one was set (never shown)")
    lines += [
        f"next, register it: imagetool register {clean(result.metadata)} --wait",
        f"  (or: {clean(result.register_command)})",
    ]
    return "\n".join(lines)


def register_text(result: RegisterResult) -> str:
    how = (
        "registered"
        if result.created
        else "adopted (made by an unanswered request)"
        if result.adopted
        else "on record"
    )
    sizes = ""
    if result.virtual_size_mib is not None:
        sizes = f", virtual_size {result.virtual_size_mib} MiB, disk_size {result.disk_size_mib} MiB"
    return f"{clean(result.metadata)}: {result.image_id} {how}: {result.status}{sizes}"


def publish_text(result: PublishResult) -> str:
    steps = ", ".join(f"{step} {state}" for step, state in result.steps.items())
    lines = [f"{clean(result.image)}: {steps}"]
    if result.url:
        lines.append(f"  url            {clean(result.url)}")
    if result.registered is not None:
        lines.append("  " + register_text(result.registered))
    return "\n".join(lines)
