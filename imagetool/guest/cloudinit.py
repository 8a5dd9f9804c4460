"""The default username: what cloud-init's configuration in the guest makes the default user.

cloud-init reads /etc/cloud/cloud.cfg, then /etc/cloud/cloud.cfg.d/*.cfg in lexical
order, later files overriding earlier ones key by key; `system_info.default_user.name`
is the account created at first boot that receives the SSH key, and a top-level `user:`
replaces that name. A `users:` list without `default` creates no default user.
Without a configuration that names it, the distribution's convention from os-release
ID is given as `likely`: the names cloud-init's own upstream template (cloud.cfg.tmpl)
gives each distribution, which the distributions' cloud images use (centos and rhel get
`cloud-user`, amzn `ec2-user`, the others their own ID).
"""

from __future__ import annotations

import re
from typing import Any

from imagetool.guest import limits
from imagetool.guest.facts import CERTAIN, LIKELY, Answer, unknown
from imagetool.guest.files import GuestTree
from imagetool.guest.filesystems import GuestPathError
from imagetool.guest.text import printable, short_error

CLOUD_CFG = "/etc/cloud/cloud.cfg"
CLOUD_CFG_D = "/etc/cloud/cloud.cfg.d"
CONVENTIONS = {
    "debian": "debian",
    "ubuntu": "ubuntu",
    "fedora": "fedora",
    "centos": "cloud-user",
    "rhel": "cloud-user",
    "rocky": "rocky",
    "almalinux": "almalinux",
    "arch": "arch",
    "alpine": "alpine",
    "amzn": "ec2-user",
}
LOGIN_NAME = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")


def _load_yaml(data: bytes) -> Any:
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(data, Loader=loader)


def _name_of(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("name"), str):
        return str(value["name"])
    return None


def _has_default(users: Any) -> bool:
    if isinstance(users, str):
        users = [u.strip() for u in users.split(",")]
    if not isinstance(users, list):
        return True
    return any(u == "default" or (isinstance(u, dict) and u.get("name") == "default") for u in users)


def _config_files(tree: GuestTree, evidence: list[str]) -> list[str]:
    files = [CLOUD_CFG]
    try:
        found, names = tree.listdir(CLOUD_CFG_D)
    except GuestPathError:
        return files
    cfgs = sorted(n for n in names if n.endswith(".cfg"))
    if len(cfgs) > limits.MAX_CLOUD_CFG_FILES:
        evidence.append(f"{found.path}: {len(cfgs)} files, only the first {limits.MAX_CLOUD_CFG_FILES} read")
    return files + [f"{found.path}/{n}" for n in cfgs[: limits.MAX_CLOUD_CFG_FILES]]


def read_username(tree: GuestTree, os_id: str | None) -> Answer:
    evidence: list[str] = []
    failed: list[str] = []
    name: tuple[str, str] | None = None  # (name, where)
    override: tuple[str, str] | None = None
    users: tuple[Any, str] | None = None
    read_any = False
    for path in _config_files(tree, evidence):
        try:
            found, data = tree.read(path, limits.MAX_CONFIG_BYTES)
        except GuestPathError as exc:
            if path != CLOUD_CFG or "no such file" not in str(exc):
                failed.append(str(exc))
            continue
        except Exception as exc:
            failed.append(f"{path}: {short_error(exc)}")
            continue
        try:
            doc = _load_yaml(data)
        except Exception as exc:
            failed.append(f"{found.describe()}: not valid YAML ({short_error(exc)})")
            continue
        read_any = True
        if doc is None:
            continue
        if not isinstance(doc, dict):
            failed.append(f"{found.describe()}: not a YAML mapping")
            continue
        system_info = doc.get("system_info")
        default_user = system_info.get("default_user") if isinstance(system_info, dict) else None
        if isinstance(default_user, dict) and "name" in default_user:
            value = default_user["name"]
            if isinstance(value, str):
                name = (value, f"{found.describe()}: system_info.default_user.name = {printable(value)!r}")
        if "user" in doc and _name_of(doc["user"]):
            value = _name_of(doc["user"]) or ""
            override = (
                value,
                f"{found.describe()}: user = {printable(value)!r} (replaces the default user's name)",
            )
        if "users" in doc:
            users = (doc["users"], found.describe())
    evidence += failed
    if failed:
        evidence.append("a cloud-init file that could not be read may name another user: unknown")
        return unknown(*evidence, extra=(("source", None),))
    chosen = override or name
    if chosen is not None:
        value, said = chosen
        evidence.append(said)
        if not LOGIN_NAME.match(value):
            evidence.append(f"{printable(value)!r} is not a POSIX login name")
            return unknown(*evidence, extra=(("source", None),))
        confidence = CERTAIN
        if users is not None and not _has_default(users[0]):
            evidence.append(f"{users[1]}: users: has no 'default' entry, so no default user is created")
            confidence = LIKELY
        if tree.find("/etc/cloud/cloud-init.disabled") is not None:
            evidence.append("/etc/cloud/cloud-init.disabled exists: cloud-init will not run")
            confidence = LIKELY
        return Answer(value, confidence, tuple(evidence), (("source", "cloud-init"),))
    evidence.append(
        "cloud-init's configuration names no default user" if read_any else "no cloud-init configuration"
    )
    convention = CONVENTIONS.get(os_id or "")
    if convention is None:
        evidence.append(f"no convention for os-release ID={printable(os_id or '')!r}")
        return unknown(*evidence, extra=(("source", None),))
    evidence.append(
        f"os-release ID={os_id}: cloud-init's default user for this distribution is {convention!r} "
        "(a convention, not read from this image)"
    )
    return Answer(convention, LIKELY, tuple(evidence), (("source", "convention"),))
