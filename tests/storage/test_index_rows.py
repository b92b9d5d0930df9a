"""The index tables hold exactly the rows extraction computed: nothing lost or altered on the way in.

PostgreSQL receives new resources and their index rows through binary COPY (typed values, no text
parsing), SQLite through executemany; on both, every stored row must equal what
`registry().extract` gave, value for value (floats, None, non-ASCII text, 64-bit keys).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import orjson
from sqlalchemy import select

from conftest import synthea_files
from lienthong.node import open_database
from lienthong.storage import schema


def test_index_tables_hold_the_extracted_rows(db_url: str) -> None:
    db = open_database(db_url)
    try:
        resources: list[dict[str, Any]] = []
        for path in synthea_files()[:3]:
            resources += [e["resource"] for e in orjson.loads(path.read_bytes())["entry"]]
        resources.append({"resourceType": "Patient", "name": [{"family": "Nguyễn", "given": ["Thị Ánh"]}],
                          "birthDate": "1970-01-01"})
        with db.begin() as store:
            stored = [store.create(dict(r)) for r in resources]
        expected: dict[str, Counter[tuple[Any, ...]]] = {kind: Counter() for kind in schema.INDEX_TABLES}
        with db.read() as store:
            for s in stored:
                rows = db.registry.extract(orjson.loads(s.body or b"{}"))
                for kind in schema.INDEX_TABLES:
                    expected[kind].update((s.res_pk, *row) for row in getattr(rows, kind))
            for kind, table in schema.INDEX_TABLES.items():
                got = Counter(tuple(r) for r in store.conn.execute(select(*table.columns)))
                assert got == expected[kind], kind
            assert sum(sum(c.values()) for c in expected.values()) > 5_000
            versions = store.conn.execute(select(schema.resource_version.c.res_pk, schema.resource_version.c.body,
                                                 schema.resource_version.c.deleted)).all()
            assert {(pk, bytes(body), deleted) for pk, body, deleted in versions} == {
                (s.res_pk, s.body, False) for s in stored}
    finally:
        db.engine.dispose()


def test_non_string_values_are_not_indexed_as_text() -> None:
    """Index text columns take strings only; validation refuses other kinds there before any write."""
    from lienthong.fhir.search_params import registry

    rows = registry().extract({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                               "valueQuantity": {"value": 1.5, "unit": 7, "system": ["s"], "code": "mg"}})
    assert rows.quantity and {q[2:] for q in rows.quantity} == {(1.5, None, "mg", None)}
