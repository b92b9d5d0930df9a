"""Vietnamese administrative units of both generations, read from PyPI `vietnamadminunits`.

Why this module exists: records made before 2025-07-01 name a province, a district and a
commune (63 provinces); later records name only a province and a commune (34 provinces,
no districts). To compare them the patient index maps every commune to the post-reform
commune code (the *canonical key*). The package ships both tables and a converter; this
module builds exact lookup indexes from its tables (fast, no fuzzy guessing) and uses its
converter only for the old→new mapping: computed ahead for every old commune (a shipped table for
the installed package version), else per old commune on first use and cached.

All codes are strings (leading zeros matter): province "24", district "217", commune "07432".
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from importlib.metadata import version
from typing import Any, Final, Literal

from lienthong.text import fold

Generation = Literal["legacy", "2025"]

_NON_ALNUM = re.compile(r"[^0-9a-z ]+")

# Prefixes of unit names, folded, longest first so "thi tran" wins over "thi".
_PREFIXES: Final[tuple[tuple[str, str], ...]] = (
    ("thanh pho", "city"), ("thi tran", "town"), ("thi xa", "townlet"), ("dac khu", "special"),
    ("tinh", "province"), ("huyen", "district"), ("quan", "urban-district"), ("phuong", "ward"),
    ("xa", "commune"), ("tp", "city"), ("tx", "townlet"), ("tt", "town"), ("q", "urban-district"),
    ("p", "ward"), ("h", "district"),
)


def unit_key(name: str) -> tuple[str, str]:
    """Return (prefix kind, key) of a unit name: "TP. Bắc Giang" → ("city", "bacgiang").

    Why: the package indexes names folded without spaces; users write prefixes, dots and
    abbreviations inconsistently, so both are stripped before lookup.
    """
    text = _NON_ALNUM.sub(" ", fold(name)).strip()
    kind = ""
    for prefix, label in _PREFIXES:
        if text.startswith(prefix + " ") and len(text) > len(prefix) + 1:
            kind, text = label, text[len(prefix) + 1 :]
            break
    return kind, text.replace(" ", "")


@dataclass(frozen=True, slots=True)
class Province:
    """A province of one generation."""

    code: str
    name: str
    short: str
    generation: Generation


@dataclass(frozen=True, slots=True)
class Commune:
    """A commune-level unit (xã, phường, thị trấn, đặc khu) of one generation."""

    code: str
    name: str
    short: str
    province_code: str
    generation: Generation
    district_code: str | None = None
    district_name: str | None = None


def _keywords(raw: Any) -> list[str]:
    if not raw:
        return []
    try:
        values = json.loads(raw)
    except (TypeError, ValueError):
        return []
    return [str(v) for v in values if v]


class AdminUnits:
    """Lookup indexes over both generations; build once with `admin_units()`."""

    def __init__(self) -> None:
        from vietnamadminunits.database import query

        self.legacy_provinces: dict[str, Province] = {}
        self.new_provinces: dict[str, Province] = {}
        self.legacy_communes: dict[str, Commune] = {}
        self.new_communes: dict[str, Commune] = {}
        self.legacy_districts: dict[str, tuple[str, str]] = {}  # code -> (name, province)
        self._legacy_province_keys: dict[str, str] = {}
        self._new_province_keys: dict[str, str] = {}
        self._district_keys: dict[tuple[str, str], list[str]] = defaultdict(list)
        self._legacy_ward_keys: dict[tuple[str, str], list[str]] = defaultdict(list)
        self._new_ward_keys: dict[tuple[str, str], list[str]] = defaultdict(list)

        for row in query(
            "SELECT DISTINCT province, provinceShort, provinceCode, provinceKeywords, district, "
            "districtShort, districtCode, districtKeywords, ward, wardShort, wardCode, wardKeywords "
            "FROM admin_units_legacy"
        ):
            pcode = str(row["provinceCode"])
            if pcode not in self.legacy_provinces:
                self.legacy_provinces[pcode] = Province(pcode, row["province"], row["provinceShort"], "legacy")
                for kw in [*_keywords(row["provinceKeywords"]), unit_key(row["province"])[1]]:
                    self._legacy_province_keys.setdefault(kw, pcode)
            dcode = str(row["districtCode"])
            if dcode not in self.legacy_districts:
                self.legacy_districts[dcode] = (row["district"], pcode)
                for kw in {*_keywords(row["districtKeywords"]), unit_key(row["district"])[1]}:
                    self._district_keys[(pcode, kw)].append(dcode)
            wcode = row["wardCode"]
            if not wcode:
                continue
            wcode = str(wcode)
            if wcode in self.legacy_communes:
                continue
            self.legacy_communes[wcode] = Commune(
                wcode, row["ward"], row["wardShort"], pcode, "legacy", dcode, row["district"]
            )
            for kw in {*_keywords(row["wardKeywords"]), unit_key(row["ward"])[1]}:
                self._legacy_ward_keys[(dcode, kw)].append(wcode)
                self._legacy_ward_keys[("p" + pcode, kw)].append(wcode)

        for row in query(
            "SELECT DISTINCT province, provinceShort, provinceCode, provinceKeywords, ward, wardShort, "
            "wardCode, wardKeywords FROM admin_units"
        ):
            pcode = str(row["provinceCode"])
            if pcode not in self.new_provinces:
                self.new_provinces[pcode] = Province(pcode, row["province"], row["provinceShort"], "2025")
                for kw in [*_keywords(row["provinceKeywords"]), unit_key(row["province"])[1]]:
                    self._new_province_keys.setdefault(kw, pcode)
            wcode = str(row["wardCode"])
            if wcode in self.new_communes:
                continue
            self.new_communes[wcode] = Commune(wcode, row["ward"], row["wardShort"], pcode, "2025")
            for kw in {*_keywords(row["wardKeywords"]), unit_key(row["ward"])[1]}:
                self._new_ward_keys[(pcode, kw)].append(wcode)

    # -- lookups ---------------------------------------------------------------------------
    def find_province(self, name: str) -> tuple[str | None, str | None]:
        """(legacy code, 2025 code) of a province name; either may be None."""
        key = unit_key(name)[1]
        return self._legacy_province_keys.get(key), self._new_province_keys.get(key)

    def find_district(self, legacy_province: str, name: str) -> str | None:
        """Legacy district code by name inside a legacy province."""
        hits = self._district_keys.get((legacy_province, unit_key(name)[1]), [])
        return hits[0] if len(hits) == 1 else None

    def find_legacy_commune(self, name: str, *, province: str, district: str | None) -> str | None:
        """Legacy commune code by name, inside a district when known, else the province
        (only when unambiguous there)."""
        kind, key = unit_key(name)
        scope = district if district else "p" + province
        hits = self._legacy_ward_keys.get((scope, key), [])
        return _pick(hits, kind, self.legacy_communes)

    def find_new_commune(self, name: str, *, province: str) -> str | None:
        """2025 commune code by name inside a 2025 province."""
        kind, key = unit_key(name)
        return _pick(self._new_ward_keys.get((province, key), []), kind, self.new_communes)

    def legacy_province_to_new(self, legacy_code: str) -> str | None:
        """2025 province code that absorbed a legacy province (Bắc Giang 24 → Bắc Ninh 24)."""
        return _legacy_province_to_new(legacy_code)

    def legacy_commune_to_new(self, legacy_code: str) -> str | None:
        """2025 commune code covering a legacy commune.

        Where a legacy commune was split, the package's default successor is returned, so
        one side of a split can miss; the comparison falls back to the province then.
        """
        return _legacy_commune_to_new(legacy_code)

    def communes_of(self, province: str, generation: Generation) -> list[Commune]:
        """All communes of a province code in one generation, sorted by code."""
        table = self.legacy_communes if generation == "legacy" else self.new_communes
        return sorted((c for c in table.values() if c.province_code == province), key=lambda c: c.code)


def _pick(hits: list[str], kind: str, table: dict[str, Commune]) -> str | None:
    unique = list(dict.fromkeys(hits))
    if len(unique) == 1:
        return unique[0]
    if len(unique) > 1 and kind:
        same_kind = [c for c in unique if unit_key(table[c].name)[0] == kind]
        if len(same_kind) == 1:
            return same_kind[0]
    return None


@lru_cache(maxsize=1)
def admin_units() -> AdminUnits:
    """The shared, lazily built index (about 0.3 s on first use)."""
    return AdminUnits()


@lru_cache(maxsize=128)
def _legacy_province_to_new(legacy_code: str) -> str | None:
    from vietnamadminunits import convert_address

    units = admin_units()
    province = units.legacy_provinces.get(legacy_code)
    if province is None:
        return None
    # Convert one commune of the province: the converter needs a commune to resolve.
    for commune in units.legacy_communes.values():
        if commune.province_code == legacy_code:
            new = _legacy_commune_to_new(commune.code)
            if new is not None:
                return units.new_communes[new].province_code
    converted = convert_address(province.name)
    return str(converted.province_code) if converted.province_code else None


SUCCESSORS: Final = "data/legacy_commune_successors.json"


@lru_cache(maxsize=20000)
def _legacy_commune_to_new(legacy_code: str) -> str | None:
    table = _successor_table()
    return table[legacy_code] if legacy_code in table else _convert_legacy_commune(legacy_code)


def _convert_legacy_commune(legacy_code: str) -> str | None:
    """The package's converter on one legacy commune (~2 ms: it parses the address text again)."""
    from vietnamadminunits import convert_address

    units = admin_units()
    commune = units.legacy_communes.get(legacy_code)
    if commune is None:
        return None
    province = units.legacy_provinces[commune.province_code]
    try:
        converted = convert_address(f"{commune.name}, {commune.district_name}, {province.name}")
    except Exception:
        return None
    code = converted.ward_code
    return str(code) if code and str(code) in units.new_communes else None


@lru_cache(maxsize=1)
def _successor_table() -> dict[str, str | None]:
    """`_convert_legacy_commune` of every legacy commune, computed ahead by
    `scripts/legacy_commune_successors.py` for the installed package version (empty for another version).

    Why: a `$match` query or a new record with a pre-2025 address otherwise pays the converter once per
    commune and process (~2 ms, a tenth of a query), which a freshly started server pays again and again.
    """
    data = json.loads(resources.files("lienthong.identity").joinpath(SUCCESSORS).read_text(encoding="utf-8"))
    if data.get("vietnamadminunits") != version("vietnamadminunits"):
        return {}
    table: dict[str, str | None] = data["successors"]
    return table


def successor_table() -> dict[str, Any]:
    """The contents of `SUCCESSORS`, computed now from the installed package (about half a minute)."""
    return {"vietnamadminunits": version("vietnamadminunits"),
            "successors": {code: _convert_legacy_commune(code) for code in sorted(admin_units().legacy_communes)}}


@lru_cache(maxsize=1)
def legacy_province_codes() -> frozenset[str]:
    """The 63 two-digit province codes in force before 2025-07-01."""
    return frozenset(admin_units().legacy_provinces)

