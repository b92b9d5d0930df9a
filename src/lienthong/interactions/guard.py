"""The seam where access control and audit plug into every interaction.

Why a protocol here: the interactions layer must enforce authorisation and record
audit on every read, search and write, but it may not depend on the security
package above it. The security package implements `Guard`; `OpenGuard` is the
explicit, loud choice for `--insecure-dev` and for storage-level tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from sqlalchemy import ColumnElement, FromClause

from lienthong.interactions.context import Context
from lienthong.storage.repository import Store, Stored

# Interaction names, in SMART's terms: c(reate) r(ead) u(pdate) d(elete) s(earch).
READ, SEARCH, CREATE, UPDATE, DELETE = "read", "search", "create", "update", "delete"


@dataclass(frozen=True)
class RemoteAccess:
    """A query between facilities, as the IHE BALP PatientQuery pattern records it on each side.

    `side` is where this record is written: the requesting facility ("client"),
    the hub that relayed it ("relay") or the facility that answered ("server").
    The same `request_id` on all three lets an auditor join the records.
    """

    side: str
    client: str  # requesting facility code (BALP Source Role ID)
    server: str  # answering facility code (BALP Destination Role ID)
    request_id: str
    user: str  # the person who asked, at the requesting facility
    user_roles: tuple[str, ...] = ()
    purpose: str = "TREAT"  # v3-ActReason purpose of use
    patient_identifier: tuple[str, str] | None = None  # (system, value): ids differ between facilities


@dataclass
class AuditFacts:
    """What an audit record needs to know about one interaction."""

    action: str  # create, read, vread, update, patch, delete, search, history, operation, export, transaction
    outcome: int = 0  # 0 success, 4 minor failure (refused), 8 serious, 12 major
    resources: list[tuple[str, str]] = field(default_factory=list)  # (type, id) touched
    patients: set[str] = field(default_factory=set)
    query: str | None = None
    detail: str | None = None
    bodies: list[bytes] = field(default_factory=list)  # what was returned, so the audit names its patients
    remote: RemoteAccess | None = None  # set for queries between facilities (BALP)


class Guard(Protocol):
    def authorize(self, ctx: Context, interaction: str, rtype: str | None) -> None:
        """Raise FhirError 401/403 when the caller may not perform this interaction on this type."""

    def search_filter(self, ctx: Context, rtype: str | None, res: FromClause) -> ColumnElement[bool] | None:
        """An extra SQL condition restricting search results to what the caller may see."""

    def visible(self, ctx: Context, store: Store, items: list[Stored], writing: bool = False) -> list[Stored]:
        """The subset of `items` the caller may see (reads, history, includes, $everything, export);
        `writing` asks the wider question "may change", which needs only facility scope."""

    def sees_all(self, ctx: Context, rtype: str) -> bool:
        """True when `visible` keeps every current `rtype` resource for this caller, so an answer's
        content is known before its bodies are read (and its audit record can be written meanwhile)."""

    def on_write(self, ctx: Context, store: Store, facts: AuditFacts, written: list[Stored]) -> None:
        """Called inside the write transaction: record the audit and maintain access indexes."""

    def on_access(self, ctx: Context, facts: AuditFacts) -> None:
        """Record a read-type interaction (or a refusal)."""


class OpenGuard:
    """No access control and no audit: only for local experiments and storage tests."""

    def authorize(self, ctx: Context, interaction: str, rtype: str | None) -> None:
        return None

    def search_filter(self, ctx: Context, rtype: str | None, res: FromClause) -> ColumnElement[bool] | None:
        return None

    def visible(self, ctx: Context, store: Store, items: list[Stored], writing: bool = False) -> list[Stored]:
        return items

    def sees_all(self, ctx: Context, rtype: str) -> bool:
        return True

    def on_write(self, ctx: Context, store: Store, facts: AuditFacts, written: list[Stored]) -> None:
        return None

    def on_access(self, ctx: Context, facts: AuditFacts) -> None:
        return None
