"""The promises under attack: outputs never replace inputs, nothing is orphaned, no exit 1 for bad input.

Each test reproduces one hole found by attacking imagetool as a careless user or an
attacker would (closed streams, odd names, signals, a source that changes, limits).
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    SAMPLE,
    make_qcow2,
    qemu_img,
    slow_input,
    sparse_raw,
    start_imagetool,
    start_slow_convert,
    wait_until_writing,
)

from imagetool import output

MiB = 1 << 20
REG = ("--name", "web", "--arch", "x86_64", "--username", "ubuntu")


def temps(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(output.TEMP_PREFIX))


def imagetool_shell(script: str, **env: str) -> subprocess.CompletedProcess[bytes]:
    """Run a bash line where `imagetool` is this interpreter's CLI (for <&-, ulimit, odd names)."""
    full_env = {**os.environ, "IMAGETOOL": f"{sys.executable} -m imagetool", **env}
    return subprocess.run(["bash", "-c", script], capture_output=True, env=full_env, timeout=60)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def qemu_children(parent: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            comm, rest = stat.read_text().split("(", 1)[1].rsplit(")", 1)
        except OSError:
            continue
        if int(rest.split()[1]) == parent and comm == "qemu-img":
            found.append(int(stat.parent.name))
    return found


# --- 1. No output may be an input -----------------------------------------------------------


def test_prepare_refuses_its_source_as_metadata_path_before_inspecting(cli, tmp_path):
    source = tmp_path / "img.json"
    source.write_bytes(SAMPLE.read_bytes())
    before = source.read_bytes()
    result = cli("prepare", source, *REG, "-o", tmp_path / "img", "--force", "--json")
    assert result.code == 2 and result.json["error"]["code"] == "output_is_input"
    assert source.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.json"]


def test_preflight_junit_may_not_be_the_image(cli, tmp_path):
    image = sparse_raw(tmp_path / "b.raw", MiB, {0: b"data"})
    before = image.read_bytes()
    result = cli("preflight", image, "--junit", image, "--force", "--json")
    assert result.code == 2 and result.json["error"]["code"] == "output_is_input"
    assert image.read_bytes() == before


def test_preflight_junit_needs_force_to_replace(cli, tmp_path):
    report = tmp_path / "report.xml"
    report.write_text("keep me")
    result = cli("preflight", SAMPLE, "--junit", report)
    assert result.code == 2 and "--force" in result.err and report.read_text() == "keep me"
    assert cli("preflight", SAMPLE, "--junit", report, "--force").code == 0
    assert report.read_text().startswith("<?xml")


def test_convert_refuses_a_hard_link_to_its_input(cli, tmp_path):
    src = tmp_path / "in.raw"
    src.write_bytes(SAMPLE.read_bytes())
    os.link(src, tmp_path / "alias.qcow2")
    result = cli("convert", src, "-o", tmp_path / "alias.qcow2", "--force", "--json")
    assert result.code == 2 and result.json["error"]["code"] == "output_is_input"
    assert src.read_bytes() == SAMPLE.read_bytes()


# --- source that changes while it is read -----------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("change", "verify"), [("truncate", "--verify"), ("grow", "--no-verify")])
def test_source_changed_during_convert_keeps_nothing(tmp_path, change, verify):
    src = slow_input(tmp_path)
    out = tmp_path / "out.qcow2"
    proc = start_slow_convert(src, out, "--json", verify)
    wait_until_writing(proc)
    with src.open("r+b") as f:
        f.truncate(src.stat().st_size // 2 if change == "truncate" else src.stat().st_size + MiB)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 5, stderr
    assert json.loads(stdout)["error"]["code"] == "source_changed"
    assert "source_changed" not in stderr or "while imagetool read it" in stderr
    assert not out.exists() and temps(tmp_path) == []


# --- 3. Orphans and stale state ---------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_takes_qemu_img_down_and_a_later_run_removes_the_temp(cli, tmp_path):
    out = tmp_path / "out.qcow2"
    proc = start_slow_convert(slow_input(tmp_path), out)
    wait_until_writing(proc)
    children = qemu_children(proc.pid)
    assert children, "qemu-img should be running"
    proc.kill()
    proc.wait(timeout=10)
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in children), "qemu-img outlived imagetool"
    assert len(temps(tmp_path)) == 1 and not out.exists()
    assert cli("convert", SAMPLE, "-o", out).code == 0  # at once: its lock died with its writer
    assert temps(tmp_path) == []


def test_a_locked_temp_file_is_never_removed(tmp_path):
    """A temp file whose writer lives (it holds the lock) survives another run's clean-up."""
    with output.pending(tmp_path / "a.json", force=False, inputs=set()) as mine:
        assert output.remove_stale_temps(tmp_path) == []
        assert mine.path.exists()


@pytest.mark.slow
def test_sigterm_during_inspection_exits_143_with_json(tmp_path):
    image = sparse_raw(tmp_path / "dense.raw", 768 * MiB, {0: os.urandom(512 * MiB)})
    proc = start_imagetool("preflight", image, "--json")
    deadline = time.monotonic() + 20
    fd_dir = Path(f"/proc/{proc.pid}/fd")
    while time.monotonic() < deadline:  # wait until it has the image open
        try:
            if any(os.readlink(fd) == str(image) for fd in fd_dir.iterdir()):
                break
        except OSError:
            pass
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 143, stderr
    assert json.loads(stdout)["error"]["code"] == "interrupted"
    assert stderr.count("\n") == 1 and "interrupted by SIGTERM" in stderr


# --- 4. Exit codes, not exit 1 ----------------------------------------------------------------


@pytest.mark.parametrize("size", ["1" * 400 + ".5", "9" * 5000, "0", "1", "1K"])
def test_absurd_max_compressed_size_is_a_usage_error(cli, tmp_path, size):
    result = cli("convert", SAMPLE, "-o", tmp_path / "o.qcow2", "--max-compressed-size", size, "--json")
    assert result.code == 2, result.err
    assert result.json["error"]["code"] == "bad_size" and len(result.err) < 300
    assert list(tmp_path.iterdir()) == []


def test_output_name_of_255_bytes_works_and_256_is_refused(cli, tmp_path):
    fits = tmp_path / ("a" * 249 + ".qcow2")
    assert cli("convert", SAMPLE, "-o", fits).code == 0 and fits.exists()
    result = cli("convert", SAMPLE, "-o", tmp_path / ("b" * 250 + ".qcow2"), "--json")
    assert result.code == 2 and result.json["error"]["code"] == "name_too_long"


def test_output_in_a_missing_directory_is_an_environment_error(cli, tmp_path):
    result = cli("metadata", SAMPLE, *REG, "-o", tmp_path / "nope" / "m.json", "--json")
    assert result.code == 5 and result.json["error"]["code"] == "no_directory"


def test_read_only_file_system_is_an_environment_error(cli, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", ro], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        result = cli("convert", SAMPLE, "-o", ro / "o.qcow2", "--json")
        assert result.code == 5 and result.json["error"]["code"] == "read_only"
    finally:
        subprocess.run(["umount", ro], check=True)


def test_file_size_limit_is_an_environment_error_not_a_crash(tmp_path):
    src = sparse_raw(tmp_path / "r.raw", 64 * MiB, {0: os.urandom(8 * MiB)})
    out = tmp_path / "o.qcow2"
    done = imagetool_shell(f'ulimit -f 2048; $IMAGETOOL convert "{src}" -o "{out}" --json')
    assert done.returncode == 5, done.stderr
    assert json.loads(done.stdout)["error"]["code"] == "file_too_big"
    assert not out.exists() and temps(tmp_path) == []


def test_garbage_compressed_cluster_is_the_images_fault(cli, tmp_path):
    """A read error of the input during convert is `corrupt` (exit 3), not an I/O error (5)."""
    raw = sparse_raw(tmp_path / "r.raw", 4 * MiB, {0: b"compressible " * 40000})
    image = tmp_path / "c.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "-c", raw, image)
    data = bytearray(image.read_bytes())
    (l1_offset,) = struct.unpack_from(">Q", data, 40)
    (l2_offset,) = struct.unpack_from(">Q", data, l1_offset)
    (entry,) = struct.unpack_from(">Q", data, (l2_offset & ((1 << 56) - 1)))
    assert entry & (1 << 62), "the first cluster should be compressed"
    host = entry & ((1 << 54) - 1)  # 64 KiB clusters: the host offset is the low 62 - (16 - 8) bits
    data[host : host + 64] = b"\xa5" * 64
    image.write_bytes(bytes(data))
    out = tmp_path / "o.qcow2"
    result = cli("convert", image, "-o", out, "--json")
    assert result.code == 3, result.err
    assert result.json["error"]["code"] == "corrupt"
    assert not out.exists() and temps(tmp_path) == []


# --- closed streams, odd names ----------------------------------------------------------------


def test_closed_stdin_stdout_stderr_never_change_a_verdict(tmp_path):
    image = sparse_raw(tmp_path / "a.raw", MiB, {0: b"x"})
    assert imagetool_shell(f'$IMAGETOOL inspect "{image}" --json <&-').returncode == 0
    assert imagetool_shell(f'$IMAGETOOL inspect "{image}" --json >&- 2>&-').returncode == 0
    out = tmp_path / "o.qcow2"
    done = imagetool_shell(f'$IMAGETOOL convert "{image}" -o "{out}" <&- >&- 2>&-')
    assert done.returncode == 0 and out.exists()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert imagetool_shell(f'$IMAGETOOL inspect "{fifo}" --json <&- 2>&-').returncode == 3


def test_non_utf8_and_control_characters_in_names_are_escaped(tmp_path):
    name = os.fsencode(tmp_path) + b"/bad\xff\x1b[31mred\xe2\x80\xaename.raw"
    with open(name, "wb") as f:
        f.write(SAMPLE.read_bytes())
    env = {"PYTHONIOENCODING": "utf-8:strict", "LC_ALL": "C.UTF-8"}
    script = f'cd "{tmp_path}"; f=$(printf "bad\\377\\033[31mred\\342\\200\\256name.raw"); '
    done = imagetool_shell(
        script + '$IMAGETOOL convert "$f" -o "$f.qcow2" && $IMAGETOOL inspect "$f.qcow2"', **env
    )
    assert done.returncode == 0, done.stderr
    assert b"\x1b" not in done.stdout + done.stderr and b"\xe2\x80\xae" not in done.stdout
    assert b"bad\\xffred" not in done.stdout and b"bad\\xff\\x1b[31mred\\u202ename.raw" in done.stdout
    assert os.path.exists(name + b".qcow2")


# --- 6. Messages ------------------------------------------------------------------------------


def test_usage_errors_are_one_line_and_the_json_carries_the_message(cli):
    result = cli("inspect", "--no-such-option", "--json")
    assert result.code == 2
    assert result.err.count("\n") == 1 and result.err.startswith("imagetool: error: No such option")
    assert result.json["error"]["message"] == "No such option: --no-such-option"


def test_version_names_imagetool_and_qemu_img(cli):
    result = cli("--version")
    assert result.code == 0
    assert result.out.startswith("imagetool 0.") and "\nqemu-img " in result.out


def test_tied_sizes_are_shown_in_bytes(cli, tmp_path):
    from imagetool.sizes import over_limit

    assert (
        over_limit(2 * 1024**3 + 1000, 2 * 1024**3) == "2147484648 bytes, over the limit of 2147483648 bytes"
    )
    assert over_limit(3 * 1024**3, 2 * 1024**3) == "3.0 GiB, over the limit of 2.0 GiB"


# --- prepare's document lifecycle -------------------------------------------------------------


def test_prepare_with_a_typo_creates_nothing(cli, tmp_path):
    result = cli("prepare", SAMPLE, *REG, "-o", tmp_path / "o.qcow2", "--compression", "lzma")
    assert result.code == 2 and list(tmp_path.iterdir()) == []


def _doc(path: Path, state: str, owner: dict[str, int] | None = None) -> None:
    status: dict[str, object] = {"state": state}
    if owner:
        status["owner"] = owner
    path.write_text(json.dumps({"schema": "imagetool.metadata/1", "status": status}))


def test_prepare_rerun_replaces_a_failed_or_orphaned_document(cli, tmp_path):
    meta = tmp_path / "o.qcow2.json"
    _doc(meta, "failed")
    assert cli("prepare", SAMPLE, *REG, "-o", tmp_path / "o.qcow2").code == 0
    (tmp_path / "o.qcow2").unlink()
    _doc(meta, "creating", {"pid": 2**22 + 7, "started": 1})  # a process that is gone
    assert cli("prepare", SAMPLE, *REG, "-o", tmp_path / "o.qcow2").code == 0
    assert json.loads(meta.read_text())["status"]["state"] == "available"


def test_prepare_never_replaces_a_live_runs_document(cli, tmp_path):
    from imagetool.prepare import _owner

    meta = tmp_path / "o.qcow2.json"
    _doc(meta, "creating", _owner())  # this very process: alive
    result = cli("prepare", SAMPLE, *REG, "-o", tmp_path / "o.qcow2", "--json")
    assert result.code == 5 and result.json["error"]["code"] == "busy"  # not "pass --force": wait
    assert "another imagetool (pid" in result.err
    assert json.loads(meta.read_text())["status"]["state"] == "creating"


@pytest.mark.parametrize(
    ("stderr", "reason"),
    [
        (
            "qemu-img: Could not open '/proc/self/fd/3': VHDX image file '/proc/self/fd/3' opened "
            "read-only, but contains a log that needs to be replayed\nTo replay the log, run:\n"
            "qemu-img check -r all '/proc/self/fd/3'\n",
            "VHDX image file '/proc/self/fd/3' opened read-only, "
            "but contains a log that needs to be replayed",
        ),
        (
            "qemu-img: Could not open '/proc/self/fd/3': Snapshot table offset invalid\n"
            "You can force-remove all 1 overlapping snapshots with qemu-img check -r all\n",
            "Snapshot table offset invalid",
        ),
    ],
)
def test_qemu_advice_lines_are_not_the_reason(stderr, reason):
    from imagetool import qemu

    assert qemu.cause(stderr) == reason


# --- found by attacking the first version of these fixes ---------------------------------------


@pytest.mark.slow
def test_inspect_never_calls_a_file_that_changed_meanwhile_safe(tmp_path):
    """The image turned into a qcow2 with a backing file while qemu-img read it: no verdict."""
    image = sparse_raw(tmp_path / "chg.raw", 768 * MiB, {0: os.urandom(512 * MiB)})
    evil = make_qcow2(tmp_path / "evil.qcow2", str(768 * MiB), "-b", "/etc/passwd", "-F", "raw")
    proc = start_imagetool("inspect", image, "--json")
    wait_for_fd(proc, image)
    with image.open("r+b") as f:
        f.write(evil.read_bytes()[:4096])
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 5, stderr
    assert json.loads(stdout)["error"]["code"] == "source_changed"


def wait_for_fd(proc: subprocess.Popen[str], path: Path) -> None:
    deadline = time.monotonic() + 20
    fd_dir = Path(f"/proc/{proc.pid}/fd")
    while time.monotonic() < deadline:
        try:
            if any(os.readlink(fd) == str(path) for fd in fd_dir.iterdir()):
                return
        except OSError:
            pass
        time.sleep(0.005)
    raise AssertionError(f"{path} was never opened")


@pytest.mark.slow
def test_prepare_interrupted_after_the_qcow2_is_in_place_leaves_no_qcow2(tmp_path, monkeypatch):
    """A failure after the qcow2 was linked into place removes it again (it is ours)."""
    from imagetool import prepare as prepare_mod
    from imagetool.errors import Interrupted
    from imagetool.metadata import registration

    real = prepare_mod.write_document

    def interrupted_at_the_end(target, doc, **kw):
        if doc["status"]["state"] == "available":
            raise Interrupted(signal.SIGTERM)
        real(target, doc, **kw)

    monkeypatch.setattr(prepare_mod, "write_document", interrupted_at_the_end)
    out = tmp_path / "o.qcow2"
    reg = registration(name="web", arch="x86_64", username="ubuntu")
    with pytest.raises(Interrupted):
        prepare_mod.prepare(str(SAMPLE), reg, output_path=str(out))
    assert not out.exists() and temps(tmp_path) == []
    assert json.loads((tmp_path / "o.qcow2.json").read_text())["status"]["state"] == "failed"


def test_a_directory_as_source_is_refused_not_a_crash(cli, tmp_path):
    for command in (["convert", "/"], ["convert", "."], ["prepare", "/", *REG]):
        result = cli(*command, "--json")
        assert result.code == 3 and result.json["error"]["code"] == "not_regular_file", command


def test_an_empty_output_name_is_a_usage_error(cli, tmp_path):
    for command in (["convert", SAMPLE], ["metadata", SAMPLE, *REG], ["prepare", SAMPLE, *REG]):
        result = cli(*command, "-o", "", "--json")
        assert result.code == 2 and result.json["error"]["code"] == "bad_output", command


def test_a_long_metadata_name_for_prepare_is_a_usage_error(cli, tmp_path):
    result = cli("prepare", SAMPLE, *REG, "-o", tmp_path / ("p" * 252), "--json")
    assert result.code == 2 and result.json["error"]["code"] == "name_too_long"
    assert list(tmp_path.iterdir()) == []


def test_too_few_file_descriptors_is_an_environment_error(tmp_path):
    done = imagetool_shell(f'ulimit -n 10; $IMAGETOOL convert "{SAMPLE}" -o "{tmp_path / "n.qcow2"}" --json')
    assert done.returncode == 5, done.stderr
    assert json.loads(done.stdout)["schema"] == "imagetool.error/1"


def test_a_lower_ulimit_than_ours_is_respected_not_an_image_fault(tmp_path):
    for limit in ("ulimit -v 1500000", "ulimit -t 20"):
        done = imagetool_shell(f'{limit}; $IMAGETOOL inspect "{SAMPLE}"')
        assert done.returncode == 0, (limit, done.stderr)


def test_unicode_digits_are_not_sizes(cli, tmp_path):
    for size in ("\uff15\uff10G", "\u0663G"):
        result = cli("convert", SAMPLE, "-o", tmp_path / "o.qcow2", "--max-compressed-size", size)
        assert result.code == 2 and "is not a size" in result.err


@pytest.mark.parametrize("value", ["1.0", "1e308", "99999999999999999999"])
def test_preflight_fails_a_min_ram_that_is_not_an_api_integer(cli, tmp_path, value):
    image = tmp_path / "s.qcow2"
    assert cli("prepare", SAMPLE, *REG, "-o", image, "--min-ram", "512").code == 0
    meta = tmp_path / "s.qcow2.json"
    meta.write_text(meta.read_text().replace('"min_ram": 512', f'"min_ram": {value}'))
    result = cli("preflight", image, "--metadata", meta, "--json")
    assert result.code == 3
    assert any(c["status"] == "fail" and c["name"].startswith("metadata") for c in result.json["checks"])
    assert result.err.count("\n") == 1  # one line for the run, however many checks failed


@pytest.mark.slow
def test_a_ignored_hangup_stays_ignored(tmp_path):
    """`nohup imagetool …` must survive a closed terminal: an ignored SIGHUP stays ignored."""
    out = tmp_path / "o.qcow2"
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # what nohup does; children inherit it
    try:
        proc = start_slow_convert(slow_input(tmp_path), out)
    finally:
        signal.signal(signal.SIGHUP, previous)
    wait_until_writing(proc)
    proc.send_signal(signal.SIGHUP)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert out.exists()
