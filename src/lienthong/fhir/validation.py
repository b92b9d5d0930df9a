"""Structural validation of FHIR R4 JSON resources against the official core definitions.

Why: every resource entering the node (REST writes, transaction Bundles, inter-facility
exchange) must be checked before storage, so validation sits on the hot path. The
StructureDefinitions are therefore compiled once into small per-type lookup tables
(JSON key -> element rule) and resources are checked by a single walk over their JSON,
costing tens of microseconds per resource instead of re-reading snapshots each time.

Checked: resourceType, unknown elements (choice types, content references, `_name`
primitive-extension siblings, nested resources), cardinality, JSON kinds and the
official regexes of primitive types (with real calendar dates), empty values and
nulls, and required bindings whose value sets can be fully expanded from the local
code systems. Not checked: invariants (FHIRPath constraints), profiles, extension
definitions, reference resolution, and terminology that is not in the core package.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from lienthong.fhir.definitions import JSON, R4Definitions, load

__all__ = ["Issue", "Validator", "validate", "validator"]

ERROR = "error"
WARNING = "warning"

_REGEX_EXT = "http://hl7.org/fhir/StructureDefinition/regex"
_FHIR_TYPE_EXT = "http://hl7.org/fhir/StructureDefinition/structuredefinition-fhir-type"
_SD_PREFIX = "http://hl7.org/fhir/StructureDefinition/"
# FHIRPath system types used by the snapshots for the "id"/"url"/"value" leaves;
# only consulted when the fhir-type extension is absent.
_SYSTEM_TYPES = {
    "http://hl7.org/fhirpath/System.String": "string",
    "http://hl7.org/fhirpath/System.Boolean": "boolean",
    "http://hl7.org/fhirpath/System.Integer": "integer",
    "http://hl7.org/fhirpath/System.Decimal": "decimal",
    "http://hl7.org/fhirpath/System.Date": "date",
    "http://hl7.org/fhirpath/System.DateTime": "dateTime",
    "http://hl7.org/fhirpath/System.Time": "time",
}
_INT32_MIN = -(2**31)
_INT32_MAX = 2**31 - 1
_MEMO_SIZE = 4096  # per primitive type
_MEMO_LENGTH = 200
_DAYS = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)

# Element kinds of a compiled rule.
_PRIM = 0
_COMPLEX = 1
_RESOURCE = 2
# Dispatch modes of a rule: kind + 3 if the element repeats.
_SINGLE_PRIM, _SINGLE_COMPLEX, _SINGLE_RESOURCE = 0, 1, 2
_MANY_PRIM, _MANY_COMPLEX, _MANY_RESOURCE = 3, 4, 5

Problem = tuple[str, str]  # (severity, message) from a primitive check
Checker = Callable[[object], Problem | None]


@dataclass(frozen=True, slots=True)
class Issue:
    """One validation finding, shaped for an OperationOutcome.issue."""

    severity: str  # "error" | "warning"
    code: str  # FHIR IssueType code
    location: str  # FHIRPath-style location of the offending element
    message: str


# --------------------------------------------------------------------------- primitives


def _kind_of(value: object) -> str:
    """Name the JSON kind of a value for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _show(value: str) -> str:
    """Quote a value for a message, truncated so a huge payload cannot bloat the outcome."""
    return repr(value if len(value) <= 60 else value[:57] + "...")


def _calendar_ok(value: str) -> bool:
    """Check the day exists in its month (the official regex accepts 2021-02-30)."""
    if len(value) < 10 or value[8:10] < "29":
        return True
    year, month, day = int(value[0:4]), int(value[5:7]), int(value[8:10])
    if month == 2 and day == 29:
        return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
    return day <= _DAYS[month - 1]


