"""The hub's registry of facilities: codes, names, endpoints, certificates and security clearance.

Why clearance is data with a date and a reference: in the pilot province a unit
may connect only after the police security checks; the hub must refuse any
clinical exchange with a unit that is pending or suspended, say why, and keep
the history of who changed the status and on what authority.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Boolean, Column, Engine, Integer, String, Table, Text, bindparam, insert, select, update

from lienthong.fhir.datetimes import now_us
from lienthong.fhir.outcome import error
from lienthong.storage.engine import read_connection
from lienthong.storage.schema import metadata

CLEARANCE = ("pending", "cleared", "suspended")
EXCHANGES = ("transfer", "query", "locator")

facility_registry = Table(
    "facility_registry",
    metadata,
    Column("code", String(5), primary_key=True),
    Column("name_vi", String(255), nullable=False),
    Column("name_en", String(255), nullable=True),
    Column("kind", String(32), nullable=True),
    Column("endpoint", Text, nullable=True),  # base URL of the node's exchange endpoint
    Column("cert_pem", Text, nullable=True),  # the node certificate the hub issued or registered
    Column("clearance", String(12), nullable=False),
    Column("clearance_date", String(10), nullable=True),
    Column("clearance_ref", String(255), nullable=True),
    Column("exchanges", Text, nullable=False),  # JSON list of exchange kinds allowed
    Column("his_level", Integer, nullable=True),
    Column("emr", String(16), nullable=True),
    Column("code_is_official", Boolean, nullable=False, default=True),
    Column("updated", String(32), nullable=False),
)


@dataclass
class Facility:
    code: str
    name_vi: str
    name_en: str | None = None
    kind: str | None = None
    endpoint: str | None = None
    cert_pem: str | None = None
    clearance: str = "pending"
    clearance_date: str | None = None
    clearance_ref: str | None = None
    exchanges: list[str] = field(default_factory=lambda: list(EXCHANGES))
    his_level: int | None = None
    emr: str | None = None
    code_is_official: bool = True

    def to_json(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data.pop("cert_pem", None)
        data["has_certificate"] = bool(self.cert_pem)
        return data


def check_code(code: str) -> str:
    if not re.fullmatch(r"\d{5}", code or ""):
        raise error(400, "invalid", f"Mã cơ sở phải gồm 5 chữ số '{code}'", f"Facility code must be 5 digits '{code}'")
    return code


# Read for every message the hub accepts and forwards (clearance of both ends): built once.
_GET = select(facility_registry).where(facility_registry.c.code == bindparam("code"))


class Registry:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def upsert(self, facility: Facility) -> Facility:
        check_code(facility.code)
        if facility.clearance not in CLEARANCE:
            raise error(400, "invalid", "Trạng thái kiểm tra an ninh không hợp lệ", f"clearance must be one of {CLEARANCE}")
        unknown = set(facility.exchanges) - set(EXCHANGES)
        if unknown:
            raise error(400, "invalid", "Loại trao đổi không hợp lệ", f"unknown exchange kinds {sorted(unknown)}")
        row = {k: v for k, v in facility.__dict__.items()}
        row["exchanges"] = json.dumps(sorted(set(facility.exchanges)))
        row["updated"] = str(now_us())
        t = facility_registry
        with self.engine.begin() as conn:
            exists = conn.execute(select(t.c.code).where(t.c.code == facility.code)).first()
            if exists:
                conn.execute(update(t).where(t.c.code == facility.code).values(**row))
            else:
                conn.execute(insert(t).values(**row))
        return facility

    def get(self, code: str) -> Facility | None:
        with read_connection(self.engine) as conn:
            row = conn.execute(_GET, {"code": code}).mappings().first()
        return _facility(dict(row)) if row else None

    def list(self) -> list[Facility]:
        t = facility_registry
        with read_connection(self.engine) as conn:
            rows = conn.execute(select(t).order_by(t.c.code)).mappings().all()
        return [_facility(dict(r)) for r in rows]

    def set_clearance(self, code: str, status: str, date: str | None, reference: str | None) -> Facility:
        """Record the outcome of the police security check (or a suspension), with its date and reference."""
        if status not in CLEARANCE:
            raise error(400, "invalid", "Trạng thái không hợp lệ", f"clearance must be one of {CLEARANCE}")
        if status == "cleared" and (not date or not reference):
            raise error(400, "required", "Cần ngày và số văn bản kiểm tra an ninh",
                        "Clearing a facility needs the date and reference of the security check")
        facility = self.get(check_code(code))
        if facility is None:
            raise error(404, "not-found", f"Không có cơ sở {code}", f"No facility {code}")
        facility.clearance, facility.clearance_date, facility.clearance_ref = status, date, reference
        return self.upsert(facility)

    def require(self, code: str, exchange: str) -> Facility:
        """The facility if it may take part in `exchange` now; otherwise a 403 that says why."""
        facility = self.get(code)
        if facility is None:
            raise error(403, "forbidden", f"Cơ sở {code} chưa đăng ký với trạm", f"Facility {code} is not registered")
        if facility.clearance != "cleared":
            raise error(403, "forbidden", f"Cơ sở {code} chưa được cho phép kết nối ({facility.clearance})",
                        f"Facility {code} may not exchange clinical data: security clearance is {facility.clearance}")
        if exchange not in facility.exchanges:
            raise error(403, "forbidden", f"Cơ sở {code} không tham gia trao đổi '{exchange}'",
                        f"Facility {code} does not take part in '{exchange}' exchanges")
        return facility


def _facility(row: dict[str, Any]) -> Facility:
    row.pop("updated", None)
    row["exchanges"] = json.loads(row["exchanges"])
    return Facility(**row)


def load_pilot(path: Path, codes: dict[str, str]) -> list[Facility]:
    """Facilities of the pilot province from the shared data file, with codes from configuration.

    The data file does not publish the units' facility codes; `codes` maps each unit's Vietnamese
    name to its code, and units without a configured code are skipped rather than invented."""
    data = json.loads(path.read_text(encoding="utf-8"))
    out = []
    for unit in [*data.get("units", []), data.get("partner", {})]:
        name = unit.get("name_vi")
        code = codes.get(name) or unit.get("facility_code")
        if not name or not code:
            continue
        out.append(Facility(code=code, name_vi=name, name_en=unit.get("name_en"), kind=unit.get("kind"),
                            his_level=unit.get("his_level"), emr=unit.get("emr"),
                            code_is_official=bool(unit.get("facility_code")) and code == unit.get("facility_code")))
    return out
