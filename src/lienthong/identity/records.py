"""The person record the index compares, and its prepared (columnar, normalised) form.

Why columnar: batch linkage compares millions of candidate pairs; holding each
normalised field as a numpy array lets comparisons run vectorised, and the online path
reuses the same code on a table of one query plus its candidates, so both paths always
compute identical comparison levels.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from functools import lru_cache
from operator import itemgetter
from typing import Final

import numpy as np
import numpy.typing as npt

from lienthong.identity.identifiers import IdentifierError, parse_cccd, social_insurance_from
from lienthong.identity.normalize import normalize_phone, normalize_sex, parse_address, parse_date, parse_name
from lienthong.text import fold, nfc


@dataclass(slots=True)
class PersonRecord:
    """One patient record as received; every field but the id is optional text.

    The field names are the mapping names of the CLI (`--columns given=HO_TEN,...`).
    """

    record_id: str
    given: str | None = None
    family: str | None = None
    full_name: str | None = None
    birth_date: str | None = None
    sex: str | None = None
    phone: str | None = None
    street_number: str | None = None
    address: str | None = None
    address2: str | None = None
    locality: str | None = None
    district: str | None = None
    province: str | None = None
    postcode: str | None = None
    national_id: str | None = None
    insurance_id: str | None = None
    other_id: str | None = None
    father_name: str | None = None
    mother_name: str | None = None


MATCH_FIELDS: Final[tuple[str, ...]] = tuple(f.name for f in fields(PersonRecord) if f.name != "record_id")
"""Field names a CSV column can be mapped to."""

STRING_COLUMNS: Final[tuple[str, ...]] = (
    "given_acc", "given", "family", "middle", "dob_key", "commune", "province", "street", "street_digits",
    "street_number",
    "address2", "postcode", "phone", "father", "mother", "insurance", "other_id", "national_id",
)
INT_COLUMNS: Final[tuple[str, ...]] = ("year", "month", "day", "sex", "given_plain")

_ID_CLEAN = re.compile(r"[^0-9A-Za-z]")
_DIGITS = re.compile(r"\d+")


def _f(value: str | None) -> str:
    return fold(value) if value else ""


DERIVED_VERSION: Final = 1
"""Bump when `derive` changes its output: stored values of another version are recomputed, not trusted."""


@dataclass(slots=True)
class IndexedRecord(PersonRecord):
    """A record read back from the patient index with the values `derive` stored at write time."""

    derived: dict[str, str | int] | None = None


def derive(record: PersonRecord) -> dict[str, str | int]:
    """Normalised comparison values of one record ("" / 0 = missing).

    Taken from the index when it stored them; otherwise cached on the field values (the online
    path sees the same candidates again and again). The returned dict is shared; treat it as read-only.
    """
    if isinstance(record, IndexedRecord) and record.derived is not None:
        return record.derived
    return _derive(tuple(getattr(record, f) for f in MATCH_FIELDS))


def stored_derived(values: dict[str, str | int]) -> dict[str, str | int]:
    """`derive` output as the index stores it (with its version)."""
    return {"_v": DERIVED_VERSION, **values}


def load_derived(stored: dict[str, str | int]) -> dict[str, str | int] | None:
    """Stored values back, or None if another version of `derive` wrote them."""
    if stored.pop("_v", None) != DERIVED_VERSION:
        return None
    return stored


@lru_cache(maxsize=50_000)  # ~100 MB at most; candidates of online queries repeat
def _derive(values: tuple[str | None, ...]) -> dict[str, str | int]:
    record = PersonRecord("", *values)
    name = parse_name(record.full_name, family=record.family, given=record.given) if (
        record.family or record.given
    ) else parse_name(record.full_name)
    date = parse_date(record.birth_date)
    sex = normalize_sex(record.sex)
    if record.locality or record.district or record.province:
        addr = parse_address(
            street=record.address, commune=record.locality, district=record.district, province=record.province
        )
    elif record.address and ("," in record.address or ";" in record.address):
        addr = parse_address(record.address)
    else:
        addr = parse_address(street=record.address)
    commune = addr.commune_key or (("t:" + fold(addr.commune_name)) if addr.commune_name else "")
    province = addr.province_key or _f(addr.province_name)
    national = ""
    if record.national_id:
        try:
            national = parse_cccd(record.national_id).value
        except IdentifierError:
            national = ""
    insurance = ""
    if record.insurance_id:
        try:
            insurance = social_insurance_from(record.insurance_id)
        except IdentifierError:
            insurance = _ID_CLEAN.sub("", record.insurance_id).upper()
    phone = ""
    if record.phone:
        phone = normalize_phone(record.phone) or re.sub(r"\D", "", record.phone)
    father = parse_name(record.father_name).folded if record.father_name else ""
    mother = parse_name(record.mother_name).folded if record.mother_name else ""
    return {
        "given_acc": nfc(name.given).lower(),
        "given": fold(name.given),
        "family": fold(name.family),
        "middle": fold(name.middle),
        "dob_key": date.key if date else "",
        "year": date.year if date else 0,
        "month": (date.month or 0) if date else 0,
        "day": (date.day or 0) if date else 0,
        "sex": {"male": 1, "female": 2}.get(sex or "", 0),
        "given_plain": int(nfc(name.given).lower() == fold(name.given)),  # written without diacritics
        "commune": commune,
        "province": province,
        "street": _f(addr.street),
        "street_digits": " ".join(_DIGITS.findall(addr.street)) or "-",  # house/village numbers
        "street_number": _f(record.street_number),
        "address2": _f(record.address2),
        "postcode": _ID_CLEAN.sub("", record.postcode or "").upper(),
        "phone": phone,
        "father": father,
        "mother": mother,
        "insurance": insurance,
        "other_id": _ID_CLEAN.sub("", record.other_id or "").upper(),
        "national_id": national,
    }


class PreparedTable:
    """Normalised records as columns: object arrays of str, int arrays, and int codes.

    `codes[col]` factorises each string column (-1 = missing) so equality is an integer
    compare; codes are only comparable within one table, which is why link mode and the
    online path prepare both sides together.
    """

    def __init__(self, ids: Sequence[str], rows: Sequence[dict[str, str | int]], source: Sequence[int]) -> None:
        self.ids: list[str] = list(ids)
        self.n = len(self.ids)
        self.source: npt.NDArray[np.int8] = np.asarray(source, dtype=np.int8)
        self.strs: dict[str, npt.NDArray[np.object_]] = {}
        self.codes: dict[str, npt.NDArray[np.int32]] = {}
        self.ints: dict[str, npt.NDArray[np.int32]] = {}
        self.rows = rows
        # `derive` (and the index's stored copy of it) gives str and int values, so no per-value conversion:
        # `$match` prepares a ~100-row table per query, where that was a third of this constructor.
        for col in STRING_COLUMNS:
            values: list[str] = [r[col] for r in rows]  # type: ignore[misc]
            arr = np.empty(self.n, dtype=object)
            arr[:] = values
            self.strs[col] = arr
            index: dict[str, int] = {}
            self.codes[col] = np.fromiter(
                (-1 if not v else index.setdefault(v, len(index)) for v in values), dtype=np.int32, count=self.n
            )
        for col in INT_COLUMNS:
            self.ints[col] = np.array([r[col] for r in rows], dtype=np.int32)

    @classmethod
    def against_first(cls, ids: Sequence[str], rows: Sequence[dict[str, str | int]]) -> PreparedTable:
        """A table whose only pairs are (0, j): one query (row 0) and the candidates scored against it.

        Why: `$match` builds one per query (~100 rows) and numbering every column's values was most
        of that; here a value's code says only whether it equals row 0's (0), is missing (-1), or differs
        (its row number), which is all a comparison of (0, j) reads. Codes of two candidates are not
        comparable; `score_pairs` on this table gives exactly what it gives on `PreparedTable(...)`.
        """
        t = cls.__new__(cls)
        t.ids = list(ids)
        t.n = n = len(t.ids)
        t.source = np.zeros(n, dtype=np.int8)
        t.rows = rows
        t.strs, t.codes, t.ints = {}, {}, {}
        columns = list(zip(*map(_ROW_VALUES, rows), strict=True))
        own = np.arange(n, dtype=np.int32)
        for col, values in zip(STRING_COLUMNS, columns, strict=False):
            arr = np.empty(n, dtype=object)
            arr[:] = values
            t.strs[col] = arr
            codes = np.where(arr == "", np.int32(-1), own)
            if values[0]:
                codes[arr == values[0]] = 0
            t.codes[col] = codes
        for col, ints in zip(INT_COLUMNS, columns[len(STRING_COLUMNS):], strict=True):
            t.ints[col] = np.array(ints, dtype=np.int32)
        return t


_ROW_VALUES: Final = itemgetter(*STRING_COLUMNS, *INT_COLUMNS)


def prepare_against(record: PersonRecord, candidates: Sequence[PersonRecord]) -> PreparedTable:
    """`record` (row 0) and its candidates, for scoring the pairs (0, j) only (see `against_first`)."""
    return PreparedTable.against_first([record.record_id, *(c.record_id for c in candidates)],
                                       [derive(record), *map(derive, candidates)])


def prepare(records: Iterable[PersonRecord], other: Iterable[PersonRecord] | None = None) -> PreparedTable:
    """Prepare one list (source 0), or two lists for linkage (sources 0 and 1)."""
    left = list(records)
    right = list(other) if other is not None else []
    all_records = left + right
    rows = [derive(r) for r in all_records]
    source = [0] * len(left) + [1] * len(right)
    return PreparedTable([r.record_id for r in all_records], rows, source)
