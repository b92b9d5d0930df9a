"""FHIR R4 search over HTTP: every parameter type, modifiers, prefixes, chains, _has, includes,
sorting, paging (and its stability under concurrent writes), totals and error handling.

Resources are created with client-chosen ids (PUT) so expected result sets read plainly.
Every test runs on SQLite and PostgreSQL through the `client` fixture.
"""

from __future__ import annotations

import time
import unicodedata
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from starlette.testclient import TestClient

from conftest import BASE, assert_outcome, put

JSON = dict[str, Any]
SYS = "urn:oid:2.16.840.1.113883.2.24.1"
SYS_B = "http://moh.gov.vn/fhir/sid/bhyt"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"


# --------------------------------------------------------------------------- helpers


def get_bundle(client: TestClient, url: str, **kwargs: Any) -> JSON:
    r = client.get(url, **kwargs)
    assert r.status_code == 200, f"{url}: {r.text}"
    bundle: JSON = r.json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset", bundle
    return bundle


def matches(bundle: JSON, mode: str = "match") -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", []) if e.get("search", {}).get("mode") == mode]


def found(client: TestClient, url: str, **kwargs: Any) -> set[str]:
    """Ids of the matches of a search that fits on one page."""
    bundle = get_bundle(client, url, **kwargs)
    assert not [link for link in bundle["link"] if link["relation"] == "next"], "expected a single page"
    ids = matches(bundle)
    assert len(ids) == len(set(ids)), f"duplicates in {ids}"
    assert bundle.get("total", len(ids)) == len(ids)
    return set(ids)


def check_cases(client: TestClient, prefix: str, cases: list[tuple[str, set[str]]],
                param: str | None = None) -> None:
    """Run every (query, expected ids) case and report all mismatches at once."""
    failures = []
    for query, expected in cases:
        got = found(client, prefix, params={param: query}) if param else found(client, prefix + query)
        if got != expected:
            failures.append(f"{param + '=' if param else ''}{query}: got {sorted(got)}, expected {sorted(expected)}")
    assert not failures, "\n".join(failures)


def link(bundle: JSON, relation: str) -> str | None:
    return next((item["url"] for item in bundle.get("link", []) if item["relation"] == relation), None)


def walk(client: TestClient, url: str) -> tuple[list[str], list[JSON]]:
    """Follow next links; return all match ids in order and the pages."""
    ids: list[str] = []
    pages: list[JSON] = []
    next_url: str | None = url
    while next_url:
        assert len(pages) < 100, "paging does not end"
        page = get_bundle(client, next_url)
        pages.append(page)
        ids += matches(page)
        next_url = link(page, "next")
    return ids, pages


def patient(rid: str, family: str | None = None, given: tuple[str, ...] = (), **extra: Any) -> JSON:
    res: JSON = {"resourceType": "Patient", "id": rid, **extra}
    if family is not None or given:
        name: JSON = {"given": list(given)} if given else {}
        if family is not None:
            name["family"] = family
        res["name"] = [name]
    return res


def observation(rid: str, code: str | JSON = "2345-7", system: str = LOINC, **extra: Any) -> JSON:
    concept = code if isinstance(code, dict) else {"coding": [{"system": system, "code": code}]}
    return {"resourceType": "Observation", "id": rid, "status": "final", "code": concept, **extra}


# --------------------------------------------------------------------------- string


@pytest.fixture
def names(client: TestClient) -> TestClient:
    put(client, patient("p1", "Nguyễn", ("Văn", "An"), address=[{"city": "Hà Nội", "line": ["12 Phố Huế"]}]))
    put(client, patient("p2", "Trần", ("Thị", "Bình"), address=[{"city": "Hồ Chí Minh"}]))
    put(client, patient("p3", "Nguyenova", ("Anna",)))
    put(client, patient("p4", gender="unknown"))
    return client


STRING_CASES = [
    ("name=nguyen", {"p1", "p3"}),
    ("name=nguyen van an", {"p1"}),
    ("name=Nguyễn Văn An", {"p1"}),
    ("name=van an nguyen", {"p1"}),  # given-first (Western) order is indexed too
    ("name=an nguyen", set()),
    ("name=NGUYỄN", {"p1", "p3"}),
    ("name=nguyên", {"p1", "p3"}),  # another tone mark on the same letters
    ("family=NGUYEN", {"p1", "p3"}),
    ("family=nguyen", {"p1", "p3"}),
    ("family=tr", {"p2"}),
    ("given=an", {"p1", "p3"}),
    ("given=van", {"p1"}),
    ("given=VĂN", {"p1"}),
    ("given=binh", {"p2"}),
    ("given=thi binh", set()),
    ("family=tran,nguyenova", {"p2", "p3"}),
    ("name=nguyen&given=van", {"p1"}),
    ("name=nguyen&name=anna", {"p3"}),
    ("family:exact=Nguyễn", {"p1"}),
    ("family:exact=nguyễn", set()),
    ("family:exact=Nguyen", set()),
    ("family:exact=Nguy", set()),
    ("given:exact=An", {"p1"}),
    ("given:exact=Anna", {"p3"}),
    ("family:contains=uyen", {"p1", "p3"}),
    ("family:contains=OVA", {"p3"}),
    ("given:contains=nn", {"p3"}),
    ("family:contains=xyz", set()),
    ("address-city=ha noi", {"p1"}),
    ("address-city=Hồ", {"p2"}),
    ("address=12 pho hue", {"p1"}),
    ("family=a\\,b", set()),
    ("family:missing=true", {"p4"}),
    ("family:missing=false", {"p1", "p2", "p3"}),
]


def test_string_search(names: TestClient) -> None:
    check_cases(names, "/fhir/Patient?", STRING_CASES)


def test_string_exact_ignores_unicode_normalisation_form(names: TestClient) -> None:
    """Vendor systems often send decomposed (NFD) Vietnamese; :exact compares characters, not code points."""
    nfd = unicodedata.normalize("NFD", "Nguyễn")
    assert nfd != "Nguyễn"
    assert found(names, "/fhir/Patient", params={"family:exact": nfd}) == {"p1"}
    assert found(names, "/fhir/Patient", params={"family": nfd}) == {"p1", "p3"}


def test_string_exact_finds_text_stored_decomposed(client: TestClient) -> None:
    put(client, patient("nfd", unicodedata.normalize("NFD", "Đặng"), (unicodedata.normalize("NFD", "Thị Ánh"),)))
    assert found(client, "/fhir/Patient?family=dang") == {"nfd"}  # folded search is unaffected
    assert found(client, "/fhir/Patient", params={"family:exact": "Đặng"}) == {"nfd"}


# --------------------------------------------------------------------------- token


