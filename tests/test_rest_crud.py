"""FHIR R4 RESTful CRUD semantics over HTTP: create, read, vread, update, patch, delete, history.

Every test runs on SQLite and PostgreSQL through the `client` fixture and builds the
small resources it needs. References: https://hl7.org/fhir/R4/http.html
"""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import orjson
import pytest
from starlette.testclient import TestClient

from conftest import BASE

JSON = dict[str, Any]
PATCH_JSON = {"Content-Type": "application/json-patch+json"}
INSTANT_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
SUBSETTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}
SYS = "urn:oid:2.16.840.1.113883.2.24.1"  # a made-up identifier namespace


def patient(family: str = "Nguyễn", given: tuple[str, ...] = ("Văn", "An"), **extra: Any) -> JSON:
    return {"resourceType": "Patient", "name": [{"family": family, "given": list(given)}], **extra}


def create(client: TestClient, resource: JSON, **headers: str) -> JSON:
    r = client.post(f"/fhir/{resource['resourceType']}", json=resource, headers=headers)
    assert r.status_code == 201, r.text
    body: JSON = r.json()
    return body


def read(client: TestClient, rtype: str, rid: str) -> JSON:
    r = client.get(f"/fhir/{rtype}/{rid}")
    assert r.status_code == 200, r.text
    body: JSON = r.json()
    return body


def assert_outcome(r: Any, status: int, code: str | None = None) -> JSON:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/fhir+json")
    body: JSON = r.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"], body
    if code is not None:
        assert any(i["code"] == code for i in body["issue"]), body
    return body


def count(client: TestClient, rtype: str, query: str = "") -> int:
    r = client.get(f"/fhir/{rtype}?_summary=count{'&' + query if query else ''}")
    assert r.status_code == 200, r.text
    total: int = r.json()["total"]
    return total


