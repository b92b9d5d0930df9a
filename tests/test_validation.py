"""Tests for the R4 structural validator: real data passes, each error kind is located exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lienthong.fhir.validation import Issue, Validator, validate, validator

SHARED = Path(__file__).resolve().parents[2] / "shared"
SYNTHEA = SHARED / "samples" / "synthea-r4"

DAR = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"
CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"


def found(resource: object, expected_type: str | None = None) -> set[tuple[str, str, str]]:
    """The (severity, code, location) triples reported, for exact comparison."""
    return {(i.severity, i.code, i.location) for i in validate(resource, expected_type)}


def obs(**extra: Any) -> dict[str, Any]:
    return {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, **extra}


def patient(**extra: Any) -> dict[str, Any]:
    return {"resourceType": "Patient", **extra}


def err(code: str, location: str) -> tuple[str, str, str]:
    return ("error", code, location)


# --------------------------------------------------------------------------- real data


def _bundles() -> list[dict[str, Any]]:
    files = sorted(SYNTHEA.glob("*.json")) if SYNTHEA.is_dir() else []
    if not files:
        pytest.skip(f"Synthea samples not found at {SYNTHEA} (shared/ is laid beside the checkout)")
    return [orjson.loads(f.read_bytes()) for f in files]


def test_synthea_samples_are_valid() -> None:
    bundles = _bundles()
    count = 0
    for bundle in bundles:
        assert validate(bundle) == [], bundle["entry"][0]["fullUrl"]
        for entry in bundle["entry"]:
            resource = entry["resource"]
            assert validate(resource, resource["resourceType"]) == []
            count += 1
    assert count > 1000


def test_minimal_resources_are_valid() -> None:
    assert validate(patient()) == []
    assert validate(obs()) == []
    assert validate({"resourceType": "Bundle", "type": "collection"}) == []


def test_validator_is_compiled_once() -> None:
    assert validator() is validator()
    assert isinstance(validator(), Validator)


def test_issue_shape() -> None:
    (issue,) = validate(patient(gender="m"))
    assert isinstance(issue, Issue)
    assert issue.severity == "error"
    assert issue.code == "code-invalid"
    assert issue.location == "Patient.gender"
    assert "'m'" in issue.message and "administrative-gender" in issue.message


# --------------------------------------------------------------------------- resourceType


@pytest.mark.parametrize(
    ("resource", "expected_type", "expected"),
    [
        ({"resourceType": "Foo"}, None, err("not-supported", "Resource.resourceType")),
        ({"resourceType": "DomainResource"}, None, err("not-supported", "Resource.resourceType")),
        ({"id": "x"}, None, err("required", "Resource.resourceType")),
        ({"resourceType": 5}, "Patient", err("structure", "Patient.resourceType")),
        ([patient()], None, err("structure", "Resource")),
        ("Patient", None, err("structure", "Resource")),
        (None, "Patient", err("structure", "Patient")),
        (patient(), "Observation", err("invalid", "Patient.resourceType")),
    ],
)
def test_resource_type(resource: object, expected_type: str | None, expected: tuple[str, str, str]) -> None:
    assert found(resource, expected_type) == {expected}


# --------------------------------------------------------------------------- structure


@pytest.mark.parametrize(
    ("resource", "expected"),
    [
        # unknown elements, at any depth
        (patient(foo=1), {err("structure", "Patient.foo")}),
        (patient(name=[{"family": "A", "foo": "b"}]), {err("structure", "Patient.name[0].foo")}),
        (patient(resourceTyp="Patient"), {err("structure", "Patient.resourceTyp")}),
        (patient(name=[{"resourceType": "HumanName"}]), {err("structure", "Patient.name[0].resourceType")}),
        # cardinality: array where single, single where array
        (patient(gender=["male"]), {err("structure", "Patient.gender")}),
        (patient(maritalStatus=[{"text": "x"}]), {err("structure", "Patient.maritalStatus")}),
        (patient(name={"family": "A"}), {err("structure", "Patient.name")}),
        (patient(name=[{"given": "A"}]), {err("structure", "Patient.name[0].given")}),
        # empty objects, arrays, strings and nulls
        (patient(name=[]), {err("structure", "Patient.name")}),
        (patient(maritalStatus={}), {err("structure", "Patient.maritalStatus")}),
        (patient(name=[{}]), {err("structure", "Patient.name[0]")}),
        (patient(gender=None), {err("structure", "Patient.gender")}),
        (patient(name=[None]), {err("structure", "Patient.name[0]")}),
        (patient(name=[{"family": ""}]), {err("value", "Patient.name[0].family")}),
        # object where primitive and vice versa
        (patient(birthDate={"value": "2000"}), {err("structure", "Patient.birthDate")}),
        (patient(maritalStatus="M"), {err("structure", "Patient.maritalStatus")}),
        (patient(name=[["A"]]), {err("structure", "Patient.name[0]")}),
    ],
)
def test_structure(resource: dict[str, Any], expected: set[tuple[str, str, str]]) -> None:
    assert found(resource) == expected


@pytest.mark.parametrize(
    ("resource", "expected"),
    [
        ({"resourceType": "Observation", "status": "final"}, {err("required", "Observation.code")}),
        (
            {"resourceType": "Observation"},
            {err("required", "Observation.status"), err("required", "Observation.code")},
        ),
        # in backbone elements
        (patient(link=[{"type": "seealso"}]), {err("required", "Patient.link[0].other")}),
        # in datatypes
        (patient(extension=[{"valueString": "x"}]), {err("required", "Patient.extension[0].url")}),
        (patient(text={"status": "generated"}), {err("required", "Patient.text.div")}),
        # a required choice
        (
            {
                "resourceType": "MedicationRequest",
                "status": "active",
                "intent": "order",
                "subject": {"display": "A"},
            },
            {err("required", "MedicationRequest.medication[x]")},
        ),
        # a required primitive present only through its extension is present
        (obs(status=None) | {"_status": {"extension": [{"url": DAR, "valueCode": "unknown"}]}}, set()),
    ],
)
def test_required(resource: dict[str, Any], expected: set[tuple[str, str, str]]) -> None:
    resource = {k: v for k, v in resource.items() if v is not None}
    assert found(resource) == expected


def test_required_choice_satisfied() -> None:
    med = {
        "resourceType": "MedicationRequest",
        "status": "active",
        "intent": "order",
        "subject": {"reference": "Patient/1"},
        "medicationCodeableConcept": {"text": "paracetamol"},
    }
    assert found(med) == set()


# --------------------------------------------------------------------------- primitives


@pytest.mark.parametrize(
    ("resource", "location"),
    [
        (patient(birthDate="2021-13-01"), "Patient.birthDate"),
        (patient(birthDate="2021-02-30"), "Patient.birthDate"),
        (patient(birthDate="2021-02-29"), "Patient.birthDate"),
        (patient(birthDate="21-02-01"), "Patient.birthDate"),
        (patient(birthDate="2021-02-01T10:00:00Z"), "Patient.birthDate"),
        (patient(deceasedDateTime="2021-04-31"), "Patient.deceasedDateTime"),
        (patient(deceasedDateTime="2021-01-01T10:00:00"), "Patient.deceasedDateTime"),  # no time zone
        (obs(issued="2021-01-01"), "Observation.issued"),  # instant needs a time
        (obs(valueTime="25:00:00"), "Observation.valueTime"),
        (obs(valueQuantity={"value": "1.5"}), "Observation.valueQuantity.value"),
        (obs(valueQuantity={"value": True}), "Observation.valueQuantity.value"),
        (patient(active="true"), "Patient.active"),
        (patient(active=1), "Patient.active"),
        (patient(multipleBirthInteger="2"), "Patient.multipleBirthInteger"),
        (patient(multipleBirthInteger=2.5), "Patient.multipleBirthInteger"),
        (patient(multipleBirthInteger=2**31), "Patient.multipleBirthInteger"),
        (patient(photo=[{"size": -1}]), "Patient.photo[0].size"),  # unsignedInt
        (
            obs(valueSampledData={"origin": {"value": 0}, "period": 1, "dimensions": 0}),
            "Observation.valueSampledData.dimensions",
        ),
        (patient(id="a_b"), "Patient.id"),
        (patient(id="x" * 65), "Patient.id"),
        (patient(id=""), "Patient.id"),
        (patient(id=7), "Patient.id"),
        (patient(name=[{"given": ["A", 3]}]), "Patient.name[0].given[1]"),
        (patient(telecom=[{"system": "phone", "value": 912345678}]), "Patient.telecom[0].value"),
        (patient(implicitRules="http://a b"), "Patient.implicitRules"),  # uri has no spaces
        (patient(language=" vi"), "Patient.language"),  # code: no leading whitespace
        (patient(text={"status": "generated", "div": "plain text"}), "Patient.text.div"),
    ],
)
def test_primitive_errors(resource: dict[str, Any], location: str) -> None:
    assert found(resource) == {err("value", location)}


@pytest.mark.parametrize(
    "resource",
    [
        patient(birthDate="2020-02-29"),
        patient(birthDate="2000"),
        patient(birthDate="2000-02"),
        patient(deceasedDateTime="2021-01-01T10:00:00+07:00"),
        patient(deceasedDateTime="2021-01-01T10:00:00.123Z"),
        obs(issued="2021-01-01T10:00:00Z", valueQuantity={"value": 1}),
        obs(valueQuantity={"value": -0.5e-3}),
        patient(id="A-b.9" + "x" * 59),
        patient(name=[{"family": "Nguyễn", "given": ["Thị\u00a0Minh", "Khai"]}]),
        patient(text={"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">x</div>'}),
    ],
)
def test_primitive_valid(resource: dict[str, Any]) -> None:
    assert found(resource) == set()


def test_whitespace_only_string_is_a_warning() -> None:
    assert found(patient(name=[{"family": "  "}])) == {("warning", "value", "Patient.name[0].family")}


# --------------------------------------------------------------------------- bindings


@pytest.mark.parametrize(
    ("resource", "location"),
    [
        (patient(gender="m"), "Patient.gender"),
        (obs(status="bogus"), "Observation.status"),
        (patient(name=[{"use": "nickname", "family": "A"}, {"use": "Official"}]), "Patient.name[1].use"),
        (patient(telecom=[{"system": "zalo", "value": "0912"}]), "Patient.telecom[0].system"),
        (obs(valueQuantity={"value": 1, "comparator": "=="}), "Observation.valueQuantity.comparator"),
        (
            {
                "resourceType": "Condition",
                "subject": {"reference": "Patient/1"},
                "clinicalStatus": {"coding": [{"system": CLINICAL, "code": "bogus"}]},
            },
            "Condition.clinicalStatus",
        ),
        (
            {
                "resourceType": "Condition",
                "subject": {"reference": "Patient/1"},
                "clinicalStatus": {"coding": [{"system": "http://snomed.info/sct", "code": "55561003"}]},
            },
            "Condition.clinicalStatus",
        ),
    ],
)
def test_required_binding(resource: dict[str, Any], location: str) -> None:
    assert found(resource) == {err("code-invalid", location)}


def test_required_binding_accepts_nested_and_extra_codings() -> None:
    condition = {
        "resourceType": "Condition",
        "subject": {"reference": "Patient/1"},
        "clinicalStatus": {
            "coding": [
                {"system": "http://snomed.info/sct", "code": "55561003"},
                {"system": CLINICAL, "code": "remission"},  # a child of "inactive"
            ]
        },
    }
    assert found(condition) == set()


def test_unexpandable_binding_is_not_checked() -> None:
    # Attachment.contentType is bound (required) to BCP-13 mime types, which the package
    # cannot enumerate: the validator must not guess.
    assert found(patient(photo=[{"contentType": "image/x-anything"}])) == set()


# --------------------------------------------------------------------------- choice types


def test_choice_types() -> None:
    assert found(obs(valueQuantity={"value": 1, "unit": "kg"})) == set()
    assert found(obs(valueFoo=1)) == {err("structure", "Observation.valueFoo")}
    assert found(obs(value="x")) == {err("structure", "Observation.value")}
    assert found(obs(valueString="a", valueBoolean=True)) == {err("structure", "Observation.valueBoolean")}
    assert found(patient(deceasedBoolean="yes")) == {err("value", "Patient.deceasedBoolean")}
    (issue,) = validate(obs(valueFoo=1))
    assert "valueQuantity" in issue.message


# --------------------------------------------------------------------------- nesting


def test_bundle_entry_locations() -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": patient()},
            {"resource": obs(), "request": {"method": "POST", "url": "Observation"}},
            {"resource": obs(subject=[{"reference": "Patient/1"}])},
            {"resource": {"resourceType": "Foo"}},
            {"resource": obs(status="bogus"), "request": {"method": "PATCH!", "url": "x"}},
            {"link": [{"relation": "self"}]},  # Bundle.entry.link reuses Bundle.link
        ],
    }
    assert found(bundle) == {
        err("structure", "Bundle.entry[2].resource.subject"),
        err("not-supported", "Bundle.entry[3].resource.resourceType"),
        err("code-invalid", "Bundle.entry[4].resource.status"),
        err("code-invalid", "Bundle.entry[4].request.method"),
        err("required", "Bundle.entry[5].link[0].url"),
    }


def test_contained_resources() -> None:
    resource = patient(
        contained=[
            {"resourceType": "Practitioner", "id": "p1", "active": "yes"},
            {"resourceType": "Organization", "id": "o1", "name": "Bệnh viện Đa khoa tỉnh Bắc Giang"},
            {"id": "x"},
            "Practitioner",
        ]
    )
    assert found(resource) == {
        err("value", "Patient.contained[0].active"),
        err("required", "Patient.contained[2].resourceType"),
        err("structure", "Patient.contained[3]"),
    }


def test_parameters_resource() -> None:
    params = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "a", "resource": patient(gender="x")},
            {"name": "b", "part": [{"name": "c", "valueBoolean": "no"}]},  # part reuses parameter
        ],
    }
    assert found(params) == {
        err("code-invalid", "Parameters.parameter[0].resource.gender"),
        err("value", "Parameters.parameter[1].part[0].valueBoolean"),
    }


def test_content_reference_recursion() -> None:
    questionnaire = {
        "resourceType": "Questionnaire",
        "status": "draft",
        "item": [{"linkId": "1", "type": "group", "item": [{"linkId": "1.1", "type": "string", "foo": 1}]}],
    }
    assert found(questionnaire) == {err("structure", "Questionnaire.item[0].item[0].foo")}


# --------------------------------------------------------------------------- primitive extensions


def test_primitive_extension_sibling() -> None:
    absent = {"extension": [{"url": DAR, "valueCode": "unknown"}]}
    assert found(patient(_birthDate=absent)) == set()
    assert found(patient(birthDate="2000", _birthDate={"id": "b"})) == set()
    assert found(patient(_birthDate={"extension": [{"valueCode": "unknown"}]})) == {
        err("required", "Patient.birthDate.extension[0].url")
    }
    assert found(patient(_birthDate={"value": "2000"})) == {err("structure", "Patient.birthDate.value")}
    assert found(patient(_birthDate="2000")) == {err("structure", "Patient.birthDate")}
    assert found(patient(_birthDate={})) == {err("structure", "Patient.birthDate")}
    assert found(patient(_foo=absent)) == {err("structure", "Patient._foo")}
    assert found(patient(_name=absent)) == {err("structure", "Patient._name")}  # name is not primitive


def test_primitive_extension_arrays() -> None:
    absent = {"extension": [{"url": DAR, "valueCode": "unknown"}]}
    ok = {"given": [None, "B"], "_given": [absent, None]}
    assert found(patient(name=[ok])) == set()
    assert found(patient(name=[{"given": [None, "B"]}])) == {err("structure", "Patient.name[0].given[0]")}
    assert found(patient(name=[{"given": ["A", "B"], "_given": [absent]}])) == {
        err("structure", "Patient.name[0].given")
    }
    assert found(patient(name=[{"given": ["A", None], "_given": [None, None]}])) == {
        err("structure", "Patient.name[0].given[1]")
    }
    assert found(patient(name=[{"_given": [{"extension": [{"valueCode": "x"}]}]}])) == {
        err("required", "Patient.name[0].given[0].extension[0].url")
    }


# --------------------------------------------------------------------------- robustness


def test_deep_nesting_does_not_raise() -> None:
    ext: dict[str, Any] = {"url": "http://example.org/x", "valueString": "leaf"}
    for _ in range(3000):
        ext = {"url": "http://example.org/x", "extension": [ext]}
    assert found(patient(extension=[ext])) == {err("structure", "Patient")}


_NAMES = st.sampled_from(
    [
        "resourceType", "Patient", "Observation", "Bundle", "id", "name", "given", "_given", "family",
        "gender", "birthDate", "_birthDate", "extension", "url", "valueString", "valueQuantity", "value",
        "status", "code", "coding", "system", "entry", "resource", "contained", "text", "div", "item",
        "link", "active", "x",
    ]
)  # fmt: skip
_SCALARS = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8) | _NAMES
)
_JSON = st.recursive(
    _SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(_NAMES | st.text(max_size=4), children, max_size=5)
    ),
    max_leaves=30,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    resource_type=st.sampled_from(["Patient", "Observation", "Bundle", "Questionnaire", "Nope"]),
    body=st.dictionaries(_NAMES, _JSON, max_size=6),
    expected=st.sampled_from([None, "Patient"]),
)
def test_fuzz_never_raises(resource_type: str, body: dict[str, Any], expected: str | None) -> None:
    resource = {"resourceType": resource_type, **body}
    issues = validate(resource, expected)
    assert all(isinstance(i, Issue) and i.severity in ("error", "warning") for i in issues)


@settings(max_examples=100, deadline=None)
@given(anything=_JSON)
def test_fuzz_any_json_never_raises(anything: object) -> None:
    assert all(isinstance(i, Issue) for i in validate(anything))
