"""Registration metadata: what the image library's `POST /1.0/images` takes, and what we measured.

The document keeps the two apart. `registration` is exactly the API's request
body (field names, types and units from shared/reference/registration-api.md):
nothing in it the API would refuse, unset optional keys left out. `image` holds
our measurements, unit-labelled: sizes in bytes and in whole MiB (the library's
unit, rounded up), sha256, and md5 (what the object store's ETag will show).

Local `status.state` mirrors the library's lifecycle: `creating` while prepare
works (its `disk_size` grows, as the library's does), then `available` (ready to
register; the library itself starts the registered image at `creating`) or
`failed` with the reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from imagetool import __version__, qemu
from imagetool.atomic import write_json
from imagetool.errors import ImageRejected, Reason, UsageProblem
from imagetool.inspection import DEFAULT_MAX_VIRTUAL_SIZE, Report, inspect_source
from imagetool.sizes import to_mib
from imagetool.source import Source, open_source

SCHEMA = "imagetool.metadata/1"
ARCHES = ("x86_64", "i686")
MODES = ("virtio", "compatibility")
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
_USERNAME = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
URL_PLACEHOLDER = (
    "https://orbit.brightbox.com/v1/ACCOUNT/CONTAINER/OBJECT?temp_url_sig=SIG&temp_url_expires=EXPIRES"
)
_CHUNK = 8 << 20


@dataclass
class Registration:
    """The registration request body, validated. Build it with `registration()`."""

    name: str
    arch: str
    compatibility_mode: bool = False
    public: bool = False
    description: str | None = None
    username: str | None = None
    min_ram: int | None = None
    http_url: str | None = None
    notes: list[str] = field(default_factory=list)  # e.g. "arch amd64 was read as x86_64"

    def body(self) -> dict[str, Any]:
        """The API body in a stable key order, unset optional keys left out."""
        out: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            out["description"] = self.description
        if self.username is not None:
            out["username"] = self.username
        out["arch"] = self.arch
        out["compatibility_mode"] = self.compatibility_mode
        out["public"] = self.public
        if self.min_ram is not None:
            out["min_ram"] = self.min_ram
        if self.http_url is not None:
            out["http_url"] = self.http_url
        return out

    def register_command(self) -> str:
        """The equivalent `brightbox images register …` line, safe to paste into a shell."""
        args = ["brightbox", "images", "register", "-a", self.arch, "-n", self.name]
        if self.description is not None:
            args += ["-d", self.description]
        if self.username is not None:
            args += ["-u", self.username]
        args += [
            "-m",
            "compatibility" if self.compatibility_mode else "virtio",
            "-p",
            "true" if self.public else "false",
        ]
        if self.min_ram is not None:
            args += ["--min-ram", str(self.min_ram)]
        args += ["--url", self.http_url or URL_PLACEHOLDER]
        return shlex.join(args)


def _bad(message: str, code: str) -> UsageProblem:
    return UsageProblem(message, code=code)


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
    """Validate what a user typed into a Registration; every problem is one clear UsageProblem."""
    notes = []
    if name is None or not name.strip():
        raise _bad("--name must not be empty", "bad_name")
    if any(ord(c) < 32 or ord(c) == 127 for c in name + (description or "")):
        raise _bad("--name and --description must not contain control characters", "bad_name")
    if arch is None:
        raise _bad("--arch is required: x86_64 (64-bit) or i686 (32-bit)", "bad_arch")
    canonical = arch.strip().lower()
    if canonical in _ARCH_ALIASES:
        notes.append(f"arch {arch!r} was read as {_ARCH_ALIASES[canonical]!r}")
        canonical = _ARCH_ALIASES[canonical]
    if canonical not in ARCHES:
        raise _bad(f"--arch {arch!r} is not x86_64 or i686", "bad_arch")
    if mode not in MODES:
        raise _bad(f"--mode {mode!r} is not virtio or compatibility", "bad_mode")
    if username is not None and not _USERNAME.match(username):
        raise _bad(
            f"--username {username!r} is not a valid login name "
            "(lower-case letters, digits, _ and -, starting with a letter or _, at most 32)",
            "bad_username",
        )
    if min_ram is not None and min_ram < 1:
        raise _bad(f"--min-ram {min_ram} must be a positive number of MB", "bad_min_ram")
    if url is not None:
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc or any(c.isspace() for c in url):
            raise _bad(f"--url {url!r} is not an http(s) URL", "bad_url")
    return Registration(
        name=name.strip(),
        arch=canonical,
        compatibility_mode=mode == "compatibility",
        public=public,
        description=description,
        username=username,
        min_ram=min_ram,
        http_url=url,
        notes=notes,
    )


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


def image_facts(src: Source, report: Report, disk_size: int | None = None) -> dict[str, Any]:
    """The measured `image` object; `disk_size` overrides an estimate with a known exact value."""
    sha256, md5 = checksums(src.fd)
    exact = disk_size is not None or bool(report.disk_size_exact)
    size = disk_size if disk_size is not None else int(report.disk_size or 0)
    qcow2 = report.qcow2 or {}
    return {
        "file": Path(src.path).name,
        "format": report.format,
        "qcow2_compat": qcow2.get("compat"),
        "compression_type": qcow2.get("compression_type"),
        "virtual_size": report.virtual_size,
        "virtual_size_mib": to_mib(int(report.virtual_size or 0)),
        "disk_size": size,
        "disk_size_mib": to_mib(size),
        "disk_size_exact": exact,
        "file_size": src.size,
        "sha256": sha256,
        "md5": md5,
        "official": False,
    }


def fits(virtual_size: int, server_disk: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {"min_disk_mib": to_mib(virtual_size)}
    if server_disk is not None:
        out["server_disk_mib"] = to_mib(server_disk)
        out["fits_server_disk"] = virtual_size <= server_disk
    return out


def document(
    reg: Registration, image: dict[str, Any], fit: dict[str, Any], status: dict[str, Any], checks: list[str]
) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "registration": reg.body(),
        "image": image,
        "fits": fit,
        "status": status,
        "tool": {"imagetool": __version__, "qemu_img": qemu.version(), "checks": checks},
        "register_command": reg.register_command(),
    }


def status(state: str, *, disk_size: int | None = None, reason: Reason | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"state": state}
    if disk_size is not None:
        out["disk_size"] = disk_size
    if reason is not None:
        out["reason"] = reason.as_dict()
    return out


def schema() -> dict[str, Any]:
    text = resources.files("imagetool").joinpath("schemas/metadata.schema.json").read_text()
    return json.loads(text)


def schema_errors(doc: Any) -> list[str]:
    """Where `doc` breaks the published schema ([] when it validates)."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema())
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '(document)'}: {e.message}"
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    ]


