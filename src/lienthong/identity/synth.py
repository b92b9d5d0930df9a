"""Synthetic Vietnamese patient population with ground truth, deterministic by seed.

Why: there is no public labelled Vietnamese patient data set. The generator reproduces
the difficulties the index meets in Bắc Giang/Bắc Ninh: frequent family names, names
without diacritics or with Telex/VNI slips, swapped day/month, addresses written before
or after the 2025-07-01 reform, old 11-digit phones, missing identifiers — and hard
negatives (twins; namesakes born the same year in the same commune).

Only `random.Random(seed)` is used, so a seed gives the same CSV on every platform.
"""

from __future__ import annotations

import calendar
import csv
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import IO, Final

from lienthong.identity.admin_units import admin_units
from lienthong.identity.names_data import (
    FAMILY_NAMES,
    GIVEN_NAMES_FEMALE,
    GIVEN_NAMES_MALE,
    MIDDLE_NAMES_FEMALE,
    MIDDLE_NAMES_MALE,
)
from lienthong.identity.normalize import OLD_MOBILE_PREFIXES
from lienthong.identity.records import PersonRecord
from lienthong.text import fold

NEW_MOBILE_PREFIXES: Final = (
    "086", "096", "097", "098", "032", "033", "034", "035", "036", "037", "038", "039",
    "088", "091", "094", "081", "082", "083", "084", "085", "089", "090", "093", "070",
    "076", "077", "078", "079", "056", "058", "059",
)
_NEW_TO_OLD: Final = {new: old for old, new in OLD_MOBILE_PREFIXES.items()}
VILLAGES: Final = (
    "Thôn Đông", "Thôn Tây", "Thôn Trung", "Thôn Hạ", "Thôn Thượng", "Thôn Nội", "Thôn Ngoài",
    "Thôn Chùa", "Thôn Đình", "Thôn Mới", "Thôn Cầu", "Thôn Hòa Bình", "Thôn Tân Lập", "Thôn Đồng Quan",
)
STREETS: Final = (
    "Lê Lợi", "Trần Phú", "Nguyễn Văn Cừ", "Hoàng Văn Thụ", "Ngô Gia Tự", "Xương Giang", "Lý Thái Tổ",
    "Nguyễn Thị Minh Khai", "Hùng Vương", "Lê Lai", "Trần Hưng Đạo", "Nguyễn Trãi", "Quang Trung",
)
BHYT_ADULT: Final = ("DN", "GD", "HN", "CN", "HC", "HT", "CH", "XN")


@dataclass(frozen=True, slots=True)
class Commune:
    """A commune usable for addresses: its legacy form and its post-reform successor."""

    legacy_name: str
    district_name: str
    legacy_province: str
    new_name: str
    new_province: str
    urban: bool


@dataclass(slots=True)
class Person:
    """The truth about one synthetic person."""

    person_id: str
    sex: str
    family: str
    middle: str
    given: str
    year: int
    month: int
    day: int
    cccd: str
    si_number: str
    bhyt_category: str
    bhyt_level: int
    phone: str | None
    commune: Commune
    street: str
    father: str
    mother: str
    kind: str = "person"  # person | twin | namesake


@dataclass(slots=True)
class SyntheticRecord:
    """A generated record and the id of the person it belongs to."""

    record: PersonRecord
    true_person_id: str
    kind: str = field(default="original")  # original | duplicate


@lru_cache(maxsize=1)
def pilot_communes() -> tuple[Commune, ...]:
    """Real communes of legacy Bắc Giang (24) and Bắc Ninh (27) with their 2025 successor."""
    units = admin_units()
    out: list[Commune] = []
    for legacy_code in ("24", "27"):
        province = units.legacy_provinces[legacy_code]
        for c in units.communes_of(legacy_code, "legacy"):
            new_code = units.legacy_commune_to_new(c.code)
            if new_code is None:
                continue
            new = units.new_communes[new_code]
            out.append(
                Commune(
                    c.name, c.district_name or "", province.name, new.name,
                    units.new_provinces[new.province_code].name, not c.name.startswith("Xã"),
                )
            )
    return tuple(out)


def _weighted(rng: random.Random, items: Sequence[tuple[str, float, str]], region: str) -> str:
    weights = [w * (3.0 if r and r == region else 1.0 if not r else 0.3) for _, w, r in items]
    return rng.choices([n for n, _, _ in items], weights=weights)[0]


