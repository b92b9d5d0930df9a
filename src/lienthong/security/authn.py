"""Authentication: logins, client credentials, token issue, and the principal behind each request.

Why rebuild the principal per request: role time windows (a night shift ends at
07:00), disabled accounts and break-the-glass grants must take effect during a
token's lifetime, so the token carries identity and scopes while roles in force
are looked up (cached for a few seconds) on every request.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from sqlalchemy import Engine, insert

from lienthong.fhir.datetimes import now_us
from lienthong.fhir.outcome import FhirError, OutcomeIssue
from lienthong.interactions.context import Context
from lienthong.interactions.guard import AuditFacts
from lienthong.security import scopes as smart
from lienthong.security.accounts import Accounts, Client, LoginFailed, User
from lienthong.security.policy import BTG_MINUTES, AccessGuard, Principal
from lienthong.security.roles import ROLES
from lienthong.security.tokens import Claims, NeedsIO, TokenError, TokenService
from lienthong.storage import schema

USER_CACHE_S = 5.0

# What each role may ask for at most; a token's scopes are the request narrowed to this.
ROLE_GRANTS = {
    "clinician": "user/*.cruds",
    "nurse": "user/*.crus",
    "records-officer": "user/*.cruds",
    "facility-admin": "user/*.rs",
    "province-admin": "user/Organization.rs user/Endpoint.rs",
    "auditor": "user/AuditEvent.rs",
}


@lru_cache(maxsize=1024)
def _token_scopes(text: str) -> tuple[smart.Scope, ...]:
    """A token's resource scopes, parsed once per distinct scope string rather than on every request."""
    return tuple(smart.parse_scopes(text)[0])


def unauthorized(vi: str, en: str) -> FhirError:
    return FhirError(401, [OutcomeIssue("error", "login", f"{vi} / {en}")],
                     {"WWW-Authenticate": 'Bearer realm="lienthong", error="invalid_token"'})


@dataclass
class TokenResponse:
    access_token: str
    expires_in: int
    scope: str
    extra: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"access_token": self.access_token, "token_type": "Bearer", "expires_in": self.expires_in,
                "scope": self.scope, **self.extra}


