"""Operations on SQLite and PostgreSQL: Patient/$everything, $validate, $meta, $meta-add, $meta-delete,
and Bulk Data $export (system and Patient level, asynchronous request pattern)."""

from __future__ import annotations

import time
from typing import Any

import orjson
from starlette.testclient import TestClient

from conftest import BASE, assert_outcome, put

JSON = dict[str, Any]
LOINC = "http://loinc.org"
ASYNC = {"Prefer": "respond-async"}
TAG1 = {"system": "http://lienthong.vn/tags", "code": "chuyen-vien"}
TAG2 = {"system": "http://lienthong.vn/tags", "code": "bao-hiem"}
PROFILE = "http://fhir.moh.gov.vn/StructureDefinition/vn-patient"


def key(resource: JSON) -> str:
    return f"{resource['resourceType']}/{resource['id']}"


def next_link(bundle: JSON) -> str | None:
    return next((item["url"] for item in bundle.get("link", []) if item["relation"] == "next"), None)


def everything(client: TestClient, url: str) -> tuple[list[str], list[JSON]]:
    """Walk every page of a $everything result; return Type/id of all entries and the pages."""
    keys: list[str] = []
    pages: list[JSON] = []
    next_url: str | None = url
    while next_url:
        assert len(pages) < 200, "paging does not end"
        r = client.get(next_url)
        assert r.status_code == 200, r.text
        page = r.json()
        assert page["resourceType"] == "Bundle" and page["type"] == "searchset"
        pages.append(page)
        keys += [key(e["resource"]) for e in page.get("entry", [])]
        for e in page.get("entry", []):
            assert e["fullUrl"] == f"{BASE}/{key(e['resource'])}"
        next_url = next_link(page)
    return keys, pages


def params(**values: str) -> JSON:
    return {"resourceType": "Parameters", "parameter": [{"name": k, "valueString": v} for k, v in values.items()]}


def meta_params(**meta: Any) -> JSON:
    return {"resourceType": "Parameters", "parameter": [{"name": "meta", "valueMeta": meta}]}


# --------------------------------------------------------------------------- $everything


def _record(client: TestClient) -> set[str]:
    """Patient `pa` with a small record, and `pb` with its own; returns what pa's $everything must hold."""
    put(client, {"resourceType": "Organization", "id": "org", "name": "Bệnh viện huyện"})
    put(client, {"resourceType": "Organization", "id": "org-home", "name": "Trạm y tế xã"})
    put(client, {"resourceType": "Organization", "id": "org-unrelated", "name": "Không liên quan"})
    put(client, {"resourceType": "Practitioner", "id": "dr", "name": [{"family": "Lê"}]})
    put(client, {"resourceType": "Practitioner", "id": "gp", "name": [{"family": "Đinh"}]})
    put(client, {"resourceType": "Patient", "id": "pa", "name": [{"family": "Ngô"}],
                 "generalPractitioner": [{"reference": "Practitioner/gp"}],
                 "managingOrganization": {"reference": "Organization/org-home"}})
    put(client, {"resourceType": "Patient", "id": "pb", "name": [{"family": "Hồ"}]})
    put(client, {"resourceType": "Encounter", "id": "e1", "status": "finished", "class": {"code": "AMB"},
                 "subject": {"reference": "Patient/pa"}, "serviceProvider": {"reference": "Organization/org"},
                 "participant": [{"individual": {"reference": "Practitioner/dr"}}]})
    for i in range(5):
        put(client, {"resourceType": "Observation", "id": f"o{i}", "status": "final",
                     "code": {"coding": [{"system": LOINC, "code": "2345-7"}]},
                     "subject": {"reference": "Patient/pa"}, "encounter": {"reference": "Encounter/e1"},
                     "performer": [{"reference": "Practitioner/dr"}]})
    put(client, {"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/pa"}})
    put(client, {"resourceType": "MedicationRequest", "id": "mr", "status": "active", "intent": "order",
                 "medicationCodeableConcept": {"text": "Metformin"}, "subject": {"reference": "Patient/pa"},
                 "requester": {"reference": "Practitioner/dr"}})
    put(client, {"resourceType": "Observation", "id": "gone", "status": "final", "code": {"text": "x"},
                 "subject": {"reference": "Patient/pa"}})
    assert client.delete("/fhir/Observation/gone").status_code in (200, 204)
    put(client, {"resourceType": "Observation", "id": "ob", "status": "final", "code": {"text": "x"},
                 "subject": {"reference": "Patient/pb"}, "performer": [{"reference": "Organization/org-unrelated"}]})
    put(client, {"resourceType": "Encounter", "id": "eb", "status": "finished", "class": {"code": "AMB"},
                 "subject": {"reference": "Patient/pb"}})
    return {"Patient/pa", "Encounter/e1", "Condition/c1", "MedicationRequest/mr",
            *(f"Observation/o{i}" for i in range(5)),
            "Practitioner/dr", "Organization/org",  # referenced by compartment members
            "Practitioner/gp", "Organization/org-home"}  # referenced by the Patient itself


