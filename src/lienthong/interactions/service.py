"""The FHIR interactions: read, write, history, search, operations.

Why one façade: each interaction is defined once here and reused by HTTP, the
bundle processor, the CLI and the domain services, so behaviour (validation on
every write, versioning, paging) cannot drift between entry points.
"""

from __future__ import annotations

import copy
import secrets
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import jsonpatch
import orjson
from sqlalchemy import delete, false, func, insert, select, update

from lienthong.fhir import definitions
from lienthong.fhir.datetimes import DateFormatError, format_instant, parse_range
from lienthong.fhir.outcome import FhirError, OutcomeIssue, error
from lienthong.fhir.search_params import SearchRegistry
from lienthong.fhir.search_query import QueryParser, SearchQuery
from lienthong.fhir.shaping import shape
from lienthong.interactions.context import Context
from lienthong.interactions.guard import AuditFacts, Guard, OpenGuard
from lienthong.storage import schema
from lienthong.storage.repository import JSON, Database, Store, Stored
from lienthong.storage.search_sql import build_select

SNAPSHOT_LIMIT = 10_000  # result ids kept per paged search; deeper pages are refused with a clear message
# A search in the default order (res_pk) snapshots the SNAPSHOT_FIRST ids it read, then this many more (or what
# a page asks for) each time a page needs them (see `_extend`); an explicit _sort takes all SNAPSHOT_LIMIT at once.
SNAPSHOT_CHUNK = 1_000
SNAPSHOT_FIRST = 200  # ids a search in the default order reads at first (its first pages and its total if small)
SNAPSHOT_TTL_US = 3_600_000_000  # one hour
# A snapshot's (res_pk, version) keys, packed into one value: inserting 10,000 rows per first page of a
# population-wide search cost more than the search itself; a page reads its slice with substr().
_SNAPSHOT_KEY = struct.Struct("<qi")


@dataclass
class Result:
    """The outcome of one interaction, ready for any transport."""

    status: int
    stored: Stored | None = None
    resource: JSON | None = None  # when the body was built or shaped in memory
    body: bytes | None = None  # raw JSON bytes when served straight from storage
    outcome: JSON | None = None
    location: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def json_bytes(self) -> bytes:
        if self.body is not None:
            return self.body
        if self.resource is not None:
            return orjson.dumps(self.resource)
        if self.stored is not None and self.stored.body:
            return self.stored.body
        return b""


def _validate(resource: JSON, expected_type: str | None = None) -> None:
    from lienthong.fhir.validation import validate

    issues = [i for i in validate(resource, expected_type) if i.severity == "error"]
    if issues:
        status = 400 if any(i.code == "structure" for i in issues) else 422
        raise FhirError(
            status,
            [OutcomeIssue("error", i.code, f"{i.message}", (i.location,)) for i in issues[:100]],
        )


