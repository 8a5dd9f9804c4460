"""`publish`: prepare -> upload -> register in one command, for pipelines.

The metadata document records each finished step (`status` available, an
`upload` record, a `library` record), so a rerun after a failure continues from
the first unfinished step: a prepared image is not converted again, an uploaded
one not sent again (while its URL has time left), and a registered one is
followed, never registered twice.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from imagetool import upload as uploading
from imagetool.convert import default_output
from imagetool.errors import ImageRejected, ImagetoolError, Reason, UsageProblem
from imagetool.metadata import MetadataDocument, Registration, default_metadata_path, read_document, url_lasts
from imagetool.prepare import prepare
from imagetool.progress import Callback
from imagetool.register import DEFAULT_TIMEOUT, RegisterResult, StatusCallback, register

SCHEMA = "imagetool.publish/1"


@dataclass
class PublishResult:
    image: str
    metadata: str
    steps: dict[str, str] = field(default_factory=dict)  # step -> done | skipped (already done)
    url: str | None = None
    registered: RegisterResult | None = None
    warnings: list[Reason] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schema": SCHEMA,
            "ok": True,
            "image": self.image,
            "metadata": self.metadata,
            "steps": self.steps,
            "url": self.url,
        }
        if self.registered is not None:
            out |= {
                k: v for k, v in self.registered.as_dict().items() if k not in ("schema", "ok", "metadata")
            }
        return out


def _existing(meta: Path) -> MetadataDocument | None:
    """The document an earlier run left, if it finished preparing; None means prepare (again)."""
    if not meta.exists():
        return None
    try:
        doc = read_document(meta)
    except ImagetoolError:
        return None  # not ours or not finished: prepare decides whether it may replace it
    return doc if doc["status"]["state"] == "available" else None


def _same_registration(doc: MetadataDocument, reg: Registration, meta: Path) -> None:
    """A rerun continues the same job: different registration fields need --force (a new job)."""
    recorded = {k: v for k, v in doc["registration"].items() if k != "http_url"}
    wanted = {k: v for k, v in reg.body.items() if k != "http_url"}
    changed = sorted(set(recorded) ^ set(wanted) | {k for k in recorded if recorded[k] != wanted.get(k)})
    if changed:
        raise UsageProblem(
            f"{meta} was prepared with other registration fields ({', '.join(changed)}): "
            "rerun with the same options to continue, or --force to start again",
            code="changed_registration",
        )


def _uploaded(doc: MetadataDocument, opts: uploading.Options, image: str, now: datetime) -> bool:
    """An upload on record to this container and object whose URL outlives a registration's download.

    Other upload options than the recorded ones (another container or object) mean upload again.
    """
    record = doc.get("upload")
    where = (opts.container, uploading.object_name(opts, image))
    if record is None or (record["container"], record["object"]) != where:
        return False
    return "http_url" in doc["registration"] and url_lasts(record, now)


def _registered(doc: MetadataDocument) -> bool:
    library = doc.get("library")
    return library is not None and "image_id" in library and library["status"] != "failed"


def publish(
    source: str,
    reg: Registration,
    upload_opts: uploading.Options,
    *,
    prepare_args: Mapping[str, Any],
    output_path: str | None = None,
    force: bool = False,
    wait: bool = False,
    timeout: int = DEFAULT_TIMEOUT,
    environ: Mapping[str, str] | None = None,
    on_progress: Callable[[str], Callback | None] | None = None,
    on_status: StatusCallback | None = None,
) -> PublishResult:
    """Each step that the document does not record as finished; `on_progress(step)` gives a callback."""
    env = os.environ if environ is None else environ
    uploading.check_options(upload_opts)
    target = Path(output_path) if output_path is not None else default_output(source)
    meta = default_metadata_path(str(target))
    result = PublishResult(image=str(target), metadata=str(meta))
    doc = None if force else _existing(meta)
    if doc is not None and target.exists():
        _same_registration(doc, reg, meta)
        result.steps["prepare"] = "skipped"
    else:
        progress = on_progress("prepare") if on_progress else None
        prepare(source, reg, output_path=str(target), force=force, progress=progress, **prepare_args)
        result.steps["prepare"] = "done"
        doc = read_document(meta)
    if _registered(doc) or _uploaded(doc, upload_opts, str(target), datetime.now(UTC)):
        result.steps["upload"] = "skipped"
    else:
        progress = on_progress("upload") if on_progress else None
        uploading.upload(str(target), upload_opts, metadata=str(meta), environ=env, on_progress=progress)
        result.steps["upload"] = "done"
    result.url = read_document(meta)["registration"].get("http_url")
    try:
        result.registered = register(str(meta), wait=wait, timeout=timeout, environ=env, on_status=on_status)
    except ImageRejected:
        result.steps["register"] = "failed"
        raise
    result.steps["register"] = "done" if result.registered.created or result.registered.adopted else "skipped"
    result.warnings = result.registered.warnings
    return result
