"""The HTTP face of a node: FHIR REST over Starlette, served by uvicorn.

Why Starlette without FastAPI's models: FHIR resources are validated against the
official definitions, not Pydantic classes, and the read path streams stored
bytes untouched. This module only maps HTTP to the interactions layer: headers,
content negotiation, Prefer, and turning every error into an OperationOutcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qsl

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from lienthong.api.parameters import parameter_pairs, parameter_values, to_parameters
from lienthong.api.workers import in_thread
from lienthong.exchange.service import ExchangeService
from lienthong.fhir.datetimes import format_http_date
from lienthong.fhir.outcome import FhirError, OutcomeIssue, error, operation_outcome
from lienthong.fhir.shaping import shape
from lienthong.identity.service import IdentityService
from lienthong.interactions.body import parse_json, parse_resource
from lienthong.interactions.bundles import BundleProcessor
from lienthong.interactions.capability import OWN_DEFINITIONS, Operation, capability_statement
from lienthong.interactions.context import Context
from lienthong.interactions.export import ExportManager
from lienthong.interactions.guard import AuditFacts
from lienthong.interactions.service import FhirService, Result
from lienthong.security.audit import AuditWaits, BatchNotifier
from lienthong.security.authn import Authenticator
from lienthong.security.tokens import NeedsIO
from lienthong.storage.repository import Stored

log = logging.getLogger("lienthong.api")

FHIR_JSON = "application/fhir+json; charset=utf-8"
_JSON_TYPES = ("application/fhir+json", "application/json", "json", "fhir+json", "application/json+fhir")
_XML_TYPES = ("application/fhir+xml", "application/xml", "xml", "text/xml", "fhir+xml", "application/xml+fhir")
AUDIT_WAITS = "lienthong.audit_waits"  # ASGI scope key: the request's audit commits, awaited by ResponseGuard
_CONTEXT = "lienthong.context"  # ASGI scope key: the context `cached_read` authenticated, for the ordinary route
_FHIR_JSON_BYTES = FHIR_JSON.encode()


@dataclass
class ApiSettings:
    max_body_bytes: int = 32 * 1024 * 1024
    public_base_url: str | None = None  # e.g. https://node.example.vn/fhir behind a proxy
    node_name: str = "lienthong"  # shown as the audit source
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API; none by default
    audit_journal: str = "auto"  # where read audits are made durable: auto | off | a directory (audit_journal.py)

    def to_json(self) -> str:
        return orjson.dumps({**self.__dict__, "cors_origins": list(self.cors_origins)}).decode()

    @classmethod
    def from_json(cls, text: str) -> ApiSettings:
        data = orjson.loads(text or "{}")
        data["cors_origins"] = tuple(data.get("cors_origins", ()))
        return cls(**data)


class FhirApi:
    """Request handlers bound to one service."""

    def __init__(self, service: FhirService, settings: ApiSettings, auth: Authenticator | None = None,
                 identity: IdentityService | None = None) -> None:
        self.service = service
        self.settings = settings
        self.auth = auth
        self.identity = identity
        self.bundles = BundleProcessor(service)
        self.exports = ExportManager(service)
        self._capability: dict[str, Any] | None = None
        self._base_urls: dict[tuple[Any, ...], str] = {}
        self.operations: list[Operation] = []  # what the optional parts add, for the CapabilityStatement
        if identity is not None:
            self.operations += [
                ("Patient", "match", "http://hl7.org/fhir/OperationDefinition/Patient-match"),
                ("Patient", "merge", f"{OWN_DEFINITIONS}/Patient-merge"),
                ("Patient", "unmerge", f"{OWN_DEFINITIONS}/Patient-unmerge"),
                ("Patient", "mpi-link", f"{OWN_DEFINITIONS}/Patient-mpi-link"),
                (None, "mpi-review", f"{OWN_DEFINITIONS}/mpi-review"),
            ]

    # ---- plumbing --------------------------------------------------------------
    def base_context(self, request: Request) -> Context:
        scope = request.scope
        prefer = _header(scope, b"prefer")
        client = scope.get("client")
        return Context(
            base_url=self.settings.public_base_url or self._base_url(request),
            strict=prefer is not None and "handling=strict" in prefer.replace(" ", ""),
            address=client[0] if client else None,
            extra={"node": self.settings.node_name},
            audit_waits=scope.get(AUDIT_WAITS),
        )

    def _base_url(self, request: Request) -> str:
        """Starlette's `base_url` + "/fhir", remembered per (scheme, server, Host, root path).

        Why: building the URL object cost more than the rest of the context. The Host header comes
        from the client, so the memo is bounded and simply cleared when full."""
        scope = request.scope
        server = scope.get("server")  # a tuple from uvicorn, a list from some test clients
        key = (scope.get("scheme"), tuple(server) if server else None, _header(scope, b"host"),
               scope.get("app_root_path", scope.get("root_path")))
        base = self._base_urls.get(key)
        if base is None:
            if len(self._base_urls) >= 64:
                self._base_urls.clear()
            base = self._base_urls[key] = str(request.base_url).rstrip("/") + "/fhir"
        return base

    async def context(self, request: Request) -> Context:
        """The request context with the authenticated principal (401 when authentication is on and fails)."""
        known = request.scope.get(_CONTEXT)
        if known is not None:  # authenticated already by `cached_read`, which handed the request on
            return known  # type: ignore[no-any-return]
        ctx = self.base_context(request)
        if self.auth is not None:
            header = _header(request.scope, b"authorization")
            try:  # from caches on the event loop: no thread-pool hop for the common case
                ctx.principal = self.auth.principal(ctx, header, io=False)
            except NeedsIO:
                ctx.principal = await in_thread(self.auth.principal, ctx, header)
        return ctx

    async def body(self, request: Request) -> bytes:
        length = request.headers.get("content-length")
        limit = self.settings.max_body_bytes
        if length and length.isdigit() and int(length) > limit:
            raise error(413, "too-costly", "Thân yêu cầu quá lớn", f"Request body exceeds {limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise error(413, "too-costly", "Thân yêu cầu quá lớn", f"Request body exceeds {limit} bytes")
            chunks.append(chunk)
        ctype = request.headers.get("content-type", "application/fhir+json").split(";")[0].strip().lower()
        if ctype in _XML_TYPES:
            raise error(415, "not-supported", "Chưa hỗ trợ XML", "XML is not supported yet; send application/fhir+json")
        return b"".join(chunks)

    @staticmethod
    def query(request: Request) -> list[tuple[str, str]]:
        if not request.scope.get("query_string"):  # most reads: no URL to build, nothing to parse
            return []
        return parse_qsl(request.url.query, keep_blank_values=True)

    async def form_or_query(self, request: Request) -> list[tuple[str, str]]:
        params = self.query(request)
        raw = await self.body(request)
        if raw:
            params += parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True)
        return params

    def cached_read(self, scope: Any, rtype: str, rid: str) -> tuple[int, list[tuple[bytes, bytes]], bytes] | None:
        """GET [base]/Type/id answered from the read cache on the event loop: (status, headers, body), or None
        to take the ordinary route (not cached, a caller whose view needs the database, a token to look up).

        Why: for a cached resource, Starlette's routing, its request and response objects and the exception
        layers cost more than the read itself. The answer is the one `instance` + `respond` give: same
        service call, same headers, errors as OperationOutcome."""
        request = Request(scope)
        ctx = self.base_context(request)
        if self.auth is not None:
            try:
                ctx.principal = self.auth.principal(ctx, _header(scope, b"authorization"), io=False)
            except (NeedsIO, FhirError):  # the ordinary route looks the token up, or refuses it with its audit
                return None
        scope[_CONTEXT] = ctx
        try:
            result = self.service.read_cached(ctx, rtype, rid)
        except FhirError as exc:
            headers = [(k.lower().encode(), v.encode()) for k, v in (exc.headers or {}).items()]
            return exc.status, [(b"content-type", _FHIR_JSON_BYTES), *headers], orjson.dumps(exc.outcome())
        if result is None or result.stored is None or result.body is None:
            return None
        headers = [(b"content-type", _FHIR_JSON_BYTES)]
        headers += [(k.lower().encode(), v.encode()) for k, v in _version_headers(result.stored).items()]
        return 200, headers, result.body

    def respond(self, request: Request, result: Result, ctx: Context) -> Response:
        headers = dict(result.headers)
        stored = result.stored
        if stored is not None and not stored.deleted:
            headers.update(_version_headers(stored))
            if result.status == 201:
                headers["Location"] = f"{ctx.base_url}/{stored.rtype}/{stored.rid}/_history/{stored.version}"
        if request.method in ("POST", "PUT", "PATCH") and stored is not None:
            prefer = (_header(request.scope, b"prefer") or "").replace(" ", "")
            if "return=minimal" in prefer:
                return Response(status_code=result.status, headers=headers)
            if "return=OperationOutcome" in prefer:
                outcome = operation_outcome([OutcomeIssue("information", "informational",
                                                          f"Thành công / {request.method} {stored.rtype}/{stored.rid}"
                                                          f" version {stored.version}")])
                return self.json(request, result.status, orjson.dumps(outcome), headers)
        if result.outcome is not None and result.body is None and result.resource is None:
            return self.json(request, result.status, orjson.dumps(result.outcome), headers)
        if request.method == "HEAD":
            return Response(status_code=result.status, headers=headers, media_type=FHIR_JSON)
        data = result.json_bytes()
        params = dict(self.query(request))
        summary, elements = params.get("_summary"), params.get("_elements")
        if (summary or elements) and stored is not None and request.method == "GET" and data:
            if summary not in (None, "true", "false", "text", "data"):
                raise error(400, "invalid", "_summary không hợp lệ", "Invalid _summary")
            data = orjson.dumps(shape(orjson.loads(data), summary, elements.split(",") if elements else None))
        return self.json(request, result.status, data, headers)

    @staticmethod
    def json(request: Request, status: int, data: bytes, headers: dict[str, str] | None = None) -> Response:
        pretty = bool(request.scope.get("query_string")) and request.query_params.get("_pretty") == "true"
        if pretty and data:
            data = orjson.dumps(orjson.loads(data), option=orjson.OPT_INDENT_2)
        return Response(data, status_code=status, headers=headers, media_type=FHIR_JSON)

    def capability(self, ctx: Context) -> dict[str, Any]:
        if self._capability is None:
            self._capability = capability_statement(self.service.registry, ctx.base_url,
                                                    operations=self.operations)
        return self._capability

    # ---- endpoints -------------------------------------------------------------
    async def metadata(self, request: Request) -> Response:
        ctx = self.base_context(request)
        cap = await in_thread(self.capability, ctx)
        return self.json(request, 200, orjson.dumps(cap))

    async def root(self, request: Request) -> Response:
        ctx = await self.context(request)
        if request.method == "POST":
            bundle = parse_json(await self.body(request))
            result = await in_thread(self.bundles.process, ctx, bundle)
            return self.respond(request, result, ctx)
        params = self.query(request)
        types = [t.strip() for name, value in params if name == "_type" for t in value.split(",") if t.strip()]
        for rtype in types:
            self.service.check_type(rtype)
        params = [(name, value) for name, value in params if name != "_type"]
        result = await in_thread(self.service.search, ctx, None, params, types or None)
        return self.respond(request, result, ctx)

    async def system_history(self, request: Request) -> Response:
        ctx = await self.context(request)
        result = await in_thread(self.service.history, ctx, None, None, self.query(request))
        return self.respond(request, result, ctx)

    async def type_level(self, request: Request) -> Response:
        ctx = await self.context(request)
        rtype = request.path_params["rtype"]
        if rtype.startswith("$"):
            return await self.system_operation(request, ctx, rtype)
        svc = self.service
        if request.method in ("GET", "HEAD"):
            result = await in_thread(svc.search, ctx, rtype, self.query(request))
        elif request.method == "POST":
            resource = parse_resource(await self.body(request))
            result = await in_thread(svc.create, ctx, rtype, resource, request.headers.get("if-none-exist"))
        elif request.method == "PUT":
            resource = parse_resource(await self.body(request))
            if not request.url.query:
                raise error(400, "invalid", "PUT cần id hoặc điều kiện", "PUT needs an id or search criteria")
            result = await in_thread(svc.conditional_update, ctx, rtype, request.url.query, resource,
                                             request.headers.get("if-match"))
        elif request.method == "DELETE":
            if not request.url.query:
                raise error(400, "invalid", "DELETE cần id hoặc điều kiện", "DELETE needs an id or search criteria")
            result = await in_thread(svc.conditional_delete, ctx, rtype, request.url.query)
        else:
            raise error(405, "not-supported", "Phương thức không hỗ trợ", f"{request.method} not allowed here")
        return self.respond(request, result, ctx)

    async def type_search_post(self, request: Request) -> Response:
        ctx = await self.context(request)
        params = await self.form_or_query(request)
        result = await in_thread(self.service.search, ctx, request.path_params["rtype"], params)
        return self.respond(request, result, ctx)

    async def type_history(self, request: Request) -> Response:
        ctx = await self.context(request)
        result = await in_thread(self.service.history, ctx, request.path_params["rtype"], None,
                                         self.query(request))
        return self.respond(request, result, ctx)

    async def instance(self, request: Request) -> Response:
        ctx = await self.context(request)
        rtype, rid = request.path_params["rtype"], request.path_params["rid"]
        if rid.startswith("$"):
            return await self.type_operation(request, ctx, rtype, rid)
        svc = self.service
        if request.method in ("GET", "HEAD"):
            cached = svc.read_cached(ctx, rtype, rid)  # no thread hop when the cache answers
            result = cached if cached is not None else await in_thread(svc.read, ctx, rtype, rid)
        elif request.method == "PUT":
            resource = parse_resource(await self.body(request))
            result = await in_thread(svc.update, ctx, rtype, rid, resource, request.headers.get("if-match"))
        elif request.method == "PATCH":
            ctype = request.headers.get("content-type", "").split(";")[0].strip()
            if ctype not in ("application/json-patch+json", "application/json"):
                raise error(415, "not-supported", "Chỉ hỗ trợ JSON Patch",
                            "PATCH needs Content-Type application/json-patch+json")
            ops = parse_json(await self.body(request))
            result = await in_thread(svc.patch, ctx, rtype, rid, ops, request.headers.get("if-match"))
        elif request.method == "DELETE":
            result = await in_thread(svc.delete, ctx, rtype, rid)
        else:
            raise error(405, "not-supported", "Phương thức không hỗ trợ", f"{request.method} not allowed here")
        return self.respond(request, result, ctx)

    async def instance_sub(self, request: Request) -> Response:
        ctx = await self.context(request)
        rtype, rid, sub = request.path_params["rtype"], request.path_params["rid"], request.path_params["sub"]
        svc = self.service
        if sub == "_history":
            result = await in_thread(svc.history, ctx, rtype, rid, self.query(request))
        elif sub == "$everything" and rtype == "Patient":
            params = self.query(request)
            if request.method == "POST":
                params += parameter_pairs(parse_json(await self.body(request)))
            result = await in_thread(svc.everything, ctx, rid, params)
        elif sub == "$validate":
            payload = parse_json(await self.body(request))
            result = await in_thread(svc.validate_operation, ctx, rtype, payload, rid)
        elif sub == "$meta":
            result = await in_thread(svc.meta, ctx, rtype, rid)
        elif sub == "$break-glass" and rtype == "Patient" and request.method == "POST" and self.auth is not None:
            pairs = dict(parameter_pairs(parse_json(await self.body(request))))
            self.service.check_id(rid)
            grant = await in_thread(self.auth.break_glass, ctx, rid, pairs.get("reason", ""))
            return self.json(request, 200, orjson.dumps({"resourceType": "Parameters", "parameter": [
                {"name": k, "valueString" if isinstance(v, str) else "valueInteger": v} for k, v in grant.items()]}))
        elif sub == "$mpi-link" and rtype == "Patient" and request.method == "POST" and self.identity is not None:
            self.service.check_id(rid)
            outcome = await in_thread(self.identity.resolve, ctx, rid)
            return self.json(request, 200, orjson.dumps(to_parameters(outcome)))
        elif sub == "$access-report" and rtype == "Patient" and self.auth is not None:
            return await self.audit_bundle(request, ctx, {"patient": rid})
        elif sub in ("$meta-add", "$meta-delete") and request.method == "POST":
            payload = parse_json(await self.body(request))
            result = await in_thread(svc.meta_change, ctx, rtype, rid, payload, sub == "$meta-add")
        else:
            raise error(404, "not-supported", f"Không hỗ trợ '{sub}'", f"'{sub}' is not supported on {rtype}")
        return self.respond(request, result, ctx)

    async def vread(self, request: Request) -> Response:
        ctx = await self.context(request)
        p = request.path_params
        if p.get("op") == "$meta":
            result = await in_thread(self.service.meta, ctx, p["rtype"], p["rid"], p["vid"])
        else:
            result = await in_thread(self.service.vread, ctx, p["rtype"], p["rid"], p["vid"])
        return self.respond(request, result, ctx)

    async def type_operation(self, request: Request, ctx: Context, rtype: str, op: str) -> Response:
        svc = self.service
        svc.check_type(rtype)
        if op == "$validate" and request.method == "POST":
            payload = parse_json(await self.body(request))
            result = await in_thread(svc.validate_operation, ctx, rtype, payload)
        elif op == "$meta":
            result = await in_thread(svc.meta, ctx, rtype, None)
        elif op == "$export" and rtype == "Patient":
            return await self.export_kickoff(request, ctx, "patient")
        elif op in ("$match", "$merge", "$unmerge") and rtype == "Patient" and request.method == "POST" \
                and self.identity is not None:
            return await self.identity_operation(request, ctx, op)
        else:
            raise error(404, "not-supported", f"Không hỗ trợ '{op}'", f"Operation '{op}' is not supported on {rtype}")
        return self.respond(request, result, ctx)

    async def system_operation(self, request: Request, ctx: Context, op: str) -> Response:
        if op == "$export":
            return await self.export_kickoff(request, ctx, "system")
        if op == "$meta":
            result = await in_thread(self.service.meta, ctx, None, None)
            return self.respond(request, result, ctx)
        if op == "$mpi-review" and self.identity is not None:
            identity = self.identity
            if request.method == "POST":
                pairs = dict(parameter_pairs(parse_json(await self.body(request))))
                self.service.guard.authorize(ctx, "update", "Patient")
                outcome = await in_thread(identity.decide, ctx, pairs.get("review", ""), pairs.get("decision", ""))
                return self.json(request, 200, orjson.dumps(to_parameters(outcome)))
            self.service.guard.authorize(ctx, "search", "Patient")
            status = request.query_params.get("status", "pending")
            items = await in_thread(identity.reviews, status)
            return self.json(request, 200, orjson.dumps({"resourceType": "Parameters", "parameter": [
                {"name": "review", "part": to_parameters(item)["parameter"]} for item in items]}))
        if op == "$audit" and self.auth is not None:
            q = dict(self.query(request))
            return await self.audit_bundle(request, ctx, {k: q[k] for k in ("patient", "actor", "since") if k in q})
        if op == "$export-poll-status":
            job = request.query_params.get("_jobId", "")
            if request.method == "DELETE":
                await in_thread(self.exports.cancel, ctx, job)
                return Response(status_code=202)
            polled: tuple[int, dict[str, Any] | None, dict[str, str]] = await in_thread(
                self.exports.status, ctx, job)
            code, manifest, headers = polled
            if manifest is None:
                return Response(status_code=code, headers=headers)
            return Response(orjson.dumps(manifest), status_code=200, media_type="application/json")
        raise error(404, "not-supported", f"Không hỗ trợ '{op}'", f"Operation '{op}' is not supported")

    async def identity_operation(self, request: Request, ctx: Context, op: str) -> Response:
        assert self.identity is not None
        payload = parse_json(await self.body(request))
        if op == "$match":
            bundle = await in_thread(self.identity.match, ctx, payload)
            return self.json(request, 200, orjson.dumps(bundle))
        values = parameter_values(payload)
        if op == "$merge":
            source = values.get("source-patient", "").removeprefix("Patient/")
            target = values.get("target-patient", "").removeprefix("Patient/")
            self.service.check_id(source or "-")
            self.service.check_id(target or "-")
            outcome = await in_thread(self.identity.merge, ctx, source, target)
        else:
            outcome = await in_thread(self.identity.unmerge, ctx, values.get("merge", ""))
        return self.json(request, 200, orjson.dumps(to_parameters(outcome)))

    async def audit_bundle(self, request: Request, ctx: Context, query: dict[str, str]) -> Response:
        """The audit trail as a Bundle of AuditEvent, for auditors only (who accessed this record, and when)."""
        assert self.auth is not None
        guard = self.auth.guard
        guard.require(ctx, "audit_reader", "audit")
        since = None
        if "since" in query:
            from lienthong.fhir.datetimes import DateFormatError, parse_range

            try:
                since = parse_range(query["since"].replace(" ", "+"))[0]
            except DateFormatError:
                raise error(400, "invalid", "since không hợp lệ", "Invalid since") from None
        events = await in_thread(guard.audit.events, query.get("patient"), query.get("actor"), since)
        guard.on_access(ctx, AuditFacts("operation", patients={query["patient"]} if "patient" in query else set(),
                                        detail="audit trail read"))
        bundle = {"resourceType": "Bundle", "type": "searchset", "total": len(events),
                  "entry": [{"fullUrl": f"urn:lienthong:audit:{e['id']}", "resource": e,
                             "search": {"mode": "match"}} for e in events]}
        return self.json(request, 200, orjson.dumps(bundle))

    async def export_kickoff(self, request: Request, ctx: Context, level: str) -> Response:
        if request.headers.get("prefer", "").replace(" ", "").find("respond-async") < 0:
            raise error(400, "invalid", "$export cần Prefer: respond-async", "$export requires Prefer: respond-async")
        params = self.query(request)
        if request.method == "POST":
            raw = await self.body(request)
            if raw:
                params += parameter_pairs(parse_json(raw))
        job = await in_thread(self.exports.start, ctx, level, params)
        return Response(status_code=202, headers={"Content-Location": f"{ctx.base_url}/$export-poll-status?_jobId={job}"})

    async def export_file(self, request: Request) -> Response:
        ctx = await self.context(request)
        data = await in_thread(self.exports.file, ctx, request.path_params["job"], request.path_params["name"])
        return Response(data, media_type="application/fhir+ndjson")


def _guard(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Content negotiation first: XML is refused with 406 until it is implemented."""

    async def wrapped(request: Request) -> Response:
        fmt = request.query_params.get("_format") if request.scope.get("query_string") else None
        accept = _header(request.scope, b"accept") or ""
        if fmt is not None:
            if fmt.split(";")[0].strip() in _XML_TYPES:
                raise error(406, "not-supported", "Chưa hỗ trợ XML", "XML is not supported yet; use _format=json")
            if fmt.split(";")[0].strip() not in _JSON_TYPES:
                raise error(406, "not-supported", "Định dạng không hỗ trợ", f"Unsupported _format '{fmt[:40]}'")
        elif accept and not _accepts_json(accept):
            raise error(406, "not-supported", "Chưa hỗ trợ định dạng này",
                        "Only application/fhir+json is supported (XML not yet)")
        return await handler(request)

    return wrapped


