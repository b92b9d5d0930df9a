"""FHIR server benchmark: ingest, read, search, each against its physical limit.

    python bench/fhir/run.py [--db sqlite|postgresql|both] [--quick] [--resources N] [--profile] [--auth both]

Per database (PostgreSQL: a throw-away cluster in a temp dir; SQLite: files in a temp dir), with the
server as a real `lienthong serve` subprocess (uvicorn) on 127.0.0.1 and a free port:

 (a)   ingest of the Synthea R4 transaction Bundles through POST /fhir, 1 and 2 client streams (`--streams`);
 (d-a) the same rows inserted raw (COPY / executemany) into an identical empty schema;
 (b)   read by id, 16 concurrent connections (wrk), random ids with a fixed seed, bounded duration;
 (d-b) Starlette+uvicorn serving the same bytes from memory (bench/fhir/memapp.py), same load;
 (c)   10 searches at N resources (perturbed copies bulk-loaded in-process: setup, timed apart).
With --auth both, (a) and (b) run against a server with authorisation and audit off (--insecure-dev) and one
with them on, interleaved in this one run, and the report gives the overhead as a ratio.

Markdown report on stdout, progress on stderr, JSON in bench/results/fhir.json.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

_VENV_PY = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "python"
if _VENV_PY.exists() and Path(sys.prefix).resolve() != _VENV_PY.parent.parent.resolve() \
        and not os.environ.get("LT_BENCH_NO_REEXEC"):
    os.environ["LT_BENCH_NO_REEXEC"] = "1"
    os.execv(str(_VENV_PY), [str(_VENV_PY), *sys.argv])  # noqa: S606 - re-run under the project venv

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import orjson  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    RESULTS,
    SAMPLES,
    Backend,
    Cleanup,
    PgBackend,
    ServerProcess,
    SqliteBackend,
    background_busy,
    cpu_times,
    cpu_util,
    git_commit,
    install_signal_handlers,
    log,
    src_hash,
    start_lienthong,
    start_memapp,
    system_cpu,
)

TARGET_INGEST_RPS = 2500
TARGET_INGEST_PCT = 50.0
TARGET_READ_PCT = 60.0
TARGET_SEARCH_P95_MS = 50.0


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    ap.add_argument("--quick", action="store_true", help="small N, 1 repetition, shorter runs")
    ap.add_argument("--resources", type=int, default=None, help="N for the search phase (default 1,000,000; "
                                                                "--quick: 50,000)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions of each ingest/raw/read config "
                                                           "(default 2; --quick: 1)")
    ap.add_argument("--read-reps", type=int, default=None, help="interleaved repetitions of each read run "
                                                                "(default: --reps)")
    ap.add_argument("--read-seconds", type=float, default=None, help="duration of each read run (10; --quick 5)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--client", choices=["auto", "wrk", "python"], default="auto",
                    help="load generator for reads (auto: wrk if installed)")
    ap.add_argument("--setup-budget-min", type=float, default=45.0,
                    help="stop loading copies (whole copies only) after this many minutes")
    ap.add_argument("--load-workers", type=int, default=None,
                    help="processes for the search-data load (PG: cpu count; SQLite: 1, it has one writer)")
    ap.add_argument("--search-iterations", type=int, default=None, help="runs per query (200; --quick 40)")
    ap.add_argument("--search-cap-s", type=float, default=None, help="time cap per query (40 s; --quick 10 s)")
    ap.add_argument("--auth", choices=["auto", "insecure", "token", "both"], default="auto",
                    help="auto: use a bearer token if the server demands one (its default mode); insecure: pass "
                         "--insecure-dev; token: always use a token; both: ingest and read with and without "
                         "authorisation and audit in this one run, interleaved, and report the overhead")
    ap.add_argument("--slow-ms", type=int, default=250,
                    help="PostgreSQL: log search statements slower than this, with auto_explain plans (0: off)")
    ap.add_argument("--skip-search", action="store_true")
    ap.add_argument("--streams", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2],
                    help="concurrent ingest streams, and forked raw-insert writers, to measure (default 1,2)")
    ap.add_argument("--server-workers", type=int, default=1,
                    help="worker processes of `lienthong serve` and of the in-memory reference (ingest, read)")
    ap.add_argument("--read-cache-mb", type=int, default=None,
                    help="the node's read cache (default: lienthong serve's; 0: off, every read asks the database)")
    ap.add_argument("--audit-journal", default=None,
                    help="the node's read-audit journal (default: lienthong serve's, a directory beside the data; "
                         "off: every batch of read records is committed to the database before its answers)")
    ap.add_argument("--profile", action="store_true", help="extra py-spy-sampled passes after the measured ones")
    ap.add_argument("--out", type=Path, default=RESULTS / "fhir.json")
    a = ap.parse_args()
    a.resources = a.resources if a.resources is not None else (50_000 if a.quick else 1_000_000)
    a.reps = a.reps if a.reps is not None else (1 if a.quick else 2)
    a.read_seconds = a.read_seconds if a.read_seconds is not None else (5.0 if a.quick else 10.0)
    a.search_iterations = a.search_iterations if a.search_iterations is not None else (40 if a.quick else 200)
    a.search_cap_s = a.search_cap_s if a.search_cap_s is not None else (10.0 if a.quick else 40.0)
    return a


class Phases:
    """Wall-clock time of every phase, for the report."""

    def __init__(self) -> None:
        self.items: list[tuple[str, float]] = []

    def run(self, name: str, fn: Any) -> Any:
        log(f"{name} ...")
        t = time.monotonic()
        try:
            return fn()
        finally:
            self.items.append((name, time.monotonic() - t))
            log(f"{name}: {time.monotonic() - t:.1f}s")


def server_errors(srv: ServerProcess, phase: str) -> list[dict[str, Any]]:
    """Tracebacks / error lines the server logged (uvicorn log_level=warning, so anything is notable)."""
    text = srv.log_text()
    out = []
    lines = text.splitlines()
    for i, ln in enumerate(lines):
        if "unexpected error on" in ln or ln.startswith("ERROR") or ln.startswith("Traceback"):
            out.append({"phase": phase, "server_log": "\n".join(lines[i : i + 25])[:2500]})
            if len(out) >= 5:
                break
    return out


def smallest(samples: list[tuple[str, bytes, int]]) -> tuple[str, bytes, int]:
    return min(samples, key=lambda s: s[2])


# ---- phases ------------------------------------------------------------------------------------


def auth_modes(args: argparse.Namespace) -> list[str]:
    """The server modes of this run: one, or both (authorisation and audit off, then on)."""
    return ["insecure", "token"] if args.auth == "both" else [args.auth]


def result_key(measure: str, mode: str, args: argparse.Namespace) -> str:
    """`ingest`/`read` hold the authenticated mode; with --auth both the other is `ingest_off`/`read_off`."""
    return f"{measure}_off" if args.auth == "both" and mode == "insecure" else measure


def phase_ingest(backend: Backend, kind: str, samples: list[Any], args: argparse.Namespace, work: Path,
                 cleanup: Cleanup, res: dict[str, Any]) -> ServerProcess:
    from ingest import log_ingest, post_bundles

    trials: dict[str, list[dict[str, Any]]] = {mode: [] for mode in auth_modes(args)}
    keep: dict[str, ServerProcess] = {}
    # Interleaved (rep, streams, mode): with --auth both, machine noise hits both modes alike.
    configs = [(rep, s, mode) for rep in range(args.reps) for s in args.streams for mode in trials]
    for n, (rep, streams, mode) in enumerate(configs):
        dbname = f"ingest_s{streams}_r{rep}" + ("_off" if mode == "insecure" and len(trials) > 1 else "")
        url = backend.new_url(dbname)
        srv = start_lienthong(url, work, cleanup, name=f"lienthong-{kind}-{dbname}", auth=mode,
                              workers=args.server_workers, read_cache_mb=args.read_cache_mb,
                              audit_journal=args.audit_journal)
        res.setdefault("auth_modes", {})[mode] = srv.auth
        res["auth"] = srv.auth
        res.setdefault("src_versions", []).append([srv.name, srv.src_hash])
        warm = post_bundles(srv.base, [smallest(samples)], 1, srv.headers)  # first-request costs, not counted
        if warm["errors"]:
            res["anomalies"].append({"phase": "ingest warm-up", **warm["errors"][0]})
        bg = background_busy()
        c0, s0 = cpu_times(srv.pid), system_cpu()
        r = post_bundles(srv.base, samples, streams, srv.headers)
        r["background_busy"] = bg
        r["server_cpu_cores"] = (cpu_times(srv.pid) - c0) / r["seconds"]
        r["machine_busy"] = cpu_util(s0, system_cpu())
        r["rep"] = rep
        r["auth"] = mode
        log_ingest(r, f"ingest ({mode})")
        for e in r["errors"]:
            res["anomalies"].append({"phase": f"ingest streams={streams}", "request": f"POST /fhir ({e['bundle']})",
                                     "status": e["status"], "body": e.get("error", "")})
        res["anomalies"].extend(server_errors(srv, f"ingest streams={streams}"))
        trials[mode].append(r)
        if n >= len(configs) - len(trials):  # the last server of each mode stays up for the read phase
            keep[mode] = srv
            res.setdefault("read_db_urls", {})[mode] = url
        else:
            srv.stop()
            backend.drop(dbname)  # type: ignore[attr-defined]
    for mode, mode_trials in trials.items():
        best = max(mode_trials, key=lambda t: t["rps"])
        res["read_paths"] = mode_trials[-1]["paths"]  # ids differ per database: each server reads its own
        res.setdefault("read_paths_by_mode", {})[mode] = mode_trials[-1]["paths"]
        res[result_key("ingest", mode, args)] = {
            "trials": [{k: v for k, v in t.items() if k != "paths"} for t in mode_trials],
            "best": {k: v for k, v in best.items() if k != "paths"},
            "bundles": len(samples), "resources_per_pass": sum(s[2] for s in samples),
            "warmup": f"1 bundle ({smallest(samples)[0]}, {smallest(samples)[2]} entries) posted "
                      "before timing on each fresh server"}
    return keep


def phase_raw(backend: Backend, kind: str, samples: list[Any], args: argparse.Namespace,
              res: dict[str, Any]) -> None:
    from ingest import log_ingest, prepare_rows, raw_insert

    from lienthong.node import open_database

    t = time.monotonic()
    prepared = prepare_rows(samples)
    prep_s = time.monotonic() - t
    log(f"  prepared rows (not timed): {prep_s:.1f}s")
    trials = []
    for rep in range(args.reps):
        for streams in args.streams:
            dbname = f"raw_s{streams}_r{rep}"
            url = backend.new_url(dbname)
            db = open_database(url)  # identical schema: the same migrations
            db.engine.dispose()
            target = backend.conninfo(dbname) if kind == "postgresql" else str(backend.path(dbname))  # type: ignore[attr-defined]
            bg = background_busy()
            r = raw_insert(kind, target, prepared, streams)
            r["background_busy"] = bg
            r["rep"] = rep
            log_ingest(r, "raw insert")
            trials.append(r)
            backend.drop(dbname)  # type: ignore[attr-defined]
    best = max(trials, key=lambda t: t["rps"])
    res["raw_insert"] = {"trials": trials, "best": best, "prepare_seconds": prep_s,
                         "method": "psycopg binary COPY FROM STDIN + write_row" if kind == "postgresql"
                         else "sqlite3 executemany", "transaction": "one per bundle"}


def export_memdata(url: str, out: Path) -> int:
    from sqlalchemy import select

    from lienthong.fhir.datetimes import format_http_date
    from lienthong.storage import schema
    from lienthong.storage.engine import make_engine

    r, v = schema.resource, schema.resource_version
    eng = make_engine(url)
    data = {}
    with eng.connect() as conn:
        rows = conn.execute(select(r.c.rtype, r.c.rid, r.c.version, r.c.last_updated, v.c.body)
                            .join(v, (v.c.res_pk == r.c.res_pk) & (v.c.version == r.c.version))
                            .where(r.c.deleted.is_(False)))
        for rtype, rid, version, lu, body in rows:
            data[f"{rtype}/{rid}"] = {"body": bytes(body).decode(), "etag": f'W/"{version}"',
                                                 "modified": format_http_date(lu)}
    eng.dispose()
    out.write_bytes(orjson.dumps(data))
    return len(data)


def phase_read(servers: dict[str, ServerProcess], args: argparse.Namespace, work: Path, cleanup: Cleanup,
               res: dict[str, Any]) -> None:
    from loadgen import run_load, sweep_errors

    paths = res["read_paths"]
    memfile = work / "memdata.json"
    n = export_memdata(res["read_db_urls"][auth_modes(args)[-1]], memfile)
    log(f"  {len(paths)} read paths, {n} resources exported for the in-memory app")
    mem = start_memapp(memfile, work, cleanup, workers=args.server_workers)
    targets = [*((result_key("read", mode, args), srv) for mode, srv in servers.items()), ("memapp", mem)]
    paths_of = {result_key("read", mode, args): res["read_paths_by_mode"][mode] for mode in servers}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in targets}
    try:
        for _ in range(args.read_reps or args.reps):  # interleaved, so machine noise hits every server alike
            for name, s in targets:
                bg = background_busy()
                c0 = cpu_times(s.pid)
                r = run_load(s.base, paths_of.get(name, paths), args.concurrency, args.read_seconds,
                             tool=args.client, headers=s.headers)
                r["server_cpu_cores"] = (cpu_times(s.pid) - c0) / max(r["seconds"], 1e-9)
                r["background_busy"] = bg
                runs[name].append(r)
        for name, s in targets[:-1]:
            if any(r["non_2xx"] for r in runs[name]):
                for bad in sweep_errors(s.base, paths_of[name], s.headers):
                    res["anomalies"].append({"phase": name, **bad})
        if any(r["non_2xx"] for r in runs["memapp"]):
            res["anomalies"].append({"phase": "read limit", "body": "memapp answered non-2xx (path mismatch?)"})
    finally:
        mem.stop()
    for name, _ in targets[:-1]:
        res[name] = {"runs": runs[name], "best": max(runs[name], key=lambda r: r["rps"]), "paths": len(paths)}
    res["read_limit"] = {"runs": runs["memapp"], "best": max(runs["memapp"], key=lambda r: r["rps"])}
    for name, s in targets[:-1]:
        res["anomalies"].extend(server_errors(s, name))


def phase_search(backend: Backend, kind: str, samples: list[Any], args: argparse.Namespace, work: Path,
                 cleanup: Cleanup, res: dict[str, Any], phases: Phases) -> ServerProcess:
    from loadgen import run_load
    from search import build_mix, code_targets, pick_patients, run_mix
    from synth import load_copies

    url = backend.new_url("search")
    workers = args.load_workers or (1 if kind == "sqlite" else max(1, os.cpu_count() or 1))
    raws = [s[1] for s in samples]
    setup = phases.run(f"[{kind}] (c) setup: load {args.resources:,} resources",
                       lambda: load_copies(url, raws, args.resources, workers, args.setup_budget_min * 60))
    manifest = setup.pop("manifest")
    t = time.monotonic()
    size = None
    if kind == "postgresql":
        import psycopg

        with psycopg.connect(backend.conninfo("search"), autocommit=True) as conn:  # type: ignore[attr-defined]
            conn.execute("ANALYZE")
            size = conn.execute("SELECT pg_database_size('search')").fetchone()[0]  # type: ignore[index]
    else:
        p = backend.path("search")  # type: ignore[attr-defined]
        size = sum(os.path.getsize(str(p) + s) for s in ("", "-wal") if os.path.exists(str(p) + s))
    setup["analyze_seconds"] = time.monotonic() - t
    setup["analyze"] = "ANALYZE (whole database)" if kind == "postgresql" else "none (the server never runs it)"
    setup["db_bytes"] = size
    log(f"  setup done: {setup['resources']} resources in {setup['seconds']:.0f}s ({setup['rps']:.0f} res/s); "
        f"analyze {setup['analyze_seconds']:.1f}s; db {size / 1e9:.2f} GB")
    res["search_setup"] = setup
    srv = start_lienthong(url, work, cleanup, name=f"lienthong-{kind}-search", auth=auth_modes(args)[-1],
                          read_cache_mb=args.read_cache_mb, audit_journal=args.audit_journal)
    rng = random.Random(20261127)
    originals = [orjson.loads(r) for r in raws]
    res.setdefault("src_versions", []).append([srv.name, srv.src_hash])
    patients = pick_patients(srv.base, manifest, 20, rng, srv.headers)
    codes = code_targets(originals, rng)
    mix = build_mix(patients, codes)
    res["search_targets"] = {"patients": [{k: p[k] for k in ("id", "identifier", "family", "birthDate", "copy")}
                                          for p in patients], **codes}
    log_at = 0
    if kind == "postgresql" and args.slow_ms > 0:
        log_at = backend.log_offset()  # type: ignore[attr-defined]
    bg = background_busy(2.0)
    out = phases.run(f"[{kind}] (c) search mix", lambda: run_mix(srv.base, mix, args.search_iterations,
                                                                  args.search_cap_s, headers=srv.headers))
    res["search"] = {"resources": setup["resources"], "iterations": args.search_iterations, "background_busy": bg,
                     "cap_s": args.search_cap_s, **{k: v for k, v in out.items() if k != "anomalies"}}
    for a in out["anomalies"]:
        res["anomalies"].append({"phase": "search", **a})
    requests = out.pop("requests")
    by_q: dict[str, list[list[Any]]] = {}
    for q, rnd, path, ms, status in requests:
        by_q.setdefault(q, []).append([rnd, path, ms, status])
    res["search_requests"] = by_q  # every timed request, for per-target analysis
    if kind == "postgresql" and args.slow_ms > 0:
        text = backend.log_since(log_at)  # type: ignore[attr-defined]
        res["search_slow_log"] = summarise_slow_log(text, args.slow_ms, kind, args.out)
    res["_mix"] = mix

    def read_at_n() -> None:  # bonus: read-by-id on the big database
        from sqlalchemy import text

        from lienthong.storage.engine import make_engine

        eng = make_engine(url)
        with eng.connect() as conn:
            total = conn.execute(text("SELECT max(res_pk) FROM resource")).scalar_one() or 1
            step = max(1, int(total) // 20000)
            rows = conn.execute(text(f"SELECT rtype, rid FROM resource WHERE res_pk % {step} = 0")).all()
        eng.dispose()
        paths = [f"/fhir/{t}/{i}" for t, i in rows]
        r = run_load(srv.base, paths, args.concurrency, args.read_seconds, tool=args.client, headers=srv.headers)
        r["paths"] = len(paths)
        res["read_at_n"] = r

    phases.run(f"[{kind}] (b') read by id at N", read_at_n)
    res["anomalies"].extend(server_errors(srv, "search"))
    return srv


def summarise_slow_log(text: str, min_ms: int, kind: str, out: Path) -> dict[str, Any]:
    """Keep the PostgreSQL slow-statement log of the search phase, and list its slowest entries."""
    import re

    path = out.parent / f"{out.stem}-{kind}-slow-search.log"
    path.write_text(text)
    entries = []
    blocks = re.split(r"\n(?=\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", text)
    for b in blocks:
        m = re.search(r"duration: ([\d.]+) ms", b)
        if m:
            entries.append((float(m.group(1)), b.strip()))
    entries.sort(key=lambda e: -e[0])
    plans = [b for _, b in entries if "plan:" in b]
    stmts = [b for _, b in entries if "plan:" not in b]
    return {"file": str(path), "threshold_ms": min_ms, "statements": len(stmts), "plans": len(plans),
            "slowest_statements": [s[:1500] for s in stmts[:3]], "slowest_plans": [p[:4000] for p in plans[:3]]}


def phase_profile(kind: str, backend: Backend, samples: list[Any], read_srv: ServerProcess,
                  search_srv: ServerProcess | None, args: argparse.Namespace, work: Path, cleanup: Cleanup,
                  res: dict[str, Any]) -> None:
    from ingest import post_bundles
    from loadgen import run_load
    from profiling import profile_phase
    from search import run_mix

    pdir = RESULTS / "profiles"
    prof: dict[str, Any] = {}
    url = backend.new_url("profile_ingest")
    srv = start_lienthong(url, work, cleanup, name=f"lienthong-{kind}-profile", auth=auth_modes(args)[-1],
                          read_cache_mb=args.read_cache_mb, audit_journal=args.audit_journal)
    post_bundles(srv.base, [smallest(samples)], 1, srv.headers)
    prof["ingest"] = profile_phase(srv.pid, pdir / f"{kind}-ingest.txt",
                                   lambda: post_bundles(srv.base, samples, 1, srv.headers))
    srv.stop()
    prof["read"] = profile_phase(read_srv.pid, pdir / f"{kind}-read.txt",
                                 lambda: run_load(read_srv.base, res["read_paths"], args.concurrency,
                                                  args.read_seconds, warmup=0, tool=args.client,
                                                  headers=read_srv.headers))
    if search_srv is not None and res.get("_mix"):
        mix = res["_mix"]
        prof["search"] = profile_phase(search_srv.pid, pdir / f"{kind}-search.txt",
                                       lambda: run_mix(search_srv.base, mix, 10, 10.0, warmup=0,
                                                       headers=search_srv.headers))
    res["profile"] = prof


def run_db(kind: str, samples: list[Any], args: argparse.Namespace, phases: Phases) -> dict[str, Any]:
    cleanup = Cleanup()
    res: dict[str, Any] = {"db": kind, "anomalies": []}
    try:
        backend: Backend = phases.run(f"[{kind}] start database",
                                      lambda: PgBackend(cleanup) if kind == "postgresql" else SqliteBackend(cleanup))
        if kind == "postgresql" and args.slow_ms > 0:
            backend.enable_slow_log(args.slow_ms)  # type: ignore[attr-defined]
        res["db_settings"] = backend.settings  # type: ignore[attr-defined]
        work = Path(tempfile.mkdtemp(prefix=f"lienthong-bench-{kind}-"))  # server logs, in-memory app data
        cleanup.push("work dir", lambda: shutil.rmtree(work, ignore_errors=True))
        read_servers = phases.run(f"[{kind}] (a) ingest over HTTP",
                                  lambda: phase_ingest(backend, kind, samples, args, work, cleanup, res))
        read_srv = read_servers[auth_modes(args)[-1]]
        phases.run(f"[{kind}] (b)+(d-b) read and in-memory limit",
                   lambda: phase_read(read_servers, args, work, cleanup, res))
        phases.run(f"[{kind}] (d-a) raw-insert limit", lambda: phase_raw(backend, kind, samples, args, res))
        search_srv = None
        if not args.skip_search:
            search_srv = phase_search(backend, kind, samples, args, work, cleanup, res, phases)
        if args.profile:
            phases.run(f"[{kind}] profiling passes (py-spy)",
                       lambda: phase_profile(kind, backend, samples, read_srv, search_srv, args, work, cleanup, res))
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        import traceback

        log(f"[{kind}] FAILED: {exc!r}")
        res["failed"] = f"{exc!r}\n{traceback.format_exc()[-3000:]}"
    finally:
        phases.run(f"[{kind}] cleanup", cleanup.run)
    res.pop("_mix", None)
    res.pop("read_paths", None)
    res.pop("read_paths_by_mode", None)
    return res


# ---- report -------------------------------------------------------------------------------------


def f0(x: Any) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.0f}"


def f1(x: Any) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.1f}"


def f2(x: Any) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.2f}"


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**not met**")


def overhead_report(r: dict[str, Any]) -> list[str]:
    """Authorisation and audit overhead: the same measure with both off and on, in this one run."""
    L = ["### Authorisation and audit overhead (same run, interleaved)\n",
         f"On: {r.get('auth_modes', {}).get('token', '?')}. Off: `--insecure-dev`.\n",
         "| measure | off | on | on/off | overhead | paired on/off per rep | overhead, mean of the pairs | "
         "reference in this run |",
         "|---|---|---|---|---|---|---|---|"]
    for measure, unit, ref in (("ingest", "res/s", r.get("raw_insert")), ("read", "req/s", r.get("read_limit"))):
        off, on = r.get(f"{measure}_off"), r.get(measure)
        if not off or not on:
            continue
        key = (lambda t: (t["rep"], t["streams"])) if measure == "ingest" else None
        offs = {key(t) if key else i: t["rps"] for i, t in enumerate(off.get("trials", off.get("runs", [])))}
        ons = {key(t) if key else i: t["rps"] for i, t in enumerate(on.get("trials", on.get("runs", [])))}
        pairs = [ons[k] / offs[k] for k in offs if k in ons and offs[k]]
        paired = ", ".join(f"{p:.2f}" for p in pairs)
        # Interleaved pairs meet the same machine noise, so their mean is steadier than the best of each mode,
        # which a single lucky run moves.
        pair_mean = f"{f1(100 * (1 - sum(pairs) / len(pairs)))} %" if pairs else "n/a"
        ratio = on["best"]["rps"] / off["best"]["rps"]
        ref_text = f"{f0(ref['best']['rps'])} {unit}" if ref else "n/a"
        L.append(f"| {measure} (best of each) | {f0(off['best']['rps'])} {unit} | {f0(on['best']['rps'])} {unit} | "
                 f"{ratio:.3f} | **{f1(100 * (1 - ratio))} %** | {paired} | {pair_mean} | {ref_text} |")
    L.append("")
    return L


def _cache_note(mb: int | None) -> str:
    if mb is None:
        return "the default, warmed by the ingest it follows (new resources are written through)"
    return "off" if mb == 0 else f"{mb} MiB"


def report(meta: dict[str, Any], results: list[dict[str, Any]], phases: Phases) -> str:
    L: list[str] = []
    L.append("# lienthong FHIR benchmark\n")
    L.append(f"- command: `{meta['command']}`")
    L.append(f"- cores (os.cpu_count()): {meta['cpu_count']}; machine: {meta['machine']}")
    L.append(f"- git commit: {meta['git_commit']}; src/ content hash at start: {meta['src_hash_at_start']}")
    L.append(f"- date: {meta['date']}")
    workers = meta["args"].get("server_workers", 1)
    L.append(f"- server: `lienthong serve` subprocess (uvicorn, {workers} worker process(es); the in-memory "
             f"reference runs as many; read cache: {_cache_note(meta['args'].get('read_cache_mb'))}; read-audit "
             f"journal: {meta['args'].get('audit_journal') or 'the default (on)'}) on 127.0.0.1; "
             "read load: "
             f"{meta['read_client']}; ingest/search client: aiohttp/httpx (Python)")
    L.append("- 'background load' = machine-wide CPU busy (of all cores) in the 1 s before a run while the "
             "harness was idle, i.e. other work on this shared box; 'machine busy during' includes ours")
    L.append(f"- data: {meta['samples']} ({meta['bundles']} transaction Bundles, {meta['resources_per_pass']:,} "
             "resources)\n")
    targets = []
    for r in results:
        kind = r["db"]
        L.append(f"## {kind}\n")
        L.append(f"Settings: {r.get('db_settings', '?')}. Server auth: {r.get('auth', '?')}.\n")
        versions = sorted({h for _, h in r.get("src_versions", [])})
        if len(versions) > 1:
            L.append(f"**Warning: src/ changed during this run** ({len(versions)} versions of the server code were "
                     "started: " + ", ".join(f"{n}={h}" for n, h in r["src_versions"]) + "); compare phases with "
                     "care.\n")
        if r.get("failed"):
            L.append(f"**FAILED**: ```{r['failed'][:1500]}```\n")
        ing, raw = r.get("ingest"), r.get("raw_insert")
        if ing:
            L.append("### (a) ingest vs (d-a) raw-insert limit\n")
            L.append("| run | streams | resources | seconds | res/s | server CPU (cores) | machine busy during "
                     "| background load before |")
            L.append("|---|---|---|---|---|---|---|---|")
            for t in [*r.get("ingest_off", {}).get("trials", []), *ing["trials"]]:
                label = " (auth off)" if "ingest_off" in r and t.get("auth") == "insecure" else ""
                L.append(f"| ingest{label} rep {t['rep']} | {t['streams']} | {t['resources']:,} | {f2(t['seconds'])} | "
                         f"{f0(t['rps'])} | {f2(t['server_cpu_cores'])} | {f0(100 * t['machine_busy'])} % | "
                         f"{f0(100 * t['background_busy'])} % |")
            for t in (raw or {}).get("trials", []):
                L.append(f"| raw insert rep {t['rep']} | {t['streams']} | {t['resources']:,} | {f2(t['seconds'])} | "
                         f"{f0(t['rps'])} | - | - | {f0(100 * t['background_busy'])} % |")
            b = ing["best"]
            line = f"\nBest ingest: **{f0(b['rps'])} res/s** with {b['streams']} stream(s)"
            pct = None
            if raw:
                rb = raw["best"]
                pct = 100.0 * b["rps"] / rb["rps"]
                line += (f"; raw-insert limit ({raw['method']}, {raw['transaction']}; "
                         f"{rb['index_rows']:,} index rows): **{f0(rb['rps'])} res/s** with {rb['streams']} "
                         f"stream(s); ingest = **{f1(pct)} %** of the limit.")
            L.append(line + f" ({ing['warmup']}.)\n")
            if kind == "postgresql":
                targets.append((f"{kind}: ingest ≥ {TARGET_INGEST_RPS:,} res/s", f0(b["rps"]) + " res/s",
                                b["rps"] >= TARGET_INGEST_RPS))
                targets.append((f"{kind}: ingest ≥ {TARGET_INGEST_PCT:.0f} % of raw insert",
                                f1(pct) + " %" if pct is not None else "n/a",
                                None if pct is None else pct >= TARGET_INGEST_PCT))
        rd, rl = r.get("read"), r.get("read_limit")
        if rd and rl:
            L.append(f"### (b) read by id vs (d-b) in-memory Starlette limit ({rd['best']['concurrency']} "
                     f"connections, {f0(rd['best']['seconds'])} s runs, {rd['paths']:,} ids)\n")
            L.append("| server | run | req/s | p50 ms | p95 ms | p99 ms | non-2xx | server CPU (cores) "
                     "| background load before |")
            L.append("|---|---|---|---|---|---|---|---|---|")
            blocks = [("lienthong (auth off)", r["read_off"])] if "read_off" in r else []
            for name, blk in (*blocks, ("lienthong", rd), ("in-memory app", rl)):
                for i, x in enumerate(blk["runs"]):
                    L.append(f"| {name} | {i} | {f0(x['rps'])} | {f2(x['p50_ms'])} | {f2(x['p95_ms'])} | "
                             f"{f2(x['p99_ms'])} | {x['non_2xx']} | {f2(x['server_cpu_cores'])} | "
                             f"{f0(100 * x['background_busy'])} % |")
            pct = 100.0 * rd["best"]["rps"] / rl["best"]["rps"]
            L.append(f"\nBest read: **{f0(rd['best']['rps'])} req/s** (p50 {f2(rd['best']['p50_ms'])} ms, "
                     f"p95 {f2(rd['best']['p95_ms'])} ms); limit **{f0(rl['best']['rps'])} req/s**; "
                     f"read = **{f1(pct)} %** of the limit.\n")
            targets.append((f"{kind}: read ≥ {TARGET_READ_PCT:.0f} % of framework limit", f1(pct) + " %",
                            pct >= TARGET_READ_PCT))
        if "ingest_off" in r or "read_off" in r:
            L.extend(overhead_report(r))
        ss, se = r.get("search_setup"), r.get("search")
        if ss:
            L.append(f"### (c) search at N = {ss['resources']:,} resources\n")
            trunc = (" — **stopped early by the setup budget**, N is what fitted"
                     if ss["truncated_by_budget"] else "")
            L.append(f"Setup (not a measurement): {ss['copies_loaded']} copies of the bundles, "
                     f"{ss['resources']:,} resources in {f0(ss['seconds'])} s ({f0(ss['rps'])} res/s, "
                     f"{ss['workers']} process(es), in-process BundleProcessor){trunc}; {ss['analyze']} "
                     f"{f1(ss['analyze_seconds'])} s; database size {f2((ss['db_bytes'] or 0) / 1e9)} GB.\n")
        if se:
            L.append(f"Each query ran up to {se['iterations']} times (time cap {f0(se['cap_s'])} s per query), "
                     "concurrency 1, interleaved rounds, targets cycled; background load before: "
                     f"{f0(100 * se['background_busy'])} % of the machine.\n")
            L.append("| query | runs | p50 ms | p95 ms | max ms | matches/page | includes | ≤ 50 ms p95 |")
            L.append("|---|---|---|---|---|---|---|---|")
            for name, q in se["queries"].items():
                ok = q["p95_ms"] <= TARGET_SEARCH_P95_MS
                L.append(f"| {name}: `{q['description']}` | {q['runs']} | {f2(q['p50_ms'])} | {f2(q['p95_ms'])} | "
                         f"{f1(q['max_ms'])} | {f1(q['mean_matches'])}"
                         f"{' (+more pages)' if q['targets_with_more_pages'] else ''} | {f1(q['mean_includes'])} | "
                         f"{'yes' if ok else '**no**'} |")
            o = se["overall"]
            L.append(f"| **overall** | {o['runs']} | {f2(o['p50_ms'])} | {f2(o['p95_ms'])} | | | | "
                     f"{'yes' if o['p95_ms'] <= TARGET_SEARCH_P95_MS else '**no**'} |\n")
            worst = max(se["queries"].items(), key=lambda kv: kv[1]["p95_ms"])
            at_1m = se["resources"] >= 1_000_000
            where = " at 1M" if at_1m else " (at N={:,}, not 1M)".format(se["resources"])
            targets.append((f"{kind}: search p95 ≤ {TARGET_SEARCH_P95_MS:.0f} ms{where}",
                            f"overall {f1(o['p95_ms'])} ms; worst {worst[0]} {f1(worst[1]['p95_ms'])} ms",
                            # latency only grows with N: a miss below 1M is a miss at 1M
                            (lambda ok: ok if at_1m or not ok else None)(
                                all(q["p95_ms"] <= TARGET_SEARCH_P95_MS for q in se["queries"].values()))))
        sl = r.get("search_slow_log")
        if sl:
            L.append(f"PostgreSQL slow-statement log during the search mix (≥ {sl['threshold_ms']} ms): "
                     f"{sl['statements']} statements, {sl['plans']} plans, kept in `{sl['file']}`.")
            if sl["slowest_plans"]:
                L.append("Slowest plan (auto_explain, estimates only):\n")
                L.append("```\n" + sl["slowest_plans"][0][:3000] + "\n```\n")
            if sl["slowest_statements"]:
                L.append("Slowest statement with its parameters:\n")
                L.append("```\n" + sl["slowest_statements"][0][:1500] + "\n```\n")
        sr = r.get("search_requests")
        if sr and se:
            slow = []
            for q, reqs in sr.items():
                if se["queries"][q]["p95_ms"] > TARGET_SEARCH_P95_MS:
                    worst = max(reqs, key=lambda x: x[2])
                    slow.append(f"`{q}` slowest GET {worst[1]} took {f0(worst[2])} ms (round {worst[0]})")
            if slow:
                L.append("Slowest request of each query over target: " + "; ".join(slow) + "\n")
        ra = r.get("read_at_n")
        if ra:
            L.append(f"Read by id on the N-resource database ({ra['paths']:,} ids, same load): "
                     f"{f0(ra['rps'])} req/s, p50 {f2(ra['p50_ms'])} ms, p95 {f2(ra['p95_ms'])} ms, "
                     f"non-2xx {ra['non_2xx']}.\n")
        if r.get("profile"):
            L.append("### Where the server spent its time (py-spy, extra passes, % of samples)\n")
            for phase, p in r["profile"].items():
                if not p.get("samples"):
                    continue
                L.append(f"**{phase}** ({p['samples']} samples at 97 Hz over all threads; {p['idle_samples']} in "
                         f"parked pool threads dropped; % of the other {p['busy_samples']}; `{p.get('file', '')}`)\n")
                L.append("| self (leaf) | % | inclusive, lienthong frames | % |")
                L.append("|---|---|---|---|")
                a, b2 = p["self"][:12], p["inclusive_lienthong"][:12]
                for i in range(max(len(a), len(b2))):
                    x = a[i] if i < len(a) else ("", "")
                    y = b2[i] if i < len(b2) else ("", "")
                    L.append(f"| `{x[0]}` | {x[1]} | `{y[0]}` | {y[1]} |")
                L.append("")
                L.append("Notes: " + "; ".join(f"`{k}` = {v}" for k, v in p["notes"].items()) + "\n")
                L.append("Files (inclusive): " + ", ".join(f"`{k}` {v} %" for k, v in p["inclusive_files"][:12])
                         + "\n")
        L.append("### Anomalies\n")
        if r["anomalies"]:
            for a in r["anomalies"][:30]:
                L.append(f"- {a.get('phase', '')}: {a.get('request', '')} → {a.get('status', '')} "
                         f"{str(a.get('body', a.get('server_log', '')))[:600]!r}")
        else:
            L.append("- none: no status ≥ 500, no failed request, nothing in the server logs")
        L.append("")
    L.append("## Targets\n")
    L.append("| target | measured | verdict |")
    L.append("|---|---|---|")
    for name, val, ok in targets:
        L.append(f"| {name} | {val} | {verdict(ok)} |")
    L.append("\n## Phase durations\n")
    L.append("| phase | seconds |")
    L.append("|---|---|")
    for name, s in phases.items:
        L.append(f"| {name} | {f1(s)} |")
    return "\n".join(L) + "\n"


def main() -> int:
    args = parse_args()
    install_signal_handlers()
    if not SAMPLES.is_dir() or not any(SAMPLES.glob("*.json")):
        print(f"error: Synthea samples not found at {SAMPLES} (expected the 30 Synthea R4 transaction "
              "Bundles in shared/samples/synthea-r4 beside the repository)", file=sys.stderr)
        return 2
    from ingest import load_samples
    from loadgen import have_wrk

    samples = load_samples(SAMPLES)
    if not samples:
        print(f"error: no transaction Bundles in {SAMPLES}", file=sys.stderr)
        return 2
    if args.client == "wrk" and not have_wrk():
        print("error: wrk not installed (apt-get install -y wrk) — or use --client python", file=sys.stderr)
        return 2
    if args.auth in ("insecure", "both"):
        from common import serve_supports

        if not serve_supports("--insecure-dev"):
            print("error: this `lienthong serve` has no --insecure-dev option; use --auth auto", file=sys.stderr)
            return 2
    use_wrk = args.client == "wrk" or (args.client == "auto" and have_wrk())
    meta = {
        "command": "python bench/fhir/run.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "cpu_count": os.cpu_count(), "machine": f"{platform.system()} {platform.machine()}, "
                                                f"Python {platform.python_version()}",
        "git_commit": git_commit(), "src_hash_at_start": src_hash(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "read_client": "wrk -t1 (C; Lua picks ids with a fixed seed)" if use_wrk else "aiohttp (Python fallback)",
        "samples": str(SAMPLES), "bundles": len(samples), "resources_per_pass": sum(s[2] for s in samples),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    phases = Phases()
    kinds = ["postgresql", "sqlite"] if args.db == "both" else [args.db]
    results = []
    t0 = time.monotonic()
    try:
        for kind in kinds:
            results.append(run_db(kind, samples, args, phases))
    except KeyboardInterrupt:
        log("interrupted; servers and temp dirs were cleaned up")
        return 130
    meta["total_seconds"] = time.monotonic() - t0
    text = report(meta, results, phases)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "phases": phases.items, "results": results}
    args.out.write_text(json.dumps(payload, indent=2, default=str))
    args.out.with_suffix(".md").write_text(text)
    log(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 1 if any(r.get("failed") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
