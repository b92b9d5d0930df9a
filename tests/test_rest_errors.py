"""Every refusal is an OperationOutcome with the right status, never a 500, on SQLite and PostgreSQL.

Covers malformed bodies, size and nesting limits, unknown types and ids, invalid search values,
SQL-injection attempts in every kind of parameter (nothing extra returned, tables intact) and
Hypothesis fuzzing of query strings and bodies.
"""

from __future__ import annotations

import string
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, inspect, select
from starlette.testclient import TestClient

JSON = dict[str, Any]
SYS = "urn:oid:2.16.840.1.113883.2.24.1"
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def assert_outcome(r: Any, status: int) -> JSON:
    assert r.status_code == status, f"{r.request.method} {r.request.url}: {r.status_code} {r.text[:300]}"
    assert r.headers["content-type"].startswith("application/fhir+json"), r.headers
    body: JSON = r.json()
    assert body["resourceType"] == "OperationOutcome", body
    assert body["issue"] and all(i["severity"] in ("fatal", "error") for i in body["issue"]), body
    return body


def assert_fhir(r: Any) -> JSON:
    """Any answer: never a server error, always JSON FHIR (a Bundle, a resource or an OperationOutcome)."""
    assert r.status_code < 500, f"{r.request.method} {r.request.url}: {r.status_code} {r.text[:500]}"
    if not r.content:
        return {}
    body: JSON = r.json()
    assert isinstance(body, dict) and isinstance(body.get("resourceType"), str), body
    if r.status_code >= 400:
        assert body["resourceType"] == "OperationOutcome", body
    return body


def count(client: TestClient, rtype: str) -> int:
    total: int = client.get(f"/fhir/{rtype}?_summary=count").json()["total"]
    return total


def seed(client: TestClient) -> None:
    for i, family in enumerate(("Nguyễn", "Trần", "Lê")):
        r = client.put(f"/fhir/Patient/e{i}", json={
            "resourceType": "Patient", "id": f"e{i}", "name": [{"family": family}], "gender": "male",
            "birthDate": f"198{i}-01-01", "identifier": [{"system": SYS, "value": f"ID-{i}"}]})
        assert r.status_code == 201
    r = client.put("/fhir/Observation/eo", json={
        "resourceType": "Observation", "id": "eo", "status": "final", "code": {"text": "x"},
        "subject": {"reference": "Patient/e0"}, "valueQuantity": {"value": 5, "unit": "mg"}})
    assert r.status_code == 201


# --------------------------------------------------------------------------- bodies


def test_malformed_json_is_400(client: TestClient) -> None:
    bad_bodies = [b'{"resourceType": "Patient",', b"{'resourceType': 'Patient'}", b"", b"   ", b"null", b"[]",
                  b'"Patient"', b"42", b'{"resourceType": 5}', b'{"name": []}', b"\xff\xfe{}", b'{"a": NaN}',
                  b'{"resourceType":"Patient","name":[{"family":"\\ud800"}]}']
    for raw in bad_bodies:
        for method, url in (("POST", "/fhir/Patient"), ("PUT", "/fhir/Patient/m1")):
            assert_outcome(client.request(method, url, content=raw,
                                          headers={"Content-Type": "application/fhir+json"}), 400)
    for raw in (b'{"resourceType": "Bundle", "type": "transaction",', b"", b"[1]"):
        assert_outcome(client.post("/fhir", content=raw), 400)
    assert count(client, "Patient") == 0


def test_wrong_type_and_id_mismatch_are_400(client: TestClient) -> None:
    obs = {"resourceType": "Observation", "status": "final", "code": {"text": "x"}}
    body = assert_outcome(client.post("/fhir/Patient", json=obs), 400)
    assert "Observation" in body["issue"][0]["diagnostics"]
    assert_outcome(client.put("/fhir/Patient/w1", json={**obs, "id": "w1"}), 400)
    assert_outcome(client.put("/fhir/Patient/w1", json={"resourceType": "Patient", "id": "w2"}), 400)
    assert_outcome(client.put("/fhir/Patient/w1", json={"resourceType": "Patient"}), 400)
    assert_outcome(client.put("/fhir/Patient", json={"resourceType": "Patient"}), 400)
    assert_outcome(client.post("/fhir/Patient", json={"resourceType": "Patient", "unknownElement": 1}), 400)
    assert_outcome(client.post("/fhir/Patient", json={"resourceType": "Patient", "gender": "m"}), 422)
    assert_outcome(client.post("/fhir/Patient", json={"resourceType": "Patient", "birthDate": "2021-02-30"}), 422)
    assert count(client, "Patient") == 0
    assert count(client, "Observation") == 0


