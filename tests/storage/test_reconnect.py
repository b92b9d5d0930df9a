"""PostgreSQL connections are checked before use only after being idle; a dropped one is replaced then."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy.exc import OperationalError

from lienthong.devtools.pgserver import PostgresServer
from lienthong.storage import engine as engine_module
from lienthong.storage.engine import make_engine
from lienthong.storage.repository import Database


@pytest.fixture
def pg_url(pg_server: PostgresServer) -> Iterator[str]:
    name = "reconnect_test"
    yield pg_server.create_database(name, template="lienthong_template")
    pg_server.drop_database(name)


def _drop_pooled_connections(url: str) -> int:
    """What a server restart does to the pool: every connection of the database is terminated."""
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as admin:
        rows = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                             "WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchall()
    return len(rows)


def _backend_pid(db: Database) -> int:
    with db.read() as store:
        return int(store.conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())


def test_an_idle_connection_the_server_dropped_is_replaced_before_use(pg_url: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from lienthong.fhir.search_params import registry

    engine = make_engine(pg_url, pool_size=1, max_overflow=0)
    db = Database(engine, registry())
    try:
        first = _backend_pid(db)
        assert _drop_pooled_connections(pg_url) == 1

        # Idle for longer than the threshold: checked at checkout, replaced, and the read works.
        monkeypatch.setattr(engine_module, "PING_AFTER_IDLE_SECONDS", 0.0)
        with db.read() as store:
            assert store.current("Patient", "nobody") is None
        second = _backend_pid(db)
        assert second != first

        # Used just now: not checked (no round trip), so a connection dropped in between fails the request.
        assert _drop_pooled_connections(pg_url) == 1
        monkeypatch.setattr(engine_module, "PING_AFTER_IDLE_SECONDS", 3600.0)
        with pytest.raises(OperationalError), db.read() as store:
            store.conn.exec_driver_sql("SELECT 1").scalar_one()
        assert _backend_pid(db) not in (first, second)  # and the pool replaced it for the next request
    finally:
        engine.dispose()
