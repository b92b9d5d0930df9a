"""The fast search-parameter extraction gives exactly what the general FHIRPath step evaluator gives.

Indexing runs on every write, so `CompiledPath` walks plain element chains over the raw JSON and
looks choice elements up by their typed key (`valueQuantity`). These tests evaluate every search
parameter of every resource in the 30 Synthea bundles both ways, path by path and as whole index
rows, so a difference in any value, type, order or row fails here.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from conftest import synthea_files
from lienthong.fhir import definitions
from lienthong.fhir.paths import Node, compile_expression, compile_relative
from lienthong.fhir.search_params import SearchRegistry, registry


@pytest.fixture(scope="module")
def resources() -> list[dict[str, Any]]:
    out = []
    for path in synthea_files():
        bundle = orjson.loads(path.read_bytes())
        out.extend(e["resource"] for e in bundle.get("entry", []) if isinstance(e.get("resource"), dict))
    return out


@pytest.fixture(scope="module")
def reference() -> SearchRegistry:
    return SearchRegistry(definitions.load(), fast=False)


def _nodes(nodes: list[Node]) -> list[tuple[str, str | None]]:
    return [(orjson.dumps(n.value).decode(), n.type) for n in nodes]


def test_fast_paths_are_used(resources: list[dict[str, Any]]) -> None:
    """Guard against the fast paths silently switching off (the equality tests would still pass)."""
    params = [p for t in {r["resourceType"] for r in resources} for p in registry().params(t).values()]
    paths = [path for p in params for path in p.paths]
    assert sum(path.plain is not None for path in paths) > len(paths) // 2
    assert all(path.plain is None for path in compile_expression("Observation.subject | Observation.value",
                                                                  fast=False))


def test_every_path_same_nodes(resources: list[dict[str, Any]], reference: SearchRegistry) -> None:
    fast = registry()
    compared = 0
    for resource in resources:
        rtype = resource["resourceType"]
        for code, param in fast.params(rtype).items():
            ref_param = reference.get(rtype, code)
            assert ref_param is not None
            for path, ref_path in zip(param.paths, ref_param.paths, strict=True):
                expected = ref_path.evaluate(resource)
                assert _nodes(path.evaluate(resource)) == _nodes(expected), (rtype, code, param.expression)
                assert _nodes(path.evaluate_steps(resource)) == _nodes(expected), (rtype, code)
                compared += 1
            for node in (n for ref_path in ref_param.paths for n in ref_path.evaluate(resource)):
                for comp, ref_comp in zip(param.components, ref_param.components, strict=True):
                    assert _nodes(comp.evaluate(node)) == _nodes(ref_comp.evaluate(node)), (rtype, code, comp.code)
    assert compared > 100_000


def test_same_index_rows(resources: list[dict[str, Any]], reference: SearchRegistry) -> None:
    fast = registry()
    total = 0
    for resource in resources:
        got, expected = fast.extract(resource), reference.extract(resource)
        assert got == expected, resource["resourceType"]
        total += sum(len(getattr(got, kind)) for kind in vars(got))
    assert total > 100_000


@pytest.mark.parametrize("expr, value, expected", [
    # A bare `value` key is no choice element: the general steps decide (shape test for strings).
    ("value.as(string)", {"value": "x", "valueString": "y"}, [("x", "String")]),
    ("value.as(Quantity)", {"valueQuantity": {"value": 1}}, [({"value": 1}, "Quantity")]),
    ("value.ofType(Quantity)", {"valueQuantity": [{"value": 1}, {"value": 2}]},
     [({"value": 1}, "Quantity"), ({"value": 2}, "Quantity")]),
    ("value.as(dateTime)", {"valueDateTime": "2020"}, [("2020", "DateTime")]),
    ("code.coding", {"code": {"coding": [{"code": "a"}, None]}}, [({"code": "a"}, None), (None, None)]),
])
def test_relative_fast_matches_reference(expr: str, value: dict[str, Any], expected: list[Any]) -> None:
    for fast in (True, False):
        assert [(n.value, n.type) for n in compile_relative(expr, fast)(Node(value))] == expected


def test_where_resolve_on_raw_values() -> None:
    resource = {"resourceType": "Observation", "subject": {"reference": "Patient/1"},
                "performer": [{"reference": "Practitioner/2"}, {"reference": "https://x/fhir/Patient/3/_history/1"},
                              {"type": "Patient", "identifier": {"value": "4"}}, "junk"]}
    for expr in ("Observation.subject.where(resolve() is Patient)", "Observation.performer.where(resolve() is Patient)"):
        fast, = compile_expression(expr)
        ref, = compile_expression(expr, fast=False)
        assert fast.plain is not None and ref.plain is None
        assert _nodes(fast.evaluate(resource)) == _nodes(ref.evaluate(resource)) != []


def test_shape_cache_is_bounded_and_exact(resources: list[dict[str, Any]], reference: SearchRegistry) -> None:
    """The per-shape plan cache answers like the uncached walk for new key orders and odd keys,
    and stops growing at its bound (keys are the client's to choose)."""
    from lienthong.fhir.search_params import _MAX_SHAPES

    fresh = SearchRegistry(definitions.load())
    observation = next(r for r in resources if r["resourceType"] == "Observation")
    shuffled = dict(reversed(list(observation.items())))
    for i in range(_MAX_SHAPES + 50):
        variant = {**(shuffled if i % 2 else observation), f"x{i}": 1}
        assert fresh.extract(variant) == reference.extract(variant)
    assert len(fresh._plans["Observation"]._shapes) == _MAX_SHAPES
    assert fresh.extract(shuffled) == reference.extract(observation)


@pytest.mark.parametrize("resource", [
    {"resourceType": "Observation", "meta": {"versionId": "1"}},  # no source: the walk goes on
    {"resourceType": "Observation", "meta": {"sourceUri": "x"}},  # a typed key: the general steps decide
    {"resourceType": "Observation", "meta": [{"versionId": "1"}, {"sourceUri": "y"}, {"source": "z"}]},
])
def test_missing_choice_name_falls_back_only_for_typed_keys(resource: dict[str, Any]) -> None:
    fast, = compile_expression("Observation.meta.source")
    ref, = compile_expression("Observation.meta.source", fast=False)
    assert fast.plain is not None
    assert _nodes(fast.evaluate(resource)) == _nodes(ref.evaluate(resource))


@pytest.mark.parametrize("expr, keys", [
    ("(Observation.value as Quantity)", ("valueQuantity", "value")),
    ("(Observation.value as string)", ("valueString", "value")),
    ("Condition.onset.as(Age)", ("onsetAge", "onset")),
    ("(Observation.value as CodeableConcept).text", ("valueCodeableConcept", "value")),
    ("(Observation.component.value as Quantity)", None),  # the cast is not on a top-level element
    ("Observation.value", None),
    ("Observation.subject.where(resolve() is Patient)", None),
])
def test_first_keys_of_choice_casts(expr: str, keys: tuple[str, ...] | None) -> None:
    """A branch starting with a fused choice cast is evaluated only for resources holding its typed
    key (or a bare name, which the general steps handle); exactness over Synthea is checked above."""
    path, = compile_expression(expr)
    assert path.first_keys == keys
    assert compile_expression(expr, fast=False)[0].first_keys is None
    if keys:
        other = {"resourceType": path.root, keys[1] + "Period": {"start": "2020"}}
        assert path.evaluate(other) == []  # nothing to find without its keys
