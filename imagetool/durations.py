"""Durations and points in time as users type them: `90m`, `2d`, `36h`, or an ISO 8601 time."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from imagetool.errors import UsageProblem

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"([0-9]{1,9})([smhdw])", re.ASCII)


def parse_duration(text: str, option: str) -> int:
    """Seconds in `text`: a whole number with one unit (s, m, h, d, w), e.g. 90m or 2d."""
    found = _DURATION.fullmatch(text.strip().lower())
    if found is None or int(found.group(1)) == 0:
        raise UsageProblem(
            f"{option} {text!r} is not a duration: a whole number and a unit, e.g. 90m, 36h or 2d",
            code="bad_duration",
        )
    return int(found.group(1)) * _UNITS[found.group(2)]


def parse_time(text: str, option: str, now: datetime, longest: timedelta, shortest: timedelta) -> datetime:
    """A point in time between `shortest` and `longest` from now: a duration (2d) or an ISO 8601 time.

    An ISO time without a zone is UTC.
    """
    if _DURATION.fullmatch(text.strip().lower()):
        seconds = parse_duration(text, option)
        when = now + timedelta(seconds=min(seconds, int(longest.total_seconds()) + 1))
    else:
        try:
            when = datetime.fromisoformat(text.strip())
        except ValueError:
            raise UsageProblem(
                f"{option} {text!r} is neither a duration (90m, 2d) nor an ISO 8601 time (2026-12-24T18:00Z)",
                code="bad_time",
            ) from None
        when = when if when.tzinfo is not None else when.replace(tzinfo=UTC)
    if when <= now:
        raise UsageProblem(f"{option} {text!r} is in the past", code="bad_time")
    if when < now + shortest:
        minutes = int(shortest.total_seconds()) // 60
        raise UsageProblem(f"{option} {text!r} is less than {minutes} minutes away", code="bad_time")
    if when > now + longest:
        raise UsageProblem(f"{option} {text!r} is more than {longest.days} days away", code="bad_time")
    return when


def iso(when: datetime) -> str:
    """UTC, to the second, with a Z: the form every time in our documents takes."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str) -> datetime | None:
    """One of our own `iso()` times back, or None when it is not one."""
    try:
        when = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)
