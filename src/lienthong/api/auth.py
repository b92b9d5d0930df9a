"""OAuth 2.0 endpoints and the SMART configuration.

- client credentials for systems (vendor HIS gateways, lab interfaces, other nodes);
- authorization code with PKCE (S256) for the first-party web UI, with a bilingual login form;
- RFC 7009 revocation and logout; the JWKS; `.well-known/smart-configuration`.

Why PKCE for our own UI: the browser never handles a client secret or the
password after the login form, and the same flow serves third-party SMART apps later.
Login and token endpoints are rate-limited per address.
"""

from __future__ import annotations

import base64
import hashlib
import html
import secrets
import threading
import time
from collections import deque
from typing import Any
from urllib.parse import urlencode

import orjson
from sqlalchemy import delete, insert, select
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from lienthong.api.workers import in_thread
from lienthong.fhir.datetimes import now_us
from lienthong.fhir.outcome import FhirError, error
from lienthong.interactions.context import Context
from lienthong.security.authn import Authenticator
from lienthong.security.tokens import TokenError
from lienthong.storage import schema

WEB_CLIENT = "lienthong-web"  # the first-party public client
CODE_TTL_US = 120 * 1_000_000
RATE_LIMIT = 20  # requests per minute per address on login/token endpoints


class RateLimiter:
    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._hits: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def check(self, key: str) -> None:
        now = time.monotonic()
        with self._lock:
            hits = self._hits.setdefault(key, deque())
            while hits and now - hits[0] > 60:
                hits.popleft()
            if len(hits) >= self.per_minute:
                raise FhirError(429, error(429, "throttled", "Quá nhiều yêu cầu", "Too many requests").issues,
                                {"Retry-After": "60"})
            hits.append(now)
            if len(self._hits) > 10_000:  # forget only addresses idle for a minute, never live counters
                for key_, seen in list(self._hits.items()):
                    if not seen or now - seen[-1] > 60:
                        del self._hits[key_]


def _oauth_error(code: str, description: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": code, "error_description": description}, status_code=status,
                        headers={"Cache-Control": "no-store"})


