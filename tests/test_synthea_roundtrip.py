"""Round-trip of the 30 Synthea transaction Bundles (6,795 resources) on SQLite and PostgreSQL.

Each bundle is posted as a transaction; every resource is then read back by the id the server gave it
(from the transaction-response `location`) and compared with the original, `meta` removed and every
`urn:uuid` reference rewritten to the new `Type/id`. Finally each patient's `$everything` is walked
page by page.

What "complete" means for `$everything` here: the Patient, every resource in its Patient
compartment (resources that reference it through a compartment parameter), and every resource
those reference, or the Patient itself references, other than other Patients. It is computed
independently from the original bundle's reference graph, over the ids of the whole server. Synthea
bundles are self-contained (each one creates its own Organizations and Practitioners, which other
bundles do not reference), so this set must equal exactly the resources created by that bundle:
nothing missing, nothing from another patient's bundle, no entry twice.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import httpx
import orjson
from starlette.testclient import TestClient

from conftest import BASE, synthea_files

JSON = dict[str, Any]


def references(node: Any) -> list[str]:
    """Every Reference.reference string in a resource (contained resources included)."""
    out: list[str] = []
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for k, v in item.items():
                if k == "reference" and isinstance(v, str):
                    out.append(v)
                elif isinstance(v, dict | list):
                    stack.append(v)
        elif isinstance(item, list):
            stack.extend(item)
    return out


def rewrite(node: Any, mapping: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {k: (mapping.get(v, v) if k == "reference" and isinstance(v, str) else rewrite(v, mapping))
                for k, v in node.items()}
    if isinstance(node, list):
        return [rewrite(v, mapping) for v in node]
    return node


def expected_everything(bundle: JSON, mapping: dict[str, str]) -> tuple[str, set[str]]:
    """(Patient/id, the complete $everything set) from the original bundle's reference graph."""
    patients = [e for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient"]
    assert len(patients) == 1
    patient_url = patients[0]["fullUrl"]
    patient = mapping[patient_url]
    members = [e for e in bundle["entry"] if patient_url in references(e["resource"])]
    expected = {patient} | {mapping[e["fullUrl"]] for e in members}
    for e in [patients[0], *members]:
        for ref in references(e["resource"]):
            target = mapping.get(ref)
            if target is not None and not target.startswith("Patient/"):
                expected.add(target)
    return patient, expected


def read_all(app: Any, keys: list[str], in_flight: int = 6) -> dict[str, JSON]:
    """GET /fhir/Type/id for every key through the app's full ASGI stack, a few requests in flight.

    Same requests as the TestClient's, without its per-request thread hand-offs: 6,795 reads per
    backend are most of this test's time."""

    async def run() -> dict[str, JSON]:
        gate = asyncio.Semaphore(in_flight)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            async def one(key: str) -> tuple[str, JSON]:
                async with gate:
                    r = await http.get(f"/fhir/{key}")
                assert r.status_code == 200, f"{key}: {r.text[:300]}"
                assert r.headers["ETag"] == 'W/"1"'
                body: JSON = r.json()
                return key, body

            return dict(await asyncio.gather(*(one(k) for k in keys)))

    return asyncio.run(run())


def walk_everything(client: TestClient, patient: str, count: int) -> list[str]:
    keys: list[str] = []
    url: str | None = f"/fhir/{patient}/$everything?_count={count}"
    pages = 0
    while url:
        r = client.get(url)
        assert r.status_code == 200, r.text
        page = r.json()
        pages += 1
        assert pages < 100
        assert len(page.get("entry", [])) <= count
        for e in page.get("entry", []):
            key = f"{e['resource']['resourceType']}/{e['resource']['id']}"
            assert e["fullUrl"] == f"{BASE}/{key}"
            keys.append(key)
        url = next((link["url"] for link in page["link"] if link["relation"] == "next"), None)
    return keys


def test_synthea_bundles_round_trip(client: TestClient) -> None:
    files = synthea_files()
    assert len(files) == 30
    mapping: dict[str, str] = {}  # urn:uuid fullUrl -> Type/new-id, across all bundles
    per_type: Counter[str] = Counter()
    patients: list[tuple[str, set[str], set[str]]] = []  # (Patient/id, expected $everything, created by bundle)
    for path in files:
        raw = path.read_bytes()
        original = orjson.loads(raw)
        r = client.post("/fhir", content=raw, headers={"Content-Type": "application/fhir+json"})
        assert r.status_code == 200, f"{path.name}: {r.text[:500]}"
        response = r.json()
        assert response["type"] == "transaction-response"
        assert len(response["entry"]) == len(original["entry"])
        created: set[str] = set()
        for sent, got in zip(original["entry"], response["entry"], strict=True):
            assert got["response"]["status"] == "201 Created"
            rtype, rid, history, version = got["response"]["location"].split("/")
            assert (rtype, history, version) == (sent["resource"]["resourceType"], "_history", "1")
            mapping[sent["fullUrl"]] = f"{rtype}/{rid}"
            created.add(f"{rtype}/{rid}")
            per_type[rtype] += 1
        assert len(created) == len(original["entry"]), "every resource got its own id"

        read_back = read_all(client.app, [mapping[sent["fullUrl"]] for sent in original["entry"]])
        for sent in original["entry"]:
            key = mapping[sent["fullUrl"]]
            stored = read_back.pop(key)
            assert stored["meta"]["versionId"] == "1"
            expected = rewrite({k: v for k, v in sent["resource"].items() if k != "meta"}, mapping)
            expected["id"] = key.split("/")[1]
            stored.pop("meta")
            assert stored == expected, f"{path.name}: {key} differs from {sent['fullUrl']}"
            leftovers = [ref for ref in references(stored) if ref.startswith("urn:")]
            assert not leftovers, f"{key} still holds {leftovers}"
        patient, expected_set = expected_everything(original, mapping)
        patients.append((patient, expected_set, created))

    assert sum(per_type.values()) == 6795
    for rtype, n in per_type.items():
        assert client.get(f"/fhir/{rtype}?_summary=count").json()["total"] == n, rtype
    assert client.get("/fhir/_history?_count=1").json()["total"] == 6795

    for i, (patient, expected_set, created) in enumerate(patients):
        assert expected_set == created, f"{patient}: the bundle holds resources outside the record"
        keys = walk_everything(client, patient, count=100 if i % 2 else 37)
        assert keys[0] == patient
        assert len(keys) == len(set(keys)), f"{patient}: an entry appears twice"
        assert set(keys) == expected_set, (
            f"{patient}: missing {sorted(expected_set - set(keys))[:5]}, extra {sorted(set(keys) - expected_set)[:5]}")
