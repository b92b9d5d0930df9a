"""Vietnamese-aware text normalisation shared by search indexing and patient matching.

Why: FHIR string search must ignore case and diacritics ("nguyen" finds "Nguyễn"),
and the patient index compares names typed with and without tone marks. Both must
fold text the same way, so the rule lives in one place.
"""

from __future__ import annotations

import unicodedata
from functools import lru_cache

# đ/Đ is a distinct letter, not a base letter plus a combining mark, so NFD does not split it.
_SPECIAL = str.maketrans({"đ": "d", "Đ": "D", "ð": "d", "Ð": "D"})


def nfc(value: str) -> str:
    """Return the NFC form; text from vendor systems often arrives decomposed (NFD)."""
    return unicodedata.normalize("NFC", value)


@lru_cache(maxsize=65536)
def fold(value: str) -> str:
    """Lower-case, strip diacritics and collapse whitespace: the search/match key of a string."""
    decomposed = unicodedata.normalize("NFD", value.translate(_SPECIAL))
    stripped = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return " ".join(stripped.casefold().split())
