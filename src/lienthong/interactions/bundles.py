"""Batch and transaction Bundles.

Why: a transaction is how a vendor HIS or another facility pushes a whole
record; it must be all-or-nothing, resolve `urn:uuid` and conditional
references, and be fast. Entries run in the order FHIR prescribes (DELETE,
POST, PUT/PATCH, GET) inside one database transaction; a batch runs each entry
in its own transaction and reports each outcome.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import jsonpatch
import orjson

from lienthong.fhir.datetimes import format_instant
from lienthong.fhir.outcome import FhirError, OutcomeIssue, error
from lienthong.interactions.body import parse_json
from lienthong.interactions.context import Context
from lienthong.interactions.guard import AuditFacts
from lienthong.interactions.service import FhirService, Result
from lienthong.storage.repository import JSON, Store, Stored, new_id

_ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3, "HEAD": 3}
MAX_ENTRIES = 10_000

_STATUS_TEXT = {200: "200 OK", 201: "201 Created", 204: "204 No Content", 304: "304 Not Modified",
                400: "400 Bad Request", 404: "404 Not Found", 409: "409 Conflict", 410: "410 Gone",
                412: "412 Precondition Failed", 422: "422 Unprocessable Entity"}


class BundleProcessor:
    def __init__(self, service: FhirService) -> None:
        self.service = service

    def process(self, ctx: Context, bundle: Any) -> Result:
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
            raise error(400, "invalid", "Cần một Bundle", "Expected a Bundle")
        kind = bundle.get("type")
        if kind not in ("transaction", "batch"):
            raise error(400, "invalid", "Bundle phải có type transaction hoặc batch",
                        f"Bundle.type must be transaction or batch, not '{kind}'")
        entries = bundle.get("entry", [])
        if not isinstance(entries, list):
            raise error(400, "structure", "Bundle.entry phải là mảng", "Bundle.entry must be an array")
        if len(entries) > MAX_ENTRIES:
            raise error(413, "too-costly", "Bundle quá lớn", f"More than {MAX_ENTRIES} entries")
        checked = [self._check_entry(i, e) for i, e in enumerate(entries)]
        if kind == "batch":
            responses = [self._batch_entry(ctx, e) for e in checked]
            return Result(200, resource=_response_bundle("batch-response", responses))
        return Result(200, resource=_response_bundle("transaction-response", self._transaction(ctx, checked)))

    @staticmethod
    def _check_entry(index: int, entry: Any) -> JSON:
        where = f"Bundle.entry[{index}]"
        if not isinstance(entry, dict):
            raise error(400, "structure", "Mục Bundle không hợp lệ", "Bundle entry is not an object", where)
        request = entry.get("request")
        if not isinstance(request, dict) or request.get("method") not in _ORDER or not isinstance(
            request.get("url"), str
        ):
            raise error(400, "required", "Mục thiếu request.method/url",
                        "Each entry needs request.method and request.url", f"{where}.request")
        resource = entry.get("resource")
        if request["method"] in ("POST", "PUT") and not isinstance(resource, dict):
            raise error(400, "required", "Mục thiếu tài nguyên", "POST/PUT entries need a resource",
                        f"{where}.resource")
        return {"index": index, "method": request["method"], "url": request["url"].lstrip("/"),
                "resource": resource, "fullUrl": entry.get("fullUrl"), "ifNoneExist": request.get("ifNoneExist"),
                "ifMatch": request.get("ifMatch")}

    # ---- batch ---------------------------------------------------------------
    def _batch_entry(self, ctx: Context, entry: JSON) -> JSON:
        try:
            result = self._run_alone(ctx, entry)
            return _response_entry(ctx, result)
        except FhirError as exc:
            return {"response": {"status": _STATUS_TEXT.get(exc.status, str(exc.status)),
                                 "outcome": exc.outcome()}}

    def _run_alone(self, ctx: Context, entry: JSON) -> Result:
        svc = self.service
        method, url = entry["method"], entry["url"]
        path, query = _split(url)
        parts = path.split("/") if path else []
        if method == "GET" or method == "HEAD":
            params = parse_qsl(query, keep_blank_values=True)
            if len(parts) == 1:
                return svc.search(ctx, parts[0], params)
            if len(parts) == 2:
                return svc.read(ctx, parts[0], parts[1])
            if len(parts) == 4 and parts[2] == "_history":
                return svc.vread(ctx, parts[0], parts[1], parts[3])
            raise error(400, "not-supported", "URL không hỗ trợ trong batch", f"Unsupported batch GET '{url}'")
        if method == "POST" and len(parts) == 1:
            return svc.create(ctx, parts[0], dict(entry["resource"]), entry.get("ifNoneExist"))
        if method == "PUT" and len(parts) == 2:
            return svc.update(ctx, parts[0], parts[1], dict(entry["resource"]), entry.get("ifMatch"))
        if method == "PUT" and len(parts) == 1 and query:
            return svc.conditional_update(ctx, parts[0], query, dict(entry["resource"]), entry.get("ifMatch"))
        if method == "DELETE" and len(parts) == 2:
            return svc.delete(ctx, parts[0], parts[1])
        if method == "DELETE" and len(parts) == 1 and query:
            return svc.conditional_delete(ctx, parts[0], query)
        if method == "PATCH" and len(parts) == 2:
            return svc.patch(ctx, parts[0], parts[1], _patch_ops(entry), entry.get("ifMatch"))
        raise error(400, "not-supported", "Thao tác không hỗ trợ", f"Unsupported entry {method} {url}")

    # ---- transaction -----------------------------------------------------------
    def transaction_in(self, ctx: Context, store: Store, bundle: JSON) -> list[JSON]:
        """Run a transaction Bundle inside the caller's open transaction (e.g. an import that must commit
        together with the message that carried it); returns the response entries."""
        entries = bundle.get("entry", [])
        if bundle.get("type") != "transaction" or not isinstance(entries, list):
            raise error(400, "invalid", "Cần Bundle transaction", "Expected a transaction Bundle")
        return self._transaction(ctx, [self._check_entry(i, e) for i, e in enumerate(entries)], store)

    def _transaction(self, ctx: Context, entries: list[JSON], outer: Store | None = None) -> list[JSON]:
        svc = self.service
        authorized: set[tuple[str, str | None]] = set()  # the same answer for every entry of one kind
        for e in entries:
            if e["method"] in ("POST", "PUT") and isinstance(e["resource"], dict):
                e["resource"] = dict(e["resource"])
            path, _ = _split(e["url"])
            asked = (_INTERACTION[e["method"]] if "/" in path or e["method"] != "GET" else "search",
                     path.split("/")[0] if path else None)
            if asked not in authorized:
                svc.guard.authorize(ctx, *asked)
                authorized.add(asked)
        responses: dict[int, JSON] = {}
        written: list[Stored] = []
        with (nullcontext(outer) if outer is not None else svc.db.begin()) as store:
            mapping = self._assign_ids(ctx, store, entries)
            self._rewrite_references(ctx, store, entries, mapping)
            for e in sorted(entries, key=lambda x: (_ORDER[x["method"]], x["index"])):
                try:
                    result = self._run_in(ctx, store, e, written)
                except FhirError as exc:
                    where = f"Bundle.entry[{e['index']}]"
                    exc.issues = [OutcomeIssue(i.severity, i.code, i.diagnostics, _in_entry(i.expression, where))
                                  for i in exc.issues]
                    raise
                responses[e["index"]] = _response_entry(ctx, result)
            if written:
                svc.guard.on_write(ctx, store, AuditFacts(
                    "transaction", resources=[(w.rtype, w.rid) for w in written]), written)
        return [responses[e["index"]] for e in entries]

    def _assign_ids(self, ctx: Context, store: Store, entries: list[JSON]) -> dict[str, str]:
        """Map each entry's fullUrl to the Type/id it will have; resolve conditional creates/updates."""
        svc = self.service
        mapping: dict[str, str] = {}
        for e in entries:
            path, query = _split(e["url"])
            parts = path.split("/") if path else []
            full_url = e.get("fullUrl")
            if e["method"] == "POST" and len(parts) == 1:
                rtype = parts[0]
                svc.check_type(rtype)
                if e.get("ifNoneExist"):
                    found = self._match(ctx, store, rtype, e["ifNoneExist"])
                    if len(found) > 1:
                        raise error(412, "duplicate", "ifNoneExist khớp nhiều tài nguyên",
                                    "ifNoneExist matched more than one resource", f"Bundle.entry[{e['index']}]")
                    if found:
                        e["existing"] = found[0]
                        if full_url:
                            mapping[full_url] = f"{rtype}/{found[0][1]}"
                        continue
                e["new_id"] = new_id()
                if full_url:
                    mapping[full_url] = f"{rtype}/{e['new_id']}"
            elif e["method"] == "PUT" and len(parts) == 1 and query:
                rtype = parts[0]
                svc.check_type(rtype)
                found = self._match(ctx, store, rtype, query)
                if len(found) > 1:
                    raise error(412, "multiple-matches", "Điều kiện khớp nhiều tài nguyên",
                                "Conditional update matched more than one resource", f"Bundle.entry[{e['index']}]")
                e["target_id"] = found[0][1] if found else (e["resource"].get("id") or new_id())
                if full_url:
                    mapping[full_url] = f"{rtype}/{e['target_id']}"
            elif e["method"] == "PUT" and len(parts) == 2 and full_url and full_url.startswith("urn:"):
                mapping[full_url] = path
        return mapping

    def _match(self, ctx: Context, store: Store, rtype: str, query: str) -> list[tuple[str, str]]:
        params = parse_qsl(query.lstrip("?"), keep_blank_values=True)
        if not params:
            raise error(400, "invalid", "Điều kiện rỗng", "Empty condition")
        parsed, _ = self.service.parser.parse(rtype, params, strict=True)
        rows = store.execute(self.service.select(ctx, parsed).limit(2)).all()
        return [(rtype, s.rid) for s in store.fetch([(r[0], r[1]) for r in rows])]

    def _rewrite_references(self, ctx: Context, store: Store, entries: list[JSON], mapping: dict[str, str]) -> None:
        cache: dict[str, str] = {}

        def resolve(ref: str) -> str:
            if ref in mapping:
                return mapping[ref]
            if ref.startswith(ctx.base_url + "/"):
                return ref[len(ctx.base_url) + 1 :]
            if "?" in ref and not ref.startswith(("http://", "https://", "urn:")):
                if ref not in cache:
                    rtype, query = ref.split("?", 1)
                    self.service.check_type(rtype)
                    found = self._match(ctx, store, rtype, query)
                    if len(found) != 1:
                        raise error(412 if found else 404, "not-found" if not found else "multiple-matches",
                                    f"Tham chiếu có điều kiện '{ref}' khớp {len(found)} tài nguyên",
                                    f"Conditional reference '{ref}' matched {len(found)} resources")
                    cache[ref] = f"{found[0][0]}/{found[0][1]}"
                return cache[ref]
            if ref.startswith("urn:uuid:") or ref.startswith("urn:oid:"):
                raise error(404, "not-found", f"Tham chiếu '{ref}' không trỏ tới mục nào trong Bundle",
                            f"Reference '{ref}' matches no entry in the Bundle")
            return ref

        for e in entries:
            if isinstance(e.get("resource"), dict):
                e["resource"] = _rewrite_refs(e["resource"], resolve)

    def _current_for_write(self, ctx: Context, store: Store, rtype: str, rid: str) -> Stored | None:
        current = store.current(rtype, rid, lock=True)
        if self.service._hidden(ctx, store, current):
            raise self.service._not_found(ctx, "transaction", rtype, rid)
        return current

    def _run_in(self, ctx: Context, store: Store, e: JSON, written: list[Stored]) -> Result:
        svc = self.service
        method = e["method"]
        path, query = _split(e["url"])
        parts = path.split("/") if path else []
        if method == "POST":
            if "existing" in e:
                rtype, rid = e["existing"]
                found = store.current(rtype, rid)
                assert found is not None
                return Result(200, found, body=found.body)
            resource = svc._prepare(e["resource"], parts[0], None)
            resource.pop("id", None)
            stored = store.create(resource, e["new_id"])
            written.append(stored)
            return Result(201, stored, body=stored.body)
        if method == "PUT":
            rtype = parts[0]
            rid = parts[1] if len(parts) == 2 else e["target_id"]
            svc.check_type(rtype)
            svc.check_id(rid)
            resource = e["resource"]
            if len(parts) == 1:
                resource.setdefault("id", rid)
            if "id" not in resource:
                raise error(400, "required", "Thân cập nhật thiếu id", "An update body must carry the resource id")
            resource = svc._prepare(resource, rtype, rid)
            result = svc._update_in(ctx, store, rtype, rid, resource, e.get("ifMatch"))
            assert result.stored is not None
            written.append(result.stored)
            return result
        if method == "PATCH":
            if len(parts) != 2:
                raise error(400, "not-supported", "PATCH cần Loại/id", "PATCH needs Type/id")
            svc.check_type(parts[0])
            svc.check_id(parts[1])
            current = self._current_for_write(ctx, store, parts[0], parts[1])
            if current is None or current.deleted:
                raise error(404, "not-found", "Không tìm thấy", f"{path} not found")
            svc._check_if_match(current, e.get("ifMatch"))
            try:
                patched = jsonpatch.apply_patch(current.resource(), _patch_ops(e))
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, TypeError, ValueError) as exc:
                raise error(422, "processing", "Không áp dụng được JSON Patch", str(exc)) from None
            svc._prepare(patched, parts[0], parts[1])
            stored = store.write(current, patched, "PATCH")
            written.append(stored)
            return Result(200, stored, body=stored.body)
        if method == "DELETE":
            if len(parts) == 2:
                svc.check_type(parts[0])
                svc.check_id(parts[1])
                targets = [(parts[0], parts[1])]
            else:
                targets = self._match(ctx, store, parts[0], query)
                if len(targets) > 1:
                    raise error(412, "multiple-matches", "Điều kiện xoá khớp nhiều tài nguyên",
                                "Conditional delete matched more than one resource")
            for rtype, rid in targets:
                current = self._current_for_write(ctx, store, rtype, rid)
                if current is not None and not current.deleted:
                    store.write(current, None, "DELETE")
                    written.append(current)
            return Result(204)
        # GET inside a transaction: reads see the transaction's own writes.
        params = parse_qsl(query, keep_blank_values=True)
        if len(parts) == 2:
            found = store.current(parts[0], parts[1])
            if found is None or found.deleted or svc._hidden(ctx, store, found):
                raise error(404, "not-found", "Không tìm thấy", f"{path} not found")
            return Result(200, found, body=found.body)
        query_obj, ignored = svc.parser.parse(parts[0], params, strict=ctx.strict)
        return svc._search_in(store, ctx, query_obj, ignored, None)


