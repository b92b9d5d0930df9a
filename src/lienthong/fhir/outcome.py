"""OperationOutcome and the one exception type that carries an HTTP status to the edge.

Why: every refusal, from any layer, must reach the user as an OperationOutcome
with the right status; raising `FhirError` anywhere and rendering it once at the
edge (HTTP or CLI) keeps that promise without each caller building its own.
Messages are bilingual: Vietnamese first, then English.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class OutcomeIssue:
    severity: str  # fatal | error | warning | information
    code: str  # IssueType code (invalid, structure, not-found, conflict, ...)
    diagnostics: str
    expression: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        issue: dict[str, Any] = {"severity": self.severity, "code": self.code, "diagnostics": self.diagnostics}
        if self.expression:
            issue["expression"] = list(self.expression)
        return issue


@dataclass
class FhirError(Exception):
    """An error with an HTTP status, rendered as an OperationOutcome."""

    status: int
    issues: list[OutcomeIssue] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return "; ".join(i.diagnostics for i in self.issues) or f"HTTP {self.status}"

    def outcome(self) -> dict[str, Any]:
        return operation_outcome(self.issues)


def error(status: int, code: str, vi: str, en: str, *expression: str) -> FhirError:
    """Build a single-issue error with a Vietnamese and an English message."""
    return FhirError(status, [OutcomeIssue("error", code, f"{vi} / {en}", tuple(expression))])


def operation_outcome(issues: list[OutcomeIssue]) -> dict[str, Any]:
    if not issues:
        issues = [OutcomeIssue("information", "informational", "Thành công / All OK")]
    return {"resourceType": "OperationOutcome", "issue": [i.to_json() for i in issues]}


def information(vi: str, en: str) -> dict[str, Any]:
    return operation_outcome([OutcomeIssue("information", "informational", f"{vi} / {en}")])
