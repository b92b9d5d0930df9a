"""Who is asking, through which node, and how they want errors handled."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Context:
    """Per-request facts every interaction needs."""

    base_url: str = "http://localhost/fhir"  # absolute base for fullUrl, Location and paging links
    strict: bool = False  # Prefer: handling=strict
    address: str | None = None  # caller's network address, for the audit trail
    extra: dict[str, str] = field(default_factory=dict)  # e.g. the node's name for audit records
    principal: Any = None  # the authenticated caller (lienthong.security.policy.Principal), None when open
    # The audit records the transport must see committed before it answers (security.audit.AuditWaits);
    # None for in-process callers (CLI, exchange worker) that answer nobody: their records are only queued.
    audit_waits: Any = None

    @property
    def actor(self) -> str | None:
        return getattr(self.principal, "actor", None)
