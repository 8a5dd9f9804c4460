"""Shared helpers: real images made on the fly with qemu-img, and the CLI run in-process."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from imagetool import render
from imagetool.cli import main

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
SAMPLE = FIXTURES / "sample.raw"
CANARY = b"CANARY-imagetool-7f3a9c-host-secret\n"


@pytest.fixture(autouse=True, scope="session")
def _own_state_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    """imagetool keeps its fingerprint key in XDG_STATE_HOME: the tests' own, not the machine's."""
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("state"))


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def json(self) -> Any:
        return json.loads(self.out)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):
    """Run `imagetool ARGS…` in this process; return exit code, stdout and stderr."""

    def run(*args: str | os.PathLike[str]) -> Result:
        render._emitted = False
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def qemu_img(*args: str | os.PathLike[str]) -> None:
    proc = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True)
    assert proc.returncode == 0, f"qemu-img {args}: {proc.stderr}"


def slow_input(tmp_path: Path) -> Path:
    """A raw disk with 160 MiB of incompressible data: seconds of work, time to interrupt it."""
    return sparse_raw(tmp_path / "big.raw", 512 << 20, {0: os.urandom(160 << 20)})


def start_imagetool(*args: str | os.PathLike[str]) -> subprocess.Popen[str]:
    """The real CLI in a child process, for signals and for watching files while it works."""
    return subprocess.Popen(
        [sys.executable, "-m", "imagetool", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


SLOW_CONVERT = ("--engine", "qemu", "--threads", "1", "--progress", "json")  # seconds, with progress lines


def start_slow_convert(source: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    """`imagetool convert` by qemu-img on one thread, printing progress: a run to interrupt or watch."""
    return start_imagetool("convert", source, "-o", out, *SLOW_CONVERT, *extra)


def wait_until_writing(proc: subprocess.Popen[str]) -> None:
    """Read the run's progress lines until the output has bytes in it."""
    assert proc.stderr is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if line.startswith("{") and json.loads(line)["output_bytes"] > 0:
            return
    raise AssertionError("conversion never started")


def make_qcow2(path: Path, size: str = "64M", *opts: str) -> Path:
    qemu_img("create", "-q", "-f", "qcow2", *opts, path, size)
    return path


def sparse_raw(path: Path, size: int, writes: dict[int, bytes] | None = None) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
        for offset, data in (writes or {}).items():
            f.seek(offset)
            f.write(data)
    return path


def patch(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


def set_qcow2_incompatible_bits(path: Path, bits: int) -> None:
    with path.open("r+b") as f:
        f.seek(72)
        (current,) = struct.unpack(">Q", f.read(8))
        f.seek(72)
        f.write(struct.pack(">Q", current | bits))


def canary(tmp_path: Path) -> Path:
    path = tmp_path / "canary.raw"
    path.write_bytes(CANARY * (1 << 16 // len(CANARY) + 1) + bytes(-len(CANARY) % 512))
    return path


def assert_no_leak(tmp_path: Path, *texts: str) -> None:
    """The canary's bytes appear in no output and in no file but the canary itself."""
    marker = CANARY.strip().decode()
    for text in texts:
        assert marker not in text
    for path in tmp_path.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.name != "canary.raw":
            assert CANARY.strip() not in path.read_bytes(), f"canary leaked into {path}"


# --- a real Swift and the stand-in image API, for upload, register and publish -------------------

sys.path.insert(0, str(Path(__file__).resolve().parent / "swift"))


@pytest.fixture(scope="session")
def swift_cluster(tmp_path_factory: pytest.TempPathFactory):
    """A real OpenStack Swift on 127.0.0.1 (tests/swift/swiftctl), one for the whole run."""
    import cluster  # tests/swift/cluster.py

    cluster.swift_deps()
    running = cluster.start(tmp_path_factory.mktemp("swift"))
    yield running
    running.down()


@pytest.fixture
def swift_env(swift_cluster, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """ST_AUTH/ST_USER/ST_KEY of the test account, in the environment (and returned)."""
    for name in [n for n in os.environ if n.startswith(("ST_", "OS_"))]:
        monkeypatch.delenv(name)
    for name, value in swift_cluster.env().items():
        monkeypatch.setenv(name, value)
    return dict(swift_cluster.env())


@pytest.fixture
def standin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The stand-in image-library API (tests/standin_api.py), its credentials in the environment."""
    from standin_api import StandinAPI

    api = StandinAPI(workdir=tmp_path / "standin").start()
    monkeypatch.setenv("BRIGHTBOX_API_URL", api.url)
    monkeypatch.setenv("BRIGHTBOX_CLIENT_ID", api.client_id)
    monkeypatch.setenv("BRIGHTBOX_CLIENT_SECRET", api.client_secret)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no brightbox-cli config of the machine's
    yield api
    api.stop()


BIG_DATA = 24 << 20  # incompressible bytes in the big prepared image: over the test Swift's 8 MiB limit


def _prepared(directory: Path, name: str, data: bytes) -> Path:
    from imagetool.metadata import registration
    from imagetool.prepare import prepare

    raw = sparse_raw(directory / f"{name}.raw", 64 << 20, {1 << 20: data})
    reg = registration(name=name, arch="x86_64", username="debian")
    qcow2, _, _, _ = prepare(str(raw), reg, output_path=str(directory / f"{name}.qcow2"))
    raw.unlink()
    return qcow2


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Prepared images (qcow2 + metadata), made once: `small` fits one object, `big` does not."""
    directory = tmp_path_factory.mktemp("prepared")
    return {
        "small": _prepared(directory, "small", os.urandom(2 << 20) + b"hello" * 100_000),
        "big": _prepared(directory, "big", os.urandom(BIG_DATA)),
    }
