"""Batch and transaction Bundles (FHIR R4 http.html#transaction) on SQLite and PostgreSQL.

Covers atomicity (nothing is stored when any entry fails), urn:uuid and conditional reference
resolution, ifNoneExist, conditional update/delete inside transactions, the prescribed processing
order (DELETE, POST, PUT/PATCH, GET), PATCH through a Binary, and batch per-entry outcomes.
"""

from __future__ import annotations

import base64
from typing import Any

import orjson
from starlette.testclient import TestClient

from conftest import BASE, put

JSON = dict[str, Any]
SYS = "urn:oid:2.16.840.1.113883.2.24.1"
LOINC = "http://loinc.org"


# --------------------------------------------------------------------------- helpers


def entry(method: str, url: str, resource: JSON | None = None, full_url: str | None = None,
          **request: str) -> JSON:
    e: JSON = {"request": {"method": method, "url": url, **request}}
    if resource is not None:
        e["resource"] = resource
    if full_url is not None:
        e["fullUrl"] = full_url
    return e


def bundle(kind: str, *entries: JSON) -> JSON:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def post_bundle(client: TestClient, body: JSON, status: int = 200) -> JSON:
    r = client.post("/fhir", json=body)
    assert r.status_code == status, r.text
    result: JSON = r.json()
    if status == 200:
        assert result["resourceType"] == "Bundle"
        assert result["type"] == f"{body['type']}-response"
        assert len(result["entry"]) == len(body.get("entry", []))
    else:
        assert result["resourceType"] == "OperationOutcome"
    return result


def created_id(response_entry: JSON) -> str:
    """The id from a response entry's location `Type/id/_history/n`."""
    location: str = response_entry["response"]["location"]
    parts = location.split("/")
    assert len(parts) == 4 and parts[2] == "_history", location
    return parts[1]


def read(client: TestClient, path: str) -> JSON:
    r = client.get(f"/fhir/{path}")
    assert r.status_code == 200, r.text
    body: JSON = r.json()
    return body


def totals(client: TestClient) -> tuple[int, ...]:
    """Current resources per type and all versions ever written: must not move on a failed transaction."""
    counts = [client.get(f"/fhir/{t}?_summary=count").json()["total"]
              for t in ("Patient", "Observation", "Encounter", "Practitioner")]
    history = client.get("/fhir/_history?_count=1").json()["total"]
    return (*counts, history)


def patient(**extra: Any) -> JSON:
    return {"resourceType": "Patient", "name": [{"family": "Nguyễn", "given": ["Thị", "Hoa"]}], **extra}


def observation(**extra: Any) -> JSON:
    return {"resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": LOINC, "code": "2345-7"}]}, **extra}


def binary_patch(ops: list[JSON]) -> JSON:
    return {"resourceType": "Binary", "contentType": "application/json-patch+json",
            "data": base64.b64encode(orjson.dumps(ops)).decode()}


# --------------------------------------------------------------------------- transaction: ids and references


