"""Shared fixtures: every API test runs against SQLite and against a real PostgreSQL server.

The PostgreSQL cluster is started once per session in a temporary directory with
Debian's initdb/pg_ctl; each test gets a fresh database cloned from a migrated
template, so tests are isolated and fast. Set LIENTHONG_TEST_BACKENDS=sqlite to
skip PostgreSQL locally; CI runs both.
"""

from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

warnings.filterwarnings("ignore", message=".*httpx.*", category=DeprecationWarning)

from starlette.testclient import TestClient  # noqa: E402

from lienthong.devtools.pgserver import PostgresServer, PostgresUnavailable  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
SYNTHEA = SHARED / "samples" / "synthea-r4"
BACKENDS = [b for b in os.environ.get("LIENTHONG_TEST_BACKENDS", "sqlite,postgresql").split(",") if b]
_counter = itertools.count()


def synthea_files() -> list[Path]:
    if not SYNTHEA.is_dir():
        pytest.skip(f"Synthea samples not found at {SYNTHEA} (../shared is absent)")
    return sorted(SYNTHEA.glob("*.json"))


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    try:
        server = PostgresServer().start()
    except PostgresUnavailable as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"PostgreSQL not available: {exc}")
    from lienthong.storage import migrate
    from lienthong.storage.engine import make_engine

    template_url = server.create_database("lienthong_template")
    engine = make_engine(template_url)
    migrate.upgrade(engine)
    engine.dispose()
    yield server
    server.stop()


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'lienthong.db'}"
        return
    server: PostgresServer = request.getfixturevalue("pg_server")
    name = f"t{next(_counter)}_{os.getpid()}"
    yield server.create_database(name, template="lienthong_template")
    server.drop_database(name)  # keeps the cluster small: teardown stays fast


@pytest.fixture
def client(db_url: str) -> Iterator[TestClient]:
    from lienthong.node import create_app

    app = create_app(db_url, secure=False)
    with TestClient(app, base_url="http://testserver") as c:
        yield c
    app.state.api.service.db.engine.dispose()


BASE = "http://testserver/fhir"


def put(client: TestClient, resource: dict[str, Any]) -> dict[str, Any]:
    """Create or update a resource under its own id; the test fails unless it was stored."""
    r = client.put(f"/fhir/{resource['resourceType']}/{resource['id']}", json=resource)
    assert r.status_code in (200, 201), r.text
    body: dict[str, Any] = r.json()
    return body


def assert_outcome(r: Any, status: int) -> dict[str, Any]:
    """The response has `status` and a non-empty OperationOutcome."""
    assert r.status_code == status, r.text
    body: dict[str, Any] = r.json()
    assert body["resourceType"] == "OperationOutcome" and body["issue"], body
    return body
