"""The electronic transfer slip as a FHIR document, and the workflow resources around it.

Why a document Bundle: the receiving facility must get the record before or with
the patient, complete and signed; a FHIR `document` (Composition first, every
referenced resource inside) is self-contained, signable as one unit, and maps
item by item to the Circular 01/2025 transfer slip and the XML13 table
(MA_LYDO_CT, diagnoses, clinical signs, course, results, treatment, condition,
next treatment, transport and escort, the doctor's practising-licence code).
The workflow is a ServiceRequest (the order) and a Task (the closed status loop).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from html import escape
from typing import Any

from lienthong.fhir.datetimes import format_instant, now_us, parse_range
from lienthong.fhir.outcome import error

JSON = dict[str, Any]

SID = "https://lienthong.vn/fhir/sid"
CS = "https://lienthong.vn/fhir/CodeSystem"
EXT = "https://lienthong.vn/fhir/StructureDefinition"
FACILITY_SYSTEM = f"{SID}/facility"  # 5-digit facility code (MA_CSKCB)
LICENCE_SYSTEM = f"{SID}/practising-licence"  # doctor's practising-licence code (MA_BAC_SI)
PACKAGE_SYSTEM = f"{SID}/transfer-package"
TRANSFER_CODE = {"system": f"{CS}/exchange", "code": "transfer", "display": "Chuyển cơ sở KB,CB / Patient transfer"}
SLIP_TYPE = {"system": "http://loinc.org", "code": "18761-8", "display": "Transfer summary note"}

# MA_LYDO_CT (QĐ 3176, XML13): why the patient is transferred.
REASONS = {
    "1": "Đủ điều kiện chuyển tuyến / Meets the transfer conditions",
    "2": "Cơ sở không đáp ứng được nhu cầu điều trị / The facility cannot meet the treatment needs",
    "3": "Theo yêu cầu của người bệnh hoặc người đại diện / At the request of the patient or representative",
}
VALID_WORKING_DAYS = 10
CHRONIC_VALID_DAYS = 365

# The closed loop (IHE 360X style): the Task status and business status at each step.
STEPS = {
    "requested": ("requested", "Đã yêu cầu / Requested"),
    "delivered": ("requested", "Đã chuyển tới trạm / Delivered to the hub"),
    "received": ("received", "Nơi nhận đã nhận hồ sơ / Received by the destination"),
    "accepted": ("accepted", "Nơi nhận chấp nhận / Accepted"),
    "rejected": ("rejected", "Nơi nhận từ chối / Rejected"),
    "arrived": ("in-progress", "Bệnh nhân đã đến / Patient arrived"),
    "completed": ("completed", "Đã gửi kết quả điều trị / Outcome returned"),
}
# Rank of each step: a status only moves forward; a late message about an earlier step changes nothing.
RANK = {"requested": 0, "delivered": 1, "received": 2, "accepted": 3, "rejected": 3, "arrived": 4, "completed": 5}
TERMINAL = {"rejected", "completed"}

RECENT_OBSERVATIONS = 50
RECENT_REPORTS = 20


@dataclass
class TransferSlip:
    """What the clinician fills in (transfer slip, TT 01/2025 appendix VI; XML13)."""

    destination: str  # 5-digit facility code (MA_CSKCB_DEN)
    reason: str  # MA_LYDO_CT 1/2/3
    main_diagnosis: str  # ICD-10 (MA_BENH_CHINH)
    doctor_licence: str  # MA_BAC_SI
    secondary_diagnoses: list[str] = field(default_factory=list)  # MA_BENH_KT
    clinical_signs: str = ""  # DAU_HIEU_LS
    course: str = ""  # QT_BENHLY
    results_summary: str = ""  # TOMTAT_KQ
    treatment: str = ""  # PP_DIEUTRI
    condition: str = ""  # TINH_TRANG_CT
    next_treatment: str = ""  # HUONG_DIEU_TRI
    transport: str = ""  # PHUONGTIEN_VC
    escort_name: str = ""  # HOTEN_NGUOI_HT
    escort_title: str = ""  # CHUCDANH_NGUOI_HT
    patient_request: bool = False  # MA_LOAI_RV 5 instead of 2
    chronic: bool = False  # listed chronic disease: valid one year
    doctor_name: str = ""

    def check(self) -> None:
        if not (len(self.destination) == 5 and self.destination.isdigit()):
            raise error(400, "invalid", "Mã cơ sở nơi đến phải gồm 5 chữ số",
                        "The destination facility code must be 5 digits")
        if self.reason not in REASONS:
            raise error(400, "invalid", "Lý do chuyển (MA_LYDO_CT) phải là 1, 2 hoặc 3",
                        "The transfer reason (MA_LYDO_CT) must be 1, 2 or 3")
        for code in [self.main_diagnosis, *self.secondary_diagnoses]:
            if not _icd10(code):
                raise error(400, "invalid", f"Mã ICD-10 không hợp lệ '{code}'", f"Invalid ICD-10 code '{code}'")
        if len(self.secondary_diagnoses) > 12:
            raise error(400, "invalid", "Tối đa 12 bệnh kèm theo", "At most 12 secondary diagnoses")
        if not self.doctor_licence.strip():
            raise error(400, "required", "Thiếu mã chứng chỉ hành nghề của bác sĩ",
                        "The doctor's practising-licence code is required")


def _icd10(code: str) -> bool:
    import re

    return bool(re.fullmatch(r"[A-Z][0-9]{2}(\.?[0-9A-Z]{1,4})?", code.strip()))


def valid_until(signed: date, chronic: bool, holidays: frozenset[date] = frozenset()) -> date:
    """10 working days from signature (weekends and listed holidays skipped), or one year for chronic diseases."""
    if chronic:
        return signed + timedelta(days=CHRONIC_VALID_DAYS)
    day, counted = signed, 0
    while counted < VALID_WORKING_DAYS:
        day += timedelta(days=1)
        if day.weekday() < 5 and day not in holidays:
            counted += 1
    return day


def _div(text: str) -> JSON:
    body = "<br/>".join(escape(line) for line in text.strip().splitlines()) or "—"
    return {"status": "generated", "div": f'<div xmlns="http://www.w3.org/1999/xhtml">{body}</div>'}


def _section(title: str, code: str, text: str = "", entries: list[str] | None = None) -> JSON:
    section: JSON = {"title": title, "code": {"coding": [{"system": f"{CS}/transfer-section", "code": code}]},
                     "text": _div(text or "")}
    if entries:
        section["entry"] = [{"reference": ref} for ref in entries]
    return section


def _when(resource: JSON) -> int:
    for key in ("effectiveDateTime", "issued", "recordedDate", "authoredOn", "onsetDateTime", "performedDateTime",
                "started", "date"):
        value = resource.get(key)
        if isinstance(value, str):
            try:
                return parse_range(value)[0]
            except ValueError:
                return 0
    period = resource.get("period") or resource.get("effectivePeriod") or resource.get("performedPeriod")
    if isinstance(period, dict) and isinstance(period.get("start"), str):
        try:
            return parse_range(period["start"])[0]
        except ValueError:
            return 0
    return 0


def select_content(record: list[JSON]) -> list[JSON]:
    """What goes with the patient: the current encounter, active problems, recent results, medications,
    allergies and imaging; older history stays queryable on demand through the hub."""
    by_type: dict[str, list[JSON]] = {}
    for res in record:
        by_type.setdefault(res["resourceType"], []).append(res)
    out: list[JSON] = []
    encounters = sorted(by_type.get("Encounter", []), key=_when, reverse=True)
    out += encounters[:1]
    out += [c for c in by_type.get("Condition", [])
            if (c.get("clinicalStatus", {}).get("coding") or [{}])[0].get("code") in (None, "active", "recurrence",
                                                                                     "relapse")]
    out += sorted(by_type.get("Observation", []), key=_when, reverse=True)[:RECENT_OBSERVATIONS]
    out += sorted(by_type.get("DiagnosticReport", []), key=_when, reverse=True)[:RECENT_REPORTS]
    out += [m for m in by_type.get("MedicationRequest", []) if m.get("status") in ("active", "on-hold", "completed")]
    out += by_type.get("MedicationStatement", []) + by_type.get("AllergyIntolerance", [])
    out += by_type.get("ImagingStudy", []) + sorted(by_type.get("Procedure", []), key=_when, reverse=True)[:20]
    return out


def build_package(
    patient: JSON,
    record: list[JSON],
    slip: TransferSlip,
    sender: JSON,
    doctor: JSON | None,
    package_id: str | None = None,
    signed_at: datetime | None = None,
) -> JSON:
    """The transfer document Bundle. `record` holds the patient's resources (and what they reference)."""
    slip.check()
    signed_at = signed_at or datetime.now(UTC)
    package_id = package_id or str(uuid.uuid4())
    content = select_content(record)
    referenced = {f"{r['resourceType']}/{r['id']}" for r in content}
    support = [r for r in record if r["resourceType"] in ("Practitioner", "Organization", "Location", "Medication")
               and f"{r['resourceType']}/{r['id']}" not in referenced]
    ids: dict[str, str] = {}

    def urn(res: JSON) -> str:
        key = f"{res['resourceType']}/{res['id']}"
        if key not in ids:
            ids[key] = f"urn:uuid:{uuid.uuid4()}"
        return ids[key]

    patient_urn = urn(patient)
    sender_urn = urn(sender)
    doctor_urn = urn(doctor) if doctor else None
    for res in [*content, *support]:
        urn(res)
    encounter = next((r for r in content if r["resourceType"] == "Encounter"), None)
    conditions = [ids[f"Condition/{r['id']}"] for r in content if r["resourceType"] == "Condition"]
    results = [ids[f"{r['resourceType']}/{r['id']}"] for r in content if r["resourceType"] in ("Observation",
                                                                                            "DiagnosticReport")]
    meds = [ids[f"{r['resourceType']}/{r['id']}"] for r in content if r["resourceType"] in ("MedicationRequest",
                                                                                          "MedicationStatement")]
    allergies = [ids[f"AllergyIntolerance/{r['id']}"] for r in content if r["resourceType"] == "AllergyIntolerance"]
    imaging = [ids[f"ImagingStudy/{r['id']}"] for r in content if r["resourceType"] == "ImagingStudy"]
    procedures = [ids[f"Procedure/{r['id']}"] for r in content if r["resourceType"] == "Procedure"]

    until = valid_until(signed_at.date(), slip.chronic)
    stamp = format_instant(int(signed_at.timestamp() * 1_000_000))
    diag_codes = [{"system": "http://hl7.org/fhir/sid/icd-10", "code": slip.main_diagnosis}]
    service_request: JSON = {
        "resourceType": "ServiceRequest",
        "identifier": [{"system": PACKAGE_SYSTEM, "value": package_id}],
        "status": "active", "intent": "order",
        "category": [{"coding": [TRANSFER_CODE]}],
        "code": {"coding": [TRANSFER_CODE]},
        "subject": {"reference": patient_urn},
        "authoredOn": stamp,
        "occurrencePeriod": {"start": stamp, "end": until.isoformat()},
        "reasonCode": [{"coding": [{"system": f"{CS}/ma-lydo-ct", "code": slip.reason, "display": REASONS[slip.reason]}]},
                       {"coding": diag_codes}],
        "performer": [{"identifier": {"system": FACILITY_SYSTEM, "value": slip.destination}}],
        "requester": {"reference": doctor_urn} if doctor_urn else {"reference": sender_urn},
    }
    if encounter:
        service_request["encounter"] = {"reference": ids[f"Encounter/{encounter['id']}"]}
    sr_urn = f"urn:uuid:{uuid.uuid4()}"
    sections = [
        _section("Lý do chuyển / Reason for transfer", "reason",
                 f"MA_LYDO_CT {slip.reason}: {REASONS[slip.reason]}"),
        _section("Chẩn đoán / Diagnoses", "diagnoses",
                 f"{slip.main_diagnosis}; " + "; ".join(slip.secondary_diagnoses), conditions),
        _section("Dấu hiệu lâm sàng / Clinical signs", "clinical-signs", slip.clinical_signs),
        _section("Quá trình bệnh lý và diễn biến / Course of illness", "course", slip.course),
        _section("Tóm tắt kết quả cận lâm sàng / Results summary", "results", slip.results_summary, results),
        _section("Phương pháp, thủ thuật, thuốc đã dùng / Treatment given", "treatment", slip.treatment,
                 meds + procedures),
        _section("Tình trạng người bệnh lúc chuyển / Condition at transfer", "condition", slip.condition),
        _section("Hướng điều trị tiếp / Next treatment", "next-treatment", slip.next_treatment),
        _section("Phương tiện vận chuyển, người hộ tống / Transport and escort", "transport",
                 f"{slip.transport}\n{slip.escort_name} {('- ' + slip.escort_title) if slip.escort_title else ''}"),
        _section("Dị ứng / Allergies", "allergies", "" if allergies else "Không ghi nhận / None recorded", allergies),
    ]
    if imaging:
        sections.append(_section("Chẩn đoán hình ảnh / Imaging", "imaging", "", imaging))
    composition: JSON = {
        "resourceType": "Composition",
        "identifier": {"system": PACKAGE_SYSTEM, "value": package_id},
        "status": "final",
        "type": {"coding": [SLIP_TYPE]},
        "category": [{"coding": [TRANSFER_CODE]}],
        "subject": {"reference": patient_urn},
        "date": stamp,
        "author": [{"reference": doctor_urn}] if doctor_urn else [{"reference": sender_urn}],
        "title": "Giấy chuyển cơ sở khám bệnh, chữa bệnh / Transfer slip",
        "attester": [a for a in (
            {"mode": "legal", "time": stamp, "party": {"reference": doctor_urn}} if doctor_urn else None,
            {"mode": "official", "time": stamp, "party": {"reference": sender_urn}},
        ) if a],
        "custodian": {"reference": sender_urn},
        "event": [{"code": [{"coding": [TRANSFER_CODE]}], "period": {"start": stamp, "end": until.isoformat()}}],
        "extension": [
            {"url": f"{EXT}/ma-lydo-ct", "valueCode": slip.reason},
            {"url": f"{EXT}/ma-loai-rv", "valueCode": "5" if slip.patient_request else "2"},
            {"url": f"{EXT}/destination-facility", "valueIdentifier": {"system": FACILITY_SYSTEM,
                                                                       "value": slip.destination}},
            {"url": f"{EXT}/practising-licence", "valueIdentifier": {"system": LICENCE_SYSTEM,
                                                                     "value": slip.doctor_licence}},
        ],
        "section": sections,
    }
    if encounter:
        composition["encounter"] = {"reference": ids[f"Encounter/{encounter['id']}"]}
    entries = [{"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": composition},
               {"fullUrl": sr_urn, "resource": service_request}]
    for res in [patient, sender, *([doctor] if doctor else []), *content, *support]:
        entries.append({"fullUrl": ids[f"{res['resourceType']}/{res['id']}"], "resource": _relink(res, ids)})
    return {
        "resourceType": "Bundle",
        "identifier": {"system": PACKAGE_SYSTEM, "value": package_id},
        "type": "document",
        "timestamp": stamp,
        "entry": entries,
    }


