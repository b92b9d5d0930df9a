"""Translate parsed search criteria into SQL over the typed index tables.

Why: each criterion becomes a semi-join (`res_pk IN (SELECT ... FROM sp_x ...)`)
on a narrow, indexed table, which both PostgreSQL and SQLite plan well. Chains
and `_has` nest the same construction. Every value is a bound parameter, so no
search value can change the SQL.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import ColumnElement, FromClause, Select, and_, false, func, not_, or_, select, true

from lienthong.fhir.search_params import SearchParam
from lienthong.fhir.search_query import (
    CompositeValue,
    Criterion,
    RangeValue,
    ReferenceValue,
    SearchQuery,
    StringValue,
    TokenValue,
)
from lienthong.storage.schema import INDEX_TABLES, resource


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _token_match(t: FromClause, v: TokenValue, code: str = "code", system: str = "system") -> ColumnElement[bool]:
    conds: list[ColumnElement[bool]] = []
    if v.code is not None:
        conds.append(t.c[code] == v.code)
    if v.no_system:
        conds.append(t.c[system].is_(None))
    elif v.system is not None:
        conds.append(t.c[system] == v.system)
    return and_(*conds) if conds else true()


def _text_match(t: FromClause, folded: str) -> ColumnElement[bool]:
    pattern = _like_escape(folded)
    return or_(t.c.text.like(pattern + "%", escape="\\"), t.c.text.like("% " + pattern + "%", escape="\\"))


def _range_match(col: ColumnElement[Any], v: RangeValue, hi_col: ColumnElement[Any] | None = None) -> ColumnElement[bool]:
    """Range semantics for dates (lo/hi columns) and points for numbers (hi_col None)."""
    lo_c = col
    hi_c = hi_col if hi_col is not None else col
    p = v.prefix
    if hi_col is None:  # a stored point value against the search range
        if p == "eq":
            return and_(col >= v.lo, col < v.hi)
        if p == "ne":
            return or_(col < v.lo, col >= v.hi)
        if p in ("gt", "sa"):
            return col > v.value
        if p in ("lt", "eb"):
            return col < v.value
        if p == "ge":
            return col >= v.value
        if p == "le":
            return col <= v.value
        delta = abs(v.value) * 0.1
        return and_(col >= v.value - delta, col <= v.value + delta)
    if p == "eq":
        return and_(lo_c >= v.lo, hi_c <= v.hi)
    if p == "ne":
        return or_(lo_c < v.lo, hi_c > v.hi)
    if p == "gt":
        return hi_c > v.hi
    if p == "lt":
        return lo_c < v.lo
    if p == "ge":
        return hi_c >= v.lo
    if p == "le":
        return lo_c <= v.hi
    if p == "sa":
        return lo_c > v.hi
    if p == "eb":
        return hi_c < v.lo
    span = max((v.hi - v.lo) * 0.1, 86_400_000_000.0)  # ap: 10 % of the range, at least a day
    return and_(lo_c <= v.hi + span, hi_c >= v.lo - span)


def _value_match(t: FromClause, ptype: str, value: object, modifier: str | None) -> ColumnElement[bool]:
    if ptype == "token":
        assert isinstance(value, TokenValue)
        if modifier == "text":
            return _text_match(t, value.code or "")
        return _token_match(t, value)
    if ptype == "string":
        assert isinstance(value, StringValue)
        if modifier == "exact":
            return t.c.exact == value.text
        pattern = _like_escape(value.folded)
        if modifier == "contains":
            return t.c.norm.like("%" + pattern + "%", escape="\\")
        return t.c.norm.like(pattern + "%", escape="\\")
    if ptype == "uri":
        assert isinstance(value, StringValue)
        if modifier == "below":
            return t.c.uri.like(_like_escape(value.text) + "%", escape="\\")
        if modifier == "above":
            return func.substr(value.text, 1, func.length(t.c.uri)) == t.c.uri
        return t.c.uri == value.text
    if ptype == "date":
        assert isinstance(value, RangeValue)
        return _range_match(t.c.lo, value, t.c.hi)
    if ptype == "number":
        assert isinstance(value, RangeValue)
        return _range_match(t.c.value, value)
    if ptype == "quantity":
        assert isinstance(value, RangeValue)
        conds = [_range_match(t.c.value, value)]
        if value.system is not None:
            conds.append(t.c.system == value.system)
        if value.code is not None:
            conds.append(or_(t.c.code == value.code, t.c.unit == value.code))
        return and_(*conds)
    if ptype == "reference":
        if isinstance(value, TokenValue):  # :identifier
            return _token_match(t, value)
        assert isinstance(value, ReferenceValue)
        by_id = t.c.target_id == value.id
        if value.type is not None:
            by_id = and_(by_id, t.c.target_type == value.type)
        if value.url is not None:
            return or_(t.c.url == value.url, by_id) if value.id else t.c.url == value.url
        return by_id
    raise ValueError(ptype)


class CriteriaCompiler:
    """Builds WHERE clauses; `res` is the resource-table alias being filtered.

    `restrict(type, alias)` gives the access-control condition for resources reached inside chains and
    `_has`, so that a criterion can never test facts about resources the caller may not see."""

    def __init__(self, restrict: Callable[[str | None, FromClause], ColumnElement[bool] | None] | None = None) -> None:
        self.restrict = restrict

    def _restricted(self, rtype: str | None, alias: FromClause) -> list[ColumnElement[bool]]:
        if self.restrict is None:
            return []
        clause = self.restrict(rtype, alias)
        return [] if clause is None else [clause]

    def clause(self, crit: Criterion, res: FromClause) -> ColumnElement[bool]:
        if crit.type == "has":
            return self._has(crit, res)
        if crit.param is None:
            return self._column_param(crit, res)
        param = crit.param
        if crit.chain is not None:
            return self._chain(crit, res)
        if crit.type == "composite":
            return self._composite(crit, res)
        ptype = crit.type
        table = INDEX_TABLES["token" if crit.modifier in ("identifier", "of-type") else ptype]
        if crit.missing is not None:
            present: ColumnElement[bool] = res.c.res_pk.in_(select(table.c.res_pk).where(table.c.pkey == param.key))
            if ptype == "reference":  # a logical reference (identifier only) is a value too
                tokens = INDEX_TABLES["token"]
                present = or_(present, res.c.res_pk.in_(
                    select(tokens.c.res_pk).where(tokens.c.pkey == param.identifier_key)))
            return not_(present) if crit.missing else present
        sub = self.matching(crit)
        if crit.modifier == "not":
            return not_(res.c.res_pk.in_(sub))
        return res.c.res_pk.in_(sub)

    @staticmethod
    def matching(crit: Criterion) -> Select[Any]:
        """res_pk of the index rows that match a plain criterion (`:not` negates it outside)."""
        assert crit.param is not None
        identifier = crit.modifier in ("identifier", "of-type")
        table = INDEX_TABLES["token" if identifier else crit.type]
        key = crit.param.identifier_key if identifier else crit.param.key
        modifier = None if crit.modifier in ("not", "of-type", "identifier") else crit.modifier
        if crit.type == "reference" and crit.modifier and crit.modifier[:1].isupper():
            modifier = None
        matches = or_(*[_value_match(table, "token" if identifier else crit.type, v, modifier) for v in crit.values])
        return select(table.c.res_pk).where(table.c.pkey == key, matches)

    def _column_param(self, crit: Criterion, res: FromClause) -> ColumnElement[bool]:
        if crit.code == "_id":
            if crit.missing is not None:
                return false() if crit.missing else true()
            ids = [v.code for v in crit.values if isinstance(v, TokenValue) and v.code]
            cond = res.c.rid.in_(ids)
            return not_(cond) if crit.modifier == "not" else cond
        if crit.missing is not None:
            return false() if crit.missing else true()
        return or_(*[_range_match(res.c.last_updated, v, res.c.last_updated)
                     for v in crit.values if isinstance(v, RangeValue)])

    def _chain(self, crit: Criterion, res: FromClause) -> ColumnElement[bool]:
        assert crit.param is not None and crit.chain is not None and crit.chain_type is not None
        target = resource.alias()
        target_ids = select(target.c.rid).where(
            target.c.rtype == crit.chain_type, target.c.deleted == false(), self.clause(crit.chain, target),
            *self._restricted(crit.chain_type, target),
        )
        ref = INDEX_TABLES["reference"]
        sub = select(ref.c.res_pk).where(
            ref.c.pkey == crit.param.key, ref.c.target_type == crit.chain_type, ref.c.target_id.in_(target_ids)
        )
        return res.c.res_pk.in_(sub)

    def _has(self, crit: Criterion, res: FromClause) -> ColumnElement[bool]:
        assert crit.has_param is not None and crit.chain is not None
        source = resource.alias()
        ref = INDEX_TABLES["reference"]
        sub = (
            select(ref.c.target_id)
            .join(source, source.c.res_pk == ref.c.res_pk)
            .where(
                ref.c.pkey == crit.has_param.key,
                ref.c.target_type == crit.resource_type,
                source.c.deleted == false(),
                self.clause(crit.chain, source),
                *self._restricted(crit.has_type, source),
            )
        )
        return res.c.rid.in_(sub)

    def _composite(self, crit: Criterion, res: FromClause) -> ColumnElement[bool]:
        param = crit.param
        assert param is not None
        if crit.missing is not None:
            first = INDEX_TABLES[param.components[0].type]
            present = res.c.res_pk.in_(select(first.c.res_pk).where(first.c.pkey == param.component_key(0)))
            return not_(present) if crit.missing else present
        if param.codes_a_quantity:
            return self._coded_quantity(crit, res)
        alternatives = []
        for value in crit.values:
            assert isinstance(value, CompositeValue)
            aliases = [INDEX_TABLES[c.type].alias() for c in param.components]
            conds: list[ColumnElement[bool]] = []
            for i, (alias, comp, part) in enumerate(zip(aliases, param.components, value.parts, strict=True)):
                conds.append(alias.c.pkey == param.component_key(i))
                conds.append(_value_match(alias, comp.type, part, None))
                if i:
                    conds.append(alias.c.res_pk == aliases[0].c.res_pk)
                    conds.append(alias.c.grp == aliases[0].c.grp)
            alternatives.append(res.c.res_pk.in_(select(aliases[0].c.res_pk).where(*conds)))
        return or_(*alternatives)

    @staticmethod
    def _coded_quantity(crit: Criterion, res: FromClause) -> ColumnElement[bool]:
        """A token$quantity composite from its paired rows: one index range per alternative."""
        assert crit.param is not None
        table = INDEX_TABLES["coded_quantity"]
        alternatives = []
        for value in crit.values:
            assert isinstance(value, CompositeValue)
            token, quantity = value.parts
            assert isinstance(token, TokenValue)
            alternatives.append(and_(_token_match(table, token, "tcode", "tsystem"),
                                     _value_match(table, "quantity", quantity, None)))
        sub = select(table.c.res_pk).where(table.c.pkey == crit.param.key, or_(*alternatives))
        return res.c.res_pk.in_(sub)


def _sort_key(code: str, desc: bool, param: SearchParam | None, res: FromClause) -> Any:
    if code == "_id":
        col: Any = res.c.rid
    elif code == "_lastUpdated":
        col = res.c.last_updated
    else:
        assert param is not None
        table = INDEX_TABLES[param.type]
        column = {
            "string": table.c.get("norm"),
            "token": table.c.get("code"),
            "date": table.c.get("hi" if desc else "lo"),
            "number": table.c.get("value"),
            "quantity": table.c.get("value"),
            "uri": table.c.get("uri"),
        }[param.type]
        assert column is not None
        agg = func.max(column) if desc else func.min(column)
        col = (
            select(agg)
            .where(table.c.res_pk == res.c.res_pk, table.c.pkey == param.key)
            .scalar_subquery()
        )
        # Resources without the value come last either way, on both backends (their defaults differ).
        return col.desc().nulls_last() if desc else col.asc().nulls_last()
    return col.desc() if desc else col.asc()


def _in_resource_order(query: SearchQuery) -> Criterion | None:
    """In a population-wide search in the default order, a criterion whose matches the token index gives in
    res_pk order: one code in one system.

    Why: written as a join on its DISTINCT ids (not `IN`), the planner can walk that index in order, look up
    each resource and stop at the page's LIMIT; as a semi-join it hashes every match first (PostgreSQL keeps
    one way of making the ids unique, and the hash loses the order), so a population-wide code costs a
    lookup per matching resource instead of per listed one. Not with `_sort` (no early stop), and not beside
    a reference or `_id` criterion: those select few resources, and the semi-join lets the planner check the
    code for each of them where the join would have to list every match of the code first."""
    if query.sort or any(c.type in ("reference", "has") or c.code == "_id" or c.chain is not None
                         for c in query.criteria):
        return None
    for crit in query.criteria:
        if crit.plain and crit.type == "token" and len(crit.values) == 1:
            value = crit.values[0]
            if isinstance(value, TokenValue) and value.code is not None and value.system is not None:
                return crit
    return None


def build_select(query: SearchQuery, types: list[str] | None = None,
                 extra: ColumnElement[bool] | None = None,
                 restrict: Callable[[str | None, FromClause], ColumnElement[bool] | None] | None = None) -> Select[Any]:
    """SELECT res_pk, version of the matching current resources, in result order.

    `extra` is the access-control restriction on the `resource` table, added to the same query so that
    totals and paging never count what the caller may not see."""
    res = resource
    compiler = CriteriaCompiler(restrict)
    stmt = select(res.c.res_pk, res.c.version).where(res.c.deleted == false())
    if extra is not None:
        stmt = stmt.where(extra)
    drive = _in_resource_order(query)
    # The driving criterion's index key is the type's own (param_key), so a type test would add nothing but a
    # misestimate: the planner would multiply both selectivities and expect too few rows to stop at the LIMIT.
    typed_by_key = drive is not None and drive.param is not None and drive.param.resource_type == query.resource_type
    if query.resource_type is not None and not typed_by_key:
        stmt = stmt.where(res.c.rtype == query.resource_type)
    elif types:
        stmt = stmt.where(res.c.rtype.in_(types))
    if drive is not None:
        ids = compiler.matching(drive).distinct().subquery()
        stmt = stmt.select_from(res.join(ids, ids.c.res_pk == res.c.res_pk))
    for crit in query.criteria:
        if crit is not drive:
            stmt = stmt.where(compiler.clause(crit, res))
    order = [_sort_key(code, desc, param, res) for code, desc, param in query.sort]
    order.append(res.c.res_pk.asc())
    return stmt.order_by(*order)
