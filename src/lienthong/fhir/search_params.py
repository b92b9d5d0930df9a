"""Search parameters from the official R4 SearchParameter definitions, and index extraction.

Why: HAPI and Blaze index every resource into typed rows (string, token, date,
number, quantity, uri, reference) at write time, so that search is pure SQL.
We do the same. The parameters are compiled from the definitions shipped in the
core package; nothing is hand-listed. A parameter whose expression falls outside
the compiled FHIRPath subset is left out, and so is absent from the
CapabilityStatement: the server never advertises what it cannot do.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any

from lienthong.fhir import definitions
from lienthong.fhir.datetimes import DateFormatError, parse_range, period_range
from lienthong.fhir.paths import (
    CHOICE_KEYS,
    CompiledPath,
    Node,
    UnsupportedExpression,
    compile_expression,
    compile_relative,
)
from lienthong.text import fold, nfc

MAX_INDEXED = 255  # index columns keep this many characters; exact matches still compare in full text

# Parameters implemented on the resource table itself rather than from an expression.
COLUMN_PARAMS = {"_id": "token", "_lastUpdated": "date"}


def param_key(resource_type: str, code: str) -> int:
    """Stable signed 64-bit key of (type, parameter): one integer column instead of two strings."""
    digest = hashlib.blake2b(f"{resource_type}|{code}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@dataclass(frozen=True)
class Component:
    code: str  # the component parameter's code, for messages
    type: str
    evaluate: Callable[[Node], list[Node]]
    definition: str = ""  # URL of the parameter this component is


@dataclass(frozen=True)
class SearchParam:
    code: str
    type: str
    resource_type: str
    url: str
    expression: str
    paths: tuple[CompiledPath, ...]
    targets: tuple[str, ...] = ()
    components: tuple[Component, ...] = ()
    description: str = ""

    @property
    def key(self) -> int:
        return _cached_key(self.resource_type, self.code)

    def component_key(self, index: int) -> int:
        return _cached_key(self.resource_type, f"{self.code}${index}")

    @cached_property  # asked once per composite of every indexed resource
    def codes_a_quantity(self) -> bool:
        """A token$quantity composite (code-value-quantity and its kind): besides its component rows it has
        one `coded_quantity` row per code and value that share an element, so a search reads one index range."""
        return self.type == "composite" and tuple(c.type for c in self.components) == ("token", "quantity")

    @property
    def identifier_key(self) -> int:
        """Key of the token rows that serve `reference:identifier` and `identifier:of-type`."""
        suffix = ":identifier" if self.type == "reference" else ":of-type"
        return _cached_key(self.resource_type, self.code + suffix)


_cached_key = lru_cache(maxsize=None)(param_key)


@dataclass
class IndexRows:
    """Index rows of one resource, ready for insertion, one list per index table."""

    string: list[tuple[int, int | None, str, str]] = field(default_factory=list)
    token: list[tuple[int, int | None, str | None, str | None, str | None]] = field(default_factory=list)
    date: list[tuple[int, int | None, int, int]] = field(default_factory=list)
    number: list[tuple[int, int | None, float]] = field(default_factory=list)
    quantity: list[tuple[int, int | None, float, str | None, str | None, str | None]] = field(
        default_factory=list
    )
    uri: list[tuple[int, int | None, str]] = field(default_factory=list)
    reference: list[tuple[int, int | None, str | None, str | None, str | None]] = field(default_factory=list)
    # (key, grp, code's system, code, value, unit system, unit code, unit): token$quantity composites only
    coded_quantity: list[tuple[int, int | None, str | None, str | None, float, str | None, str | None, str | None]] = (
        field(default_factory=list))

    def references(self) -> list[tuple[str, str]]:
        return [(t, i) for _, _, t, i, _ in self.reference if t and i]


class SearchRegistry:
    """All compiled search parameters, by resource type and code."""

    def __init__(self, defs: definitions.R4Definitions, fast: bool = True) -> None:
        """`fast=False` compiles the general FHIRPath step evaluator only: the tests' reference."""
        self.by_type: dict[str, dict[str, SearchParam]] = {t: {} for t in defs.resource_types}
        self._plans: dict[str, _Plan] = {}
        self.fast = fast
        self.unsupported: list[tuple[str, str]] = []
        by_url: dict[str, Any] = {sp["url"]: sp for sp in defs.search_parameters}
        for sp in defs.search_parameters:
            if sp.get("type") == "special" or not sp.get("expression"):
                continue
            try:
                branches = compile_expression(sp["expression"], fast)
                components = self._components(sp, by_url, fast)
            except UnsupportedExpression as exc:
                self.unsupported.append((sp["url"], str(exc)))
                continue
            for base in sp.get("base", []):
                targets = [base] if base not in ("Resource", "DomainResource") else list(self.by_type)
                for rtype in targets:
                    if rtype not in self.by_type:
                        continue
                    paths = tuple(b for b in branches if b.root in (rtype, "Resource", "DomainResource"))
                    if not paths:
                        continue
                    self.by_type[rtype][sp["code"]] = SearchParam(
                        code=sp["code"],
                        type=sp["type"],
                        resource_type=rtype,
                        url=sp["url"],
                        expression=sp["expression"],
                        paths=paths,
                        targets=tuple(sp.get("target", [])),
                        components=components,
                        description=sp.get("description", ""),
                    )
        self.fusible = {t: self._fusible(params) for t, params in self.by_type.items()}

    @staticmethod
    def _fusible(params: dict[str, SearchParam]) -> dict[tuple[str, str], SearchParam]:
        """(token code, quantity code) -> the token$quantity composite that says the same when both are given.

        Exact when the composite's element is the resource itself and its components are those very parameters:
        its pairs are then every code of the resource with every value, so "some code matches and some value
        matches" is "some pair matches", and the search can read the composite's one index range."""
        out: dict[tuple[str, str], SearchParam] = {}
        for p in params.values():
            if not p.codes_a_quantity or p.expression.strip() != p.resource_type:
                continue
            token, quantity = p.components
            if all(params.get(c.code) is not None and params[c.code].url == c.definition for c in p.components):
                out[(token.code, quantity.code)] = p
        return out

    @staticmethod
    def _components(sp: dict[str, Any], by_url: dict[str, Any], fast: bool) -> tuple[Component, ...]:
        if sp.get("type") != "composite":
            return ()
        out = []
        for comp in sp.get("component", []):
            target = by_url.get(comp["definition"])
            if target is None:
                raise UnsupportedExpression(f"component {comp['definition']}")
            out.append(Component(target["code"], target["type"], compile_relative(comp["expression"], fast),
                                 comp["definition"]))
        return tuple(out)

    def params(self, resource_type: str) -> dict[str, SearchParam]:
        return self.by_type.get(resource_type, {})

    def get(self, resource_type: str, code: str) -> SearchParam | None:
        return self.by_type.get(resource_type, {}).get(code)

    def extract(self, resource: dict[str, Any]) -> IndexRows:
        """Evaluate every parameter of the resource's type into index rows."""
        rtype = resource.get("resourceType", "")
        plan = self._plans.get(rtype)
        if plan is None:
            plan = self._plans[rtype] = _Plan(self.by_type.get(rtype, {}))
        if not self.fast:
            return plan.extract_general(resource)
        rows = IndexRows()
        for paths, adder, key, param, components in plan.for_keys(tuple(resource)):
            if len(paths) == 1:
                nodes = paths[0].evaluate(resource)
            else:
                nodes = []
                for path in paths:
                    nodes.extend(path.evaluate(resource))
            if nodes:
                _add_rows(rows, nodes, adder, key, param, components)
        return rows