class Authenticator:
    def __init__(self, engine: Engine, accounts: Accounts, tokens: TokenService, guard: AccessGuard) -> None:
        self.engine = engine
        self.accounts = accounts
        self.tokens = tokens
        self.guard = guard
        self._users: dict[str, tuple[float, User | None]] = {}
        self._clients: dict[str, tuple[float, Client | None]] = {}
        self._lock = threading.Lock()

    # ---- issuing ---------------------------------------------------------------
    def check_password(self, ctx: Context, username: str, password: str) -> User:
        """Password check with lockout; every failure is audited."""
        try:
            return self.accounts.authenticate(username, password)
        except LoginFailed as exc:
            self.guard.on_access(_anonymous(ctx, username), AuditFacts("login-failed", outcome=4, detail=str(exc)))
            raise unauthorized("Đăng nhập thất bại", str(exc)) from None

    def issue_for_user(self, ctx: Context, user: User, scope: str | None) -> TokenResponse:
        """A user token whose scopes are the request narrowed to what the user's roles grant."""
        roles = [a.role for a in user.active_roles()]
        granted, _ = smart.parse_scopes(" ".join(ROLE_GRANTS[r] for r in roles if r in ROLE_GRANTS))
        try:
            wanted, _ = smart.parse_scopes(scope) if scope else (granted, [])
        except smart.ScopeError as exc:
            raise FhirError(400, [OutcomeIssue("error", "invalid", str(exc))]) from None
        final = smart.narrow(wanted, granted)
        token, claims = self.tokens.issue(user.user_id, {"kind": "user", "username": user.username,
                                                         "facility": user.facility, "scope": smart.render(final)})
        principal = self._user_principal(claims, user)
        self.guard.on_access(_as(ctx, principal), AuditFacts("login", detail=f"scope {smart.render(final)}"))
        return TokenResponse(token, claims.expires - int(time.time()), smart.render(final),
                             {"facility": user.facility, "roles": roles})

    def login(self, ctx: Context, username: str, password: str, scope: str | None) -> TokenResponse:
        return self.issue_for_user(ctx, self.check_password(ctx, username, password), scope)

    def client_credentials(self, ctx: Context, client_id: str, secret: str, scope: str | None) -> TokenResponse:
        try:
            client = self.accounts.authenticate_client(client_id, secret)
        except LoginFailed as exc:
            self.guard.on_access(_anonymous(ctx, client_id, "client"),
                                 AuditFacts("login-failed", outcome=4, detail=str(exc)))
            raise unauthorized("Xác thực máy khách thất bại", str(exc)) from None
        granted, _ = smart.parse_scopes(client.scopes)
        try:
            wanted, _ = smart.parse_scopes(scope) if scope else (granted, [])
        except smart.ScopeError as exc:
            raise FhirError(400, [OutcomeIssue("error", "invalid", str(exc))]) from None
        final = smart.narrow(wanted, granted)
        if not final:
            raise FhirError(400, [OutcomeIssue("error", "forbidden",
                                               "Phạm vi không được cấp / requested scope not granted")])
        token, claims = self.tokens.issue(client.client_id, {"kind": "client", "facility": client.facility,
                                                             "scope": smart.render(final)})
        principal = Principal("client", client.client_id, client.client_id, final, client.facility)
        self.guard.on_access(_as(ctx, principal), AuditFacts("token", detail=f"scope {smart.render(final)}"))
        return TokenResponse(token, claims.expires - int(time.time()), smart.render(final), {})

    # ---- per request -------------------------------------------------------------
    def principal(self, ctx: Context, authorization: str | None, io: bool = True) -> Principal:
        """The caller behind a bearer token. With io=False only caches are used, and NeedsIO is raised when
        the database must be read (cold cache, revocation list due for refresh)."""
        if not authorization or not authorization.lower().startswith("bearer "):
            raise unauthorized("Cần xác thực", "Authentication required: send Authorization: Bearer <token>")
        token = authorization[7:].strip()
        try:
            claims = self.tokens.verify(token, io)
        except TokenError as exc:
            self.guard.on_access(ctx, AuditFacts("refused", outcome=4, detail=f"token rejected: {exc}"))
            raise unauthorized("Token không hợp lệ", str(exc)) from None
        if claims.raw.get("kind") == "client":
            client = self._client(claims.subject, io)
            if client is None or client.disabled:
                raise unauthorized("Máy khách bị vô hiệu", "Client disabled")
            return Principal("client", client.client_id, client.client_id,
                             list(_token_scopes(str(claims.raw.get("scope", "")))), client.facility,
                             token=claims)
        user = self._user(claims.subject, io)
        if user is None or user.disabled:
            raise unauthorized("Tài khoản bị khoá", "Account disabled")
        return self._user_principal(claims, user, io)

    def _user_principal(self, claims: Claims, user: User, io: bool = True) -> Principal:
        resource_scopes = list(_token_scopes(str(claims.raw.get("scope", ""))))
        roles = tuple(a.role for a in user.active_roles() if a.role in ROLES)
        return Principal("user", user.username, user.user_id, resource_scopes, user.facility, roles,
                         user.practitioner_id, claims.raw.get("patient"),
                         self.guard.break_glass_grants(user.user_id, self.engine, io), token=claims)

    def _client(self, client_id: str, io: bool = True) -> Client | None:
        now = time.monotonic()
        cached = self._clients.get(client_id)
        if cached is not None and now - cached[0] < USER_CACHE_S:
            return cached[1]
        if not io:
            raise NeedsIO
        client = self.accounts.get_client(client_id)
        with self._lock:
            self._clients[client_id] = (now, client)
        return client

    def _user(self, user_id: str, io: bool = True) -> User | None:
        now = time.monotonic()
        cached = self._users.get(user_id)
        if cached is not None and now - cached[0] < USER_CACHE_S:
            return cached[1]
        if not io:
            raise NeedsIO
        user = self.accounts.get_user(user_id=user_id)
        with self._lock:
            self._users[user_id] = (now, user)
        return user

    def revoke(self, ctx: Context, principal: Principal) -> None:
        assert isinstance(principal.token, Claims)
        self.tokens.revoke(principal.token)
        self.guard.on_access(ctx, AuditFacts("logout"))

    # ---- break the glass -----------------------------------------------------------
    def break_glass(self, ctx: Context, patient_id: str, reason: str) -> dict[str, Any]:
        p = ctx.principal
        assert isinstance(p, Principal)
        if p.kind != "user" or not any(ROLES[r].clinical for r in p.roles):
            raise FhirError(403, [OutcomeIssue("error", "forbidden",
                                               "Chỉ nhân viên lâm sàng / Only clinical staff may break the glass")])
        if len(reason.strip()) < 10:
            raise FhirError(400, [OutcomeIssue("error", "required",
                                               "Cần nêu lý do (≥10 ký tự) / A reason of at least 10 characters is required")])
        import uuid

        grant_id = str(uuid.uuid4())
        expires = now_us() + BTG_MINUTES * 60 * 1_000_000
        with self.engine.begin() as conn:
            conn.execute(insert(schema.break_glass).values(
                grant_id=grant_id, user_id=p.subject, patient_id=patient_id, reason=reason.strip()[:2000],
                started=now_us(), expires=expires))
            self.guard.audit.record_in(conn, [self.guard._record(ctx, AuditFacts(
                "break-glass", outcome=0, patients={patient_id}, detail=f"reason: {reason.strip()[:500]}"))])
        self.guard.forget_grants(p.subject)
        return {"grant": grant_id, "patient": patient_id, "expires_in": BTG_MINUTES * 60}


def _anonymous(ctx: Context, actor: str, kind: str = "user") -> Context:
    principal = Principal(kind, actor, actor, [], None)
    return _as(ctx, principal)


def _as(ctx: Context, principal: Principal) -> Context:
    return Context(base_url=ctx.base_url, strict=ctx.strict, address=ctx.address, extra=ctx.extra,
                   principal=principal, audit_waits=ctx.audit_waits)