@pytest.fixture
def tokens(client: TestClient) -> TestClient:
    put(client, patient("ta", "A", gender="male", active=True, identifier=[
        {"system": SYS, "value": "111", "type": {"coding": [{"system": V2_0203, "code": "MR"}]}}]))
    put(client, patient("tb", "B", gender="female", active=False, identifier=[{"value": "111"}]))
    put(client, patient("tc", "C", identifier=[
        {"system": SYS_B, "value": "222", "type": {"coding": [{"system": V2_0203, "code": "NI"}], "text": "Số BHYT"}}]))
    put(client, observation("glu", code={"coding": [{"system": LOINC, "code": "2345-7",
                                                      "display": "Glucose [Mass/volume] in Serum or Plasma"}],
                                         "text": "Đường huyết"}))
    put(client, observation("hba", code={"coding": [{"system": LOINC, "code": "4548-4", "display": "HbA1c"},
                                                    {"system": "http://snomed.info/sct", "code": "43396009"}]}))
    put(client, observation("loc", code={"coding": [{"code": "2345-7"}]}))
    return client


TOKEN_CASES = [
    (f"Patient?identifier={SYS}|111", {"ta"}),
    ("Patient?identifier=111", {"ta", "tb"}),
    ("Patient?identifier=|111", {"tb"}),
    (f"Patient?identifier={SYS}|", {"ta"}),
    (f"Patient?identifier={SYS_B}|111", set()),
    (f"Patient?identifier={SYS}|111,{SYS_B}|222", {"ta", "tc"}),
    (f"Patient?identifier:of-type={V2_0203}|MR|111", {"ta"}),
    (f"Patient?identifier:of-type={V2_0203}|NI|111", set()),
    (f"Patient?identifier:of-type={V2_0203}|NI|222", {"tc"}),
    ("Patient?identifier:text=so bhyt", {"tc"}),
    ("Patient?gender=male", {"ta"}),
    ("Patient?gender=male,female", {"ta", "tb"}),
    ("Patient?gender:not=male", {"tb", "tc"}),
    ("Patient?gender:missing=true", {"tc"}),
    ("Patient?active=true", {"ta"}),
    ("Patient?active=false", {"tb"}),
    ("Patient?active:not=true", {"tb", "tc"}),
    (f"Observation?code={LOINC}|2345-7", {"glu"}),
    ("Observation?code=2345-7", {"glu", "loc"}),
    ("Observation?code=|2345-7", {"loc"}),
    (f"Observation?code={LOINC}|", {"glu", "hba"}),
    ("Observation?code=http://snomed.info/sct|2345-7", set()),
    ("Observation?code=http://snomed.info/sct|43396009", {"hba"}),
    (f"Observation?code:not={LOINC}|2345-7", {"hba", "loc"}),
    ("Observation?code:text=glucose", {"glu"}),
    ("Observation?code:text=serum", {"glu"}),
    ("Observation?code:text=duong huyet", {"glu"}),
    ("Observation?code:text=lucose", set()),
    ("Observation?code:text=hba1c", {"hba"}),
]


def test_token_search(tokens: TestClient) -> None:
    check_cases(tokens, "/fhir/", TOKEN_CASES)


def test_token_errors(tokens: TestClient) -> None:
    assert_outcome(tokens.get(f"/fhir/Patient?identifier:of-type={V2_0203}|MR"), 400)
    assert_outcome(tokens.get("/fhir/Patient?identifier=a|b|c"), 400)
    assert_outcome(tokens.get("/fhir/Patient?identifier=|"), 400)
    assert_outcome(tokens.get("/fhir/Patient?gender="), 400)


# --------------------------------------------------------------------------- date


@pytest.fixture
def dates(client: TestClient) -> TestClient:
    for rid, birth in (("d1", "1980-05-02"), ("d2", "1980-12-31"), ("d3", "1981-01-01"), ("d4", "1979-06-15")):
        put(client, patient(rid, birthDate=birth))
    put(client, patient("d5"))
    return client


DATE_CASES = [
    ("1980", {"d1", "d2"}),
    ("1980-05", {"d1"}),
    ("1980-05-02", {"d1"}),
    ("eq1980-05-02", {"d1"}),
    ("eq1980", {"d1", "d2"}),
    ("1980-05-02T00:00:00Z", set()),  # a second cannot contain a whole day
    ("ne1980", {"d3", "d4"}),
    ("ne1980-05-02", {"d2", "d3", "d4"}),
    ("gt1980", {"d3"}),
    ("gt1980-05-02", {"d2", "d3"}),
    ("lt1980", {"d4"}),
    ("lt1980-05-02", {"d4"}),
    ("ge1980", {"d1", "d2", "d3"}),
    ("ge1980-12-31", {"d2", "d3"}),
    ("le1980", {"d1", "d2", "d4"}),
    ("le1980-05-02", {"d1", "d4"}),
    ("sa1980-05-02", {"d2", "d3"}),
    ("sa1980", {"d3"}),
    ("eb1980-05-02", {"d4"}),
    ("eb1980", {"d4"}),
    ("ge1980-05-02T12:00:00+07:00", {"d1", "d2", "d3"}),
    ("lt1980-05-02T12:00:00Z", {"d1", "d4"}),
    ("1980,1979", {"d1", "d2", "d4"}),
]


def test_date_prefixes_and_precision(dates: TestClient) -> None:
    check_cases(dates, "/fhir/Patient", DATE_CASES, "birthdate")


def test_date_approximately_and_combinations(dates: TestClient) -> None:
    assert "d1" in found(dates, "/fhir/Patient?birthdate=ap1980-05-02")
    assert "d1" in found(dates, "/fhir/Patient?birthdate=ap1980-05-03")
    assert found(dates, "/fhir/Patient?birthdate=ap1900-01-01") == set()
    assert found(dates, "/fhir/Patient?birthdate=ge1980&birthdate=lt1980-06") == {"d1"}
    assert found(dates, "/fhir/Patient?birthdate:missing=true") == {"d5"}
    assert found(dates, "/fhir/Patient?birthdate:missing=false") == {"d1", "d2", "d3", "d4"}


def test_date_on_periods_and_datetimes(client: TestClient) -> None:
    put(client, {"resourceType": "Encounter", "id": "closed", "status": "finished", "class": {"code": "IMP"},
                 "period": {"start": "2021-01-01", "end": "2021-01-10"}})
    put(client, {"resourceType": "Encounter", "id": "open", "status": "in-progress", "class": {"code": "IMP"},
                 "period": {"start": "2021-01-08T08:00:00+07:00"}})
    put(client, observation("at", effectiveDateTime="2021-03-04T10:30:00Z"))
    put(client, observation("vn", effectiveDateTime="2021-03-04T23:30:00+07:00"))
    enc = "/fhir/Encounter?date="
    assert found(client, enc + "2021-01") == {"closed"}  # the open one may run past January
    assert found(client, enc + "2021-01-05") == set()  # a day cannot contain a 10-day stay
    assert found(client, enc + "ge2021-01-05") == {"closed", "open"}
    assert found(client, enc + "le2021-01-05") == {"closed"}
    assert found(client, enc + "gt2030-01-01") == {"open"}
    assert found(client, enc + "lt2021-01-01") == set()
    assert found(client, enc + "sa2020-12-31") == {"closed", "open"}
    assert found(client, enc + "eb2021-01-11") == {"closed"}
    assert found(client, "/fhir/Observation?date=2021-03-04") == {"at", "vn"}
    assert found(client, "/fhir/Observation", params={"date": "2021-03-04T10:30:00Z"}) == {"at"}
    assert found(client, "/fhir/Observation", params={"date": "2021-03-04T10:30"}) == {"at"}  # minute holds second
    assert found(client, "/fhir/Observation", params={"date": "ge2021-03-04T17:30:00+07:00"}) == {"at", "vn"}
    assert found(client, "/fhir/Observation", params={"date": "gt2021-03-04T17:31:00+07:00"}) == {"vn"}


