"""`_summary` and `_elements`: return part of a resource, marked SUBSETTED.

Why: low-bandwidth links make partial reads worth having; which elements belong
to the summary comes from the official definitions (`isSummary`), not a list.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from lienthong.fhir import definitions

SUBSETTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}
_ALWAYS = ("resourceType", "id", "meta")


@cache
def summary_elements(resource_type: str) -> frozenset[str]:
    """Top-level element names flagged isSummary (choice names expanded by prefix at use)."""
    sd = definitions.load().structures.get(resource_type)
    names: set[str] = set()
    if sd is None:
        return frozenset()
    for element in sd.get("snapshot", {}).get("element", []):
        parts = element["path"].split(".")
        if len(parts) == 2 and element.get("isSummary"):
            names.add(parts[1].removesuffix("[x]"))
    return frozenset(names)


def _keep(key: str, allowed: frozenset[str] | set[str]) -> bool:
    if key in allowed or key.lstrip("_") in allowed:
        return True
    # choice elements: valueQuantity belongs to value[x]
    return any(key.startswith(name) and key[len(name) : len(name) + 1].isupper() for name in allowed)


def _mark(resource: dict[str, Any]) -> dict[str, Any]:
    meta = dict(resource.get("meta") or {})
    tags = list(meta.get("tag", []))
    if SUBSETTED not in tags:
        tags.append(SUBSETTED)
    meta["tag"] = tags
    resource["meta"] = meta
    return resource


def shape(resource: dict[str, Any], summary: str | None, elements: list[str] | None) -> dict[str, Any]:
    """Apply _summary (true/text/data/false) or _elements to one resource."""
    rtype = resource.get("resourceType", "")
    if summary == "true":
        allowed = summary_elements(rtype)
        out = {k: v for k, v in resource.items() if k in _ALWAYS or _keep(k, allowed)}
        return _mark(out)
    if summary == "text":
        out = {k: v for k, v in resource.items() if k in (*_ALWAYS, "text")}
        return _mark(out)
    if summary == "data":
        if "text" not in resource:
            return resource
        return _mark({k: v for k, v in resource.items() if k != "text"})
    if elements:
        wanted = {e.split(".", 1)[0] for e in elements}
        out = {k: v for k, v in resource.items() if k in _ALWAYS or _keep(k, wanted)}
        return _mark(out)
    return resource
