"""Vietnamese person identifiers: validation, parsing and FHIR naming systems.

Why strict parsing with reasons: identifiers drive deterministic matching (an equal valid
CCCD links two records), so a malformed or inconsistent value must be rejected with a
message the registration clerk understands (Vietnamese first, English after).

Codes are always `str`: leading zeros are significant ("024…", "01001").

Naming systems (FHIR `Identifier.system`), stable URIs owned by the project:

| Identifier | Constant | URI |
|---|---|---|
| Personal ID number (CCCD, 12 digits) | `CCCD_SYSTEM` | https://lienthong.vn/fhir/sid/cccd |
| Old ID card (CMND, 9 digits) | `CMND_SYSTEM` | https://lienthong.vn/fhir/sid/cmnd |
| Passport | `PASSPORT_SYSTEM` | https://lienthong.vn/fhir/sid/passport |
| Social-insurance number (BHXH, 10 digits) | `BHXH_SYSTEM` | https://lienthong.vn/fhir/sid/bhxh |
| Health-insurance card (BHYT, 15 chars) | `BHYT_SYSTEM` | https://lienthong.vn/fhir/sid/bhyt |
| Facility patient code (MA_BN) | `ma_bn_system(code)` | https://lienthong.vn/fhir/sid/ma-bn/{facility_code} |
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Final, Literal

from lienthong.identity.admin_units import legacy_province_codes

CCCD_SYSTEM: Final = "https://lienthong.vn/fhir/sid/cccd"
CMND_SYSTEM: Final = "https://lienthong.vn/fhir/sid/cmnd"
PASSPORT_SYSTEM: Final = "https://lienthong.vn/fhir/sid/passport"
BHXH_SYSTEM: Final = "https://lienthong.vn/fhir/sid/bhxh"
BHYT_SYSTEM: Final = "https://lienthong.vn/fhir/sid/bhyt"
MA_BN_SYSTEM_PREFIX: Final = "https://lienthong.vn/fhir/sid/ma-bn/"

Sex = Literal["male", "female"]

# Digit 4 of a CCCD: (century start year, sex). Decree 137/2015 art. 7.
_CENTURY_SEX: Final[dict[str, tuple[int, Sex]]] = {
    "0": (1900, "male"), "1": (1900, "female"),
    "2": (2000, "male"), "3": (2000, "female"),
    "4": (2100, "male"), "5": (2100, "female"),
    "6": (2200, "male"), "7": (2200, "female"),
    "8": (2300, "male"), "9": (2300, "female"),
}

# Beneficiary categories of the BHYT card (Decision 1351/QĐ-BHXH and later amendments).
# Kept as data: an unknown category is reported, not rejected, because the list changes.
BHYT_CATEGORIES: Final[frozenset[str]] = frozenset((
    "DN", "HX", "CH", "NN", "TK", "HC", "XK", "CA", "HT", "TB", "NO", "CT", "XB", "TN", "CS", "XN", "MS",
    "CC", "CK", "CB", "KC", "HD", "TE", "BT", "HN", "DT", "DK", "XD", "TS", "TC", "TQ", "TA", "TY", "HG",
    "LS", "PV", "CN", "HS", "SV", "GB", "GD", "QN", "CY", "XV", "TL",
))

# Facility codes and BHYT province digits may also use these ministry pseudo-provinces.
_MINISTRY_CODES: Final = frozenset({"97", "98"})

_SPACES = re.compile(r"[\s.\-]+")


class IdentifierError(ValueError):
    """A rejected identifier, with a machine code and a bilingual message."""

    def __init__(self, kind: str, code: str, message_vi: str, message_en: str) -> None:
        self.kind = kind
        self.code = code
        self.message_vi = message_vi
        self.message_en = message_en
        super().__init__(f"{message_vi} / {message_en}")


def _clean(value: str) -> str:
    return _SPACES.sub("", value.strip())


def _digits(kind: str, value: str, length: int, label_vi: str, label_en: str) -> str:
    text = _clean(value)
    if not text:
        raise IdentifierError(kind, "empty", f"{label_vi} trống", f"{label_en} is empty")
    if not text.isdigit() or not text.isascii():
        raise IdentifierError(
            kind, "not-digits", f"{label_vi} chỉ được chứa chữ số", f"{label_en} must contain digits only"
        )
    if len(text) != length:
        raise IdentifierError(
            kind,
            "length",
            f"{label_vi} phải có {length} chữ số (nhận {len(text)})",
            f"{label_en} must have {length} digits (got {len(text)})",
        )
    return text


# --- CCCD ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Cccd:
    """A parsed 12-digit personal identification number."""

    value: str
    province_code: str  # 3 digits, "0" + legacy 2-digit province code of birth registration
    sex: Sex
    birth_year_suffix: str  # 2 digits
    century_start: int  # 1900, 2000, …

    @property
    def birth_year(self) -> int:
        """The full birth year encoded by the century digit and the 2-digit year."""
        return self.century_start + int(self.birth_year_suffix)

    @property
    def system(self) -> str:
        """The FHIR naming system of the identifier."""
        return CCCD_SYSTEM


@lru_cache(maxsize=1)
def cccd_province_codes() -> frozenset[str]:
    """Valid 3-digit birth-registration province codes: "0" + the 63 legacy codes."""
    return frozenset("0" + c for c in legacy_province_codes())


def parse_cccd(value: str, *, sex: Sex | None = None, birth_year: int | None = None) -> Cccd:
    """Parse a CCCD and check it against the person's sex and birth year when given."""
    text = _digits("cccd", value, 12, "Số định danh cá nhân (CCCD)", "Personal ID number (CCCD)")
    province = text[:3]
    if province not in cccd_province_codes():
        raise IdentifierError(
            "cccd",
            "province",
            f"Mã tỉnh nơi đăng ký khai sinh '{province}' không hợp lệ",
            f"Birth-registration province code '{province}' is not valid",
        )
    century_start, encoded_sex = _CENTURY_SEX[text[3]]
    parsed = Cccd(text, province, encoded_sex, text[4:6], century_start)
    if sex is not None and sex != encoded_sex:
        raise IdentifierError(
            "cccd",
            "sex",
            f"Giới tính mã hóa trong CCCD ({_SEX_VI[encoded_sex]}) khác giới tính khai báo ({_SEX_VI[sex]})",
            f"Sex encoded in the CCCD ({encoded_sex}) differs from the declared sex ({sex})",
        )
    if birth_year is not None and birth_year != parsed.birth_year:
        raise IdentifierError(
            "cccd",
            "birth-year",
            f"Năm sinh mã hóa trong CCCD ({parsed.birth_year}) khác năm sinh khai báo ({birth_year})",
            f"Birth year encoded in the CCCD ({parsed.birth_year}) differs from the declared year ({birth_year})",
        )
    return parsed


