"""The audit trail: completeness, atomicity with writes, tamper evidence, and who may read it.

- A scripted session produces exactly the expected AuditEvents (action, outcome, actor, patient).
- A write's AuditEvent commits in the write's transaction: a failed transaction leaves neither data
  nor a record of success, and a failing audit write aborts the data write.
- `lienthong audit verify` exits 0 on an intact trail and non-zero after any single tampering,
  done directly in SQL.
- `$access-report` and `$audit` tell auditors (only) who accessed a patient, and when.
"""

from __future__ import annotations

import contextlib
import getpass
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from sqlalchemy import delete, func, insert, select, update
from starlette.testclient import TestClient
from typer.testing import CliRunner

from security.conftest import (
    BTG_REASON,
    FAC1,
    World,
    add_client,
    add_user,
    assert_outcome,
    audit_of,
    authorize,
    bearer,
    client_login,
    close_app,
    login,
    make_app,
    wait_for_events,
)

JSON = dict[str, Any]


def action_of(event: JSON) -> str:
    codes = {c["system"]: c["code"] for c in event["subtype"]}
    return codes.get("urn:lienthong:audit-action") or codes["http://hl7.org/fhir/restful-interaction"]


def actor_of(event: JSON) -> str:
    who: str = event["agent"][0]["who"]["identifier"]["value"]
    return who


def patients_of(event: JSON) -> set[str]:
    return {e["what"]["reference"].split("/", 1)[1] for e in event.get("entity", [])
            if e.get("type", {}).get("code") == "1" and "what" in e}


def btg(event: JSON) -> bool:
    return any(c.get("code") == "BTG" for a in event["agent"] for p in a.get("purposeOfUse", [])
               for c in p.get("coding", []))


def head_seq(app: Any) -> int:
    from lienthong.storage import schema

    audit_of(app).flush()
    with app.state.node.db.engine.connect() as conn:
        seq: int = conn.execute(select(schema.audit_head.c.seq)).scalar_one()
    return seq


def events_after(app: Any, seq: int, done: Callable[[list[JSON]], bool] = lambda evs: True) -> list[JSON]:
    """AuditEvents recorded after `seq` (waiting until `done` holds), in the order the actions happened."""
    events = wait_for_events(audit_of(app), lambda evs: done([e for e in evs if int(e["id"]) > seq]),
                             limit=100_000)
    return sorted([e for e in events if int(e["id"]) > seq], key=lambda e: (e["recorded"], int(e["id"])))


