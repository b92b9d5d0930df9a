"""End-to-end transfers between real nodes through a real hub (uvicorn servers on 127.0.0.1, SQLite).

Each test asserts zero loss and zero duplicate imports, and that every refusal is recorded with its reason.
"""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update

from lienthong.devtools import clinical
from lienthong.exchange import transfer as tr
from lienthong.exchange.demo import HUB, Province, _steps
from lienthong.exchange.schema import inbox, outbox
from lienthong.interactions.bundles import BundleProcessor
from lienthong.storage import schema

from .conftest import RECEIVER, SENDER


def _seed(p: Province, n: int, seed: int = 7) -> list[dict[str, Any]]:
    sender = p.units[SENDER]
    rng = random.Random(seed)
    org, doctor = clinical.facility_resources(SENDER, sender.name)
    patients = clinical.pilot_patients(n, SENDER, seed)
    resources: list[dict[str, Any]] = [org, doctor]
    for patient in patients:
        resources += [patient, *clinical.clinical_record(patient, rng, org, doctor)]
    BundleProcessor(sender.node.service).process(sender.exchange.system_context("test"),
                                                 clinical.as_transaction(resources))
    return patients


def _slip(dest: str = RECEIVER) -> tr.TransferSlip:
    return tr.TransferSlip(destination=dest, reason="2", main_diagnosis="I21.0", doctor_licence=f"{SENDER}/CCHN-0001",
                           clinical_signs="Đau ngực", condition="Ổn định", transport="Xe cứu thương")


def _send(p: Province, patients: list[dict[str, Any]]) -> list[str]:
    sender = p.units[SENDER]
    ctx = sender.exchange.system_context("test")
    return [sender.exchange.start_transfer(ctx, pt["id"], _slip())["package"] for pt in patients]


def _wait(p: Province, packages: list[str], step: str = "received", unit: str = SENDER, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = _steps(p.units[unit])
        if all(tr.RANK.get(steps.get(pk, ""), -1) >= tr.RANK[step] for pk in packages):
            return
        time.sleep(0.1)
    steps = _steps(p.units[unit])
    pytest.fail(f"not all transfers reached {step}: {[steps.get(pk) for pk in packages]}")


def _count(p: Province, code: str, rtype: str) -> int:
    with p.units[code].node.db.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(schema.resource).where(
            schema.resource.c.rtype == rtype, schema.resource.c.deleted.is_(False))).scalar_one())


def _assert_exactly_once(p: Province, packages: list[str]) -> None:
    """One Provenance and one received document per package at the receiver: nothing lost, nothing twice."""
    import orjson

    r, v = schema.resource, schema.resource_version
    with p.units[RECEIVER].node.db.engine.connect() as conn:
        bodies = [orjson.loads(b) for (b,) in conn.execute(
            select(v.c.body).join(r, (r.c.res_pk == v.c.res_pk) & (r.c.version == v.c.version))
            .where(r.c.rtype == "Provenance"))]
    seen = [e["what"]["identifier"]["value"] for b in bodies for e in b["entity"]]
    assert sorted(seen) == sorted(packages)


def _audit_details(p: Province, code: str) -> list[str]:
    trail = p.units[code].node.service.guard.audit
    trail.flush()
    return [e.get("outcomeDesc", "") for e in trail.events(limit=5000)]


def test_transfers_arrive_once_with_the_closed_loop(province: Province) -> None:
    patients = _seed(province, 3)
    packages = _send(province, patients)
    _wait(province, packages, "received")
    _assert_exactly_once(province, packages)
    assert _count(province, RECEIVER, "Patient") == 3
    receiver = province.units[RECEIVER]
    ctx = receiver.exchange.system_context("clinician")
    receiver.exchange.update_transfer(ctx, packages[0], "accepted")
    receiver.exchange.update_transfer(ctx, packages[0], "arrived")
    receiver.exchange.update_transfer(ctx, packages[0], "completed", outcome={
        "resourceType": "DocumentReference", "status": "current", "description": "Ra viện, ổn định",
        "content": [{"attachment": {"contentType": "text/plain", "title": "Tóm tắt ra viện"}}]})
    receiver.exchange.update_transfer(ctx, packages[1], "rejected", "Hết giường / no bed")
    _wait(province, [packages[0]], "completed")
    _wait(province, [packages[1]], "rejected")
    assert _count(province, SENDER, "DocumentReference") == 1  # the outcome came back to the sender
    with pytest.raises(Exception, match="cannot go"):
        receiver.exchange.update_transfer(ctx, packages[1], "arrived")


def test_suspended_facility_is_refused_and_recorded(province: Province) -> None:
    hub = province.units[HUB[0]]
    hub.exchange.registry.set_clearance(RECEIVER, "suspended", None, "CV 123/CA-PA05")
    patients = _seed(province, 1)
    packages = _send(province, patients)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with province.units[SENDER].node.db.engine.connect() as conn:
            status = conn.execute(select(outbox.c.status, outbox.c.last_error)).all()
        if status and status[0][0] == "dead":
            break
        time.sleep(0.1)
    assert status[0][0] == "dead" and "not-cleared" in (status[0][1] or "")
    assert _count(province, RECEIVER, "Provenance") == 0
    assert any("not cleared" in d or "clearance" in d for d in _audit_details(province, HUB[0]))
    assert packages


