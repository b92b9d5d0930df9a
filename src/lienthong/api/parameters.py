"""FHIR Parameters in and out of operations: one reading and one writing of the format for every endpoint."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson

from lienthong.fhir.outcome import error


def _entries(payload: Any) -> Iterator[tuple[str, Any]]:
    """(name, value) of each parameter; a Reference gives its reference, a bool its FHIR spelling."""
    if not isinstance(payload, dict) or payload.get("resourceType") != "Parameters":
        raise error(400, "invalid", "Cần tài nguyên Parameters", "Expected a Parameters resource")
    for p in payload.get("parameter", []):
        if not isinstance(p, dict) or not isinstance(p.get("name"), str):
            raise error(400, "invalid", "Tham số không hợp lệ", "Invalid parameter entry")
        values = [v for k, v in p.items() if k.startswith("value")]
        value = values[0] if len(values) == 1 else None
        if isinstance(value, dict) and isinstance(value.get("reference"), str) and "valueReference" in p:
            value = value["reference"]
        if isinstance(value, bool):
            value = "true" if value else "false"
        yield p["name"], value


def parameter_values(payload: Any) -> dict[str, str]:
    """Parameters of one primitive or Reference value each, by name ($merge, $transfer, review decisions)."""
    return {name: str(value) for name, value in _entries(payload) if isinstance(value, str | int | float)}


def parameter_pairs(payload: Any) -> list[tuple[str, str]]:
    """Parameters as query pairs ($everything, $export by POST); each must hold exactly one primitive value."""
    pairs = []
    for name, value in _entries(payload):
        if value is None or isinstance(value, dict | list):
            raise error(400, "invalid", f"Tham số '{name}' cần một giá trị đơn",
                        f"Parameter '{name}' needs one primitive value")
        pairs.append((name, str(value)))
    return pairs


def to_parameters(values: dict[str, Any]) -> dict[str, Any]:
    """Plain values to a Parameters resource (lists repeat the name; nested data goes as a JSON string)."""
    out: list[dict[str, Any]] = []
    for name, value in values.items():
        for item in value if isinstance(value, list) else [value]:
            if item is None:
                continue
            if isinstance(item, bool):
                out.append({"name": name, "valueBoolean": item})
            elif isinstance(item, int):
                out.append({"name": name, "valueInteger": item})
            elif isinstance(item, float):
                out.append({"name": name, "valueDecimal": item})
            elif isinstance(item, str):
                out.append({"name": name, "valueString": item})
            else:
                out.append({"name": name, "valueString": orjson.dumps(item).decode()})
    return {"resourceType": "Parameters", "parameter": out}
