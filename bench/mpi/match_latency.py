"""Online Patient/$match latency of the patient index at scale (1,000,000 patients by default).

Run: `python bench/mpi/match_latency.py [--patients N] [--db postgresql|sqlite] [--queries Q]`
Reuse a database kept by `--keep`: `--url URL` (same --patients/--seed); compare code versions back to
back on it by running this script with another `PYTHONPATH` (`--no-settle` for sources without `settle`).

1. Generate N + Q synthetic records (`lienthong.identity.synth.generate`, seeded, with ground
   truth). Q of them - corrupted duplicates of a person who keeps at least one other record -
   are held out as queries; the other N are loaded.
2. Start a throw-away PostgreSQL cluster (`lienthong.devtools.pgserver`, fsync off) or make a
   SQLite file in a temp dir (`--pg-shared-buffers` sizes the cluster's cache; `--prewarm` loads the
   patient index into it before measuring); open it with `lienthong.node.open_database` and wire a node with
   `build_node(db, ApiSettings(), secure=False)`, so the write-time index hook is on.
3. Bulk-load: every record becomes a FHIR Patient (CCCD/BHYT/BHXH identifiers, name,
   birthDate, gender, phone, address, parents), posted in transaction Bundles of `--batch`
   entries through `BundleProcessor(node.service)` in `--workers` forked processes (one on
   SQLite, which has a single writer). ANALYZE afterwards. This is setup, timed separately.
4. Measure: Q `$match` calls in-process through `node.identity.match(Context(), parameters)`
   (after `lienthong.node.settle`, as `lienthong serve` does, and a short warm-up; the matcher's
   per-process caches start cold because the load ran in child processes), then `--http-queries`
   of them as a client would: `POST /fhir/Patient/$match` to a `lienthong serve` subprocess (uvicorn,
   bearer token, access guard and audit on) over a local socket. Per-query phases are timed by wrapping
   `IdentityService.candidates` and `MatchModel.score` (no source change).
5. Sanity: the fraction of queries whose top result belongs to the true person, and whose true
   person is among the retrieved candidates at all (and within the first 10/25/50/100 of them).

Prints a markdown table on stdout (progress on stderr) and merges the run into
bench/results/mpi_match.json under the key "<db>-<N>" ("<db>-<N>-hook-index" with `--index hook`).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import json
import multiprocessing as mp
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

warnings.filterwarnings("ignore", message=".*httpx.*", category=DeprecationWarning)

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench" / "fhir"))
from common import percentile  # noqa: E402  (the benchmarks' one nearest-rank percentile)

RESULTS = ROOT / "bench" / "results" / "mpi_match.json"
TARGET_P95_MS = 20.0
FATHER = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode", "code": "FTH"}]}
MA_BN = "https://lienthong.vn/fhir/sid/ma-bn/24001"
MOTHER = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode", "code": "MTH"}]}

_T0 = time.monotonic()
# Filled before forking, read by the loader processes (copy-on-write; nothing is pickled).
_LOAD: list[Any] = []


def log(msg: str) -> None:
    print(f"[{time.monotonic() - _T0:8.1f}s] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# Data: synthetic records -> FHIR Patients, held-out corrupted duplicates -> $match queries
# ---------------------------------------------------------------------------------------
def to_patient(rec: Any, facility_code: bool = False) -> dict[str, Any]:
    """A FHIR Patient as a registration desk would send it, from a synthetic PersonRecord.

    `facility_code`: add the record id as the facility's patient code (MA_BN), as every stored
    hospital patient has one; it maps results back to the ground truth. Queries carry none.
    """
    from lienthong.identity import identifiers as ids
    from lienthong.identity.normalize import normalize_sex, parse_date

    p: dict[str, Any] = {"resourceType": "Patient"}
    tokens = (rec.full_name or "").split()
    if tokens:  # Vietnamese order as typed; the index detects given-first order itself
        p["name"] = [{"use": "official", "family": tokens[0], "given": tokens[1:] or [tokens[0]]}]
    date = parse_date(rec.birth_date)
    if date is not None:
        p["birthDate"] = date.isoformat() if date.is_valid else f"{date.year:04d}"
    sex = normalize_sex(rec.sex)
    if sex:
        p["gender"] = sex
    identifiers = []
    if rec.national_id:
        identifiers.append({"system": ids.CCCD_SYSTEM, "value": rec.national_id})
    if rec.insurance_id:
        system = ids.BHYT_SYSTEM if len(rec.insurance_id) == 15 else ids.BHXH_SYSTEM
        identifiers.append({"system": system, "value": rec.insurance_id})
    if facility_code:
        identifiers.append({"system": MA_BN, "value": rec.record_id})
    if identifiers:
        p["identifier"] = identifiers
    if rec.phone:
        p["telecom"] = [{"system": "phone", "value": rec.phone, "use": "mobile"}]
    address: dict[str, Any] = {"use": "home"}
    if rec.address:
        address["line"] = [rec.address]
    for key, value in (("city", rec.locality), ("district", rec.district), ("state", rec.province)):
        if value:
            address[key] = value
    if len(address) > 1:
        address["country"] = "VN"
        p["address"] = [address]
    contacts = [{"relationship": [rel], "name": {"text": name}}
                for rel, name in ((FATHER, rec.father_name), (MOTHER, rec.mother_name)) if name]
    if contacts:
        p["contact"] = contacts
    return p


def make_population(n: int, q: int, seed: int) -> tuple[list[Any], list[Any]]:
    """(records to load, held-out query records); every query's person keeps a loaded record."""
    from lienthong.identity.synth import generate

    records = generate(n + q, seed)
    by_person: dict[str, list[int]] = defaultdict(list)
    for k, s in enumerate(records):
        by_person[s.true_person_id].append(k)
    held: set[int] = set()
    for k, s in enumerate(records):
        if len(held) >= q:
            break
        if s.kind == "duplicate" and sum(1 for j in by_person[s.true_person_id] if j not in held) >= 2:
            held.add(k)
    if len(held) < q:
        raise SystemExit(f"only {len(held)} held-out duplicates available for {q} queries; use fewer --queries")
    load = [s for k, s in enumerate(records) if k not in held]
    queries = [records[k] for k in sorted(held)]
    return load, queries


