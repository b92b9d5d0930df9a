"""Parse FHIR search query parameters into typed criteria, independent of any database.

Why: the grammar of search (modifiers, prefixes, escaping, chains, `_has`,
composites) is FHIR semantics, not SQL. Parsing it once into plain objects lets
the storage layer translate criteria to SQL and lets this layer reject bad
values with a precise OperationOutcome before any query runs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

from lienthong.fhir.datetimes import DateFormatError, parse_range
from lienthong.fhir.outcome import FhirError, OutcomeIssue, error
from lienthong.fhir.search_params import COLUMN_PARAMS, SearchParam, SearchRegistry
from lienthong.text import fold, nfc

PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
RESULT_PARAMS = {
    "_count", "_sort", "_include", "_revinclude", "_total", "_summary", "_elements", "_format",
    "_pretty", "_getpages", "_offset", "_contained", "_containedType",
}
MAX_COUNT = 1000
DEFAULT_COUNT = 20
MAX_CHAIN = 3
MAX_VALUES = 100  # OR-values in one parameter

_MODIFIERS = {
    "string": {"exact", "contains", "missing"},
    "token": {"not", "text", "of-type", "missing"},
    "date": {"missing"},
    "number": {"missing"},
    "quantity": {"missing"},
    "uri": {"below", "above", "missing"},
    "reference": {"identifier", "missing"},
    "composite": {"missing"},
}


@dataclass(frozen=True)
class TokenValue:
    system: str | None  # None: any system, unless no_system
    code: str | None  # None: any code in the system
    no_system: bool = False  # "|code": only codes without a system
    type_code: str | None = None  # identifier:of-type


@dataclass(frozen=True)
class RangeValue:
    """A prefixed date/number/quantity value read as an inclusive range [lo, hi]."""

    prefix: str
    lo: float
    hi: float
    value: float = 0.0
    system: str | None = None  # quantity only
    code: str | None = None


@dataclass(frozen=True)
class StringValue:
    text: str  # NFC, as typed
    folded: str


@dataclass(frozen=True)
class ReferenceValue:
    type: str | None
    id: str | None
    url: str | None = None


@dataclass(frozen=True)
class CompositeValue:
    parts: tuple[object, ...]


Value = TokenValue | RangeValue | StringValue | ReferenceValue | CompositeValue


@dataclass
class Criterion:
    """One search parameter with its OR-ed values; a chain or `_has` nests another criterion."""

    resource_type: str
    code: str
    type: str
    modifier: str | None = None
    values: list[Value] = field(default_factory=list)
    param: SearchParam | None = None  # None for _id/_lastUpdated, served from the resource table
    chain_type: str | None = None  # target type of a chained reference
    chain: Criterion | None = None
    has_type: str | None = None  # _has: the referring type and its reference parameter
    has_param: SearchParam | None = None
    missing: bool | None = None

    @property
    def plain(self) -> bool:
        """A parameter's own values, as typed: no modifier, `:missing`, chain or `_has`."""
        return (self.param is not None and self.modifier is None and self.missing is None and self.chain is None
                and bool(self.values))


@dataclass(frozen=True)
class Include:
    source_type: str
    param: SearchParam | None  # None: `*`, every reference parameter
    target_type: str | None
    iterate: bool
    reverse: bool


@dataclass
class SearchQuery:
    resource_type: str | None  # None: system-level
    criteria: list[Criterion] = field(default_factory=list)
    sort: list[tuple[str, bool, SearchParam | None]] = field(default_factory=list)  # (code, descending, param)
    count: int = DEFAULT_COUNT
    includes: list[Include] = field(default_factory=list)
    total: str | None = None  # none | estimate | accurate
    summary: str | None = None
    elements: list[str] | None = None
    self_params: list[tuple[str, str]] = field(default_factory=list)  # understood params, for the self link
    getpages: str | None = None
    offset: int = 0


def split_values(raw: str) -> list[str]:
    """Split on unescaped commas (OR)."""
    parts, buf, i = [], [], 0
    while i < len(raw):
        ch = raw[i]
        if ch == "\\" and i + 1 < len(raw):
            buf.append(raw[i : i + 2])
            i += 2
            continue
        if ch == ",":
            parts.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
        i += 1
    parts.append("".join(buf))
    return parts


