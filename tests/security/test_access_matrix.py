"""The access-control matrix: roles x facilities x interactions x time windows x break-the-glass.

Every answer is checked against the leak oracle of the seed (conftest.World): a returned
Type/id must be one the principal may see, and where the whole answer is predictable it must
equal what the principal may see. The refusal rule (security/policy.py): 401 without a valid
identity, 403 when the caller may not perform the interaction at all (scope, role, window),
404 when the resource exists but lies outside the caller's patients.

Known bugs are marked `xfail(strict=True)` with the cause; see the report in the issue.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import update

from security.conftest import (
    ACTORS,
    BTG_REASON,
    FAC1,
    FAC2,
    PASSWORD,
    World,
    add_user,
    all_pages,
    assert_outcome,
    authorize,
    bearer,
    keys_of,
    login,
    observation,
    run_export,
    wait_for_events,
    window_excluding_now,
    window_including_now,
)

JSON = dict[str, Any]
PATCH = {"Content-Type": "application/json-patch+json"}

# What each actor may do at all: the role's letters narrowed by the token's scopes.
LETTERS = {
    "clinician": "cruds", "nurse": "crus", "records-officer": "cruds", "facility-admin": "rs",
    "province-admin": "", "auditor": "", "btg-clinician": "cruds",
    "system-facility": "cruds", "system-other": "cruds", "system-global": "cruds", "system-readonly": "rs",
}
BULK_EXPORT = {"records-officer", "facility-admin", "system-facility", "system-other", "system-global",
               "system-readonly"}
REFUSED = {"province-admin", "auditor"}
# Representative resources: visible, same facility outside the care team, other facility, public.
READ_KEYS = [("Patient", "p1a"), ("Patient", "p1c"), ("Patient", "p2a"), ("Observation", "obs-1a"),
             ("Observation", "obs-2a"), ("Encounter", "enc-1b"), ("Condition", "cond-2a"),
             ("MedicationRequest", "mr-2a"), ("Medication", "med-secret"), ("Organization", "org-24002")]
SEARCH_TYPES = ["Patient", "Observation", "Encounter", "Condition", "MedicationRequest", "Medication",
                "Practitioner", "Organization"]
EXPORT_TYPES = "Patient,Observation,Encounter,Condition,MedicationRequest,Medication,Practitioner,Organization"
COMPARTMENT = {"Patient", "Observation", "Encounter", "Condition", "MedicationRequest"}


def expected_read(w: World, actor: str, key: tuple[str, str]) -> int:
    if w.actors[actor].refused:
        return 403
    return 200 if w.may_see(actor, key) else 404


def facility_client(w: World, patient: str) -> str:
    return "system-other" if w.facility_of[patient] == FAC2 else "system-facility"


def new_observation(w: World, patient: str, value: float = 6.6) -> str:
    """An Observation made by the patient's own facility, for a test to change or delete."""
    body = observation("x", patient, value)
    del body["id"]
    r = w.http.post("/fhir/Observation", json=body, headers=w.h(facility_client(w, patient)))
    assert r.status_code == 201, r.text
    rid: str = r.json()["id"]
    w.track("Observation", rid, patient)
    return rid


# ---- read, vread --------------------------------------------------------------------------------
@pytest.mark.parametrize("actor", ACTORS)
def test_read_and_vread(world: World, actor: str) -> None:
    wrong = []
    for rtype, rid in READ_KEYS:
        want = expected_read(world, actor, (rtype, rid))
        for url in (f"/fhir/{rtype}/{rid}", f"/fhir/{rtype}/{rid}/_history/1"):
            r = world.http.get(url, headers=world.h(actor))
            if r.status_code != want:
                wrong.append(f"{url}: {r.status_code} (expected {want})")
            elif want == 200:
                assert r.json()["id"] == rid
            else:
                assert_outcome(r, want)
    assert not wrong, f"{actor}: " + "; ".join(wrong)


# ---- search, totals, paging -------------------------------------------------------------------------
@pytest.mark.parametrize("actor", ACTORS)
def test_search_returns_exactly_what_the_actor_may_see(world: World, actor: str) -> None:
    for rtype in SEARCH_TYPES:
        r = world.http.get(f"/fhir/{rtype}?_count=200", headers=world.h(actor))
        if world.actors[actor].refused:
            assert_outcome(r, 403, "forbidden")
            continue
        assert r.status_code == 200, r.text
        got = keys_of(r.json())
        assert not world.leaks(actor, got), f"{actor} {rtype}: leaked {world.leaks(actor, got)}"
        assert set(got) == world.allowed(actor, {rtype}), rtype
        assert r.json()["total"] == len(got)


