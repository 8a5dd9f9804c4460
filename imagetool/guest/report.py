"""How a look is shown: the `imagetool guest` JSON document and its text form.

Kept beside the look so the CLI only calls these; guest-supplied strings in evidence
are passed through render.say(), which escapes control characters.
"""

from __future__ import annotations

from typing import Any

from imagetool.guest.facts import GuestFacts

SCHEMA = "imagetool.guest/1"
KEYS = ("arch", "mode", "username", "os")


def guest_document(path: str, fmt: str, facts: GuestFacts) -> dict[str, Any]:
    """The JSON: the five answers of GuestFacts.as_dict(), plus how the look went."""
    return {
        "schema": SCHEMA,
        "path": path,
        "format": fmt,
        **facts.as_dict(),
        "layout": list(facts.layout),
        "stopped": facts.stopped,
        "bytes_read": facts.bytes_read,
        "seconds": facts.seconds,
    }


def guest_text(path: str, facts: GuestFacts, *, verbose: bool = True) -> str:
    d = facts.as_dict()
    title = d["os"]["value"] or "unknown system"
    lines = [f"{path}: {title}"]
    for key in KEYS:
        answer = d[key]
        value = answer["value"] if answer["value"] is not None else "-"
        note = ""
        if key == "arch" and answer.get("supported") is False:
            note = "  (not run by the image library)"
        if key == "mode" and answer.get("kernel"):
            note = f"  (default kernel {answer['kernel']})"
        if key == "username" and answer.get("source"):
            note = f"  (from {answer['source']})"
        lines.append(f"  {key:<9} {value} [{answer['confidence']}]{note}")
    if facts.stopped:
        lines.append(f"  stopped   {facts.stopped}")
    lines.append(f"  read      {facts.bytes_read} bytes of the image in {facts.seconds:.2f} s")
    if verbose:
        for key in KEYS:
            lines.append(f"{key} evidence:")
            lines.extend(f"  - {line}" for line in d[key]["evidence"])
        lines.append("disk:")
        lines.extend(f"  - {line}" for line in facts.layout)
    return "\n".join(lines)
