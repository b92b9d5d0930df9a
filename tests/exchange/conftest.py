"""Fixtures for the exchange tests: one provincial PKI per session and a fresh SQLite database per test."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from sqlalchemy import Engine

from lienthong.exchange.demo import Province, start_province
from lienthong.exchange.schema import TABLES
from lienthong.exchange.trust import NodeIdentity, ProvincialCA, Role, TrustStore
from lienthong.storage.engine import make_engine
from lienthong.storage.schema import metadata

NOW = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)  # a fixed "now" all certificates are valid at


@dataclass
class Pki:
    ca: ProvincialCA
    hub: NodeIdentity  # the provincial hub, code 27000
    node: NodeIdentity  # Bệnh viện Đa khoa tỉnh Bắc Ninh, 27001
    other: NodeIdentity  # Trung tâm Y tế huyện Yên Phong, 27002
    doctor: NodeIdentity  # a practitioner of 27001
    crl: x509.CertificateRevocationList

    def trust(self) -> TrustStore:
        return TrustStore(self.ca.cert, self.crl)


@pytest.fixture(scope="session")
def pki() -> Pki:
    ca = ProvincialCA.create(now=datetime(2026, 1, 1, tzinfo=UTC))
    return Pki(
        ca=ca,
        hub=ca.issue_identity("27000", "Sở Y tế Bắc Ninh - Hub liên thông", role=Role.HUB, now=NOW),
        node=ca.issue_identity("27001", "Bệnh viện Đa khoa tỉnh Bắc Ninh", now=NOW),
        other=ca.issue_identity("27002", "Trung tâm Y tế huyện Yên Phong", now=NOW),
        doctor=ca.issue_identity("27001", "BS. Nguyễn Văn An", role=Role.PRACTITIONER,
                                 practitioner_id="000123/BN-CCHN", now=NOW),
        crl=ca.crl(now=NOW),
    )


def new_engine(path: Path) -> Engine:
    engine = make_engine(f"sqlite:///{path}")
    metadata.create_all(engine, tables=list(TABLES))
    return engine


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    eng = new_engine(tmp_path / "node.db")
    yield eng
    eng.dispose()


class FakeClock:
    """Wall-clock seconds that only move when a test says so."""

    def __init__(self, start: datetime = NOW) -> None:
        self.now = start.timestamp()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# ---- a running province (hub + a provincial hospital + Bạch Mai) over real HTTP ----------------
SENDER, RECEIVER = "24901", "01001"
UNITS = [(SENDER, "Bệnh viện Đa khoa tỉnh Bắc Giang"), (RECEIVER, "Bệnh viện Bạch Mai")]


@pytest.fixture
def province(tmp_path: Path) -> Iterator[Province]:
    p = start_province(tmp_path / "province", units=UNITS, poll_seconds=0.02)
    yield p
    p.stop()