@pytest.fixture
def small_client(client: TestClient, db_url: str) -> Iterator[TestClient]:
    """A second app on the same database with a 1,000-byte body limit."""
    from lienthong.api.app import ApiSettings
    from lienthong.node import create_app

    app = create_app(db_url, ApiSettings(max_body_bytes=1000), secure=False)
    with TestClient(app, base_url="http://testserver") as c:
        yield c
    app.state.api.service.db.engine.dispose()


def test_body_over_the_size_limit_is_413(client: TestClient, small_client: TestClient) -> None:
    big = {"resourceType": "Patient", "name": [{"family": "Nguyễn", "given": ["Văn"] * 150}]}
    raw = orjson.dumps(big)
    assert len(raw) > 1000
    assert_outcome(small_client.post("/fhir/Patient", content=raw), 413)
    assert_outcome(small_client.put("/fhir/Patient/big", content=raw), 413)

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while streaming
        for i in range(0, len(raw), 100):
            yield raw[i : i + 100]

    assert_outcome(small_client.post("/fhir/Patient", content=chunks()), 413)
    tx = {"resourceType": "Bundle", "type": "transaction",
          "entry": [{"request": {"method": "POST", "url": "Patient"}, "resource": big}]}
    assert_outcome(small_client.post("/fhir", json=tx), 413)
    assert count(client, "Patient") == 0
    # Under the limit the same app accepts; the default app accepts the big body.
    assert small_client.post("/fhir/Patient", json={"resourceType": "Patient"}).status_code == 201
    assert client.post("/fhir/Patient", content=raw).status_code == 201
    assert count(client, "Patient") == 2


def test_absurd_nesting_is_400(client: TestClient) -> None:
    ext: JSON = {"url": "http://example.org/x", "valueString": "đáy"}
    for _ in range(80):
        ext = {"url": "http://example.org/x", "extension": [ext]}
    assert_outcome(client.post("/fhir/Patient", json={"resourceType": "Patient", "extension": [ext]}), 400)
    deep = b"[" * 100_000 + b"]" * 100_000
    assert_outcome(client.post("/fhir/Patient", content=deep), 400)
    assert_outcome(client.post("/fhir", content=b'{"resourceType":"Bundle","x":' + deep + b"}"), 400)
    assert count(client, "Patient") == 0


def test_nul_characters_are_refused_on_every_backend(client: TestClient) -> None:
    """PostgreSQL cannot store or compare NUL; both backends must refuse it the same way."""
    raw = b'{"resourceType":"Patient","name":[{"family":"a\\u0000b"}]}'
    assert_outcome(client.post("/fhir/Patient", content=raw), 400)
    assert_outcome(client.put("/fhir/Patient/n1", content=raw.replace(b"{", b'{"id":"n1",', 1)), 400)
    tx = b'{"resourceType":"Bundle","type":"transaction","entry":[{"request":{"method":"POST","url":"Patient"},' \
         b'"resource":' + raw + b"}]}"
    assert_outcome(client.post("/fhir", content=tx), 400)
    seed(client)
    for query in ("name=a%00b", "identifier=a%00b", "_id=a%00b", "_has:Observation:patient:code=%00",
                  "gender=male%00", "birthdate=1980%00", "_tag=%00|x"):
        assert_outcome(client.get(f"/fhir/Patient?{query}"), 400)
    assert_outcome(client.post("/fhir/Patient", json={"resourceType": "Patient"},
                               headers={"If-None-Exist": "name=a%00b"}), 400)
    assert_outcome(client.get("/fhir/$export-poll-status?_jobId=a%00b"), 404)
    assert_outcome(client.get("/fhir/$export-file/a%00b/Patient-0.ndjson"), 404)
    assert_outcome(client.get("/fhir/Patient/e0%00"), 400)
    # An escaped backslash followed by "u0000" is ordinary text.
    ok = client.post("/fhir/Patient", content=b'{"resourceType":"Patient","name":[{"family":"a\\\\u0000b"}]}')
    assert ok.status_code == 201 and ok.json()["name"][0]["family"] == "a\\u0000b"
    assert count(client, "Patient") == 4


# --------------------------------------------------------------------------- unknown types, ids, routes


