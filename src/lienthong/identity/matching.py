"""Fellegi–Sunter patient matching with EM-estimated parameters, blocking and explanations.

Why this design:
- Comparison *levels* per field (exact / fuzzy / missing …) and log2 Bayes factors make
  every decision explainable: the score is the prior plus one weight per field.
- m-probabilities (agreement among true matches) are learnt by EM on blocked candidate
  pairs without labels; u-probabilities (agreement by chance) come from random pairs and,
  for exact agreement, from value frequencies — so scores are calibrated against the whole
  population, not only the candidates.
- Name agreement is adjusted by term frequency: "Nguyễn Văn An" agreeing proves less
  than a rare name agreeing.
- Equal valid CCCDs decide a match; conflicting valid CCCDs are a strong negative and
  keep a pair out of automatic linking (fixed weights, not learnt).
- Batch and online share one vectorised code path over a `PreparedTable`; the online path
  prepares the query with its candidates and scores them together.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt
from rapidfuzz.distance import OSA, JaroWinkler
from rapidfuzz.process import cpdist

from lienthong.identity.records import PersonRecord, PreparedTable, derive, prepare, prepare_against

__all__ = [
    "FEATURES",
    "FieldWeight",
    "FitSettings",
    "MatchModel",
    "MatchResult",
    "PersonRecord",
    "ScoredPairs",
    "Thresholds",
    "blocking_keys",
    "candidate_pairs",
    "fit",
]

Decision = Literal["match", "review", "no_match"]
DECISIONS: Final[tuple[Decision, Decision, Decision]] = ("no_match", "review", "match")
IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
LevelArray = npt.NDArray[np.int8]

MODEL_FORMAT: Final = "lienthong-mpi-model"
MODEL_VERSION: Final = 1


@dataclass(frozen=True, slots=True)
class Feature:
    """A compared field: the names of its levels 1..k (level 0 is always "missing")."""

    name: str
    levels: tuple[str, ...]
    exact_col: str | None = None  # code column whose equality is level 1 (for analytic u)
    ordered: tuple[int, ...] = ()  # levels from strongest to weakest agreement (weights kept monotone)


FEATURES: Final[tuple[Feature, ...]] = (
    Feature("given", ("exact", "exact_folded", "accents_differ", "jw>=0.92", "jw>=0.80", "swapped_with_family",
                      "different"), "given_acc", (1, 2, 4, 5, 7)),
    Feature("family", ("exact", "jw>=0.92", "swapped_with_given", "different"), "family", (1, 2, 4)),
    Feature("middle", ("exact", "different"), "middle", (1, 2)),
    Feature("birth_date", ("exact", "day_month_swapped", "partial_agree", "one_digit", "same_year", "different"),
            "dob_key", (1, 4, 5, 6)),
    Feature("sex", ("agree", "disagree"), None, (1, 2)),
    Feature("commune", ("exact", "jw>=0.90", "different"), "commune", (1, 2, 3)),
    Feature("province", ("exact", "different"), "province", (1, 2)),
    Feature("street", ("exact", "jw>=0.90", "jw>=0.75", "swapped_with_address2", "different"), "street",
            (1, 2, 3, 5)),
    Feature("street_number", ("exact", "different"), "street_number", (1, 2)),
    Feature("address2", ("exact", "jw>=0.90", "different"), "address2", (1, 2, 3)),
    Feature("postcode", ("exact", "one_edit", "different"), "postcode", (1, 2, 3)),
    Feature("phone", ("exact", "one_edit", "different"), "phone", (1, 2, 3)),
    Feature("father_name", ("exact", "jw>=0.90", "different"), "father", (1, 2, 3)),
    Feature("mother_name", ("exact", "jw>=0.90", "different"), "mother", (1, 2, 3)),
    Feature("insurance_id", ("exact", "one_edit", "different"), "insurance", (1, 2, 3)),
    Feature("other_id", ("exact", "one_edit", "different"), "other_id", (1, 2, 3)),
    Feature("national_id", ("equal", "one_digit", "conflict"), "national_id"),
)
FEATURE_INDEX: Final[dict[str, int]] = {f.name: k for k, f in enumerate(FEATURES)}
NATIONAL_ID: Final = FEATURE_INDEX["national_id"]
GIVEN: Final = FEATURE_INDEX["given"]
BIRTH_DATE: Final = FEATURE_INDEX["birth_date"]
OTHER_ID: Final = FEATURE_INDEX["other_id"]
PHONE: Final = FEATURE_INDEX["phone"]
STREET: Final = FEATURE_INDEX["street"]
COMMUNE: Final = FEATURE_INDEX["commune"]
FATHER: Final = FEATURE_INDEX["father_name"]
MOTHER: Final = FEATURE_INDEX["mother_name"]
INSURANCE: Final = FEATURE_INDEX["insurance_id"]
FAMILY: Final = FEATURE_INDEX["family"]
LEARNT: Final[tuple[int, ...]] = tuple(k for k in range(len(FEATURES)) if k != NATIONAL_ID)
MAX_LEVELS: Final = max(len(f.levels) for f in FEATURES) + 1
assert MAX_LEVELS <= 8, "EM packs a level into 3 bits"


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Decision thresholds on the score (log2 posterior odds of a match)."""

    match: float = 8.0
    review: float = 0.0