def parse_instant(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


# --------------------------------------------------------------------------- create


def test_create_sets_status_location_etag_last_modified_and_meta(client: TestClient) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    r = client.post("/fhir/Patient", json=patient(id="client-chosen", birthDate="1980-05-02"))
    assert r.status_code == 201, r.text
    assert r.headers["content-type"] == "application/fhir+json; charset=utf-8"
    body = r.json()
    rid = body["id"]
    assert rid != "client-chosen", "POST must ignore a client id and assign its own"
    assert re.fullmatch(r"[A-Za-z0-9\-.]{1,64}", rid)
    assert r.headers["Location"] == f"{BASE}/Patient/{rid}/_history/1"
    assert r.headers["ETag"] == 'W/"1"'
    assert body["meta"]["versionId"] == "1"
    assert INSTANT_RE.match(body["meta"]["lastUpdated"]), body["meta"]
    last_updated = parse_instant(body["meta"]["lastUpdated"])
    last_modified = parsedate_to_datetime(r.headers["Last-Modified"])
    assert last_modified == last_updated.replace(microsecond=0)
    assert before <= last_modified <= datetime.now(UTC)
    assert body["name"] == [{"family": "Nguyễn", "given": ["Văn", "An"]}]
    assert body["birthDate"] == "1980-05-02"
    # The client id did not create a resource of that name.
    assert client.get("/fhir/Patient/client-chosen").status_code == 404


def test_create_keeps_client_meta_tags_but_overrides_version(client: TestClient) -> None:
    tag = {"system": "http://example.org/tags", "code": "vip"}
    body = create(client, patient(meta={"versionId": "99", "lastUpdated": "2001-01-01T00:00:00Z", "tag": [tag]}))
    assert body["meta"]["versionId"] == "1"
    assert body["meta"]["lastUpdated"] != "2001-01-01T00:00:00Z"
    assert body["meta"]["tag"] == [tag]


def test_two_creates_get_distinct_ids(client: TestClient) -> None:
    a, b = create(client, patient()), create(client, patient())
    assert a["id"] != b["id"]
    assert count(client, "Patient") == 2


# --------------------------------------------------------------------------- read / vread


def test_read_returns_stored_resource_with_headers(client: TestClient) -> None:
    created = create(client, patient(gender="female"))
    r = client.get(f"/fhir/Patient/{created['id']}")
    assert r.status_code == 200
    assert r.json() == created
    assert r.headers["ETag"] == 'W/"1"'
    assert parsedate_to_datetime(r.headers["Last-Modified"]) == parse_instant(
        created["meta"]["lastUpdated"]).replace(microsecond=0)
    assert "Location" not in r.headers


def test_vread_returns_each_version(client: TestClient) -> None:
    v1 = create(client, patient(gender="female"))
    rid = v1["id"]
    v2 = client.put(f"/fhir/Patient/{rid}", json={**v1, "gender": "male"}).json()
    r1 = client.get(f"/fhir/Patient/{rid}/_history/1")
    r2 = client.get(f"/fhir/Patient/{rid}/_history/2")
    assert r1.status_code == 200 and r2.status_code == 200
    assert r1.json() == v1 and r1.json()["gender"] == "female"
    assert r2.json() == v2 and r2.json()["gender"] == "male"
    assert r1.headers["ETag"] == 'W/"1"' and r2.headers["ETag"] == 'W/"2"'
    assert_outcome(client.get(f"/fhir/Patient/{rid}/_history/3"), 404, "not-found")
    assert_outcome(client.get(f"/fhir/Patient/{rid}/_history/abc"), 400)
    assert_outcome(client.get("/fhir/Patient/no-such-id/_history/1"), 404)


def test_head_returns_headers_without_body(client: TestClient) -> None:
    created = create(client, patient())
    r = client.head(f"/fhir/Patient/{created['id']}")
    assert r.status_code == 200
    assert r.content == b""
    assert r.headers["ETag"] == 'W/"1"'
    assert "Last-Modified" in r.headers
    assert client.head("/fhir/Patient/does-not-exist").status_code == 404
    r = client.head("/fhir/Patient?_id=" + created["id"])
    assert r.status_code == 200 and r.content == b""


# --------------------------------------------------------------------------- update


def test_update_increments_version_and_keeps_old_one(client: TestClient) -> None:
    v1 = create(client, patient(gender="female"))
    rid = v1["id"]
    time.sleep(0.002)
    r = client.put(f"/fhir/Patient/{rid}", json={**v1, "gender": "male", "birthDate": "1990-01-01"})
    assert r.status_code == 200, r.text
    v2 = r.json()
    assert v2["id"] == rid
    assert v2["meta"]["versionId"] == "2"
    assert r.headers["ETag"] == 'W/"2"'
    assert parse_instant(v2["meta"]["lastUpdated"]) > parse_instant(v1["meta"]["lastUpdated"])
    assert "Location" not in r.headers or r.headers["Location"].endswith("/_history/2")
    assert read(client, "Patient", rid)["gender"] == "male"
    r3 = client.put(f"/fhir/Patient/{rid}", json={"resourceType": "Patient", "id": rid, "active": True})
    assert r3.status_code == 200 and r3.json()["meta"]["versionId"] == "3"
    current = read(client, "Patient", rid)
    assert "name" not in current, "an update replaces the whole resource"
    assert current["active"] is True
    assert client.get(f"/fhir/Patient/{rid}/_history/1").json()["gender"] == "female"
    assert count(client, "Patient") == 1


def test_update_as_create_with_client_id(client: TestClient) -> None:
    r = client.put("/fhir/Patient/bn-0001", json=patient(id="bn-0001"))
    assert r.status_code == 201, r.text
    assert r.headers["Location"] == f"{BASE}/Patient/bn-0001/_history/1"
    assert r.headers["ETag"] == 'W/"1"'
    assert r.json()["meta"]["versionId"] == "1"
    assert read(client, "Patient", "bn-0001")["name"][0]["family"] == "Nguyễn"
    # The same PUT again is now an ordinary update.
    r = client.put("/fhir/Patient/bn-0001", json=patient(id="bn-0001", gender="male"))
    assert r.status_code == 200 and r.json()["meta"]["versionId"] == "2"


def test_update_with_if_match(client: TestClient) -> None:
    v1 = create(client, patient())
    rid = v1["id"]
    ok = client.put(f"/fhir/Patient/{rid}", json={**v1, "gender": "male"}, headers={"If-Match": 'W/"1"'})
    assert ok.status_code == 200 and ok.json()["meta"]["versionId"] == "2"
    stale = client.put(f"/fhir/Patient/{rid}", json={**v1, "gender": "female"}, headers={"If-Match": 'W/"1"'})
    assert_outcome(stale, 412)
    assert read(client, "Patient", rid)["gender"] == "male"
    assert read(client, "Patient", rid)["meta"]["versionId"] == "2"
    # An If-Match on a resource that does not exist cannot be satisfied.
    assert_outcome(client.put("/fhir/Patient/ghost", json=patient(id="ghost"), headers={"If-Match": 'W/"1"'}), 412)
    assert client.get("/fhir/Patient/ghost").status_code == 404


def test_concurrent_updates_with_same_if_match_one_wins(client: TestClient) -> None:
    v1 = create(client, patient())
    rid = v1["id"]

    def put(gender: str) -> int:
        r = client.put(f"/fhir/Patient/{rid}", json={**v1, "gender": gender}, headers={"If-Match": 'W/"1"'})
        assert r.status_code in (200, 412), r.text
        return r.status_code

    with ThreadPoolExecutor(max_workers=2) as pool:
        statuses = sorted(pool.map(put, ["male", "female"]))
    assert statuses == [200, 412]
    final = read(client, "Patient", rid)
    assert final["meta"]["versionId"] == "2"
    history = client.get(f"/fhir/Patient/{rid}/_history").json()
    assert history["total"] == 2


def _is_postgres(client: TestClient) -> bool:
    return not client.app.state.api.service.db.sqlite  # type: ignore[attr-defined]


def _wait_until_blocked(client: TestClient) -> None:
    """Wait until another session waits on a lock (PostgreSQL); SQLite writers queue on BEGIN IMMEDIATE."""
    if not _is_postgres(client):
        time.sleep(0.3)
        return
    from sqlalchemy import text

    engine = client.app.state.api.service.db.engine  # type: ignore[attr-defined]
    deadline = time.monotonic() + 10
    with engine.connect() as conn:
        while time.monotonic() < deadline:
            waiting = conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                        "AND datname = current_database()")).scalar_one()
            conn.rollback()
            if waiting:
                return
            time.sleep(0.02)
    raise AssertionError("the second writer never waited for the row lock")


