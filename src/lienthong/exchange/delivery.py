"""Reliable store-and-forward delivery: transactional outbox, dispatcher, idempotent inbox, resumable uploads.

Why this shape: links between district units and the provincial hub are slow
(about 1 Mbit/s), far (300 ms) and lossy (5 %), and a node may be off for
days. A message is written to `outbox` in the same transaction as the clinical
change that caused it, so either both happen or neither. The `Dispatcher`
sends due messages at least once, with exponential backoff and full jitter,
and marks one `sent` only when the receiver acknowledged it; the receiver's
`Inbox` deduplicates by `msg_id`, so at-least-once delivery becomes
exactly-once processing. Messages of one (dest, patient_key) stream leave
strictly in order: only the oldest unacknowledged message of a stream is ever
in flight, so a later record for a patient can never overtake an earlier one.

Compression: payloads are stored and sent compressed with Zstandard (level 6)
when the `zstandard` package is present, gzip level 6 otherwise; the reader
recognises either by its magic bytes. On the 30 Synthea R4 patient bundles in
shared/samples (25.2 MB) gzip-6 gives 17.1x and zstd-6 40.8x at three times
gzip's speed: FHIR JSON repeats whole structures further apart than gzip's
32 KiB window can see. For single small resources (~1.3 KB) both give ~2.4x.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import random
import re
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from sqlalchemy import Connection, Engine, bindparam, delete, func, insert, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError

from lienthong.exchange.schema import inbox, outbox, upload, upload_chunk

try:  # optional at import time so a node without the wheel still reads and writes gzip
    import zstandard
except ImportError:  # pragma: no cover - exercised only where zstandard is not installed
    zstandard = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

Clock = Callable[[], float]  # seconds since the epoch

MAX_PAYLOAD = 64 * 1024 * 1024  # compressed or not: bounds memory and decompression bombs
GZIP_LEVEL = 6
ZSTD_LEVEL = 6
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
DEFAULT_CODEC = "zstd" if zstandard is not None else "gzip"

_MSG_ID_RE = re.compile(r"^[A-Za-z0-9-]{8,40}$")
_CODE_RE = re.compile(r"^\d{5}$")

PENDING, SENDING, SENT, FAILED, DEAD = "pending", "sending", "sent", "failed", "dead"
RECEIVED, PROCESSED, REJECTED = "received", "processed", "rejected"


class PayloadError(ValueError):
    """A payload is too large, truncated, or not in a known compression format."""


def _us(seconds: float) -> int:
    return int(seconds * 1_000_000)


def _check_msg_id(msg_id: str) -> str:
    if not isinstance(msg_id, str) or not _MSG_ID_RE.match(msg_id):
        raise ValueError(f"msg_id không hợp lệ / invalid msg_id: {msg_id!r}")
    return msg_id


def _check_code(code: str, what: str) -> str:
    if not isinstance(code, str) or not _CODE_RE.match(code):
        raise ValueError(f"{what} phải là mã 5 chữ số / {what} must be a 5-digit code: {code!r}")
    return code


# ---- compression -----------------------------------------------------------------------------------


def compress(data: bytes, codec: str = DEFAULT_CODEC) -> bytes:
    """Compress for storage and the wire; `codec` is "zstd" or "gzip"."""
    if codec == "zstd":
        if zstandard is None:
            raise PayloadError("chưa cài zstandard / zstandard is not installed")
        return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True).compress(data)
    if codec == "gzip":
        return gzip.compress(data, compresslevel=GZIP_LEVEL, mtime=0)
    raise ValueError(f"codec không hỗ trợ / unsupported codec: {codec!r}")


def decompress(data: bytes, max_size: int = MAX_PAYLOAD) -> bytes:
    """Decompress zstd or gzip (by magic bytes), never producing more than `max_size` bytes."""
    if data.startswith(ZSTD_MAGIC):
        if zstandard is None:
            raise PayloadError("chưa cài zstandard / zstandard is not installed")
        try:  # our frames declare their size: check it before allocating, and let zstd detect truncation
            size = zstandard.get_frame_parameters(data).content_size
            if size == zstandard.CONTENTSIZE_UNKNOWN:
                raise PayloadError("khung zstd không khai kích thước / zstd frame does not declare its size")
            if size > max_size:
                raise PayloadError(f"vượt quá {max_size} byte / larger than {max_size} bytes")
            return zstandard.ZstdDecompressor().decompress(data)
        except zstandard.ZstdError as exc:
            raise PayloadError(f"dữ liệu zstd hỏng / corrupt zstd data: {exc}") from None
    if data.startswith(GZIP_MAGIC):
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            result = inflater.decompress(data, max_size + 1)
        except zlib.error as exc:
            raise PayloadError(f"dữ liệu gzip hỏng / corrupt gzip data: {exc}") from None
        if len(result) > max_size:
            raise PayloadError(f"vượt quá {max_size} byte / larger than {max_size} bytes")
        if not inflater.eof:
            raise PayloadError("dữ liệu gzip bị cắt cụt / truncated gzip data")
        return result
    raise PayloadError("định dạng nén không rõ / unknown compression format")


# ---- backoff ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter: delay ~ U(0, min(cap, base * 2^(attempt-1))).

    Full jitter (rather than a fixed exponential) spreads the retries of many
    nodes that lost the hub at the same moment, so they do not return in waves.
    """

    base: float = 0.5
    cap: float = 60.0

    def ceiling(self, attempt: int) -> float:
        if attempt < 1:
            raise ValueError("attempt starts at 1")
        return min(self.cap, self.base * 2.0 ** min(attempt - 1, 62))

    def delay(self, attempt: int, rng: random.Random) -> float:
        return rng.uniform(0.0, self.ceiling(attempt))


