"""Where an audited read's CPU goes, measured in process: no network, no load generator.

    python bench/fhir/audit_cost.py [--db sqlite|postgresql] [--requests N]

Part 1 drives the whole ASGI app (middleware, token check, access guard, read cache, audit barrier)
with a cached GET /fhir/Patient/{id}, 16 requests in flight on uvloop, three times: with `--insecure-dev`
semantics (no authentication, no audit); with a bearer token and the audit journal (every read's record
fdatasync'd locally before its answer, then drained into the chain, the drain included in the time);
and with a bearer token and `--audit-journal off` (each batch committed to the database before its
answers). CPU per request is the process's CPU over all threads, so the audit writer and drain count.

Part 2 commits read records through the audit trail's own batch path (`AuditTrail._commit`) in
batches of 1, 16, 500 and 2,000, and splits the per-record cost into building the AuditEvent
(`_serialised`), chaining (`_chained`) and the database work (the rest).

Why a separate tool: the HTTP benchmark (run.py) says how far reads are from the framework limit;
this says which part of the audited read to make cheaper, without a shared machine's noise in
the way (the numbers are per request, from CPU clocks).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PATIENT = {"resourceType": "Patient", "name": [{"family": "Nguyễn", "given": ["Văn", "An"]}],
           "identifier": [{"system": "https://cccd.gov.vn", "value": "001090012345"}],
           "address": [{"line": ["Số 1 đường Trần Hưng Đạo"], "city": "Bắc Ninh"}]}


def asgi_reads(url: str, secure: bool, requests: int, journal: str = "auto") -> float:
    """CPU microseconds per cached read through the whole app (all threads of this process)."""
    import uvloop
    from starlette.testclient import TestClient

    from lienthong.api.app import ApiSettings
    from lienthong.node import create_app
    from lienthong.security.accounts import Accounts
    from lienthong.storage.engine import make_engine

    app = create_app(url, ApiSettings(audit_journal=journal), secure=secure)
    trail = app.state.node.service.guard.audit if secure else None
    auth: list[tuple[bytes, bytes]] = []
    with TestClient(app) as client:
        if secure:
            engine = make_engine(url)
            client_id, secret = Accounts(engine).add_client(f"audit-cost-{time.time_ns()}", None, "system/*.cruds")
            engine.dispose()
            token = client.post("/auth/token", data={"grant_type": "client_credentials", "client_id": client_id,
                                                     "client_secret": secret}).json()["access_token"]
            auth = [(b"authorization", f"Bearer {token}".encode())]
        headers = {k.decode(): v.decode() for k, v in auth}
        pid = client.post("/fhir/Patient", json=PATIENT, headers=headers).json()["id"]
        path = f"/fhir/Patient/{pid}"
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
                 "headers": [(b"host", b"127.0.0.1"), (b"accept", b"application/fhir+json"), *auth],
                 "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8080)}
        statuses: list[int] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        async def caller(n: int) -> None:
            for _ in range(n):
                await app(dict(scope, state={}), receive, send)

        async def main() -> None:
            await asyncio.gather(*(caller(requests // 16) for _ in range(16)))

        uvloop.run(main())  # warm-up: the cache, the token memo, the audit writer's connection
        if trail is not None:
            trail.flush()
        statuses.clear()
        started = time.process_time()
        uvloop.run(main())
        if trail is not None:
            trail.flush()  # the journal's drain of these reads is part of their cost
        spent = time.process_time() - started
    if set(statuses) != {200}:
        raise SystemExit(f"unexpected statuses {sorted(set(statuses))}")
    return 1e6 * spent / len(statuses)


def batch_costs(url: str, total: int) -> list[tuple[int, float, float, float]]:
    """(batch size, build µs, chain µs, total µs) per record for read records committed in batches."""
    from lienthong.node import open_database
    from lienthong.security.audit import GENESIS, AuditRecord, AuditTrail, _chained, _serialised

    db = open_database(url)
    trail = AuditTrail(db.engine, "bench")

    def records(n: int) -> list[AuditRecord]:
        return [AuditRecord(action="read", outcome=0, actor="bench-client", actor_kind="client", roles=(),
                            facility=None, address="127.0.0.1", node="bench", resources=[("Observation", f"o{i}")],
                            patients=["p1"]) for i in range(n)]

    out = []
    for size in (1, 16, 500, 2000):
        batch = records(total)
        started = time.process_time()
        events = _serialised(batch)
        built = time.process_time()
        _chained(events, 0, GENESIS)
        chained = time.process_time()
        for rec in batch:
            rec.recorded = 0
        committed = time.process_time()
        for start in range(0, total, size):
            trail._commit(batch[start:start + size])
        done = time.process_time()
        out.append((size, 1e6 * (built - started) / total, 1e6 * (chained - built) / total,
                    1e6 * (done - committed) / total))
    trail.close()
    db.engine.dispose()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    ap.add_argument("--requests", type=int, default=32_000)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lienthong-audit-cost-"))
    os.chdir(tmp)
    server = None
    if args.db == "postgresql":
        from lienthong.devtools.pgserver import PostgresServer

        server = PostgresServer().start()
        urls = [server.create_database(f"cost{i}") for i in range(4)]
    else:
        urls = [f"sqlite:///{tmp}/cost{i}.db" for i in range(4)]
    try:
        open_us = asgi_reads(urls[0], secure=False, requests=args.requests)
        journal_us = asgi_reads(urls[1], secure=True, requests=args.requests)
        audited_us = asgi_reads(urls[2], secure=True, requests=args.requests, journal="off")
        batches = batch_costs(urls[3], 4000)
    finally:
        if server is not None:
            server.stop()
    print(f"# audited read cost, in process ({args.db}, {os.cpu_count()} cores, {args.requests:,} requests)\n")
    print("| path | CPU µs per cached read |\n|---|---|")
    print(f"| no authentication, no audit | {open_us:.1f} |")
    print(f"| bearer token, access guard, audit journalled before the answer and drained | {journal_us:.1f} |")
    print(f"| bearer token, access guard, audit committed before the answer (journal off) | {audited_us:.1f} |")
    print(f"| difference with the journal / without: authentication + audit | {journal_us - open_us:.1f} / "
          f"{audited_us - open_us:.1f} |\n")
    print("| batch size | build record µs/record | chain µs/record | whole commit µs/record |\n|---|---|---|---|")
    for size, build, chain, whole in batches:
        print(f"| {size} | {build:.1f} | {chain:.1f} | {whole:.1f} |")


if __name__ == "__main__":
    sys.exit(main())
