"""The upgrade that adds the paired code/value rows fills them for data stored before it, as extraction would."""

from __future__ import annotations

from alembic import command
from sqlalchemy import text
from starlette.testclient import TestClient

from conftest import put
from lienthong.storage import migrate
from lienthong.storage.engine import make_engine

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"


def _rows(url: str) -> list[tuple[object, ...]]:
    engine = make_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT res_pk, pkey, grp, tsystem, tcode, value, system, code, unit "
                                 "FROM sp_coded_quantity")).all()
    engine.dispose()
    return sorted((tuple(r) for r in rows), key=repr)


def test_upgrade_pairs_the_codes_and_values_already_stored(db_url: str) -> None:
    from lienthong.node import create_app

    app = create_app(db_url, secure=False)
    mgdl = {"unit": "mg/dL", "system": UCUM, "code": "mg/dL"}
    with TestClient(app, base_url="http://testserver") as client:
        put(client, {"resourceType": "Observation", "id": "a", "status": "final",
                     "code": {"coding": [{"system": LOINC, "code": "2345-7"}, {"code": "GLU"}], "text": "glucose"},
                     "valueQuantity": {"value": 6, **mgdl}})
        put(client, {"resourceType": "Observation", "id": "b", "status": "final", "code": {"text": "no coding"},
                     "valueQuantity": {"value": 1, **mgdl}})
        put(client, {"resourceType": "Observation", "id": "c", "status": "final",
                     "code": {"coding": [{"system": LOINC, "code": "85354-9"}]},
                     "component": [{"code": {"coding": [{"system": LOINC, "code": "8480-6"}]},
                                    "valueQuantity": {"value": 120, "system": UCUM, "code": "mm[Hg]"}},
                                   {"code": {"coding": [{"system": LOINC, "code": "8462-4"}]},
                                    "valueQuantity": {"value": 80, "system": UCUM, "code": "mm[Hg]"}}]})
    app.state.api.service.db.engine.dispose()
    written = _rows(db_url)
    # code-value-quantity: 2 codings of "a"; component-code-value-quantity and combo: per component of "c"
    assert len(written) >= 6 and {r[4] for r in written} >= {"2345-7", "GLU", "8480-6", "8462-4"}
    assert not any(r[4] is None and r[3] is None for r in written)  # "no coding": text alone pairs nothing

    engine = make_engine(db_url)
    command.downgrade(migrate.alembic_config(engine), "0009")
    migrate.upgrade(engine)
    engine.dispose()
    assert _rows(db_url) == written
