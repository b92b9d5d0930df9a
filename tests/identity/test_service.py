"""The patient index as a service, over HTTP, on SQLite and PostgreSQL.

Covers Patient/$match (grades, scores, onlyCertainMatches, count, refusals), identifier
checks on every Patient write (422 with the reason and the identifier's FHIRPath), search by
a cancelled CCCD, $mpi-link (one golden record per person, refer/seealso links), the review
queue ($mpi-review list/decide, CLI `lienthong mpi review`), $merge/$unmerge (exact restore,
merged source out of $match), and the audit trail of every decision on a secure node.
Regression tests for bugs this suite found at 2f1e81f (fixed in 7ef8c4e and aa2af4c): $match returned
certainly-not candidates; a crowded blocking key could drop the same-CCCD record; $mpi-link linked a golden
record to itself, needed no write permission and left no audit record when it queued a review; decided pairs
were queued again; `mpi review list` cut the ids; `lienthong load` skipped the patient index and the
identifier checks.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient
from typer.testing import CliRunner

from conftest import assert_outcome as outcome
from lienthong.identity import identifiers as ids

JSON = dict[str, Any]
MATCH_GRADE = "http://hl7.org/fhir/StructureDefinition/match-grade"
ENTERPRISE = "https://lienthong.vn/fhir/sid/eid"
GOLDEN = "https://lienthong.vn/fhir/CodeSystem/mpi|golden"
ROLE = "http://terminology.hl7.org/CodeSystem/v3-RoleCode"
MA_BN = ids.MA_BN_SYSTEM_PREFIX + "24001"

AN_CCCD = "024080001234"  # male, born 19(80), registered in Bắc Giang (024)


# ---------------------------------------------------------------------------------------
# Builders and small HTTP helpers
# ---------------------------------------------------------------------------------------
def patient(family: str, given: str, birth: str | None, sex: str | None, *, cccd: str | None = None,
            phone: str | None = None, city: str | None = None, identifiers: list[JSON] | None = None,
            father: str | None = None, mother: str | None = None) -> JSON:
    p: JSON = {"resourceType": "Patient", "name": [{"family": family, "given": given.split()}]}
    if birth:
        p["birthDate"] = birth
    if sex:
        p["gender"] = sex
    idents = list(identifiers or [])
    if cccd:
        idents.append({"system": ids.CCCD_SYSTEM, "value": cccd})
    if idents:
        p["identifier"] = idents
    if phone:
        p["telecom"] = [{"system": "phone", "value": phone}]
    if city:
        p["address"] = [{"use": "home", "city": city, "state": "Bắc Giang"}]
    contacts = [{"relationship": [{"coding": [{"system": ROLE, "code": code}]}], "name": {"text": name}}
                for code, name in (("FTH", father), ("MTH", mother)) if name]
    if contacts:
        p["contact"] = contacts
    return p


AN = patient("Nguyễn", "Văn An", "1980-05-02", "male", cccd=AN_CCCD, phone="0912345678", city="Lục Ngạn")
AN_PLAIN = patient("Nguyen", "Van An", "1980-05-02", "male", phone="0912345678", city="Luc Ngan")  # no CCCD
AN_THIRD = patient("NGUYỄN", "VĂN AN", "1980-05-02", "male", cccd=AN_CCCD, city="Lục Ngạn")
BINH = patient("Trần", "Thị Bình", "1990-03-04", "female")
BINH_YEAR = patient("Trần", "Thị Bình", "1990", "female")  # same name, birth year only: possible match
_TWIN = {"birth": "2015-06-01", "sex": "female", "phone": "0987654321", "city": "Lục Ngạn",
         "father": "Lê Văn Hùng", "mother": "Phạm Thị Lan"}
TWIN_1 = patient("Lê", "Minh Anh", _TWIN["birth"], _TWIN["sex"], phone=_TWIN["phone"], city=_TWIN["city"],
                 father=_TWIN["father"], mother=_TWIN["mother"])
TWIN_2 = patient("Lê", "Minh Châu", _TWIN["birth"], _TWIN["sex"], phone=_TWIN["phone"], city=_TWIN["city"],
                 father=_TWIN["father"], mother=_TWIN["mother"])


def create(c: TestClient, resource: JSON) -> str:
    r = c.post("/fhir/Patient", json=resource)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def read(c: TestClient, pid: str) -> JSON:
    r = c.get(f"/fhir/Patient/{pid}")
    assert r.status_code == 200, r.text
    body: JSON = r.json()
    return body


def match_params(resource: JSON, **extra: Any) -> JSON:
    params: list[JSON] = [{"name": "resource", "resource": resource}]
    for name, value in extra.items():
        key = "valueBoolean" if isinstance(value, bool) else "valueInteger"
        params.append({"name": name, key: value})
    return {"resourceType": "Parameters", "parameter": params}


def match(c: TestClient, resource: JSON, **extra: Any) -> JSON:
    r = c.post("/fhir/Patient/$match", json=match_params(resource, **extra))
    assert r.status_code == 200, r.text
    bundle: JSON = r.json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
    assert bundle["total"] == len(bundle.get("entry", []))
    return bundle


def graded(bundle: JSON) -> dict[str, str]:
    """Patient id -> match grade, checking the shape of every entry on the way."""
    out: dict[str, str] = {}
    scores = []
    for e in bundle.get("entry", []):
        assert e["search"]["mode"] == "match"
        assert 0.0 < e["search"]["score"] <= 1.0
        scores.append(e["search"]["score"])
        [ext] = e["search"]["extension"]
        assert ext["url"] == MATCH_GRADE
        assert e["fullUrl"].endswith(f"/Patient/{e['resource']['id']}")
        out[e["resource"]["id"]] = ext["valueCode"]
    assert scores == sorted(scores, reverse=True), "entries must be best first"
    return out


def patient_count(c: TestClient) -> int:
    r = c.get("/fhir/Patient", params={"_summary": "count"})
    assert r.status_code == 200, r.text
    return int(r.json()["total"])


def goldens(c: TestClient) -> list[JSON]:
    r = c.get("/fhir/Patient", params={"_tag": GOLDEN})
    assert r.status_code == 200, r.text
    return [e["resource"] for e in r.json().get("entry", [])]


def parameters(body: JSON) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for p in body["parameter"]:
        value = next(v for k, v in p.items() if k.startswith("value"))
        out.setdefault(p["name"], []).append(value)
    return out


def mpi_link(c: TestClient, pid: str) -> dict[str, list[Any]]:
    r = c.post(f"/fhir/Patient/{pid}/$mpi-link")
    assert r.status_code == 200, r.text
    return parameters(r.json())


def reviews(c: TestClient, status: str = "pending") -> list[JSON]:
    r = c.get("/fhir/$mpi-review", params={"status": status})
    assert r.status_code == 200, r.text
    items = []
    for item in r.json()["parameter"]:
        assert item["name"] == "review"
        fields: JSON = {}
        for part in item["part"]:
            value = next(v for k, v in part.items() if k.startswith("value"))
            fields.setdefault(part["name"], []).append(value)
        items.append({k: v[0] if k != "explanation" else v for k, v in fields.items()})
    return items


def decide(c: TestClient, review_id: str, decision: str) -> Any:
    return c.post("/fhir/$mpi-review", json={"resourceType": "Parameters", "parameter": [
        {"name": "review", "valueString": review_id}, {"name": "decision", "valueCode": decision}]})


def merge(c: TestClient, source: str, target: str) -> Any:
    return c.post("/fhir/Patient/$merge", json={"resourceType": "Parameters", "parameter": [
        {"name": "source-patient", "valueReference": {"reference": f"Patient/{source}"}},
        {"name": "target-patient", "valueReference": {"reference": f"Patient/{target}"}}]})


def unmerge(c: TestClient, merge_id: str) -> Any:
    return c.post("/fhir/Patient/$unmerge", json={"resourceType": "Parameters", "parameter": [
        {"name": "merge", "valueString": merge_id}]})


def links(resource: JSON) -> list[tuple[str, str]]:
    return [(lk["type"], lk["other"]["reference"]) for lk in resource.get("link", [])]


def without_meta(resource: JSON) -> JSON:
    return {k: v for k, v in resource.items() if k != "meta"}


# ---------------------------------------------------------------------------------------
# $match
# ---------------------------------------------------------------------------------------
def test_match_grades_certain_and_probable(client: TestClient) -> None:
    an = create(client, AN)
    an_plain = create(client, AN_PLAIN)
    create(client, BINH)

    # Same CCCD: certain; the record without CCCD but the same name, birth date and phone: probable.
    query = patient("Nguyen", "Van An", "1980-05-02", "male", cccd=AN_CCCD)
    assert graded(match(client, query)) == {an: "certain", an_plain: "probable"}
    assert next(iter(graded(match(client, query)))) == an, "the same-CCCD record ranks first"

    # No CCCD: probable for both, whether the query has diacritics or not.
    for family, given in (("Nguyen", "Van An"), ("Nguyễn", "Văn An")):
        query = patient(family, given, "1980-05-02", "male", phone="0912345678")
        assert graded(match(client, query)) == {an: "probable", an_plain: "probable"}, (family, given)

    # Nobody shares a blocking key with this person: no result.
    assert match(client, patient("Phạm", "Quốc Bảo", "2001-09-09", "male", phone="0977111222"))["total"] == 0


def test_match_returns_nothing_for_a_different_person_of_the_same_commune(client: TestClient) -> None:
    create(client, AN)
    create(client, AN_PLAIN)
    # Born the same day in the same commune, so both records are candidates; everything else differs.
    other = patient("Hoàng", "Thị Mai", "1980-05-02", "female", phone="0987000111", city="Lục Ngạn")
    bundle = match(client, other)
    grades = [e["search"]["extension"][0]["valueCode"] for e in bundle.get("entry", [])]
    assert "certainly-not" not in grades and bundle["total"] == 0, grades


GIVEN = ("An", "Bình", "Cường", "Dũng", "Giang", "Hà", "Hải", "Hùng", "Khánh", "Lâm", "Long", "Minh", "Nam", "Phúc",
         "Quân", "Sơn", "Thắng", "Trung", "Tuấn", "Việt")
MIDDLE = ("Văn", "Đức", "Hữu", "Quang", "Minh", "Thị", "Ngọc", "Thanh", "Hồng", "Xuân", "Đình", "Công", "Bá", "Duy",
          "Gia", "Mạnh", "Trọng", "Tiến", "Kim", "Phương", "Thu", "Anh", "Bảo", "Chí", "Khắc", "Như", "Tất")


def add_crowd(c: TestClient, n: int = 520) -> None:
    """n Nguyễn of Lục Ngạn born in the 1980s: one crowded family+commune+decade blocking key."""
    crowd = [patient("Nguyễn", f"{MIDDLE[k % len(MIDDLE)]} {GIVEN[k % len(GIVEN)]}",
                     f"198{k % 10}-0{1 + k % 9}-1{k % 10}", "male" if k % 2 else "female", city="Lục Ngạn")
             for k in range(n)]
    bundle = {"resourceType": "Bundle", "type": "transaction",
              "entry": [{"resource": p, "request": {"method": "POST", "url": "Patient"}} for p in crowd]}
    assert c.post("/fhir", json=bundle).status_code == 200


def test_same_cccd_is_found_even_in_a_crowded_block(sqlite_node: tuple[str, TestClient]) -> None:
    """520 Nguyễn of the same commune and decade (a 1M population has blocks of ~8,000 such records), then the
    person, then a query with her CCCD but a mistyped given name and day (so the only shared keys are the
    CCCD and the crowded family+commune key). With one `DISTINCT ... LIMIT 500` over all keys, SQLite walked
    the crowded key in insertion order and always lost her (PostgreSQL: hash order, ~20% lost at 400k)."""
    _, c = sqlite_node
    add_crowd(c)
    an = create(c, AN)
    bundle = match(c, patient("Nguyễn", "Văn Anh", "1980-05-03", "male", cccd=AN_CCCD, city="Lục Ngạn"))
    assert bundle["entry"] and bundle["entry"][0]["resource"]["id"] == an
    assert bundle["entry"][0]["search"]["extension"][0]["valueCode"] == "certain"


def test_a_rare_shared_key_outranks_a_crowded_block(client: TestClient) -> None:
    """$match scores only the best-ranked MAX_CANDIDATES persons. With more Nguyễn of the commune and decade
    stored before him, a query without any identifier and with the day mistyped shares the crowded key with
    all of them, but the name + birth-year key with him alone: ranked by key rarity, he is scored and first."""
    from lienthong.identity.service import MAX_CANDIDATES

    add_crowd(client, MAX_CANDIDATES + 100)
    an = create(client, AN)
    bundle = match(client, patient("Nguyễn", "Văn An", "1980-05-12", "male", city="Lục Ngạn"))
    assert bundle["entry"] and bundle["entry"][0]["resource"]["id"] == an


def test_candidates_are_the_best_ranked_persons_plus_every_identifier_hit(client: TestClient) -> None:
    """The candidate statement (a LIMIT inside a UNION) returns what its definition says: the `limit` persons
    with the highest sum of 1/(key size) over the shared keys, best first, and every person sharing an
    identifier key even below the limit. Checked against that definition computed here from `mpi_block`."""
    from sqlalchemy import select

    from lienthong.identity.fhir_mapping import to_person
    from lienthong.storage import schema

    add_crowd(client, 60)
    an = create(client, AN)
    household = [create(client, patient("Trần", f"Thị {name}", f"1975-02-0{k + 1}", "female", phone="0912345678"))
                 for k, name in enumerate(("Hoa", "Lan", "Mai", "Cúc", "Đào", "Huệ", "Sen", "Liên"))]
    node = client.app.state.node  # type: ignore[attr-defined]
    query = to_person(patient("Nguyễn", "Văn Anh", "1980-05-03", "male", cccd=AN_CCCD, phone="0912345678",
                              city="Lục Ngạn"), "q")
    keys = sorted({k[:160] for k in node.identity.model.blocking_keys(query)})
    b = schema.mpi_block
    with node.db.read() as store:
        rows = store.execute(select(b.c.key, b.c.patient_id).where(b.c.key.in_(keys))).all()
        found = [c.record_id for c in node.identity.candidates(store, query, limit=5)]
    size: dict[str, int] = {}
    for key, _ in rows:
        size[key] = size.get(key, 0) + 1
    weight: dict[str, float] = {}
    for key, pid in rows:
        weight[pid] = weight.get(pid, 0.0) + 1.0 / size[key]
    ranked = sorted(weight, key=lambda pid: (-weight[pid], pid.encode()))
    identified = {pid for key, pid in rows if key.split(":", 1)[0] in ("id", "ph")}
    assert ranked[0] == an and identified == {an, *household}
    assert len(identified - set(ranked[:5])) == 4  # tied sharers of the phone beyond the limit are taken too
    assert set(found) == set(ranked[:5]) | identified and found[:5] == ranked[:5]
    assert all(weight[a] >= weight[b] - 1e-9 for a, b in pairwise(found))


def test_the_index_keeps_normalised_values_and_match_trusts_only_their_version(client: TestClient) -> None:
    """The write hook stores `derive` output so $match does not re-normalise candidates; values written by
    another version of `derive` are recomputed instead of trusted."""
    import orjson
    from sqlalchemy import select, update

    from lienthong.identity.fhir_mapping import to_person
    from lienthong.identity.records import DERIVED_VERSION, derive
    from lienthong.storage import schema

    an = create(client, AN)
    db = client.app.state.node.db  # type: ignore[attr-defined]
    p = schema.mpi_person

    def stored() -> JSON:
        with db.read() as store:
            return dict(orjson.loads(store.execute(select(p.c.derived).where(p.c.patient_id == an)).scalar_one()))

    def set_stored(values: JSON) -> None:
        with db.begin() as store:
            store.conn.execute(update(p).where(p.c.patient_id == an).values(derived=orjson.dumps(values).decode()))

    values = stored()
    assert values == {"_v": DERIVED_VERSION, **derive(to_person(read(client, an), an))}
    query = patient("Nguyễn", "Văn An", "1980-05-02", "male", cccd=AN_CCCD, city="Lục Ngạn")
    assert graded(match(client, query)) == {an: "certain"}
    someone_else = {**values, "national_id": "", "given": "zzz", "given_acc": "zzz", "family": "qqq", "year": 0,
                    "month": 0, "day": 0, "dob_key": ""}
    set_stored(someone_else)  # the stored values, not the record, are what $match compares
    assert an not in graded(match(client, query))
    set_stored({**someone_else, "_v": DERIVED_VERSION - 1})  # written by another version: recomputed
    assert graded(match(client, query)) == {an: "certain"}


def test_the_block_index_upgrade_keeps_every_match(db_url: str) -> None:
    """Revision 0007 replaces the key-only block index by one on (key, patient_id), so `$match` reads a block
    from the index alone. An index written before it is upgraded in place (and back) and `$match` finds the
    same persons with the same grades."""
    from alembic import command
    from sqlalchemy import inspect

    from lienthong.node import create_app
    from lienthong.storage import migrate
    from lienthong.storage.engine import make_engine

    def block_indexes() -> set[str]:
        engine = make_engine(db_url)
        try:
            return {ix["name"] for ix in inspect(engine).get_indexes("mpi_block") if ix["name"]}
        finally:
            engine.dispose()

    def graded_match(query: JSON) -> dict[str, str]:
        app = create_app(db_url, secure=False)  # migrates to the newest revision on start
        try:
            with TestClient(app, base_url="http://testserver") as c:
                return graded(match(c, query))
        finally:
            app.state.node.db.engine.dispose()

    app = create_app(db_url, secure=False)
    with TestClient(app, base_url="http://testserver") as c:
        an, third = create(c, AN), create(c, AN_THIRD)
        create(c, BINH)
        add_crowd(c, 40)
    app.state.node.db.engine.dispose()
    query = patient("Nguyễn", "Văn An", "1980-05-02", "male", cccd=AN_CCCD, city="Lục Ngạn")
    before = graded_match(query)
    assert before[an] == before[third] == "certain"
    assert block_indexes() == {"ix_mpi_block_key_patient", "ix_mpi_block_patient"}

    engine = make_engine(db_url)
    command.downgrade(migrate.alembic_config(engine), "0006")
    engine.dispose()
    assert block_indexes() == {"ix_mpi_block_key", "ix_mpi_block_patient"}
    assert graded_match(query) == before
    assert block_indexes() == {"ix_mpi_block_key_patient", "ix_mpi_block_patient"}


def test_rebuild_reindexes_first_versions_without_duplicating_them(client: TestClient) -> None:
    """The write hook skips the DELETEs on a first version; `lienthong mpi index` re-indexes rows that exist."""
    an = create(client, AN)
    identity = client.app.state.node.identity  # type: ignore[attr-defined]
    assert identity.rebuild() == 1
    assert graded(match(client, AN_THIRD)) == {an: "certain"}


def test_match_only_certain_and_count(client: TestClient) -> None:
    an = create(client, AN)
    create(client, AN_PLAIN)
    with_id = patient("Nguyen", "Van An", "1980-05-02", "male", cccd=AN_CCCD)
    without_id = patient("Nguyen", "Van An", "1980-05-02", "male", phone="0912345678")

    assert graded(match(client, with_id, onlyCertainMatches=True)) == {an: "certain"}
    assert match(client, without_id, onlyCertainMatches=True)["total"] == 0
    assert match(client, without_id, onlyCertainMatches=False)["total"] == 2
    assert match(client, without_id, count=1)["total"] == 1
    assert match(client, without_id, count=5)["total"] == 2
    for bad in (0, -1):
        outcome(client.post("/fhir/Patient/$match", json=match_params(without_id, count=bad)), 400)


def test_match_refuses_unusable_queries(client: TestClient) -> None:
    create(client, AN)
    url = "/fhir/Patient/$match"
    outcome(client.post(url, json=match_params({"resourceType": "Patient", "gender": "male"})), 400)
    outcome(client.post(url, json=match_params({"resourceType": "Patient"})), 400)
    outcome(client.post(url, json=match_params({"resourceType": "Patient", "birthDate": "1980-05-02"})), 400)
    outcome(client.post(url, json={"resourceType": "Parameters", "parameter": [{"name": "count", "valueInteger": 3}]}),
            400)
    outcome(client.post(url, json=match_params({"resourceType": "Observation", "status": "final"})), 400)
    outcome(client.post(url, json=AN), 400)  # a bare Patient, not Parameters

    # A malformed identifier in the query is refused with the reason, not silently ignored.
    bad = patient("Nguyen", "Van An", "1980-05-02", "male", cccd="02408000123")
    issue = outcome(client.post(url, json=match_params(bad)), 400)["issue"][0]
    assert "12" in issue["diagnostics"] and issue["expression"] == ["Patient.identifier[0].value"]


# ---------------------------------------------------------------------------------------
# Identifier checks on writes
# ---------------------------------------------------------------------------------------
MALFORMED = [  # (identifier, what the diagnostics must say)
    ({"system": ids.CCCD_SYSTEM, "value": "024180001234"}, "Sex encoded in the CCCD (female) differs"),
    ({"system": ids.CCCD_SYSTEM, "value": "024280001234"}, "Birth year encoded in the CCCD (2080) differs"),
    ({"system": ids.CCCD_SYSTEM, "value": "02408000123"}, "must have 12 digits (got 11)"),
    ({"system": ids.BHYT_SYSTEM, "value": "DN9242488593546"}, "Benefit level '9' must be 1 to 5"),
    ({"system": ids.BHYT_SYSTEM, "value": "DN424248859354"}, "must have 15 characters (got 14)"),
    ({"system": ids.BHXH_SYSTEM, "value": "24885935"}, "must have 10 digits (got 8)"),
    ({"system": ids.BHXH_SYSTEM, "value": "24885935AB"}, "digits only"),
]


def test_writes_with_malformed_identifiers_are_rejected_and_nothing_is_stored(client: TestClient) -> None:
    existing = create(client, AN)
    stored = read(client, existing)
    before = patient_count(client)
    for k, (ident, reason) in enumerate(MALFORMED):
        # The bad identifier is the second one, after a valid facility patient code.
        resource = patient("Nguyễn", "Văn An", "1980-05-02", "male",
                           identifiers=[{"system": MA_BN, "value": f"BN{k}"}, ident])
        issues = outcome(client.post("/fhir/Patient", json=resource), 422)["issue"]
        assert len(issues) == 1 and reason in issues[0]["diagnostics"], (ident, issues)
        assert issues[0]["expression"] == ["Patient.identifier[1].value"]

        # Create-by-update, update of an existing record and a transaction are refused the same way.
        r = client.put(f"/fhir/Patient/new-{k}", json={**resource, "id": f"new-{k}"})
        assert reason in outcome(r, 422)["issue"][0]["diagnostics"]
        assert client.get(f"/fhir/Patient/new-{k}").status_code == 404
        r = client.put(f"/fhir/Patient/{existing}", json={**resource, "id": existing})
        assert reason in outcome(r, 422)["issue"][0]["diagnostics"]
        bundle = {"resourceType": "Bundle", "type": "transaction",
                  "entry": [{"resource": BINH, "request": {"method": "POST", "url": "Patient"}},
                            {"resource": resource, "request": {"method": "POST", "url": "Patient"}}]}
        issue = outcome(client.post("/fhir", json=bundle), 422)["issue"][0]
        assert reason in issue["diagnostics"] and "identifier[1].value" in issue["expression"][0]
    assert patient_count(client) == before
    assert read(client, existing) == stored
    assert match(client, patient("Nguyễn", "Văn An", "1980-05-02", "male", phone="0912345678"))["total"] == 1


def test_cancelled_cccd_still_finds_the_person_by_search(client: TestClient) -> None:
    # A cancelled number is checked for shape only (it may predate today's sex/century rules).
    by_use = create(client, patient("Nguyễn", "Văn An", "1980-05-02", "male", identifiers=[
        {"system": ids.CCCD_SYSTEM, "value": "024180005555", "use": "old"},
        {"system": ids.CCCD_SYSTEM, "value": AN_CCCD, "use": "official"}]))
    by_period = create(client, patient("Trần", "Thị Bình", "1990-03-04", "female", identifiers=[
        {"system": ids.CCCD_SYSTEM, "value": "027090007777", "period": {"start": "2016-01-01", "end": "2021-06-30"}},
        {"system": ids.CCCD_SYSTEM, "value": "027190008888"}]))
    for value, pid in (("024180005555", by_use), (AN_CCCD, by_use), ("027090007777", by_period),
                       ("027190008888", by_period)):
        r = client.get("/fhir/Patient", params={"identifier": f"{ids.CCCD_SYSTEM}|{value}"})
        assert r.status_code == 200, r.text
        assert [e["resource"]["id"] for e in r.json().get("entry", [])] == [pid], value
    # A cancelled number must still have the shape of a CCCD.
    bad = patient("Lê", "Văn C", "1980-05-02", "male",
                  identifiers=[{"system": ids.CCCD_SYSTEM, "value": "0241800055", "use": "old"}])
    assert "got 10" in outcome(client.post("/fhir/Patient", json=bad), 422)["issue"][0]["diagnostics"]


# ---------------------------------------------------------------------------------------
# $mpi-link and golden records
# ---------------------------------------------------------------------------------------
def test_link_creates_one_golden_record_and_reuses_it(client: TestClient) -> None:
    an = create(client, AN)
    an_plain = create(client, AN_PLAIN)
    assert goldens(client) == []

    outcome_ = mpi_link(client, an_plain)
    assert outcome_["linked"] == [an] and "review" not in outcome_
    [golden] = goldens(client)
    g = golden["id"]
    assert [i["value"] for i in golden["identifier"] if i["system"] == ENTERPRISE], "enterprise identifier"
    assert golden["birthDate"] == "1980-05-02" and golden["gender"] == "male"
    for pid in (an, an_plain):
        assert links(read(client, pid)) == [("refer", f"Patient/{g}")]
    assert sorted(links(golden)) == sorted([("seealso", f"Patient/{an}"), ("seealso", f"Patient/{an_plain}")])

    # Linking again changes nothing.
    version = golden["meta"]["versionId"]
    assert mpi_link(client, an)["linked"] == [an_plain]
    assert read(client, g)["meta"]["versionId"] == version
    assert len(goldens(client)) == 1

    # A third record of the same person joins the same golden record.
    third = create(client, AN_THIRD)
    assert sorted(mpi_link(client, third)["linked"]) == sorted([an, an_plain])
    assert [x["id"] for x in goldens(client)] == [g], "never two golden records for one person"
    assert links(read(client, third)) == [("refer", f"Patient/{g}")]
    assert sorted(links(read(client, g))) == sorted(("seealso", f"Patient/{p}") for p in (an, an_plain, third))

    # Golden records are not $match candidates; the three sources are.
    assert set(graded(match(client, patient("Nguyen", "Van An", "1980-05-02", "male", cccd=AN_CCCD)))) == {
        an, an_plain, third}


def test_link_on_a_golden_record_never_links_it_to_itself(client: TestClient) -> None:
    an = create(client, AN)
    create(client, AN_PLAIN)
    mpi_link(client, an)
    [golden] = goldens(client)
    r = client.post(f"/fhir/Patient/{golden['id']}/$mpi-link")
    after = read(client, golden["id"])
    assert all(ref != f"Patient/{golden['id']}" for _, ref in links(after)), links(after)
    assert r.status_code in (200, 400, 409, 422)


# ---------------------------------------------------------------------------------------
# Review queue
# ---------------------------------------------------------------------------------------
def test_possible_matches_wait_for_review_and_decisions_close_them(client: TestClient) -> None:
    binh = create(client, BINH)
    binh_year = create(client, BINH_YEAR)
    twin_1 = create(client, TWIN_1)
    twin_2 = create(client, TWIN_2)

    queued = mpi_link(client, binh_year)
    assert "linked" not in queued and len(queued["review"]) == 1
    queued_twins = mpi_link(client, twin_2)
    assert "linked" not in queued_twins and len(queued_twins["review"]) == 1
    assert mpi_link(client, binh)["review"] == queued["review"], "the same pair is queued once"

    pending = {item["review_id"]: item for item in reviews(client)}
    assert set(pending) == {queued["review"][0], queued_twins["review"][0]}
    item = pending[queued["review"][0]]
    assert {item["left_id"], item["right_id"]} == {binh, binh_year} and item["status"] == "pending"
    assert item["explanation"] and 0 <= item["score"] < 8
    twins_item = pending[queued_twins["review"][0]]
    assert {twins_item["left_id"], twins_item["right_id"]} == {twin_1, twin_2}
    for pid in (binh, binh_year, twin_1, twin_2):
        assert links(read(client, pid)) == [], "a possible match is never linked automatically"
    assert goldens(client) == []

    # match: both records join one golden record.
    r = decide(client, item["review_id"], "match")
    assert r.status_code == 200, r.text
    [g] = parameters(r.json())["golden"]
    assert links(read(client, binh)) == links(read(client, binh_year)) == [("refer", f"Patient/{g}")]
    outcome(decide(client, item["review_id"], "match"), 409)
    outcome(decide(client, item["review_id"], "no-match"), 409)

    # no-match: closed, nothing linked.
    r = decide(client, twins_item["review_id"], "no-match")
    assert r.status_code == 200 and "golden" not in parameters(r.json()), r.text
    outcome(decide(client, twins_item["review_id"], "no-match"), 409)
    assert links(read(client, twin_1)) == links(read(client, twin_2)) == []
    assert reviews(client) == []
    assert [x["review_id"] for x in reviews(client, "match")] == [item["review_id"]]
    assert [x["review_id"] for x in reviews(client, "no-match")] == [twins_item["review_id"]]
    assert [x["id"] for x in goldens(client)] == [g]

    outcome(decide(client, "no-such-review", "match"), 404)
    outcome(decide(client, twins_item["review_id"], "maybe"), 400)


def test_decided_pairs_are_not_queued_again(client: TestClient) -> None:
    twin_1 = create(client, TWIN_1)
    twin_2 = create(client, TWIN_2)
    binh = create(client, BINH)
    binh_year = create(client, BINH_YEAR)
    [first] = mpi_link(client, twin_2)["review"]
    assert decide(client, first, "no-match").status_code == 200
    [second] = mpi_link(client, binh_year)["review"]
    assert decide(client, second, "match").status_code == 200
    mpi_link(client, twin_1)
    mpi_link(client, binh)
    assert reviews(client) == []


# ---------------------------------------------------------------------------------------
# $merge / $unmerge
# ---------------------------------------------------------------------------------------
def test_merge_then_unmerge_restores_both_patients_exactly(client: TestClient) -> None:
    target = create(client, AN)
    source = create(client, AN_PLAIN)
    query = patient("Nguyen", "Van An", "1980-05-02", "male", phone="0912345678")
    assert set(graded(match(client, query))) == {target, source}
    before = {pid: read(client, pid) for pid in (target, source)}

    r = merge(client, source, target)
    assert r.status_code == 200, r.text
    [merge_id] = parameters(r.json())["merge"]
    merged_source, merged_target = read(client, source), read(client, target)
    assert merged_source["active"] is False
    assert ("replaced-by", f"Patient/{target}") in links(merged_source)
    assert ("replaces", f"Patient/{source}") in links(merged_target)
    assert set(graded(match(client, query))) == {target}, "a merged-away record is no longer a candidate"
    outcome(merge(client, source, target), 409)
    outcome(merge(client, target, target), 400)
    outcome(merge(client, source, "no-such-patient"), 404)

    r = unmerge(client, merge_id)
    assert r.status_code == 200, r.text
    for pid, old in before.items():
        now = read(client, pid)
        assert without_meta(now) == without_meta(old), pid
        assert int(now["meta"]["versionId"]) == int(old["meta"]["versionId"]) + 2
    assert set(graded(match(client, query))) == {target, source}
    outcome(unmerge(client, merge_id), 409)
    outcome(unmerge(client, "no-such-merge"), 404)


def test_unmerge_keeps_edits_made_after_the_merge(client: TestClient) -> None:
    target = create(client, AN)
    source = create(client, AN_PLAIN)
    [merge_id] = parameters(merge(client, source, target).json())["merge"]
    edited = read(client, target)
    edited["telecom"] = [{"system": "phone", "value": "0987654321", "use": "mobile"}]
    r = client.put(f"/fhir/Patient/{target}", json=edited)
    assert r.status_code == 200, r.text

    assert unmerge(client, merge_id).status_code == 200
    now_target, now_source = read(client, target), read(client, source)
    assert now_target["telecom"] == edited["telecom"], "an edit made after the merge survives the unmerge"
    assert ("replaces", f"Patient/{source}") not in links(now_target)
    assert ("replaced-by", f"Patient/{target}") not in links(now_source)
    assert now_source.get("active") is not False


# ---------------------------------------------------------------------------------------
# Audit trail on a secure node
# ---------------------------------------------------------------------------------------
@pytest.fixture
def cheap_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fixture clients' secrets are hashed with a low argon2id cost; verification is the real code path."""
    from argon2 import PasswordHasher

    from lienthong.security import passwords

    monkeypatch.setattr(passwords, "hash_password", PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash)