def _version_headers(stored: Stored) -> dict[str, str]:
    return {"ETag": stored.etag, "Last-Modified": _http_date(stored.last_updated // 1_000_000)}


@lru_cache(maxsize=4096)
def _http_date(seconds: int) -> str:
    """Last-Modified has whole seconds, and the same resources are read again and again: formatting
    the date was a tenth of `respond`."""
    return format_http_date(seconds * 1_000_000)


def _header(scope: Any, name: bytes) -> str | None:
    """The first value of a header (name in lower case, as ASGI gives them), like `Headers.get`
    without building the mapping or raising KeyError for the usual absent ones."""
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")  # type: ignore[no-any-return]
    return None


def _accepts_json(accept: str) -> bool:
    for part in accept.split(","):
        media = part.split(";")[0].strip().lower()
        if media in ("*/*", "application/*", "application/fhir+ndjson", "application/ndjson") or media in _JSON_TYPES:
            return True
    return False


async def _fhir_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, FhirError)
    return Response(orjson.dumps(exc.outcome()), status_code=exc.status, headers=exc.headers or None,
                    media_type=FHIR_JSON)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = "not-found" if exc.status_code == 404 else "not-supported"
    outcome = operation_outcome([OutcomeIssue("error", code, f"{exc.detail} ({request.method} {request.url.path})")])
    return Response(orjson.dumps(outcome), status_code=exc.status_code, media_type=FHIR_JSON)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    outcome = operation_outcome([OutcomeIssue("fatal", "exception",
                                              "Lỗi máy chủ, đã ghi nhật ký / Internal error; it has been logged")])
    return Response(orjson.dumps(outcome), status_code=500, media_type=FHIR_JSON)


def routes(api: FhirApi, prefix: str = "/fhir") -> list[Route]:
    g = _guard
    return [
        Route(f"{prefix}/metadata", g(api.metadata), methods=["GET"]),
        Route(f"{prefix}", g(api.root), methods=["GET", "POST"]),
        Route(f"{prefix}/", g(api.root), methods=["GET", "POST"]),
        Route(f"{prefix}/_history", g(api.system_history), methods=["GET"]),
        Route(f"{prefix}/$export-file/{{job}}/{{name}}", g(api.export_file), methods=["GET"]),
        Route(f"{prefix}/{{rtype}}", g(api.type_level), methods=["GET", "HEAD", "POST", "PUT", "DELETE"]),
        Route(f"{prefix}/{{rtype}}/_search", g(api.type_search_post), methods=["POST"]),
        Route(f"{prefix}/{{rtype}}/_history", g(api.type_history), methods=["GET"]),
        Route(f"{prefix}/{{rtype}}/{{rid}}", g(api.instance), methods=["GET", "HEAD", "PUT", "PATCH", "DELETE", "POST"]),
        Route(f"{prefix}/{{rtype}}/{{rid}}/_history/{{vid}}", g(api.vread), methods=["GET", "HEAD"]),
        Route(f"{prefix}/{{rtype}}/{{rid}}/_history/{{vid}}/{{op}}", g(api.vread), methods=["GET", "POST"]),
        Route(f"{prefix}/{{rtype}}/{{rid}}/{{sub}}", g(api.instance_sub), methods=["GET", "POST"]),
    ]


EXCEPTION_HANDLERS: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
    FhirError: _fhir_error,
    HTTPException: _http_error,
    Exception: _unexpected,
}


