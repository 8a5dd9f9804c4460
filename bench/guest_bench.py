"""Guest look on a real distribution disk: wall time and bytes read from the image.

Builds (once, cached under bench/work/guest, never committed) a Debian 12 guest with
`debootstrap --variant=minbase` plus a kernel and cloud-init, from the mirror apt is
configured with, as root; puts it on a 3 GiB sparse raw disk (GPT: an EFI vfat
partition and an ext4 root) and a zlib-compressed qcow2 of it; then runs `look()` in
fresh processes and reports the median wall time (imports included) and the bytes the
look read from the image (every read goes through one counted reader).
Targets: under 2 s and under 64 MiB read. Without debootstrap or a mirror it falls back
to a synthetic tree (a copied host binary, a kernel config, module files and a
zstd initramfs of 100 MiB of incompressible members) and says so.

Run: cd bench && ../.venv/bin/python guest_bench.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(os.environ.get("BENCH_WORK", ROOT / "bench" / "work")) / "guest"
PYTHON = str(ROOT / ".venv" / "bin" / "python")
MiB = 1 << 20
GiB = 1 << 30
DISK = 3 * GiB
ESP = 100 * MiB
PACKAGES = "linux-image-amd64,cloud-init,zstd,initramfs-tools,python3-cffi-backend"


def run(*cmd: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw)  # type: ignore[call-overload, no-any-return]


def apt_mirror() -> str | None:
    """The Debian mirror apt is configured with (deb822 or one-line format)."""
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        try:
            text = path.read_text()
        except OSError:
            continue
        for match in re.finditer(r"^URIs:\s*(\S+)|^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+\S+", text, re.M):
            uri = match.group(1) or match.group(2)
            if "security" not in uri and "debian" in uri:
                return uri
    return None


def build_rootfs() -> tuple[Path, str]:
    rootfs = WORK / "rootfs"
    if (rootfs / "etc" / "os-release").exists() or (rootfs / "usr" / "lib" / "os-release").exists():
        return rootfs, "Debian 12 (debootstrap minbase + linux-image-amd64 + cloud-init), cached"
    mirror = apt_mirror()
    if os.geteuid() == 0 and shutil.which("debootstrap") and mirror:
        partial = WORK / "rootfs.partial"
        shutil.rmtree(partial, ignore_errors=True)
        print(f"debootstrap bookworm from {mirror} (a few minutes, once)...", flush=True)
        done = subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={PACKAGES}", "bookworm", str(partial), mirror],
            capture_output=True,
            text=True,
        )
        if done.returncode == 0:
            partial.rename(rootfs)
            return rootfs, "Debian 12 (debootstrap minbase + linux-image-amd64 + cloud-init)"
        print(f"debootstrap failed ({done.returncode}); falling back to a synthetic tree", file=sys.stderr)
    return build_synthetic(), "SYNTHETIC tree (debootstrap unavailable): not a real distribution"


def build_synthetic() -> Path:
    """A realistic-shaped tree: merged /usr, a real host binary, a zstd initramfs of 100 MiB."""
    import zstandard

    tree = WORK / "synthetic"
    if (tree / "etc" / "os-release").exists():
        return tree
    version = "6.1.0-99-amd64"
    for d in ("usr/bin", "usr/lib", "etc/cloud/cloud.cfg.d", "boot"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    for name in ("bin", "lib", "sbin"):
        (tree / name).symlink_to(f"usr/{name if name != 'sbin' else 'bin'}")
    shutil.copy("/bin/dash", tree / "usr/bin/dash")
    (tree / "usr/bin/sh").symlink_to("dash")
    (tree / "etc/os-release").write_text('ID=debian\nVERSION_ID="12"\nPRETTY_NAME="Synthetic 12"\n')
    (tree / "etc/cloud/cloud.cfg").write_text("system_info:\n  default_user:\n    name: debian\n")
    (tree / f"boot/config-{version}").write_text(
        "CONFIG_VIRTIO_BLK=m\nCONFIG_VIRTIO_NET=m\nCONFIG_VIRTIO_PCI=m\n"
    )
    (tree / f"boot/vmlinuz-{version}").write_bytes(os.urandom(8 * MiB))
    mods = tree / "usr/lib/modules" / version / "kernel/drivers"
    for sub, name in (("block", "virtio_blk"), ("net", "virtio_net"), ("virtio", "virtio_pci")):
        (mods / sub).mkdir(parents=True, exist_ok=True)
        (mods / sub / f"{name}.ko").write_bytes(os.urandom(64 * 1024))
    # A cpio whose big random members come before the module, like a real one.
    members = [(f"usr/lib/firmware/blob{i}", os.urandom(4 * MiB)) for i in range(25)]
    members.append((f"usr/lib/modules/{version}/kernel/drivers/block/virtio_blk.ko", b"\0" * 1000))
    members.append((f"usr/lib/modules/{version}/kernel/drivers/virtio/virtio_pci.ko", b"\0" * 1000))
    blob = bytearray()
    for ino, (name, data) in enumerate([*members, ("TRAILER!!!", b"")], 1):
        raw = name.encode() + b"\0"
        fields = [ino, 0o100644, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw), 0]
        blob += b"070701" + b"".join(b"%08X" % f for f in fields) + raw
        blob += b"\0" * (-len(blob) % 4) + data + b"\0" * (-len(data) % 4)
    (tree / f"boot/initrd.img-{version}").write_bytes(zstandard.ZstdCompressor(level=1).compress(bytes(blob)))
    return tree


def build_disk(rootfs: Path) -> tuple[Path, Path]:
    raw = WORK / f"{rootfs.name}-3g.raw"
    qcow2 = raw.with_suffix(".qcow2")
    if not raw.exists():
        tmp = raw.with_suffix(".tmp")
        with tmp.open("wb") as f:
            f.truncate(DISK)
        script = f"label: gpt\nstart=2048, size={ESP // 512}, type=U\ntype=L\n"
        run("sfdisk", "-q", str(tmp), input=script)
        layout = json.loads(run("sfdisk", "--json", str(tmp)).stdout)["partitiontable"]["partitions"]
        esp_start, root_start = layout[0]["start"] * 512, layout[1]["start"] * 512
        root_size = layout[1]["size"] * 512
        esp = WORK / "esp.img"
        esp.unlink(missing_ok=True)
        run("mkfs.vfat", "-C", str(esp), str(ESP // 1024))
        part = WORK / "root.img"
        part.unlink(missing_ok=True)
        print("mkfs.ext4 -d (about a minute)...", flush=True)
        run("mkfs.ext4", "-q", "-F", "-d", str(rootfs), str(part), f"{root_size // 1024}k")
        for image, start in ((esp, esp_start), (part, root_start)):
            run(
                "dd",
                f"if={image}",
                f"of={tmp}",
                "bs=1M",
                f"seek={start}",
                "oflag=seek_bytes",
                "conv=notrunc,sparse",
            )
            image.unlink()
        tmp.rename(raw)
    if not qcow2.exists():
        run("qemu-img", "convert", "-c", "-O", "qcow2", str(raw), str(qcow2) + ".tmp")
        Path(str(qcow2) + ".tmp").rename(qcow2)
    return raw, qcow2


PROBE = """
import json, sys, time
t0 = time.monotonic()
from imagetool.source import open_source
from imagetool.guest import look
with open_source(sys.argv[1]) as src:
    facts = look(src, sys.argv[2])
