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
from typing import Any

from lienthong.fhir import definitions


class UnsupportedExpression(ValueError):
    """The expression uses FHIRPath beyond the compiled subset."""


@dataclass(frozen=True, slots=True)
class Node:
    """A value reached by a path, with its FHIR type when the path knows it (choice types)."""

    value: Any
    type: str | None = None


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
        parts = ref.split("/")
        # Type/id, or absolute .../Type/id, possibly with /_history/n
        if len(parts) >= 4 and parts[-2] == "_history":
            return parts[-4]
        return parts[-2]
    declared = value.get("type")
    return declared if isinstance(declared, str) else None


def _type_filter(type_name: str) -> Step:
    wanted = _PRIMITIVE_ALIASES.get(type_name, type_name)

    def step(nodes: list[Node]) -> list[Node]:
        out = []
        for n in nodes:
            if n.type == wanted or (n.type is None and _shape_is(n.value, wanted)):
                out.append(Node(n.value, wanted))
        return out

    return step


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
                if type(child) is list:
                    out.extend([Node(item) for item in child])
                else:
                    out.append(Node(child))
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


def _compile_path(expr: str) -> tuple[str | None, list[Step]]:
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
        root, inner_steps = _compile_path(m.group(1))
        steps = [*inner_steps, _type_filter(m.group(2))]
        if rest:
            if not rest.startswith("."):
                raise UnsupportedExpression(expr)
            for token in _split_top(rest[1:], "."):
                steps.extend(_compile_step(token))
        return root, steps
    tokens = _split_top(expr, ".")
    root = tokens[0] if tokens and re.match(r"^[A-Z]\w*$", tokens[0]) else None
    if root is None:
        raise UnsupportedExpression(expr)
    for token in tokens[1:]:
        steps.extend(_compile_step(token))
    return root, steps


@dataclass(frozen=True)
class CompiledPath:
    """One branch of a union: applies to resources of `root` type (or any, for Resource/DomainResource)."""

    root: str
    steps: tuple[Step, ...]
    first: str | None = None  # first element name, to skip resources that lack it

    def evaluate(self, resource: dict[str, Any]) -> list[Node]:
        nodes = [Node(resource)]
        for step in self.steps:
            nodes = step(nodes)
            if not nodes:
                break
        return nodes


_DECEASED = re.compile(r"^(\w+)\.(\w+)\.exists\(\) and \1\.\2 != false$")


def compile_expression(expr: str) -> list[CompiledPath]:
    """Compile a (possibly union) search expression into branches keyed by root type."""
    branches = []
    for part in _split_top(expr, "|"):
        special = _DECEASED.match(part)
        if special:
            branches.append(CompiledPath(special.group(1), (_truthy_step(special.group(2)),)))
            continue
        if " and " in part or " or " in part or "!=" in part:
            raise UnsupportedExpression(part)
        root, steps = _compile_path(part)
        assert root is not None
        first = re.match(r"^\(?\w+\.(\w+)", part)
        branches.append(CompiledPath(root, tuple(steps), first.group(1) if first else None))
    return branches


def _truthy_step(name: str) -> Step:
    """`X.exists() and X != false`: true for any value of a choice like deceased[x] except false."""

    def step(nodes: list[Node]) -> list[Node]:
        values = [c.value for n in nodes for c in _children(n, name)]
        return [Node(bool(values) and values != [False], "Boolean")]

    return step


def compile_relative(expr: str) -> Callable[[Node], list[Node]]:
    """Compile a composite component expression, evaluated relative to a node (e.g. `value.as(Quantity)`)."""
    branches = []
    for part in _split_top(expr, "|"):
        steps: list[Step] = []
        for token in _split_top(part, "."):
            steps.extend(_compile_step(token))
        branches.append(steps)

    def evaluate(node: Node) -> list[Node]:
        out: list[Node] = []
        for steps in branches:
            nodes = [node]
            for step in steps:
                nodes = step(nodes)
            out.extend(nodes)
        return out

    return evaluate