def build_app(service: FhirService, settings: ApiSettings | None = None,
              auth: Authenticator | None = None, identity: IdentityService | None = None,
              exchange: ExchangeService | None = None,
              on_shutdown: Sequence[Callable[[], None]] = ()) -> Starlette:
    """The ASGI app; `on_shutdown` runs (in a thread, in order) when the server stops serving it."""
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware

    from lienthong.api.auth import AuthApi

    settings = settings or ApiSettings()
    api = FhirApi(service, settings, auth, identity)
    all_routes = routes(api)
    if exchange is not None:
        from lienthong.api.exchange import ExchangeApi

        exchange_api = ExchangeApi(exchange, api)
        all_routes = exchange_api.routes() + all_routes
        api.operations += exchange_api.operations()
    if auth is not None:
        all_routes = AuthApi(auth, api.base_context).routes() + all_routes
    middleware = [Middleware(ResponseGuard)]  # outermost: sees the answer as it leaves, CORS headers included
    if settings.cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                                     allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
                                     allow_headers=["Authorization", "Content-Type", "Prefer", "If-Match",
                                                    "If-None-Exist"],
                                     expose_headers=["Location", "ETag", "Content-Location", "Last-Modified"]))
    middleware.append(Middleware(CachedReads, api=api))  # innermost: its answers get CORS and the guard
    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        for step in on_shutdown:
            await in_thread(step)

    app = Starlette(routes=all_routes, exception_handlers=EXCEPTION_HANDLERS, middleware=middleware,
                    lifespan=lifespan)
    app.state.api = api
    api.exports.resume()
    return app


