"""The patient index as a service on a node or the hub: `$match`, links, golden records, merge, review.

Why a write hook: the index (normalised record + blocking keys per Patient) is
updated in the same transaction as every Patient write, so `$match` never sees
a stale or half-written index. Decisions follow the matcher: an automatic link
only on a `match`, a `possible match` waits in the review queue for a person,
and every decision (automatic or human) is explained by per-field weights and audited.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable
from dataclasses import asdict
from functools import lru_cache
from importlib import resources
from typing import Any

import orjson
from sqlalchemy import Float, Select, bindparam, case, cast, delete, func, insert, select, union, update

from lienthong.fhir.datetimes import now_us
from lienthong.fhir.outcome import FhirError, error
from lienthong.identity.fhir_mapping import check_identifiers, to_person
from lienthong.identity.matching import MatchModel, MatchResult
from lienthong.identity.records import MATCH_FIELDS, IndexedRecord, PersonRecord, derive, load_derived, stored_derived
from lienthong.interactions.context import Context
from lienthong.interactions.guard import AuditFacts
from lienthong.interactions.service import FhirService
from lienthong.storage import schema
from lienthong.storage.prepared import ListMatch, PlannedOnce, binary
from lienthong.storage.repository import JSON, Store, Stored

MATCH_GRADE = "http://hl7.org/fhir/StructureDefinition/match-grade"
ENTERPRISE_SYSTEM = "https://lienthong.vn/fhir/sid/eid"
GOLDEN_TAG = {"system": "https://lienthong.vn/fhir/CodeSystem/mpi", "code": "golden", "display": "Hồ sơ gốc / Golden record"}
MAX_CANDIDATES = 75  # scored per $match: at 1 M the answers equal those of 100 (docs/benchmarks.md)
_IDENTIFIER_KEYS = frozenset({"id", "si", "ph", "ox"})


def _candidates_statement(one_of: ListMatch) -> Select[tuple[str, str | None]]:
    """See `IdentityService.candidates`; prepared once per connection on PostgreSQL (`PlannedOnce`).

    Why a LIMIT in a UNION rather than `row_number() <= limit`: the LIMIT lets PostgreSQL keep only the
    best `limit` persons while reading (top-N heapsort) instead of sorting every person under the keys
    (~1,900 for a crowded commune), and it ranks the ties on the id's bytes (`binary`), not by collation.
    """
    b, p = schema.mpi_block, schema.mpi_person
    hits = (select(b.c.patient_id, b.c.key, func.count().over(partition_by=b.c.key).label("size"))
            .where(one_of(b.c.key, "keys")).subquery())
    per_person = (select(hits.c.patient_id, func.max(case((one_of(hits.c.key, "exact"), 1), else_=0)).label("exact"),
                         func.sum(1.0 / cast(hits.c.size, Float)).label("weight"))
                  .group_by(hits.c.patient_id).cte("per_person"))
    best = (select(per_person.c.patient_id, per_person.c.weight)
            .order_by(per_person.c.weight.desc(), binary(per_person.c.patient_id)).limit(bindparam("limit")))
    exact = select(per_person.c.patient_id, per_person.c.weight).where(per_person.c.exact == 1)
    chosen = union(best.subquery().select(), exact).subquery()
    return (select(p.c.patient_id, p.c.derived).join(chosen, chosen.c.patient_id == p.c.patient_id)
            .order_by(chosen.c.weight.desc(), binary(chosen.c.patient_id)))


_CANDIDATES = PlannedOnce(_candidates_statement)


@lru_cache(maxsize=1)
def default_model() -> MatchModel:
    """Parameters fitted on the synthetic Vietnamese population (see docs/benchmarks.md)."""
    text = resources.files("lienthong.identity").joinpath("data/default_model.json").read_text(encoding="utf-8")
    return MatchModel.from_json(text)


def _record_json(record: PersonRecord) -> str:
    return orjson.dumps({f: getattr(record, f) for f in MATCH_FIELDS if getattr(record, f)}).decode()


def _derived_json(record: PersonRecord) -> str:
    return orjson.dumps(stored_derived(derive(record))).decode()


def grade(result: MatchResult, record: PersonRecord, candidate: PersonRecord) -> str:
    """FHIR match-grade: certain only with the same valid personal ID number (as normalised for scoring:
    a candidate from the index carries only its normalised values)."""
    if result.decision == "match":
        national = derive(record)["national_id"]
        same_id = national and national == derive(candidate)["national_id"]
        return "certain" if same_id else "probable"
    return "possible" if result.decision == "review" else "certainly-not"  # no_match


class IdentityService:
    def __init__(self, service: FhirService, model: MatchModel | None = None) -> None:
        self.service = service
        self.db = service.db
        self.model = model or default_model()
        self.max_candidates = MAX_CANDIDATES
        service.validators.append(check_identifiers)
        self.db.write_hooks.append(self._index_patient)
        # Called inside the decision's transaction: (store, review id, decision, left id, right id, context).
        self.on_decided: list[Callable[[Store, str, str, str, str, Context], None]] = []

    def warm_up(self) -> None:
        """Load the normalisation tables (administrative units, names) now rather than on a request."""
        derive(PersonRecord("warm-up", full_name="Nguyễn Văn An", birth_date="1980-05-02", address="thôn 1",
                            locality="Lục Ngạn", district="Lục Ngạn", province="Bắc Giang"))

    # ---- the index -------------------------------------------------------------
    def _index_patient(self, store: Store, rtype: str, rid: str, resource: JSON | None, *,
                       replace: bool = False) -> None:
        """The write hook. A first version has nothing indexed yet, so only later versions (or
        `replace`, for a re-index) pay the two DELETEs."""
        if rtype != "Patient":
            return
        conn = store.conn
        if replace or resource is None or resource.get("meta", {}).get("versionId") != "1":
            conn.execute(delete(schema.mpi_block).where(schema.mpi_block.c.patient_id == rid))
            conn.execute(delete(schema.mpi_person).where(schema.mpi_person.c.patient_id == rid))
        if resource is None or _is_golden(resource) or _replaced(resource):
            return  # deleted, an enterprise record, or merged away: never a match candidate
        record = to_person(resource, rid)
        conn.execute(insert(schema.mpi_person).values(patient_id=rid, record=_record_json(record),
                                                      derived=_derived_json(record), updated=store.now))
        keys = sorted(set(self.model.blocking_keys(record)))
        if keys:
            conn.execute(insert(schema.mpi_block), [{"key": k[:160], "patient_id": rid} for k in keys])

    def rebuild(self) -> int:
        """Re-index every current Patient (after a model change or an upgrade)."""
        r, v = schema.resource, schema.resource_version
        count = 0
        with self.db.begin() as store:
            rows = store.execute(select(r.c.rid, v.c.body).join(v, (v.c.res_pk == r.c.res_pk) & (v.c.version == r.c.version))
                                 .where(r.c.rtype == "Patient", r.c.deleted.is_(False))).all()
            for rid, body in rows:
                self._index_patient(store, "Patient", rid, orjson.loads(body), replace=True)
                count += 1
        return count

    def candidates(self, store: Store, record: PersonRecord, exclude: set[str] | None = None,
                   limit: int | None = None) -> list[PersonRecord]:
        """The persons sharing a blocking key with `record`, best first, in one statement.

        Why ranked in SQL: a common family name in a commune puts ~1,500 persons under one key, and
        scoring them all cost more than everything else in `$match`. Each shared key weighs 1/(its size),
        so a person sharing a rare key (name + birth year, birth date) outranks one who only shares the
        crowded family + commune key; the `limit` (default `max_candidates`) best are scored. Identifier keys (CCCD, insurance,
        phone, other id) are decisive and always taken whole, beyond the limit.
        """
        keys = sorted({k[:160] for k in self.model.blocking_keys(record)})
        if not keys:
            return []
        exact = [k for k in keys if k.split(":", 1)[0] in _IDENTIFIER_KEYS]
        store.flush()
        rows = _CANDIDATES.rows(store.conn, {"keys": keys, "exact": exact, "limit": limit or self.max_candidates})
        found = [(pid, load_derived(orjson.loads(derived)) if derived else None) for pid, derived in rows
                 if not exclude or pid not in exclude]
        # Scoring reads only the stored normalised values; the raw fields are read (and normalised again)
        # only for persons indexed by another version of `derive`.
        stale = [pid for pid, values in found if values is None]
        raw = dict(store.execute(select(schema.mpi_person.c.patient_id, schema.mpi_person.c.record)
                                 .where(schema.mpi_person.c.patient_id.in_(stale))).all()) if stale else {}
        return [IndexedRecord(pid, derived=values) if values is not None
                else IndexedRecord(pid, **orjson.loads(raw[pid])) for pid, values in found]

    # ---- $match ------------------------------------------------------------------
    def match(self, ctx: Context, payload: Any) -> JSON:
        """Patient/$match (ITI-119 / FHIR R4): scored candidates with the match-grade extension."""
        patient, only_certain, count = _match_parameters(payload)
        self.service.check_type("Patient")
        self.service.guard.authorize(ctx, "search", "Patient")
        record = to_person(patient, "query")
        if not any(getattr(record, f) for f in ("family", "given", "full_name", "national_id", "insurance_id",
                                                 "phone", "other_id")) or sum(
                bool(getattr(record, f)) for f in MATCH_FIELDS) < 2:
            raise error(400, "required", "Không đủ thông tin để tìm (cần tên hoặc số định danh và thêm một trường)",
                        "$match needs a name or an identifier plus at least one more field")
        with self.db.read() as store:  # read-only: no transaction round trips, no write lock on SQLite
            found = self.candidates(store, record)
            results = self.model.score(record, found, limit=None if only_certain else count, at_least="review")
            by_id = {c.record_id: c for c in found}
            graded = [(r, grade(r, record, by_id[r.right_id])) for r in results]
            if only_certain:
                graded = [(r, g) for r, g in graded if g == "certain"][:1]
            graded = graded[:count]
            # A caller who sees every Patient gets exactly the graded records (the index holds no deleted
            # or merged-away Patient), so their audit record is queued now and commits while the bodies are
            # read instead of after; anyone else is audited on what `visible` leaves.
            early = self.service.guard.sees_all(ctx, "Patient")
            if early:
                self._audit_match(ctx, [r.right_id for r, _ in graded])
            stored = {s.rid: s for s in store.fetch_current([("Patient", r.right_id) for r, _ in graded])}
            visible = {s.rid for s in self.service.guard.visible(ctx, store, list(stored.values()))}
        entries: list[JSON] = []
        for result, g in graded:
            if result.right_id not in visible:
                continue
            entries.append({
                "fullUrl": f"{ctx.base_url}/Patient/{result.right_id}",
                "resource": orjson.Fragment(stored[result.right_id].body or b"{}"),
                "search": {"mode": "match", "score": round(result.probability, 4),
                           "extension": [{"url": MATCH_GRADE, "valueCode": g}]},
            })
        if not early:
            self._audit_match(ctx, [e["fullUrl"].rsplit("/", 1)[1] for e in entries])
        return {"resourceType": "Bundle", "type": "searchset", "total": len(entries), "entry": entries}

    def _audit_match(self, ctx: Context, patient_ids: list[str]) -> None:
        self.service.guard.on_access(ctx, AuditFacts("operation", resources=[("Patient", pid) for pid in patient_ids],
                                                     detail="$match"))

    def explain(self, result: MatchResult) -> list[dict[str, Any]]:
        return [asdict(line) for line in result.explanation]

    # ---- links and golden records --------------------------------------------------
    def resolve(self, ctx: Context, patient_id: str, source: str = "link") -> JSON:
        """Match one stored Patient against the index: link on a match, queue a review on a possible match."""
        self.service.guard.authorize(ctx, "update", "Patient")
        with self.db.begin() as store:
            current = store.current("Patient", patient_id)
            if current is None or current.deleted or not self.service.guard.visible(ctx, store, [current]):
                raise error(404, "not-found", f"Không tìm thấy Patient/{patient_id}", f"Patient/{patient_id} not found")
            if _is_golden(current.resource()):
                raise error(400, "invalid", "Hồ sơ gốc không được so khớp như hồ sơ nguồn",
                            "A golden record is not matched as a source record")
            record = to_person(current.resource(), patient_id)
            results = self.model.score(record, self.candidates(store, record, exclude={patient_id}))
            linked, queued = [], []
            for result in results:
                if result.decision == "match":
                    self._link(ctx, store, patient_id, result.right_id, result)
                    linked.append(result.right_id)
                elif result.decision == "review":
                    queued.append(self._queue(store, patient_id, result, source))
            if queued:
                self.service.guard.on_write(ctx, store, AuditFacts(
                    "update", resources=[("Patient", patient_id)],
                    detail=f"possible matches sent to review: {', '.join(queued)}"), [])
        return {"patient": patient_id, "linked": linked, "review": queued}

    def _queue(self, store: Store, left: str, result: MatchResult, source: str) -> str:
        rv = schema.mpi_review
        lo, hi = sorted((left, result.right_id))
        # A pair already decided (or waiting) is never queued again: a "no-match" stays decided.
        existing = store.execute(select(rv.c.review_id).where(rv.c.left_id == lo, rv.c.right_id == hi)
                                 .order_by(rv.c.created.desc())).first()
        if existing:
            return str(existing[0])
        review_id = str(uuid.uuid4())
        store.conn.execute(insert(rv).values(
            review_id=review_id, left_id=lo, right_id=hi, score=result.score,
            explanation=orjson.dumps(self.explain(result)).decode(), status="pending", source=source,
            created=store.now))
        return review_id

    def golden_of(self, store: Store, patient_id: str) -> str | None:
        current = store.current("Patient", patient_id)
        if current is None or not current.body:
            return None
        for link in current.resource().get("link", []):
            ref = link.get("other", {}).get("reference", "")
            if link.get("type") == "refer" and ref.startswith("Patient/"):
                return str(ref.split("/", 1)[1])
        return None

    def _link(self, ctx: Context, store: Store, a: str, b: str, result: MatchResult | None) -> str:
        """Attach both records to one golden record; refuse to join two different golden records."""
        ga, gb = self.golden_of(store, a), self.golden_of(store, b)
        if ga and gb and ga != gb:
            raise error(409, "conflict", "Hai hồ sơ đã thuộc hai hồ sơ gốc khác nhau; cần gộp thủ công",
                        "The records belong to two different golden records; merge them by hand")
        golden = ga or gb
        written: list[Stored] = []
        if golden is None:
            base = store.current("Patient", a)
            assert base is not None
            golden_res = _golden_from(base.resource())
            golden = str(uuid.uuid4())
            written.append(store.create(golden_res, golden))
        for pid in (a, b):
            if self.golden_of(store, pid) != golden:
                written.append(self._add_link(store, pid, golden, "refer"))
                written.append(self._add_link(store, golden, pid, "seealso"))
        detail = f"linked Patient/{a} and Patient/{b} to golden Patient/{golden}"
        if result is not None:
            detail += f"; score {result.score:.2f}; " + ", ".join(f"{w.field}={w.level}({w.weight:+.1f})"
                                                                  for w in result.explanation)
        self.service.guard.on_write(ctx, store, AuditFacts("update", resources=[("Patient", x) for x in (a, b, golden)],
                                                           detail=detail), [w for w in written if w])
        return golden

    @staticmethod
    def _add_link(store: Store, pid: str, other: str, kind: str) -> Stored:
        current = store.current("Patient", pid, lock=True)
        if current is None or current.deleted:
            raise error(404, "not-found", f"Không tìm thấy Patient/{pid}", f"Patient/{pid} not found")
        resource = current.resource()
        links = [lk for lk in resource.get("link", []) if lk.get("other", {}).get("reference") != f"Patient/{other}"]
        links.append({"other": {"reference": f"Patient/{other}"}, "type": kind})
        resource["link"] = links
        return store.write(current, resource, "PUT")

    # ---- review queue ----------------------------------------------------------------
    def reviews(self, status: str = "pending", limit: int = 200) -> list[JSON]:
        rv = schema.mpi_review
        with self.db.read() as store:
            rows = store.execute(select(rv).where(rv.c.status == status).order_by(rv.c.created).limit(limit)).mappings().all()
        return [{**dict(r), "explanation": orjson.loads(r["explanation"])} for r in rows]

    def decide(self, ctx: Context, review_id: str, decision: str) -> JSON:
        if decision not in ("match", "no-match"):
            raise error(400, "invalid", "Quyết định phải là match hoặc no-match", "decision must be match or no-match")
        self.service.guard.authorize(ctx, "update", "Patient")
        rv = schema.mpi_review
        with self.db.begin() as store:
            row = store.execute(select(rv.c.left_id, rv.c.right_id, rv.c.status).where(rv.c.review_id == review_id)).first()
            if row is None:
                raise error(404, "not-found", "Không có mục xét duyệt này", "No such review item")
            if row[2] != "pending":
                raise error(409, "conflict", "Mục này đã được quyết định", "This review item was already decided")
            incoming = any(str(x).startswith("incoming:") for x in row[:2])  # a received package waiting
            golden = self._link(ctx, store, row[0], row[1], None) if decision == "match" and not incoming else None
            store.conn.execute(update(rv).where(rv.c.review_id == review_id).values(
                status=decision, decided_by=ctx.actor or "operator", decided_at=store.now))
            if golden is None:
                what = f"{decision} (incoming package)" if incoming else decision
                self.service.guard.on_write(ctx, store, AuditFacts(
                    "update", resources=[("Patient", p) for p in row[:2] if not str(p).startswith("incoming:")],
                    detail=f"review {review_id}: {what}"), [])
            for hook in self.on_decided:  # in the same transaction: what the decision unblocks commits with it
                hook(store, review_id, decision, row[0], row[1], ctx)
        return {"review": review_id, "decision": decision, "golden": golden}

    # ---- merge / unmerge --------------------------------------------------------------
    def merge(self, ctx: Context, source_id: str, target_id: str) -> JSON:
        """Mark `source` as replaced by `target`; nothing is rewritten or deleted, so unmerge is exact."""
        if source_id == target_id:
            raise error(400, "invalid", "Nguồn và đích trùng nhau", "source and target are the same")
        self.service.guard.authorize(ctx, "update", "Patient")
        with self.db.begin() as store:
            src = store.current("Patient", source_id, lock=True)
            tgt = store.current("Patient", target_id, lock=True)
            for pid, cur in ((source_id, src), (target_id, tgt)):
                if cur is None or cur.deleted or not self.service.guard.visible(ctx, store, [cur]):
                    raise error(404, "not-found", f"Không tìm thấy Patient/{pid}", f"Patient/{pid} not found")
            assert src is not None and tgt is not None
            if _replaced(src.resource()):
                raise error(409, "conflict", "Hồ sơ nguồn đã được gộp", "The source record is already merged")
            merge_id = str(uuid.uuid4())
            store.conn.execute(insert(schema.mpi_merge).values(
                merge_id=merge_id, source_id=source_id, target_id=target_id, source_version=src.version,
                target_version=tgt.version, merged_by=ctx.actor or "operator", merged_at=now_us()))
            source_res = src.resource()
            source_res["active"] = False
            source_res["link"] = [*source_res.get("link", []),
                                  {"other": {"reference": f"Patient/{target_id}"}, "type": "replaced-by"}]
            target_res = tgt.resource()
            target_res["link"] = [*target_res.get("link", []),
                                  {"other": {"reference": f"Patient/{source_id}"}, "type": "replaces"}]
            written = [store.write(src, source_res, "PUT"), store.write(tgt, target_res, "PUT")]
            self.service.guard.on_write(ctx, store, AuditFacts(
                "update", resources=[("Patient", source_id), ("Patient", target_id)],
                detail=f"merge {merge_id}: Patient/{source_id} into Patient/{target_id}"), written)
        return {"merge": merge_id, "source": source_id, "target": target_id}

    def unmerge(self, ctx: Context, merge_id: str) -> JSON:
        """Undo exactly what the merge changed (the two links and the source's `active`), as new versions.

        Edits made to either record after the merge are kept: a record is never silently rolled back."""
        mg = schema.mpi_merge
        self.service.guard.authorize(ctx, "update", "Patient")
        with self.db.begin() as store:
            row = store.execute(select(mg.c.source_id, mg.c.target_id, mg.c.source_version, mg.c.target_version,
                                       mg.c.unmerged_at).where(mg.c.merge_id == merge_id)).first()
            if row is None:
                raise error(404, "not-found", "Không có lần gộp này", "No such merge")
            if row[4] is not None:
                raise error(409, "conflict", "Đã tách trước đó", "This merge was already undone")
            source_id, target_id = row[0], row[1]
            written = []
            for pid, version, other, kind in ((source_id, row[2], target_id, "replaced-by"),
                                              (target_id, row[3], source_id, "replaces")):
                before = store.version("Patient", pid, version)
                current = store.current("Patient", pid, lock=True)
                if before is None or current is None or not self.service.guard.visible(ctx, store, [current]):
                    raise error(404, "not-found", f"Không tìm thấy Patient/{pid}", f"Patient/{pid} not found")
                written.append(store.write(current, _without_merge(current.resource(), before.resource(), other,
                                                                   kind, pid == source_id), "PUT"))
            store.conn.execute(update(mg).where(mg.c.merge_id == merge_id).values(
                unmerged_by=ctx.actor or "operator", unmerged_at=now_us()))
            self.service.guard.on_write(ctx, store, AuditFacts(
                "update", resources=[("Patient", source_id), ("Patient", target_id)], detail=f"unmerge {merge_id}"),
                written)
        return {"unmerged": merge_id, "source": source_id, "target": target_id}


def _without_merge(current: JSON, before: JSON, other: str, kind: str, is_source: bool) -> JSON:
    """`current` minus the merge's link (and, on the source, with `active` as it was before the merge)."""
    out = {k: copy.deepcopy(v) for k, v in current.items() if k != "meta"}
    meta = before.get("meta", {})
    out["meta"] = {k: v for k, v in meta.items() if k not in ("versionId", "lastUpdated")}
    if not out["meta"]:
        del out["meta"]
    ref = f"Patient/{other}"
    dropped = False
    kept = []
    for link in out.get("link", []):
        if not dropped and link.get("type") == kind and (link.get("other") or {}).get("reference") == ref:
            dropped = True  # only the merge's own link; an older identical link stays
            continue
        kept.append(link)
    if kept:
        out["link"] = kept
    else:
        out.pop("link", None)
    if is_source:
        if "active" in before:
            out["active"] = before["active"]
        else:
            out.pop("active", None)
    return out


def _is_golden(resource: JSON) -> bool:
    return any(t.get("code") == "golden" and t.get("system") == GOLDEN_TAG["system"]
               for t in resource.get("meta", {}).get("tag", []) if isinstance(t, dict))


def _replaced(resource: JSON) -> bool:
    return any(isinstance(lk, dict) and lk.get("type") == "replaced-by" for lk in resource.get("link", []))


def _golden_from(patient: JSON) -> JSON:
    """A golden record starts from the best-known demographics, with its own enterprise identifier."""
    golden: JSON = {"resourceType": "Patient", "meta": {"tag": [GOLDEN_TAG]},
                    "identifier": [{"system": ENTERPRISE_SYSTEM, "value": str(uuid.uuid4())}]}
    for key in ("name", "gender", "birthDate", "address", "telecom"):
        if key in patient:
            golden[key] = copy.deepcopy(patient[key])
    golden["identifier"] += [copy.deepcopy(i) for i in patient.get("identifier", []) if isinstance(i, dict)
                             and not i.get("system", "").startswith("https://lienthong.vn/fhir/sid/ma-bn/")]
    return golden


def _match_parameters(payload: Any) -> tuple[JSON, bool, int]:
    if not isinstance(payload, dict) or payload.get("resourceType") != "Parameters":
        raise error(400, "invalid", "Cần tài nguyên Parameters", "$match expects a Parameters resource")
    patient, only_certain, count = None, False, 10
    for p in payload.get("parameter", []):
        if not isinstance(p, dict):
            continue
        if p.get("name") == "resource" and isinstance(p.get("resource"), dict):
            patient = p["resource"]
        elif p.get("name") == "onlyCertainMatches":
            only_certain = p.get("valueBoolean") is True
        elif p.get("name") == "count":
            value = p.get("valueInteger")
            if not isinstance(value, int) or value < 1:
                raise error(400, "invalid", "count phải là số nguyên dương", "count must be a positive integer")
            count = min(value, 100)
    if patient is None or patient.get("resourceType") != "Patient":
        raise error(400, "required", "Thiếu tham số resource (Patient)", "The 'resource' parameter (a Patient) is required")
    problems = check_identifiers(patient)
    if problems:
        raise FhirError(400, problems)
    return patient, only_certain, count