def _split_unescaped(raw: str, sep: str) -> list[str]:
    parts, buf, i = [], [], 0
    while i < len(raw):
        ch = raw[i]
        if ch == "\\" and i + 1 < len(raw):
            buf.append(raw[i : i + 2])
            i += 2
            continue
        if ch == sep:
            parts.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
        i += 1
    parts.append("".join(buf))
    return parts


def unescape(raw: str) -> str:
    return re.sub(r"\\([\\,$|])", r"\1", raw)


def _bad(param: str, vi: str, en: str) -> FhirError:
    return error(400, "invalid", f"Tham số '{param}': {vi}", f"Parameter '{param}': {en}")


class QueryParser:
    """Turns (name, value) pairs into a SearchQuery against the registry."""

    def __init__(self, registry: SearchRegistry) -> None:
        self.registry = registry

    def parse(
        self, resource_type: str | None, params: list[tuple[str, str]], strict: bool = False
    ) -> tuple[SearchQuery, list[OutcomeIssue]]:
        """Return the query and the warnings for parameters ignored under lenient handling."""
        query = SearchQuery(resource_type)
        ignored: list[OutcomeIssue] = []
        for name, raw in params:
            try:
                self._one(query, name, raw)
            except _Unknown as exc:
                issue = OutcomeIssue("warning" if not strict else "error", "not-supported", str(exc))
                if strict:
                    raise FhirError(400, [issue]) from None
                ignored.append(issue)
        if resource_type is not None and self.registry.fusible.get(resource_type):
            query.criteria = fuse_code_and_quantity(query.criteria, self.registry.fusible[resource_type])
        return query, ignored

    def _one(self, query: SearchQuery, name: str, raw: str) -> None:
        if len(raw) > 4096:
            raise _bad(name, "giá trị quá dài", "value too long")
        if "\x00" in raw:  # no stored text holds NUL, and PostgreSQL refuses it as a parameter
            raise _bad(name, "giá trị chứa ký tự NUL", "value contains the NUL character")
        if name in RESULT_PARAMS or name.split(":", 1)[0] in ("_include", "_revinclude"):
            self._result_param(query, name, raw)
            return
        rtype = query.resource_type
        if rtype is None:
            if name in ("_id", "_lastUpdated"):
                crit = self._criterion("Resource", name, raw)
                query.criteria.append(crit)
                query.self_params.append((name, raw))
                return
            raise _Unknown(f"Không hỗ trợ tham số '{name}' ở mức hệ thống / Unsupported system-level parameter '{name}'")
        if name.startswith("_has:"):
            query.criteria.append(self._has(rtype, name, raw))
        else:
            query.criteria.append(self._criterion(rtype, name, raw))
        query.self_params.append((name, raw))

    def _result_param(self, query: SearchQuery, name: str, raw: str) -> None:
        if name == "_count":
            if not raw.isdigit():
                raise _bad(name, "phải là số nguyên không âm", "must be a non-negative integer")
            query.count = min(int(raw), MAX_COUNT)
        elif name == "_offset":
            if not raw.isdigit():
                raise _bad(name, "phải là số nguyên không âm", "must be a non-negative integer")
            query.offset = int(raw)
            return
        elif name == "_getpages":
            if not re.fullmatch(r"[0-9a-f]{32}", raw):
                raise error(410, "not-found", "Trang kết quả không còn", "Search result page has expired")
            query.getpages = raw
            return
        elif name == "_sort":
            for key in raw.split(","):
                desc = key.startswith("-")
                code = key[1:] if desc else key
                if code in COLUMN_PARAMS:
                    query.sort.append((code, desc, None))
                    continue
                param = self.registry.get(query.resource_type or "", code)
                if param is None or param.type in ("composite", "reference"):
                    raise _Unknown(f"Không sắp xếp được theo '{code}' / Cannot sort by '{code}'")
                query.sort.append((code, desc, param))
        elif name == "_total":
            if raw not in ("none", "estimate", "accurate"):
                raise _bad(name, "giá trị không hợp lệ", "must be none, estimate or accurate")
            query.total = raw
        elif name == "_summary":
            if raw not in ("true", "false", "text", "data", "count"):
                raise _bad(name, "giá trị không hợp lệ", "must be true, false, text, data or count")
            query.summary = raw
        elif name == "_elements":
            query.elements = [e.strip() for e in raw.split(",") if e.strip()]
        elif name.split(":", 1)[0] in ("_include", "_revinclude"):  # also :iterate and :recurse
            if name.partition(":")[2] not in ("", "iterate", "recurse"):
                raise _Unknown(f"Không hỗ trợ '{name}' / '{name}' is not supported")
            query.includes.append(self._include(query.resource_type, name, raw))
        elif name in ("_format", "_pretty"):
            return  # handled by the HTTP layer, never echoed into paging links
        else:
            raise _Unknown(f"Không hỗ trợ '{name}' / '{name}' is not supported")
        query.self_params.append((name, raw))

    def _include(self, rtype: str | None, name: str, raw: str) -> Include:
        iterate = name.endswith(":iterate") or name.endswith(":recurse")
        parts = raw.split(":")
        if len(parts) < 2 or len(parts) > 3:
            raise _bad(name, "cần dạng Loại:tham-số[:Loại-đích]", "expected Type:param[:TargetType]")
        source, code = parts[0], parts[1]
        target = parts[2] if len(parts) == 3 else None
        if source not in self.registry.by_type:
            raise _bad(name, f"loại tài nguyên không biết '{source}'", f"unknown resource type '{source}'")
        reverse = name.startswith("_revinclude")
        if not reverse and not iterate and rtype is not None and source != rtype:
            raise _bad(name, "loại nguồn phải là loại đang tìm", "source type must be the searched type")
        if code == "*":
            return Include(source, None, target, iterate, reverse)
        param = self.registry.get(source, code)
        if param is None or param.type != "reference":
            raise _bad(name, f"'{code}' không phải tham số tham chiếu", f"'{code}' is not a reference parameter")
        if target and target not in self.registry.by_type:
            raise _bad(name, f"loại đích không biết '{target}'", f"unknown target type '{target}'")
        return Include(source, param, target, iterate, reverse)

    def _has(self, rtype: str, name: str, raw: str) -> Criterion:
        parts = name.split(":", 3)
        if len(parts) != 4:
            raise _bad(name, "cần dạng _has:Loại:tham-chiếu:tham-số", "expected _has:Type:reference:param")
        _, htype, ref_code, inner = parts
        if htype not in self.registry.by_type:
            raise _bad(name, f"loại không biết '{htype}'", f"unknown type '{htype}'")
        ref_param = self.registry.get(htype, ref_code)
        if ref_param is None or ref_param.type != "reference":
            raise _bad(name, f"'{ref_code}' không phải tham chiếu", f"'{ref_code}' is not a reference parameter")
        if inner.startswith("_has:"):
            raise _Unknown("Chỉ hỗ trợ _has một mức / Only one level of _has is supported")
        inner_crit = self._criterion(htype, inner, raw)
        return Criterion(rtype, name, "has", has_type=htype, has_param=ref_param, chain=inner_crit)

    def _criterion(self, rtype: str, name: str, raw: str, depth: int = 0) -> Criterion:
        head, _, rest = name.partition(".")
        code, _, modifier = head.partition(":")
        if code in COLUMN_PARAMS:
            ptype = COLUMN_PARAMS[code]
            param = None
        else:
            found = self.registry.get(rtype, code)
            if found is None:
                raise _Unknown(f"Không hỗ trợ tham số '{code}' cho {rtype} / Unknown search parameter '{code}' for {rtype}")
            param, ptype = found, found.type
        if rest:  # chained search
            if ptype != "reference" or param is None:
                raise _bad(name, "chỉ xâu chuỗi qua tham chiếu", "chains need a reference parameter")
            if depth >= MAX_CHAIN:
                raise _bad(name, "chuỗi quá dài", "chain too deep")
            target = modifier or None
            candidates = [target] if target else [t for t in param.targets if t in self.registry.by_type]
            if target and target not in self.registry.by_type:
                raise _bad(name, f"loại không biết '{target}'", f"unknown type '{target}'")
            usable = [t for t in candidates if self._chain_ok(t, rest)]
            if len(usable) != 1:
                raise _bad(name, "chuỗi mơ hồ, hãy nêu loại đích (vd subject:Patient.name)",
                           "ambiguous chain; name the target type (e.g. subject:Patient.name)")
            inner = self._criterion(usable[0], rest, raw, depth + 1)
            return Criterion(rtype, code, ptype, param=param, chain_type=usable[0], chain=inner)
        crit = Criterion(rtype, code, ptype, modifier or None, param=param)
        if modifier == "missing":
            if raw not in ("true", "false"):
                raise _bad(name, ":missing cần true hoặc false", ":missing takes true or false")
            crit.missing = raw == "true"
            return crit
        if modifier:
            allowed = _MODIFIERS.get(ptype, set())
            is_type_modifier = ptype == "reference" and modifier in self.registry.by_type
            if modifier not in allowed and not is_type_modifier:
                raise _Unknown(f"Không hỗ trợ bổ ngữ ':{modifier}' cho '{code}' / Unsupported modifier ':{modifier}' on '{code}'")
        values = split_values(raw)
        if len(values) > MAX_VALUES:
            raise _bad(name, "quá nhiều giá trị", "too many values")
        for value in values:
            if value == "":
                raise _bad(name, "giá trị rỗng", "empty value")
            crit.values.append(self._value(crit, value))
        return crit

    def _chain_ok(self, rtype: str, rest: str) -> bool:
        head = rest.split(".", 1)[0].split(":", 1)[0]
        return head in COLUMN_PARAMS or self.registry.get(rtype, head) is not None

    def _value(self, crit: Criterion, raw: str) -> Value:
        ptype, name = crit.type, crit.code
        if ptype == "composite":
            assert crit.param is not None
            parts = _split_unescaped(raw, "$")
            comps = crit.param.components
            if len(parts) != len(comps):
                raise _bad(name, f"cần {len(comps)} thành phần nối bằng $", f"expected {len(comps)} components joined by $")
            return CompositeValue(tuple(self._typed(c.type, name, p, None) for c, p in zip(comps, parts, strict=True)))
        return self._typed(ptype, name, raw, crit.modifier)

    def _typed(self, ptype: str, name: str, raw: str, modifier: str | None) -> Value:
        if ptype == "token":
            return _token(name, raw, modifier)
        if ptype == "string":
            return StringValue(nfc(unescape(raw)), fold(unescape(raw)))
        if ptype == "uri":
            return StringValue(unescape(raw), unescape(raw))
        if ptype == "date":
            return _date(name, raw)
        if ptype == "number":
            return _number(name, raw)
        if ptype == "quantity":
            return _quantity(name, raw)
        if ptype == "reference":
            return _reference(name, raw, modifier)
        raise _Unknown(f"Không hỗ trợ kiểu tham số '{ptype}' / Unsupported parameter type '{ptype}'")


