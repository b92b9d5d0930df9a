"""The read cache: reads by id served from memory must never return a version older than the last
acknowledged write, in this process or another one on the host, and must stay audited and access-checked.

Runs on SQLite and PostgreSQL (the `db_url` fixture). "Another process" is a real one (spawned), since the
counters are shared through a memory-mapped file and POSIX locks belong to processes.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from lienthong.storage.read_cache import ChangeCounters, CurrentVersions, counters_path, slot_of
from lienthong.storage.repository import Stored

PATIENT = {"resourceType": "Patient", "name": [{"family": "Trần", "given": ["Thị", "Bình"]}], "gender": "female"}


# ---- the counters and the map, alone ---------------------------------------------------------------
def _stored(rid: str, version: int = 1, body: bytes = b'{"resourceType":"Patient"}') -> Stored:
    return Stored(1, "Patient", rid, version, 0, False, body)


def test_an_entry_is_served_only_while_its_slot_is_idle_and_unchanged() -> None:
    cache = CurrentVersions(ChangeCounters(None), 1 << 20)
    ticket = cache.ticket("Patient", "a")
    assert ticket is not None
    cache.fill(ticket, _stored("a"))
    assert cache.get("Patient", "a") is not None
    slot = slot_of("Patient", "a")
    cache.counters.begin([slot])
    assert cache.get("Patient", "a") is None, "served while a writer had the slot"
    assert cache.ticket("Patient", "a") is None, "a read during a write may not fill"
    cache.counters.end([slot])
    assert cache.get("Patient", "a") is None, "served the version from before the write"


def test_a_read_that_began_before_a_write_cannot_fill_the_old_version() -> None:
    cache = CurrentVersions(ChangeCounters(None), 1 << 20)
    ticket = cache.ticket("Patient", "a")  # the read starts ...
    assert ticket is not None
    slot = slot_of("Patient", "a")
    cache.counters.begin([slot])  # ... a write starts, commits, ends ...
    cache.counters.end([slot])
    cache.fill(ticket, _stored("a", version=1))  # ... and the read's (old) answer arrives last
    assert cache.get("Patient", "a") is None


def test_the_budget_evicts_the_least_recently_read() -> None:
    body = b"x" * 1000
    cache = CurrentVersions(ChangeCounters(None), 8 * 1200 + 100)  # room for 8 of the 10
    for i in range(10):
        ticket = cache.ticket("Patient", str(i))
        assert ticket is not None
        cache.fill(ticket, _stored(str(i), body=body))
        if i == 5:
            assert cache.get("Patient", "0") is not None  # read: now the most recent
    assert len(cache) < 10
    assert cache.get("Patient", "0") is not None
    assert cache.get("Patient", "1") is None
    huge = cache.ticket("Binary", "big")
    assert huge is not None
    cache.fill(huge, Stored(2, "Binary", "big", 1, 0, False, b"y" * 5000))
    assert cache.get("Binary", "big") is None, "one body larger than an eighth of the budget was cached"


def _die_while_writing(path: str, slot: int) -> None:
    ChangeCounters.shared(Path(path)).begin([slot])
    os._exit(0)  # a writer killed between its change and the end of its transaction


def _open_and_report(path: str, slot: int, queue: Any) -> None:
    queue.put(ChangeCounters.shared(Path(path)).state(slot))


def test_marks_left_by_a_dead_writer_are_cleared_by_the_first_process_to_arrive(tmp_path: Path) -> None:
    path = tmp_path / "changes"
    slot = slot_of("Observation", "x")
    ctx = multiprocessing.get_context("spawn")
    dead = ctx.Process(target=_die_while_writing, args=(str(path), slot))
    dead.start()
    dead.join(30)
    # The mark survives its writer: a process that opens the file while another still has it open keeps it.
    counters = ChangeCounters(path)  # this process is now the one that has it open
    assert counters.state(slot)[0] == 0, "the first process to open the file clears the dead writer's mark"
    counters.begin([slot])
    queue = ctx.Queue()
    other = ctx.Process(target=_open_and_report, args=(str(path), slot, queue))
    other.start()
    assert queue.get(timeout=30)[0] == 1, "a live writer's mark was cleared by a process that arrived later"
    other.join(30)
    counters.end([slot])
    assert counters.state(slot)[0] == 0


def test_counters_of_another_account_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "changes"
    path.write_bytes(b"")
    path.chmod(0o666)
    with pytest.raises(PermissionError):
        ChangeCounters(path)


def test_counters_paths() -> None:
    from sqlalchemy.engine import make_url

    assert counters_path(make_url("sqlite:///:memory:")) is None
    assert counters_path(make_url("sqlite:////srv/node/lienthong.db")) == Path("/srv/node/lienthong.db-changes")
    pg = counters_path(make_url("postgresql+psycopg://u:secret@127.0.0.1:5432/a"))
    assert pg is not None and "secret" not in str(pg)
    assert pg == counters_path(make_url("postgresql+psycopg://other@127.0.0.1:5432/b")), "one file per server"


# ---- through the node ----------------------------------------------------------------------------------
@pytest.fixture
def node_client(db_url: str) -> Iterator[tuple[TestClient, Any, dict[str, str], dict[str, str]]]:
    """A secure node, a system client token (sees everything) and a facility client token (sees its patients)."""
    from lienthong.api.app import ApiSettings
    from lienthong.node import app_for, build_node, open_database
    from lienthong.security.accounts import Accounts

    settings = ApiSettings(node_name="cache-test")
    node = build_node(open_database(db_url), settings, secure=True)
    accounts = Accounts(node.db.engine)
    app = app_for(node, settings)
    with TestClient(app, base_url="http://testserver") as client:
        tokens = []
        for name, facility in (("system", None), ("facility", "24001")):
            cid, secret = accounts.add_client(f"cache-{name}", facility, "system/*.cruds")
            r = client.post("/auth/token", data={"grant_type": "client_credentials", "client_id": cid,
                                                 "client_secret": secret})
            assert r.status_code == 200, r.text
            tokens.append({"Authorization": f"Bearer {r.json()['access_token']}"})
        yield client, node, tokens[0], tokens[1]
    node.db.engine.dispose()


def test_reads_after_writes_return_the_written_version(node_client: Any) -> None:
    client, node, system, _ = node_client
    created = client.post("/fhir/Patient", json=PATIENT, headers=system).json()
    url = f"/fhir/Patient/{created['id']}"
    hits = node.db.cache.hits
    first = client.get(url, headers=system)
    assert first.status_code == 200 and first.headers["etag"] == 'W/"1"'
    assert node.db.cache.hits == hits + 1, "a resource just created is read from the cache"
    for version in (2, 3):
        changed = {**created, "gender": "male" if version == 2 else "other"}
        assert client.put(url, json=changed, headers={**system, "If-Match": f'W/"{version - 1}"'}).status_code == 200
        r = client.get(url, headers=system)
        assert r.headers["etag"] == f'W/"{version}"' and r.json()["gender"] == changed["gender"]
        hits = node.db.cache.hits
        assert client.get(url, headers=system).headers["etag"] == f'W/"{version}"'
        assert node.db.cache.hits == hits + 1, "the slot stayed marked after the write ended"
    patched = client.patch(url, json=[{"op": "replace", "path": "/gender", "value": "unknown"}],
                           headers={**system, "Content-Type": "application/json-patch+json"})
    assert patched.status_code == 200
    assert client.get(url, headers=system).json()["gender"] == "unknown"
    assert client.delete(url, headers=system).status_code in (200, 204)
    gone = client.get(url, headers=system)
    assert gone.status_code == 410 and gone.json()["resourceType"] == "OperationOutcome"
    assert client.get(url, headers=system).status_code == 410  # the delete marker, cached or not


def test_a_failed_transaction_leaves_the_cache_on_the_committed_version(node_client: Any) -> None:
    client, _, system, _ = node_client
    created = client.post("/fhir/Patient", json=PATIENT, headers=system).json()
    url = f"/fhir/Patient/{created['id']}"
    assert client.get(url, headers=system).status_code == 200
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {**created, "gender": "male"}, "request": {"method": "PUT", "url": f"Patient/{created['id']}"}},
        {"resource": {"resourceType": "Observation", "status": "not-a-status"},
         "request": {"method": "POST", "url": "Observation"}}]}
    assert client.post("/fhir", json=bundle, headers=system).status_code >= 400
    r = client.get(url, headers=system)
    assert r.headers["etag"] == 'W/"1"' and r.json()["gender"] == "female"


def test_cached_reads_are_audited_like_any_other(node_client: Any) -> None:
    client, node, system, _ = node_client
    created = client.post("/fhir/Patient", json=PATIENT, headers=system).json()
    obs = client.post("/fhir/Observation", headers=system, json={
        "resourceType": "Observation", "status": "final", "code": {"text": "mạch"},
        "subject": {"reference": f"Patient/{created['id']}"}}).json()
    audit = node.service.guard.audit
    before = len(audit.events(patient=created["id"]))
    hits = node.db.cache.hits
    assert client.get(f"/fhir/Observation/{obs['id']}", headers=system).status_code == 200
    assert node.db.cache.hits == hits + 1
    events = audit.events(patient=created["id"])
    assert len(events) == before + 1
    assert events[0]["subtype"][0]["code"] == "read"
    assert {e["what"]["reference"] for e in events[0]["entity"]} == {f"Patient/{created['id']}",
                                                                     f"Observation/{obs['id']}"}
    assert audit.verify()[0]


def test_a_facility_bound_caller_is_never_served_from_the_cache(node_client: Any) -> None:
    """The system client's resource is cached; a facility client outside its patients still gets 404."""
    client, node, system, facility = node_client
    created = client.post("/fhir/Patient", json=PATIENT, headers=system).json()
    url = f"/fhir/Patient/{created['id']}"
    assert client.get(url, headers=system).status_code == 200
    assert node.db.cached("Patient", created["id"]) is not None
    r = client.get(url, headers=facility)
    assert r.status_code == 404 and r.json()["resourceType"] == "OperationOutcome"
    own = client.post("/fhir/Patient", json=PATIENT, headers=facility).json()
    assert client.get(f"/fhir/Patient/{own['id']}", headers=facility).status_code == 200


