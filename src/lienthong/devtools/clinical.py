"""Realistic synthetic clinical records for Vietnamese patients (demo, tests, benchmarks).

Why: the pilot scenario moves 304 inpatients from a provincial general hospital to
Bạch Mai; each needs a believable record (an admission, ICD-10 diagnoses that
justify a transfer, vital signs and labs with LOINC codes, medications, allergies,
sometimes imaging), generated deterministically from a seed, with no real data.
"""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from lienthong.identity.identifiers import BHYT_SYSTEM, CCCD_SYSTEM, ma_bn_system
from lienthong.identity.normalize import parse_date
from lienthong.identity.synth import generate

JSON = dict[str, Any]
ICD10 = "http://hl7.org/fhir/sid/icd-10"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"

# Conditions that commonly lead a provincial hospital to transfer a patient to a central one.
TRANSFER_CASES = [
    ("I21.0", "Nhồi máu cơ tim cấp thành trước", ["I10", "E11.9"], "Đau ngực dữ dội, vã mồ hôi, điện tim ST chênh lên"),
    ("I63.9", "Nhồi máu não", ["I10"], "Liệt nửa người phải, nói khó, khởi phát 3 giờ"),
    ("C34.1", "U ác thùy trên phổi", ["J44.9"], "Ho ra máu, sút cân, u phổi trên CT"),
    ("N18.5", "Bệnh thận mạn giai đoạn 5", ["I12.0", "D63.8"], "Phù, thiếu máu, creatinin tăng cao"),
    ("K85.9", "Viêm tụy cấp", ["K80.2"], "Đau thượng vị dữ dội, amylase tăng"),
    ("S06.5", "Chấn thương sọ não, tụ máu dưới màng cứng", [], "Lơ mơ sau tai nạn giao thông, Glasgow 11 điểm"),
    ("J18.9", "Viêm phổi nặng", ["J96.0"], "Sốt cao, khó thở, SpO2 86%"),
    ("C22.0", "Ung thư biểu mô tế bào gan", ["B18.1", "K74.6"], "Đau hạ sườn phải, AFP tăng"),
]
VITALS = [("8867-4", "Heart rate", "/min", 60, 130), ("8480-6", "Systolic blood pressure", "mm[Hg]", 90, 190),
          ("8462-4", "Diastolic blood pressure", "mm[Hg]", 50, 110), ("8310-5", "Body temperature", "Cel", 36, 40),
          ("59408-5", "Oxygen saturation in Arterial blood by Pulse oximetry", "%", 84, 99)]
LABS = [("2160-0", "Creatinine [Mass/volume] in Serum or Plasma", "umol/L", 50, 900),
        ("718-7", "Hemoglobin [Mass/volume] in Blood", "g/L", 70, 160),
        ("2345-7", "Glucose [Mass/volume] in Serum or Plasma", "mmol/L", 4, 20),
        ("6690-2", "Leukocytes [#/volume] in Blood by Automated count", "10*9/L", 4, 25)]
MEDICATIONS = ["Aspirin 81 mg", "Clopidogrel 75 mg", "Ceftriaxone 1 g", "Omeprazole 40 mg", "Furosemide 40 mg",
               "Insulin glargine 10 đơn vị", "Paracetamol 500 mg", "Enoxaparin 40 mg"]


def _id() -> str:
    return str(uuid.uuid4())


def _ref(res: JSON) -> dict[str, str]:
    return {"reference": f"{res['resourceType']}/{res['id']}"}