MAX_FUSED_ALTERNATIVES = 64


def fuse_code_and_quantity(criteria: list[Criterion],
                           fusible: dict[tuple[str, str], SearchParam]) -> list[Criterion]:
    """`code=A,B&value-quantity=gtV` as the composite `code-value-quantity=A$gtV,B$gtV`: the same resources.

    Why: on a large database the two separate criteria each match a large set (every Observation with the
    code; every value above V in any code), and intersecting them costs a probe per member, where the
    composite reads one index range. `fusible` holds only composites for which the rewrite is exact (see
    SearchRegistry._fusible). Only plain criteria are fused; the first pair found, once."""
    for (token_code, quantity_code), composite in fusible.items():
        token = next((c for c in criteria if c.plain and c.type == "token" and c.code == token_code), None)
        quantity = next((c for c in criteria if c.plain and c.type == "quantity" and c.code == quantity_code), None)
        if token is None or quantity is None or len(token.values) * len(quantity.values) > MAX_FUSED_ALTERNATIVES:
            continue
        fused = Criterion(token.resource_type, composite.code, "composite", param=composite,
                          values=[CompositeValue((t, q)) for t in token.values for q in quantity.values])
        criteria = [fused if c is token else c for c in criteria if c is not quantity]
    return criteria


class _Unknown(Exception):
    """An unknown or unsupported parameter: 400 under strict handling, ignored otherwise."""


