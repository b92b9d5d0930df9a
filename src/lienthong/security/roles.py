"""Roles and what each may do (CV 365: who may view, create, edit, cancel and restore data).

Why data, not code paths: the facility's internal EMR regulation decides the
exact grants; this table is the default a facility administrator starts from.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Role:
    code: str
    vi: str
    en: str
    interactions: frozenset[str]  # SMART letters c r u d s
    facility_wide: bool  # sees every patient of the facility, not only the care team's
    clinical: bool  # may touch clinical data at all
    audit_reader: bool = False
    user_admin: bool = False
    province_admin: bool = False
    bulk_export: bool = False


ROLES: dict[str, Role] = {
    r.code: r
    for r in (
        Role("clinician", "Bác sĩ", "Clinician", frozenset("cruds"), facility_wide=False, clinical=True),
        Role("nurse", "Điều dưỡng", "Nurse", frozenset("crus"), facility_wide=False, clinical=True),
        Role("records-officer", "Cán bộ lưu trữ hồ sơ", "Records officer", frozenset("cruds"),
             facility_wide=True, clinical=True, bulk_export=True),
        Role("facility-admin", "Quản trị cơ sở", "Facility administrator", frozenset("rs"),
             facility_wide=True, clinical=True, user_admin=True, bulk_export=True),
        Role("province-admin", "Quản trị tỉnh", "Provincial administrator", frozenset(),
             facility_wide=False, clinical=False, user_admin=True, province_admin=True),
        Role("auditor", "Kiểm toán viên", "Auditor", frozenset(), facility_wide=False, clinical=False,
             audit_reader=True),
    )
}


def role(code: str) -> Role:
    found = ROLES.get(code)
    if found is None:
        raise ValueError(f"Vai trò không biết '{code}' / unknown role '{code}'; known: {', '.join(ROLES)}")
    return found