def test_receiver_down_then_backlog_drains(province: Province) -> None:
    patients = _seed(province, 4)
    province.stop_unit(RECEIVER)
    packages = _send(province, patients)
    time.sleep(2)
    assert _count(province, RECEIVER, "Provenance") == 0
    province.start_unit(RECEIVER)
    _wait(province, packages, "received")
    _assert_exactly_once(province, packages)


def test_hub_restart_loses_nothing(province: Province) -> None:
    patients = _seed(province, 3)
    province.stop_unit(HUB[0])
    packages = _send(province, patients)
    time.sleep(1.5)
    province.start_unit(HUB[0])
    _wait(province, packages, "received")
    _assert_exactly_once(province, packages)


def test_sender_crash_mid_send_recovers_without_duplicates(province: Province) -> None:
    patients = _seed(province, 3)
    province.stop_unit(SENDER)  # workers stopped: nothing leaves yet
    sender = province.units[SENDER]
    ctx = sender.exchange.system_context("test")
    packages = [sender.exchange.start_transfer(ctx, pt["id"], _slip())["package"] for pt in patients]
    with sender.node.db.engine.begin() as conn:  # what a kill -9 during a send leaves behind
        conn.execute(update(outbox).values(status="sending", attempts=1))
    province.start_unit(SENDER)  # a new dispatcher recovers the in-flight rows
    _wait(province, packages, "received")
    _assert_exactly_once(province, packages)


def test_duplicated_delivery_is_processed_once(province: Province) -> None:
    patients = _seed(province, 2)
    packages = _send(province, patients)
    _wait(province, packages, "received")
    hub = province.units[HUB[0]]
    with hub.node.db.engine.begin() as conn:  # the hub sends everything again, as after a lost acknowledgement
        conn.execute(update(outbox).values(status="pending", attempts=0))
    hub.exchange.dispatcher.wake()
    time.sleep(3)
    _assert_exactly_once(province, packages)
    with province.units[RECEIVER].node.db.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(inbox)).scalar_one() >= 2


def test_tampered_and_expired_packages_are_refused_with_reason(province: Province, tmp_path: Path) -> None:
    from lienthong.exchange.delivery import compress
    from lienthong.exchange.service import Envelope
    from lienthong.exchange.trust import ProvincialCA, seal_package

    sender = province.units[SENDER]
    envelope = Envelope("transfer", SENDER, RECEIVER, "pkg-tampered", "p1", {"resourceType": "Bundle"})
    sealed = bytearray(seal_package(envelope.to_bytes(), sender.exchange.keys))
    sealed[-5] ^= 0x01  # one flipped bit in the package
    ca = ProvincialCA.load_dir(province.folder / "ca")
    old = ca.issue_identity(SENDER, "expired", validity=timedelta(days=1), now=datetime.now(UTC) - timedelta(days=10))
    expired = seal_package(Envelope("transfer", SENDER, RECEIVER, "pkg-expired", "p2",
                                    {"resourceType": "Bundle"}).to_bytes(), old,
                           now=datetime.now(UTC) - timedelta(days=10))
    with sender.node.db.engine.begin() as conn:
        sender.exchange.outbox.enqueue_compressed(conn, RECEIVER, "p1", compress(bytes(sealed)))
        sender.exchange.outbox.enqueue_compressed(conn, RECEIVER, "p2", compress(expired))
    deadline = time.monotonic() + 60
    reasons: list[str] = []
    while time.monotonic() < deadline:
        with province.units[HUB[0]].node.db.engine.connect() as conn:
            reasons = [r[0] or "" for r in conn.execute(select(outbox.c.last_error).where(outbox.c.status == "dead"))]
        if len(reasons) == 2:
            break
        time.sleep(0.1)
    assert sorted(reasons) == sorted(["tampered", "expired"]) or (all(r for r in reasons) and len(reasons) == 2)
    details = " ".join(_audit_details(province, RECEIVER))
    assert "tampered" in details and "expired" in details
    assert _count(province, RECEIVER, "Provenance") == 0


def test_malformed_package_is_rejected_and_recorded(province: Province) -> None:
    from lienthong.exchange.service import Envelope

    sender = province.units[SENDER]
    bad = Envelope("transfer", SENDER, RECEIVER, "pkg-bad", "p3", {"resourceType": "Bundle", "entry": "nonsense"})
    with sender.node.db.engine.begin() as conn:
        sender.exchange._send(conn, bad)
    deadline = time.monotonic() + 60
    rows: list[Any] = []
    while time.monotonic() < deadline:
        with province.units[RECEIVER].node.db.engine.connect() as conn:
            rows = conn.execute(select(inbox.c.status, inbox.c.reason)).all()
        if rows and rows[0][0] == "rejected":
            break
        time.sleep(0.1)
    assert rows and rows[0][0] == "rejected" and rows[0][1]
    assert _count(province, RECEIVER, "Provenance") == 0