def test_unknown_types_ids_and_routes(client: TestClient) -> None:
    seed(client)
    for method, url in (("GET", "/fhir/Unicorn"), ("GET", "/fhir/Unicorn/1"), ("DELETE", "/fhir/Unicorn/1"),
                        ("GET", "/fhir/patient"), ("GET", "/fhir/Unicorn/_history"), ("GET", "/fhir/Unicorn/1/_history"),
                        ("GET", "/fhir/Unicorn/1/_history/1"), ("GET", "/fhir/Resource"), ("GET", "/fhir/DomainResource/x")):
        assert_outcome(client.request(method, url), 404)
    assert_outcome(client.post("/fhir/Unicorn", json={"resourceType": "Unicorn"}), 404)
    assert_outcome(client.put("/fhir/Unicorn/1", json={"resourceType": "Unicorn", "id": "1"}), 404)
    for url in ("/fhir/Patient/nope", "/fhir/Patient/nope/_history", "/fhir/Patient/nope/_history/1",
                "/fhir/Patient/nope/$meta", "/fhir/Patient/e0/_history/99"):
        assert_outcome(client.get(url), 404)
    assert_outcome(client.delete("/fhir/Patient/nope"), 404)
    assert_outcome(client.patch("/fhir/Patient/nope", content=b"[]",
                                headers={"Content-Type": "application/json-patch+json"}), 404)
    for bad_id in ("a_b", "a" * 65, "a%20b", "é", "a;b", "1'--"):
        assert_outcome(client.get(f"/fhir/Patient/{bad_id}"), 400)
        assert_outcome(client.put(f"/fhir/Patient/{bad_id}", json={"resourceType": "Patient", "id": bad_id}), 400)
    assert_outcome(client.get("/fhir/Patient/e0/_history/one"), 400)
    for url in ("/fhir/Patient/e0/$nope", "/fhir/$nope", "/fhir/Patient/$nope", "/fhir/Patient/e0/_history/1/x/y",
                "/nothing-here", "/fhir/Patient/e0/x/y/z"):
        r = client.get(url)
        assert 400 <= r.status_code < 500, url
        assert r.json()["resourceType"] == "OperationOutcome", url
    for method, url in (("PATCH", "/fhir/Patient"), ("DELETE", "/fhir/Patient/e0/_history/1"),
                        ("PATCH", "/fhir/_history")):
        assert_outcome(client.request(method, url), 405)
    for method, url in (("POST", "/fhir/metadata"), ("PUT", "/fhir/_history"), ("DELETE", "/fhir/metadata")):
        r = client.request(method, url, json={"resourceType": "Patient"})
        assert 400 <= r.status_code < 500 and r.json()["resourceType"] == "OperationOutcome", (method, url)
    assert count(client, "Patient") == 3


def test_invalid_search_values_are_400(client: TestClient) -> None:
    seed(client)
    for query in ("Patient?birthdate=1980-02-30", "Patient?birthdate=gt", "Patient?birthdate=yesterday",
                  "Patient?_lastUpdated=2020-13", "RiskAssessment?probability=high", "RiskAssessment?probability=1e999",
                  "Observation?value-quantity=abc", "Observation?value-quantity=1|2", "Patient?_count=ten",
                  "Patient?_count=-5", "Patient?_total=some", "Patient?_summary=maybe", "Patient?family:missing=yes",
                  "Patient?identifier=a|b|c", "Observation?subject=Patient/a/b", "Observation?subject=a b",
                  "Observation?code-value-quantity=x", "Observation?status.name=x", "Patient?_has:Observation=x",
                  "Patient?_has:Observation:status:code=x", "Patient?_include=Patient", "Patient?_include=Nope:x",
                  "Patient?_include=Patient:name", f"Patient?family={'x' * 5000}", "Patient?gender=",
                  "Patient?identifier:of-type=a|b"):
        body = assert_outcome(client.get(f"/fhir/{query}"), 400)
        assert body["issue"][0]["diagnostics"], query
    strict = {"Prefer": "handling=strict"}
    for query in ("Patient?foo=bar", "Patient?family:nonsense=x", "Patient?_sort=nonsense", "Patient?_sort=name;drop",
                  "Patient?_include:nonsense=Patient:organization"):
        assert_outcome(client.get(f"/fhir/{query}", headers=strict), 400)


# --------------------------------------------------------------------------- injection


