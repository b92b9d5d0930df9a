"""Composition root: wire storage, search registry, interactions and HTTP into a running node.

Why a separate module: the layers below never construct each other; only this
module (and the CLI that calls it) knows the whole assembly.
"""

from __future__ import annotations

from starlette.applications import Starlette

from lienthong.api.app import ApiSettings, build_app
from lienthong.fhir.search_params import registry
from lienthong.interactions.service import FhirService
from lienthong.storage import migrate
from lienthong.storage.engine import make_engine
from lienthong.storage.repository import Database


def open_database(url: str | None = None, upgrade: bool = True) -> Database:
    """Open (and by default migrate) the database at `url`; SQLite under ./var/ when None."""
    engine = make_engine(url)
    if upgrade:
        migrate.upgrade(engine)
    return Database(engine, registry())


def create_app(url: str | None = None, settings: ApiSettings | None = None) -> Starlette:
    return build_app(FhirService(open_database(url)), settings)
