"""HTTP for the exchange: the signed message endpoint, transfer operations, the hub's registry and locator.

Why thin: the wire protocol (signatures, replay checks, uploads) lives in
`exchange.transport.Receiver`; this module only hands it the raw request and
returns its reply, and maps FHIR operations to the exchange service.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lienthong.api.parameters import parameter_values, to_parameters
from lienthong.api.workers import in_thread
from lienthong.exchange import transfer as tr
from lienthong.exchange.query import answers_bundle
from lienthong.exchange.registry import Facility
from lienthong.exchange.service import ExchangeService
from lienthong.fhir.outcome import error
from lienthong.interactions.body import parse_json
from lienthong.interactions.capability import OWN_DEFINITIONS, Operation

MAX_EXCHANGE_BODY = 8 * 1024 * 1024

log = logging.getLogger(__name__)


class ExchangeApi:
    def __init__(self, exchange: ExchangeService, api: Any) -> None:
        self.exchange = exchange
        self.api = api  # the FhirApi: authentication and JSON helpers

    async def wire(self, request: Request) -> Response:
        """Signed node↔hub messages; authentication is the request signature, not a bearer token."""
        body = b""
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_EXCHANGE_BODY:
                    return JSONResponse({"error": "too-large"}, status_code=413)
        except ClientDisconnect:  # the peer vanished mid-body (link cut, process killed): nothing was stored
            log.info("exchange: %s %s: peer disconnected before the body was complete", request.method, request.url.path)
            return JSONResponse({"error": "incomplete-request"}, status_code=400)
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        reply = await in_thread(self.exchange.receiver.handle, request.method, target,
                                        dict(request.headers), body)
        return Response(reply.body, status_code=reply.status, headers=reply.headers)

    # ---- transfer operations (FHIR) -------------------------------------------------
    async def transfer(self, request: Request) -> Response:
        ctx = await self.api.context(request)
        patient_id = request.path_params["rid"]
        values = parameter_values(parse_json(await self.api.body(request)))
        slip = tr.TransferSlip(
            destination=values.get("destination", ""), reason=values.get("reason", ""),
            main_diagnosis=values.get("mainDiagnosis", ""), doctor_licence=values.get("doctorLicence", ""),
            secondary_diagnoses=[c for c in values.get("secondaryDiagnoses", "").split(";") if c.strip()],
            clinical_signs=values.get("clinicalSigns", ""), course=values.get("course", ""),
            results_summary=values.get("resultsSummary", ""), treatment=values.get("treatment", ""),
            condition=values.get("condition", ""), next_treatment=values.get("nextTreatment", ""),
            transport=values.get("transport", ""), escort_name=values.get("escortName", ""),
            escort_title=values.get("escortTitle", ""), patient_request=values.get("patientRequest") == "true",
            chronic=values.get("chronic") == "true")
        result = await in_thread(self.exchange.start_transfer, ctx, patient_id, slip)
        response: Response = self.api.json(request, 200, orjson.dumps(to_parameters({k: str(v) for k, v in result.items()})))
        return response

    async def transfer_step(self, request: Request) -> Response:
        ctx = await self.api.context(request)
        values = parameter_values(parse_json(await self.api.body(request)))
        outcome = None
        if values.get("outcome"):
            outcome = {"resourceType": "DocumentReference", "status": "current",
                       "type": {"coding": [{"system": "http://loinc.org", "code": "18842-5",
                                            "display": "Discharge summary"}]},
                       "description": values["outcome"][:4000],
                       "content": [{"attachment": {"contentType": "text/plain; charset=utf-8",
                                                   "title": "Tóm tắt ra viện / Discharge summary"}}]}
        result = await in_thread(self.exchange.update_transfer, ctx, values.get("package", ""),
                                         values.get("step", ""), values.get("reason"), outcome)
        response: Response = self.api.json(request, 200, orjson.dumps(to_parameters({k: str(v) for k, v in result.items()})))
        return response

    async def remote_everything(self, request: Request) -> Response:
        """Patient/$remote-everything: this patient's records at other facilities, through the hub."""
        ctx = await self.api.context(request)
        facilities = [c.strip() for v in request.query_params.getlist("facility") for c in v.split(",") if c.strip()]
        purpose = request.query_params.get("purpose", "TREAT")
        answers = await in_thread(self.exchange.queries.fetch, ctx, request.path_params["rid"], facilities,
                                          purpose)
        status, bundle = answers_bundle(answers)
        response: Response = self.api.json(request, status, orjson.dumps(bundle))
        return response

    # ---- hub: registry and locator ---------------------------------------------------------
    async def facilities(self, request: Request) -> Response:
        ctx = await self.api.context(request)
        registry = self.exchange.registry
        if request.method == "POST":
            self._admin(ctx)
            data = parse_json(await self.api.body(request))
            if not isinstance(data, dict):
                raise error(400, "invalid", "Cần một đối tượng JSON", "Expected a JSON object")
            try:
                facility = Facility(**{k: v for k, v in data.items() if k != "has_certificate"})
            except TypeError as exc:
                raise error(400, "invalid", "Trường không hợp lệ", str(exc)) from None
            await in_thread(registry.upsert, facility)
            self._audit(ctx, f"registry: facility {facility.code} saved ({facility.clearance})")
            return JSONResponse(facility.to_json(), status_code=201)
        self.exchange.service.guard.authorize(ctx, "search", "Organization")
        items = await in_thread(registry.list)
        return JSONResponse([f.to_json() for f in items])

    async def clearance(self, request: Request) -> Response:
        ctx = await self.api.context(request)
        self._admin(ctx)
        data = parse_json(await self.api.body(request))
        if not isinstance(data, dict):
            raise error(400, "invalid", "Cần một đối tượng JSON", "Expected a JSON object")
        code = request.path_params["code"]
        facility = await in_thread(self.exchange.registry.set_clearance, code, str(data.get("status", "")),
                                           data.get("date"), data.get("reference"))
        self._audit(ctx, f"clearance of {code}: {facility.clearance} {facility.clearance_date} {facility.clearance_ref}")
        return JSONResponse(facility.to_json())

    async def locate(self, request: Request) -> Response:
        ctx = await self.api.context(request)
        self.exchange.service.guard.authorize(ctx, "search", "Patient")
        ident = request.query_params.get("identifier", "")
        system, sep, value = ident.partition("|")
        if not sep or not system or not value:
            raise error(400, "invalid", "identifier cần dạng hệ|giá-trị", "identifier must be system|value")
        facilities = await in_thread(self.exchange.locate, system, value)
        return JSONResponse({"identifier": ident, "facilities": facilities})

    def _admin(self, ctx: Any) -> None:
        self.exchange.service.guard.require(ctx, "province_admin", "registry")

    def _audit(self, ctx: Any, detail: str) -> None:
        from lienthong.interactions.guard import AuditFacts

        self.exchange.service.guard.on_access(ctx, AuditFacts("admin", detail=detail))

    def operations(self) -> list[Operation]:
        """The FHIR operations these routes add, for the CapabilityStatement."""
        ops: list[Operation] = [("Patient", "transfer", f"{OWN_DEFINITIONS}/Patient-transfer"),
                                ("Task", "transfer-step", f"{OWN_DEFINITIONS}/Task-transfer-step")]
        if self.exchange.config.role != "hub":
            ops.append(("Patient", "remote-everything", f"{OWN_DEFINITIONS}/Patient-remote-everything"))
        return ops

    def routes(self) -> list[Route]:
        out = [
            Route("/exchange/{rest:path}", self.wire, methods=["GET", "POST", "PATCH"]),
            Route("/fhir/Patient/{rid}/$transfer", self.transfer, methods=["POST"]),
            Route("/fhir/Task/$transfer-step", self.transfer_step, methods=["POST"]),
        ]
        if self.exchange.config.role != "hub":
            out.append(Route("/fhir/Patient/{rid}/$remote-everything", self.remote_everything, methods=["GET"]))
        if self.exchange.config.role == "hub":
            out += [
                Route("/hub/facilities", self.facilities, methods=["GET", "POST"]),
                Route("/hub/facilities/{code}/clearance", self.clearance, methods=["POST"]),
                Route("/hub/locate", self.locate, methods=["GET"]),
            ]
        return out
