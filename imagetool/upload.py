"""`upload`: put a prepared image in Orbit (Swift) and sign a temp URL the library can download.

Nothing is sent before the image passes what `preflight --metadata` checks (same
checks, same exit codes). Up to `--segment-size` (and the cluster's
`max_file_size`) the image goes up in one piece with its md5 as the ETag, so
Swift itself refuses a corrupted transfer. Above, it becomes a Static Large
Object: segments in `<container>_segments`, sent in parallel, each segment's
md5 checked against the ETag Swift returns, then the manifest. Segment names
carry the container, the object and the image's sha256, so a rerun finds the
segments an interrupted run left, keeps each whose stored md5 equals the local
one and sends only the rest, and no other object's or image's segment matches.

swiftclient's SwiftService would upload segments too, but it cannot resume an
unfinished one (it skips only whole identical objects); its Connection (auth,
retries with backoff) and temp-URL signing are used as they are. Memory is the
chunks in flight: `threads` x 1 MiB, whatever the image size.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

from imagetool import swift
from imagetool.durations import iso, parse_time
from imagetool.errors import (
    EnvironmentProblem,
    ImageRejected,
    ImagetoolError,
    Reason,
    UsageProblem,
    VerifyFailed,
)
from imagetool.fingerprint import writers
from imagetool.output import check_target
from imagetool.policy import URL_MARGIN_SECONDS
from imagetool.progress import Callback, Progress
from imagetool.sizes import parse_size
from imagetool.source import Source, open_source
from imagetool.text import unsafe_character

if TYPE_CHECKING:  # metadata (jsonschema, the inspector) is imported once the image is open: see upload()
    from imagetool.metadata import MetadataDocument, UploadRecord

SCHEMA = "imagetool.upload/1"
DEFAULT_EXPIRES = "2d"  # outlasts an asynchronous registration
# A temp URL is a bearer link to a private image: long enough for a registration, not for ever.
LONGEST_EXPIRY = timedelta(days=30)
# register needs URL_MARGIN_SECONDS left when it asks; a shorter URL could never be registered.
SHORTEST_EXPIRY = timedelta(seconds=3 * URL_MARGIN_SECONDS)
DEFAULT_SEGMENT_SIZE = 1024**3
DEFAULT_THREADS = 4
MAX_THREADS = 32
_CHUNK = 1 << 20  # bytes read (and hashed) at a time
_POLL = 0.2  # seconds the main thread waits between looks at its workers (so signals land)


class _Stopped(BaseException):
    """Raised inside a request body when the run is stopping: not an Exception, so no retry catches it."""


@dataclass(frozen=True)
class Options:
    container: str
    object: str | None = None  # default: the image's file name
    segment_container: str | None = None  # default: <container>_segments
    segment_size: int = DEFAULT_SEGMENT_SIZE
    expires: str = DEFAULT_EXPIRES
    threads: int = DEFAULT_THREADS
    set_temp_url_key: bool = False
    verify_download: bool = False
    retries: int = 5


@dataclass(frozen=True)
class Segment:
    index: int
    offset: int
    length: int
    name: str


@dataclass(frozen=True)
class UploadResult:
    image: str
    metadata: str
    url: str
    record: UploadRecord
    sent_segments: int  # segments (or the one piece) sent by this run
    kept_segments: int  # segments an earlier run left, checked and kept
    sent_bytes: int
    removed_segments: int  # segments of earlier uploads of this object name, deleted
    reused: bool  # the object was already there, identical: only the URL was signed anew
    temp_url_key_set: bool
    register_command: str  # the brightbox CLI's line, complete: the signed URL in it

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        return {"schema": SCHEMA, "ok": True, **out}


def check_options(opts: Options) -> None:
    """Usage errors before anything is opened or sent."""
    swift.check_container_name(opts.container)
    if opts.segment_container is not None:
        swift.check_container_name(opts.segment_container, "--segment-container")
        if opts.segment_container == opts.container:
            raise UsageProblem("--segment-container must differ from --container", code="bad_container")
    if opts.object is not None:
        object_name(opts, "")
    if not 1 <= opts.threads <= MAX_THREADS:
        raise UsageProblem(f"--threads must be 1-{MAX_THREADS}", code="bad_threads")
    if opts.segment_size < 1 << 20:
        raise UsageProblem("--segment-size must be at least 1M", code="bad_segment_size")
    if not 0 <= opts.retries <= 10:
        raise UsageProblem("--retries must be 0-10", code="bad_retries")
    parse_time(opts.expires, "--expires", datetime.now(UTC), LONGEST_EXPIRY, SHORTEST_EXPIRY)


def parse_segment_size(text: str) -> int:
    try:
        return parse_size(text)
    except UsageProblem as exc:
        raise UsageProblem(f"--segment-size: {exc.message}", code="bad_segment_size") from None


# --- reading the image as request bodies ----------------------------------------------------


class _Body:
    """One byte range of the image as a request body: big preads, md5 as it goes, stoppable.

    swiftclient calls `reset()` before it retries a request; `sent` sees every byte
    (negative on a reset) so progress stays true. `head_start`: an md5 of the range's
    first bytes, hashed while preflight ran (_Prehasher); those bytes are not hashed
    again, and if they changed since, Swift's md5 of what it got tells.
    """

    def __init__(
        self,
        fd: int,
        offset: int,
        length: int,
        stop: threading.Event,
        sent: Callable[[int], None],
        head_start: tuple[Any, int] | None = None,
        hashing: bool = True,
    ):
        self.fd, self.offset, self.length, self.hashing = fd, offset, length, hashing
        self.stop, self.sent = stop, sent
        self.head_start = head_start or (hashlib.md5(usedforsecurity=False), 0)
        self.position = 0
        self.md5 = self.head_start[0].copy()

    def __len__(self) -> int:
        return self.length

    def read(self, size: int = -1) -> bytes:
        if self.stop.is_set():
            raise _Stopped
        want = min(self.length - self.position, max(size, _CHUNK))
        if want <= 0:
            return b""
        data = os.pread(self.fd, want, self.offset + self.position)
        if len(data) != want:
            raise EnvironmentProblem("the image shrank while it was being uploaded", code="input_changed")
        hashed = self.head_start[1] - self.position  # bytes of this chunk the head start covers
        if self.hashing:
            self.md5.update(data[hashed:] if hashed > 0 else data)
        self.position += want
        self.sent(want)
        return data

    def reset(self, *_: object, **__: object) -> None:
        self.sent(-self.position)
        self.position = 0
        self.md5 = self.head_start[0].copy()

    def hexdigest(self) -> str:
        return str(self.md5.hexdigest())


def _md5_of(
    fd: int, offset: int, length: int, stop: threading.Event, head_start: tuple[Any, int] | None
) -> str:
    body = _Body(fd, offset, length, stop, lambda _: None, head_start)
    while body.read():
        pass
    return body.hexdigest()


class _Prehasher:
    """md5s the first segments while preflight checks the image: work for the core it leaves idle.

    Reading and hashing are not sending: nothing leaves before the checks pass. It walks
    the segments that will be sent first (one per upload thread) a megabyte of each in
    turn, since they go out side by side; `take()` hands a segment's head start over
    (or None when the real plan cut the image otherwise).
    """

    def __init__(self, fd: int, size: int, segment_size: int, threads: int) -> None:
        self.fd, self.size, self.segment_size, self.threads = fd, size, segment_size, threads
        self.halt = threading.Event()
        self.progress: dict[int, tuple[Any, int]] = {}
        self.thread = threading.Thread(target=self._walk, daemon=True)
        if size > segment_size:  # one piece is checked by Swift against the document's md5
            self.thread.start()

    def _walk(self) -> None:
        starts = list(range(0, self.size, self.segment_size))
        with contextlib.suppress(OSError):
            for first in range(0, len(starts), self.threads):
                batch = range(first, min(first + self.threads, len(starts)))
                for index in batch:
                    self.progress[index] = (hashlib.md5(usedforsecurity=False), 0)
                for done in range(0, self.segment_size, _CHUNK):
                    for index in batch:
                        length = min(self.segment_size, self.size - starts[index])
                        if done >= length:
                            continue
                        if self.halt.is_set():
                            return
                        md5 = self.progress[index][0]
                        md5.update(os.pread(self.fd, min(_CHUNK, length - done), starts[index] + done))
                        self.progress[index] = (md5, min(done + _CHUNK, length))

    def stop(self) -> None:
        self.halt.set()
        if self.thread.is_alive():
            self.thread.join()

    def take(self, seg: Segment, segment_size: int) -> tuple[Any, int] | None:
        """The head start of `seg` (after stop()), if the walk cut the image the same way."""
        if segment_size != self.segment_size:  # the cluster's limit made the segments smaller
            return None
        found = self.progress.get(seg.index)
        return (found[0].copy(), found[1]) if found else None


class _Counter:
    """Bytes handled so far, from every worker thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.value = 0

    def add(self, n: int) -> None:
        with self.lock:
            self.value += n


