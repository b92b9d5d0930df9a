"""Short read statements that PostgreSQL plans once per connection.

Why: the node's connections plan every statement with its values (`prepare_threshold=None`), because
generic plans of some search statements were pathological. A few hot lookups have one right plan
whatever the values (an index probe per id or key), and for them planning plus SQLAlchemy's
per-call compilation of an expanding `IN` list is most of their client-side cost: `$match` runs two
of them per query. Those are written once here, with lists passed as one array parameter
(`= ANY(%(x)s)`) so the SQL text, and so the server-side prepared statement, is the same for every
list length. SQLite keeps the portable statement with an expanding `IN`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import ColumnElement, Connection, Select, String, Text, any_, bindparam
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

ListMatch = Callable[[ColumnElement[Any], str], ColumnElement[bool]]
"""`match(column, name)`: `column` is one of the values of the list parameter `name`."""


def _expanding_in(column: ColumnElement[Any], name: str) -> ColumnElement[bool]:
    return column.in_(bindparam(name, expanding=True))


def _any_of_array(column: ColumnElement[Any], name: str) -> ColumnElement[bool]:
    return column == any_(bindparam(name, type_=ARRAY(Text)))


class binary(FunctionElement[str]):
    """A text column ordered by its bytes: `COLLATE "C"` on PostgreSQL, the column as is elsewhere (SQLite
    compares bytes already). Why: a tie-break on ids needs a fixed order, not a language's, and "C" skips
    the locale's comparison routine (a tenth of a crowded `$match` candidate statement)."""

    type = String()
    inherit_cache = True


@compiles(binary)
def _binary_plain(element: binary, compiler: SQLCompiler, **kw: Any) -> str:
    return str(compiler.process(element.clauses, **kw))


@compiles(binary, "postgresql")
def _binary_postgresql(element: binary, compiler: SQLCompiler, **kw: Any) -> str:
    return f'{compiler.process(element.clauses, **kw)} COLLATE "C"'


class PlannedOnce:
    """One read statement, built by `build(match)` for each database; `rows` runs it.

    `build` must use `match` for every list parameter, and only plain scalar parameters otherwise:
    the PostgreSQL text is run by the driver directly, without SQLAlchemy's bind processing.
    """

    def __init__(self, build: Callable[[ListMatch], Select[Any]]) -> None:
        self.portable = build(_expanding_in)
        compiled = build(_any_of_array).compile(dialect=PGDialect_psycopg())  # type: ignore[no-untyped-call]
        self.postgresql = str(compiled)
        # The literals SQLAlchemy turned into parameters (CASE values, constants), bound once here.
        self._constants = dict(compiled.construct_params(_check=False))

    def rows(self, conn: Connection, params: Mapping[str, Any]) -> Sequence[Sequence[Any]]:
        if conn.dialect.name != "postgresql":
            return conn.execute(self.portable, dict(params)).all()
        raw = conn.connection.driver_connection
        assert raw is not None
        with raw.cursor() as cur:
            cur.execute(self.postgresql, {**self._constants, **params}, prepare=True)
            rows: list[tuple[Any, ...]] = cur.fetchall()
            return rows
