"""The command line: parse, call an operation, render, exit. No logic lives here.

Exit codes (shared by every command): 0 ok, 1 internal error (a bug), 2 usage,
3 image rejected, 4 size limit exceeded, 5 I/O or environment; 128+N when
signal N stopped it (130 Ctrl-C, 129 SIGHUP, 143 SIGTERM). With --json, stdout
holds exactly one JSON object with a `schema` key, whatever the outcome.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from imagetool import __version__

if TYPE_CHECKING:  # the commands import what they run: `imagetool --help` stays fast
    from imagetool.convert import ConvertResult
    from imagetool.metadata import MetadataDocument, Registration
from imagetool.errors import (
    EnvironmentProblem,
    ExitCode,
    ImageRejected,
    ImagetoolError,
    Interrupted,
    UsageProblem,
)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    help="Prepare virtual-disk images for a cloud image library, safely.",
)


def _show_version(value: bool) -> None:
    if not value:
        return
    from imagetool import qemu, render

    try:
        qemu_version = qemu.version()
    except ImagetoolError as exc:
        qemu_version = f"unavailable ({exc.message})"
    render.say(f"imagetool {__version__}\nqemu-img {qemu_version}")
    raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", is_eager=True, callback=_show_version, help="Print versions and exit."),
    ] = False,
) -> None:
    """Prepare virtual-disk images for a cloud image library, safely."""


# What an interrupted command leaves on purpose (every other command leaves nothing).
_LEFT_ON_PURPOSE = {
    "upload": "any segment already sent stays in Swift: a rerun resumes from it",
    "publish": "finished steps are recorded and any segment sent stays in Swift: a rerun continues",
}


def interrupted(name: str, exc: BaseException, as_json: bool) -> int:
    """Report a signal the one way every outcome is reported; return its exit code (128+N)."""
    from imagetool import render, signals

    code = signals.exit_code(exc)
    left = _LEFT_ON_PURPOSE.get(name)
    stopped = ImagetoolError(signals.message(exc, *([left] if left else [])), code="interrupted")
    if as_json and not render.json_emitted():
        render.emit_json(render.error_document(name, stopped) | {"exit_code": code})
    render.error_line(stopped.message)
    return code


JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
F = TypeVar("F", bound=Callable[..., Any])


def command(name: str) -> Callable[[F], F]:
    """Register a command whose errors all become one line (or one JSON object) and an exit code."""

    def wrap(func: F) -> F:
        @functools.wraps(func)
        def run(*args: Any, **kwargs: Any) -> None:
            from imagetool import render

            as_json = bool(kwargs.get("json_out"))
            try:
                code = func(*args, **kwargs)
            except ImagetoolError as exc:
                if as_json:
                    render.emit_json(render.error_document(name, exc))
                suffix = f" [{exc.code}]" if isinstance(exc, ImageRejected) else ""
                render.error_line(exc.one_line() + suffix)
                raise typer.Exit(int(exc.exit_code)) from None
            except (KeyboardInterrupt, Interrupted) as exc:
                raise typer.Exit(interrupted(name, exc, as_json)) from None
            except (OSError, MemoryError) as exc:  # not a bug in imagetool: the machine said no
                problem = EnvironmentProblem(f"unexpected: {exc}", code="io_error")
                if as_json:
                    render.emit_json(render.error_document(name, problem))
                render.error_line(problem.message)
                raise typer.Exit(int(problem.exit_code)) from None
            raise typer.Exit(int(code or 0))

        app.command(name)(run)
        return func

    return wrap


@command("inspect")
def inspect_cmd(
    image: Annotated[str, typer.Argument(help="The disk image file.")],
    format: Annotated[
        str | None,
        typer.Option(
            "--format",
            "-f",
            help="The format you expect (raw, qcow2, vmdk, vdi, vhd, vhdx); a different content is rejected.",
        ),
    ] = None,
    max_virtual_size: Annotated[
        str, typer.Option(help="Refuse images whose virtual size is larger (binary units: 4T = 4 TiB).")
    ] = "4T",
    guest: Annotated[
        bool,
        typer.Option(
            "--guest/--no-guest", help="Also read the guest's arch, mode and username (safe images)."
        ),
    ] = True,
    json_out: JsonOpt = False,
) -> int:
    """Report an image's true format, sizes and whether it is safe to touch."""
    from imagetool import render
    from imagetool.inspection import Report, inspect_image
    from imagetool.sizes import parse_size
    from imagetool.source import Source

    inside: dict[str, Any] = {}

    def look_inside(src: Source, report: Report) -> None:
        if guest and report.safe and report.format in ("raw", "qcow2"):
            from imagetool.guest import look
            from imagetool.guest.report import guest_text

            facts = look(src, report.format)
            inside["json"], inside["text"] = facts.as_dict(), guest_text(src.path, facts, verbose=False)

    report = inspect_image(image, format, parse_size(max_virtual_size), then=look_inside)
    if json_out:
        render.emit_json(report.as_dict() | ({"guest": inside["json"]} if inside else {}))
    else:
        guest_lines = inside["text"].splitlines()[1:] if inside else []
        render.say(
            "\n".join([render.inspect_text(report), *(f"  guest {line.strip()}" for line in guest_lines)])
        )
    render.rejection_line(report)
    return report.exit_code