# ---- outbox ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutboundMessage:
    """What a transport sends: the stored (compressed) bytes and their identity."""

    msg_id: str
    dest: str
    patient_key: str
    seq: int
    payload: bytes
    sha256: str
    size: int
    attempt: int


@dataclass(frozen=True)
class OutboxEntry:
    msg_id: str
    dest: str
    patient_key: str
    seq: int
    status: str
    attempts: int
    next_attempt: float
    last_error: str | None
    size: int


def _lock_stream(conn: Connection, dest: str, patient_key: str) -> None:
    """Serialise seq allocation per stream. SQLite's BEGIN IMMEDIATE already serialises all writers;
    PostgreSQL needs a transaction-scoped advisory lock or two writers could take the same seq."""
    if conn.dialect.name == "postgresql":
        key = int.from_bytes(hashlib.blake2b(f"{dest}\x00{patient_key}".encode(), digest_size=8).digest(), "big",
                             signed=True)
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})


# Statements built once: a hub runs them for every message it relays.
_OUTBOX_EXISTS = select(outbox.c.msg_id).where(outbox.c.msg_id == bindparam("m"))
_OUTBOX_LAST_SEQ = (select(func.coalesce(func.max(outbox.c.seq), 0))
                    .where(outbox.c.dest == bindparam("d"), outbox.c.patient_key == bindparam("k")))
_OUTBOX_INSERT = insert(outbox)


