"""Time windows on role assignments: office hours, night shifts across midnight, contractor end dates.

Why local time: shifts are defined in Vietnam time (UTC+7, no daylight saving),
whatever the server's clock zone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta, timezone
from typing import Any

VN = timezone(timedelta(hours=7), "ICT")
_DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


class WindowError(ValueError):
    pass


@dataclass(frozen=True)
class Window:
    days: frozenset[int]  # 0 = Monday
    start: time
    end: time  # end <= start means the window crosses midnight

    def contains(self, moment: datetime) -> bool:
        local = moment.astimezone(VN)
        t = local.time()
        if self.start < self.end:
            return local.weekday() in self.days and self.start <= t < self.end
        # Night shift: the part after midnight belongs to the shift that started the day before.
        if t >= self.start:
            return local.weekday() in self.days
        if t < self.end:
            return (local.weekday() - 1) % 7 in self.days
        return False


def _days(spec: str) -> frozenset[int]:
    out: set[int] = set()
    for part in spec.lower().split(","):
        part = part.strip()
        if "-" in part:
            a, b = part.split("-", 1)
            if a not in _DAYS or b not in _DAYS:
                raise WindowError(f"ngày không hợp lệ '{part}' / invalid days '{part}'")
            i, j = _DAYS.index(a), _DAYS.index(b)
            out.update(range(i, j + 1) if i <= j else [*range(i, 7), *range(0, j + 1)])
        elif part in _DAYS:
            out.add(_DAYS.index(part))
        elif part in ("all", "*", ""):
            out.update(range(7))
        else:
            raise WindowError(f"ngày không hợp lệ '{part}' / invalid day '{part}'")
    return frozenset(out)


def _time(spec: str) -> time:
    if not re.fullmatch(r"\d{2}:\d{2}", spec):
        raise WindowError(f"giờ không hợp lệ '{spec}' / invalid time '{spec}' (HH:MM)")
    hours, minutes = int(spec[:2]), int(spec[3:])
    if hours > 23 or minutes > 59:
        raise WindowError(f"giờ không hợp lệ '{spec}' / invalid time '{spec}'")
    return time(hours, minutes)


def parse_window(spec: dict[str, Any]) -> Window:
    return Window(_days(str(spec.get("days", "all"))), _time(str(spec.get("start", "00:00"))),
                  _time(str(spec.get("end", "00:00"))))


def active(window: dict[str, Any] | None, valid_from: int | None, valid_until: int | None,
           now: datetime | None = None) -> bool:
    """Whether an assignment is in force at `now` (UTC)."""
    now = now or datetime.now(UTC)
    us = int(now.timestamp() * 1_000_000)
    if valid_from is not None and us < valid_from:
        return False
    if valid_until is not None and us > valid_until:
        return False
    return window is None or parse_window(window).contains(now)