def test_invalid_date_is_400(client: TestClient) -> None:
    for value in ("1980-13", "abc", "2021-02-30", "gt", "eq", "1980-5-2", "19800502", "2020-01-01T25:00:00Z",
                  "xx2020", "2020-01-01T10:00:00+25:00"):
        body = assert_outcome(client.get("/fhir/Patient", params={"birthdate": value}), 400)
        assert "birthdate" in body["issue"][0]["diagnostics"], value


def test_last_updated(client: TestClient) -> None:
    a = put(client, patient("early"))
    time.sleep(0.01)
    b = put(client, patient("late"))
    assert found(client, "/fhir/Patient", params={"_lastUpdated": "ge" + b["meta"]["lastUpdated"]}) == {"late"}
    assert found(client, "/fhir/Patient", params={"_lastUpdated": "lt" + b["meta"]["lastUpdated"]}) == {"early"}
    assert found(client, "/fhir/Patient", params={"_lastUpdated": a["meta"]["lastUpdated"]}) == {"early"}
    assert found(client, "/fhir/Patient?_lastUpdated=gt2000-01-01") == {"early", "late"}
    assert found(client, "/fhir/Patient?_lastUpdated=2999") == set()
    assert_outcome(client.get("/fhir/Patient?_lastUpdated=soon"), 400)


# --------------------------------------------------------------------------- number and quantity


@pytest.fixture
def numbers(client: TestClient) -> TestClient:
    put(client, patient("subj"))
    for rid, prob in (("r25", 0.25), ("r70", 0.7), ("r80", 0.8)):
        put(client, {"resourceType": "RiskAssessment", "id": rid, "status": "final",
                     "subject": {"reference": "Patient/subj"}, "prediction": [{"probabilityDecimal": prob}]})
    put(client, {"resourceType": "RiskAssessment", "id": "rng", "status": "final",
                 "subject": {"reference": "Patient/subj"},
                 "prediction": [{"probabilityRange": {"low": {"value": 0.1}, "high": {"value": 0.9}}}]})
    return client


NUMBER_CASES = [
    ("0.7", {"r70"}),
    ("0.70", {"r70"}),
    ("0.25", {"r25"}),
    ("1", {"r70", "r80"}),  # implicit precision: 1 means [0.5, 1.5)
    ("7e-1", {"r70"}),
    ("gt0.5", {"r70", "r80"}),
    ("lt0.5", {"r25"}),
    ("ge0.7", {"r70", "r80"}),
    ("le0.7", {"r25", "r70"}),
    ("ne0.7", {"r25", "r80"}),
    ("sa0.7", {"r80"}),
    ("eb0.7", {"r25"}),
    ("ap0.75", {"r70", "r80"}),
    ("0.25,0.8", {"r25", "r80"}),
    ("gt0.9", set()),
]


def test_number_search(numbers: TestClient) -> None:
    check_cases(numbers, "/fhir/RiskAssessment", NUMBER_CASES, "probability")
    assert found(numbers, "/fhir/RiskAssessment?probability:missing=true") == {"rng"}
    for value in ("abc", "NaN", "Infinity", "1e999", "gt", "0.5.1", "0x10", "1,"):
        assert_outcome(numbers.get("/fhir/RiskAssessment", params={"probability": value}), 400)


@pytest.fixture
def quantities(client: TestClient) -> TestClient:
    def obs(rid: str, quantity: JSON) -> None:
        put(client, observation(rid, valueQuantity=quantity))

    obs("q54", {"value": 5.4, "unit": "mg", "system": UCUM, "code": "mg"})
    obs("q6", {"value": 6, "unit": "mg", "system": UCUM, "code": "mg"})
    obs("q7g", {"value": 7, "unit": "g", "system": UCUM, "code": "g"})
    obs("q10", {"value": 10, "unit": "mg"})
    put(client, observation("text", valueString="không đo được"))
    return client


QUANTITY_CASES = [
    (f"gt5.4|{UCUM}|mg", {"q6"}),
    ("gt5.4||mg", {"q6", "q10"}),
    ("5.4", {"q54"}),
    (f"5.4|{UCUM}|mg", {"q54"}),
    (f"5.4|{UCUM}|g", set()),
    (f"le7|{UCUM}|g", {"q7g"}),
    (f"lt7|{UCUM}|g", set()),
    ("lt7", {"q54", "q6"}),
    ("ge6", {"q6", "q7g", "q10"}),
    ("ne6", {"q54", "q7g", "q10"}),
    ("6||mg,7||g", {"q6", "q7g"}),
]


def test_quantity_search(quantities: TestClient) -> None:
    check_cases(quantities, "/fhir/Observation", QUANTITY_CASES, "value-quantity")
    assert_outcome(quantities.get("/fhir/Observation", params={"value-quantity": "abc"}), 400)
    assert_outcome(quantities.get("/fhir/Observation", params={"value-quantity": "5|mg"}), 400)
    assert found(quantities, "/fhir/Observation?value-quantity:missing=true") == {"text"}
    assert found(quantities, "/fhir/Observation?value-string=khong do") == {"text"}


# --------------------------------------------------------------------------- uri


def test_uri_search(client: TestClient) -> None:
    base = "http://example.org/fhir/ValueSet/"
    for rid, url in (("vs1", base + "dan-toc"), ("vs2", base + "dan-toc-mo-rong"),
                     ("vs3", "http://other.org/ValueSet/x")):
        put(client, {"resourceType": "ValueSet", "id": rid, "status": "active", "url": url})
    put(client, {"resourceType": "ValueSet", "id": "nourl", "status": "draft"})
    assert found(client, f"/fhir/ValueSet?url={base}dan-toc") == {"vs1"}
    assert found(client, f"/fhir/ValueSet?url={base}DAN-TOC") == set()
    assert found(client, "/fhir/ValueSet?url=http://example.org") == set()
    assert found(client, "/fhir/ValueSet?url:below=http://example.org/fhir/") == {"vs1", "vs2"}
    assert found(client, f"/fhir/ValueSet?url:above={base}dan-toc/version/2") == {"vs1"}
    assert found(client, f"/fhir/ValueSet?url={base}dan-toc,http://other.org/ValueSet/x") == {"vs1", "vs3"}
    assert found(client, "/fhir/ValueSet?url:missing=true") == {"nourl"}

    profile = "http://fhir.moh.gov.vn/StructureDefinition/vn-patient"
    put(client, patient("prof", meta={"profile": [profile]}))
    put(client, patient("plain"))
    assert found(client, f"/fhir/Patient?_profile={profile}") == {"prof"}
    assert found(client, f"/fhir/Patient?_profile={profile}-other") == set()