class Outbox:
    """Enqueue messages inside the caller's transaction; the dispatcher takes it from there."""

    def __init__(self, clock: Clock = time.time, codec: str = DEFAULT_CODEC, max_size: int = MAX_PAYLOAD) -> None:
        self.clock = clock
        self.codec = codec
        self.max_size = max_size

    def enqueue(self, conn: Connection, dest: str, patient_key: str, payload: bytes) -> str:
        """Compress and queue `payload` for `dest`; commits (or rolls back) with the caller's transaction."""
        if len(payload) > self.max_size:
            raise PayloadError(f"vượt quá {self.max_size} byte / larger than {self.max_size} bytes")
        return self.enqueue_compressed(conn, dest, patient_key, compress(payload, self.codec))

    def enqueue_compressed(self, conn: Connection, dest: str, patient_key: str, payload: bytes, *,
                           msg_id: str | None = None) -> str:
        """Queue bytes that are already compressed, e.g. the hub relaying a message under its original
        msg_id, so the final receiver still recognises a duplicate that took two paths."""
        _check_code(dest, "dest")
        if not patient_key or len(patient_key) > 128:
            raise ValueError("patient_key phải có 1–128 ký tự / patient_key must have 1-128 characters")
        if len(payload) > self.max_size:
            raise PayloadError(f"vượt quá {self.max_size} byte / larger than {self.max_size} bytes")
        if not payload.startswith((ZSTD_MAGIC, GZIP_MAGIC)):
            raise PayloadError("payload chưa được nén / payload is not compressed")
        if msg_id is None:
            msg_id = str(uuid.uuid4())
        else:
            _check_msg_id(msg_id)
            if conn.execute(_OUTBOX_EXISTS, {"m": msg_id}).first() is not None:
                return msg_id
        _lock_stream(conn, dest, patient_key)
        seq = conn.execute(_OUTBOX_LAST_SEQ, {"d": dest, "k": patient_key}).scalar_one() + 1
        now = _us(self.clock())
        conn.execute(_OUTBOX_INSERT, {
            "msg_id": msg_id, "dest": dest, "patient_key": patient_key, "seq": seq, "created": now,
            "next_attempt": now, "attempts": 0, "status": PENDING, "payload": payload,
            "sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload), "last_error": None})
        return msg_id

    @staticmethod
    def get(conn: Connection, msg_id: str) -> OutboxEntry | None:
        row = conn.execute(select(outbox.c.msg_id, outbox.c.dest, outbox.c.patient_key, outbox.c.seq,
                                  outbox.c.status, outbox.c.attempts, outbox.c.next_attempt, outbox.c.last_error,
                                  outbox.c.size).where(outbox.c.msg_id == msg_id)).first()
        if row is None:
            return None
        return OutboxEntry(row[0], row[1], row[2], row[3], row[4], row[5], row[6] / 1_000_000, row[7], row[8])

    @staticmethod
    def counts(conn: Connection) -> dict[str, int]:
        return {s: n for s, n in conn.execute(select(outbox.c.status, func.count()).group_by(outbox.c.status))}

    def requeue(self, conn: Connection, msg_id: str) -> bool:
        """Operator action: send a dead (or failed) message again now, counting attempts from zero.
        A dead message holds back the rest of its stream until it is requeued."""
        result = conn.execute(update(outbox).where(outbox.c.msg_id == msg_id, outbox.c.status.in_((DEAD, FAILED)))
                              .values(status=PENDING, attempts=0, next_attempt=_us(self.clock()), last_error=None))
        return result.rowcount == 1

    def retry_now(self, conn: Connection, dest: str) -> int:
        """Make the failed messages for `dest` due now, attempts kept: it was just heard from, so waiting out
        a backoff that grew while it was down (up to the cap) would only delay the backlog."""
        now = _us(self.clock())
        return conn.execute(update(outbox).where(outbox.c.dest == dest, outbox.c.status == FAILED,
                                                 outbox.c.next_attempt > now).values(next_attempt=now)).rowcount

    def purge_sent(self, conn: Connection, older_than: float) -> int:
        """Delete acknowledged messages created more than `older_than` seconds ago."""
        cutoff = _us(self.clock() - older_than)
        return conn.execute(delete(outbox).where(outbox.c.status == SENT, outbox.c.created < cutoff)).rowcount


# ---- transport and dispatcher --------------------------------------------------------------------


@dataclass(frozen=True)
class Ack:
    """The receiver's answer. accepted=False is a permanent refusal: the message goes `dead`."""

    accepted: bool
    duplicate: bool = False
    reason: str | None = None


class DeliveryError(Exception):
    """A retryable failure: network, timeout, unauthenticated or unexpected answer."""


class Transport(Protocol):
    def send(self, message: OutboundMessage) -> Ack:
        """Deliver and return the receiver's acknowledgement; raise on anything retryable."""
        ...


class DispatchResult(NamedTuple):
    sent: int
    failed: int
    dead: int

    @property
    def attempted(self) -> int:
        return self.sent + self.failed + self.dead


# Statements built once: the dispatcher runs them thousands of times an hour.
_CLAIM = (update(outbox)
          .where(outbox.c.msg_id.in_(bindparam("ids", expanding=True)), outbox.c.status.in_((PENDING, FAILED)))
          .values(status=SENDING, attempts=outbox.c.attempts + 1)
          .returning(outbox.c.msg_id, outbox.c.dest, outbox.c.patient_key, outbox.c.seq, outbox.c.payload,
                     outbox.c.sha256, outbox.c.size, outbox.c.attempts))
_DONE = (update(outbox).where(outbox.c.msg_id == bindparam("m"), outbox.c.status == SENDING)
         .values(status=bindparam("new_status"), last_error=bindparam("error")))
_RETRY = _DONE.values(next_attempt=bindparam("when"))


class Outcome(NamedTuple):
    """What became of one send, to be recorded on its outbox row."""

    msg_id: str
    status: str  # SENT, FAILED or DEAD
    error: str | None
    next_attempt: int | None  # for FAILED: when to try again (µs)


class Dispatcher:
    """Sends due outbox messages, stream heads only; see the module docstring.

    With `concurrency` > 1 up to that many messages are in flight at once,
    each the head of a different (dest, patient_key) stream, so a slow or
    far peer is kept busy without ever letting a patient's later message
    overtake an earlier one: a stream's next message becomes due only after
    its predecessor is `sent`. Claims and results are written in batches (one
    transaction for many rows), which matters on SQLite, where every write
    transaction serialises the whole database.

    Run one dispatcher per database: at start-up every `sending` row is
    treated as left behind by a crash and becomes pending again (the receiver
    deduplicates if it had in fact arrived).
    """

    def __init__(self, engine: Engine, transport: Transport, clock: Clock = time.time, *,
                 backoff: Backoff | None = None, batch: int = 100, max_attempts: int | None = None,
                 poll_interval: float = 1.0, rng: random.Random | None = None, concurrency: int = 1) -> None:
        self.engine = engine
        self.transport = transport
        self.clock = clock
        self.backoff = backoff or Backoff()
        self.batch = batch
        self.max_attempts = max_attempts
        self.poll_interval = poll_interval
        self.rng = rng or random.Random()  # jitter only, not a secret
        self.concurrency = max(1, concurrency)
        self._recovered = False
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        earlier = outbox.alias("earlier")
        blocked = (select(earlier.c.msg_id)
                   .where(earlier.c.dest == outbox.c.dest, earlier.c.patient_key == outbox.c.patient_key,
                          earlier.c.seq < outbox.c.seq, earlier.c.status != SENT)
                   .exists())
        # A stream's head: due, and no earlier message of its stream is still unacknowledged.
        heads = (select(outbox.c.msg_id, outbox.c.next_attempt)
                 .where(outbox.c.status.in_((PENDING, FAILED)), ~blocked))
        self._due_query = (heads.where(outbox.c.next_attempt <= bindparam("now"))
                           .order_by(outbox.c.next_attempt, outbox.c.created, outbox.c.seq)
                           .limit(batch))
        self._next_query = heads.order_by(outbox.c.next_attempt).limit(1)

    def recover(self) -> int:
        """Return `sending` rows (a crash mid-send) to `pending`, due now."""
        with self.engine.begin() as conn:
            n = conn.execute(update(outbox).where(outbox.c.status == SENDING)
                             .values(status=PENDING, next_attempt=_us(self.clock()))).rowcount
        self._recovered = True
        if n:
            log.warning("outbox: %d message(s) left in 'sending' by a crash are pending again", n)
        return n

    def _due(self, conn: Connection, now: int) -> list[str]:
        return [r[0] for r in conn.execute(self._due_query, {"now": now})]

    def _claim(self, ids: list[str]) -> list[OutboundMessage]:
        """Mark messages `sending` (one transaction) and load them; a row someone else took is skipped."""
        if not ids:
            return []
        with self.engine.begin() as conn:
            return self._claim_in(conn, ids)

    @staticmethod
    def _claim_in(conn: Connection, ids: list[str]) -> list[OutboundMessage]:
        """`_claim` inside the caller's transaction."""
        if not ids:
            return []
        rows = {r[0]: r for r in conn.execute(_CLAIM, {"ids": ids})}
        return [OutboundMessage(m, r[1], r[2], r[3], bytes(r[4]), r[5], r[6], r[7])
                for m in ids if (r := rows.get(m)) is not None]

    def _attempt(self, message: OutboundMessage) -> Outcome:
        """Send one message and decide its fate; touches no database, so many can run at once."""
        try:
            ack = self.transport.send(message)
        except Exception as exc:  # any transport failure is retried: a message is never dropped silently
            error = f"{type(exc).__name__}: {exc}"[:2000]
            if self.max_attempts is not None and message.attempt >= self.max_attempts:
                log.error("outbox: %s to %s gave up after %d attempts: %s", message.msg_id, message.dest,
                          message.attempt, error)
                return Outcome(message.msg_id, DEAD, error, None)
            delay = self.backoff.delay(message.attempt, self.rng)
            return Outcome(message.msg_id, FAILED, error, _us(self.clock() + delay))
        if ack.accepted:
            return Outcome(message.msg_id, SENT, None, None)
        log.error("outbox: %s refused by %s: %s", message.msg_id, message.dest, ack.reason)
        return Outcome(message.msg_id, DEAD, f"rejected: {ack.reason or 'no reason given'}"[:2000], None)

    @staticmethod
    def _write_outcomes(conn: Connection, outcomes: list[Outcome]) -> None:
        for o in outcomes:
            params = {"m": o.msg_id, "new_status": o.status, "error": o.error, "when": o.next_attempt}
            conn.execute(_DONE if o.next_attempt is None else _RETRY, params)

    def _record(self, outcomes: list[Outcome]) -> DispatchResult:
        """Write what became of each send, all in one transaction."""
        if outcomes:
            with self.engine.begin() as conn:
                self._write_outcomes(conn, outcomes)
        return DispatchResult(sum(o.status == SENT for o in outcomes), sum(o.status == FAILED for o in outcomes),
                              sum(o.status == DEAD for o in outcomes))

    def _settle(self, outcomes: list[Outcome], free: int) -> list[OutboundMessage]:
        """Record `outcomes` and claim up to `free` due messages, in one transaction when there is
        something to record: a stream's next message is due as soon as its predecessor is `sent`,
        so it can be claimed in the same write (one transaction per send instead of three)."""
        if not outcomes:
            if free <= 0:
                return []
            with self.engine.connect() as conn:  # nothing to write: look before taking the write lock
                due = self._due(conn, _us(self.clock()))[:free]
            return self._claim(due)
        with self.engine.begin() as conn:
            self._write_outcomes(conn, outcomes)
            if free <= 0:
                return []
            return self._claim_in(conn, self._due(conn, _us(self.clock()))[:free])

    def run_once(self) -> DispatchResult:
        """Send every stream head that is due now (one message per stream), `concurrency` at a time."""
        if not self._recovered:
            self.recover()
        with self.engine.connect() as conn:
            due = self._due(conn, _us(self.clock()))
        totals = DispatchResult(0, 0, 0)
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="lienthong-send") \
            if self.concurrency > 1 and len(due) > 1 else None
        try:
            for start in range(0, len(due), self.concurrency):
                if self._stop.is_set():
                    break
                messages = self._claim(due[start:start + self.concurrency])
                outcomes = list(pool.map(self._attempt, messages)) if pool else [self._attempt(m) for m in messages]
                result = self._record(outcomes)
                totals = DispatchResult(*(a + b for a, b in zip(totals, result, strict=True)))
        finally:
            if pool is not None:
                pool.shutdown()
        return totals

    # ---- background thread ---------------------------------------------------------------------
    def start(self) -> None:
        """Recover, then send in a background thread until `stop()`."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self.recover()
        self._thread = threading.Thread(target=self._loop, name="lienthong-outbox", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Look for due messages now instead of at the next poll (e.g. right after an enqueue)."""
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> bool:
        """Ask the worker to stop after the messages in flight; True if it ended within `timeout`.

        A message still in flight when the process exits stays `sending` and is
        recovered at the next start.
        """
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def _idle(self) -> None:
        """Sleep until woken, the poll interval passes, or the next message falls due, whichever is first."""
        wait = self.poll_interval
        try:
            with self.engine.connect() as conn:
                row = conn.execute(self._next_query).first()
            if row is not None:
                wait = min(wait, max(0.0, row[1] / 1_000_000 - self.clock()))
        except Exception:  # the database may be briefly unavailable; poll as usual
            log.debug("outbox: next due time unknown", exc_info=True)
        if wait > 0:
            self._wake.wait(wait)
        self._wake.clear()

    def _loop(self) -> None:
        """Keep up to `concurrency` sends in flight, topping up as each one ends (no waiting for a batch)."""
        inflight: dict[Future[Outcome], OutboundMessage] = {}
        outcomes: list[Outcome] = []  # ended sends not yet written (kept if the write fails)
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="lienthong-send") as pool:
            while not self._stop.is_set():
                try:
                    # Rows in flight are `sending`, so never due again.
                    claimed = self._settle(outcomes, self.concurrency - len(inflight))
                    outcomes = []
                    for message in claimed:
                        inflight[pool.submit(self._attempt, message)] = message
                    if not inflight:
                        self._idle()
                        continue
                    done, _ = wait(inflight, timeout=self.poll_interval, return_when=FIRST_COMPLETED)
                    outcomes = [f.result() for f in done]
                    for f in done:
                        del inflight[f]
                except Exception:  # the database may be briefly unavailable; keep the worker alive
                    log.exception("outbox dispatcher pass failed")
                    self._wake.wait(self.poll_interval)
                    self._wake.clear()
            # Stopping: let the sends in flight end and record what became of them.
            self._record(outcomes + [f.result() for f in inflight])