def _in_entry(expression: tuple[str, ...], where: str) -> tuple[str, ...]:
    """Locate issues inside the failing entry: `Observation.status` becomes `Bundle.entry[4].resource.status`."""
    if not expression:
        return (where,)
    return tuple(e if e.startswith("Bundle.entry[") else f"{where}.resource{'.' if '.' in e else ''}"
                 f"{e.partition('.')[2]}" for e in expression)


_INTERACTION = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete", "GET": "read",
                "HEAD": "read"}


def _patch_ops(entry: JSON) -> Any:
    resource = entry.get("resource")
    if isinstance(resource, dict) and resource.get("resourceType") == "Binary" and resource.get("data"):
        import base64

        try:
            raw = base64.b64decode(resource["data"])
        except ValueError:
            raise error(400, "invalid", "Binary không chứa JSON Patch", "Binary does not hold a JSON Patch") from None
        return parse_json(raw)
    raise error(400, "invalid", "PATCH trong Bundle cần Binary chứa JSON Patch",
                "A PATCH entry needs a Binary resource holding a JSON Patch document")


def _rewrite_refs(node: Any, resolve: Callable[[str], str]) -> Any:
    """Rewrite every Reference.reference (every string under the JSON key "reference"), copying only
    the objects and arrays on the way to a changed value: the input is never modified, and what
    did not change is shared with it.

    Why a walk over containers: it skips string leaves at C speed and builds nothing for unchanged
    subtrees, about half the CPU of serialising the resource, splicing the bytes and parsing
    them again (which the previous version did)."""
    kind = type(node)
    if kind is dict:
        items: Any = node.items()
    elif kind is list:
        items = enumerate(node)
    else:
        return node
    out: Any = None
    for key, value in items:
        value_kind = type(value)
        if value_kind is str:
            if key != "reference":  # array items have int keys
                continue
            new: Any = resolve(value)
            if new == value:
                continue
        elif value_kind is dict or value_kind is list:
            new = _rewrite_refs(value, resolve)
            if new is value:
                continue
        else:
            continue
        if out is None:
            out = kind(node)
        out[key] = new
    return node if out is None else out