# --------------------------------------------------------------------------- reference and chains


@pytest.fixture
def refs(client: TestClient) -> TestClient:
    put(client, {"resourceType": "Organization", "id": "bm", "name": "Bệnh viện Bạch Mai"})
    put(client, {"resourceType": "Organization", "id": "cr", "name": "Bệnh viện Chợ Rẫy"})
    put(client, patient("px", "Nguyễn", ("An",), identifier=[{"system": SYS, "value": "CCCD-1"}]))
    put(client, patient("py", "Trần", ("Bình",), identifier=[{"system": SYS, "value": "CCCD-2"}]))
    put(client, {"resourceType": "Group", "id": "g1", "type": "person", "actual": True})
    put(client, {"resourceType": "Encounter", "id": "e1", "status": "finished", "class": {"code": "AMB"},
                 "subject": {"reference": "Patient/px"}, "serviceProvider": {"reference": "Organization/bm"}})
    put(client, {"resourceType": "Encounter", "id": "e2", "status": "finished", "class": {"code": "AMB"},
                 "subject": {"reference": "Patient/py"}, "serviceProvider": {"reference": "Organization/cr"}})
    put(client, observation("o1", subject={"reference": "Patient/px"}, encounter={"reference": "Encounter/e1"}))
    put(client, observation("o2", subject={"reference": "Patient/py"}, encounter={"reference": "Encounter/e2"}))
    put(client, observation("o3", subject={"reference": f"{BASE}/Patient/px"}))
    put(client, observation("o4", subject={"identifier": {"system": SYS, "value": "CCCD-9"}, "display": "Ẩn danh"}))
    put(client, observation("o5", subject={"reference": "Group/g1"}))
    put(client, observation("o6"))
    return client


REFERENCE_CASES = [
    ("patient=Patient/px", {"o1", "o3"}),
    ("patient=px", {"o1", "o3"}),
    ("subject=Patient/px", {"o1", "o3"}),
    ("subject=px", {"o1", "o3"}),
    ("subject:Patient=px", {"o1", "o3"}),
    (f"subject={BASE}/Patient/px", {"o1", "o3"}),
    ("subject:Group=px", set()),
    ("subject:Group=g1", {"o5"}),
    ("subject:Patient=g1", set()),
    ("patient=Patient/py", {"o2"}),
    ("patient=px,py", {"o1", "o2", "o3"}),
    (f"subject:identifier={SYS}|CCCD-9", {"o4"}),
    ("subject:identifier=CCCD-9", {"o4"}),
    (f"subject:identifier={SYS}|CCCD-1", set()),  # the identifier of the target, not of the reference
    ("subject:missing=true", {"o6"}),
    ("encounter=e1", {"o1"}),
    # chains
    (f"subject:Patient.identifier={SYS}|CCCD-1", {"o1", "o3"}),
    ("patient.name=nguyen", {"o1", "o3"}),
    ("patient.family:exact=Trần", {"o2"}),
    ("subject:Patient._id=py", {"o2"}),
    ("encounter.service-provider.name=benh vien bach", {"o1"}),
    (f"encounter:Encounter.subject:Patient.identifier={SYS}|CCCD-2", {"o2"}),
    ("encounter.service-provider.name=nowhere", set()),
]


def test_reference_and_chain_search(refs: TestClient) -> None:
    check_cases(refs, "/fhir/Observation?", REFERENCE_CASES)


def test_chain_ignores_deleted_targets_and_rejects_ambiguity(refs: TestClient) -> None:
    assert refs.delete("/fhir/Organization/bm").status_code in (200, 204)
    assert found(refs, "/fhir/Observation?encounter.service-provider.name=benh vien") == {"o2"}
    # `subject` may point at a Patient or a Location, both with `name`: the client must say which.
    assert_outcome(refs.get("/fhir/Observation?subject.name=nguyen"), 400)
    assert_outcome(refs.get("/fhir/Observation?status.name=x"), 400)
    assert_outcome(refs.get("/fhir/Observation?subject:Nope.name=x"), 400)
    assert_outcome(refs.get("/fhir/Observation?subject=Patient/has space"), 400)
    assert_outcome(refs.get("/fhir/Observation?subject=a/b/c"), 400)


def test_has_reverse_chain(refs: TestClient) -> None:
    assert found(refs, f"/fhir/Patient?_has:Observation:patient:code={LOINC}|2345-7") == {"px", "py"}
    assert found(refs, "/fhir/Patient?_has:Encounter:subject:service-provider=Organization/cr") == {"py"}
    assert found(refs, "/fhir/Patient?_has:Observation:subject:encounter=e1") == {"px"}
    assert found(refs, "/fhir/Patient?_has:Observation:patient:code=nope") == set()
    # A deleted referrer no longer counts.
    assert refs.delete("/fhir/Observation/o2").status_code in (200, 204)
    assert found(refs, "/fhir/Patient?_has:Observation:patient:code=2345-7") == {"px"}
    assert found(refs, "/fhir/Group?_has:Observation:subject:code=2345-7") == {"g1"}
    assert_outcome(refs.get("/fhir/Patient?_has:Nope:patient:code=x"), 400)
    assert_outcome(refs.get("/fhir/Patient?_has:Observation:code:status=final"), 400)
    assert_outcome(refs.get("/fhir/Patient?_has:Observation:patient=x"), 400)


# --------------------------------------------------------------------------- composite


def test_composite_search(client: TestClient) -> None:
    mgdl = {"unit": "mg/dL", "system": UCUM, "code": "mg/dL"}
    put(client, observation("c1", valueQuantity={"value": 6, **mgdl}))
    put(client, observation("c2", valueQuantity={"value": 4, **mgdl}))
    put(client, observation("c3", code="9999-9", valueQuantity={"value": 8, **mgdl}))

    def bp(rid: str, systolic: float, diastolic: float) -> JSON:
        mm = {"unit": "mmHg", "system": UCUM, "code": "mm[Hg]"}
        return observation(rid, code="85354-9", component=[
            {"code": {"coding": [{"system": LOINC, "code": "8480-6"}]}, "valueQuantity": {"value": systolic, **mm}},
            {"code": {"coding": [{"system": LOINC, "code": "8462-4"}]}, "valueQuantity": {"value": diastolic, **mm}},
        ])

    put(client, bp("b1", 120, 150))
    put(client, bp("b2", 150, 80))
    put(client, observation("cc", valueCodeableConcept={"coding": [{"system": "http://snomed.info/sct",
                                                                    "code": "260385009"}]}))
    search = "/fhir/Observation"
    assert found(client, search, params={"code-value-quantity": f"{LOINC}|2345-7$gt5"}) == {"c1"}
    assert found(client, search, params={"code-value-quantity": "2345-7$lt5"}) == {"c2"}
    assert found(client, search, params={"code-value-quantity": "2345-7$gt100"}) == set()
    assert found(client, search, params={"code-value-quantity": f"{LOINC}|9999-9$8|{UCUM}|mg/dL"}) == {"c3"}
    assert found(client, search, params={"code-value-quantity": "2345-7$gt5,9999-9$gt5"}) == {"c1", "c3"}
    # Components pair code and value of the same component, not any code with any value.
    cvq = "component-code-value-quantity"
    assert found(client, search, params={cvq: f"{LOINC}|8480-6$gt140"}) == {"b2"}
    assert found(client, search, params={cvq: f"{LOINC}|8462-4$gt140"}) == {"b1"}
    assert found(client, search, params={cvq: "8480-6$lt130"}) == {"b1"}
    assert found(client, search, params={"code-value-concept": "2345-7$http://snomed.info/sct|260385009"}) == {"cc"}
    assert_outcome(client.get(search, params={"code-value-quantity": "2345-7"}), 400)
    assert_outcome(client.get(search, params={"code-value-quantity": "2345-7$abc"}), 400)
    assert_outcome(client.get(search, params={"code-value-quantity": "a$b$c"}), 400)


