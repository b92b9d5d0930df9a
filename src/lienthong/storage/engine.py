"""Database engines: SQLite as the embedded default, PostgreSQL in production.

Why: a district health centre with no DBA must be able to run a node with
nothing to install, while a provincial hospital or the hub runs PostgreSQL.
The URL decides; everything above this module is dialect-neutral.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DisconnectionError

logger = logging.getLogger(__name__)

DEFAULT_SQLITE = "sqlite:///var/lienthong.db"
_WRITE = "lienthong_write"
_BUSY_SECONDS = 30
_WRITE_LOCKS: weakref.WeakKeyDictionary[Engine, FairWriteLock] = weakref.WeakKeyDictionary()


class FairWriteLock:
    """A re-entrant lock granted in arrival order.

    Why not `threading.RLock`: a thread that commits and at once begins again (an inbox worker
    importing message after message) would take it back before the threads already waiting
    woke up, starving them (a receiver's acknowledgements waited behind every import).
    Each waiter sleeps on its own lock and a release hands the lock to the head of the queue
    only: waking every waiter to let one through (a condition's notify_all) cost a hub with
    sixteen threads queued more CPU than the writes themselves."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._owner: int | None = None
        self._depth = 0
        self._queue: deque[tuple[int, threading.Lock]] = deque()

    def acquire(self, timeout: float) -> bool:
        me = threading.get_ident()
        with self._mutex:
            if self._owner == me:
                self._depth += 1
                return True
            if self._owner is None and not self._queue:
                self._owner, self._depth = me, 1
                return True
            gate = threading.Lock()
            gate.acquire()
            waiter = (me, gate)
            self._queue.append(waiter)
        if gate.acquire(timeout=timeout):
            return True  # `release` made us the owner before opening our gate
        with self._mutex:
            if self._owner == me:  # handed over just as the wait timed out
                return True
            self._queue.remove(waiter)
            return False

    def release(self) -> None:
        with self._mutex:
            self._depth -= 1
            if self._depth:
                return
            if self._queue:
                ident, gate = self._queue.popleft()
                self._owner, self._depth = ident, 1
                gate.release()
            else:
                self._owner = None


@contextmanager
def _writing_begin(engine: Engine, lock: FairWriteLock) -> Iterator[Connection]:
    """Engine.begin() for SQLite: the same contract, with the connection marked as a writer.

    Writers of one process queue on a lock before BEGIN IMMEDIATE: SQLite's own busy handler
    polls with sleeps of up to 100 ms, so under many concurrent writers (an exchange hub
    receiving and relaying in parallel) the database sat idle between sleeps. First come, first
    served (see `FairWriteLock`) and re-entrant, so a
    thread that already writes behaves as before; other processes still meet the busy timeout, and
    so does a writer that waited for the lock as long as that timeout."""
    queued = lock.acquire(timeout=_BUSY_SECONDS)  # past that, fall back to SQLite's busy timeout as before
    try:
        with engine.connect() as conn:
            conn.execution_options(**{_WRITE: True})
            with conn.begin():
                yield conn
    finally:
        if queued:
            lock.release()


def normalise_url(url: str | None) -> str:
    """Accept the URLs people type (postgresql://...) and pick our driver (psycopg 3)."""
    url = url or DEFAULT_SQLITE
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


# A node's database is on SSD or cached in memory (1 M resources take about 4 GB), where a random page costs
# about what a sequential one does; PostgreSQL's default (4.0) models spinning disks and, at 1 M resources,
# made it walk the whole resource table in a merge join instead of looking up a few hundred matches (490 ms
# against 20 ms). Set per connection, so a URL's own `options` (or the server's tuning) still decides.
PLANNER_OPTIONS = "-c random_page_cost=1.1"


def make_engine(url: str | None = None, **kwargs: Any) -> Engine:
    """Create an engine; for SQLite, create the file's folder and set pragmas for safe concurrency."""
    url = normalise_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        # As many pooled connections as concurrent requests and writers use: an overflow connection is
        # opened (file, pragmas) and closed again per checkout, which dominated 16-client reads.
        if parsed.database and parsed.database != ":memory:":
            kwargs.setdefault("pool_size", 20)
            kwargs.setdefault("max_overflow", 20)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": _BUSY_SECONDS}, **kwargs)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy, not the driver, decide when transactions begin.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={_BUSY_SECONDS * 1000}")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: Any) -> None:
            options = conn.get_execution_options()
            if options.get("isolation_level") == "AUTOCOMMIT":
                return  # reads in autocommit begin nothing
            # engine.begin() (a write) takes the write lock up front (IMMEDIATE), so concurrent writers
            # queue on the busy timeout instead of failing on a lock upgrade; a plain connect() used for
            # reads begins a deferred transaction that never blocks behind a long write.
            conn.exec_driver_sql("BEGIN IMMEDIATE" if options.get(_WRITE) else "BEGIN")

        lock = FairWriteLock()
        _WRITE_LOCKS[engine] = lock
        engine.begin = functools.partial(_writing_begin, engine, lock)  # type: ignore[method-assign]
        return engine
    # Search SQL is generated per query and its best plan depends on the values (one patient's rows or a
    # whole code system): server-side prepared statements would switch to generic plans after five runs
    # and pick the wrong index (seen in the benchmark at 200 k–800 k resources), so plan every time.
    connect_args: dict[str, Any] = {"prepare_threshold": None}
    if "options" not in parsed.query:
        connect_args["options"] = PLANNER_OPTIONS
    kwargs.setdefault("connect_args", connect_args)
    kwargs.setdefault("pool_size", 20)
    kwargs.setdefault("max_overflow", 10)
    engine = create_engine(url, **kwargs)
    if not kwargs.get("pool_pre_ping"):
        _ping_when_idle(engine)
    return engine