# ---- a scripted session ---------------------------------------------------------------------------------
def test_scripted_session_produces_exactly_the_expected_events(secure_app: Any,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    app = secure_app
    audit = audit_of(app)  # every request answers after its record is committed: chain order = action order
    add_user(app, "lt.hoa", "records-officer", FAC1)
    cid, secret = add_client(app, "HIS 24002", "24002", "system/*.cruds")
    system = bearer(client_login(app, cid, secret)["access_token"])
    http = TestClient(app)
    r = http.post("/fhir/Patient", json={"resourceType": "Patient", "name": [{"family": "Cấp Cứu"}]}, headers=system)
    emergency = r.json()["id"]  # registered at facility 24002: lt.hoa (24001) needs the glass broken
    assert http.get(f"/fhir/Patient/{emergency}", headers=bearer(login(app, "lt.hoa")["access_token"])).status_code \
        == 404
    start = head_seq(app)

    def step(fn: Callable[[], Any]) -> Any:
        out = fn()
        audit.flush()
        return out

    token = step(lambda: login(app, "lt.hoa"))["access_token"]
    h = bearer(token)
    r = step(lambda: http.post("/fhir/Patient", json={"resourceType": "Patient", "gender": "male",
                                                      "name": [{"family": "Phiên"}]}, headers=h))
    assert r.status_code == 201, r.text
    pid = r.json()["id"]
    assert step(lambda: http.get(f"/fhir/Patient/{pid}", headers=h)).status_code == 200
    assert step(lambda: http.get(f"/fhir/Patient?_id={pid}", headers=h)).status_code == 200
    assert step(lambda: http.put(f"/fhir/Patient/{pid}", json={"resourceType": "Patient", "id": pid,
                                                               "gender": "female"}, headers=h)).status_code == 200
    assert step(lambda: http.delete(f"/fhir/Patient/{pid}", headers=h)).status_code == 200
    assert step(lambda: authorize(app, "lt.hoa", "Sai-mat-khau-9"))[0].status_code == 401
    step(lambda: client_login(app, cid, secret))
    body = {"resourceType": "Parameters", "parameter": [{"name": "reason", "valueString": BTG_REASON}]}
    assert step(lambda: http.post(f"/fhir/Patient/{emergency}/$break-glass", json=body, headers=h)).status_code == 200
    assert step(lambda: http.get(f"/fhir/Patient/{emergency}", headers=h)).status_code == 200
    assert step(lambda: http.post("/auth/logout", headers=h)).status_code == 204

    got = [(action_of(e), e["outcome"], actor_of(e), patients_of(e), btg(e)) for e in events_after(app, start)]
    user = "lt.hoa"
    assert got == [
        ("login", "0", user, set(), False),
        ("create", "0", user, {pid}, False),
        ("read", "0", user, {pid}, False),
        ("search", "0", user, {pid}, False),
        ("update", "0", user, {pid}, False),
        ("delete", "0", user, {pid}, False),
        ("login-failed", "4", user, set(), False),
        ("token", "0", cid, set(), False),
        ("break-glass", "0", user, {emergency}, False),
        ("read", "0", user, {emergency}, True),
        ("logout", "0", user, set(), False),
    ]
    events = events_after(app, start)
    assert [e["action"] for e in events] == ["E", "C", "R", "E", "U", "D", "E", "E", "E", "R", "E"]
    assert BTG_REASON in events[8]["outcomeDesc"]  # (the chain itself: see the `audit verify` tests)
    for e in events:
        assert e["resourceType"] == "AuditEvent" and e["agent"][0]["requestor"] is True
        assert e["source"]["observer"]["display"] == "lienthong"
    users = [e for e in events if actor_of(e) == user and action_of(e) not in ("login-failed",)]
    assert all(e["agent"][0]["role"][0]["coding"][0]["code"] == "records-officer" for e in users)
    assert all(e["agent"][0]["location"]["identifier"]["value"] == FAC1 for e in users)


def test_a_match_is_audited_with_exactly_the_patients_it_returns(secure_app: Any) -> None:
    """`$match` names in its AuditEvent the patients the caller received: all of them for a client who sees
    every Patient (recorded while the answer's bodies are read), only the visible ones for a facility user."""
    app = secure_app
    add_user(app, "lt.match", "records-officer", FAC1)
    other_cid, other_secret = add_client(app, "HIS 24002", "24002", "system/*.cruds")
    all_cid, all_secret = add_client(app, "Hub", None, "system/*.cruds")
    http = TestClient(app)
    officer = bearer(login(app, "lt.match")["access_token"])
    patient = {"resourceType": "Patient", "gender": "female", "birthDate": "1971-04-09",
               "name": [{"family": "Khổng", "given": ["Thị", "Duyên"]}]}
    own = http.post("/fhir/Patient", json=patient, headers=officer).json()["id"]
    elsewhere = http.post("/fhir/Patient", json=patient,
                          headers=bearer(client_login(app, other_cid, other_secret)["access_token"])).json()["id"]
    query = {"resourceType": "Parameters", "parameter": [{"name": "resource", "resource": patient}]}
    for headers, expected in ((officer, {own}),
                              (bearer(client_login(app, all_cid, all_secret)["access_token"]), {own, elsewhere})):
        start = head_seq(app)
        r = http.post("/fhir/Patient/$match", json=query, headers=headers)
        assert r.status_code == 200, r.text
        assert {e["resource"]["id"] for e in r.json()["entry"]} == expected
        events = [e for e in events_after(app, start) if action_of(e) == "operation"]
        assert [patients_of(e) for e in events] == [expected]


def test_refusals_are_audited(world: World) -> None:
    start = head_seq(world.app)
    world.http.get("/fhir/Patient/p2a", headers=world.h("clinician"))  # 404: exists elsewhere
    world.http.get("/fhir/Patient/p1a", headers=world.h("auditor"))  # 403: role
    world.http.get("/fhir/Patient", headers=bearer("not.a.token"))  # 401
    got = [(action_of(e), e["outcome"], actor_of(e), patients_of(e))
           for e in events_after(world.app, start, lambda evs: len(evs) >= 3)]
    assert ("read", "4", "bs.an", {"p2a"}) in got
    assert ("refused", "4", "kt.vien", set()) in got
    assert ("refused", "4", "anonymous", set()) in got


# ---- atomicity of writes and their audit -------------------------------------------------------------
def _count(world: World, query: str) -> int:
    r = world.http.get(f"/fhir/Patient?{query}&_summary=count", headers=world.h("system-global"))
    total: int = r.json()["total"]
    return total


def test_failed_transaction_leaves_no_data_and_no_success_record(world: World) -> None:
    start = head_seq(world.app)
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:0b5e7c1e-0000-4000-8000-000000000001",
         "resource": {"resourceType": "Patient", "name": [{"family": "Nguyêntử"}]},
         "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Observation", "status": "khong-hop-le", "code": {"text": "x"},
                      "subject": {"reference": "urn:uuid:0b5e7c1e-0000-4000-8000-000000000001"}},
         "request": {"method": "POST", "url": "Observation"}}]}
    r = world.http.post("/fhir", json=bundle, headers=world.h("system-facility"))
    assert r.status_code in (400, 422), r.text
    assert _count(world, "family=Nguyêntử") == 0
    after = events_after(world.app, start)
    assert not [e for e in after if action_of(e) in ("create", "transaction", "update") and e["outcome"] == "0"]