@command("guest")
def guest_cmd(
    image: Annotated[str, typer.Argument(help="The disk image (raw or qcow2) to look inside.")],
    format: Annotated[
        str | None,
        typer.Option("--format", "-f", help="The format you expect; a different content is rejected."),
    ] = None,
    time_limit: Annotated[
        float, typer.Option(help="Give up (unknown answers, with the reason) after this many seconds.")
    ] = 10.0,
    brief: Annotated[bool, typer.Option("--brief", help="Answers only, without the evidence.")] = False,
    json_out: JsonOpt = False,
) -> int:
    """Read the guest's filesystems: architecture, virtio or compatibility mode, default username, OS."""
    from imagetool import render
    from imagetool.guest import look
    from imagetool.guest.report import guest_document, guest_text
    from imagetool.inspection import inspect_source
    from imagetool.source import open_source

    if not 0 < time_limit <= 600:
        raise UsageProblem("--time-limit must be between 0 and 600 seconds", code="bad_time_limit")
    with open_source(image) as src:
        report = inspect_source(src, format)
        if not report.safe:  # the same inspector as every command, before a byte of the guest is read
            raise report.rejected()
        fmt = report.format or ""
        facts = look(src, fmt, time_limit=time_limit)
    if json_out:
        render.emit_json(guest_document(image, fmt, facts))
    else:
        render.say(guest_text(image, facts, verbose=not brief))
    return 0


CompressionOpt = Annotated[
    str, typer.Option(help="zlib (every reader), zstd (much faster; readers need QEMU >= 5.1) or none.")
]
EngineOpt = Annotated[
    str,
    typer.Option(
        help="native (imagetool's own writer: ISA-L/zstd on every core) or qemu (qemu-img convert). "
        "Inputs the native writer cannot read (compressed clusters) and --compression none use qemu."
    ),
]
LevelOpt = Annotated[
    int | None, typer.Option(help="Native writer's level: zlib 0-3 (default 3), zstd 1-19 (default 3).")
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(help="Compression threads (native, default: every core) or qemu-img coroutines (8); 1-16."),
]
MaxCompressedOpt = Annotated[
    str, typer.Option(help="Refuse outputs bigger than this (binary units: 50G = 51200M = 53687091200).")
]
ProgressOpt = Annotated[
    str,
    typer.Option(help="auto (a bar on a terminal, else nothing), bar, json (JSON lines on stderr), none."),
]
VerifyOpt = Annotated[
    bool,
    typer.Option("--verify/--no-verify", help="Inspect, check and compare the output before keeping it."),
]
FormatOpt = Annotated[
    str | None,
    typer.Option("--format", "-f", help="The input format you expect; a different content is rejected."),
]