class AuthApi:
    def __init__(self, auth: Authenticator, context: Any) -> None:
        self.auth = auth
        self.context = context  # callable(request) -> Context without authentication
        self.limiter = RateLimiter(RATE_LIMIT)

    def _limit(self, request: Request) -> None:
        self.limiter.check(request.client.host if request.client else "?")

    async def token(self, request: Request) -> Response:
        self._limit(request)
        form = await request.form()
        grant = str(form.get("grant_type", ""))
        ctx: Context = self.context(request)
        try:
            if grant == "client_credentials":
                client_id, secret = _client_auth(request, form)
                if not client_id or not secret:
                    return _oauth_error("invalid_client", "client_id and client_secret are required", 401)
                result = await in_thread(self.auth.client_credentials, ctx, client_id, secret,
                                                 _opt(form.get("scope")))
            elif grant == "authorization_code":
                result = await in_thread(self._exchange_code, ctx, form)
            else:
                return _oauth_error("unsupported_grant_type", "use client_credentials or authorization_code")
        except FhirError as exc:
            kind = "invalid_client" if exc.status == 401 else "invalid_request"
            return _oauth_error(kind, str(exc), 401 if exc.status == 401 else 400)
        return JSONResponse(result.to_json(), headers={"Cache-Control": "no-store", "Pragma": "no-cache"})

    def _exchange_code(self, ctx: Context, form: Any) -> Any:
        code = str(form.get("code", ""))
        verifier = str(form.get("code_verifier", ""))
        ac = schema.auth_code
        with self.auth.engine.begin() as conn:
            row = conn.execute(select(ac.c.user_id, ac.c.client_id, ac.c.challenge, ac.c.scope, ac.c.redirect_uri,
                                      ac.c.expires).where(ac.c.code == code)).first()
            conn.execute(delete(ac).where((ac.c.code == code) | (ac.c.expires < now_us())))
        if row is None or row[5] < now_us():
            raise error(400, "invalid", "Mã không hợp lệ hoặc đã hết hạn", "invalid or expired code")
        if str(form.get("client_id", "")) != row[1] or str(form.get("redirect_uri", "")) != row[4]:
            raise error(400, "invalid", "client_id/redirect_uri không khớp", "client_id or redirect_uri mismatch")
        if _s256(verifier) != row[2]:
            raise error(400, "invalid", "PKCE không khớp", "PKCE verification failed")
        user = self.auth.accounts.get_user(user_id=row[0])
        if user is None or user.disabled:
            raise error(401, "login", "Tài khoản bị khoá", "account disabled")
        return self.auth.issue_for_user(ctx, user, row[3] or None)

    async def authorize_form(self, request: Request) -> Response:
        q = request.query_params
        problem = _check_authorize(q)
        if problem:
            return HTMLResponse(f"<p>{html.escape(problem)}</p>", status_code=400)
        return HTMLResponse(_login_page(dict(q)), headers={"Cache-Control": "no-store"})

    async def authorize_submit(self, request: Request) -> Response:
        self._limit(request)
        form = await request.form()
        params = {k: str(form.get(k, "")) for k in ("response_type", "client_id", "redirect_uri", "scope", "state",
                                                   "code_challenge", "code_challenge_method")}
        problem = _check_authorize(params)
        if problem:
            return HTMLResponse(f"<p>{html.escape(problem)}</p>", status_code=400)
        ctx: Context = self.context(request)
        try:
            user = await in_thread(self.auth.check_password, ctx, str(form.get("username", "")),
                                           str(form.get("password", "")))
        except FhirError as exc:
            return HTMLResponse(_login_page(params, str(exc)), status_code=401)
        code = secrets.token_urlsafe(32)
        with self.auth.engine.begin() as conn:
            conn.execute(insert(schema.auth_code).values(
                code=code, user_id=user.user_id, client_id=params["client_id"], challenge=params["code_challenge"],
                scope=params["scope"], redirect_uri=params["redirect_uri"], expires=now_us() + CODE_TTL_US))
        sep = "&" if "?" in params["redirect_uri"] else "?"
        target = params["redirect_uri"] + sep + urlencode({"code": code, "state": params["state"]})
        return RedirectResponse(target, status_code=302)

    async def revoke(self, request: Request) -> Response:
        form = await request.form()
        token = str(form.get("token", ""))
        try:
            claims = await in_thread(self.auth.tokens.verify, token)
        except TokenError:  # RFC 7009: unknown or invalid tokens also get 200
            return Response(status_code=200)
        await in_thread(self.auth.tokens.revoke, claims)
        return Response(status_code=200)

    async def logout(self, request: Request) -> Response:
        ctx: Context = self.context(request)
        principal = await in_thread(self.auth.principal, ctx, request.headers.get("authorization"))
        ctx.principal = principal
        await in_thread(self.auth.revoke, ctx, principal)
        return Response(status_code=204)

    async def jwks(self, request: Request) -> Response:
        return JSONResponse(await in_thread(self.auth.tokens.jwks))

    async def smart_configuration(self, request: Request) -> Response:
        root = str(request.base_url).rstrip("/")
        return JSONResponse({
            "issuer": self.auth.tokens.issuer,
            "jwks_uri": f"{root}/auth/jwks",
            "authorization_endpoint": f"{root}/auth/authorize",
            "token_endpoint": f"{root}/auth/token",
            "revocation_endpoint": f"{root}/auth/revoke",
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "grant_types_supported": ["authorization_code", "client_credentials"],
            "scopes_supported": ["system/*.rs", "system/*.cruds", "user/*.rs", "user/*.cruds", "patient/*.rs"],
            "response_types_supported": ["code"],
            "code_challenge_methods_supported": ["S256"],
            "capabilities": ["client-confidential-symmetric", "client-public", "permission-v2", "permission-user",
                             "permission-patient"],
        })

    def routes(self) -> list[Route]:
        return [
            Route("/auth/token", self.token, methods=["POST"]),
            Route("/auth/authorize", self.authorize_form, methods=["GET"]),
            Route("/auth/authorize", self.authorize_submit, methods=["POST"]),
            Route("/auth/revoke", self.revoke, methods=["POST"]),
            Route("/auth/logout", self.logout, methods=["POST"]),
            Route("/auth/jwks", self.jwks, methods=["GET"]),
            Route("/fhir/.well-known/smart-configuration", self.smart_configuration, methods=["GET"]),
            Route("/.well-known/smart-configuration", self.smart_configuration, methods=["GET"]),
        ]


def _opt(value: Any) -> str | None:
    return str(value) if value else None


def _client_auth(request: Request, form: Any) -> tuple[str, str]:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("basic "):
        try:
            decoded = base64.b64decode(header[6:]).decode()
            client_id, _, secret = decoded.partition(":")
            return client_id, secret
        except (ValueError, UnicodeDecodeError):
            return "", ""
    return str(form.get("client_id", "")), str(form.get("client_secret", ""))


def _s256(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


def _check_authorize(q: Any) -> str | None:
    if q.get("response_type") != "code":
        return "response_type must be code"
    if q.get("client_id") != WEB_CLIENT:
        return "unknown client_id"
    redirect = str(q.get("redirect_uri", ""))
    if not redirect.startswith("/") or redirect.startswith("//"):
        return "redirect_uri must be a path on this server"
    if q.get("code_challenge_method") != "S256" or len(str(q.get("code_challenge", ""))) < 43:
        return "PKCE with S256 is required"
    return None


def _login_page(params: dict[str, str], problem: str | None = None) -> str:
    hidden = "".join(f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
                     for k, v in params.items())
    alert = f'<p role="alert" class="err">{html.escape(problem)}</p>' if problem else ""
    return f"""<!doctype html><html lang="vi"><head><meta charset="utf-8"><title>Đăng nhập / Sign in</title>
<style>body{{font-family:sans-serif;max-width:22rem;margin:4rem auto}}label{{display:block;margin:.6rem 0}}
input[type=text],input[type=password]{{width:100%}}.err{{color:#b00}}</style></head><body>
<h1>lienthong</h1><form method="post" action="/auth/authorize">{alert}{hidden}
<label>Tên đăng nhập / Username <input type="text" name="username" autocomplete="username" required></label>
<label>Mật khẩu / Password <input type="password" name="password" autocomplete="current-password" required></label>
<button type="submit">Đăng nhập / Sign in</button></form></body></html>"""


__all__ = ["WEB_CLIENT", "AuthApi", "orjson"]
