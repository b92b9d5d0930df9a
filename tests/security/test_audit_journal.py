"""The audit journal: read records durable in a local fdatasync'd file before the answer, drained into the chain
exactly once, whatever dies or fails in between (both databases)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import func, select, text

from lienthong.node import open_database
from lienthong.security.audit import AuditRecord, AuditTrail, decode_record, encode_record, render, stored_event
from lienthong.security.audit_journal import journal_location
from lienthong.storage import schema
from lienthong.storage.repository import Database

SRC = Path(__file__).resolve().parents[2] / "src"


def record(actor: str, k: int, **extra: Any) -> AuditRecord:
    return AuditRecord(action="read", outcome=0, actor=actor, actor_kind="client", roles=("bác sĩ",), facility="24001",
                       address="10.0.0.9", node="test", resources=[("Patient", f"p{k}")], patients=[f"p{k}"],
                       detail=f"đọc {k}", **extra)


@pytest.fixture
def database(db_url: str) -> Iterator[Database]:
    db = open_database(db_url, read_cache_mb=0)
    yield db
    db.engine.dispose()


@pytest.fixture
def trail(database: Database, tmp_path: Path) -> Iterator[AuditTrail]:
    t = AuditTrail(database.engine, "test", tmp_path / "journal")
    yield t
    t.close()


def stored(database: Database, actor: str) -> list[tuple[int, bytes]]:
    log = schema.audit_log
    with database.engine.connect() as conn:
        return [(seq, bytes(body)) for seq, body in conn.execute(
            select(log.c.seq, log.c.body).where(log.c.actor == actor).order_by(log.c.seq))]


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("seg-*.jsonl"))


def content(segment: Path) -> bytes:
    """A segment's lines, without the zeros written ahead of them."""
    data = segment.read_bytes()
    return data[:data.find(0)] if 0 in data else data


def test_a_record_is_in_the_journal_when_its_future_resolves_and_in_the_chain_after_the_drain(
        trail: AuditTrail, database: Database, tmp_path: Path) -> None:
    futures = [trail.submit(record("j-basic", k)) for k in range(5)]
    for f in futures:
        f.result(timeout=10)
    lines = b"".join(content(p) for p in segment_files(tmp_path / "journal")).splitlines()
    assert sum(1 for line in lines if decode_record(line).actor == "j-basic") == 5  # durable before the answer
    assert oct((tmp_path / "journal").stat().st_mode & 0o777) == "0o700"
    assert all(oct(p.stat().st_mode & 0o777) == "0o600" for p in segment_files(tmp_path / "journal"))
    trail.drain()
    rows = stored(database, "j-basic")
    assert len(rows) == 5
    assert {body for _, body in rows} == {line for line in lines if decode_record(line).actor == "j-basic"}
    events = trail.events(actor="j-basic")
    assert sorted(e["outcomeDesc"] for e in events) == [f"đọc {k}" for k in range(5)]
    assert {e["id"] for e in events} == {str(seq) for seq, _ in rows}
    assert events[0]["entity"][0]["what"]["reference"].startswith("Patient/p")
    assert trail.drain() == 0  # nothing is moved twice
    assert len(stored(database, "j-basic")) == 5
    ok, _, message = trail.verify()
    assert ok, message
    table = schema.audit_journal
    with database.engine.connect() as conn:
        offsets = dict(conn.execute(select(table.c.segment, table.c.drained)).all())
    assert trail.journal is not None and trail.journal.current is not None
    assert offsets[trail.journal.current.name] == trail.journal.current.synced


def test_the_compact_record_renders_the_same_auditevent_as_the_record(trail: AuditTrail) -> None:
    from lienthong.interactions.guard import RemoteAccess

    remote = RemoteAccess("server", "24001", "01001", "req-1", "bs.an", ("doctor",), "TREAT", ("urn:vn:cccd", "0011"))
    rec = record("j-render", 7, query="Patient?identifier=0011", break_glass=True, remote=remote, recorded=12345)
    event = render(42, encode_record(rec))
    assert event == {**rec.to_fhir(), "id": "42"}
    assert decode_record(encode_record(rec)) == AuditRecord(
        rec.action, rec.outcome, rec.actor, rec.actor_kind, tuple(rec.roles), rec.facility, rec.address, rec.node,
        list(rec.resources), list(rec.patients), rec.query, rec.detail, rec.recorded, True, remote)
    columns, body, patients = stored_event(encode_record(rec))  # what the drain reads of a line
    assert columns == (12345, rec.actor, rec.facility, "read", "0") and body == encode_record(rec)
    assert patients == ["p7"]
    for bad in (b'{"a": 1}', b"[2" + encode_record(rec)[2:], encode_record(rec).replace(b'"read",0', b'"read","0"'),
                b"[1,2,3]", b"\xff"):
        with pytest.raises(ValueError):
            stored_event(bad)
    legacy = orjson.dumps({**rec.to_fhir(), "id": "3"})
    assert render(3, legacy) == orjson.loads(legacy)  # records written before the compact format