@pytest.mark.parametrize("method", ["PUT", "PUT-If-Match", "PATCH", "DELETE"])
def test_writer_queued_behind_a_concurrent_update_sees_its_version(client: TestClient, method: str) -> None:
    """A write that waits for another transaction's row lock must then act on the new current version.

    Regression test: on PostgreSQL, Store.current(lock=True) once locked with FOR UPDATE over the join of
    resource and resource_version on the current version; when the lock holder committed a new version,
    READ COMMITTED re-checked the join against the old version row, found nothing, and the queued writer
    was told the resource did not exist (PUT then tried to create it: 409; PATCH/DELETE: 404; If-Match: a
    412 blaming a missing resource). The second writer here is made to wait on the lock deterministically.
    """
    v1 = create(client, patient())
    rid = v1["id"]
    db = client.app.state.api.service.db  # type: ignore[attr-defined]

    def second_writer() -> Any:
        if method == "PUT":
            return client.put(f"/fhir/Patient/{rid}", json={**v1, "gender": "female"})
        if method == "PUT-If-Match":
            return client.put(f"/fhir/Patient/{rid}", json={**v1, "gender": "female"}, headers={"If-Match": 'W/"1"'})
        if method == "PATCH":
            ops = orjson.dumps([{"op": "add", "path": "/active", "value": True}])
            return client.patch(f"/fhir/Patient/{rid}", content=ops, headers=PATCH_JSON)
        return client.delete(f"/fhir/Patient/{rid}")

    with ThreadPoolExecutor(max_workers=1) as pool:
        with db.begin() as store:
            current = store.current("Patient", rid, lock=True)
            store.write(current, {**v1, "gender": "male"}, "PUT")
            future = pool.submit(second_writer)
            _wait_until_blocked(client)
        r = future.result(timeout=60)
    if method == "PUT-If-Match":
        outcome = assert_outcome(r, 412)
        assert "current version is 2" in outcome["issue"][0]["diagnostics"], outcome
        assert read(client, "Patient", rid)["gender"] == "male"
        return
    assert r.status_code in (200, 204), r.text
    history = client.get(f"/fhir/Patient/{rid}/_history").json()
    assert history["total"] == 3
    assert [e["request"]["method"] for e in history["entry"]] == [method, "PUT", "POST"]
    if method == "DELETE":
        assert client.get(f"/fhir/Patient/{rid}").status_code == 410
    else:
        assert r.json()["meta"]["versionId"] == "3"


# --------------------------------------------------------------------------- conditional create / update


