from __future__ import annotations

import pytest

from lienthong.identity.normalize import (
    compare_dates,
    fix_typing,
    normalize_phone,
    normalize_sex,
    parse_address,
    parse_date,
    parse_name,
)


@pytest.mark.parametrize(
    ("typed", "expected"),
    [("Nguyeenx", "Nguyễn"), ("Nguyen64", "Nguyễn"), ("Thij", "Thị"), ("Traafn", "Trần"), ("Hoaf", "Hòa"),
     ("Huwowngf", "Hường"), ("Ddinhf", "Đình"), ("Ross", "Ross"), ("Smith", "Smith")],
)
def test_typing_slips(typed: str, expected: str) -> None:
    assert fix_typing(typed) == expected


def test_names_order_and_diacritics() -> None:
    n = parse_name("NGUYỄN THỊ THU HÀ")
    assert (n.family, n.middle, n.given) == ("Nguyễn", "Thị Thu", "Hà")
    assert parse_name("nguyen thi thu ha").folded == n.folded == "nguyen thi thu ha"
    w = parse_name("An Văn Nguyễn")
    assert (w.family, w.middle, w.given, w.reordered) == ("Nguyễn", "Văn", "An", True)
    assert parse_name("Văn An Nguyễn").full == "Nguyễn Văn An"
    assert parse_name("Nguyeenx Thij Hoaf").full == "Nguyễn Thị Hòa"
    cols = parse_name(family="An", given="Nguyễn")
    assert (cols.family, cols.given) == ("Nguyễn", "An")
    assert parse_name(family="Smith", given="Lee").full == "Smith Lee"


def test_sex() -> None:
    assert normalize_sex("Nữ") == "female" and normalize_sex("1") == "male" and normalize_sex("x") is None


def test_dates_partial_xml_and_swapped() -> None:
    assert parse_date("198503120000") == parse_date("1985-03-12") == parse_date("12/03/1985")
    year_only = parse_date("19850000")
    assert year_only is not None and (year_only.year, year_only.month, year_only.day) == (1985, None, None)
    assert parse_date("1985-03") is not None and parse_date("1985-03").isoformat() == "1985-03"  # type: ignore[union-attr]
    assert parse_date("2000-13-40") is not None and not parse_date("2000-13-40").is_valid  # type: ignore[union-attr]
    assert compare_dates(parse_date("1985-03-12"), parse_date("1985-12-03")) == "swapped"
    assert compare_dates(parse_date("1985"), parse_date("1985-12-03")) == "partial"
    assert compare_dates(parse_date("1985"), parse_date("1985")) == "partial"
    assert compare_dates(parse_date("19850312"), parse_date("19850313")) == "typo"
    assert compare_dates(parse_date("19850312"), parse_date("19850312")) == "exact"
    assert compare_dates(parse_date("19850312"), None) == "missing"
    assert compare_dates(parse_date("19850312"), parse_date("19860701")) == "different"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("01629123456", "+84329123456"), ("0120 123 4567", "+84701234567"), ("0123-456-7890", "+84834567890"),
     ("0199 123 4567", "+84591234567"), ("+84 912 345 678", "+84912345678"), ("84912345678", "+84912345678"),
     ("0912345678", "+84912345678"), ("123", None)],
)
def test_phones(raw: str, expected: str | None) -> None:
    assert normalize_phone(raw) == expected


def test_addresses_both_generations_share_the_new_commune_key() -> None:
    old = parse_address("Thôn Đông, xã Tân Dĩnh, huyện Lạng Giang, tỉnh Bắc Giang")
    new = parse_address("Thôn Đông, Xã Tân Dĩnh, Tỉnh Bắc Ninh")
    parts = parse_address(street="thon dong", commune="Tan Dinh", district="Lang Giang", province="Bac Giang")
    assert old.generation == "legacy" and new.generation == "2025"
    assert old.commune_key == new.commune_key == parts.commune_key == "07432"
    assert old.province_key == new.province_key == "24"
    assert old.legacy_district == "217" and old.street == "Thôn Đông"
    # A merged ward: legacy Trần Phú (TP Bắc Giang) now belongs to phường Bắc Giang.
    merged = parse_address("so 12 duong Le Loi, phuong Tran Phu, tp Bac Giang, Bac Giang")
    assert merged.commune_key == parse_address("Phường Bắc Giang, Bắc Ninh").commune_key
    no_commas = parse_address("Thôn 3 xã Việt Lập huyện Tân Yên tỉnh Bắc Giang")
    assert no_commas.resolved and no_commas.street == "Thôn 3"
    assert not parse_address("12 Main street, Sydney").resolved
    # "Xã Yên Phong" (a 2025 commune) must not be read as the legacy district Yên Phong.
    yen_phong = parse_address("Số 100 đường Nguyễn Văn Cừ, Xã Yên Phong, Tỉnh Bắc Ninh")
    assert yen_phong.generation == "2025" and yen_phong.street == "Số 100 đường Nguyễn Văn Cừ"
    assert yen_phong.commune_key == parse_address("Thị trấn Chờ, Huyện Yên Phong, Tỉnh Bắc Ninh").commune_key


def test_the_shipped_commune_successors_are_the_converters_answers() -> None:
    """The old-to-new commune table shipped with the package equals the converter's answer (a sample of
    200 legacy communes, new ones spread over the country), for the installed vietnamadminunits version."""
    import random

    from lienthong.identity import admin_units as au

    table = au._successor_table()
    assert len(table) == len(au.admin_units().legacy_communes)  # the version matches: the table is used
    for code in random.Random(7).sample(sorted(table), 200):
        assert table[code] == au._convert_legacy_commune(code), code


def test_a_commune_successor_table_of_another_package_version_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    from lienthong.identity import admin_units as au

    monkeypatch.setattr(au, "version", lambda _name: "0.0.0")
    au._successor_table.cache_clear()
    try:
        assert au._successor_table() == {}
    finally:
        au._successor_table.cache_clear()