def test_an_audit_failure_aborts_the_write(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    audit = world.audit
    real = audit.append

    def failing(conn: Any, records: Any) -> None:
        if any(r.action in ("create", "transaction") for r in records):
            raise RuntimeError("audit store unavailable")
        real(conn, records)

    monkeypatch.setattr(audit, "append", failing)
    http = TestClient(world.app, raise_server_exceptions=False)
    body = {"resourceType": "Patient", "name": [{"family": "Khôngghi"}]}
    r = http.post("/fhir/Patient", json=body, headers=world.h("system-facility"))
    assert_outcome(r, 500, "exception")
    bundle = {"resourceType": "Bundle", "type": "transaction",
              "entry": [{"resource": body, "request": {"method": "POST", "url": "Patient"}}]}
    assert_outcome(http.post("/fhir", json=bundle, headers=world.h("system-facility")), 500)
    monkeypatch.undo()
    assert _count(world, "family=Khôngghi") == 0


@pytest.fixture
def direct(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shared world with its trail in direct mode: each batch of read records is committed to the database
    before the answers wait on it (what a node with `--audit-journal off` does)."""
    world.audit.flush()
    monkeypatch.setattr(world.audit, "_journal", None)


def test_a_transient_commit_failure_is_retried(world: World, direct: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from lienthong.security.audit import AuditRecord

    audit = world.audit
    real = audit.append
    failures: list[int] = []

    def flaky(conn: Any, records: Any) -> None:
        if not failures and any(r.detail == "probe-flush" for r in records):
            failures.append(1)
            raise RuntimeError("database is locked")
        real(conn, records)

    monkeypatch.setattr(audit, "append", flaky)
    audit.record(AuditRecord(action="read", outcome=0, actor="probe", actor_kind="user", roles=(), facility=None,
                             address=None, node="test", patients=["p1a"], detail="probe-flush"))
    assert failures == [1]
    assert [e for e in audit.events(actor="probe") if e.get("outcomeDesc") == "probe-flush"]


def test_a_record_nobody_waits_for_survives_a_failed_commit(world: World, direct: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Records of the CLI and the exchange workers are not awaited: a failed commit keeps them for later."""
    from lienthong.security.audit import COMMIT_ATTEMPTS, AuditRecord

    audit = world.audit
    real = audit.append
    failures: list[int] = []

    def down(conn: Any, records: Any) -> None:
        if any(r.detail == "probe-unwaited" for r in records) and len(failures) < COMMIT_ATTEMPTS:
            failures.append(1)
            raise RuntimeError("database is locked")
        real(conn, records)

    monkeypatch.setattr(audit, "append", down)
    monkeypatch.setattr("lienthong.security.audit.time.sleep", lambda s: None)
    audit.submit(AuditRecord(action="read", outcome=0, actor="probe-u", actor_kind="client", roles=(),
                             facility=None, address=None, node="test", patients=["p1a"], detail="probe-unwaited"),
                 waited=False)
    with contextlib.suppress(RuntimeError):
        audit.flush()  # every attempt of this batch fails (here or in the writer thread, whichever took it)
    deadline = time.monotonic() + 10
    while len(failures) < COMMIT_ATTEMPTS and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(failures) == COMMIT_ATTEMPTS
    # The store is back: the record was kept, not dropped, and commits now.
    assert [e for e in audit.events(actor="probe-u") if e.get("outcomeDesc") == "probe-unwaited"]
    assert audit.verify()[0]


def test_a_read_is_not_answered_when_its_audit_cannot_be_written(world: World, direct: None,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    audit = world.audit
    real = audit.append

    def failing(conn: Any, records: Any) -> None:
        if any(r.action == "read" for r in records):
            raise RuntimeError("audit store unavailable")
        real(conn, records)

    monkeypatch.setattr(audit, "append", failing)
    monkeypatch.setattr("lienthong.security.audit.time.sleep", lambda s: None)  # no retry back-off here
    http = TestClient(world.app, raise_server_exceptions=False)
    r = http.get("/fhir/Patient/p1a", headers=world.h("system-facility"))
    assert_outcome(r, 500, "exception")
    assert "p1a" not in r.text and "Patient" not in r.text
    assert "etag" not in r.headers and r.headers["cache-control"] == "no-store"  # withheld answer, still secured
    assert r.headers["x-content-type-options"] == "nosniff"
    monkeypatch.undo()
    assert world.http.get("/fhir/Patient/p1a", headers=world.h("system-facility")).status_code == 200


def test_concurrent_reads_are_group_committed_into_one_verified_chain(world: World, direct: None,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """N concurrent reads: each answers after its own record is durable, several share a commit, and the
    chain holds exactly N new read records that verify."""
    import asyncio

    import httpx

    audit = world.audit
    real = audit.append
    batches: list[int] = []

    def counting(conn: Any, records: Any) -> None:
        real(conn, records)
        batches.append(len(records))

    monkeypatch.setattr(audit, "append", counting)
    start = head_seq(world.app)
    n = 40

    async def read_all() -> list[int]:
        transport = httpx.ASGITransport(app=world.app, client=("10.9.8.7", 4242))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            rs = await asyncio.gather(*(http.get("/fhir/Patient/p1a", headers=world.h("system-facility"))
                                        for _ in range(n)))
        return [r.status_code for r in rs]

    assert asyncio.run(read_all()) == [200] * n
    # every answer came after its commit: the records are there without any flush or wait
    from lienthong.storage import schema

    with world.node.db.engine.connect() as conn:
        reads = conn.execute(select(func.count()).select_from(schema.audit_log).where(
            schema.audit_log.c.seq > start, schema.audit_log.c.action == "read")).scalar_one()
    assert reads == n
    assert max(batches) > 1, batches
    ok, checked, message = audit.verify()
    assert ok, message
    assert checked >= start + n


# ---- tamper evidence ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trail_url(module_db_url: str) -> Iterator[str]:
    """A database whose trail has a few dozen records made by a real session; no app stays open on it."""
    app = make_app(module_db_url)
    cid, secret = add_client(app, "HIS trail", FAC1, "system/*.cruds")
    h = bearer(client_login(app, cid, secret)["access_token"])
    with TestClient(app) as http:
        for _ in range(4):
            pid = http.post("/fhir/Patient", json={"resourceType": "Patient", "gender": "male"}, headers=h).json()["id"]
            http.get(f"/fhir/Patient/{pid}", headers=h)
            http.get("/fhir/Patient?_count=2", headers=h)
            audit_of(app).flush()
    close_app(app)
    yield module_db_url


def assert_detected(result: Any, tamper: str) -> None:
    """`audit verify` found the tampering: exit code 3 with its message (a crash does not count)."""
    assert result.exit_code == 3, f"{tamper}: exit {result.exit_code}: {result.output} {result.exception!r}"
    assert "KHÔNG toàn vẹn" in " ".join(result.output.split()), result.output


def _verify_cli(url: str) -> Any:
    from lienthong.cli.main import app as cli

    return CliRunner().invoke(cli, ["audit", "verify", "--db", url])


def _tables() -> list[Any]:
    from lienthong.storage import schema

    return [schema.audit_log, schema.audit_patient, schema.audit_head]


def _snapshot(engine: Any) -> dict[str, list[dict[str, Any]]]:
    with engine.connect() as conn:
        return {t.name: [dict(r._mapping) for r in conn.execute(select(t).order_by(*t.primary_key.columns))]
                for t in _tables()}


def _restore(engine: Any, snap: dict[str, list[dict[str, Any]]]) -> None:
    with engine.begin() as conn:
        for t in _tables():
            conn.execute(delete(t))
            if snap[t.name]:
                conn.execute(insert(t), snap[t.name])


def _flip(text: str) -> str:
    return ("1" if text[0] != "1" else "2") + text[1:]


def _rows(conn: Any) -> list[Any]:
    from lienthong.storage import schema

    log = schema.audit_log
    return list(conn.execute(select(log.c.seq, log.c.body, log.c.prev_hash, log.c.hash).order_by(log.c.seq)))


def _set(conn: Any, seq: int, **values: Any) -> None:
    from lienthong.storage import schema

    conn.execute(update(schema.audit_log).where(schema.audit_log.c.seq == seq).values(**values))


def _body_edit(which: str) -> Callable[[Any], None]:
    def tamper(conn: Any) -> None:
        rows = _rows(conn)
        row = {"first": rows[0], "middle": rows[len(rows) // 2], "last": rows[-1]}[which]
        body = bytes(row.body)
        if body[:1] == b"[":  # the compact record: its outcome is the fourth member
            fields = orjson.loads(body)
            fields[3] = 4 if fields[3] == 0 else 0
            edited = orjson.dumps(fields)
        else:
            edited = body.replace(b'"outcome":"0"', b'"outcome":"4"', 1)
        assert edited != body
        _set(conn, row.seq, body=edited)
    return tamper


def _hash_edit(column: str, which: str) -> Callable[[Any], None]:
    def tamper(conn: Any) -> None:
        rows = _rows(conn)
        row = rows[len(rows) // 2] if which == "middle" else rows[-1]
        _set(conn, row.seq, **{column: _flip(getattr(row, column))})
    return tamper


def _delete_row(which: str) -> Callable[[Any], None]:
    def tamper(conn: Any) -> None:
        from lienthong.storage import schema

        rows = _rows(conn)
        row = {"first": rows[0], "middle": rows[len(rows) // 2], "last": rows[-1]}[which]
        conn.execute(delete(schema.audit_patient).where(schema.audit_patient.c.seq == row.seq))
        conn.execute(delete(schema.audit_log).where(schema.audit_log.c.seq == row.seq))
    return tamper


def _swap_seq(conn: Any) -> None:
    from lienthong.storage import schema

    rows = _rows(conn)
    a, b = rows[len(rows) // 2].seq, rows[len(rows) // 2 + 1].seq
    for table in (schema.audit_patient, schema.audit_log):
        conn.execute(update(table).where(table.c.seq == a).values(seq=-1))
        conn.execute(update(table).where(table.c.seq == b).values(seq=a))
        conn.execute(update(table).where(table.c.seq == -1).values(seq=b))


def _swap_bodies(conn: Any) -> None:
    rows = _rows(conn)
    a, b = rows[len(rows) // 2], rows[len(rows) // 2 + 1]
    _set(conn, a.seq, body=bytes(b.body), prev_hash=b.prev_hash, hash=b.hash)
    _set(conn, b.seq, body=bytes(a.body), prev_hash=a.prev_hash, hash=a.hash)


def _append_forged(conn: Any) -> None:
    from lienthong.storage import schema

    last = _rows(conn)[-1]
    conn.execute(insert(schema.audit_log).values(
        seq=last.seq + 1, recorded=0, actor="x", facility=None, action="read", outcome="0",
        body=b'{"resourceType":"AuditEvent"}', prev_hash=last.hash, hash="f" * 64))


def _head(conn: Any) -> None:
    from lienthong.storage import schema

    h = conn.execute(select(schema.audit_head.c.hash)).scalar_one()
    conn.execute(update(schema.audit_head).values(hash=_flip(h)))


def _column(column: str, value: Any) -> Callable[[Any], None]:
    def tamper(conn: Any) -> None:
        rows = _rows(conn)
        _set(conn, rows[len(rows) // 2].seq, **{column: value})
    return tamper


def _drop_patient_link(conn: Any) -> None:
    from lienthong.storage import schema

    ap = schema.audit_patient
    seq = conn.execute(select(func.max(ap.c.seq))).scalar_one()
    conn.execute(delete(ap).where(ap.c.seq == seq))


TAMPERS: dict[str, Callable[[Any], None]] = {
    "body-first": _body_edit("first"), "body-middle": _body_edit("middle"), "body-last": _body_edit("last"),
    "prev-hash-middle": _hash_edit("prev_hash", "middle"), "prev-hash-last": _hash_edit("prev_hash", "last"),
    "hash-middle": _hash_edit("hash", "middle"), "hash-last": _hash_edit("hash", "last"),
    "delete-first": _delete_row("first"), "delete-middle": _delete_row("middle"), "delete-last": _delete_row("last"),
    "reorder-seq": _swap_seq, "reorder-bodies": _swap_bodies, "append-forged": _append_forged, "head": _head,
}
QUERY_COLUMNS: dict[str, Callable[[Any], None]] = {
    "actor-column": _column("actor", "someone-else"),
    "recorded-column": _column("recorded", 1),
    "patient-index-row": _drop_patient_link,
}


@pytest.fixture
def tampered(trail_url: str) -> Iterator[tuple[str, Any]]:
    from lienthong.storage.engine import make_engine

    engine = make_engine(trail_url)
    snap = _snapshot(engine)
    assert len(snap["audit_log"]) >= 10
    yield trail_url, engine
    _restore(engine, snap)
    assert _snapshot(engine) == snap  # restored exactly, for the next tampering
    engine.dispose()


def test_verify_passes_on_an_intact_trail(trail_url: str, request: pytest.FixtureRequest) -> None:
    result = _verify_cli(trail_url)
    assert result.exit_code == 0, result.output
    assert "intact" in result.output




@pytest.mark.parametrize("tamper", sorted(TAMPERS))
def test_verify_fails_after_tampering(tampered: tuple[str, Any], tamper: str, request: pytest.FixtureRequest) -> None:
    url, engine = tampered
    with engine.begin() as conn:
        TAMPERS[tamper](conn)
    assert_detected(_verify_cli(url), tamper)


@pytest.mark.parametrize("tamper", sorted(QUERY_COLUMNS))
def test_verify_fails_after_editing_the_query_columns(tampered: tuple[str, Any], tamper: str,
                                                      request: pytest.FixtureRequest) -> None:
    url, engine = tampered
    with engine.begin() as conn:
        QUERY_COLUMNS[tamper](conn)
    assert_detected(_verify_cli(url), tamper)


def test_verify_is_not_fooled_by_a_live_node_appending(trail_url: str, request: pytest.FixtureRequest) -> None:
    from sqlalchemy import event

    from lienthong.security.audit import AuditRecord, AuditTrail
    from lienthong.storage.engine import make_engine

    writer, reader = make_engine(trail_url), make_engine(trail_url)
    appended: list[int] = []

    def append_once(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if not appended and "audit_head" in statement and "audit_log" not in statement:
            appended.append(1)  # the node writes a read audit while verify is between its two queries
            with writer.begin() as w:
                AuditTrail(writer, "node").record_in(w, [AuditRecord(
                    action="read", outcome=0, actor="bs.live", actor_kind="user", roles=(), facility=None,
                    address=None, node="node")])

    event.listen(reader, "before_cursor_execute", append_once)
    engine = make_engine(trail_url)
    snap = _snapshot(engine)
    try:
        ok, _, message = AuditTrail(reader, "cli").verify()
        assert appended
        assert ok, message
    finally:
        _restore(engine, snap)
        for e in (writer, reader, engine):
            e.dispose()


# ---- who may read the trail ---------------------------------------------------------------------------------
NOT_AUDITORS = ["clinician", "nurse", "records-officer", "facility-admin", "province-admin", "system-facility",
                "system-global"]


@pytest.mark.parametrize("actor", NOT_AUDITORS)
def test_only_auditors_read_the_trail(world: World, actor: str) -> None:
    for url in ("/fhir/Patient/p1a/$access-report", "/fhir/$audit?patient=p1a", "/fhir/$audit?actor=bs.an",
                "/fhir/$audit"):
        assert_outcome(world.http.get(url, headers=world.h(actor)), 403, "forbidden")


def test_access_report_says_who_accessed_a_patient_and_when(world: World) -> None:
    t0 = datetime.now(UTC) - timedelta(seconds=1)
    assert world.http.get("/fhir/Patient/p1a", headers=world.h("clinician")).status_code == 200
    assert world.http.get("/fhir/Patient/p1a", headers=world.h("nurse")).status_code == 200
    assert world.http.get("/fhir/Patient?_id=p1b", headers=world.h("records-officer")).status_code == 200
    wait_for_events(world.audit, lambda evs: len(evs) >= 1, actor="lt.hoa", patient="p1b",
                    since=int(t0.timestamp() * 1e6))
    wait_for_events(world.audit, lambda evs: len(evs) >= 1, actor="dd.binh", patient="p1a",
                    since=int(t0.timestamp() * 1e6))
    auditor = world.h("auditor")
    for url in ("/fhir/Patient/p1a/$access-report", "/fhir/$audit?patient=p1a"):
        r = world.http.get(url, headers=auditor)
        assert r.status_code == 200, r.text
        bundle = r.json()
        assert bundle["resourceType"] == "Bundle" and bundle["total"] == len(bundle["entry"])
        events = [e["resource"] for e in bundle["entry"]]
        assert all("p1a" in patients_of(e) for e in events)
        recent = [(actor_of(e), action_of(e)) for e in events
                  if datetime.fromisoformat(e["recorded"].replace("Z", "+00:00")) >= t0]
        assert ("bs.an", "read") in recent and ("dd.binh", "read") in recent
        assert not [a for a, _ in recent if a == "lt.hoa"]  # lt.hoa looked at p1b only
    r = world.http.get("/fhir/$audit?actor=dd.binh", headers=auditor)
    assert r.json()["total"] >= 1 and {actor_of(e["resource"]) for e in r.json()["entry"]} == {"dd.binh"}
    since = (datetime.now(UTC) - timedelta(seconds=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    r = world.http.get(f"/fhir/$audit?since={since}", headers=auditor)
    assert r.status_code == 200 and all(e["resource"]["recorded"] >= since[:19] for e in r.json()["entry"])
    assert_outcome(world.http.get("/fhir/$audit?since=not-a-date", headers=auditor), 400)
    # reading the trail is itself audited
    mine = [e for e in wait_for_events(world.audit, lambda evs: len(evs) >= 3, actor="kt.vien",
                                       since=int(t0.timestamp() * 1e6))
            if e.get("outcomeDesc") == "audit trail read"]
    assert any("p1a" in patients_of(e) for e in mine)


@pytest.mark.parametrize("url", ["/fhir/Observation/obs-1a", "/fhir/Condition?subject=Patient/p1a",
                                 "/fhir/Observation/obs-1a/_history/1"])
def test_access_report_includes_reads_of_the_patients_other_resources(world: World, url: str) -> None:
    start = head_seq(world.app)
    r = world.http.get(url, headers=world.h("nurse"))
    assert r.status_code == 200
    wait_for_events(world.audit, lambda evs: any(int(e["id"]) > start for e in evs), actor="dd.binh")
    report = world.http.get("/fhir/Patient/p1a/$access-report", headers=world.h("auditor")).json()
    assert [e for e in report["entry"] if int(e["resource"]["id"]) > start and actor_of(e["resource"]) == "dd.binh"]


def test_admin_cli_records_the_operating_system_account(db_url: str) -> None:
    from lienthong.cli.main import app as cli

    result = CliRunner().invoke(cli, ["keys", "rotate", "--db", db_url])
    assert result.exit_code == 0, result.output
    app = make_app(db_url)
    try:
        events = audit_of(app).events()
        assert [(action_of(e), actor_of(e)) for e in events] == [("admin", f"os:{getpass.getuser()}")]
        assert "rotated" in events[0]["outcomeDesc"]
    finally:
        close_app(app)


def test_concurrent_reads_are_each_answered_only_after_their_record_commits(world: World, direct: None,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Group commit wakes a batch's requests together; none may be woken before its own record is durable."""
    import asyncio

    import httpx

    audit = world.audit
    real_commit = audit._commit
    committed: set[str] = set()

    def noting_commit(records: Any) -> None:
        real_commit(records)  # durable from here on; the batch's requests are woken only after this returns
        committed.update(rid for rec in records for t, rid in rec.resources if t == "Patient")

    monkeypatch.setattr(audit, "_commit", noting_commit)
    ids = sorted(rid for t, rid in world.allowed("system-facility", {"Patient"}))
    assert len(ids) >= 3

    async def read_all() -> list[tuple[str, int, bool]]:
        transport = httpx.ASGITransport(app=world.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://node") as client:
            async def read(rid: str) -> tuple[str, int, bool]:
                r = await client.get(f"/fhir/Patient/{rid}", headers=world.h("system-facility"))
                return rid, r.status_code, rid in committed  # checked the moment the answer arrives

            return await asyncio.gather(*(read(rid) for _ in range(8) for rid in ids))

    answers = asyncio.run(read_all())
    assert {status for _, status, _ in answers} == {200}
    assert all(was_committed for _, _, was_committed in answers)


def test_a_record_keeps_its_exact_bytes_through_the_batch_writer(world: World) -> None:
    """Vietnamese text, quotes, backslashes and characters JSON escapes survive the writer byte for byte,
    so the chain still verifies (the PostgreSQL writer ships a batch as one JSON document)."""
    from lienthong.security.audit import AuditRecord

    audit = world.audit
    detail = 'Nguyễn Văn Ân "trích dẫn" \\ gạch chéo \u2028 tab\t 🩺 \x01 \x00'
    audit.record(AuditRecord(action="read", outcome=0, actor="probe-bytes", actor_kind="user", roles=("bác sĩ",),
                             facility=None, address=None, node="test", patients=["p1a"], detail=detail))
    events = [e for e in audit.events(actor="probe-bytes") if e.get("outcomeDesc") == detail]
    assert len(events) == 1
    assert audit.verify()[0]


def test_a_batch_chains_identically_on_the_database_and_in_python(world: World) -> None:
    """One batch with several patients per record, no actor and no facility: each record's id is its
    sequence number and `verify` (which recomputes the chain independently) accepts what the writer stored,
    on PostgreSQL through the one-statement conditional append."""
    from lienthong.security.audit import AuditRecord

    audit = world.audit
    records = [AuditRecord(action="search", outcome=0, actor=None if k == 0 else f"batch-{k}", actor_kind="user",
                           roles=(), facility=None if k < 2 else "24001", address="10.0.0.1", node="test",
                           patients=["pz", "pa", "pm", "pa"][: k + 1], detail=f"lô {k}") for k in range(4)]
    for rec in records:
        audit.submit(rec, waited=False)
    audit.flush()
    stored = audit.events(limit=4)
    assert [e["outcomeDesc"] for e in reversed(stored)] == [f"lô {k}" for k in range(4)]
    ids = [int(e["id"]) for e in reversed(stored)]
    assert ids == list(range(ids[0], ids[0] + 4))
    assert [e["entity"][0]["what"]["reference"] for e in stored] == ["Patient/pa"] * 3 + ["Patient/pz"]
    assert len(audit.events(patient="pm")) >= 2
    assert audit.verify()[0]


def test_writers_of_two_processes_interleave_into_one_chain(db_url: str) -> None:
    """Each writer chains from the head it wrote last; when another one appended meanwhile, the conditional
    append inserts nothing and the batch is chained again from the locked head. A write transaction that
    rolls back leaves its writer with a wrong guess, which must cost only that retry."""
    from lienthong.node import open_database
    from lienthong.security.audit import AuditRecord, AuditTrail

    dbs = [open_database(db_url), open_database(db_url)]
    trails = [AuditTrail(db.engine, f"node-{k}") for k, db in enumerate(dbs)]

    def record(k: int) -> AuditRecord:
        return AuditRecord(action="read", outcome=0, actor=f"w{k % 2}", actor_kind="client", roles=(), facility=None,
                           address=None, node="n", patients=[f"p{k}"], detail=f"ghi {k}")

    for k in range(12):
        trail = trails[k % 2 if k < 6 else (k // 2) % 2]
        trail.submit(record(k), waited=False)
        trail.flush()
    with pytest.raises(RuntimeError), dbs[0].engine.begin() as conn:
        trails[0].record_in(conn, [record(100)])
        raise RuntimeError("the write fails after its audit record was chained")
    trails[1].submit(record(12), waited=False)
    trails[1].flush()
    trails[0].submit(record(13), waited=False)
    trails[0].flush()
    ok, _, message = trails[0].verify()
    assert ok, message
    details = [e["outcomeDesc"] for e in reversed(trails[0].events(limit=100))]
    assert details == [f"ghi {k}" for k in range(14)], "a record was lost, duplicated or reordered"
    for trail, db in zip(trails, dbs, strict=True):
        trail.close()
        db.engine.dispose()