def test_conditional_create_if_none_exist(client: TestClient) -> None:
    ident = {"system": SYS, "value": "CCCD-001"}
    first = client.post("/fhir/Patient", json=patient(identifier=[ident]),
                        headers={"If-None-Exist": f"identifier={SYS}|CCCD-001"})
    assert first.status_code == 201, first.text
    rid = first.json()["id"]
    again = client.post("/fhir/Patient", json=patient(identifier=[ident], gender="male"),
                        headers={"If-None-Exist": f"identifier={SYS}|CCCD-001"})
    assert again.status_code == 200, again.text
    assert again.json()["id"] == rid
    assert again.json()["meta"]["versionId"] == "1"
    assert "gender" not in again.json(), "the existing resource is returned untouched"
    assert count(client, "Patient") == 1
    # Two matches: the server cannot choose.
    create(client, patient(identifier=[{"system": SYS, "value": "DUP"}]))
    create(client, patient(identifier=[{"system": SYS, "value": "DUP"}]))
    dup = client.post("/fhir/Patient", json=patient(), headers={"If-None-Exist": f"identifier={SYS}|DUP"})
    assert_outcome(dup, 412)
    assert count(client, "Patient") == 3
    # Unknown parameters in a condition are an error, never silently ignored.
    bad = client.post("/fhir/Patient", json=patient(), headers={"If-None-Exist": "no-such-param=1"})
    assert_outcome(bad, 400)
    assert count(client, "Patient") == 3


def test_conditional_update(client: TestClient) -> None:
    url = f"/fhir/Patient?identifier={SYS}|CU-1"
    body = patient(identifier=[{"system": SYS, "value": "CU-1"}])
    created = client.put(url, json=body)
    assert created.status_code == 201, created.text
    rid = created.json()["id"]
    assert created.headers["Location"] == f"{BASE}/Patient/{rid}/_history/1"
    updated = client.put(url, json={**body, "gender": "female"})
    assert updated.status_code == 200, updated.text
    assert updated.json()["id"] == rid
    assert updated.json()["meta"]["versionId"] == "2"
    assert read(client, "Patient", rid)["gender"] == "female"
    # A body id that differs from the match is refused.
    assert_outcome(client.put(url, json={**body, "id": "someone-else"}), 400)
    # Several matches: 412, nothing changes.
    for _ in range(2):
        create(client, patient(identifier=[{"system": SYS, "value": "CU-MANY"}]))
    many = client.put(f"/fhir/Patient?identifier={SYS}|CU-MANY", json=patient(gender="male"))
    assert_outcome(many, 412)
    assert count(client, "Patient", "gender=male") == 0
    assert count(client, "Patient") == 3


# --------------------------------------------------------------------------- patch


def test_json_patch(client: TestClient) -> None:
    v1 = create(client, patient(gender="female"))
    rid = v1["id"]
    ops = [{"op": "replace", "path": "/gender", "value": "male"},
           {"op": "add", "path": "/birthDate", "value": "1975-03-04"},
           {"op": "add", "path": "/name/0/given/-", "value": "Bình"}]
    r = client.patch(f"/fhir/Patient/{rid}", content=orjson.dumps(ops), headers=PATCH_JSON)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["meta"]["versionId"] == "2" and r.headers["ETag"] == 'W/"2"'
    assert body["gender"] == "male" and body["birthDate"] == "1975-03-04"
    assert body["name"][0]["given"] == ["Văn", "An", "Bình"]
    assert read(client, "Patient", rid) == body
    # A failing `test` op, or a path that does not exist: 422 and no new version.
    for bad in ([{"op": "test", "path": "/gender", "value": "female"}],
                [{"op": "remove", "path": "/deceasedBoolean"}],
                [{"op": "frobnicate", "path": "/gender"}]):
        r = client.patch(f"/fhir/Patient/{rid}", content=orjson.dumps(bad), headers=PATCH_JSON)
        assert_outcome(r, 422)
    # Changing the id or the type is refused.
    for bad in ([{"op": "replace", "path": "/id", "value": "other"}],
                [{"op": "replace", "path": "/resourceType", "value": "Practitioner"}]):
        r = client.patch(f"/fhir/Patient/{rid}", content=orjson.dumps(bad), headers=PATCH_JSON)
        assert_outcome(r, 422)
    # A patch whose result is not valid FHIR is refused.
    r = client.patch(f"/fhir/Patient/{rid}", content=orjson.dumps([{"op": "replace", "path": "/gender",
                                                                     "value": "m"}]), headers=PATCH_JSON)
    assert r.status_code in (400, 422) and r.json()["resourceType"] == "OperationOutcome"
    assert read(client, "Patient", rid)["meta"]["versionId"] == "2"


