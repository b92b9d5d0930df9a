"""The CapabilityStatement, generated from what the server really compiled.

Why: a CapabilityStatement that lists parameters the server cannot evaluate
misleads every client. This one is built from the search registry and the
implemented interactions, so it cannot claim more than exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lienthong import __version__
from lienthong.fhir.datetimes import format_instant, now_us
from lienthong.fhir.search_params import SearchRegistry

_INTERACTIONS = ["read", "vread", "update", "patch", "delete", "history-instance", "history-type", "create",
                 "search-type"]
_MODIFIER_NOTE = {
    "string": "Modifiers: :exact, :contains, :missing. Default and :contains ignore case and diacritics.",
    "token": "Modifiers: :not, :text, :of-type (identifier), :missing.",
    "reference": "Modifiers: :[type], :identifier, :missing; chains up to 3 levels.",
    "date": "Prefixes eq ne gt lt ge le sa eb ap; precision read as a range.",
    "number": "Prefixes eq ne gt lt ge le sa eb ap; implicit precision.",
    "quantity": "Prefixes eq ne gt lt ge le sa eb ap; [number]|[system]|[code].",
    "uri": "Modifiers: :below, :above, :missing.",
    "composite": "Components joined by $.",
}


# An operation the node serves beyond the core ones: (resource type, or None at system level; name; definition).
Operation = tuple[str | None, str, str]
OWN_DEFINITIONS = "https://lienthong.vn/fhir/OperationDefinition"


def capability_statement(registry: SearchRegistry, base_url: str, security: dict[str, Any] | None = None,
                         operations: Sequence[Operation] = ()) -> dict[str, Any]:
    """What this node really serves: the core interactions and operations, plus `operations` that the
    composition added (the patient index and the exchange are optional parts of a node)."""
    resources = []
    for rtype in sorted(registry.by_type):
        params = registry.params(rtype)
        resources.append({
            "type": rtype,
            "versioning": "versioned-update",
            "readHistory": True,
            "updateCreate": True,
            "conditionalCreate": True,
            "conditionalRead": "not-supported",
            "conditionalUpdate": True,
            "conditionalDelete": "single",
            "referencePolicy": ["literal", "logical"],
            "interaction": [{"code": c} for c in _INTERACTIONS],
            "searchInclude": [*sorted(f"{rtype}:{c}" for c, p in params.items() if p.type == "reference"), "*"],
            "searchRevInclude": sorted(
                f"{other}:{c}" for other in registry.by_type for c, p in registry.params(other).items()
                if p.type == "reference" and (rtype in p.targets)
            ),
            "searchParam": [
                {"name": "_id", "type": "token"},
                {"name": "_lastUpdated", "type": "date"},
                *[
                    {"name": c, "definition": p.url, "type": p.type,
                     "documentation": _MODIFIER_NOTE.get(p.type, "")}
                    for c, p in sorted(params.items())
                ],
            ],
            **_operations(rtype, operations),
        })
    rest: dict[str, Any] = {
        "mode": "server",
        "documentation": "lienthong FHIR R4 node. Lenient handling ignores unknown search parameters unless "
                         "Prefer: handling=strict.",
        "resource": resources,
        "interaction": [{"code": "transaction"}, {"code": "batch"}, {"code": "search-system"},
                        {"code": "history-system"}],
        "searchParam": [{"name": "_id", "type": "token"}, {"name": "_lastUpdated", "type": "date"}],
        "operation": [
            {"name": "validate", "definition": "http://hl7.org/fhir/OperationDefinition/Resource-validate"},
            {"name": "meta", "definition": "http://hl7.org/fhir/OperationDefinition/Resource-meta"},
            {"name": "meta-add", "definition": "http://hl7.org/fhir/OperationDefinition/Resource-meta-add"},
            {"name": "meta-delete", "definition": "http://hl7.org/fhir/OperationDefinition/Resource-meta-delete"},
            {"name": "export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export"},
            *({"name": name, "definition": url} for on, name, url in operations if on is None),
        ],
    }
    if security:
        rest["security"] = security
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": format_instant(now_us())[:10],
        "publisher": "lienthong",
        "kind": "instance",
        "software": {"name": "lienthong", "version": __version__},
        "implementation": {"description": "lienthong FHIR R4 node / Nút FHIR R4 lienthong", "url": base_url},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "patchFormat": ["application/json-patch+json"],
        "rest": [rest],
    }


def _operations(rtype: str, extra: Sequence[Operation]) -> dict[str, Any]:
    ops = [{"name": "everything", "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything"}] \
        if rtype == "Patient" else []
    ops += [{"name": name, "definition": url} for on, name, url in extra if on == rtype]
    return {"operation": ops} if ops else {}