@dataclass(frozen=True, slots=True)
class FitSettings:
    """Training options; defaults suit populations of 1k–1M records."""

    max_block_size: int = 1000
    random_pairs: int = 400_000
    em_iterations: int = 60
    tf_keep: int = 3000
    seed: int = 42
    national_id_weights: tuple[float, float, float] = (20.0, -4.0, -20.0)
    sibling_guard: bool | None = None  # None: decide from the data (see `_twin_evidence`)


@dataclass(frozen=True, slots=True)
class FieldWeight:
    """One line of an explanation: the comparison level of a field and its weight (log2)."""

    field: str
    level: str
    weight: float


@dataclass(frozen=True, slots=True)
class MatchResult:
    """A scored pair; `explanation` weights sum to `score` (the first line is the prior)."""

    left_id: str
    right_id: str
    score: float
    probability: float
    decision: Decision
    explanation: tuple[FieldWeight, ...]


@dataclass(slots=True)
class ScoredPairs:
    """Vectorised scores of candidate pairs (row indices into a PreparedTable)."""

    left: IntArray
    right: IntArray
    score: FloatArray
    decision: npt.NDArray[np.int8]  # 0 no match, 1 review, 2 match
    levels: LevelArray
    tf_adjust: FloatArray  # (pairs, 2): given, family


# ======================================================================================
# Comparison
# ======================================================================================

def _workers(n: int) -> int:
    return -1 if n > 20000 else 1


def _jw(a: npt.NDArray[np.object_], b: npt.NDArray[np.object_]) -> npt.NDArray[np.float32]:
    if len(a) == 0:
        return np.empty(0, dtype=np.float32)
    return np.asarray(cpdist(a, b, scorer=JaroWinkler.normalized_similarity, dtype=np.float32,
                             workers=_workers(len(a))), dtype=np.float32)


def _osa(a: npt.NDArray[np.object_], b: npt.NDArray[np.object_]) -> npt.NDArray[np.int32]:
    if len(a) == 0:
        return np.empty(0, dtype=np.int32)
    return np.asarray(cpdist(a, b, scorer=OSA.distance, dtype=np.int32, workers=_workers(len(a))),
                      dtype=np.int32)


def _string_levels(
    t: PreparedTable, i: IntArray, j: IntArray, col: str, thresholds: Sequence[float] = (), edit: bool = False
) -> LevelArray:
    """Levels: 1 equal; 2..k fuzzy bands (JW ≥ threshold, or one edit); last = different."""
    ca, cb = t.codes[col][i], t.codes[col][j]
    out = np.zeros(len(i), dtype=np.int8)
    present = (ca >= 0) & (cb >= 0)
    eq = present & (ca == cb)
    out[eq] = 1
    todo = np.nonzero(present & ~eq)[0]
    n_bands = 1 if edit else len(thresholds)
    levels = np.full(len(todo), 2 + n_bands, dtype=np.int8)
    if len(todo):
        a, b = t.strs[col][i[todo]], t.strs[col][j[todo]]
        if edit:
            levels[_osa(a, b) <= 1] = 2
        elif thresholds:
            sims = _jw(a, b)
            for k in range(len(thresholds) - 1, -1, -1):
                levels[sims >= thresholds[k]] = 2 + k
    out[todo] = levels
    return out


def _given_levels(t: PreparedTable, i: IntArray, j: IntArray) -> LevelArray:
    """1 exact; 2 equal once folded (one side typed without diacritics); 3 equal folded but
    both accented differently ("Hùng"/"Hưng": different names); 4–5 fuzzy; 6 swapped; 7 different."""
    base = _string_levels(t, i, j, "given", (0.92, 0.80))  # 1 eq, 2, 3, 4 different
    out = base.copy()
    acc_eq = t.codes["given_acc"][i] == t.codes["given_acc"][j]
    plain = (t.ints["given_plain"][i] == 1) | (t.ints["given_plain"][j] == 1)
    folded_only = (base == 1) & ~acc_eq
    out[folded_only & plain] = 2
    out[folded_only & ~plain] = 3
    out[base >= 2] = base[base >= 2] + 2  # 4, 5, 6 -> different below
    out[out == 6] = 7
    out[_swapped(t, i, j, out >= 4)] = 6
    return out


def _cross_similar(
    t: PreparedTable, i: IntArray, j: IntArray, col_a: str, col_b: str, where: npt.NDArray[np.bool_],
    threshold: float = 0.9,
) -> npt.NDArray[np.bool_]:
    """True where a.col_a ≈ b.col_b and a.col_b ≈ b.col_a (fields entered the wrong way round);
    only evaluated where `where` holds, to keep batch scoring cheap."""
    ai, aj, bi, bj = t.codes[col_a][i], t.codes[col_a][j], t.codes[col_b][i], t.codes[col_b][j]
    out: npt.NDArray[np.bool_] = where & (ai >= 0) & (bi >= 0) & (aj >= 0) & (bj >= 0) & (ai != aj)
    idx = np.flatnonzero(out)
    idx = idx[t.strs[col_a][i[idx]] != t.strs[col_b][i[idx]]]  # a's own two fields differ (codes are per column)
    out[:] = False
    if len(idx):
        s1 = _jw(t.strs[col_a][i[idx]], t.strs[col_b][j[idx]])
        s2 = _jw(t.strs[col_b][i[idx]], t.strs[col_a][j[idx]])
        out[idx] = (s1 >= threshold) & (s2 >= threshold)
    return out


