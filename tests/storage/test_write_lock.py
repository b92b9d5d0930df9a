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