@pytest.fixture
def secure(db_url: str, cheap_hashing: None) -> Iterator[tuple[TestClient, Any, str]]:
    """A node with authentication on and a system client allowed to read and write everything."""
    from lienthong.node import create_app

    app = create_app(db_url)
    cid, secret = app.state.node.accounts.add_client("mpi-tests", None, "system/*.cruds")
    with TestClient(app, base_url="http://testserver") as c:
        r = c.post("/auth/token", data={"grant_type": "client_credentials", "client_id": cid, "client_secret": secret})
        assert r.status_code == 200, r.text
        c.headers["Authorization"] = f"Bearer {r.json()['access_token']}"
        yield c, app, cid
    app.state.node.service.guard.audit.close()
    app.state.node.db.engine.dispose()


def _audit(app: Any) -> list[JSON]:
    audit = app.state.node.service.guard.audit
    audit.flush()
    events: list[JSON] = audit.events()
    return events


def test_every_decision_is_audited(secure: tuple[TestClient, Any, str]) -> None:
    c, app, actor = secure
    an, an_plain = create(c, AN), create(c, AN_PLAIN)
    binh, binh_year = create(c, BINH), create(c, BINH_YEAR)
    twin_1, twin_2 = create(c, TWIN_1), create(c, TWIN_2)

    auto = mpi_link(c, an_plain)
    assert auto["linked"] == [an]
    [g] = [x["id"] for x in goldens(c)]
    [to_match] = mpi_link(c, binh_year)["review"]
    [to_reject] = mpi_link(c, twin_2)["review"]
    r = decide(c, to_match, "match")
    assert r.status_code == 200, r.text
    [g2] = parameters(r.json())["golden"]
    assert decide(c, to_reject, "no-match").status_code == 200
    r = merge(c, an_plain, an)
    assert r.status_code == 200, r.text
    [merge_id] = parameters(r.json())["merge"]
    assert unmerge(c, merge_id).status_code == 200

    events = _audit(app)
    by_detail = {e.get("outcomeDesc", ""): e for e in events}

    def event(prefix: str) -> JSON:
        found = [e for d, e in by_detail.items() if d.startswith(prefix)]
        assert len(found) == 1, (prefix, sorted(by_detail))
        return found[0]

    def patients(e: JSON) -> set[str]:
        return {x["what"]["reference"] for x in e.get("entity", []) if "what" in x}

    automatic = event(f"linked Patient/{an_plain} and Patient/{an} to golden Patient/{g}; score ")
    assert "national_id=" in automatic["outcomeDesc"] or "phone=" in automatic["outcomeDesc"], "explained by weights"
    assert {f"Patient/{p}" for p in (an, an_plain, g)} <= patients(automatic)
    left, right = sorted((binh, binh_year))
    human = event(f"linked Patient/{left} and Patient/{right} to golden Patient/{g2}")
    assert {f"Patient/{p}" for p in (binh, binh_year, g2)} <= patients(human)
    rejected = event(f"review {to_reject}: no-match")
    assert {f"Patient/{twin_1}", f"Patient/{twin_2}"} <= patients(rejected)
    merged = event(f"merge {merge_id}: Patient/{an_plain} into Patient/{an}")
    unmerged = event(f"unmerge {merge_id}")
    for e in (automatic, human, rejected, merged, unmerged):
        assert e["agent"][0]["who"]["identifier"]["value"] == actor
        assert e["outcome"] == "0" and e["action"] == "U"
    ok, _, message = app.state.node.service.guard.audit.verify()
    assert ok, message


