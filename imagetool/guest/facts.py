"""What a guest look answers: frozen results, each with a confidence and its evidence.

`certain` means the bytes read say so directly (an ELF header, a kernel config line, a
module inside the initramfs); `likely` means a convention or an incomplete reading points
that way; `unknown` means nothing read supports an answer, and then `value` is None.
Evidence lines name the guest file (after symlinks) and the bytes or lines that decided.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Confidence = Literal["certain", "likely", "unknown"]
CERTAIN: Confidence = "certain"
LIKELY: Confidence = "likely"
UNKNOWN: Confidence = "unknown"

# What a driver is to a kernel: compiled in, a loadable module file, absent, or not known.
DriverStatus = Literal["builtin", "module", "missing", "unknown"]

# The architectures the image library runs (docs/image-library.md).
SUPPORTED_ARCHES = ("i686", "x86_64")


@dataclass(frozen=True)
class Answer:
    """One answer: a value (None when unknown), how sure, and why."""

    value: str | None
    confidence: Confidence
    evidence: tuple[str, ...] = ()
    extra: tuple[tuple[str, Any], ...] = ()  # answer-specific keys (arch's `supported`, os fields)

    def as_dict(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "confidence": self.confidence,
            "evidence": list(self.evidence),
            **dict(self.extra),
        }

    def get(self, key: str) -> Any:
        return dict(self.extra).get(key)


def unknown(*evidence: str, extra: tuple[tuple[str, Any], ...] = ()) -> Answer:
    return Answer(None, UNKNOWN, tuple(evidence), extra)


@dataclass(frozen=True)
class DriverFacts:
    """One virtio driver of one kernel."""

    name: str  # virtio_blk, virtio_scsi, virtio_net, virtio_pci
    status: DriverStatus
    certain: bool  # False when `missing`/`unknown` comes from an absence of evidence
    evidence: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "certain": self.certain, "evidence": list(self.evidence)}


InitramfsStatus = Literal["read", "stopped", "absent", "unreadable", "not_needed", "not_checked"]


@dataclass(frozen=True)
class InitramfsFacts:
    """What the default kernel's initramfs holds of the drivers it must load before the root disk."""

    path: str | None
    status: InitramfsStatus
    wanted: tuple[str, ...] = ()  # modules it must hold (the block driver, virtio_pci when a module)
    found: tuple[tuple[str, str], ...] = ()  # (module, cpio member)
    segments: tuple[str, ...] = ()  # "cpio", "zstd", ... in the order they were met
    entries: int = 0
    unpacked_bytes: int = 0
    evidence: tuple[str, ...] = ()

    def has(self, module: str) -> bool:
        return any(name == module for name, _ in self.found)

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "status": self.status,
            "wanted": list(self.wanted),
            "found": {name: member for name, member in self.found},
            "segments": list(self.segments),
            "entries": self.entries,
            "unpacked_bytes": self.unpacked_bytes,
            "evidence": list(self.evidence),
        }


@dataclass(frozen=True)
class KernelFacts:
    """One installed kernel: where it lives and what it has of virtio."""

    version: str
    default: bool = False
    image: str | None = None
    modules_dir: str | None = None
    config: str | None = None
    initramfs_path: str | None = None
    drivers: tuple[DriverFacts, ...] = ()
    initramfs: InitramfsFacts | None = None
    evidence: tuple[str, ...] = ()

    def driver(self, name: str) -> DriverFacts | None:
        return next((d for d in self.drivers if d.name == name), None)

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "default": self.default,
            "image": self.image,
            "modules_dir": self.modules_dir,
            "config": self.config,
            "initramfs_path": self.initramfs_path,
            "drivers": {d.name: d.as_dict() for d in self.drivers},
            "initramfs": self.initramfs.as_dict() if self.initramfs else None,
            "evidence": list(self.evidence),
        }


@dataclass(frozen=True)
class GuestFacts:
    """Everything one look found. `as_dict()` is the JSON shape; the rest is for benchmarks and logs."""

    arch: Answer
    mode: Answer
    username: Answer
    os: Answer
    kernels: tuple[KernelFacts, ...] = ()
    # Not part of as_dict(): how the look went.
    layout: tuple[str, ...] = ()  # partitions and filesystems found, and which is the root
    stopped: str | None = None  # why the look ended early (time or read budget), if it did
    bytes_read: int = 0  # bytes read from the image file
    reads: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "arch": self.arch.as_dict(),
            "mode": self.mode.as_dict(),
            "username": self.username.as_dict(),
            "os": self.os.as_dict(),
            "kernels": [k.as_dict() for k in self.kernels],
        }