def test_transaction_creates_and_rewrites_urn_references(client: TestClient) -> None:
    existing = put(client, {"resourceType": "Organization", "id": "bv-e", "name": "Bệnh viện E"})
    pat, enc, doc = (f"urn:uuid:0000000{i}-0000-4000-8000-000000000000" for i in range(3))
    body = bundle(
        "transaction",
        entry("POST", "Observation", observation(
            subject={"reference": pat}, encounter={"reference": enc},
            performer=[{"reference": doc}, {"reference": f"{BASE}/Organization/bv-e"}],
            note=[{"text": pat}],  # text that merely looks like a reference is data, not a reference
            extension=[{"url": "http://example.org/ext", "valueReference": {"reference": enc}}]),
            "urn:uuid:00000009-0000-4000-8000-000000000000"),
        entry("POST", "Encounter", {"resourceType": "Encounter", "status": "finished", "class": {"code": "AMB"},
                                    "subject": {"reference": pat},
                                    "participant": [{"individual": {"reference": doc}}]}, enc),
        entry("POST", "Patient", patient(id="ignored-client-id", managingOrganization={
            "reference": "Organization/bv-e"}), pat),
        entry("POST", "Practitioner", {"resourceType": "Practitioner", "name": [{"family": "Lê"}]}, doc),
    )
    result = post_bundle(client, body)
    statuses = [e["response"]["status"] for e in result["entry"]]
    assert statuses == ["201 Created"] * 4
    obs_id, enc_id, pat_id, doc_id = (created_id(e) for e in result["entry"])
    assert pat_id != "ignored-client-id"
    assert len({obs_id, enc_id, pat_id, doc_id}) == 4
    for e, rtype in zip(result["entry"], ("Observation", "Encounter", "Patient", "Practitioner"), strict=True):
        rid = created_id(e)
        assert e["response"]["location"] == f"{rtype}/{rid}/_history/1"
        assert e["response"]["etag"] == 'W/"1"'
        assert e["response"]["lastModified"]
        assert e["fullUrl"] == f"{BASE}/{rtype}/{rid}"
        assert e["resource"]["id"] == rid and e["resource"]["meta"]["versionId"] == "1"
        assert read(client, f"{rtype}/{rid}") == e["resource"]
    obs = read(client, f"Observation/{obs_id}")
    assert obs["subject"] == {"reference": f"Patient/{pat_id}"}
    assert obs["encounter"] == {"reference": f"Encounter/{enc_id}"}
    assert obs["performer"] == [{"reference": f"Practitioner/{doc_id}"}, {"reference": "Organization/bv-e"}]
    assert obs["extension"][0]["valueReference"] == {"reference": f"Encounter/{enc_id}"}
    assert obs["note"] == [{"text": pat}]
    encounter = read(client, f"Encounter/{enc_id}")
    assert encounter["subject"]["reference"] == f"Patient/{pat_id}"
    assert encounter["participant"][0]["individual"]["reference"] == f"Practitioner/{doc_id}"
    assert read(client, f"Patient/{pat_id}")["managingOrganization"] == {"reference": "Organization/bv-e"}
    assert existing["meta"]["versionId"] == read(client, "Organization/bv-e")["meta"]["versionId"]
    # The rewritten references are searchable.
    found = client.get(f"/fhir/Observation?subject=Patient/{pat_id}&encounter.participant={doc_id}").json()
    assert [e["resource"]["id"] for e in found["entry"]] == [obs_id]


def test_transaction_put_with_urn_full_url_maps_to_its_id(client: TestClient) -> None:
    pat = "urn:uuid:11111111-2222-4333-8444-555555555555"
    body = bundle("transaction",
                  entry("POST", "Observation", observation(subject={"reference": pat})),
                  entry("PUT", "Patient/bn-42", patient(id="bn-42"), pat))
    result = post_bundle(client, body)
    assert [e["response"]["status"] for e in result["entry"]] == ["201 Created", "201 Created"]
    obs = read(client, f"Observation/{created_id(result['entry'][0])}")
    assert obs["subject"] == {"reference": "Patient/bn-42"}
    # The same bundle again: the PUT is now an update, the POST a second Observation.
    again = post_bundle(client, body)
    assert [e["response"]["status"] for e in again["entry"]] == ["201 Created", "200 OK"]
    assert again["entry"][1]["response"]["location"] == "Patient/bn-42/_history/2"


def test_unresolvable_urn_reference_fails_the_transaction(client: TestClient) -> None:
    before = totals(client)
    body = bundle("transaction",
                  entry("POST", "Patient", patient(), "urn:uuid:aaaaaaaa-0000-4000-8000-000000000001"),
                  entry("POST", "Observation", observation(
                      subject={"reference": "urn:uuid:bbbbbbbb-0000-4000-8000-000000000002"})))
    outcome = post_bundle(client, body, 404)
    assert "urn:uuid:bbbbbbbb" in outcome["issue"][0]["diagnostics"]
    assert totals(client) == before


def test_conditional_references(client: TestClient) -> None:
    target = put(client, patient(id="cr-1", identifier=[{"system": SYS, "value": "CR-1"}]))
    for i in range(2):
        put(client, patient(id=f"twin-{i}", identifier=[{"system": SYS, "value": "TWIN"}]))
    result = post_bundle(client, bundle("transaction", entry("POST", "Observation", observation(
        subject={"reference": f"Patient?identifier={SYS}|CR-1"},
        performer=[{"reference": f"Patient?identifier={SYS}|CR-1"}]))))
    obs = read(client, f"Observation/{created_id(result['entry'][0])}")
    assert obs["subject"] == {"reference": f"Patient/{target['id']}"}
    assert obs["performer"] == [{"reference": f"Patient/{target['id']}"}]
    before = totals(client)
    none = bundle("transaction", entry("POST", "Patient", patient()),
                  entry("POST", "Observation", observation(subject={"reference": f"Patient?identifier={SYS}|NOBODY"})))
    post_bundle(client, none, 404)
    many = bundle("transaction", entry("POST", "Patient", patient()),
                  entry("POST", "Observation", observation(subject={"reference": f"Patient?identifier={SYS}|TWIN"})))
    post_bundle(client, many, 412)
    bad = bundle("transaction", entry("POST", "Observation", observation(
        subject={"reference": "Patient?no-such-param=1"})))
    post_bundle(client, bad, 400)
    assert totals(client) == before