def test_queueing_a_possible_match_is_audited(secure: tuple[TestClient, Any, str]) -> None:
    c, app, _ = secure
    binh, binh_year = create(c, BINH), create(c, BINH_YEAR)
    before = len(_audit(app))
    [review] = mpi_link(c, binh_year)["review"]
    events = _audit(app)
    new = events[: len(events) - before]  # newest first
    assert any(review in e.get("outcomeDesc", "") or f"Patient/{binh}" in json.dumps(e) for e in new), new


def test_mpi_link_needs_write_access(secure: tuple[TestClient, Any, str]) -> None:
    c, app, _ = secure
    an = create(c, AN)
    an_plain = create(c, AN_PLAIN)
    cid, secret = app.state.node.accounts.add_client("read-only", None, "system/Patient.rs")
    with TestClient(app, base_url="http://testserver") as ro:
        token = ro.post("/auth/token", data={"grant_type": "client_credentials", "client_id": cid,
                                             "client_secret": secret}).json()["access_token"]
        ro.headers["Authorization"] = f"Bearer {token}"
        assert ro.put(f"/fhir/Patient/{an}", json={**AN, "id": an}).status_code == 403
        assert merge(ro, an_plain, an).status_code == 403
        r = ro.post(f"/fhir/Patient/{an_plain}/$mpi-link")
    assert links(read(c, an)) == [] and goldens(c) == []
    assert r.status_code == 403, r.text


