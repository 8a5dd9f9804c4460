"""`snapshot`: backing chains flattened under explicit trust, internal snapshots, every refusal."""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
import subprocess
import time
from pathlib import Path

import pytest
from conftest import qemu_img, sparse_raw

MiB = 1 << 20
REG = ("--name", "vm1", "--arch", "x86_64", "--username", "debian")


def qemu_io(image: Path, fmt: str, command: str) -> None:
    proc = subprocess.run(["qemu-io", "-f", fmt, "-c", command, str(image)], capture_output=True, text=True)
    assert proc.returncode == 0 and "error" not in proc.stdout.lower(), proc.stdout + proc.stderr


def build_chain(directory: Path, depth: int) -> Path:
    """base.raw <- l1.qcow2 <- … : each layer writes different blocks (and one overwrites a lower one)."""
    base = sparse_raw(directory / "base.raw", 64 * MiB, {0: b"BASE" * (MiB // 4), 40 * MiB: os.urandom(MiB)})
    top, fmt = base, "raw"
    for level in range(1, depth):
        layer = directory / f"l{level}.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-b", top.name, "-F", fmt, layer)
        qemu_io(layer, "qcow2", f"write -P 0x{level:02x} {level * 8}M 2M")
        qemu_io(layer, "qcow2", f"write -P 0x{0x40 + level:02x} 0 64k")  # hides a block below
        top, fmt = layer, "qcow2"
    return top


def identical(a: Path, b: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", str(a), str(b)], capture_output=True).returncode == 0


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_a_chain_is_flattened_into_one_standalone_qcow2(cli, tmp_path, depth):
    top = build_chain(tmp_path, depth)
    out = tmp_path / "flat.qcow2"
    result = cli("snapshot", top, *REG, "-o", out, "--json")
    assert result.code == 0, result.err
    assert identical(top, out)
    info = json.loads(
        subprocess.run(["qemu-img", "info", "--output=json", str(out)], capture_output=True).stdout
    )
    assert "backing-filename" not in info
    doc = json.loads((tmp_path / "flat.qcow2.json").read_text())
    assert doc["status"]["state"] == "available"
    image = doc["image"]
    assert image["source_type"] == "snapshot" and image["snapshot"] is None
    assert [Path(link["file"]).name for link in image["chain"]] == [
        top.name,
        *[f"l{i}.qcow2" for i in range(depth - 2, 0, -1)],
        *(["base.raw"] if depth > 1 else []),
    ]
    assert [link["format"] for link in image["chain"]][-1] == "raw"


def test_an_internal_snapshot_is_exported_as_it_was(cli, tmp_path):
    disk = tmp_path / "vm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", disk, "32M")
    qemu_io(disk, "qcow2", "write -P 0xaa 0 1M")
    qemu_img("snapshot", "-c", "before-upgrade", disk)
    qemu_io(disk, "qcow2", "write -P 0xbb 0 2M")
    listed = cli("snapshot", disk, "--list", "--json")
    assert listed.code == 0 and [s["name"] for s in listed.json["snapshots"]] == ["before-upgrade"]
    out = tmp_path / "old.qcow2"
    result = cli("snapshot", disk, *REG, "--snapshot", "before-upgrade", "-o", out)
    assert result.code == 0, result.err
    assert "[not_compared]" in result.err
    then = tmp_path / "then.qcow2"
    shutil.copy(disk, then)
    qemu_img("snapshot", "-a", "before-upgrade", then)  # the state it captured, on a copy
    assert identical(then, out) and not identical(disk, out)
    assert json.loads((tmp_path / "old.qcow2.json").read_text())["image"]["snapshot"] == "before-upgrade"


def test_the_current_state_of_a_disk_with_internal_snapshots(cli, tmp_path):
    disk = tmp_path / "vm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", disk, "32M")
    qemu_io(disk, "qcow2", "write -P 0xaa 0 1M")
    qemu_img("snapshot", "-c", "s1", disk)
    out = tmp_path / "now.qcow2"
    result = cli("snapshot", disk, *REG, "-o", out, "--json")
    assert result.code == 0, result.err
    assert identical(disk, out)
    assert cli("inspect", disk).code == 3  # an upload with hidden snapshots is still refused


def test_an_unknown_snapshot_is_a_usage_error(cli, tmp_path):
    disk = tmp_path / "vm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", disk, "32M")
    qemu_img("snapshot", "-c", "s1", disk)
    result = cli("snapshot", disk, *REG, "--snapshot", "nope", "--json")
    assert result.code == 2 and result.json["error"]["code"] == "no_such_snapshot"
    assert files(tmp_path) == ["vm.qcow2"]


def _refused(cli, tmp_path, disk, code, exit_code=3, *extra):
    before = files(tmp_path)
    result = cli("snapshot", disk, *REG, "-o", tmp_path / "out.qcow2", "--json", *extra)
    assert result.code == exit_code, result.err
    assert result.json["error"]["code"] == code
    assert files(tmp_path) == before  # nothing written
    return result


def test_a_backing_file_outside_the_allowed_directories_is_refused(cli, tmp_path):
    elsewhere = tmp_path / "images"
    elsewhere.mkdir()
    base = sparse_raw(elsewhere / "base.raw", 8 * MiB, {0: b"x"})
    vm = tmp_path / "vm"
    vm.mkdir()
    top = vm / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", top)
    result = _refused(cli, vm, top, "backing_outside")
    assert "base.raw" in result.err and "--allow-backing-dir" in result.err
    out = vm / "out.qcow2"
    assert cli("snapshot", top, *REG, "-o", out, "--allow-backing-dir", elsewhere).code == 0
    assert identical(top, out)


