"""Transaction reference rewriting: the copy-on-write walk against a regex over the serialised bytes.

The regex below is the definition of what gets rewritten (exact `"reference":"..."` pairs, escapes
honoured); the server walks the parsed containers instead, which is cheaper. Both must agree on
any JSON, including values full of quotes and backslashes and keys that merely end in
`reference`, and the walk must leave its input as it was.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import synthea_files
from lienthong.interactions.bundles import _rewrite_refs

# Every JSON string is consumed whole, left to right, so a match starts only at a real string start
# (never at an escaped quote inside a key such as `x"reference`); group 1 is the value of a key
# that is exactly "reference".
_REF_RE = re.compile(rb'"reference":("(?:[^"\\]|\\.)*")|"(?:[^"\\]|\\.)*"')


def regex_rewrite(resource: dict[str, Any], resolve: Any) -> dict[str, Any]:
    raw = orjson.dumps(resource)
    if b'"reference":' not in raw:
        return resource

    def swap(match: re.Match[bytes]) -> bytes:
        if match.group(1) is None:
            return match.group(0)
        old = orjson.loads(match.group(1))
        new = resolve(old)
        return match.group(0) if new == old else b'"reference":' + orjson.dumps(new)

    return dict(orjson.loads(_REF_RE.sub(swap, raw)))


def resolve(ref: str) -> str:
    return f"Patient/{len(ref)}" if ref.startswith(("urn:", "x")) else ref


TEXT = st.text(alphabet='xurn:"\\/é\n reference', max_size=10)
VALUE = st.recursive(
    st.one_of(TEXT, st.integers(-5, 5), st.none()),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["reference", "x\"reference", "display", "ref"]), inner, max_size=3),
        st.builds(lambda v: {"reference": v}, TEXT)),
    max_leaves=12)


@settings(max_examples=400, deadline=None)
@given(VALUE)
def test_walk_agrees_with_regex(value: Any) -> None:
    resource = {"resourceType": "Observation", "subject": {"reference": "urn:uuid:1"}, "x": value}
    before = orjson.dumps(resource)
    assert _rewrite_refs(resource, resolve) == regex_rewrite(resource, resolve)
    assert orjson.dumps(resource) == before


def test_unchanged_parts_are_shared() -> None:
    code = {"coding": [{"code": "x"}]}
    resource = {"resourceType": "Observation", "code": code, "subject": {"reference": "urn:uuid:1"}}
    out = _rewrite_refs(resource, resolve)
    assert out["subject"] == {"reference": "Patient/10"} and resource["subject"] == {"reference": "urn:uuid:1"}
    assert out["code"] is code
    assert _rewrite_refs(code, resolve) is code


def test_synthea_references() -> None:
    for path in synthea_files():
        for entry in orjson.loads(path.read_bytes())["entry"]:
            resource = entry["resource"]
            assert orjson.dumps(_rewrite_refs(resource, resolve)) == orjson.dumps(regex_rewrite(resource, resolve))