# ---- inbox ---------------------------------------------------------------------------------------


class Receipt(NamedTuple):
    accepted: bool
    duplicate: bool


@dataclass(frozen=True)
class InboxEntry:
    msg_id: str
    source: str
    received: float
    status: str
    reason: str | None
    payload: bytes | None


class RejectMessage(Exception):
    """Raised by an inbox handler to refuse a message for good (with a reason kept on the row)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


_INBOX_LAST = select(func.max(inbox.c.received))
# A second copy arriving at the same moment loses on the primary key without an error, so no savepoint
# is needed around the insert (one round trip less per message on both databases).
# RETURNING, not rowcount, says whether it was stored: psycopg reports no rowcount for it here.
_INBOX_INSERT_NEW = {
    "sqlite": sqlite.insert(inbox).on_conflict_do_nothing(index_elements=[inbox.c.msg_id]).returning(inbox.c.msg_id),
    "postgresql": postgresql.insert(inbox).on_conflict_do_nothing(index_elements=[inbox.c.msg_id])
    .returning(inbox.c.msg_id),
}
_INBOX_GET = select(inbox.c.msg_id, inbox.c.source, inbox.c.received, inbox.c.status, inbox.c.reason,
                    inbox.c.payload).where(inbox.c.msg_id == bindparam("m"))
_INBOX_STATE = select(inbox.c.source, inbox.c.status, inbox.c.reason).where(inbox.c.msg_id == bindparam("m"))
_INBOX_PROCESSED = (update(inbox).where(inbox.c.msg_id == bindparam("m"), inbox.c.status == RECEIVED)
                    .values(status=PROCESSED))
_INBOX_CLAIM = (update(inbox).where(inbox.c.msg_id == bindparam("m"), inbox.c.status == RECEIVED)
                .values(status=PROCESSED)
                .returning(inbox.c.source, inbox.c.received, inbox.c.reason, inbox.c.payload))

Validator = Callable[[str, bytes], str | None]  # (source, payload) -> reason to refuse, or None
Handler = Callable[[Connection, InboxEntry], None]


class Inbox:
    """Receive messages idempotently and process each exactly once, in arrival order.

    `validator`, if given, runs at receipt (e.g. check the package signature)
    so a bad message is refused in the acknowledgement itself.
    """

    def __init__(self, clock: Clock = time.time, validator: Validator | None = None) -> None:
        self.clock = clock
        self.validator = validator

    def receive(self, conn: Connection, msg_id: str, source: str, payload: bytes, *,
                processed: bool = False) -> Receipt:
        """Store a message once; a retry of the same msg_id gets the same answer and nothing more.

        `processed`: the caller has dealt with the message in this same transaction (the hub relays
        it), so the row is stored as processed rather than updated a second time."""
        _check_msg_id(msg_id)
        existing = conn.execute(_INBOX_STATE, {"m": msg_id}).first()
        if existing is not None:
            return self._duplicate(msg_id, source, existing[0], existing[1])
        reason = self.validator(source, payload) if self.validator is not None else None
        # Arrival order is processing order: never let a clock step backwards reorder a stream.
        last = conn.execute(_INBOX_LAST).scalar()
        received = max(_us(self.clock()), (last or 0) + 1)
        row = {"msg_id": msg_id, "source": source, "received": received,
               "status": REJECTED if reason else PROCESSED if processed else RECEIVED, "reason": reason,
               "payload": payload}
        if conn.execute(_INBOX_INSERT_NEW[conn.dialect.name], row).first() is None:
            # The same message arrived twice at once; the other copy won.
            first = conn.execute(_INBOX_STATE, {"m": msg_id}).one()
            return self._duplicate(msg_id, source, first[0], first[1])
        return Receipt(reason is None, False)

    @staticmethod
    def _duplicate(msg_id: str, source: str, first_source: str, status: str) -> Receipt:
        if first_source != source:
            log.warning("inbox: %s re-sent by %s but first came from %s; refused", msg_id, source, first_source)
            return Receipt(False, False)
        return Receipt(status != REJECTED, True)

    @staticmethod
    def get(conn: Connection, msg_id: str) -> InboxEntry | None:
        row = conn.execute(_INBOX_GET, {"m": msg_id}).first()
        if row is None:
            return None
        return InboxEntry(row[0], row[1], row[2] / 1_000_000, row[3], row[4],
                          bytes(row[5]) if row[5] is not None else None)

    @staticmethod
    def state(conn: Connection, msg_id: str) -> tuple[str, str, str | None] | None:
        """(source, status, reason) of a stored message, without loading its payload."""
        row = conn.execute(_INBOX_STATE, {"m": msg_id}).first()
        return (row[0], row[1], row[2]) if row is not None else None

    @staticmethod
    def mark_processed(conn: Connection, msg_id: str) -> bool:
        return conn.execute(_INBOX_PROCESSED, {"m": msg_id}).rowcount == 1

    def process(self, engine: Engine, handler: Handler, *, limit: int = 100) -> int:
        """Hand received messages to `handler` in arrival order; returns how many were processed.

        The handler runs in the same transaction that marks the row processed,
        so its writes and the mark commit together: a crash means neither, and
        the message is offered again. `RejectMessage` marks it rejected; any
        other exception stops this pass (later messages wait, keeping order).
        """
        with engine.connect() as conn:
            ids = [r[0] for r in conn.execute(select(inbox.c.msg_id).where(inbox.c.status == RECEIVED)
                                              .order_by(inbox.c.received, inbox.c.msg_id).limit(limit))]
        done = 0
        for msg_id in ids:
            try:
                with engine.begin() as conn:
                    row = conn.execute(_INBOX_CLAIM, {"m": msg_id}).first()
                    if row is None:  # another worker took it
                        continue
                    handler(conn, InboxEntry(msg_id, row[0], row[1] / 1_000_000, PROCESSED, row[2],
                                             bytes(row[3]) if row[3] is not None else None))
                done += 1
            except RejectMessage as exc:
                with engine.begin() as conn:
                    conn.execute(update(inbox).where(inbox.c.msg_id == msg_id, inbox.c.status == RECEIVED)
                                 .values(status=REJECTED, reason=exc.reason[:2000]))
            except Exception:
                log.exception("inbox: handler failed on %s; will retry", msg_id)
                break
        return done

    def compact(self, conn: Connection, older_than: float) -> int:
        """Drop the payloads of messages processed more than `older_than` seconds ago; keep the rows
        (and so the deduplication) for good."""
        cutoff = _us(self.clock() - older_than)
        return conn.execute(update(inbox).where(inbox.c.status == PROCESSED, inbox.c.received < cutoff,
                                                inbox.c.payload.is_not(None)).values(payload=None)).rowcount


# ---- resumable uploads ---------------------------------------------------------------------------


class UploadError(ValueError):
    """The upload request conflicts with what was begun, or the assembled bytes do not match."""


class OffsetMismatch(UploadError):
    """A chunk did not start where the receiver's data ends; resume from `received_size`."""

    def __init__(self, received_size: int) -> None:
        self.received_size = received_size
        super().__init__(f"vị trí không khớp, đã nhận {received_size} byte / offset mismatch, have {received_size} bytes")