_SEX_VI: Final[dict[str, str]] = {"male": "nam", "female": "nữ"}


def check_cccd(value: str, *, sex: Sex | None = None, birth_year: int | None = None) -> IdentifierError | None:
    """Return the reason a CCCD is invalid, or None when valid."""
    try:
        parse_cccd(value, sex=sex, birth_year=birth_year)
    except IdentifierError as err:
        return err
    return None


# --- CMND, passport, social insurance -----------------------------------------------------
def parse_cmnd(value: str) -> str:
    """Validate the old 9-digit identity-card number and return it cleaned."""
    return _digits("cmnd", value, 9, "Số CMND", "Old ID card number (CMND)")


@dataclass(frozen=True, slots=True)
class Passport:
    """A passport number; `vietnamese` when it has the Vietnamese form letter + 7 digits."""

    value: str
    vietnamese: bool
    country: str


_VN_PASSPORT = re.compile(r"^[A-Z][0-9]{7}$")
_GENERIC_PASSPORT = re.compile(r"^[A-Z0-9]{5,20}$")


def parse_passport(value: str, *, country: str = "VN") -> Passport:
    """Validate a passport number; Vietnamese ones must be one letter and 7 digits."""
    text = _clean(value).upper()
    country = country.upper()
    if not text:
        raise IdentifierError("passport", "empty", "Số hộ chiếu trống", "Passport number is empty")
    if country == "VN":
        if not _VN_PASSPORT.match(text):
            raise IdentifierError(
                "passport",
                "format",
                "Hộ chiếu Việt Nam gồm 1 chữ cái và 7 chữ số (ví dụ C1234567)",
                "A Vietnamese passport number is one letter and 7 digits (e.g. C1234567)",
            )
        return Passport(text, True, country)
    if not _GENERIC_PASSPORT.match(text):
        raise IdentifierError(
            "passport",
            "format",
            "Số hộ chiếu chỉ gồm 5–20 chữ cái hoặc chữ số",
            "A passport number has 5–20 letters or digits",
        )
    return Passport(text, False, country)


