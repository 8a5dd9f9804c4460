"""Installed kernels and what each has of virtio: built in, a module file, or missing.

A kernel is a directory of /lib/modules (merged-usr guests reach it through the
/lib -> usr/lib link) matched to its image in /boot (`vmlinuz-<version>`, Arch's
`pkgbase` file, Alpine's flavour suffix, or the image the package ships inside the
modules directory), plus /boot images with no modules directory. For each of
virtio_blk, virtio_scsi, virtio_net and virtio_pci the evidence, strongest first:
the kernel's own config (`CONFIG_VIRTIO_BLK=y` built in, `=m` a module), modules.builtin
(built-ins listed by path), the module file itself (`.ko`, `.ko.xz`, `.ko.zst`, `.ko.gz`,
at its usual path or where modules.dep says).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from imagetool.guest import limits
from imagetool.guest.bootloader import default_kernel_path, version_key
from imagetool.guest.budget import Budget
from imagetool.guest.facts import DriverFacts, DriverStatus, InitramfsFacts, InitramfsStatus, KernelFacts
from imagetool.guest.files import GuestTree
from imagetool.guest.initramfs import scan_initramfs
from imagetool.guest.text import printable, short_error

# driver -> (kernel config symbol, directory under kernel/)
DRIVERS: dict[str, tuple[str, str]] = {
    "virtio_blk": ("VIRTIO_BLK", "drivers/block"),
    "virtio_scsi": ("SCSI_VIRTIO", "drivers/scsi"),
    "virtio_net": ("VIRTIO_NET", "drivers/net"),
    "virtio_pci": ("VIRTIO_PCI", "drivers/virtio"),
}
BLOCK_DRIVERS = ("virtio_blk", "virtio_scsi")
MODULE_EXTENSIONS = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")
_IMAGE_PREFIXES = ("vmlinuz-", "vmlinux-", "bzImage-", "kernel-")
_CONFIG_LINE = re.compile(r"^(?:CONFIG_(\w+)=(\S+)|# CONFIG_(\w+) is not set)\s*$")


@dataclass
class _Kernel:
    version: str
    image: str | None = None
    modules_dir: str | None = None
    config: str | None = None
    initramfs: str | None = None
    evidence: list[str] = field(default_factory=list)


def _initramfs_for(names: set[str], suffixes: list[str]) -> str | None:
    for suffix in suffixes:
        for pattern in ("initrd.img-{}", "initramfs-{}.img", "initrd-{}", "initramfs-{}", "initrd-{}.img"):
            name = pattern.format(suffix)
            if name in names:
                return f"/boot/{name}"
    return None


def find_kernels(tree: GuestTree, budget: Budget) -> tuple[list[_Kernel], list[str]]:
    evidence: list[str] = []
    try:
        modules_found, versions = tree.listdir("/lib/modules")
        modules_root = modules_found.path
        shown = ", ".join(printable(v) for v in versions[:8]) + (", ..." if len(versions) > 8 else "")
        evidence.append(f"{modules_found.describe()}: {shown or 'empty'}")
    except Exception as exc:
        versions, modules_root = [], "/lib/modules"
        evidence.append(f"/lib/modules: {short_error(exc)}")
    try:
        _, boot_list = tree.listdir("/boot")
    except Exception as exc:
        boot_list = []
        evidence.append(f"/boot: {short_error(exc)}")
    boot = set(boot_list)
    kernels: list[_Kernel] = []
    used_images: set[str] = set()
    for version in versions[: limits.MAX_KERNELS]:
        budget.check()
        mdir = f"{modules_root}/{version}"
        found = tree.find(mdir)
        if found is None or found.node.kind() != "dir":
            continue
        kernel = _Kernel(version, modules_dir=mdir)
        suffixes = [version]
        if f"vmlinuz-{version}" in boot:
            kernel.image = f"/boot/vmlinuz-{version}"
        else:
            pkgbase = None
            try:
                _, data = tree.read(f"{mdir}/pkgbase", 256)
                pkgbase = data.decode("utf-8", "replace").strip()
            except Exception:
                pass
            flavour = version.rsplit("-", 1)[-1]
            if pkgbase and f"vmlinuz-{pkgbase}" in boot:
                kernel.image = f"/boot/vmlinuz-{pkgbase}"
                kernel.evidence.append(f"{mdir}/pkgbase says {printable(pkgbase)!r}")
                suffixes.append(pkgbase)
            elif f"vmlinuz-{flavour}" in boot and flavour != version:
                kernel.image = f"/boot/vmlinuz-{flavour}"
                kernel.evidence.append(f"image matched by the flavour suffix {printable(flavour)!r}")
                suffixes.append(flavour)
            elif tree.find(f"{mdir}/vmlinuz") is not None:
                kernel.image = f"{mdir}/vmlinuz"
        if kernel.image:
            used_images.add(kernel.image.rsplit("/", 1)[-1])
        kernel.initramfs = _initramfs_for(boot, suffixes)
        for path in (f"/boot/config-{version}", f"{mdir}/config"):
            if tree.find(path) is not None:
                kernel.config = path
                break
        kernels.append(kernel)
    for name in sorted(boot)[: limits.MAX_KERNELS * 8]:
        if not name.startswith(_IMAGE_PREFIXES) or name in used_images or len(kernels) >= limits.MAX_KERNELS:
            continue
        suffix = name.split("-", 1)[1]
        if "rescue" in suffix:
            continue
        kernel = _Kernel(suffix, image=f"/boot/{name}")
        kernel.evidence.append(f"/boot/{printable(name)} has no modules directory in {modules_root}")
        kernel.initramfs = _initramfs_for(boot, [suffix])
        if f"config-{suffix}" in boot:
            kernel.config = f"/boot/config-{suffix}"
        kernels.append(kernel)
    if len(versions) > limits.MAX_KERNELS:
        evidence.append(f"{len(versions)} module directories: only {limits.MAX_KERNELS} read")
    return kernels, evidence


def choose_default(tree: GuestTree, kernels: list[_Kernel]) -> tuple[_Kernel | None, list[str]]:
    """GRUB's default entry when it names one of the kernels found, else the newest kernel."""
    if not kernels:
        return None, []
    try:
        path, evidence = default_kernel_path(tree)
    except Exception as exc:
        path, evidence = None, [f"boot loader configuration: {short_error(exc)}"]
    if path:
        base = path.rsplit("/", 1)[-1]
        for kernel in kernels:
            if kernel.image and kernel.image.rsplit("/", 1)[-1] == base:
                return kernel, evidence
        evidence.append(f"the boot loader's kernel {printable(base)} is not among those found")
    with_image = [k for k in kernels if k.image] or kernels
    newest = max(with_image, key=lambda k: version_key(k.version))
    evidence.append(f"default kernel: {printable(newest.version)}, the newest installed")
    return newest, evidence


