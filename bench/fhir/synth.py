"""Setup for (c): N resources made of perturbed copies of the Synthea bundles, loaded in-process.

Each copy k of the 30 bundles is a new set of patients: the server gives every resource a fresh
id (all entries are POSTs with urn:uuid fullUrls), and the Patient gets new identifier values, a
new name drawn from a seeded pool and a birth date shifted by up to ~4 years. Copies are loaded
with the server's own storage layer (BundleProcessor over FhirService over open_database), in
several forked processes on PostgreSQL; this is setup, not a measurement.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing as mp
import queue
import random
import time
import uuid
from typing import Any

import orjson
from common import log

NS = uuid.UUID("6f0e8f1c-6d5a-4d0b-9a55-3c1f2b7d9e01")
SUFFIXES = ["", "", "", "son", "er", "ová", "ini", "escu", "sen", "ez"]
SYNTHEA_SYSTEM = "https://github.com/synthetichealth/synthea"


def name_pools(originals: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    fams, givens = set(), set()
    for b in originals:
        for e in b["entry"]:
            r = e["resource"]
            if r["resourceType"] == "Patient":
                for n in r.get("name", []):
                    if n.get("family"):
                        fams.add(n["family"].rstrip("0123456789"))
                    givens.update(g.rstrip("0123456789") for g in n.get("given", []))
    return sorted(fams), sorted(givens)


def bundle_stats(b: dict[str, Any]) -> dict[str, Any]:
    """Facts about an original bundle used to pick search targets that have data."""
    s: dict[str, Any] = {"height_2015": 0, "enc_2015": 0, "encounters": 0, "resources": len(b["entry"])}
    for e in b["entry"]:
        r = e["resource"]
        t = r["resourceType"]
        if t == "Observation":
            codes = [c.get("code") for c in r.get("code", {}).get("coding", [])]
            if "8302-2" in codes and r.get("effectiveDateTime", "") >= "2015":
                s["height_2015"] += 1
        elif t == "Encounter":
            s["encounters"] += 1
            if r.get("period", {}).get("start", "") >= "2015":
                s["enc_2015"] += 1
    return s


def _new_value(value: str, k: int) -> str:
    try:
        uuid.UUID(value)
        return str(uuid.uuid5(NS, f"{value}:{k}"))
    except ValueError:
        return f"{value}-{k}"


def perturb(raw: bytes, k: int, i: int, fams: list[str], givens: list[str],
            seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Copy k of bundle i; returns the bundle and a manifest record of its patient."""
    rng = random.Random(seed * 1_000_003 + k * 1000 + i)
    b = orjson.loads(raw)
    info: dict[str, Any] = {"copy": k, "bundle": i}
    for e in b["entry"]:
        r = e["resource"]
        if r["resourceType"] != "Patient":
            continue
        for ident in r.get("identifier", []):
            if "value" in ident:
                ident["value"] = _new_value(ident["value"], k)
            if ident.get("system") == SYNTHEA_SYSTEM:
                info["identifier"] = ident["value"]
        fam = rng.choice(fams) + rng.choice(SUFFIXES)
        given = rng.choice(givens)
        for n in r.get("name", []):
            if "family" in n:
                n["family"] = fam
            if "given" in n:
                n["given"] = [given]
        info["family"], info["given"] = fam, given
        if r.get("birthDate"):
            d = dt.date.fromisoformat(r["birthDate"][:10]) + dt.timedelta(days=rng.randint(-1500, 1500))
            r["birthDate"] = d.isoformat()
            info["birthDate"] = r["birthDate"]
    return b, info


def _load_worker(url: str, copies: list[int], raws: list[bytes], fams: list[str], givens: list[str], seed: int,
                 deadline: float, out: Any) -> None:
    try:
        from lienthong.interactions.bundles import BundleProcessor
        from lienthong.interactions.context import Context
        from lienthong.interactions.service import FhirService
        from lienthong.node import open_database

        db = open_database(url, upgrade=False)
        proc = BundleProcessor(FhirService(db))
        ctx = Context()
        for k in copies:
            if time.monotonic() > deadline:
                break
            infos, n = [], 0
            for i, raw in enumerate(raws):
                bundle, info = perturb(raw, k, i, fams, givens, seed)
                n += len(bundle["entry"])
                proc.process(ctx, bundle)
                infos.append(info)
            out.put(("copy", k, n, infos))
        db.engine.dispose()
        out.put(("done", None, 0, None))
    except BaseException as exc:
        out.put(("error", None, 0, repr(exc)))


def load_copies(url: str, raws: list[bytes], target_resources: int, workers: int, budget_s: float,
                seed: int = 7) -> dict[str, Any]:
    """Load ceil(target/len(samples)) copies, stopping (after whole copies) when the time budget runs out."""
    from lienthong.node import open_database

    originals = [orjson.loads(r) for r in raws]
    per_copy = sum(len(b["entry"]) for b in originals)
    n_copies = max(1, -(-target_resources // per_copy))
    fams, givens = name_pools(originals)
    stats = [bundle_stats(b) for b in originals]
    db = open_database(url)  # migrate once, before the workers start
    db.engine.dispose()
    t0 = time.monotonic()
    deadline = t0 + budget_s
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_load_worker,
                         args=(url, list(range(w, n_copies, workers)), raws, fams, givens, seed, deadline, out),
                         daemon=True) for w in range(workers)]
    for p in procs:
        p.start()
    manifest: list[dict[str, Any]] = []
    loaded = copies_done = 0
    running = workers
    last_log = 0.0
    errors = []
    try:
        while running:
            try:
                kind, _k, n, infos = out.get(timeout=budget_s + 900)
            except queue.Empty:
                raise RuntimeError("bulk load stalled") from None
            if kind == "copy":
                loaded += n
                copies_done += 1
                manifest.extend(infos)
                el = time.monotonic() - t0
                if el - last_log > 20 or copies_done == n_copies:
                    last_log = el
                    eta = (n_copies - copies_done) * el / copies_done
                    log(f"  setup: {copies_done}/{n_copies} copies, {loaded} resources, {loaded / el:.0f} res/s, "
                        f"ETA {eta:.0f}s")
            elif kind == "done":
                running -= 1
            else:
                errors.append(infos)
                running -= 1
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    if errors:
        raise RuntimeError(f"bulk load failed: {errors}")
    seconds = time.monotonic() - t0
    for m in manifest:
        m.update({f"orig_{key}": v for key, v in stats[m["bundle"]].items()})
    return {"requested": target_resources, "copies_requested": n_copies, "copies_loaded": copies_done,
            "resources": loaded, "seconds": seconds, "rps": loaded / seconds if seconds else 0.0,
            "workers": workers, "budget_s": budget_s, "truncated_by_budget": copies_done < n_copies,
            "manifest": manifest}
