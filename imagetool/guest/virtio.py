"""The mode to register: `virtio` when the default kernel can find its disk and network on
virtio devices, else `compatibility`, with the reasons.

A virtio server's root disk sits behind virtio_pci and virtio_blk (or virtio_scsi), its
network behind virtio_net. Built-in drivers always work. A driver that is a module must
be loadable when it is needed: the network one loads from the root filesystem after
boot, but the block driver (and virtio_pci, when it is a module too) must be inside the
initramfs, or the kernel never finds its root disk.
"""

from __future__ import annotations

from imagetool.guest.facts import CERTAIN, LIKELY, Answer, DriverFacts, KernelFacts, unknown
from imagetool.guest.files import GuestTree
from imagetool.guest.kernels import BLOCK_DRIVERS, initramfs_groups

_RANK = {"builtin": 0, "module": 1, "unknown": 2, "missing": 3}
WINDOWS_DRIVERS = ("viostor.sys", "vioscsi.sys", "netkvm.sys")


def _block(kernel: KernelFacts) -> DriverFacts | None:
    drivers = [d for d in (kernel.driver(n) for n in BLOCK_DRIVERS) if d is not None]
    return min(drivers, key=lambda d: _RANK[d.status]) if drivers else None


def _line(driver: DriverFacts) -> str:
    said = "; ".join(driver.evidence)
    return f"{driver.name}: {driver.status}" + (f" ({said})" if said else "")


def recommend_mode(kernel: KernelFacts | None) -> Answer:
    if kernel is None:
        return unknown("no installed kernel found in /boot or /lib/modules", extra=(("kernel", None),))
    extra = (("kernel", kernel.version),)
    block, net, pci = _block(kernel), kernel.driver("virtio_net"), kernel.driver("virtio_pci")
    if block is None or net is None or pci is None:
        return unknown(f"the drivers of the default kernel {kernel.version} were not read", extra=extra)
    evidence = [_line(block), _line(net), _line(pci)]
    missing = [d for d in (block, net, pci) if d.status == "missing"]
    if missing:
        names = ", ".join(d.name for d in missing)
        sure = CERTAIN if all(d.certain for d in missing) else LIKELY
        evidence.append(f"without {names} a virtio server cannot reach its disk or network: compatibility")
        return Answer("compatibility", sure, tuple(evidence), extra)
    if any(d.status == "unknown" for d in (block, net, pci)):
        return unknown(*evidence, "not enough evidence about the virtio drivers", extra=extra)
    groups = initramfs_groups(kernel.drivers)
    if not groups:
        how = "built in" if all(d.status == "builtin" for d in (block, net, pci)) else "available"
        evidence.append(f"block and PCI drivers built in, network driver {how}: virtio")
        return Answer("virtio", CERTAIN, tuple(evidence), extra)
    init = kernel.initramfs
    if init is not None and init.status != "not_checked":
        evidence.extend(f"initramfs: {line}" for line in init.evidence)
    needed = " and ".join("/".join(sorted(g)) for g in groups)
    if init is None or init.status == "not_checked":
        evidence.append(f"{needed} must be in the initramfs, which was not read: virtio is likely")
        evidence.extend(f"initramfs: {line}" for line in (init.evidence if init else ()))
        return Answer("virtio", LIKELY, tuple(evidence), extra)
    satisfied = all(any(init.has(name) for name in group) for group in groups)
    if satisfied:
        held = " and ".join(sorted(name for group in groups for name in group if init.has(name)))
        evidence.append(f"the initramfs holds {held}: virtio")
        return Answer("virtio", CERTAIN, tuple(evidence), extra)
    lacking = " and ".join("/".join(sorted(g)) for g in groups if not any(init.has(n) for n in g))
    if init.status == "read":
        evidence.append(f"the initramfs lacks {lacking}: on virtio the root disk would not be found")
        return Answer("compatibility", CERTAIN, tuple(evidence), extra)
    if init.status == "absent":
        evidence.append(f"no initramfs to load {lacking} before the root is mounted: compatibility")
        return Answer("compatibility", LIKELY, tuple(evidence), extra)
    evidence.append(f"the initramfs could not be read to the end to find {lacking}: virtio is likely")
    return Answer("virtio", LIKELY, tuple(evidence), extra)


def recommend_windows_mode(tree: GuestTree) -> Answer:
    """Windows: the virtio drivers (viostor/vioscsi, netkvm) present in System32/drivers."""
    present: list[str] = []
    for name in WINDOWS_DRIVERS:
        found = tree.find(f"/Windows/System32/drivers/{name}")
        if found is not None:
            present.append(found.describe())
    has_disk = any(p.lower().endswith(("viostor.sys", "vioscsi.sys")) for p in present)
    has_net = any(p.lower().endswith("netkvm.sys") for p in present)
    evidence = [f"present: {p}" for p in present] or ["no virtio drivers in /Windows/System32/drivers"]
    if has_disk and has_net:
        evidence.append(
            "virtio disk and network drivers are installed (their boot registration is not checked)"
        )
        return Answer("virtio", LIKELY, tuple(evidence), (("kernel", None),))
    evidence.append("without virtio disk and network drivers Windows needs emulated devices")
    return Answer("compatibility", LIKELY, tuple(evidence), (("kernel", None),))