@pytest.mark.parametrize("actor", [a for a in ACTORS if a not in REFUSED])
def test_summary_count_and_paging_totals_count_only_visible(world: World, actor: str) -> None:
    for rtype in ("Patient", "Observation"):
        allowed = world.allowed(actor, {rtype})
        for query in ("_summary=count", "_count=0", "_total=accurate&_count=1"):
            r = world.http.get(f"/fhir/{rtype}?{query}", headers=world.h(actor))
            assert r.status_code == 200, r.text
            assert r.json()["total"] == len(allowed), (rtype, query)
        keys, pages = all_pages(world.http, f"/fhir/{rtype}?_count={1 if rtype == 'Patient' else 4}",
                                world.h(actor))
        assert set(keys) == allowed and len(keys) == len(allowed), rtype
        assert all(p.get("total", len(allowed)) == len(allowed) for p in pages), [p.get("total") for p in pages]


@pytest.mark.parametrize("other", ["clinician", "system-other"])
def test_paging_links_are_bound_to_their_owner(world: World, other: str) -> None:
    r = world.http.get("/fhir/Patient?_count=1", headers=world.h("records-officer"))
    link = next(link["url"] for link in r.json()["link"] if link["relation"] == "next")
    path = link.split("testserver", 1)[1]
    r = world.http.get(path, headers=world.h(other))
    if r.status_code == 200:
        assert not world.leaks(other, keys_of(r.json()))
    assert r.status_code in (404, 410) or r.json().get("total", 0) <= len(world.allowed(other, {"Patient"})), \
        f"{other} learns the records officer's total {r.json().get('total')}"


# ---- result shaping: _include, _revinclude, :iterate, chains, _has -----------------------------------
SHAPING = {
    "include-subject": "/fhir/Observation?_include=Observation:subject",
    "include-derived-from": "/fhir/Observation?_include=Observation:derived-from",
    "include-iterate": "/fhir/MedicationRequest?_include=MedicationRequest:subject"
                       "&_include:iterate=Patient:general-practitioner&_include=MedicationRequest:medication",
    "revinclude": "/fhir/Patient?_revinclude=Observation:subject&_revinclude=Encounter:subject",
    "revinclude-iterate": "/fhir/Patient?_id=p1a&_revinclude=Observation:subject"
                          "&_revinclude:iterate=Observation:derived-from",
    "revinclude-practitioner": "/fhir/Practitioner?_revinclude=Encounter:participant",
    "revinclude-medication": "/fhir/Medication?_revinclude=MedicationRequest:medication",
    "chain-name": "/fhir/Observation?subject:Patient.name=Trần",
    "chain-family": "/fhir/Encounter?subject:Patient.family=Trần",
    "chain-id": "/fhir/Condition?subject:Patient._id=p2a",
    "has-patient": "/fhir/Patient?_has:Observation:subject:code=2339-0",
    "has-patient-other": "/fhir/Patient?_has:Condition:subject:code=B20",
    "reference-other": "/fhir/Observation?subject=Patient/p2a",
    "system-search": "/fhir?_type=Patient,Observation",
    "post-search": "POST /fhir/Observation/_search",
}
# Where the answer is fully predictable: expected = the seed resources of these types the actor may see.
def _of_patients(w: World, actor: str, rtype: str, patients: set[str]) -> set[tuple[str, str]]:
    return {k for k in w.allowed(actor, {rtype}) if w.owner[k] in patients}


EXPECT_EQUAL = {
    "chain-name": lambda w, a: _of_patients(w, a, "Observation", {"p2a", "p2b"}),
    "chain-id": lambda w, a: _of_patients(w, a, "Condition", {"p2a"}),
    "has-patient-other": lambda w, a: _of_patients(w, a, "Patient", {"p2a"}),
    "reference-other": lambda w, a: _of_patients(w, a, "Observation", {"p2a"}),
}


@pytest.mark.parametrize("probe", sorted(SHAPING))
@pytest.mark.parametrize("actor", ACTORS)
def test_result_shaping_never_leaks(world: World, actor: str, probe: str) -> None:
    url = SHAPING[probe]
    url += ("&" if "?" in url else "?") + "_count=500"
    if url.startswith("POST "):
        r = world.http.post(url[5:].split("?")[0], data={"_count": "200", "_include": "Observation:subject"},
                            headers=world.h(actor))
    else:
        r = world.http.get(url, headers=world.h(actor))
    if world.actors[actor].refused:
        assert_outcome(r, 403)
        return
    assert r.status_code == 200, r.text
    got = keys_of(r.json())
    assert not world.leaks(actor, got), f"{actor} {probe}: leaked {sorted(world.leaks(actor, got))}"
    if probe in EXPECT_EQUAL:
        assert set(got) == EXPECT_EQUAL[probe](world, actor)
    matches = [e for e in r.json().get("entry", []) if e.get("search", {}).get("mode") == "match"]
    assert r.json().get("total", len(matches)) == len(matches), probe


