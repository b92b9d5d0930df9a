"""Vietnamese name statistics used to split names and to synthesise test populations.

Why data, not logic: the frequencies are rough published estimates (national surveys
quoted in the press; Nguyễn ≈ 38 %, Trần ≈ 11 %, Lê ≈ 9.5 %, …) and are expected to be
replaced by counts from a real patient index. Frequencies are percentages of the whole
population; the tail is approximate. Names are NFC with diacritics.

Kept as a Python module rather than a JSON file so it ships with the wheel without
touching packaging configuration.
"""

from __future__ import annotations

from typing import Final

# (family name, rough % of population, region bias: "N" north, "S" south, "" nationwide)
FAMILY_NAMES: Final[tuple[tuple[str, float, str], ...]] = (
    ("Nguyễn", 38.4, ""), ("Trần", 11.0, ""), ("Lê", 9.5, ""), ("Phạm", 7.1, ""),
    ("Hoàng", 3.0, "N"), ("Huỳnh", 2.1, "S"), ("Phan", 4.5, ""), ("Vũ", 2.5, "N"),
    ("Võ", 1.4, "S"), ("Đặng", 2.1, ""), ("Bùi", 2.0, ""), ("Đỗ", 1.4, ""),
    ("Hồ", 1.3, ""), ("Ngô", 1.3, ""), ("Dương", 1.0, ""), ("Lý", 0.5, ""),
    ("Đào", 0.45, ""), ("Đoàn", 0.4, ""), ("Vương", 0.3, ""), ("Trịnh", 0.3, ""),
    ("Đinh", 0.3, ""), ("Lâm", 0.3, "S"), ("Trương", 0.3, ""), ("Hà", 0.3, ""),
    ("Phùng", 0.2, "N"), ("Mai", 0.2, ""), ("Tô", 0.2, ""), ("Lương", 0.2, ""),
    ("Lưu", 0.2, ""), ("Cao", 0.2, ""), ("Chu", 0.2, "N"), ("Tạ", 0.15, "N"),
    ("Thân", 0.12, "N"), ("Giáp", 0.1, "N"), ("Nông", 0.12, "N"), ("Triệu", 0.1, "N"),
    ("Thái", 0.1, ""), ("Châu", 0.1, "S"), ("Hứa", 0.08, ""), ("Quách", 0.08, ""),
    ("Kiều", 0.08, "N"), ("Khúc", 0.05, "N"), ("Lò", 0.06, "N"), ("Lục", 0.06, "N"),
    ("Ma", 0.05, "N"), ("Mạc", 0.05, "N"), ("Nghiêm", 0.05, "N"), ("Tăng", 0.05, "S"),
    ("Từ", 0.05, ""), ("Ninh", 0.05, "N"), ("Đàm", 0.06, "N"), ("Đồng", 0.05, ""),
    ("Lã", 0.04, "N"), ("Lại", 0.05, ""), ("Lạc", 0.03, ""), ("Khổng", 0.03, "N"),
    ("Kim", 0.04, ""), ("La", 0.04, ""), ("Phí", 0.04, "N"), ("Quan", 0.03, ""),
    ("Tôn", 0.03, ""), ("Tống", 0.04, ""), ("Trình", 0.03, ""), ("Vi", 0.05, "N"),
    ("Âu", 0.03, ""), ("Bạch", 0.03, ""), ("Bế", 0.04, "N"), ("Cấn", 0.03, "N"),
    ("Cù", 0.03, "N"), ("Diệp", 0.03, "S"), ("Doãn", 0.03, "N"), ("Dư", 0.02, ""),
    ("Giang", 0.03, ""), ("Hàn", 0.02, ""), ("Hầu", 0.02, ""), ("Hồng", 0.02, ""),
    ("Khương", 0.02, ""), ("Khuất", 0.03, "N"), ("Lều", 0.01, "N"), ("Mẫn", 0.02, "N"),
    ("Mông", 0.01, "N"), ("Nhữ", 0.01, "N"), ("Ông", 0.02, ""), ("Phó", 0.01, ""),
    ("Phương", 0.02, ""), ("Quản", 0.02, "N"), ("Sầm", 0.01, "N"), ("Thạch", 0.03, "S"),
    ("Thiều", 0.01, ""), ("Tiêu", 0.02, ""), ("Tòng", 0.01, "N"), ("Ung", 0.01, ""),
    ("Vy", 0.02, "N"), ("Hán", 0.02, "N"), ("Chử", 0.02, "N"), ("Luyện", 0.01, "N"),
    ("Đậu", 0.03, ""), ("Lữ", 0.02, ""), ("Mã", 0.02, ""), ("Yên", 0.01, ""),
)
"""Roughly the 100 most common family names. "Văn" also exists as a family name but is
left out: it is far more often a middle name and would mislead name-order detection."""

