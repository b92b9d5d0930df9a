"""On-demand record queries between facilities through the hub (`Patient/$remote-everything`).

Real servers on 127.0.0.1: a hub and three facilities. A clinician at the provincial
hospital who is treating a patient asks Bạch Mai for that patient's record; the answer
is signed by Bạch Mai, nothing is imported, and the requester, the hub and Bạch Mai
each write an IHE BALP PatientQuery AuditEvent with the same request id.
"""

from __future__ import annotations

import base64
import hashlib
import random
import secrets
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from sqlalchemy import func, select

from lienthong.devtools import clinical
from lienthong.exchange.demo import HUB, Province, Unit, start_province
from lienthong.exchange.query import answers_bundle
from lienthong.exchange.service import record_location
from lienthong.fhir.outcome import FhirError
from lienthong.identity.identifiers import CCCD_SYSTEM
from lienthong.interactions.bundles import BundleProcessor
from lienthong.interactions.context import Context
from lienthong.security.audit import BALP_PATIENT_QUERY
from lienthong.security.policy import Principal
from lienthong.security.scopes import parse_scopes
from lienthong.storage import schema

JSON = dict[str, Any]
ASKER, HOLDER, OTHER = "24901", "01001", "24910"
UNITS = [(ASKER, "Bệnh viện Đa khoa tỉnh Bắc Giang"), (HOLDER, "Bệnh viện Bạch Mai"),
         (OTHER, "Trung tâm Y tế huyện Lục Ngạn")]
PASSWORD = "Mat-khau-2025!"


@pytest.fixture(scope="module")
def province(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Province]:
    p = start_province(tmp_path_factory.mktemp("query") / "province", units=UNITS, poll_seconds=0.05)
    yield p
    p.stop()


def _load(unit: Unit, patients: list[JSON], seed: int) -> str:
    """Each patient with a clinical record at `unit`; returns the attending doctor's local id."""
    rng = random.Random(seed)
    org, doctor = clinical.facility_resources(unit.code, unit.name)
    resources: list[JSON] = [org, doctor]
    for patient in patients:
        resources += [patient, *clinical.clinical_record(patient, rng, org, doctor)]
    BundleProcessor(unit.node.service).process(unit.exchange.system_context("seed"),
                                               clinical.as_transaction(resources))
    return str(doctor["id"])


def _same_people(n: int, seed: int) -> tuple[list[JSON], list[JSON]]:
    """The same people (each with a CCCD) at the asking and the holding facility, under different local ids."""
    pairs = [(a, b) for a, b in zip(clinical.pilot_patients(4 * n, ASKER, seed),
                                    clinical.pilot_patients(4 * n, HOLDER, seed), strict=True)
             if any(i["system"] == CCCD_SYSTEM for i in a["identifier"])][:n]
    assert len(pairs) == n
    return [a for a, _ in pairs], [b for _, b in pairs]


def _clinician(code: str, practitioner_id: str, actor: str = "bs.hoa") -> Context:
    scopes, _ = parse_scopes("user/*.rs")
    return Context(base_url="http://test/fhir", extra={"node": code},
                   principal=Principal("user", actor, f"id-{actor}", scopes, code, ("clinician",), practitioner_id))


def _events(unit: Unit) -> list[JSON]:
    trail = unit.node.service.guard.audit
    trail.flush()
    return [e for e in trail.events(limit=5000) if BALP_PATIENT_QUERY in e.get("meta", {}).get("profile", [])]


def _request_id(event: JSON) -> str:
    return next(e["what"]["identifier"]["value"] for e in event["entity"]
                if e["type"]["code"] == "XrequestId")


def _agent(event: JSON, dcm: str) -> str:
    return next(a["who"]["identifier"]["value"] for a in event["agent"]
                if a["type"]["coding"][0]["code"] == dcm)


def _count(unit: Unit) -> int:
    with unit.node.db.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(schema.resource)).scalar_one())