class FhirService:
    """All interactions over one Database."""

    def __init__(self, db: Database, guard: Guard | None = None) -> None:
        self.db = db
        self.guard: Guard = guard or OpenGuard()
        # Domain rules beyond the R4 definitions (e.g. Vietnamese identifier formats), run on every write.
        self.validators: list[Callable[[JSON], list[OutcomeIssue]]] = []
        self.registry: SearchRegistry = db.registry
        self.parser = QueryParser(self.registry)
        self.types = set(self.registry.by_type)

    # ---- helpers -----------------------------------------------------------
    def check_type(self, rtype: str) -> None:
        if rtype not in self.types:
            raise error(404, "not-supported", f"Loại tài nguyên không hỗ trợ '{rtype}'",
                        f"Unknown resource type '{rtype}'")

    @staticmethod
    def check_id(rid: str) -> None:
        import re

        if not re.fullmatch(r"[A-Za-z0-9\-.]{1,64}", rid):
            raise error(400, "invalid", f"Định danh không hợp lệ '{rid[:80]}'", f"Invalid resource id '{rid[:80]}'")

    def _prepare(self, resource: JSON, rtype: str, rid: str | None) -> JSON:
        if resource.get("resourceType") != rtype:
            raise error(400, "invalid", "resourceType không khớp với URL",
                        f"resourceType '{resource.get('resourceType')}' does not match the URL type '{rtype}'")
        if rid is not None and resource.get("id") not in (None, rid):
            raise error(400, "invalid", "id trong thân không khớp với URL",
                        f"Body id '{resource.get('id')}' does not match the URL id '{rid}'")
        _validate(resource, rtype)
        problems = [issue for check in self.validators for issue in check(resource)]
        if problems:
            raise FhirError(422, problems)
        return resource

    # ---- read ----------------------------------------------------------------
    def _hidden(self, ctx: Context, store: Store, found: Stored | None, writing: bool = False) -> bool:
        """True when the resource exists but the caller may not see it: answered as 404, never 403."""
        return found is not None and not self.guard.visible(ctx, store, [found], writing)

    def _not_found(self, ctx: Context, action: str, rtype: str, rid: str) -> FhirError:
        self.guard.on_access(ctx, AuditFacts(action, outcome=4, resources=[(rtype, rid)], detail="not found"))
        return error(404, "not-found", f"Không tìm thấy {rtype}/{rid}", f"{rtype}/{rid} not found")

    def read_cached(self, ctx: Context, rtype: str, rid: str) -> Result | None:
        """A read answered from the read cache without blocking, or None: then `read` asks the database.

        Only for callers who see every resource of the type (a facility-bound caller's view needs the
        database); the authorisation, audit and answers are exactly those of `read`."""
        found = self.db.cached(rtype, rid)
        if found is None or not self.guard.sees_all(ctx, rtype):
            return None
        self.guard.authorize(ctx, "read", rtype)
        return self._answer_read(ctx, rtype, rid, found)

    def _answer_read(self, ctx: Context, rtype: str, rid: str, found: Stored | None) -> Result:
        self.guard.on_access(ctx, AuditFacts("read", 0 if found else 4, [(rtype, rid)],
                                             bodies=[found.body] if found and found.body else []))
        if found is None:
            raise error(404, "not-found", f"Không tìm thấy {rtype}/{rid}", f"{rtype}/{rid} not found")
        if found.deleted:
            raise FhirError(410, [OutcomeIssue("error", "deleted", f"Đã xoá / {rtype}/{rid} was deleted")],
                            {"ETag": found.etag})
        return Result(200, found, body=found.body)

    def read(self, ctx: Context, rtype: str, rid: str) -> Result:
        self.check_type(rtype)
        self.check_id(rid)
        self.guard.authorize(ctx, "read", rtype)
        with self.db.read() as store:
            found = store.current(rtype, rid)
            if self._hidden(ctx, store, found):
                found = None
        return self._answer_read(ctx, rtype, rid, found)

    def vread(self, ctx: Context, rtype: str, rid: str, version: str) -> Result:
        self.check_type(rtype)
        self.check_id(rid)
        if not version.isdigit():
            raise error(400, "invalid", "Phiên bản phải là số", f"Version '{version[:20]}' is not a number")
        self.guard.authorize(ctx, "vread", rtype)
        with self.db.read() as store:
            found = store.version(rtype, rid, int(version))
            if found is not None and not self.guard.visible(ctx, store, [found]):
                found = None
        self.guard.on_access(ctx, AuditFacts("vread", 0 if found else 4, [(rtype, rid)],
                                             bodies=[found.body] if found and found.body else []))
        if found is None:
            raise error(404, "not-found", f"Không có phiên bản {version}", f"{rtype}/{rid}/_history/{version} not found")
        if found.deleted:
            raise error(410, "deleted", "Phiên bản này là bản xoá", f"{rtype}/{rid} version {version} is a delete")
        return Result(200, found, body=found.body)

    # ---- writes --------------------------------------------------------------
    def create(self, ctx: Context, rtype: str, resource: JSON, if_none_exist: str | None = None) -> Result:
        self.check_type(rtype)
        self.guard.authorize(ctx, "create", rtype)
        resource = self._prepare(resource, rtype, None)
        with self.db.begin() as store:
            if if_none_exist:
                existing = self._conditional_match(store, ctx, rtype, if_none_exist)
                if len(existing) == 1:
                    return Result(200, existing[0], body=existing[0].body)
                if len(existing) > 1:
                    raise error(412, "duplicate", "Điều kiện khớp nhiều tài nguyên",
                                "If-None-Exist matched more than one resource")
            resource.pop("id", None)
            stored = store.create(resource)
            self.guard.on_write(ctx, store, AuditFacts("create", resources=[(rtype, stored.rid)]), [stored])
        return Result(201, stored, body=stored.body)

    def update(self, ctx: Context, rtype: str, rid: str, resource: JSON, if_match: str | None = None) -> Result:
        self.check_type(rtype)
        self.check_id(rid)
        if "id" not in resource:
            raise error(400, "required", "Thân cập nhật thiếu id", "An update body must carry the resource id")
        self.guard.authorize(ctx, "update", rtype)
        resource = self._prepare(resource, rtype, rid)
        with self.db.begin() as store:
            result = self._update_in(ctx, store, rtype, rid, resource, if_match)
            assert result.stored is not None
            self.guard.on_write(ctx, store, AuditFacts("update", resources=[(rtype, rid)]), [result.stored])
            return result

    def _update_in(
        self, ctx: Context, store: Store, rtype: str, rid: str, resource: JSON, if_match: str | None,
        method: str = "PUT",
    ) -> Result:
        current = store.current(rtype, rid, lock=True)
        if self._hidden(ctx, store, current):
            raise self._not_found(ctx, "update", rtype, rid)
        if current is None:
            if if_match:
                raise error(412, "conflict", "Không có phiên bản để so khớp", f"{rtype}/{rid} does not exist")
            stored = store.create(resource, rid, method="PUT")
            store.flush()
            return Result(201, stored, body=stored.body)
        self._check_if_match(current, if_match)
        stored = store.write(current, resource, method)
        return Result(200 if not current.deleted else 201, stored, body=stored.body)

    @staticmethod
    def _check_if_match(current: Stored, if_match: str | None) -> None:
        if not if_match:
            return
        wanted = if_match.strip().removeprefix("W/").strip('"')
        if wanted != str(current.version):
            raise error(412, "conflict", "Xung đột phiên bản (If-Match)",
                        f"Version conflict: If-Match {if_match} but current version is {current.version}")

    def conditional_update(self, ctx: Context, rtype: str, query: str, resource: JSON,
                           if_match: str | None = None) -> Result:
        self.check_type(rtype)
        self.guard.authorize(ctx, "update", rtype)
        resource = self._prepare(resource, rtype, None)
        with self.db.begin() as store:
            matches = self._conditional_match(store, ctx, rtype, query)
            if len(matches) > 1:
                raise error(412, "multiple-matches", "Điều kiện khớp nhiều tài nguyên",
                            "The conditional update matched more than one resource")
            if not matches:
                rid = resource.get("id")
                taken = store.current(rtype, rid) if rid else None
                if taken is not None:
                    if self._hidden(ctx, store, taken):  # never confirm that an invisible id exists
                        raise self._not_found(ctx, "update", rtype, str(rid))
                    raise error(409, "conflict", "id đã dùng cho tài nguyên khác",
                                "The body id belongs to a resource that does not match the condition")
                stored = store.create(resource, rid)
                self.guard.on_write(ctx, store, AuditFacts("create", resources=[(rtype, stored.rid)]), [stored])
                return Result(201, stored, body=stored.body)
            target = matches[0]
            if resource.get("id") not in (None, target.rid):
                raise error(400, "invalid", "id không khớp tài nguyên tìm được",
                            "The body id differs from the id of the matched resource")
            resource["id"] = target.rid
            result = self._update_in(ctx, store, rtype, target.rid, resource, if_match)
            assert result.stored is not None
            self.guard.on_write(ctx, store, AuditFacts("update", resources=[(rtype, target.rid)]), [result.stored])
            return result

    def patch(self, ctx: Context, rtype: str, rid: str, operations: Any, if_match: str | None = None) -> Result:
        self.check_type(rtype)
        self.check_id(rid)
        if not isinstance(operations, list):
            raise error(400, "invalid", "JSON Patch phải là một mảng", "A JSON Patch document must be an array")
        self.guard.authorize(ctx, "patch", rtype)
        with self.db.begin() as store:
            current = store.current(rtype, rid, lock=True)
            if current is None or current.deleted or self._hidden(ctx, store, current):
                raise self._not_found(ctx, "patch", rtype, rid)
            self._check_if_match(current, if_match)
            try:
                patched = jsonpatch.apply_patch(current.resource(), operations)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, TypeError, ValueError) as exc:
                raise error(422, "processing", "Không áp dụng được JSON Patch",
                            f"JSON Patch could not be applied: {exc}") from None
            if not isinstance(patched, dict) or patched.get("resourceType") != rtype or patched.get("id") != rid:
                raise error(422, "processing", "Patch không được đổi loại hoặc id",
                            "A patch may not change the resource type or id")
            self._prepare(patched, rtype, rid)
            stored = store.write(current, patched, "PATCH")
            self.guard.on_write(ctx, store, AuditFacts("patch", resources=[(rtype, rid)]), [stored])
        return Result(200, stored, body=stored.body)

    def delete(self, ctx: Context, rtype: str, rid: str) -> Result:
        self.check_type(rtype)
        self.check_id(rid)
        self.guard.authorize(ctx, "delete", rtype)
        with self.db.begin() as store:
            return self._delete_in(ctx, store, rtype, rid)

    def _delete_in(self, ctx: Context, store: Store, rtype: str, rid: str) -> Result:
        current = store.current(rtype, rid, lock=True)
        if current is None or self._hidden(ctx, store, current):
            raise self._not_found(ctx, "delete", rtype, rid)
        if current.deleted:
            return Result(200, current, outcome=_info("Đã xoá trước đó", f"{rtype}/{rid} was already deleted"))
        stored = store.write(current, None, "DELETE")
        self.guard.on_write(ctx, store, AuditFacts("delete", resources=[(rtype, rid)]), [current])
        return Result(200, stored, outcome=_info("Đã xoá (vẫn giữ lịch sử)",
                                                  f"Deleted {rtype}/{rid}; its history is kept"))

    def conditional_delete(self, ctx: Context, rtype: str, query: str) -> Result:
        self.check_type(rtype)
        self.guard.authorize(ctx, "delete", rtype)
        with self.db.begin() as store:
            matches = self._conditional_match(store, ctx, rtype, query)
            if len(matches) > 1:
                raise error(412, "multiple-matches", "Điều kiện khớp nhiều tài nguyên",
                            "The conditional delete matched more than one resource")
            if not matches:
                return Result(200, outcome=_info("Không có gì để xoá", "No resource matched; nothing deleted"))
            return self._delete_in(ctx, store, rtype, matches[0].rid)

    def _conditional_match(self, store: Store, ctx: Context, rtype: str, query: str) -> list[Stored]:
        from urllib.parse import parse_qsl

        params = parse_qsl(query.lstrip("?"), keep_blank_values=True)
        if not params:
            raise error(400, "invalid", "Điều kiện rỗng", "A conditional interaction needs search parameters")
        parsed, _ = self.parser.parse(rtype, params, strict=True)
        rows = store.execute(self.select(ctx, parsed).limit(2)).all()
        return store.fetch([(r[0], r[1]) for r in rows])

    def select(self, ctx: Context, query: SearchQuery, types: list[str] | None = None) -> Any:
        """The search SELECT, restricted to what the caller may see."""
        from lienthong.storage.schema import resource as res_table

        extra = self.guard.search_filter(ctx, query.resource_type, res_table)
        return build_select(query, types, extra, lambda rtype, alias: self.guard.search_filter(ctx, rtype, alias))

    # ---- history -------------------------------------------------------------
    def history(self, ctx: Context, rtype: str | None, rid: str | None, params: list[tuple[str, str]]) -> Result:
        if rtype is not None:
            self.check_type(rtype)
        if rid is not None:
            self.check_id(rid)
        since = before = None
        count, offset = 50, 0
        for name, value in params:
            try:
                if name == "_since":
                    since = parse_range(value.replace(" ", "+"))[0]
                elif name == "_page_before":
                    before = int(value)
                elif name == "_count":
                    count = min(int(value), 1000)
                elif name == "_offset":
                    offset = int(value)
            except (DateFormatError, ValueError):
                raise error(400, "invalid", f"Giá trị không hợp lệ cho {name}", f"Invalid value for {name}") from None
        if count < 0 or offset < 0:
            raise error(400, "invalid", "_count/_offset âm", "_count and _offset must not be negative")
        self.guard.authorize(ctx, "history", rtype)
        with self.db.read() as store:
            if rid is not None and rtype is not None:
                current = store.current(rtype, rid)
                if current is None or self._hidden(ctx, store, current):
                    raise self._not_found(ctx, "history", rtype, rid)
            before = before if before is not None else store.now
            from lienthong.storage.schema import resource as res_table

            extra = self.guard.search_filter(ctx, rtype, res_table)
            versions, total = store.history(rtype, rid, since, offset + count, before, extra)
        self.guard.on_access(ctx, AuditFacts("history", resources=[(v.rtype, v.rid) for v in versions[offset:]]))
        page = versions[offset:]
        path = "/".join(p for p in (rtype, rid, "_history") if p)
        base = f"{ctx.base_url}/{path}"
        keep = [(k, v) for k, v in params if k == "_since"]
        links = [{"relation": "self", "url": _url(base, [*keep, ("_count", str(count)), ("_offset", str(offset)),
                                                          ("_page_before", str(before))])}]
        if offset + count < total:
            links.append({"relation": "next", "url": _url(base, [*keep, ("_count", str(count)),
                                                                  ("_offset", str(offset + count)),
                                                                  ("_page_before", str(before))])})
        if offset > 0:
            links.append({"relation": "previous", "url": _url(base, [*keep, ("_count", str(count)),
                                                                      ("_offset", str(max(0, offset - count))),
                                                                      ("_page_before", str(before))])})
        entries = []
        for v in page:
            url = f"{v.rtype}/{v.rid}"
            entry: JSON = {"fullUrl": f"{ctx.base_url}/{url}"}
            if v.body:
                entry["resource"] = orjson.Fragment(v.body)
            entry["request"] = {"method": v.method, "url": v.rtype if v.method == "POST" else url}
            entry["response"] = {"status": "200 OK" if not v.deleted else "204 No Content",
                                 "etag": v.etag, "lastModified": format_instant(v.last_updated)}
            entries.append(entry)
        bundle = {"resourceType": "Bundle", "type": "history", "total": total, "link": links, "entry": entries}
        return Result(200, body=orjson.dumps(bundle))

    # ---- search --------------------------------------------------------------
    def search(self, ctx: Context, rtype: str | None, params: list[tuple[str, str]],
               types: list[str] | None = None) -> Result:
        if rtype is not None:
            self.check_type(rtype)
        self.guard.authorize(ctx, "search", rtype)
        query, ignored = self.parser.parse(rtype, params, strict=ctx.strict)
        with self.db.read() as store:
            return self._search_in(store, ctx, query, ignored, types)

    def _search_in(self, store: Store, ctx: Context, query: SearchQuery, ignored: list[OutcomeIssue],
                   types: list[str] | None) -> Result:
        base = f"{ctx.base_url}/{query.resource_type}" if query.resource_type else ctx.base_url
        if query.getpages:
            return self._page(store, ctx, query, base)
        stmt = self.select(ctx, query, types)
        if query.summary == "count" or query.count == 0:  # _count=0: the total only, no page to walk
            counted = store.execute(select(func.count()).select_from(stmt.subquery())).scalar_one()
            bundle = {"resourceType": "Bundle", "type": "searchset", "total": counted,
                      "link": [{"relation": "self", "url": _url(base, query.self_params)}]}
            return Result(200, resource=bundle)
        wanted = query.count + 1 + query.offset
        if not query.sort:  # a few pages ahead: small results get their total without a second query
            wanted = max(wanted, SNAPSHOT_FIRST)
        keys = [(r[0], r[1]) for r in store.execute(stmt.limit(wanted)).all()]
        total: int | None = None
        sid = None
        if len(keys) < wanted:
            total = len(keys)
        if len(keys) > query.count + query.offset:
            # Without _sort the order is res_pk alone, so the snapshot can be continued later from its last id
            # (`_extend`): it starts with the ids just read, and the first page of a population-wide search
            # costs one query. A sorted one cannot be continued, because writes move resources across a
            # sort-key boundary: it takes all SNAPSHOT_LIMIT ids at once.
            resume = None
            if not query.sort and len(keys) < SNAPSHOT_LIMIT:
                if total is None:
                    resume = orjson.dumps({"type": query.resource_type, "types": types,
                                           "params": query.self_params}).decode()
            else:
                keys = [(r[0], r[1]) for r in store.execute(stmt.limit(SNAPSHOT_LIMIT + 1)).all()]
                if len(keys) <= SNAPSHOT_LIMIT:
                    total = len(keys)
                keys = keys[:SNAPSHOT_LIMIT]
            if query.total == "accurate" and total is None:
                total = store.execute(select(func.count()).select_from(stmt.subquery())).scalar_one()
            sid = self._snapshot(store, ctx, keys, _url(base, query.self_params), total, resume)
        page_keys = keys[query.offset : query.offset + query.count]
        return self._bundle(store, ctx, query, base, page_keys, total, sid, query.offset, len(keys), ignored)

    @staticmethod
    def _owner(ctx: Context) -> str | None:
        return f"{getattr(ctx.principal, 'kind', '')}:{ctx.actor}" if ctx.actor else None

    def _snapshot(self, store: Store, ctx: Context, keys: Sequence[tuple[int, int]], self_url: str,
                  total: int | None, resume: str | None = None) -> str:
        sid = secrets.token_hex(16)
        if not store.writable:  # a read-only search: the snapshot gets its own short write transaction
            with self.db.begin() as writer:
                return self._snapshot(writer, ctx, keys, self_url, total, resume)
        conn = store.conn
        conn.execute(delete(schema.search_set).where(schema.search_set.c.created < store.now - SNAPSHOT_TTL_US))
        conn.execute(insert(schema.search_set).values(sid=sid, created=store.now, total=total, query=self_url,
                                                      owner=self._owner(ctx), entries=_pack_keys(keys),
                                                      resume=resume))
        return sid

    def _page(self, store: Store, ctx: Context, query: SearchQuery, base: str) -> Result:
        ss, sid = schema.search_set, query.getpages or ""
        size = _SNAPSHOT_KEY.size
        mine = ss.c.owner.is_(None) if ctx.actor is None else ss.c.owner == self._owner(ctx)
        page = func.substr(ss.c.entries, query.offset * size + 1, query.count * size)
        found = store.execute(select(ss.c.total, ss.c.resume, func.length(ss.c.entries), page)
                              .where(ss.c.sid == sid, mine)).first()
        if found is None:  # expired, or another caller's search: the same answer either way
            raise error(410, "not-found", "Trang kết quả đã hết hạn", "This search result has expired; search again")
        total, resume, stored, data = found[0], found[1], int(found[2] or 0) // size, found[3]
        if resume is not None and query.offset + query.count >= stored:  # this page, or the next link, needs more
            total, stored = self._extend(ctx, sid, resume, query.offset + query.count + 1)
            data = store.execute(select(page).where(ss.c.sid == sid)).scalar_one()
        return self._bundle(store, ctx, query, base, _unpack_keys(bytes(data or b"")), total, sid, query.offset,
                            stored, [])

    def _extend(self, ctx: Context, sid: str, resume: str, needed: int) -> tuple[int | None, int]:
        """Continue a snapshot in res_pk order past its last id, up to `needed` ids (and at least a chunk).

        Stable like the eager snapshot: ids already listed are never listed again, every resource that still
        matches and was not listed yet comes later (res_pk only grows), so a page never repeats or skips one.
        Returns the total (when the end is reached) and the number of ids now stored."""
        state = orjson.loads(resume)
        query, _ = self.parser.parse(state["type"], [tuple(p) for p in state["params"]])
        ss, size = schema.search_set, _SNAPSHOT_KEY.size
        with self.db.begin() as writer:
            row = writer.execute(select(ss.c.entries, ss.c.total, ss.c.resume).where(ss.c.sid == sid)
                                 .with_for_update()).one()
            entries, total = bytes(row[0]), row[1]
            stored = len(entries) // size
            if row[2] is None or stored >= needed:  # another page request extended it meanwhile
                return total, stored
            last_pk = _SNAPSHOT_KEY.unpack(entries[-size:])[0]
            grow = min(max(SNAPSHOT_CHUNK, needed - stored), SNAPSHOT_LIMIT - stored)
            stmt = self.select(ctx, query, state["types"]).where(schema.resource.c.res_pk > last_pk)
            more = [(r[0], r[1]) for r in writer.execute(stmt.limit(grow + 1)).all()]
            complete = len(more) <= grow
            more = more[:grow]
            stored += len(more)
            if complete:
                total = stored if total is None else total
            writer.conn.execute(update(ss).where(ss.c.sid == sid).values(
                entries=entries + _pack_keys(more), total=total,
                resume=None if complete or stored >= SNAPSHOT_LIMIT else resume))
        return total, stored

    def _bundle(self, store: Store, ctx: Context, query: SearchQuery, base: str, keys: list[tuple[int, int]],
                total: int | None, sid: str | None, offset: int, available: int, ignored: list[OutcomeIssue]) -> Result:
        matched = self.guard.visible(ctx, store, store.fetch(keys))
        included = self._includes(ctx, store, query, matched)
        self.guard.on_access(ctx, AuditFacts(
            "search", resources=[(m.rtype, m.rid) for m in matched + included],
            query=_url(base, query.self_params), bodies=[m.body for m in matched + included if m.body]))
        entries: list[JSON] = []
        shaping = query.summary in ("true", "text", "data") or query.elements
        for item, mode in [(m, "match") for m in matched] + [(i, "include") for i in included]:
            if shaping and item.body:
                resource: Any = shape(orjson.loads(item.body), query.summary, query.elements)
            else:
                resource = orjson.Fragment(item.body or b"{}")
            entries.append({"fullUrl": f"{ctx.base_url}/{item.rtype}/{item.rid}", "resource": resource,
                            "search": {"mode": mode}})
        if ignored:
            entries.append({"resource": {"resourceType": "OperationOutcome", "issue": [i.to_json() for i in ignored]},
                            "search": {"mode": "outcome"}})
        links = []
        count = query.count
        if sid is None:
            links.append({"relation": "self", "url": _url(base, query.self_params)})
        else:
            page_params = [("_getpages", sid), ("_count", str(count))]
            links.append({"relation": "self", "url": _url(ctx.base_url, [*page_params, ("_offset", str(offset))])})
            if offset + count < available:
                links.append({"relation": "next",
                              "url": _url(ctx.base_url, [*page_params, ("_offset", str(offset + count))])})
            if offset > 0:
                links.append({"relation": "previous",
                              "url": _url(ctx.base_url, [*page_params, ("_offset", str(max(0, offset - count)))])})
        bundle: JSON = {"resourceType": "Bundle", "type": "searchset"}
        if total is not None and query.total != "none":
            bundle["total"] = total
        bundle["link"] = links
        bundle["entry"] = entries
        return Result(200, body=orjson.dumps(bundle))

    def _includes(self, ctx: Context, store: Store, query: SearchQuery, matched: list[Stored]) -> list[Stored]:
        if not query.includes or not matched:
            return []
        seen = {(m.rtype, m.rid) for m in matched}
        out: list[Stored] = []
        frontier = matched
        for depth in range(4):
            new: list[Stored] = []
            for inc in query.includes:
                if depth > 0 and not inc.iterate:
                    continue
                sources = frontier if inc.reverse else [m for m in frontier if m.rtype == inc.source_type]
                if not sources:
                    continue
                new.extend(self.guard.visible(ctx, store, self._include_one(store, inc, sources, seen)))
            if not new:
                break
            out.extend(new)
            frontier = new
        return out

    def _include_one(self, store: Store, inc: Any, sources: list[Stored], seen: set[tuple[str, str]]) -> list[Stored]:
        ref = schema.sp_reference
        r = schema.resource
        if inc.reverse:
            keys = [inc.param.key] if inc.param else [p.key for p in self.registry.params(inc.source_type).values()
                                                    if p.type == "reference"]
            targets = [(s.rtype, s.rid) for s in sources]
            pks: set[int] = set()
            for rtype in {t for t, _ in targets}:
                ids = [i for t, i in targets if t == rtype]
                rows = store.execute(
                    select(ref.c.res_pk).join(r, r.c.res_pk == ref.c.res_pk)
                    .where(ref.c.pkey.in_(keys), ref.c.target_type == rtype, ref.c.target_id.in_(ids),
                           r.c.rtype == inc.source_type, r.c.deleted == false())
                ).all()
                pks.update(row[0] for row in rows)
            found = store.execute(select(r.c.rtype, r.c.rid).where(r.c.res_pk.in_(list(pks)))).all() if pks else []
            refs = [(t, i) for t, i in found if (t, i) not in seen]
        else:
            sources = [s for s in sources if s.rtype == inc.source_type]
            if not sources:
                return []
            keys = [inc.param.key] if inc.param else [p.key for p in self.registry.params(inc.source_type).values()
                                                    if p.type == "reference"]
            stmt = select(ref.c.target_type, ref.c.target_id).where(
                ref.c.res_pk.in_([s.res_pk for s in sources]), ref.c.pkey.in_(keys),
                ref.c.target_type.is_not(None))
            if inc.target_type:
                stmt = stmt.where(ref.c.target_type == inc.target_type)
            refs = [(t, i) for t, i in store.execute(stmt).all() if (t, i) not in seen]
        refs = list(dict.fromkeys(refs))
        seen.update(refs)
        return store.fetch_current(refs)

    # ---- operations ----------------------------------------------------------
    def everything(self, ctx: Context, rid: str, params: list[tuple[str, str]]) -> Result:
        """Patient/$everything: the compartment, plus what it references, paged through a snapshot."""
        self.check_id(rid)
        since = None
        types: list[str] | None = None
        count = 100
        page: list[tuple[str, str]] = []
        for name, value in params:
            if name == "_since":
                try:
                    since = parse_range(value.replace(" ", "+"))[0]
                except DateFormatError:
                    raise error(400, "invalid", "_since không hợp lệ", "Invalid _since") from None
            elif name == "_type":
                types = [t.strip() for t in value.split(",") if t.strip()]
                for t in types:
                    self.check_type(t)
            elif name == "_count":
                if not value.isdigit():
                    raise error(400, "invalid", "_count không hợp lệ", "Invalid _count")
                count = min(int(value), 1000) or 1
            elif name in ("_getpages", "_offset"):
                page.append((name, value))
        self.guard.authorize(ctx, "everything", "Patient")
        if page:
            query, _ = self.parser.parse(None, [*page, ("_count", str(count))])
            with self.db.read() as store:
                return self._page(store, ctx, query, ctx.base_url)
        with self.db.read() as store:
            patient = store.current("Patient", rid)
            if patient is None or patient.deleted or self._hidden(ctx, store, patient):
                raise self._not_found(ctx, "operation", "Patient", rid)
            keys = self._compartment_keys(store, patient, since, types)
            visible = {(s.res_pk, s.version) for s in self.guard.visible(ctx, store, store.fetch(keys))}
            keys = [k for k in keys if k in visible]  # totals never count what the caller may not see
            query = SearchQuery(None, count=count)
            query.self_params = [(k, v) for k, v in params if k in ("_since", "_type", "_count")]
            base = f"{ctx.base_url}/Patient/{rid}/$everything"
            if len(keys) <= count:
                return self._bundle(store, ctx, query, base, keys, len(keys), None, 0, len(keys), [])
            sid = self._snapshot(store, ctx, keys, base, len(keys))
            return self._bundle(store, ctx, query, base, keys[:count], len(keys), sid, 0, len(keys), [])

    def compartment_params(self) -> dict[str, list[int]]:
        """Reference-parameter keys that put a resource of each type in the Patient compartment."""
        comp = definitions.load().compartments["Patient"]
        out: dict[str, list[int]] = {}
        for entry in comp.get("resource", []):
            keys = []
            for code in entry.get("param", []):
                param = self.registry.get(entry["code"], code)
                if param is not None and param.type == "reference":
                    keys.append(param.key)
            if keys:
                out[entry["code"]] = keys
        return out

    def _compartment_keys(self, store: Store, patient: Stored, since: int | None,
                          types: list[str] | None) -> list[tuple[int, int]]:
        ref, r = schema.sp_reference, schema.resource
        all_keys = [k for keys in self.compartment_params().values() for k in keys]
        stmt = (
            select(r.c.res_pk, r.c.version, r.c.rtype)
            .where(r.c.res_pk.in_(select(ref.c.res_pk).where(
                ref.c.pkey.in_(all_keys), ref.c.target_type == "Patient", ref.c.target_id == patient.rid)))
            .where(r.c.deleted == false(), r.c.res_pk != patient.res_pk)
            .order_by(r.c.rtype, r.c.res_pk)
        )
        members = store.execute(stmt).all()
        member_pks = [m[0] for m in members]
        # The Patient is in its own compartment, so what it references (GP, managing organisation) counts too.
        sources = [patient.res_pk, *member_pks]
        targets: set[tuple[str, str]] = set()
        for start in range(0, len(sources), 500):
            targets.update(store.execute(
                select(ref.c.target_type, ref.c.target_id).where(
                    ref.c.res_pk.in_(sources[start : start + 500]), ref.c.target_type.is_not(None),
                    ref.c.target_type != "Patient")
            ).all())
        source_set = set(sources)
        referenced = [s for s in store.fetch_current(sorted(targets)) if s.res_pk not in source_set]
        rows: list[tuple[int, int, str, int]] = [(patient.res_pk, patient.version, "Patient", patient.last_updated)]
        lu = dict(store.execute(select(r.c.res_pk, r.c.last_updated).where(r.c.res_pk.in_(member_pks))).all()) \
            if member_pks else {}
        rows += [(m[0], m[1], m[2], int(lu.get(m[0], 0))) for m in members]
        rows += [(s.res_pk, s.version, s.rtype, s.last_updated) for s in referenced]
        if since is not None:
            rows = [row for row in rows if row[3] >= since]
        if types is not None:
            rows = [row for row in rows if row[2] in types]
        return [(row[0], row[1]) for row in rows]

    def validate_operation(self, ctx: Context, rtype: str, payload: Any, rid: str | None = None) -> Result:
        """$validate: report issues without storing anything; 200 with the outcome either way."""
        self.check_type(rtype)
        self.guard.authorize(ctx, "validate", rtype)
        resource = payload
        if isinstance(payload, dict) and payload.get("resourceType") == "Parameters":
            resource = next((p.get("resource") for p in payload.get("parameter", [])
                             if isinstance(p, dict) and p.get("name") == "resource"), None)
        if not isinstance(resource, dict):
            raise error(400, "invalid", "Không có tài nguyên để kiểm tra", "No resource to validate")
        from lienthong.fhir.validation import validate

        issues = validate(resource, rtype)
        if rid is not None and resource.get("id") not in (None, rid):
            issues = list(issues)
        outcome = {"resourceType": "OperationOutcome", "issue": [
            {"severity": i.severity, "code": i.code, "diagnostics": i.message, "expression": [i.location]}
            for i in issues
        ] or [{"severity": "information", "code": "informational",
               "diagnostics": "Hợp lệ / Validation passed, no issues"}]}
        return Result(200, resource=outcome)

    def meta(self, ctx: Context, rtype: str | None, rid: str | None, version: str | None = None) -> Result:
        """$meta: the tags, profiles and security labels in use (instance, type or system level)."""
        if rtype is not None and rid is not None:
            result = self.read(ctx, rtype, rid) if version is None else self.vread(ctx, rtype, rid, version)
            meta = orjson.loads(result.json_bytes()).get("meta", {})
            collected = {k: meta.get(k, []) for k in ("tag", "security", "profile") if meta.get(k)}
        else:
            self.guard.authorize(ctx, "search", rtype)
            collected = self._meta_in_use(rtype)
        return Result(200, resource=_parameters("return", {"valueMeta": collected}))

    def _meta_in_use(self, rtype: str | None) -> JSON:
        tok, uri, r = schema.sp_token, schema.sp_uri, schema.resource
        types = [rtype] if rtype else sorted(self.types)
        prof_keys = [p.key for t in types for c, p in self.registry.params(t).items() if c == "_profile"]
        out: JSON = {}
        with self.db.read() as store:
            for code in ("_tag", "_security"):
                wanted = [p.key for t in types for c, p in self.registry.params(t).items() if c == code]
                rows = store.execute(select(tok.c.system, tok.c.code, tok.c.text).distinct()
                                     .join(r, r.c.res_pk == tok.c.res_pk)
                                     .where(tok.c.pkey.in_(wanted), r.c.deleted == false())).all()
                if rows:
                    out["tag" if code == "_tag" else "security"] = [
                        {k: v for k, v in (("system", s), ("code", c)) if v} for s, c, _ in rows]
            rows = store.execute(select(uri.c.uri).distinct().join(r, r.c.res_pk == uri.c.res_pk)
                                 .where(uri.c.pkey.in_(prof_keys), r.c.deleted == false())).all()
            if rows:
                out["profile"] = [row[0] for row in rows]
        return out

    def meta_change(self, ctx: Context, rtype: str, rid: str, payload: Any, add: bool) -> Result:
        """$meta-add / $meta-delete: change tags, profiles or security labels without a content change."""
        self.check_type(rtype)
        self.check_id(rid)
        meta_in = _meta_parameter(payload)
        self.guard.authorize(ctx, "update", rtype)
        with self.db.begin() as store:
            current = store.current(rtype, rid, lock=True)
            if current is None or current.deleted or self._hidden(ctx, store, current):
                raise self._not_found(ctx, "operation", rtype, rid)
            resource = current.resource()
            meta = dict(resource.get("meta") or {})
            changed = False
            for key in ("tag", "security", "profile"):
                existing = list(meta.get(key, []))
                for item in meta_in.get(key, []):
                    same = [e for e in existing if _same_meta(e, item)]
                    if add and not same:
                        existing.append(item)
                        changed = True
                    elif not add and same:
                        existing = [e for e in existing if not _same_meta(e, item)]
                        changed = True
                if existing:
                    meta[key] = existing
                else:
                    meta.pop(key, None)
            resource["meta"] = meta
            stored = store.rewrite_meta(current, resource) if changed else current
            if changed:
                self.guard.on_write(ctx, store, AuditFacts("update", resources=[(rtype, rid)],
                                                           detail="$meta-add" if add else "$meta-delete"), [stored])
            out_meta = orjson.loads(stored.body or b"{}").get("meta", {})
        return Result(200, resource=_parameters("return", {"valueMeta": {k: out_meta[k] for k in
                                                                          ("tag", "security", "profile")
                                                                          if k in out_meta}}))