MIDDLE_NAMES_MALE: Final[tuple[tuple[str, float], ...]] = (
    ("Văn", 40.0), ("Đức", 8.0), ("Hữu", 6.0), ("Minh", 8.0), ("Quang", 6.0), ("Công", 4.0),
    ("Đình", 4.0), ("Xuân", 3.0), ("Thanh", 3.0), ("Ngọc", 2.0), ("Mạnh", 2.0), ("Quốc", 3.0),
    ("Tiến", 1.5), ("Trọng", 2.0), ("Duy", 2.0), ("Bá", 1.5), ("Thế", 2.0), ("Hoàng", 1.5),
    ("Anh", 1.5), ("Gia", 2.0), ("Khắc", 1.0), ("Trung", 1.0), ("Việt", 1.0), ("Hải", 1.0),
)
MIDDLE_NAMES_FEMALE: Final[tuple[tuple[str, float], ...]] = (
    ("Thị", 60.0), ("Thu", 5.0), ("Ngọc", 6.0), ("Thanh", 4.0), ("Minh", 3.0), ("Phương", 3.0),
    ("Thùy", 3.0), ("Hồng", 3.0), ("Kim", 2.0), ("Bích", 1.5), ("Mai", 1.5), ("Khánh", 2.0),
    ("Diệu", 1.0), ("Hải", 1.5), ("Bảo", 2.0), ("Quỳnh", 1.0), ("Lan", 1.0), ("Hà", 1.0),
)
COMMON_MIDDLE_NAMES: Final[frozenset[str]] = frozenset(
    n for n, _ in MIDDLE_NAMES_MALE + MIDDLE_NAMES_FEMALE
)
"""Used to recognise the middle part of a name written in Western order."""