def test_json_patch_preconditions(client: TestClient) -> None:
    rid = create(client, patient())["id"]
    ops = orjson.dumps([{"op": "add", "path": "/active", "value": True}])
    assert_outcome(client.patch(f"/fhir/Patient/{rid}", content=ops, headers={**PATCH_JSON, "If-Match": 'W/"7"'}),
                   412)
    r = client.patch(f"/fhir/Patient/{rid}", content=ops, headers={**PATCH_JSON, "If-Match": 'W/"1"'})
    assert r.status_code == 200 and r.json()["active"] is True
    assert_outcome(client.patch(f"/fhir/Patient/{rid}", content=ops,
                                headers={"Content-Type": "application/xml"}), 415)
    assert_outcome(client.patch(f"/fhir/Patient/{rid}", content=b'{"op": "add"}', headers=PATCH_JSON), 400)
    assert_outcome(client.patch("/fhir/Patient/nobody", content=ops, headers=PATCH_JSON), 404)


# --------------------------------------------------------------------------- delete


def test_delete_is_logical(client: TestClient) -> None:
    v1 = create(client, patient(gender="female"))
    rid = v1["id"]
    client.put(f"/fhir/Patient/{rid}", json={**v1, "gender": "male"})
    r = client.delete(f"/fhir/Patient/{rid}")
    assert r.status_code in (200, 204), r.text
    if r.status_code == 200 and r.content:
        assert r.json()["resourceType"] == "OperationOutcome"
    gone = assert_outcome(client.get(f"/fhir/Patient/{rid}"), 410)
    assert gone["issue"][0]["code"] == "deleted"
    assert count(client, "Patient") == 0
    assert client.get(f"/fhir/Patient?_id={rid}").json().get("entry", []) == []
    # History keeps every version, the delete on top.
    history = client.get(f"/fhir/Patient/{rid}/_history").json()
    assert history["type"] == "history" and history["total"] == 3
    methods = [e["request"]["method"] for e in history["entry"]]
    assert methods == ["DELETE", "PUT", "POST"]
    assert "resource" not in history["entry"][0]
    assert history["entry"][0]["request"]["url"] == f"Patient/{rid}"
    # Old versions stay readable; the delete version is gone.
    assert client.get(f"/fhir/Patient/{rid}/_history/1").json()["gender"] == "female"
    assert client.get(f"/fhir/Patient/{rid}/_history/2").json()["gender"] == "male"
    assert_outcome(client.get(f"/fhir/Patient/{rid}/_history/3"), 410)
    # Deleting again is harmless; deleting something unknown is 404.
    assert client.delete(f"/fhir/Patient/{rid}").status_code in (200, 204)
    assert client.get(f"/fhir/Patient/{rid}/_history").json()["total"] == 3
    assert_outcome(client.delete("/fhir/Patient/never-existed"), 404)
    # An update brings the resource back as a new version.
    back = client.put(f"/fhir/Patient/{rid}", json=patient(id=rid))
    assert back.status_code in (200, 201)
    assert back.json()["meta"]["versionId"] == "4"
    assert read(client, "Patient", rid)["meta"]["versionId"] == "4"


def test_conditional_delete(client: TestClient) -> None:
    keep = create(client, patient(identifier=[{"system": SYS, "value": "KEEP"}]))
    target = create(client, patient(identifier=[{"system": SYS, "value": "DEL-1"}]))
    r = client.delete(f"/fhir/Patient?identifier={SYS}|DEL-1")
    assert r.status_code in (200, 204), r.text
    assert client.get(f"/fhir/Patient/{target['id']}").status_code == 410
    assert read(client, "Patient", keep["id"])["meta"]["versionId"] == "1"
    # No match: success, nothing deleted.
    r = client.delete(f"/fhir/Patient?identifier={SYS}|NOBODY")
    assert r.status_code in (200, 204)
    assert count(client, "Patient") == 1
    # Several matches: 412 (this server supports single deletes only), nothing deleted.
    create(client, patient(identifier=[{"system": SYS, "value": "TWIN"}]))
    create(client, patient(identifier=[{"system": SYS, "value": "TWIN"}]))
    assert_outcome(client.delete(f"/fhir/Patient?identifier={SYS}|TWIN"), 412)
    assert count(client, "Patient") == 3
    assert_outcome(client.delete("/fhir/Patient"), 400)