def parse_social_insurance(value: str) -> str:
    """Validate the 10-digit social-insurance number (mã số BHXH) and return it cleaned."""
    return _digits("bhxh", value, 10, "Mã số BHXH", "Social-insurance number")


# --- BHYT card ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class BhytCard:
    """A 15-character health-insurance card code, split into its parts."""

    value: str
    category: str
    benefit_level: int
    province_code: str
    si_number: str
    known_category: bool


def parse_bhyt(value: str) -> BhytCard:
    """Parse a 15-character BHYT card code (e.g. DN4759122135078) and derive the SI number."""
    text = _clean(value).upper()
    label_vi, label_en = "Mã thẻ BHYT", "Health-insurance card code"
    if len(text) != 15:
        raise IdentifierError(
            "bhyt",
            "length",
            f"{label_vi} phải có 15 ký tự (nhận {len(text)})",
            f"{label_en} must have 15 characters (got {len(text)})",
        )
    category, level, province, si_number = text[:2], text[2], text[3:5], text[5:]
    if not (category.isalpha() and category.isascii()):
        raise IdentifierError(
            "bhyt", "category", "Hai ký tự đầu (mã đối tượng) phải là chữ cái",
            "The first two characters (beneficiary category) must be letters",
        )
    if level not in "12345":
        raise IdentifierError(
            "bhyt", "benefit-level", f"Mức hưởng '{level}' phải từ 1 đến 5",
            f"Benefit level '{level}' must be 1 to 5",
        )
    if not province.isdigit() or (province not in legacy_province_codes() and province not in _MINISTRY_CODES):
        raise IdentifierError(
            "bhyt", "province", f"Mã tỉnh '{province}' trên thẻ không hợp lệ",
            f"Card province code '{province}' is not valid",
        )
    if not si_number.isdigit():
        raise IdentifierError(
            "bhyt", "si-number", "10 ký tự cuối (mã số BHXH) phải là chữ số",
            "The last 10 characters (social-insurance number) must be digits",
        )
    return BhytCard(text, category, int(level), province, si_number, category in BHYT_CATEGORIES)


def social_insurance_from(value: str) -> str:
    """The SI number of either a 15-char card code or a bare 10-digit SI number.

    Why: cards issued since 2021 print only the 10-digit number, older ones the 15-char
    code; both identify the same insured person through the SI number.
    """
    text = _clean(value)
    if len(text) == 15:
        return parse_bhyt(text).si_number
    return parse_social_insurance(text)


# --- Facility patient code ----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class FacilityPatientCode:
    """A facility's own patient code (MA_BN); unique only within that facility."""

    facility_code: str
    code: str

    @property
    def system(self) -> str:
        """The naming system scoped to the facility."""
        return ma_bn_system(self.facility_code)


def parse_facility_code(value: str) -> str:
    """Validate a 5-digit facility code (2-digit province + 3-digit sequence)."""
    text = _digits("facility", value, 5, "Mã cơ sở KCB", "Facility code")
    if text[:2] not in legacy_province_codes() and text[:2] not in _MINISTRY_CODES:
        raise IdentifierError(
            "facility", "province", f"Mã tỉnh '{text[:2]}' của cơ sở KCB không hợp lệ",
            f"Province part '{text[:2]}' of the facility code is not valid",
        )
    return text


def ma_bn_system(facility_code: str) -> str:
    """Naming-system URI for MA_BN codes of one facility."""
    return MA_BN_SYSTEM_PREFIX + parse_facility_code(facility_code)


def parse_ma_bn(facility_code: str, code: str) -> FacilityPatientCode:
    """Validate a MA_BN value (1–100 visible characters, no spaces) within a facility."""
    facility = parse_facility_code(facility_code)
    text = code.strip()
    if not text:
        raise IdentifierError("ma-bn", "empty", "Mã bệnh nhân trống", "Patient code is empty")
    if len(text) > 100 or any(ch.isspace() for ch in text) or not text.isprintable():
        raise IdentifierError(
            "ma-bn", "format", "Mã bệnh nhân tối đa 100 ký tự, không có khoảng trắng",
            "Patient code has at most 100 characters and no spaces",
        )
    return FacilityPatientCode(facility, text)
