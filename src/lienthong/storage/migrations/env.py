"""Alembic environment: uses the engine handed over by lienthong.storage.migrate."""

from __future__ import annotations

from alembic import context

# Domain packages define their tables on the shared metadata; import them so autogenerate sees every table.
import lienthong.exchange.registry
import lienthong.exchange.schema
import lienthong.exchange.service  # noqa: F401
from lienthong.storage.schema import metadata

engine = context.config.attributes["engine"]
with engine.begin() as connection:
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    context.run_migrations()