# ---------------------------------------------------------------------------------------
# CLI: lienthong mpi review list|decide, lienthong load
# ---------------------------------------------------------------------------------------
@pytest.fixture
def sqlite_node(tmp_path: Path) -> Iterator[tuple[str, TestClient]]:
    from lienthong.node import create_app

    url = f"sqlite:///{tmp_path / 'mpi.db'}"
    app = create_app(url, secure=False)
    with TestClient(app, base_url="http://testserver") as c:
        yield url, c
    app.state.node.db.engine.dispose()


def _cli(*args: str) -> Any:
    from lienthong.cli.main import app

    return CliRunner().invoke(app, list(args))


def test_cli_review_list_and_decide(sqlite_node: tuple[str, TestClient], monkeypatch: pytest.MonkeyPatch) -> None:
    from lienthong.cli import mpi_admin
    from lienthong.security.audit import AuditTrail
    from lienthong.storage.engine import make_engine

    monkeypatch.setattr(mpi_admin.out, "width", 220)  # a wide terminal: layout is tested separately
    url, c = sqlite_node
    binh, binh_year = create(c, BINH), create(c, BINH_YEAR)
    [review] = mpi_link(c, binh_year)["review"]

    res = _cli("mpi", "review", "list", "--db", url)
    assert res.exit_code == 0, res.output
    for text in (review, binh, binh_year, "given=", "birth_date="):
        assert text in res.output, (text, res.output)

    res = _cli("mpi", "review", "decide", review, "match", "--db", url)
    assert res.exit_code == 0, res.output
    assert f"{review}: match" in res.output and "golden" in res.output
    [g] = [x["id"] for x in goldens(c)]
    assert links(read(c, binh)) == links(read(c, binh_year)) == [("refer", f"Patient/{g}")]

    res = _cli("mpi", "review", "decide", review, "no-match", "--db", url)
    assert res.exit_code == 1 and "already decided" in res.output.replace("\n", " ")
    res = _cli("mpi", "review", "decide", review, "perhaps", "--db", url)
    assert res.exit_code == 1
    res = _cli("mpi", "review", "list", "--db", url)
    assert res.exit_code == 0 and review[:8] not in res.output

    # The decision is audited under the operator's OS account.
    engine = make_engine(url)
    try:
        events = AuditTrail(engine, "cli").events()
    finally:
        engine.dispose()
    [decided] = [e for e in events if f"to golden Patient/{g}" in e.get("outcomeDesc", "")]
    assert decided["agent"][0]["who"]["identifier"]["value"].startswith("os:")