def _iso(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%S+07:00")


def patient_resource(record: Any, facility: str, index: int) -> JSON:
    """A FHIR Patient from a synthetic person record, with CCCD, BHYT and the facility's patient code."""
    identifiers = [{"system": ma_bn_system(facility), "value": f"BN{index:07d}"}]
    if record.national_id:
        identifiers.append({"system": CCCD_SYSTEM, "value": record.national_id})
    if record.insurance_id and len(record.insurance_id) == 15:
        identifiers.append({"system": BHYT_SYSTEM, "value": record.insurance_id})
    patient: JSON = {"resourceType": "Patient", "id": _id(), "identifier": identifiers,
                     "name": [{"use": "official", "family": record.family or "Nguyễn",
                               "given": (record.given or "An").split()}]}
    if record.sex in ("male", "female"):
        patient["gender"] = record.sex
    birth = parse_date(record.birth_date)
    if birth is not None and birth.is_valid:
        patient["birthDate"] = birth.isoformat()
    if record.phone:
        patient["telecom"] = [{"system": "phone", "value": record.phone, "use": "mobile"}]
    address = {k: v for k, v in (("line", [record.address] if record.address else None), ("city", record.locality),
                                 ("district", record.district), ("state", record.province)) if v}
    if address:
        patient["address"] = [{"use": "home", **address, "country": "VN"}]
    return patient


def clinical_record(patient: JSON, rng: random.Random, organization: JSON, practitioner: JSON,
                    now: datetime | None = None) -> list[JSON]:
    """An inpatient episode that ends in a transfer: encounter, diagnoses, vitals, labs, meds, allergy, imaging."""
    now = now or datetime.now(UTC)
    main, main_text, secondary, signs = rng.choice(TRANSFER_CASES)
    start = now - timedelta(days=rng.randint(1, 6), hours=rng.randint(0, 20))
    subject = _ref(patient)
    encounter = {"resourceType": "Encounter", "id": _id(), "status": "in-progress",
                 "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP",
                           "display": "inpatient encounter"},
                 "subject": subject, "period": {"start": _iso(start)},
                 "participant": [{"individual": _ref(practitioner)}], "serviceProvider": _ref(organization),
                 "reasonCode": [{"coding": [{"system": ICD10, "code": main, "display": main_text}]}]}
    out: list[JSON] = [encounter]
    for code, text in [(main, main_text), *[(c, None) for c in secondary]]:
        cond: JSON = {"resourceType": "Condition", "id": _id(),
                      "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                                     "code": "active"}]},
                      "verificationStatus": {"coding": [{"system":
                                                         "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                                                         "code": "confirmed"}]},
                      "code": {"coding": [{"system": ICD10, "code": code, **({"display": text} if text else {})}]},
                      "subject": subject, "encounter": _ref(encounter), "recordedDate": _iso(start)}
        out.append(cond)
    for day in range(3):
        when = _iso(start + timedelta(hours=8 + 24 * day))
        for code, display, unit, lo, hi in VITALS:
            out.append(_observation(subject, encounter, "vital-signs", code, display, unit, rng.uniform(lo, hi), when))
    lab_refs = []
    for code, display, unit, lo, hi in LABS:
        obs = _observation(subject, encounter, "laboratory", code, display, unit, rng.uniform(lo, hi), _iso(start))
        out.append(obs)
        lab_refs.append(_ref(obs))
    out.append({"resourceType": "DiagnosticReport", "id": _id(), "status": "final",
                "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "LAB"}]}],
                "code": {"coding": [{"system": LOINC, "code": "24323-8", "display": "Comprehensive metabolic panel"}]},
                "subject": subject, "encounter": _ref(encounter), "effectiveDateTime": _iso(start),
                "result": lab_refs, "conclusion": signs})
    for med in rng.sample(MEDICATIONS, 3):
        out.append({"resourceType": "MedicationRequest", "id": _id(), "status": "active", "intent": "order",
                    "medicationCodeableConcept": {"text": med}, "subject": subject, "encounter": _ref(encounter),
                    "authoredOn": _iso(start), "requester": _ref(practitioner),
                    "dosageInstruction": [{"text": "Theo y lệnh / as ordered"}]})
    if rng.random() < 0.3:
        out.append({"resourceType": "AllergyIntolerance", "id": _id(),
                    "clinicalStatus": {"coding": [{"system":
                                                   "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical",
                                                   "code": "active"}]},
                    "code": {"text": rng.choice(["Penicillin", "Sulfonamide", "Hải sản / seafood"])},
                    "patient": subject})
    if rng.random() < 0.5:
        out.append({"resourceType": "ImagingStudy", "id": _id(), "status": "available", "subject": subject,
                    "encounter": _ref(encounter), "started": _iso(start),
                    "modality": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CT"}],
                    "numberOfSeries": 1, "numberOfInstances": rng.randint(40, 300),
                    "description": "CT scan", "identifier": [{"system": "urn:dicom:uid",
                                                               "value": f"urn:oid:2.25.{rng.getrandbits(96)}"}]})
    return out


def _observation(subject: dict[str, str], encounter: JSON, category: str, code: str, display: str, unit: str,
                 value: float, when: str) -> JSON:
    return {"resourceType": "Observation", "id": _id(), "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                      "code": category}]}],
            "code": {"coding": [{"system": LOINC, "code": code, "display": display}]},
            "subject": subject, "encounter": _ref(encounter), "effectiveDateTime": when,
            "valueQuantity": {"value": round(value, 1), "unit": unit, "system": UCUM, "code": unit}}


def facility_resources(code: str, name: str) -> tuple[JSON, JSON]:
    """The facility's Organization and one attending doctor with a practising-licence number."""
    org = {"resourceType": "Organization", "id": _id(), "active": True, "name": name,
           "identifier": [{"system": "https://lienthong.vn/fhir/sid/facility", "value": code}]}
    doctor = {"resourceType": "Practitioner", "id": _id(), "active": True,
              "name": [{"family": "Phạm", "given": ["Minh", "Đức"], "prefix": ["BS."]}],
              "identifier": [{"system": "https://lienthong.vn/fhir/sid/practising-licence", "value": f"{code}/CCHN-0001"}]}
    return org, doctor


def pilot_patients(n: int, facility: str, seed: int = 304) -> list[JSON]:
    """`n` distinct synthetic patients (originals only) as FHIR Patients."""
    people = [r for r in generate(n * 2, seed, duplicate_rate=0.0, twin_rate=0.0, namesake_rate=0.0)][:n]
    return [patient_resource(p.record, facility, i + 1) for i, p in enumerate(people)]


def as_transaction(resources: list[JSON]) -> JSON:
    """PUT each resource by id: idempotent, keeps the references between them."""
    return {"resourceType": "Bundle", "type": "transaction",
            "entry": [{"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
                      for r in resources]}
