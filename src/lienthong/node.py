"""Composition root: wire storage, search registry, interactions, security and HTTP into a running node.

Why a separate module: the layers below never construct each other; only this
module (and the CLI that calls it) knows the whole assembly.
"""

from __future__ import annotations

import gc
import threading
from dataclasses import dataclass

from starlette.applications import Starlette

from lienthong.api.app import ApiSettings, build_app
from lienthong.exchange.service import ExchangeService
from lienthong.fhir.search_params import registry
from lienthong.identity.service import IdentityService
from lienthong.interactions.service import FhirService
from lienthong.security.accounts import Accounts
from lienthong.security.audit import AuditTrail
from lienthong.security.audit_journal import journal_location
from lienthong.security.authn import Authenticator
from lienthong.security.policy import AccessGuard
from lienthong.security.tokens import TokenService
from lienthong.storage import migrate
from lienthong.storage.engine import make_engine
from lienthong.storage.read_cache import DEFAULT_CACHE_MB, open_cache
from lienthong.storage.repository import Database


def open_database(url: str | None = None, upgrade: bool = True, read_cache_mb: int = DEFAULT_CACHE_MB) -> Database:
    """Open (and by default migrate) the database at `url`; SQLite under ./var/ when None.

    `read_cache_mb`: memory for current versions served to reads by id (0: none; see storage/read_cache.py)."""
    engine = make_engine(url)
    if upgrade:
        migrate.upgrade(engine)
    return Database(engine, registry(), open_cache(engine.url, read_cache_mb))


@dataclass
class Node:
    """A wired node: the service every entry point uses, and its security parts (None when open)."""

    db: Database
    service: FhirService
    auth: Authenticator | None
    identity: IdentityService
    exchange: ExchangeService | None = None

    @property
    def accounts(self) -> Accounts:
        return Accounts(self.db.engine)

    def close(self) -> None:
        """Stop the audit trail's writers: what is journalled is drained into the chain and the segment
        deleted (after a crash the next process does that instead)."""
        if self.auth is not None:
            self.auth.guard.audit.close()


def token_audience(settings: ApiSettings) -> str:
    return settings.public_base_url or f"urn:lienthong:fhir:{settings.node_name}"


def build_node(db: Database, settings: ApiSettings, secure: bool = True) -> Node:
    service = FhirService(db)
    identity = IdentityService(service)
    if not secure:
        return Node(db, service, None, identity)
    audit = AuditTrail(db.engine, settings.node_name, journal_location(db.engine.url, settings.audit_journal))
    guard = AccessGuard(db.registry, audit, service.compartment_params())
    service.guard = guard
    tokens = TokenService(db.engine, issuer=f"urn:lienthong:node:{settings.node_name}",
                          audience=token_audience(settings))
    return Node(db, service, Authenticator(db.engine, Accounts(db.engine), tokens, guard), identity)


def create_app(url: str | None = None, settings: ApiSettings | None = None, secure: bool = True) -> Starlette:
    """The ASGI app of a node. `secure=False` is the explicit, local-only `--insecure-dev` mode."""
    settings = settings or ApiSettings()
    return app_for(build_node(open_database(url), settings, secure), settings)


def app_for(node: Node, settings: ApiSettings) -> Starlette:
    # A stopping server drains the audit journal into the chain and deletes its segment (a crash leaves it to
    # the next process instead).
    app = build_app(node.service, settings, node.auth, node.identity, node.exchange, on_shutdown=[node.close])
    app.state.node = node
    return app


# Net new container objects between young-generation collections (CPython's default is 700).
GC_YOUNG_THRESHOLD = 50_000


def settle(node: Node) -> threading.Thread:
    """Before serving: freeze the start-up heap, raise the young-generation threshold, and load the
    patient index's tables in the background.

    Why: a full garbage collection walks every live object (~370,000 once the tables are loaded):
    at 1 M patients those pauses made the p99 of `$match` ~0.9 s. `gc.freeze()` puts start-up
    objects out of the collector's reach; whatever requests create is still collected as usual.
    A transaction Bundle holds tens of thousands of parsed objects while it is processed: at the
    default threshold (700) the collector ran ~25 times per Bundle, re-walking them and promoting
    them to older generations, a tenth of ingest CPU. With 50,000 a Bundle's objects are
    usually freed (by reference counting) before a collection starts; cyclic garbage is still
    collected, a little later.

    The normalisation tables (administrative units, names) cost ~2 s of
    CPU on first use, so a thread loads them (then freezes them too) instead of the first request
    or the start-up path.
    """
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])

    def warm_up() -> None:
        node.identity.warm_up()
        gc.freeze()

    thread = threading.Thread(target=warm_up, name="lienthong-warm-up", daemon=True)
    thread.start()
    return thread


def app_from_env() -> Starlette:
    """Build the app from the settings `lienthong serve` put in the environment (one per uvicorn worker)."""
    import os

    settings = ApiSettings.from_json(os.environ.get("LIENTHONG_APP_SETTINGS", "{}"))
    cache_mb = int(os.environ.get("LIENTHONG_APP_READ_CACHE_MB", str(DEFAULT_CACHE_MB)))
    node = build_node(open_database(os.environ.get("LIENTHONG_APP_DB") or None, read_cache_mb=cache_mb), settings,
                      secure=os.environ.get("LIENTHONG_APP_SECURE", "1") != "0")
    config = os.environ.get("LIENTHONG_APP_CONFIG")
    if config:
        from pathlib import Path

        from lienthong.exchange.service import attach_exchange

        attach_exchange(node, Path(config)).start()
    settle(node)
    return app_for(node, settings)