INJECTIONS: list[tuple[str, dict[str, str]]] = [
    ("Patient", {"name": "' OR 1=1--"}),
    ("Patient", {"name": "%' OR '1'='1"}),
    ("Patient", {"family:exact": "' OR ''='"}),
    ("Patient", {"family:contains": "%"}),
    ("Patient", {"family:contains": "_"}),
    ("Patient", {"name": "\\'; DELETE FROM resource; --"}),
    ("Patient", {"_id": "1;DROP TABLE resource"}),
    ("Patient", {"_id": "e0' OR '1'='1"}),
    ("Patient", {"_id": "x,1) OR (1=1"}),
    ("Patient", {"birthdate": "2020'--"}),
    ("Patient", {"birthdate": "ge1980-01-01' OR 1=1--"}),
    ("Patient", {"_lastUpdated": "gt2020-01-01; DROP TABLE resource"}),
    ("Patient", {"_sort": "name;drop table resource"}),
    ("Patient", {"_sort": "-birthdate,(SELECT 1)"}),
    ("Patient", {"_count": "1;DROP TABLE resource"}),
    ("Patient", {"_getpages": "' OR 1=1--"}),
    ("Patient", {"gender": "male') OR ('1'='1"}),
    ("Patient", {"gender:not": "x' OR 1=1--"}),
    ("Patient", {"identifier": "a|b' UNION SELECT body FROM resource_version--"}),
    ("Patient", {"identifier": f"{SYS}|ID-0' OR '1'='1"}),
    ("Patient", {"identifier:of-type": "a|b' OR 1=1|c"}),
    ("Patient", {"_tag": "x'||(SELECT version())||'"}),
    ("Patient", {"_profile": "' OR 1=1--"}),
    ("Patient", {"_has:Observation:patient:code": "x' OR 1=1--"}),
    ("Patient", {"_include": "Patient:organization' OR 1=1"}),
    ("Patient", {"organization:Organization.name": "' OR 1=1--"}),
    ("Observation", {"subject": "Patient/1' OR '1'='1"}),
    ("Observation", {"subject": "http://x/Patient/1' OR '1'='1"}),
    ("Observation", {"subject:identifier": "a|b' OR 1=1--"}),
    ("Observation", {"subject:Patient.name": "' OR 1=1--"}),
    ("Observation", {"value-quantity": "5|x' OR 1=1|mg"}),
    ("Observation", {"value-quantity": "5 OR 1=1"}),
    ("Observation", {"code-value-quantity": "x' OR 1=1$gt1"}),
    ("RiskAssessment", {"probability": "1 OR 1=1"}),
    ("ValueSet", {"url": "' OR 1=1--"}),
    ("ValueSet", {"url:below": "%"}),
    ("ValueSet", {"url:above": "' OR 1=1--"}),
]


def test_injection_attempts_change_nothing(client: TestClient) -> None:
    seed(client)
    engine = client.app.state.api.service.db.engine  # type: ignore[attr-defined]
    tables_before = set(inspect(engine).get_table_names())
    lenient_all = {e["resource"]["id"] for e in client.get("/fhir/Patient").json()["entry"]}
    for rtype, params in INJECTIONS:
        r = client.get(f"/fhir/{rtype}?{urlencode(params)}")
        body = assert_fhir(r)
        if r.status_code == 200:
            assert body["resourceType"] == "Bundle"
            ids = {e["resource"]["id"] for e in body.get("entry", []) if e["search"]["mode"] == "match"}
            name = next(iter(params))
            if name in ("_sort", "_include") or name.endswith(":not"):  # ignored, or "not <junk>": everything
                assert ids == lenient_all, (params, ids)
            else:
                assert ids == set(), (params, ids)
        r = client.get(f"/fhir/{rtype}?{urlencode(params)}", headers={"Prefer": "handling=strict"})
        assert_fhir(r)
        r = client.post(f"/fhir/{rtype}/_search", data=params)
        assert_fhir(r)
    # Ids, headers and paths.
    for url in ("/fhir/Patient/1' OR '1'='1", "/fhir/Patient/e0;DROP TABLE resource",
                "/fhir/Patient/e0/_history/1 OR 1=1", "/fhir/Patient/..%2F..%2Fetc%2Fpasswd"):
        assert 400 <= client.get(url).status_code < 500
    r = client.post("/fhir/Patient", json={"resourceType": "Patient", "name": [{"family": "'; DROP TABLE resource;--"}]},
                    headers={"If-None-Exist": "name=' OR 1=1--"})
    assert r.status_code == 201
    assert client.put("/fhir/Patient/e1", json={"resourceType": "Patient", "id": "e1"},
                      headers={"If-Match": "W/\"1' OR '1'='1\""}).status_code == 412
    assert client.delete(f"/fhir/Patient?{urlencode({'name': chr(39) + ' OR 1=1--'})}").status_code in (200, 204)
    assert 400 <= client.get("/fhir/$export-poll-status?_jobId=' OR 1=1--").status_code < 500
    # The data and the schema are intact.
    assert count(client, "Patient") == 4
    assert count(client, "Observation") == 1
    assert set(inspect(engine).get_table_names()) == tables_before
    from lienthong.storage import schema

    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(schema.resource)).scalar_one() == 5
        assert conn.execute(select(func.count()).select_from(schema.resource_version)).scalar_one() == 5
    assert client.get("/fhir/Patient/e1").json()["meta"]["versionId"] == "1"
    found = client.get(f"/fhir/Patient?identifier={SYS}|ID-0").json()
    assert [e["resource"]["id"] for e in found["entry"]] == ["e0"]