HAS_LEAKS = {
    # A Medication prescribed only to p2a (facility 24002): finding it reveals p2a's treatment.
    "medication-of-other-patient": ("/fhir/Medication?_has:MedicationRequest:medication:subject=Patient/p2a",
                                    ("Medication", "med-secret")),
    # Which practitioner treated p2a, through Encounters the caller may not see.
    "practitioner-of-other-patient": ("/fhir/Practitioner?_has:Encounter:participant:patient=Patient/p2a",
                                      ("Practitioner", "prac-cuong")),
    "medication-by-chained-name": ("/fhir/Medication?_has:MedicationRequest:medication:subject.name=Dung",
                                   ("Medication", "med-secret")),
}


@pytest.mark.parametrize("probe", sorted(HAS_LEAKS))
@pytest.mark.parametrize("actor", ["clinician", "records-officer", "system-facility"])
def test_has_on_public_types_does_not_reveal_invisible_patients(world: World, actor: str, probe: str) -> None:
    url, secret = HAS_LEAKS[probe]
    r = world.http.get(url, headers=world.h(actor))
    assert r.status_code == 200, r.text
    assert secret not in keys_of(r.json()), f"{actor} learns {secret} through {url}"


def test_has_control_the_owner_sees_the_medication(world: World) -> None:
    url, secret = HAS_LEAKS["medication-of-other-patient"]
    r = world.http.get(url, headers=world.h("system-other"))
    assert secret in keys_of(r.json())


# ---- history --------------------------------------------------------------------------------------
@pytest.mark.parametrize("actor", ACTORS)
def test_history_instance_type_system(world: World, actor: str) -> None:
    h = world.h(actor)
    for rtype, rid in [("Patient", "p1a"), ("Patient", "p1c"), ("Patient", "p2a"), ("Observation", "obs-2a"),
                       ("Medication", "med-secret")]:
        r = world.http.get(f"/fhir/{rtype}/{rid}/_history", headers=h)
        want = expected_read(world, actor, (rtype, rid))
        if want != 200:
            assert_outcome(r, want)
            continue
        assert r.status_code == 200, r.text
        assert set(keys_of(r.json())) == {(rtype, rid)}
    for url in ("/fhir/Observation/_history?_count=1000", "/fhir/Patient/_history?_count=1000",
                "/fhir/_history?_count=1000"):
        r = world.http.get(url, headers=h)
        if world.actors[actor].refused:
            assert_outcome(r, 403)
            continue
        assert r.status_code == 200, r.text
        got = keys_of(r.json())
        assert not world.leaks(actor, got), f"{url}: leaked {world.leaks(actor, got)}"
        assert r.json()["total"] == len(r.json()["entry"]), f"{url}: total counts invisible versions"
        if url.startswith("/fhir/Patient"):
            assert {k for k in got} == world.allowed(actor, {"Patient"}, deleted=True)


# ---- writes ---------------------------------------------------------------------------------------
CARE_TEAM_ACTORS = ("clinician", "nurse", "btg-clinician")
WHERE = {  # actor facility -> where -> patient
    FAC1: {"own": "p1a", "outside-care-team": "p1c", "other": "p2a"},
    FAC2: {"own": "p2a", "outside-care-team": "p2b", "other": "p1a"},
    None: {"own": "p1a", "outside-care-team": "p1c", "other": "p2a"},
}
SEED_OBSERVATION = {"p1a": "obs-1a", "p1c": "obs-1c", "p2a": "obs-2a", "p2b": "obs-2b"}
WRITE_CASES = [(a, i, w) for a in ACTORS for i in ("create", "update", "patch", "delete")
               for w in (("own", "outside-care-team", "other") if a in CARE_TEAM_ACTORS else ("own", "other"))]


def write_succeeds(world: World, actor: str, interaction: str, patient: str) -> bool:
    """Create needs the patient in the actor's facility; update, patch and delete also need to see it."""
    a = world.actors[actor]
    letter = {"create": "c", "update": "u", "patch": "u", "delete": "d"}[interaction]
    in_facility = a.facility is None or world.facility_of[patient] == a.facility
    if letter not in LETTERS[actor] or not in_facility:
        return False
    return interaction == "create" or world.may_see(actor, ("Patient", patient))


@pytest.mark.parametrize(("actor", "interaction", "where"), WRITE_CASES)
def test_write_matrix(world: World, actor: str, interaction: str, where: str) -> None:
    patient = WHERE[world.actors[actor].facility][where]
    letter = {"create": "c", "update": "u", "patch": "u", "delete": "d"}[interaction]
    succeeds = write_succeeds(world, actor, interaction, patient)
    target = None
    if interaction != "create":  # refused writes aim at seed data, which must stay at version 1
        target = new_observation(world, patient) if succeeds else SEED_OBSERVATION[patient]
    h = world.h(actor)
    if interaction == "create":
        body = observation("x", patient, 7.7)
        del body["id"]
        r = world.http.post("/fhir/Observation", json=body, headers=h)
    elif interaction == "update":
        r = world.http.put(f"/fhir/Observation/{target}", json=observation(str(target), patient, 8.1), headers=h)
    elif interaction == "patch":
        ops = [{"op": "replace", "path": "/valueQuantity/value", "value": 8.2}]
        r = world.http.patch(f"/fhir/Observation/{target}", json=ops, headers={**h, **PATCH})
    else:
        r = world.http.delete(f"/fhir/Observation/{target}", headers=h)
    if letter not in LETTERS[actor]:
        assert_outcome(r, 403, "forbidden")
    elif not succeeds:
        assert_outcome(r, 404, "not-found")
    else:
        assert r.status_code in (200, 201), r.text
        if interaction == "create":
            world.track("Observation", r.json()["id"], patient)
        if interaction == "delete":
            world.deleted.add(("Observation", str(target)))
        return
    if target is not None:  # a refused write changed nothing
        check = world.http.get(f"/fhir/Observation/{target}", headers=world.h("system-global"))
        assert check.status_code == 200 and check.json()["meta"]["versionId"] == "1", check.text


