"""Normalisation of the demographic fields the patient index compares.

Why: the same person arrives from different HIS with names with or without tone marks,
typed with Telex/VNI slips ("Nguyeenx", "Nguyen6"), in Western order; birth dates as full
dates, years only or XML `yyyymmddHHMM` with zeros; phones with the pre-2018 11-digit
prefixes; addresses in the pre- or post-2025-07-01 administrative form. Each function
returns a canonical value so comparison can be simple and fast.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from typing import Final, Literal

from lienthong.identity.admin_units import Generation, admin_units, unit_key
from lienthong.identity.names_data import COMMON_MIDDLE_NAMES, FAMILY_NAMES
from lienthong.text import fold, nfc

Sex = Literal["male", "female"]

# ======================================================================================
# Names
# ======================================================================================

FAMILY_NAME_FREQUENCY: Final[dict[str, float]] = {}
for _name, _pct, _region in FAMILY_NAMES:
    _key = fold(_name)
    FAMILY_NAME_FREQUENCY[_key] = FAMILY_NAME_FREQUENCY.get(_key, 0.0) + _pct / 100.0
_FOLDED_MIDDLE: Final = frozenset(fold(n) for n in COMMON_MIDDLE_NAMES)

_ONSET = r"(?:ngh|ng|nh|gh|gi|kh|ph|th|tr|ch|qu|[bcdghklmnprstvx])?"
_CLUSTERS = (
    "uye", "uya", "uyu", "uoi", "uou", "oai", "oay", "oeo", "uay", "ieu", "yeu",
    "ai", "ao", "au", "ay", "eo", "eu", "ia", "ie", "iu", "oa", "oe", "oi", "oo", "ua", "ue", "ui", "uo",
    "uu", "uy", "ya", "ye", "a", "e", "i", "o", "u", "y",
)  # folded vowel nuclei, longest first
_SYLLABLE = re.compile(rf"^{_ONSET}(?:{'|'.join(_CLUSTERS)})(?:ch|nh|ng|[cmnpt])?$")
_TONES: Final[dict[str, str]] = {
    "s": "\u0301", "f": "\u0300", "r": "\u0309", "x": "\u0303", "j": "\u0323",
    "1": "\u0301", "2": "\u0300", "3": "\u0309", "4": "\u0303", "5": "\u0323",
}
_CIRCUMFLEX: Final = {"a": "â", "e": "ê", "o": "ô"}
_HORN: Final = {"o": "ơ", "u": "ư"}
_VOWELS: Final = frozenset("aăâeêioôơuưy")
_MARKED: Final = frozenset("ăâêôơư")


@lru_cache(maxsize=65536)
def is_vietnamese_syllable(token: str) -> bool:
    """True when the folded token is a possible Vietnamese syllable (onset+rhyme)."""
    return bool(_SYLLABLE.match(fold(token)))


def _place_tone(base: str, tone: str) -> str:
    """Put a tone mark on the right vowel of a syllable written with vowel marks only."""
    positions = [i for i, ch in enumerate(base) if ch in _VOWELS]
    if len(positions) > 1 and (base.startswith("qu") or (base.startswith("gi") and base[2:3] in _VOWELS)):
        positions = positions[1:]
    if not positions:
        return base
    marked = [i for i in positions if base[i] in _MARKED]
    if marked:
        target = marked[-1]
    elif positions[-1] < len(base) - 1:  # closed syllable: last vowel of the nucleus
        target = positions[-1]
    elif len(positions) == 3:
        target = positions[1]
    else:
        target = positions[0]
    return unicodedata.normalize("NFC", base[: target + 1] + tone + base[target + 1 :])


@lru_cache(maxsize=65536)
def fix_typing(token: str) -> str:
    """Decode a syllable typed with a Telex or VNI slip ("Nguyeenx", "Nguyen6" → "Nguyễn", "Nguyên").

    Why: input methods sometimes leave their key sequences in the text. A token is only
    rewritten when it is *not* already a Vietnamese syllable and the decoded form is one,
    so foreign names ("Ross", "Jones") are left alone.
    """
    if not token or not token.isalnum():
        return token
    lower = token.lower()
    if fold(lower) != lower.replace("đ", "d"):  # already carries diacritics
        return token
    has_digit = any(ch.isdigit() for ch in lower)
    if not has_digit and is_vietnamese_syllable(lower):
        return token
    decoded = _decode_vni(lower) if has_digit else _decode_telex(lower)
    if decoded is None or not is_vietnamese_syllable(decoded):
        return token
    return decoded[:1].upper() + decoded[1:] if token[:1].isupper() else decoded


def _decode_vni(text: str) -> str | None:
    tone = ""
    letters: list[str] = []
    for ch in text:
        if not ch.isdigit():
            letters.append(ch)
        elif ch in "12345":
            tone = _TONES[ch]
        elif ch == "0":
            tone = ""
        elif ch == "6":
            idx = max((i for i, c in enumerate(letters) if c in _CIRCUMFLEX), default=-1)
            if idx < 0:
                return None
            letters[idx] = _CIRCUMFLEX[letters[idx]]
        elif ch == "7":
            word = "".join(letters)
            if "uo" in word:
                i = word.rindex("uo")
                letters[i : i + 2] = ["ư", "ơ"]
            else:
                idx = max((i for i, c in enumerate(letters) if c in _HORN), default=-1)
                if idx < 0:
                    return None
                letters[idx] = _HORN[letters[idx]]
        elif ch == "8":
            idx = max((i for i, c in enumerate(letters) if c == "a"), default=-1)
            if idx < 0:
                return None
            letters[idx] = "ă"
        elif ch == "9":
            if not letters or letters[0] != "d":
                return None
            letters[0] = "đ"
    base = "".join(letters)
    return _place_tone(base, tone) if tone else base


def _decode_telex(text: str) -> str | None:
    tone = ""
    first_vowel = next((i for i, c in enumerate(text) if c in "aeiouy"), -1)
    if first_vowel < 0:
        return None
    kept: list[str] = []
    if sum(1 for ch in text[first_vowel + 1 :] if ch in "sfrxj") > 1:
        return None  # "ross": a doubled key undoes the tone in Telex; not a slip we can read
    for i, ch in enumerate(text):
        if i > first_vowel and ch in "sfrxj":
            tone = _TONES[ch]
        elif i > first_vowel and ch == "z":
            tone = ""
        else:
            kept.append(ch)
    word = "".join(kept)
    if word.startswith("dd"):
        word = "đ" + word[2:]
    word = word.replace("uow", "ươ").replace("uwow", "ươ")
    for src, dst in (("aa", "â"), ("ee", "ê"), ("oo", "ô"), ("aw", "ă"), ("ow", "ơ"), ("uw", "ư")):
        word = word.replace(src, dst)
    if "w" in word:  # a trailing horn/breve key: "nguoiw" → "ngươi"
        word = word.replace("w", "")
        if "uo" in word:
            i = word.rindex("uo")
            word = word[:i] + "ươ" + word[i + 2 :]
        elif "o" in word:
            i = word.rindex("o")
            word = word[:i] + "ơ" + word[i + 1 :]
        elif "u" in word:
            i = word.rindex("u")
            word = word[:i] + "ư" + word[i + 1 :]
        elif "a" in word:
            i = word.rindex("a")
            word = word[:i] + "ă" + word[i + 1 :]
        else:
            return None
    return _place_tone(word, tone) if tone else word


def _looks_vietnamese(tokens: list[str]) -> bool:
    """Every token a Vietnamese syllable and one a known family/middle name or accented."""
    return all(is_vietnamese_syllable(t) for t in tokens) and any(
        fold(t) in FAMILY_NAME_FREQUENCY or fold(t) in _FOLDED_MIDDLE or fold(t) != t.lower() for t in tokens
    )


@lru_cache(maxsize=65536)
def clean_name_text(value: str, *, vietnamese: bool | None = None) -> str:
    """NFC, strip punctuation, title-case each syllable and repair typing slips.

    Slips are only repaired in names that look Vietnamese (a known family or middle
    name, or any diacritic), so "Lee Smith" keeps its spelling; pass `vietnamese` to force.
    """
    tokens = [t for t in re.split(r"[\s,.;_\-]+", nfc(value).strip()) if t]
    if vietnamese is None:
        vietnamese = _looks_vietnamese([fix_typing(t) for t in tokens])
    out = []
    for tok in tokens:
        fixed = fix_typing(tok) if vietnamese else tok
        out.append(fixed[:1].upper() + fixed[1:].lower())
    return " ".join(out)


@dataclass(frozen=True, slots=True)
class PersonName:
    """A Vietnamese name split as family, middle, given (the Vietnamese order)."""

    family: str
    middle: str
    given: str
    reordered: bool = False  # True when the input was in Western (given-first) order

    @property
    def full(self) -> str:
        """The name in Vietnamese order."""
        return " ".join(p for p in (self.family, self.middle, self.given) if p)

    @property
    def folded(self) -> str:
        """Match key of the full name."""
        return fold(self.full)


def is_family_name(value: str) -> bool:
    """True for one of the ~100 common Vietnamese family names (folded compare)."""
    return fold(value) in FAMILY_NAME_FREQUENCY


def family_name_frequency(value: str) -> float:
    """Rough population share of a family name; 0 when not in the list."""
    return FAMILY_NAME_FREQUENCY.get(fold(value), 0.0)


@lru_cache(maxsize=65536)
def parse_name(full: str | None = None, *, family: str | None = None, given: str | None = None) -> PersonName:
    """Split a name into family/middle/given, detecting given-first (Western) order.

    With separate `family` and `given` (FEBRL-style or HIS columns) the middle part is what
    follows the family name in `family` or precedes the last syllable of `given`.
    """
    raw = [t for t in re.split(r"[\s,.;_\-]+", nfc(f"{family or ''} {given or ''}")) if t]
    vietnamese = _looks_vietnamese([fix_typing(t) for t in raw])
    fam = clean_name_text(family or "", vietnamese=vietnamese)
    giv = clean_name_text(given or "", vietnamese=vietnamese)
    if fam or giv:
        if fam and giv and not is_family_name(fam.split()[0]) and is_family_name(giv.split()[-1]):
            # Columns filled the Western way round: given holds the family name.
            fam, giv = giv, fam
            swapped = True
        else:
            swapped = False
        fam_tokens, giv_tokens = fam.split(), giv.split()
        middle = fam_tokens[1:] + giv_tokens[:-1]
        return PersonName(
            fam_tokens[0] if fam_tokens else "",
            " ".join(middle),
            giv_tokens[-1] if giv_tokens else "",
            swapped,
        )
    tokens = clean_name_text(full or "").split()
    if not tokens:
        return PersonName("", "", "")
    if len(tokens) == 1:
        return PersonName("", "", tokens[0])
    if not is_family_name(tokens[0]) and is_family_name(tokens[-1]):
        rest = tokens[:-1]
        if len(rest) >= 2 and fold(rest[0]) in _FOLDED_MIDDLE:
            return PersonName(tokens[-1], " ".join(rest[:-1]), rest[-1], True)
        return PersonName(tokens[-1], " ".join(rest[1:]), rest[0], True)
    return PersonName(tokens[0], " ".join(tokens[1:-1]), tokens[-1])


# ======================================================================================
# Sex
# ======================================================================================

_SEX_VALUES: Final[dict[str, Sex]] = {
    "male": "male", "m": "male", "nam": "male", "1": "male", "trai": "male",
    "female": "female", "f": "female", "nu": "female", "2": "female", "gai": "female",
}


def normalize_sex(value: str | None) -> Sex | None:
    """FHIR-style sex from HIS codes (1/2), Vietnamese (nam/nữ) or English values."""
    if not value:
        return None
    return _SEX_VALUES.get(fold(value).strip())


# ======================================================================================
# Dates
# ======================================================================================

@dataclass(frozen=True, slots=True)
class PartialDate:
    """A birth date whose month and day may be unknown (None)."""

    year: int
    month: int | None = None
    day: int | None = None

    @property
    def key(self) -> str:
        """`yyyymmdd` with 00 for unknown parts (the XML convention)."""
        return f"{self.year:04d}{self.month or 0:02d}{self.day or 0:02d}"

    @property
    def is_valid(self) -> bool:
        """Whether the known parts form a real calendar date."""
        if self.month is not None and not 1 <= self.month <= 12:
            return False
        if self.day is None:
            return True
        if self.month is None:
            return False
        import calendar

        return 1 <= self.day <= calendar.monthrange(self.year, self.month)[1]

    def isoformat(self) -> str:
        """FHIR date: yyyy, yyyy-mm or yyyy-mm-dd."""
        if self.month is None:
            return f"{self.year:04d}"
        if self.day is None:
            return f"{self.year:04d}-{self.month:02d}"
        return f"{self.year:04d}-{self.month:02d}-{self.day:02d}"


_ISO = re.compile(r"^(\d{4})(?:[-/.](\d{1,2})(?:[-/.](\d{1,2}))?)?(?:[T ].*)?$")
_DMY = re.compile(r"^(?:(\d{1,2})[-/.])?(\d{1,2})[-/.](\d{4})(?: .*)?$")


def parse_date(value: str | None) -> PartialDate | None:
    """Parse full, year-month, year-only, dd/mm/yyyy and XML `yyyymmdd[HHMM]` dates.

    Unknown parts written as zeros (XML convention) become None. Impossible month/day
    numbers are kept (typos still compare by digits) but `is_valid` reports them.
    """
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        if len(text) == 12:
            text = text[:8]
        if len(text) in (4, 6, 8):
            year = int(text[:4])
            month = int(text[4:6]) if len(text) >= 6 else 0
            day = int(text[6:8]) if len(text) == 8 else 0
            return _partial(year, month, day)
        return None
    match = _ISO.match(text)
    if match:
        return _partial(int(match[1]), int(match[2] or 0), int(match[3] or 0))
    match = _DMY.match(text)
    if match:
        return _partial(int(match[3]), int(match[2]), int(match[1] or 0))
    return None


def _partial(year: int, month: int, day: int) -> PartialDate | None:
    if year == 0:
        return None
    if month == 0:
        return PartialDate(year)
    return PartialDate(year, month, day or None)


DateLevel = Literal["exact", "swapped", "partial", "typo", "year", "different", "missing"]


def compare_dates(a: PartialDate | None, b: PartialDate | None) -> DateLevel:
    """Comparison level of two birth dates, most specific first.

    `swapped`: day and month exchanged (dd/mm vs mm/dd entry); `partial`: one side (or
    both) only has the year (or year-month) and the known parts agree; `typo`: one digit differs
    or two adjacent digits are transposed in `yyyymmdd`.
    """
    if a is None or b is None:
        return "missing"
    if a == b and a.day is not None:
        return "exact"
    if a.year == b.year and a.month and b.month and a.day and b.day and (a.month, a.day) == (b.day, b.month):
        return "swapped"
    if a.year == b.year and (a.day is None or b.day is None) and (
        a.month is None or b.month is None or a.month == b.month
    ):
        return "partial"
    if a.day and b.day and a.month and b.month and _one_edit(a.key, b.key):
        return "typo"
    if a.year == b.year:
        return "year"
    return "different"


def _one_edit(a: str, b: str) -> bool:
    diff = [i for i in range(len(a)) if a[i] != b[i]]
    if len(diff) == 1:
        return True
    return len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]]


# ======================================================================================
# Phones
# ======================================================================================

OLD_MOBILE_PREFIXES: Final[dict[str, str]] = {
    # Viettel
    "0162": "032", "0163": "033", "0164": "034", "0165": "035", "0166": "036",
    "0167": "037", "0168": "038", "0169": "039",
    # MobiFone
    "0120": "070", "0121": "079", "0122": "077", "0126": "076", "0128": "078",
    # VinaPhone
    "0123": "083", "0124": "084", "0125": "085", "0127": "081", "0129": "082",
    # Vietnamobile, Gmobile
    "0186": "056", "0188": "058", "0199": "059",
}
"""11-digit mobile prefixes renumbered in 2018 (MIC Decision 798/QĐ-BTTTT)."""


def normalize_phone(value: str | None) -> str | None:
    """E.164 `+84…` form; old 11-digit mobiles are renumbered to 10 digits.

    Returns None when the digits cannot be a Vietnamese number (too short or long).
    """
    if not value:
        return None
    digits = re.sub(r"\D", "", value)
    if digits.startswith("0084"):
        digits = "0" + digits[4:]
    elif digits.startswith("84") and len(digits) in (11, 12):
        digits = "0" + digits[2:]
    elif not digits.startswith("0") and len(digits) in (9, 10):
        digits = "0" + digits
    if len(digits) == 11 and digits[:4] in OLD_MOBILE_PREFIXES:
        digits = OLD_MOBILE_PREFIXES[digits[:4]] + digits[4:]
    if not digits.startswith("0") or not 10 <= len(digits) <= 11:
        return None
    return "+84" + digits[1:]


# ======================================================================================
# Addresses
# ======================================================================================

@dataclass(frozen=True, slots=True)
class Address:
    """A parsed address, mapped to the post-2025 commune code when possible.

    `commune_key` is the canonical key that makes pre- and post-reform records comparable.
    """

    street: str = ""
    commune_key: str | None = None  # 2025 commune code
    province_key: str | None = None  # 2025 province code
    legacy_commune: str | None = None
    legacy_district: str | None = None
    legacy_province: str | None = None
    generation: Generation | None = None
    commune_name: str = ""  # the commune text as written, when not resolved
    province_name: str = ""

    @property
    def resolved(self) -> bool:
        """Whether the commune was found in one of the two generations."""
        return self.commune_key is not None


_COMMUNE_KINDS: Final = frozenset({"commune", "ward", "town", "special"})
_UNIT_WORDS = re.compile(
    r"\b(thanh pho|thi tran|thi xa|dac khu|tinh|huyen|quan|phuong|xa|tp)\b(?=[ .])"
)


def _split_address(text: str) -> list[str]:
    original = " ".join(nfc(text).split())
    if "," not in original and ";" not in original:
        folded = fold(original)
        if len(folded) == len(original):
            cuts = [m.start() for m in _UNIT_WORDS.finditer(folded) if m.start() > 0]
            pieces, start = [], 0
            for cut in cuts:
                pieces.append(original[start:cut])
                start = cut
            pieces.append(original[start:])
            return [p.strip(" ,") for p in pieces if p.strip(" ,")]
    return [p.strip() for p in re.split(r"[,;]", original) if p.strip()]


def parse_address(
    text: str | None = None,
    *,
    street: str | None = None,
    commune: str | None = None,
    district: str | None = None,
    province: str | None = None,
) -> Address:
    """Parse an address given as free text and/or parts, in either generation.

    Free text is split on commas (or before unit words such as "xã", "huyện"); from the
    right: province, legacy district (when the name is one), commune, then the street.
    """
    street_parts: list[str] = [street.strip()] if street and street.strip() else []
    if text and text.strip():
        parts = _split_address(text)
        if not province and parts:
            province = parts.pop()
        units = admin_units()
        legacy_p, _new_p = units.find_province(province or "")
        if (
            not district and len(parts) >= 2 and legacy_p
            and unit_key(parts[-1])[0] not in _COMMUNE_KINDS  # "Xã Yên Phong" is not "Huyện Yên Phong"
            and units.find_district(legacy_p, parts[-1])
        ):
            district = parts.pop()
        if not commune and parts:
            commune = parts.pop()
        street_parts = parts + street_parts
    resolved = _resolve(commune or "", district or "", province or "")
    street_text = ", ".join(street_parts)
    if resolved is None:
        return Address(street_text, None, None, commune_name=commune or "", province_name=province or "")
    return Address(street_text, *resolved, commune_name=commune or "", province_name=province or "")


@lru_cache(maxsize=50000)
def _resolve(
    commune: str, district: str, province: str
) -> tuple[str | None, str | None, str | None, str | None, str | None, Generation] | None:
    """(commune key, province key, legacy commune, legacy district, legacy province, generation)."""
    units = admin_units()
    legacy_p, new_p = units.find_province(province)
    if legacy_p is None and new_p is None:
        return None
    mapped_p = new_p or (units.legacy_province_to_new(legacy_p) if legacy_p else None)
    if not commune:
        return None if mapped_p is None else (None, mapped_p, None, None, None, "2025")
    if district and legacy_p:
        d = units.find_district(legacy_p, district)
        w = units.find_legacy_commune(commune, province=legacy_p, district=d) if d else None
        if w is not None:
            new_w = units.legacy_commune_to_new(w)
            return new_w, mapped_p, w, d, legacy_p, "legacy"
    if new_p:
        w = units.find_new_commune(commune, province=new_p)
        if w is not None:
            return w, new_p, None, None, None, "2025"
    if legacy_p:
        w = units.find_legacy_commune(commune, province=legacy_p, district=None)
        if w is not None:
            c = units.legacy_communes[w]
            return units.legacy_commune_to_new(w), mapped_p, w, c.district_code, legacy_p, "legacy"
        if mapped_p and not new_p:  # new commune name written with the old province name
            w = units.find_new_commune(commune, province=mapped_p)
            if w is not None:
                return w, mapped_p, None, None, None, "2025"
    if legacy_p and not new_p:
        return None, mapped_p, None, None, legacy_p, "legacy"
    return None, mapped_p, None, None, None, "2025"