def test_treating_clinician_gets_the_record_and_all_three_sides_audit(province: Province) -> None:
    asker, holder, hub = province.units[ASKER], province.units[HOLDER], province.units[HUB[0]]
    here, there = _same_people(2, seed=11)
    doctor = _load(asker, here, 1)
    _load(holder, there, 2)
    before = _count(asker)

    answers = asker.exchange.queries.fetch(_clinician(ASKER, doctor), here[0]["id"], [HOLDER])

    assert [(a.facility, a.status) for a in answers] == [(HOLDER, 200)]
    bundle = answers[0].bundle
    assert bundle is not None and bundle["type"] == "searchset"
    patient = bundle["entry"][0]["resource"]
    assert patient["resourceType"] == "Patient" and patient["id"] == there[0]["id"]  # the holder's own ids
    with holder.node.db.read() as store:
        stored = store.current("Patient", there[0]["id"])
        assert stored is not None
        expected = {(s.rtype, s.rid) for s in holder.exchange.record_of(store, stored)}
    assert {(e["resource"]["resourceType"], e["resource"]["id"]) for e in bundle["entry"][1:]} == expected
    assert not any(e["resource"].get("id") == there[1]["id"] for e in bundle["entry"])  # only that patient
    assert _count(asker) == before  # shown to the clinician, not imported

    status, result = answers_bundle(answers)
    assert status == 200 and result["entry"][0]["resource"] == bundle

    client = [e for e in _events(asker) if e["outcome"] == "0"]
    assert len(client) == 1
    request_id = _request_id(client[0])
    assert _agent(client[0], "110153") == ASKER and _agent(client[0], "110152") == HOLDER
    assert any(a.get("requestor") and a["who"]["identifier"]["value"] == "bs.hoa" for a in client[0]["agent"])
    assert {"reference": f"Patient/{here[0]['id']}"} in [e.get("what") for e in client[0]["entity"]]
    relay = [e for e in _events(hub) if _request_id(e) == request_id]
    server = [e for e in _events(holder) if _request_id(e) == request_id]
    assert len(relay) == 1 and relay[0]["outcome"] == "0"
    assert len(server) == 1 and server[0]["outcome"] == "0"
    assert {"reference": f"Patient/{there[0]['id']}"} in [e.get("what") for e in server[0]["entity"]]
    user = next(a for a in server[0]["agent"] if a.get("requestor"))
    assert user["who"]["identifier"]["value"] == "bs.hoa"  # the remote person is named on the holder's side
    cccd = next(i["value"] for i in here[0]["identifier"] if i["system"] == CCCD_SYSTEM)
    assert {ASKER, HOLDER} <= set(hub.exchange.locate(CCCD_SYSTEM, cccd))  # the locator learnt who holds what
    for event in (client[0], relay[0], server[0]):
        assert event["subtype"][0]["code"] == "search"
        assert event["purposeOfEvent"][0]["coding"][0]["code"] == "TREAT"


def test_clinician_not_treating_the_patient_cannot_ask(province: Province) -> None:
    asker, hub = province.units[ASKER], province.units[HUB[0]]
    here, there = _same_people(1, seed=12)
    _load(asker, here, 3)
    _load(province.units[HOLDER], there, 4)
    relayed = len(_events(hub))
    with pytest.raises(FhirError) as caught:
        asker.exchange.queries.fetch(_clinician(ASKER, "someone-else", "bs.khac"), here[0]["id"], [HOLDER])
    assert caught.value.status == 404
    assert len(_events(hub)) == relayed  # nothing left the facility


def test_patient_unknown_at_the_holder_is_404_and_audited(province: Province) -> None:
    asker, holder = province.units[ASKER], province.units[HOLDER]
    here, _ = _same_people(1, seed=13)
    doctor = _load(asker, here, 5)
    answers = asker.exchange.queries.fetch(_clinician(ASKER, doctor), here[0]["id"], [HOLDER])
    assert [(a.status, a.error) for a in answers] == [(404, "patient-not-found")]
    status, result = answers_bundle(answers)
    assert status == 404 and result["entry"][0]["resource"]["resourceType"] == "OperationOutcome"
    refused = [e for e in _events(holder) if "patient-not-found" in e.get("outcomeDesc", "")]
    assert refused and refused[-1]["outcome"] == "4"


def test_suspended_facility_and_unreachable_holder_are_refused_with_reason(province: Province) -> None:
    asker, hub = province.units[ASKER], province.units[HUB[0]]
    here, there = _same_people(1, seed=14)
    doctor = _load(asker, here, 6)
    _load(province.units[OTHER], there, 7)
    ctx = _clinician(ASKER, doctor)
    hub.exchange.registry.set_clearance(OTHER, "suspended", None, "CV 45/CA-PA05")
    try:
        answers = asker.exchange.queries.fetch(ctx, here[0]["id"], [OTHER])
        assert [(a.status, a.error) for a in answers] == [(403, "destination-not-cleared")]
        assert answers_bundle(answers)[0] == 403
    finally:
        hub.exchange.registry.set_clearance(OTHER, "cleared", "2026-11-27", "CV 46/CA-PA05")
    province.stop_unit(OTHER)
    try:
        started = time.monotonic()
        answers = asker.exchange.queries.fetch(ctx, here[0]["id"], [OTHER])
        assert time.monotonic() - started < 60
        assert [a.status for a in answers] == [504]
        assert answers_bundle(answers)[0] == 502
        assert any(e["outcome"] == "8" and "unreachable" in e.get("outcomeDesc", "") for e in _events(hub))
    finally:
        province.start_unit(OTHER)
    answers = asker.exchange.queries.fetch(ctx, here[0]["id"], [OTHER])
    assert [a.status for a in answers] == [200]