@pytest.mark.parametrize("actor", ["records-officer", "system-facility", "clinician"])
def test_create_about_a_patient_of_another_facility_is_404(world: World, actor: str) -> None:
    for rtype, body in [("Condition", {"resourceType": "Condition", "subject": {"reference": "Patient/p2a"},
                                       "code": {"text": "x"}}),
                        ("Encounter", {"resourceType": "Encounter", "status": "planned",
                                       "class": {"code": "AMB"}, "subject": {"reference": "Patient/p2b"}})]:
        r = world.http.post(f"/fhir/{rtype}", json=body, headers=world.h(actor))
        assert_outcome(r, 404)
    r = world.http.put("/fhir/Patient/p2a", json={"resourceType": "Patient", "id": "p2a", "gender": "other"},
                       headers=world.h(actor))
    assert_outcome(r, 404)


@pytest.mark.parametrize("actor", ["system-facility", "records-officer"])
def test_conditional_update_does_not_reveal_invisible_ids(world: World, actor: str) -> None:
    body = {"resourceType": "Patient", "id": "p2a", "gender": "male"}
    r = world.http.put("/fhir/Patient?identifier=urn:test|khong-co", json=body, headers=world.h(actor))
    assert r.status_code == 404, f"{r.status_code}: {r.text[:200]}"


def test_user_rs_token_cannot_create(world: World) -> None:
    token = login(world.app, "bs.an", scope="user/*.rs")
    assert token["scope"] == "user/*.rs"
    body = {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
            "subject": {"reference": "Patient/p1a"}}
    r = world.http.post("/fhir/Observation", json=body, headers=bearer(token["access_token"]))
    assert_outcome(r, 403, "forbidden")
    assert world.http.get("/fhir/Patient/p1a", headers=bearer(token["access_token"])).status_code == 200


@pytest.mark.parametrize("actor", ["clinician", "nurse"])
def test_write_path_does_not_read_outside_the_care_team(world: World, actor: str) -> None:
    assert world.http.get("/fhir/Patient/p1c", headers=world.h(actor)).status_code == 404
    r = world.http.patch("/fhir/Patient/p1c", json=[], headers={**world.h(actor), **PATCH})
    assert r.status_code == 404 or "Cúc" not in r.text, f"{actor} read p1c through PATCH: {r.text[:200]}"


# ---- $everything ------------------------------------------------------------------------------------
@pytest.mark.parametrize("actor", ACTORS)
def test_everything(world: World, actor: str) -> None:
    for pid in ("p1a", "p1c", "p2a"):
        r = world.http.get(f"/fhir/Patient/{pid}/$everything?_count=500", headers=world.h(actor))
        want = expected_read(world, actor, ("Patient", pid))
        if want != 200:
            assert_outcome(r, want)
            continue
        assert r.status_code == 200, r.text
        got = keys_of(r.json())
        assert not world.leaks(actor, got), f"{pid}: leaked {world.leaks(actor, got)}"
        compartment = {k for k, p in world.owner.items() if p == pid and k not in world.deleted
                       and k[0] != "AuditEvent"}  # AuditEvent: see test_audit_events_do_not_leak_...
        assert compartment <= set(got), f"{pid}: missing {compartment - set(got)}"


@pytest.mark.parametrize("actor", ["clinician", "system-facility"])
def test_everything_total_counts_only_visible(world: World, actor: str) -> None:
    r = world.http.get("/fhir/Patient/p1a/$everything?_count=500", headers=world.h(actor))
    assert r.status_code == 200
    assert r.json()["total"] == len(r.json()["entry"])


# ---- $export ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("actor", "level"), [(a, "system") for a in ACTORS] + [
    (a, "patient") for a in ("clinician", "records-officer", "system-facility", "system-global", "auditor")])