# ---------------------------------------------------------------------------------------
# Bulk load (forked processes, each with its own engine and node)
# ---------------------------------------------------------------------------------------
class BatchedIndex:
    """The patient-index hook of `IdentityService`, batched: same rows, written once per transaction.

    Production (`--index hook`) runs 2 INSERTs per new Patient inside the write (2 DELETEs more on
    an update; about 5 ms/patient of round trips here). For a bulk load of new Patients this buffers
    exactly the rows `IdentityService._index_patient` would insert (same `to_person`, `_record_json`,
    `_derived_json`, `blocking_keys`, same key truncation) and COPYs them at the end of each
    transaction. `--verify-index` checks the result equals the hook's row for row.
    """

    def __init__(self, node: Any) -> None:
        from lienthong.identity.service import IdentityService

        self.identity = node.identity
        self.db = node.db
        self.db.write_hooks[:] = [h for h in self.db.write_hooks
                                  if getattr(h, "__func__", None) is not IdentityService._index_patient]
        self.db.write_hooks.append(self.hook)
        self.people: list[tuple[Any, ...]] = []
        self.blocks: list[tuple[Any, ...]] = []
        real_begin = self.db.begin

        @contextlib.contextmanager
        def begin() -> Any:
            try:
                with real_begin() as store:
                    yield store
                    self.flush(store)
            finally:
                self.people, self.blocks = [], []

        self.db.begin = begin

    def hook(self, store: Any, rtype: str, rid: str, resource: Any) -> None:
        from lienthong.identity.fhir_mapping import to_person
        from lienthong.identity.service import _derived_json, _is_golden, _record_json, _replaced

        if rtype != "Patient":
            return
        if resource is None or resource.get("meta", {}).get("versionId") != "1":
            raise RuntimeError("BatchedIndex only handles creates (a bulk load of new Patients)")
        if _is_golden(resource) or _replaced(resource):
            return
        record = to_person(resource, rid)
        self.people.append((rid, _record_json(record), _derived_json(record), store.now))
        self.blocks.extend((k[:160], rid) for k in sorted(set(self.identity.model.blocking_keys(record))))

    def flush(self, store: Any) -> None:
        store.flush()
        store._bulk("mpi_person", ("patient_id", "record", "derived", "updated"), self.people)
        store._bulk("mpi_block", ("key", "patient_id"), self.blocks)
        self.people, self.blocks = [], []


