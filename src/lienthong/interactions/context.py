"""Who is asking, through which node, and how they want errors handled."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Context:
    """Per-request facts every interaction needs."""

    base_url: str = "http://localhost/fhir"  # absolute base for fullUrl, Location and paging links
    strict: bool = False  # Prefer: handling=strict
    actor: str | None = None  # user or client id once authentication is on
    roles: tuple[str, ...] = ()
    facility: str | None = None
    address: str | None = None  # caller's network address, for the audit trail
    extra: dict[str, str] = field(default_factory=dict)
