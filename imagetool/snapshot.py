"""`snapshot`: a stopped VM's disk, flattened offline into an image for the library.

What the library calls a snapshot (`source_type: snapshot`), made without a running
cloud. The disk is the user's own: a qcow2 overlay on base images, perhaps with
internal snapshots. So, unlike `convert`'s untrusted uploads, a backing chain is
followed — but only as chain.py validates it — and internal snapshots are no
reason to refuse. Everything else is `convert`'s pipeline (gate, atomic output,
verify, progress) and `prepare`'s metadata document: a snapshot is a conversion
whose input is a trusted chain.

- A disk in use by a running VM holds qemu's image locks: refused (exit 5, `locked`)
  unless --force-share, with a warning that the copy may be inconsistent.
- The library fails snapshots whose non-zero data is over 50 GB, so here `disk_size`
  over MAX_DISK_SIZE is a failure (exit 4), not a warning. For a chain (or an internal
  snapshot) disk_size is what qemu-img map reports allocated: an upper bound.
"""

from __future__ import annotations

import functools
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imagetool import output as outputs
from imagetool import qemu
from imagetool.chain import TOLERATED, Chain, open_chain
from imagetool.convert import (
    DEFAULT_LIMIT,
    ConvertResult,
    Input,
    Options,
    convert_input,
    guest_extents,
)
from imagetool.errors import EnvironmentProblem, Reason, SizeLimitExceeded, UsageProblem
from imagetool.inspection import Report, examine
from imagetool.metadata import ImageFacts, MetadataDocument, Registration
from imagetool.policy import MAX_DISK_SIZE
from imagetool.prepare import prepare
from imagetool.progress import Callback
from imagetool.sizes import BLOCK, human, to_mib


def default_snapshot_output(disk: str) -> Path:
    """DISK.qcow2 would often be the disk itself: `vm.qcow2` -> `vm-snapshot.qcow2`."""
    path = Path(disk)
    return path.with_name(f"{path.stem}-snapshot.qcow2")


def _lock_warning(chain: Chain, force_share: bool) -> list[Reason]:
    """Refuse a disk a running VM holds (qemu's image locks), unless the user shares it knowingly."""
    try:
        qemu.info(chain.top_description(), None, (chain.top.fd,), force_share=False)
    except qemu.QemuFailed as exc:
        if not qemu.is_locked(exc.stderr):
            raise
        if not force_share:
            raise EnvironmentProblem(
                "the disk is in use by a running VM (qemu's image lock is held); stop the VM, or pass "
                "--force-share to copy it anyway (the copy may be inconsistent)",
                path=chain.top.path,
                code="locked",
            ) from None
        return [
            Reason(
                "in_use",
                "the disk is in use by a running VM: copied with --force-share, the result may be "
                "inconsistent",
            )
        ]
    return []


def snapshots(details: dict[str, Any]) -> list[dict[str, Any]]:
    """The internal snapshots `qemu-img info` lists, in the shape `--list` prints."""
    found = details.get("snapshots")
    out = []
    for snap in found if isinstance(found, list) else []:
        if isinstance(snap, dict):
            out.append(
                {
                    "id": str(snap.get("id", "")),
                    "name": str(snap.get("name", "")),
                    "vm_state_size": snap.get("vm-state-size"),
                    "date": snap.get("date-sec"),
                    "vm_clock_seconds": snap.get("vm-clock-sec"),
                }
            )
    return out


def _snapshot_id(details: dict[str, Any], wanted: str, path: str) -> str:
    """The id of the internal snapshot named (or numbered) `wanted`; a usage error if none is."""
    listed = snapshots(details)
    for key in ("name", "id"):
        matches = [s["id"] for s in listed if s[key] == wanted]
        if len(matches) == 1:
            return str(matches[0])
    names = ", ".join(s["name"] or s["id"] for s in listed) or "none"
    raise UsageProblem(
        f"no internal snapshot {wanted!r} (the disk has: {names})", path=path, code="no_such_snapshot"
    )


