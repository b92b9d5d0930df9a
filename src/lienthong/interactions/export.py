"""Bulk Data `$export` (system and Patient level), NDJSON output, asynchronous request pattern.

Why: a facility hands its whole record set to the province, to a new vendor or
to a backup in one request without holding a connection open. Jobs are stored
before work starts and resumed at start-up, so a crash never leaves one
"processing" forever; output is split into files of bounded size.
"""

from __future__ import annotations

import re
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson
from sqlalchemy import Connection, false, insert, select, update

from lienthong.fhir.datetimes import DateFormatError, format_instant, now_us, parse_range
from lienthong.fhir.outcome import error
from lienthong.interactions.context import Context
from lienthong.interactions.guard import AuditFacts, OpenGuard
from lienthong.interactions.service import FhirService
from lienthong.storage import schema

FILE_LIMIT = 10_000  # resources per NDJSON file
_ACCEPTED_FORMATS = {"application/fhir+ndjson", "application/ndjson", "ndjson"}


class ExportManager:
    def __init__(self, service: FhirService) -> None:
        self.service = service
        self.db = service.db
        self._lock = threading.Lock()
        self._threads: dict[str, threading.Thread] = {}
        self._contexts: dict[str, Context] = {}  # who asked: the export shows only what they may see

    def start(self, ctx: Context, level: str, params: list[tuple[str, str]]) -> str:
        """Record a job and start it; returns the job id."""
        request: dict[str, Any] = {"level": level, "types": None, "since": None}
        for name, value in params:
            if name == "_outputFormat" and value not in _ACCEPTED_FORMATS:
                raise error(400, "not-supported", "Chỉ hỗ trợ NDJSON", "Only NDJSON output is supported")
            if name == "_type":
                types = [t.strip() for t in value.split(",") if t.strip()]
                for t in types:
                    self.service.check_type(t)
                request["types"] = types
            elif name == "_since":
                try:
                    request["since"] = parse_range(value.replace(" ", "+"))[0]
                except DateFormatError:
                    raise error(400, "invalid", "_since không hợp lệ", "Invalid _since") from None
            elif name not in ("_outputFormat",):
                raise error(400, "not-supported", f"Không hỗ trợ tham số '{name}'",
                            f"Unsupported $export parameter '{name}'")
        self.service.guard.authorize(ctx, "export", None)
        job_id = secrets.token_hex(16)
        now = now_us()
        self._contexts[job_id] = ctx
        with self.db.begin() as store:
            store.conn.execute(insert(schema.export_job).values(
                job_id=job_id, status="accepted", request=orjson.dumps(request).decode(), created=now,
                transaction_time=now, owner=ctx.actor))
        self._launch(job_id)
        return job_id

    def resume(self) -> int:
        """Restart jobs that a crash interrupted."""
        job = schema.export_job
        with self.db.read() as store:
            ids = [r[0] for r in store.execute(select(job.c.job_id).where(job.c.status.in_(["accepted", "running"])))]
        for job_id in ids:
            self._launch(job_id)
        return len(ids)

    def _launch(self, job_id: str) -> None:
        thread = threading.Thread(target=self.run, args=(job_id,), name=f"export-{job_id[:8]}", daemon=True)
        with self._lock:
            self._threads[job_id] = thread
        thread.start()

    def wait(self, job_id: str, timeout: float = 60.0) -> None:
        with self._lock:
            thread = self._threads.get(job_id)
        if thread is not None:
            thread.join(timeout)

    def run(self, job_id: str) -> None:
        job, files = schema.export_job, schema.export_file
        try:
            with self.db.begin() as store:
                row = store.execute(select(job.c.request, job.c.transaction_time).where(job.c.job_id == job_id)).first()
                if row is None:
                    return
                store.conn.execute(files.delete().where(files.c.job_id == job_id))
                store.conn.execute(update(job).where(job.c.job_id == job_id).values(status="running"))
            request = orjson.loads(row[0])
            ctx = self._contexts.get(job_id)
            if ctx is None:
                if not isinstance(self.service.guard, OpenGuard):
                    raise RuntimeError("bị gián đoạn khi khởi động lại, hãy yêu cầu lại / "
                                       "interrupted by a restart; please request the export again")
                ctx = Context()
            self._export(ctx, job_id, request, int(row[1]))
            self.service.guard.on_access(ctx, AuditFacts("export", detail=f"job {job_id}"))
            with self.db.begin() as store:
                store.conn.execute(update(job).where(job.c.job_id == job_id, job.c.status == "running")
                                   .values(status="completed", finished=now_us()))
        except Exception as exc:  # a failed job is reported through polling, never lost
            with self.db.begin() as store:
                store.conn.execute(update(job).where(job.c.job_id == job_id)
                                   .values(status="failed", error=str(exc)[:2000], finished=now_us()))

    def _export(self, ctx: Context, job_id: str, request: dict[str, Any], until: int) -> None:
        svc = self.service
        r, v = schema.resource, schema.resource_version
        compartment = svc.compartment_params() if request["level"] == "patient" else None
        types = request["types"] or sorted(svc.types)
        if compartment is not None:
            types = [t for t in types if t in compartment or t == "Patient"]
        for rtype in types:
            stmt = (
                select(v.c.body)
                .join(r, (r.c.res_pk == v.c.res_pk) & (r.c.version == v.c.version))
                .where(r.c.rtype == rtype, r.c.deleted == false(), r.c.last_updated <= until)
                .order_by(r.c.res_pk)
            )
            if request["since"] is not None:
                stmt = stmt.where(r.c.last_updated >= request["since"])
            visible = svc.guard.search_filter(ctx, rtype, r)
            if visible is not None:
                stmt = stmt.where(visible)
            if compartment is not None and rtype != "Patient":
                ref = schema.sp_reference
                stmt = stmt.where(r.c.res_pk.in_(select(ref.c.res_pk).where(
                    ref.c.pkey.in_(compartment[rtype]), ref.c.target_type == "Patient")))
            part, buffer, count = 0, bytearray(), 0
            with self._scan() as conn:
                rows = conn.execution_options(stream_results=True, yield_per=1000).execute(stmt)
                for (body,) in rows:
                    buffer += body + b"\n"
                    count += 1
                    if count == FILE_LIMIT:
                        self._write_file(job_id, rtype, part, count, bytes(buffer))
                        part, buffer, count = part + 1, bytearray(), 0
            if count:
                self._write_file(job_id, rtype, part, count, bytes(buffer))
            if self._cancelled(job_id):
                return

    @contextmanager
    def _scan(self) -> Iterator[Connection]:
        """A connection to stream one type from. PostgreSQL's server-side cursor needs a transaction
        (which also gives the scan one snapshot); SQLite streams in autocommit, never holding the write lock."""
        if self.db.sqlite:
            with self.db.read() as store:
                yield store.conn
        else:
            with self.db.engine.connect() as conn, conn.begin():
                yield conn

    def _write_file(self, job_id: str, rtype: str, part: int, count: int, data: bytes) -> None:
        with self.db.begin() as store:
            store.conn.execute(insert(schema.export_file).values(
                job_id=job_id, name=f"{rtype}-{part}.ndjson", rtype=rtype, count=count, data=data))

    def _cancelled(self, job_id: str) -> bool:
        job = schema.export_job
        with self.db.read() as store:
            status = store.execute(select(job.c.status).where(job.c.job_id == job_id)).scalar_one_or_none()
        return bool(status == "cancelled")

    def status(self, ctx: Context, job_id: str) -> tuple[int, dict[str, Any] | None, dict[str, str]]:
        """Poll: (202, None, progress) while running, (200, manifest) when done, an error if failed."""
        _check_job(job_id)
        job, files = schema.export_job, schema.export_file
        with self.db.read() as store:
            row = store.execute(select(job.c.status, job.c.transaction_time, job.c.request, job.c.error, job.c.owner)
                                .where(job.c.job_id == job_id)).first()
            if row is None or row[0] == "cancelled" or row[4] != ctx.actor:
                raise error(404, "not-found", "Không có yêu cầu xuất này", "No such export job")
            if row[0] in ("accepted", "running"):
                return 202, None, {"X-Progress": f"{row[0]}", "Retry-After": "1"}
            if row[0] == "failed":
                raise error(500, "exception", "Xuất dữ liệu thất bại", f"Export failed: {row[3]}")
            outputs = store.execute(select(files.c.name, files.c.rtype, files.c.count)
                                    .where(files.c.job_id == job_id).order_by(files.c.rtype, files.c.name)).all()
        request = orjson.loads(row[2])
        base = ctx.base_url
        req_url = f"{base}/$export" if request["level"] == "system" else f"{base}/Patient/$export"
        manifest = {
            "transactionTime": format_instant(int(row[1])),
            "request": req_url,
            "requiresAccessToken": ctx.actor is not None,
            "output": [{"type": t, "url": f"{base}/$export-file/{job_id}/{n}", "count": c} for n, t, c in outputs],
            "error": [],
        }
        return 200, manifest, {"Expires": "in one day"}

    def file(self, ctx: Context, job_id: str, name: str) -> bytes:
        """An output file, for the caller who asked for the export only."""
        _check_job(job_id)
        if not _FILE_NAME.fullmatch(name):
            raise error(404, "not-found", "Không có tệp này", "No such export file")
        files, job = schema.export_file, schema.export_job
        with self.db.read() as store:
            owner = store.execute(select(job.c.owner, job.c.status).where(job.c.job_id == job_id)).first()
            if owner is None or owner[0] != ctx.actor or owner[1] == "cancelled":
                raise error(404, "not-found", "Không có tệp này", "No such export file")
            data = store.execute(select(files.c.data).where(files.c.job_id == job_id, files.c.name == name)).first()
        if data is None:
            raise error(404, "not-found", "Không có tệp này", "No such export file")
        return bytes(data[0])

    def cancel(self, ctx: Context, job_id: str) -> None:
        _check_job(job_id)
        job = schema.export_job
        with self.db.begin() as store:
            changed = store.conn.execute(update(job).where(job.c.job_id == job_id, job.c.status != "cancelled",
                                                           job.c.owner == ctx.actor)
                                         .values(status="cancelled")).rowcount
            if changed:  # Bulk Data: a cancelled request's files SHOULD be deleted
                store.conn.execute(schema.export_file.delete().where(schema.export_file.c.job_id == job_id))
        if not changed:
            raise error(404, "not-found", "Không có yêu cầu xuất này", "No such export job")


_JOB_ID = re.compile(r"[0-9a-f]{32}")  # secrets.token_hex(16)
_FILE_NAME = re.compile(r"[A-Za-z]{1,64}-[0-9]{1,9}\.ndjson")


def _check_job(job_id: str) -> None:
    """Ids that were never issued are unknown jobs; checked before they reach SQL (NUL breaks PostgreSQL)."""
    if not _JOB_ID.fullmatch(job_id):
        raise error(404, "not-found", "Không có yêu cầu xuất này", "No such export job")