def _load_worker(url: str, batch: int, worker: int, workers: int, index: str, progress: Any) -> None:
    from lienthong.api.app import ApiSettings
    from lienthong.interactions.bundles import BundleProcessor
    from lienthong.interactions.context import Context
    from lienthong.node import build_node, open_database

    node = build_node(open_database(url, upgrade=False), ApiSettings(), secure=False)
    if index == "batched":
        BatchedIndex(node)
    processor = BundleProcessor(node.service)
    ctx = Context(base_url="urn:lienthong:bench")
    for start in range(worker * batch, len(_LOAD), workers * batch):
        chunk = _LOAD[start : start + batch]
        entries = [{"resource": to_patient(s.record, facility_code=True),
                    "request": {"method": "POST", "url": "Patient"}} for s in chunk]
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
        result = processor.process(ctx, bundle)
        assert result.status == 200 and result.resource is not None
        progress.put(len(chunk))
    node.db.engine.dispose()


def bulk_load(url: str, batch: int, workers: int, index: str) -> float:
    ctx = mp.get_context("fork")
    progress = ctx.Queue()
    procs = [ctx.Process(target=_load_worker, args=(url, batch, w, workers, index, progress), daemon=True)
             for w in range(workers)]
    started = time.perf_counter()
    for p in procs:
        p.start()
    done, last = 0, 0.0
    try:
        while any(p.is_alive() for p in procs) or not progress.empty():
            with contextlib.suppress(Exception):
                done += progress.get(timeout=1.0)
            if any(p.exitcode not in (None, 0) for p in procs):
                raise RuntimeError(f"a loader process failed: exit codes {[p.exitcode for p in procs]}")
            now = time.perf_counter() - started
            if now - last >= 30 or done == len(_LOAD):
                last = now
                rate = done / now if now else 0
                eta = (len(_LOAD) - done) / rate if rate else float("nan")
                log(f"loaded {done:,}/{len(_LOAD):,} patients ({rate:,.0f}/s, ETA {eta / 60:.1f} min)")
                if done == len(_LOAD):
                    break
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.terminate()
    return time.perf_counter() - started


def verify_index(node: Any, sample: int) -> int:
    """Re-run the production hook on `sample` stored Patients (rolled back) and compare its rows."""
    from sqlalchemy import func, select

    from lienthong.storage import schema
    from lienthong.storage.repository import Store

    p, b = schema.mpi_person, schema.mpi_block

    def rows(conn: Any, rid: str) -> tuple[Any, list[str]]:
        rec = conn.execute(select(p.c.record, p.c.derived).where(p.c.patient_id == rid)).one_or_none()
        return tuple(rec) if rec else None, sorted(conn.execute(select(b.c.key).where(b.c.patient_id == rid)).scalars())

    with node.db.engine.connect() as conn:
        trans = conn.begin()
        ids = list(conn.execute(select(p.c.patient_id).order_by(func.random()).limit(sample)).scalars())
        store = Store(conn, node.db)
        try:
            for rid in ids:
                before = rows(conn, rid)
                current = store.current("Patient", rid)
                assert current is not None
                node.identity._index_patient(store, "Patient", rid, current.resource(), replace=True)
                after = rows(conn, rid)
                if before != after:
                    raise SystemExit(f"batched index differs from the hook for Patient/{rid}: {before} != {after}")
        finally:
            trans.rollback()
    return len(ids)


def analyze(url: str, is_pg: bool) -> float:
    from lienthong.storage.engine import make_engine

    started = time.perf_counter()
    engine = make_engine(url)
    if is_pg:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE")
    else:
        with engine.connect() as conn:
            conn.exec_driver_sql("ANALYZE")
    engine.dispose()
    return time.perf_counter() - started


PREWARM = ("mpi_person", "mpi_person_pkey", "ix_mpi_block_key_patient", "resource", "ux_resource_type_id",
           "resource_version", "resource_version_pkey")