def _string_checker(name: str, pattern: re.Pattern[str] | None, dated: bool) -> Checker:
    """Build the check for a primitive carried as a JSON string.

    Why two layers: valid values take one expression (type, regex, calendar), and only
    failures pay for `diagnose`, which works out which rule was broken.
    """
    match = pattern.fullmatch if pattern is not None else None
    warn_blank = name in ("string", "markdown")
    is_xhtml = name == "xhtml"

    def diagnose(value: object) -> Problem | None:
        if type(value) is not str:
            return ERROR, f"must be a JSON string ({name}), not a JSON {_kind_of(value)}"
        if not value:
            return ERROR, f"must not be an empty string ({name})"
        if match is not None and match(value) is None:
            return ERROR, f"{_show(value)} is not a valid {name}"
        if dated and not _calendar_ok(value):
            return ERROR, f"{_show(value)} is not a valid {name}: no such day in that month"
        if warn_blank and value.isspace():
            return WARNING, f"{name} value consists only of whitespace"
        if is_xhtml and not value.lstrip().startswith("<div"):
            return ERROR, "narrative must be an XHTML <div> element"
        return None

    if match is None:
        return diagnose
    # Memo of values already found valid: clinical data repeats the same codes, systems
    # and displays endlessly, and a set lookup is ten times cheaper than the regex.
    # Bounded so hostile input cannot grow it; strings are immutable, so it is always right.
    valid: set[str] = set()

    def check(value: object) -> Problem | None:
        if type(value) is str:
            if value in valid:
                return None
            if (
                value
                and match(value) is not None
                and not (dated and value[8:10] >= "29" and not _calendar_ok(value))
                and not (warn_blank and value.isspace())
            ):
                if len(valid) < _MEMO_SIZE and len(value) <= _MEMO_LENGTH:
                    valid.add(value)
                return None
        return diagnose(value)

    return check


def _integer_checker(name: str, pattern: re.Pattern[str] | None) -> Checker:
    """Build the check for integer, positiveInt and unsignedInt (JSON numbers, 32-bit)."""
    match = pattern.fullmatch if pattern is not None else None
    valid: set[int] = set()

    def check(value: object) -> Problem | None:
        if type(value) is int and value in valid:
            return None
        if type(value) is not int:
            return ERROR, f"must be a JSON integer number ({name}), not a JSON {_kind_of(value)}"
        if value < _INT32_MIN or value > _INT32_MAX:
            return ERROR, f"{value} is out of the 32-bit range of {name}"
        if match is not None and match(str(value)) is None:
            return ERROR, f"{value} is not a valid {name}"
        if len(valid) < _MEMO_SIZE:
            valid.add(value)
        return None

    return check


def _decimal_check(value: object) -> Problem | None:
    """Decimals are JSON numbers; a quoted "1.5" is the classic mistake."""
    if type(value) is int:
        return None
    if type(value) is float:
        return None if math.isfinite(value) else (ERROR, "decimal must be a finite number")
    return ERROR, f"must be a JSON number (decimal), not a JSON {_kind_of(value)}"


def _boolean_check(value: object) -> Problem | None:
    if type(value) is bool:
        return None
    return ERROR, f"must be a JSON boolean (true/false), not a JSON {_kind_of(value)}"


def _root_primitive(defs: R4Definitions, name: str) -> str:
    """Follow baseDefinition to boolean/integer/decimal/string-like, which fixes the JSON kind."""
    seen = 0
    while name not in ("boolean", "integer", "decimal") and seen < 10:
        base = str(defs.structures.get(name, {}).get("baseDefinition", ""))
        parent = base.removeprefix(_SD_PREFIX)
        if parent not in defs.structures or defs.structures[parent].get("kind") != "primitive-type":
            break
        name = parent
        seen += 1
    return name


def _primitive_checkers(defs: R4Definitions) -> dict[str, Checker]:
    """One checker per primitive type, using the regex published in its definition."""
    checkers: dict[str, Checker] = {}
    for name, sd in defs.structures.items():
        if sd.get("kind") != "primitive-type":
            continue
        pattern: re.Pattern[str] | None = None
        for element in sd["snapshot"]["element"]:
            if element["path"] != f"{name}.value":
                continue
            for type_ in element.get("type", []):
                for ext in type_.get("extension", []):
                    if ext.get("url") == _REGEX_EXT:
                        # ASCII: the spec's regexes are Java ones, where \s and \S are ASCII-only
                        # (so Vietnamese letters and NBSP are "\S", as intended).
                        pattern = re.compile(ext["valueString"], re.ASCII)
        root = _root_primitive(defs, name)
        if root == "boolean":
            checkers[name] = _boolean_check
        elif root == "integer":
            checkers[name] = _integer_checker(name, pattern)
        elif root == "decimal":
            checkers[name] = _decimal_check
        else:
            checkers[name] = _string_checker(name, pattern, name in ("date", "dateTime", "instant"))
    return checkers


# --------------------------------------------------------------------------- value sets