# --- the plan ------------------------------------------------------------------------------


def segments(size: int, segment_size: int, prefix: str) -> list[Segment]:
    """The image cut into segments named `<prefix><index>`; the last one may be shorter."""
    count = -(-size // segment_size)
    return [
        Segment(i, i * segment_size, min(segment_size, size - i * segment_size), f"{prefix}{i:08d}")
        for i in range(count)
    ]


def slo_etag(md5s: list[str]) -> str:
    """The ETag Swift gives a Static Large Object: md5 of its segments' md5s, concatenated."""
    return hashlib.md5("".join(md5s).encode(), usedforsecurity=False).hexdigest()


def _segment_size(size: int, opts: Options, cluster: swift.Cluster, obj: str) -> int | None:
    """The segment size to use, or None for one piece."""
    limit = min(opts.segment_size, cluster.max_file_size)
    if size <= limit:
        return None
    longest = len((_prefix(opts.container, obj, "0" * 64, size, limit) + "00000000").encode())
    if longest > 1024:
        raise UsageProblem(
            f"the object name is too long for a segmented upload (segment names would be {longest} "
            "bytes, Swift allows 1024): give a shorter --object",
            code="bad_object",
        )
    if not cluster.slo:
        raise EnvironmentProblem(
            f"the image is over this Swift's one-object limit ({cluster.max_file_size} bytes) and the "
            "cluster has no Static Large Object support",
            code="no_slo",
        )
    count = -(-size // limit)
    if count > cluster.max_manifest_segments:
        raise UsageProblem(
            f"{count} segments of {limit} bytes is over this Swift's {cluster.max_manifest_segments}: "
            "use a bigger --segment-size",
            code="bad_segment_size",
        )
    return limit


# --- the run ---------------------------------------------------------------------------------


@dataclass
class _Run:
    """What every worker shares: credentials, the image's descriptor, the stop flag and counters."""

    creds: swift.Credentials
    retries: int
    fd: int
    stop: threading.Event
    done: _Counter
    local: threading.local

    first: Any = None  # the main thread's connection: the others start with its token
    prehashed: _Prehasher | None = None
    segment_size: int = 0  # the plan's (the cluster may allow less than asked)

    def connection(self) -> Any:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = swift.connect(self.creds, retries=self.retries, like=self.first)
            self.first = self.first or conn
        return conn


def _put_segment(
    run: _Run, container: str, seg: Segment, stored: Mapping[str, tuple[int, str]]
) -> tuple[str, bool]:
    """Send one segment unless an earlier run stored it with the same md5; (md5, sent)."""
    head_start = run.prehashed.take(seg, run.segment_size) if run.prehashed is not None else None
    if stored.get(seg.name, (None, None))[0] == seg.length:
        local = _md5_of(run.fd, seg.offset, seg.length, run.stop, head_start)
        if local == stored[seg.name][1]:
            run.done.add(seg.length)
            return local, False
    body = _Body(run.fd, seg.offset, seg.length, run.stop, run.done.add, head_start)
    etag = run.connection().put_object(
        container, seg.name, body, content_length=seg.length, content_type="application/octet-stream"
    )
    if etag != body.hexdigest():
        raise VerifyFailed(
            f"segment {seg.index}: Swift stored md5 {etag}, imagetool sent {body.hexdigest()}; run again",
            code="segment_mismatch",
        )
    return etag, True


def _in_parallel(
    run: _Run, jobs: Sequence[Callable[[], Any]], threads: int, tick: Callable[[], None]
) -> list[Any]:
    """Run `jobs` on daemon threads (a stuck request must not hold the process at exit); first error wins.

    The main thread only waits, in short steps, so Ctrl-C and SIGTERM reach it;
    stopping sets the flag every body checks at its next megabyte.
    """
    results: list[Any] = [None] * len(jobs)
    todo: queue.Queue[int] = queue.Queue()
    for i in range(len(jobs)):
        todo.put(i)
    finished: queue.Queue[tuple[int, BaseException | None]] = queue.Queue()

    def worker() -> None:
        while not run.stop.is_set():
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            try:
                results[i] = jobs[i]()
                finished.put((i, None))
            except BaseException as exc:  # handed to the main thread, which raises it
                finished.put((i, exc))
                return

    for _ in range(min(threads, len(jobs))):
        threading.Thread(target=worker, daemon=True).start()
    try:
        for _ in range(len(jobs)):
            while True:
                tick()
                try:
                    _, error = finished.get(timeout=_POLL)
                    break
                except queue.Empty:
                    continue
            if error is not None:
                raise error
    finally:
        run.stop.set()
    return results


def _stored_segments(conn: Any, container: str, prefix: str) -> dict[str, tuple[int, str]]:
    """Segments an earlier run stored under `prefix`: name -> (bytes, md5)."""
    try:
        _, listing = conn.get_container(container, prefix=prefix, full_listing=True)
    except Exception as exc:  # a missing segment container is simply "nothing stored yet"
        if swift.gone(exc):
            return {}
        raise
    return {item["name"]: (int(item["bytes"]), str(item["hash"])) for item in listing}


def _remove_replaced_segments(conn: Any, old: list[tuple[str, str]], owned: str, keep: set[str]) -> int:
    """Delete the segments of the large object this upload replaced (storage the account pays for).

    Only segments its own manifest listed, named the way imagetool names them for this
    container's object (`owned`, the container is in the name, so a segment container
    shared between containers never mixes them), and not part of the new object.
    """
    removed = 0
    for segment_container, name in old:
        if not name.startswith(owned) or name in keep:
            continue
        try:
            conn.delete_object(segment_container, name)
            removed += 1
        except Exception as exc:  # already gone (another run cleaned up): fine
            if not swift.gone(exc):
                raise
    return removed


def _already_there(
    conn: Any, container: str, obj: str, doc: MetadataDocument, size: int
) -> UploadRecord | None:
    """The document's upload record when the object still is this image: nothing to send again.

    The object must carry this image's sha256 (imagetool sets X-Object-Meta-Sha256 on
    what it uploads), its size, and the ETag on record; one piece must also have the
    image's md5, which Swift computed itself; a large object, every segment it lists.
    """
    previous, image = doc.get("upload"), doc["image"]
    if previous is None or (previous["container"], previous["object"]) != (container, obj):
        return None
    headers = swift.head(conn, container, obj)
    if headers is None:
        return None
    etag = swift.etag(headers)
    same = (
        headers.get("x-object-meta-sha256") == image["sha256"]
        and int(headers.get("content-length", -1)) == size
    )
    if not same or etag != previous["etag"]:
        return None
    if previous["segments"] == 0:
        return previous if etag == image["md5"] else None
    listed = swift.manifest(conn, container, obj)
    return previous if listed is not None and swift.intact(conn, listed) else None


def _confirm(conn: Any, container: str, obj: str, size: int, etag: str) -> None:
    """HEAD the object: Swift must hold exactly `size` bytes under the ETag we computed."""
    headers = conn.head_object(container, obj)
    stored_size = int(headers.get("content-length", -1))
    stored_etag = swift.etag(headers)
    if stored_size != size or stored_etag != etag:
        raise VerifyFailed(
            f"Swift holds {stored_size} bytes with ETag {stored_etag}; "
            f"imagetool sent {size} bytes with ETag {etag}",
            code="upload_mismatch",
        )


def _verify_download(url: str, size: int, sha256: str) -> None:
    """GET the temp URL as the library will, and compare sha256 and size with the metadata's."""
    import requests

    digest, got = hashlib.sha256(), 0
    with requests.get(url, stream=True, timeout=swift.TIMEOUT) as response:
        if response.status_code != 200:
            raise VerifyFailed(f"the temp URL answered {response.status_code}", code="download_failed")
        for chunk in response.iter_content(_CHUNK):
            digest.update(chunk)
            got += len(chunk)
    if got != size or digest.hexdigest() != sha256:
        raise VerifyFailed(
            f"the temp URL gave {got} bytes with sha256 {digest.hexdigest()}, not the image's",
            code="download_mismatch",
        )


@dataclass
class _Handshake:
    """What Swift says before anything is written: the login, `/info` and the temp-URL key.

    Read-only, so it runs on its own thread while preflight checks the image: over a real
    network that is several round trips off the critical path. Its error, if any, is
    raised only when the checks have passed (an image problem is said first).
    """

    conn: Any = None
    cluster: swift.Cluster | None = None
    key: str | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def start(cls, creds: swift.Credentials, retries: int, container: str) -> _Handshake:
        shake = cls()

        def run() -> None:
            try:
                with swift.translated(creds.secrets, "contacting Swift"):
                    shake.conn = swift.connect(creds, retries=retries)
                    shake.cluster = swift.cluster(shake.conn.get_capabilities())
                    shake.key = swift.temp_url_key(shake.conn, container)
            except BaseException as exc:  # handed to the caller, which raises it
                shake.error = exc
            finally:
                shake.done.set()

        threading.Thread(target=run, daemon=True).start()
        return shake

    def result(self) -> tuple[Any, swift.Cluster, str | None]:
        while not self.done.wait(_POLL):  # short waits: a signal reaches the main thread
            pass
        if self.error is not None:
            raise self.error
        assert self.cluster is not None
        return self.conn, self.cluster, self.key


def _refuse_what_preflight_fails(image: str, meta: Path) -> None:
    """The checks `preflight --metadata` runs, with its exit codes, before a byte is sent."""
    from imagetool.preflight import preflight

    result = preflight(image, metadata=str(meta), guest=True)
    failing = result.failing()
    if failing:
        reasons = [Reason(c.code or c.status, f"{c.name}: {c.message}") for c in failing]
        raise ImageRejected(f"preflight fails: {reasons[0].message}", reasons, path=image)


def upload(
    image: str,
    opts: Options,
    *,
    metadata: str | None = None,
    environ: Mapping[str, str] | None = None,
    on_progress: Callback | None = None,
) -> UploadResult:
    """Check, send, confirm, sign and record; see the module docstring."""
    check_options(opts)
    creds = swift.credentials(os.environ if environ is None else environ)
    shake = _Handshake.start(creds, opts.retries, opts.container)
    # Opened before preflight reads it: the identity taken here covers preflight's checksums,
    # so a write between the check and the upload is caught (ensure_unchanged), never sent.
    with open_source(image) as src:
        prehasher = _Prehasher(src.fd, src.size, opts.segment_size, opts.threads)
        try:
            from imagetool.metadata import default_metadata_path, exclusive  # while the prehasher hashes

            meta = Path(metadata) if metadata is not None else default_metadata_path(image)
            with exclusive(meta):
                return _upload(src, meta, opts, creds, shake, prehasher, on_progress)
        except ImagetoolError as exc:
            exc.path = exc.path or image  # every failure names the image it was about
            raise
        finally:
            prehasher.stop()


def _refuse_writers(src: Source) -> None:
    """No upload while another process has the image open for writing or mapped writable.

    A writer with a mapping changes bytes without moving the file's times, so nothing
    after the fact would tell; the kernel tells now (fingerprint.writers: a read lease).
    """
    if writers(src.fd):
        raise EnvironmentProblem(
            "another process has the image open for writing (or mapped): its bytes may change while "
            "they are sent; close it and run again",
            code="image_in_use",
        )


def object_name(opts: Options, image: str) -> str:
    """--object, or the image's file name: Swift's rules and the document's (text a terminal shows)."""
    what = "--object" if opts.object is not None else "the image's file name (give --object NAME)"
    name = swift.check_object_name(opts.object or Path(image).name, what)
    if (char := unsafe_character(name)) is not None:
        raise UsageProblem(
            f"{what} contains U+{ord(char):04X} (a control or bidi character)", code="bad_object"
        )
    return name


def _upload(
    src: Source,
    meta: Path,
    opts: Options,
    creds: swift.Credentials,
    shake: _Handshake,
    prehasher: _Prehasher,
    on_progress: Callback | None,
) -> UploadResult:
    """What preflight fails is refused; then the handshake's answer, the transfer, the record."""
    from imagetool.metadata import read_document, save_document

    _refuse_writers(src)
    _refuse_what_preflight_fails(src.path, meta)
    src.ensure_unchanged()
    doc = read_document(meta)  # as preflight validated it, and no other run can change it now
    check_target(meta, force=True, inputs={(src.device, src.inode)})  # writable, before a byte is sent
    facts = doc["image"]
    size, md5, sha256 = src.size, facts["md5"], facts["sha256"]
    obj, container = object_name(opts, src.path), opts.container
    seg_container = opts.segment_container or f"{container}_segments"
    secrets = creds.secrets
    now = datetime.now(UTC)
    expires = parse_time(opts.expires, "--expires", now, LONGEST_EXPIRY, SHORTEST_EXPIRY)
    run = _Run(creds, opts.retries, src.fd, threading.Event(), _Counter(), threading.local())
    started = time.monotonic()

    def tick() -> None:
        if on_progress is not None:
            on_progress(Progress(run.done.value, size, time.monotonic() - started, run.done.value))

    conn, cluster, key = shake.result()
    prehasher.stop()  # what it hashed by now is handed to the segments that start with it
    run.first, run.local.conn, run.prehashed = conn, conn, prehasher
    with swift.translated(secrets, "contacting Swift"):
        if cluster.digest is None:
            raise EnvironmentProblem(
                "this Swift has no tempurl middleware: no URL can be signed", code="no_tempurl"
            )
        seg_size = _segment_size(size, opts, cluster, obj)
        run.segment_size = seg_size or 0
        key_set = False
        if key is None:  # said before anything is made or sent
            if not opts.set_temp_url_key:
                raise EnvironmentProblem(
                    "neither the account nor the container has a temp-URL key: rerun with "
                    "--set-temp-url-key to set a strong random one, or set your own with "
                    "`swift post -m Temp-URL-Key:<secret>`",
                    code="no_temp_url_key",
                )
            key, key_set = swift.set_temp_url_key(conn), True
        secrets.add(key)
        conn.put_container(container)
    with swift.translated(secrets, f"uploading to {container}/{obj}"):
        previous = _already_there(conn, container, obj, doc, size)
        reused, sent, kept, removed = previous is not None, 0, 0, 0
        if previous is not None:
            etag, count = previous["etag"], previous["segments"]
            run.done.add(size)
        else:
            old = [(seg["container"], seg["name"]) for seg in swift.manifest(conn, container, obj) or []]
            if seg_size is None:
                _put_whole(run, conn, container, obj, size, md5, sha256, tick)
                etag, count, sent = md5, 0, 1
            else:
                etag, count, sent, kept = _upload_segments(
                    run, conn, src, opts, obj, container, seg_container, seg_size, sha256, tick
                )
            src.ensure_unchanged()
            _confirm(conn, container, obj, size, etag)
            plan = (
                segments(size, seg_size, _prefix(container, obj, sha256, size, seg_size)) if seg_size else []
            )
            removed = _remove_replaced_segments(
                conn, old, f"{container}/{obj}/slo/", {seg.name for seg in plan}
            )
        tick()
        url = swift.sign(conn.url, container, obj, key, int(expires.timestamp()), cluster.digest)
    if opts.verify_download:
        with swift.translated(secrets, "downloading through the temp URL"):
            _verify_download(url, size, sha256)
    record: UploadRecord = {
        "endpoint": urlsplit(conn.url).netloc,
        "container": container,
        "object": obj,
        "segment_container": seg_container if count else None,
        "segments": count,
        "etag": etag,
        "md5": md5,
        "bytes": size,
        "uploaded_at": previous["uploaded_at"] if previous is not None else iso(now),
        "expires_at": iso(expires),
        "digest": cluster.digest,
        "verified_download": opts.verify_download,
    }
    doc["registration"]["http_url"] = url
    doc["upload"] = record
    save_document(meta, doc, inputs={(src.device, src.inode)})
    return UploadResult(
        image=src.path,
        metadata=str(meta),
        url=url,
        record=record,
        sent_segments=sent,
        kept_segments=kept,
        sent_bytes=0 if reused else run.done.value,
        removed_segments=removed,
        reused=reused,
        temp_url_key_set=key_set,
        register_command=doc["register_command"],
    )


def _put_whole(
    run: _Run, conn: Any, container: str, obj: str, size: int, md5: str, sha256: str, tick: Callable[[], None]
) -> None:
    """One PUT with the image's md5 as ETag: Swift refuses (422) bytes that do not match it.

    So the body is not hashed here: Swift's check of the document's md5 is the stronger one.
    """
    body = _Body(run.fd, 0, size, run.stop, run.done.add, hashing=False)
    headers = {"X-Object-Meta-Sha256": sha256}
    put = functools.partial(
        conn.put_object, container, obj, body, content_length=size, etag=md5, headers=headers,
        content_type="application/octet-stream",
    )  # fmt: skip
    _in_parallel(run, [put], 1, tick)


def _prefix(container: str, obj: str, sha256: str, size: int, seg_size: int) -> str:
    """Where this image's segments live: the object's container and name, and the image's sha256.

    No other object's segments (even in a segment container shared between containers)
    and no other image's ever share a name with them.
    """
    return f"{container}/{obj}/slo/{sha256[:16]}/{size}/{seg_size}/"


def _upload_segments(
    run: _Run,
    conn: Any,
    src: Source,
    opts: Options,
    obj: str,
    container: str,
    seg_container: str,
    seg_size: int,
    sha256: str,
    tick: Callable[[], None],
) -> tuple[str, int, int, int]:
    """Segments (resuming an earlier run's), then the manifest; (etag, segments, sent, kept)."""
    prefix = _prefix(container, obj, sha256, src.size, seg_size)
    conn.put_container(seg_container)
    stored = _stored_segments(conn, seg_container, prefix)
    plan = segments(src.size, seg_size, prefix)
    jobs = [functools.partial(_put_segment, run, seg_container, seg, stored) for seg in plan]
    outcomes = cast(list[tuple[str, bool]], _in_parallel(run, jobs, opts.threads, tick))
    md5s = [md5 for md5, _ in outcomes]
    manifest = [
        {"path": f"/{seg_container}/{seg.name}", "etag": md5, "size_bytes": seg.length}
        for seg, md5 in zip(plan, md5s, strict=True)
    ]
    src.ensure_unchanged()  # the segments are this file's bytes only if nothing wrote to it meanwhile
    _refuse_writers(src)  # nor has it open now (a mapping's writes do not move the times)
    conn.put_object(
        container,
        obj,
        json.dumps(manifest),
        query_string="multipart-manifest=put",
        headers={"X-Object-Meta-Sha256": sha256},
        content_type="application/octet-stream",
    )
    sent = sum(was_sent for _, was_sent in outcomes)
    return slo_etag(md5s), len(plan), sent, len(plan) - sent