def test_everything_returns_the_compartment_and_what_it_references(client: TestClient) -> None:
    expected = _record(client)
    keys, pages = everything(client, "/fhir/Patient/pa/$everything")
    assert len(keys) == len(set(keys)), "no resource twice"
    assert set(keys) == expected
    assert keys[0] == "Patient/pa"
    assert len(pages) == 1 and pages[0]["total"] == len(expected)
    # The other patient's record is separate.
    keys_b, _ = everything(client, "/fhir/Patient/pb/$everything")
    assert set(keys_b) == {"Patient/pb", "Observation/ob", "Encounter/eb", "Organization/org-unrelated"}


def test_everything_paging_walks_each_entry_once(client: TestClient) -> None:
    expected = _record(client)
    for count in (1, 3, 5, len(expected) - 1):
        keys, pages = everything(client, f"/fhir/Patient/pa/$everything?_count={count}")
        assert len(keys) == len(set(keys)), f"_count={count}: duplicates {keys}"
        assert set(keys) == expected, f"_count={count}"
        assert len(pages) == -(-len(expected) // count)
        assert all(len(p["entry"]) <= count for p in pages)
        assert pages[0]["total"] == len(expected)
    # Paging is a snapshot: a new observation between pages is not spliced in.
    first = client.get("/fhir/Patient/pa/$everything?_count=4").json()
    put(client, {"resourceType": "Observation", "id": "late", "status": "final", "code": {"text": "x"},
                 "subject": {"reference": "Patient/pa"}})
    rest, _ = everything(client, next_link(first) or "")
    walked = [key(e["resource"]) for e in first["entry"]] + rest
    assert sorted(walked) == sorted(expected)


def test_everything_type_and_since_filters(client: TestClient) -> None:
    expected = _record(client)
    keys, _ = everything(client, "/fhir/Patient/pa/$everything?_type=Observation,Condition")
    assert set(keys) == {k for k in expected if k.startswith(("Observation/", "Condition/"))}
    keys, _ = everything(client, "/fhir/Patient/pa/$everything?_type=Patient")
    assert keys == ["Patient/pa"]
    time.sleep(0.01)
    late = put(client, {"resourceType": "Observation", "id": "new", "status": "final", "code": {"text": "x"},
                        "subject": {"reference": "Patient/pa"}})
    put(client, {"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/pa"},
                 "code": {"text": "Tiểu đường"}})
    keys, _ = everything(client, f"/fhir/Patient/pa/$everything?_since={late['meta']['lastUpdated']}")
    assert set(keys) == {"Observation/new", "Condition/c1"}
    keys, _ = everything(client, f"/fhir/Patient/pa/$everything?_since={late['meta']['lastUpdated']}"
                                 "&_type=Condition")
    assert keys == ["Condition/c1"]
    r = client.post("/fhir/Patient/pa/$everything", json=params(_type="Condition"))
    assert r.status_code == 200 and [key(e["resource"]) for e in r.json()["entry"]] == ["Condition/c1"]