def test_code_and_value_quantity_searched_as_their_composite_find_what_each_finds(client: TestClient) -> None:
    """`code=…&value-quantity=…` on Observation reads the code-value-quantity rows; it must find exactly the
    resources that both separate searches find, whatever the codings, value types and components."""
    mgdl = {"unit": "mg/dL", "system": UCUM, "code": "mg/dL"}
    two_codes = {"coding": [{"system": LOINC, "code": "2345-7"}, {"system": "http://acme.vn/xn", "code": "GLU"}]}
    put(client, observation("f1", valueQuantity={"value": 6, **mgdl}))
    put(client, observation("f2", code=two_codes, valueQuantity={"value": 9.5, **mgdl}))
    put(client, observation("f3", code="9999-9", valueQuantity={"value": 7, **mgdl}))
    put(client, observation("f4", valueQuantity={"value": 7, "unit": "mmol/L", "system": UCUM, "code": "mmol/L"}))
    put(client, observation("f5", valueQuantity={"value": 8, "unit": "mg/dL"}))  # no system, unit text only
    put(client, observation("f6", valueSampledData={"origin": {"value": 9, **mgdl}, "period": 1, "dimensions": 1,
                                                    "data": "9 9"}))
    put(client, observation("f7", code={"text": "đường huyết"}, valueQuantity={"value": 9, **mgdl}))
    put(client, observation("f8", code="85354-9", component=[
        {"code": {"coding": [{"system": LOINC, "code": "2345-7"}]}, "valueQuantity": {"value": 9, **mgdl}}]))
    put(client, observation("f9", valueString="cao"))
    codes = ["2345-7", f"{LOINC}|2345-7", "http://acme.vn/xn|GLU", "9999-9,2345-7", f"{LOINC}|", "|2345-7"]
    values = ["gt5", "lt8", "ge7|" + UCUM + "|mg/dL", "7", "le9.5||mg/dL", "gt5|" + UCUM + "|mmol/L", "gt100,lt6.5",
              "ap7"]
    search = "/fhir/Observation"
    nonempty = 0
    for code in codes:
        for value in values:
            both = found(client, search, params={"code": code, "value-quantity": value})
            each = found(client, search, params={"code": code}) & found(client, search, params={"value-quantity": value})
            assert both == each, (code, value)
            nonempty += bool(both)
    assert nonempty >= 20  # the grid is not vacuous


def test_code_and_value_quantity_use_the_paired_rows(client: TestClient) -> None:
    from sqlalchemy.dialects import sqlite

    from lienthong.fhir.search_params import registry
    from lienthong.fhir.search_query import QueryParser
    from lienthong.storage.search_sql import build_select

    parser = QueryParser(registry())

    def sql(params: list[tuple[str, str]]) -> str:
        query, _ = parser.parse("Observation", params)
        return str(build_select(query).compile(dialect=sqlite.dialect()))

    fused = sql([("code", "2345-7"), ("value-quantity", "gt5")])
    assert "sp_coded_quantity" in fused and "sp_quantity" not in fused and "sp_token" not in fused
    # A modifier, :missing or a chain keeps the separate criteria, which the paired rows cannot answer.
    assert "sp_coded_quantity" not in sql([("code:not", "2345-7"), ("value-quantity", "gt5")])
    assert "sp_coded_quantity" not in sql([("code", "2345-7"), ("value-quantity:missing", "false")])
    assert "sp_coded_quantity" not in sql([("code", "2345-7")])


def test_a_population_wide_code_walks_the_index_in_order_and_lists_each_resource_once(client: TestClient) -> None:
    from sqlalchemy.dialects import sqlite

    from lienthong.fhir.search_params import registry
    from lienthong.fhir.search_query import QueryParser
    from lienthong.storage.search_sql import build_select

    twice = {"coding": [{"system": LOINC, "code": "2345-7"}, {"system": LOINC, "code": "2345-7", "display": "Glu"}]}
    put(client, observation("d1", code=twice))
    put(client, observation("d2"))
    put(client, observation("d3", code="9999-9"))
    put(client, {"resourceType": "Condition", "id": "d4", "subject": {"reference": "Patient/x"},
                 "code": {"coding": [{"system": LOINC, "code": "2345-7"}]}})
    bundle = client.get("/fhir/Observation", params={"code": f"{LOINC}|2345-7", "_count": "1"}).json()
    assert bundle["total"] == 2
    ids = [bundle["entry"][0]["resource"]["id"]]
    while (nxt := next((x["url"] for x in bundle["link"] if x["relation"] == "next"), None)) is not None:
        bundle = client.get(nxt).json()
        ids += [e["resource"]["id"] for e in bundle["entry"]]
    assert ids == ["d1", "d2"]  # once each, in resource order, and no Condition with the same code

    parser = QueryParser(registry())

    def sql(params: list[tuple[str, str]]) -> str:
        query, _ = parser.parse("Observation", params)
        return str(build_select(query).compile(dialect=sqlite.dialect()))

    assert "DISTINCT" in sql([("code", f"{LOINC}|2345-7"), ("status", "final")])
    for scoped in ([("subject", "Patient/x")], [("_id", "d1")], [("_sort", "date")]):
        assert "DISTINCT" not in sql([("code", f"{LOINC}|2345-7"), *scoped]), scoped


# --------------------------------------------------------------------------- _id, _tag, _profile, _security