@dataclass(frozen=True)
class UploadState:
    msg_id: str
    source: str
    dest: str
    patient_key: str
    total_size: int
    received_size: int
    sha256: str

    @property
    def complete(self) -> bool:
        return self.received_size == self.total_size


class UploadStore:
    """Receiver side of chunked uploads: append at an offset, report progress, verify on completion."""

    def __init__(self, clock: Clock = time.time, max_size: int = MAX_PAYLOAD) -> None:
        self.clock = clock
        self.max_size = max_size

    @staticmethod
    def state(conn: Connection, msg_id: str, source: str) -> UploadState | None:
        row = conn.execute(select(upload.c.source, upload.c.dest, upload.c.patient_key, upload.c.total_size,
                                  upload.c.received_size, upload.c.sha256).where(upload.c.msg_id == msg_id)).first()
        if row is None:
            return None
        if row[0] != source:
            raise UploadError("upload thuộc đơn vị khác / upload belongs to another sender")
        return UploadState(msg_id, row[0], row[1], row[2], row[3], row[4], row[5])

    def begin(self, conn: Connection, msg_id: str, source: str, dest: str, patient_key: str, total_size: int,
              sha256: str) -> UploadState:
        """Start an upload, or return the one already begun with the same parameters (idempotent)."""
        _check_msg_id(msg_id)
        if not 0 < total_size <= self.max_size:
            raise UploadError(f"kích thước không hợp lệ / size must be 1..{self.max_size}")
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise UploadError("sha256 phải là 64 ký tự hex / sha256 must be 64 hex characters")
        current = self.state(conn, msg_id, source)
        if current is not None:
            if (current.dest, current.patient_key, current.total_size, current.sha256) != (
                    dest, patient_key, total_size, sha256):
                raise UploadError("upload đã bắt đầu với tham số khác / upload begun with other parameters")
            return current
        try:
            with conn.begin_nested():
                conn.execute(insert(upload).values(msg_id=msg_id, source=source, dest=dest, patient_key=patient_key,
                                                   total_size=total_size, received_size=0, sha256=sha256,
                                                   created=_us(self.clock())))
        except IntegrityError:
            return self.begin(conn, msg_id, source, dest, patient_key, total_size, sha256)
        return UploadState(msg_id, source, dest, patient_key, total_size, 0, sha256)

    def append(self, conn: Connection, msg_id: str, source: str, offset: int, chunk: bytes) -> UploadState:
        """Append `chunk` at `offset`, which must equal the bytes received so far."""
        state = self.state(conn, msg_id, source)
        if state is None:
            raise UploadError("không có upload này / no such upload")
        if offset != state.received_size:
            raise OffsetMismatch(state.received_size)
        if not chunk or offset + len(chunk) > state.total_size:
            raise UploadError("phần dữ liệu vượt quá kích thước đã khai / chunk exceeds the declared size")
        new_size = offset + len(chunk)
        moved = conn.execute(update(upload).where(upload.c.msg_id == msg_id, upload.c.received_size == offset)
                             .values(received_size=new_size)).rowcount
        if moved != 1:  # a concurrent append won the race
            current = self.state(conn, msg_id, source)
            raise OffsetMismatch(current.received_size if current else 0)
        conn.execute(insert(upload_chunk).values(msg_id=msg_id, pos=offset, data=chunk))
        return UploadState(msg_id, source, state.dest, state.patient_key, state.total_size, new_size, state.sha256)

    def assemble(self, conn: Connection, msg_id: str, source: str) -> bytes:
        """Join a complete upload, check its SHA-256 and delete it; a mismatch deletes it too (start over)."""
        state = self.state(conn, msg_id, source)
        if state is None or not state.complete:
            raise UploadError("upload chưa đủ dữ liệu / upload incomplete")
        data = b"".join(bytes(r[0]) for r in conn.execute(select(upload_chunk.c.data)
                                                          .where(upload_chunk.c.msg_id == msg_id)
                                                          .order_by(upload_chunk.c.pos)))
        self.discard(conn, msg_id)
        if len(data) != state.total_size or hashlib.sha256(data).hexdigest() != state.sha256:
            raise UploadError("sai tổng kiểm SHA-256, cần gửi lại / SHA-256 mismatch, upload again")
        return data

    @staticmethod
    def discard(conn: Connection, msg_id: str) -> None:
        conn.execute(delete(upload_chunk).where(upload_chunk.c.msg_id == msg_id))
        conn.execute(delete(upload).where(upload.c.msg_id == msg_id))

    def purge(self, conn: Connection, older_than: float) -> int:
        """Drop uploads abandoned for more than `older_than` seconds."""
        cutoff = _us(self.clock() - older_than)
        ids = [r[0] for r in conn.execute(select(upload.c.msg_id).where(upload.c.created < cutoff))]
        for msg_id in ids:
            self.discard(conn, msg_id)
        return len(ids)
