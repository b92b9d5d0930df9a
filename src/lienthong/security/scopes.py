"""SMART App Launch v2 scopes (`patient/*.rs`, `user/Observation.cruds`, `system/*.rs`), with v1 aliases.

Why parse once: every request checks its scopes; a parsed, frozen set makes the
check a couple of set lookups.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_SCOPE = re.compile(r"^(patient|user|system)/(\*|[A-Z][A-Za-z]+)\.(\*|read|write|[cruds]+)$")
_V1 = {"read": "rs", "write": "cud", "*": "cruds"}


@dataclass(frozen=True)
class Scope:
    context: str  # patient | user | system
    resource_type: str  # a type or *
    letters: frozenset[str]

    def allows(self, rtype: str | None, letter: str) -> bool:
        return letter in self.letters and (self.resource_type == "*" or self.resource_type == rtype)


class ScopeError(ValueError):
    pass


def parse_scope(text: str) -> Scope:
    match = _SCOPE.match(text)
    if not match:
        raise ScopeError(f"phạm vi không hợp lệ '{text}' / invalid scope '{text}'")
    context, rtype, perms = match.groups()
    letters = _V1.get(perms, perms)
    if list(letters) != sorted(set(letters), key="cruds".index):
        raise ScopeError(f"quyền phải theo thứ tự cruds '{text}' / permissions must be in cruds order")
    return Scope(context, rtype, frozenset(letters))


def parse_scopes(text: str) -> tuple[list[Scope], list[str]]:
    """Split a space-separated scope string into resource scopes and other scopes (openid, offline_access...)."""
    resource, other = [], []
    for item in text.split():
        if "/" in item:
            resource.append(parse_scope(item))
        else:
            other.append(item)
    return resource, other


def allows(scopes: list[Scope], rtype: str | None, letter: str) -> bool:
    return any(s.allows(rtype, letter) for s in scopes)


def narrow(requested: list[Scope], granted: list[Scope]) -> list[Scope]:
    """Keep only the requested scopes that the grant covers (a token never exceeds its grant)."""
    out = []
    for req in requested:
        letters = frozenset(
            letter for letter in req.letters
            if any(g.context == req.context and (g.resource_type in ("*", req.resource_type)) and letter in g.letters
                   for g in granted)
        )
        if letters:
            out.append(Scope(req.context, req.resource_type, letters))
    return out


def render(scopes: list[Scope]) -> str:
    return " ".join(f"{s.context}/{s.resource_type}.{''.join(sorted(s.letters, key='cruds'.index))}" for s in scopes)