def _swapped(t: PreparedTable, i: IntArray, j: IntArray, where: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    return _cross_similar(t, i, j, "given", "family", where)


def _family_levels(t: PreparedTable, i: IntArray, j: IntArray) -> LevelArray:
    out = _string_levels(t, i, j, "family", (0.92,))  # 1, 2, 3 different
    out[out == 3] = 4
    out[_swapped(t, i, j, out >= 2)] = 3
    return out


def _date_levels(t: PreparedTable, i: IntArray, j: IntArray) -> LevelArray:
    ya, yb = t.ints["year"][i], t.ints["year"][j]
    ma, mb = t.ints["month"][i], t.ints["month"][j]
    da, db = t.ints["day"][i], t.ints["day"][j]
    out = np.zeros(len(i), dtype=np.int8)
    present = (ya > 0) & (yb > 0)
    full = present & (ma > 0) & (mb > 0) & (da > 0) & (db > 0)
    exact = full & (ya == yb) & (ma == mb) & (da == db)  # two equal years alone are only "partial"
    swapped = full & (ya == yb) & (ma == db) & (da == mb) & ~exact
    partial = present & (ya == yb) & ((da == 0) | (db == 0)) & ((ma == 0) | (mb == 0) | (ma == mb))
    out[present] = 6
    out[present & (ya == yb)] = 5
    cand = np.nonzero(full & ~exact & ~swapped)[0]
    if len(cand):
        typo = _osa(t.strs["dob_key"][i[cand]], t.strs["dob_key"][j[cand]]) <= 1
        out[cand[typo]] = 4
    out[partial] = 3
    out[swapped] = 2
    out[exact] = 1
    return out


def _sex_levels(t: PreparedTable, i: IntArray, j: IntArray) -> LevelArray:
    a, b = t.ints["sex"][i], t.ints["sex"][j]
    out = np.zeros(len(i), dtype=np.int8)
    present = (a > 0) & (b > 0)
    out[present] = np.where(a[present] == b[present], 1, 2)
    return out


def _commune_levels(t: PreparedTable, i: IntArray, j: IntArray) -> LevelArray:
    out = _string_levels(t, i, j, "commune", (0.90,))
    fuzzy = np.nonzero(out == 2)[0]
    if len(fuzzy):  # fuzzy agreement only between unresolved free-text communes, never codes
        a, b = t.strs["commune"][i[fuzzy]], t.strs["commune"][j[fuzzy]]
        text = np.fromiter((x.startswith("t:") and y.startswith("t:") for x, y in zip(a, b, strict=True)),
                           dtype=bool, count=len(fuzzy))
        out[fuzzy[~text]] = 3
    return out


def _street_levels(t: PreparedTable, i: IntArray, j: IntArray) -> LevelArray:
    """Fuzzy levels only when the numbers agree: "thôn 8" is not "thôn 9", nor "số 12" "số 21"."""
    out = _string_levels(t, i, j, "street", (0.90, 0.75))  # 1, 2, 3, 4 different
    fuzzy = (out == 2) | (out == 3)
    out[fuzzy & (t.codes["street_digits"][i] != t.codes["street_digits"][j])] = 4
    out[out == 4] = 5
    out[_cross_similar(t, i, j, "street", "address2", out >= 3)] = 4
    return out


def compare_pairs(t: PreparedTable, i: IntArray, j: IntArray) -> LevelArray:
    """Comparison levels (pairs × features) of row pairs (i, j) of a prepared table."""
    columns: list[LevelArray] = [
        _given_levels(t, i, j),
        _family_levels(t, i, j),
        _string_levels(t, i, j, "middle"),
        _date_levels(t, i, j),
        _sex_levels(t, i, j),
        _commune_levels(t, i, j),
        _string_levels(t, i, j, "province"),
        _street_levels(t, i, j),
        _string_levels(t, i, j, "street_number"),
        _string_levels(t, i, j, "address2", (0.90,)),
        _string_levels(t, i, j, "postcode", edit=True),
        _string_levels(t, i, j, "phone", edit=True),
        _string_levels(t, i, j, "father", (0.90,)),
        _string_levels(t, i, j, "mother", (0.90,)),
        _string_levels(t, i, j, "insurance", edit=True),
        _string_levels(t, i, j, "other_id", edit=True),
        _string_levels(t, i, j, "national_id", edit=True),
    ]
    return np.stack(columns, axis=1) if len(i) else np.zeros((0, len(FEATURES)), dtype=np.int8)


# ======================================================================================
# Blocking
# ======================================================================================

def _keys_from_row(row: dict[str, str | int]) -> list[str]:
    keys: list[str] = []
    for prefix, col in (("id", "national_id"), ("si", "insurance"), ("ph", "phone"), ("ox", "other_id")):
        if row[col]:
            keys.append(f"{prefix}:{row[col]}")
    given, family, year = row["given"], row["family"], int(row["year"])
    month, day = int(row["month"]), int(row["day"])
    commune = row["commune"]
    postcode = row["postcode"]
    if family and given and year:
        first, second = sorted((str(family), str(given)))  # order-free: catches swapped names
        keys.append(f"nm:{first}|{second}|{year}")
    if given and commune:
        keys.append(f"gc:{given}|{commune}")
    if family and commune and year:
        keys.append(f"fc:{family}|{commune}|{year // 10}")  # birth decade keeps Nguyễn blocks small
    if family and row["street"]:
        keys.append(f"fs:{family}|{row['street']}|{commune}")
    if year and month and day:
        lo, hi = sorted((month, day))
        keys.append(f"db:{year}|{lo}|{hi}")
    if postcode:
        if row["street"]:
            keys.append(f"sp:{row['street']}|{postcode}")
        if row["street_number"]:
            keys.append(f"pn:{postcode}|{row['street_number']}")
        if family:
            keys.append(f"fp:{family}|{postcode}")
    return keys


def blocking_keys(record: PersonRecord) -> list[str]:
    """Keys under which a record is indexed; two records are candidates if they share one.

    Rules (OR'ed, chosen for recall): CCCD; social-insurance number; phone; other id;
    folded family+given (either order)+birth year; given+commune; family+commune+birth
    decade; family+street+commune; birth date with day/month order ignored (catches
    swaps); street+postcode; postcode+house number; family+postcode. The database indexes
    these strings; `MatchModel.score` then ranks what they retrieve.
    """
    return _keys_from_row(derive(record))


def candidate_pairs(t: PreparedTable, *, link: bool = False, max_block_size: int = 1000) -> tuple[IntArray, IntArray]:
    """All pairs sharing a blocking key (i < j; in link mode source 0 × source 1).

    Keys shared by more than `max_block_size` records are skipped: they carry little
    evidence and would dominate the work (the other rules still cover those records).
    """
    key_ids: dict[str, int] = {}
    rec: list[int] = []
    kid: list[int] = []
    for r, row in enumerate(t.rows):
        for key in _keys_from_row(row):
            rec.append(r)
            kid.append(key_ids.setdefault(key, len(key_ids)))
    if not rec:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    rec_a = np.asarray(rec, dtype=np.int64)
    kid_a = np.asarray(kid, dtype=np.int64)
    order = np.lexsort((rec_a, kid_a))
    rec_a, kid_a = rec_a[order], kid_a[order]
    starts = np.flatnonzero(np.r_[True, kid_a[1:] != kid_a[:-1]])
    sizes = np.diff(np.r_[starts, len(kid_a)])
    keep = (sizes >= 2) & (sizes <= max_block_size)
    starts, sizes = starts[keep], sizes[keep]
    # For each member p of a group [g, g+s): pair with members p+1 .. g+s-1.
    group_of = np.repeat(np.arange(len(starts)), sizes)
    pos = np.concatenate([np.arange(s) for s in sizes]) if len(sizes) else np.zeros(0, dtype=np.int64)
    member = np.repeat(starts, sizes) + pos
    counts = sizes[group_of] - pos - 1
    total = int(counts.sum())
    if total == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    left_pos = np.repeat(member, counts)
    offsets = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    right_pos = left_pos + 1 + offsets
    a, b = rec_a[left_pos], rec_a[right_pos]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    pair = np.sort(lo * t.n + hi)
    pair = pair[np.r_[True, pair[1:] != pair[:-1]]]
    i, j = pair // t.n, pair % t.n
    if link:
        cross = t.source[i] != t.source[j]
        i, j = i[cross], j[cross]
        flip = t.source[i] == 1
        i, j = np.where(flip, j, i), np.where(flip, i, j)
    else:
        same = i != j
        i, j = i[same], j[same]
    return i.astype(np.int64), j.astype(np.int64)


# ======================================================================================
# Model
# ======================================================================================

def _term_frequencies(t: PreparedTable, col: str, keep: int) -> tuple[dict[str, float], float]:
    values = t.strs[col][t.codes[col] >= 0]
    if len(values) == 0:
        return {}, 1.0
    uniq, counts = np.unique(values.astype(str), return_counts=True)
    freq = counts / counts.sum()
    order = np.argsort(-counts)[:keep]
    floor = 1.0 / max(len(values), 1)
    return {str(uniq[k]): float(freq[k]) for k in order}, floor


def _random_pairs(t: PreparedTable, n: int, link: bool, rng: np.random.Generator) -> tuple[IntArray, IntArray]:
    if link:
        a = np.flatnonzero(t.source == 0)
        b = np.flatnonzero(t.source == 1)
        total = len(a) * len(b)
        if total <= n:
            ii, jj = np.meshgrid(a, b, indexing="ij")
            return ii.ravel().astype(np.int64), jj.ravel().astype(np.int64)
        return a[rng.integers(0, len(a), n)].astype(np.int64), b[rng.integers(0, len(b), n)].astype(np.int64)
    total = t.n * (t.n - 1) // 2
    if total <= n:
        tri_i, tri_j = np.triu_indices(t.n, 1)
        return tri_i.astype(np.int64), tri_j.astype(np.int64)
    i = rng.integers(0, t.n, n)
    j = rng.integers(0, t.n, n)
    keep = i != j
    return i[keep].astype(np.int64), j[keep].astype(np.int64)


def _level_frequencies(levels: LevelArray, weights: FloatArray | None = None) -> FloatArray:
    """(features × MAX_LEVELS) distribution over levels ≥ 1, with +1 smoothing."""
    out = np.zeros((len(FEATURES), MAX_LEVELS), dtype=np.float64)
    w = np.ones(len(levels)) if weights is None else weights
    for f, feat in enumerate(FEATURES):
        k = len(feat.levels)
        counts = np.bincount(levels[:, f], weights=w, minlength=MAX_LEVELS)[: k + 1].astype(np.float64)
        counts[0] = 0.0
        counts[1 : k + 1] += 0.5
        out[f, 1 : k + 1] = counts[1 : k + 1] / counts[1 : k + 1].sum()
    return out


def _exact_u(t: PreparedTable, col: str, link: bool) -> float | None:
    """P(equal values | random pair, both present) from value frequencies (Σ p²)."""
    codes = t.codes[col]
    if link:
        a, b = codes[t.source == 0], codes[t.source == 1]
        a, b = a[a >= 0], b[b >= 0]
        if len(a) == 0 or len(b) == 0:
            return None
        size = int(max(a.max(initial=0), b.max(initial=0))) + 1
        pa = np.bincount(a, minlength=size) / len(a)
        pb = np.bincount(b, minlength=size) / len(b)
        return float((pa * pb).sum())
    present = codes[codes >= 0]
    if len(present) < 2:
        return None
    p = np.bincount(present) / len(present)
    return float((p * p).sum())


def _em(
    levels: LevelArray, m: FloatArray, u: FloatArray, lam: float, iterations: int
) -> tuple[FloatArray, FloatArray, float]:
    """EM for the two-class latent model over distinct comparison patterns.

    Pairs with equal valid CCCDs are fixed as matches and conflicting ones as non-matches
    (anchors); the national-id feature itself is not learnt.
    """
    # Distinct comparison patterns: pack each row (levels < 8) into one int64, 3 bits a field.
    shifts = (3 * np.arange(levels.shape[1])).astype(np.int64)
    keys = (levels.astype(np.int64) << shifts).sum(axis=1)
    keys.sort()
    first = np.r_[True, keys[1:] != keys[:-1]]
    uniq = keys[first]
    counts = np.diff(np.r_[np.flatnonzero(first), len(keys)]).astype(np.float64)
    patterns = ((uniq[:, None] >> shifts) & 7).astype(np.int8)
    learnt = np.asarray(LEARNT)
    anchor_pos = patterns[:, NATIONAL_ID] == 1
    anchor_neg = patterns[:, NATIONAL_ID] == 3
    cols = np.arange(len(FEATURES))
    for _ in range(iterations):
        logm = np.log(np.where(m > 0, m, 1.0))
        logu = np.log(np.where(u > 0, u, 1.0))
        ratio = (logm - logu)[cols[learnt], patterns[:, learnt]]
        logit = math.log(lam / (1 - lam)) + ratio.sum(axis=1)
        p = 1.0 / (1.0 + np.exp(-np.clip(logit, -700, 700)))
        p[anchor_pos] = 1.0
        p[anchor_neg] = 0.0
        new_lam = float(np.clip((p * counts).sum() / counts.sum(), 1e-9, 1 - 1e-9))
        new_m = _level_frequencies(patterns, p * counts)
        new_u = _level_frequencies(patterns, (1 - p) * counts)
        delta = float(np.abs(new_m - m).max())
        m, u, lam = new_m, new_u, new_lam
        if delta < 1e-6:
            break
    return m, u, lam


@dataclass
class MatchModel:
    """A fitted Fellegi–Sunter model: per-field level weights, prior, TF tables, thresholds.

    `sibling_guard`: a pair showing the twin pattern (same birthday and household,
    different given names; see `_twin_pattern`) is never auto-linked, only sent to
    review, unless a personal identifier agrees. Twins share everything a household
    shares, which breaks the independence assumption of Fellegi–Sunter. `fit` switches the
    guard on when, among candidate pairs with that pattern, identifiers conflict at least
    as often as they agree (siblings), or when there is too little evidence to tell.

    Serialise with `to_json`/`from_json` so a node can load trained parameters.
    """

    m: FloatArray
    u: FloatArray
    prior: float  # log2 prior odds that a random pair matches
    tf: dict[str, dict[str, float]] = field(default_factory=dict)
    tf_floor: dict[str, float] = field(default_factory=dict)
    thresholds: Thresholds = field(default_factory=Thresholds)
    national_id_weights: tuple[float, float, float] = (20.0, -4.0, -20.0)
    tf_cap: float = 6.0
    sibling_guard: bool = True
    training: dict[str, Any] = field(default_factory=dict)
    _weights: FloatArray | None = field(default=None, init=False, repr=False, compare=False)

    # -- weights ---------------------------------------------------------------------------
    @property
    def weights(self) -> FloatArray:
        """log2(m/u) per feature and level; level 0 (missing) is 0 (cached; see `refresh`)."""
        if self._weights is None:
            self._weights = self._compute_weights()
        return self._weights

    def refresh(self) -> None:
        """Recompute cached weights after changing `m`, `u` or `national_id_weights`."""
        self._weights = None

    def _compute_weights(self) -> FloatArray:
        w = np.zeros_like(self.m)
        for f, feat in enumerate(FEATURES):
            k = len(feat.levels)
            if f == NATIONAL_ID:
                w[f, 1:4] = self.national_id_weights
                continue
            w[f, 1 : k + 1] = np.log2(np.maximum(self.m[f, 1 : k + 1], 1e-9) / np.maximum(self.u[f, 1 : k + 1], 1e-12))
            # Keep weights monotone along the agreement order: EM on clean data can leave a
            # rare fuzzy level with a weight below "different", which would be absurd.
            chain = feat.ordered
            for a in range(len(chain) - 2, 0, -1):
                w[f, chain[a]] = max(w[f, chain[a]], w[f, chain[-1]])
            for a in range(1, len(chain)):
                w[f, chain[a]] = min(w[f, chain[a]], w[f, chain[a - 1]])
        return w

    def _tf_adjust(self, t: PreparedTable, col: str, idx: IntArray, u_exact: float) -> FloatArray:
        table = self.tf.get(col, {})
        floor = self.tf_floor.get(col, 1e-4)
        values = t.strs[col][idx]
        tf = np.fromiter((table.get(v, floor) for v in values), dtype=np.float64, count=len(idx))
        adj = np.log2(u_exact / np.maximum(tf, floor))
        return np.asarray(np.clip(adj, -self.tf_cap, self.tf_cap), dtype=np.float64)

    # -- scoring ---------------------------------------------------------------------------
    def score_pairs(self, t: PreparedTable, i: IntArray, j: IntArray) -> ScoredPairs:
        """Score row pairs of a prepared table (vectorised)."""
        levels = compare_pairs(t, i, j)
        w = self.weights
        score = np.full(len(i), self.prior, dtype=np.float64)
        if len(i):
            score += w[np.arange(len(FEATURES)), levels.astype(np.int64)].sum(axis=1)
        tf_adj = np.zeros((len(i), 2), dtype=np.float64)
        given_hit = np.flatnonzero((levels[:, GIVEN] == 1) | (levels[:, GIVEN] == 2))
        if len(given_hit) and self.tf.get("given"):
            tf_adj[given_hit, 0] = self._tf_adjust(t, "given", i[given_hit], float(self.u[GIVEN, 1] + self.u[GIVEN, 2]))
        family_hit = np.flatnonzero(levels[:, FAMILY] == 1)
        if len(family_hit) and self.tf.get("family"):
            tf_adj[family_hit, 1] = self._tf_adjust(t, "family", i[family_hit], float(self.u[FAMILY, 1]))
        score += tf_adj.sum(axis=1)
        decision = np.where(score >= self.thresholds.match, 2, np.where(score >= self.thresholds.review, 1, 0))
        decision = decision.astype(np.int8)
        if self.sibling_guard and len(i):
            guard = _twin_pattern(levels) & ~_ids_agree(levels)
            decision[guard & (decision == 2)] = 1
        id_level = levels[:, NATIONAL_ID] if len(i) else np.zeros(0, dtype=np.int8)
        decision[id_level == 1] = 2
        decision[(id_level == 3) & (decision == 2)] = 1
        return ScoredPairs(i, j, score, decision, levels, tf_adj)

    def explain(self, t: PreparedTable, scored: ScoredPairs, k: int) -> MatchResult:
        """The MatchResult of pair k of `scored`, with one weight line per present field."""
        w = self.weights
        lines = [FieldWeight("prior", "log2 prior odds", float(self.prior))]
        for f, feat in enumerate(FEATURES):
            level = int(scored.levels[k, f])
            if level == 0:
                continue
            weight = float(w[f, level])
            name = feat.levels[level - 1]
            if f == GIVEN and scored.tf_adjust[k, 0] != 0.0:
                weight += float(scored.tf_adjust[k, 0])
                name += " (term frequency)"
            if f == FAMILY and scored.tf_adjust[k, 1] != 0.0:
                weight += float(scored.tf_adjust[k, 1])
                name += " (term frequency)"
            lines.append(FieldWeight(feat.name, name, weight))
        score = float(scored.score[k])
        return MatchResult(
            t.ids[int(scored.left[k])],
            t.ids[int(scored.right[k])],
            score,
            _probability(score),
            DECISIONS[int(scored.decision[k])],
            tuple(lines),
        )

    def score(self, record: PersonRecord, candidates: Sequence[PersonRecord], *, limit: int | None = None,
              at_least: Decision = "no_match") -> list[MatchResult]:
        """Online use: score one incoming record against candidates (best first).

        Only the `limit` best pairs whose decision is at least `at_least` are returned: building an
        explanation costs more than scoring the pair, and `$match` returns a handful.
        """
        if not candidates:
            return []
        t = prepare_against(record, candidates)
        j = np.arange(1, len(candidates) + 1, dtype=np.int64)
        i = np.zeros(len(candidates), dtype=np.int64)
        scored = self.score_pairs(t, i, j)
        order = np.argsort(-scored.score, kind="stable")
        order = order[scored.decision[order] >= DECISIONS.index(at_least)][:limit]
        return [self.explain(t, scored, int(k)) for k in order]

    def compare(self, a: PersonRecord, b: PersonRecord) -> MatchResult:
        """Score and explain a single pair."""
        return self.score(a, [b])[0]

    def blocking_keys(self, record: PersonRecord) -> list[str]:
        """See `blocking_keys`."""
        return blocking_keys(record)

    # -- batch -----------------------------------------------------------------------------
    def predict(
        self,
        t: PreparedTable,
        *,
        link: bool = False,
        max_block_size: int = 1000,
        chunk: int = 500_000,
        progress: Callable[[int, int], None] | None = None,
    ) -> ScoredPairs:
        """Block and score a prepared table; keeps pairs at or above the review threshold."""
        i, j = candidate_pairs(t, link=link, max_block_size=max_block_size)
        parts: list[ScoredPairs] = []
        total = len(i)
        for start in range(0, max(total, 1), chunk):
            s = self.score_pairs(t, i[start : start + chunk], j[start : start + chunk])
            keep = s.decision > 0
            parts.append(ScoredPairs(s.left[keep], s.right[keep], s.score[keep], s.decision[keep],
                                     s.levels[keep], s.tf_adjust[keep]))
            if progress is not None:
                progress(min(start + chunk, total), total)
        return ScoredPairs(
            np.concatenate([p.left for p in parts]),
            np.concatenate([p.right for p in parts]),
            np.concatenate([p.score for p in parts]),
            np.concatenate([p.decision for p in parts]),
            np.concatenate([p.levels for p in parts]),
            np.concatenate([p.tf_adjust for p in parts]),
        )

    def dedupe(self, records: Iterable[PersonRecord]) -> list[MatchResult]:
        """Pairs of one list that are matches or need review, with explanations."""
        t = prepare(records)
        scored = self.predict(t)
        return [self.explain(t, scored, k) for k in range(len(scored.score))]

    def link(self, left: Iterable[PersonRecord], right: Iterable[PersonRecord]) -> list[MatchResult]:
        """Pairs across two lists (left × right) that are matches or need review."""
        t = prepare(left, right)
        scored = self.predict(t, link=True)
        return [self.explain(t, scored, k) for k in range(len(scored.score))]

    # -- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready parameters."""
        return {
            "format": MODEL_FORMAT,
            "version": MODEL_VERSION,
            "prior": self.prior,
            "thresholds": asdict(self.thresholds),
            "national_id_weights": list(self.national_id_weights),
            "tf_cap": self.tf_cap,
            "sibling_guard": self.sibling_guard,
            "features": {
                feat.name: {
                    "levels": list(feat.levels),
                    "m": [float(x) for x in self.m[f, 1 : len(feat.levels) + 1]],
                    "u": [float(x) for x in self.u[f, 1 : len(feat.levels) + 1]],
                }
                for f, feat in enumerate(FEATURES)
            },
            "tf": self.tf,
            "tf_floor": self.tf_floor,
            "training": self.training,
        }

    def to_json(self) -> str:
        """Serialise the model as JSON text."""
        return json.dumps(self.to_dict(), ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MatchModel:
        """Load parameters written by `to_dict`; rejects other formats or level layouts."""
        if data.get("format") != MODEL_FORMAT or data.get("version") != MODEL_VERSION:
            raise ValueError("Không phải mô hình MPI hợp lệ / not a lienthong MPI model (format/version)")
        m = np.zeros((len(FEATURES), MAX_LEVELS))
        u = np.zeros((len(FEATURES), MAX_LEVELS))
        for f, feat in enumerate(FEATURES):
            entry = data["features"][feat.name]
            if tuple(entry["levels"]) != feat.levels:
                raise ValueError(f"Mức so sánh của '{feat.name}' không khớp / levels of '{feat.name}' differ")
            m[f, 1 : len(feat.levels) + 1] = entry["m"]
            u[f, 1 : len(feat.levels) + 1] = entry["u"]
        nid = data["national_id_weights"]
        return cls(
            m=m,
            u=u,
            prior=float(data["prior"]),
            tf={k: {str(a): float(b) for a, b in v.items()} for k, v in data.get("tf", {}).items()},
            tf_floor={k: float(v) for k, v in data.get("tf_floor", {}).items()},
            thresholds=Thresholds(**data["thresholds"]),
            national_id_weights=(float(nid[0]), float(nid[1]), float(nid[2])),
            tf_cap=float(data.get("tf_cap", 6.0)),
            sibling_guard=bool(data.get("sibling_guard", True)),
            training=dict(data.get("training", {})),
        )

    @classmethod
    def from_json(cls, text: str) -> MatchModel:
        """Parse JSON text written by `to_json`."""
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        """Write the model as JSON."""
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> MatchModel:
        """Read a model written by `save`."""
        return cls.from_json(Path(path).read_text(encoding="utf-8"))


def _twin_pattern(levels: LevelArray) -> npt.NDArray[np.bool_]:
    """Born the same day, same household (phone, a parent's name, or street+commune), and
    the given names differ, are merely similar, or differ in accents both written accented —
    or are close but sex or middle name disagree ("Phan Bá Hùng" / "Phan Thị Thanh Hương")."""
    household = (levels[:, PHONE] == 1) | (levels[:, FATHER] == 1) | (levels[:, MOTHER] == 1)
    household |= (levels[:, STREET] == 1) & (levels[:, COMMUNE] == 1)
    given = levels[:, GIVEN]
    differs = (given == 3) | (given == 5) | (given == 7) | (
        (given == 4) & ((levels[:, FEATURE_INDEX["sex"]] == 2) | (levels[:, FEATURE_INDEX["middle"]] == 2))
    )
    result: npt.NDArray[np.bool_] = differs & (levels[:, BIRTH_DATE] == 1) & household
    return result


def _ids_agree(levels: LevelArray) -> npt.NDArray[np.bool_]:
    """Some personal identifier agrees, allowing one typo (insurance or other id)."""
    other, insurance = levels[:, OTHER_ID], levels[:, INSURANCE]  # comparisons: np.isin costs ~30 µs a call
    result: npt.NDArray[np.bool_] = (other == 1) | (other == 2) | (insurance == 1) | (insurance == 2)
    return result


def _twin_evidence(levels: LevelArray) -> tuple[int, int]:
    """(agreeing, conflicting) personal ids among candidate pairs showing the twin pattern.

    Why: whether "same birthday, same household, different given name" means siblings or
    one person with a re-typed name is a property of the population. Identifiers settle it
    where both records carry one: siblings' ids conflict, a person's ids agree.
    """
    pattern = _twin_pattern(levels)
    ids = levels[:, (NATIONAL_ID, INSURANCE, OTHER_ID)]
    agree = pattern & (np.isin(ids, (1, 2)).any(axis=1))
    conflict = pattern & (ids == 3).any(axis=1) & ~agree
    return int(agree.sum()), int(conflict.sum())


def _probability(score: float) -> float:
    if score > 60:
        return 1.0
    if score < -60:
        return 0.0
    return float(1.0 / (1.0 + 2.0 ** (-score)))


def _initial_m() -> FloatArray:
    m = np.zeros((len(FEATURES), MAX_LEVELS))
    for f, feat in enumerate(FEATURES):
        k = len(feat.levels)
        decay = np.array([0.5**x for x in range(k)])
        decay[0] = 8.0
        m[f, 1 : k + 1] = decay / decay.sum()
    return m


def fit(
    records: Iterable[PersonRecord] | PreparedTable,
    other: Iterable[PersonRecord] | None = None,
    *,
    settings: FitSettings | None = None,
    thresholds: Thresholds | None = None,
) -> MatchModel:
    """Estimate a model from unlabelled data: u from random pairs, m and λ by EM.

    Pass a second list (`other`) to train for linking two lists; pass a PreparedTable to
    reuse preparation (its `source` decides link mode).
    """
    s = settings or FitSettings()
    t = records if isinstance(records, PreparedTable) else prepare(records, other)
    link = bool((t.source == 1).any())
    rng = np.random.default_rng(s.seed)

    # u: random pairs, exact levels from value frequencies.
    ri, rj = _random_pairs(t, s.random_pairs, link, rng)
    u = _level_frequencies(compare_pairs(t, ri, rj))
    for f, feat in enumerate(FEATURES):
        k = len(feat.levels)
        exact = _exact_u(t, feat.exact_col, link) if feat.exact_col else None
        if exact is None or not 0 < exact < 1:
            continue
        rest = u[f, 2 : k + 1]
        u[f, 2 : k + 1] = rest / rest.sum() * (1 - exact)
        u[f, 1] = exact

    # m, λ: EM on candidate pairs.
    ci, cj = candidate_pairs(t, link=link, max_block_size=s.max_block_size)
    cand_levels = compare_pairs(t, ci, cj)
    m0 = _initial_m()
    u_cand0 = _level_frequencies(cand_levels) if len(ci) else u.copy()
    m, _u_cand, lam = _em(cand_levels, m0, u_cand0, 0.1, s.em_iterations) if len(ci) else (m0, u, 0.01)

    total_pairs = (int((t.source == 0).sum()) * int((t.source == 1).sum())) if link else t.n * (t.n - 1) // 2
    expected_matches = max(lam * len(ci), 1.0)
    prior_p = min(expected_matches / max(total_pairs, 1), 0.5)
    prior = math.log2(prior_p / (1 - prior_p))

    agree, conflict = _twin_evidence(cand_levels) if len(ci) else (0, 0)
    guard = s.sibling_guard
    if guard is None:  # too little evidence: stay on the safe side (review, not merge)
        guard = conflict >= agree if agree + conflict >= 10 else True

    tf: dict[str, dict[str, float]] = {}
    floors: dict[str, float] = {}
    for col in ("given", "family"):
        tf[col], floors[col] = _term_frequencies(t, col, s.tf_keep)

    return MatchModel(
        m=m,
        u=u,
        prior=prior,
        tf=tf,
        tf_floor=floors,
        thresholds=thresholds or Thresholds(),
        national_id_weights=s.national_id_weights,
        sibling_guard=guard,
        training={
            "twin_pattern_ids_agree": agree,
            "twin_pattern_ids_conflict": conflict,
            "records": t.n,
            "link": link,
            "candidate_pairs": len(ci),
            "random_pairs": len(ri),
            "em_lambda": lam,
            "expected_matches": expected_matches,
        },
    )
