"""The exchange on a node and on the hub: transfers out, packages in, the status loop, the record locator.

Why this shape: a clinical package is written to the outbox in the same database
transaction as the Task and ServiceRequest that record it (nothing is sent that
was not recorded, nothing recorded that will not be sent); the hub stores each
message before forwarding it; the receiver verifies the signatures, finds the
patient with the patient index, imports under its own ids with a Provenance,
and answers with status messages, all in the transaction that marks the
message processed. At-least-once delivery plus an idempotent inbox makes every
effect happen exactly once, in order per patient.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from cryptography import x509
from sqlalchemy import Column, Connection, String, Table, Text, delete, insert, select

from lienthong.exchange import transfer as tr
from lienthong.exchange.delivery import (
    Ack,
    DeliveryError,
    Dispatcher,
    Inbox,
    InboxEntry,
    OutboundMessage,
    Outbox,
    RejectMessage,
    decompress,
)
from lienthong.exchange.query import RecordQueries
from lienthong.exchange.registry import Facility, Registry
from lienthong.exchange.transport import HttpTransport, Receiver, package_validator
from lienthong.exchange.trust import (
    NodeIdentity,
    ProvincialCA,
    SqlNonceStore,
    TrustError,
    TrustStore,
    open_package,
    seal_package,
)
from lienthong.fhir.datetimes import now_us
from lienthong.fhir.outcome import FhirError, error
from lienthong.identity.fhir_mapping import to_person
from lienthong.interactions.bundles import BundleProcessor
from lienthong.interactions.context import Context
from lienthong.interactions.guard import AuditFacts
from lienthong.storage.engine import read_connection
from lienthong.storage.repository import JSON, Store, Stored
from lienthong.storage.schema import metadata

log = logging.getLogger(__name__)

# Packages waiting for a person to decide who the patient is (a possible match).
parked_package = Table(
    "parked_package",
    metadata,
    Column("package_id", String(64), primary_key=True),
    Column("review_id", String(40), nullable=False, index=True),
    Column("source", String(5), nullable=False),
    Column("envelope", Text, nullable=False),
    Column("created", String(32), nullable=False),
)
# The hub's record locator: which facilities hold records for a patient identifier.
record_location = Table(
    "record_location",
    metadata,
    Column("system", String(128), primary_key=True),
    Column("value", String(64), primary_key=True),
    Column("facility", String(5), primary_key=True),
    Column("updated", String(32), nullable=False),
)


@dataclass
class ExchangeConfig:
    role: str  # node | hub
    code: str  # this unit's 5-digit facility code (the hub has one too)
    name: str
    hub_code: str
    hub_url: str | None = None  # nodes: where the hub's exchange endpoint is (…/exchange)
    poll_seconds: float = 0.2
    send_concurrency: int = 8  # messages in flight at once, to different patients (one per patient stream)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Envelope:
    kind: str  # transfer | status | outcome | locator
    sender: str
    to: str
    package: str
    patient: str
    body: JSON
    doctor: str | None = None

    def to_bytes(self) -> bytes:
        return orjson.dumps({"kind": self.kind, "from": self.sender, "to": self.to, "package": self.package,
                             "patient": self.patient, "body": self.body, "doctor": self.doctor,
                             "sent": datetime.now(UTC).isoformat()})

    @classmethod
    def parse(cls, data: bytes) -> Envelope:
        raw = orjson.loads(data)
        return cls(raw["kind"], raw["from"], raw["to"], raw["package"], raw["patient"], raw["body"], raw.get("doctor"))


class RoutingTransport:
    """The hub's transport: each destination facility at the endpoint the registry gives for it."""

    def __init__(self, registry: Registry, identity: NodeIdentity, trust: TrustStore) -> None:
        self.registry = registry
        self.keys = identity  # this unit's key and certificate chain
        self.trust = trust
        self._transports: dict[str, HttpTransport] = {}
        self._lock = threading.Lock()  # the dispatcher sends from several threads

    def for_destination(self, code: str, facility: Facility | None = None) -> HttpTransport | None:
        """The client for a registered facility's endpoint (clearance is the caller's check);
        `facility`: its registry entry if the caller has just read it."""
        facility = facility or self.registry.get(code)
        if facility is None or not facility.endpoint:
            return None
        with self._lock:  # one client (kept-alive connections) per peer, shared by the sending threads
            transport = self._transports.get(code)
            if transport is None or transport.base_url != facility.endpoint.rstrip("/"):
                transport = HttpTransport(facility.endpoint, self.keys, self.trust, peer_code=code)
                self._transports[code] = transport
        return transport

    def send(self, message: OutboundMessage) -> Ack:
        facility = self.registry.get(message.dest)
        if facility is not None and facility.clearance != "cleared":
            return Ack(False, False, f"destination {message.dest} clearance {facility.clearance}")
        transport = self.for_destination(message.dest, facility)
        if transport is None:
            raise DeliveryError(f"no endpoint for facility {message.dest}")
        return transport.send(message)


