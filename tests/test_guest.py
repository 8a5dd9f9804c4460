"""The guest look on real small filesystems: every answer, its confidence and its evidence.

Images are built per test module from folder trees (tests/guest_images.py): ext4, XFS,
Btrfs and vfat from the real mkfs tools, behind MBR and GPT tables, raw and compressed
qcow2. Hostile guests (link loops, links aimed at host files, a truncated disk, a huge
cloud.cfg) must give clear `unknown` answers, never a hang or an exception.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from guest_images import (
    ESP_GPT,
    VERSION,
    Guest,
    Part,
    compress,
    disk,
    initramfs,
    mkfs,
    newc,
    qcow2,
)

from imagetool.guest import GuestFacts, look
from imagetool.guest.budget import Budget
from imagetool.guest.files import GuestTree
from imagetool.guest.filesystems import GuestFilesystem, GuestPathError
from imagetool.guest.initramfs import scan_initramfs
from imagetool.source import open_source

pytestmark = pytest.mark.timeout(60)
GOOD_INITRD = initramfs(["virtio_blk", "virtio_pci"], kind="zstd", early=True)


def run_look(image: Path, fmt: str, **kw: Any) -> GuestFacts:
    with open_source(str(image)) as src:
        return look(src, fmt, **kw)


def answers(facts: GuestFacts) -> dict[str, tuple[Any, str]]:
    d = facts.as_dict()
    return {k: (d[k]["value"], d[k]["confidence"]) for k in ("arch", "mode", "username", "os")}


def evidence(facts: GuestFacts, key: str) -> str:
    return "\n".join(facts.as_dict()[key]["evidence"])


def build(tmp: Path, guest: Guest, fs: str = "ext4", table: str | None = "gpt", size: int = 24) -> Path:
    tree = guest.build(tmp / "tree")
    parts = []
    if table == "gpt":
        parts.append(Part(mkfs("vfat", None, tmp / "esp.img", 2), ESP_GPT, 0xEF))
    parts.append(Part(mkfs(fs, tree, tmp / "root.img", size)))
    return disk(tmp / "disk.raw", parts, table)


@pytest.fixture(scope="module")
def debian_like(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GPT + ESP + ext4, merged /usr, modules .ko.xz, early cpio + zstd initramfs, cloud.cfg.d override."""
    guest = Guest(
        initrd=GOOD_INITRD,
        cloud_cfg_d={
            "50_first.cfg": "system_info:\n  default_user:\n    name: first\n",
            "90_admin.cfg": "system_info:\n  default_user:\n    name: admin\n",
            "README": "not a .cfg: ignored\n",
        },
    )
    return build(tmp_path_factory.mktemp("debian"), guest)


# --- the whole answer on a Debian-like guest ------------------------------------------------


def test_debian_like_gpt_ext4_raw(debian_like: Path) -> None:
    facts = run_look(debian_like, "raw")
    assert answers(facts) == {
        "arch": ("x86_64", "certain"),
        "mode": ("virtio", "certain"),
        "username": ("admin", "certain"),
        "os": ("Debian GNU/Linux 12", "certain"),
    }
    d = facts.as_dict()
    assert set(d) == {"arch", "mode", "username", "os", "kernels"}
    assert d["arch"]["supported"] is True
    arch = evidence(facts, "arch")
    assert "/bin/sh = /usr/bin/dash (via /bin -> usr/bin, /usr/bin/sh -> dash)" in arch
    assert "e_ident[EI_CLASS]=2 (64-bit)" in arch and "e_machine=0x3e (EM_X86_64)" in arch
    assert "XLF_KERNEL_64 set" in arch
    mode = evidence(facts, "mode")
    assert f"CONFIG_VIRTIO_BLK=m; /usr/lib/modules/{VERSION}/kernel/drivers/block/virtio_blk.ko.xz" in mode
    assert "cpio (1 members), zstd" in mode
    assert f"virtio_blk at usr/lib/modules/{VERSION}/kernel/drivers/block/virtio_blk.ko" in mode
    assert "the initramfs holds virtio_blk and virtio_pci: virtio" in mode
    assert d["mode"]["kernel"] == VERSION
    user = evidence(facts, "username")
    assert "/etc/cloud/cloud.cfg.d/90_admin.cfg: system_info.default_user.name = 'admin'" in user
    assert d["username"]["source"] == "cloud-init"
    assert "/etc/os-release = /usr/lib/os-release" in evidence(facts, "os")
    assert d["os"]["id"] == "debian" and d["os"]["version_id"] == "12"
    [kernel] = d["kernels"]
    assert kernel["default"] and kernel["version"] == VERSION
    assert kernel["modules_dir"] == f"/usr/lib/modules/{VERSION}"
    assert {k: v["status"] for k, v in kernel["drivers"].items()} == {
        "virtio_blk": "module",
        "virtio_scsi": "module",
        "virtio_net": "module",
        "virtio_pci": "module",
    }
    assert kernel["initramfs"]["status"] == "read"
    assert set(kernel["initramfs"]["found"]) == {"virtio_blk", "virtio_pci"}
    assert facts.stopped is None
    assert any("EFI System partition" in line and "vfat" in line for line in facts.layout)


