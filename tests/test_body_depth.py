"""The nesting limit measured on the request bytes agrees with a walk of the parsed JSON.

`parse_json` refuses JSON nested deeper than MAX_DEPTH; it measures that on the raw bytes (strings
removed, brackets kept) because walking the tree cost a tenth of bundle ingest. The walk below is
the definition; strings full of brackets, quotes and backslashes must not change the answer.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import synthea_files
from lienthong.fhir.outcome import FhirError
from lienthong.interactions.body import MAX_DEPTH, _too_deep, parse_json


def walked_too_deep(data: Any) -> bool:
    stack = [(data, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
        stack.extend((v, depth + 1) for v in children if isinstance(v, dict | list))
    return False


TRICKY = st.text(alphabet='[]{}"\\/u0a ,:', max_size=12)


def nested(levels: int, leaf: Any, kinds: list[bool]) -> Any:
    node = leaf
    for i in range(levels):
        node = {"k": node, "s": "}]"} if kinds[i % len(kinds)] else ["[{", node, "\\"]
    return node


@settings(max_examples=300, deadline=None)
@given(levels=st.integers(0, MAX_DEPTH + 3), leaf=st.one_of(TRICKY, st.integers(-1000, 1000), st.lists(TRICKY, max_size=3)),
       kinds=st.lists(st.booleans(), min_size=1, max_size=5), extra=st.lists(TRICKY, max_size=3))
def test_bytes_measure_agrees_with_walk(levels: int, leaf: Any, kinds: list[bool], extra: list[str]) -> None:
    data = {"resourceType": "Bundle", "deep": nested(levels, leaf, kinds), "extra": extra, "wide": [[]] * 70}
    raw = orjson.dumps(data)
    assert _too_deep(raw) == walked_too_deep(data)


@pytest.mark.parametrize("levels", [MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1])
def test_limit_is_exact(levels: int) -> None:
    raw = b"[" * levels + b"]" * levels  # the top level is depth 0: `levels` brackets reach depth levels - 1
    assert _too_deep(raw) == walked_too_deep(orjson.loads(raw)) == (levels - 1 > MAX_DEPTH)
    raw = b"[" * (levels + 1) + b"]" * (levels + 1)
    assert _too_deep(raw) == walked_too_deep(orjson.loads(raw)) == (levels > MAX_DEPTH)


def test_synthea_bundles_pass() -> None:
    for path in synthea_files()[:5]:
        raw = path.read_bytes()
        assert not _too_deep(raw) and not walked_too_deep(parse_json(raw))


def test_refused_with_400() -> None:
    with pytest.raises(FhirError) as exc:
        parse_json(b'{"a":' + b"[" * 100 + b"]" * 100 + b"}")
    assert exc.value.status == 400
