"""Master patient index: identifier validation, normalisation and probabilistic matching.

Domain layer: no web framework, no storage. The FHIR `$match` operation, Patient.link
and merge are built on `MatchModel.score`, `blocking_keys` and `MatchResult`.
"""

from lienthong.identity.matching import (
    FieldWeight,
    FitSettings,
    MatchModel,
    MatchResult,
    Thresholds,
    blocking_keys,
    fit,
)
from lienthong.identity.records import MATCH_FIELDS, PersonRecord

__all__ = [
    "MATCH_FIELDS",
    "FieldWeight",
    "FitSettings",
    "MatchModel",
    "MatchResult",
    "PersonRecord",
    "Thresholds",
    "blocking_keys",
    "fit",
]