def test_export_never_leaks(world: World, actor: str, level: str) -> None:
    status, keys, manifest = run_export(world.app, world.http, world.h(actor), level, f"_type={EXPORT_TYPES}")
    if world.actors[actor].refused:
        assert status == 403
        return
    if status != 202:
        assert actor not in BULK_EXPORT and status == 403
        return
    assert not world.leaks(actor, keys), f"{actor} {level}: leaked {world.leaks(actor, keys)}"
    assert len(keys) == len(set(keys))
    expected = world.allowed(actor, COMPARTMENT if level == "patient" else set(EXPORT_TYPES.split(",")))
    assert set(keys) == expected
    assert manifest is not None and all(o["count"] > 0 for o in manifest["output"])


@pytest.mark.parametrize("actor", [a for a in ACTORS if a not in BULK_EXPORT])
def test_export_needs_the_bulk_export_permission(world: World, actor: str) -> None:
    for level in ("system", "patient"):
        status, _, _ = run_export(world.app, world.http, world.h(actor), level, "_type=Patient")
        assert status == 403, level


def test_full_export_and_file_ownership(world: World) -> None:
    status, keys, manifest = run_export(world.app, world.http, world.h("records-officer"))
    assert status == 202 and manifest is not None
    assert not world.leaks("records-officer", keys)
    assert {k for k in world.allowed("records-officer") if k[0] != "AuditEvent"} <= set(keys)
    url = manifest["output"][0]["url"].split("testserver", 1)[1]
    job = url.split("/")[3]
    for other in ("system-facility", "facility-admin", "system-global"):
        r = world.http.get(url, headers=world.h(other))
        assert_outcome(r, 404)
        r = world.http.get(f"/fhir/$export-poll-status?_jobId={job}", headers=world.h(other))
        assert_outcome(r, 404)
    assert world.http.get(url).status_code == 401


# ---- transaction and batch --------------------------------------------------------------------------
def _obs_entry(patient: str, method: str = "POST", rid: str | None = None) -> JSON:
    body = observation(rid or "x", patient, 3.3)
    if rid is None:
        del body["id"]
    return {"resource": body, "request": {"method": method, "url": f"Observation/{rid}" if rid else "Observation"}}


def _count_observations(world: World, patient: str) -> int:
    r = world.http.get(f"/fhir/Observation?subject=Patient/{patient}&_summary=count",
                       headers=world.h("system-global"))
    total: int = r.json()["total"]
    return total


@pytest.mark.parametrize("actor", ["records-officer", "clinician", "system-facility"])
def test_transaction_touching_another_facility_is_refused_whole(world: World, actor: str) -> None:
    before = (_count_observations(world, "p1a"), _count_observations(world, "p2a"))
    bundle = {"resourceType": "Bundle", "type": "transaction",
              "entry": [_obs_entry("p1a"), _obs_entry("p2a", "PUT", "obs-2a")]}
    assert_outcome(world.http.post("/fhir", json=bundle, headers=world.h(actor)), 404)
    bundle["entry"] = [_obs_entry("p1a"), {"request": {"method": "GET", "url": "Patient/p2a"}}]
    assert_outcome(world.http.post("/fhir", json=bundle, headers=world.h(actor)), 404)
    bundle["entry"] = [_obs_entry("p1a"), _obs_entry("p2a")]
    assert_outcome(world.http.post("/fhir", json=bundle, headers=world.h(actor)), 404)
    assert (_count_observations(world, "p1a"), _count_observations(world, "p2a")) == before


@pytest.mark.parametrize(("actor", "method"), [("system-readonly", "POST"), ("facility-admin", "POST"),
                                                ("nurse", "DELETE"), ("auditor", "GET"), ("province-admin", "GET")])
def test_transaction_needs_every_entry_permitted(world: World, actor: str, method: str) -> None:
    entry = _obs_entry("p1a") if method == "POST" else {"request": {"method": method, "url": "Observation/obs-1a"}}
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [entry]}
    assert_outcome(world.http.post("/fhir", json=bundle, headers=world.h(actor)), 403)


def test_transaction_within_scope_commits(world: World) -> None:
    bundle = {"resourceType": "Bundle", "type": "transaction",
              "entry": [_obs_entry("p1a"), {"request": {"method": "GET", "url": "Observation?subject=Patient/p2a"}}]}
    r = world.http.post("/fhir", json=bundle, headers=world.h("clinician"))
    assert r.status_code == 200, r.text
    entries = r.json()["entry"]
    world.track("Observation", entries[0]["resource"]["id"], "p1a")
    assert keys_of(entries[1]["resource"]) == []