_Adder = Callable[["IndexRows", int, "int | None", Node, "SearchParam | None"], None]
# Per parameter: (paths, adder, key, param, components as (adder, key, evaluate)), precomputed once per
# resource type, so extraction does no lookups per parameter.
_PlanEntry = tuple[
    tuple[CompiledPath, ...], "_Adder | None", int, SearchParam,
    tuple[tuple["_Adder | None", int, Callable[[Node], list[Node]]], ...],
]


class _Plan:
    """The parameters of one resource type, and which of them a resource's top-level elements can reach."""

    def __init__(self, params: dict[str, SearchParam]) -> None:
        self.entries: list[_PlanEntry] = []
        self.always: list[int] = []  # parameters with a path that starts anywhere (no first element)
        self.by_first: dict[str, list[int]] = {}  # first element name -> parameters with a path from it
        for index, param in enumerate(params.values()):
            firsts = [p.first for p in param.paths]
            components = tuple((_ADDERS.get(c.type), param.component_key(i), c.evaluate)
                               for i, c in enumerate(param.components)) if param.type == "composite" else ()
            self.entries.append((param.paths, _ADDERS.get(param.type), param.key, param, components))
            if None in firsts:
                self.always.append(index)
            for first in {f for f in firsts if f is not None}:
                self.by_first.setdefault(first, []).append(index)
        self._shapes: dict[tuple[str, ...], list[_PlanEntry]] = {}

    def _present(self, keys: Any) -> set[str]:
        """Top-level element names a resource has, choice elements under their base name too."""
        present = set(keys)
        present.update(CHOICE_KEYS[k][0] for k in keys if k in CHOICE_KEYS)
        return present

    def for_keys(self, keys: tuple[str, ...]) -> list[_PlanEntry]:
        """The parameters a resource with these top-level keys can reach, each with only the paths
        that can start in it, in parameter order; cached per key tuple.

        Why: resources of one type come in a few shapes, and working this out for every resource
        (sets of present names and wanted parameters, a sort, a membership test per path) was a
        fifth of extraction. The cache is bounded, so hostile key sets cannot grow it."""
        todo = self._shapes.get(keys)
        if todo is not None:
            return todo
        present = self._present(keys)
        wanted = set(self.always)
        for name in present:
            wanted.update(self.by_first.get(name, ()))
        literal = set(keys)
        todo = []
        for index in sorted(wanted):
            paths, adder, key, param, components = self.entries[index]
            reachable = tuple(p for p in paths if p.first is None or (
                p.first in present if p.first_keys is None else not literal.isdisjoint(p.first_keys)))
            if reachable and (adder is not None or components):
                todo.append((reachable, adder, key, param, components))
        if len(self._shapes) < _MAX_SHAPES:
            self._shapes[keys] = todo
        return todo

    def extract_general(self, resource: dict[str, Any]) -> IndexRows:
        """Extraction without the per-shape cache: the reference `for_keys` is tested against."""
        rows = IndexRows()
        present = self._present(resource)
        wanted = set(self.always)
        for name in present:
            wanted.update(self.by_first.get(name, ()))
        for index in sorted(wanted):  # in parameter order, as the rows have always come
            paths, adder, key, param, components = self.entries[index]
            nodes: list[Node] = []
            for path in paths:
                if path.first is None or path.first in present:
                    nodes.extend(path.evaluate(resource))
            if nodes:
                _add_rows(rows, nodes, adder, key, param, components)
        return rows


