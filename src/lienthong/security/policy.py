"""The access policy: SMART scopes, roles and time windows, facility scope, care relationship, break-the-glass.

Why filter in SQL: search results, includes, chains, `_has`, `$everything`,
history and export must never leak a resource the caller may not see, so the
visible-patient set is a subquery added to every query rather than a check on
the page after the fact (which would also break paging and totals).

Refusal rule (docs/security.md): 401 when the identity is missing or invalid;
403 when the caller may not perform the action at all (scope, role, time
window); 404 when the resource exists but lies outside the caller's patients,
because admitting it exists would itself leak.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, FromClause, Select, and_, false, insert, literal, or_, select, true, union

from lienthong.fhir.datetimes import now_us
from lienthong.fhir.outcome import FhirError, OutcomeIssue, error
from lienthong.fhir.search_params import SearchRegistry
from lienthong.interactions.context import Context
from lienthong.interactions.guard import AuditFacts
from lienthong.security.audit import AuditRecord, AuditTrail
from lienthong.security.roles import ROLES
from lienthong.security.scopes import Scope, allows
from lienthong.security.tokens import NeedsIO
from lienthong.storage import schema
from lienthong.storage.engine import read_connection
from lienthong.storage.repository import Store, Stored

_PATIENT_REF = re.compile(rb'"reference":"Patient/([A-Za-z0-9\-.]{1,64})"')
_LETTER = {"read": "r", "vread": "r", "history": "r", "search": "s", "create": "c", "update": "u", "patch": "u",
           "delete": "d"}
AUDIT_TYPES = {"AuditEvent"}
BTG_MINUTES = 60


@dataclass
class Principal:
    """An authenticated caller, as rebuilt on each request from the token and current role assignments."""

    kind: str  # user | client
    actor: str  # username or client id
    subject: str  # user id or client id
    scopes: list[Scope]
    facility: str | None
    roles: tuple[str, ...] = ()  # roles in force now (time windows applied)
    practitioner_id: str | None = None
    patient: str | None = None  # patient/ launch context
    break_glass: frozenset[str] = field(default_factory=frozenset)  # patient ids under an active grant
    token: Any = None

    def has(self, flag: str) -> bool:
        return any(getattr(ROLES[r], flag) for r in self.roles if r in ROLES)

    @property
    def facility_wide(self) -> bool:
        return self.kind == "client" or self.has("facility_wide")


def _principal(ctx: Context) -> Principal:
    p = ctx.principal
    if not isinstance(p, Principal):
        raise FhirError(401, [OutcomeIssue("error", "login", "Cần xác thực / Authentication required")],
                        {"WWW-Authenticate": 'Bearer realm="lienthong"'})
    return p


class AccessGuard:
    """Implements the interactions `Guard` protocol."""

    def __init__(self, registry: SearchRegistry, audit: AuditTrail, compartment: dict[str, list[int]]) -> None:
        self.registry = registry
        self.audit = audit
        self.compartment = compartment  # type -> reference-parameter keys pointing at the Patient
        self._care_keys = self._care_parameter_keys()
        self._btg_cache: dict[str, tuple[float, frozenset[str]]] = {}
        self._lock = threading.Lock()

    def _care_parameter_keys(self) -> list[tuple[int, list[int]]]:
        """(patient key, practitioner keys) of resources that put a clinician in a patient's care team."""
        pairs = [("Encounter", "patient", ("practitioner", "participant")),
                 ("CareTeam", "patient", ("participant",)),
                 ("EpisodeOfCare", "patient", ("care-manager",)),
                 ("ServiceRequest", "patient", ("performer", "requester"))]
        out = []
        for rtype, pcode, codes in pairs:
            patient = self.registry.get(rtype, pcode)
            who = [p.key for c in codes if (p := self.registry.get(rtype, c)) is not None]
            if patient is not None and who:
                out.append((patient.key, who))
        return out

    # ---- decisions -----------------------------------------------------------
    def authorize(self, ctx: Context, interaction: str, rtype: str | None) -> None:
        p = _principal(ctx)
        letters = _letters(interaction)
        if rtype in AUDIT_TYPES and letters & {"r", "s"} and not (p.has("audit_reader") or p.kind == "client"):
            self._refuse(ctx, interaction, rtype, "chỉ kiểm toán viên đọc nhật ký / only auditors read the audit log")
        if p.kind == "user":
            if interaction == "export" and not p.has("bulk_export"):
                self._refuse(ctx, interaction, rtype, "cần quyền xuất dữ liệu hàng loạt / requires the bulk export "
                                                      "permission")
            if not p.roles:
                self._refuse(ctx, interaction, rtype, "ngoài khung giờ được phép / outside the permitted time window")
            granted = set().union(*(ROLES[r].interactions for r in p.roles if r in ROLES))
            if rtype in AUDIT_TYPES and p.has("audit_reader"):
                granted |= {"r", "s"}
            if not letters <= granted:
                self._refuse(ctx, interaction, rtype,
                             f"vai trò {', '.join(p.roles)} không được phép {interaction} / "
                             f"role {', '.join(p.roles)} may not {interaction}")
        for letter in letters:
            if not allows(p.scopes, rtype, letter):
                self._refuse(ctx, interaction, rtype,
                             f"phạm vi không cho phép {interaction} {rtype or ''} / scope does not allow "
                             f"{interaction} on {rtype or 'the system'}")

    def require(self, ctx: Context, flag: str, what: str) -> Principal:
        """Administrative actions (users, clearances, audit, export) need a role flag."""
        p = _principal(ctx)
        if not p.has(flag) and not (p.kind == "client" and flag == "bulk_export"):
            self._refuse(ctx, what, None, f"cần quyền {flag} / requires the {flag} permission")
        return p

    def _refuse(self, ctx: Context, interaction: str, rtype: str | None, why: str) -> None:
        self.on_access(ctx, AuditFacts(action="refused", outcome=4, detail=f"{interaction} {rtype or ''}: {why}"))
        raise FhirError(403, [OutcomeIssue("error", "forbidden", f"Không được phép / Forbidden: {why}")])

    # ---- visibility ----------------------------------------------------------
    def visible_patients(self, p: Principal, writing: bool = False) -> Select[Any] | None:
        """Ids of the patients the caller may see (None: no restriction)."""
        if _unrestricted(p):
            return None
        if p.patient is not None:
            return select(literal(p.patient).label("pid"))
        pf = schema.patient_facility
        facility = select(pf.c.patient_id.label("pid")).where(pf.c.facility == (p.facility or ""))
        if writing or p.facility_wide:
            base: Select[Any] = facility
        else:
            base = self._care_patients(p, facility)
        if p.break_glass:
            merged = union(base, *[select(literal(pid).label("pid")) for pid in sorted(p.break_glass)]).subquery()
            return select(merged.c.pid)
        return base

    def _care_patients(self, p: Principal, facility: Select[Any]) -> Select[Any]:
        if not p.practitioner_id or not self._care_keys:
            return select(literal("").label("pid")).where(false())
        ref, who = schema.sp_reference.alias(), schema.sp_reference.alias()
        conds = [and_(ref.c.pkey == pkey, who.c.pkey.in_(wkeys)) for pkey, wkeys in self._care_keys]
        care = (
            select(ref.c.target_id.label("pid"))
            .join(who, who.c.res_pk == ref.c.res_pk)
            .where(or_(*conds), ref.c.target_type == "Patient", who.c.target_type == "Practitioner",
                   who.c.target_id == p.practitioner_id)
        )
        return care.where(ref.c.target_id.in_(facility))

    def _clause_for(self, rtype: str | None, res: FromClause, patients: Select[Any]) -> ColumnElement[bool]:
        ref = schema.sp_reference
        patient_side = and_(res.c.rtype == "Patient", res.c.rid.in_(patients))
        keys = [k for t, ks in self.compartment.items() for k in ks if rtype is None or t == rtype]
        compartment_side = res.c.res_pk.in_(
            select(ref.c.res_pk).where(ref.c.pkey.in_(keys), ref.c.target_type == "Patient",
                                       ref.c.target_id.in_(patients))) if keys else false()
        patient_types = sorted({"Patient", *self.compartment})
        if rtype is None:
            return or_(res.c.rtype.not_in(patient_types), patient_side, compartment_side)
        if rtype == "Patient":
            return res.c.rid.in_(patients)
        if rtype in self.compartment:
            return compartment_side
        return true()

    def search_filter(self, ctx: Context, rtype: str | None, res: FromClause) -> ColumnElement[bool] | None:
        p = _principal(ctx)
        patients = self.visible_patients(p)
        clauses = [] if patients is None else [self._clause_for(rtype, res, patients)]
        if not self._reads_audit(p):  # AuditEvents stay out of includes, $everything and system-level reads too
            clauses.append(res.c.rtype.not_in(sorted(AUDIT_TYPES)))
        return and_(*clauses) if clauses else None

    @staticmethod
    def _reads_audit(p: Principal) -> bool:
        return p.has("audit_reader") or (p.kind == "client" and any(
            s.resource_type in ("*", "AuditEvent") and "r" in s.letters for s in p.scopes))

    def sees_all(self, ctx: Context, rtype: str) -> bool:
        p = _principal(ctx)
        return _unrestricted(p) and (rtype not in AUDIT_TYPES or self._reads_audit(p))

    def visible(self, ctx: Context, store: Store, items: list[Stored], writing: bool = False) -> list[Stored]:
        if not items:
            return items
        p = _principal(ctx)
        if not self._reads_audit(p):
            items = [i for i in items if i.rtype not in AUDIT_TYPES]
        patients = self.visible_patients(p, writing)
        if patients is None:
            return items
        res = schema.resource
        pks = [i.res_pk for i in items if i.res_pk]
        allowed: set[int] = set()
        for start in range(0, len(pks), 500):
            chunk = pks[start : start + 500]
            rows = store.execute(select(res.c.res_pk).where(
                res.c.res_pk.in_(chunk), self._clause_for(None, res, patients))).all()
            allowed.update(r[0] for r in rows)
        return [i for i in items if i.res_pk in allowed]

    # ---- side effects ----------------------------------------------------------
    def on_write(self, ctx: Context, store: Store, facts: AuditFacts, written: list[Stored]) -> None:
        p = _principal(ctx)
        store.flush()
        patients = self._patients_of(store, written)
        facts.patients |= patients
        if p.facility:
            self._link_patients(store, patients, p.facility, written)
        elif p.kind == "user":
            raise error(403, "forbidden", "Người dùng không thuộc cơ sở nào", "User acts for no facility")
        self.audit.record_in(store.conn, [self._record(ctx, facts)])

    def _link_patients(self, store: Store, patients: set[str], facility: str, written: list[Stored]) -> None:
        """Put written patients in the facility's scope; refuse writes about patients outside it."""
        pf = schema.patient_facility
        if not patients:
            return
        known = {r[0] for r in store.execute(select(pf.c.patient_id).where(
            pf.c.patient_id.in_(sorted(patients)), pf.c.facility == facility)).all()}
        new_patients = {s.rid for s in written if s.rtype == "Patient" and s.version == 1}
        outside = patients - known - new_patients
        if outside:
            existing = {r[0] for r in store.execute(select(pf.c.patient_id).where(
                pf.c.patient_id.in_(sorted(outside)))).all()}
            if existing:
                raise error(404, "not-found", "Không tìm thấy bệnh nhân", "Patient not found")
        fresh = patients - known
        if fresh:
            store.conn.execute(insert(pf), [{"patient_id": pid, "facility": facility,
                                             "reason": "registered" if pid in new_patients else "treated",
                                             "since": now_us()} for pid in sorted(fresh)])

    def _patients_of(self, store: Store, written: list[Stored]) -> set[str]:
        out = {s.rid for s in written if s.rtype == "Patient"}
        pks = [s.res_pk for s in written if s.rtype in self.compartment and s.res_pk and not s.deleted]
        if pks:
            keys = [k for ks in self.compartment.values() for k in ks]
            indexed = store.written_index(pks)
            if indexed is not None:  # all written by this transaction: its index rows are at hand
                wanted = set(keys)
                out.update(target_id for rows in indexed for pkey, _, target_type, target_id, _ in rows.reference
                           if pkey in wanted and target_type == "Patient" and target_id)
                return out
            ref = schema.sp_reference
            for start in range(0, len(pks), 500):
                rows = store.execute(select(ref.c.target_id).where(
                    ref.c.res_pk.in_(pks[start : start + 500]), ref.c.pkey.in_(keys),
                    ref.c.target_type == "Patient")).all()
                out.update(r[0] for r in rows if r[0])
        return out

    def on_access(self, ctx: Context, facts: AuditFacts) -> None:
        if ctx.audit_waits is None:  # an in-process caller answers nobody: the record is only queued
            self.audit.submit(self._record(ctx, facts), waited=False)
        else:  # the transport answers only once the record is committed
            self.audit.submit_for(self._record(ctx, facts), ctx.audit_waits)

    def _record(self, ctx: Context, facts: AuditFacts) -> AuditRecord:
        p = ctx.principal if isinstance(ctx.principal, Principal) else None
        patients = set(facts.patients) | {i for t, i in facts.resources if t == "Patient"}
        for body in facts.bodies:  # the patients a read resource is about (subject, patient, ...)
            patients.update(m.decode() for m in _PATIENT_REF.findall(body))
        return AuditRecord(
            action=facts.action, outcome=facts.outcome, actor=p.actor if p else None,
            actor_kind=p.kind if p else "anonymous", roles=p.roles if p else (), facility=p.facility if p else None,
            address=ctx.address, node=ctx.extra.get("node", "lienthong"), resources=facts.resources,
            patients=sorted(patients), query=facts.query, detail=facts.detail,
            break_glass=bool(p and p.break_glass and patients & p.break_glass), remote=facts.remote)

    # ---- break the glass -------------------------------------------------------
    def break_glass_grants(self, user_id: str, store_engine: Any, io: bool = True) -> frozenset[str]:
        now = time.monotonic()
        cached = self._btg_cache.get(user_id)
        if cached is not None and now - cached[0] < 5:
            return cached[1]
        if not io:
            raise NeedsIO
        bg = schema.break_glass
        with read_connection(store_engine) as conn:
            ids = frozenset(r[0] for r in conn.execute(select(bg.c.patient_id).where(
                bg.c.user_id == user_id, bg.c.expires > now_us())))
        with self._lock:
            self._btg_cache[user_id] = (now, ids)
        return ids

    def forget_grants(self, user_id: str) -> None:
        with self._lock:
            self._btg_cache.pop(user_id, None)


def _unrestricted(p: Principal) -> bool:
    """A system client bound to no facility and no patient sees every patient (the hub, integrations)."""
    return p.patient is None and p.kind == "client" and p.facility is None


def _letters(interaction: str) -> set[str]:
    if interaction in _LETTER:
        return {_LETTER[interaction]}
    if interaction in ("everything", "export"):
        return {"r", "s"}
    if interaction in ("transaction", "batch", "validate", "meta"):
        return set()  # each entry is authorised on its own; $validate stores nothing
    return {"r"}