# Given names with rough relative weights. Region "N" favours northern usage.
GIVEN_NAMES_MALE: Final[tuple[tuple[str, float, str], ...]] = (
    ("An", 3.0, ""), ("Anh", 6.0, ""), ("Bình", 3.0, ""), ("Cường", 3.0, ""), ("Dũng", 4.0, ""),
    ("Đức", 3.0, ""), ("Giang", 1.5, "N"), ("Hải", 4.0, ""), ("Hiếu", 2.5, ""), ("Hoàng", 2.5, ""),
    ("Hùng", 4.0, ""), ("Huy", 4.0, ""), ("Khánh", 2.0, ""), ("Khoa", 1.5, "S"), ("Kiên", 1.5, "N"),
    ("Lâm", 1.5, ""), ("Long", 3.0, ""), ("Mạnh", 2.0, "N"), ("Minh", 5.0, ""), ("Nam", 4.0, ""),
    ("Nghĩa", 2.0, ""), ("Phong", 2.0, ""), ("Phúc", 2.0, ""), ("Quân", 2.5, ""), ("Quang", 2.5, ""),
    ("Sơn", 3.0, "N"), ("Tài", 1.5, "S"), ("Thắng", 3.0, "N"), ("Thành", 3.0, ""), ("Tiến", 2.0, "N"),
    ("Toàn", 2.0, ""), ("Trung", 3.0, ""), ("Tuấn", 5.0, ""), ("Tùng", 2.5, "N"), ("Việt", 2.0, "N"),
    ("Vinh", 2.0, ""), ("Hưng", 2.0, ""), ("Hiệp", 1.5, ""), ("Thịnh", 1.5, ""), ("Đạt", 3.0, ""),
    ("Duy", 2.0, ""), ("Hòa", 1.5, ""), ("Lộc", 1.5, "S"), ("Phương", 1.0, ""), ("Thanh", 1.5, ""),
    ("Tú", 1.5, ""), ("Vũ", 1.5, ""), ("Bảo", 1.5, "S"), ("Khang", 1.0, "S"), ("Hậu", 1.0, ""),
    ("Chiến", 1.5, "N"), ("Công", 1.0, ""), ("Định", 1.0, ""), ("Hào", 1.0, ""), ("Lực", 1.0, "N"),
    ("Quyết", 1.0, "N"), ("Sang", 1.0, "S"), ("Tâm", 1.5, ""), ("Thái", 1.0, ""), ("Thuận", 1.0, ""),
    ("Tín", 1.0, "S"), ("Trọng", 1.0, "N"), ("Tuyên", 0.8, "N"), ("Điệp", 0.8, "N"), ("Hạnh", 0.5, ""),
    ("Khải", 0.8, ""), ("Lợi", 1.0, ""), ("Nhật", 1.0, ""), ("Phú", 1.0, ""), ("Quý", 1.0, ""),
    ("Thạch", 0.5, ""), ("Thiện", 1.0, ""), ("Thông", 1.0, ""), ("Trí", 1.0, ""), ("Văn", 0.3, ""),
)
GIVEN_NAMES_FEMALE: Final[tuple[tuple[str, float, str], ...]] = (
    ("Anh", 5.0, ""), ("Chi", 2.0, "N"), ("Dung", 2.5, ""), ("Giang", 2.0, "N"), ("Hà", 4.0, "N"),
    ("Hạnh", 2.5, ""), ("Hằng", 3.0, ""), ("Hiền", 3.0, ""), ("Hoa", 3.0, ""), ("Hòa", 1.5, ""),
    ("Hồng", 2.5, ""), ("Huyền", 3.0, "N"), ("Hương", 5.0, ""), ("Hường", 2.0, "N"), ("Lan", 3.5, ""),
    ("Liên", 2.0, ""), ("Linh", 5.0, ""), ("Loan", 2.0, ""), ("Mai", 3.0, ""), ("Minh", 1.5, ""),
    ("My", 1.5, "S"), ("Nga", 3.0, ""), ("Ngân", 2.0, ""), ("Ngọc", 2.5, ""), ("Nhung", 2.5, "N"),
    ("Oanh", 2.0, ""), ("Phương", 4.0, ""), ("Quyên", 1.5, ""), ("Quỳnh", 2.5, ""), ("Tâm", 1.5, ""),
    ("Thanh", 2.5, ""), ("Thảo", 4.0, ""), ("Thu", 2.0, ""), ("Thủy", 4.0, ""), ("Thúy", 2.5, ""),
    ("Trang", 5.0, ""), ("Trinh", 1.5, "S"), ("Tuyết", 1.5, ""), ("Uyên", 1.5, "S"), ("Vân", 3.0, ""),
    ("Yến", 3.0, ""), ("Lệ", 1.0, ""), ("Nhàn", 1.5, "N"), ("Thơm", 1.0, "N"), ("Hoài", 1.0, ""),
    ("Duyên", 2.0, ""), ("Diệp", 0.8, ""), ("Hậu", 1.0, "N"), ("Ly", 1.5, ""), ("Nhi", 2.0, "S"),
    ("Hân", 1.5, "S"), ("Vy", 1.5, "S"), ("Ánh", 1.5, ""), ("Châu", 1.0, "S"), ("Diệu", 0.8, ""),
    ("Gấm", 0.5, "N"), ("Huệ", 1.5, "N"), ("Lành", 0.8, "N"), ("Mơ", 0.5, "N"), ("Nguyệt", 1.5, ""),
    ("Nhài", 0.5, "N"), ("Phượng", 1.5, ""), ("Sen", 0.8, "N"), ("Tâm", 1.0, ""), ("Thắm", 1.0, "N"),
    ("Thêu", 0.5, "N"), ("Thoa", 1.0, "N"), ("Trâm", 1.5, "S"), ("Tươi", 0.8, "N"), ("Xuân", 1.5, ""),
)