def test_a_symlink_out_of_the_allowed_directory_is_refused(cli, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    sparse_raw(outside / "secret.raw", 8 * MiB, {0: b"host"})
    vm = tmp_path / "vm"
    vm.mkdir()
    (vm / "base.raw").symlink_to(outside / "secret.raw")
    top = vm / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", top)
    _refused(cli, vm, top, "backing_outside")


def test_a_loop_is_refused(cli, tmp_path):
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", a, "8M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", b)
    qemu_img("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", a)
    _refused(cli, tmp_path, b, "backing_loop")


def test_a_chain_too_deep_is_refused(cli, tmp_path):
    previous = "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / previous, "1M")
    for i in range(17):
        name = f"l{i:02}.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-b", previous, "-F", "qcow2", tmp_path / name)
        previous = name
    _refused(cli, tmp_path, tmp_path / previous, "chain_too_deep")


def test_a_data_file_link_is_refused(cli, tmp_path):
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'data.bin'}", base, "8M")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    _refused(cli, tmp_path, top, "data_file")


def _set_backing_name(image: Path, name: bytes) -> None:
    """Point a qcow2's backing name at `name`, written after the header (as qemu lays it out)."""
    with image.open("r+b") as f:
        f.seek(8)
        offset, _ = struct.unpack(">QI", f.read(12))
        f.seek(offset)
        f.write(name)
        f.seek(16)
        f.write(struct.pack(">I", len(name)))


@pytest.mark.parametrize(
    "name", [b'json:{"driver":"raw","file":{"filename":"/etc/passwd"}}', b"nbd:127.0.0.1:1"]
)
def test_a_json_or_protocol_backing_name_is_refused(cli, tmp_path, name):
    top = tmp_path / "top.qcow2"
    filler = "x" * len(name)
    qemu_img("create", "-q", "-f", "qcow2", "-b", filler, "-F", "raw", "-u", top, "8M")
    _set_backing_name(top, name)
    _refused(cli, tmp_path, top, "backing_protocol")


@pytest.mark.slow
def test_a_disk_in_use_is_refused_unless_shared(cli, tmp_path):
    disk = tmp_path / "vm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", disk, "8M")
    holder = subprocess.Popen(["qemu-io", "-f", "qcow2", "-c", "sleep 4000", str(disk)])
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # until qemu-io holds its lock
            probe = subprocess.run(["qemu-img", "info", str(disk)], capture_output=True, text=True)
            if "lock" in probe.stderr:
                break
            time.sleep(0.05)
        result = _refused(cli, tmp_path, disk, "locked", 5)
        assert "running VM" in result.err
        shared = cli("snapshot", disk, *REG, "-o", tmp_path / "s.qcow2", "--force-share")
        assert shared.code == 0 and "[in_use]" in shared.err
    finally:
        holder.kill()
        holder.wait()


def test_over_the_size_limit_is_refused(cli, tmp_path):
    """Predicted from the chain's own data (read layer by layer): refused before writing anything."""
    top = build_chain(tmp_path, 2)
    result = _refused(cli, tmp_path, top, "compressed_too_large", 4, "--max-compressed-size", "1M")
    assert "predicted" in result.err


def test_a_chain_is_written_by_the_native_writer_layer_by_layer(cli, tmp_path):
    top = build_chain(tmp_path, 3)
    out = tmp_path / "flat.qcow2"
    result = cli("snapshot", top, *REG, "-o", out, "--no-verify")
    assert result.code == 0, result.err
    assert "by imagetool's writer" in result.out and identical(top, out)
    via_qemu = tmp_path / "q.qcow2"
    assert cli("snapshot", top, *REG, "-o", via_qemu, "--engine", "qemu").code == 0
    assert identical(out, via_qemu)


def test_non_zero_data_over_the_snapshot_limit_is_a_failure(cli, tmp_path, monkeypatch):
    """The library fails snapshots with more than 50 GB of data: the gate, at a lower bound."""
    from imagetool import snapshot as snapshot_mod

    monkeypatch.setattr(snapshot_mod, "MAX_DISK_SIZE", 2 * MiB)
    top = build_chain(tmp_path, 2)
    _refused(cli, tmp_path, top, "disk_size_over_limit", 4)


def test_a_block_device_needs_allow_device(cli, tmp_path):
    node = tmp_path / "lv"
    try:
        os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(7, 0))  # a loop device node
    except OSError:
        pytest.skip("cannot make a device node here")
    result = cli("snapshot", node, *REG, "-o", tmp_path / "o.qcow2", "--json")
    assert result.code == 3 and result.json["error"]["code"] == "not_regular_file"
    assert files(tmp_path) == ["lv"]


def test_a_block_device_is_snapshotted_with_allow_device(cli, tmp_path):
    backing = sparse_raw(tmp_path / "lv.raw", 16 * MiB, {0: b"LVM2" * 1024, 8 * MiB: os.urandom(MiB)})
    attached = subprocess.run(["losetup", "-f", "--show", "-r", str(backing)], capture_output=True, text=True)
    if attached.returncode != 0:
        pytest.skip(f"no loop device here: {attached.stderr.strip()}")
    device = attached.stdout.strip()
    try:
        out = tmp_path / "lv.qcow2"
        result = cli("snapshot", device, *REG, "-o", out, "--allow-device", "--json")
        assert result.code == 0, result.err
        assert identical(backing, out)
    finally:
        subprocess.run(["losetup", "-d", device], check=False)
