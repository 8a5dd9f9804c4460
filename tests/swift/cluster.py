"""A real Swift cluster for pytest: a thin wrapper around tests/swift/swiftctl.

Stdlib only, so the project's venv can import it without Swift installed there (Swift runs
from .swift-venv, built by `make swift-deps`). Typical session fixture::

    cluster = start(tmp_path_factory.mktemp("swift"))
    yield cluster
    cluster.down()

start() passes ``--die-with <this pid>``: if the test process dies without calling down()
(SIGKILL, a CI timeout), a watchdog started by swiftctl stops the servers within a second.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
SWIFTCTL = HERE / "swiftctl"
SWIFT_VENV = REPO / ".swift-venv"

SERVERS = ("proxy", "object", "container", "account", "memcached")


def _swiftctl(*args: str) -> str:
    """Run swiftctl with this interpreter; on failure raise with its stderr (log tails)."""
    proc = subprocess.run([sys.executable, str(SWIFTCTL), *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"swiftctl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc.stdout


@dataclass
class Cluster:
    """How to reach one running cluster, and how to poke at it."""

    auth_url: str  # tempauth v1: http://127.0.0.1:PORT/auth/v1.0
    user: str  # "test:tester" (.admin of account AUTH_test)
    key: str
    proxy_url: str  # http://127.0.0.1:PORT
    account_url: str  # storage URL of the test account: http://127.0.0.1:PORT/v1/AUTH_test
    dir: Path
    max_file_size: int
    # every tempauth user -> key: "test:tester" (.admin), "test:reader" (no rights until
    # granted by ACL), "other:user" (.admin of a second account, AUTH_other)
    users: dict[str, str] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        """ST_AUTH/ST_USER/ST_KEY, as the `swift` CLI and the project's --os-* defaults read them."""
        return {"ST_AUTH": self.auth_url, "ST_USER": self.user, "ST_KEY": self.key}

    def stop_server(self, name: str) -> None:
        """Stop one of proxy|object|container|account|memcached (SIGTERM, then SIGKILL)."""
        _swiftctl("stop", name, "--dir", str(self.dir))

    def start_server(self, name: str) -> None:
        """Start it again on the same port; returns once it serves requests.

        After restarting memcached the tempauth tokens are gone: clients must log in again.
        """
        _swiftctl("start", name, "--dir", str(self.dir))

    def down(self) -> None:
        """Stop every process of the cluster and delete its directory. Idempotent."""
        _swiftctl("down", "--dir", str(self.dir))


def swift_deps() -> None:
    """Build .swift-venv (and install memcached) if missing; `make test` normally has."""
    if not (SWIFT_VENV / ".installed").exists():
        subprocess.run(["make", "-s", "swift-deps"], cwd=REPO, check=True, stdout=subprocess.DEVNULL)


def start(dir: str | os.PathLike[str], max_file_size: int = 8 << 20) -> Cluster:
    """Start a cluster in dir (created; must be empty or an old swiftctl directory)."""
    out = _swiftctl(
        "up",
        "--dir",
        str(dir),
        "--max-file-size",
        str(max_file_size),
        "--json",
        "--die-with",
        str(os.getpid()),
    )
    info = json.loads(out)
    return Cluster(
        auth_url=info["auth_url"],
        user=info["user"],
        key=info["key"],
        proxy_url=info["proxy_url"],
        account_url=info["account_url"],
        dir=Path(info["dir"]),
        max_file_size=info["max_file_size"],
        users=info["users"],
    )
