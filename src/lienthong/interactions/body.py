"""Parse request bodies defensively: malformed, oversized, absurdly nested or NUL-bearing JSON is a 400."""

from __future__ import annotations

import re
from typing import Any

import orjson

from lienthong.fhir.outcome import error

MAX_DEPTH = 64  # FHIR resources nest a dozen levels at most; deeper is an attack or a bug


def parse_json(raw: bytes) -> Any:
    if not raw or not raw.strip():
        raise error(400, "invalid", "Thân yêu cầu rỗng", "Request body is empty")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise error(400, "invalid", "JSON không hợp lệ", f"Malformed JSON: {exc}") from None
    if _too_deep(raw):
        raise error(400, "too-costly", "JSON lồng quá sâu", f"JSON nested deeper than {MAX_DEPTH} levels")
    if b"\\u0000" in raw:  # rare: confirm with a walk (an escaped backslash before "u0000" is no NUL)
        _check_nul(data)
    return data


def parse_resource(raw: bytes) -> dict[str, Any]:
    data = parse_json(raw)
    if not isinstance(data, dict) or not isinstance(data.get("resourceType"), str):
        raise error(400, "invalid", "Thân yêu cầu không phải tài nguyên FHIR",
                    "Body is not a FHIR resource (no resourceType)")
    return data


_STRING = re.compile(rb'"[^"]*"')
_OPEN_CLOSE = bytes.maketrans(b"[{]}", b"(())")
_NOT_SHAPE = bytes(sorted(set(range(256)) - set(b'[]{}"')))


def _too_deep(raw: bytes) -> bool:
    """Whether valid JSON `raw` nests arrays/objects more than MAX_DEPTH levels below the top one.

    Why on the bytes: walking the parsed tree in Python cost a tenth of bundle ingest. Escapes are
    dropped, then everything but quotes and brackets (kept as parentheses). Dropping a pair of adjacent
    quotes either drops an empty string or joins two strings, so what is left between quotes is
    still string content, which goes next. Each `replace("()", "")` then removes exactly the
    innermost level: the text is empty after as many rounds as there are levels."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_DEPTH + 1:
        return False
    if b'\\"' in raw:  # an escaped quote (or an escaped backslash before a closing quote)
        raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    shape = raw.translate(_OPEN_CLOSE, _NOT_SHAPE).replace(b'""', b"")
    if b'"' in shape:  # strings holding brackets
        shape = _STRING.sub(b"", shape)
    for _ in range(MAX_DEPTH + 1):
        if not shape:
            return False
        shape = shape.replace(b"()", b"")
    return bool(shape)


def _check_nul(data: Any) -> None:
    """NUL is no text: FHIR strings SHOULD NOT hold control characters and PostgreSQL cannot store it."""
    stack = [data]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            if "\x00" in node:
                raise error(400, "invalid", "Chuỗi chứa ký tự NUL", "Strings may not contain the NUL character (\\u0000)")
        elif isinstance(node, dict):
            stack.extend(node)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
