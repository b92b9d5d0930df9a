"""Shared fixtures: one small synthetic population and its fitted model per session."""

from __future__ import annotations

import pytest

from lienthong.identity.matching import MatchModel, fit
from lienthong.identity.records import prepare
from lienthong.identity.synth import SyntheticRecord, generate


@pytest.fixture(scope="session")
def population() -> list[SyntheticRecord]:
    return generate(3000, seed=11)


@pytest.fixture(scope="session")
def model(population: list[SyntheticRecord]) -> MatchModel:
    return fit(prepare([s.record for s in population]))
