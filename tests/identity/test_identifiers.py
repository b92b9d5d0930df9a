from __future__ import annotations

import pytest

from lienthong.identity import identifiers as ids


def test_cccd_valid_and_parts() -> None:
    c = ids.parse_cccd("024 1850 12345"[:0] + "024185012345")
    assert (c.province_code, c.sex, c.birth_year) == ("024", "female", 1985)
    assert c.system == ids.CCCD_SYSTEM


@pytest.mark.parametrize(
    ("value", "code"),
    [("", "empty"), ("02418501234", "length"), ("02418501234X", "not-digits"), ("003185012345", "province")],
)
def test_cccd_invalid_reasons(value: str, code: str) -> None:
    err = ids.check_cccd(value)
    assert err is not None and err.code == code
    assert " / " in str(err)  # Vietnamese / English


def test_cccd_century_sex_consistency() -> None:
    assert ids.parse_cccd("024205123456").birth_year == 2005
    assert ids.parse_cccd("024205123456").sex == "male"
    assert ids.parse_cccd("024305123456").sex == "female"
    assert ids.parse_cccd("024405123456").birth_year == 2105
    err = ids.check_cccd("024085123456", sex="female")
    assert err is not None and err.code == "sex"
    err = ids.check_cccd("024085123456", birth_year=2008)
    assert err is not None and err.code == "birth-year" and "2008" in err.message_vi
    assert ids.check_cccd("024085123456", sex="male", birth_year=1985) is None


def test_province_codes_from_admin_units() -> None:
    codes = ids.cccd_province_codes()
    assert len(codes) == 63 and "001" in codes and "024" in codes and "096" in codes and "003" not in codes


def test_cmnd_passport_si() -> None:
    assert ids.parse_cmnd("121 234 567") == "121234567"
    with pytest.raises(ids.IdentifierError):
        ids.parse_cmnd("12345678")
    assert ids.parse_passport("c1234567").vietnamese
    with pytest.raises(ids.IdentifierError) as exc:
        ids.parse_passport("12345678")
    assert exc.value.code == "format"
    assert not ids.parse_passport("X12345678", country="fr").vietnamese
    assert ids.parse_social_insurance("2412345678") == "2412345678"


def test_bhyt_and_si_derivation() -> None:
    card = ids.parse_bhyt("DN4759122135078")
    assert (card.category, card.benefit_level, card.province_code, card.si_number) == ("DN", 4, "75", "9122135078")
    assert card.known_category
    assert ids.social_insurance_from("dn4759122135078") == "9122135078"
    assert ids.social_insurance_from("9122135078") == "9122135078"
    for bad, code in (("DN6759122135078", "benefit-level"), ("D14759122135078", "category"),
                      ("DN4039122135078", "province"), ("DN47591221350", "length")):
        with pytest.raises(ids.IdentifierError) as exc:
            ids.parse_bhyt(bad)
        assert exc.value.code == code


def test_ma_bn_scoped_by_facility() -> None:
    code = ids.parse_ma_bn("24001", "BN-000123")
    assert code.system == "https://lienthong.vn/fhir/sid/ma-bn/24001"
    assert ids.ma_bn_system("01001").endswith("/01001")
    with pytest.raises(ids.IdentifierError):
        ids.parse_ma_bn("2400", "X")
    with pytest.raises(ids.IdentifierError):
        ids.parse_ma_bn("24001", "A B")