d = facts.as_dict()
keys = ("arch", "mode", "username", "os")
print(json.dumps({"look_s": facts.seconds, "bytes": facts.bytes_read, "reads": facts.reads,
                  "in_process_s": time.monotonic() - t0, "stopped": facts.stopped,
                  "answers": {k: [d[k]["value"], d[k]["confidence"]] for k in keys},
                  "kernels": [[k["version"], k["initramfs"] and k["initramfs"]["status"],
                               k["initramfs"] and k["initramfs"]["unpacked_bytes"]] for k in d["kernels"]]}))
"""


def evict(image: Path) -> None:
    """Drop this one file's pages from the page cache (not the machine's whole cache)."""
    fd = os.open(image, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def measure(image: Path, fmt: str, runs: int, cold: bool = False) -> dict[str, object]:
    walls: list[float] = []
    results: list[dict[str, object]] = []
    for _ in range(runs):
        if cold:
            evict(image)
        start = time.monotonic()
        out = run(PYTHON, "-c", PROBE, str(image), fmt, cwd=str(ROOT)).stdout
        walls.append(time.monotonic() - start)
        results.append(json.loads(out))
    last = results[-1]
    return {
        "image": image.name,
        "format": fmt,
        "file_bytes": image.stat().st_size,
        "wall_s_median": round(statistics.median(walls), 3),
        "look_s_median": round(statistics.median(float(str(r["look_s"])) for r in results), 3),
        "mib_read": round(int(str(last["bytes"])) / MiB, 1),
        "reads": last["reads"],
        "answers": last["answers"],
        "kernels": last["kernels"],
        "stopped": last["stopped"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    for tool in ("sfdisk", "mkfs.ext4", "mkfs.vfat", "qemu-img"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing (Debian packages fdisk, e2fsprogs, dosfstools, qemu-utils)")
    rootfs, what = build_rootfs()
    raw, qcow2 = build_disk(rootfs)
    print(f"guest: {what}")
    help_times = []
    for _ in range(args.runs):
        start = time.monotonic()
        run(str(ROOT / ".venv" / "bin" / "imagetool"), "--help")
        help_times.append(time.monotonic() - start)
    print(f"imagetool --help: {statistics.median(help_times):.3f} s (target < 0.3 s)")
    ok = True
    for image, fmt in ((raw, "raw"), (qcow2, "qcow2")):
        for cold in (False, True):
            row = measure(image, fmt, args.runs, cold)
            fast = float(str(row["wall_s_median"])) < 2.0 and float(str(row["mib_read"])) < 64
            ok = ok and fast
            print(
                f"{row['image']} ({fmt}, {int(str(row['file_bytes'])) / GiB:.2f} GiB file, "
                f"{'cold' if cold else 'warm'} cache): wall {row['wall_s_median']} s "
                f"(look {row['look_s_median']} s), {row['mib_read']} MiB read in {row['reads']} reads: "
                f"{'ok' if fast else 'OVER TARGET'}"
            )
        print(f"  answers {row['answers']}")
        print(f"  kernels {row['kernels']} stopped={row['stopped']}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
