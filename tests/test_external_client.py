"""The node as a real user meets it: the PyPI client `fhirpy` over real HTTP (uvicorn on 127.0.0.1).

The fixture serves the `client` fixture's app (so the same SQLite or PostgreSQL database) with uvicorn
on a free loopback port in a background thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import uvicorn
from fhirpy import SyncFHIRClient
from fhirpy.base.exceptions import OperationOutcome, ResourceNotFound
from starlette.testclient import TestClient

JSON = dict[str, Any]
SYS = "urn:oid:2.16.840.1.113883.2.24.1"
LOINC = "http://loinc.org"


@pytest.fixture
def base_url(client: TestClient) -> Iterator[str]:
    config = uvicorn.Config(client.app, host="127.0.0.1", port=0, log_level="warning", lifespan="off",
                            access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive(), "uvicorn did not start"
        assert time.monotonic() < deadline, "uvicorn did not start in time"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}/fhir"
    server.should_exit = True
    thread.join(timeout=15)
    assert not thread.is_alive(), "uvicorn did not stop"


@pytest.fixture
def fhir(base_url: str) -> SyncFHIRClient:
    return SyncFHIRClient(base_url, requests_config={"timeout": 60})


def test_create_read_update_delete(fhir: SyncFHIRClient, base_url: str) -> None:
    patient = fhir.resource("Patient", name=[{"family": "Nguyễn", "given": ["Văn", "An"]}], birthDate="1980-05-02",
                            identifier=[{"system": SYS, "value": "FP-1"}])
    patient.save()
    assert patient.id and patient["meta"]["versionId"] == "1"
    fetched = fhir.reference("Patient", patient.id).to_resource()
    assert fetched["name"][0]["family"] == "Nguyễn"
    assert fetched.serialize() == patient.serialize()

    fetched["gender"] = "male"
    fetched.save()
    assert fetched["meta"]["versionId"] == "2"
    assert fhir.get("Patient", patient.id)["gender"] == "male"

    raw = requests.get(f"{base_url}/Patient/{patient.id}", headers={"Accept": "application/fhir+json"}, timeout=30)
    assert raw.status_code == 200 and raw.headers["ETag"] == 'W/"2"'
    assert raw.headers["Content-Type"].startswith("application/fhir+json")

    # fhirpy's PATCH sends a merge-patch object; FHIR PATCH takes JSON Patch, and the refusal is an OperationOutcome.
    with pytest.raises(OperationOutcome):
        fetched.patch(active=True)

    # Conditional update by identifier, the way an interface engine keeps a record current.
    updated, created = fhir.resources("Patient").search(identifier=f"{SYS}|FP-1").update(
        fhir.resource("Patient", identifier=[{"system": SYS, "value": "FP-1"}], gender="female"))
    assert created is False and updated.id == patient.id and updated["meta"]["versionId"] == "3"

    fetched.delete()
    with pytest.raises(ResourceNotFound):
        fhir.get("Patient", patient.id)
    with pytest.raises(ResourceNotFound):
        fhir.get("Patient", "never-existed")
    history = fhir.execute(f"Patient/{patient.id}/_history", method="get")
    assert history["total"] == 4


def test_search_and_paging(fhir: SyncFHIRClient) -> None:
    org = fhir.resource("Organization", name="Trạm y tế phường Bến Nghé")
    org.save()
    created = []
    for i in range(23):
        p = fhir.resource("Patient", name=[{"family": "Trần" if i % 2 else "Tran", "given": [f"Bé {i}"]}],
                          birthDate=f"{1950 + i}-06-15", gender="female" if i % 3 else "male",
                          managingOrganization=org.to_reference())
        p.save()
        created.append(p.id)
    fhir.resource("Patient", name=[{"family": "Lê"}]).save()

    everyone = fhir.resources("Patient").search(family="tran").limit(5).fetch_all()
    assert sorted(p.id for p in everyone) == sorted(created)
    iterated = [p.id for p in fhir.resources("Patient").search(name="TRẦN").limit(4)]
    assert sorted(iterated) == sorted(created) and len(iterated) == len(set(iterated))
    assert fhir.resources("Patient").search(family="tran").count() == 23

    ordered = fhir.resources("Patient").search(family="tran").sort("-birthdate").limit(7).fetch_all()
    births = [p["birthDate"] for p in ordered]
    assert births == sorted(births, reverse=True) and len(births) == 23

    older = fhir.resources("Patient").search(birthdate__lt="1960-01-01").fetch_all()
    assert sorted(p["birthDate"][:4] for p in older) == [str(y) for y in range(1950, 1960)]
    men = fhir.resources("Patient").search(gender="male", family="tran").fetch_all()
    assert len(men) == 8
    assert fhir.resources("Patient").search(family__exact="Trần").count() == 11
    first = fhir.resources("Patient").search(family="tran").sort("birthdate").first()
    assert first is not None and first["birthDate"] == "1950-06-15"
    by_org = fhir.resources("Patient").search(organization=org.to_reference()).fetch_all()
    assert len(by_org) == 23
    chained = fhir.resources("Patient").search(organization__Organization__name="tram y te").count()
    assert chained == 23

    raw = fhir.resources("Patient").search(_id=created[0]).include("Patient", "organization").fetch_raw()
    kinds = sorted((e["resource"]["resourceType"], e["search"]["mode"]) for e in raw["entry"])
    assert kinds == [("Organization", "include"), ("Patient", "match")]
    slim = fhir.resources("Patient").search(_id=created[0]).elements("birthDate").fetch()
    assert "name" not in slim[0] and slim[0]["birthDate"] == "1950-06-15"
    with pytest.raises(ResourceNotFound):
        fhir.resources("Patient").search(family="không-có-ai").get()


def test_transaction_and_everything(fhir: SyncFHIRClient) -> None:
    pat, enc = "urn:uuid:7d1c6a6e-0000-4000-8000-000000000001", "urn:uuid:7d1c6a6e-0000-4000-8000-000000000002"
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": pat, "request": {"method": "POST", "url": "Patient", "ifNoneExist": f"identifier={SYS}|TX-1"},
         "resource": {"resourceType": "Patient", "identifier": [{"system": SYS, "value": "TX-1"}],
                      "name": [{"family": "Phạm", "given": ["Thị", "Lan"]}]}},
        {"fullUrl": enc, "request": {"method": "POST", "url": "Encounter"},
         "resource": {"resourceType": "Encounter", "status": "finished", "class": {"code": "AMB"},
                      "subject": {"reference": pat}}},
        *({"request": {"method": "POST", "url": "Observation"},
           "resource": {"resourceType": "Observation", "status": "final",
                        "code": {"coding": [{"system": LOINC, "code": "2345-7"}]},
                        "valueQuantity": {"value": 5 + i, "unit": "mmol/L"},
                        "subject": {"reference": pat}, "encounter": {"reference": enc}}} for i in range(4)),
    ]}
    response = fhir.execute("", method="post", data=bundle)
    assert response["type"] == "transaction-response"
    assert [e["response"]["status"] for e in response["entry"]] == ["201 Created"] * 6
    patient = fhir.resources("Patient").search(identifier=f"{SYS}|TX-1").get()
    observations = fhir.resources("Observation").search(subject=patient.to_reference()).fetch_all()
    assert len(observations) == 4
    assert {o["encounter"]["reference"] for o in observations} == {response["entry"][1]["response"]["location"]
                                                                  .rsplit("/_history", 1)[0]}
    high = fhir.resources("Observation").search(patient=patient.id, value_quantity__gt=6.5).fetch_all()
    assert sorted(o["valueQuantity"]["value"] for o in high) == [7, 8]
    # The same transaction again: the patient is matched, not duplicated.
    again = fhir.execute("", method="post", data=bundle)
    assert again["entry"][0]["response"]["status"] == "200 OK"
    assert fhir.resources("Patient").search(identifier=f"{SYS}|TX-1").count() == 1
    everything = fhir.execute(f"Patient/{patient.id}/$everything", method="get", params={"_count": 3})
    keys: list[str] = []
    page: Any = everything
    while True:
        keys += [f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in page.get("entry", [])]
        nxt = next((link["url"] for link in page["link"] if link["relation"] == "next"), None)
        if nxt is None:
            break
        page = fhir.execute(nxt, method="get")
    assert len(keys) == len(set(keys)) == 1 + 2 + 8
    outcome = fhir.execute("Patient/$validate", method="post", data={"resourceType": "Patient", "gender": "x"})
    assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"][0]["severity"] == "error"
    assert fhir.resource("Patient", name=[{"family": "Hợp lệ"}]).is_valid()