def test_if_none_exist_inside_transaction(client: TestClient) -> None:
    existing = put(client, patient(id="inx", identifier=[{"system": SYS, "value": "INX"}]))
    pat = "urn:uuid:cccccccc-0000-4000-8000-000000000003"
    body = bundle("transaction",
                  entry("POST", "Patient", patient(identifier=[{"system": SYS, "value": "INX"}], gender="male"), pat,
                        ifNoneExist=f"identifier={SYS}|INX"),
                  entry("POST", "Observation", observation(subject={"reference": pat})))
    result = post_bundle(client, body)
    first, second = result["entry"]
    assert first["response"]["status"] == "200 OK"
    assert first["response"]["location"] == "Patient/inx/_history/1"
    assert second["response"]["status"] == "201 Created"
    assert read(client, f"Observation/{created_id(second)}")["subject"] == {"reference": "Patient/inx"}
    assert read(client, "Patient/inx") == existing, "the matched resource is not modified"
    assert client.get("/fhir/Patient?_summary=count").json()["total"] == 1
    # No match: created.
    fresh = post_bundle(client, bundle("transaction", entry(
        "POST", "Patient", patient(identifier=[{"system": SYS, "value": "NEW"}]),
        ifNoneExist=f"identifier={SYS}|NEW")))
    assert fresh["entry"][0]["response"]["status"] == "201 Created"
    # Several matches: the whole transaction fails.
    put(client, patient(id="inx-2", identifier=[{"system": SYS, "value": "INX"}]))
    before = totals(client)
    post_bundle(client, bundle("transaction", entry("POST", "Practitioner", {"resourceType": "Practitioner"}),
                               entry("POST", "Patient", patient(), ifNoneExist=f"identifier={SYS}|INX")), 412)
    assert totals(client) == before


# --------------------------------------------------------------------------- transaction: atomicity


def test_transaction_is_all_or_nothing(client: TestClient) -> None:
    put(client, patient(id="keep", gender="female"))
    before = totals(client)
    invalid = bundle("transaction",
                     entry("POST", "Patient", patient()),
                     entry("POST", "Practitioner", {"resourceType": "Practitioner"}),
                     entry("PUT", "Patient/keep", patient(id="keep", gender="male")),
                     entry("DELETE", "Patient/keep"),
                     entry("POST", "Observation", observation(status="not-a-status")))
    outcome = post_bundle(client, invalid, 422)
    assert outcome["issue"][0]["expression"] == ["Bundle.entry[4].resource.status"], outcome
    assert totals(client) == before
    assert read(client, "Patient/keep")["gender"] == "female"
    assert read(client, "Patient/keep")["meta"]["versionId"] == "1"


def test_transaction_rolls_back_on_late_conflict(client: TestClient) -> None:
    put(client, patient(id="v2"))
    put(client, patient(id="v2", gender="male"))
    put(client, patient(id="gone"))
    before = totals(client)
    stale = bundle("transaction",
                   entry("POST", "Patient", patient()),
                   entry("DELETE", "Patient/gone"),
                   entry("PUT", "Patient/v2", patient(id="v2", gender="female"), ifMatch='W/"1"'))
    post_bundle(client, stale, 412)
    assert totals(client) == before
    assert read(client, "Patient/gone")["meta"]["versionId"] == "1"
    assert read(client, "Patient/v2")["gender"] == "male"
    mismatch = bundle("transaction", entry("POST", "Patient", patient()),
                      entry("PUT", "Patient/v2", patient(id="other")))
    post_bundle(client, mismatch, 400)
    wrong_type = bundle("transaction", entry("POST", "Patient", patient()),
                        entry("POST", "Observation", patient()))
    post_bundle(client, wrong_type, 400)
    unknown = bundle("transaction", entry("POST", "Patient", patient()),
                     entry("POST", "Unicorn", {"resourceType": "Unicorn"}))
    post_bundle(client, unknown, 404)
    assert totals(client) == before