def _same_meta(a: Any, b: Any) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return bool(a == b)
    return bool(a.get("system") == b.get("system") and a.get("code") == b.get("code"))


def _meta_parameter(payload: Any) -> JSON:
    if isinstance(payload, dict) and payload.get("resourceType") == "Parameters":
        for p in payload.get("parameter", []):
            if isinstance(p, dict) and p.get("name") == "meta" and isinstance(p.get("valueMeta"), dict):
                meta: JSON = copy.deepcopy(p["valueMeta"])
                for key in ("tag", "security"):
                    if not all(isinstance(x, dict) for x in meta.get(key, [])):
                        break
                else:
                    return meta
    raise error(400, "invalid", "Cần Parameters có tham số 'meta'", "Expected Parameters with a 'meta' parameter")


def _parameters(name: str, value: JSON) -> JSON:
    return {"resourceType": "Parameters", "parameter": [{"name": name, **value}]}


def _info(vi: str, en: str) -> JSON:
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": "information", "code": "informational", "diagnostics": f"{vi} / {en}"}]}


def _url(base: str, params: list[tuple[str, str]]) -> str:
    return f"{base}?{urlencode(params)}" if params else base


def _pack_keys(keys: Sequence[tuple[int, int]]) -> bytes:
    pack = _SNAPSHOT_KEY.pack
    return b"".join([pack(pk, version) for pk, version in keys])


def _unpack_keys(data: bytes) -> list[tuple[int, int]]:
    return list(_SNAPSHOT_KEY.iter_unpack(data))