def _middle(rng: random.Random, sex: str) -> str:
    table = MIDDLE_NAMES_MALE if sex == "male" else MIDDLE_NAMES_FEMALE
    names = [n for n, _ in table]
    weights = [w for _, w in table]
    first = rng.choices(names, weights=weights)[0]
    if sex == "female" and first == "Thị" and rng.random() < 0.15:
        return first + " " + rng.choice(["Thu", "Thanh", "Ngọc", "Hồng", "Minh", "Kim"])
    return first


class _Generator:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.communes = pilot_communes()
        self.cccd_seen: set[str] = set()
        self.si_seen: set[str] = set()
        self.phones_seen: set[str] = set()
        self.counter = 0
        units = admin_units()
        self.other_cccd_provinces = sorted("0" + c for c in units.legacy_provinces)

    def _unique_digits(self, prefix: str, n: int, seen: set[str]) -> str:
        while True:
            value = prefix + "".join(self.rng.choice("0123456789") for _ in range(n))
            if value not in seen:
                seen.add(value)
                return value

    def name(self, sex: str, region: str) -> tuple[str, str, str]:
        family = _weighted(self.rng, FAMILY_NAMES, region)
        given = _weighted(self.rng, GIVEN_NAMES_MALE if sex == "male" else GIVEN_NAMES_FEMALE, region)
        return family, _middle(self.rng, sex), given

    def person(self) -> Person:
        rng = self.rng
        self.counter += 1
        sex = rng.choice(("male", "female"))
        region = rng.choices(("N", "", "S"), weights=(92, 5, 3))[0]
        family, middle, given = self.name(sex, region)
        year = min(2024, int(rng.triangular(1930, 2025, 1995)))
        month = rng.randint(1, 12)
        day = rng.randint(1, calendar.monthrange(year, month)[1])
        commune = rng.choice(self.communes)
        birth_province = rng.choices(
            ["024", "027", rng.choice(self.other_cccd_provinces)], weights=(75, 15, 10)
        )[0]
        century_digit = (0 if year < 2000 else 2) + (0 if sex == "male" else 1)
        cccd = self._unique_digits(f"{birth_province}{century_digit}{year % 100:02d}", 6, self.cccd_seen)
        si = self._unique_digits("24", 8, self.si_seen)
        age = 2025 - year
        category = "TE" if age < 6 else "HS" if age < 18 else "HT" if age >= 60 else rng.choice(BHYT_ADULT)
        level = rng.choices((1, 2, 3, 4, 5), weights=(5, 10, 20, 60, 5))[0]
        phone = None
        if rng.random() < 0.85:
            phone = self._unique_digits(rng.choice(NEW_MOBILE_PREFIXES), 7, self.phones_seen)
        if commune.urban and rng.random() < 0.7:
            street = f"Số {rng.randint(1, 250)} đường {rng.choice(STREETS)}"
        else:
            street = rng.choice(VILLAGES) if rng.random() < 0.7 else f"Thôn {rng.randint(1, 12)}"
        father = " ".join((family, _middle(rng, "male"), _weighted(rng, GIVEN_NAMES_MALE, region)))
        mother_family = _weighted(rng, FAMILY_NAMES, region)
        mother = " ".join((mother_family, _middle(rng, "female"), _weighted(rng, GIVEN_NAMES_FEMALE, region)))
        return Person(
            f"P{self.counter:07d}", sex, family, middle, given, year, month, day, cccd, si, category, level,
            phone, commune, street, father, mother,
        )

    def twin(self, p: Person) -> Person:
        """Same parents, birth date, address and phone; different given name and ids."""
        rng = self.rng
        self.counter += 1
        sex = p.sex if rng.random() < 0.5 else ("female" if p.sex == "male" else "male")
        table = GIVEN_NAMES_MALE if sex == "male" else GIVEN_NAMES_FEMALE
        given = p.given
        while fold(given) == fold(p.given):
            given = _weighted(rng, table, "N")
        century_digit = (0 if p.year < 2000 else 2) + (0 if sex == "male" else 1)
        cccd = self._unique_digits(f"{p.cccd[:3]}{century_digit}{p.year % 100:02d}", 6, self.cccd_seen)
        middle = p.middle if sex == p.sex else _middle(rng, sex)
        return replace(
            p, person_id=f"P{self.counter:07d}", sex=sex, given=given, middle=middle, cccd=cccd,
            si_number=self._unique_digits("24", 8, self.si_seen), kind="twin",
        )

    def namesake(self, p: Person) -> Person:
        """A different person with the same full name and birth year in the same commune."""
        other = self.person()
        return replace(
            other, sex=p.sex, family=p.family, middle=p.middle, given=p.given, year=p.year,
            cccd=self._unique_digits(p.cccd[:6], 6, self.cccd_seen), commune=p.commune, kind="namesake",
        )

    # -- rendering ---------------------------------------------------------------------------
    def render(self, p: Person, rid: str, duplicate: bool) -> PersonRecord:
        rng = self.rng
        tokens = [p.family, *p.middle.split(), p.given]
        if duplicate:
            tokens = self.corrupt_name(tokens)
        full = " ".join(tokens)
        if duplicate and rng.random() < 0.04:
            full = " ".join([*tokens[1:], tokens[0]])  # Western order from some HIS
        year, month, day = p.year, p.month, p.day
        date_style = rng.random()
        if duplicate and rng.random() < 0.05 and day <= 12 and day != month:
            month, day = day, month
        if duplicate and rng.random() < 0.04:
            birth = f"{year:04d}" if date_style < 0.6 else f"{year:04d}00000000"
        elif duplicate and rng.random() < 0.03:
            digits = list(f"{year:04d}{month:02d}{day:02d}")
            k = rng.randrange(4, 8)
            digits[k] = rng.choice("0123456789")
            birth = "".join(digits)
        elif date_style < 0.6:
            birth = f"{year:04d}-{month:02d}-{day:02d}"
        elif date_style < 0.85:
            birth = f"{year:04d}{month:02d}{day:02d}0000"
        else:
            birth = f"{day:02d}/{month:02d}/{year:04d}"
        sex_value = {"male": ("male", "1", "Nam"), "female": ("female", "2", "Nữ")}[p.sex][rng.randrange(3)]
        if duplicate and rng.random() < 0.05:
            sex_value = ""
        new_form = rng.random() < 0.4
        street = p.street if not (duplicate and rng.random() < 0.15) else ""
        if duplicate and street and rng.random() < 0.3:
            street = fold(street).title()
        locality, district, province = (
            (p.commune.new_name, "", p.commune.new_province) if new_form
            else (p.commune.legacy_name, p.commune.district_name, p.commune.legacy_province)
        )
        address: str | None = street or None
        if rng.random() < 0.2:  # free text in one column
            address = ", ".join(x for x in (street, locality, district, province) if x)
            locality = district = province = ""
        phone = p.phone
        if phone and duplicate and rng.random() < 0.25:
            phone = None
        if phone and not new_form and phone[:3] in _NEW_TO_OLD and rng.random() < 0.4:
            phone = _NEW_TO_OLD[phone[:3]] + phone[3:]
        if phone and rng.random() < 0.3:
            phone = f"{phone[:4]} {phone[4:7]} {phone[7:]}"
        has_cccd = rng.random() < (0.45 if duplicate else 0.6)
        insurance: str | None = None
        if rng.random() < (0.45 if duplicate else 0.6):
            insurance = (
                f"{p.bhyt_category}{p.bhyt_level}24{p.si_number}" if rng.random() < 0.6 else p.si_number
            )
        parents = rng.random() < (0.25 if duplicate else 0.4) or (2025 - p.year < 16 and rng.random() < 0.8)
        father, mother = (p.father, p.mother) if parents else (None, None)
        if father and mother and duplicate and rng.random() < 0.3:
            father, mother = fold(father).title(), fold(mother).title()
        return PersonRecord(
            record_id=rid,
            full_name=full,
            birth_date=birth,
            sex=sex_value or None,
            phone=phone,
            address=address,
            locality=locality or None,
            district=district or None,
            province=province or None,
            national_id=p.cccd if has_cccd else None,
            insurance_id=insurance,
            father_name=father,
            mother_name=mother,
        )

    def corrupt_name(self, tokens: list[str]) -> list[str]:
        rng = self.rng
        out = list(tokens)
        if rng.random() < 0.3:
            out = [fold(t).title() for t in out]
        if rng.random() < 0.07:
            k = rng.randrange(len(out))
            out[k] = _telex(out[k])
        elif rng.random() < 0.03:
            k = rng.randrange(len(out))
            out[k] = _vni(out[k])
        if rng.random() < 0.06:
            k = rng.choice((0, len(out) - 1))
            out[k] = _typo(rng, out[k])
        return out