def test_everything_errors(client: TestClient) -> None:
    _record(client)
    assert_outcome(client.get("/fhir/Patient/nobody/$everything"), 404)
    assert client.delete("/fhir/Patient/pb").status_code in (200, 204)
    r = client.get("/fhir/Patient/pb/$everything")
    assert r.status_code in (404, 410) and r.json()["resourceType"] == "OperationOutcome"
    assert_outcome(client.get("/fhir/Patient/pa/$everything?_count=many"), 400)
    assert_outcome(client.get("/fhir/Patient/pa/$everything?_since=yesterday"), 400)
    r = client.get("/fhir/Patient/pa/$everything?_type=Unicorn")
    assert 400 <= r.status_code < 500 and r.json()["resourceType"] == "OperationOutcome"
    assert_outcome(client.get("/fhir/Observation/o1/$everything"), 404)


# --------------------------------------------------------------------------- $validate


def test_validate(client: TestClient) -> None:
    valid = {"resourceType": "Patient", "name": [{"family": "Phùng"}], "gender": "female", "birthDate": "1990-02-28"}
    r = client.post("/fhir/Patient/$validate", json=valid)
    assert r.status_code == 200
    outcome = r.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert [i["severity"] for i in outcome["issue"]] == ["information"]

    invalid = {"resourceType": "Patient", "gender": "f", "birthDate": "1990-02-30", "nickname": "Bé"}
    outcome = client.post("/fhir/Patient/$validate", json=invalid).json()
    errors = {tuple(i["expression"]): i for i in outcome["issue"] if i["severity"] == "error"}
    assert set(errors) == {("Patient.gender",), ("Patient.birthDate",), ("Patient.nickname",)}, outcome
    assert errors[("Patient.gender",)]["code"] == "code-invalid"

    wrapped = {"resourceType": "Parameters", "parameter": [{"name": "resource", "resource": invalid}]}
    outcome = client.post("/fhir/Patient/$validate", json=wrapped).json()
    assert {tuple(i["expression"]) for i in outcome["issue"] if i["severity"] == "error"} == set(errors)

    nested = {"resourceType": "Observation", "status": "final", "code": {"coding": [{"system": LOINC, "code": 7}]}}
    outcome = client.post("/fhir/Observation/$validate", json=nested).json()
    assert [i["expression"] for i in outcome["issue"] if i["severity"] == "error"] == [
        ["Observation.code.coding[0].code"]]

    wrong_type = client.post("/fhir/Patient/$validate", json={"resourceType": "Observation"}).json()
    assert any(i["severity"] == "error" for i in wrong_type["issue"])

    put(client, {"resourceType": "Patient", "id": "v1"})
    r = client.post("/fhir/Patient/v1/$validate", json={**valid, "id": "v1"})
    assert r.status_code == 200 and r.json()["issue"][0]["severity"] == "information"

    # $validate never stores anything.
    assert client.get("/fhir/Patient?_summary=count").json()["total"] == 1
    assert client.get("/fhir/Observation?_summary=count").json()["total"] == 0
    assert_outcome(client.post("/fhir/Patient/$validate", content=b"{not json"), 400)
    assert_outcome(client.post("/fhir/Patient/$validate", json={"resourceType": "Parameters", "parameter": []}), 400)
    assert_outcome(client.post("/fhir/Unicorn/$validate", json=valid), 404)


# --------------------------------------------------------------------------- $meta