def test_transaction_processing_order(client: TestClient) -> None:
    put(client, patient(id="p1", gender="female"))
    put(client, patient(id="p2", identifier=[{"system": SYS, "value": "OLD"}]))
    body = bundle("transaction",
                  entry("GET", f"Patient?identifier={SYS}|NEW"),
                  entry("GET", "Patient?_id=p2"),
                  entry("GET", "Patient/p1"),
                  entry("PUT", "Patient/p1", patient(id="p1", gender="male")),
                  entry("POST", "Patient", patient(identifier=[{"system": SYS, "value": "NEW"}])),
                  entry("DELETE", "Patient/p2"))
    result = post_bundle(client, body)
    get_new, get_p2, get_p1, put_p1, post_new, delete_p2 = result["entry"]
    assert delete_p2["response"]["status"].startswith("204") or delete_p2["response"]["status"].startswith("200")
    assert post_new["response"]["status"] == "201 Created"
    assert put_p1["response"]["status"] == "200 OK"
    assert put_p1["response"]["location"] == "Patient/p1/_history/2"
    # GETs run last and see the transaction's own writes.
    searchset = get_new["resource"]
    assert searchset["type"] == "searchset"
    assert [e["resource"]["id"] for e in searchset["entry"]] == [created_id(post_new)]
    assert get_p2["resource"]["total"] == 0
    assert get_p1["response"]["status"] == "200 OK" and get_p1["resource"]["gender"] == "male"
    assert client.get("/fhir/Patient/p2").status_code == 410


def test_conditional_update_and_delete_inside_transaction(client: TestClient) -> None:
    url = f"Patient?identifier={SYS}|CU"
    first = post_bundle(client, bundle("transaction", entry(
        "PUT", url, patient(identifier=[{"system": SYS, "value": "CU"}]))))
    assert first["entry"][0]["response"]["status"] == "201 Created"
    rid = created_id(first["entry"][0])
    second = post_bundle(client, bundle("transaction", entry(
        "PUT", url, patient(identifier=[{"system": SYS, "value": "CU"}], gender="other"))))
    assert second["entry"][0]["response"]["status"] == "200 OK"
    assert second["entry"][0]["response"]["location"] == f"Patient/{rid}/_history/2"
    assert read(client, f"Patient/{rid}")["gender"] == "other"
    put(client, patient(id="twin-a", identifier=[{"system": SYS, "value": "TW"}]))
    put(client, patient(id="twin-b", identifier=[{"system": SYS, "value": "TW"}]))
    post_bundle(client, bundle("transaction", entry("PUT", f"Patient?identifier={SYS}|TW", patient())), 412)
    post_bundle(client, bundle("transaction", entry("DELETE", f"Patient?identifier={SYS}|TW")), 412)
    deleted = post_bundle(client, bundle("transaction", entry("DELETE", url)))
    assert deleted["entry"][0]["response"]["status"][:3] in ("200", "204")
    assert client.get(f"/fhir/Patient/{rid}").status_code == 410
    nothing = post_bundle(client, bundle("transaction", entry("DELETE", f"Patient?identifier={SYS}|NONE")))
    assert nothing["entry"][0]["response"]["status"][:3] in ("200", "204")