def setting(url: str, name: str) -> str:
    from lienthong.storage.engine import make_engine

    engine = make_engine(url)
    with engine.connect() as conn:
        value = str(conn.exec_driver_sql(f"SHOW {name}").scalar_one())
    engine.dispose()
    return value


def prewarm(url: str) -> int:
    """Read what `$match` touches into shared_buffers (pages read; relations missing here are skipped)."""
    from lienthong.storage.engine import make_engine

    engine = make_engine(url)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS pg_prewarm")
        present = [r for r in PREWARM if conn.exec_driver_sql("SELECT to_regclass(%(r)s)", {"r": r}).scalar()]
        pages = sum(int(conn.exec_driver_sql("SELECT pg_prewarm(%(r)s)", {"r": r}).scalar_one()) for r in present)
    engine.dispose()
    return pages


def table_sizes(url: str, is_pg: bool) -> dict[str, Any]:
    from lienthong.storage.engine import make_engine

    engine = make_engine(url)
    out: dict[str, Any] = {}
    with engine.connect() as conn:
        for table in ("resource", "mpi_person", "mpi_block"):
            out[f"{table}_rows"] = int(conn.exec_driver_sql(f"SELECT count(*) FROM {table}").scalar_one())
        if is_pg:
            out["database_bytes"] = int(conn.exec_driver_sql("SELECT pg_database_size(current_database())")
                                        .scalar_one())
            out["biggest_blocks"] = [
                (k, int(c)) for k, c in conn.exec_driver_sql(
                    "SELECT key, count(*) c FROM mpi_block GROUP BY key ORDER BY c DESC LIMIT 5").all()]
    engine.dispose()
    return out


# ---------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------
def parameters(patient: dict[str, Any], count: int = 10) -> dict[str, Any]:
    return {"resourceType": "Parameters", "parameter": [{"name": "resource", "resource": patient},
                                                       {"name": "count", "valueInteger": count}]}