def test_id_tag_and_security(client: TestClient) -> None:
    tag = {"system": "http://lienthong.vn/tags", "code": "chuyen-vien"}
    put(client, patient("t1", meta={"tag": [tag], "security": [
        {"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"}]}))
    put(client, patient("t2", meta={"tag": [{"system": "http://lienthong.vn/tags", "code": "khac"}]}))
    put(client, patient("t3"))
    assert found(client, "/fhir/Patient?_id=t1") == {"t1"}
    assert found(client, "/fhir/Patient?_id=t1,t3,nope") == {"t1", "t3"}
    assert found(client, "/fhir/Patient?_id=nope") == set()
    assert found(client, "/fhir/Observation?_id=t1") == set()
    assert found(client, "/fhir/Patient?_tag=http://lienthong.vn/tags|chuyen-vien") == {"t1"}
    assert found(client, "/fhir/Patient?_tag=chuyen-vien") == {"t1"}
    assert found(client, "/fhir/Patient?_tag=http://lienthong.vn/tags|") == {"t1", "t2"}
    assert found(client, "/fhir/Patient?_tag:not=http://lienthong.vn/tags|chuyen-vien") == {"t2", "t3"}
    assert found(client, "/fhir/Patient?_tag:missing=true") == {"t3"}
    assert found(client, "/fhir/Patient?_security=R") == {"t1"}
    # System level: _id across all types.
    put(client, {"resourceType": "Organization", "id": "t1", "name": "Trùng id"})
    system = get_bundle(client, "/fhir?_id=t1")
    assert {(e["resource"]["resourceType"], e["resource"]["id"]) for e in system["entry"]} == {
        ("Patient", "t1"), ("Organization", "t1")}


# --------------------------------------------------------------------------- _include / _revinclude


@pytest.fixture
def graph(client: TestClient) -> TestClient:
    put(client, {"resourceType": "Practitioner", "id": "dr", "name": [{"family": "Lê", "given": ["Hoa"]}]})
    put(client, {"resourceType": "Practitioner", "id": "dr2", "name": [{"family": "Phạm"}]})
    put(client, {"resourceType": "Organization", "id": "org", "name": "Trạm y tế xã"})
    put(client, patient("pt", "Đỗ", ("Minh",)))
    put(client, patient("other", "Vũ"))
    put(client, {"resourceType": "Encounter", "id": "enc", "status": "finished", "class": {"code": "AMB"},
                 "subject": {"reference": "Patient/pt"}, "serviceProvider": {"reference": "Organization/org"},
                 "participant": [{"individual": {"reference": "Practitioner/dr"}}]})
    put(client, {"resourceType": "MedicationRequest", "id": "mr", "status": "active", "intent": "order",
                 "medicationCodeableConcept": {"text": "Paracetamol 500 mg"},
                 "subject": {"reference": "Patient/pt"}, "encounter": {"reference": "Encounter/enc"}})
    put(client, observation("obs", subject={"reference": "Patient/pt"}, encounter={"reference": "Encounter/enc"},
                            performer=[{"reference": "Practitioner/dr2"}]))
    put(client, {"resourceType": "Condition", "id": "cond", "subject": {"reference": "Patient/pt"}})
    put(client, {"resourceType": "Condition", "id": "cond-other", "subject": {"reference": "Patient/other"}})
    return client


def included(bundle: JSON) -> set[str]:
    return {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in bundle.get("entry", [])
            if e["search"]["mode"] == "include"}


def test_include_and_iterate(graph: TestClient) -> None:
    b = get_bundle(graph, "/fhir/MedicationRequest?_include=MedicationRequest:encounter")
    assert matches(b) == ["mr"] and included(b) == {"Encounter/enc"}
    assert b["total"] == 1, "included resources are not counted"
    b = get_bundle(graph, "/fhir/MedicationRequest?_include=MedicationRequest:encounter"
                          "&_include:iterate=Encounter:practitioner")
    assert matches(b) == ["mr"] and included(b) == {"Encounter/enc", "Practitioner/dr"}
    b = get_bundle(graph, "/fhir/MedicationRequest?_include=MedicationRequest:encounter"
                          "&_include:iterate=Encounter:practitioner&_include:iterate=Encounter:service-provider")
    assert included(b) == {"Encounter/enc", "Practitioner/dr", "Organization/org"}
    # Without :iterate, an include from another type is refused.
    assert_outcome(graph.get("/fhir/MedicationRequest?_include=Encounter:practitioner"), 400)
    assert_outcome(graph.get("/fhir/MedicationRequest?_include=MedicationRequest:status"), 400)
    assert_outcome(graph.get("/fhir/MedicationRequest?_include=Nope:encounter"), 400)
    assert_outcome(graph.get("/fhir/MedicationRequest?_include=MedicationRequest"), 400)


def test_include_target_type_and_wildcard(graph: TestClient) -> None:
    b = get_bundle(graph, "/fhir/Observation?_include=Observation:subject:Patient")
    assert included(b) == {"Patient/pt"}
    b = get_bundle(graph, "/fhir/Observation?_include=Observation:subject:Group")
    assert included(b) == set()
    b = get_bundle(graph, "/fhir/Observation?_include=Observation:*")
    assert included(b) == {"Patient/pt", "Encounter/enc", "Practitioner/dr2"}
    # A deleted target is not included.
    graph.delete("/fhir/Encounter/enc")
    b = get_bundle(graph, "/fhir/MedicationRequest?_include=MedicationRequest:encounter")
    assert matches(b) == ["mr"] and included(b) == set()


def test_revinclude_and_iterate(graph: TestClient) -> None:
    b = get_bundle(graph, "/fhir/Patient?_id=pt&_revinclude=Observation:subject")
    assert matches(b) == ["pt"] and included(b) == {"Observation/obs"}
    b = get_bundle(graph, "/fhir/Patient?_id=pt&_revinclude=Encounter:subject"
                          "&_include:iterate=Encounter:service-provider")
    assert included(b) == {"Encounter/enc", "Organization/org"}
    b = get_bundle(graph, f"/fhir/Observation?code={LOINC}|2345-7&_include=Observation:patient"
                          "&_revinclude:iterate=Condition:patient")
    assert matches(b) == ["obs"]
    assert included(b) == {"Patient/pt", "Condition/cond"}
    b = get_bundle(graph, "/fhir/Patient?_revinclude=Condition:subject")
    assert set(matches(b)) == {"pt", "other"}
    assert included(b) == {"Condition/cond", "Condition/cond-other"}
    b = get_bundle(graph, "/fhir/Practitioner?_id=dr&_revinclude=Encounter:practitioner"
                          "&_revinclude:iterate=MedicationRequest:encounter")
    assert included(b) == {"Encounter/enc", "MedicationRequest/mr"}
    # Every entry appears once even when reachable twice.
    ids = [f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in b["entry"]]
    assert len(ids) == len(set(ids))


# --------------------------------------------------------------------------- _sort


@pytest.fixture
def people(client: TestClient) -> TestClient:
    for rid, family, birth, gender in (("s1", "Trần", "1990-01-01", "male"), ("s2", "Nguyễn", "1985-06-01", "female"),
                                       ("s3", "Nguyễn", "1992-03-03", "male"), ("s4", "Lê", "1970-12-12", "female"),
                                       ("s5", "Bùi", "1985-06-01", "other")):
        put(client, patient(rid, family, birthDate=birth, gender=gender))
        time.sleep(0.002)
    return client