_MAX_SHAPES = 512  # key tuples cached per resource type


def _add_rows(rows: IndexRows, nodes: list[Node], adder: _Adder | None, key: int, param: SearchParam,
              components: tuple[tuple[_Adder | None, int, Callable[[Node], list[Node]]], ...]) -> None:
    """The index rows of one parameter from the nodes its paths reached (a composite's per component)."""
    if components:
        coded = param.codes_a_quantity
        for grp, node in enumerate(nodes):
            first_token, first_quantity = len(rows.token), len(rows.quantity)
            for comp_adder, comp_key, evaluate in components:
                if comp_adder is not None:
                    for value in evaluate(node):
                        comp_adder(rows, comp_key, grp, value, None)
            if coded:  # every code of the element with every value of it (token$quantity composites)
                rows.coded_quantity.extend(
                    (key, grp, t[2], t[3], q[2], q[3], q[4], q[5])
                    for t in rows.token[first_token:] if t[2] is not None or t[3] is not None
                    for q in rows.quantity[first_quantity:])
    elif adder is not None:
        for node in nodes:
            adder(rows, key, None, node, param)


# Type tuples, not `int | float` unions: isinstance with a union cost several times more, once per value.
_NUMBER = (int, float)
_SCALAR = (str, int, float)


def _text(value: Any) -> str | None:
    """A string element's value, None for anything else: index text columns hold strings only
    (validation already refuses other JSON kinds there; the binary COPY would fail on them)."""
    return value if isinstance(value, str) else None