class _Expander:
    """Expand value sets from local code systems, or give up (None) when not fully possible.

    Why conservative: a binding check that guesses wrongly rejects valid clinical data,
    so any filter, unknown system or incomplete code system makes the binding unchecked.
    """

    def __init__(self, defs: R4Definitions) -> None:
        self._defs = defs
        self._cache: dict[str, dict[str, frozenset[str]] | None] = {}

    def expand(self, url: str) -> dict[str, frozenset[str]] | None:
        url = url.split("|", 1)[0]
        if url not in self._cache:
            self._cache[url] = None  # guards against include cycles
            self._cache[url] = self._compute(url)
        return self._cache[url]

    def _system_codes(self, system: str) -> frozenset[str] | None:
        cs = self._defs.code_systems.get(system)
        if cs is None or cs.get("content") != "complete":
            return None
        codes: set[str] = set()
        stack: list[JSON] = list(cs.get("concept", []))
        while stack:
            concept = stack.pop()
            codes.add(concept["code"])
            stack.extend(concept.get("concept", []))
        return frozenset(codes)

    def _compute(self, url: str) -> dict[str, frozenset[str]] | None:
        vs = self._defs.value_sets.get(url)
        compose = vs.get("compose") if vs else None
        if not compose or compose.get("inactive"):
            return None
        result: dict[str, set[str]] = {}
        for include in compose.get("include", []):
            if include.get("filter"):
                return None
            part: dict[str, frozenset[str]] | None = None
            system = include.get("system")
            if system:
                if include.get("concept"):
                    codes: frozenset[str] | None = frozenset(c["code"] for c in include["concept"])
                else:
                    codes = self._system_codes(system)
                if codes is None:
                    return None
                part = {system: codes}
            for imported in include.get("valueSet", []):
                sub = self.expand(imported)
                if sub is None:
                    return None
                # system + valueSet in one include means the intersection.
                part = sub if part is None else {s: c & sub[s] for s, c in part.items() if s in sub}
            if part is None:
                return None
            for s, c in part.items():
                result.setdefault(s, set()).update(c)
        for exclude in compose.get("exclude", []):
            system = exclude.get("system")
            if exclude.get("filter") or exclude.get("valueSet") or not system:
                return None
            if exclude.get("concept"):
                result.get(system, set()).difference_update(c["code"] for c in exclude["concept"])
            else:
                result.pop(system, None)
        return {s: frozenset(c) for s, c in result.items()}


# --------------------------------------------------------------------------- compiled model


class _Node:
    """The allowed keys of one object shape (a type or a backbone element)."""

    __slots__ = ("choices", "name", "required", "rules")

    def __init__(self, name: str) -> None:
        self.name = name
        self.rules: dict[str, _Rule] = {}
        self.required: list[tuple[str, tuple[str, ...]]] = []  # (label, keys that satisfy it)
        self.choices: frozenset[str] = frozenset()  # labels of choice elements


_NO_NODE = _Node("(none)")  # placeholder so rules never hold None on the hot path


def _no_check(value: object) -> Problem | None:
    return None


class _Rule:
    """How one JSON key of one type is validated (a choice type yields one rule per key)."""

    __slots__ = (
        "check",
        "choice",
        "codes",
        "key",
        "kind",
        "label",
        "many",
        "max_n",
        "mode",
        "node",
        "systems",
        "type_name",
        "value_set",
    )

    def __init__(self, key: str, label: str, many: bool, max_n: int | None, type_name: str) -> None:
        self.key = key
        self.label = label  # element name, "value[x]" for a choice
        self.choice = label.endswith("[x]")
        self.many = many
        self.max_n = max_n  # numeric max above 1, if any
        self.type_name = type_name
        self.kind = _PRIM
        self.mode = _SINGLE_PRIM  # set by finish()
        self.check: Checker = _no_check  # primitives only
        self.node: _Node = _NO_NODE  # complex types and backbone elements only
        self.codes: frozenset[str] | None = None  # required binding of a code
        self.systems: dict[str, frozenset[str]] | None = None  # required binding of Coding/CC
        self.value_set = ""

    def finish(self) -> _Rule:
        self.mode = self.kind + (3 if self.many else 0)
        return self


def _cap(code: str) -> str:
    return code[:1].upper() + code[1:]


