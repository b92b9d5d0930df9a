"""(c) A fixed mix of 10 searches, each run many times at concurrency 1; p50/p95 per query and overall.

Targets (patients, codes, thresholds) are picked with a fixed seed from what was loaded, so every
query has data to find. The client is a keep-alive httpx.Client; its own overhead (~0.3 ms a
request) is small next to the 50 ms target. Rounds are interleaved (q1..q10, q1..q10, ...) so slow
drift on a noisy machine hits every query alike; each query also has a time cap, so the phase ends.
"""

from __future__ import annotations

import random
import statistics
import time
from collections import Counter
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import orjson
from common import log, percentile
from synth import SYNTHEA_SYSTEM

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"


def code_targets(originals: list[dict[str, Any]], rng: random.Random) -> dict[str, Any]:
    conds: Counter[str] = Counter()
    quantities: dict[tuple[str, str], list[float]] = {}
    for b in originals:
        for e in b["entry"]:
            r = e["resource"]
            if r["resourceType"] == "Condition":
                for c in r.get("code", {}).get("coding", []):
                    if c.get("system") == SNOMED:
                        conds[c["code"]] += 1
            elif r["resourceType"] == "Observation" and "valueQuantity" in r:
                q = r["valueQuantity"]
                for c in r.get("code", {}).get("coding", []):
                    if c.get("system") == LOINC and isinstance(q.get("value"), int | float) and q.get("code"):
                        quantities.setdefault((c["code"], q["code"]), []).append(float(q["value"]))
    cond_codes = sorted(c for c, n in conds.items() if n >= 3)
    qty = sorted(k for k, v in quantities.items() if len(v) >= 20)
    chosen_q = rng.sample(qty, min(5, len(qty)))
    return {
        "condition_codes": rng.sample(cond_codes, min(5, len(cond_codes))),
        "quantity": [{"code": c, "unit": u, "gt": round(percentile(quantities[(c, u)], 95), 1)} for c, u in chosen_q],
    }


def _q(path: str, params: list[tuple[str, str]]) -> str:
    return f"/fhir/{path}?" + urlencode(params, quote_via=quote, safe="/:")


def build_mix(patients: list[dict[str, Any]], codes: dict[str, Any]) -> list[tuple[str, str, list[str]]]:
    """(name, description, request paths) for the 10 queries."""
    ident = [f"{SYNTHEA_SYSTEM}|{p['identifier']}" for p in patients]
    pids = [p["id"] for p in patients]
    return [
        ("obs_patient_code_date", "Observation?subject=Patient/X&code=loinc|8302-2&date=ge2015&_sort=-date",
         [_q("Observation", [("subject", f"Patient/{x}"), ("code", f"{LOINC}|8302-2"), ("date", "ge2015"),
                             ("_sort", "-date")]) for x in pids]),
        ("patient_name", "Patient?name=FAMILY",
         [_q("Patient", [("name", p["family"])]) for p in patients]),
        ("patient_birthdate", "Patient?birthdate=YYYY-MM-DD",
         [_q("Patient", [("birthdate", p["birthDate"])]) for p in patients]),
        ("patient_identifier", "Patient?identifier=sys|val",
         [_q("Patient", [("identifier", i)]) for i in ident]),
        ("encounter_patient_date", "Encounter?patient=Patient/X&date=ge2015-01-01",
         [_q("Encounter", [("patient", f"Patient/{x}"), ("date", "ge2015-01-01")]) for x in pids]),
        ("include", "Encounter?patient=Patient/X&_include=Encounter:practitioner",
         [_q("Encounter", [("patient", f"Patient/{x}"), ("_include", "Encounter:practitioner")]) for x in pids]),
        ("revinclude", "Patient?_id=X&_revinclude=Encounter:patient",
         [_q("Patient", [("_id", x), ("_revinclude", "Encounter:patient")]) for x in pids]),
        ("chained", "Observation?subject:Patient.identifier=sys|val&code=loinc|8302-2",
         [_q("Observation", [("subject:Patient.identifier", i), ("code", f"{LOINC}|8302-2")]) for i in ident]),
        ("condition_code", "Condition?code=sct|CODE (population-wide)",
         [_q("Condition", [("code", f"{SNOMED}|{c}")]) for c in codes["condition_codes"]]),
        ("obs_value_quantity", "Observation?code=loinc|CODE&value-quantity=gtV|ucum|UNIT (population-wide, V=p95)",
         [_q("Observation", [("code", f"{LOINC}|{q['code']}"), ("value-quantity", f"gt{q['gt']}|{UCUM}|{q['unit']}")])
          for q in codes["quantity"]]),
    ]


