"""Transaction reference rewriting on the serialised bytes: the `bytes.find` scan against a regex.

The regex below is the definition of what gets rewritten (exact `"reference":"..."` pairs, escapes
honoured); the server scans with `bytes.find`, which is cheaper. Both must agree on any JSON,
including values full of quotes and backslashes and keys that merely end in `reference`.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import synthea_files
from lienthong.interactions.bundles import _rewrite_refs

_REF_RE = re.compile(rb'"reference":"((?:[^"\\]|\\.)*)"')


def regex_rewrite(resource: dict[str, Any], resolve: Any) -> dict[str, Any]:
    raw = orjson.dumps(resource)
    if b'"reference":' not in raw:
        return resource

    def swap(match: re.Match[bytes]) -> bytes:
        old = orjson.loads(b'"' + match.group(1) + b'"')
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
def test_find_scan_agrees_with_regex(value: Any) -> None:
    resource = {"resourceType": "Observation", "subject": {"reference": "urn:uuid:1"}, "x": value}
    assert _rewrite_refs(resource, resolve) == regex_rewrite(resource, resolve)


def test_synthea_references() -> None:
    for path in synthea_files()[:5]:
        for entry in orjson.loads(path.read_bytes())["entry"]:
            resource = entry["resource"]
            assert _rewrite_refs(resource, resolve) == regex_rewrite(resource, resolve)