def _read_config(tree: GuestTree, path: str) -> tuple[dict[str, tuple[str, int]], str]:
    """CONFIG symbols of interest -> (value, line number), and the resolved path."""
    found, data = tree.read(path, limits.MAX_KERNEL_LIST_BYTES)
    wanted = {symbol for symbol, _ in DRIVERS.values()}
    values: dict[str, tuple[str, int]] = {}
    for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        match = _CONFIG_LINE.match(line)
        if not match:
            continue
        symbol = match.group(1) or match.group(3)
        if symbol in wanted:
            values[symbol] = (match.group(2) or "n", number)
    return values, found.path


def _builtin_list(tree: GuestTree, mdir: str) -> tuple[set[str], str] | None:
    try:
        found, data = tree.read(f"{mdir}/modules.builtin", limits.MAX_KERNEL_LIST_BYTES)
    except Exception:
        return None
    names = set()
    for line in data.decode("utf-8", "replace").splitlines():
        base = line.strip().rsplit("/", 1)[-1]
        if base.endswith(".ko"):
            names.add(base[:-3].replace("-", "_"))
    return names, found.path


def _module_file(tree: GuestTree, mdir: str, driver: str, deps: list[str] | None) -> str | None:
    _, directory = DRIVERS[driver]
    for ext in MODULE_EXTENSIONS:
        found = tree.find(f"{mdir}/kernel/{directory}/{driver}{ext}")
        if found is not None and found.node.kind() == "file":
            return found.describe() + f" ({found.node.size()} bytes)"
    for relative in deps or ():
        found = tree.find(f"{mdir}/{relative}")
        if found is not None and found.node.kind() == "file":
            return found.describe() + f" ({found.node.size()} bytes, listed in modules.dep)"
    return None


def _modules_dep(tree: GuestTree, mdir: str) -> dict[str, list[str]]:
    try:
        _, data = tree.read(f"{mdir}/modules.dep", limits.MAX_KERNEL_LIST_BYTES)
    except Exception:
        return {}
    paths: dict[str, list[str]] = {}
    for line in data.decode("utf-8", "replace").splitlines():
        relative = line.split(":", 1)[0].strip()
        base = relative.rsplit("/", 1)[-1]
        for ext in MODULE_EXTENSIONS:
            if base.endswith(ext):
                name = base[: -len(ext)].replace("-", "_")
                if name in DRIVERS:
                    paths.setdefault(name, []).append(relative)
                break
    return paths