@command("convert")
def convert_cmd(
    source: Annotated[str, typer.Argument(help="The input disk image (raw, qcow2, vmdk, vdi, vhd, vhdx).")],
    output: Annotated[
        str | None,
        typer.Option(
            "--output", "-o", help="Where to write the qcow2 (default: SOURCE with a .qcow2 suffix)."
        ),
    ] = None,
    compression: CompressionOpt = "zlib",
    engine: EngineOpt = "native",
    level: LevelOpt = None,
    threads: ThreadsOpt = None,
    max_compressed_size: MaxCompressedOpt = "50G",
    progress: ProgressOpt = "auto",
    verify: VerifyOpt = True,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
    estimate_only: Annotated[
        bool, typer.Option("--estimate-only", help="Only predict the compressed size; write nothing.")
    ] = False,
    format: FormatOpt = None,
    json_out: JsonOpt = False,
) -> int:
    """Convert a disk image to sparse, compressed qcow2, within the size limit."""
    from imagetool import render
    from imagetool.convert import convert
    from imagetool.progress import renderer
    from imagetool.sizes import parse_size

    limit = parse_size(max_compressed_size)
    show = renderer("none" if estimate_only else progress, "converting")
    try:
        result = convert(
            source,
            output,
            compression=compression,
            engine=engine,
            level=level,
            threads=threads,
            limit=limit,
            verify=verify,
            force=force,
            estimate_only=estimate_only,
            claimed_format=format,
            progress=show,
        )
    finally:
        show.close()
    if json_out:
        render.emit_json(result.as_dict())
    else:
        render.say(render.convert_text(result))
    for warning in result.warnings:
        render.warning_line(result.source, warning)
    return 0


NameOpt = Annotated[str | None, typer.Option("--name", "-n", help="Image name (required).")]
ArchOpt = Annotated[str | None, typer.Option("--arch", "-a", help="x86_64 or i686 (required).")]
ModeOpt = Annotated[str, typer.Option("--mode", "-m", help="virtio or compatibility.")]
# metadata and prepare: unset means virtio, or what the guest says with --from-guest.
MaybeModeOpt = Annotated[
    str | None, typer.Option("--mode", "-m", help="virtio (default) or compatibility.", show_default=False)
]
FromGuestOpt = Annotated[
    bool,
    typer.Option(
        "--from-guest/--no-from-guest",
        help="Read the guest's files (default): fill --arch, --mode and --username when not given; "
        "refuse values its files contradict (exit 3; --force keeps them).",
    ),
]
UserOpt = Annotated[str | None, typer.Option("--username", "-u", help="Default login (gets the SSH key).")]
PublicOpt = Annotated[bool, typer.Option("--public/--private", help="Who may use it (default private).")]
DescOpt = Annotated[str | None, typer.Option("--description", "-d", help="Free text.")]
MinRamOpt = Annotated[int | None, typer.Option("--min-ram", help="Smallest RAM it needs, in MB.")]
UrlOpt = Annotated[str | None, typer.Option("--url", help="http(s) URL the library downloads it from.")]
ServerDiskOpt = Annotated[
    str | None,
    typer.Option(
        "--server-disk", help="Check the image fits a server disk of this size (20G = the library's 20 GB)."
    ),
]


def _show_prepared(
    reg: Registration, meta: Path, doc: MetadataDocument, result: ConvertResult, json_out: bool
) -> int:
    """What `prepare` and `snapshot` print: notes, then the document or the text, then warnings."""
    from imagetool import render

    for note in reg.notes:
        render.note_line(note)
    if json_out:
        render.emit_json(doc)
    else:
        render.say(render.convert_text(result))
        render.say(render.metadata_text(meta, doc))
    for warning in result.warnings:
        render.warning_line(result.source, warning)
    return 0