_TELEX_TONES: Final = {"\u0301": "s", "\u0300": "f", "\u0309": "r", "\u0303": "x", "\u0323": "j"}
_VNI_TONES: Final = {"\u0301": "1", "\u0300": "2", "\u0309": "3", "\u0303": "4", "\u0323": "5"}
_TELEX_MARKS: Final = {"â": "aa", "ê": "ee", "ô": "oo", "ă": "aw", "ơ": "ow", "ư": "uw", "đ": "dd"}
_VNI_MARKS: Final = {"â": "a6", "ê": "e6", "ô": "o6", "ă": "a8", "ơ": "o7", "ư": "u7", "đ": "d9"}


def _typing(token: str, marks: dict[str, str], tones: dict[str, str]) -> str:
    """Render a syllable as its raw key sequence, tone key last (a forgotten IME switch)."""
    import unicodedata

    tone = ""
    letters: list[str] = []
    for ch in unicodedata.normalize("NFD", token.lower()):
        if ch in tones:
            tone = tones[ch]
        else:
            letters.append(ch)
    base = unicodedata.normalize("NFC", "".join(letters))
    out = "".join(marks.get(ch, ch) for ch in base) + tone
    return out[:1].upper() + out[1:] if token[:1].isupper() else out


def _telex(token: str) -> str:
    return _typing(token, _TELEX_MARKS, _TELEX_TONES)