@lru_cache(maxsize=1024)  # entries repeat a handful of URLs (`Observation`, `Patient`, ...)
def _split(url: str) -> tuple[str, str]:
    parsed = urlsplit(url)
    path = parsed.path.strip("/")
    if path.startswith("fhir/"):
        path = path[5:]
    return path, parsed.query


def _response_entry(ctx: Context, result: Result) -> JSON:
    response: JSON = {"status": _STATUS_TEXT.get(result.status, str(result.status))}
    entry: JSON = {}
    stored = result.stored
    if stored is not None and not stored.deleted and result.status in (200, 201) and stored.body:
        url = f"{stored.rtype}/{stored.rid}"
        entry["fullUrl"] = f"{ctx.base_url}/{url}"
        response["location"] = f"{url}/_history/{stored.version}"
        response["etag"] = stored.etag
        response["lastModified"] = _instant(stored.last_updated)
        entry["resource"] = orjson.Fragment(stored.body)
    elif result.body is not None or result.resource is not None:
        entry["resource"] = orjson.Fragment(result.json_bytes())
    if result.outcome is not None:
        response["outcome"] = result.outcome
    entry["response"] = response
    return entry


# The entries of one transaction share their instant: format it once, not once per entry.
_instant = lru_cache(maxsize=16)(format_instant)


def _response_bundle(kind: str, entries: list[JSON]) -> JSON:
    return {"resourceType": "Bundle", "type": kind, "entry": entries}


__all__ = ["BundleProcessor"]