def _from_guest(
    image: str,
    arch: str | None,
    mode: str | None,
    username: str | None,
    force: bool,
    claimed_format: str | None = None,
) -> tuple[str | None, str, str | None, tuple[str, ...]]:
    """--from-guest: (arch, mode, username, notes) with what the guest's files say filled in."""
    from imagetool.guest.compare import fill, look_at_path
    from imagetool.metadata import _canonical_arch

    facts = look_at_path(image, claimed_format)
    filled = fill(
        facts, arch=_canonical_arch(arch)[0] if arch else None, mode=mode, username=username, force=force
    )
    return arch or filled.arch, filled.mode or "virtio", filled.username, filled.notes


def _size_or_none(text: str | None) -> int | None:
    from imagetool.sizes import parse_size

    return None if text is None else parse_size(text)


@command("metadata")
def metadata_cmd(
    image: Annotated[str, typer.Argument(help="The image to describe (qcow2 or raw).")],
    name: NameOpt = None,
    arch: ArchOpt = None,
    mode: MaybeModeOpt = None,
    username: UserOpt = None,
    public: PublicOpt = False,
    description: DescOpt = None,
    min_ram: MinRamOpt = None,
    url: UrlOpt = None,
    server_disk: ServerDiskOpt = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Default: IMAGE.json.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False,
    from_guest: FromGuestOpt = True,
    json_out: JsonOpt = False,
) -> int:
    """Write the registration metadata JSON for an image, and print the register command."""
    from imagetool import render
    from imagetool.metadata import registration, write_metadata

    guest_notes: tuple[str, ...] = ()
    if from_guest:
        arch, mode, username, guest_notes = _from_guest(image, arch, mode, username, force)
    reg = registration(
        name=name, arch=arch, mode=mode or "virtio", username=username, public=public,
        description=description, min_ram=min_ram, url=url,
    )  # fmt: skip
    for note in guest_notes:
        render.note_line(note)
    path, doc = write_metadata(image, reg, output=output, server_disk=_size_or_none(server_disk), force=force)
    for note in reg.notes:
        render.note_line(note)
    if json_out:
        render.emit_json(doc)
    else:
        render.say(render.metadata_text(path, doc))
    return 0


@command("prepare")
def prepare_cmd(
    source: Annotated[str, typer.Argument(help="The input disk image.")],
    name: NameOpt = None,
    arch: ArchOpt = None,
    mode: MaybeModeOpt = None,
    username: UserOpt = None,
    public: PublicOpt = False,
    description: DescOpt = None,
    min_ram: MinRamOpt = None,
    url: UrlOpt = None,
    server_disk: ServerDiskOpt = None,
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            "-o",
            help="The qcow2 to write (default: SOURCE with .qcow2); its JSON is OUTPUT.json.",
        ),
    ] = None,
    compression: CompressionOpt = "zlib",
    engine: EngineOpt = "native",
    level: LevelOpt = None,
    threads: ThreadsOpt = None,
    max_compressed_size: MaxCompressedOpt = "50G",
    progress: ProgressOpt = "auto",
    verify: VerifyOpt = True,
    force: Annotated[bool, typer.Option("--force", help="Replace existing outputs.")] = False,
    format: FormatOpt = None,
    from_guest: FromGuestOpt = True,
    json_out: JsonOpt = False,
) -> int:
    """The main job: inspect, convert (50 GB gate), verify, and write the metadata."""
    from imagetool import render
    from imagetool.metadata import registration
    from imagetool.prepare import prepare
    from imagetool.progress import renderer
    from imagetool.sizes import parse_size

    guest_notes: tuple[str, ...] = ()
    if from_guest:  # before anything is written, like every other check of prepare
        arch, mode, username, guest_notes = _from_guest(source, arch, mode, username, force, format)
    reg = registration(
        name=name, arch=arch, mode=mode or "virtio", username=username, public=public,
        description=description, min_ram=min_ram, url=url,
    )  # fmt: skip
    for note in guest_notes:
        render.note_line(note)
    limit = parse_size(max_compressed_size)
    show = renderer(progress, "preparing")
    try:
        _qcow2, meta, doc, result = prepare(
            source,
            reg,
            output_path=output,
            server_disk=_size_or_none(server_disk),
            force=force,
            compression=compression,
            engine=engine,
            level=level,
            threads=threads,
            limit=limit,
            verify=verify,
            claimed_format=format,
            progress=show,
        )
    finally:
        show.close()
    return _show_prepared(reg, meta, doc, result, json_out)