def _relink(resource: JSON, ids: dict[str, str]) -> JSON:
    """Copy without meta/id, with references to packaged resources as urn:uuid; others become identifiers only."""
    import orjson

    raw = orjson.dumps({k: v for k, v in resource.items() if k not in ("meta", "id")})
    for key, urn_value in ids.items():
        raw = raw.replace(f'"reference":"{key}"'.encode(), f'"reference":"{urn_value}"'.encode())
    out: JSON = _drop_dangling(orjson.loads(raw))
    return out


def _drop_dangling(node: Any) -> Any:
    """References to resources not in the package cannot resolve at the receiver: keep their display only."""
    if isinstance(node, dict):
        ref = node.get("reference")
        if isinstance(ref, str) and not ref.startswith("urn:uuid:") and not ref.startswith("#"):
            kept = {k: _drop_dangling(v) for k, v in node.items() if k != "reference"}
            kept.setdefault("display", ref)
            return kept
        return {k: _drop_dangling(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_drop_dangling(v) for v in node]
    return node


def task_for(package_id: str, sender: str, destination: str, step: str = "requested", reason: str | None = None) -> JSON:
    """The Task both sides keep for one transfer; its status follows the closed loop."""
    status, label = STEPS[step]
    task: JSON = {
        "resourceType": "Task",
        "identifier": [{"system": PACKAGE_SYSTEM, "value": package_id}],
        "status": status,
        "businessStatus": {"coding": [{"system": f"{CS}/transfer-step", "code": step}], "text": label},
        "intent": "order",
        "code": {"coding": [TRANSFER_CODE]},
        "authoredOn": format_instant(now_us()),
        "lastModified": format_instant(now_us()),
        "requester": {"identifier": {"system": FACILITY_SYSTEM, "value": sender}},
        "owner": {"identifier": {"system": FACILITY_SYSTEM, "value": destination}},
    }
    if reason:
        task["statusReason"] = {"text": reason}
    return task


def advance(task: JSON, step: str, reason: str | None = None) -> JSON:
    """Move a transfer Task forward. Earlier or repeated steps are ignored (messages may cross on the
    network); moving on from a rejection, or arriving before acceptance, is refused."""
    current = step_of(task)
    if step not in STEPS:
        raise error(400, "invalid", f"Bước không hợp lệ '{step}'", f"Unknown transfer step '{step}'")
    if RANK[step] <= RANK[current]:
        return task
    if current in TERMINAL or (step in ("arrived", "completed") and current not in ("accepted", "arrived")):
        raise error(409, "business-rule", f"Không thể chuyển từ '{current}' sang '{step}'",
                    f"A transfer cannot go from '{current}' to '{step}'")
    status, label = STEPS[step]
    task = dict(task)
    task["status"] = status
    task["businessStatus"] = {"coding": [{"system": f"{CS}/transfer-step", "code": step}], "text": label}
    task["lastModified"] = format_instant(now_us())
    if reason:
        task["statusReason"] = {"text": reason}
    return task


def step_of(task: JSON) -> str:
    return str((task.get("businessStatus", {}).get("coding") or [{}])[0].get("code", "requested"))