SORT_CASES = [
    ("family", ["s5", "s4", "s2|s3", "s2|s3", "s1"]),
    ("-family", ["s1", "s2|s3", "s2|s3", "s4", "s5"]),
    ("family,-birthdate", ["s5", "s4", "s3", "s2", "s1"]),
    ("family,birthdate", ["s5", "s4", "s2", "s3", "s1"]),
    ("birthdate", ["s4", "s2|s5", "s2|s5", "s1", "s3"]),
    ("-birthdate", ["s3", "s1", "s2|s5", "s2|s5", "s4"]),
    ("birthdate,-family", ["s4", "s2", "s5", "s1", "s3"]),
    ("-birthdate,family", ["s3", "s1", "s5", "s2", "s4"]),
    ("gender,-birthdate", ["s2", "s4", "s3", "s1", "s5"]),
    ("_id", ["s1", "s2", "s3", "s4", "s5"]),
    ("-_id", ["s5", "s4", "s3", "s2", "s1"]),
    ("-_lastUpdated", ["s5", "s4", "s3", "s2", "s1"]),
    ("_lastUpdated", ["s1", "s2", "s3", "s4", "s5"]),
]


def test_sort(people: TestClient) -> None:
    """Each slot lists the ids allowed there ('a|b' where the keys tie)."""
    failures = []
    for sort, expected in SORT_CASES:
        got = matches(get_bundle(people, f"/fhir/Patient?_sort={sort}"))
        if len(got) != len(expected) or any(rid not in allowed.split("|") for rid, allowed in zip(got, expected, strict=True)):
            failures.append(f"_sort={sort}: got {got}, expected {expected}")
        assert len(set(got)) == len(got)
    assert not failures, "\n".join(failures)


def test_sort_puts_missing_values_last_on_every_backend(people: TestClient) -> None:
    put(people, patient("s6", "Ân"))  # no birth date, no gender
    assert matches(get_bundle(people, "/fhir/Patient?_sort=birthdate"))[-1] == "s6"
    assert matches(get_bundle(people, "/fhir/Patient?_sort=-birthdate"))[-1] == "s6"
    assert matches(get_bundle(people, "/fhir/Patient?_sort=-gender,family"))[-1] == "s6"
    assert matches(get_bundle(people, "/fhir/Patient?_sort=family"))[0] == "s6"  # Ân folds to "an", first


def test_sort_across_pages_and_unsupported_keys(people: TestClient) -> None:
    ids, pages = walk(people, "/fhir/Patient?_sort=-birthdate,family&_count=2")
    assert ids == ["s3", "s1", "s5", "s2", "s4"]
    assert len(pages) == 3
    lenient = get_bundle(people, "/fhir/Patient?_sort=nonsense")
    assert len(matches(lenient)) == 5
    assert "_sort" not in lenient["link"][0]["url"]
    assert_outcome(people.get("/fhir/Patient?_sort=nonsense", headers={"Prefer": "handling=strict"}), 400)
    assert_outcome(people.get("/fhir/Patient?_sort=organization", headers={"Prefer": "handling=strict"}), 400)


# --------------------------------------------------------------------------- paging, totals, summary


def test_paging_links_and_walk(client: TestClient) -> None:
    for i in range(7):
        put(client, patient(f"pg{i}", "Phan", gender="female"))
    put(client, patient("male", "Phan", gender="male"))
    first = get_bundle(client, "/fhir/Patient?gender=female&_count=3")
    assert first["total"] == 7 and len(matches(first)) == 3
    assert link(first, "self") and link(first, "next") and not link(first, "previous")
    for item in first["link"]:
        assert item["url"].startswith(BASE)
    second = get_bundle(client, link(first, "next") or "")
    assert second["total"] == 7 and len(matches(second)) == 3
    assert link(second, "previous") and link(second, "next")
    assert matches(get_bundle(client, link(second, "previous") or "")) == matches(first)
    assert matches(get_bundle(client, link(second, "self") or "")) == matches(second)
    third = get_bundle(client, link(second, "next") or "")
    assert len(matches(third)) == 1 and not link(third, "next") and link(third, "previous")
    ids, pages = walk(client, "/fhir/Patient?gender=female&_count=3")
    assert sorted(ids) == [f"pg{i}" for i in range(7)] and len(pages) == 3
    ids, _ = walk(client, "/fhir/Patient?gender=female&_count=1")
    assert sorted(ids) == [f"pg{i}" for i in range(7)]
    ids, pages = walk(client, "/fhir/Patient?gender=female&_count=7")
    assert len(ids) == 7 and len(pages) == 1
    ids, _ = walk(client, "/fhir/Patient?_count=5000")
    assert len(ids) == 8
    assert_outcome(client.get("/fhir/Patient?_count=abc"), 400)
    assert_outcome(client.get("/fhir/Patient?_count=-1"), 400)
    r = client.get("/fhir?_getpages=0123456789abcdef0123456789abcdef&_offset=0&_count=3")
    assert_outcome(r, 410)
    assert_outcome(client.get("/fhir?_getpages=../../etc&_count=3"), 410)


def test_count_zero_returns_only_the_total(client: TestClient) -> None:
    for i in range(3):
        put(client, patient(f"z{i}"))
    b = get_bundle(client, "/fhir/Patient?_count=0")
    assert b.get("entry", []) == []
    assert b["total"] == 3
    assert link(b, "next") is None, "a page size of 0 has no next page"


def test_paging_is_stable_while_others_write(client: TestClient) -> None:
    original = {f"st{i}" for i in range(9)}
    for rid in sorted(original):
        put(client, patient(rid, "Hoàng", gender="female"))
    first = get_bundle(client, "/fhir/Patient?gender=female&_count=3&_sort=_id")
    assert first["total"] == 9
    seen = matches(first)
    assert seen == ["st0", "st1", "st2"]
    # Writers act between pages: new matches, an update, a delete, a matching resource that sorts first.
    put(client, patient("aa-new", "Hoàng", gender="female"))
    put(client, patient("zz-new", "Hoàng", gender="female"))
    put(client, patient("st5", "Hoàng", gender="female", birthDate="2000-01-01"))
    assert client.delete("/fhir/Patient/st7").status_code in (200, 204)
    assert client.delete("/fhir/Patient/st0").status_code in (200, 204)
    next_url = link(first, "next")
    while next_url:
        page = get_bundle(client, next_url)
        assert page["total"] == 9
        seen += matches(page)
        next_url = link(page, "next")
    assert len(seen) == len(set(seen)), f"duplicates: {seen}"
    assert set(seen) == original
    # A fresh search sees the new state.
    ids, _ = walk(client, "/fhir/Patient?gender=female&_count=3")
    assert set(ids) == (original - {"st0", "st7"}) | {"aa-new", "zz-new"}