def _token(name: str, raw: str, modifier: str | None) -> TokenValue:
    if modifier == "text":
        return TokenValue(None, fold(unescape(raw)))
    parts = _split_unescaped(raw, "|")
    if modifier == "of-type":
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise _bad(name, ":of-type cần hệ|mã|giá-trị", ":of-type expects system|code|value")
        return TokenValue(unescape(parts[0]) or None, f"{unescape(parts[1])}|{unescape(parts[2])}")
    if len(parts) == 1:
        return TokenValue(None, unescape(parts[0]))
    if len(parts) == 2:
        system, code = unescape(parts[0]), unescape(parts[1])
        if not system and not code:
            raise _bad(name, "giá trị rỗng", "empty token")
        return TokenValue(system or None, code or None, no_system=not system)
    raise _bad(name, "mã có quá nhiều dấu |", "too many '|' in token")


def _prefix(raw: str) -> tuple[str, str]:
    if raw[:2] in PREFIXES and len(raw) > 2 and not raw[2:3].isalpha():
        return raw[:2], raw[2:]
    return "eq", raw


def _date(name: str, raw: str) -> RangeValue:
    prefix, text = _prefix(raw)
    try:
        lo, hi = parse_range(text.replace(" ", "+"))  # an unencoded '+' in a query string arrives as space
    except DateFormatError:
        raise _bad(name, f"ngày không hợp lệ '{raw}'", f"invalid date '{raw}'") from None
    return RangeValue(prefix, lo, hi, float(lo))