class Probe:
    """Wraps IdentityService.candidates and MatchModel.score to time phases and record candidates."""

    def __init__(self, identity: Any) -> None:
        self.identity = identity
        self.real_candidates = identity.candidates
        self.real_score = identity.model.score
        self.candidate_ms = 0.0
        self.score_ms = 0.0
        self.candidate_ids: list[str] = []

    def __enter__(self) -> Probe:
        def candidates(store: Any, record: Any, *args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            found = self.real_candidates(store, record, *args, **kwargs)
            self.candidate_ms += (time.perf_counter() - t) * 1000
            self.candidate_ids = [c.record_id for c in found]
            return found

        def score(record: Any, found: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            out = self.real_score(record, found, **kwargs)
            self.score_ms += (time.perf_counter() - t) * 1000
            return out

        self.identity.candidates = candidates
        self.identity.model.score = score
        return self

    def reset(self) -> None:
        self.candidate_ms = self.score_ms = 0.0
        self.candidate_ids = []

    def __exit__(self, *exc: object) -> None:
        del self.identity.candidates
        del self.identity.model.score


def measure(node: Any, queries: list[Any], truth_of: dict[str, str], profile: str | None,
            loaded_cccd: set[tuple[str, str]]) -> dict[str, Any]:
    from lienthong.interactions.context import Context

    ctx = Context(base_url="urn:lienthong:bench")
    params = [parameters(to_patient(s.record)) for s in queries]
    for p in params[: min(20, len(params))]:  # warm-up: connections, plans, imports
        node.identity.match(ctx, p)
    from lienthong.identity.normalize import parse_name
    from lienthong.identity.records import _derive

    _derive.cache_clear()  # the warm-up must not pre-derive the measured candidates
    parse_name.cache_clear()
    lat, cand_ms, score_ms, n_cand, n_results = [], [], [], [], []
    top_ok = in_cand = certain_ok = cccd_queries = cccd_certain = 0
    ranks: list[int] = []  # position of the true person among the candidates, where present
    profiler = cProfile.Profile() if profile else None
    gc.collect()
    pauses: list[float] = []  # garbage-collector pauses inside the measured loop (ms, generation 2 only)
    started_gc: list[float] = []

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if info.get("generation") == 2:
            if phase == "start":
                started_gc[:] = [time.perf_counter()]
            elif started_gc:
                pauses.append((time.perf_counter() - started_gc[0]) * 1000)

    gc.callbacks.append(on_gc)
    with Probe(node.identity) as probe:
        if profiler:
            profiler.enable()
        for s, p in zip(queries, params, strict=True):
            probe.reset()
            t = time.perf_counter()
            bundle = node.identity.match(ctx, p)
            lat.append((time.perf_counter() - t) * 1000)
            cand_ms.append(probe.candidate_ms)
            score_ms.append(probe.score_ms)
            n_cand.append(len(probe.candidate_ids))
            entries = bundle["entry"]
            n_results.append(len(entries))
            want = s.true_person_id
            if entries and truth_of.get(_rid(entries[0])) == want:
                top_ok += 1
                if entries[0]["search"]["extension"][0]["valueCode"] == "certain":
                    certain_ok += 1
            rank = next((k for k, c in enumerate(probe.candidate_ids, 1) if truth_of.get(c) == want), None)
            if rank is not None:
                in_cand += 1
                ranks.append(rank)
            if s.record.national_id and (want, s.record.national_id) in loaded_cccd:
                cccd_queries += 1  # a stored record of this person carries the same CCCD: must be "certain"
                cccd_certain += any(truth_of.get(_rid(e)) == want and e["search"]["extension"][0]["valueCode"]
                                    == "certain" for e in entries)
        if profiler:
            profiler.disable()
            assert profile is not None
            profiler.dump_stats(profile)
    gc.callbacks.remove(on_gc)
    q = len(queries)
    slowest = sorted(range(q), key=lambda k: -lat[k])[:5]
    return {
        "queries": q,
        "latency_ms": summary(lat),
        "candidates_ms": summary(cand_ms),
        "score_ms": summary(score_ms),
        "rest_ms": summary([a - b - c for a, b, c in zip(lat, cand_ms, score_ms, strict=True)]),
        "candidates": {"mean": round(sum(n_cand) / q, 1), "p50": percentile(n_cand, 50),
                       "p95": percentile(n_cand, 95), "max": max(n_cand),
                       "capped_at_500": sum(1 for c in n_cand if c >= 500)},  # the cap before ranking
        "results_mean": round(sum(n_results) / q, 2),
        "top1_true_person": round(top_ok / q, 4),
        "top1_certain": round(certain_ok / q, 4),
        "true_person_in_candidates": round(in_cand / q, 4),
        "true_person_within_first": {n: round(sum(1 for r in ranks if r <= n) / q, 4) for n in (10, 25, 50, 100)},
        "same_cccd_queries": cccd_queries,
        "same_cccd_found_certain": round(cccd_certain / cccd_queries, 4) if cccd_queries else None,
        "throughput_qps_1_thread": round(q / (sum(lat) / 1000), 1),
        "gc_gen2_pauses": {"count": len(pauses), "total_ms": round(sum(pauses), 1),
                           "max_ms": round(max(pauses, default=0.0), 1)},
        "slowest": [{"ms": round(lat[k], 1), "candidates": n_cand[k], "candidate_sql_ms": round(cand_ms[k], 1),
                     "score_ms": round(score_ms[k], 1)} for k in slowest],
    }


def _rid(entry: dict[str, Any]) -> str:
    return str(entry["fullUrl"].rsplit("/", 1)[1])


def summary(values: list[float]) -> dict[str, float]:
    return {"mean": round(sum(values) / len(values), 2), "p50": round(percentile(values, 50), 2),
            "p95": round(percentile(values, 95), 2), "p99": round(percentile(values, 99), 2),
            "max": round(max(values), 2)}


def measure_http(url: str, queries: list[Any], truth_of: dict[str, str]) -> dict[str, Any]:
    """`POST /fhir/Patient/$match` to a real `lienthong serve` (uvicorn, bearer token, access guard and
    audit as in production) over a local socket, one keep-alive connection, one query at a time."""
    import http.client

    import orjson
    from common import Cleanup, start_lienthong

    cleanup = Cleanup()
    try:
        log_dir = Path(tempfile.mkdtemp(prefix="lienthong-mpi-serve-"))
        cleanup.push("server logs", lambda: shutil.rmtree(log_dir, ignore_errors=True))
        server = start_lienthong(url, log_dir, cleanup, name="mpi-match", auth="token")
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        headers = {**server.headers, "Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}

        def post(body: bytes) -> dict[str, Any]:
            conn.request("POST", "/fhir/Patient/$match", body=body, headers=headers)
            r = conn.getresponse()
            data = r.read()
            if r.status != 200:
                raise RuntimeError(f"$match answered {r.status}: {data[:300]!r}")
            out: dict[str, Any] = orjson.loads(data)
            return out

        bodies = [orjson.dumps(parameters(to_patient(s.record))) for s in queries]
        for b in bodies[:20]:  # warm-up: connections, plans, caches
            post(b)
        lat: list[float] = []
        top_ok = 0
        for s, b in zip(queries, bodies, strict=True):
            t = time.perf_counter()
            entries = post(b).get("entry", [])
            lat.append((time.perf_counter() - t) * 1000)
            if entries and truth_of.get(_rid(entries[0])) == s.true_person_id:
                top_ok += 1
        conn.close()
        return {"queries": len(queries), "latency_ms": summary(lat),
                "top1_true_person": round(top_ok / len(queries), 4),
                "transport": f"lienthong serve (uvicorn, 1 worker), {server.auth}; http.client keep-alive over "
                             "127.0.0.1, requests one at a time"}
    finally:
        cleanup.run()


def stored_truth(node: Any, load: list[Any]) -> dict[str, str]:
    """Stored Patient id -> true person id, through the MA_BN code (= synthetic record id) in the index."""
    import orjson
    from sqlalchemy import select

    from lienthong.storage import schema

    person_of = {s.record.record_id: s.true_person_id for s in load}
    prefix = MA_BN + "|"
    out: dict[str, str] = {}
    p = schema.mpi_person
    with node.db.engine.connect() as conn:
        for pid, text in conn.execution_options(yield_per=20000).execute(select(p.c.patient_id, p.c.record)):
            code = orjson.loads(text).get("other_id", "")
            if code.startswith(prefix):
                out[pid] = person_of[code[len(prefix):]]
    return out


# ---------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--patients", type=int, default=1_000_000)
    ap.add_argument("--db", choices=("postgresql", "sqlite"), default="postgresql")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--http-queries", type=int, default=1000, help="0 to skip the HTTP pass")
    ap.add_argument("--batch", type=int, default=1000, help="entries per transaction Bundle")
    ap.add_argument("--workers", type=int, default=2, help="loader processes (PostgreSQL only)")
    ap.add_argument("--seed", type=int, default=2025)
    ap.add_argument("--index", choices=("batched", "hook"), default="batched",
                    help="batched: the hook's rows COPYed once per Bundle (default); hook: production per-row hook")
    ap.add_argument("--verify-index", type=int, default=500, metavar="K",
                    help="after a batched load, re-run the production hook on K Patients and compare (0: skip)")
    ap.add_argument("--cprofile", help="write a cProfile of the in-process query loop to this file")
    ap.add_argument("--keep", action="store_true", help="keep the database and print its URL (Ctrl-C to stop)")
    ap.add_argument("--max-candidates", type=int, help="persons scored per query (default: the service's)")
    ap.add_argument("--no-settle", action="store_true",
                    help="measure without `lienthong.node.settle` (warm-up + gc.freeze), as before it existed")
    ap.add_argument("--pg-shared-buffers", metavar="SIZE",
                    help="shared_buffers of a new PostgreSQL cluster, e.g. 3GB (default: the server's 128MB)")
    ap.add_argument("--prewarm", action="store_true",
                    help="PostgreSQL: load the patient index and the resource tables into shared_buffers "
                         "(pg_prewarm) before measuring, as on a server that has been answering for a while")
    ap.add_argument("--url", help="measure on a database kept by an earlier `--keep` run with the same --patients "
                                  "and --seed (skips the load; the population is regenerated for the ground truth)")
    args = ap.parse_args()

    is_pg = args.db == "postgresql"
    result: dict[str, Any] = {"patients": args.patients, "db": args.db, "queries": args.queries,
                              "seed": args.seed, "batch": args.batch, "source": source_version()}
    with contextlib.ExitStack() as cleanup:
        t = time.perf_counter()
        load, queries = make_population(args.patients, args.queries, args.seed)
        result["generate_s"] = round(time.perf_counter() - t, 1)
        log(f"generated {len(load):,} records to load + {len(queries):,} held-out queries in {result['generate_s']} s")

        if args.url:
            url = args.url
            result.update(db_start_s=0.0, load_s=0.0, load_per_s=0.0, workers=0, index=args.index, analyze_s=0.0,
                          setup_s=result["generate_s"], reused_database=True)
        else:
            url = setup_database(args, result, load, is_pg, cleanup)
        result["sizes"] = table_sizes(url, is_pg)
        if is_pg:
            result["shared_buffers"] = setting(url, "shared_buffers")
            if args.prewarm:
                result["prewarmed_pages"] = prewarm(url)
                log(f"prewarmed {result['prewarmed_pages']:,} pages")
        log(f"sizes {result['sizes']}")

        from lienthong.api.app import ApiSettings
        from lienthong.node import build_node, open_database

        node = build_node(open_database(url, upgrade=False), ApiSettings(), secure=False)
        if args.max_candidates:
            node.identity.max_candidates = args.max_candidates
        result["max_candidates"] = getattr(node.identity, "max_candidates", 500)
        if args.index == "batched" and args.verify_index and not args.url:
            result["index_verified_patients"] = verify_index(node, args.verify_index)
            log(f"batched index equals the production hook's on {result['index_verified_patients']} patients")
        truth_of = stored_truth(node, load)
        loaded_cccd = {(s.true_person_id, s.record.national_id) for s in load if s.record.national_id}
        result["truth_mapped"] = len(truth_of)
        _LOAD.clear()
        del load
        gc.collect()
        if not args.no_settle:
            from lienthong.node import settle

            settle(node).join()  # as `lienthong serve` does before serving
        log(f"measuring {len(queries)} in-process $match calls")
        load_before = os.getloadavg()
        result["in_process"] = measure(node, queries, truth_of, args.cprofile, loaded_cccd)
        result["loadavg_during_measure"] = [round(x, 2) for x in (*load_before, *os.getloadavg())]
        if args.http_queries:
            log(f"measuring {min(args.http_queries, len(queries))} $match calls to `lienthong serve`")
            result["http"] = measure_http(url, queries[: args.http_queries], truth_of)
        result["machine"] = {"python": platform.python_version(), "platform": platform.platform(),
                             "cpus": os.cpu_count()}
        report(result)
        save(result)
        if args.keep:
            print(f"database kept at {url}; Ctrl-C to stop", file=sys.stderr)
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(3600)


def setup_database(args: argparse.Namespace, result: dict[str, Any], load: list[Any], is_pg: bool,
                   cleanup: contextlib.ExitStack) -> str:
    """Start a throw-away database (stopped/removed by `cleanup`), bulk-load `load` and ANALYZE it."""
    t = time.perf_counter()
    if is_pg:
        from lienthong.devtools.pgserver import PostgresServer

        pg = PostgresServer(settings={"shared_buffers": args.pg_shared_buffers} if args.pg_shared_buffers else None)
        pg.start()
        cleanup.callback(pg.stop)
        url = pg.create_database("mpi_bench")
        result["db_settings"] = "PostgreSQL (pgserver fast mode: fsync=off, synchronous_commit=off)"
    else:
        tmp = tempfile.mkdtemp(prefix="lienthong-mpi-bench-")
        cleanup.callback(shutil.rmtree, tmp, ignore_errors=True)
        url = f"sqlite:///{tmp}/mpi.db"
        result["db_settings"] = "SQLite WAL, synchronous=NORMAL"
    from lienthong.node import open_database

    open_database(url).engine.dispose()  # migrate once, before the loaders fork
    result["db_start_s"] = round(time.perf_counter() - t, 1)

    workers = max(1, args.workers) if is_pg else 1
    _LOAD[:] = load
    log(f"loading with {workers} process(es), transaction Bundles of {args.batch}, {args.index} index")
    load_s = bulk_load(url, args.batch, workers, args.index)
    result.update(load_s=round(load_s, 1), load_per_s=round(len(load) / load_s, 1), workers=workers,
                  index=args.index)
    result["analyze_s"] = round(analyze(url, is_pg), 1)
    result["setup_s"] = round(result["generate_s"] + result["db_start_s"] + load_s + result["analyze_s"], 1)
    log(f"load {load_s:.0f} s ({result['load_per_s']:,.0f}/s), analyze {result['analyze_s']} s")
    return url


def source_version() -> str:
    """The commit measured, and whether src/ had uncommitted changes (read before the loaders forked)."""
    import subprocess

    import lienthong

    imported = Path(lienthong.__file__).resolve().parents[1]
    if imported != ROOT / "src":
        return f"lienthong imported from {imported}"  # another checkout, e.g. the code before a change
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted src changes" if dirty else "")


def report(r: dict[str, Any]) -> None:
    ip = r["in_process"]
    print(f"\n## Patient/$match latency: {r['patients']:,} patients on {r['db']}, {ip['queries']} queries\n")
    print(f"Setup: generate {r['generate_s']} s, load {r['load_s']} s ({r['load_per_s']:,.0f} patients/s, "
          f"{r['workers']} process(es), Bundles of {r['batch']}, {r['index']} index), ANALYZE {r['analyze_s']} s; "
          f"total {r['setup_s']} s.\n")
    print("| path | p50 ms | p95 ms | p99 ms | max ms | mean ms | top-1 = true person |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    rows = [("in-process `identity.match`", ip["latency_ms"], ip["top1_true_person"]),
            ("  of which candidate SQL", ip["candidates_ms"], None),
            ("  of which scoring", ip["score_ms"], None),
            ("  of which the rest (fetch bodies, visibility, audit)", ip["rest_ms"], None)]
    if "http" in r:
        rows.append((f"HTTP POST /fhir/Patient/$match to `lienthong serve`, token auth ({r['http']['queries']} q)",
                     r["http"]["latency_ms"],
                     r["http"]["top1_true_person"]))
    for name, s, top in rows:
        print(f"| {name} | {s['p50']} | {s['p95']} | {s['p99']} | {s['max']} | {s['mean']} | "
              f"{'' if top is None else f'{top:.1%}'} |")
    c = ip["candidates"]
    verdict = "meets" if ip["latency_ms"]["p95"] <= TARGET_P95_MS else "MISSES"
    within = " / ".join(f"{v:.1%}" for v in ip["true_person_within_first"].values())
    print(f"\nCandidates per query (at most {r['max_candidates']} ranked, plus identifier hits): mean {c['mean']}, "
          f"p95 {c['p95']}, max {c['max']}, {c['capped_at_500']} queries reached 500. True person among "
          f"candidates: {ip['true_person_in_candidates']:.1%} (within the first 10/25/50/100: {within}); "
          f"top-1 certain (same CCCD) {ip['top1_certain']:.1%}; "
          f"queries whose person has a stored record with the same CCCD: {ip['same_cccd_queries']}, of which "
          f"graded certain: {ip['same_cccd_found_certain'] or 0:.1%}. Source: {r['source']}.")
    g = ip["gc_gen2_pauses"]
    print(f"Full (generation 2) garbage collections during the pass: {g['count']}, {g['total_ms']} ms in all, "
          f"longest {g['max_ms']} ms. Slowest queries: {ip['slowest']}.")
    if "shared_buffers" in r:
        print(f"PostgreSQL shared_buffers {r['shared_buffers']}"
              + (f", {r['prewarmed_pages']:,} pages prewarmed." if "prewarmed_pages" in r else ", not prewarmed."))
    print(f"Target p95 ≤ {TARGET_P95_MS:.0f} ms: {verdict} ({ip['latency_ms']['p95']} ms). Load average "
          f"(1/5/15 min) before/after the in-process pass: {r['loadavg_during_measure']} on {r['machine']['cpus']} CPUs.")


def save(r: dict[str, Any]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {}
    if RESULTS.exists():
        with contextlib.suppress(ValueError):
            data = json.loads(RESULTS.read_text(encoding="utf-8"))
    suffix = "" if r["index"] == "batched" else f"-{r['index']}-index"
    data.setdefault("runs", {})[f"{r['db']}-{r['patients']}{suffix}"] = r
    data["target_p95_ms"] = TARGET_P95_MS
    RESULTS.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    log(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