def test_default_order_snapshot_is_continued_on_demand_without_repeats_or_skips(
        client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without _sort a snapshot holds the SNAPSHOT_FIRST ids read first and is continued from its last id
    (SNAPSHOT_CHUNK at a time) when a page needs more. Between pages: a new match, an update of a listed
    and of a not yet listed match, and a delete of a not yet listed one. Each match is listed once; the
    total appears once the end is known."""
    monkeypatch.setattr("lienthong.interactions.service.SNAPSHOT_CHUNK", 4)
    monkeypatch.setattr("lienthong.interactions.service.SNAPSHOT_FIRST", 4)
    original = [f"ch{i:02d}" for i in range(11)]
    for rid in original:
        put(client, patient(rid, "Chử", gender="male"))
    first = get_bundle(client, "/fhir/Patient?family=chu&_count=3")
    assert "total" not in first, "the total is not known before the end"
    seen = matches(first)
    assert seen == original[:3]
    put(client, patient("ch-new", "Chử", gender="male"))
    put(client, patient("ch00", "Chử", gender="male", birthDate="1990-01-01"))
    put(client, patient("ch09", "Chử", gender="male", birthDate="1991-01-01"))
    assert client.delete("/fhir/Patient/ch08").status_code in (200, 204)
    pages, next_url, last = 1, link(first, "next"), first
    while next_url:
        last = get_bundle(client, next_url)
        seen += matches(last)
        next_url, pages = link(last, "next"), pages + 1
    assert len(seen) == len(set(seen)), f"duplicates: {seen}"
    assert seen == [rid for rid in original if rid != "ch08"] + ["ch-new"]
    assert pages == 4
    assert last["total"] == len(seen)
    walked = get_bundle(client, link(last, "previous") or "")
    assert matches(walked) == seen[6:9], "earlier pages read back from the snapshot unchanged"


def test_sorted_snapshot_is_taken_whole(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lienthong.interactions.service.SNAPSHOT_CHUNK", 2)
    for i in range(7):
        put(client, patient(f"so{i}", "Sầm", gender="female"))
    first = get_bundle(client, "/fhir/Patient?family=sam&_count=2&_sort=-_id")
    assert first["total"] == 7
    ids, _ = walk(client, "/fhir/Patient?family=sam&_count=2&_sort=-_id")
    assert ids == [f"so{i}" for i in reversed(range(7))]


def test_total_and_summary(client: TestClient) -> None:
    for i in range(6):
        put(client, patient(f"tt{i}", "Đặng", gender="male" if i % 2 else "female",
                            text={"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">x</div>'},
                            contact=[{"name": {"family": "Mẹ"}}]))
    b = get_bundle(client, "/fhir/Patient?_total=accurate&_count=2")
    assert b["total"] == 6 and len(matches(b)) == 2
    b = get_bundle(client, "/fhir/Patient?gender=male&_total=accurate")
    assert b["total"] == 3
    b = get_bundle(client, "/fhir/Patient?_total=none&_count=2")
    assert "total" not in b
    b = get_bundle(client, "/fhir/Patient?gender=female&_summary=count")
    assert b["total"] == 3 and b.get("entry", []) == []
    assert "_summary=count" in (link(b, "self") or "")
    b = get_bundle(client, "/fhir/Patient?_summary=true&_count=10")
    assert len(b["entry"]) == 6
    for e in b["entry"]:
        assert "contact" not in e["resource"] and "text" not in e["resource"]
        assert {"code": "SUBSETTED", "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"} in \
            e["resource"]["meta"]["tag"]
    b = get_bundle(client, "/fhir/Patient?_elements=gender&_id=tt1")
    assert set(b["entry"][0]["resource"]) == {"resourceType", "id", "meta", "gender"}
    b = get_bundle(client, "/fhir/Patient?_summary=data&_id=tt1")
    assert "text" not in b["entry"][0]["resource"] and b["entry"][0]["resource"]["contact"]
    assert_outcome(client.get("/fhir/Patient?_total=maybe"), 400)
    assert_outcome(client.get("/fhir/Patient?_summary=all"), 400)


def test_post_search_with_form_body(names: TestClient) -> None:
    r = names.post("/fhir/Patient/_search", content=b"family=nguyen",
                   headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200, r.text
    assert set(matches(r.json())) == {"p1", "p3"}
    r = names.post("/fhir/Patient/_search", data={"name": "Nguyễn Văn An"})
    assert set(matches(r.json())) == {"p1"}
    r = names.post("/fhir/Patient/_search?family=nguyen", data={"given": "anna"})
    assert set(matches(r.json())) == {"p3"}
    self_link = link(r.json(), "self") or ""
    assert parse_qs(urlsplit(self_link).query) == {"family": ["nguyen"], "given": ["anna"]}
    r = names.post("/fhir/Patient/_search", data={"_count": "1", "family": "nguyen"})
    ids, _ = walk(names, link(r.json(), "next") or "")
    assert sorted([*matches(r.json()), *ids]) == ["p1", "p3"]
    assert_outcome(names.post("/fhir/Patient/_search", data={"birthdate": "nope"}), 400)


# --------------------------------------------------------------------------- lenient / strict


def test_unknown_parameters_lenient_and_strict(names: TestClient) -> None:
    b = get_bundle(names, "/fhir/Patient?family=nguyen&foo=bar&family:sounds-like=x&_elements=gender")
    assert set(matches(b)) == {"p1", "p3"}
    self_link = link(b, "self") or ""
    query = parse_qs(urlsplit(self_link).query)
    assert "foo" not in query and "family:sounds-like" not in query
    assert query["family"] == ["nguyen"]
    outcomes = [e["resource"] for e in b["entry"] if e["search"]["mode"] == "outcome"]
    assert len(outcomes) == 1 and outcomes[0]["resourceType"] == "OperationOutcome"
    assert {i["severity"] for i in outcomes[0]["issue"]} == {"warning"}
    assert "foo" in str(outcomes[0]) and "sounds-like" in str(outcomes[0])
    strict = {"Prefer": "handling=strict"}
    body = assert_outcome(names.get("/fhir/Patient?family=nguyen&foo=bar", headers=strict), 400)
    assert "foo" in body["issue"][0]["diagnostics"]
    assert_outcome(names.get("/fhir/Patient?family:sounds-like=x", headers=strict), 400)
    assert_outcome(names.get("/fhir?foo=bar", headers=strict), 400)
    assert get_bundle(names, "/fhir/Patient?family=nguyen", headers={"Prefer": "handling=lenient"})
    # An invalid value of a known parameter is an error in both modes.
    assert_outcome(names.get("/fhir/Patient?birthdate=someday"), 400)
    assert_outcome(names.get("/fhir/Patient?family:missing=maybe"), 400)
    assert_outcome(names.get("/fhir/NotAType?name=x"), 404)


def test_system_search_honours_type(client: TestClient) -> None:
    client.post("/fhir/Patient", json={"resourceType": "Patient"})
    client.post("/fhir/Organization", json={"resourceType": "Organization", "name": "Trạm Y tế"})
    r = client.get("/fhir", params={"_type": "Patient"})
    assert r.status_code == 200
    assert {e["resource"]["resourceType"] for e in r.json()["entry"]} == {"Patient"}
    assert client.get("/fhir", params={"_type": "NoSuchType"}).status_code == 404
