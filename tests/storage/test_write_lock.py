"""SQLite writers of one process take turns in arrival order."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from sqlalchemy import text

from lienthong.storage.engine import FairWriteLock, make_engine


def test_a_thread_that_commits_and_begins_again_does_not_overtake_a_waiting_writer() -> None:
    lock = FairWriteLock()
    order: list[str] = []
    assert lock.acquire(1)
    waiting = threading.Thread(target=lambda: (lock.acquire(5), order.append("waiter"), lock.release()))
    waiting.start()
    time.sleep(0.1)  # the waiter is queued
    lock.release()
    assert lock.acquire(5)  # the greedy thread comes straight back...
    order.append("greedy")
    lock.release()
    waiting.join(5)
    assert order == ["waiter", "greedy"]  # ...but only after the one that was waiting


def test_reentrant_and_timeout() -> None:
    lock = FairWriteLock()
    assert lock.acquire(1) and lock.acquire(1)  # the owner may nest
    got: list[bool] = []
    other = threading.Thread(target=lambda: got.append(lock.acquire(0.1)))
    other.start()
    other.join(5)
    assert got == [False]  # held (twice) by another thread: times out
    lock.release()
    lock.release()
    assert lock.acquire(0.1)
    lock.release()


def test_concurrent_sqlite_writers_all_commit(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'w.db'}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (n INTEGER)"))

    def write(k: int) -> None:
        for i in range(20):
            with engine.begin() as conn:
                conn.execute(text("INSERT INTO t VALUES (:n)"), {"n": k * 100 + i})

    threads = [threading.Thread(target=write, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*), count(DISTINCT n) FROM t")).one() == (160, 160)
    engine.dispose()


def test_a_dedicated_writer_takes_its_turn_and_rolls_back_a_failed_batch(tmp_path: Path) -> None:
    """The audit writer's own connection queues with the engine's other writers, and a batch that raises
    leaves nothing behind; the next batch gets a fresh connection and commits."""
    import pytest

    from lienthong.storage.engine import DedicatedWriter

    engine = make_engine(f"sqlite:///{tmp_path / 'd.db'}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (n INTEGER)"))
    writer = DedicatedWriter(engine)
    with pytest.raises(RuntimeError), writer.transaction() as cur:
        cur.execute("INSERT INTO t VALUES (1)")
        raise RuntimeError("batch failed")
    order: list[str] = []
    with engine.begin() as conn:  # holds the write lock: the writer must wait for it, not fail or overtake
        started = threading.Event()

        def dedicated() -> None:
            started.set()
            with writer.transaction() as cur:
                cur.execute("INSERT INTO t VALUES (2)")
                order.append("dedicated")

        thread = threading.Thread(target=dedicated)
        thread.start()
        started.wait(5)
        time.sleep(0.1)
        conn.execute(text("INSERT INTO t VALUES (3)"))
        order.append("engine")
    thread.join(10)
    assert order == ["engine", "dedicated"]
    with engine.connect() as conn:
        assert sorted(r[0] for r in conn.execute(text("SELECT n FROM t"))) == [2, 3]
    writer.close()
    engine.dispose()


def test_instants_and_http_dates_render_as_strftime_would() -> None:
    from datetime import UTC, datetime, timedelta

    from lienthong.fhir.datetimes import format_http_date, format_instant

    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    for us in (0, 999, 1_000_000_123_456, 1_764_000_000_999_999, 951_782_400_000_000, 253_402_300_799_999_999):
        moment = epoch + timedelta(microseconds=us)
        assert format_instant(us) == moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
        assert format_http_date(us) == moment.strftime("%a, %d %b %Y %H:%M:%S GMT")


def test_the_dedicated_writer_leaves_wal_checkpoints_to_a_background_thread(tmp_path: Path) -> None:
    """Its commits never copy the WAL into the database inline (requests wait on them); a background
    PASSIVE checkpoint does, so the log is still folded back."""
    from lienthong.storage.engine import DedicatedWriter

    engine = make_engine(f"sqlite:///{tmp_path / 'c.db'}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (n INTEGER, pad TEXT)"))
    writer = DedicatedWriter(engine)
    writer.CHECKPOINT_SECONDS = 0.0
    for i in range(200):
        with writer.transaction() as cur:
            cur.execute("INSERT INTO t VALUES (?, ?)", (i, "x" * 4000))
    assert writer._conn.cursor().execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    deadline = time.monotonic() + 10
    while writer.checkpoints == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert writer.checkpoints > 0
    writer.close()
    with engine.connect() as conn:  # the closed writer's connection did not go back to the pool as it was
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 1000
        assert conn.execute(text("SELECT count(*) FROM t")).scalar() == 200
    engine.dispose()