def test_meta_operations(client: TestClient) -> None:
    put(client, {"resourceType": "Patient", "id": "m1", "name": [{"family": "Lý"}], "meta": {"tag": [TAG1]}})
    put(client, {"resourceType": "Observation", "id": "mo", "status": "final", "code": {"text": "x"},
                 "meta": {"tag": [TAG2], "profile": [PROFILE]}})

    def meta_of(url: str) -> JSON:
        r = client.get(url) if not url.startswith("POST ") else None
        assert r is not None and r.status_code == 200, r.text if r is not None else url
        body = r.json()
        assert body["resourceType"] == "Parameters" and body["parameter"][0]["name"] == "return"
        value: JSON = body["parameter"][0]["valueMeta"]
        return value

    assert meta_of("/fhir/Patient/m1/$meta") == {"tag": [TAG1]}
    assert meta_of("/fhir/Patient/$meta") == {"tag": [TAG1]}
    system = meta_of("/fhir/$meta")
    assert sorted(t["code"] for t in system["tag"]) == ["bao-hiem", "chuyen-vien"]
    assert system["profile"] == [PROFILE]

    added = client.post("/fhir/Patient/m1/$meta-add", json=meta_params(tag=[TAG2], profile=[PROFILE]))
    assert added.status_code == 200, added.text
    out = added.json()["parameter"][0]["valueMeta"]
    assert out["tag"] == [TAG1, TAG2] and out["profile"] == [PROFILE]
    current = client.get("/fhir/Patient/m1").json()
    assert current["meta"]["versionId"] == "2"
    assert current["meta"]["tag"] == [TAG1, TAG2] and current["name"] == [{"family": "Lý"}]
    assert [e["resource"]["id"] for e in client.get("/fhir/Patient?_tag=bao-hiem").json()["entry"]] == ["m1"]
    # Adding what is already there changes nothing.
    again = client.post("/fhir/Patient/m1/$meta-add", json=meta_params(tag=[TAG1]))
    assert again.status_code == 200
    assert client.get("/fhir/Patient/m1").json()["meta"]["versionId"] == "2"

    removed = client.post("/fhir/Patient/m1/$meta-delete", json=meta_params(tag=[TAG1], profile=[PROFILE]))
    assert removed.status_code == 200
    assert removed.json()["parameter"][0]["valueMeta"] == {"tag": [TAG2]}
    current = client.get("/fhir/Patient/m1").json()
    assert current["meta"]["versionId"] == "3" and current["meta"]["tag"] == [TAG2]
    assert "profile" not in current["meta"]
    assert client.get("/fhir/Patient?_tag=chuyen-vien").json().get("entry", []) == []
    assert meta_of("/fhir/Patient/m1/_history/1/$meta") == {"tag": [TAG1]}
    assert meta_of("/fhir/Patient/$meta") == {"tag": [TAG2]}

    assert_outcome(client.post("/fhir/Patient/nobody/$meta-add", json=meta_params(tag=[TAG1])), 404)
    assert_outcome(client.post("/fhir/Patient/m1/$meta-add", json={"resourceType": "Parameters"}), 400)
    assert_outcome(client.post("/fhir/Patient/m1/$meta-add", json=meta_params(tag=["not-a-coding"])), 400)
    assert_outcome(client.get("/fhir/Patient/nobody/$meta"), 404)
    client.delete("/fhir/Patient/m1")
    assert_outcome(client.get("/fhir/Patient/m1/$meta"), 410)
    assert_outcome(client.post("/fhir/Patient/m1/$meta-add", json=meta_params(tag=[TAG1])), 404)


# --------------------------------------------------------------------------- $export


def kick_off(client: TestClient, url: str, **kwargs: Any) -> str:
    r = client.get(url, headers=ASYNC, **kwargs)
    assert r.status_code == 202, r.text
    location: str = r.headers["Content-Location"]
    assert location.startswith(f"{BASE}/$export-poll-status?_jobId=")
    return location


def poll(client: TestClient, location: str, timeout: float = 60.0) -> JSON:
    deadline = time.monotonic() + timeout
    while True:
        r = client.get(location)
        if r.status_code == 200:
            manifest: JSON = r.json()
            return manifest
        assert r.status_code == 202, r.text
        assert time.monotonic() < deadline, "export did not finish in time"
        time.sleep(0.05)


def download(client: TestClient, manifest: JSON) -> dict[str, list[JSON]]:
    """All exported resources by type, checking each file against its manifest entry."""
    out: dict[str, list[JSON]] = {}
    for item in manifest["output"]:
        r = client.get(item["url"])
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("application/fhir+ndjson")
        lines = [orjson.loads(line) for line in r.content.splitlines() if line.strip()]
        assert len(lines) == item["count"]
        assert {res["resourceType"] for res in lines} == {item["type"]}
        out.setdefault(item["type"], []).extend(lines)
    return out