@command("snapshot")
def snapshot_cmd(
    disk: Annotated[str, typer.Argument(help="The stopped VM's disk (qcow2 or raw; the top of its chain).")],
    name: NameOpt = None,
    arch: ArchOpt = None,
    mode: ModeOpt = "virtio",
    username: UserOpt = None,
    public: PublicOpt = False,
    description: DescOpt = None,
    min_ram: MinRamOpt = None,
    url: UrlOpt = None,
    server_disk: ServerDiskOpt = None,
    output: Annotated[
        str | None,
        typer.Option(
            "--output", "-o", help="The qcow2 to write (default: DISK with .qcow2); its JSON is OUTPUT.json."
        ),
    ] = None,
    snapshot_name: Annotated[
        str | None,
        typer.Option("--snapshot", help="Export this internal snapshot (name or id), not the current state."),
    ] = None,
    list_only: Annotated[
        bool, typer.Option("--list", help="List the disk's internal snapshots; write nothing.")
    ] = False,
    allow_backing_dir: Annotated[
        list[str] | None,
        typer.Option("--allow-backing-dir", help="Also follow backing files in this directory (repeatable)."),
    ] = None,
    force_share: Annotated[
        bool,
        typer.Option("--force-share", help="Copy a disk a running VM uses (the copy may be inconsistent)."),
    ] = False,
    allow_device: Annotated[
        bool, typer.Option("--allow-device", help="Accept a block device (an LVM volume) as the disk.")
    ] = False,
    compression: CompressionOpt = "zlib",
    engine: EngineOpt = "native",
    level: LevelOpt = None,
    threads: ThreadsOpt = None,
    max_compressed_size: MaxCompressedOpt = "50G",
    progress: ProgressOpt = "auto",
    verify: VerifyOpt = True,
    force: Annotated[bool, typer.Option("--force", help="Replace existing outputs.")] = False,
    json_out: JsonOpt = False,
) -> int:
    """Flatten a stopped VM's disk (and its backing chain) into an image, with its metadata."""
    from imagetool import render
    from imagetool.metadata import registration
    from imagetool.progress import renderer
    from imagetool.sizes import parse_size
    from imagetool.snapshot import list_snapshots, snapshot

    allowed = tuple(allow_backing_dir or ())
    if list_only:
        found = list_snapshots(disk, allowed, allow_device)
        if json_out:
            render.emit_json({"schema": "imagetool.snapshots/1", "disk": disk, "snapshots": found})
        else:
            render.say(render.snapshots_text(disk, found))
        return 0
    reg = registration(
        name=name, arch=arch, mode=mode, username=username, public=public,
        description=description, min_ram=min_ram, url=url,
    )  # fmt: skip
    limit = parse_size(max_compressed_size)
    show = renderer(progress, "snapshotting")
    try:
        _qcow2, meta, doc, result = snapshot(
            disk,
            reg,
            output_path=output,
            allowed_dirs=allowed,
            snapshot_name=snapshot_name,
            force_share=force_share,
            allow_device=allow_device,
            server_disk=_size_or_none(server_disk),
            force=force,
            compression=compression,
            engine=engine,
            level=level,
            threads=threads,
            limit=limit,
            verify=verify,
            progress=show,
        )
    finally:
        show.close()
    return _show_prepared(reg, meta, doc, result, json_out)


