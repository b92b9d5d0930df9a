"""FHIR Patient ⇄ the matcher's PersonRecord, and identifier checks on every Patient write.

Why one mapping: `$match`, the write-time patient index, the exchange's receipt and
the CSV tools must all compare the same fields the same way.
"""

from __future__ import annotations

from typing import Any

from lienthong.fhir.outcome import OutcomeIssue
from lienthong.identity import identifiers as ids
from lienthong.identity.records import PersonRecord

_PARENT_CODES = {"FTH": "father_name", "MTH": "mother_name", "father": "father_name", "mother": "mother_name"}


def _name_text(name: dict[str, Any]) -> tuple[str | None, str | None, str | None]:
    family = name.get("family") if isinstance(name.get("family"), str) else None
    given = " ".join(g for g in name.get("given", []) if isinstance(g, str)) or None
    text = name.get("text") if isinstance(name.get("text"), str) else None
    return family, given, text


def _official_name(patient: dict[str, Any]) -> dict[str, Any]:
    names = [n for n in patient.get("name", []) if isinstance(n, dict)]
    for n in names:
        if n.get("use") == "official":
            return n
    return names[0] if names else {}


def to_person(patient: dict[str, Any], record_id: str | None = None) -> PersonRecord:
    """The matcher's view of a Patient resource."""
    family, given, text = _name_text(_official_name(patient))
    record = PersonRecord(record_id or str(patient.get("id", "")))
    record.family, record.given = family, given
    if not family and not given:
        record.full_name = text
    record.birth_date = patient.get("birthDate") if isinstance(patient.get("birthDate"), str) else None
    record.sex = patient.get("gender") if patient.get("gender") in ("male", "female") else None
    for tel in patient.get("telecom", []):
        if isinstance(tel, dict) and tel.get("system") in ("phone", "sms") and isinstance(tel.get("value"), str):
            record.phone = tel["value"]
            break
    addresses = [a for a in patient.get("address", []) if isinstance(a, dict)]
    home = next((a for a in addresses if a.get("use") == "home"), addresses[0] if addresses else None)
    if home:
        lines = [x for x in home.get("line", []) if isinstance(x, str)]
        record.address = ", ".join(lines) or (home.get("text") if isinstance(home.get("text"), str) else None)
        record.locality = home.get("city") if isinstance(home.get("city"), str) else None
        record.district = home.get("district") if isinstance(home.get("district"), str) else None
        record.province = home.get("state") if isinstance(home.get("state"), str) else None
        record.postcode = home.get("postalCode") if isinstance(home.get("postalCode"), str) else None
    for ident in patient.get("identifier", []):
        if not isinstance(ident, dict) or not isinstance(ident.get("value"), str):
            continue
        if _ended(ident):
            continue  # a cancelled number identifies the person through search, not through matching
        system, value = ident.get("system"), ident["value"]
        if system == ids.CCCD_SYSTEM:
            record.national_id = value
        elif system in (ids.BHYT_SYSTEM, ids.BHXH_SYSTEM) and not record.insurance_id:
            record.insurance_id = value
        elif record.other_id is None and system not in (ids.CCCD_SYSTEM,):
            record.other_id = f"{system}|{value}"
    for contact in patient.get("contact", []):
        if not isinstance(contact, dict):
            continue
        codes = {c.get("code") for rel in contact.get("relationship", []) if isinstance(rel, dict)
                 for c in rel.get("coding", []) if isinstance(c, dict)}
        fam, giv, txt = _name_text(contact.get("name") or {})
        full = " ".join(p for p in (fam, giv) if p) or txt
        for code in codes:
            if code in _PARENT_CODES and full:
                setattr(record, _PARENT_CODES[code], full)
    return record


def _ended(identifier: dict[str, Any]) -> bool:
    period = identifier.get("period")
    return identifier.get("use") == "old" or (isinstance(period, dict) and bool(period.get("end")))


def check_identifiers(resource: dict[str, Any]) -> list[OutcomeIssue]:
    """Reject malformed Vietnamese identifiers on Patient writes, with the reason; never store them as valid."""
    if resource.get("resourceType") != "Patient":
        return []
    issues: list[OutcomeIssue] = []
    birth = resource.get("birthDate")
    year = int(birth[:4]) if isinstance(birth, str) and birth[:4].isdigit() else None
    sex = resource.get("gender") if resource.get("gender") in ("male", "female") else None
    for i, ident in enumerate(resource.get("identifier", [])):
        if not isinstance(ident, dict) or not isinstance(ident.get("value"), str):
            continue
        system, value = ident.get("system"), ident["value"]
        where = f"Patient.identifier[{i}].value"
        try:
            if system == ids.CCCD_SYSTEM:
                # A cancelled number may predate today's rules for sex/century; check its shape only.
                ids.parse_cccd(value, sex=None if _ended(ident) else sex, birth_year=None if _ended(ident) else year)
            elif system == ids.CMND_SYSTEM:
                ids.parse_cmnd(value)
            elif system == ids.BHXH_SYSTEM:
                ids.parse_social_insurance(value)
            elif system == ids.BHYT_SYSTEM:
                ids.parse_bhyt(value)
            elif system == ids.PASSPORT_SYSTEM:
                ids.parse_passport(value)
            elif isinstance(system, str) and system.startswith(ids.MA_BN_SYSTEM_PREFIX):
                ids.parse_ma_bn(system[len(ids.MA_BN_SYSTEM_PREFIX):], value)
        except ids.IdentifierError as exc:
            issues.append(OutcomeIssue("error", "value", str(exc), (where,)))
    return issues