def _clip(text: str) -> str:
    return text[:MAX_INDEXED]


def _add_string(rows: IndexRows, key: int, grp: int | None, node: Node, _: SearchParam | None) -> None:
    value = node.value
    texts: list[str] = []
    if isinstance(value, str):
        texts.append(value)
    elif isinstance(value, dict):
        if "family" in value or "given" in value or node.type == "HumanName":
            given = [g for g in value.get("given", []) if isinstance(g, str)]
            family = value.get("family") if isinstance(value.get("family"), str) else None
            texts.extend(given)
            texts.extend(p for p in value.get("prefix", []) + value.get("suffix", []) if isinstance(p, str))
            if family:
                texts.append(family)
                # Vietnamese order (family first) and Western order, so "nguyen van an" finds the name.
                texts.append(" ".join([family, *given]))
                texts.append(" ".join([*given, family]))
            if isinstance(value.get("text"), str):
                texts.append(value["text"])
        else:  # Address and other complex strings
            parts = [v for k, v in value.items() if k in _ADDRESS_PARTS and isinstance(v, str)]
            lines = [v for v in value.get("line", []) if isinstance(v, str)]
            texts.extend(lines + parts)
            if isinstance(value.get("text"), str):
                texts.append(value["text"])
            if len(lines) + len(parts) > 1:
                texts.append(", ".join(lines + parts))
    seen = set()
    for text in texts:
        folded = fold(text)
        if folded and folded not in seen:
            seen.add(folded)
            rows.string.append((key, grp, _clip(folded), _clip(nfc(text))))  # :exact compares NFC forms


_ADDRESS_PARTS = ("city", "district", "state", "postalCode", "country")


def _add_token(rows: IndexRows, key: int, grp: int | None, node: Node, param: SearchParam | None) -> None:
    value = node.value
    if isinstance(value, bool):
        rows.token.append((key, grp, None, "true" if value else "false", None))
    elif isinstance(value, _SCALAR):
        rows.token.append((key, grp, None, _clip(str(value)), None))
    elif isinstance(value, dict):
        if "coding" in value or ("text" in value and "system" not in value and "value" not in value):
            text = fold(value["text"]) if isinstance(value.get("text"), str) else None
            codings = [c for c in value.get("coding", []) if isinstance(c, dict)]
            for coding in codings:
                _add_coding(rows, key, grp, coding, text)
            if not codings and text:
                rows.token.append((key, grp, None, None, _clip(text)))
        elif "value" in value and ("system" in value or "type" in value or "use" in value or "assigner" in value
                                   or node.type in ("Identifier", "ContactPoint") or isinstance(value["value"], str)):
            ident_value = value.get("value")
            if not isinstance(ident_value, str):
                return
            type_cc: dict[str, Any] = value["type"] if isinstance(value.get("type"), dict) else {}
            type_text = fold(type_cc["text"]) if isinstance(type_cc.get("text"), str) else None
            system = value.get("system") if isinstance(value.get("system"), str) else None
            if node.type == "ContactPoint" or value.get("system") in _CONTACT_SYSTEMS:
                system = None  # ContactPoint.system is a kind (phone/email), not a namespace
            rows.token.append((key, grp, system, _clip(ident_value), type_text))
            if param is not None and type_cc:
                for coding in type_cc.get("coding", []):
                    if isinstance(coding, dict) and isinstance(coding.get("code"), str):
                        rows.token.append((param.identifier_key, grp, _text(coding.get("system")),
                                           _clip(f"{coding['code']}|{ident_value}"), None))
        elif "code" in value or "system" in value:
            _add_coding(rows, key, grp, value, None)