def _export_data(client: TestClient) -> None:
    put(client, {"resourceType": "Organization", "id": "xo", "name": "Sở Y tế"})
    for i in range(3):
        put(client, {"resourceType": "Patient", "id": f"xp{i}", "managingOrganization": {"reference": "Organization/xo"}})
        put(client, {"resourceType": "Observation", "id": f"xobs{i}", "status": "final", "code": {"text": "x"},
                     "subject": {"reference": f"Patient/xp{i}"}})
    put(client, {"resourceType": "Observation", "id": "orphan", "status": "final", "code": {"text": "no subject"}})
    put(client, {"resourceType": "Patient", "id": "xdel"})
    client.delete("/fhir/Patient/xdel")


def test_system_export(client: TestClient) -> None:
    _export_data(client)
    location = kick_off(client, "/fhir/$export")
    manifest = poll(client, location)
    assert manifest["request"] == f"{BASE}/$export"
    assert manifest["requiresAccessToken"] is False
    assert manifest["transactionTime"] and manifest["error"] == []
    files = download(client, manifest)
    assert {t: sorted(r["id"] for r in res) for t, res in files.items()} == {
        "Organization": ["xo"], "Patient": ["xp0", "xp1", "xp2"], "Observation": ["orphan", "xobs0", "xobs1", "xobs2"]}
    exported = {r["id"]: r for r in files["Patient"]}
    assert exported["xp1"] == client.get("/fhir/Patient/xp1").json()

    typed = poll(client, kick_off(client, "/fhir/$export?_type=Patient,Organization"))
    assert sorted(download(client, typed)) == ["Organization", "Patient"]

    time.sleep(0.01)
    late = put(client, {"resourceType": "Patient", "id": "xp1", "gender": "male"})
    since = poll(client, kick_off(client, "/fhir/$export", params={"_since": late["meta"]["lastUpdated"]}))
    assert {t: [r["id"] for r in res] for t, res in download(client, since).items()} == {"Patient": ["xp1"]}

    formatted = poll(client, kick_off(client, "/fhir/$export?_outputFormat=application/fhir%2Bndjson&_type=Patient"))
    assert [item["type"] for item in formatted["output"]] == ["Patient"]


def test_patient_export(client: TestClient) -> None:
    _export_data(client)
    manifest = poll(client, kick_off(client, "/fhir/Patient/$export"))
    assert manifest["request"] == f"{BASE}/Patient/$export"
    files = download(client, manifest)
    assert {t: sorted(r["id"] for r in res) for t, res in files.items()} == {
        "Patient": ["xp0", "xp1", "xp2"], "Observation": ["xobs0", "xobs1", "xobs2"]}
    typed = poll(client, kick_off(client, "/fhir/Patient/$export?_type=Observation"))
    assert sorted(download(client, typed)) == ["Observation"]
    r = client.post("/fhir/Patient/$export", json=params(_type="Patient"), headers=ASYNC)
    assert r.status_code == 202
    assert [item["type"] for item in poll(client, r.headers["Content-Location"])["output"]] == ["Patient"]


def test_export_errors_and_cancel(client: TestClient) -> None:
    _export_data(client)
    assert_outcome(client.get("/fhir/$export"), 400)
    assert_outcome(client.get("/fhir/Patient/$export"), 400)
    assert_outcome(client.get("/fhir/$export?_outputFormat=text/csv", headers=ASYNC), 400)
    assert_outcome(client.get("/fhir/$export?_since=last-week", headers=ASYNC), 400)
    assert_outcome(client.get("/fhir/$export?_typeFilter=Patient%3Fgender%3Dmale", headers=ASYNC), 400)
    r = client.get("/fhir/$export?_type=Unicorn", headers=ASYNC)
    assert 400 <= r.status_code < 500 and r.json()["resourceType"] == "OperationOutcome"
    assert_outcome(client.get("/fhir/$export-poll-status?_jobId=0123456789abcdef0123456789abcdef"), 404)
    assert_outcome(client.get("/fhir/$export-file/nojob/Patient-0.ndjson"), 404)
    location = kick_off(client, "/fhir/$export")
    manifest = poll(client, location)
    assert client.delete(location).status_code == 202
    assert_outcome(client.get(location), 404)
    assert_outcome(client.get(manifest["output"][0]["url"]), 404)
    assert_outcome(client.delete(location), 404)