@command("preflight")
def preflight_cmd(
    image: Annotated[str, typer.Argument(help="The image about to be uploaded.")],
    metadata: Annotated[str | None, typer.Option(help="Its metadata JSON, checked against the file.")] = None,
    server_disk: ServerDiskOpt = None,
    max_compressed_size: Annotated[str, typer.Option(help="Size limit of the file.")] = "50G",
    junit: Annotated[
        str | None, typer.Option(help="Also write JUnit XML here (one testcase per check).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --junit file.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Warnings fail too.")] = False,
    guest: Annotated[
        bool | None,
        typer.Option(
            "--guest/--no-guest",
            help="Read the guest's files: arch, mode and username must agree with the metadata "
            "(default: on with --metadata).",
            show_default=False,
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> int:
    """Check an image (and its metadata) before upload; exit 0 only when nothing fails."""
    from imagetool import output, render
    from imagetool.preflight import preflight
    from imagetool.sizes import parse_size

    limit = parse_size(max_compressed_size)
    inputs = {key for key in (output.key_of(image), metadata and output.key_of(metadata)) if key}
    if junit:  # refused before any work, like every output
        output.check_target(Path(junit), force=force, inputs=inputs)
    result = preflight(
        image,
        metadata=metadata,
        server_disk=_size_or_none(server_disk),
        limit=limit,
        strict=strict,
        guest=metadata is not None if guest is None else guest,
    )
    if junit:
        output.write_file(Path(junit), result.junit().encode(), force=force, inputs=inputs)
    if json_out:
        render.emit_json(result.as_dict())
    else:
        render.say(render.preflight_text(result))
    failing = result.failing()
    if failing:  # one line for the whole run: the first failure, and how many more
        first, more = failing[0], f" (+{len(failing) - 1} more)" if len(failing) > 1 else ""
        render.error_line(f"{image}: {first.name}: {first.message} [{first.code}]{more}")
    return result.exit_code


MetadataOpt = Annotated[
    str | None, typer.Option("--metadata", help="The image's metadata document (default: IMAGE.json).")
]
ContainerOpt = Annotated[str, typer.Option("--container", "-c", help="Your Orbit (Swift) container.")]
ExpiresOpt = Annotated[
    str, typer.Option(help="When the temp URL stops working: 90m, 36h, 2d or an ISO time (UTC unless given).")
]
SegmentSizeOpt = Annotated[
    str, typer.Option(help="Upload in segments (a Static Large Object) above this size (binary units).")
]
UploadThreadsOpt = Annotated[int, typer.Option("--threads", help="Segments sent at once (1-32).")]
SetKeyOpt = Annotated[
    bool,
    typer.Option("--set-temp-url-key", help="If the account has no temp-URL key, set a strong random one."),
]
VerifyDownloadOpt = Annotated[
    bool,
    typer.Option("--verify-download", help="Stream the object back through the temp URL and compare sha256."),
]
RetriesOpt = Annotated[int, typer.Option(help="Retries of a failed request, with backoff (0-10).")]


def _upload_options(
    container: str,
    obj: str | None,
    segment_container: str | None,
    segment_size: str,
    expires: str,
    threads: int,
    set_temp_url_key: bool,
    verify_download: bool,
    retries: int,
) -> Any:
    from imagetool.upload import Options, check_options, parse_segment_size

    opts = Options(
        container=container, object=obj, segment_container=segment_container,
        segment_size=parse_segment_size(segment_size), expires=expires, threads=threads,
        set_temp_url_key=set_temp_url_key, verify_download=verify_download, retries=retries,
    )  # fmt: skip
    check_options(opts)
    return opts


@command("upload")
def upload_cmd(
    image: Annotated[str, typer.Argument(help="The prepared qcow2 (or raw) image.")],
    container: ContainerOpt,
    metadata: MetadataOpt = None,
    obj: Annotated[
        str | None, typer.Option("--object", help="Object name (default: the image's file name).")
    ] = None,
    segment_container: Annotated[
        str | None, typer.Option(help="Where segments go (default: CONTAINER_segments).")
    ] = None,
    expires: ExpiresOpt = "2d",
    segment_size: SegmentSizeOpt = "1G",
    threads: UploadThreadsOpt = 4,
    set_temp_url_key: SetKeyOpt = False,
    verify_download: VerifyDownloadOpt = False,
    retries: RetriesOpt = 5,
    progress: ProgressOpt = "auto",
    json_out: JsonOpt = False,
) -> int:
    """Upload to Orbit (Swift), sign a temp URL and write it into the metadata (resumable)."""
    from imagetool import render
    from imagetool.progress import renderer
    from imagetool.upload import upload

    opts = _upload_options(
        container, obj, segment_container, segment_size, expires, threads, set_temp_url_key,
        verify_download, retries,
    )  # fmt: skip
    show = renderer(progress, "uploading")
    try:
        result = upload(image, opts, metadata=metadata, on_progress=show)
    finally:
        show.close()
    if json_out:
        render.emit_json(result.as_dict())
    else:
        render.say(render.upload_text(result))
    return 0


WaitOpt = Annotated[
    bool, typer.Option("--wait", help="Follow the library until the image is available (or failed).")
]
TimeoutOpt = Annotated[str, typer.Option(help="How long --wait follows it: 90s, 30m, 2h.")]


def _status_line(progress: str) -> Callable[[Any], None]:
    """What --wait shows: each change of the library's status and disk_size (MiB grows while creating)."""
    from imagetool import render

    last: list[tuple[object, object]] = []

    def show(image: Any) -> None:
        now = (image.get("status"), image.get("disk_size"))
        if progress != "none" and (not last or last[-1] != now):
            last.append(now)
            render.note_line(f"{image.get('id')}: {now[0]}, disk_size {now[1]} MiB")

    return show


@command("register")
def register_cmd(
    metadata: Annotated[str, typer.Argument(help="The uploaded image's metadata document (IMAGE.json).")],
    wait: WaitOpt = False,
    timeout: TimeoutOpt = "30m",
    progress: ProgressOpt = "auto",
    json_out: JsonOpt = False,
) -> int:
    """Register the uploaded image with the image library (POST /1.0/images); never twice."""
    from imagetool import render
    from imagetool.durations import parse_duration
    from imagetool.register import register

    seconds = parse_duration(timeout, "--timeout")
    result = register(metadata, wait=wait, timeout=seconds, on_status=_status_line(progress))
    if json_out:
        render.emit_json(result.as_dict())
    else:
        render.say(render.register_text(result))
    for warning in result.warnings:
        render.warning_line(metadata, warning)
    return 0


@command("publish")
def publish_cmd(
    source: Annotated[str, typer.Argument(help="The input disk image.")],
    container: ContainerOpt,
    name: NameOpt = None,
    arch: ArchOpt = None,
    mode: MaybeModeOpt = None,
    username: UserOpt = None,
    public: PublicOpt = False,
    description: DescOpt = None,
    min_ram: MinRamOpt = None,
    server_disk: ServerDiskOpt = None,
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="The qcow2 to write (default: SOURCE with .qcow2).")
    ] = None,
    compression: CompressionOpt = "zlib",
    engine: EngineOpt = "native",
    level: LevelOpt = None,
    threads: ThreadsOpt = None,
    max_compressed_size: MaxCompressedOpt = "50G",
    verify: VerifyOpt = True,
    format: FormatOpt = None,
    from_guest: FromGuestOpt = True,
    obj: Annotated[
        str | None, typer.Option("--object", help="Object name (default: the qcow2's name).")
    ] = None,
    segment_container: Annotated[
        str | None, typer.Option(help="Where segments go (default: CONTAINER_segments).")
    ] = None,
    expires: ExpiresOpt = "2d",
    segment_size: SegmentSizeOpt = "1G",
    upload_threads: Annotated[int, typer.Option(help="Segments sent at once (1-32).")] = 4,
    set_temp_url_key: SetKeyOpt = False,
    verify_download: VerifyDownloadOpt = False,
    retries: RetriesOpt = 5,
    wait: WaitOpt = False,
    timeout: TimeoutOpt = "30m",
    force: Annotated[
        bool, typer.Option("--force", help="Start again: prepare anew over earlier outputs.")
    ] = False,
    progress: ProgressOpt = "auto",
    json_out: JsonOpt = False,
) -> int:
    """prepare -> upload -> register in one go; a rerun continues from the first unfinished step."""
    from imagetool import render
    from imagetool.durations import parse_duration
    from imagetool.metadata import registration
    from imagetool.progress import renderer
    from imagetool.publish import publish
    from imagetool.sizes import parse_size

    opts = _upload_options(
        container, obj, segment_container, segment_size, expires, upload_threads, set_temp_url_key,
        verify_download, retries,
    )  # fmt: skip
    seconds = parse_duration(timeout, "--timeout")
    guest_notes: tuple[str, ...] = ()
    if from_guest:
        arch, mode, username, guest_notes = _from_guest(source, arch, mode, username, force, format)
    reg = registration(
        name=name, arch=arch, mode=mode or "virtio", username=username, public=public,
        description=description, min_ram=min_ram,
    )  # fmt: skip
    for note in (*guest_notes, *reg.notes):
        render.note_line(note)
    shown: list[Any] = []

    def step_progress(step: str) -> Any:
        shown.append(renderer(progress, f"{step}"))
        return shown[-1]

    prepare_args = {
        "server_disk": _size_or_none(server_disk), "compression": compression, "engine": engine,
        "level": level, "threads": threads, "limit": parse_size(max_compressed_size), "verify": verify,
        "claimed_format": format,
    }  # fmt: skip
    try:
        result = publish(
            source, reg, opts, prepare_args=prepare_args, output_path=output, force=force, wait=wait,
            timeout=seconds, on_progress=step_progress, on_status=_status_line(progress),
        )  # fmt: skip
    finally:
        for bar in shown:
            bar.close()
    if json_out:
        render.emit_json(result.as_dict())
    else:
        render.say(render.publish_text(result))
    for warning in result.warnings:
        render.warning_line(result.metadata, warning)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Console entry point: usage errors exit 2 (with JSON if asked), bugs exit 1, never a traceback."""
    from imagetool import render, signals

    args = sys.argv[1:] if argv is None else argv
    as_json = "--json" in args
    commands = {info.name for info in app.registered_commands}
    name = args[0] if args and args[0] in commands else "imagetool"
    with signals.unwinding():
        try:
            returned = typer.main.get_command(app).main(
                args=args, prog_name="imagetool", standalone_mode=False
            )
            code = returned if isinstance(returned, int) else 0
        except typer.TyperException as exc:  # the command line itself is wrong
            message = exc.format_message()
            if "\n" in message:  # `imagetool` alone: click's help text is the message
                render.error_line(
                    "a command is required: inspect, guest, convert, metadata, prepare, snapshot, "
                    "preflight, upload, register or publish"
                )
                message = "a command is required (see imagetool --help)"
            else:
                where = "" if name == "imagetool" else f"{name} "
                render.error_line(f"{message} (see imagetool {where}--help)")
            if as_json and not render.json_emitted():
                render.emit_json(render.error_document(name, UsageProblem(message, code="usage")))
            code = int(ExitCode.USAGE)
        except typer.Abort:
            code = interrupted(name, KeyboardInterrupt(), as_json)
        except (KeyboardInterrupt, Interrupted) as exc:  # outside any command (while parsing)
            code = interrupted(name, exc, as_json)
        except Exception as exc:  # a bug: one line, and the traceback only when debugging
            if os.environ.get("IMAGETOOL_DEBUG"):
                raise
            bug = ImagetoolError(f"internal error (a bug, please report it): {type(exc).__name__}: {exc}")
            if as_json and not render.json_emitted():
                render.emit_json(render.error_document(name, bug))
            render.error_line(bug.message)
            code = ExitCode.INTERNAL
    return int(code)
