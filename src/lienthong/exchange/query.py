"""On-demand record queries between facilities through the hub (`Patient/$remote-everything`).

Why this shape: a clinician treating a patient may need, now, what another
facility holds, without waiting for a transfer. The query is a package sealed by
the requesting facility, so the answering facility verifies who asked end to end
although the hub signs each hop itself; the hub relays it synchronously after
checking that both facilities are cleared; the answer is a package sealed by the
answering facility, so the hub can neither read it into its own store nor alter
it. Nothing is imported: the answer goes to the clinician. The requester, the
hub and the answering facility each write an IHE BALP PatientQuery AuditEvent
carrying the same request id, so an auditor can join the three.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

from lienthong.exchange.delivery import DeliveryError, PayloadError, compress, decompress
from lienthong.exchange.trust import SqlNonceStore, TrustError, open_package, seal_package
from lienthong.fhir.outcome import error
from lienthong.identity.identifiers import CCCD_SYSTEM
from lienthong.interactions.context import Context
from lienthong.interactions.guard import AuditFacts, RemoteAccess
from lienthong.storage.repository import JSON, Stored

if TYPE_CHECKING:
    from lienthong.exchange.service import ExchangeService
    from lienthong.exchange.transport import HttpTransport

QUERY_KIND = "record-query"
QUERY_TIMEOUT = 30.0  # seconds for one hop; a clinician is waiting
REPLAY_WINDOW = 600.0
PURPOSES = ("TREAT", "ETREAT")  # v3-ActReason: treatment, emergency treatment
OCTETS = "application/octet-stream"
JSON_TYPE = "application/json"
_CODE = re.compile(r"^\d{5}$")
_ID = re.compile(r"^[A-Za-z0-9-]{8,40}$")


@dataclass(frozen=True)
class RecordQuery:
    """What the requesting facility signs: who asks, for whom, of whom, and why."""

    query_id: str
    requester: str
    dest: str
    system: str
    value: str
    user: str
    roles: tuple[str, ...] = ()
    purpose: str = "TREAT"

    def to_bytes(self) -> bytes:
        return orjson.dumps({"kind": QUERY_KIND, "id": self.query_id, "from": self.requester, "to": self.dest,
                             "identifier": {"system": self.system, "value": self.value},
                             "user": self.user, "roles": list(self.roles), "purpose": self.purpose})

    @classmethod
    def parse(cls, data: bytes) -> RecordQuery:
        try:
            raw = orjson.loads(data)
            ident = raw["identifier"]
            query = cls(str(raw["id"]), str(raw["from"]), str(raw["to"]), str(ident["system"]),
                        str(ident["value"]), str(raw["user"]), tuple(str(r) for r in raw.get("roles", [])),
                        str(raw.get("purpose", "TREAT")))
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"malformed query: {type(exc).__name__}") from None
        if raw.get("kind") != QUERY_KIND or not _ID.match(query.query_id):
            raise ValueError("not a record query")
        if not (_CODE.match(query.requester) and _CODE.match(query.dest)):
            raise ValueError("facility codes must be 5 digits")
        if not query.system or not query.value or len(query.value) > 64 or query.purpose not in PURPOSES:
            raise ValueError("identifier or purpose missing or invalid")
        return query

    def access(self, side: str) -> RemoteAccess:
        return RemoteAccess(side, self.requester, self.dest, self.query_id, self.user, self.roles, self.purpose,
                            (self.system, self.value))


@dataclass
class Answer:
    """One facility's answer as the requester sees it."""

    facility: str
    status: int
    bundle: JSON | None = None
    error: str | None = None


def _json(status: int, code: str, detail: str = "") -> tuple[int, bytes, str]:
    return status, orjson.dumps({"error": code, "detail": detail}), JSON_TYPE


def shared_identifier(patient: JSON) -> tuple[str, str] | None:
    """The identifier other facilities know the patient by: the CCCD first, never a local record number."""
    found = [(i.get("system"), i.get("value")) for i in patient.get("identifier", [])
             if i.get("system") and i.get("value") and "/ma-bn/" not in i["system"]]
    found.sort(key=lambda sv: sv[0] != CCCD_SYSTEM)
    return (str(found[0][0]), str(found[0][1])) if found else None