# --------------------------------------------------------------------------- fuzzing

PARAM_NAMES = ["name", "family", "given", "family:exact", "name:contains", "identifier", "identifier:of-type",
               "gender", "gender:not", "birthdate", "_id", "_lastUpdated", "_count", "_sort", "_include",
               "_revinclude", "_summary", "_elements", "_total", "_tag", "_profile", "organization",
               "organization:Organization.name", "general-practitioner:identifier", "address-city", "active",
               "_has:Observation:patient:code", "deceased", "telecom", "link", "_format", "_pretty", "foo",
               "name:missing", "_getpages", "_offset", "death-date", "_security", "_source", "phonetic"]
VALUE_ALPHABET = string.ascii_letters + string.digits + "|$,:.-_/'\"%;=()\\ *+éễ\u0000\t"
values = st.one_of(
    st.text(alphabet=VALUE_ALPHABET, max_size=30),
    st.sampled_from(["eq2020", "gt1980-05", "ap2020-01-01T10:00:00+07:00", "sa", "1e400", "-0", "true",
                     f"{SYS}|1", "Patient/e0", "Patient:organization", "-_lastUpdated", "count", "a\\,b"]),
    st.text(max_size=12),
)
queries = st.lists(st.tuples(st.one_of(st.sampled_from(PARAM_NAMES), st.text(min_size=1, max_size=12)), values),
                   max_size=4)


@FUZZ
@given(params=queries, strict=st.booleans(), rtype=st.sampled_from(["Patient", "Observation", "RiskAssessment"]))
def test_fuzz_search_queries(client: TestClient, params: list[tuple[str, str]], strict: bool, rtype: str) -> None:
    headers = {"Prefer": "handling=strict"} if strict else {}
    r = client.get(f"/fhir/{rtype}?{urlencode(params)}", headers=headers)
    body = assert_fhir(r)
    assert r.status_code == 406 or body["resourceType"] in ("Bundle", "OperationOutcome")
    if r.status_code == 200 and body["resourceType"] == "Bundle":
        for item in body.get("link", []):
            nxt = client.get(item["url"])
            assert_fhir(nxt)


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=False),
                      st.text(max_size=20))
json_values = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=20)
patient_keys = st.sampled_from(["name", "gender", "birthDate", "identifier", "active", "telecom", "address", "id",
                                "meta", "extension", "contained", "deceasedBoolean", "link", "_birthDate", "text"])
bodies = st.one_of(
    json_values,
    st.dictionaries(patient_keys, json_values, max_size=5).map(lambda d: {"resourceType": "Patient", **d}),
    st.binary(max_size=60),
)


@FUZZ
@given(body=bodies, method=st.sampled_from(["POST", "PUT", "TX", "PATCH"]))
def test_fuzz_bodies(client: TestClient, body: Any, method: str) -> None:
    raw = body if isinstance(body, bytes) else orjson.dumps(body, option=orjson.OPT_NON_STR_KEYS)
    if method == "POST":
        r = client.post("/fhir/Patient", content=raw)
    elif method == "PUT":
        if isinstance(body, dict):
            raw = orjson.dumps({**body, "id": "fz"}, option=orjson.OPT_NON_STR_KEYS)
        r = client.put("/fhir/Patient/fz", content=raw)
    elif method == "PATCH":
        client.put("/fhir/Patient/fp", json={"resourceType": "Patient", "id": "fp"})
        r = client.patch("/fhir/Patient/fp", content=raw, headers={"Content-Type": "application/json-patch+json"})
    elif isinstance(body, bytes):
        r = client.post("/fhir", content=body)
    else:
        tx = {"resourceType": "Bundle", "type": "transaction",
              "entry": [{"request": {"method": "POST", "url": "Patient"}, "resource": body}]}
        r = client.post("/fhir", content=orjson.dumps(tx, option=orjson.OPT_NON_STR_KEYS))
    result = assert_fhir(r)
    if r.status_code in (200, 201):
        assert result["resourceType"] in ("Patient", "Bundle")
        if result["resourceType"] == "Patient":
            assert client.get(f"/fhir/Patient/{result['id']}").json() == result