def test_cli_review_list_shows_whole_ids_in_80_columns(sqlite_node: tuple[str, TestClient],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from lienthong.cli import mpi_admin

    monkeypatch.setattr(mpi_admin.out, "width", 80)
    url, c = sqlite_node
    binh = create(c, BINH)
    binh_year = create(c, BINH_YEAR)
    [review] = mpi_link(c, binh_year)["review"]
    res = _cli("mpi", "review", "list", "--db", url)
    assert res.exit_code == 0, res.output
    for text in (review, binh, binh_year):
        assert text in res.output, (text, res.output)


@pytest.mark.parametrize("what", ["indexed", "identifiers-checked"])
def test_cli_load_goes_through_the_patient_index(sqlite_node: tuple[str, TestClient], tmp_path: Path,
                                                  what: str) -> None:
    """`lienthong load` writes like HTTP does: Patients are indexed for $match and identifiers are checked.
    (At 2f1e81f cli/loader.py used a bare FhirService and skipped both; fixed in 7ef8c4e.)"""
    url, c = sqlite_node
    if what == "indexed":
        (tmp_path / "an.json").write_text(json.dumps(AN), encoding="utf-8")
        assert _cli("load", str(tmp_path / "an.json"), "--db", url).exit_code == 0
        assert match(c, patient("Nguyen", "Van An", "1980-05-02", "male", cccd=AN_CCCD))["total"] == 1
    else:
        bad = patient("Lê", "Văn C", "1980-05-02", "male", cccd="024180001234")  # female-coded CCCD
        (tmp_path / "bad.json").write_text(json.dumps(bad), encoding="utf-8")
        res = _cli("load", str(tmp_path / "bad.json"), "--db", url)
        assert patient_count(c) == 0
        assert res.exit_code != 0


def test_settle_loads_the_tables_and_freezes_the_start_up_heap(sqlite_node: tuple[str, TestClient]) -> None:
    """`lienthong serve` settles the node before serving: start-up objects and, once a thread has loaded
    them, the normalisation tables are frozen out of the collector's reach (full collections paused $match
    for ~0.9 s at 1 M patients)."""
    import gc

    from lienthong.identity.admin_units import admin_units
    from lienthong.node import GC_YOUNG_THRESHOLD, settle

    _, c = sqlite_node
    threshold = gc.get_threshold()
    try:
        settle(c.app.state.node).join(timeout=120)  # type: ignore[attr-defined]
        assert admin_units.cache_info().currsize == 1
        assert gc.get_freeze_count() > 100_000
        assert len(gc.get_objects()) < gc.get_freeze_count() // 10  # collections now walk only what came after
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *threshold[1:])  # a Bundle's objects die young
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