def pick_patients(base: str, manifest: list[dict[str, Any]], n: int, rng: random.Random,
                  headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Fixed-seed sample of loaded patients that have heights and encounters since 2015; resolve server ids."""
    good = [m for m in manifest if m.get("orig_height_2015", 0) > 0 and m.get("orig_enc_2015", 0) > 0
            and m.get("identifier") and m.get("birthDate")]
    good.sort(key=lambda m: (m["copy"], m["bundle"]))
    chosen = rng.sample(good, min(n, len(good)))
    out = []
    statuses: Counter[int] = Counter()
    with httpx.Client(base_url=base, timeout=120, headers=headers or {}) as client:
        for m in chosen:
            r = client.get(_q("Patient", [("identifier", f"{SYNTHEA_SYSTEM}|{m['identifier']}")]))
            statuses[r.status_code] += 1
            entries = r.json().get("entry", []) if r.status_code == 200 else []
            if len(entries) == 1:
                out.append({**m, "id": entries[0]["resource"]["id"]})
    if not out:
        raise RuntimeError(f"no search target patient could be resolved on the server ({len(good)} candidates, "
                           f"statuses {dict(statuses)})")
    return out


def run_mix(base: str, mix: list[tuple[str, str, list[str]]], iterations: int, cap_s: float,
            warmup: int = 2, headers: dict[str, str] | None = None) -> dict[str, Any]:
    per: dict[str, dict[str, Any]] = {
        name: {"description": desc, "lat_ms": [], "matches": [], "includes": [], "more": 0, "errors": [],
               "elapsed": 0.0, "statuses": Counter()} for name, desc, _ in mix}
    anomalies: list[dict[str, Any]] = []
    requests: list[tuple[str, int, str, float, int]] = []  # query, round, path, ms, status
    hdrs = {"Accept": "application/fhir+json", **(headers or {})}
    with httpx.Client(base_url=base, timeout=httpx.Timeout(120.0), headers=hdrs) as c:
        for _name, _, paths in mix:  # warm-up: one pass over a few targets, not recorded
            for p in paths[:warmup]:
                c.get(p)
        for rnd in range(iterations):
            active = 0
            for name, _, paths in mix:
                s = per[name]
                if s["elapsed"] > cap_s and len(s["lat_ms"]) >= 5:
                    continue
                active += 1
                path = paths[rnd % len(paths)]
                t = time.perf_counter()
                r = c.get(path)
                body = r.content
                dt = time.perf_counter() - t
                s["elapsed"] += dt
                s["lat_ms"].append(dt * 1000)
                requests.append((name, rnd, path, round(dt * 1000, 2), r.status_code))
                s["statuses"][r.status_code] += 1
                if r.status_code >= 400:
                    if len(s["errors"]) < 3:
                        err = {"request": f"GET {path}", "status": r.status_code,
                               "body": body[:500].decode("utf-8", "replace")}
                        s["errors"].append(err)
                        anomalies.append({"query": name, **err})
                    continue
                if rnd < len(paths):  # result sizes, once per distinct request
                    doc = orjson.loads(body)
                    modes = Counter((e.get("search") or {}).get("mode") for e in doc.get("entry", []))
                    s["matches"].append(modes.get("match", 0))
                    s["includes"].append(modes.get("include", 0))
                    if any(lk.get("relation") == "next" for lk in doc.get("link", [])):
                        s["more"] += 1
                    if modes.get("match", 0) == 0:
                        anomalies.append({"query": name, "request": f"GET {path}", "status": r.status_code,
                                          "body": "no match (target expected to exist)"})
            if not active:
                break
    out: dict[str, Any] = {}
    every: list[float] = []
    for name, s in per.items():
        lat = s["lat_ms"]
        every.extend(lat)
        out[name] = {
            "description": s["description"], "runs": len(lat), "p50_ms": percentile(lat, 50),
            "p95_ms": percentile(lat, 95), "max_ms": max(lat, default=float("nan")),
            "mean_matches": statistics.fmean(s["matches"]) if s["matches"] else 0.0,
            "mean_includes": statistics.fmean(s["includes"]) if s["includes"] else 0.0,
            "targets_with_more_pages": s["more"], "statuses": dict(s["statuses"]), "errors": s["errors"],
        }
        log(f"  {name:24s} n={len(lat):4d} p50 {out[name]['p50_ms']:8.2f} ms p95 {out[name]['p95_ms']:8.2f} ms "
            f"matches~{out[name]['mean_matches']:.1f} incl~{out[name]['mean_includes']:.1f}")
    return {"queries": out, "overall": {"runs": len(every), "p50_ms": percentile(every, 50),
                                         "p95_ms": percentile(every, 95)}, "anomalies": anomalies,
            "requests": requests}