def _chain_input(chain: Chain, disk: str, snapshot: str | None) -> Input:
    """A chain (or an internal snapshot) as convert's input: qemu-img reads it, by description."""
    description = chain.description()
    details = qemu.info(chain.top_description(), None, (chain.top.fd,))
    snap_id = _snapshot_id(details, snapshot, disk) if snapshot is not None else None
    virtual_size = details.get("virtual-size")
    if not isinstance(virtual_size, int) or virtual_size <= 0:
        raise qemu.QemuFailed("qemu-img info gives no virtual size for the chain", 0, "")
    for link, source in zip(chain.links, chain.sources, strict=True):  # each qcow2 link clean
        if link.format == "qcow2":
            single = Chain([source], [link]).description()
            code, result = qemu.check(single, None, (source.fd,))
            if code in (1, 2) or result.get("corruptions"):
                raise qemu.QemuFailed(f"qemu-img check finds {link.file} corrupt", code, "")
    # qemu-img map says which layer holds each range and where: the native writer reads each from
    # its own file, as qemu would (a compressed range has no host offset: qemu-img converts then).
    extents = qemu.map_extents(description, None, chain.fds)
    allocated = sum(-(-e.length // BLOCK) * BLOCK for e in extents)
    report = Report(
        path=disk,
        format=chain.links[0].format,
        virtual_size=virtual_size,
        virtual_size_mib=to_mib(virtual_size),
        disk_size=allocated,
        disk_size_mib=to_mib(allocated),
        disk_size_exact=False,
        disk_size_method="qemu-img map",
        file_size=chain.top.size,
        allocated_size=chain.top.allocated,
        checks=("regular_file", "header", "chain", "qemu_info", "qemu_check", "disk_size"),
    )
    return Input(disk, report, extents, description, None, tuple(chain.sources), snap_id)


def _single_input(chain: Chain, disk: str) -> Input:
    """A disk with no backing file: inspected like any image (so the native writer can read it)."""
    src = chain.top
    report, data_map = examine(src, None, tolerate=TOLERATED)
    if not report.safe:
        raise report.rejected()
    return Input(disk, report, guest_extents(src, report, data_map), src.proc_path, report.format, (src,))


def _disk_size_gate(disk: str, report: Report) -> None:
    """The library fails snapshots with more non-zero data than 50 GB: so does snapshot."""
    size = int(report.disk_size or 0)
    if size > MAX_DISK_SIZE:
        bound = "" if report.disk_size_exact else " (allocated, an upper bound)"
        raise SizeLimitExceeded(
            f"{human(size)} of non-zero data{bound} is over the {human(MAX_DISK_SIZE)} the library "
            "allows a snapshot; nothing was written",
            path=disk,
            code="disk_size_over_limit",
        )


def convert_snapshot(
    disk: str,
    output: str | None = None,
    *,
    allowed_dirs: tuple[str, ...] = (),
    snapshot: str | None = None,
    force_share: bool = False,
    allow_device: bool = False,
    on_chain: Callable[[Chain], None] | None = None,
    claimed_format: str | None = None,
    **options: Any,
) -> ConvertResult:
    """Flatten `disk` (and its validated chain, or one internal snapshot) into a compressed qcow2.

    Takes convert's options; `claimed_format` is ignored (every link's format is read from it).
    `on_chain` sees the validated chain (prepare's metadata records it).
    """
    opts = Options(**options)
    opts.check()
    with open_chain(disk, list(allowed_dirs), allow_device=allow_device) as chain:
        if on_chain:
            on_chain(chain)
        target = Path(output) if output is not None else default_snapshot_output(disk)
        if not opts.estimate_only:
            outputs.check_target(
                target, force=opts.force, inputs={(s.device, s.inode) for s in chain.sources}
            )
        warnings = _lock_warning(chain, force_share)
        if len(chain.links) == 1 and snapshot is None and not stat.S_ISBLK(os.fstat(chain.top.fd).st_mode):
            inp = _single_input(chain, disk)
        else:
            inp = _chain_input(chain, disk, snapshot)
        _disk_size_gate(disk, inp.report)
        result = convert_input(inp, target, opts)
        result.warnings[:0] = warnings
        return result


def list_snapshots(
    disk: str, allowed_dirs: tuple[str, ...] = (), allow_device: bool = False
) -> list[dict[str, Any]]:
    """The disk's internal snapshots (`snapshot --list`)."""
    with open_chain(disk, list(allowed_dirs), allow_device=allow_device, follow=False) as chain:
        return snapshots(qemu.info(chain.top_description(), None, (chain.top.fd,)))


def snapshot(
    disk: str,
    reg: Registration,
    *,
    output_path: str | None = None,
    allowed_dirs: tuple[str, ...] = (),
    snapshot_name: str | None = None,
    force_share: bool = False,
    allow_device: bool = False,
    server_disk: int | None = None,
    force: bool = False,
    compression: str = "zlib",
    engine: str = "native",
    level: int | None = None,
    threads: int | None = None,
    limit: int = DEFAULT_LIMIT,
    verify: bool = True,
    progress: Callback | None = None,
) -> tuple[Path, Path, MetadataDocument, ConvertResult]:
    """Flatten `disk` into DST (qcow2) and write DST.json as `prepare` does, `source_type: snapshot`."""
    links: list[dict[str, Any]] = []
    converter = functools.partial(
        convert_snapshot,
        allowed_dirs=allowed_dirs,
        snapshot=snapshot_name,
        force_share=force_share,
        allow_device=allow_device,
        on_chain=lambda chain: links.extend(link.as_dict() for link in chain.links),
    )

    def add_facts(image: ImageFacts) -> None:
        image["source_type"] = "snapshot"
        image["chain"] = links
        image["snapshot"] = snapshot_name

    return prepare(
        disk,
        reg,
        output_path=output_path if output_path is not None else str(default_snapshot_output(disk)),
        server_disk=server_disk,
        force=force,
        compression=compression,
        engine=engine,
        level=level,
        threads=threads,
        limit=limit,
        verify=verify,
        progress=progress,
        converter=converter,
        add_facts=add_facts,
        allow_device=allow_device,
    )