def test_locator_chooses_the_facilities_and_http_operation_works(province: Province) -> None:
    asker, holder, hub = province.units[ASKER], province.units[HOLDER], province.units[HUB[0]]
    here, there = _same_people(1, seed=15)
    doctor = _load(asker, here, 8)
    _load(holder, there, 9)
    system, value = next((i["system"], i["value"]) for i in here[0]["identifier"] if i["system"] == CCCD_SYSTEM)
    with hub.node.db.engine.begin() as conn:  # what the hub learnt from an earlier transfer
        conn.execute(record_location.insert().values(system=system, value=value, facility=HOLDER, updated="1"))
    asker.node.accounts.add_user("bs.lan", PASSWORD, "clinician", ASKER, practitioner_id=doctor)
    token = _login(asker.base)
    with httpx.Client(base_url=asker.base, timeout=60) as http:
        headers = {"Authorization": f"Bearer {token}"}
        r = http.get(f"/fhir/Patient/{here[0]['id']}/$remote-everything", headers=headers)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["resourceType"] == "Bundle" and body["type"] == "collection"
        remote = body["entry"][0]["resource"]
        assert remote["meta"]["source"] == f"urn:lienthong:facility:{HOLDER}"
        assert remote["entry"][0]["resource"]["id"] == there[0]["id"]
        bad = http.get(f"/fhir/Patient/{here[0]['id']}/$remote-everything?facility=12AB", headers=headers)
        assert bad.status_code == 400 and bad.json()["resourceType"] == "OperationOutcome"
        bad = http.get(f"/fhir/Patient/{here[0]['id']}/$remote-everything?purpose=HMARKT", headers=headers)
        assert bad.status_code == 400 and bad.json()["resourceType"] == "OperationOutcome"
        anonymous = http.get(f"/fhir/Patient/{here[0]['id']}/$remote-everything")
        assert anonymous.status_code == 401
        capability = http.get("/fhir/metadata").json()  # the statement tells what this node really serves
        patient_ops = {o["name"] for r in capability["rest"][0]["resource"] if r["type"] == "Patient"
                       for o in r.get("operation", [])}
        assert {"everything", "remote-everything", "transfer", "match", "merge", "unmerge"} <= patient_ops
        assert "mpi-review" in {o["name"] for o in capability["rest"][0]["operation"]}
    with httpx.Client(base_url=hub.base, timeout=60) as http:  # the hub relays queries; it does not ask them
        hub_ops = {o["name"] for r in http.get("/fhir/metadata").json()["rest"][0]["resource"]
                   if r["type"] == "Patient" for o in r.get("operation", [])}
        assert "remote-everything" not in hub_ops and "everything" in hub_ops


def test_forged_and_replayed_queries_are_refused(province: Province) -> None:
    from lienthong.exchange.query import RecordQuery
    from lienthong.exchange.trust import seal_package

    asker, holder, hub = province.units[ASKER], province.units[HOLDER], province.units[HUB[0]]
    _, there = _same_people(1, seed=16)
    _load(holder, there, 10)
    ident = next((i["system"], i["value"]) for i in there[0]["identifier"] if i["system"] == CCCD_SYSTEM)
    query = RecordQuery("q-forged-0001", OTHER, HOLDER, ident[0], ident[1], "mallory")
    sealed = seal_package(query.to_bytes(), asker.exchange.keys)  # signed by 24901, claiming to be 24910
    status, body, _ = hub.exchange.queries.relay(ASKER, query.query_id, sealed)
    assert status == 400 and b"query-mismatch" in body
    # Straight to the holder, not through the hub: refused.
    status, _, _ = holder.exchange.queries.answer(ASKER, query.query_id, sealed)
    assert status == 403
    honest = RecordQuery("q-replay-0001", ASKER, HOLDER, ident[0], ident[1], "bs.hoa")
    sealed = seal_package(honest.to_bytes(), asker.exchange.keys)
    assert holder.exchange.queries.answer(HUB[0], honest.query_id, sealed)[0] == 200
    assert holder.exchange.queries.answer(HUB[0], honest.query_id, sealed)[0] == 409


def _login(base: str) -> str:
    """Authorization code with PKCE against the node's real endpoints."""
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    with httpx.Client(base_url=base, timeout=30) as http:
        r = http.post("/auth/authorize", data={
            "response_type": "code", "client_id": "lienthong-web", "redirect_uri": "/ui/callback", "state": "s",
            "code_challenge": challenge, "code_challenge_method": "S256", "username": "bs.lan",
            "password": PASSWORD})
        assert r.status_code == 302, r.text
        code = parse_qs(urlsplit(r.headers["location"]).query)["code"][0]
        r = http.post("/auth/token", data={"grant_type": "authorization_code", "code": code, "code_verifier": verifier,
                                           "redirect_uri": "/ui/callback", "client_id": "lienthong-web"})
        assert r.status_code == 200, r.text
        return str(r.json()["access_token"])
