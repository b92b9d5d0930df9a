"""Receipt with a possible patient match: the package waits for a person, never for a guess.

Real hub and nodes on 127.0.0.1 (SQLite). The receiving facility already has a record with the
same name and birth date but no identifier in common: the patient index grades it a possible
match, so the package is parked and a review item opened. A "match" decision imports the
package onto the existing record; a "no-match" decision registers a new patient.
"""

from __future__ import annotations

import copy
import random
import time
from typing import Any

import pytest
from sqlalchemy import func, select

from lienthong.devtools import clinical
from lienthong.exchange import transfer as tr
from lienthong.exchange.demo import Province, Unit, _steps
from lienthong.exchange.service import parked_package
from lienthong.identity.identifiers import CCCD_SYSTEM, ma_bn_system
from lienthong.interactions.bundles import BundleProcessor
from lienthong.storage import schema

from .conftest import RECEIVER, SENDER

JSON = dict[str, Any]

def _namesake(patient: JSON, index: int) -> JSON:
    """The same name and birth date at the receiver, with none of the identifiers, phone or address."""
    other = {k: copy.deepcopy(v) for k, v in patient.items() if k not in ("id", "telecom", "address")}
    other["identifier"] = [{"system": ma_bn_system(RECEIVER), "value": f"BM{index:07d}"}]
    return other


def _transfer(p: Province, patient: JSON) -> str:
    sender = p.units[SENDER]
    slip = tr.TransferSlip(destination=RECEIVER, reason="2", main_diagnosis="I21.0",
                           doctor_licence=f"{SENDER}/CCHN-0001", clinical_signs="Đau ngực", condition="Ổn định",
                           transport="Xe cứu thương")
    return str(sender.exchange.start_transfer(sender.exchange.system_context("test"), patient["id"], slip)["package"])


def _wait_for(check: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def _count(unit: Unit, rtype: str) -> int:
    with unit.node.db.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(schema.resource).where(
            schema.resource.c.rtype == rtype, schema.resource.c.deleted.is_(False))).scalar_one())


def _pending(unit: Unit) -> list[tuple[str, str, str]]:
    rv = schema.mpi_review
    with unit.node.db.engine.connect() as conn:
        return [(r[0], r[1], r[2]) for r in conn.execute(select(rv.c.review_id, rv.c.left_id, rv.c.right_id)
                                                         .where(rv.c.status == "pending"))]


def _parked(unit: Unit) -> int:
    with unit.node.db.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(parked_package)).scalar_one())


def test_possible_match_is_parked_then_imported_as_decided(province: Province) -> None:
    sender, receiver = province.units[SENDER], province.units[RECEIVER]
    rng = random.Random(3)
    people = [p for p in clinical.pilot_patients(12, SENDER, 21)
              if any(i["system"] == CCCD_SYSTEM for i in p["identifier"])][:2]
    org, doctor = clinical.facility_resources(SENDER, sender.name)
    resources: list[JSON] = [org, doctor]
    for person in people:
        resources += [person, *clinical.clinical_record(person, rng, org, doctor)]
    BundleProcessor(sender.node.service).process(sender.exchange.system_context("seed"),
                                                 clinical.as_transaction(resources))
    ctx = receiver.exchange.system_context("records-officer")
    namesakes = [receiver.node.service.create(ctx, "Patient", _namesake(p, i)).stored for i, p in enumerate(people)]
    assert all(namesakes)
    patients_before = _count(receiver, "Patient")

    packages = [_transfer(province, person) for person in people]
    _wait_for(lambda: len(_pending(receiver)) == 2 and _parked(receiver) == 2, "two parked packages")
    _wait_for(lambda: all(_steps(sender).get(pk) == "received" for pk in packages), "received at the sender")
    assert _count(receiver, "Provenance") == 0, "nothing is imported on a guess"
    reviews = {}
    for rid, left, right in _pending(receiver):  # the pair is stored in sorted order
        incoming, existing_id = (left, right) if left.startswith("incoming:") else (right, left)
        reviews[incoming.removeprefix("incoming:")] = (rid, existing_id)
    assert set(reviews) == set(packages)

    matched_review, existing = reviews[packages[0]]
    assert existing == namesakes[0].rid  # type: ignore[union-attr]
    receiver.node.identity.decide(ctx, matched_review, "match")
    receiver.node.identity.decide(ctx, reviews[packages[1]][0], "no-match")

    assert _parked(receiver) == 0 and _pending(receiver) == []
    assert _count(receiver, "Provenance") == 2
    assert _count(receiver, "Patient") == patients_before + 1  # only the "no-match" patient is new
    with receiver.node.db.read() as store:
        for enc in (s.resource() for s in receiver.exchange._search(store, "Encounter", [], 100)):
            assert enc["subject"]["reference"] != f"Patient/{namesakes[1].rid}"  # type: ignore[union-attr]
        imported = [s.resource() for s in receiver.exchange._search(
            store, "Encounter", [("subject", f"Patient/{existing}")], 10)]
    assert imported, "the matched package's encounter now belongs to the existing record"
    trail = receiver.node.service.guard.audit
    trail.flush()
    details = [e.get("outcomeDesc", "") for e in trail.events(limit=2000)]
    assert any(d == f"review {matched_review}: match (incoming package)" for d in details)
