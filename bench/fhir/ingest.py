"""(a) transaction-Bundle ingest over HTTP and (d-a) its physical limit: raw inserts of the same rows.

The raw-insert limit prepares, before any timing, exactly what the server would write for
each bundle (new ids, urn:uuid references rewritten, meta stamped, the stored JSON bytes, and
the index rows from `registry().extract`), then times only the inserts into a freshly migrated
empty schema with the same driver calls the repository uses: psycopg binary COPY ... FROM STDIN
with `write_row` on PostgreSQL, sqlite3 `executemany` on SQLite, one transaction per bundle.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
from common import FHIR_JSON, log


def load_samples(folder: Path) -> list[tuple[str, bytes, int]]:
    out = []
    for f in sorted(folder.glob("*.json")):
        raw = f.read_bytes()
        doc = orjson.loads(raw)
        if doc.get("resourceType") != "Bundle" or doc.get("type") != "transaction":
            continue
        out.append((f.name, raw, len(doc.get("entry", []))))
    return out


# ---- (a) HTTP ingest -----------------------------------------------------------------------


def post_bundles(base: str, bundles: list[tuple[str, bytes, int]], streams: int,
                 headers: dict[str, str] | None = None, timeout_s: float = 900.0) -> dict[str, Any]:
    """POST every bundle to {base}/fhir with `streams` concurrent client streams (a shared queue)."""
    import aiohttp

    results: list[dict[str, Any]] = []
    bodies: list[bytes] = []
    hdrs = {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON, **(headers or {})}

    async def main() -> float:
        conn = aiohttp.TCPConnector(limit=streams)
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with aiohttp.ClientSession(base, connector=conn, timeout=timeout) as session:
            next_idx = 0

            async def stream(sid: int) -> None:
                nonlocal next_idx
                while next_idx < len(bundles):
                    i = next_idx
                    next_idx += 1
                    name, raw, n = bundles[i]
                    t = time.perf_counter()
                    async with session.post("/fhir", data=raw, headers=hdrs) as r:
                        body = await r.read()
                    dt = time.perf_counter() - t
                    results.append({"bundle": name, "entries": n, "status": r.status, "seconds": dt, "stream": sid})
                    if r.status >= 300:
                        results[-1]["error"] = body[:600].decode("utf-8", "replace")
                    else:
                        bodies.append(body)

            t0 = time.perf_counter()
            await asyncio.gather(*(stream(s) for s in range(streams)))
            return time.perf_counter() - t0

    wall = asyncio.run(main())
    ok = [r for r in results if r["status"] < 300]
    n_ok = sum(r["entries"] for r in ok)
    paths: list[str] = []
    for body in bodies:  # parsed after the clock stopped
        for e in orjson.loads(body).get("entry", []):
            loc = (e.get("response") or {}).get("location", "")
            parts = loc.split("/")
            if len(parts) >= 2:
                paths.append(f"/fhir/{parts[0]}/{parts[1]}")
    lat = sorted(r["seconds"] for r in results)
    return {"streams": streams, "seconds": wall, "bundles": len(results), "bundles_ok": len(ok),
            "resources": n_ok, "rps": n_ok / wall if wall else 0.0,
            "bundle_latency_s": {"min": lat[0] if lat else None, "max": lat[-1] if lat else None},
            "errors": [r for r in results if r["status"] >= 300], "paths": paths}


# ---- (d-a) raw inserts ----------------------------------------------------------------------


def prepare_rows(bundles: list[tuple[str, bytes, int]], start_pk: int = 1) -> list[dict[str, Any]]:
    """What the server would write for each bundle, computed up front (not timed)."""
    from lienthong.fhir.datetimes import format_instant, now_us
    from lienthong.fhir.search_params import registry
    from lienthong.interactions.bundles import _rewrite_refs
    from lienthong.storage import schema

    reg = registry()
    now = now_us()
    now_text = format_instant(now)
    pk = start_pk
    out = []
    kinds = list(schema.INDEX_TABLES)
    for _name, raw, _n in bundles:
        doc = orjson.loads(raw)
        entries = doc.get("entry", [])
        mapping = {}
        for e in entries:
            rid = str(uuid.uuid4())
            e["_rid"] = rid
            if e.get("fullUrl"):
                mapping[e["fullUrl"]] = f"{e['resource']['resourceType']}/{rid}"
        res_rows, ver_rows = [], []
        idx_rows: dict[str, list[tuple[Any, ...]]] = {k: [] for k in kinds}
        for e in entries:
            res = _rewrite_refs(dict(e["resource"]), lambda ref, m=mapping: m.get(ref, ref))
            res.pop("id", None)
            meta = dict(res.get("meta") or {})
            meta["versionId"] = "1"
            meta["lastUpdated"] = now_text
            res["id"] = e["_rid"]
            res["meta"] = meta
            body = orjson.dumps(res)
            rows = reg.extract(res)
            rtype = res["resourceType"]
            res_rows.append((pk, rtype, e["_rid"], 1, now, False))
            ver_rows.append((pk, 1, rtype, now, "POST", False, body))
            for k in kinds:
                idx_rows[k].extend((pk, *row) for row in getattr(rows, k))
            pk += 1
        out.append({"resources": len(entries), "resource": res_rows, "resource_version": ver_rows,
                    "index": idx_rows})
    return out


def _tables() -> list[tuple[str, str, str]]:
    """(key, table, column list) in the order the repository writes them."""
    from lienthong.storage import schema

    t = [("resource", "resource", "res_pk, rtype, rid, version, last_updated, deleted"),
         ("resource_version", "resource_version", "res_pk, version, rtype, last_updated, method, deleted, body")]
    for kind, table in schema.INDEX_TABLES.items():
        t.append((kind, table.name, ", ".join(c.name for c in table.columns)))
    return t


def _rows(b: dict[str, Any], key: str) -> list[tuple[Any, ...]]:
    return b[key] if key in ("resource", "resource_version") else b["index"][key]


def _worker(kind: str, target: str, items: list[dict[str, Any]], go: Any, ready: Any, out: Any) -> None:
    try:
        tables = _tables()
        if kind == "postgresql":
            import psycopg

            from lienthong.storage.repository import copy_types

            conn = psycopg.connect(target)
            ready.put(1)
            go.wait()
            for b in items:
                with conn.cursor() as cur:
                    for key, table, cols in tables:
                        rows = _rows(b, key)
                        if not rows:
                            continue
                        with cur.copy(f"COPY {table} ({cols}) FROM STDIN (FORMAT BINARY)") as cp:
                            cp.set_types(copy_types(table, tuple(c.strip() for c in cols.split(","))))
                            for row in rows:
                                cp.write_row(row)
                conn.commit()
            out.put(("ok", time.perf_counter()))
            conn.close()
        else:
            import sqlite3

            conn = sqlite3.connect(target, isolation_level=None, timeout=60)
            for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON", "busy_timeout=60000"):
                conn.execute(f"PRAGMA {pragma}")
            ready.put(1)
            go.wait()
            for b in items:
                conn.execute("BEGIN IMMEDIATE")
                for key, table, cols in tables:
                    rows = _rows(b, key)
                    if rows:
                        marks = ", ".join("?" * len(cols.split(",")))
                        conn.executemany(f"INSERT INTO {table} ({cols}) VALUES ({marks})", rows)
                conn.execute("COMMIT")
            out.put(("ok", time.perf_counter()))
            conn.close()
    except BaseException as exc:  # report, never hang the parent
        with contextlib.suppress(Exception):
            ready.put(1)
        out.put(("error", repr(exc)))


def raw_insert(kind: str, target: str, prepared: list[dict[str, Any]], streams: int,
               timeout_s: float = 900.0) -> dict[str, Any]:
    """Time inserting `prepared` with `streams` processes (forked, so the rows are not copied)."""
    parts: list[list[dict[str, Any]]] = [[] for _ in range(streams)]
    loads = [0] * streams
    for b in prepared:  # keep bundle order inside each stream, balance resource counts
        i = loads.index(min(loads))
        parts[i].append(b)
        loads[i] += b["resources"]
    ctx = mp.get_context("fork")
    go, ready, out = ctx.Event(), ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(kind, target, p, go, ready, out), daemon=True) for p in parts]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            ready.get(timeout=60)
        t0 = time.perf_counter()
        go.set()
        ends = []
        for _ in procs:
            status, value = out.get(timeout=timeout_s)
            if status != "ok":
                raise RuntimeError(f"raw insert worker failed: {value}")
            ends.append(value)
        wall = max(ends) - t0
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    n = sum(b["resources"] for b in prepared)
    index_rows = sum(len(v) for b in prepared for v in b["index"].values())
    return {"streams": streams, "seconds": wall, "resources": n, "index_rows": index_rows,
            "rps": n / wall if wall else 0.0}


def log_ingest(res: dict[str, Any], label: str) -> None:
    log(f"  {label} streams={res['streams']}: {res['resources']} resources in {res['seconds']:.2f}s = "
        f"{res['rps']:.0f} res/s" + (f", {len(res['errors'])} failed bundles" if res.get("errors") else ""))
