"""FHIR date/dateTime/instant values as closed ranges of microseconds since the epoch.

Why: FHIR reads a date with its precision as a range ("2020" is the whole year),
for stored values and for search values alike. Indexing both as integer ranges
makes every date prefix (eq, lt, ge, sa, eb, ap, ...) a plain SQL comparison.
Values without a time zone are read as UTC (documented in docs/decisions.md).
"""

from __future__ import annotations

import calendar
import re
from datetime import UTC, datetime, timedelta, timezone
from functools import lru_cache

_DATE_RE = re.compile(
    r"^(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?P<H>\d{2}):(?P<M>\d{2})(?::(?P<S>\d{2})(?:\.(?P<f>\d{1,9}))?)?"
    r"(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MIN_US = -(2**62)
MAX_US = 2**62


class DateFormatError(ValueError):
    """A value is not a FHIR date, dateTime or instant."""


def _us(dt: datetime) -> int:
    delta = dt - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def parse_range(value: str) -> tuple[int, int]:
    """Return (low, high) inclusive microsecond bounds of a FHIR date/dateTime/instant.

    Cached for strings: indexing a bundle parses the same few instants over and over (in the Synthea
    samples 6,127 date values, 1,379 distinct), and the result is a pure function of the text."""
    if type(value) is str:
        return _cached_range(value)
    return _parse_range(value)


def _parse_range(value: str) -> tuple[int, int]:
    match = _DATE_RE.match(value.strip())
    if not match:
        raise DateFormatError(f"not a FHIR date/dateTime: {value!r}")
    g = match.groupdict()
    try:
        year = int(g["y"])
        if g["m"] is None:
            lo = datetime(year, 1, 1, tzinfo=UTC)
            hi = datetime(year + 1, 1, 1, tzinfo=UTC) if year < 9999 else None
        elif g["d"] is None:
            month = int(g["m"])
            lo = datetime(year, month, 1, tzinfo=UTC)
            hi = lo + timedelta(days=calendar.monthrange(year, month)[1])
        elif g["H"] is None:
            lo = datetime(year, int(g["m"]), int(g["d"]), tzinfo=UTC)
            hi = lo + timedelta(days=1)
        else:
            tz: timezone = UTC  # no zone: read as UTC
            if g["tz"] and g["tz"] != "Z":
                sign = 1 if g["tz"][0] == "+" else -1
                hours, minutes = int(g["tz"][1:3]), int(g["tz"][4:6])
                tz = timezone(timedelta(minutes=sign * (hours * 60 + minutes)))
            base = datetime(
                year, int(g["m"]), int(g["d"]), int(g["H"]), int(g["M"]), int(g["S"] or 0), tzinfo=tz
            )
            if g["S"] is None:
                lo, hi = base, base + timedelta(minutes=1)
            elif g["f"] is None:
                lo, hi = base, base + timedelta(seconds=1)
            else:
                digits = g["f"]
                micro = int((digits + "000000")[:6])
                lo = base + timedelta(microseconds=micro)
                hi = lo + timedelta(microseconds=max(1, 10 ** max(0, 6 - len(digits))))
    except ValueError as exc:  # impossible calendar values such as 2021-02-30
        raise DateFormatError(f"not a valid date: {value!r}") from exc
    return _us(lo), (_us(hi) - 1 if hi is not None else MAX_US)


_cached_range = lru_cache(maxsize=8192)(_parse_range)


def period_range(start: str | None, end: str | None) -> tuple[int, int]:
    """Range of a Period: an open end stretches to infinity."""
    lo = parse_range(start)[0] if start else MIN_US
    hi = parse_range(end)[1] if end else MAX_US
    return lo, hi


def now_us() -> int:
    return _us(datetime.now(UTC))


_NAIVE_EPOCH = datetime(1970, 1, 1)
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("", "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def format_instant(us: int) -> str:
    """Render microseconds as a FHIR instant with millisecond precision (what servers usually emit).

    Every read answer and audit record formats one, so it avoids `strftime` (several times slower)."""
    return (_NAIVE_EPOCH + timedelta(microseconds=us)).isoformat(timespec="milliseconds") + "Z"


def format_http_date(us: int) -> str:
    """RFC 7231 date for Last-Modified, in English whatever the process locale (as `strftime` is not)."""
    dt = _NAIVE_EPOCH + timedelta(microseconds=us)
    return (f"{_DAYS[dt.weekday()]}, {dt.day:02d} {_MONTHS[dt.month]} {dt.year:04d} "
            f"{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d} GMT")
