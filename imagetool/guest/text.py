"""Small helpers that turn what was read into evidence lines."""

from __future__ import annotations


def short_error(exc: BaseException) -> str:
    """`ErrorType: first line of the message`, at most 200 characters: evidence, not a traceback."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    if len(text) > 200:
        text = text[:200] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def printable(value: str, limit: int = 120) -> str:
    """A guest-supplied string made safe for one evidence line (no control characters)."""
    cleaned = "".join(ch if ch.isprintable() else f"\\x{ord(ch) & 0xFF:02x}" for ch in value)
    return cleaned if len(cleaned) <= limit else cleaned[:limit] + "..."