PING_AFTER_IDLE_SECONDS = 2.0


def _ping_when_idle(engine: Engine) -> None:
    """Check a pooled connection before use only when it has been idle for a while.

    Why not SQLAlchemy's `pool_pre_ping`: it costs a round trip on every checkout, a fifth of the CPU of
    a read by id. A connection used in the last seconds is alive unless the server went away within
    them, which the requests in flight then would not have survived either; an idle one is checked, and
    a dead one replaced before the request sees it (raising `DisconnectionError` makes the pool reconnect).
    """

    @event.listens_for(engine, "checkin")
    def _used(_dbapi_conn: Any, record: Any) -> None:
        record.info["used_at"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        if time.monotonic() - record.info.get("used_at", 0.0) < PING_AFTER_IDLE_SECONDS:
            return
        try:
            alive = engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:
            raise DisconnectionError("connection lost while idle") from exc
        if not alive:
            raise DisconnectionError("connection lost while idle")


class DedicatedWriter:
    """A connection one background writer keeps for itself and drives at the driver level.

    Why: the audit trail commits a small batch every few milliseconds; a pool checkout (with its
    pre-ping round trip on PostgreSQL) and SQLAlchemy's transaction events cost more than the batch's
    own statements. On SQLite the writer still queues on the engine's fair write lock, so it takes its
    turn with every other writer of the process. A connection whose transaction failed is discarded.

    On SQLite the writer's commits never checkpoint the WAL: with automatic checkpoints, one commit in
    about a hundred copied the log into the database (20–30 ms) while every request of its batch waited.
    A background thread checkpoints instead (PASSIVE: it blocks neither this writer nor readers), at
    most once per `CHECKPOINT_SECONDS`."""

    CHECKPOINT_SECONDS = 1.0

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._lock = _WRITE_LOCKS.get(engine)
        self._sqlite = is_sqlite(engine)
        self._conn: Any = None
        self._last_checkpoint = time.monotonic()
        self._checkpointer: threading.Thread | None = None
        self.checkpoints = 0  # background checkpoints run (for tests and diagnostics)

    def _connection(self) -> Any:
        if self._conn is None:
            self._conn = self.engine.raw_connection()
            if self._sqlite:
                self._conn.cursor().execute("PRAGMA wal_autocheckpoint=0")  # see the class docstring
            else:  # a lone statement is its own transaction: one round trip (see `transaction`)
                self._conn.driver_connection.autocommit = True
        return self._conn

    @contextmanager
    def transaction(self, single_statement: bool = False) -> Iterator[Any]:
        """A driver cursor inside a transaction that commits when the block ends and rolls back if it raises.

        `single_statement`: the block runs exactly one statement. On PostgreSQL that statement then runs in
        autocommit mode and is its own transaction: one round trip, where BEGIN, the statement and COMMIT
        cost three."""
        queued = self._lock.acquire(timeout=_BUSY_SECONDS) if self._lock is not None else False
        try:
            conn = self._connection()
            cur = conn.cursor()
            try:
                if self._sqlite:
                    cur.execute("BEGIN IMMEDIATE")  # the driver runs in autocommit mode (see the pragmas)
                    yield cur
                    conn.commit()
                elif single_statement:
                    yield cur
                else:
                    with conn.driver_connection.transaction():
                        yield cur
            finally:
                cur.close()
            if self._sqlite:
                self._checkpoint_soon()
        except BaseException:
            self.close()
            raise
        finally:
            if queued and self._lock is not None:
                self._lock.release()

    def _checkpoint_soon(self) -> None:
        now = time.monotonic()
        if now - self._last_checkpoint < self.CHECKPOINT_SECONDS or (
                self._checkpointer is not None and self._checkpointer.is_alive()):
            return
        self._last_checkpoint = now
        self._checkpointer = threading.Thread(target=self._checkpoint, name="wal-checkpoint", daemon=True)
        self._checkpointer.start()

    def _checkpoint(self) -> None:
        try:
            conn = self.engine.raw_connection()
            try:
                cur = conn.cursor()
                cur.execute("PRAGMA wal_checkpoint(PASSIVE)")
                cur.fetchall()
                cur.close()
                self.checkpoints += 1
            finally:
                conn.close()
        except Exception:  # the next one, or any other connection's automatic checkpoint, catches up
            logger.warning("WAL checkpoint failed", exc_info=True)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        with suppress(Exception):  # closing a broken connection must not mask the error that broke it
            # Never back into the pool: its session is the writer's own (no checkpoints on SQLite, autocommit
            # on PostgreSQL), and after a failure its state is in doubt.
            conn.invalidate()


def read_connection(engine: Engine) -> Connection:
    """A connection for reads only: autocommit, so on SQLite it never takes the write lock and can run
    while the same thread holds a write transaction on another connection."""
    return engine.connect().execution_options(isolation_level="AUTOCOMMIT")


def sqlite_file(url: URL) -> Path | None:
    """The file of a SQLite database URL; None for an in-memory one (or another backend): files that belong
    beside the database (the read cache's counters, the audit journal) exist only when it has a file."""
    if url.get_backend_name() != "sqlite":
        return None
    name = url.database or ""
    if name in ("", ":memory:") or name.startswith("file::memory:") or "mode=memory" in str(url.query):
        return None
    return Path(name).resolve()


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"
