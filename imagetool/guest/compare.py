"""What the look says about a registration someone typed: agree, contradict, or cannot tell.

Used by `preflight --guest` (a `guest` check against the metadata) and by
`metadata`/`prepare --from-guest` (filling what was not given). A contradiction of a
`certain` answer is an error (a server built from the image would not boot, or the SSH
key would go to another account); a contradiction of a `likely` one is a warning; an
`unknown` answer never blocks anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from imagetool.errors import ImageRejected, Reason
from imagetool.guest.facts import CERTAIN, LIKELY, Answer, GuestFacts

Severity = Literal["pass", "warn", "fail"]


@dataclass(frozen=True)
class Finding:
    field: str  # arch, mode, username
    severity: Severity
    message: str
    code: str | None = None


def _why(answer: Answer) -> str:
    return answer.evidence[-1] if answer.evidence else "no evidence"


def compare(facts: GuestFacts, *, arch: str | None, mode: str | None, username: str | None) -> list[Finding]:
    """One finding per field: the registration's value against the guest's answer."""
    found: list[Finding] = []
    claimed = {"arch": arch, "mode": mode, "username": username}
    for name, answer in (("arch", facts.arch), ("mode", facts.mode), ("username", facts.username)):
        value = claimed[name]
        if answer.confidence not in (CERTAIN, LIKELY) or answer.value is None:
            found.append(Finding(name, "pass", f"{name}: the guest does not tell ({_why(answer)})"))
            continue
        if name == "arch" and answer.get("supported") is False:
            severity: Severity = "fail" if answer.confidence == CERTAIN else "warn"
            message = (
                f"the guest is {answer.value} ({answer.confidence}): the library runs only i686 and x86_64"
            )
            found.append(Finding(name, severity, message, "guest_arch_unsupported"))
            continue
        if value is None or value == answer.value:
            said = "matches" if value is not None else "is"
            found.append(
                Finding(name, "pass", f"{name} {said} the guest's {answer.value} ({answer.confidence})")
            )
            continue
        if name == "mode" and value == "compatibility":
            message = "compatibility works for any guest; the guest could use virtio (faster)"
            found.append(Finding(name, "pass", message))
            continue
        severity = "fail" if answer.confidence == CERTAIN else "warn"
        message = (
            f"{name} is {value!r} but the guest says {answer.value!r} ({answer.confidence}): {_why(answer)}"
        )
        found.append(Finding(name, severity, message, f"guest_{name}_mismatch"))
    return found


@dataclass(frozen=True)
class Filled:
    arch: str | None
    mode: str | None
    username: str | None
    notes: tuple[str, ...]


def fill(
    facts: GuestFacts, *, arch: str | None, mode: str | None, username: str | None, force: bool = False
) -> Filled:
    """Values not given are taken from certain or likely answers; a certain contradiction is refused
    (exit 3: the image would not boot, or the key would go to another login) unless `force`."""
    problems = [f for f in compare(facts, arch=arch, mode=mode, username=username) if f.severity == "fail"]
    notes: list[str] = []
    if problems and not force:
        first = problems[0]
        message = f"--{first.field}: {first.message} (pass --force to keep it)"
        raise ImageRejected(message, [Reason(first.code or "guest_mismatch", message)])
    notes += [f"--{f.field} kept with --force: {f.message}" for f in problems]
    values = {"arch": arch, "mode": mode, "username": username}
    for name, answer in (("arch", facts.arch), ("mode", facts.mode), ("username", facts.username)):
        if values[name] is not None:
            continue
        if answer.value is not None and answer.confidence in (CERTAIN, LIKELY):
            values[name] = answer.value
            notes.append(f"--{name} {answer.value} from the guest ({answer.confidence}: {_why(answer)})")
        else:
            notes.append(f"--{name}: the guest does not tell ({_why(answer)})")
    return Filled(values["arch"], values["mode"], values["username"], tuple(notes))


def look_at_path(path: str, claimed_format: str | None = None, *, time_limit: float = 10.0) -> GuestFacts:
    """Open, check the header (refusing an unsafe image like every command) and look, for --from-guest.

    The header stage, not the whole inspection: the guest readers need a safe format, not
    the disk_size scan or qemu-img's checks, which the command that follows runs anyway.
    """
    from imagetool.detect import detect, normalize_format
    from imagetool.guest.look import look
    from imagetool.source import open_source

    with open_source(path) as src:
        found = detect(src)
        reasons = list(found.reasons)
        claimed = normalize_format(claimed_format) if claimed_format else None
        if found.format and claimed and found.format != claimed:
            reasons.append(
                Reason("format_mismatch", f"claimed format {claimed} but the content is {found.format}")
            )
        if reasons:
            raise ImageRejected(reasons[0].message, reasons, path=path)
        return look(src, found.format or "", time_limit=time_limit)