@pytest.mark.parametrize("actor", ["clinician", "nurse", "records-officer", "system-facility", "system-readonly"])
def test_batch_answers_each_entry_by_the_rules(world: World, actor: str) -> None:
    entries = [
        {"request": {"method": "GET", "url": "Patient/p1a"}},
        {"request": {"method": "GET", "url": "Patient/p2a"}},
        {"request": {"method": "GET", "url": "Patient/p1c"}},
        {"request": {"method": "GET", "url": "Observation?subject=Patient/p2a"}},
        {"request": {"method": "GET", "url": "Observation/obs-2a/_history/1"}},
        _obs_entry("p2a"),
        {"request": {"method": "DELETE", "url": "Observation/obs-2b"}},
    ]
    r = world.http.post("/fhir", json={"resourceType": "Bundle", "type": "batch", "entry": entries},
                        headers=world.h(actor))
    assert r.status_code == 200, r.text
    out = r.json()["entry"]
    statuses = [e["response"]["status"].split()[0] for e in out]
    writes_c = "c" in LETTERS[actor]
    writes_d = "d" in LETTERS[actor]
    assert statuses == [
        "200", "404", str(expected_read(world, actor, ("Patient", "p1c"))), "200", "404",
        "404" if writes_c else "403", "404" if writes_d else "403"], statuses
    assert keys_of(out[3]["resource"]) == []
    for e, s in zip(out, statuses, strict=True):
        if s.startswith("4"):
            assert e["response"]["outcome"]["resourceType"] == "OperationOutcome"


# ---- time windows ---------------------------------------------------------------------------------------
VN = timedelta(hours=7)


def vn(year: int, month: int, day: int, hour: int, minute: int = 0) -> datetime:
    """A Vietnam wall-clock time as an aware UTC datetime."""
    return datetime(year, month, day, hour, minute, tzinfo=UTC) - VN


NIGHT = {"days": "mon-fri", "start": "19:00", "end": "07:00"}
# 2025-01-06 is a Monday.
WINDOW_CASES = [
    (NIGHT, vn(2025, 1, 6, 19, 0), True),  # Monday 19:00: shift starts
    (NIGHT, vn(2025, 1, 6, 18, 59), False),
    (NIGHT, vn(2025, 1, 6, 23, 59), True),
    (NIGHT, vn(2025, 1, 7, 0, 0), True),  # Tuesday 00:00 belongs to Monday's shift
    (NIGHT, vn(2025, 1, 7, 6, 59), True),
    (NIGHT, vn(2025, 1, 7, 7, 0), False),  # end is exclusive
    (NIGHT, vn(2025, 1, 7, 12, 0), False),
    (NIGHT, vn(2025, 1, 11, 3, 0), True),  # Saturday 03:00: Friday's shift
    (NIGHT, vn(2025, 1, 11, 19, 30), False),  # Saturday evening: no shift
    (NIGHT, vn(2025, 1, 12, 23, 0), False),  # Sunday night
    (NIGHT, vn(2025, 1, 6, 3, 0), False),  # Monday 03:00 would be Sunday's shift
    ({"days": "mon-fri", "start": "07:00", "end": "17:00"}, vn(2025, 1, 8, 16, 59), True),
    ({"days": "mon-fri", "start": "07:00", "end": "17:00"}, vn(2025, 1, 8, 17, 0), False),
    ({"days": "mon-fri", "start": "07:00", "end": "17:00"}, vn(2025, 1, 11, 10, 0), False),
    ({"days": "fri-mon", "start": "08:00", "end": "12:00"}, vn(2025, 1, 12, 9, 0), True),  # wrapping day range
    ({"days": "fri-mon", "start": "08:00", "end": "12:00"}, vn(2025, 1, 8, 9, 0), False),
    ({"days": "all", "start": "00:00", "end": "00:00"}, vn(2025, 1, 9, 13, 0), True),
]


@pytest.mark.parametrize(("window", "moment", "inside"), WINDOW_CASES)
def test_window_contains(window: JSON, moment: datetime, inside: bool) -> None:
    from lienthong.security.windows import active, parse_window

    assert parse_window(window).contains(moment) is inside
    assert active(window, None, None, moment) is inside


def test_window_uses_vietnam_time_whatever_the_input_zone() -> None:
    from datetime import timezone

    from lienthong.security.windows import parse_window

    night = parse_window(NIGHT)
    # Monday 12:30 UTC is Monday 19:30 in Hanoi; Monday 23:30 UTC is Tuesday 06:30 in Hanoi.
    assert night.contains(datetime(2025, 1, 6, 12, 30, tzinfo=UTC))
    assert night.contains(datetime(2025, 1, 6, 23, 30, tzinfo=UTC))
    assert not night.contains(datetime(2025, 1, 7, 1, 0, tzinfo=UTC))  # Tuesday 08:00 Hanoi
    assert night.contains(datetime(2025, 1, 6, 20, 30, tzinfo=timezone(timedelta(hours=1))))  # 02:30 Hanoi Tue


def test_valid_from_until_and_bad_windows() -> None:
    from lienthong.security.windows import WindowError, active, parse_window

    moment = datetime(2025, 3, 1, 5, 0, tzinfo=UTC)
    us = int(moment.timestamp() * 1_000_000)
    assert active(None, us - 1, us + 1, moment)
    assert not active(None, us + 1, None, moment)
    assert not active(None, None, us - 1, moment)
    for bad in ({"start": "25:00"}, {"start": "7:00"}, {"days": "monday"}, {"days": "mon-xyz"}):
        with pytest.raises(WindowError):
            parse_window(bad)