def test_patch_entries_through_binary(client: TestClient) -> None:
    put(client, patient(id="pp", gender="female"))
    ops = [{"op": "replace", "path": "/gender", "value": "male"}, {"op": "add", "path": "/active", "value": True}]
    result = post_bundle(client, bundle("transaction", entry("PATCH", "Patient/pp", binary_patch(ops))))
    assert result["entry"][0]["response"]["status"] == "200 OK"
    assert result["entry"][0]["response"]["location"] == "Patient/pp/_history/2"
    current = read(client, "Patient/pp")
    assert current["gender"] == "male" and current["active"] is True and current["meta"]["versionId"] == "2"
    # A failing patch rolls back the whole transaction.
    before = totals(client)
    failing = bundle("transaction", entry("POST", "Patient", patient()),
                     entry("PATCH", "Patient/pp", binary_patch([{"op": "test", "path": "/gender", "value": "x"}])))
    post_bundle(client, failing, 422)
    invalid = bundle("transaction",
                     entry("PATCH", "Patient/pp", binary_patch([{"op": "replace", "path": "/gender", "value": 7}])))
    r = client.post("/fhir", json=invalid)
    assert r.status_code in (400, 422) and r.json()["resourceType"] == "OperationOutcome"
    no_binary = bundle("transaction", entry("PATCH", "Patient/pp", patient()))
    post_bundle(client, no_binary, 400)
    missing = bundle("transaction", entry("PATCH", "Patient/nobody", binary_patch(ops)))
    post_bundle(client, missing, 404)
    wrong_version = bundle("transaction", entry("PATCH", "Patient/pp", binary_patch(ops), ifMatch='W/"1"'))
    post_bundle(client, wrong_version, 412)
    assert totals(client) == before
    assert read(client, "Patient/pp")["meta"]["versionId"] == "2"
    # In a batch too.
    batch = post_bundle(client, bundle("batch", entry("PATCH", "Patient/pp", binary_patch(
        [{"op": "remove", "path": "/active"}]))))
    assert batch["entry"][0]["response"]["status"] == "200 OK"
    assert "active" not in read(client, "Patient/pp")


# --------------------------------------------------------------------------- batch


def test_batch_entries_are_independent(client: TestClient) -> None:
    put(client, patient(id="b1", identifier=[{"system": SYS, "value": "B1"}]))
    body = bundle("batch",
                  entry("POST", "Patient", patient(gender="female")),
                  entry("POST", "Observation", {"resourceType": "Observation", "code": {"text": "no status"}}),
                  entry("GET", "Patient/nobody"),
                  entry("GET", f"Patient?identifier={SYS}|B1"),
                  entry("PUT", "Patient/b1", patient(id="b1", gender="male",
                                                     identifier=[{"system": SYS, "value": "B1"}])),
                  entry("PUT", "Patient/b1", patient(id="mismatch")),
                  entry("DELETE", "Patient/nobody"),
                  entry("POST", "Unicorn", {"resourceType": "Unicorn"}),
                  entry("GET", "Patient/b1/_history/1"),
                  entry("POST", "Patient", patient(), ifNoneExist=f"identifier={SYS}|B1"))
    result = post_bundle(client, body)
    statuses = [e["response"]["status"][:3] for e in result["entry"]]
    assert statuses == ["201", "422", "404", "200", "200", "400", "404", "404", "200", "200"], statuses
    for failed in (1, 2, 5, 6, 7):
        outcome = result["entry"][failed]["response"]["outcome"]
        assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"][0]["severity"] == "error"
        assert "resource" not in result["entry"][failed]
    new_id = created_id(result["entry"][0])
    assert read(client, f"Patient/{new_id}")["gender"] == "female"
    assert [e["resource"]["id"] for e in result["entry"][3]["resource"]["entry"]] == ["b1"]
    assert result["entry"][4]["response"]["location"] == "Patient/b1/_history/2"
    assert read(client, "Patient/b1")["gender"] == "male"
    assert result["entry"][8]["resource"]["meta"]["versionId"] == "1"
    assert result["entry"][9]["resource"]["id"] == "b1"
    assert client.get("/fhir/Observation?_summary=count").json()["total"] == 0
    assert client.get("/fhir/Patient?_summary=count").json()["total"] == 2


# --------------------------------------------------------------------------- malformed bundles


def test_malformed_bundles_are_rejected(client: TestClient) -> None:
    before = totals(client)
    cases: list[Any] = [
        patient(),
        {"resourceType": "Bundle", "type": "collection", "entry": []},
        {"resourceType": "Bundle", "type": "transaction", "entry": {"not": "a list"}},
        bundle("transaction", "not an entry"),  # type: ignore[arg-type]
        bundle("transaction", {"resource": patient()}),
        bundle("transaction", {"request": {"method": "POST"}, "resource": patient()}),
        bundle("transaction", {"request": {"method": "FETCH", "url": "Patient"}}),
        bundle("transaction", entry("POST", "Patient")),
        bundle("batch", entry("PUT", "Patient/x")),
        [1, 2, 3],
    ]
    for body in cases:
        r = client.post("/fhir", json=body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["resourceType"] == "OperationOutcome"
    assert totals(client) == before
    empty = post_bundle(client, {"resourceType": "Bundle", "type": "transaction"})
    assert empty["entry"] == []