Send = Callable[[Any], Awaitable[None]]

_SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"), (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"), (b"content-security-policy", b"default-src 'self'; frame-ancestors 'none'"))


def _with_security_headers(headers: Any) -> list[tuple[bytes, bytes]]:
    """The response's headers plus every security header it does not set itself."""
    out = list(headers)
    present = {k.lower() for k, _ in out}
    return out + [h for h in _SECURITY_HEADERS if h[0] not in present]


class _LoopNotifier(BatchNotifier):
    """Wakes the waiting requests of one event loop with one thread-safe call per audit batch."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def notify(self, settled: list[AuditWaits], error: BaseException | None) -> None:
        self.loop.call_soon_threadsafe(self._settle, settled, error)

    @staticmethod
    def _settle(settled: list[AuditWaits], error: BaseException | None) -> None:
        for waits in settled:
            waits.settled += 1
            if error is not None:
                waits.error = error
            if waits.done and isinstance(waits, _RequestWaits) and waits.future is not None \
                    and not waits.future.done():
                waits.future.set_result(None)


class _RequestWaits(AuditWaits):
    """One request's audit records; `future` exists only while the response is held back for them."""

    def __init__(self, notifier: BatchNotifier) -> None:
        super().__init__(notifier)
        self.future: asyncio.Future[None] | None = None