def test_night_shift_login_through_accounts(world: World) -> None:
    add_user(world.app, "dd.dem", "nurse", FAC1, "prac-binh", window=NIGHT)
    accounts = world.node.accounts

    def at(moment: datetime) -> int:
        return int(moment.timestamp() * 1_000_000)

    from lienthong.security.accounts import LoginFailed

    assert accounts.authenticate("dd.dem", PASSWORD, now=at(vn(2025, 1, 10, 23, 30))).username == "dd.dem"
    assert accounts.authenticate("dd.dem", PASSWORD, now=at(vn(2025, 1, 11, 3, 0))).username == "dd.dem"
    for moment in (vn(2025, 1, 11, 8, 0), vn(2025, 1, 6, 3, 0), vn(2025, 1, 8, 12, 0)):
        with pytest.raises(LoginFailed, match="time window"):
            accounts.authenticate("dd.dem", PASSWORD, now=at(moment))


def test_login_outside_the_window_is_refused(world: World) -> None:
    add_user(world.app, "bs.ngoaigio", "clinician", FAC1, "prac-an", window=window_excluding_now())
    r, _ = authorize(world.app, "bs.ngoaigio", PASSWORD)
    assert r.status_code == 401 and "time window" in r.text
    assert "location" not in r.headers


def test_token_holder_outside_the_window_gets_403(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    from lienthong.security import authn
    from lienthong.storage import schema

    user = add_user(world.app, "bs.cadem", "clinician", FAC1, "prac-an", window=window_including_now())
    h = bearer(login(world.app, "bs.cadem")["access_token"])
    assert world.http.get("/fhir/Patient/p1a", headers=h).status_code == 200
    import orjson

    with world.node.db.engine.begin() as conn:  # the shift ends while the token is still valid
        conn.execute(update(schema.role_assignment).where(schema.role_assignment.c.user_id == user.user_id)
                     .values(window=orjson.dumps(window_excluding_now()).decode()))
    monkeypatch.setattr(authn, "USER_CACHE_S", 0.0)
    for method, url in (("GET", "/fhir/Patient/p1a"), ("GET", "/fhir/Observation"), ("DELETE", "/fhir/Patient/p1a")):
        body = assert_outcome(world.http.request(method, url, headers=h), 403, "forbidden")
        assert "time window" in body["issue"][0]["diagnostics"]


# ---- break the glass ---------------------------------------------------------------------------------
def _btg(world: World, actor: str, patient: str, reason: str) -> Any:
    body = {"resourceType": "Parameters", "parameter": [{"name": "reason", "valueString": reason}]}
    return world.http.post(f"/fhir/Patient/{patient}/$break-glass", json=body, headers=world.h(actor))


@pytest.mark.parametrize("actor", ["auditor", "province-admin", "system-facility", "system-global"])
def test_break_glass_needs_a_clinical_user(world: World, actor: str) -> None:
    assert_outcome(_btg(world, actor, "p2a", BTG_REASON), 403, "forbidden")


def test_break_the_glass(world: World) -> None:
    actor = "btg-clinician"
    for url in ("/fhir/Patient/p2a", "/fhir/Observation/obs-2a", "/fhir/Patient/p2a/$everything"):
        assert_outcome(world.http.get(url, headers=world.h(actor)), 404)
    r = world.http.get("/fhir/Observation?subject=Patient/p2a", headers=world.h(actor))
    assert keys_of(r.json()) == []
    for reason in ("", "cấp cứu", "         short    "):
        assert_outcome(_btg(world, actor, "p2a", reason), 400, "required")
    assert world.http.get("/fhir/Patient/p2a", headers=world.h(actor)).status_code == 404

    r = _btg(world, actor, "p2a", BTG_REASON)
    assert r.status_code == 200, r.text
    params = {p["name"]: p.get("valueString", p.get("valueInteger")) for p in r.json()["parameter"]}
    assert params["patient"] == "p2a" and params["expires_in"] == 3600 and params["grant"]
    world.actors[actor].patients = frozenset({"p2a"})  # the oracle follows the grant

    r = world.http.get("/fhir/Patient/p2a", headers=world.h(actor))
    assert r.status_code == 200
    r = world.http.get("/fhir/Patient/p2a/$everything", headers=world.h(actor))
    got = keys_of(r.json())
    assert ("Observation", "obs-2a") in got and not world.leaks(actor, got)
    r = world.http.get("/fhir/Patient?_count=100", headers=world.h(actor))
    assert set(keys_of(r.json())) == {("Patient", "p2a")}
    # the grant is for p2a only
    assert_outcome(world.http.get("/fhir/Patient/p2b", headers=world.h(actor)), 404)
    assert_outcome(world.http.get("/fhir/Patient/p1c", headers=world.h(actor)), 404)

    events = wait_for_events(world.audit, lambda evs: any(_action(e) == "read" and e["outcome"] == "0"
                                                          for e in evs), patient="p2a", actor="bs.khanh")
    actions = [(_action(e), e["outcome"]) for e in events]
    assert ("break-glass", "0") in actions
    grant = next(e for e in events if _action(e) == "break-glass")
    assert BTG_REASON in grant["outcomeDesc"]
    reads = [e for e in events if _action(e) == "read" and e["outcome"] == "0"]
    assert reads and all(_btg_flag(e) for e in reads)
    refused = [e for e in events if e["outcome"] != "0"]
    assert refused and not any(_btg_flag(e) for e in refused)


def test_break_glass_is_not_a_write_pass(world: World) -> None:
    """A grant lets the clinician see the patient; writing about a patient of another facility stays 404."""
    if "p2a" not in (world.actors["btg-clinician"].patients or ()):
        assert _btg(world, "btg-clinician", "p2a", BTG_REASON).status_code == 200
        world.actors["btg-clinician"].patients = frozenset({"p2a"})
    body = {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
            "subject": {"reference": "Patient/p2a"}}
    assert_outcome(world.http.post("/fhir/Observation", json=body, headers=world.h("btg-clinician")), 404)


def _action(event: JSON) -> str:
    codes = {c["system"]: c["code"] for c in event["subtype"]}
    return codes.get("urn:lienthong:audit-action") or codes["http://hl7.org/fhir/restful-interaction"]


def _btg_flag(event: JSON) -> bool:
    return any(c.get("code") == "BTG" for a in event["agent"] for p in a.get("purposeOfUse", [])
               for c in p.get("coding", []))


# ---- AuditEvent resources stay with auditors --------------------------------------------------------
@pytest.fixture(scope="session")
def stored_audit_event(world: World) -> str:
    """An AuditEvent resource about p1a, as an external system (a lab) might send under IHE BALP."""
    ae = {"resourceType": "AuditEvent",
          "type": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110110"},
          "recorded": "2025-01-01T00:00:00Z", "agent": [{"requestor": True, "who": {"display": "LIS"}}],
          "source": {"observer": {"display": "LIS"}}, "entity": [{"what": {"reference": "Patient/p1a"}}]}
    r = world.http.post("/fhir/AuditEvent", json=ae, headers=world.h("system-facility"))
    assert r.status_code == 201, r.text
    rid: str = r.json()["id"]
    world.track("AuditEvent", rid, "p1a")
    return rid


@pytest.mark.parametrize("actor", ["clinician", "records-officer", "facility-admin"])
def test_audit_event_type_is_refused_to_non_auditors(world: World, stored_audit_event: str, actor: str) -> None:
    assert_outcome(world.http.get("/fhir/AuditEvent", headers=world.h(actor)), 403)
    assert_outcome(world.http.get(f"/fhir/AuditEvent/{stored_audit_event}", headers=world.h(actor)), 403)


@pytest.mark.parametrize("url", ["/fhir/Patient?_id=p1a&_revinclude=AuditEvent:patient",
                                 "/fhir/Patient/p1a/$everything", "/fhir?_type=AuditEvent&_count=1000",
                                 "/fhir/_history?_count=1000"])
def test_audit_events_do_not_leak_through_other_paths(world: World, stored_audit_event: str, url: str) -> None:
    r = world.http.get(url, headers=world.h("clinician"))
    assert r.status_code in (200, 403)
    if r.status_code == 200:
        assert ("AuditEvent", stored_audit_event) not in keys_of(r.json()), f"{url} gives a clinician an AuditEvent"


# ---- deleted resources of another facility: still 404 ------------------------------------------------
@pytest.mark.parametrize("rtype", ["Observation", "Patient"])
def test_deleted_resource_of_another_facility_is_404(world: World, rtype: str) -> None:
    if rtype == "Observation":
        rid = new_observation(world, "p2a")
    else:
        r = world.http.post("/fhir/Patient", json={"resourceType": "Patient", "gender": "male"},
                            headers=world.h("system-other"))
        rid = r.json()["id"]
        world.track("Patient", rid, rid, FAC2)
    assert world.http.delete(f"/fhir/{rtype}/{rid}", headers=world.h("system-other")).status_code == 200
    world.deleted.add((rtype, rid))
    for url in (f"/fhir/{rtype}/{rid}", f"/fhir/{rtype}/{rid}/_history"):
        assert_outcome(world.http.get(url, headers=world.h("records-officer")), 404)


# ---- facilities: the other side sees its own --------------------------------------------------------
def test_other_facility_sees_its_patients_and_not_ours(world: World) -> None:
    r = world.http.get("/fhir/Patient?_count=100", headers=world.h("system-other"))
    got = {i for t, i in keys_of(r.json())}
    assert {"p2a"} <= got and not got & {"p1a", "p1b", "p1c"}
    assert world.actors["system-other"].facility == FAC2
