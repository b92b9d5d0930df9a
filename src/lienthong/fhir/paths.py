"""A compiled evaluator for the FHIRPath subset used by R4 SearchParameter expressions.

Why: every write indexes its resource, so evaluating search expressions is on the
ingest hot path. A general FHIRPath engine costs milliseconds per resource; the
official R4 search expressions use only a small grammar (paths, unions, `as`/
`ofType`, `where(resolve() is T)`, `where(field='x')`, `extension('url')`,
indexers, `exists()`), which compiles to plain Python closures here. Expressions
outside the subset raise `UnsupportedExpression`, so the server never claims a
parameter it cannot evaluate.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from lienthong.fhir import definitions


class UnsupportedExpression(ValueError):
    """The expression uses FHIRPath beyond the compiled subset."""


class Node:
    """A value reached by a path, with its FHIR type when the path knows it (choice types).

    A plain slotted class rather than a frozen dataclass: indexing makes one per value reached, and
    the frozen dataclass's `__init__` (two `object.__setattr__` calls) cost twice as much.
    """

    __slots__ = ("type", "value")

    def __init__(self, value: Any, type: str | None = None) -> None:
        self.value = value
        self.type = type

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Node) and self.value == other.value and self.type == other.type

    def __hash__(self) -> int:
        return hash((self.value, self.type))

    def __repr__(self) -> str:
        return f"Node({self.value!r}, {self.type!r})"


Step = Callable[[list[Node]], list[Node]]

# FHIR data type names, as they appear capitalised in choice-element suffixes (valueQuantity).
_TYPE_SUFFIXES = {
    "Base64Binary", "Boolean", "Canonical", "Code", "Date", "DateTime", "Decimal", "Id", "Instant",
    "Integer", "Markdown", "Oid", "PositiveInt", "String", "Time", "UnsignedInt", "Uri", "Url", "Uuid",
    "Address", "Age", "Annotation", "Attachment", "CodeableConcept", "Coding", "ContactPoint", "Count",
    "Distance", "Duration", "HumanName", "Identifier", "Money", "Period", "Quantity", "Range", "Ratio",
    "Reference", "SampledData", "Signature", "Timing", "ContactDetail", "Contributor", "DataRequirement",
    "Expression", "ParameterDefinition", "RelatedArtifact", "TriggerDefinition", "UsageContext", "Dosage",
    "Meta",
}
_PRIMITIVE_ALIASES = {"string": "String", "boolean": "Boolean", "dateTime": "DateTime", "date": "Date",
                      "integer": "Integer", "decimal": "Decimal", "uri": "Uri", "code": "Code"}




def _choice_names() -> frozenset[str]:
    """Names of choice elements in R4 (value[x], effective[x], ...), read from the definitions."""
    names = set()
    for sd in definitions.load().structures.values():
        for element in sd.get("snapshot", {}).get("element", []):
            path = element.get("path", "")
            if path.endswith("[x]"):
                names.add(path.rsplit(".", 1)[-1][:-3])
    return frozenset(names)


# Only these names are looked up by type suffix.
CHOICE_NAMES = _choice_names()
CHOICE_KEYS: dict[str, tuple[str, str]] = {
    name + suffix: (name, suffix) for name in CHOICE_NAMES for suffix in _TYPE_SUFFIXES
}


def _children(node: Node, name: str) -> list[Node]:
    value = node.value
    if not isinstance(value, dict):
        return []
    child = value.get(name)
    if child is not None:
        if isinstance(child, list):
            return [Node(item) for item in child]
        return [Node(child)]
    if name not in CHOICE_NAMES:
        return []
    # Choice element: valueQuantity, effectivePeriod, ...
    out = []
    for key, child in value.items():
        hit = CHOICE_KEYS.get(key)
        if hit is not None and hit[0] == name:
            for item in child if isinstance(child, list) else [child]:
                out.append(Node(item, hit[1]))
    return out


def _reference_type(value: Any) -> str | None:
    if not isinstance(value, dict):
        return None
    ref = value.get("reference")
    if isinstance(ref, str) and "/" in ref and not ref.startswith("#"):
        return _type_in_reference(ref)
    declared = value.get("type")
    return declared if isinstance(declared, str) else None


@lru_cache(maxsize=8192)  # indexing asks this of the same few references over and over
def _type_in_reference(ref: str) -> str:
    """The type in `Type/id`, or absolute `.../Type/id`, possibly with `/_history/n`."""
    parts = ref.split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        return parts[-4]
    return parts[-2]


def _type_filter(type_name: str) -> Step:
    wanted = _PRIMITIVE_ALIASES.get(type_name, type_name)

    def step(nodes: list[Node]) -> list[Node]:
        out = []
        for n in nodes:
            if n.type == wanted or (n.type is None and _shape_is(n.value, wanted)):
                out.append(Node(n.value, wanted))
        return out

    return step


def _append_nodes(out: list[Node], child: Any, type_name: str | None) -> None:
    """A child element as nodes: an array gives one node per item (FHIRPath flattens)."""
    if type(child) is list:
        out.extend([Node(item, type_name) for item in child])
    else:
        out.append(Node(child, type_name))


def _choice_as(name: str, type_name: str) -> Step:
    """`name.as(T)` / `(... name as T)` for a choice element: look up `nameT` directly.

    Same nodes as the name step followed by the type filter (which scans every key of the element
    for choice suffixes); the general pair still runs when the element holds a bare `name` key."""
    wanted = _PRIMITIVE_ALIASES.get(type_name, type_name)
    key = name + wanted
    direct = CHOICE_KEYS.get(key) == (name, wanted)
    general = (_name_step(name), _type_filter(type_name))

    def step(nodes: list[Node]) -> list[Node]:
        out: list[Node] = []
        for n in nodes:
            value = n.value
            if type(value) is not dict:
                continue
            if name in value or not direct:
                out.extend(general[1](general[0]([n])))
                continue
            child = value.get(key)
            if child is not None:
                _append_nodes(out, child, wanted)
        return out

    return step


def _compile_tokens(tokens: list[str], fast: bool = True) -> list[Step]:
    """Steps of a dotted path; a choice element followed by `as(T)`/`ofType(T)` becomes one step
    (unless `fast` is off: the reference evaluator the tests compare with)."""
    steps: list[Step] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        cast = _CAST.match(tokens[i + 1]) if fast and i + 1 < len(tokens) else None
        if cast and token in CHOICE_NAMES:
            steps.append(_choice_as(token, cast.group(1)))
            i += 2
            continue
        steps.extend(_compile_step(token))
        i += 1
    return steps


_CAST = re.compile(r"^(?:as|ofType)\((\w+)\)$")


def _shape_is(value: Any, type_name: str) -> bool:
    """Best-effort type test for values not reached through a choice suffix."""
    if type_name in {"String", "Code", "Uri", "Canonical", "DateTime", "Date"}:
        return isinstance(value, str)
    if type_name == "Boolean":
        return isinstance(value, bool)
    return False


def _name_step(name: str) -> Step:
    choice = name in CHOICE_NAMES

    def step(nodes: list[Node]) -> list[Node]:
        # Hot path of indexing: inlined rather than calling _children per node.
        out: list[Node] = []
        for n in nodes:
            value = n.value
            if type(value) is not dict:
                continue
            child = value.get(name)
            if child is not None:
                _append_nodes(out, child, None)
            elif choice:
                out.extend(_children(n, name))
        return out

    return step


def _index_step(index: int) -> Step:
    def step(nodes: list[Node]) -> list[Node]:
        return [nodes[index]] if len(nodes) > index else []

    return step


def _where_resolve_is(type_name: str) -> Step:
    def step(nodes: list[Node]) -> list[Node]:
        return [n for n in nodes if _reference_type(n.value) == type_name]

    return step


def _where_equals(field: str, literal: str) -> Step:
    def step(nodes: list[Node]) -> list[Node]:
        return [n for n in nodes if isinstance(n.value, dict) and n.value.get(field) == literal]

    return step


def _extension_step(url: str, only_having: bool = False) -> Step:
    def step(nodes: list[Node]) -> list[Node]:
        out = []
        for n in nodes:
            if not isinstance(n.value, dict):
                continue
            exts = [e for e in n.value.get("extension", []) if isinstance(e, dict) and e.get("url") == url]
            if only_having:
                if exts:
                    out.append(n)
            else:
                out.extend(Node(e) for e in exts)
        return out

    return step


def _exists_step(nodes: list[Node]) -> list[Node]:
    return [Node(bool(nodes), "Boolean")]


_FUNC_RE = re.compile(r"^(\w+)\((.*)\)$")
_STR_LIT = re.compile(r"^'([^']*)'$")


def _compile_step(token: str) -> list[Step]:
    steps: list[Step] = []
    index = None
    bracket = re.match(r"^(.*)\[(\d+)\]$", token)
    if bracket:
        token, index = bracket.group(1), int(bracket.group(2))
    func = _FUNC_RE.match(token)
    if func:
        name, arg = func.group(1), func.group(2).strip()
        if name in {"as", "ofType"}:
            steps.append(_type_filter(arg))
        elif name == "where":
            m = re.match(r"^resolve\(\)\s+is\s+(\w+)$", arg)
            eq = re.match(r"^(\w+)\s*=\s*'([^']*)'$", arg)
            has_ext = re.match(r"^hasExtension\('([^']*)'\)$", arg)
            if m:
                steps.append(_where_resolve_is(m.group(1)))
            elif eq:
                steps.append(_where_equals(eq.group(1), eq.group(2)))
            elif has_ext:
                steps.append(_extension_step(has_ext.group(1), only_having=True))
            else:
                raise UnsupportedExpression(f"where({arg})")
        elif name == "extension":
            lit = _STR_LIT.match(arg)
            if not lit:
                raise UnsupportedExpression(f"extension({arg})")
            steps.append(_extension_step(lit.group(1)))
        elif name == "exists" and not arg:
            steps.append(_exists_step)
        else:
            raise UnsupportedExpression(f"{name}()")
    else:
        if not re.match(r"^[A-Za-z_]\w*$", token):
            raise UnsupportedExpression(token)
        steps.append(_name_step(token))
    if index is not None:
        steps.append(_index_step(index))
    return steps


def _split_top(expr: str, sep: str) -> list[str]:
    """Split on a separator outside parentheses and string literals."""
    parts, depth, quote, start = [], 0, False, 0
    i = 0
    while i < len(expr):
        ch = expr[i]
        if ch == "'":
            quote = not quote
        elif not quote:
            if ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
            elif depth == 0 and expr.startswith(sep, i):
                parts.append(expr[start:i])
                start = i + len(sep)
                i += len(sep)
                continue
        i += 1
    parts.append(expr[start:])
    return [p.strip() for p in parts]


def _compile_path(expr: str, fast: bool = True) -> tuple[str | None, list[Step]]:
    """Compile `Type.a.b(...)` or `(Type.a as T).b`; return the root type and the steps."""
    expr = expr.strip()
    steps: list[Step] = []
    if expr.startswith("("):
        depth = 0
        for i, ch in enumerate(expr):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                inner, rest = expr[1:i], expr[i + 1 :]
                break
        else:
            raise UnsupportedExpression(expr)
        m = re.match(r"^(.*)\s+(?:as|is)\s+(\w+)$", inner.strip())
        if not m:
            raise UnsupportedExpression(expr)
        if m.group(1).lstrip().startswith("("):
            root, inner_steps = _compile_path(m.group(1), fast)
            steps = [*inner_steps, _type_filter(m.group(2))]
        else:  # `(Type.a as T)` is `Type.a.as(T)`
            root, steps = _compile_path(f"{m.group(1)}.as({m.group(2)})", fast)
        if rest:
            if not rest.startswith("."):
                raise UnsupportedExpression(expr)
            steps.extend(_compile_tokens(_split_top(rest[1:], "."), fast))
        return root, steps
    tokens = _split_top(expr, ".")
    root = tokens[0] if tokens and re.match(r"^[A-Z]\w*$", tokens[0]) else None
    if root is None:
        raise UnsupportedExpression(expr)
    return root, _compile_tokens(tokens[1:], fast)


def _plain_values(values: list[Any], names: tuple[str, ...]) -> list[Any] | None:
    """Follow a chain of element names over raw JSON values (lists flattened, as FHIRPath does).

    None when an object lacks an element that is a choice name somewhere in R4 (`subject`,
    `value`) but has a typed key for it (`subjectReference`): the caller then falls back to the
    general steps, which give those values their types. Without such a key the name step finds
    nothing there either, so the walk goes on (`meta.source` of every resource did fall back)."""
    for name in names:
        out: list[Any] = []
        for value in values:
            if type(value) is dict:
                child = value.get(name)
                if child is not None:
                    if type(child) is list:
                        out.extend(child)
                    else:
                        out.append(child)
                elif name in CHOICE_NAMES and _has_choice_key(value, name):
                    return None
        if not out:
            return out
        values = out
    return values


def _has_choice_key(value: dict[str, Any], name: str) -> bool:
    """Whether the object holds choice element `name` under a typed key (`valueQuantity`)."""
    for key in value:
        hit = CHOICE_KEYS.get(key)
        if hit is not None and hit[0] == name:
            return True
    return False


_PLAIN_NAME = re.compile(r"^[A-Za-z_]\w*$")
_PLAIN_RESOLVE_IS = re.compile(r"^where\(resolve\(\)\s+is\s+(\w+)\)$")


def _plain_chain(tokens: list[str]) -> tuple[tuple[str, ...], str | None] | None:
    """(names, resolve type) when `tokens` are element names, optionally ending in `where(resolve()
    is T)`: such paths reach untyped values, so they can run on raw JSON. None for anything else
    (`as`, indexers, other functions), which the step closures evaluate."""
    resolve_is = None
    if tokens and (m := _PLAIN_RESOLVE_IS.match(tokens[-1])):
        resolve_is, tokens = m.group(1), tokens[:-1]
    if not tokens or not all(_PLAIN_NAME.match(t) for t in tokens):
        return None
    return tuple(tokens), resolve_is


@dataclass(frozen=True)
class CompiledPath:
    """One branch of a union: applies to resources of `root` type (or any, for Resource/DomainResource).

    Most R4 search expressions are plain element chains (`Observation.subject.where(resolve() is
    Patient)`); those carry `plain` and are walked over the raw JSON, making a `Node` only for the
    values reached. The step closures remain the general evaluator (`evaluate_steps`) and give the
    same nodes for plain chains too (tested on the Synthea samples).
    """

    root: str
    steps: tuple[Step, ...]
    first: str | None = None  # first element name, to skip resources that lack it
    plain: tuple[tuple[str, ...], str | None] | None = None  # (names, resolve type), see _plain_chain
    # For a fused choice cast (`Observation.value as Quantity`): the only top-level keys it can start
    # from (`valueQuantity`, or a bare `value`), a narrower test than `first`; see _first_keys.
    first_keys: tuple[str, ...] | None = None

    def evaluate(self, resource: dict[str, Any]) -> list[Node]:
        if self.plain is None:
            return self.evaluate_steps(resource)
        names, resolve_is = self.plain
        values = _plain_values([resource], names)
        if values is None:
            return self.evaluate_steps(resource)
        if resolve_is is not None:
            return [Node(v) for v in values if _reference_type(v) == resolve_is]
        return [Node(v) for v in values]

    def evaluate_steps(self, resource: dict[str, Any]) -> list[Node]:
        nodes = [Node(resource)]
        for step in self.steps:
            nodes = step(nodes)
            if not nodes:
                break
        return nodes


_DECEASED = re.compile(r"^(\w+)\.(\w+)\.exists\(\) and \1\.\2 != false$")


def compile_expression(expr: str, fast: bool = True) -> list[CompiledPath]:
    """Compile a (possibly union) search expression into branches keyed by root type.

    `fast=False` gives the general step-by-step evaluator only (no plain chains, no fused choice
    casts): the reference the fast paths are tested against."""
    branches = []
    for part in _split_top(expr, "|"):
        special = _DECEASED.match(part)
        if special:
            branches.append(CompiledPath(special.group(1), (_truthy_step(special.group(2)),)))
            continue
        if " and " in part or " or " in part or "!=" in part:
            raise UnsupportedExpression(part)
        root, steps = _compile_path(part, fast)
        assert root is not None
        first = re.match(r"^\(?\w+\.(\w+)", part)
        plain = None if part.startswith("(") or not fast else _plain_chain(_split_top(part, ".")[1:])
        branches.append(CompiledPath(root, tuple(steps), first.group(1) if first else None, plain,
                                     _first_keys(part) if fast else None))
    return branches


_FIRST_CAST = re.compile(r"^(?:\(\w+\.(\w+)\s+as\s+(\w+)\)|\w+\.(\w+)\.(?:as|ofType)\((\w+)\))")


def _first_keys(part: str) -> tuple[str, ...] | None:
    """(`valueQuantity`, `value`) for a branch that starts with a cast of a choice element, which
    `_choice_as` evaluates from exactly those two keys; None for anything else.

    Why: `first` keeps a branch for any `value[x]`, so each Observation evaluated every value-date,
    value-string, value-concept and value-quantity branch; by key, only the one it holds."""
    m = _FIRST_CAST.match(part)
    if m is None:
        return None
    name, type_name = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    wanted = _PRIMITIVE_ALIASES.get(type_name, type_name)
    if name not in CHOICE_NAMES or CHOICE_KEYS.get(name + wanted) != (name, wanted):
        return None  # not looked up by key: the general steps scan every key
    return (name + wanted, name)


def _truthy_step(name: str) -> Step:
    """`X.exists() and X != false`: true for any value of a choice like deceased[x] except false."""

    def step(nodes: list[Node]) -> list[Node]:
        values = [c.value for n in nodes for c in _children(n, name)]
        return [Node(bool(values) and values != [False], "Boolean")]

    return step


def compile_relative(expr: str, fast: bool = True) -> Callable[[Node], list[Node]]:
    """Compile a composite component expression, evaluated relative to a node (e.g. `value.as(Quantity)`)."""
    branches = []
    for part in _split_top(expr, "|"):
        tokens = _split_top(part, ".")
        steps = _compile_tokens(tokens, fast)
        plain = _plain_chain(tokens) if fast else None
        branches.append((steps, plain[0] if plain is not None and plain[1] is None else None))

    def evaluate(node: Node) -> list[Node]:
        out: list[Node] = []
        for steps, names in branches:
            if names is not None:  # a plain chain (e.g. `code`): raw values, as in CompiledPath.evaluate
                values = _plain_values([node.value], names)
                if values is not None:
                    out.extend(Node(v) for v in values)
                    continue
            nodes = [node]
            for step in steps:
                nodes = step(nodes)
            out.extend(nodes)
        return out

    return evaluate
