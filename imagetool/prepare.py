"""`prepare`: the main job in one call — inspect, convert (with the 50 GB gate), verify, metadata.

Writes DST (qcow2) and DST.json. Nothing is created until every option, path,
the source and its inspection have passed, so a typo leaves no file behind.
From the moment conversion starts DST.json exists: `creating` (its disk_size
growing with the output, its owner's pid recorded), then `available`, or
`failed` with the reason — never half-written (every write goes through
output.py). A rerun may replace a `failed` document, or a `creating` one whose
owner is gone (killed); any other existing document needs --force.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imagetool import output
from imagetool.convert import DEFAULT_LIMIT, ConvertResult, check_options, convert, default_output
from imagetool.errors import EnvironmentProblem, ImagetoolError, Interrupted, Reason
from imagetool.inspection import Report, inspect_source
from imagetool.metadata import (
    Fits,
    ImageFacts,
    MetadataDocument,
    Owner,
    Registration,
    Status,
    default_metadata_path,
    document,
    fits,
    image_facts,
    parse_document,
    status,
    write_document,
)
from imagetool.policy import MAX_METADATA_BYTES
from imagetool.progress import Callback, Progress
from imagetool.sizes import to_mib
from imagetool.source import Source, open_source, read_small_file

_STATUS_EVERY = 1.0  # seconds between `creating` updates of the JSON file


def _started_at(pid: int) -> int | None:
    """A process's start time in clock ticks since boot: with the pid, names one process for good."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _owner() -> Owner:
    pid = os.getpid()
    return {"pid": pid, "started": _started_at(pid) or 0}


def _abandoned(doc: Any) -> bool:
    """True for a document a rerun may replace: `failed`, or `creating` by a process that is gone."""
    state = doc.get("status") if isinstance(doc, dict) else None
    if not isinstance(state, dict):
        return False
    if state.get("state") == "failed":
        return True
    owner = state.get("owner")
    if state.get("state") != "creating" or not isinstance(owner, dict):
        return False
    pid, started = owner.get("pid"), owner.get("started")
    return not isinstance(pid, int) or pid <= 0 or _started_at(pid) != started


def _may_replace(meta_path: Path) -> bool:
    """Whether an existing DST.json is one of our own unfinished documents.

    A `creating` one whose owner still runs is another prepare at work: exit 5 `busy`,
    not "pass --force" (which would wreck it).
    """
    try:
        doc = parse_document(read_small_file(str(meta_path), MAX_METADATA_BYTES))
    except (ImagetoolError, ValueError):
        return False
    state = doc.get("status") if isinstance(doc, dict) else None
    if isinstance(state, dict) and state.get("state") == "creating" and not _abandoned(doc):
        owner = state.get("owner", {})
        raise EnvironmentProblem(
            f"another imagetool (pid {owner.get('pid')}) is preparing this output: wait for it",
            path=str(meta_path),
            code="busy",
        )
    return _abandoned(doc)


def _undo(
    result: ConvertResult | None,
    target: Path,
    record: Callable[[Status], Any],
    written: bool,
    reason: Reason,
) -> None:
    """A failure leaves no qcow2 (even one already in place) and marks our document `failed`.

    Neither step may hide the error that got us here.
    """
    if result is not None and result.output_key is not None:
        output.remove_own(target, result.output_key)
    if written:
        with contextlib.suppress(ImagetoolError):
            record(status("failed", reason=reason))


def prepare(
    source: str,
    reg: Registration,
    *,
    output_path: str | None = None,
    server_disk: int | None = None,
    force: bool = False,
    compression: str = "zlib",
    engine: str = "native",
    level: int | None = None,
    threads: int | None = None,
    limit: int = DEFAULT_LIMIT,
    verify: bool = True,
    claimed_format: str | None = None,
    progress: Callback | None = None,
    converter: Callable[..., ConvertResult] = convert,
    add_facts: Callable[[ImageFacts], None] | None = None,
    allow_device: bool = False,
) -> tuple[Path, Path, MetadataDocument, ConvertResult]:
    """Convert `source` and write its registration metadata; returns (qcow2, json, document, result).

    `converter` does the conversion (`snapshot` passes one that flattens a backing chain,
    with convert's signature) and `add_facts` adds to the document's `image` object.
    """
    check_options(compression, threads, limit, engine, level)
    with open_source(source, allow_block_device=allow_device) as src:  # a FIFO or missing file: refused
        inputs = {(src.device, src.inode)}
    target = Path(output_path) if output_path is not None else default_output(source)
    meta_path = default_metadata_path(str(target))
    meta_force = force or _may_replace(meta_path)
    output.check_target(meta_path, force=meta_force, inputs=inputs)

    image: ImageFacts = {"file": target.name}
    checks: list[str] = []
    last_write = [0.0]
    written = [False]
    exact: list[int | None] = [None]
    report: list[Report | None] = [None]

    def record(state: Status, fit: Fits | None = None) -> MetadataDocument:
        doc = document(reg, image, fit, state, checks)
        write_document(meta_path, doc, force=meta_force or written[0], inputs=inputs)
        written[0] = True
        return doc

    def started(report: Report) -> None:
        checks[:] = report.checks
        # The guest data is the input's: its exact disk_size beats an estimate from the qcow2.
        exact[0] = report.disk_size if report.disk_size_exact else None
        virtual = report.virtual_size or 0
        image.update({"format": "qcow2", "virtual_size": virtual, "virtual_size_mib": to_mib(virtual)})
        record(status("creating", disk_size=0, owner=_owner()), fits(virtual, server_disk))

    def tick(p: Progress) -> None:
        now = time.monotonic()
        if now - last_write[0] >= _STATUS_EVERY:
            last_write[0] = now
            record(
                status("creating", disk_size=p.output_bytes, owner=_owner()),
                fits(image.get("virtual_size", 0), server_disk),
            )
        if progress:
            progress(p)

    def measure(out: Source, verified: Report | None) -> None:
        """The finished qcow2's report, taken before it is put in place (its checksums come after)."""
        report[0] = verified or inspect_source(out)

    def checksum() -> None:
        """Checksums of the qcow2 in place, once imagetool's own writer is closed: so that no writer
        is about while it is hashed, and its fingerprint can be sealed (fingerprint.py)."""
        nonlocal image
        assert report[0] is not None
        with open_source(str(target)) as out:
            image = image_facts(out, report[0], disk_size=exact[0])
        if add_facts:
            add_facts(image)

    result: ConvertResult | None = None
    try:
        result = converter(
            source,
            str(target),
            compression=compression,
            engine=engine,
            level=level,
            threads=threads,
            limit=limit,
            verify=verify,
            force=force,
            claimed_format=claimed_format,
            progress=tick,
            on_start=started,
            before_commit=measure,
        )
        checks.extend(["convert", "verify"] if verify else ["convert"])
        checksum()
        doc = record(status("available"), fits(image["virtual_size"], server_disk))
    except ImagetoolError as exc:
        _undo(result, target, record, written[0], Reason(exc.code, exc.message))
        raise
    except (KeyboardInterrupt, Interrupted):
        _undo(result, target, record, written[0], Reason("interrupted", "interrupted before it finished"))
        raise
    except OSError as exc:  # the machine said no where no check expected it: no qcow2 is kept either
        _undo(result, target, record, written[0], Reason("io_error", str(exc)))
        raise
    return target, meta_path, doc, result
