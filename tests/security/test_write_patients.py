"""The patients a transaction writes about, from the index rows it just wrote or from the tables.

`AccessGuard.on_write` links written patients to the writer's facility and names them in the audit
record. For resources the transaction itself wrote, it takes their Patient references from the
index rows still in memory instead of reading `sp_reference` back; both must give the same set,
after creates, updates and deletes in one transaction.
"""

from __future__ import annotations

from typing import Any

import orjson

from conftest import synthea_files
from lienthong.api.app import ApiSettings
from lienthong.interactions.bundles import BundleProcessor
from lienthong.interactions.context import Context
from lienthong.node import build_node, open_database
from lienthong.security.policy import AccessGuard, Principal
from lienthong.security.scopes import parse_scopes
from lienthong.storage.repository import Store, Stored


def _both_ways(guard: AccessGuard, store: Store, written: list[Stored]) -> tuple[set[str], set[str]]:
    from_memory = guard._patients_of(store, written)
    kept, store._written_index = store._written_index, {}
    try:
        from_tables = guard._patients_of(store, written)
    finally:
        store._written_index = kept
    return from_memory, from_tables


def test_patients_of_written_resources(db_url: str) -> None:
    db = open_database(db_url)
    node = build_node(db, ApiSettings(node_name="t"), secure=True)
    guard = node.service.guard
    assert isinstance(guard, AccessGuard)
    scopes, _ = parse_scopes("system/*.cruds")
    ctx = Context(principal=Principal("client", "t", "t", scopes, "24001"))
    proc = BundleProcessor(node.service)
    bundles: list[dict[str, Any]] = [orjson.loads(p.read_bytes()) for p in synthea_files()[:2]]
    try:
        with db.begin() as store:
            created: list[Stored] = []
            for bundle in bundles:
                for entry in proc.transaction_in(ctx, store, bundle):
                    rtype, rid = entry["response"]["location"].split("/")[:2]
                    found = store.current(rtype, rid)
                    assert found is not None
                    created.append(found)
            memory, tables = _both_ways(guard, store, created)
            patients = {s.rid for s in created if s.rtype == "Patient"}
            assert memory == tables == patients and len(patients) == 2

            # An Observation moved to the other patient, and a Condition deleted, in the same transaction.
            first, second = sorted(patients)
            obs = next(s for s in created if s.rtype == "Observation" and f"Patient/{first}".encode() in (s.body or b""))
            cond = next(s for s in created if s.rtype == "Condition")
            moved = obs.resource()
            moved["subject"] = {"reference": f"Patient/{second}"}
            current = store.current("Observation", obs.rid, lock=True)
            assert current is not None
            updated = store.write(current, moved, "PUT")
            gone = store.current("Condition", cond.rid, lock=True)
            assert gone is not None
            store.write(gone, None, "DELETE")
            memory, tables = _both_ways(guard, store, [updated, gone])
            assert memory == tables == {second}
    finally:
        node.close()
        db.engine.dispose()