# --------------------------------------------------------------------------- Prefer, formats, shaping


def test_prefer_return(client: TestClient) -> None:
    minimal = client.post("/fhir/Patient", json=patient(), headers={"Prefer": "return=minimal"})
    assert minimal.status_code == 201
    assert minimal.content == b""
    assert minimal.headers["ETag"] == 'W/"1"'
    location = minimal.headers["Location"]
    assert location.startswith(f"{BASE}/Patient/") and location.endswith("/_history/1")
    rid = location.split("/")[-3]
    assert read(client, "Patient", rid)["meta"]["versionId"] == "1"

    rep = client.put(f"/fhir/Patient/{rid}", json=patient(id=rid, gender="male"),
                     headers={"Prefer": "return=representation"})
    assert rep.status_code == 200 and rep.json()["gender"] == "male"

    oo = client.put(f"/fhir/Patient/{rid}", json=patient(id=rid, gender="female"),
                    headers={"Prefer": "return=OperationOutcome"})
    assert oo.status_code == 200
    outcome = oo.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["severity"] == "information"
    assert oo.headers["ETag"] == 'W/"3"'
    assert read(client, "Patient", rid)["gender"] == "female"

    ops = orjson.dumps([{"op": "add", "path": "/active", "value": False}])
    quiet = client.patch(f"/fhir/Patient/{rid}", content=ops, headers={**PATCH_JSON, "Prefer": "return=minimal"})
    assert quiet.status_code == 200 and quiet.content == b""
    assert quiet.headers["ETag"] == 'W/"4"'


def test_format_negotiation(client: TestClient) -> None:
    rid = create(client, patient())["id"]
    for fmt in ("json", "application/fhir+json", "application/json"):
        r = client.get(f"/fhir/Patient/{rid}", params={"_format": fmt})
        assert r.status_code == 200, fmt
        assert r.json()["id"] == rid
    for fmt in ("xml", "application/fhir+xml", "text/xml"):
        assert_outcome(client.get(f"/fhir/Patient/{rid}", params={"_format": fmt}), 406)
    assert_outcome(client.get(f"/fhir/Patient/{rid}", params={"_format": "turtle"}), 406)
    assert_outcome(client.get(f"/fhir/Patient/{rid}", headers={"Accept": "application/fhir+xml"}), 406)
    assert_outcome(client.get("/fhir/Patient", headers={"Accept": "application/xml"}), 406)
    for accept in ("application/fhir+json", "application/json", "*/*",
                   "application/fhir+xml;q=0.9, application/fhir+json"):
        r = client.get(f"/fhir/Patient/{rid}", headers={"Accept": accept})
        assert r.status_code == 200, accept
    # _format wins over Accept.
    r = client.get(f"/fhir/Patient/{rid}?_format=json", headers={"Accept": "application/fhir+xml"})
    assert r.status_code == 200
    # An XML body is refused with 415 rather than misread.
    r = client.post("/fhir/Patient", content=b"<Patient xmlns='http://hl7.org/fhir'/>",
                    headers={"Content-Type": "application/fhir+xml"})
    assert_outcome(r, 415)
    assert count(client, "Patient") == 1


def test_pretty_printing(client: TestClient) -> None:
    created = create(client, patient())
    rid = created["id"]
    compact = client.get(f"/fhir/Patient/{rid}")
    pretty = client.get(f"/fhir/Patient/{rid}?_pretty=true")
    assert b"\n" not in compact.content
    assert pretty.content.startswith(b"{\n  \"")
    assert b'\n    {\n      "family"' in pretty.content
    assert orjson.loads(pretty.content) == orjson.loads(compact.content)
    assert b"\n" not in client.get(f"/fhir/Patient/{rid}?_pretty=false").content
    search = client.get(f"/fhir/Patient?_id={rid}&_pretty=true")
    assert search.content.startswith(b"{\n  \"resourceType\"")
    assert "_pretty" not in search.json()["link"][0]["url"]


