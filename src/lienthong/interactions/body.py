"""Parse request bodies defensively: malformed, oversized, absurdly nested or NUL-bearing JSON is a 400."""

from __future__ import annotations

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
    _check_depth(data)
    if b"\\u0000" in raw:  # rare: confirm with a walk (an escaped backslash before "u0000" is no NUL)
        _check_nul(data)
    return data


def parse_resource(raw: bytes) -> dict[str, Any]:
    data = parse_json(raw)
    if not isinstance(data, dict) or not isinstance(data.get("resourceType"), str):
        raise error(400, "invalid", "Thân yêu cầu không phải tài nguyên FHIR",
                    "Body is not a FHIR resource (no resourceType)")
    return data


def _check_depth(data: Any) -> None:
    stack = [(data, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise error(400, "too-costly", "JSON lồng quá sâu", f"JSON nested deeper than {MAX_DEPTH} levels")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values() if isinstance(v, dict | list))
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node if isinstance(v, dict | list))


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