class ExchangeService:
    def __init__(self, node: Any, config: ExchangeConfig, identity: NodeIdentity, trust: TrustStore) -> None:
        self.node = node
        self.service = node.service
        self.db = node.db
        self.engine = node.db.engine
        self.config = config
        self.keys = identity  # this unit's key and certificate chain
        self.trust = trust
        self.outbox = Outbox()
        self.registry = Registry(self.engine)
        self.bundles = BundleProcessor(self.service)
        hub = config.role == "hub"
        self.inbox = Inbox(validator=None if hub else self._audited(package_validator(trust)))
        self.queries = RecordQueries(self)
        self.receiver = Receiver(self.engine, identity, trust, SqlNonceStore(self.engine), inbox=self.inbox,
                                 relay=self.outbox if hub else None, authorize=self._admit if hub else None,
                                 queries=self.queries.relay if hub else self.queries.answer,
                                 on_stored=self._relay_now if hub else None)
        self.routes: RoutingTransport | None = None  # the hub's clients, one per facility
        self.hub_link: HttpTransport | None = None  # a node's client to the hub
        transport: RoutingTransport | HttpTransport
        if hub:
            transport = self.routes = RoutingTransport(self.registry, identity, trust)
        else:
            assert config.hub_url, "a node needs hub_url"
            transport = self.hub_link = HttpTransport(config.hub_url, identity, trust, peer_code=config.hub_code)
        self.dispatcher = Dispatcher(self.engine, transport, poll_interval=config.poll_seconds,
                                     concurrency=config.send_concurrency)
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._heard_lock = threading.Lock()
        self._heard_from: set[str] = set()  # hub: facilities that sent since the worker's last pass
        self.on_import: list[Callable[[str, str], None]] = []  # (package id, local patient id)
        node.identity.on_decided.append(self._review_decided)

    # ---- lifecycle -----------------------------------------------------------------
    def start(self) -> None:
        self.dispatcher.recover()
        self.dispatcher.start()
        self._stop.clear()
        self._worker = threading.Thread(target=self._loop, name=f"exchange-{self.config.code}", daemon=True)
        self._worker.start()

    def stop(self) -> None:
        self._stop.set()
        self.dispatcher.stop()
        if self._worker is not None:
            self._worker.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._resume_heard()
                done = self.inbox.process(self.engine, self._handle)
            except Exception:  # keep the worker alive; the message stays and is retried
                log.exception("exchange %s: inbox pass failed", self.config.code)
                done = 0
            if not done:
                self._stop.wait(self.config.poll_seconds)
            else:
                self.dispatcher.wake()

    def _relay_now(self) -> None:
        """The hub stored a message for another unit: forward it now, not at the next poll."""
        self.dispatcher.wake()

    def pump(self, rounds: int = 1) -> None:
        """Deterministic progress for tests: one dispatcher pass and one inbox pass per round."""
        for _ in range(rounds):
            self.dispatcher.run_once()
            self.inbox.process(self.engine, self._handle)

    # ---- context -------------------------------------------------------------------
    def system_context(self, peer: str) -> Context:
        """The exchange acting for this facility when it imports what a peer sent (audited as such)."""
        from lienthong.security.policy import Principal
        from lienthong.security.scopes import parse_scopes

        scopes, _ = parse_scopes("system/*.cruds")
        return Context(base_url="urn:lienthong:exchange", extra={"node": self.config.name},
                       principal=Principal("client", f"exchange:{peer}", f"exchange:{peer}", scopes, self.config.code))

    def _audited(self, check: Callable[[str, bytes], str | None]) -> Callable[[str, bytes], str | None]:
        """Every package refused at receipt (tampered, revoked, expired…) is recorded with its reason."""

        def validate(source: str, payload: bytes) -> str | None:
            reason = check(source, payload)
            if reason is not None:
                self._audit_refusal(source, f"package refused: {reason}")
            return reason

        return validate

    def _admit(self, source: str, dest: str) -> str | None:
        """Hub: authorise a message's first arrival, and note that its sender is reachable again."""
        refusal = self._authorize(source, dest)
        if refusal is None:
            with self._heard_lock:
                self._heard_from.add(source)
        return refusal

    def _resume_heard(self) -> None:
        """A facility that just sent is up (e.g. restarted after a crash): what waits for it goes now,
        not after a backoff that grew while it was down. Done here, not at receipt, so the receiving
        transaction never waits on a second writer."""
        with self._heard_lock:
            codes, self._heard_from = self._heard_from, set()
        if codes:
            with self.engine.begin() as conn:
                resumed = sum(self.outbox.retry_now(conn, code) for code in sorted(codes))
            if resumed:
                self.dispatcher.wake()

    def _authorize(self, source: str, dest: str) -> str | None:
        """Hub rule: both ends must be registered, cleared and allowed to exchange; refusals are audited."""
        for code, role in ((source, "sender"), (dest, "destination")):
            if code == self.config.code:
                continue
            try:
                self.registry.require(code, "transfer")
            except FhirError as exc:
                self._audit_refusal(source, f"{role} {code}: {exc}")
                return f"{role}-not-cleared"
        return None

    def _audit_refusal(self, peer: str, why: str) -> None:
        guard = self.service.guard
        if hasattr(guard, "audit"):
            guard.on_access(self.system_context(peer), AuditFacts("refused", outcome=8, detail=why))

    # ---- sending -------------------------------------------------------------------------
    def _seal(self, envelope: Envelope, doctor: NodeIdentity | None = None) -> bytes:
        return seal_package(envelope.to_bytes(), self.keys, [doctor] if doctor else [],
                            claims={"kind": envelope.kind, "to": envelope.to, "package": envelope.package})

    def _send(self, conn: Connection, envelope: Envelope) -> str:
        """Queue a sealed envelope for its destination, through the hub (in the caller's transaction)."""
        return self.outbox.enqueue(conn, envelope.to, envelope.patient, self._seal(envelope))

    def start_transfer(self, ctx: Context, patient_id: str, slip: tr.TransferSlip) -> JSON:
        """A clinician creates a transfer: Task + ServiceRequest + the signed document, queued atomically."""
        guard = self.service.guard
        guard.authorize(ctx, "create", "Task")
        slip.check()
        if slip.destination == self.config.code:
            raise error(400, "invalid", "Không thể chuyển cho chính cơ sở này", "Cannot transfer to this same facility")
        package_id = str(uuid.uuid4())
        with self.db.begin() as store:
            patient = store.current("Patient", patient_id)
            if patient is None or patient.deleted or not guard.visible(ctx, store, [patient]):
                raise error(404, "not-found", f"Không tìm thấy Patient/{patient_id}", f"Patient/{patient_id} not found")
            record = [s.resource() for s in self.record_of(store, patient)]
            sender = self._organization(store)
            doctor = self._doctor(store, slip.doctor_licence)
            package = tr.build_package(patient.resource(), record, slip, sender, doctor, package_id)
            task = tr.task_for(package_id, self.config.code, slip.destination)
            task["for"] = {"reference": f"Patient/{patient_id}"}
            sent_doc = store.create(dict(package))  # a local copy; the package itself travels without local ids
            task["input"] = [{"type": {"text": "transfer-document"}, "valueReference":
                              {"reference": f"Bundle/{sent_doc.rid}"}}]
            task_stored = store.create(task)
            envelope = Envelope("transfer", self.config.code, slip.destination, package_id, patient_id, package,
                                slip.doctor_licence)
            msg_id = self._send(store.conn, envelope)
            guard.on_write(ctx, store, AuditFacts("create", resources=[("Task", task_stored.rid),
                                                                      ("Bundle", sent_doc.rid)],
                                                  patients={patient_id},
                                                  detail=f"transfer {package_id} to {slip.destination}"),
                           [task_stored, sent_doc])
        self.dispatcher.wake()  # committed: send now rather than at the next poll
        return {"package": package_id, "task": task_stored.rid, "message": msg_id}

    def record_of(self, store: Store, patient: Stored) -> list[Stored]:
        """Everything in the patient's compartment (what a transfer carries and a record query returns)."""
        keys = self.service._compartment_keys(store, patient, None, None)
        return [s for s in store.fetch(keys) if s.body and not (s.rtype == "Patient" and s.rid == patient.rid)]

    def find_patients(self, store: Store, system: str, value: str) -> list[Stored]:
        """Live local Patients carrying this identifier."""
        return [s for s in self._search(store, "Patient", [("identifier", f"{system}|{value}")], 5)
                if not s.deleted]

    def _search(self, store: Store, rtype: str, params: list[tuple[str, str]], limit: int) -> list[Stored]:
        from lienthong.storage.search_sql import build_select

        query, _ = self.service.parser.parse(rtype, params)
        rows = store.execute(build_select(query).limit(limit)).all()
        return store.fetch([(r[0], r[1]) for r in rows])

    def _organization(self, store: Store) -> JSON:
        """This facility's Organization (created once), identified by its facility code."""
        found = self._by_identifier(store, "Organization", tr.FACILITY_SYSTEM, self.config.code)
        if found is not None:
            return found
        org = {"resourceType": "Organization", "active": True, "name": self.config.name,
               "identifier": [{"system": tr.FACILITY_SYSTEM, "value": self.config.code}]}
        stored = store.create(org)
        return stored.resource()

    def _doctor(self, store: Store, licence: str) -> JSON | None:
        return self._by_identifier(store, "Practitioner", tr.LICENCE_SYSTEM, licence)

    def _by_identifier(self, store: Store, rtype: str, system: str, value: str) -> JSON | None:
        found = self._search(store, rtype, [("identifier", f"{system}|{value}")], 1)
        return found[0].resource() if found else None

    def _task(self, store: Store, package_id: str) -> Stored | None:
        found = self._search(store, "Task", [("identifier", f"{tr.PACKAGE_SYSTEM}|{package_id}")], 1)
        return found[0] if found else None

    def update_transfer(self, ctx: Context, package_id: str, step: str, reason: str | None = None,
                        outcome: JSON | None = None) -> JSON:
        """The receiving side moves the loop on (accepted/rejected, arrived, completed) and tells the sender."""
        guard = self.service.guard
        guard.authorize(ctx, "update", "Task")
        if step not in ("accepted", "rejected", "arrived", "completed"):
            raise error(400, "invalid", "Bước không hợp lệ", "step must be accepted, rejected, arrived or completed")
        if step == "rejected" and not (reason and reason.strip()):
            raise error(400, "required", "Từ chối cần nêu lý do", "A rejection needs a reason")
        with self.db.begin() as store:
            current = self._task(store, package_id)
            if current is None:
                raise error(404, "not-found", "Không có chuyển tuyến này", f"No transfer {package_id}")
            task = current.resource()
            requester = task.get("requester", {}).get("identifier", {}).get("value")
            if requester == self.config.code:
                raise error(409, "business-rule", "Chỉ nơi nhận cập nhật bước này",
                            "Only the receiving facility moves the transfer on")
            live = store.current("Task", current.rid, lock=True)
            assert live is not None
            updated = tr.advance(live.resource(), step, reason)
            written = [store.write(live, updated, "PUT")]
            body: JSON = {"step": step, "reason": reason}
            if outcome is not None:
                body["outcome"] = outcome
            patient = (task.get("for") or {}).get("reference", "Patient/-").split("/", 1)[1]
            self._send(store.conn, Envelope("outcome" if outcome is not None else "status", self.config.code,
                                            requester, package_id, patient, body))
            guard.on_write(ctx, store, AuditFacts("update", resources=[("Task", current.rid)], patients={patient},
                                                  detail=f"transfer {package_id}: {step}"), written)
        self.dispatcher.wake()
        return {"package": package_id, "step": step}

    # ---- receiving -----------------------------------------------------------------------
    def _handle(self, conn: Connection, entry: InboxEntry) -> None:
        """Process one received message inside the transaction that marks it processed."""
        if entry.payload is None:
            raise RejectMessage("empty")
        if self.config.role == "hub":
            self._hub_observe(conn, entry)
            return
        try:
            verified = open_package(decompress(entry.payload), self.trust.anchor, self.trust.crl,
                                    datetime.fromtimestamp(entry.received, UTC))
        except TrustError as exc:
            raise RejectMessage(str(exc.reason)) from None
        envelope = Envelope.parse(verified.payload)
        if envelope.sender != verified.facility_code or envelope.to != self.config.code:
            raise RejectMessage("envelope-mismatch")
        store = Store(conn, self.db)
        ctx = self.system_context(envelope.sender)
        if envelope.kind == "transfer":
            savepoint = conn.begin_nested()
            try:
                self._check_document(envelope.body)
                self._import_transfer(store, ctx, envelope)
                store.flush()
                savepoint.commit()
            except (FhirError, RejectMessage, KeyError, TypeError, AttributeError) as exc:
                savepoint.rollback()
                self._refuse_package(store, entry, envelope, str(exc) or type(exc).__name__)
        elif envelope.kind in ("status", "outcome"):
            self._apply_status(store, ctx, envelope)
        store.flush()

    @staticmethod
    def _check_document(document: Any) -> None:
        from lienthong.fhir.validation import validate

        if not isinstance(document, dict) or document.get("type") != "document":
            raise RejectMessage("gói không phải tài liệu FHIR / the package is not a FHIR document Bundle")
        problems = [i for i in validate(document, "Bundle") if i.severity == "error"]
        if problems:
            raise RejectMessage("; ".join(f"{i.location}: {i.message}" for i in problems[:5]))

    def _refuse_package(self, store: Store, entry: InboxEntry, envelope: Envelope, reason: str) -> None:
        """Record the refusal on the inbox row, audit it and tell the sender, all in this transaction."""
        from sqlalchemy import update as sql_update

        from lienthong.exchange.schema import inbox as inbox_table

        reason = f"gói không hợp lệ / invalid package: {reason}"[:1000]
        store.conn.execute(sql_update(inbox_table).where(inbox_table.c.msg_id == entry.msg_id)
                           .values(status="rejected", reason=reason))
        self._audit_refusal(envelope.sender, f"package {envelope.package} refused: {reason}")
        self._send(store.conn, Envelope("status", self.config.code, envelope.sender, envelope.package,
                                        envelope.patient, {"step": "rejected", "reason": reason}))

    def _import_transfer(self, store: Store, ctx: Context, envelope: Envelope, patient_id: str | None = None, *,
                         decided: bool = False) -> None:
        """Import under local ids; `decided`: a person chose the patient (None: a new one), so do not match."""
        document = envelope.body
        entries = document.get("entry", [])
        patient_entry = next((e for e in entries if e.get("resource", {}).get("resourceType") == "Patient"), None)
        if patient_entry is None:
            raise RejectMessage("no-patient")
        if patient_id is None and not decided:
            identity = self.node.identity
            record = to_person(patient_entry["resource"], "incoming")
            results = identity.model.score(record, identity.candidates(store, record))
            best = results[0] if results else None
            if best is not None and best.decision == "match":
                patient_id = best.right_id
            elif best is not None and best.decision == "review":
                review_id = identity._queue(store, f"incoming:{envelope.package}", best, f"transfer:{envelope.package}")
                store.conn.execute(insert(parked_package).values(
                    package_id=envelope.package, review_id=review_id, source=envelope.sender,
                    envelope=envelope.to_bytes().decode(), created=str(now_us())))
                self._record_task(store, envelope, "received", None)
                self._send(store.conn, Envelope("status", self.config.code, envelope.sender, envelope.package,
                                                envelope.patient, {"step": "received",
                                                                   "reason": "chờ xác định bệnh nhân / identity review"}))
                return
        transaction: list[JSON] = []
        for e in entries:
            res = e.get("resource")
            if not isinstance(res, dict):
                continue
            if res["resourceType"] == "Patient" and patient_id is not None:
                transaction.append({"fullUrl": e["fullUrl"], "resource": {"resourceType": "Patient"},
                                    "request": {"method": "GET", "url": f"Patient/{patient_id}"}})
                continue
            transaction.append({"fullUrl": e["fullUrl"], "resource": res,
                                "request": {"method": "POST", "url": res["resourceType"]}})
        # References to the matched patient: map its urn to the existing record.
        raw = orjson.dumps({"resourceType": "Bundle", "type": "transaction",
                            "entry": [t for t in transaction if t["request"]["method"] == "POST"]})
        if patient_id is not None and patient_entry is not None:
            raw = raw.replace(f'"reference":"{patient_entry["fullUrl"]}"'.encode(),
                              f'"reference":"Patient/{patient_id}"'.encode())
        bundle = orjson.loads(raw)
        responses = self.bundles.transaction_in(ctx, store, bundle)
        created = [r["response"]["location"].split("/_history")[0] for r in responses
                   if r.get("response", {}).get("location")]
        # The signed document itself is kept as received (its urn:uuid references stay internal to it).
        original = self.service._prepare(_strip_id(document), "Bundle", None)
        created.append(f"Bundle/{store.create(original).rid}")
        local_patient = patient_id or next((c.split("/", 1)[1] for c in created if c.startswith("Patient/")), None)
        provenance = {
            "resourceType": "Provenance",
            "target": [{"reference": c} for c in created],
            "recorded": datetime.now(UTC).isoformat(timespec="seconds"),
            "activity": {"coding": [tr.TRANSFER_CODE]},
            "agent": [{"who": {"identifier": {"system": tr.FACILITY_SYSTEM, "value": envelope.sender}},
                       "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                                            "code": "custodian"}]}}],
            "entity": [{"role": "source", "what": {"identifier": {"system": tr.PACKAGE_SYSTEM,
                                                                  "value": envelope.package}}}],
        }
        self.bundles.transaction_in(ctx, store, {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": provenance, "request": {"method": "POST", "url": "Provenance"}}]})
        self._record_task(store, envelope, "received", local_patient)
        self._send(store.conn, Envelope("status", self.config.code, envelope.sender, envelope.package,
                                        envelope.patient, {"step": "received"}))
        for hook in self.on_import:
            hook(envelope.package, local_patient or "")

    def _record_task(self, store: Store, envelope: Envelope, step: str, patient_id: str | None) -> None:
        existing = self._task(store, envelope.package)
        if existing is not None:
            if patient_id and not existing.resource().get("for"):
                task = existing.resource()
                task["for"] = {"reference": f"Patient/{patient_id}"}
                live = store.current("Task", existing.rid, lock=True)
                assert live is not None
                store.write(live, task, "PUT")
            return
        task = tr.task_for(envelope.package, envelope.sender, self.config.code, step)
        if patient_id:
            task["for"] = {"reference": f"Patient/{patient_id}"}
        store.create(task)

    def _apply_status(self, store: Store, ctx: Context, envelope: Envelope) -> None:
        current = self._task(store, envelope.package)
        if current is None:
            raise RejectMessage("unknown-transfer")
        live = store.current("Task", current.rid, lock=True)
        assert live is not None
        try:
            updated = tr.advance(live.resource(), str(envelope.body.get("step")), envelope.body.get("reason"))
        except FhirError as exc:
            raise RejectMessage(str(exc)[:200]) from None
        if envelope.kind == "outcome" and isinstance(envelope.body.get("outcome"), dict):
            outcome = self.bundles.transaction_in(ctx, store, {"resourceType": "Bundle", "type": "transaction",
                                                               "entry": [{"resource": _strip_id(envelope.body["outcome"]),
                                                                          "request": {"method": "POST",
                                                                                      "url": envelope.body["outcome"]
                                                                                      ["resourceType"]}}]})
            location = outcome[0]["response"].get("location", "")
            updated["output"] = [{"type": {"text": "outcome"}, "valueReference":
                                  {"reference": location.split("/_history")[0]}}]
        if updated is not live.resource():
            store.write(live, updated, "PUT")

    def _review_decided(self, store: Store, review_id: str, decision: str, left: str, right: str,
                        ctx: Context) -> None:
        """A person decided who the patient of a parked package is: import it now, in the decision's
        transaction, so a decision never leaves its package stranded."""
        row = store.execute(select(parked_package.c.package_id, parked_package.c.envelope)
                            .where(parked_package.c.review_id == review_id)).first()
        if row is None:
            return
        envelope = Envelope.parse(row[1].encode())
        # One side of the pair is the incoming package (id "incoming:<package>"), the other the local candidate.
        existing = (right if left.startswith("incoming:") else left) if decision == "match" else None
        self._import_transfer(store, self.system_context(envelope.sender), envelope, existing, decided=True)
        store.conn.execute(delete(parked_package).where(parked_package.c.package_id == row[0]))

    # ---- hub: record locator ----------------------------------------------------------
    def _hub_observe(self, conn: Connection, entry: InboxEntry) -> None:
        """The hub relayed the message already; here it notes which facilities hold the patient's records."""
        try:
            verified = open_package(decompress(entry.payload or b""), self.trust.anchor, self.trust.crl,
                                    datetime.fromtimestamp(entry.received, UTC))
        except TrustError:
            return  # the destination verifies and refuses it; the hub only indexes what verifies
        envelope = Envelope.parse(verified.payload)
        if envelope.kind != "transfer":
            return
        patient = next((e["resource"] for e in envelope.body.get("entry", [])
                        if e.get("resource", {}).get("resourceType") == "Patient"), None)
        if patient is None:
            return
        for ident in patient.get("identifier", []):
            system, value = ident.get("system"), ident.get("value")
            if system and value and "/ma-bn/" not in system:
                self.note_location(conn, system, value, (envelope.sender, envelope.to))

    @staticmethod
    def note_location(conn: Connection, system: str, value: str, facilities: tuple[str, ...]) -> None:
        """Remember that these facilities hold records for the patient with this identifier."""
        now = str(now_us())
        for facility in facilities:
            conn.execute(delete(record_location).where(record_location.c.system == system,
                                                       record_location.c.value == value,
                                                       record_location.c.facility == facility))
            conn.execute(insert(record_location).values(system=system, value=value, facility=facility, updated=now))

    def locate(self, system: str, value: str) -> list[str]:
        with read_connection(self.engine) as conn:
            rows = conn.execute(select(record_location.c.facility).where(
                record_location.c.system == system, record_location.c.value == value)).all()
        return sorted({r[0] for r in rows})


def _strip_id(resource: JSON) -> JSON:
    return {k: v for k, v in resource.items() if k not in ("id", "meta")}


# ---- keys and trust on disk -------------------------------------------------------------------

def load_trust(ca_cert_pem: bytes, crl_pem: bytes) -> TrustStore:
    return TrustStore(x509.load_pem_x509_certificate(ca_cert_pem), x509.load_pem_x509_crl(crl_pem))


def provincial_setup(directory: Path, hub_code: str, units: list[tuple[str, str]]) -> dict[str, NodeIdentity]:
    """Create the provincial CA and an identity for the hub and each unit (demo and tests)."""
    ca = ProvincialCA.create()
    ca.save(directory / "ca")
    identities = {hub_code: _hub_identity(ca, hub_code)}
    for code, name in units:
        identities[code] = ca.issue_identity(code, name)
    return identities


def _hub_identity(ca: ProvincialCA, code: str) -> NodeIdentity:
    from lienthong.exchange.trust import Role

    return ca.issue_identity(code, "Trạm liên thông tỉnh / Provincial hub", role=Role.HUB)


__all__ = ["ExchangeConfig", "ExchangeService", "load_trust", "provincial_setup"]


def load_config(path: Path) -> tuple[ExchangeConfig, Path, Path]:
    """Read a node or hub configuration file (TOML): returns the config, the keys folder and the CA folder.

    Example::

        role = "node"            # or "hub"
        code = "24901"
        name = "Bệnh viện Đa khoa tỉnh Bắc Giang"
        hub_code = "24000"
        hub_url = "https://hub.bacninh.example/exchange"
        keys_dir = "var/keys"    # node.key + node.crt (lienthong keys init / install)
        ca_dir = "var/ca"        # ca.crt + ca.crl (the hub keeps ca.key there too)
        poll_seconds = 0.2       # optional: how often idle workers look for work
        send_concurrency = 8     # optional: messages in flight at once (never two of one patient)
    """
    import tomllib

    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"không đọc được cấu hình / cannot read the configuration {path}: {exc}") from None
    missing = [k for k in ("role", "code", "name", "hub_code") if not data.get(k)]
    if missing:
        raise ValueError(f"thiếu khoá cấu hình / configuration lacks {', '.join(missing)}")
    if data["role"] not in ("node", "hub"):
        raise ValueError("role phải là node hoặc hub / role must be node or hub")
    if data["role"] == "node" and not data.get("hub_url"):
        raise ValueError("nút cần hub_url / a node needs hub_url")
    try:
        poll, concurrency = float(data.get("poll_seconds", 0.2)), int(data.get("send_concurrency", 8))
    except (TypeError, ValueError):
        raise ValueError("poll_seconds và send_concurrency phải là số / poll_seconds and send_concurrency must be "
                         "numbers") from None
    if poll <= 0 or not 1 <= concurrency <= 64:
        raise ValueError("cần poll_seconds > 0 và send_concurrency 1–64 / poll_seconds must be > 0 and "
                         "send_concurrency 1-64")
    config = ExchangeConfig(role=data["role"], code=str(data["code"]), name=data["name"],
                            hub_code=str(data["hub_code"]), hub_url=data.get("hub_url"), poll_seconds=poll,
                            send_concurrency=concurrency)
    base = path.parent
    return config, base / data.get("keys_dir", "var/keys"), base / data.get("ca_dir", "var/ca")


def attach_exchange(node: Any, config_path: Path) -> ExchangeService:
    """Give a node its exchange (keys, trust, workers) from a configuration file."""
    from lienthong.exchange.trust import load_identity

    config, keys_dir, ca_dir = load_config(config_path)
    identity = load_identity(keys_dir)
    if identity.facility_code != config.code:
        raise ValueError(f"chứng thư của {identity.facility_code}, cấu hình ghi {config.code} / "
                         f"certificate is for {identity.facility_code}, configuration says {config.code}")
    trust = load_trust((ca_dir / "ca.crt").read_bytes(), (ca_dir / "ca.crl").read_bytes())
    exchange = ExchangeService(node, config, identity, trust)
    node.exchange = exchange
    return exchange