def _vni(token: str) -> str:
    return _typing(token, _VNI_MARKS, _VNI_TONES)


def _typo(rng: random.Random, token: str) -> str:
    if len(token) < 3:
        return token
    k = rng.randrange(1, len(token))
    op = rng.randrange(4)
    letters = "abcdeghiklmnopqrstuvxy"
    if op == 0:
        return token[:k] + token[k + 1 :]
    if op == 1:
        return token[:k] + rng.choice(letters) + token[k:]
    if op == 2:
        return token[:k] + rng.choice(letters) + token[k + 1 :]
    if k < len(token) - 1:
        return token[:k] + token[k + 1] + token[k] + token[k + 2 :]
    return token


def generate(
    n_records: int,
    seed: int = 0,
    *,
    duplicate_rate: float = 0.3,
    twin_rate: float = 0.01,
    namesake_rate: float = 0.01,
) -> list[SyntheticRecord]:
    """Generate `n_records` records (originals, duplicates, twins, namesakes), shuffled.

    About `duplicate_rate` of people get 1–3 extra records; `twin_rate` of people get a
    twin and `namesake_rate` a namesake (both distinct people, so hard negatives).
    """
    gen = _Generator(seed)
    rng = gen.rng
    people: list[tuple[Person, int]] = []
    total = 0
    while total < n_records:
        p = gen.person()
        group = [p]
        r = rng.random()
        if r < twin_rate:
            group.append(gen.twin(p))
        elif r < twin_rate + namesake_rate:
            group.append(gen.namesake(p))
        for q in group:
            copies = 1
            if rng.random() < duplicate_rate:
                copies += 1 + min(int(rng.expovariate(1.5)), 2)
            people.append((q, copies))
            total += copies
    out: list[SyntheticRecord] = []
    rid = 0
    for p, copies in people:
        for c in range(copies):
            rid += 1
            out.append(SyntheticRecord(gen.render(p, f"R{rid:08d}", c > 0), p.person_id,
                                       "duplicate" if c else "original"))
    out = out[:n_records]
    rng.shuffle(out)
    return out


CSV_COLUMNS: Final[tuple[str, ...]] = ("record_id", "true_person_id", *(
    f.name for f in fields(PersonRecord) if f.name != "record_id"
))


def iter_rows(records: Sequence[SyntheticRecord]) -> Iterator[dict[str, str]]:
    """CSV rows: every PersonRecord field plus `true_person_id` (empty = missing)."""
    for s in records:
        row = {name: getattr(s.record, name) or "" for name in CSV_COLUMNS if name != "true_person_id"}
        row["true_person_id"] = s.true_person_id
        yield row


def write_csv(records: Sequence[SyntheticRecord], out: IO[str] | str | Path) -> None:
    """Write records as UTF-8 CSV with a header (columns = PersonRecord field names)."""
    if isinstance(out, (str, Path)):
        with open(out, "w", encoding="utf-8", newline="") as fh:
            write_csv(records, fh)
        return
    writer = csv.DictWriter(out, fieldnames=list(CSV_COLUMNS))
    writer.writeheader()
    writer.writerows(iter_rows(records))