_CHILD = """
import os, sys
from pathlib import Path
import lienthong.security.audit as audit
from lienthong.node import open_database

audit.DRAIN_SECONDS = 3600.0  # this process drains only when told to
url, journal, first, drained, total = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
trail = audit.AuditTrail(open_database(url, read_cache_mb=0).engine, "child", journal)
for k in range(total):
    rec = audit.AuditRecord(action="read", outcome=0, actor="j-child", actor_kind="client", roles=(), facility=None,
                            address=None, node="child", patients=[f"p{first + k}"], detail=f"con {first + k}")
    trail.submit(rec).result(timeout=10)
    if k + 1 == drained:
        trail.drain()
print(trail.journal.current.path, flush=True)
os._exit(0)  # dies without closing: no drain, no clean-up
"""


def run_child(url: str, journal: Path, first: int, drained: int, total: int) -> Path:
    """A separate process that journals `total` reads, drains after `drained` of them, then dies."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(_CHILD), url, str(journal), str(first),
                           str(drained), str(total)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return Path(done.stdout.strip())


def test_a_dead_process_segment_is_drained_once_by_the_next_with_its_torn_tail_dropped(
        db_url: str, database: Database, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    journal = tmp_path / "journal"
    orphan = run_child(db_url, journal, first=0, drained=4, total=10)  # 4 reached the chain before it died
    assert len(stored(database, "j-child")) == 4
    with orphan.open("r+b") as f:  # the process died in the middle of a line it never acknowledged
        f.seek(len(content(orphan)))
        f.write(b'[1,1796684709513170,"read",0,"j-chi')
    assert orphan.stat().st_size > len(content(orphan))  # zeros written ahead follow the torn line
    heir = AuditTrail(database.engine, "heir", journal)
    try:
        assert heir.drain(orphans=True) == 6  # exactly the six it had not drained
        assert not orphan.exists()
        assert "35 unacknowledged byte(s) dropped" in caplog.text
        assert heir.drain(orphans=True) == 0
        details = sorted(decode_record(body).detail or "" for _, body in stored(database, "j-child"))
        assert details == sorted(f"con {k}" for k in range(10))
        ok, _, message = heir.verify()
        assert ok, message
    finally:
        heir.close()
    assert segment_files(journal) == []  # the heir's own segment went with its close


def test_a_live_segment_of_another_trail_is_never_claimed(database: Database, tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    first = AuditTrail(database.engine, "first", journal)
    second = AuditTrail(database.engine, "second", journal)
    try:
        first.submit(record("j-live", 1)).result(timeout=10)
        assert second.drain(orphans=True) == 0  # locked by its writer: not an orphan
        assert second.journal is not None and len(second.journal.segments()) == 1
        assert first.drain() == 1
    finally:
        first.close()
        second.close()
    assert len(stored(database, "j-live")) == 1
    assert segment_files(journal) == []


def test_a_segment_another_database_registered_is_left_alone(db_url: str, database: Database, tmp_path: Path,
                                                             request: pytest.FixtureRequest,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    journal = tmp_path / "journal"
    if db_url.startswith("sqlite"):
        other_url = f"sqlite:///{tmp_path / 'other.db'}"
    else:
        other_url = request.getfixturevalue("pg_server").create_database("journal_other", template="lienthong_template")
    foreign = run_child(other_url, journal, first=100, drained=0, total=3)
    mine = AuditTrail(database.engine, "mine", journal)
    try:
        assert mine.drain(orphans=True) == 0
        assert mine.drain(orphans=True) == 0  # the scan repeats; the warning does not
        assert foreign.exists() and stored(database, "j-child") == []
        assert caplog.text.count("is not registered in this database") == 1
    finally:
        mine.close()
    assert foreign.exists()  # audit data of another database is never deleted
    if not db_url.startswith("sqlite"):
        request.getfixturevalue("pg_server").drop_database("journal_other")


def test_a_damaged_line_becomes_a_security_alert_and_the_chain_still_verifies(
        db_url: str, database: Database, tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    orphan = run_child(db_url, journal, first=0, drained=0, total=2)
    lines = content(orphan).splitlines()
    orphan.write_bytes(lines[0] + b"\n" + b'{"not": "a record"}\n' + lines[1] + b"\n")
    heir = AuditTrail(database.engine, "heir", journal)
    try:
        assert heir.drain(orphans=True) == 3
        alerts = [e for e in heir.events() if e.get("outcomeDesc", "").startswith("unreadable audit journal line")]
        assert len(alerts) == 1 and alerts[0]["outcome"] == "8"
        assert "not" in alerts[0]["outcomeDesc"]
        assert len(stored(database, "j-child")) == 2
        assert heir.verify()[0]
    finally:
        heir.close()


def test_segments_rotate_and_each_is_deleted_once_drained(trail: AuditTrail, database: Database,
                                                          tmp_path: Path) -> None:
    assert trail.journal is not None
    trail.journal.max_segment_bytes = 2_000
    for k in range(60):
        trail.submit(record("j-rotate", k)).result(timeout=10)
    assert len(trail.journal.segments()) > 3  # several retired segments wait for the drain
    trail.drain()
    assert len(stored(database, "j-rotate")) == 60
    assert len(segment_files(tmp_path / "journal")) == 1  # only the current one is left
    assert trail.verify()[0]


def test_a_batch_the_journal_cannot_take_is_committed_to_the_database(trail: AuditTrail, database: Database,
                                                                      tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import lienthong.security.audit as audit_module

    assert trail.journal is not None and trail.journal.current is not None
    broken = trail.journal.current
    trail.submit(record("j-fail", 0)).result(timeout=10)
    os.close(broken.fd)
    broken.fd = os.open(broken.path, os.O_RDONLY)  # writes now fail (EBADF), as on a failing disk
    trail.submit(record("j-fail", 1)).result(timeout=10)  # still answered: committed directly
    assert [decode_record(b).detail for _, b in stored(database, "j-fail")] == ["đọc 1"]
    trail.submit(record("j-fail", 2)).result(timeout=10)  # within the back-off: directly again, no new segment
    assert trail.journal.current is None
    assert [decode_record(b).detail for _, b in stored(database, "j-fail")] == ["đọc 1", "đọc 2"]
    monkeypatch.setattr(audit_module, "JOURNAL_RETRY_SECONDS", 0.0)
    monkeypatch.setattr(trail, "_journal_retry_at", 0.0)  # the back-off is over
    trail.submit(record("j-fail", 3)).result(timeout=10)  # the journal again, in a new segment
    assert trail.journal.current is not None and trail.journal.current is not broken
    assert len(stored(database, "j-fail")) == 2
    trail.drain()
    details = sorted(decode_record(b).detail or "" for _, b in stored(database, "j-fail"))
    assert details == ["đọc 0", "đọc 1", "đọc 2", "đọc 3"]
    assert not broken.path.exists()
    assert trail.verify()[0]


def test_reads_stay_answered_while_the_database_is_away_and_are_drained_when_it_returns(
        db_url: str, database: Database, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if db_url.startswith("sqlite"):
        pytest.skip("an embedded database has no outage apart from the node's own disk")
    server = request.getfixturevalue("pg_server")
    name = database.engine.url.database
    trail = AuditTrail(database.engine, "test", tmp_path / "journal")
    admin = open_database(server.url(), upgrade=False, read_cache_mb=0).engine.execution_options(
        isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
                         {"n": name})
        database.engine.dispose()
        for k in range(20):
            trail.submit(record("j-outage", k)).result(timeout=10)  # answered from the journal alone
        with pytest.raises(Exception):  # noqa: B017 - whichever driver error the refused connection raises
            trail.drain()
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        trail.drain()
        assert len(stored(database, "j-outage")) == 20
        assert trail.verify()[0]
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        admin.dispose()
        trail.close()


def test_an_existing_journal_directory_is_made_private(database: Database, tmp_path: Path) -> None:
    directory = tmp_path / "journal"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    trail = AuditTrail(database.engine, "test", directory)
    try:
        assert directory.stat().st_mode & 0o777 == 0o700
    finally:
        trail.close()


def test_the_drain_thread_moves_records_by_itself(trail: AuditTrail, database: Database) -> None:
    trail.submit(record("j-thread", 0)).result(timeout=10)
    deadline = time.monotonic() + 10
    while not stored(database, "j-thread") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(stored(database, "j-thread")) == 1


def test_the_default_location_follows_the_database() -> None:
    from sqlalchemy.engine import make_url

    assert journal_location(make_url("sqlite:////srv/his/lienthong.db")) == Path("/srv/his/lienthong.db-audit-journal")
    assert journal_location(make_url("sqlite://")) is None
    assert journal_location(make_url("sqlite:////srv/x.db"), "off") is None
    assert journal_location(make_url("sqlite:////srv/x.db"), "/data/j") == Path("/data/j")
    pg_a = journal_location(make_url("postgresql://u:secret@db:5432/a"))
    pg_b = journal_location(make_url("postgresql://u:other@db:5432/b"))
    assert pg_a is not None and pg_a.parent == Path("var/audit-journal") and pg_a != pg_b
    assert "secret" not in str(pg_a)


def test_a_secure_node_journals_its_reads_by_default(db_url: str, tmp_path: Path) -> None:
    from security.conftest import FAC1, add_client, bearer, client_login, close_app, make_app

    app = make_app(db_url)
    try:
        audit = app.state.node.service.guard.audit
        assert audit.journal is not None
        cid, secret = add_client(app, "HIS journal", FAC1, "system/*.cruds")
        from starlette.testclient import TestClient

        with TestClient(app) as http:
            h = bearer(client_login(app, cid, secret)["access_token"])
            pid = http.post("/fhir/Patient", json={"resourceType": "Patient"}, headers=h).json()["id"]
            assert http.get(f"/fhir/Patient/{pid}", headers=h).status_code == 200
        reads = [e for e in audit.events() if e["action"] == "R" and
                 any(x.get("what", {}).get("reference") == f"Patient/{pid}" for x in e.get("entity", []))]
        assert len(reads) == 1
        with app.state.node.db.engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(schema.audit_journal)).scalar_one() >= 1
    finally:
        close_app(app)


# ---- a real `lienthong serve` --------------------------------------------------------------------------------
LIENTHONG = Path(sys.executable).with_name("lienthong")


def _served(db_url: str, journal: Path) -> tuple[subprocess.Popen[str], str, dict[str, str], str]:
    """`lienthong serve` with a journal in `journal`, a system client's token, and one Patient read 5 times."""
    import socket

    import httpx

    from lienthong.security.accounts import Accounts

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(LIENTHONG), "serve", "--db", db_url, "--port", str(port), "--audit-journal",
                             str(journal)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            httpx.get(base + "/fhir/metadata", timeout=2)
            break
        except httpx.TransportError:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.2)
    db = open_database(db_url, upgrade=False, read_cache_mb=0)
    client_id, secret = Accounts(db.engine).add_client("journal-serve", None, "system/*.cruds")
    db.engine.dispose()
    token = httpx.post(base + "/auth/token", data={"grant_type": "client_credentials", "client_id": client_id,
                                                   "client_secret": secret}).json()["access_token"]
    headers = {"Authorization": f"Bearer {token}"}
    pid = httpx.post(base + "/fhir/Patient", json={"resourceType": "Patient"}, headers=headers).json()["id"]
    for _ in range(5):
        assert httpx.get(f"{base}/fhir/Patient/{pid}", headers=headers).status_code == 200
    return proc, pid, headers, client_id