class RecordQueries:
    """The three roles of a query: asking (a node), relaying (the hub), answering (a node)."""

    def __init__(self, exchange: ExchangeService) -> None:
        self.x = exchange
        self.nonces = SqlNonceStore(exchange.engine)

    def _now(self) -> datetime:
        return datetime.now(UTC)

    def _audit(self, ctx: Context, query: RecordQuery, side: str, outcome: int, detail: str,
               patients: set[str] | None = None, resources: list[tuple[str, str]] | None = None) -> None:
        self.x.service.guard.on_access(ctx, AuditFacts(
            "query", outcome=outcome, patients=patients or set(), resources=resources or [],
            query=f"Patient/$everything?identifier={query.system}|{query.value}", detail=detail,
            remote=query.access(side)))

    def _hub(self) -> HttpTransport:
        if self.x.hub_link is None:
            raise error(400, "not-supported", "Cổng liên thông không tự truy vấn", "The hub does not ask queries itself")
        return self.x.hub_link

    # ---- asking ---------------------------------------------------------------------------
    def fetch(self, ctx: Context, patient_id: str, facilities: list[str], purpose: str = "TREAT") -> list[Answer]:
        """Ask each facility (or, with none named, each the hub's locator knows) for the patient's record.

        Only a caller who may see the patient here, i.e. is treating them, may ask."""
        service = self.x.service
        service.check_id(patient_id)
        service.guard.authorize(ctx, "everything", "Patient")
        if purpose not in PURPOSES:
            raise error(400, "invalid", "Mục đích không hợp lệ", f"purpose must be one of {', '.join(PURPOSES)}")
        with self.x.db.read() as store:
            patient = store.current("Patient", patient_id)
            if patient is None or patient.deleted or not service.guard.visible(ctx, store, [patient]):
                raise error(404, "not-found", f"Không tìm thấy Patient/{patient_id}", f"Patient/{patient_id} not found")
        ident = shared_identifier(patient.resource())
        if ident is None:
            raise error(422, "business-rule", "Bệnh nhân chưa có mã định danh dùng chung (CCCD, BHYT)",
                        "The patient has no identifier shared between facilities (CCCD, health insurance)")
        for code in facilities:
            if not _CODE.match(code):
                raise error(400, "invalid", f"Mã cơ sở không hợp lệ: {code}", f"Invalid facility code: {code}")
        targets = [c for c in dict.fromkeys(facilities) if c != self.x.config.code]
        if not facilities:
            targets = [c for c in self._locate(ctx, ident) if c != self.x.config.code]
            if not targets:
                raise error(404, "not-found", "Không cơ sở nào khác được biết là có hồ sơ của bệnh nhân này",
                            "No other facility is known to hold records for this patient")
        principal = ctx.principal
        user = ctx.actor or "anonymous"
        roles = tuple(getattr(principal, "roles", ()) or ())
        return [self._ask(ctx, patient_id, RecordQuery(str(uuid.uuid4()), self.x.config.code, dest, ident[0],
                                                       ident[1], user, roles, purpose)) for dest in targets]

    def _locate(self, ctx: Context, ident: tuple[str, str]) -> list[str]:
        """The hub's record locator, asked over the signed channel."""
        body = orjson.dumps({"system": ident[0], "value": ident[1]})
        try:
            status, content = self._hub().request("POST", f"/queries/locate-{uuid.uuid4().hex[:24]}", None, body,
                                                       JSON_TYPE, timeout=QUERY_TIMEOUT)
            data = orjson.loads(content)
        except (DeliveryError, orjson.JSONDecodeError) as exc:
            raise error(502, "transient", "Không liên lạc được cổng liên thông tỉnh",
                        f"The provincial hub could not be reached: {exc}") from None
        if status != 200 or not isinstance(data.get("facilities"), list):
            raise error(502, "transient", "Cổng liên thông không trả lời được", f"Hub answered {status}")
        return [str(c) for c in data["facilities"]]

    def _ask(self, ctx: Context, patient_id: str, query: RecordQuery) -> Answer:
        sealed = seal_package(query.to_bytes(), self.x.keys,
                              claims={"kind": QUERY_KIND, "to": query.dest, "package": query.query_id})
        answer = Answer(query.dest, 502)
        hub = self._hub()
        try:
            status, content = hub.request("POST", f"/queries/{query.query_id}", None, sealed,
                                                       OCTETS, timeout=QUERY_TIMEOUT)
        except DeliveryError as exc:
            answer.error = f"hub-unreachable: {exc}"
        else:
            answer.status = status
            if status == 200:
                try:
                    verified = open_package(decompress(content), self.x.trust.anchor, self.x.trust.crl, self._now())
                    if verified.facility_code != query.dest:
                        raise ValueError(f"answer signed by {verified.facility_code}, not {query.dest}")
                    bundle = orjson.loads(verified.payload)
                    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
                        raise ValueError("answer is not a Bundle")
                    answer.bundle = bundle
                except (TrustError, PayloadError, ValueError) as exc:
                    answer.status, answer.error = 502, f"answer-refused: {exc}"
            else:
                answer.error = _error_code(content)
        ok = answer.status == 200
        self._audit(ctx, query, "client", 0 if ok else (4 if answer.status < 500 else 8),
                    f"record query to {query.dest}: {'ok' if ok else answer.error}", {patient_id})
        return answer

    # ---- relaying (hub) ---------------------------------------------------------------------
    def relay(self, source: str, query_id: str, body: bytes) -> tuple[int, bytes, str]:
        if query_id.startswith("locate-"):
            return self._locate_for(source, body)
        try:
            verified = open_package(body, self.x.trust.anchor, self.x.trust.crl, self._now())
            query = RecordQuery.parse(verified.payload)
        except (TrustError, ValueError) as exc:
            self.x._audit_refusal(source, f"record query {query_id} refused: {exc}")
            return _json(400, "malformed-query", str(exc))
        if verified.facility_code != source or query.requester != source or query.query_id != query_id:
            self.x._audit_refusal(source, f"record query {query_id} refused: signer/requester mismatch")
            return _json(400, "query-mismatch")
        ctx = self.x.system_context(source)
        refusal = self.x._authorize(source, query.dest)
        if refusal is not None:
            self._audit(ctx, query, "relay", 4, f"refused: {refusal}")
            return _json(403, refusal)
        transport = self.x.routes.for_destination(query.dest) if self.x.routes is not None else None
        if transport is None:
            self._audit(ctx, query, "relay", 4, f"no endpoint for {query.dest}")
            return _json(404, "unknown-destination")
        try:
            status, content = transport.request("POST", f"/queries/{query_id}", None, body, OCTETS,
                                                timeout=QUERY_TIMEOUT)
        except DeliveryError as exc:
            self._audit(ctx, query, "relay", 8, f"destination unreachable: {exc}")
            return _json(504, "destination-unreachable", str(exc)[:300])
        if status == 200:  # both now hold records for this patient: the locator learns it
            with self.x.engine.begin() as conn:
                self.x.note_location(conn, query.system, query.value, (query.requester, query.dest))
        self._audit(ctx, query, "relay", 0 if status == 200 else 4,
                    f"relayed to {query.dest}: HTTP {status}" + ("" if status == 200 else f" {_error_code(content)}"))
        return status, content, OCTETS if status == 200 else JSON_TYPE

    def _locate_for(self, source: str, body: bytes) -> tuple[int, bytes, str]:
        try:
            raw = orjson.loads(body)
            system, value = str(raw["system"]), str(raw["value"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return _json(400, "malformed-locate")
        if self.x._authorize(source, self.x.config.code) is not None:
            return _json(403, "not-cleared")
        return 200, orjson.dumps({"facilities": self.x.locate(system, value)}), JSON_TYPE

    # ---- answering (node) -------------------------------------------------------------------
    def answer(self, source: str, query_id: str, body: bytes) -> tuple[int, bytes, str]:
        if source != self.x.config.hub_code:
            self.x._audit_refusal(source, f"record query {query_id} refused: not relayed by the hub")
            return _json(403, "queries-come-through-the-hub")
        try:
            verified = open_package(body, self.x.trust.anchor, self.x.trust.crl, self._now())
            query = RecordQuery.parse(verified.payload)
            if verified.facility_code != query.requester or query.query_id != query_id:
                raise ValueError("signer/requester mismatch")
            if query.dest != self.x.config.code:
                raise ValueError("query addressed to another facility")
        except (TrustError, ValueError) as exc:
            self.x._audit_refusal(source, f"record query {query_id} refused: {exc}")
            return _json(400, "malformed-query", str(exc))
        ctx = self.x.system_context(query.requester)
        if not self.nonces.check_and_store(f"query:{query_id}", time.time(), REPLAY_WINDOW):
            self._audit(ctx, query, "server", 4, "refused: replayed query")
            return _json(409, "replayed-query")
        with self.x.db.read() as store:
            found = self.x.find_patients(store, query.system, query.value)
            if len(found) != 1:
                why = "patient-not-found" if not found else "patient-ambiguous"
                self._audit(ctx, query, "server", 4, f"refused: {why}")
                return _json(404 if not found else 409, why)
            patient = found[0]
            record = self.x.record_of(store, patient)
        bundle = _searchset(self.x.config.code, [patient, *record])
        sealed = seal_package(orjson.dumps(bundle), self.x.keys,
                              claims={"kind": "record-answer", "to": query.requester, "package": query_id})
        self._audit(ctx, query, "server", 0, f"record of Patient/{patient.rid} sent to {query.requester}",
                    {patient.rid}, [(s.rtype, s.rid) for s in record])
        return 200, compress(sealed), OCTETS


def _searchset(facility: str, items: list[Stored]) -> JSON:
    base = f"https://lienthong.vn/fhir/facility/{facility}"
    return {"resourceType": "Bundle", "type": "searchset", "total": len(items),
            "meta": {"source": f"urn:lienthong:facility:{facility}"},
            "entry": [{"fullUrl": f"{base}/{s.rtype}/{s.rid}", "resource": s.resource(),
                       "search": {"mode": "match" if i == 0 else "include"}} for i, s in enumerate(items)]}


def _error_code(content: bytes) -> str:
    try:
        data: Any = orjson.loads(content)
    except orjson.JSONDecodeError:
        return "unreadable-answer"
    return str(data.get("error", "error")) if isinstance(data, dict) else "error"


def answers_bundle(answers: list[Answer]) -> tuple[int, JSON]:
    """The operation's result: one entry per facility, its record or an OperationOutcome saying why not."""
    entries: list[JSON] = []
    for a in answers:
        if a.bundle is not None:
            entries.append({"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": a.bundle})
            continue
        vi, en, code = _explain(a)
        entries.append({"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": {
            "resourceType": "OperationOutcome", "issue": [{
                "severity": "error", "code": code,
                "diagnostics": f"{a.facility}: {vi} / {en} ({a.error})",
                "details": {"coding": [{"system": "urn:lienthong:facility", "code": a.facility}]}}]}})
    status = 200
    if all(a.bundle is None for a in answers):
        statuses = {a.status for a in answers}
        status = 404 if statuses <= {404} else 403 if statuses <= {403} else 502
    return status, {"resourceType": "Bundle", "type": "collection", "entry": entries}


def _explain(a: Answer) -> tuple[str, str, str]:
    if a.status == 404:
        return "Cơ sở không có hồ sơ của bệnh nhân", "The facility holds no record for this patient", "not-found"
    if a.status == 403:
        return "Cơ sở chưa được phép liên thông", "The exchange with this facility is not permitted", "forbidden"
    if a.status == 409:
        return "Không xác định được bệnh nhân duy nhất", "The patient could not be identified uniquely", "conflict"
    return "Không liên lạc được cơ sở", "The facility could not be reached", "transient"