def test_same_guest_in_compressed_qcow2(debian_like: Path, tmp_path: Path) -> None:
    image = qcow2(debian_like, tmp_path / "disk.qcow2", compressed=True)
    facts = run_look(image, "qcow2")
    assert answers(facts) == answers(run_look(debian_like, "raw"))
    assert facts.layout[0].startswith("image: qcow2 v3") and "zlib compression" in facts.layout[0]
    assert facts.bytes_read < image.stat().st_size + (1 << 20)


def test_zstd_compressed_qcow2(debian_like: Path, tmp_path: Path) -> None:
    image = tmp_path / "zstd.qcow2"
    subprocess.run(
        [
            "qemu-img",
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "compression_type=zstd",
            str(debian_like),
            str(image),
        ],
        check=True,
        capture_output=True,
    )
    facts = run_look(image, "qcow2")
    assert answers(facts)["arch"] == ("x86_64", "certain")
    assert "zstd compression" in facts.layout[0]


def test_import_is_lazy() -> None:
    """`imagetool --help` must not pay for the readers: no dissect module before a look runs."""
    code = (
        "import sys, imagetool.cli, imagetool.guest;"
        "bad = [m for m in sys.modules if m.startswith(('dissect', 'yaml', 'backports'))];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# --- architecture ------------------------------------------------------------------------------


def test_i686_on_mbr_with_builtin_virtio(tmp_path: Path) -> None:
    """A 32-bit userland and kernel, virtio built in: no initramfs needed; no cloud-init: convention."""
    guest = Guest(
        arch="i686",
        kernel_64=False,
        config={"VIRTIO_BLK": "y", "SCSI_VIRTIO": "n", "VIRTIO_NET": "y", "VIRTIO_PCI": "y"},
        modules={},
        cloud_cfg=None,
        os_release='NAME="Alpine Linux"\nID=alpine\nVERSION_ID=3.20.0\nPRETTY_NAME="Alpine Linux v3.20"\n',
    )
    facts = run_look(build(tmp_path, guest, table="mbr"), "raw")
    assert answers(facts) == {
        "arch": ("i686", "certain"),
        "mode": ("virtio", "certain"),
        "username": ("alpine", "likely"),
        "os": ("Alpine Linux v3.20", "certain"),
    }
    assert "e_ident[EI_CLASS]=1 (32-bit)" in evidence(facts, "arch")
    assert "e_machine=0x3 (EM_386)" in evidence(facts, "arch")
    assert "XLF_KERNEL_64 clear" in evidence(facts, "arch")
    assert "CONFIG_VIRTIO_BLK=y" in evidence(facts, "mode")
    assert "block and PCI drivers built in, network driver built in: virtio" in evidence(facts, "mode")
    assert "no cloud-init configuration" in evidence(facts, "username")
    assert "ID=alpine: cloud-init's default user for this distribution is 'alpine'" in evidence(
        facts, "username"
    )
    assert facts.as_dict()["username"]["source"] == "convention"
    assert any(line.startswith("MBR partition table with 1 partition") for line in facts.layout)
    kernel = facts.as_dict()["kernels"][0]
    assert kernel["drivers"]["virtio_scsi"]["status"] == "missing"
    assert kernel["initramfs"]["status"] == "not_needed"


def test_aarch64_reported_unsupported(tmp_path: Path) -> None:
    facts = run_look(build(tmp_path, Guest(arch="aarch64", initrd=GOOD_INITRD), table=None), "raw")
    arch = facts.as_dict()["arch"]
    assert (arch["value"], arch["confidence"], arch["supported"]) == ("aarch64", "likely", False)
    text = evidence(facts, "arch")
    assert "e_machine=0xb7 (EM_AARCH64)" in text
    assert "aarch64 is not an architecture the image library runs" in text
    # The test kernel is an x86 bzImage: the disagreement is reported, not hidden.
    assert "they disagree" in text


def test_aarch64_without_kernel_is_certain(tmp_path: Path) -> None:
    guest = Guest(arch="aarch64", config=None, modules={})
    guest.build(tmp_path / "tree")
    for name in (tmp_path / "tree" / "boot").iterdir():
        name.unlink()
    image = disk(tmp_path / "d.raw", [Part(mkfs("ext4", tmp_path / "tree", tmp_path / "r.img", 16))], "gpt")
    facts = run_look(image, "raw")
    arch = facts.as_dict()["arch"]
    assert (arch["value"], arch["confidence"], arch["supported"]) == ("aarch64", "certain", False)
    assert answers(facts)["mode"] == (None, "unknown")
    assert "not enough evidence about the virtio drivers" in evidence(facts, "mode")


def test_64bit_kernel_under_32bit_userland_needs_x86_64(tmp_path: Path) -> None:
    guest = Guest(arch="i686", kernel_64=True, initrd=GOOD_INITRD)
    facts = run_look(build(tmp_path, guest), "raw")
    assert answers(facts)["arch"] == ("x86_64", "likely")
    assert "a 64-bit kernel under a 32-bit userland" in evidence(facts, "arch")


# --- virtio readiness ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gzip", "xz", "lzma", "bzip2", "zstd", "lz4", "none"])
@pytest.mark.parametrize("early", [False, True])
def test_initramfs_every_compression(kind: str, early: bool) -> None:
    data = initramfs(["virtio_scsi", "virtio_net", "virtio_pci"], kind=kind, early=early)
    groups = (frozenset({"virtio_blk", "virtio_scsi"}), frozenset({"virtio_pci"}))
    scan = scan_initramfs(io.BytesIO(data), len(data), groups, Budget(10))
    assert scan.problem is None
    assert scan.stopped_early and scan.satisfied
    assert set(scan.found) == {"virtio_scsi", "virtio_pci"}
    # init, busybox, then the modules in order: reading stops at virtio_pci, the 5th member.
    assert scan.entries == (6 if early else 5)
    assert scan.segments[0] == (
        "cpio (1 members)" if early else f"{'cpio' if kind == 'none' else kind} (5 members)"
    )


def test_initramfs_read_to_the_end_across_archives() -> None:
    """The module sits in the second compressed archive, after a first one's TRAILER!!!."""
    first = compress(newc([("init", b"x")]), "gzip")
    second = compress(
        newc([(f"usr/lib/modules/{VERSION}/kernel/drivers/block/virtio_blk.ko.zst", b"m")]), "xz"
    )
    data = newc([("early", b"e")]) + first + b"\0" * 512 + second
    scan = scan_initramfs(io.BytesIO(data), len(data), (frozenset({"virtio_blk"}),), Budget(10))
    assert scan.found == {"virtio_blk": f"usr/lib/modules/{VERSION}/kernel/drivers/block/virtio_blk.ko.zst"}
    assert [s.split()[0] for s in scan.segments] == ["cpio", "gzip", "xz"]


def test_initramfs_without_the_module_is_read_to_the_end() -> None:
    data = initramfs(["virtio_net"], kind="gzip", early=True)
    scan = scan_initramfs(io.BytesIO(data), len(data), (frozenset({"virtio_blk"}),), Budget(10))
    assert scan.complete and not scan.found and scan.modules == 1 and scan.problem is None


@pytest.mark.parametrize("cut", [10, 2000, 50_000])
def test_initramfs_truncated_or_garbage(cut: int) -> None:
    whole = initramfs(["virtio_blk"], kind="gzip", filler=100_000)  # the module after 100 kB of noise
    data = whole[:cut]
    scan = scan_initramfs(io.BytesIO(data), len(data), (frozenset({"virtio_blk"}),), Budget(10))
    assert scan.problem and not scan.complete and not scan.found
    assert "ends early" in scan.problem or "truncated" in scan.problem
    junk = b"\x42" * 100
    scan = scan_initramfs(io.BytesIO(junk), len(junk), (frozenset({"virtio_blk"}),), Budget(10))
    assert "unrecognised bytes at offset 0" in (scan.problem or "")


def test_initramfs_lacking_virtio_blk_means_compatibility(tmp_path: Path) -> None:
    guest = Guest(initrd=initramfs(["virtio_net", "virtio_pci"], kind="gzip"))
    facts = run_look(build(tmp_path, guest), "raw")
    assert answers(facts)["mode"] == ("compatibility", "certain")
    text = evidence(facts, "mode")
    assert "read to the end" in text and "no virtio_blk, virtio_scsi" in text
    assert "the initramfs lacks virtio_blk/virtio_scsi: on virtio the root disk would not be found" in text


def test_virtio_net_not_set_means_compatibility(tmp_path: Path) -> None:
    guest = Guest(
        config={"VIRTIO_BLK": "y", "SCSI_VIRTIO": "y", "VIRTIO_NET": "n", "VIRTIO_PCI": "y"},
        modules={},
        initrd=None,
    )
    facts = run_look(build(tmp_path, guest), "raw")
    assert answers(facts)["mode"] == ("compatibility", "certain")
    assert "# CONFIG_VIRTIO_NET is not set" not in evidence(facts, "mode")  # shown as its value
    assert "CONFIG_VIRTIO_NET=n" in evidence(facts, "mode")
    assert "without virtio_net" in evidence(facts, "mode")


def test_modules_but_no_initramfs_is_likely_compatibility(tmp_path: Path) -> None:
    facts = run_look(build(tmp_path, Guest(initrd=None)), "raw")
    assert answers(facts)["mode"] == ("compatibility", "likely")
    assert f"no initramfs for {VERSION} in /boot" in evidence(facts, "mode")


def test_builtin_listed_in_modules_builtin_without_config(tmp_path: Path) -> None:
    guest = Guest(
        config=None,
        modules={"virtio_net": ".ko.zst"},
        builtin=[
            "kernel/drivers/block/virtio_blk.ko",
            "kernel/drivers/virtio/virtio_pci.ko",
        ],
    )
    facts = run_look(build(tmp_path, guest), "raw")
    assert answers(facts)["mode"] == ("virtio", "certain")
    text = evidence(facts, "mode")
    assert f"/usr/lib/modules/{VERSION}/modules.builtin lists virtio_blk" in text
    assert "virtio_net.ko.zst" in text


def test_no_evidence_at_all_is_unknown(tmp_path: Path) -> None:
    facts = run_look(build(tmp_path, Guest(config=None, modules={})), "raw")
    assert answers(facts)["mode"] == (None, "unknown")
    assert "no kernel config, no modules.builtin and no module file" in evidence(facts, "mode")


def test_grub_default_entry_chooses_the_kernel(tmp_path: Path) -> None:
    """Two kernels; grub.cfg's default `1>1` is the older one, inside the submenu."""
    old = "6.1.0-7-amd64"
    grub = f"""
set default="0"
if [ "${{next_entry}}" ] ; then
   set default="${{next_entry}}"
fi
set default="1>1"
menuentry 'Debian GNU/Linux' --class debian {{
\tlinux\t/boot/vmlinuz-{VERSION} root=UUID=x ro quiet
}}
submenu 'Advanced options for Debian GNU/Linux' $menuentry_id_option 'gnulinux-advanced-x' {{
\tmenuentry 'Debian GNU/Linux, with Linux {VERSION}' {{
\t\tlinux\t/boot/vmlinuz-{VERSION} root=UUID=x ro
\t}}
\tmenuentry 'Debian GNU/Linux, with Linux {old}' {{
\t\tlinux\t/boot/vmlinuz-{old} root=UUID=x ro
\t}}
}}
"""
    guest = Guest(initrd=GOOD_INITRD, files={"/boot/grub/grub.cfg": grub.encode()})
    tree = guest.build(tmp_path / "tree")
    older = Guest(
        version=old, config={"VIRTIO_BLK": "n", "SCSI_VIRTIO": "n", "VIRTIO_NET": "y", "VIRTIO_PCI": "y"}
    )
    older.boot_tree(tree / "boot")
    (tree / "usr/lib/modules" / old).mkdir(parents=True)
    image = disk(tmp_path / "d.raw", [Part(mkfs("ext4", tree, tmp_path / "r.img", 24))], "gpt")
    facts = run_look(image, "raw")
    kernels = {k["version"]: k["default"] for k in facts.as_dict()["kernels"]}
    assert kernels == {VERSION: False, old: True}
    assert answers(facts)["mode"] == ("compatibility", "certain")
    text = evidence(facts, "mode")
    assert f"/boot/grub/grub.cfg: default '1>1' is 'Debian GNU/Linux, with Linux {old}'" in text
    assert f"linux /boot/vmlinuz-{old}" in text


# --- other filesystems and layouts -------------------------------------------------------------


def test_xfs_root_with_separate_ext4_boot_from_fstab(tmp_path: Path) -> None:
    guest = Guest(initrd=GOOD_INITRD, boot_separate=True)
    tree = guest.build(tmp_path / "tree")
    boot = guest.boot_tree(tmp_path / "boot")
    boot_img = mkfs("ext4", boot, tmp_path / "boot.img", 8, label="BOOT")
    (tree / "etc/fstab").write_text(
        "# <fs> <mount> <type>\n/dev/vda2 / xfs defaults 0 1\nLABEL=BOOT /boot ext4 defaults 0 2\n"
    )
    (tree / "boot").mkdir()
    root_img = mkfs("xfs", tree, tmp_path / "root.img", 320)
    image = disk(tmp_path / "d.raw", [Part(boot_img), Part(root_img)], "gpt")
    facts = run_look(image, "raw")
    assert answers(facts) == {
        "arch": ("x86_64", "certain"),
        "mode": ("virtio", "certain"),
        "username": ("debian", "certain"),
        "os": ("Debian GNU/Linux 12", "certain"),
    }
    assert any("mounted /boot: /etc/fstab line 3: LABEL=BOOT on /boot" in line for line in facts.layout)
    assert any(": xfs UUID=" in line for line in facts.layout)


def test_btrfs_root_and_vfat_boot_by_guess(tmp_path: Path) -> None:
    """Btrfs root (in a `root` subvolume if mkfs.btrfs has --subvol); /boot a vfat partition with kernels."""
    import shutil

    shutil.which("mkfs.btrfs") or pytest.skip("mkfs.btrfs is missing (Debian package btrfs-progs)")
    help_text = subprocess.run(["mkfs.btrfs", "--help"], capture_output=True, text=True).stdout
    guest = Guest(initrd=GOOD_INITRD, boot_separate=True, merged_usr=True)
    top = tmp_path / "top"
    if "--subvol" in help_text:
        guest.build(top / "root")
        extra = ["--subvol", "root"]
    else:  # older btrfs-progs: the tree at the top level
        guest.build(top)
        extra = []
    boot = guest.boot_tree(tmp_path / "boot")
    boot_img = mkfs("vfat", boot, tmp_path / "boot.img", 8)
    root_img = tmp_path / "root.img"
    with root_img.open("wb") as f:
        f.truncate(128 << 20)
    subprocess.run(
        ["mkfs.btrfs", "-q", "-f", "-r", str(top), *extra, str(root_img)], check=True, capture_output=True
    )
    image = disk(tmp_path / "d.raw", [Part(boot_img, ESP_GPT, 0xEF), Part(root_img)], "gpt")
    facts = run_look(image, "raw")
    assert answers(facts)["arch"] == ("x86_64", "certain")
    assert answers(facts)["mode"] == ("virtio", "certain")
    assert answers(facts)["username"] == ("debian", "certain")
    assert any(": btrfs UUID=" in line for line in facts.layout)
    assert any("taken as /boot (a guess)" in line for line in facts.layout)


def test_filesystem_on_the_whole_disk(tmp_path: Path) -> None:
    facts = run_look(build(tmp_path, Guest(initrd=GOOD_INITRD), table=None), "raw")
    assert answers(facts)["mode"] == ("virtio", "certain")
    assert any(line.startswith("no partition table") for line in facts.layout)


def test_not_an_operating_system(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    image = disk(tmp_path / "d.raw", [Part(mkfs("ext4", tmp_path / "empty", tmp_path / "r.img", 8))], "mbr")
    facts = run_look(image, "raw")
    for key in ("arch", "mode", "username", "os"):
        assert answers(facts)[key] == (None, "unknown")
        assert "no filesystem holds an operating system" in evidence(facts, key)


def test_unsupported_format_is_all_unknown(debian_like: Path) -> None:
    facts = run_look(debian_like, "vmdk")
    for key in ("arch", "mode", "username", "os"):
        assert answers(facts)[key] == (None, "unknown")
        assert "format vmdk: the guest look reads raw and qcow2 images only" in evidence(facts, key)
    assert facts.bytes_read == 0


# --- hostile guests ---------------------------------------------------------------------------


def test_symlink_loop_and_links_to_host_files_stay_inside(tmp_path: Path) -> None:
    """/bin/sh loops; /bin/bash aims at /../../etc/passwd; /sbin/init at the host's /etc/shadow path."""
    guest = Guest(
        initrd=GOOD_INITRD,
        merged_usr=False,
        files={"/etc/passwd": b"guest-passwd\n", "/etc/shadow": b"guest-shadow\n", "/opt/real/dash": b""},
        links={
            "/bin/sh": "/bin/sh2",
            "/bin/sh2": "../bin/sh",
            "/bin/bash": "/../../../../etc/passwd",
            "/sbin/init": "/etc/shadow",
        },
    )
    facts = run_look(build(tmp_path, guest), "raw")
    text = evidence(facts, "arch")
    assert "/bin/sh: more than 40 symbolic links (a loop)" in text
    assert (
        "/bin/bash = /etc/passwd (via /bin/bash -> /../../../../etc/passwd): not an ELF file (starts b'gues')"
        in text
    )
    assert (
        "/sbin/init = /etc/shadow (via /sbin/init -> /etc/shadow): not an ELF file (starts b'gues')" in text
    )
    # The kernel header still says x86_64, so the answer is likely, never a host binary's.
    assert answers(facts)["arch"] == ("x86_64", "likely")
    assert "no program header read" in text


def test_relative_dotdot_beyond_root_stops_at_root(tmp_path: Path) -> None:
    guest = Guest(initrd=GOOD_INITRD, links={"/usr/bin/sh": "../../../../../../usr/bin/dash"})
    facts = run_look(build(tmp_path, guest), "raw")
    assert answers(facts)["arch"] == ("x86_64", "certain")
    assert "/usr/bin/sh -> ../../../../../../usr/bin/dash" in evidence(facts, "arch")


def test_truncated_image_gives_unknown_not_an_exception(debian_like: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.raw"
    with debian_like.open("rb") as src, cut.open("wb") as out:
        out.write(src.read(3 << 20 | 4096))  # the ESP and a sliver of the ext4 partition
    facts = run_look(cut, "raw")
    for key in ("arch", "mode", "username", "os"):
        assert answers(facts)[key][1] == "unknown"
    assert facts.stopped is None
    assert any(
        "ext" in line and ("does not open" in line or "unreadable" in line) for line in facts.layout
    ) or any("no filesystem holds an operating system" in line for line in facts.layout)


def test_truncated_qcow2(debian_like: Path, tmp_path: Path) -> None:
    image = qcow2(debian_like, tmp_path / "full.qcow2", compressed=True)
    cut = tmp_path / "cut.qcow2"
    data = image.read_bytes()
    cut.write_bytes(data[: len(data) // 3])
    facts = run_look(cut, "qcow2")
    assert all(conf in ("unknown", "likely", "certain") for _, conf in answers(facts).values())
    assert facts.stopped is None


def test_huge_cloud_cfg_is_unknown(tmp_path: Path) -> None:
    huge = "# padding\n" * 120_000 + "system_info:\n  default_user:\n    name: sneaky\n"
    facts = run_look(build(tmp_path, Guest(initrd=GOOD_INITRD, cloud_cfg=huge), size=32), "raw")
    assert answers(facts)["username"] == (None, "unknown")
    text = evidence(facts, "username")
    assert f"/etc/cloud/cloud.cfg is {len(huge)} bytes, over the 1048576-byte cap: not read" in text
    assert "may name another user: unknown" in text
    assert answers(facts)["arch"] == ("x86_64", "certain")  # the rest still answered


def test_bad_yaml_and_users_without_default(tmp_path: Path) -> None:
    guest = Guest(initrd=GOOD_INITRD, cloud_cfg_d={"99_broken.cfg": "system_info: [unclosed\n"})
    facts = run_look(build(tmp_path, guest), "raw")
    assert answers(facts)["username"] == (None, "unknown")
    assert "99_broken.cfg: not valid YAML" in evidence(facts, "username")
    guest = Guest(initrd=GOOD_INITRD, cloud_cfg_d={"99_users.cfg": "users: [{name: ops}]\n"})
    facts = run_look(build(tmp_path / "b", guest), "raw")
    assert answers(facts)["username"] == ("debian", "likely")
    assert "users: has no 'default' entry" in evidence(facts, "username")


def test_time_limit_gives_unknown_with_the_reason(debian_like: Path) -> None:
    facts = run_look(debian_like, "raw", time_limit=0.0)
    assert facts.stopped and "time limit of 0 s was reached" in facts.stopped
    for key in ("arch", "mode", "username", "os"):
        assert answers(facts)[key] == (None, "unknown")
        assert "not answered: the time limit" in evidence(facts, key)


def test_garbage_disk_is_unknown(tmp_path: Path) -> None:
    junk = tmp_path / "junk.raw"
    junk.write_bytes(bytes(range(256)) * 4096 * 8)
    facts = run_look(junk, "raw")
    assert answers(facts)["arch"] == (None, "unknown")
    assert "no filesystem holds an operating system" in evidence(facts, "arch")


# --- path resolution rules, on an in-memory filesystem --------------------------------------


class FakeFilesystem(GuestFilesystem):
    """Handles are ("dir", {name: handle}), ("file", bytes) or ("link", target, claimed size)."""

    type_name = "fake"

    def __init__(self, tree: dict[str, Any]) -> None:
        self.tree = tree
        super().__init__(Budget(5), None, None)

    def root_handle(self) -> Any:
        return ("dir", self.tree)

    def kind_of(self, handle: Any) -> Any:
        return handle[0]

    def size_of(self, handle: Any) -> int:
        return handle[2] if handle[0] == "link" else len(handle[1])

    def entries(self, handle: Any) -> Any:
        return iter(handle[1].items())

    def link_of(self, handle: Any, size: int) -> str:
        return str(handle[1])

    def open(self, handle: Any) -> Any:
        return io.BytesIO(handle[1])


def D(**children: Any) -> tuple[str, dict[str, Any]]:
    return ("dir", dict(children))


def F(data: bytes = b"data") -> tuple[str, bytes]:
    return ("file", data)


def L(target: str, size: int | None = None) -> tuple[str, str, int]:
    return ("link", target, len(target.encode()) if size is None else size)


def fake_tree(**children: Any) -> GuestTree:
    fs = FakeFilesystem(D(**children)[1])
    return GuestTree(fs.root, fs.budget)


def test_resolver_rules() -> None:
    tree = fake_tree(
        bin=L("usr/bin"),
        usr=D(bin=D(sh=L("dash"), dash=F(b"\x7fELF"), up=L("../../../../../../usr/bin/dash"))),
        etc=D(shadow=F(b"guest shadow"), abs=L("/etc/shadow")),
        notdir=F(),
    )
    assert tree.resolve("/bin/sh").path == "/usr/bin/dash"
    assert tree.resolve("/bin/sh").links == ("/bin -> usr/bin", "/usr/bin/sh -> dash")
    assert tree.resolve("/usr/bin/up").path == "/usr/bin/dash"
    assert tree.resolve("/../../etc/../etc/abs").path == "/etc/shadow"
    assert tree.resolve("/bin/sh", follow=False).path == "/usr/bin/sh"
    assert tree.read("/etc/abs", 100)[1] == b"guest shadow"
    with pytest.raises(GuestPathError, match="is not a directory"):
        tree.resolve("/notdir/x")
    with pytest.raises(GuestPathError, match="no such file"):
        tree.resolve("/usr/bin/missing")
    with pytest.raises(GuestPathError, match="over the 3-byte cap"):
        tree.read("/etc/shadow", 3)


def test_resolver_hop_limit_and_hostile_links() -> None:
    chain = {f"l{i}": L(f"/l{i + 1}") for i in range(40)}
    tree = fake_tree(**chain, l40=F(b"end"), loop=L("loop"), big=L("x" * 10, size=5000), nul=L("a\x00b"))
    assert tree.read("/l0", 10)[1] == b"end"  # exactly 40 links: allowed, as in Linux
    too_many = fake_tree(**{f"l{i}": L(f"/l{i + 1}") for i in range(41)}, l41=F())
    with pytest.raises(GuestPathError, match="more than 40 symbolic links"):
        too_many.resolve("/l0")
    with pytest.raises(GuestPathError, match="more than 40 symbolic links"):
        tree.resolve("/loop")
    with pytest.raises(GuestPathError, match="a symbolic link of 5000 bytes"):
        tree.resolve("/big")
    with pytest.raises(GuestPathError, match="NUL"):
        tree.resolve("/nul")


def test_mounts_are_grafted_by_guest_path() -> None:
    tree = fake_tree(boot=D(), etc=D(fstab=F(b"root fstab")))
    boot = FakeFilesystem(D(vmlinuz=F(b"kernel"), up=L("../etc/fstab"))[1])
    tree.mount("/boot", boot.root, "test")
    assert tree.read("/boot/vmlinuz", 10)[1] == b"kernel"
    assert tree.read("/boot/up", 20)[1] == b"root fstab"  # .. leaves the mount, back on the root


# --- the watchdog: a reader that spins without reading ---------------------------------------


@pytest.mark.timeout(30, method="thread")  # pytest-timeout's signal method would own SIGALRM
def test_watchdog_ends_a_spinning_step(debian_like: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    import imagetool.guest.osrelease as osrelease

    def spin(tree: Any) -> Any:
        while True:
            pass

    monkeypatch.setattr(osrelease, "read_os", spin)
    start = time.monotonic()
    facts = run_look(debian_like, "raw", time_limit=0.5)
    assert time.monotonic() - start < 5
    assert facts.stopped and "watchdog" in facts.stopped and "os-release" in facts.stopped
    assert answers(facts)["os"] == (None, "unknown")


# --- the CLI (runs once `imagetool guest`, --from-guest and preflight --guest are wired in) ---------


def _wired(command: str, option: str | None = None) -> None:
    import typer

    from imagetool.cli import app

    click_app = typer.main.get_command(app)
    sub = getattr(click_app, "commands", {}).get(command)
    if sub is None or (option and option not in {o for p in sub.params for o in p.opts}):
        pytest.skip(f"imagetool {command} {option or ''} is not wired into cli.py yet")


def test_cli_guest(cli: Any, debian_like: Path) -> None:
    _wired("guest")
    r = cli("guest", debian_like, "--json")
    assert r.code == 0, r.err
    doc = r.json
    assert doc["schema"] == "imagetool.guest/1" and doc["format"] == "raw"
    assert (doc["arch"]["value"], doc["mode"]["value"], doc["username"]["value"]) == (
        "x86_64",
        "virtio",
        "admin",
    )
    r = cli("guest", debian_like)
    assert r.code == 0
    assert "  arch      x86_64 [certain]" in r.out and "arch evidence:" in r.out
    assert "evidence" not in cli("guest", debian_like, "--brief").out


def test_cli_guest_refuses_an_unsafe_image(cli: Any, tmp_path: Path) -> None:
    _wired("guest")
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "1M"], check=True)
    top = tmp_path / "top.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top)], check=True
    )
    r = cli("guest", top)
    assert r.code == 3 and "[backing_file]" in r.err


def test_cli_metadata_from_guest(cli: Any, debian_like: Path, tmp_path: Path) -> None:
    _wired("metadata", "--from-guest")
    out = tmp_path / "m.json"
    r = cli("metadata", debian_like, "--name", "deb", "--from-guest", "-o", out, "--json")
    assert r.code == 0, r.err
    body = r.json["registration"]
    assert (body["arch"], body["compatibility_mode"], body["username"]) == ("x86_64", False, "admin")
    assert "--arch x86_64 from the guest (certain" in r.err
    r = cli("metadata", debian_like, "--name", "deb", "--arch", "amd64", "--from-guest", "-o", out, "--force")
    assert r.code == 0, r.err  # amd64 is x86_64
    other = tmp_path / "other.json"
    r = cli("metadata", debian_like, "--name", "deb", "--arch", "i686", "--from-guest", "-o", other)
    assert r.code == 3 and "the guest says 'x86_64' (certain)" in r.err and not other.exists()
    r = cli("metadata", debian_like, "--name", "deb", "-u", "root", "--from-guest", "-o", other)
    assert r.code == 3 and "username is 'root' but the guest says 'admin'" in r.err and not other.exists()
    r = cli("metadata", debian_like, "--name", "deb", "-u", "root", "--from-guest", "-o", other, "--force")
    assert r.code == 0 and "kept with --force" in r.err  # the user's word, knowingly


def test_cli_preflight_guest(cli: Any, debian_like: Path, tmp_path: Path) -> None:
    _wired("preflight", "--guest")
    _wired("metadata")
    meta = tmp_path / "m.json"
    r = cli("metadata", debian_like, "--name", "deb", "--arch", "x86_64", "-u", "admin", "-o", meta)
    assert r.code == 0, r.err
    r = cli("preflight", debian_like, "--metadata", meta, "--guest", "--json")
    checks = {c["name"]: c for c in r.json["checks"]}
    assert [checks[f"guest_{k}"]["status"] for k in ("arch", "mode", "username")] == ["pass", "pass", "pass"]
    r = cli("metadata", debian_like, "--name", "deb", "--arch", "i686", "-u", "admin", "-o", meta, "--force")
    r = cli("preflight", debian_like, "--metadata", meta, "--guest", "--json")
    checks = {c["name"]: c for c in r.json["checks"]}
    assert checks["guest_arch"]["status"] == "fail" and checks["guest_arch"]["code"] == "guest_arch_mismatch"
    assert r.code == 3
    by_default = cli("preflight", debian_like, "--metadata", meta, "--json")  # --metadata reads the guest
    assert by_default.code == 3 and "guest_arch_mismatch" in by_default.err
    assert cli("preflight", debian_like, "--metadata", meta, "--no-guest").code == 0


def test_bytes_that_are_not_the_claimed_format(debian_like: Path) -> None:
    """look() trusts the caller's format; if the bytes disagree it says so, it does not raise."""
    facts = run_look(debian_like, "qcow2")
    for key in ("arch", "mode", "username", "os"):
        assert answers(facts)[key] == (None, "unknown")
        text = evidence(facts, key)
        assert "opening the qcow2 image failed:" in text and "qcow2 header magic" in text


@pytest.mark.parametrize(("count", "size"), [(0xFFFFFFFF, 128), (128, 0), (128, 100)])
def test_hostile_gpt_header_is_not_handed_to_the_reader(
    debian_like: Path, tmp_path: Path, count: int, size: int
) -> None:
    """A header claiming billions of entries (or entries of 0 bytes) would make the reader spin."""
    data = bytearray(debian_like.read_bytes())
    data[512 + 80 : 512 + 88] = count.to_bytes(4, "little") + size.to_bytes(4, "little")
    raw = tmp_path / "bad.raw"
    raw.write_bytes(data)
    for image, fmt in ((raw, "raw"), (qcow2(raw, tmp_path / "bad.qcow2"), "qcow2")):
        facts = run_look(image, fmt, time_limit=5)
        assert facts.stopped is None and facts.seconds < 2
        assert answers(facts)["arch"] == (None, "unknown")
        assert any(line.startswith("GPT header at LBA 1 claims") for line in facts.layout)


def test_guest_disk_reads_are_bounded() -> None:
    from imagetool.guest import limits
    from imagetool.guest.budget import OutOfReads, ReadTooLarge

    budget = Budget(10)
    with pytest.raises(ReadTooLarge):
        budget.charge_guest(limits.MAX_SINGLE_READ + 1)
    with pytest.raises(ReadTooLarge):
        budget.charge(limits.MAX_SINGLE_READ + 1)
    with pytest.raises(OutOfReads):
        for _ in range(limits.MAX_GUEST_BYTES // limits.MAX_SINGLE_READ + 1):
            budget.charge_guest(limits.MAX_SINGLE_READ)


def test_watchdog_in_another_thread_uses_a_trace_hook(
    debian_like: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGALRM only reaches the main thread: elsewhere a call-event trace hook ends the spin."""
    import threading
    import time

    import imagetool.guest.osrelease as osrelease

    def step() -> int:
        return 1

    def spin(tree: Any) -> Any:
        while True:  # like a reader's loop: Python calls, no image reads
            step()

    monkeypatch.setattr(osrelease, "read_os", spin)
    result: dict[str, Any] = {}

    def worker() -> None:
        start = time.monotonic()
        result["facts"] = run_look(debian_like, "raw", time_limit=0.5)
        result["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    thread.join(20)
    assert not thread.is_alive(), "the look did not stop"
    assert result["seconds"] < 5
    assert "watchdog" in (result["facts"].stopped or "")


def test_time_running_out_in_the_initramfs_still_answers_the_mode(
    debian_like: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import imagetool.guest.kernels as kernels
    from imagetool.guest.budget import OutOfTime

    def out_of_time(*args: Any) -> Any:
        raise OutOfTime("the time limit of 10 s was reached")

    monkeypatch.setattr(kernels, "scan_initramfs", out_of_time)
    facts = run_look(debian_like, "raw")
    assert facts.stopped == "the time limit of 10 s was reached (during initramfs)"
    assert answers(facts)["mode"] == ("virtio", "likely")
    assert "must be in the initramfs, which was not read: virtio is likely" in evidence(facts, "mode")
    assert answers(facts)["arch"] == ("x86_64", "certain")
    assert facts.as_dict()["kernels"][0]["initramfs"]["status"] == "not_checked"


def test_inspect_carries_the_guest_facts(cli: Any, debian_like: Path) -> None:
    r = cli("inspect", debian_like, "--json")
    assert r.code == 0, r.err
    guest = r.json["guest"]
    assert guest["arch"]["value"] == "x86_64" and guest["arch"]["confidence"] == "certain"
    assert guest["username"]["value"] == "admin"
    text = cli("inspect", debian_like)
    assert "  guest arch      x86_64 [certain]" in text.out
    assert "guest" not in cli("inspect", debian_like, "--no-guest", "--json").json