def reads_of(database: Database, pid: str) -> int:
    trail = AuditTrail(database.engine, "check")
    return sum(1 for e in trail.events(patient=pid) if e["action"] == "R")


def test_a_stopped_server_drains_its_journal_and_deletes_its_segment(db_url: str, database: Database,
                                                                     tmp_path: Path) -> None:
    import signal

    journal = tmp_path / "journal"
    proc, pid, _, _ = _served(db_url, journal)
    assert segment_files(journal)  # the serving process's segment
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err
    assert segment_files(journal) == []
    assert reads_of(database, pid) == 5


def test_after_a_crash_audit_verify_drains_what_the_server_journalled(db_url: str, database: Database,
                                                                      tmp_path: Path) -> None:
    import signal

    journal = tmp_path / "journal"
    proc, pid, _, _ = _served(db_url, journal)
    proc.send_signal(signal.SIGKILL)  # no shutdown: reads of the last 0.2 s may be only in the journal
    proc.communicate(timeout=60)
    assert len(segment_files(journal)) == 1
    done = subprocess.run([str(LIENTHONG), "audit", "verify", "--db", db_url, "--audit-journal", str(journal)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert segment_files(journal) == []
    assert reads_of(database, pid) == 5  # none lost, none doubled, whatever the drain had moved before the kill
    assert "intact" in done.stdout


def test_serve_refuses_a_journal_directory_it_cannot_create(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    done = subprocess.run([str(LIENTHONG), "serve", "--db", f"sqlite:///{tmp_path / 'x.db'}", "--port", "0",
                           "--audit-journal", str(blocker / "journal")], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "cannot start" in " ".join(done.stderr.split()) and "Traceback" not in done.stderr