def test_a_refused_read_is_refused_with_the_resource_cached(node_client: Any) -> None:
    client, node, system, _ = node_client
    from lienthong.security.accounts import Accounts

    created = client.post("/fhir/Patient", json=PATIENT, headers=system).json()
    cid, secret = Accounts(node.db.engine).add_client("cache-orgs-only", None, "system/Organization.rs")
    token = client.post("/auth/token", data={"grant_type": "client_credentials", "client_id": cid,
                                             "client_secret": secret}).json()["access_token"]
    r = client.get(f"/fhir/Patient/{created['id']}", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 403 and r.json()["resourceType"] == "OperationOutcome"
    assert client.get(f"/fhir/Patient/{created['id']}").status_code == 401


def _update_in_another_process(db_url: str, rid: str, family: str) -> None:
    """A second node process on the same database (as a second uvicorn worker, or the CLI, would be)."""
    from lienthong.api.app import ApiSettings
    from lienthong.interactions.context import Context
    from lienthong.node import build_node, open_database

    node = build_node(open_database(db_url, upgrade=False), ApiSettings(), secure=False)
    ctx = Context(base_url="http://other/fhir")
    current = node.service.read(ctx, "Patient", rid).stored
    assert current is not None
    resource = current.resource()
    resource["name"] = [{"family": family}]
    node.service.update(ctx, "Patient", rid, resource, None)
    node.db.engine.dispose()


def test_a_write_by_another_process_is_seen_at_once(node_client: Any, db_url: str) -> None:
    client, node, system, _ = node_client
    created = client.post("/fhir/Patient", json=PATIENT, headers=system).json()
    url = f"/fhir/Patient/{created['id']}"
    assert client.get(url, headers=system).json()["name"][0]["family"] == "Trần"
    assert node.db.cached("Patient", created["id"]) is not None
    ctx = multiprocessing.get_context("spawn")
    for family in ("Lê", "Phạm"):
        other = ctx.Process(target=_update_in_another_process, args=(db_url, created["id"], family))
        other.start()
        other.join(120)
        assert other.exitcode == 0
        r = client.get(url, headers=system)
        assert r.json()["name"][0]["family"] == family, "served the version from before the other process wrote"
    assert r.headers["etag"] == 'W/"3"'


def test_the_cache_can_be_turned_off(db_url: str) -> None:
    from lienthong.node import open_database

    db = open_database(db_url, read_cache_mb=0)
    assert db.cache is None and db.cached("Patient", "x") is None
    db.engine.dispose()


def test_answers_from_the_cache_are_those_of_the_ordinary_route(node_client: Any) -> None:
    """A cached read (answered before routing) and the same read by the route (a query string sends it
    there) give the same status, bytes and headers, security headers included; what the fast answer does
    not serve (another Accept, HEAD, shaping) still gets the route's answer."""
    client, node, system, _ = node_client
    created = client.post("/fhir/Patient", json=PATIENT, headers=system).json()
    url = f"/fhir/Patient/{created['id']}"
    hits = node.db.cache.hits
    fast = client.get(url, headers=system)
    routed = client.get(url + "?_pretty=false", headers=system)
    assert node.db.cache.hits == hits + 2  # the route's service call reads the cache too
    assert fast.status_code == routed.status_code == 200
    assert fast.content == routed.content
    for name in ("content-type", "etag", "last-modified", "content-length", "x-content-type-options",
                 "cache-control", "content-security-policy", "x-frame-options", "referrer-policy"):
        assert fast.headers.get(name) == routed.headers.get(name), name
    assert client.get(url, headers={**system, "Accept": "application/fhir+xml"}).status_code == 406
    assert client.get(url + "?_format=xml", headers=system).status_code == 406
    assert client.get(url + "?_elements=gender", headers=system).json().get("name") is None
    head = client.head(url, headers=system)
    assert head.status_code == 200 and head.headers["etag"] == 'W/"1"' and not head.content
    assert client.get(url + "/", headers=system).status_code in (200, 404)  # not a read by id: the router decides
    refused = client.get(url, headers={"Authorization": "Bearer not-a-token"})
    assert refused.status_code == 401 and refused.json()["resourceType"] == "OperationOutcome"


def test_a_deleted_resource_answers_410_with_its_version_from_the_cache(node_client: Any) -> None:
    client, node, system, _ = node_client
    created = client.post("/fhir/Patient", json=PATIENT, headers=system).json()
    url = f"/fhir/Patient/{created['id']}"
    client.delete(url, headers=system)
    client.get(url, headers=system)  # fills the cache with the delete marker
    assert node.db.cached("Patient", created["id"]) is not None
    gone = client.get(url, headers=system)
    assert gone.status_code == 410 and gone.headers["etag"] == 'W/"2"'
    assert gone.headers["x-content-type-options"] == "nosniff"
    assert gone.json()["issue"][0]["code"] == "deleted"