_CONTACT_SYSTEMS = {"phone", "fax", "email", "pager", "url", "sms", "other"}


def _add_coding(rows: IndexRows, key: int, grp: int | None, coding: dict[str, Any], text: str | None) -> None:
    code = coding.get("code")
    system = coding.get("system")
    display = fold(coding["display"]) if isinstance(coding.get("display"), str) else None
    label = f"{display} {text}" if display and text else display or text or None
    rows.token.append(
        (key, grp, system if isinstance(system, str) else None,
         _clip(code) if isinstance(code, str) else None, _clip(label) if label else None)
    )


def _add_date(rows: IndexRows, key: int, grp: int | None, node: Node, _: SearchParam | None) -> None:
    value = node.value
    try:
        if isinstance(value, str):
            lo, hi = parse_range(value)
        elif isinstance(value, dict) and ("start" in value or "end" in value):
            lo, hi = period_range(value.get("start"), value.get("end"))
        elif isinstance(value, dict) and isinstance(value.get("event"), list) and value["event"]:
            ranges = [parse_range(e) for e in value["event"] if isinstance(e, str)]
            lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
        else:
            return
    except (DateFormatError, ValueError):
        return
    rows.date.append((key, grp, lo, hi))


def _add_number(rows: IndexRows, key: int, grp: int | None, node: Node, _: SearchParam | None) -> None:
    if isinstance(node.value, _NUMBER) and not isinstance(node.value, bool):
        rows.number.append((key, grp, float(node.value)))


def _add_quantity(rows: IndexRows, key: int, grp: int | None, node: Node, _: SearchParam | None) -> None:
    value = node.value
    if isinstance(value, dict) and isinstance(value.get("value"), _NUMBER):
        rows.quantity.append(
            (key, grp, float(value["value"]), _text(value.get("system")), _text(value.get("code")),
             _text(value.get("unit")))
        )
    elif isinstance(value, dict) and ("low" in value or "high" in value):  # Range
        for bound in (value.get("low"), value.get("high")):
            if isinstance(bound, dict):
                _add_quantity(rows, key, grp, Node(bound, "Quantity"), None)


def _add_uri(rows: IndexRows, key: int, grp: int | None, node: Node, _: SearchParam | None) -> None:
    if isinstance(node.value, str):
        rows.uri.append((key, grp, _clip(node.value)))


def _add_reference(rows: IndexRows, key: int, grp: int | None, node: Node, param: SearchParam | None) -> None:
    value = node.value
    if isinstance(value, str):  # canonical
        rows.reference.append((key, grp, None, None, _clip(value.split("|", 1)[0])))
        return
    if not isinstance(value, dict):
        return
    ref = value.get("reference")
    if isinstance(ref, str) and not ref.startswith("#"):
        rtype, rid = split_reference(ref)
        rows.reference.append((key, grp, rtype, rid, _clip(ref) if "://" in ref or ref.startswith("urn:") else None))
    ident = value.get("identifier")
    if param is not None and isinstance(ident, dict) and isinstance(ident.get("value"), str):
        rows.token.append((param.identifier_key, grp, _text(ident.get("system")), _clip(ident["value"]), None))


@lru_cache(maxsize=8192)  # a Bundle's resources name the same patient, encounter, practitioners
def split_reference(ref: str) -> tuple[str | None, str | None]:
    """`Type/id`, `Type/id/_history/v` or an absolute URL ending so, to (Type, id)."""
    if ref.startswith("urn:"):
        return None, None
    parts = ref.split("?", 1)[0].rstrip("/").split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    if len(parts) >= 2 and parts[-2][:1].isupper():
        return parts[-2], parts[-1]
    return None, None


_ADDERS: dict[str, Callable[[IndexRows, int, int | None, Node, SearchParam | None], None]] = {
    "string": _add_string,
    "token": _add_token,
    "date": _add_date,
    "number": _add_number,
    "quantity": _add_quantity,
    "uri": _add_uri,
    "reference": _add_reference,
}


@lru_cache(maxsize=1)
def registry() -> SearchRegistry:
    return SearchRegistry(definitions.load())