def read_drivers(tree: GuestTree, kernel: _Kernel, budget: Budget) -> tuple[DriverFacts, ...]:
    config: dict[str, tuple[str, int]] = {}
    config_path: str | None = None
    notes: list[str] = []
    if kernel.config:
        try:
            config, config_path = _read_config(tree, kernel.config)
        except Exception as exc:
            notes.append(f"{kernel.config}: {short_error(exc)}")
    builtin = _builtin_list(tree, kernel.modules_dir) if kernel.modules_dir else None
    deps: dict[str, list[str]] | None = None
    facts: list[DriverFacts] = []
    for driver, (symbol, _) in DRIVERS.items():
        budget.check()
        evidence = list(notes)
        setting = config.get(symbol)
        said = f"{config_path} line {setting[1]}: CONFIG_{symbol}={setting[0]}" if setting else None
        status: DriverStatus
        certain = True
        if setting and setting[0] == "y":
            status, evidence = "builtin", [*evidence, said or ""]
        elif builtin is not None and driver in builtin[0]:
            status, evidence = "builtin", [*evidence, f"{builtin[1]} lists {driver}"]
        else:
            module = None
            if kernel.modules_dir:
                module = _module_file(tree, kernel.modules_dir, driver, None)
                if module is None:
                    if deps is None:
                        deps = _modules_dep(tree, kernel.modules_dir)
                    module = _module_file(tree, kernel.modules_dir, driver, deps.get(driver, []))
            if module:
                status = "module"
                evidence += [e for e in (said, module) if e]
            elif setting:
                status = "missing"
                where = f"no {driver}.ko* in {kernel.modules_dir}" if kernel.modules_dir else "no modules"
                evidence += [said or "", where] if setting[0] == "m" else [said or ""]
            elif config_path:
                status = "missing"
                evidence.append(f"{config_path} has no CONFIG_{symbol} line (not enabled)")
            elif builtin is not None:
                status, certain = "missing", False
                evidence.append(
                    f"{builtin[1]} does not list it and no module file was found (no kernel config)"
                )
            else:
                status, certain = "unknown", False
                evidence.append("no kernel config, no modules.builtin and no module file")
        facts.append(DriverFacts(driver, status, certain, tuple(e for e in evidence if e)))
    return tuple(facts)


def initramfs_groups(drivers: tuple[DriverFacts, ...]) -> tuple[frozenset[str], ...]:
    """What the initramfs must hold to find a virtio root disk: a block driver and virtio_pci, if modules."""
    status = {d.name: d.status for d in drivers}
    groups: list[frozenset[str]] = []
    if not any(status.get(name) == "builtin" for name in BLOCK_DRIVERS):
        block = frozenset(name for name in BLOCK_DRIVERS if status.get(name) == "module")
        if block:
            groups.append(block)
    if status.get("virtio_pci") == "module":
        groups.append(frozenset({"virtio_pci"}))
    return tuple(groups)


def read_initramfs(
    tree: GuestTree, kernel: _Kernel, drivers: tuple[DriverFacts, ...], budget: Budget
) -> InitramfsFacts:
    groups = initramfs_groups(drivers)
    wanted = tuple(sorted(frozenset().union(*groups)))
    if not groups:
        return InitramfsFacts(
            kernel.initramfs,
            "not_needed",
            evidence=("no virtio module is needed before the root is mounted",),
        )
    if kernel.initramfs is None:
        return InitramfsFacts(
            None, "absent", wanted, evidence=(f"no initramfs for {kernel.version} in /boot",)
        )
    try:
        found, stream, size = tree.stream(kernel.initramfs)
    except Exception as exc:
        return InitramfsFacts(kernel.initramfs, "unreadable", wanted, evidence=(short_error(exc),))
    scan = scan_initramfs(stream, size, groups, budget)
    evidence = [f"{found.describe()}: {size} bytes; {', '.join(scan.segments) or 'nothing'}"]
    evidence += [f"{module} at {printable(member)}" for module, member in sorted(scan.found.items())]
    missing = sorted(set(wanted) - scan.found.keys())
    if scan.stopped_early:
        evidence.append("stopped reading once a block driver and virtio_pci (when needed) were found")
    elif scan.complete:
        evidence.append(
            f"read to the end: {scan.entries} members, {scan.modules} kernel modules"
            + (f"; no {', '.join(missing)}" if missing else "")
        )
    if scan.problem:
        evidence.append(f"stopped: {scan.problem}")
    status: InitramfsStatus = "read" if scan.complete or scan.stopped_early else "stopped"
    return InitramfsFacts(
        kernel.initramfs,
        status,
        wanted,
        tuple(sorted(scan.found.items())),
        tuple(scan.segments),
        scan.entries,
        scan.unpacked_bytes,
        tuple(evidence),
    )


def kernel_facts(
    kernel: _Kernel, default: bool, drivers: tuple[DriverFacts, ...], initramfs: InitramfsFacts | None
) -> KernelFacts:
    return KernelFacts(
        version=kernel.version,
        default=default,
        image=kernel.image,
        modules_dir=kernel.modules_dir,
        config=kernel.config,
        initramfs_path=kernel.initramfs,
        drivers=drivers,
        initramfs=initramfs,
        evidence=tuple(kernel.evidence),
    )