class Validator:
    """Compiled R4 definitions plus the walk that applies them."""

    def __init__(self, defs: R4Definitions) -> None:
        self._defs = defs
        self._checkers = _primitive_checkers(defs)
        self._expander = _Expander(defs)
        self._datatypes: dict[str, _Node] = {}
        self.resources: dict[str, _Node] = {}
        self._resource_types = frozenset(defs.resource_types)
        self.abstract: frozenset[str] = frozenset(
            n for n, sd in defs.structures.items() if sd.get("kind") == "resource" and sd.get("abstract")
        )
        element = defs.structures["Element"]
        self._prim_element = self._compile(element)  # shape of `_name`: id + extension
        for name in sorted(self._resource_types):
            self.resources[name] = self._compile(defs.structures[name])

    # ---- compilation

    def _type_name(self, type_: JSON) -> str:
        code = str(type_["code"])
        if code.startswith("http://hl7.org/fhirpath/"):
            for ext in type_.get("extension", []):
                if ext.get("url") == _FHIR_TYPE_EXT:
                    return str(ext["valueUrl"])
            return _SYSTEM_TYPES.get(code, "string")
        return code

    def _datatype(self, name: str) -> _Node:
        node = self._datatypes.get(name)
        if node is None:
            sd = self._defs.structures.get(name)
            if sd is None:  # not in the package: accept only the generic Element shape
                return self._datatype("Element")
            node = self._compile(sd)
        return node

    def _compile(self, sd: JSON) -> _Node:
        """Turn one snapshot into nodes; backbone paths first so content references can point at them."""
        elements: list[JSON] = [e for e in sd["snapshot"]["element"] if ":" not in e["id"]]
        root_path = elements[0]["path"]
        is_resource = sd.get("kind") == "resource"
        nodes: dict[str, _Node] = {root_path: _Node(root_path)}
        if not is_resource:  # registered before its children, so recursive types terminate
            self._datatypes[root_path] = nodes[root_path]
        parents = {e["path"].rpartition(".")[0] for e in elements[1:]}
        for e in elements[1:]:
            if e["path"] in parents:
                nodes[e["path"]] = _Node(e["path"])
        for e in elements[1:]:
            parent, _, name = e["path"].rpartition(".")
            node = nodes.get(parent)
            if node is None or e.get("max") == "0":
                continue
            max_ = str(e.get("max", "*"))
            many = max_ != "1"
            max_n = int(max_) if max_.isdigit() and int(max_) > 1 else None
            rules: list[_Rule] = []
            if "contentReference" in e:
                target = nodes.get(str(e["contentReference"]).rpartition("#")[2])
                if target is None:
                    continue
                rule = _Rule(name, name, many, max_n, "BackboneElement")
                rule.kind, rule.node = _COMPLEX, target
                rules.append(rule)
            elif name.endswith("[x]"):
                for type_ in e.get("type", []):
                    tname = self._type_name(type_)
                    rules.append(self._rule(name[:-3] + _cap(tname), name, many, max_n, tname, e, None))
            else:
                types = e.get("type", [])
                tname = self._type_name(types[0]) if types else "Element"
                if is_resource and e["path"] == f"{root_path}.id":
                    tname = "id"  # Resource.id is an id (the 4.0.1 snapshot says only System.String)
                rules.append(self._rule(name, name, many, max_n, tname, e, nodes.get(e["path"])))
            for rule in rules:
                node.rules[rule.key] = rule.finish()
            if rules and rules[0].label.endswith("[x]"):
                node.choices = node.choices | {rules[0].label}
            if int(e.get("min", 0)) >= 1 and rules:
                keys: list[str] = []
                for rule in rules:
                    keys.append(rule.key)
                    if rule.kind == _PRIM:
                        keys.append("_" + rule.key)
                node.required.append((name, tuple(keys)))
        return nodes[root_path]

    def _rule(
        self, key: str, label: str, many: bool, max_n: int | None, tname: str, e: JSON, backbone: _Node | None
    ) -> _Rule:
        rule = _Rule(key, label, many, max_n, tname)
        if backbone is not None:
            rule.kind, rule.node = _COMPLEX, backbone
        elif tname in self._checkers:
            rule.kind, rule.check = _PRIM, self._checkers[tname]
        elif tname == "Resource" or tname in self.abstract or tname in self._resource_types:
            rule.kind = _RESOURCE
        else:
            rule.kind, rule.node = _COMPLEX, self._datatype(tname)
        binding = e.get("binding")
        if binding and binding.get("strength") == "required" and binding.get("valueSet"):
            expansion = self._expander.expand(str(binding["valueSet"]))
            if expansion is not None:
                rule.value_set = str(binding["valueSet"]).split("|", 1)[0]
                if tname == "code":
                    rule.codes = frozenset().union(*expansion.values())
                elif tname in ("Coding", "CodeableConcept"):
                    rule.systems = expansion
        return rule

    # ---- validation

    def validate(self, resource: object, expected_type: str | None = None) -> list[Issue]:
        """Validate one resource; never raises on malformed input, returns issues instead."""
        out: list[Issue] = []
        try:
            self._resource(resource, expected_type or "Resource", out, expected_type)
        except RecursionError:
            rtype = resource.get("resourceType") if isinstance(resource, dict) else None
            root = (
                rtype if isinstance(rtype, str) and rtype in self.resources else expected_type or "Resource"
            )
            out.append(Issue(ERROR, "structure", root, "resource is nested too deeply to validate"))
        return out

    def _resource(
        self, obj: object, path: str, out: list[Issue], expected: str | None, top: bool = True
    ) -> None:
        if not isinstance(obj, dict):
            out.append(
                Issue(
                    ERROR, "structure", path, f"a resource must be a JSON object, not a JSON {_kind_of(obj)}"
                )
            )
            return
        rtype = obj.get("resourceType")
        where = f"{path}.resourceType"
        if rtype is None:
            out.append(Issue(ERROR, "required", where, "resourceType is missing"))
            return
        if not isinstance(rtype, str):
            out.append(
                Issue(
                    ERROR, "structure", where, f"resourceType must be a string, not a JSON {_kind_of(rtype)}"
                )
            )
            return
        node = self.resources.get(rtype)
        if node is None:
            why = "is abstract" if rtype in self.abstract else "is not a known FHIR R4 resource type"
            out.append(Issue(ERROR, "not-supported", where, f"resourceType {_show(rtype)} {why}"))
            return
        if top:
            path = rtype
        if expected is not None and rtype != expected:
            out.append(
                Issue(
                    ERROR,
                    "invalid",
                    f"{path}.resourceType",
                    f"resourceType is {rtype!r} but {expected!r} was expected",
                )
            )
        self._walk(node, obj, path, out, True)

    def _walk(self, node: _Node, obj: dict[Any, Any], path: str, out: list[Issue], is_resource: bool) -> None:
        """Check every key of one object, then the required elements of its shape.

        The hot loop: one dict lookup per key and a dispatch on a precomputed mode;
        anything unusual (choices, nulls, arrays, errors) leaves it for a helper.
        """
        rules = node.rules
        chosen: dict[str, str] | None = None
        for key, value in obj.items():
            rule = rules.get(key)
            if rule is None:
                if type(key) is str and key[:1] == "_":
                    self._primitive_extension(node, obj, key, value, path, out)
                elif not (is_resource and key == "resourceType"):
                    self._unknown(node, key, path, out)
                continue
            if rule.choice:
                if chosen is None:
                    chosen = {}
                other = chosen.setdefault(rule.label, key)
                if other != key:
                    out.append(
                        Issue(
                            ERROR,
                            "structure",
                            f"{path}.{key}",
                            f"only one type of {rule.label} is allowed; found both {other} and {key}",
                        )
                    )
            mode = rule.mode
            if mode == _SINGLE_PRIM:
                problem = rule.check(value)
                if problem is None:
                    if rule.codes is not None and value not in rule.codes:
                        self._bad_code(rule, value, f"{path}.{key}", out)
                elif type(value) is list or value is None:
                    self._bad_shape(rule, value, f"{path}.{key}", out)
                else:
                    code = "structure" if type(value) is dict else "value"
                    out.append(Issue(problem[0], code, f"{path}.{key}", f"{key}: {problem[1]}"))
                    if problem[0] == WARNING and rule.codes is not None and value not in rule.codes:
                        self._bad_code(rule, value, f"{path}.{key}", out)
            elif mode == _SINGLE_COMPLEX:
                if type(value) is dict and value:
                    self._walk(rule.node, value, f"{path}.{key}", out, False)
                    if rule.systems is not None:
                        self._check_coded(rule, value, f"{path}.{key}", out)
                else:
                    self._bad_shape(rule, value, f"{path}.{key}", out)
            elif type(value) is not list or not value:
                if mode == _SINGLE_RESOURCE and value is not None and type(value) is not list:
                    self._resource(value, f"{path}.{key}", out, None, False)
                else:
                    self._bad_shape(rule, value, f"{path}.{key}", out)
            else:
                if rule.max_n is not None and len(value) > rule.max_n:
                    out.append(
                        Issue(
                            ERROR,
                            "structure",
                            f"{path}.{key}",
                            f"{key} allows at most {rule.max_n} items, found {len(value)}",
                        )
                    )
                if mode == _MANY_COMPLEX:
                    sub = rule.node
                    for i, item in enumerate(value):
                        if type(item) is dict and item:
                            where = f"{path}.{key}[{i}]"
                            self._walk(sub, item, where, out, False)
                            if rule.systems is not None:
                                self._check_coded(rule, item, where, out)
                        else:
                            self._bad_shape(rule, item, f"{path}.{key}[{i}]", out, True)
                elif mode == _MANY_PRIM:
                    check = rule.check
                    codes = rule.codes
                    for i, item in enumerate(value):
                        problem = check(item)
                        if problem is None:
                            if codes is not None and item not in codes:
                                self._bad_code(rule, item, f"{path}.{key}[{i}]", out)
                        elif item is None:
                            ext = obj.get("_" + key)
                            if not (type(ext) is list and i < len(ext) and ext[i] is not None):
                                out.append(
                                    Issue(
                                        ERROR,
                                        "structure",
                                        f"{path}.{key}[{i}]",
                                        f"{key}[{i}] is null without a matching _{key} extension",
                                    )
                                )
                        else:
                            code = "structure" if type(item) is list or type(item) is dict else "value"
                            out.append(
                                Issue(problem[0], code, f"{path}.{key}[{i}]", f"{key}[{i}]: {problem[1]}")
                            )
                            if problem[0] == WARNING and codes is not None and item not in codes:
                                self._bad_code(rule, item, f"{path}.{key}[{i}]", out)
                elif mode == _MANY_RESOURCE:
                    for i, item in enumerate(value):
                        self._resource(item, f"{path}.{key}[{i}]", out, None, False)
                else:
                    self._bad_shape(rule, value, f"{path}.{key}", out)
        for label, keys in node.required:
            for k in keys:
                if k in obj:
                    break
            else:
                out.append(
                    Issue(
                        ERROR,
                        "required",
                        f"{path}.{label}",
                        f"{label} is required (min 1) in {node.name} but is missing",
                    )
                )

    def _bad_shape(
        self, rule: _Rule, value: object, where: str, out: list[Issue], item: bool = False
    ) -> None:
        """Report a value whose JSON shape does not fit the rule (null, empty, array vs single)."""
        name = where.rpartition(".")[2]
        if value is None:
            out.append(Issue(ERROR, "structure", where, f"{name} is null; omit empty elements"))
        elif type(value) is list and not item:
            if rule.many:
                out.append(Issue(ERROR, "structure", where, f"{name} is an empty array; omit empty elements"))
            else:
                out.append(
                    Issue(
                        ERROR,
                        "structure",
                        where,
                        f"{name} does not repeat (max 1) so must not be a JSON array",
                    )
                )
        elif rule.many and not item:
            out.append(
                Issue(
                    ERROR,
                    "structure",
                    where,
                    f"{name} repeats (max {rule.max_n or '*'}) so must be a JSON array, "
                    f"not a JSON {_kind_of(value)}",
                )
            )
        elif type(value) is dict and not value:
            out.append(Issue(ERROR, "structure", where, f"{name} is an empty object; omit empty elements"))
        else:
            out.append(
                Issue(
                    ERROR,
                    "structure",
                    where,
                    f"{name} is a {rule.type_name} so must be a JSON object, not a JSON {_kind_of(value)}",
                )
            )

    def _unknown(self, node: _Node, key: object, path: str, out: list[Issue]) -> None:
        if type(key) is not str:
            out.append(Issue(ERROR, "structure", path, f"object keys must be strings, found {key!r}"))
            return
        hint = ""
        for label in node.choices:
            stem = label[:-3]
            if key.startswith(stem) and key != stem:
                allowed = sorted(r.key for r in node.rules.values() if r.label == label)
                hint = f"; {label} allows {', '.join(allowed[:12])}{', ...' if len(allowed) > 12 else ''}"
                break
        out.append(
            Issue(ERROR, "structure", f"{path}.{key}", f"unknown element {key!r} in {node.name}{hint}")
        )

    def _primitive_extension(
        self, node: _Node, obj: dict[Any, Any], key: str, value: object, path: str, out: list[Issue]
    ) -> None:
        """`_name` carries id/extension of primitive `name` (FHIR JSON §2.6.2); locations use `name`."""
        base = key[1:]
        rule = node.rules.get(base)
        if rule is None or rule.kind != _PRIM:
            self._unknown(node, key, path, out)
            return
        where = f"{path}.{base}"
        if rule.many:
            if type(value) is not list or not value:
                out.append(
                    Issue(
                        ERROR, "structure", where, f"{key} must be a non-empty JSON array aligned with {base}"
                    )
                )
                return
            values = obj.get(base)
            if type(values) is list and len(values) != len(value):
                out.append(
                    Issue(
                        ERROR,
                        "structure",
                        where,
                        f"{key} has {len(value)} items but {base} has {len(values)}; they must align",
                    )
                )
            for i, item in enumerate(value):
                if item is None:
                    if not (type(values) is list and i < len(values) and values[i] is not None):
                        out.append(
                            Issue(
                                ERROR,
                                "structure",
                                f"{where}[{i}]",
                                f"{base}[{i}] has neither a value nor an extension",
                            )
                        )
                    continue
                if type(item) is not dict or not item:
                    out.append(
                        Issue(
                            ERROR,
                            "structure",
                            f"{where}[{i}]",
                            f"{key}[{i}] must be a non-empty JSON object (id/extension) or null",
                        )
                    )
                    continue
                self._walk(self._prim_element, item, f"{where}[{i}]", out, False)
        else:
            if type(value) is not dict or not value:
                out.append(
                    Issue(
                        ERROR,
                        "structure",
                        where,
                        f"{key} must be a non-empty JSON object (id/extension), not a JSON {_kind_of(value)}",
                    )
                )
                return
            self._walk(self._prim_element, value, where, out, False)

    def _bad_code(self, rule: _Rule, value: object, where: str, out: list[Issue]) -> None:
        codes = rule.codes or frozenset()
        allowed = ", ".join(sorted(codes)[:12]) + (", ..." if len(codes) > 12 else "")
        shown = _show(value) if isinstance(value, str) else repr(value)
        out.append(
            Issue(
                ERROR,
                "code-invalid",
                where,
                f"{rule.key}: {shown} is not in the required value set {rule.value_set} ({allowed})",
            )
        )

    def _check_coded(self, rule: _Rule, value: dict[Any, Any], where: str, out: list[Issue]) -> None:
        """Required binding on Coding/CodeableConcept: some coding must be from the value set."""
        systems = rule.systems
        assert systems is not None
        if rule.type_name == "Coding":
            code = value.get("code")
            if code is None:
                return
            system = value.get("system")
            if system is None:
                ok = any(code in c for c in systems.values()) if isinstance(code, str) else False
            else:
                allowed = systems.get(system) if isinstance(system, str) else None
                ok = allowed is not None and isinstance(code, str) and code in allowed
            if not ok:
                out.append(
                    Issue(
                        ERROR,
                        "code-invalid",
                        where,
                        f"{rule.key}: code {code!r} (system {system!r}) is not in the required "
                        f"value set {rule.value_set}",
                    )
                )
            return
        codings = value.get("coding")
        if type(codings) is list:
            for coding in codings:
                if type(coding) is dict:
                    system, code = coding.get("system"), coding.get("code")
                    if isinstance(system, str) and isinstance(code, str) and code in systems.get(system, ()):
                        return
        expected = "; ".join(f"{s}: {', '.join(sorted(c)[:8])}" for s, c in systems.items())
        out.append(
            Issue(
                ERROR,
                "code-invalid",
                where,
                f"{rule.key} has no coding from the required value set {rule.value_set} ({expected})",
            )
        )


@lru_cache(maxsize=1)
def validator() -> Validator:
    """The process-wide compiled validator; compiling costs about a second, paid once."""
    return Validator(load())


def validate(resource: object, expected_type: str | None = None) -> list[Issue]:
    """Validate a FHIR R4 JSON resource (already parsed) and list what is wrong with it."""
    return validator().validate(resource, expected_type)
