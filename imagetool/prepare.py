"""`prepare`: the main job in one call — inspect, convert (with the 50 GB gate), verify, metadata.

Writes DST (qcow2) and DST.json. The JSON exists from the moment work starts:
`creating` (its disk_size growing with the output), then `available`, or
`failed` with the reason — never missing, never half-written (each write is
atomic). A failure leaves no qcow2 behind (convert removes its temp file).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from imagetool.atomic import write_json
from imagetool.convert import DEFAULT_LIMIT, ConvertResult, convert, default_output
from imagetool.errors import ImagetoolError, Interrupted, Reason, UsageProblem
from imagetool.inspection import Report, inspect_source
from imagetool.metadata import (
    Registration,
    check_writable,
    default_metadata_path,
    document,
    fits,
    image_facts,
    status,
)
from imagetool.progress import Callback, Progress
from imagetool.source import open_source

_STATUS_EVERY = 1.0  # seconds between `creating` updates of the JSON file


def prepare(
    source: str,
    reg: Registration,
    *,
    output: str | None = None,
    server_disk: int | None = None,
    force: bool = False,
    compression: str = "zlib",
    coroutines: int = 8,
    limit: int = DEFAULT_LIMIT,
    verify: bool = True,
    claimed_format: str | None = None,
    progress: Callback | None = None,
) -> tuple[Path, Path, dict[str, Any], ConvertResult]:
    """Convert `source` and write its registration metadata; returns (qcow2, json, document, result)."""
    target = Path(output) if output else default_output(source)
    meta_path = default_metadata_path(str(target))
    if (target.exists() or target.is_symlink()) and not force:
        raise UsageProblem(
            "output exists; pass --force to replace it", path=str(target), code="output_exists"
        )
    check_writable(meta_path, force)

    image: dict[str, Any] = {"file": target.name}
    checks: list[str] = []
    last_write = [0.0]

    def record(state: dict[str, Any], fit: dict[str, Any] | None = None) -> dict[str, Any]:
        doc = document(reg, image, fit or {}, state, checks)
        if not fit:
            del doc["fits"]
        write_json(meta_path, doc)
        return doc

    def started(report: Report) -> None:
        checks[:] = report.checks
        image.update(
            format="qcow2", virtual_size=report.virtual_size, virtual_size_mib=report.virtual_size_mib
        )
        record(status("creating", disk_size=0), fits(int(report.virtual_size or 0), server_disk))

    def tick(p: Progress) -> None:
        now = time.monotonic()
        if now - last_write[0] >= _STATUS_EVERY:
            last_write[0] = now
            record(
                status("creating", disk_size=p.output_bytes),
                fits(int(image.get("virtual_size") or 0), server_disk),
            )
        if progress:
            progress(p)

    record(status("creating"))
    try:
        result = convert(
            source,
            str(target),
            compression=compression,
            coroutines=coroutines,
            limit=limit,
            verify=verify,
            force=force,
            claimed_format=claimed_format,
            progress=tick,
            on_start=started,
        )
        # The guest data is the input's: its exact disk_size beats an estimate from the qcow2.
        source_report = result.input_report
        exact = result.disk_size if source_report and source_report.disk_size_exact else None
        with open_source(str(target)) as out:
            out_report = result.output_report or inspect_source(out)  # --no-verify: inspect it now
            facts = image_facts(out, out_report, disk_size=exact)
        image.clear()
        image.update(facts)
        checks.extend(["convert", "verify"] if verify else ["convert"])
        doc = record(status("available"), fits(int(facts["virtual_size"] or 0), server_disk))
    except ImagetoolError as exc:
        record(status("failed", reason=Reason(exc.code, exc.message)))
        raise
    except (KeyboardInterrupt, Interrupted):
        record(status("failed", reason=Reason("interrupted", "interrupted before it finished")))
        raise
    return target, meta_path, doc, result