def _decimal_range(name: str, text: str) -> tuple[float, float, float]:
    try:
        dec = Decimal(text)
    except InvalidOperation:
        raise _bad(name, f"số không hợp lệ '{text}'", f"invalid number '{text}'") from None
    if not dec.is_finite():
        raise _bad(name, f"số không hợp lệ '{text}'", f"invalid number '{text}'")
    exponent = dec.as_tuple().exponent
    assert isinstance(exponent, int)
    half = Decimal(5).scaleb(exponent - 1)  # implicit precision: 100 means [99.5, 100.5)
    value = float(dec)
    if not math.isfinite(value):
        raise _bad(name, f"số quá lớn '{text}'", f"number out of range '{text}'")
    return value, float(dec - half), float(dec + half)


def _number(name: str, raw: str) -> RangeValue:
    prefix, text = _prefix(raw)
    value, lo, hi = _decimal_range(name, text)
    return RangeValue(prefix, lo, hi, value)


def _quantity(name: str, raw: str) -> RangeValue:
    prefix, text = _prefix(raw)
    parts = _split_unescaped(text, "|")
    if len(parts) not in (1, 3):
        raise _bad(name, "cần số|hệ|mã", "expected number|system|code")
    value, lo, hi = _decimal_range(name, parts[0])
    system = unescape(parts[1]) or None if len(parts) == 3 else None
    code = unescape(parts[2]) or None if len(parts) == 3 else None
    return RangeValue(prefix, lo, hi, value, system, code)


_ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


def _reference(name: str, raw: str, modifier: str | None) -> Value:
    raw = unescape(raw)
    if modifier == "identifier":
        return _token(name, raw, None)
    type_hint = modifier if modifier and modifier[:1].isupper() else None
    if "://" in raw or raw.startswith("urn:"):
        parts = raw.rstrip("/").split("/")
        if len(parts) >= 2 and parts[-2][:1].isupper() and _ID_RE.match(parts[-1]):
            return ReferenceValue(parts[-2], parts[-1], raw)
        return ReferenceValue(None, None, raw.split("|", 1)[0])
    parts = raw.split("/")
    if len(parts) == 2 and _ID_RE.match(parts[1]):
        return ReferenceValue(parts[0], parts[1])
    if len(parts) == 1 and _ID_RE.match(parts[0]):
        return ReferenceValue(type_hint, parts[0])
    raise _bad(name, f"tham chiếu không hợp lệ '{raw}'", f"invalid reference '{raw}'")