def default_metadata_path(image: str) -> Path:
    return Path(f"{image}.json")


def check_writable(path: Path, force: bool) -> None:
    if (path.exists() or path.is_symlink()) and not force:
        raise UsageProblem(
            "metadata file exists; pass --force to replace it", path=str(path), code="output_exists"
        )
    if path.is_symlink() or path.is_dir():
        raise UsageProblem("metadata path is a link or a directory", path=str(path), code="bad_output")


def write_metadata(
    image: str,
    reg: Registration,
    *,
    output: str | None = None,
    server_disk: int | None = None,
    force: bool = False,
    max_virtual_size: int = DEFAULT_MAX_VIRTUAL_SIZE,
) -> tuple[Path, dict[str, Any]]:
    """Inspect `image`, measure it, and write its metadata document next to it (or to `output`)."""
    target = Path(output) if output else default_metadata_path(image)
    check_writable(target, force)
    with open_source(image) as src:
        report = inspect_source(src, None, max_virtual_size)
        if not report.safe:
            raise report.rejected()
        if report.format not in ("qcow2", "raw"):
            message = f"the library takes qcow2 or raw; this is {report.format}: run imagetool convert first"
            raise ImageRejected(message, [Reason("unsupported_format", message)], path=image)
        doc = document(
            reg,
            image_facts(src, report),
            fits(int(report.virtual_size or 0), server_disk),
            status("available"),
            report.checks,
        )
    write_json(target, doc)
    return target, doc
