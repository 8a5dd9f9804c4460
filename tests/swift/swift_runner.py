"""The part of swiftctl that runs inside the Swift venv (.swift-venv/bin/python).

swiftctl itself is stdlib-only so it runs with any python3; everything that needs the
``swift`` package lives here:

``serve CONF SERVER``
    Run one WSGI server (``proxy-server``, ``account-server``, ``container-server`` or
    ``object-server``) in the foreground, logging to stderr.

``rings ETC_DIR ACCOUNT_PORT CONTAINER_PORT OBJECT_PORT``
    Write account/container/object builders and rings with one device each, the same as
    ``swift-ring-builder X.builder create 8 1 1; add r1z1-127.0.0.1:PORT/d1 1; rebalance``
    but in one process instead of nine.

Why ``serve`` is not just ``swift-object-server CONF``: swift reads ``swift.conf`` from
/etc/swift when its modules are imported (constraints such as max_file_size, the storage
policies), whatever ``swift_dir`` says. We must not write /etc/swift (two clusters with
different limits could not coexist, and CI must not depend on it), so we point swift at
the cluster's own directory and reload both *before* importing the server code, because
some modules copy constants like MAX_FILE_SIZE at import time.
"""

from __future__ import annotations

import os
import sys

SERVERS = ("proxy-server", "account-server", "container-server", "object-server")


def serve(conf_path: str, server: str) -> int:
    if server not in SERVERS:
        raise SystemExit(f"unknown server {server!r}; expected one of {', '.join(SERVERS)}")
    from swift.common import utils

    utils.set_swift_dir(os.path.dirname(os.path.abspath(conf_path)))
    from swift.common import constraints, storage_policy

    constraints.reload_constraints()
    storage_policy.reload_storage_policies()

    # Only now import the WSGI machinery and the server modules.
    from swift.common.wsgi import run_wsgi

    kwargs = {}
    if server == "object-server":
        # What bin/swift-object-server passes (swift.obj.server.main): sets up the
        # replication semaphore in the global conf before the app is built.
        from swift.obj.server import global_conf_callback

        kwargs["global_conf_callback"] = global_conf_callback
    # verbose=True adds a console handler on stderr, which swiftctl sends to DIR/log/.
    return int(run_wsgi(conf_path, server, verbose=True, **kwargs) or 0)


def rings(etc_dir: str, account_port: int, container_port: int, object_port: int) -> None:
    from swift.common.ring import RingBuilder

    for name, port in (("account", account_port), ("container", container_port), ("object", object_port)):
        builder = RingBuilder(8, 1, 1)  # 2**8 partitions, 1 replica, min_part_hours 1
        builder.add_dev(
            {
                "id": 0,
                "region": 1,
                "zone": 1,
                "ip": "127.0.0.1",
                "port": port,
                "replication_ip": "127.0.0.1",
                "replication_port": port,
                "device": "d1",
                "weight": 1,
                "meta": "",
            }
        )
        builder.rebalance()
        builder.save(os.path.join(etc_dir, f"{name}.builder"))
        builder.get_ring().save(os.path.join(etc_dir, f"{name}.ring.gz"))


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "serve":
        return serve(argv[1], argv[2])
    if len(argv) == 5 and argv[0] == "rings":
        rings(argv[1], int(argv[2]), int(argv[3]), int(argv[4]))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