class CachedReads:
    """Answers GET [base]/Type/id for cached resources before Starlette routes the request (`FhirApi.cached_read`).

    It sits inside `ResponseGuard` (security headers, the audit barrier) and CORS, so an answer from here
    passes through exactly what an answer from a route does. Anything else (a query string, HEAD, an
    Accept it does not serve, a path with more segments) goes on unchanged."""

    def __init__(self, app: Any, api: FhirApi, prefix: str = "/fhir") -> None:
        self.app = app
        self.api = api
        self._path = re.compile(re.escape(prefix) + r"/([A-Z][A-Za-z]{1,63})/([A-Za-z0-9\-.]{1,64})")

    async def __call__(self, scope: Any, receive: Any, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and not scope["query_string"]:
            match = self._path.fullmatch(scope["path"])
            accept = _header(scope, b"accept") if match else None
            if match and (not accept or _accepts_json(accept)):
                answer = self.api.cached_read(scope, match[1], match[2])
                if answer is not None:
                    status, headers, body = answer
                    headers.append((b"content-length", str(len(body)).encode()))
                    await send({"type": "http.response.start", "status": status, "headers": headers})
                    await send({"type": "http.response.body", "body": body})
                    return
        await self.app(scope, receive, send)


class ResponseGuard:
    """Every HTTP response gets the security headers, and none leaves before its audit records are committed.

    Security headers: clinical data is never cached by browsers or proxies, framed or sniffed.

    Audit barrier, at the ASGI level because every route (FHIR, auth, exchange) records through the
    same context, and holding back `http.response.start` means no byte of clinical data is sent on an
    unwritten record. The records are group-committed, so concurrent requests share one audit
    transaction, and the requests of a batch are woken together (`_LoopNotifier`). If the commit
    fails, the client gets a 500 OperationOutcome instead of the data (keeping the CORS headers the
    withheld answer had, so a browser can read it).

    Why one middleware for both: each ASGI layer costs a call, a closure and an awaited send per
    message on every request; the two were always applied together, outermost.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self._notifier: _LoopNotifier | None = None

    async def __call__(self, scope: Any, receive: Any, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        notifier = self._notifier
        if notifier is None or notifier.loop is not loop:
            notifier = self._notifier = _LoopNotifier(loop)
        waits = _RequestWaits(notifier)
        scope[AUDIT_WAITS] = waits
        failed = False

        async def guarded_send(message: Any) -> None:
            nonlocal failed
            if failed:
                return
            if message["type"] == "http.response.start":
                if waits.expected:
                    if not waits.done:
                        waits.future = loop.create_future()
                        await waits.future
                    if waits.error is not None:
                        failed = True
                        await self._audit_failed(message, waits.error, send)
                        return
                message["headers"] = _with_security_headers(message.get("headers", ()))
            await send(message)

        await self.app(scope, receive, guarded_send)

    @staticmethod
    async def _audit_failed(withheld: Any, exc: BaseException, send: Send) -> None:
        log.error("audit commit failed; the response is withheld", exc_info=exc)
        outcome = operation_outcome([OutcomeIssue(
            "fatal", "exception", "Không ghi được nhật ký kiểm toán / The audit record could not be "
                                  "written; nothing was returned")])
        cors = [(k, v) for k, v in withheld.get("headers", ()) if k.lower().startswith(b"access-control-")
                or k.lower() == b"vary"]
        await send({"type": "http.response.start", "status": 500,
                    "headers": _with_security_headers([(b"content-type", FHIR_JSON.encode()), *cors])})
        await send({"type": "http.response.body", "body": orjson.dumps(outcome)})