def test_summary_and_elements_on_read(client: TestClient) -> None:
    full = patient(birthDate="1980-05-02", gender="male",
                   text={"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">An</div>'},
                   maritalStatus={"text": "Married"},
                   contact=[{"name": {"family": "Trần"}}],
                   meta={"tag": [{"system": "http://example.org/t", "code": "x"}]})
    rid = create(client, full)["id"]

    summary = client.get(f"/fhir/Patient/{rid}?_summary=true").json()
    assert summary["name"] and summary["birthDate"] == "1980-05-02" and summary["gender"] == "male"
    for not_summary in ("text", "maritalStatus", "contact"):
        assert not_summary not in summary, not_summary
    assert SUBSETTED in summary["meta"]["tag"]
    assert {"system": "http://example.org/t", "code": "x"} in summary["meta"]["tag"]

    text = client.get(f"/fhir/Patient/{rid}?_summary=text").json()
    assert set(text) == {"resourceType", "id", "meta", "text"} and SUBSETTED in text["meta"]["tag"]

    data = client.get(f"/fhir/Patient/{rid}?_summary=data").json()
    assert "text" not in data and data["contact"] and SUBSETTED in data["meta"]["tag"]

    unmarked = client.get(f"/fhir/Patient/{rid}?_summary=false").json()
    assert unmarked["contact"] and SUBSETTED not in unmarked["meta"]["tag"]

    elements = client.get(f"/fhir/Patient/{rid}?_elements=birthDate,gender").json()
    assert set(elements) == {"resourceType", "id", "meta", "birthDate", "gender"}
    assert SUBSETTED in elements["meta"]["tag"]

    # The stored resource is unchanged by shaped reads.
    assert SUBSETTED not in read(client, "Patient", rid)["meta"]["tag"]
    assert_outcome(client.get(f"/fhir/Patient/{rid}?_summary=everything"), 400)


# --------------------------------------------------------------------------- history


def _walk_history(client: TestClient, url: str) -> list[JSON]:
    entries: list[JSON] = []
    seen_urls = set()
    while url:
        assert url not in seen_urls, "paging loops"
        seen_urls.add(url)
        r = client.get(url)
        assert r.status_code == 200, r.text
        page = r.json()
        assert page["type"] == "history"
        entries += page.get("entry", [])
        url = next((link["url"] for link in page["link"] if link["relation"] == "next"), "")
    return entries


def test_instance_history(client: TestClient) -> None:
    v1 = create(client, patient())
    rid = v1["id"]
    for gender in ("male", "female", "other"):
        assert client.put(f"/fhir/Patient/{rid}", json={**v1, "gender": gender}).status_code == 200
    other = create(client, patient(family="Lê"))
    h = client.get(f"/fhir/Patient/{rid}/_history").json()
    assert h["resourceType"] == "Bundle" and h["type"] == "history"
    assert h["total"] == 4
    assert [e["resource"]["meta"]["versionId"] for e in h["entry"]] == ["4", "3", "2", "1"]
    assert {e["resource"]["id"] for e in h["entry"]} == {rid}
    assert [e["request"]["method"] for e in h["entry"]] == ["PUT", "PUT", "PUT", "POST"]
    assert all(e["fullUrl"] == f"{BASE}/Patient/{rid}" for e in h["entry"])
    assert [e["response"]["etag"] for e in h["entry"]] == ['W/"4"', 'W/"3"', 'W/"2"', 'W/"1"']
    assert h["entry"][0]["resource"]["gender"] == "other"
    assert other["id"] not in str(h)
    assert_outcome(client.get("/fhir/Patient/nobody/_history"), 404)


def test_type_and_system_history(client: TestClient) -> None:
    p = create(client, patient())
    client.put(f"/fhir/Patient/{p['id']}", json={**p, "gender": "male"})
    o = create(client, {"resourceType": "Organization", "name": "Bệnh viện Chợ Rẫy"})
    client.delete(f"/fhir/Organization/{o['id']}")
    pt = client.get("/fhir/Patient/_history").json()
    assert pt["total"] == 2
    assert {e["fullUrl"] for e in pt["entry"]} == {f"{BASE}/Patient/{p['id']}"}
    org = client.get("/fhir/Organization/_history").json()
    assert org["total"] == 2
    assert [e["request"]["method"] for e in org["entry"]] == ["DELETE", "POST"]
    system = client.get("/fhir/_history").json()
    assert system["total"] == 4
    assert [(e["fullUrl"].split("/")[-2], e["request"]["method"]) for e in system["entry"]] == [
        ("Organization", "DELETE"), ("Organization", "POST"), ("Patient", "PUT"), ("Patient", "POST")]
    assert_outcome(client.get("/fhir/NotAType/_history"), 404)


def test_history_since(client: TestClient) -> None:
    old = create(client, patient(family="Cũ"))
    time.sleep(0.01)
    new = create(client, patient(family="Mới"))
    client.put(f"/fhir/Patient/{new['id']}", json={**new, "gender": "male"})
    since = new["meta"]["lastUpdated"]
    for url in (f"/fhir/_history?_since={since}", f"/fhir/Patient/_history?_since={since}"):
        h = client.get(url).json()
        assert h["total"] == 2, url
        assert {e["resource"]["id"] for e in h["entry"]} == {new["id"]}
    h = client.get(f"/fhir/Patient/{old['id']}/_history", params={"_since": since}).json()
    assert h["total"] == 0 and h.get("entry", []) == []
    # A timezone offset ('+' must survive URL decoding as a space) and day precision are accepted.
    h = client.get("/fhir/_history", params={"_since": "2000-01-01T07:00:00+07:00"}).json()
    assert h["total"] == 3
    assert client.get("/fhir/_history?_since=2000-01-01T07:00:00+07:00").json()["total"] == 3
    assert client.get("/fhir/_history?_since=2999-01-01").json()["total"] == 0
    assert_outcome(client.get("/fhir/_history?_since=yesterday"), 400)


def test_history_paging_walks_every_version_once(client: TestClient) -> None:
    v1 = create(client, patient())
    rid = v1["id"]
    for i in range(6):
        client.put(f"/fhir/Patient/{rid}", json={**v1, "birthDate": f"19{60 + i}-01-01"})
    client.delete(f"/fhir/Patient/{rid}")
    first = client.get(f"/fhir/Patient/{rid}/_history?_count=3").json()
    assert first["total"] == 8 and len(first["entry"]) == 3
    relations = {link["relation"] for link in first["link"]}
    assert {"self", "next"} <= relations and "previous" not in relations
    entries = _walk_history(client, f"/fhir/Patient/{rid}/_history?_count=3")
    versions = [e["response"]["etag"] for e in entries]
    assert versions == [f'W/"{v}"' for v in range(8, 0, -1)]
    assert entries[0]["request"]["method"] == "DELETE"
    second_url = next(link["url"] for link in first["link"] if link["relation"] == "next")
    second = client.get(second_url).json()
    prev_url = next(link["url"] for link in second["link"] if link["relation"] == "previous")
    assert client.get(prev_url).json()["entry"] == first["entry"]
    # A version written after the first page does not shift the later pages.
    assert client.put(f"/fhir/Patient/{rid}", json=patient(id=rid)).status_code in (200, 201)
    rest = _walk_history(client, second_url)
    assert [e["response"]["etag"] for e in rest] == [f'W/"{v}"' for v in range(5, 0, -1)]
    assert client.get(f"/fhir/Patient/{rid}/_history").json()["total"] == 9
    assert_outcome(client.get("/fhir/_history?_count=abc"), 400)
    assert_outcome(client.get("/fhir/_history?_count=-1"), 400)


def test_history_paging_is_stable_while_writing(client: TestClient) -> None:
    ids = [create(client, patient(family=f"F{i}"))["id"] for i in range(5)]
    first = client.get("/fhir/Patient/_history?_count=2").json()
    time.sleep(0.002)
    create(client, patient(family="Late"))
    seen = [e["fullUrl"].rsplit("/", 1)[1] for e in first["entry"]]
    url = next(link["url"] for link in first["link"] if link["relation"] == "next")
    seen += [e["fullUrl"].rsplit("/", 1)[1] for e in _walk_history(client, url)]
    assert sorted(seen) == sorted(ids)


@pytest.mark.parametrize("method", ["POST", "PUT"])
def test_history_entry_request_of_create(client: TestClient, method: str) -> None:
    if method == "POST":
        rid = create(client, patient())["id"]
    else:
        rid = "put-created"
        assert client.put(f"/fhir/Patient/{rid}", json=patient(id=rid)).status_code == 201
    (entry,) = client.get(f"/fhir/Patient/{rid}/_history").json()["entry"]
    assert entry["request"]["method"] == method
    # R4 Bundle.entry.request.url for a create is the type; for PUT it is Type/id.
    assert entry["request"]["url"] == ("Patient" if method == "POST" else f"Patient/{rid}")
    assert entry["response"]["status"].startswith("20")
